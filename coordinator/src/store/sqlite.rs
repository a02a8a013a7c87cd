//! The embedded backend: SQLite (`<data-dir>/mesh.db`).
//!
//! Writes go to one writer thread that commits in groups: it takes every write waiting in
//! its bounded queue (up to [`MAX_GROUP`]), applies each inside its own savepoint, commits
//! once, then answers each caller. A caller's write is durable when its answer comes; many
//! runs share one commit, which is what makes journaling cheap. Reads use a second
//! connection, so they never wait for the writer (WAL lets them run side by side).
//! `runs` holds each run's state and times for listing, updated in the same transaction as
//! the journal rows, so both always agree.

use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::mpsc;

use mesh_proto::domain::*;
use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;

use super::write::{Applied, GroupError, MAX_GROUP, WriteOp, Writer};
use super::{
    Backend, JournalEvent, NewRun, NewWorkflow, StoredGoal, StoredRun, WorkflowPage, cut_page,
    now_ms,
};
use crate::auth::{AuditEntry, AuditPage, AuditQuery, Decision, TokenRecord};
use crate::error::{Error, Result};
use crate::memory::{MemoryEntry, MemoryKey, MemoryPage};
use crate::postbox::{MessageKey, StoredMessage};
use crate::secrets::SealedSecret;
use crate::tools::ToolRecord;

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
    updated_at_ms INTEGER NOT NULL,
    namespace TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX IF NOT EXISTS runs_by_state ON runs (state, run_id);
