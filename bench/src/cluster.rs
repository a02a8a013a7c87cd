//! Processes a benchmark starts: the coordinator and nodes (this same `mesh` binary), or the
//! baseline's echo server and relay, on free loopback ports in a temporary directory, through
//! the harness the tests use too (`mesh-harness`). All are killed on drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use mesh_agent_sdk::{GoalClient, Health};
pub use mesh_harness::Proc;

pub fn free_port() -> Result<u16> {
    Ok(mesh_harness::free_port()?)
}

/// Starts this same binary (the `mesh` that runs the benchmark) as `name`, logging warnings.
pub fn spawn(dir: &std::path::Path, name: &str, args: &[&str]) -> Result<Proc> {
    spawn_with(dir, name, args, &[])
}

/// [`spawn`] with more environment.
fn spawn_with(
    dir: &std::path::Path,
    name: &str,
    args: &[&str],
    env: &[(String, String)],
) -> Result<Proc> {
    let me = std::env::current_exe()?;
    let mut all = vec![("MESH_LOG", "warn")];
    all.extend(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
    Ok(Proc::spawn(&me, name, dir, args, &all)?)
}

/// Polls `check` every 5 ms until it is true, for at most `timeout`.
pub async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let every = Duration::from_millis(5);
    mesh_harness::poll_until(what, timeout, every, || {
        let fut = check();
        async move { fut.await.then_some(()) }
    })
    .await?;
    Ok(())
}

/// A bound on a polling loop: `tick` sleeps 5 ms, or fails once the time is up.
pub struct Deadline {
    what: String,
    at: Instant,
    timeout: Duration,
}

impl Deadline {
    pub fn new(what: &str, timeout: Duration) -> Self {
        Self {
            what: what.to_owned(),
            at: Instant::now() + timeout,
            timeout,
        }
    }

    pub async fn tick(&self) -> Result<()> {
        if Instant::now() > self.at {
            bail!(
                "timed out after {:?} waiting for {}",
                self.timeout,
                self.what
            );
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
        Ok(())
    }
}

/// A coordinator and nodes.
pub struct Cluster {
    pub dir: tempfile::TempDir,
    pub url: String,
    /// The coordinator's HTTP port (metrics, health, the dashboard).
    pub http: u16,
    pub coordinator: Proc,
    pub nodes: Vec<Proc>,
    /// With TLS and tokens: the certificates, the cluster admin token and the nodes' one.
    pub secure: Option<Secure>,
    /// More environment for the coordinator and nodes (`OTEL_*`).
    pub env: Vec<(String, String)>,
    /// The PostgreSQL server of the coordinator's store, with `--store postgres`; last, so
    /// that it stops after the processes that use it.
    _postgres: Option<mesh_harness::postgres::Server>,
}

/// What a secured cluster's clients and nodes need.
pub struct Secure {
    pub certs: PathBuf,
    pub admin: String,
    pub worker: String,
}

impl Cluster {
    /// Starts a coordinator (default intervals plus `extra_toml`) and waits until it answers.
    pub async fn coordinator(extra_toml: &str) -> Result<Cluster> {
        Self::start(extra_toml, false, Vec::new()).await
    }

    /// As [`Cluster::coordinator`], its processes with more environment.
    pub async fn with_env(extra_toml: &str, env: Vec<(String, String)>) -> Result<Cluster> {
        Self::start(extra_toml, false, env).await
    }

    /// As [`Cluster::coordinator`], with mutual TLS (`mesh certs dev`) and tokens.
    pub async fn secured(extra_toml: &str) -> Result<Cluster> {
        Self::start(extra_toml, true, Vec::new()).await
    }

