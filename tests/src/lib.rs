//! Harness for process-level tests, on the process harness the load generator shares
//! (`mesh-harness`): starts the real `mesh` binary as a coordinator and as
//! nodes on free loopback ports with temporary data directories, waits for them to be
//! ready (every wait bounded), signals them for real, and kills them on drop. When a test
//! fails, the logs of every process it started are printed.
//!
//! The `mesh` binary is found next to the test executable (`target/<profile>/mesh`), or at
//! `$MESH_BIN`; `cargo build -p mesh-cli` (or a workspace build) makes it.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use mesh_agent_sdk::{GoalClient, Health, NodeView};

pub use mesh_harness::{fake_llm, otlp};
pub mod netns;
pub mod raw;

pub use mesh_agent_sdk;
pub use mesh_harness::Proc;
pub use mesh_proto;

/// The number in environment variable `var` (a seed, a duration in seconds), or `default`.
pub fn env_u64(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// Path of the `mesh` binary under test.
pub fn mesh_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("MESH_BIN") {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("test executable path");
    // target/<profile>/deps/<test> -> target/<profile>/mesh
    let bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("mesh"))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build -p mesh-cli) or set MESH_BIN",
        bin.display()
    );
    bin
}

/// Path of an example binary of the workspace (`target/<profile>/examples/<name>`), built
/// by `cargo build --workspace --examples` (as `scripts/check` does).
pub fn example_bin(name: &str) -> PathBuf {
    let bin = mesh_bin()
        .parent()
        .map(|d| d.join("examples").join(name))
        .expect("target directory");
    assert!(
        bin.exists(),
        "{} not found: build it first (cargo build --workspace --examples)",
        bin.display()
    );
    bin
}

/// Agents of a node for load tests: `echo` and `sleep`, eight tasks at once each.
pub const ECHO_AND_SLEEP: &str = r#"
[[agents]]
kind = "echo"
max_concurrency = 8
[[agents]]
kind = "sleep"
max_concurrency = 8
"#;

/// Resident memory of a process, KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    mesh_harness::rss_kib(pid).unwrap_or(0)
}

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    mesh_harness::free_port().expect("free port")
}

/// Runs `program args` in `dir`, asserting that it succeeds; its stdout and stderr together.
pub fn run_tool(program: &str, args: &[&str], dir: &Path) -> String {
    let out = std::process::Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} (is it installed? .ci/run installs it): {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{program} {args:?}: {text}");
    text
}

