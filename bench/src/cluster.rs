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
    let me = std::env::current_exe()?;
    Ok(Proc::spawn(&me, name, dir, args, &[("MESH_LOG", "warn")])?)
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
    pub coordinator: Proc,
    pub nodes: Vec<Proc>,
}

impl Cluster {
    /// Starts a coordinator (default intervals plus `extra_toml`) and waits until it answers.
    pub async fn coordinator(extra_toml: &str) -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let (grpc, http) = (free_port()?, free_port()?);
        let config = format!(
            "listen = \"127.0.0.1:{grpc}\"\nhttp_listen = \"127.0.0.1:{http}\"\ndata_dir = \"{}\"\n{extra_toml}\n",
            dir.path().join("data").display()
        );
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, config)?;
        let coordinator = spawn(
            dir.path(),
            "coordinator",
            &["coordinator", "--config", &path.to_string_lossy()],
        )?;
        let url = format!("http://127.0.0.1:{grpc}");
        let probe = url.clone();
        wait_until("the coordinator", Duration::from_secs(30), || {
            let url = probe.clone();
            async move {
                match GoalClient::connect(&url).await {
                    Ok(c) => c.nodes().await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await?;
        Ok(Cluster {
            dir,
            url,
            coordinator,
            nodes: Vec::new(),
        })
    }

    /// Starts a node with `agents_toml`; does not wait.
    pub fn spawn_node(&mut self, name: &str, agents_toml: &str) -> Result<()> {
        let config = format!(
            "coordinator = \"{}\"\nname = \"{name}\"\nreconnect_min = \"20ms\"\nreconnect_max = \"200ms\"\n{agents_toml}\n",
            self.url
        );
        let path: PathBuf = self.dir.path().join(format!("{name}.toml"));
        std::fs::write(&path, config)?;
        let node = spawn(
            self.dir.path(),
            name,
            &["node", "--config", &path.to_string_lossy()],
        )?;
        self.nodes.push(node);
        Ok(())
    }

    /// Waits until `n` nodes are healthy.
    pub async fn wait_nodes(&self, n: usize) -> Result<()> {
        let client = GoalClient::connect(&self.url).await?;
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
        Ok(GoalClient::connect(&self.url).await?)
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