CREATE TABLE IF NOT EXISTS journal (
    run_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    kind TEXT NOT NULL,
    step_id TEXT,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE IF NOT EXISTS workflows (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    description TEXT NOT NULL,
    source TEXT NOT NULL,
    canonical TEXT NOT NULL,
    steps INTEGER NOT NULL,
    created_at_ms INTEGER NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE IF NOT EXISTS tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER,
    revoked_at_ms INTEGER
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    namespace TEXT NOT NULL,
    method TEXT NOT NULL,
    resource TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    peer TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_by_namespace ON audit (namespace, seq);
CREATE TABLE IF NOT EXISTS secrets (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed BLOB NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS memory (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    at_ms INTEGER NOT NULL,
    expires_at_ms INTEGER
);
CREATE INDEX IF NOT EXISTS memory_by_key ON memory (namespace, scope, key, seq);
CREATE TABLE IF NOT EXISTS tools (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    declaration TEXT NOT NULL,
    created_at_ms INTEGER NOT NULL,
    updated_at_ms INTEGER NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    namespace TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    priority INTEGER NOT NULL,
    payload TEXT NOT NULL,
    sent_at_ms INTEGER NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS messages_by_key
    ON messages (namespace, recipient, sender, message_id);
CREATE TABLE IF NOT EXISTS swarm_members (
    goal_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    node_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    PRIMARY KEY (goal_id, skill, node_id, agent)
);
"#;

/// The store's layout; a store written by another layout is refused at open, except the
/// previous one, which is brought up to date (see [`migrate`]).
const SCHEMA_VERSION: &str = "3";

#[derive(Clone)]
pub struct SqliteStore {
    writer: Writer,
    reader: Arc<Mutex<Connection>>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SqliteStore")
    }
}

fn json_text(v: &Value) -> String {
    v.to_string()
}

fn parse_state<T>(text: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(text).ok_or_else(|| Error::Corrupt(format!("unknown state `{text}` in store")))
}

fn connect(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    // WAL with synchronous=NORMAL survives a crash of the process (the contract tested
    // here); set MESH_STORE_SYNC=full to also survive a power loss.
    let sync = match std::env::var("MESH_STORE_SYNC").as_deref() {
        Ok("full") => "FULL",
        _ => "NORMAL",
    };
    conn.execute_batch(&format!(
        "PRAGMA journal_mode=WAL; PRAGMA synchronous={sync}; PRAGMA foreign_keys=ON; PRAGMA busy_timeout=5000;"
    ))?;
    // A cached statement keeps its plan whatever values are bound to it. Without this,
    // SQLite (built with STAT4) marks a statement to be parsed and planned again whenever
    // a parameter it might plan around gets a new value: every run id, every time.
    conn.set_db_config(
        rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG,
        true,
    )?;
    // Room for every statement this module prepares (the default of 16 is fewer, and an
    // evicted statement is parsed again on its next use).
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

impl SqliteStore {
    /// Opens (and creates) the database in `dir` and starts its writer thread, which ends
    /// when the last handle is dropped.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir)?;
        let path = dir.join("mesh.db");
        let mut write_conn = connect(&path)?;
        write_conn.execute_batch(SCHEMA)?;
        migrate(&write_conn)?;
        check_schema(&write_conn, &path)?;
        let reader = connect(&path)?;
        let (writer, rx) = Writer::new();
        std::thread::Builder::new()
            .name("mesh-store-writer".into())
            .spawn(move || write_loop(&mut write_conn, rx))?;
        Ok(Self {
            writer,
            reader: Arc::new(Mutex::new(reader)),
        })
    }

    /// The store at `dir` as it is when its writer thread has died (a panic, say): reads
    /// work, every write fails.
    #[cfg(test)]
    pub(crate) fn without_writer(dir: &Path) -> Result<Self> {
        let store = Self::open(dir)?;
        let (writer, _) = Writer::new();
        Ok(Self { writer, ..store })
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (reads only), so a
        // poisoned lock is safe to take over.
        self.reader.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Backend for SqliteStore {
    fn writer(&self) -> &Writer {
        &self.writer
    }
    /// A workflow version, or its newest version when `version` is `None`.
    async fn workflow(&self, name: &str, version: Option<u32>) -> Result<WorkflowRecord> {
        let conn = self.read();
        let found = conn
            .prepare_cached(
                "SELECT name, version, description, source, steps, created_at_ms FROM workflows
                 WHERE name = ?1 AND (?2 IS NULL OR version = ?2) ORDER BY version DESC LIMIT 1",
            )?
            .query_row(params![name, version], workflow_row)
            .optional()?;
        found.ok_or_else(|| {
            Error::WorkflowNotFound(match version {
                Some(v) => format!("{name}@{v}"),
                None => name.to_owned(),
            })
        })
    }

    /// Workflows by name, then version, newest first; `after` is the last `name@version` of the
    /// previous page.
    async fn list_workflows(
        &self,
        namespace: &Namespace,
        name: Option<&str>,
        page_size: u32,
        after: Option<(String, u32)>,
    ) -> Result<WorkflowPage> {
        let conn = self.read();
        let (after_name, after_version) = after.map_or((None, None), |(n, v)| (Some(n), Some(v)));
        // The default namespace's names have no separator; another's start with it.
        let prefix = (!namespace.is_default()).then(|| format!("{namespace}\u{1f}"));
        let mut rows = conn
            .prepare_cached(
                "SELECT name, version, description, source, steps, created_at_ms FROM workflows
                 WHERE (?1 IS NULL OR name = ?1)
                   AND (?2 IS NULL OR name > ?2 OR (name = ?2 AND version < ?3))
                   AND (CASE WHEN ?5 IS NULL THEN instr(name, char(31)) = 0
                        ELSE substr(name, 1, length(?5)) = ?5 END)
                 ORDER BY name, version DESC LIMIT ?4",
            )?
            .query_map(
                params![
                    name,
                    after_name,
                    after_version,
                    page_size as i64 + 1,
                    prefix
                ],
                workflow_row,
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let next = cut_page(&mut rows, page_size, |w| {
            format!("{}@{}", w.name, w.version)
        });
        Ok((rows, next))
    }

    /// Whether a goal with this idempotency key is stored.
    async fn knows_idempotency_key(&self, key: &str) -> Result<bool> {
        let conn = self.read();
        let found = conn
            .prepare_cached("SELECT 1 FROM goals WHERE idempotency_key = ?1")?
            .query_row(params![key], |_| Ok(()))
            .optional()?;
        Ok(found.is_some())
    }

    /// Runs not finished yet, oldest first.
    async fn unfinished_runs(&self) -> Result<Vec<RunId>> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT run_id FROM runs WHERE state = 'running' ORDER BY run_id")?;
        let rows = stmt.query_map([], |r| r.get::<_, String>(0))?;
        Ok(rows
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(RunId)
            .collect())
    }

    async fn journal_times(&self, run_id: &RunId) -> Result<Vec<i64>> {
        let conn = self.read();
        let mut stmt =
            conn.prepare_cached("SELECT at_ms FROM journal WHERE run_id = ?1 ORDER BY seq")?;
        let rows = stmt.query_map(params![run_id.0], |r| r.get::<_, i64>(0))?;
        Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
    }

    async fn runs_of_workflow(
        &self,
        namespace: &Namespace,
        names: &[String],
        version: Option<u32>,
        limit: u32,
    ) -> Result<Vec<RunId>> {
        // Newest first, scanning back until `limit` match: a profile is an operator's
        // occasional question, and the goals' specs already name their workflow.
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT r.run_id FROM runs r JOIN goals g ON g.goal_id = r.goal_id
             WHERE r.namespace = ?1 AND r.state <> 'running'
               AND json_extract(g.spec, '$.workflow.name') IN (?2, ?3)
               AND (?4 = 0 OR json_extract(g.spec, '$.workflow.version') = ?4)
             ORDER BY r.run_id DESC LIMIT ?5",
        )?;
        let name = |i: usize| names.get(i).or(names.first()).cloned().unwrap_or_default();
        let rows = stmt.query_map(
            params![
                namespace.as_str(),
                name(0),
                name(1),
                version.unwrap_or(0),
                limit
            ],
            |r| r.get::<_, String>(0),
        )?;
        Ok(rows
            .collect::<rusqlite::Result<Vec<_>>>()?
            .into_iter()
            .map(RunId)
            .collect())
    }

    /// Loads a run and its whole journal, for replaying it.
    async fn load_run(&self, run_id: &RunId) -> Result<StoredRun> {
        let conn = self.read();
        let row: Option<(String, String, String, i64, i64)> = conn
            .prepare_cached(
                "SELECT r.goal_id, g.spec, r.state, r.created_at_ms, r.updated_at_ms
                 FROM runs r JOIN goals g ON g.goal_id = r.goal_id WHERE r.run_id = ?1",
            )?
            .query_row(params![run_id.0], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
            })
            .optional()?;
        let (goal_id, spec, state, created_at_ms, updated_at_ms) =
            row.ok_or_else(|| Error::RunNotFound(run_id.0.clone()))?;
        let goal: StoredGoal =
            serde_json::from_str(&spec).map_err(|e| Error::Corrupt(format!("goal spec: {e}")))?;
        let mut stmt =
            conn.prepare_cached("SELECT seq, event FROM journal WHERE run_id = ?1 ORDER BY seq")?;
        let mut next_seq = 0u64;
        let events = stmt
            .query_map(params![run_id.0], |r| {
                Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?))
            })?
            .map(|row| {
                let (seq, text) = row?;
                next_seq = seq as u64 + 1;
                serde_json::from_str(&text)
                    .map_err(|e| Error::Corrupt(format!("journal entry {seq} of {run_id}: {e}")))
            })
            .collect::<Result<Vec<JournalEvent>>>()?;
        let swarm = load_swarm(&conn, &goal_id)?;
        Ok(StoredRun {
            run_id: run_id.clone(),
            goal_id: GoalId(goal_id),
            goal,
            state: parse_state(&state, RunState::parse)?,
            events,
            swarm,
            next_seq,
            created_at_ms,
            updated_at_ms,
        })
    }

    /// One page of runs, newest first.
    async fn list_runs(&self, query: &ListRunsQuery) -> Result<RunPage> {
        let conn = self.read();
        let limit = query.page_size as i64 + 1;
        let mut stmt = conn.prepare_cached(
            "SELECT r.run_id, r.goal_id, g.objective, r.state, r.created_at_ms, r.updated_at_ms
             FROM runs r JOIN goals g ON g.goal_id = r.goal_id
             WHERE (?1 IS NULL OR r.state = ?1) AND (?2 IS NULL OR r.run_id < ?2)
               AND r.namespace = ?4
             ORDER BY r.run_id DESC LIMIT ?3",
        )?;
        let rows = stmt
            .query_map(
                params![
                    query.state.map(RunState::as_str),
                    query.page_token.as_ref().map(|t| t.0.as_str()),
                    limit,
                    query.namespace.as_str()
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
                        namespace: query.namespace.clone(),
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let next_page_token = cut_page(&mut runs, query.page_size, |r| r.run_id.0.clone());
        Ok(RunPage {
            runs,
            next_page_token,
        })
    }

    async fn messages(&self) -> Result<Vec<StoredMessage>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT namespace, recipient, sender, message_id, topic, priority, payload, sent_at_ms
             FROM messages ORDER BY seq",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let payload: String = r.get(6)?;
                Ok(StoredMessage {
                    key: MessageKey {
                        namespace: r.get(0)?,
                        recipient: r.get(1)?,
                        sender: r.get(2)?,
                        message_id: r.get(3)?,
                    },
                    topic: r.get(4)?,
                    priority: r.get(5)?,
                    payload: serde_json::from_str(&payload).unwrap_or(Value::Null),
                    sent_at_ms: r.get(7)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    async fn tools(&self) -> Result<Vec<ToolRecord>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT namespace, name, declaration, created_at_ms, updated_at_ms FROM tools
             ORDER BY namespace, name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                let text: String = r.get(2)?;
                Ok(ToolRecord {
                    namespace: r.get(0)?,
                    name: r.get(1)?,
                    declaration: serde_json::from_str(&text).unwrap_or(Value::Null),
                    created_at_ms: r.get(3)?,
                    updated_at_ms: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    async fn memory(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
        last: u32,
    ) -> Result<Vec<MemoryEntry>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT seq, value, run_id, step_id, at_ms, expires_at_ms FROM memory
             WHERE namespace = ?1 AND scope = ?2 AND key = ?3
             AND (expires_at_ms IS NULL OR expires_at_ms > ?4)
             ORDER BY seq DESC LIMIT ?5",
        )?;
        let mut rows = stmt
            .query_map(params![namespace, scope, key, now_ms(), last], |r| {
                Ok(MemoryEntry {
                    seq: r.get(0)?,
                    value: serde_json::from_str(&r.get::<_, String>(1)?).unwrap_or(Value::Null),
                    run_id: r.get(2)?,
                    step_id: r.get(3)?,
                    at_ms: r.get(4)?,
                    expires_at_ms: r.get(5)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.reverse();
        Ok(rows)
    }

    async fn list_memory(
        &self,
        namespace: &str,
        scope: Option<&str>,
        page_size: u32,
        after: Option<(String, String)>,
    ) -> Result<MemoryPage> {
        let conn = self.read();
        let (after_scope, after_key) = after.unwrap_or_default();
        let mut stmt = conn.prepare_cached(
            "SELECT scope, key, COUNT(*), MAX(at_ms) FROM memory
             WHERE namespace = ?1 AND (?2 IS NULL OR scope = ?2)
             AND (expires_at_ms IS NULL OR expires_at_ms > ?3)
             AND (scope > ?4 OR (scope = ?4 AND key > ?5))
             GROUP BY scope, key ORDER BY scope, key LIMIT ?6",
        )?;
        let keys = stmt
            .query_map(
                params![
                    namespace,
                    scope,
                    now_ms(),
                    after_scope,
                    after_key,
                    page_size + 1
                ],
                |r| {
                    Ok(MemoryKey {
                        scope: r.get(0)?,
                        key: r.get(1)?,
                        entries: r.get::<_, i64>(2)? as u64,
                        updated_at_ms: r.get(3)?,
                    })
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut keys = keys;
        let next = cut_page(&mut keys, page_size, |k| (k.scope.clone(), k.key.clone()));
        Ok(MemoryPage { keys, next })
    }

    async fn secrets(&self) -> Result<Vec<SealedSecret>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT namespace, name, sealed, created_at_ms, updated_at_ms FROM secrets
             ORDER BY namespace, name",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok(SealedSecret {
                    namespace: r.get(0)?,
                    name: r.get(1)?,
                    sealed: r.get(2)?,
                    created_at_ms: r.get(3)?,
                    updated_at_ms: r.get(4)?,
                })
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows)
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let conn = self.read();
        let mut stmt = conn.prepare_cached(
            "SELECT token_id, name, namespace, role, hash, created_at_ms, expires_at_ms, revoked_at_ms
             FROM tokens ORDER BY created_at_ms DESC, token_id DESC",
        )?;
        let rows = stmt
            .query_map([], |r| {
                Ok((
                    TokenRecord {
                        token_id: r.get(0)?,
                        name: r.get(1)?,
                        namespace: r.get(2)?,
                        role: crate::auth::Role::Read,
                        hash: r.get(4)?,
                        created_at_ms: r.get(5)?,
                        expires_at_ms: r.get(6)?,
                        revoked_at_ms: r.get(7)?,
                    },
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        rows.into_iter()
            .map(|(mut t, role)| {
                t.role = role
                    .parse()
                    .map_err(|_| Error::Corrupt(format!("unknown role `{role}` in store")))?;
                Ok(t)
            })
            .collect()
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<AuditPage> {
        let conn = self.read();
        let limit = i64::from(q.page_size) + 1;
        let mut stmt = conn.prepare_cached(
            "SELECT seq, at_ms, actor, namespace, method, resource, decision, reason, peer FROM audit
             WHERE (?1 IS NULL OR namespace = ?1) AND (?2 IS NULL OR actor = ?2)
               AND (?3 IS NULL OR decision = ?3) AND (?4 IS NULL OR method = ?4)
               AND (?5 IS NULL OR seq < ?5)
             ORDER BY seq DESC LIMIT ?6",
        )?;
        let rows = stmt
            .query_map(
                params![
                    q.namespace,
                    q.actor,
                    q.decision.map(Decision::as_str),
                    q.method,
                    q.before.map(|s| s as i64),
                    limit
                ],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, String>(3)?,
                        r.get::<_, String>(4)?,
                        r.get::<_, String>(5)?,
                        r.get::<_, String>(6)?,
                        r.get::<_, String>(7)?,
                        r.get::<_, String>(8)?,
                    ))
                },
            )?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let mut rows = rows
            .into_iter()
            .map(
                |(seq, at_ms, actor, namespace, method, resource, decision, reason, peer)| {
                    Ok(AuditEntry {
                        seq: seq as u64,
                        at_ms,
                        actor,
                        namespace,
                        method,
                        resource,
                        decision: parse_state(&decision, Decision::parse)?,
                        reason,
                        peer,
                    })
                },
            )
            .collect::<Result<Vec<_>>>()?;
        let next = cut_page(&mut rows, q.page_size, |r| r.seq);
        Ok(AuditPage { rows, next })
    }
}

/// The writer thread: commits waiting writes in groups until every handle is gone.
fn write_loop(conn: &mut Connection, mut rx: mpsc::Receiver<WriteOp>) {
    let mut batch = Vec::with_capacity(MAX_GROUP);
    while let Some(op) = rx.blocking_recv() {
        batch.push(op);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        commit_group(conn, batch.drain(..));
    }
}

/// Applies each write in its own savepoint (a failed write leaves the others whole), commits
/// once, then answers every caller: with its own result, or with the commit's error.
fn commit_group(conn: &mut Connection, batch: impl Iterator<Item = WriteOp>) {
    let mut applied = Vec::with_capacity(MAX_GROUP);
    let mut tx = match conn.transaction() {
        Ok(tx) => tx,
        Err(e) => {
            let why = GroupError::Commit(format!("cannot begin: {e}"));
            for op in batch {
                Applied::from_failed(op, &why).answer(None);
            }
            return;
        }
    };
    let now = now_ms();
    for op in batch {
        applied.push(match op {
            WriteOp::BumpEpoch(reply) => Applied::Epoch(reply, in_savepoint(&mut tx, bump_epoch)),
            WriteOp::Submit(new, reply) => {
                Applied::Submit(reply, in_savepoint(&mut tx, |c| submit(c, &new)))
            }
            WriteOp::Record {
                run_id,
                seq,
                events,
                reply,
            } => {
                let result = in_savepoint(&mut tx, |c| record(c, &run_id, seq, &events, now));
                Applied::Record(reply, events, result)
            }
            WriteOp::AddMember(goal_id, member, reply) => Applied::Member(
                reply,
                in_savepoint(&mut tx, |c| add_member(c, &goal_id, &member)),
            ),
            WriteOp::Register(new, reply) => Applied::Register(
                reply,
                in_savepoint(&mut tx, |c| register_workflow(c, &new, now)),
            ),
            WriteOp::Probe(reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached(
                        "INSERT INTO meta (key, value) VALUES ('probe', ?1)
                         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    )?
                    .execute(params![now.to_string()])?;
                    Ok(())
                }),
            ),
            WriteOp::PutToken(token, reply) => {
                Applied::Probe(reply, in_savepoint(&mut tx, |c| put_token(c, &token)))
            }
            WriteOp::PutSecret(secret, reply) => {
                Applied::Probe(reply, in_savepoint(&mut tx, |c| put_secret(c, &secret)))
            }
            WriteOp::PutMemory(new, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    let expires = (new.ttl_ms > 0).then(|| now + new.ttl_ms as i64);
                    insert_memory(
                        c,
                        (&new.namespace, &new.scope, &new.key),
                        &new.value,
                        ("", ""),
                        now,
                        expires,
                    )
                }),
            ),
            WriteOp::DeleteMemory(namespace, scope, key, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached(
                        "DELETE FROM memory WHERE namespace = ?1 AND scope = ?2 AND key = ?3",
                    )?
                    .execute(params![namespace, scope, key])?;
                    Ok(())
                }),
            ),
            WriteOp::PutMessages(messages, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    let mut stmt = c.prepare_cached(
                        "INSERT OR IGNORE INTO messages (namespace, recipient, sender, message_id,
                             topic, priority, payload, sent_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                    )?;
                    for m in &messages {
                        stmt.execute(params![
                            m.key.namespace,
                            m.key.recipient,
                            m.key.sender,
                            m.key.message_id,
                            m.topic,
                            m.priority,
                            m.payload.to_string(),
                            m.sent_at_ms
                        ])?;
                    }
                    Ok(())
                }),
            ),
            WriteOp::DeleteMessage(key, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached(
                        "DELETE FROM messages WHERE namespace = ?1 AND recipient = ?2
                             AND sender = ?3 AND message_id = ?4",
                    )?
                    .execute(params![key.namespace, key.recipient, key.sender, key.message_id])?;
                    Ok(())
                }),
            ),
            WriteOp::PutTool(tool, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached(
                        "INSERT INTO tools (namespace, name, declaration, created_at_ms, updated_at_ms)
                         VALUES (?1, ?2, ?3, ?4, ?4)
                         ON CONFLICT (namespace, name) DO UPDATE SET
                             declaration = excluded.declaration,
                             updated_at_ms = excluded.updated_at_ms",
                    )?
                    .execute(params![
                        tool.namespace,
                        tool.name,
                        tool.declaration.to_string(),
                        now
                    ])?;
                    Ok(())
                }),
            ),
            WriteOp::DeleteTool(namespace, name, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached("DELETE FROM tools WHERE namespace = ?1 AND name = ?2")?
                        .execute(params![namespace, name])?;
                    Ok(())
                }),
            ),
            WriteOp::DeleteSecret(namespace, name, reply) => Applied::Probe(
                reply,
                in_savepoint(&mut tx, |c| {
                    c.prepare_cached("DELETE FROM secrets WHERE namespace = ?1 AND name = ?2")?
                        .execute(params![namespace, name])?;
                    Ok(())
                }),
            ),
            WriteOp::Audit(rows, reply) => {
                Applied::Probe(reply, in_savepoint(&mut tx, |c| append_audit(c, &rows)))
            }
        });
    }
    let commit_error = tx
        .commit()
        .err()
        .map(|e| GroupError::Commit(format!("commit failed: {e}")));
    for a in applied {
        a.answer(commit_error.as_ref());
    }
}

