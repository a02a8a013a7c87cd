//! The durable store: goals, runs, step states, the append-only journal of every run and
//! the members of each swarm, in an embedded SQLite database (`<data-dir>/mesh.db`).
//!
//! The journal is the record; `runs` and `steps` are its projection, updated in the same
//! transaction as each journal row, so both always agree.
//!
//! The store is a shared handle rather than an actor: SQLite serialises writers itself,
//! every call is one short transaction, and a mailbox hop would only add latency.
//!
//! Invariant: a run's state changes only through [`Store::record`], one journal row at a time.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use mesh_proto::domain::*;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Error, Result};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS goals (
    goal_id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    objective TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id),
    state TEXT NOT NULL,
    output TEXT,
    error TEXT,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, run_id);
CREATE TABLE IF NOT EXISTS steps (
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    position INTEGER NOT NULL,
    uses TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL DEFAULT 0,
    failures INTEGER NOT NULL DEFAULT 0,
    node_id TEXT,
    agent TEXT,
    output TEXT,
    error TEXT,
    PRIMARY KEY (run_id, step_id)
);
CREATE TABLE IF NOT EXISTS journal (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step_id TEXT,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS swarm_members (
    goal_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    node_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    PRIMARY KEY (goal_id, skill, node_id, agent)
);
"#;

/// One entry of a run's journal.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum JournalEvent {
    RunCreated,
    /// A new attempt is about to be dispatched.
    StepStarted {
        step: StepId,
        attempt: u32,
        epoch: u64,
    },
    /// The dispatcher handed the attempt to an agent.
    StepAssigned {
        step: StepId,
        attempt: u32,
        agent: AgentKey,
    },
    /// The one accepted result of the step.
    StepSucceeded {
        step: StepId,
        attempt: u32,
        output: Value,
    },
    /// An attempt failed; another may follow.
    StepAttemptFailed {
        step: StepId,
        attempt: u32,
        error: TaskError,
    },
    StepFailed {
        step: StepId,
        error: String,
    },
    StepCancelled {
        step: StepId,
    },
    StepSkipped {
        step: StepId,
    },
    RunFinished {
        state: RunState,
        output: Option<Value>,
        error: Option<String>,
    },
}

impl JournalEvent {
    pub fn kind(&self) -> &'static str {
        match self {
            JournalEvent::RunCreated => "run_created",
            JournalEvent::StepStarted { .. } => "step_started",
            JournalEvent::StepAssigned { .. } => "step_assigned",
            JournalEvent::StepSucceeded { .. } => "step_succeeded",
            JournalEvent::StepAttemptFailed { .. } => "step_attempt_failed",
            JournalEvent::StepFailed { .. } => "step_failed",
            JournalEvent::StepCancelled { .. } => "step_cancelled",
            JournalEvent::StepSkipped { .. } => "step_skipped",
            JournalEvent::RunFinished { .. } => "run_finished",
        }
    }

    fn step(&self) -> Option<&StepId> {
        match self {
            JournalEvent::RunCreated | JournalEvent::RunFinished { .. } => None,
            JournalEvent::StepStarted { step, .. }
            | JournalEvent::StepAssigned { step, .. }
            | JournalEvent::StepSucceeded { step, .. }
            | JournalEvent::StepAttemptFailed { step, .. }
            | JournalEvent::StepFailed { step, .. }
            | JournalEvent::StepCancelled { step }
            | JournalEvent::StepSkipped { step } => Some(step),
        }
    }
}

/// A step as stored, for resuming a run.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredStep {
    pub id: StepId,
    pub state: StepState,
    pub attempt: u32,
    pub failures: u32,
    pub agent: Option<AgentKey>,
    pub output: Option<Value>,
    pub error: Option<String>,
}

/// Everything needed to rebuild a run after a restart.
#[derive(Clone, Debug, PartialEq)]
pub struct StoredRun {
    pub run_id: RunId,
    pub goal_id: GoalId,
    pub goal: GoalSpec,
    pub state: RunState,
    pub steps: Vec<StoredStep>,
    pub next_seq: u64,
}

