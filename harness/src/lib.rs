//! The process harness shared by the process-level tests (`mesh-tests`) and the load
//! generator (`mesh-bench`): start a program with its output in a log file, signal it for
//! real, wait for it with a bound, read its memory and CPU time from `/proc`, find free
//! loopback ports, and poll a condition with a deadline. A [`Proc`] is killed on drop, and
//! its log is printed when the thread that drops it is panicking (a failed test). And a
//! model provider on loopback ([`fake_llm`]) that the `llm` tests and `mesh bench llm` call,
//! an OTLP trace receiver ([`otlp`]) for the telemetry tests and `mesh bench w2-traced`, and a
//! PostgreSQL server of their own ([`postgres`]) for the PostgreSQL store.

pub mod fake_llm;
pub mod otlp;
pub mod postgres;

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// A free port on 127.0.0.1 (bound, then released).
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A condition that did not hold in time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TimedOut {
    pub what: String,
    pub after: Duration,
}

impl fmt::Display for TimedOut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "timed out after {:?} waiting for {}",
            self.after, self.what
        )
    }
}

impl std::error::Error for TimedOut {}

/// Polls `check` every `every` until it returns `Some`, for at most `timeout`.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    every: Duration,
    mut check: F,
) -> Result<T, TimedOut>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check().await {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            return Err(TimedOut {
                what: what.to_owned(),
                after: timeout,
            });
        }
        tokio::time::sleep(every).await;
    }
}

/// A child process; killed on drop, its log printed if the dropping thread panics.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Proc")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .finish()
    }
}

impl Proc {
    /// Starts `program` with `args`, its stdout and stderr in `<dir>/<name>.log`. The child
    /// logs at `info` unless `env` sets `MESH_LOG`, and never inherits `MESH_COORDINATOR`.
    pub fn spawn(
        program: &Path,
        name: &str,
        dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> io::Result<Proc> {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log)?;
        let err = out.try_clone()?;
        let child = Command::new(program)
            .args(args)
            .env("MESH_LOG", "info,ractor=warn")
            .env_remove("MESH_COORDINATOR")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("starting {name}: {e}")))?;
        Ok(Proc {
            name: name.to_owned(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal by name (`STOP`, `CONT`, `TERM`, `KILL`) with kill(1).
    pub fn signal(&self, sig: &str) -> io::Result<()> {
        let status = Command::new("kill")
            .args(["-s", sig, &self.pid().to_string()])
            .status()?;
        if status.success() {
            Ok(())
        } else {
            Err(io::Error::other(format!(
                "kill -s {sig} {} failed",
                self.pid()
            )))
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits for the process to exit by itself, for at most `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> io::Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("{} did not exit within {timeout:?}", self.name),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Everything the process has written so far.
    pub fn log_text(&self) -> String {
        let mut text = String::new();
        if let Ok(mut f) = File::open(&self.log) {
            let _ = f.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // A stopped process must be continued to die of SIGKILL promptly on every kernel.
        let _ = Command::new("kill")
            .args(["-s", "CONT", &self.pid().to_string()])
            .stderr(Stdio::null())
            .status();
        self.kill9();
        if std::thread::panicking() {
            let text = self.log_text();
            let tail: Vec<&str> = text.lines().rev().take(200).collect();
            eprintln!(
                "----- log of {} (last {} lines) -----",
                self.name,
                tail.len()
            );
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
        }
    }
}

/// Resident memory of a process, KiB (`None` once it is gone).
pub fn rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmRSS:")
}

/// The most memory a process has held (`VmHWM`), KiB.
pub fn peak_rss_kib(pid: u32) -> Option<u64> {
    status_kib(pid, "VmHWM:")
}

fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// CPU time (user + system) a process has used so far.
pub fn cpu_time(pid: u32) -> io::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let malformed = || io::Error::new(io::ErrorKind::InvalidData, "malformed /proc stat");
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .ok_or_else(malformed)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> io::Result<u64> {
        fields
            .get(i)
            .and_then(|f| f.parse().ok())
            .ok_or_else(malformed)
    };
    let ticks = field(11)? + field(12)?;
    Ok(Duration::from_secs_f64(ticks as f64 / clock_ticks()))
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_process_is_started_watched_signalled_and_reaped() {
        let dir = std::env::temp_dir();
        let name = format!("harness-{}", std::process::id());
        let mut p = Proc::spawn(
            Path::new("/bin/sh"),
            &name,
            &dir,
            &["-c", "echo ready; exec sleep 30"],
            &[],
        )
        .unwrap();
        let pid = p.pid();
        poll_until(
            "the log line",
            Duration::from_secs(5),
            Duration::from_millis(5),
            || {
                let ready = p.log_text().contains("ready");
                async move { ready.then_some(()) }
            },
        )
        .await
        .unwrap();
        assert!(p.is_running());
        assert!(rss_kib(pid).is_some_and(|k| k > 0));
        assert!(peak_rss_kib(pid) >= rss_kib(pid));
        assert!(cpu_time(pid).is_ok());
        let err = p.wait_exit(Duration::from_millis(50)).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        p.signal("TERM").unwrap();
        let status = p.wait_exit(Duration::from_secs(5)).await.unwrap();
        assert!(!status.success());
        assert_eq!(rss_kib(pid), None, "gone");
        let _ = std::fs::remove_file(dir.join(format!("{name}.log")));
    }

    #[tokio::test]
    async fn a_condition_that_never_holds_times_out_naming_it() {
        let err = poll_until(
            "nothing",
            Duration::from_millis(30),
            Duration::from_millis(5),
            || async { None::<()> },
        )
        .await
        .unwrap_err();
        assert_eq!(err.to_string(), "timed out after 30ms waiting for nothing");
    }
}