fn in_savepoint<T>(
    tx: &mut rusqlite::Transaction<'_>,
    f: impl FnOnce(&Connection) -> Result<T>,
) -> Result<T> {
    let sp = tx.savepoint()?;
    let value = f(&sp)?;
    sp.commit()?;
    Ok(value)
}

fn bump_epoch(conn: &Connection) -> Result<u64> {
    let current: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'epoch'", [], |r| {
            r.get(0)
        })
        .optional()?;
    let next = current.and_then(|v| v.parse::<u64>().ok()).unwrap_or(0) + 1;
    conn.execute(
        "INSERT INTO meta (key, value) VALUES ('epoch', ?1)
         ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        params![next.to_string()],
    )?;
    Ok(next)
}

fn submit(conn: &Connection, new: &NewRun) -> Result<RunRef> {
    let goal = &new.goal;
    if let Some(key) = &goal.idempotency_key {
        let existing: Option<(String, String, Option<String>)> = conn
            .prepare_cached(
                "SELECT g.goal_id, r.run_id, json_extract(g.spec, '$.request_digest')
                 FROM goals g JOIN runs r ON r.goal_id = g.goal_id
                 WHERE g.idempotency_key = ?1 ORDER BY r.run_id LIMIT 1",
            )?
            .query_row(params![key], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        if let Some((goal_id, run_id, digest)) = existing {
            if let (Some(was), Some(now)) = (&digest, &goal.request_digest)
                && was != now
            {
                return Err(Error::AlreadyExists(format!(
                    "idempotency_key: `{key}` was used for another goal (run `{run_id}`); a different goal needs a new key"
                )));
            }
            return Ok(RunRef {
                goal_id: GoalId(goal_id),
                run_id: RunId(run_id),
                created: false,
            });
        }
    }
    let (goal_id, run_id, now) = (&new.goal_id, &new.run_id, new.at_ms);
    let spec = serde_json::to_string(goal).map_err(|e| Error::Corrupt(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO goals (goal_id, idempotency_key, objective, spec, created_at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![goal_id.0, goal.idempotency_key, goal.objective, spec, now])?;
    conn.prepare_cached(
        "INSERT INTO runs (run_id, goal_id, state, created_at_ms, updated_at_ms, namespace) VALUES (?1, ?2, 'running', ?3, ?3, ?4)",
    )?
    .execute(params![run_id.0, goal_id.0, now, goal.namespace.as_str()])?;
    append(conn, run_id, 0, &JournalEvent::RunCreated, now)?;
    record(conn, run_id, 1, &new.events, now)?;
    Ok(RunRef {
        goal_id: goal_id.clone(),
        run_id: run_id.clone(),
        created: true,
    })
}

fn record(
    conn: &Connection,
    run_id: &RunId,
    seq: u64,
    events: &[JournalEvent],
    now: i64,
) -> Result<()> {
    let run = &run_id.0;
    for (i, event) in events.iter().enumerate() {
        append(conn, run_id, seq + i as u64, event, now)?;
        if let JournalEvent::MemorySaved {
            step,
            scope,
            key,
            value,
            ttl_ms,
            ..
        } = event
        {
            let namespace: String = conn
                .prepare_cached("SELECT namespace FROM runs WHERE run_id = ?1")?
                .query_row(params![run], |r| r.get(0))?;
            let expires = (*ttl_ms > 0).then(|| now + *ttl_ms as i64);
            insert_memory(
                conn,
                (&namespace, scope, key),
                value,
                (run, &step.0),
                now,
                expires,
            )?;
        }
        if let JournalEvent::RunResumed = event {
            conn.prepare_cached(
                "UPDATE runs SET state = 'running', output = NULL, error = NULL WHERE run_id = ?1",
            )?
            .execute(params![run])?;
        }
        if let JournalEvent::RunFinished {
            state,
            output,
            error,
        } = event
        {
            conn.prepare_cached(
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
    conn.prepare_cached("UPDATE runs SET updated_at_ms = ?2 WHERE run_id = ?1")?
        .execute(params![run, now])?;
    Ok(())
}

/// Appends a memory entry, then forgets the key's expired entries and those past
/// `MAX_ENTRIES_PER_KEY`.
fn insert_memory(
    conn: &Connection,
    (namespace, scope, key): (&str, &str, &str),
    value: &Value,
    (run, step): (&str, &str),
    now: i64,
    expires: Option<i64>,
) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO memory (namespace, scope, key, value, run_id, step_id, at_ms, expires_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        namespace,
        scope,
        key,
        json_text(value),
        run,
        step,
        now,
        expires
    ])?;
    conn.prepare_cached(
        "DELETE FROM memory WHERE namespace = ?1 AND scope = ?2 AND key = ?3
         AND (expires_at_ms <= ?4 OR seq <= (SELECT seq FROM memory
              WHERE namespace = ?1 AND scope = ?2 AND key = ?3
              ORDER BY seq DESC LIMIT 1 OFFSET ?5))",
    )?
    .execute(params![
        namespace,
        scope,
        key,
        now,
        crate::memory::MAX_ENTRIES_PER_KEY
    ])?;
    Ok(())
}

/// Marks a new store with this layout; refuses one written with another.
/// Layout 2 → 3: runs gain their namespace (`default` for every run stored before). Safe to
/// run on any store: it only adds what is missing.
fn migrate(conn: &Connection) -> Result<()> {
    let has_namespace: bool = conn
        .prepare("SELECT 1 FROM pragma_table_info('runs') WHERE name = 'namespace'")?
        .exists([])?;
    if !has_namespace {
        conn.execute_batch(
            "ALTER TABLE runs ADD COLUMN namespace TEXT NOT NULL DEFAULT 'default';",
        )?;
    }
    conn.execute_batch(
        "CREATE INDEX IF NOT EXISTS runs_by_namespace ON runs (namespace, run_id);
         UPDATE meta SET value = '3' WHERE key = 'schema' AND value = '2';",
    )?;
    Ok(())
}

fn check_schema(conn: &Connection, path: &Path) -> Result<()> {
    let version: Option<String> = conn
        .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
            r.get(0)
        })
        .optional()?;
    match version {
        Some(v) if v == SCHEMA_VERSION => Ok(()),
        Some(v) => Err(Error::Corrupt(format!(
            "{} has layout {v}; this build reads layout {SCHEMA_VERSION}: move it away or use the matching build",
            path.display()
        ))),
        None => {
            let runs: i64 = conn.query_row("SELECT COUNT(*) FROM runs", [], |r| r.get(0))?;
            if runs > 0 {
                return Err(Error::Corrupt(format!(
                    "{} was written by an earlier build (layout 1); this build reads layout {SCHEMA_VERSION}: move it away",
                    path.display()
                )));
            }
            conn.execute(
                "INSERT INTO meta (key, value) VALUES ('schema', ?1)",
                params![SCHEMA_VERSION],
            )?;
            Ok(())
        }
    }
}

fn workflow_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<WorkflowRecord> {
    Ok(WorkflowRecord {
        name: r.get(0)?,
        version: r.get(1)?,
        description: r.get(2)?,
        definition: r.get(3)?,
        steps: r.get(4)?,
        created_at_ms: r.get(5)?,
    })
}

fn register_workflow(
    conn: &Connection,
    new: &NewWorkflow,
    now: i64,
) -> Result<(WorkflowRecord, bool)> {
    let version = new.def.version.unwrap_or(0);
    let canonical = serde_json::to_string(&new.def).map_err(|e| Error::Corrupt(e.to_string()))?;
    let existing: Option<String> = conn
        .prepare_cached("SELECT canonical FROM workflows WHERE name = ?1 AND version = ?2")?
        .query_row(params![new.def.name, version], |r| r.get(0))
        .optional()?;
    let record = WorkflowRecord {
        name: new.def.name.clone(),
        version,
        description: new.def.description.clone(),
        definition: new.source.clone(),
        steps: new.def.steps.len() as u32,
        created_at_ms: now,
    };
    match existing {
        Some(c) if c == canonical => {
            let stored = conn
                .prepare_cached(
                    "SELECT name, version, description, source, steps, created_at_ms FROM workflows
                     WHERE name = ?1 AND version = ?2",
                )?
                .query_row(params![new.def.name, version], workflow_row)?;
            Ok((stored, false))
        }
        Some(_) => Err(Error::AlreadyExists(format!(
            "workflow {}@{version} is registered with other content; versions never change: register version {}",
            new.def.name,
            version + 1
        ))),
        None => {
            conn.prepare_cached(
                "INSERT INTO workflows (name, version, description, source, canonical, steps, created_at_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                record.name,
                version,
                record.description,
                record.definition,
                canonical,
                record.steps,
                now
            ])?;
            Ok((record, true))
        }
    }
}

fn put_token(conn: &Connection, t: &TokenRecord) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO tokens (token_id, name, namespace, role, hash, created_at_ms, expires_at_ms, revoked_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (token_id) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms",
    )?
    .execute(params![
        t.token_id,
        t.name,
        t.namespace,
        t.role.as_str(),
        t.hash,
        t.created_at_ms,
        t.expires_at_ms,
        t.revoked_at_ms
    ])?;
    Ok(())
}