#[derive(Clone)]
pub struct Store {
    conn: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

fn parse_opt_json(text: Option<String>) -> Result<Option<Value>> {
    text.map(|t| {
        serde_json::from_str(&t).map_err(|e| Error::Corrupt(format!("bad JSON in store: {e}")))
    })
    .transpose()
}

fn parse_state<T>(text: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(text).ok_or_else(|| Error::Corrupt(format!("unknown state `{text}` in store")))
}

impl Store {
    /// Opens (and creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let conn = Connection::open(dir.join("mesh.db"))?;
        // WAL with synchronous=NORMAL survives a crash of the process (the contract
        // tested here); set MESH_STORE_SYNC=full to also survive a power loss.
        let sync = match std::env::var("MESH_STORE_SYNC").as_deref() {
            Ok("full") => "FULL",
            _ => "NORMAL",
        };
        conn.execute_batch(&format!(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;"
        ))?;
        conn.execute_batch(SCHEMA)?;
        Ok(Self {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (each call is one
        // transaction), so a poisoned lock is safe to take over.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Increments and returns the coordinator epoch; called once per start.
    pub fn bump_epoch(&self) -> Result<u64> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let current: Option<String> = tx
            .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
                r.get(0)
            })
            .optional()?;
        let next = current.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', ?1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            params![next.to_string()],
        )?;
        tx.commit()?;
        Ok(next)
    }

