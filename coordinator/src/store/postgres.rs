//! The PostgreSQL backend (`--store postgres://…`): the same contract and the same write path
//! as the embedded store, on a server several coordinators can share.
//!
//! Writes go to one writer task that commits in groups, as SQLite's writer thread does: it
//! takes every write waiting in its bounded queue (up to [`MAX_GROUP`]), applies them on one
//! connection, commits once, then answers each caller. Each round trip to the server counts
//! here, so the group's journal writes, the hot path, go in together: every entry of every
//! run in one statement, every run marked in one more (each write in its own savepoint only
//! when that fails, so that only the failing one fails). Reads take a
//! connection from a pool (`deadpool-postgres`), each with its prepared statements cached.
//!
//! Several coordinators may share one database; one leads (docs/operations.md). The leader
//! holds the lease row `leader` ([`PostgresStore::try_lead`], [`PostgresStore::renew`]); its
//! epoch is the coordinator epoch that fencing tokens carry, and every group of writes first
//! checks, holding the row shared, that this epoch still holds an unexpired lease: a deposed
//! or paused leader's writes are refused, and a takeover waits for a group in flight.
//!
//! The layout is versioned by [`MIGRATIONS`]: a new database gets them all, an older one the
//! ones it lacks, each in its own transaction under an advisory lock (coordinators starting
//! together migrate once); a database of a newer layout than this build knows is refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime, Transaction};
use mesh_proto::domain::*;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::NoTls;
use tokio_postgres::types::ToSql;

use super::write::{Applied, GroupError, MAX_GROUP, RecordReply, WriteOp, Writer};
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

/// The layout, one migration per version: version N is `MIGRATIONS[N - 1]`.
pub const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE goals (
    goal_id TEXT PRIMARY KEY,
    idempotency_key TEXT UNIQUE,
    objective TEXT NOT NULL,
    spec TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);
CREATE TABLE runs (
    run_id TEXT PRIMARY KEY,
    goal_id TEXT NOT NULL REFERENCES goals (goal_id),
    state TEXT NOT NULL,
    output TEXT,
    error TEXT,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    namespace TEXT NOT NULL DEFAULT 'default'
);
CREATE INDEX runs_by_state ON runs (state, run_id);
CREATE INDEX runs_by_namespace ON runs (namespace, run_id);
CREATE TABLE journal (
    run_id TEXT NOT NULL,
    seq BIGINT NOT NULL,
    at_ms BIGINT NOT NULL,
    kind TEXT NOT NULL,
    step_id TEXT,
    event TEXT NOT NULL,
    PRIMARY KEY (run_id, seq)
);
CREATE TABLE workflows (
    name TEXT NOT NULL,
    version BIGINT NOT NULL,
    description TEXT NOT NULL,
    source TEXT NOT NULL,
    canonical TEXT NOT NULL,
    steps BIGINT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    PRIMARY KEY (name, version)
);
CREATE TABLE tokens (
    token_id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    namespace TEXT NOT NULL,
    role TEXT NOT NULL,
    hash TEXT NOT NULL UNIQUE,
    created_at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT,
    revoked_at_ms BIGINT
);
CREATE TABLE audit (
    seq BIGSERIAL PRIMARY KEY,
    at_ms BIGINT NOT NULL,
    actor TEXT NOT NULL,
    namespace TEXT NOT NULL,
    method TEXT NOT NULL,
    resource TEXT NOT NULL,
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    peer TEXT NOT NULL
);
CREATE INDEX audit_by_namespace ON audit (namespace, seq);
CREATE TABLE secrets (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    sealed BYTEA NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE memory (
    seq BIGSERIAL PRIMARY KEY,
    namespace TEXT NOT NULL,
    scope TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL,
    run_id TEXT NOT NULL,
    step_id TEXT NOT NULL,
    at_ms BIGINT NOT NULL,
    expires_at_ms BIGINT
);
CREATE INDEX memory_by_key ON memory (namespace, scope, key, seq);
CREATE TABLE tools (
    namespace TEXT NOT NULL,
    name TEXT NOT NULL,
    declaration TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    updated_at_ms BIGINT NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE messages (
    seq BIGSERIAL PRIMARY KEY,
    namespace TEXT NOT NULL,
    recipient TEXT NOT NULL,
    sender TEXT NOT NULL,
    message_id TEXT NOT NULL,
    topic TEXT NOT NULL,
    priority BIGINT NOT NULL,
    payload TEXT NOT NULL,
    sent_at_ms BIGINT NOT NULL
);
CREATE UNIQUE INDEX messages_by_key ON messages (namespace, recipient, sender, message_id);
CREATE TABLE swarm_members (
    goal_id TEXT NOT NULL,
    skill TEXT NOT NULL,
    node_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    PRIMARY KEY (goal_id, skill, node_id, agent)
);
"#,
    r#"
CREATE TABLE leader (
    id INT PRIMARY KEY CHECK (id = 1),
    holder TEXT NOT NULL,
    epoch BIGINT NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL
);
"#,
];

/// The advisory lock coordinators take to migrate one at a time.
const MIGRATION_LOCK: i64 = 0x6d65_7368; // "mesh"
/// Connections for reads.
const POOL_SIZE: usize = 16;
/// The longest a caller waits for a connection, or a connection to be made.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest one group of writes may take before its callers are told it failed.
const GROUP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone)]
pub struct PostgresStore {
    pool: Pool,
    writer: Writer,
    /// The epoch whose lease every group of writes checks; 0 before leading (no check).
    fence: Arc<AtomicU64>,
}

/// Who holds the lease, as a standby sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leader {
    pub holder: String,
    pub epoch: u64,
    /// Whether its lease has not expired.
    pub live: bool,
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PostgresStore")
    }
}

impl From<tokio_postgres::Error> for Error {
    fn from(e: tokio_postgres::Error) -> Self {
        // The server's own words (the constraint, the missing table), never the parameters.
        match e.as_db_error() {
            Some(db) => Error::Commit(format!("PostgreSQL: {}", db.message())),
            None => Error::Commit(format!("PostgreSQL: {e}")),
        }
    }
}

impl From<deadpool_postgres::PoolError> for Error {
    fn from(e: deadpool_postgres::PoolError) -> Self {
        match e {
            deadpool_postgres::PoolError::Backend(e) => e.into(),
            _ => Error::Unavailable("the PostgreSQL store"),
        }
    }
}