    async fn start(extra_toml: &str, secure: bool, env: Vec<(String, String)>) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let (grpc, http) = (free_port()?, free_port()?);
        let certs = dir.path().join("certs");
        let mut extra = extra_toml.to_owned();
        if secure {
            let c = certs.to_string_lossy();
            let mut made = spawn(
                dir.path(),
                "certs",
                &["certs", "dev", &c, "--node", "n1", "--node", "n2"],
            )?;
            let status = made.wait_exit(Duration::from_secs(30)).await?;
            if !status.success() {
                bail!("mesh certs dev failed: {}", made.log_text());
            }
            extra.push_str(&format!(
                "\n[auth]\nenabled = true\n[tls]\ncert_file = \"{c}/coordinator.pem\"\nkey_file = \"{c}/coordinator.key\"\nclient_ca_file = \"{c}/ca.pem\"\n"
            ));
        }
        let postgres = match crate::store() {
            crate::StoreKind::Sqlite => None,
            crate::StoreKind::Postgres => {
                let server = tokio::task::spawn_blocking(|| {
                    let server = mesh_harness::postgres::Server::start(
                        mesh_harness::postgres::Durability::Full,
                    )?;
                    server.create_db("mesh")?;
                    Ok::<_, std::io::Error>(server)
                })
                .await??;
                extra.insert_str(0, &format!("store = \"{}\"\n", server.url("mesh")));
                Some(server)
            }
        };
        let extra_toml = extra;
        let config = format!(
            "listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndata_dir = \"{}\"\n{extra_toml}\n",
            dir.path().join("data").display()
        );
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, config)?;
        let coordinator = spawn_with(
            dir.path(),
            "coordinator",
            &["coordinator", "--config", &path.to_string_lossy()],
            &env,
        )?;
        let scheme = if secure { "https" } else { "http" };
        let url = format!("{scheme}://127.0.0.1:{grpc}");
        let tls = mesh_agent_sdk::TlsFiles {
            ca_file: secure.then(|| certs.join("ca.pem")),
            ..Default::default()
        };
        let admin_file = dir.path().join("data").join("admin.token");
        let probe = url.clone();
        wait_until("the coordinator", Duration::from_secs(30), || {
            let (url, tls, admin_file) = (probe.clone(), tls.clone(), admin_file.clone());
            async move {
                let Ok(mut c) = GoalClient::connect_with(&url, &tls).await else {
                    return false;
                };
                if secure {
                    let Ok(admin) = std::fs::read_to_string(&admin_file) else {
                        return false;
                    };
                    let Ok(with) = c.with_token(admin.trim()) else {
                        return false;
                    };
                    c = with;
                }
                c.nodes().await.is_ok()
            }
        })
        .await?;
        let mut cluster = Cluster {
            dir,
            url,
            http,
            coordinator,
            nodes: Vec::new(),
            secure: None,
            env,
            _postgres: postgres,
        };
        if secure {
            let admin = std::fs::read_to_string(&admin_file)?.trim().to_owned();
            let client = GoalClient::connect_with(&cluster.url, &tls)
                .await?
                .with_token(&admin)?;
            let worker = client
                .create_token("bench-nodes", "default", "worker", None)
                .await?
                .secret;
            cluster.secure = Some(Secure {
                certs,
                admin,
                worker,
            });
        }
        Ok(cluster)
    }

    /// Starts a node with `agents_toml`; does not wait.
    pub fn spawn_node(&mut self, name: &str, agents_toml: &str) -> Result<()> {
        let mut config = format!(
            "coordinator = \"{}\"\nname = \"{name}\"\nreconnect_min = \"20ms\"\nreconnect_max = \"200ms\"\n",
            self.url
        );
        if let Some(secure) = &self.secure {
            let token = self.dir.path().join(format!("{name}.token"));
            std::fs::write(&token, &secure.worker)?;
            config.push_str(&format!("token_file = \"{}\"\n", token.display()));
        }
        config.push_str(agents_toml);
        if let Some(secure) = &self.secure {
            let c = secure.certs.display();
            config.push_str(&format!(
                "\n[tls]\nca_file = \"{c}/ca.pem\"\ncert_file = \"{c}/{name}.pem\"\nkey_file = \"{c}/{name}.key\"\n"
            ));
        }
        let path: PathBuf = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let node = spawn_with(
            self.dir.path(),
            name,
            &["node", "--config", &path.to_string_lossy()],
            &self.env,
        )?;
        self.nodes.push(node);
        Ok(())
    }

    /// Waits until `n` nodes are healthy.
    pub async fn wait_nodes(&self, n: usize) -> Result<()> {
        let client = self.client().await?;
        wait_until(
            &format!("{n} healthy nodes"),
            Duration::from_secs(30),
            || {
                let client = client.clone();
                async move {
                    client
                        .nodes()
                        .await
                        .map(|nodes| {
                            nodes.iter().filter(|v| v.health == Health::Healthy).count() >= n
                        })
                        .unwrap_or(false)
                }
            },
        )
        .await
    }

    pub async fn with_nodes(extra_toml: &str, nodes: &[(&str, &str)]) -> Result<Cluster> {
        let mut cluster = Cluster::coordinator(extra_toml).await?;
        for (name, agents) in nodes {
            cluster.spawn_node(name, agents)?;
        }
        cluster.wait_nodes(nodes.len()).await?;
        Ok(cluster)
    }

    pub async fn client(&self) -> Result<GoalClient> {
        match &self.secure {
            None => Ok(GoalClient::connect(&self.url).await?),
            Some(secure) => {
                let tls = mesh_agent_sdk::TlsFiles {
                    ca_file: Some(secure.certs.join("ca.pem")),
                    ..Default::default()
                };
                Ok(GoalClient::connect_with(&self.url, &tls)
                    .await?
                    .with_token(&secure.admin)?)
            }
        }
    }

    pub fn node(&mut self, name: &str) -> Option<&mut Proc> {
        self.nodes.iter_mut().find(|n| n.name == name)
    }
}

/// Resident memory of a process, in MiB.
pub fn rss_mib(pid: u32) -> Result<f64> {
    let kib = mesh_harness::rss_kib(pid).with_context(|| format!("process {pid} is gone"))?;
    Ok(kib as f64 / 1024.0)
}

/// The most memory a process has held (`VmHWM`), MiB.
pub fn peak_rss_mib(pid: u32) -> Result<f64> {
    let kib = mesh_harness::peak_rss_kib(pid).with_context(|| format!("process {pid} is gone"))?;
    Ok(kib as f64 / 1024.0)
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> Result<Duration> {
    Ok(mesh_harness::cpu_time(pid)?)
}