/// `GET path` on 127.0.0.1:`port` (HTTP/1.0, two seconds at most): the status code.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `timeout`.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let every = Duration::from_millis(20);
    match mesh_harness::poll_until(what, timeout, every, check).await {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

/// Waits until the run's first step has been handed to an agent.
pub async fn wait_assigned(client: &GoalClient, run: &mesh_agent_sdk::RunId) {
    wait_for(
        "the first step to be on an agent",
        Duration::from_secs(10),
        || async {
            client.get_run(run).await.ok()?.steps[0]
                .agent
                .as_ref()
                .map(|_| ())
        },
    )
    .await
}

/// Starts the `mesh` binary under test with `args`, its output in `<dir>/<name>.log`.
pub fn spawn_mesh(name: &str, dir: &Path, args: &[&str]) -> Proc {
    spawn_mesh_with(name, dir, args, &[])
}

/// [`spawn_mesh`] with more environment.
pub fn spawn_mesh_with(name: &str, dir: &Path, args: &[&str], env: &[(String, String)]) -> Proc {
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    Proc::spawn(&mesh_bin(), name, dir, args, &env).expect("spawn mesh")
}

/// Intervals for a test coordinator; short, so that tests are quick.
#[derive(Clone, Debug)]
pub struct Timings {
    pub heartbeat_ms: u64,
    pub lease_ms: u64,
    pub sweep_ms: u64,
    pub unschedulable_ms: u64,
    pub retry_backoff_ms: u64,
    pub circuit_failures: u32,
    pub circuit_cool_down_ms: u64,
    pub max_active_runs: usize,
    pub max_pending_per_skill: usize,
    /// More `coordinator.toml` lines: at the top, under `[registry]` and under `[dispatch]`.
    pub coordinator_extra: String,
    pub registry_extra: String,
    pub dispatch_extra: String,
    /// A directory written by `mesh certs dev`: the coordinator serves TLS with a client CA,
    /// clients reach it over https with the CA, nodes with their own certificate.
    pub certs: Option<PathBuf>,
    /// More environment for the coordinator and the nodes (`OTEL_*`, say).
    pub env: Vec<(String, String)>,
}

impl Default for Timings {
    fn default() -> Self {
        Self {
            heartbeat_ms: 200,
            lease_ms: 1000,
            sweep_ms: 100,
            unschedulable_ms: 3000,
            retry_backoff_ms: 50,
            circuit_failures: 5,
            circuit_cool_down_ms: 30_000,
            max_active_runs: 100_000,
            max_pending_per_skill: 10_000,
            coordinator_extra: String::new(),
            registry_extra: String::new(),
            dispatch_extra: String::new(),
            certs: None,
            env: Vec::new(),
        }
    }
}

/// A coordinator and its nodes, in one temporary directory.
pub struct Mesh {
    /// The address the coordinator's gRPC listens on: loopback, or a veth address of a
    /// network namespace test.
    pub host: String,
    pub grpc_port: u16,
    pub http_port: u16,
    pub timings: Timings,
    pub coordinator: Option<Proc>,
    pub nodes: HashMap<String, Proc>,
    /// With `[auth] enabled = true`: the cluster admin token the coordinator wrote, used by
    /// `client()`; and a worker token for the nodes this mesh starts, when a test sets one.
    pub admin_token: Option<String>,
    pub worker_token: Option<String>,
    /// The addresses of other coordinators on the same PostgreSQL store: nodes and clients
    /// are given them after this one's (`url()`).
    pub others: Vec<String>,
    /// Last: fields drop in order, and the processes' logs live here.
    pub dir: tempfile::TempDir,
}

impl Mesh {
    /// Starts a coordinator and waits until it answers.
    pub async fn start(timings: Timings) -> Mesh {
        Self::start_on("127.0.0.1", timings).await
    }

    /// Starts a coordinator whose gRPC listens on `host`.
    pub async fn start_on(host: &str, timings: Timings) -> Mesh {
        let mut mesh = Mesh {
            host: host.to_owned(),
            grpc_port: free_port(),
            http_port: free_port(),
            timings,
            coordinator: None,
            nodes: HashMap::new(),
            admin_token: None,
            worker_token: None,
            others: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        };
        mesh.start_coordinator().await;
        mesh
    }

    pub fn url(&self) -> String {
        let scheme = if self.timings.certs.is_some() {
            "https"
        } else {
            "http"
        };
        let own = format!("{scheme}://{}:{}", self.host, self.grpc_port);
        std::iter::once(own)
            .chain(self.others.iter().cloned())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// This coordinator's own address, without the others'.
    pub fn own_url(&self) -> String {
        self.url().split(',').next().unwrap_or_default().to_owned()
    }

    /// What a client of this mesh needs for TLS: the CA, when the mesh has certificates.
    pub fn client_tls(&self) -> mesh_agent_sdk::TlsFiles {
        mesh_agent_sdk::TlsFiles {
            ca_file: self.timings.certs.as_ref().map(|d| d.join("ca.pem")),
            ..Default::default()
        }
    }

    pub fn db_path(&self) -> PathBuf {
        self.dir.path().join("data").join("mesh.db")
    }

    /// (Re)starts the coordinator on the same ports and data directory.
    pub async fn start_coordinator(&mut self) {
        let t = &self.timings;
        let config = format!(
            r#"listen = "{host}:{grpc}"
http_listen = "127.0.0.1:{http}"
insecure = {insecure}
data_dir = "{data}"
{coordinator_extra}
{tls}
[registry]
heartbeat_every = "{hb}ms"
lease = "{lease}ms"
sweep_every = "{sweep}ms"
{registry_extra}
[dispatch]
unschedulable_timeout = "{unsched}ms"
retry_backoff = "{backoff}ms"
circuit_failures = {circuit}
circuit_cool_down = "{cool}ms"
max_active_runs = {max_runs}
max_pending_per_skill = {max_skill}
{dispatch_extra}
"#,
            host = self.host,
            // Tests in network namespaces listen beyond loopback, without TLS.
            insecure = !self.host.starts_with("127.") && t.certs.is_none(),
            grpc = self.grpc_port,
            http = self.http_port,
            data = self.dir.path().join("data").display(),
            hb = t.heartbeat_ms,
            lease = t.lease_ms,
            sweep = t.sweep_ms,
            unsched = t.unschedulable_ms,
            backoff = t.retry_backoff_ms,
            circuit = t.circuit_failures,
            cool = t.circuit_cool_down_ms,
            max_runs = t.max_active_runs,
            max_skill = t.max_pending_per_skill,
            coordinator_extra = t.coordinator_extra,
            tls = t
                .certs
                .as_ref()
                .map(|d| format!(
                    "[tls]\ncert_file = \"{0}/coordinator.pem\"\nkey_file = \"{0}/coordinator.key\"\nclient_ca_file = \"{0}/ca.pem\"\n",
                    d.display()
                ))
                .unwrap_or_default(),
            registry_extra = t.registry_extra,
            dispatch_extra = t.dispatch_extra,
        );
        let path = self.dir.path().join("coordinator.toml");
        std::fs::write(&path, config).expect("write config");
        let n = self.dir.path().read_dir().map(|d| d.count()).unwrap_or(0);
        let name = format!("coordinator-{n}");
        self.coordinator = Some(spawn_mesh_with(
            &name,
            self.dir.path(),
            &["coordinator", "--config", path.to_str().unwrap()],
            &self.timings.env,
        ));
        let url = self.own_url();
        let tls = self.client_tls();
        wait_for("the coordinator to answer", Duration::from_secs(20), || {
            let (url, tls) = (url.clone(), tls.clone());
            async move {
                let client = GoalClient::connect_with(&url, &tls).await.ok()?;
                match client.nodes().await {
                    Ok(_) => Some(()),
                    // Answering, with authentication on.
                    Err(e) if e.code() == Some(mesh_agent_sdk::RpcCode::Unauthenticated) => {
                        Some(())
                    }
                    // Answering, as a standby of another coordinator on its store.
                    Err(e)
                        if e.code() == Some(mesh_agent_sdk::RpcCode::Unavailable)
                            && e.to_string().contains("standby") =>
                    {
                        Some(())
                    }
                    Err(_) => None,
                }
            }
        })
        .await;
        let admin = self.dir.path().join("data").join("admin.token");
        self.admin_token = std::fs::read_to_string(admin)
            .ok()
            .map(|t| t.trim().to_owned());
    }

    /// Starts a node hosting `agents_toml` (`[[agents]]` tables) and waits until it is healthy.
    pub async fn start_node(&mut self, name: &str, agents_toml: &str) -> u64 {
        self.start_node_with(name, agents_toml, None).await
    }

    pub async fn start_node_with(
        &mut self,
        name: &str,
        agents_toml: &str,
        http_port: Option<u16>,
    ) -> u64 {
        self.start_node_in(name, agents_toml, http_port, None).await
    }

    /// Starts a node, inside network namespace `netns` when given (`ip netns exec`), and
    /// waits until it is healthy.
    pub async fn start_node_in(
        &mut self,
        name: &str,
        agents_toml: &str,
        http_port: Option<u16>,
        netns: Option<&str>,
    ) -> u64 {
        self.spawn_node_in(name, agents_toml, http_port, netns);
        self.wait_healthy(name).await.instance
    }

    /// Starts a node and does not wait for it.
    pub fn spawn_node_in(
        &mut self,
        name: &str,
        agents_toml: &str,
        http_port: Option<u16>,
        netns: Option<&str>,
    ) {
        let mut http = http_port
            .map(|p| format!("http_listen = \"127.0.0.1:{p}\"\n"))
            .unwrap_or_default();
        let tls = self
            .timings
            .certs
            .as_ref()
            .map(|d| {
                format!(
                    "\n[tls]\nca_file = \"{0}/ca.pem\"\ncert_file = \"{0}/{name}.pem\"\nkey_file = \"{0}/{name}.key\"\n",
                    d.display()
                )
            })
            .unwrap_or_default();
        if let Some(token) = &self.worker_token {
            let file = self.dir.path().join(format!("{name}.token"));
            std::fs::write(&file, token).expect("write the worker token");
            http.push_str(&format!("token_file = \"{}\"\n", file.display()));
        }
        let config = format!(
            r#"coordinator = "{url}"
name = "{name}"
execution_log = "{log}"
reconnect_min = "50ms"
reconnect_max = "500ms"
drain_grace = "20s"
{http}
{agents_toml}
{tls}
"#,
            url = self.url(),
            log = self.exec_log(name).display(),
        );
        let path = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config).expect("write node config");
        let config = path.to_str().unwrap();
        let proc = match netns {
            None => spawn_mesh_with(
                name,
                self.dir.path(),
                &["node", "--config", config],
                &self.timings.env,
            ),
            Some(ns) => {
                let bin = mesh_bin();
                let args = [
                    "netns",
                    "exec",
                    ns,
                    bin.to_str().unwrap(),
                    "node",
                    "--config",
                    config,
                ];
                Proc::spawn(Path::new("ip"), name, self.dir.path(), &args, &[]).expect("spawn ip")
            }
        };
        self.nodes.insert(name.to_owned(), proc);
    }

    pub fn exec_log(&self, node: &str) -> PathBuf {
        self.dir.path().join(format!("{node}.exec.jsonl"))
    }

    pub async fn client(&self) -> GoalClient {
        let client = GoalClient::connect_with(&self.url(), &self.client_tls())
            .await
            .expect("connect to the coordinator");
        match &self.admin_token {
            Some(token) => client.with_token(token).expect("a printable token"),
            None => client,
        }
    }

    pub async fn node_view(&self, name: &str) -> Option<NodeView> {
        self.client()
            .await
            .nodes()
            .await
            .ok()?
            .into_iter()
            .find(|n| n.node_id.as_str() == name)
    }

    /// Waits until `name` is registered and healthy; returns its view.
    pub async fn wait_healthy(&self, name: &str) -> NodeView {
        wait_for(
            &format!("node {name} to be healthy"),
            Duration::from_secs(20),
            || async {
                self.node_view(name)
                    .await
                    .filter(|n| n.health == Health::Healthy)
            },
        )
        .await
    }

    pub fn node(&mut self, name: &str) -> &mut Proc {
        self.nodes.get_mut(name).expect("node started by this test")
    }

    /// Fetches the coordinator's /metrics and sums the samples of `metric`.
    pub fn metric(&self, metric: &str) -> f64 {
        metric_at(self.http_port, metric)
    }

    /// Accepted results per (run, step), from the journal.
    pub fn accepted_results(&self) -> HashMap<(String, String), u32> {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the store");
        let mut stmt = conn
            .prepare("SELECT run_id, step_id, COUNT(*) FROM journal WHERE kind = 'step_succeeded' GROUP BY run_id, step_id")
            .expect("query");
        stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// Steps that were started more than once (moved off a lost node, or retried), from the
    /// journal.
    pub fn steps_started_again(&self) -> usize {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the store");
        conn.query_row(
            "SELECT COUNT(*) FROM (SELECT 1 FROM journal WHERE kind = 'step_started'
             GROUP BY run_id, step_id HAVING COUNT(*) > 1)",
            [],
            |r| r.get::<_, i64>(0),
        )
        .expect("count") as usize
    }

    /// Accepted task results per (run, step, task index), from the journal.
    pub fn accepted_tasks(&self) -> HashMap<(String, String, u32), u32> {
        let conn = rusqlite::Connection::open_with_flags(
            self.db_path(),
            rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
        )
        .expect("open the store");
        let mut stmt = conn
            .prepare(
                "SELECT run_id, step_id, json_extract(event, '$.index'), COUNT(*) FROM journal
                 WHERE kind = 'task_succeeded' GROUP BY 1, 2, 3",
            )
            .expect("query");
        stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?, r.get(2)?), r.get(3)?)))
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    /// Attempts started per (run, step, task index) on a node, from its execution log.
    pub fn task_executions(&self, node: &str) -> HashMap<(String, String, u32), u32> {
        let text = std::fs::read_to_string(self.exec_log(node)).unwrap_or_default();
        let mut counts = HashMap::new();
        for line in text.lines() {
            let v: serde_json::Value = serde_json::from_str(line).expect("execution log line");
            let key = (
                v["run_id"].as_str().unwrap().to_owned(),
                v["step_id"].as_str().unwrap().to_owned(),
                v["index"].as_u64().unwrap_or(0) as u32,
            );
            *counts.entry(key).or_insert(0) += 1;
        }
        counts
    }

    /// Attempts started per (run, step) on a node, every task of a step together.
    pub fn executions(&self, node: &str) -> HashMap<(String, String), u32> {
        let mut counts = HashMap::new();
        for ((run, step, _), n) in self.task_executions(node) {
            *counts.entry((run, step)).or_insert(0) += n;
        }
        counts
    }
}

