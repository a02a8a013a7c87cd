//! Running code a model wrote, in a sandbox (reference: docs/tools.md, "Sandboxed code").
//!
//! Each run is a new bubblewrap (`bwrap`, Debian's `bubblewrap`) sandbox: new user, PID,
//! network, IPC, UTS and cgroup namespaces (so no network at all, not even the host's
//! loopback), a read-only `/usr` and nothing else of the host's files, a fresh `/work` on a
//! size-capped tmpfs that vanishes with the sandbox, an empty environment, no capabilities, and
//! a session of its own. Limits come from `prlimit` (util-linux) on the sandbox's processes:
//! CPU seconds, address space (memory), processes (a fork bomb stops there), file size and open
//! files; the node kills the whole sandbox at the wall-clock limit or when the output passes
//! its cap. When the node runs as root, each run gets a user id of its own (`uid_base` + a
//! slot), so the process limit is the run's alone and the code is not root anywhere.

use std::collections::BTreeSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use serde_json::{Value, json};
use tokio::io::AsyncReadExt;

/// `[sandbox]` in node.toml.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SandboxConfig {
    /// The bubblewrap binary.
    pub bwrap: String,
    /// util-linux's `prlimit`.
    pub prlimit: String,
    /// The Python run for `language: python` (under `/usr`, which is all the sandbox sees).
    pub python: String,
    /// The first user id of sandboxed runs when the node is root; runs take ids from here on.
    pub uid_base: u32,
}

impl Default for SandboxConfig {
    fn default() -> Self {
        SandboxConfig {
            bwrap: "bwrap".into(),
            prlimit: "prlimit".into(),
            python: "/usr/bin/python3".into(),
            uid_base: 200_000,
        }
    }
}

/// The languages code may be written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Language {
    Python,
    Shell,
}

impl Language {
    pub fn parse(text: &str) -> Option<Language> {
        match text {
            "python" => Some(Language::Python),
            "shell" | "sh" => Some(Language::Shell),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Language::Python => "python",
            Language::Shell => "shell",
        }
    }
}

/// What one run may use.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Limits {
    /// Wall-clock time; CPU time is limited to the same.
    pub timeout: Duration,
    pub memory_bytes: u64,
    pub processes: u32,
    /// Stdout and stderr, each.
    pub output_bytes: usize,
    /// The size of `/work`, and of any one file.
    pub disk_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            timeout: Duration::from_secs(10),
            memory_bytes: 256 << 20,
            processes: 32,
            output_bytes: 64 << 10,
            disk_bytes: 64 << 20,
        }
    }
}

/// The most a step may ask for.
pub const MAX_LIMITS: Limits = Limits {
    timeout: Duration::from_secs(300),
    memory_bytes: 4 << 30,
    processes: 256,
    output_bytes: 1 << 20,
    disk_bytes: 1 << 30,
};

/// Which limit ended a run, if one did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    Time,
    Output,
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq)]
pub struct RunResult {
    /// The exit code; 128 + N when signal N ended it.
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    pub stopped: Option<Stopped>,
    pub elapsed: Duration,
}

impl RunResult {
    pub fn to_json(&self) -> Value {
        json!({
            "exit_code": self.exit_code,
            "stdout": self.stdout,
            "stderr": self.stderr,
            "limit": self.stopped.map(|s| match s {
                Stopped::Time => "time",
                Stopped::Output => "output",
            }),
            "elapsed_ms": self.elapsed.as_millis() as u64,
        })
    }
}

/// The node's sandbox: its configuration and the user ids of runs in progress.
#[derive(Clone, Debug)]
pub struct Sandbox {
    config: SandboxConfig,
    slots: Arc<Mutex<BTreeSet<u32>>>,
}

/// A user id taken for one run, given back when dropped.
struct Slot {
    uid: Option<u32>,
    slots: Arc<Mutex<BTreeSet<u32>>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(uid) = self.uid {
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&uid);
        }
    }
}

/// SIGXCPU: the CPU limit's signal.
const SIGXCPU: i32 = 24;