    /// Stores a new goal and its run, or returns the run of an earlier goal with the same
    /// idempotency key.
    pub fn submit(&self, goal: &GoalSpec) -> Result<RunRef> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        if let Some(key) = &goal.idempotency_key {
            let existing: Option<(String, String)> = tx
                .query_row(
                    "SELECT g.goal_id, r.run_id FROM goals g JOIN runs r ON r.goal_id = g.goal_id
                     WHERE g.idempotency_key = ?1 ORDER BY r.run_id LIMIT 1",
                    params![key],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )
                .optional()?;
            if let Some((goal_id, run_id)) = existing {
                return Ok(RunRef {
                    goal_id: GoalId(goal_id),
                    run_id: RunId(run_id),
                    created: false,
                });
            }
        }
        let goal_id = GoalId(format!("goal-{}", uuid::Uuid::now_v7().simple()));
        let run_id = RunId(format!("run-{}", uuid::Uuid::now_v7().simple()));
        let now = now_ms();
        let spec = serde_json::to_string(goal).map_err(|e| Error::Corrupt(e.to_string()))?;
        tx.execute(
            "INSERT INTO goals (goal_id, idempotency_key, objective, spec, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![goal_id.0, goal.idempotency_key, goal.objective, spec, now],
        )?;
        tx.execute(
            "INSERT INTO runs (run_id, goal_id, state, created_at_ms, updated_at_ms) VALUES (?1, ?2, 'running', ?3, ?3)",
            params![run_id.0, goal_id.0, now],
        )?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO steps (run_id, step_id, position, uses, state) VALUES (?1, ?2, ?3, ?4, 'pending')",
            )?;
            for (i, step) in goal.steps.iter().enumerate() {
                insert.execute(params![run_id.0, step.id.0, i as i64, step.uses])?;
            }
        }
        append(&tx, &run_id, 0, &JournalEvent::RunCreated, now)?;
        tx.commit()?;
        Ok(RunRef {
            goal_id,
            run_id,
            created: true,
        })
    }

    /// Appends `event` as entry `seq` of the run's journal and applies it to the projection,
    /// in one transaction.
    pub fn record(&self, run_id: &RunId, seq: u64, event: &JournalEvent) -> Result<()> {
        let mut conn = self.lock();
        let tx = conn.transaction()?;
        let now = now_ms();
        append(&tx, run_id, seq, event, now)?;
        let run = &run_id.0;
        match event {
            JournalEvent::RunCreated => {}
            JournalEvent::StepStarted { step, attempt, .. } => {
                tx.prepare_cached(
                    "UPDATE steps SET state = 'running', attempt = ?3, node_id = NULL, agent = NULL
                     WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0, attempt])?;
            }
            JournalEvent::StepAssigned { step, agent, .. } => {
                tx.prepare_cached(
                    "UPDATE steps SET node_id = ?3, agent = ?4 WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0, agent.node.0, agent.agent])?;
            }
            JournalEvent::StepSucceeded { step, output, .. } => {
                tx.prepare_cached(
                    "UPDATE steps SET state = 'succeeded', output = ?3, error = NULL
                     WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0, json_text(output)])?;
            }
            JournalEvent::StepAttemptFailed { step, error, .. } => {
                tx.prepare_cached(
                    "UPDATE steps SET failures = failures + 1, error = ?3 WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0, error.to_string()])?;
            }
            JournalEvent::StepFailed { step, error } => {
                tx.prepare_cached(
                    "UPDATE steps SET state = 'failed', error = ?3 WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0, error])?;
            }
            JournalEvent::StepCancelled { step } => {
                tx.prepare_cached(
                    "UPDATE steps SET state = 'cancelled' WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0])?;
            }
            JournalEvent::StepSkipped { step } => {
                tx.prepare_cached(
                    "UPDATE steps SET state = 'skipped' WHERE run_id = ?1 AND step_id = ?2",
                )?
                .execute(params![run, step.0])?;
            }
            JournalEvent::RunFinished {
                state,
                output,
                error,
            } => {
                tx.prepare_cached(
                    "UPDATE runs SET state = ?2, output = ?3, error = ?4 WHERE run_id = ?1",
                )?
                .execute(params![
                    run,
                    state.as_str(),
                    output.as_ref().map(json_text),
                    error
                ])?;
            }
        }
        tx.prepare_cached("UPDATE runs SET updated_at_ms = ?2 WHERE run_id = ?1")?
            .execute(params![run, now])?;
        tx.commit()?;
        Ok(())
    }

    /// Records that the swarm of `goal_id` uses `member`; idempotent.
    pub fn add_swarm_member(&self, goal_id: &GoalId, member: &SwarmMember) -> Result<()> {
        self.lock()
            .prepare_cached(
                "INSERT OR IGNORE INTO swarm_members (goal_id, skill, node_id, agent) VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![goal_id.0, member.skill, member.agent.node.0, member.agent.agent])?;
        Ok(())
    }

    /// Runs not finished yet, oldest first.
    pub fn unfinished_runs(&self) -> Result<Vec<RunId>> {
        let conn = self.lock();
        let mut stmt =
            conn.prepare("SELECT run_id FROM runs WHERE state = 'running' ORDER BY run_id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(RunId)
            .collect())
    }

    /// Loads a run for resuming it.
    pub fn load_run(&self, run_id: &RunId) -> Result<StoredRun> {
        let conn = self.lock();
        let (goal_id, spec, state): (String, String, String) = conn
            .query_row(
                "SELECT r.goal_id, g.spec, r.state FROM runs r JOIN goals g ON g.goal_id = r.goal_id WHERE r.run_id = ?1",
                params![run_id.0],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?
            .ok_or_else(|| Error::RunNotFound(run_id.0.clone()))?;
        let goal: GoalSpec =
            serde_json::from_str(&spec).map_err(|e| Error::Corrupt(format!("goal spec: {e}")))?;
        let steps = load_steps(&conn, run_id)?
            .into_iter()
            .map(|(_, s)| s)
            .collect();
        let next_seq: i64 = conn.query_row(
            "SELECT COALESCE(MAX(seq), -1) + 1 FROM journal WHERE run_id = ?1",
            params![run_id.0],
            |r| r.get(0),
        )?;
        Ok(StoredRun {
            run_id: run_id.clone(),
            goal_id: GoalId(goal_id),
            goal,
            state: parse_state(&state, RunState::parse)?,
            steps,
            next_seq: next_seq as u64,
        })
    }

    /// The run as clients see it.
    pub fn run_view(&self, run_id: &RunId) -> Result<RunView> {
        let conn = self.lock();
        let row = conn
            .query_row(
                "SELECT r.goal_id, g.objective, r.state, r.output, r.error, r.created_at_ms, r.updated_at_ms
                 FROM runs r JOIN goals g ON g.goal_id = r.goal_id WHERE r.run_id = ?1",
                params![run_id.0],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, Option<String>>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, i64>(5)?,
                        r.get::<_, i64>(6)?,
                    ))
                },
            )
            .optional()?
            .ok_or_else(|| Error::RunNotFound(run_id.0.clone()))?;
        let (goal_id, objective, state, output, error, created_at_ms, updated_at_ms) = row;
        let steps = load_steps(&conn, run_id)?
            .into_iter()
            .map(|(uses, s)| StepView {
                id: s.id,
                uses,
                state: s.state,
                attempt: s.attempt,
                agent: s.agent,
                output: s.output,
                error: s.error,
            })
            .collect();
        let mut stmt = conn.prepare_cached(
            "SELECT skill, node_id, agent FROM swarm_members WHERE goal_id = ?1 ORDER BY skill, node_id, agent",
        )?;
        let swarm = stmt
            .query_map(params![goal_id], |r| {
                Ok(SwarmMember {
                    skill: r.get(0)?,
                    agent: AgentKey {
                        node: NodeId(r.get(1)?),
                        agent: r.get(2)?,
                    },
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(RunView {
            run_id: run_id.clone(),
            goal_id: GoalId(goal_id),
            objective,
            state: parse_state(&state, RunState::parse)?,
            steps,
            output: parse_opt_json(output)?,
            error,
            swarm,
            created_at_ms,
            updated_at_ms,
        })
    }

    /// One page of runs, newest first.
    pub fn list_runs(&self, query: &ListRunsQuery) -> Result<RunPage> {
        let conn = self.lock();
        let limit = query.page_size as i64 + 1;
        let mut stmt = conn.prepare_cached(
            "SELECT r.run_id, r.goal_id, g.objective, r.state, r.created_at_ms, r.updated_at_ms
             FROM runs r JOIN goals g ON g.goal_id = r.goal_id
             WHERE (?1 IS NULL OR r.state = ?1) AND (?2 IS NULL OR r.run_id < ?2)
             ORDER BY r.run_id DESC LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![
                    query.state.map(RunState::as_str),
                    query.page_token.as_ref().map(|t| t.0.as_str()),
                    limit
                ],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, i64>(4)?,
                        r.get::<_, i64>(5)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut runs = rows
            .into_iter()
            .map(
                |(run_id, goal_id, objective, state, created_at_ms, updated_at_ms)| {
                    Ok(RunSummary {
                        run_id: RunId(run_id),
                        goal_id: GoalId(goal_id),
                        objective,
                        state: parse_state(&state, RunState::parse)?,
                        created_at_ms,
                        updated_at_ms,
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let next_page_token = if runs.len() > query.page_size as usize {
            runs.truncate(query.page_size as usize);
            runs.last().map(|r| r.run_id.0.clone())
        } else {
            None
        };
        Ok(RunPage {
            runs,
            next_page_token,
        })
    }
}

fn append(
    tx: &rusqlite::Transaction<'_>,
    run_id: &RunId,
    seq: u64,
    event: &JournalEvent,
    now: i64,
) -> Result<()> {
    let text = serde_json::to_string(event).map_err(|e| Error::Corrupt(e.to_string()))?;
    tx.prepare_cached(
        "INSERT INTO journal (run_id, seq, at_ms, kind, step_id, event) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![
        run_id.0,
        seq as i64,
        now,
        event.kind(),
        event.step().map(|s| s.0.as_str()),
        text
    ])?;
    Ok(())
}

fn load_steps(conn: &Connection, run_id: &RunId) -> Result<Vec<(String, StoredStep)>> {
    let mut stmt = conn.prepare_cached(
        "SELECT step_id, uses, state, attempt, failures, node_id, agent, output, error
         FROM steps WHERE run_id = ?1 ORDER BY position",
    )?;
    let rows = stmt
        .query_map(params![run_id.0], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, u32>(3)?,
                r.get::<_, u32>(4)?,
                r.get::<_, Option<String>>(5)?,
                r.get::<_, Option<String>>(6)?,
                r.get::<_, Option<String>>(7)?,
                r.get::<_, Option<String>>(8)?,
            ))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    rows.into_iter()
        .map(
            |(id, uses, state, attempt, failures, node, agent, output, error)| {
                Ok((
                    uses,
                    StoredStep {
                        id: StepId(id),
                        state: parse_state(&state, StepState::parse)?,
                        attempt,
                        failures,
                        agent: node.zip(agent).map(|(node, agent)| AgentKey {
                            node: NodeId(node),
                            agent,
                        }),
                        output: parse_opt_json(output)?,
                        error,
                    },
                ))
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn goal(key: Option<&str>) -> GoalSpec {
        GoalSpec {
            objective: "test".into(),
            inputs: json!({}),
            steps: vec![
                StepSpec {
                    id: "a".into(),
                    uses: "echo".into(),
                    with: json!({"x": 1}),
                    needs: vec![],
                },
                StepSpec {
                    id: "b".into(),
                    uses: "echo".into(),
                    with: json!({}),
                    needs: vec!["a".into()],
                },
            ],
            idempotency_key: key.map(str::to_owned),
        }
    }

    #[test]
    fn idempotency_key_returns_the_existing_run() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let first = store.submit(&goal(Some("k1"))).unwrap();
        let again = store.submit(&goal(Some("k1"))).unwrap();
        assert!(first.created);
        assert!(!again.created);
        assert_eq!(first.run_id, again.run_id);
        let other = store.submit(&goal(None)).unwrap();
        assert_ne!(other.run_id, first.run_id);
    }

    #[test]
    fn journal_and_projection_agree_after_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let run = {
            let store = Store::open(dir.path()).unwrap();
            assert_eq!(store.bump_epoch().unwrap(), 1);
            let run = store.submit(&goal(None)).unwrap();
            let a = StepId::from("a");
            store
                .record(
                    &run.run_id,
                    1,
                    &JournalEvent::StepStarted {
                        step: a.clone(),
                        attempt: 1,
                        epoch: 1,
                    },
                )
                .unwrap();
            store
                .record(
                    &run.run_id,
                    2,
                    &JournalEvent::StepSucceeded {
                        step: a,
                        attempt: 1,
                        output: json!({"ok": true}),
                    },
                )
                .unwrap();
            run
        };
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.bump_epoch().unwrap(), 2);
        let stored = store.load_run(&run.run_id).unwrap();
        assert_eq!(stored.next_seq, 3);
        assert_eq!(stored.steps[0].state, StepState::Succeeded);
        assert_eq!(stored.steps[0].output, Some(json!({"ok": true})));
        assert_eq!(stored.steps[1].state, StepState::Pending);
        assert_eq!(store.unfinished_runs().unwrap(), vec![run.run_id.clone()]);
        // A journal entry cannot be written twice.
        assert!(
            store
                .record(
                    &run.run_id,
                    2,
                    &JournalEvent::StepSkipped { step: "b".into() }
                )
                .is_err()
        );
    }

    #[test]
    fn lists_runs_in_pages() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ids: Vec<_> = (0..5)
            .map(|_| store.submit(&goal(None)).unwrap().run_id)
            .collect();
        let q = |token: Option<RunId>| ListRunsQuery {
            state: None,
            page_size: 2,
            page_token: token,
        };
        let p1 = store.list_runs(&q(None)).unwrap();
        assert_eq!(
            p1.runs.iter().map(|r| &r.run_id).collect::<Vec<_>>(),
            vec![&ids[4], &ids[3]]
        );
        let p2 = store.list_runs(&q(p1.next_page_token.map(RunId))).unwrap();
        let p3 = store.list_runs(&q(p2.next_page_token.map(RunId))).unwrap();
        assert_eq!(p3.runs.len(), 1);
        assert_eq!(p3.next_page_token, None);
        let done = ListRunsQuery {
            state: Some(RunState::Succeeded),
            page_size: 10,
            page_token: None,
        };
        assert!(store.list_runs(&done).unwrap().runs.is_empty());
    }
}