fn put_secret(conn: &Connection, s: &SealedSecret) -> Result<()> {
    conn.prepare_cached(
        "INSERT INTO secrets (namespace, name, sealed, created_at_ms, updated_at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (namespace, name) DO UPDATE SET sealed = excluded.sealed,
             updated_at_ms = excluded.updated_at_ms",
    )?
    .execute(params![
        s.namespace,
        s.name,
        s.sealed,
        s.created_at_ms,
        s.updated_at_ms
    ])?;
    Ok(())
}

fn append_audit(conn: &Connection, rows: &[AuditEntry]) -> Result<()> {
    let mut stmt = conn.prepare_cached(
        "INSERT INTO audit (at_ms, actor, namespace, method, resource, decision, reason, peer)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?;
    for r in rows {
        stmt.execute(params![
            r.at_ms,
            r.actor,
            r.namespace,
            r.method,
            r.resource,
            r.decision.as_str(),
            r.reason,
            r.peer
        ])?;
    }
    Ok(())
}

fn add_member(conn: &Connection, goal_id: &GoalId, member: &SwarmMember) -> Result<()> {
    conn.prepare_cached(
        "INSERT OR IGNORE INTO swarm_members (goal_id, skill, node_id, agent) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![goal_id.0, member.skill, member.agent.node.0, member.agent.agent])?;
    Ok(())
}

fn append(
    conn: &Connection,
    run_id: &RunId,
    seq: u64,
    event: &JournalEvent,
    now: i64,
) -> Result<()> {
    let text = serde_json::to_string(event).map_err(|e| Error::Corrupt(e.to_string()))?;
    conn.prepare_cached(
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

fn load_swarm(conn: &Connection, goal_id: &str) -> Result<Vec<SwarmMember>> {
    let mut stmt = conn.prepare_cached(
        "SELECT skill, node_id, agent FROM swarm_members WHERE goal_id = ?1 ORDER BY skill, node_id, agent",
    )?;
    let members = stmt
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
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{Fixture, conformance_suite};

    /// A store in a temporary directory, removed with the fixture.
    struct Sqlite(tempfile::TempDir);

    impl Fixture for Sqlite {
        type Store = SqliteStore;
        async fn open(&self) -> Result<SqliteStore> {
            SqliteStore::open(self.0.path())
        }
        async fn set_layout(&self, version: &str) {
            let conn = Connection::open(self.0.path().join("mesh.db")).unwrap();
            conn.execute(
                "UPDATE meta SET value = ?1 WHERE key = 'schema'",
                params![version],
            )
            .unwrap();
        }
    }

    conformance_suite!(Sqlite(tempfile::tempdir().unwrap()));

    /// A store of layout 2 (before namespaces) is brought to layout 3: its runs gain the
    /// `default` namespace, and the store opens again as layout 3.
    #[tokio::test]
    async fn a_layout_2_store_is_migrated_and_its_runs_are_in_the_default_namespace() {
        let f = Sqlite(tempfile::tempdir().unwrap());
        drop(f.open().await.unwrap());
        {
            let conn = Connection::open(f.0.path().join("mesh.db")).unwrap();
            conn.execute_batch(
                "DROP INDEX runs_by_namespace; ALTER TABLE runs DROP COLUMN namespace;
                 INSERT INTO goals (goal_id, objective, spec, created_at_ms) VALUES ('g1', 'old', '{}', 1);
                 INSERT INTO runs (run_id, goal_id, state, created_at_ms, updated_at_ms) VALUES ('r1', 'g1', 'succeeded', 1, 1);",
            )
            .unwrap();
        }
        f.set_layout("2").await;
        let store = f.open().await.unwrap();
        let page = store
            .list_runs(&ListRunsQuery {
                namespace: Namespace::default(),
                state: None,
                page_size: 10,
                page_token: None,
            })
            .await
            .unwrap();
        assert_eq!(page.runs.len(), 1);
        assert_eq!(page.runs[0].namespace, Namespace::default());
        drop(store);
        let conn = Connection::open(f.0.path().join("mesh.db")).unwrap();
        let layout: String = conn
            .query_row("SELECT value FROM meta WHERE key = 'schema'", [], |r| {
                r.get(0)
            })
            .unwrap();
        assert_eq!(layout, "3");
    }

    #[tokio::test]
    async fn a_refused_layout_names_both_layouts_and_the_file() {
        let f = Sqlite(tempfile::tempdir().unwrap());
        drop(f.open().await.unwrap());
        f.set_layout("1").await;
        let err = f.open().await.unwrap_err().to_string();
        assert!(
            err.contains("has layout 1; this build reads layout 3") && err.contains("mesh.db"),
            "{err}"
        );
    }
}