impl Sandbox {
    pub fn new(config: SandboxConfig) -> Sandbox {
        Sandbox {
            config,
            slots: Arc::default(),
        }
    }

    fn slot(&self) -> Slot {
        let root = std::fs::metadata("/proc/self").is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        });
        let uid = root.then(|| {
            let mut taken = self.slots.lock().unwrap_or_else(|p| p.into_inner());
            let uid = (self.config.uid_base..)
                .find(|u| !taken.contains(u))
                .unwrap_or(self.config.uid_base);
            taken.insert(uid);
            uid
        });
        Slot {
            uid,
            slots: self.slots.clone(),
        }
    }

    /// Runs `code` under `limits`; `Err` when the sandbox itself cannot start (no bwrap, say).
    pub async fn run(
        &self,
        language: Language,
        code: &str,
        stdin: &str,
        limits: Limits,
    ) -> Result<RunResult, String> {
        let slot = self.slot();
        let cpu = limits.timeout.as_secs().max(1);
        let mut command = tokio::process::Command::new(&self.config.prlimit);
        command.args([
            format!("--cpu={cpu}:{}", cpu + 1),
            format!("--as={0}:{0}", limits.memory_bytes),
            format!("--fsize={0}:{0}", limits.disk_bytes),
            "--nofile=64:64".to_owned(),
            "--core=0:0".to_owned(),
        ]);
        match slot.uid {
            Some(uid) => {
                command.arg(format!("--nproc={0}:{0}", limits.processes));
                command.uid(uid).gid(uid);
            }
            // Not root: the process limit counts the node's own threads and processes too.
            None => {
                let own = std::fs::read_dir("/proc/self/task").map_or(64, |d| d.count() as u32);
                command.arg(format!("--nproc={0}:{0}", limits.processes + own + 16));
            }
        }
        command.arg("--").arg(&self.config.bwrap);
        command.args([
            "--unshare-all",
            "--unshare-user",
            "--disable-userns",
            "--die-with-parent",
            "--new-session",
            "--cap-drop",
            "ALL",
            "--ro-bind",
            "/usr",
            "/usr",
            "--symlink",
            "usr/bin",
            "/bin",
            "--symlink",
            "usr/lib",
            "/lib",
            "--symlink",
            "usr/lib64",
            "/lib64",
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--size",
        ]);
        command.arg(limits.disk_bytes.to_string());
        command.args([
            "--tmpfs",
            "/work",
            "--chdir",
            "/work",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin",
            "--setenv",
            "HOME",
            "/work",
            "--setenv",
            "LANG",
            "C.UTF-8",
            "--",
        ]);
        match language {
            Language::Python => command.args([self.config.python.as_str(), "-I", "-c", code]),
            Language::Shell => command.args(["/bin/sh", "-c", code]),
        };
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let began = Instant::now();
        let mut child = command.spawn().map_err(|e| {
            format!(
                "cannot start the sandbox (`{}` and `{}` are needed: Debian's bubblewrap and util-linux): {e}",
                self.config.prlimit, self.config.bwrap
            )
        })?;
        let mut input = child.stdin.take();
        let stdin = stdin.to_owned();
        let feed = async move {
            if let Some(pipe) = input.as_mut() {
                let _ = tokio::io::AsyncWriteExt::write_all(pipe, stdin.as_bytes()).await;
            }
            drop(input);
        };
        let (out, err) = (child.stdout.take(), child.stderr.take());
        let cap = limits.output_bytes;
        let read = async move {
            let (a, b) = tokio::join!(capped(out, cap), capped(err, cap));
            (a, b)
        };
        let work = async {
            let ((stdout, out_over), (stderr, err_over)) = tokio::join!(read, feed).0;
            (stdout, stderr, out_over || err_over)
        };
        let (stdout, stderr, stopped) = match tokio::time::timeout(limits.timeout, work).await {
            Ok((stdout, stderr, false)) => (stdout, stderr, None),
            Ok((stdout, stderr, true)) => (stdout, stderr, Some(Stopped::Output)),
            Err(_) => (Vec::new(), Vec::new(), Some(Stopped::Time)),
        };
        if stopped.is_some() {
            let _ = child.start_kill();
        }
        let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
            .await
            .map_err(|_| "the sandbox did not end after being killed".to_owned())?
            .map_err(|e| format!("waiting for the sandbox: {e}"))?;
        let exit_code = status.code().unwrap_or_else(|| {
            use std::os::unix::process::ExitStatusExt;
            128 + status.signal().unwrap_or(0)
        });
        let stopped = stopped.or((exit_code == 128 + SIGXCPU).then_some(Stopped::Time));
        drop(slot);
        Ok(RunResult {
            exit_code,
            stdout: String::from_utf8_lossy(&stdout).into_owned(),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            stopped,
            elapsed: began.elapsed(),
        })
    }
}