/// Fetches `http://127.0.0.1:<port>/metrics` and sums the samples of `metric`.
pub fn metric_at(port: u16, metric: &str) -> f64 {
    let mut stream =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to /metrics");
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok();
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).expect("response");
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(metric) && matches!(l.as_bytes().get(metric.len()), Some(b' ' | b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A goal of steps given as (id, uses, with, needs).
pub fn goal(
    objective: &str,
    steps: &[(&str, &str, serde_json::Value, &[&str])],
) -> mesh_agent_sdk::GoalSpec {
    mesh_agent_sdk::GoalSpec {
        objective: objective.to_owned(),
        inputs: serde_json::json!({}),
        steps: steps
            .iter()
            .map(|(id, uses, with, needs)| mesh_agent_sdk::StepSpec {
                id: (*id).into(),
                uses: (*uses).to_owned(),
                with: with.clone(),
                needs: needs.iter().map(|&n| n.into()).collect(),
            })
            .collect(),
        idempotency_key: None,
        workflow: None,
        workflow_ref: None,
        budget: None,
        namespace: Default::default(),
    }
}

/// A goal that is a workflow definition (YAML or JSON text) with `inputs`.
pub fn workflow_goal(text: &str, inputs: serde_json::Value) -> mesh_agent_sdk::GoalSpec {
    mesh_agent_sdk::GoalSpec {
        objective: String::new(),
        inputs,
        steps: Vec::new(),
        workflow: Some(text.to_owned()),
        workflow_ref: None,
        idempotency_key: None,
        budget: None,
        namespace: Default::default(),
    }
}

/// Submits a workflow (YAML or JSON text) and waits for its run to end, 60 s at most.
pub async fn run_workflow(
    client: &GoalClient,
    text: &str,
    inputs: serde_json::Value,
) -> mesh_agent_sdk::RunView {
    let run = client
        .submit(workflow_goal(text, inputs))
        .await
        .expect("the goal is taken");
    tokio::time::timeout(Duration::from_secs(60), client.wait(&run.run_id))
        .await
        .expect("the run finishes within 60 s")
        .expect("the run can be watched")
}

impl Mesh {
    /// A run's journal as the store holds it: (kind, event), in order.
    pub fn journal(&self, run: &mesh_agent_sdk::RunId) -> Vec<(String, serde_json::Value)> {
        let db = rusqlite::Connection::open(self.db_path()).expect("open the store");
        db.prepare("SELECT kind, event FROM journal WHERE run_id = ?1 ORDER BY seq")
            .expect("a journal query")
            .query_map([run.as_str()], |r| {
                let event: String = r.get(1)?;
                Ok((
                    r.get(0)?,
                    serde_json::from_str(&event).expect("a JSON event"),
                ))
            })
            .expect("the journal")
            .collect::<Result<_, _>>()
            .expect("its rows")
    }
}
