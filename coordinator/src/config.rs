//! Coordinator configuration. Every interval can be set; tests shorten them here.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoordinatorConfig {
    /// gRPC address (NodeService, GoalService, RegistryService, health, reflection).
    pub listen: SocketAddr,
    /// HTTP address for `/metrics` and `/healthz`.
    pub http_listen: SocketAddr,
    /// Directory of the embedded SQLite store (and of files such as `admin.token`).
    pub data_dir: PathBuf,
    /// Where the coordinator keeps its state: none for the embedded SQLite store in
    /// `data_dir`, or `postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE` for PostgreSQL.
    pub store: Option<StoreUrl>,
    /// Leadership among coordinators sharing a PostgreSQL store.
    pub cluster: crate::leadership::ClusterConfig,
    /// Longest a unary call (or a stream's start) may take before it is answered
    /// `DEADLINE_EXCEEDED`; a client's shorter `grpc-timeout` applies too.
    #[serde(with = "humantime_serde")]
    pub request_deadline: Duration,
    /// On shutdown, how long the coordinator answers health checks NOT_SERVING while it
    /// still serves, so that load balancers stop sending it work first.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often the store is probed with a write, for health.
    #[serde(with = "humantime_serde")]
    pub store_probe_every: Duration,
    pub registry: RegistryConfig,
    pub dispatch: DispatchConfig,
    pub auth: AuthConfig,
    pub tls: TlsConfig,
    pub quotas: crate::quotas::QuotasConfig,
    pub secrets: crate::secrets::SecretsConfig,
    /// Listen beyond loopback without TLS and authentication (`--insecure`); otherwise such a
    /// coordinator refuses to start.
    pub insecure: bool,
}

/// The URL of a store server. It may hold a password: it is shown only without it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StoreUrl(pub String);

impl std::fmt::Debug for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::store::redact(&self.0))
    }
}

impl std::fmt::Display for StoreUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&crate::store::redact(&self.0))
    }
}

/// TLS on the gRPC port (docs/security.md): the coordinator's certificate and key, and the CA
/// whose certificates nodes must present (`mesh certs dev` writes all of them).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// With it, a node stream must present a certificate this CA signed, for the node's
    /// name; clients may present one or not (they authenticate with tokens).
    pub client_ca_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some() || self.key_file.is_some()
    }
}

/// Who may call the coordinator (docs/security.md).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Every call must carry a token (`authorization: Bearer …`) whose role allows it in the
    /// call's namespace. At the first start with it on, a cluster admin token is written to
    /// `<data_dir>/admin.token`.
    pub enabled: bool,
    /// JWTs from an outside issuer, accepted besides the coordinator's own tokens.
    pub jwt: Option<crate::jwt::JwtConfig>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 7700).into(),
            http_listen: ([127, 0, 0, 1], 7701).into(),
            data_dir: PathBuf::from(".mesh/coordinator"),
            store: None,
            cluster: Default::default(),
            request_deadline: Duration::from_secs(30),
            shutdown_grace: Duration::ZERO,
            store_probe_every: Duration::from_secs(2),
            registry: RegistryConfig::default(),
            dispatch: DispatchConfig::default(),
            auth: AuthConfig::default(),
            tls: TlsConfig::default(),
            quotas: crate::quotas::QuotasConfig::default(),
            secrets: crate::secrets::SecretsConfig::default(),
            insecure: false,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// How often nodes heartbeat (told to each node when it registers).
    #[serde(with = "humantime_serde")]
    pub heartbeat_every: Duration,
    /// Missed heartbeats after which a node is `suspect` and gets no new work.
    pub suspect_after_missed: u32,
    /// Silence after which a node is `dead`: its work is re-dispatched and it must register again.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// How often the registry checks leases.
    #[serde(with = "humantime_serde")]
    pub sweep_every: Duration,
    /// How long a dead node stays listed.
    #[serde(with = "humantime_serde")]
    pub forget_dead_after: Duration,
    /// Time a new node stream has to send its `register` frame; past it the stream ends
    /// with DEADLINE_EXCEEDED.
    #[serde(with = "humantime_serde")]
    pub register_within: Duration,
    /// Node streams open at once that have not registered yet; past it `Connect` answers
    /// RESOURCE_EXHAUSTED.
    pub max_unregistered_streams: usize,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            heartbeat_every: Duration::from_secs(1),
            suspect_after_missed: 2,
            lease: Duration::from_secs(5),
            sweep_every: Duration::from_millis(250),
            forget_dead_after: Duration::from_secs(600),
            register_within: Duration::from_secs(5),
            max_unregistered_streams: 64,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatchConfig {
    /// A step whose skill no registered agent has fails after this long.
    #[serde(with = "humantime_serde")]
    pub unschedulable_timeout: Duration,
    /// Time an agent has for one attempt before it is cancelled and retried.
    #[serde(with = "humantime_serde")]
    pub attempt_timeout: Duration,
    /// Steps waiting for a free agent, across all runs; past it a step fails.
    pub max_pending: usize,
    /// Steps waiting for a free agent with one skill; past it a step of that skill fails and
    /// `SubmitGoal` refuses goals that use the skill (RESOURCE_EXHAUSTED, with a retry hint).
    pub max_pending_per_skill: usize,
    /// Failed attempts (agent errors, timeouts) before a step fails.
    pub max_attempts: u32,
    /// Attempts of any kind, including those lost with a dead node, before a step fails.
    pub max_total_attempts: u32,
    /// Wait before the first retry; doubled each time.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
    /// Longest wait between retries.
    #[serde(with = "humantime_serde")]
    pub max_retry_backoff: Duration,
    /// Largest output (as JSON text) one attempt may return; a larger one fails the
    /// attempt, not retried, naming size and limit. At most 1 MiB.
    pub max_result_bytes: usize,
    /// Bytes of agent output a run keeps in all; past it the step whose result would cross
    /// it fails.
    pub max_run_output_bytes: u64,
    /// Frames buffered per node stream.
    pub node_queue: usize,
    /// Runs in progress at once; past it `SubmitGoal` answers RESOURCE_EXHAUSTED.
    pub max_active_runs: usize,
    /// Failed attempts in a row after which an agent's circuit opens (0: never).
    pub circuit_failures: u32,
    /// How long an open circuit keeps its agent out before one probe attempt.
    #[serde(with = "humantime_serde")]
    pub circuit_cool_down: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        Self {
            unschedulable_timeout: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(300),
            max_pending: 100_000,
            max_pending_per_skill: 10_000,
            max_attempts: 3,
            max_total_attempts: 10,
            retry_backoff: Duration::from_millis(200),
            max_retry_backoff: Duration::from_secs(10),
            max_result_bytes: mesh_proto::convert::MAX_JSON_BYTES,
            max_run_output_bytes: 64 << 20,
            node_queue: 1024,
            max_active_runs: 100_000,
            circuit_failures: 5,
            circuit_cool_down: Duration::from_secs(30),
        }
    }
}