/// Reads `pipe` to its end, keeping `cap` bytes; whether there was more.
async fn capped(pipe: Option<impl tokio::io::AsyncRead + Unpin>, cap: usize) -> (Vec<u8>, bool) {
    let Some(mut pipe) = pipe else {
        return (Vec::new(), false);
    };
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return (kept, false),
            Ok(n) => {
                if kept.len() + n > cap {
                    kept.extend_from_slice(&buf[..cap - kept.len()]);
                    return (kept, true);
                }
                kept.extend_from_slice(&buf[..n]);
            }
        }
    }
}

/// Reads a step's limits (`timeout`, `memory_mb`, `processes`, `output_bytes`, `disk_mb`) over
/// `base`, each checked against [`MAX_LIMITS`]; errors name `path.field`.
pub fn read_limits(obj: &serde_json::Map<String, Value>, path: &str) -> Result<Limits, String> {
    let mut limits = Limits::default();
    let number = |field: &str, max: u64| -> Result<Option<u64>, String> {
        match obj.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_u64() {
                Some(n) if (1..=max).contains(&n) => Ok(Some(n)),
                _ => Err(format!(
                    "{path}.{field}: must be a whole number from 1 to {max}"
                )),
            },
        }
    };
    if let Some(t) = obj.get("timeout").filter(|v| !v.is_null()) {
        let text = t.as_str().unwrap_or_default();
        limits.timeout = humantime::parse_duration(text)
            .ok()
            .filter(|d| !d.is_zero() && *d <= MAX_LIMITS.timeout)
            .ok_or_else(|| {
                format!(
                    "{path}.timeout: a duration like 10s, at most {}s",
                    MAX_LIMITS.timeout.as_secs()
                )
            })?;
    }
    if let Some(mb) = number("memory_mb", MAX_LIMITS.memory_bytes >> 20)? {
        limits.memory_bytes = mb << 20;
    }
    if let Some(n) = number("processes", u64::from(MAX_LIMITS.processes))? {
        limits.processes = n as u32;
    }
    if let Some(n) = number("output_bytes", MAX_LIMITS.output_bytes as u64)? {
        limits.output_bytes = n as usize;
    }
    if let Some(mb) = number("disk_mb", MAX_LIMITS.disk_bytes >> 20)? {
        limits.disk_bytes = mb << 20;
    }
    Ok(limits)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_read_with_their_bounds_and_errors_name_the_field() {
        let obj = json!({ "timeout": "3s", "memory_mb": 64, "processes": 4 });
        let l = read_limits(obj.as_object().unwrap(), "with").unwrap();
        assert_eq!(l.timeout, Duration::from_secs(3));
        assert_eq!(l.memory_bytes, 64 << 20);
        assert_eq!(l.processes, 4);
        assert_eq!(l.output_bytes, Limits::default().output_bytes);
        for (bad, field) in [
            (json!({ "timeout": "10m" }), "with.timeout"),
            (json!({ "timeout": 5 }), "with.timeout"),
            (json!({ "memory_mb": 0 }), "with.memory_mb"),
            (json!({ "processes": 1000 }), "with.processes"),
        ] {
            let e = read_limits(bad.as_object().unwrap(), "with").unwrap_err();
            assert!(e.starts_with(&format!("{field}:")), "{e}");
        }
    }
}
