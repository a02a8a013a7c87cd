//! A PostgreSQL server of its own for a test or a benchmark: Debian's `postgresql` binaries
//! (`initdb`, `pg_ctl`), a cluster in a temporary directory, listening on a free loopback port
//! only (no Unix socket, no system service), stopped and removed on drop. As root, the server
//! runs as the `postgres` user, as PostgreSQL requires.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// How much the server may lose in a crash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Durability {
    /// PostgreSQL's defaults: a commit is flushed to disk before it is acknowledged. What
    /// benchmarks measure.
    Full,
    /// No flushes (`fsync=off`): for tests that do not crash the machine, several times faster.
    Relaxed,
}

/// A running server; stopped (immediately) and its directory removed on drop.
pub struct Server {
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    user: Option<String>,
}

/// The directory of Debian's PostgreSQL binaries, newest version first, or where `PG_BIN`
/// says.
pub fn bin_dir() -> io::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            "no PostgreSQL server binaries in /usr/lib/postgresql/*/bin (apt-get install postgresql, or set PG_BIN)",
        )
    })
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0)
        .unwrap_or(false)
}

impl Server {
    /// Creates a cluster with a superuser `mesh` (trusted on loopback) and starts it.
    pub fn start(durability: Durability) -> io::Result<Server> {
        let bin = bin_dir()?;
        let dir = std::env::temp_dir().join(format!(
            "mesh-pg-{}-{}",
            std::process::id(),
            super::free_port()?
        ));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        let user = is_root().then(|| "postgres".to_owned());
        if user.is_some() {
            let status = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(&dir)
                .status()?;
            if !status.success() {
                return Err(io::Error::other(format!(
                    "chown postgres {}",
                    dir.display()
                )));
            }
        }
        let mut server = Server {
            port: 0,
            dir,
            bin,
            user,
        };
        let data = server.dir.join("data");
        server.run(
            "initdb",
            &[
                "-D",
                path(&data),
                "-U",
                "mesh",
                "--auth=trust",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
        )?;
        let mut options = String::from(
            "-c listen_addresses=127.0.0.1 -c unix_socket_directories='' -c max_connections=200",
        );
        if durability == Durability::Relaxed {
            options.push_str(" -c fsync=off -c synchronous_commit=off -c full_page_writes=off");
        }
        // A port taken between finding it and binding it fails the start: try another.
        let mut last = None;
        for _ in 0..3 {
            server.port = super::free_port()?;
            let opts = format!("{options} -p {}", server.port);
            let log = server.dir.join("server.log");
            match server.run(
                "pg_ctl",
                &[
                    "-D",
                    path(&data),
                    "-l",
                    path(&log),
                    "-o",
                    &opts,
                    "-w",
                    "-t",
                    "30",
                    "start",
                ],
            ) {
                Ok(_) => return Ok(server),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| io::Error::other("pg_ctl start")))
    }

    /// The URL of database `db` (`postgres` exists from the start).
    pub fn url(&self, db: &str) -> String {
        format!("postgres://mesh@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates database `db`.
    pub fn create_db(&self, db: &str) -> io::Result<()> {
        let port = self.port.to_string();
        self.run(
            "createdb",
            &["-h", "127.0.0.1", "-p", &port, "-U", "mesh", db],
        )
        .map(drop)
    }

    /// Runs one of the server's programs (as `postgres` when root), failing with its output.
    fn run(&self, program: &str, args: &[&str]) -> io::Result<Output> {
        let exe = self.bin.join(program);
        let mut cmd = match &self.user {
            Some(user) => {
                let mut c = Command::new("runuser");
                c.args(["-u", user, "--"]).arg(&exe);
                c
            }
            None => Command::new(&exe),
        };
        let out = cmd.args(args).current_dir(&self.dir).output()?;
        if out.status.success() {
            return Ok(out);
        }
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        Err(io::Error::other(format!(
            "{program} failed ({}): {}{}\n{log}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.port != 0 {
            let data = self.dir.join("data");
            let _ = self.run(
                "pg_ctl",
                &["-D", path(&data), "-m", "immediate", "-w", "stop"],
            );
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_server_starts_takes_a_database_and_is_gone_when_dropped() {
        let server = Server::start(Durability::Relaxed).unwrap();
        server.create_db("one").unwrap();
        let err = server.create_db("one").unwrap_err().to_string();
        assert!(err.contains("already exists"), "{err}");
        let (port, dir) = (server.port, server.dir.clone());
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_ok());
        drop(server);
        assert!(std::net::TcpStream::connect(("127.0.0.1", port)).is_err());
        assert!(!dir.exists());
    }
}