/// The URL without its password, for messages and logs.
pub fn redact(url: &str) -> String {
    match url.parse::<tokio_postgres::Config>() {
        Ok(c) => {
            let hosts: Vec<String> = c
                .get_hosts()
                .iter()
                .zip(c.get_ports().iter().chain(std::iter::repeat(&5432)))
                .map(|(h, p)| match h {
                    tokio_postgres::config::Host::Tcp(h) => format!("{h}:{p}"),
                    tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                })
                .collect();
            format!(
                "postgres://{}@{}/{}",
                c.get_user().unwrap_or(""),
                hosts.join(","),
                c.get_dbname().unwrap_or("")
            )
        }
        // Not one PostgreSQL reads: its user and host, never what follows a `:` in its user part.
        Err(_) => match url.split_once("://") {
            Some((scheme, rest)) => match rest.rsplit_once('@') {
                Some((userinfo, host)) => {
                    let user = userinfo.split(':').next().unwrap_or_default();
                    format!("{scheme}://{user}@{host}")
                }
                None => url.to_owned(),
            },
            None => "(a store URL that cannot be read)".to_owned(),
        },
    }
}

fn parse_state<T>(text: &str, parse: fn(&str) -> Option<T>) -> Result<T> {
    parse(text).ok_or_else(|| Error::Corrupt(format!("unknown state `{text}` in store")))
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<String> {
    serde_json::to_string(v).map_err(|e| Error::Corrupt(e.to_string()))
}

impl PostgresStore {
    /// Connects to the database at `url`, brings its layout up to date (or refuses it), and
    /// starts the writer task, which ends when the last handle is dropped. `lease` is the
    /// leader's (see [`PostgresStore::try_lead`]): a transaction left open for half of it (its
    /// coordinator paused mid-write) is ended by the server, so that the lease row it holds
    /// shared cannot keep a standby from taking over.
    pub async fn connect(url: &str, lease: Duration) -> Result<Self> {
        let mut config: tokio_postgres::Config = url
            .parse()
            .map_err(|e| Error::Corrupt(format!("store URL {}: {e}", redact(url))))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        config.application_name("agentmesh");
        let idle = (lease / 2).max(Duration::from_millis(200)).as_millis();
        let options = match config.get_options() {
            Some(given) => format!("{given} -c idle_in_transaction_session_timeout={idle}"),
            None => format!("-c idle_in_transaction_session_timeout={idle}"),
        };
        config.options(options);
        let manager = Manager::from_config(
            config,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .wait_timeout(Some(CONNECT_TIMEOUT))
            .create_timeout(Some(CONNECT_TIMEOUT))
            .recycle_timeout(Some(CONNECT_TIMEOUT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| Error::Corrupt(format!("store pool: {e}")))?;
        migrate(&pool, url).await?;
        let (writer, rx) = Writer::new();
        let fence = Arc::new(AtomicU64::new(0));
        tokio::spawn(write_loop(pool.clone(), rx, fence.clone()));
        Ok(Self {
            pool,
            writer,
            fence,
        })
    }

    /// Takes the lease for `holder` when nobody holds a live one: its new epoch (one more
    /// than any before, and than the store's coordinator epoch), from which on every write
    /// is fenced by it. `None` while another holds it.
    pub async fn try_lead(&self, holder: &str, lease: Duration) -> Result<Option<u64>> {
        let mut conn = self.read().await?;
        let tx = conn.transaction().await?;
        let row = tx
            .query_opt(
                "INSERT INTO leader (id, holder, epoch, expires_at)
                 VALUES (1, $1,
                     COALESCE((SELECT value::BIGINT FROM meta WHERE key = 'epoch'), 0) + 1,
                     now() + $2 * interval '1 millisecond')
                 ON CONFLICT (id) DO UPDATE SET holder = excluded.holder,
                     epoch = GREATEST(leader.epoch,
                         COALESCE((SELECT value::BIGINT FROM meta WHERE key = 'epoch'), 0)) + 1,
                     expires_at = excluded.expires_at
                 WHERE leader.expires_at < now()
                 RETURNING epoch",
                &[&holder, &(lease.as_millis() as f64)],
            )
            .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let epoch: i64 = row.get(0);
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('epoch', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&epoch.to_string()],
        )
        .await?;
        tx.commit().await?;
        self.fence.store(epoch as u64, Ordering::SeqCst);
        Ok(Some(epoch as u64))
    }

    /// Extends the lease of `epoch`; `false` when another has taken it since, or it has lapsed
    /// (or was given up): a lapsed lease is taken again only as a new epoch.
    pub async fn renew(&self, holder: &str, epoch: u64, lease: Duration) -> Result<bool> {
        let rows = self
            .rows(
                "UPDATE leader SET expires_at = now() + $3 * interval '1 millisecond'
                 WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now()
                 RETURNING epoch",
                &[&holder, &(epoch as i64), &(lease.as_millis() as f64)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Ends the lease of `epoch` now (a coordinator stopping): a standby takes it at its next
    /// try. `false` when another holds it already.
    pub async fn resign(&self, holder: &str, epoch: u64) -> Result<bool> {
        let rows = self
            .rows(
                "UPDATE leader SET expires_at = now()
                 WHERE id = 1 AND holder = $1 AND epoch = $2 AND expires_at > now() RETURNING epoch",
                &[&holder, &(epoch as i64)],
            )
            .await?;
        Ok(!rows.is_empty())
    }

    /// Who holds the lease, if anyone ever did.
    pub async fn leader(&self) -> Result<Option<Leader>> {
        let rows = self
            .rows(
                "SELECT holder, epoch, expires_at > now() FROM leader WHERE id = 1",
                &[],
            )
            .await?;
        Ok(rows.first().map(|r| Leader {
            holder: r.get(0),
            epoch: r.get::<_, i64>(1) as u64,
            live: r.get(2),
        }))
    }

    async fn read(&self) -> Result<deadpool_postgres::Object> {
        Ok(self.pool.get().await?)
    }

    /// Rows of a read: one statement, prepared once per connection.
    async fn rows(
        &self,
        sql: &str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let conn = self.read().await?;
        let stmt = conn.prepare_cached(sql).await?;
        Ok(conn.query(&stmt, params).await?)
    }
}

/// Applies the migrations the database lacks, one transaction each, under an advisory lock;
/// refuses a database of a newer layout.
async fn migrate(pool: &Pool, url: &str) -> Result<()> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let has_meta = tx
        .query_opt(
            "SELECT 1 FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'meta'",
            &[],
        )
        .await?
        .is_some();
    let current: usize = if has_meta {
        let row = tx
            .query_opt("SELECT value FROM meta WHERE key = 'schema'", &[])
            .await?;
        match row {
            Some(r) => r
                .get::<_, String>(0)
                .parse()
                .map_err(|_| Error::Corrupt(format!("{} has an unreadable layout", redact(url))))?,
            None => 0,
        }
    } else {
        0
    };
    let known = MIGRATIONS.len();
    if current > known {
        return Err(Error::Corrupt(format!(
            "{} has layout {current}; this build reads layouts up to {known}: use a newer build",
            redact(url)
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(current) {
        tx.batch_execute(sql).await?;
        tx.execute(
            "INSERT INTO meta (key, value) VALUES ('schema', $1)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            &[&(i + 1).to_string()],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

impl Backend for PostgresStore {
    fn writer(&self) -> &Writer {
        &self.writer
    }
    async fn workflow(&self, name: &str, version: Option<u32>) -> Result<WorkflowRecord> {
        let version = version.map(i64::from);
        let rows = self
            .rows(
                "SELECT name, version, description, source, steps, created_at_ms FROM workflows
                 WHERE name = $1 AND ($2::BIGINT IS NULL OR version = $2)
                 ORDER BY version DESC LIMIT 1",
                &[&name, &version],
            )
            .await?;
        rows.first().map(workflow_row).ok_or_else(|| {
            Error::WorkflowNotFound(match version {
                Some(v) => format!("{name}@{v}"),
                None => name.to_owned(),
            })
        })
    }

    async fn list_workflows(
        &self,
        namespace: &Namespace,
        name: Option<&str>,
        page_size: u32,
        after: Option<(String, u32)>,
    ) -> Result<WorkflowPage> {
        let (after_name, after_version) =
            after.map_or((None, None), |(n, v)| (Some(n), Some(i64::from(v))));
        // The default namespace's names have no separator; another's start with it.
        let prefix = (!namespace.is_default()).then(|| format!("{namespace}\u{1f}"));
        let rows = self
            .rows(
                "SELECT name, version, description, source, steps, created_at_ms FROM workflows
                 WHERE ($1::TEXT IS NULL OR name = $1)
                   AND ($2::TEXT IS NULL OR name > $2 OR (name = $2 AND version < $3))
                   AND (CASE WHEN $5::TEXT IS NULL THEN strpos(name, chr(31)) = 0
                        ELSE left(name, length($5)) = $5 END)
                 ORDER BY name, version DESC LIMIT $4",
                &[
                    &name,
                    &after_name,
                    &after_version,
                    &(i64::from(page_size) + 1),
                    &prefix,
                ],
            )
            .await?;
        let mut rows: Vec<WorkflowRecord> = rows.iter().map(workflow_row).collect();
        let next = cut_page(&mut rows, page_size, |w| {
            format!("{}@{}", w.name, w.version)
        });
        Ok((rows, next))
    }

    async fn knows_idempotency_key(&self, key: &str) -> Result<bool> {
        let rows = self
            .rows("SELECT 1 FROM goals WHERE idempotency_key = $1", &[&key])
            .await?;
        Ok(!rows.is_empty())
    }

    async fn unfinished_runs(&self) -> Result<Vec<RunId>> {
        let rows = self
            .rows(
                "SELECT run_id FROM runs WHERE state = 'running' ORDER BY run_id",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| RunId(r.get(0))).collect())
    }

    async fn journal_times(&self, run_id: &RunId) -> Result<Vec<i64>> {
        let rows = self
            .rows(
                "SELECT at_ms FROM journal WHERE run_id = $1 ORDER BY seq",
                &[&run_id.0],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    async fn runs_of_workflow(
        &self,
        namespace: &Namespace,
        names: &[String],
        version: Option<u32>,
        limit: u32,
    ) -> Result<Vec<RunId>> {
        let name = |i: usize| names.get(i).or(names.first()).cloned().unwrap_or_default();
        let rows = self
            .rows(
                "SELECT r.run_id FROM runs r JOIN goals g ON g.goal_id = r.goal_id
                 WHERE r.namespace = $1 AND r.state <> 'running'
                   AND (g.spec::jsonb #>> '{workflow,name}') IN ($2, $3)
                   AND ($4 = 0 OR (g.spec::jsonb #>> '{workflow,version}')::BIGINT = $4)
                 ORDER BY r.run_id DESC LIMIT $5",
                &[
                    &namespace.as_str(),
                    &name(0),
                    &name(1),
                    &i64::from(version.unwrap_or(0)),
                    &i64::from(limit),
                ],
            )
            .await?;
        Ok(rows.iter().map(|r| RunId(r.get(0))).collect())
    }

    async fn load_run(&self, run_id: &RunId) -> Result<StoredRun> {
        let conn = self.read().await?;
        let stmt = conn
            .prepare_cached(
                "SELECT r.goal_id, g.spec, r.state, r.created_at_ms, r.updated_at_ms
                 FROM runs r JOIN goals g ON g.goal_id = r.goal_id WHERE r.run_id = $1",
            )
            .await?;
        let row = conn
            .query_opt(&stmt, &[&run_id.0])
            .await?
            .ok_or_else(|| Error::RunNotFound(run_id.0.clone()))?;
        let (goal_id, spec, state): (String, String, String) = (row.get(0), row.get(1), row.get(2));
        let goal: StoredGoal =
            serde_json::from_str(&spec).map_err(|e| Error::Corrupt(format!("goal spec: {e}")))?;
        let stmt = conn
            .prepare_cached("SELECT seq, event FROM journal WHERE run_id = $1 ORDER BY seq")
            .await?;
        let mut next_seq = 0u64;
        let events = conn
            .query(&stmt, &[&run_id.0])
            .await?
            .iter()
            .map(|r| {
                let (seq, text): (i64, String) = (r.get(0), r.get(1));
                next_seq = seq as u64 + 1;
                serde_json::from_str(&text)
                    .map_err(|e| Error::Corrupt(format!("journal entry {seq} of {run_id}: {e}")))
            })
            .collect::<Result<Vec<JournalEvent>>>()?;
        let stmt = conn
            .prepare_cached(
                "SELECT skill, node_id, agent FROM swarm_members WHERE goal_id = $1
                 ORDER BY skill, node_id, agent",
            )
            .await?;
        let swarm = conn
            .query(&stmt, &[&goal_id])
            .await?
            .iter()
            .map(|r| SwarmMember {
                skill: r.get(0),
                agent: AgentKey {
                    node: NodeId(r.get(1)),
                    agent: r.get(2),
                },
            })
            .collect();
        Ok(StoredRun {
            run_id: run_id.clone(),
            goal_id: GoalId(goal_id),
            goal,
            state: parse_state(&state, RunState::parse)?,
            events,
            swarm,
            next_seq,
            created_at_ms: row.get(3),
            updated_at_ms: row.get(4),
        })
    }

    async fn list_runs(&self, query: &ListRunsQuery) -> Result<RunPage> {
        let rows = self
            .rows(
                "SELECT r.run_id, r.goal_id, g.objective, r.state, r.created_at_ms, r.updated_at_ms
                 FROM runs r JOIN goals g ON g.goal_id = r.goal_id
                 WHERE ($1::TEXT IS NULL OR r.state = $1) AND ($2::TEXT IS NULL OR r.run_id < $2)
                   AND r.namespace = $4
                 ORDER BY r.run_id DESC LIMIT $3",
                &[
                    &query.state.map(RunState::as_str),
                    &query.page_token.as_ref().map(|t| t.0.as_str()),
                    &(i64::from(query.page_size) + 1),
                    &query.namespace.as_str(),
                ],
            )
            .await?;
        let mut runs = rows
            .iter()
            .map(|r| {
                Ok(RunSummary {
                    run_id: RunId(r.get(0)),
                    goal_id: GoalId(r.get(1)),
                    objective: r.get(2),
                    state: parse_state(r.get(3), RunState::parse)?,
                    created_at_ms: r.get(4),
                    updated_at_ms: r.get(5),
                    namespace: query.namespace.clone(),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next_page_token = cut_page(&mut runs, query.page_size, |r| r.run_id.0.clone());
        Ok(RunPage {
            runs,
            next_page_token,
        })
    }

    async fn tokens(&self) -> Result<Vec<TokenRecord>> {
        let rows = self
            .rows(
                "SELECT token_id, name, namespace, role, hash, created_at_ms, expires_at_ms, revoked_at_ms
                 FROM tokens ORDER BY created_at_ms DESC, token_id DESC",
                &[],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let role: String = r.get(3);
                Ok(TokenRecord {
                    token_id: r.get(0),
                    name: r.get(1),
                    namespace: r.get(2),
                    role: role
                        .parse()
                        .map_err(|_| Error::Corrupt(format!("unknown role `{role}` in store")))?,
                    hash: r.get(4),
                    created_at_ms: r.get(5),
                    expires_at_ms: r.get(6),
                    revoked_at_ms: r.get(7),
                })
            })
            .collect()
    }

    async fn secrets(&self) -> Result<Vec<SealedSecret>> {
        let rows = self
            .rows(
                "SELECT namespace, name, sealed, created_at_ms, updated_at_ms FROM secrets
                 ORDER BY namespace, name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| SealedSecret {
                namespace: r.get(0),
                name: r.get(1),
                sealed: r.get(2),
                created_at_ms: r.get(3),
                updated_at_ms: r.get(4),
            })
            .collect())
    }

    async fn messages(&self) -> Result<Vec<StoredMessage>> {
        let rows = self
            .rows(
                "SELECT namespace, recipient, sender, message_id, topic, priority, payload, sent_at_ms
                 FROM messages ORDER BY seq",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| StoredMessage {
                key: MessageKey {
                    namespace: r.get(0),
                    recipient: r.get(1),
                    sender: r.get(2),
                    message_id: r.get(3),
                },
                topic: r.get(4),
                priority: r.get::<_, i64>(5).clamp(0, 255) as u8,
                payload: serde_json::from_str(r.get(6)).unwrap_or(Value::Null),
                sent_at_ms: r.get(7),
            })
            .collect())
    }

    async fn tools(&self) -> Result<Vec<ToolRecord>> {
        let rows = self
            .rows(
                "SELECT namespace, name, declaration, created_at_ms, updated_at_ms FROM tools
                 ORDER BY namespace, name",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|r| ToolRecord {
                namespace: r.get(0),
                name: r.get(1),
                declaration: serde_json::from_str(r.get(2)).unwrap_or(Value::Null),
                created_at_ms: r.get(3),
                updated_at_ms: r.get(4),
            })
            .collect())
    }

    async fn memory(
        &self,
        namespace: &str,
        scope: &str,
        key: &str,
        last: u32,
    ) -> Result<Vec<MemoryEntry>> {
        let rows = self
            .rows(
                "SELECT seq, value, run_id, step_id, at_ms, expires_at_ms FROM memory
                 WHERE namespace = $1 AND scope = $2 AND key = $3
                 AND (expires_at_ms IS NULL OR expires_at_ms > $4)
                 ORDER BY seq DESC LIMIT $5",
                &[&namespace, &scope, &key, &now_ms(), &i64::from(last)],
            )
            .await?;
        let mut entries: Vec<MemoryEntry> = rows
            .iter()
            .map(|r| MemoryEntry {
                seq: r.get(0),
                value: serde_json::from_str(r.get(1)).unwrap_or(Value::Null),
                run_id: r.get(2),
                step_id: r.get(3),
                at_ms: r.get(4),
                expires_at_ms: r.get(5),
            })
            .collect();
        entries.reverse();
        Ok(entries)
    }

    async fn list_memory(
        &self,
        namespace: &str,
        scope: Option<&str>,
        page_size: u32,
        after: Option<(String, String)>,
    ) -> Result<MemoryPage> {
        let (after_scope, after_key) = after.unwrap_or_default();
        let rows = self
            .rows(
                "SELECT scope, key, COUNT(*), MAX(at_ms) FROM memory
                 WHERE namespace = $1 AND ($2::TEXT IS NULL OR scope = $2)
                 AND (expires_at_ms IS NULL OR expires_at_ms > $3)
                 AND (scope > $4 OR (scope = $4 AND key > $5))
                 GROUP BY scope, key ORDER BY scope, key LIMIT $6",
                &[
                    &namespace,
                    &scope,
                    &now_ms(),
                    &after_scope,
                    &after_key,
                    &(i64::from(page_size) + 1),
                ],
            )
            .await?;
        let mut keys: Vec<MemoryKey> = rows
            .iter()
            .map(|r| MemoryKey {
                scope: r.get(0),
                key: r.get(1),
                entries: r.get::<_, i64>(2) as u64,
                updated_at_ms: r.get(3),
            })
            .collect();
        let next = cut_page(&mut keys, page_size, |k| (k.scope.clone(), k.key.clone()));
        Ok(MemoryPage { keys, next })
    }

    async fn list_audit(&self, q: &AuditQuery) -> Result<AuditPage> {
        let rows = self
            .rows(
                "SELECT seq, at_ms, actor, namespace, method, resource, decision, reason, peer
                 FROM audit
                 WHERE ($1::TEXT IS NULL OR namespace = $1) AND ($2::TEXT IS NULL OR actor = $2)
                   AND ($3::TEXT IS NULL OR decision = $3) AND ($4::TEXT IS NULL OR method = $4)
                   AND ($5::BIGINT IS NULL OR seq < $5)
                 ORDER BY seq DESC LIMIT $6",
                &[
                    &q.namespace,
                    &q.actor,
                    &q.decision.map(Decision::as_str),
                    &q.method,
                    &q.before.map(|s| s as i64),
                    &(i64::from(q.page_size) + 1),
                ],
            )
            .await?;
        let mut rows = rows
            .iter()
            .map(|r| {
                Ok(AuditEntry {
                    seq: r.get::<_, i64>(0) as u64,
                    at_ms: r.get(1),
                    actor: r.get(2),
                    namespace: r.get(3),
                    method: r.get(4),
                    resource: r.get(5),
                    decision: parse_state(r.get(6), Decision::parse)?,
                    reason: r.get(7),
                    peer: r.get(8),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let next = cut_page(&mut rows, q.page_size, |r| r.seq);
        Ok(AuditPage { rows, next })
    }
}

fn workflow_row(r: &tokio_postgres::Row) -> WorkflowRecord {
    WorkflowRecord {
        name: r.get(0),
        version: r.get::<_, i64>(1) as u32,
        description: r.get(2),
        definition: r.get(3),
        steps: r.get::<_, i64>(4) as u32,
        created_at_ms: r.get(5),
    }
}

/// The writer task: commits waiting writes in groups until every handle is gone.
async fn write_loop(pool: Pool, mut rx: mpsc::Receiver<WriteOp>, fence: Arc<AtomicU64>) {
    let mut batch = Vec::with_capacity(MAX_GROUP);
    while rx.recv_many(&mut batch, MAX_GROUP).await > 0 {
        let mut applied = Vec::with_capacity(batch.len());
        let failed = match tokio::time::timeout(
            GROUP_TIMEOUT,
            commit_group(
                &pool,
                fence.load(Ordering::SeqCst),
                &mut batch,
                &mut applied,
            ),
        )
        .await
        {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(GroupError::from(e)),
            Err(_) => Some(GroupError::Commit(format!(
                "the group of writes took longer than {GROUP_TIMEOUT:?}"
            ))),
        };
        // Writes applied before a failure are answered with it; those not reached, too.
        for a in applied {
            a.answer(failed.as_ref());
        }
        let why = failed.unwrap_or_else(|| GroupError::Commit("not applied".into()));
        for op in batch.drain(..) {
            Applied::from_failed(op, &why).answer(None);
        }
    }
}

/// Runs `f` in a savepoint: its writes are kept if it succeeds, undone if it fails.
macro_rules! in_savepoint {
    ($tx:expr, $body:expr) => {{
        match $tx.batch_execute("SAVEPOINT w").await {
            Err(e) => Err(Error::from(e)),
            Ok(()) => {
                let result = $body;
                let end = match result {
                    Ok(_) => "RELEASE SAVEPOINT w",
                    Err(_) => "ROLLBACK TO SAVEPOINT w",
                };
                match $tx.batch_execute(end).await {
                    Ok(()) => result,
                    Err(e) => Err(Error::from(e)),
                }
            }
        }
    }};
}

/// Applies the writes of `batch` (taking them out as it goes) and commits once; every write
/// applied is in `applied`, waiting for its answer. Each write but the records goes in its own
/// savepoint; the records go in together (a few statements for the whole group), and one by
/// one in their own savepoints only when that fails.
async fn commit_group(
    pool: &Pool,
    epoch: u64,
    batch: &mut Vec<WriteOp>,
    applied: &mut Vec<Applied>,
) -> Result<()> {
    let mut conn = pool.get().await?;
    let tx = conn.transaction().await?;
    if epoch > 0 {
        let stmt = tx
            .prepare_cached(
                "SELECT 1 FROM leader WHERE id = 1 AND epoch = $1 AND expires_at > now() FOR SHARE",
            )
            .await?;
        if tx.query_opt(&stmt, &[&(epoch as i64)]).await?.is_none() {
            return Err(Error::Deposed(epoch));
        }
    }
    let now = now_ms();
    let mut records = Vec::new();
    for op in batch.drain(..) {
        match op {
            WriteOp::Record {
                run_id,
                seq,
                events,
                reply,
            } => records.push((run_id, seq, events, reply)),
            op => applied.push(apply(&tx, op, now).await),
        }
    }
    // The journal entries of every run in the group in one statement, and their runs marked
    // in one more; when that fails (an entry written before, say), each run's write again on
    // its own, so that only the failing one fails.
    let together = match records.is_empty() {
        true => Ok(()),
        false => in_savepoint!(tx, record_together(&tx, &records, now).await),
    };
    for (run_id, seq, events, reply) in records {
        applied.push(match together.is_ok() {
            true => Applied::Record(reply, events, Ok(())),
            false => {
                let op = WriteOp::Record {
                    run_id,
                    seq,
                    events,
                    reply,
                };
                apply(&tx, op, now).await
            }
        });
    }
    tx.commit().await?;
    Ok(())
}

/// The records of a group at once: every journal entry, then what the entries change, then
/// every run marked as changed.
async fn record_together(
    tx: &Transaction<'_>,
    records: &[(RunId, u64, Vec<JournalEvent>, RecordReply)],
    now: i64,
) -> Result<()> {
    let mut rows = JournalRows::default();
    for (run_id, seq, events, _) in records {
        rows.add(run_id, *seq, events)?;
    }
    rows.insert(tx, now).await?;
    for (run_id, _, events, _) in records {
        effects(tx, run_id, events, now).await?;
    }
    let runs: Vec<&str> = records.iter().map(|(r, ..)| r.0.as_str()).collect();
    touch(tx, &runs, now).await
}

async fn apply(tx: &Transaction<'_>, op: WriteOp, now: i64) -> Applied {
    match op {
        WriteOp::BumpEpoch(reply) => Applied::Epoch(reply, in_savepoint!(tx, bump_epoch(tx).await)),
        WriteOp::Submit(new, reply) => {
            Applied::Submit(reply, in_savepoint!(tx, submit(tx, &new).await))
        }
        WriteOp::Record {
            run_id,
            seq,
            events,
            reply,
        } => {
            let result = in_savepoint!(tx, record(tx, &run_id, seq, &events, now).await);
            Applied::Record(reply, events, result)
        }
        WriteOp::AddMember(goal_id, member, reply) => Applied::Member(
            reply,
            in_savepoint!(tx, add_member(tx, &goal_id, &member).await),
        ),
        WriteOp::Register(new, reply) => Applied::Register(
            reply,
            in_savepoint!(tx, register_workflow(tx, &new, now).await),
        ),
        WriteOp::Probe(reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "INSERT INTO meta (key, value) VALUES ('probe', $1)
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    &[&now.to_string()],
                )
                .await
            ),
        ),
        WriteOp::PutToken(t, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "INSERT INTO tokens (token_id, name, namespace, role, hash, created_at_ms,
                         expires_at_ms, revoked_at_ms)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                     ON CONFLICT (token_id) DO UPDATE SET revoked_at_ms = excluded.revoked_at_ms",
                    &[
                        &t.token_id,
                        &t.name,
                        &t.namespace,
                        &t.role.as_str(),
                        &t.hash,
                        &t.created_at_ms,
                        &t.expires_at_ms,
                        &t.revoked_at_ms,
                    ],
                )
                .await
            ),
        ),
        WriteOp::PutSecret(s, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "INSERT INTO secrets (namespace, name, sealed, created_at_ms, updated_at_ms)
                     VALUES ($1, $2, $3, $4, $5)
                     ON CONFLICT (namespace, name) DO UPDATE SET sealed = excluded.sealed,
                         updated_at_ms = excluded.updated_at_ms",
                    &[
                        &s.namespace,
                        &s.name,
                        &s.sealed,
                        &s.created_at_ms,
                        &s.updated_at_ms,
                    ],
                )
                .await
            ),
        ),
        WriteOp::DeleteSecret(namespace, name, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "DELETE FROM secrets WHERE namespace = $1 AND name = $2",
                    &[&namespace, &name],
                )
                .await
            ),
        ),
        WriteOp::PutTool(tool, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "INSERT INTO tools (namespace, name, declaration, created_at_ms, updated_at_ms)
                     VALUES ($1, $2, $3, $4, $4)
                     ON CONFLICT (namespace, name) DO UPDATE SET
                         declaration = excluded.declaration,
                         updated_at_ms = excluded.updated_at_ms",
                    &[
                        &tool.namespace,
                        &tool.name,
                        &tool.declaration.to_string(),
                        &now,
                    ],
                )
                .await
            ),
        ),
        WriteOp::DeleteTool(namespace, name, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "DELETE FROM tools WHERE namespace = $1 AND name = $2",
                    &[&namespace, &name],
                )
                .await
            ),
        ),
        WriteOp::PutMessages(messages, reply) => {
            Applied::Probe(reply, in_savepoint!(tx, put_messages(tx, &messages).await))
        }
        WriteOp::DeleteMessage(key, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "DELETE FROM messages WHERE namespace = $1 AND recipient = $2
                         AND sender = $3 AND message_id = $4",
                    &[&key.namespace, &key.recipient, &key.sender, &key.message_id],
                )
                .await
            ),
        ),
        WriteOp::Audit(rows, reply) => {
            Applied::Probe(reply, in_savepoint!(tx, append_audit(tx, &rows).await))
        }
        WriteOp::PutMemory(new, reply) => {
            let expires = (new.ttl_ms > 0).then(|| now + new.ttl_ms as i64);
            Applied::Probe(
                reply,
                in_savepoint!(
                    tx,
                    insert_memory(
                        tx,
                        (&new.namespace, &new.scope, &new.key),
                        &new.value,
                        ("", ""),
                        now,
                        expires,
                    )
                    .await
                ),
            )
        }
        WriteOp::DeleteMemory(namespace, scope, key, reply) => Applied::Probe(
            reply,
            in_savepoint!(
                tx,
                exec(
                    tx,
                    "DELETE FROM memory WHERE namespace = $1 AND scope = $2 AND key = $3",
                    &[&namespace, &scope, &key],
                )
                .await
            ),
        ),
    }
}

/// One statement of a write, prepared once per connection.
async fn exec(tx: &Transaction<'_>, sql: &str, params: &[&(dyn ToSql + Sync)]) -> Result<()> {
    let stmt = tx.prepare_cached(sql).await?;
    tx.execute(&stmt, params).await?;
    Ok(())
}

async fn bump_epoch(tx: &Transaction<'_>) -> Result<u64> {
    let row = tx
        .query_one(
            "INSERT INTO meta (key, value) VALUES ('epoch', '1')
             ON CONFLICT (key) DO UPDATE SET value = (meta.value::BIGINT + 1)::TEXT
             RETURNING value",
            &[],
        )
        .await?;
    row.get::<_, String>(0)
        .parse()
        .map_err(|_| Error::Corrupt("the coordinator epoch is not a number".into()))
}

async fn submit(tx: &Transaction<'_>, new: &NewRun) -> Result<RunRef> {
    let goal = &new.goal;
    if let Some(key) = &goal.idempotency_key {
        let stmt = tx
            .prepare_cached(
                "SELECT g.goal_id, r.run_id, g.spec::jsonb ->> 'request_digest'
                 FROM goals g JOIN runs r ON r.goal_id = g.goal_id
                 WHERE g.idempotency_key = $1 ORDER BY r.run_id LIMIT 1",
            )
            .await?;
        if let Some(row) = tx.query_opt(&stmt, &[key]).await? {
            let (goal_id, run_id, digest): (String, String, Option<String>) =
                (row.get(0), row.get(1), row.get(2));
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
    exec(
        tx,
        "INSERT INTO goals (goal_id, idempotency_key, objective, spec, created_at_ms)
         VALUES ($1, $2, $3, $4, $5)",
        &[
            &goal_id.0,
            &goal.idempotency_key,
            &goal.objective,
            &to_json(goal)?,
            &now,
        ],
    )
    .await?;
    exec(
        tx,
        "INSERT INTO runs (run_id, goal_id, state, created_at_ms, updated_at_ms, namespace)
         VALUES ($1, $2, 'running', $3, $3, $4)",
        &[&run_id.0, &goal_id.0, &now, &goal.namespace.as_str()],
    )
    .await?;
    let mut events = Vec::with_capacity(new.events.len() + 1);
    events.push(JournalEvent::RunCreated);
    events.extend(new.events.iter().cloned());
    record(tx, run_id, 0, &events, now).await?;
    Ok(RunRef {
        goal_id: goal_id.clone(),
        run_id: run_id.clone(),
        created: true,
    })
}

/// Appends `events` from `seq`, with what they change in `runs` and `memory`.
async fn record(
    tx: &Transaction<'_>,
    run_id: &RunId,
    seq: u64,
    events: &[JournalEvent],
    now: i64,
) -> Result<()> {
    let mut rows = JournalRows::default();
    rows.add(run_id, seq, events)?;
    rows.insert(tx, now).await?;
    effects(tx, run_id, events, now).await?;
    touch(tx, &[run_id.0.as_str()], now).await
}

/// Journal entries of one run or several, written with one statement.
#[derive(Default)]
struct JournalRows<'a> {
    runs: Vec<&'a str>,
    seqs: Vec<i64>,
    kinds: Vec<&'static str>,
    steps: Vec<Option<&'a str>>,
    texts: Vec<String>,
}

impl<'a> JournalRows<'a> {
    fn add(&mut self, run_id: &'a RunId, seq: u64, events: &'a [JournalEvent]) -> Result<()> {
        for (i, event) in events.iter().enumerate() {
            self.runs.push(&run_id.0);
            self.seqs.push((seq + i as u64) as i64);
            self.kinds.push(event.kind());
            self.steps.push(event.step().map(|s| s.0.as_str()));
            self.texts.push(to_json(event)?);
        }
        Ok(())
    }

    async fn insert(&self, tx: &Transaction<'_>, now: i64) -> Result<()> {
        exec(
            tx,
            "INSERT INTO journal (run_id, seq, at_ms, kind, step_id, event)
             SELECT r, s, $1, k, st, e
             FROM UNNEST($2::TEXT[], $3::BIGINT[], $4::TEXT[], $5::TEXT[], $6::TEXT[])
                 AS t (r, s, k, st, e)",
            &[
                &now,
                &self.runs,
                &self.seqs,
                &self.kinds,
                &self.steps,
                &self.texts,
            ],
        )
        .await
    }
}

/// What a run's journal entries change besides the journal: its state when it finishes or
/// resumes, the memory its steps save.
async fn effects(
    tx: &Transaction<'_>,
    run_id: &RunId,
    events: &[JournalEvent],
    now: i64,
) -> Result<()> {
    let run = &run_id.0;
    for event in events {
        match event {
            JournalEvent::MemorySaved {
                step,
                scope,
                key,
                value,
                ttl_ms,
                ..
            } => {
                let row = tx
                    .query_one("SELECT namespace FROM runs WHERE run_id = $1", &[run])
                    .await?;
                let namespace: String = row.get(0);
                let expires = (*ttl_ms > 0).then(|| now + *ttl_ms as i64);
                insert_memory(
                    tx,
                    (&namespace, scope, key),
                    value,
                    (run, &step.0),
                    now,
                    expires,
                )
                .await?;
            }
            JournalEvent::RunResumed => {
                exec(
                    tx,
                    "UPDATE runs SET state = 'running', output = NULL, error = NULL WHERE run_id = $1",
                    &[run],
                )
                .await?;
            }
            JournalEvent::RunFinished {
                state,
                output,
                error,
            } => {
                exec(
                    tx,
                    "UPDATE runs SET state = $2, output = $3, error = $4 WHERE run_id = $1",
                    &[
                        run,
                        &state.as_str(),
                        &output.as_ref().map(Value::to_string),
                        error,
                    ],
                )
                .await?;
            }
            _ => {}
        }
    }
    Ok(())
}

/// Marks runs as changed at `now`, in one statement.
async fn touch(tx: &Transaction<'_>, runs: &[&str], now: i64) -> Result<()> {
    exec(
        tx,
        "UPDATE runs SET updated_at_ms = $1 WHERE run_id = ANY($2)",
        &[&now, &runs],
    )
    .await
}

/// Appends a memory entry, then forgets the key's expired entries and those past
/// `MAX_ENTRIES_PER_KEY`.
async fn insert_memory(
    tx: &Transaction<'_>,
    (namespace, scope, key): (&str, &str, &str),
    value: &Value,
    (run, step): (&str, &str),
    now: i64,
    expires: Option<i64>,
) -> Result<()> {
    exec(
        tx,
        "INSERT INTO memory (namespace, scope, key, value, run_id, step_id, at_ms, expires_at_ms)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
        &[
            &namespace,
            &scope,
            &key,
            &value.to_string(),
            &run,
            &step,
            &now,
            &expires,
        ],
    )
    .await?;
    exec(
        tx,
        "DELETE FROM memory WHERE namespace = $1 AND scope = $2 AND key = $3
         AND (expires_at_ms <= $4 OR seq <= (SELECT seq FROM memory
              WHERE namespace = $1 AND scope = $2 AND key = $3
              ORDER BY seq DESC LIMIT 1 OFFSET $5))",
        &[
            &namespace,
            &scope,
            &key,
            &now,
            &(crate::memory::MAX_ENTRIES_PER_KEY as i64),
        ],
    )
    .await
}

async fn register_workflow(
    tx: &Transaction<'_>,
    new: &NewWorkflow,
    now: i64,
) -> Result<(WorkflowRecord, bool)> {
    let version = i64::from(new.def.version.unwrap_or(0));
    let canonical = to_json(&new.def)?;
    let existing = tx
        .query_opt(
            "SELECT canonical FROM workflows WHERE name = $1 AND version = $2",
            &[&new.def.name, &version],
        )
        .await?;
    match existing.map(|r| r.get::<_, String>(0)) {
        Some(c) if c == canonical => {
            let row = tx
                .query_one(
                    "SELECT name, version, description, source, steps, created_at_ms
                     FROM workflows WHERE name = $1 AND version = $2",
                    &[&new.def.name, &version],
                )
                .await?;
            Ok((workflow_row(&row), false))
        }
        Some(_) => Err(Error::AlreadyExists(format!(
            "workflow {}@{version} is registered with other content; versions never change: register version {}",
            new.def.name,
            version + 1
        ))),
        None => {
            let record = WorkflowRecord {
                name: new.def.name.clone(),
                version: version as u32,
                description: new.def.description.clone(),
                definition: new.source.clone(),
                steps: new.def.steps.len() as u32,
                created_at_ms: now,
            };
            exec(
                tx,
                "INSERT INTO workflows (name, version, description, source, canonical, steps,
                     created_at_ms)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &record.name,
                    &version,
                    &record.description,
                    &record.definition,
                    &canonical,
                    &i64::from(record.steps),
                    &now,
                ],
            )
            .await?;
            Ok((record, true))
        }
    }
}

async fn add_member(tx: &Transaction<'_>, goal_id: &GoalId, member: &SwarmMember) -> Result<()> {
    exec(
        tx,
        "INSERT INTO swarm_members (goal_id, skill, node_id, agent) VALUES ($1, $2, $3, $4)
         ON CONFLICT DO NOTHING",
        &[
            &goal_id.0,
            &member.skill,
            &member.agent.node.0,
            &member.agent.agent,
        ],
    )
    .await
}

async fn put_messages(tx: &Transaction<'_>, messages: &[StoredMessage]) -> Result<()> {
    for m in messages {
        exec(
            tx,
            "INSERT INTO messages (namespace, recipient, sender, message_id, topic, priority,
                 payload, sent_at_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING",
            &[
                &m.key.namespace,
                &m.key.recipient,
                &m.key.sender,
                &m.key.message_id,
                &m.topic,
                &i64::from(m.priority),
                &m.payload.to_string(),
                &m.sent_at_ms,
            ],
        )
        .await?;
    }
    Ok(())
}

async fn append_audit(tx: &Transaction<'_>, rows: &[AuditEntry]) -> Result<()> {
    for r in rows {
        exec(
            tx,
            "INSERT INTO audit (at_ms, actor, namespace, method, resource, decision, reason, peer)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            &[
                &r.at_ms,
                &r.actor,
                &r.namespace,
                &r.method,
                &r.resource,
                &r.decision.as_str(),
                &r.reason,
                &r.peer,
            ],
        )
        .await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance::{Fixture, conformance_suite};
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    /// One server for the whole test binary; a database of its own for each case.
    fn server() -> &'static mesh_harness::postgres::Server {
        static SERVER: OnceLock<mesh_harness::postgres::Server> = OnceLock::new();
        SERVER.get_or_init(|| {
            mesh_harness::postgres::Server::start(mesh_harness::postgres::Durability::Relaxed)
                .expect("a PostgreSQL server for the store's tests")
        })
    }

    struct Postgres(String);

    impl Postgres {
        fn new() -> Self {
            static N: AtomicU32 = AtomicU32::new(0);
            let db = format!(
                "case_{}_{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            );
            server().create_db(&db).unwrap();
            Postgres(server().url(&db))
        }
    }

    impl Fixture for Postgres {
        type Store = PostgresStore;
        async fn open(&self) -> Result<PostgresStore> {
            PostgresStore::connect(&self.0, Duration::from_secs(5)).await
        }
        async fn set_layout(&self, version: &str) {
            let (client, conn) = tokio_postgres::connect(&self.0, NoTls).await.unwrap();
            tokio::spawn(conn);
            client
                .execute(
                    "UPDATE meta SET value = $1 WHERE key = 'schema'",
                    &[&version],
                )
                .await
                .unwrap();
        }
    }

    conformance_suite!(Postgres::new());

    /// The lease: one holder at a time, taken over only once it lapses, with a new epoch;
    /// the deposed holder's writes are refused and leave nothing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_leads_a_lapsed_lease_is_taken_with_the_next_epoch_and_the_deposed_cannot_write() {
        let f = Postgres::new();
        let (a, b) = (f.open().await.unwrap(), f.open().await.unwrap());
        let lease = Duration::from_millis(400);
        let first = a.try_lead("a", lease).await.unwrap().expect("a leads");
        assert_eq!(b.try_lead("b", lease).await.unwrap(), None, "b waits");
        assert!(a.renew("a", first, lease).await.unwrap());
        let run = crate::store::conformance::a_run(&a).await;
        tokio::time::sleep(lease + Duration::from_millis(100)).await;
        let second = b.try_lead("b", lease).await.unwrap().expect("b leads");
        assert_eq!(second, first + 1);
        assert!(
            !a.renew("a", first, lease).await.unwrap(),
            "a learns it is deposed"
        );
        let leader = b.leader().await.unwrap().unwrap();
        assert_eq!(
            (leader.holder.as_str(), leader.epoch, leader.live),
            ("b", second, true)
        );

        let before = b.load_run(&run).await.unwrap().events.len();
        let late = vec![JournalEvent::RunResumed];
        let err = a
            .record(&run, before as u64, late.clone())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("no longer leads"), "{err}");
        // Its callers learn that another leads: UNAVAILABLE, not an internal error.
        assert!(matches!(err, Error::Deposed(e) if e == first), "{err:?}");
        assert_eq!(tonic::Status::from(err).code(), tonic::Code::Unavailable);
        assert_eq!(b.load_run(&run).await.unwrap().events.len(), before);
        b.record(&run, before as u64, late).await.unwrap();
        assert_eq!(b.load_run(&run).await.unwrap().events.len(), before + 1);

        // b gives its lease up (it stops): a takes it at once, as the next epoch, long before
        // the lease would have lapsed; b can neither renew nor write after.
        let long = Duration::from_secs(60);
        assert!(b.renew("b", second, long).await.unwrap());
        assert!(!a.resign("a", first).await.unwrap(), "not a's to give up");
        assert!(b.resign("b", second).await.unwrap());
        assert!(
            !b.renew("b", second, long).await.unwrap(),
            "given up for good"
        );
        let third = a
            .try_lead("a", long)
            .await
            .unwrap()
            .expect("a leads at once");
        assert_eq!(third, second + 1);
        let err = b
            .record(&run, before as u64 + 1, vec![JournalEvent::RunResumed])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Deposed(e) if e == second), "{err:?}");
    }

    #[test]
    fn a_url_is_shown_without_its_password() {
        let shown = redact("postgres://mesh:s3cret@db1:5433,db2/mesh?sslmode=disable");
        assert_eq!(shown, "postgres://mesh@db1:5433,db2:5432/mesh");
        assert!(!redact("postgres://u:s3cret@[::1").contains("s3cret"));
        assert_eq!(redact("mysql://u:s3cret@db/x"), "mysql://u@db/x");
        assert!(!redact("host=db password=s3cret port=x").contains("s3cret"));
    }
}
