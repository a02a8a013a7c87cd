//! Network namespaces for partition tests (root only). Each namespace is joined to the host
//! by a veth pair and routes everything through it; the coordinator listens on an address
//! of the host's `lo` ([`HostAddress`]), which every namespace reaches through its own link.
//! Cutting a namespace (its host end set down) makes packets vanish without resetting any
//! connection, as a real partition does. Everything is removed on drop.
//!
//! One process takes one free `10.A.B.0/24` (checked against the host's addresses):
//! namespace `i` gets `10.A.B.4i+1` (host end) and `.4i+2` (inside), the coordinator
//! `10.A.B.254`.

use std::process::Command;
use std::sync::OnceLock;

/// Runs `ip ARGS`; the error names the command and what it printed.
pub fn ip(args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// This process's `10.A.B` block: the first, from one derived from the pid, that no host
/// address uses.
fn block() -> Result<&'static str, String> {
    static BLOCK: OnceLock<Result<String, String>> = OnceLock::new();
    BLOCK
        .get_or_init(|| {
            let used = ip(&["-o", "-4", "addr", "show"])?;
            let start = std::process::id() as usize;
            (0..50 * 256)
                .map(|k| {
                    let n = (start + k) % (50 * 256);
                    format!("10.{}.{}", 200 + n / 256, n % 256)
                })
                .find(|b| !used.contains(&format!(" {b}.")))
                .ok_or_else(|| "no free 10.x.y.0/24 on this host".to_owned())
        })
        .as_deref()
        .map_err(Clone::clone)
}

/// An address on the host's `lo` that every [`Netns`] of this process reaches.
pub struct HostAddress {
    pub ip: String,
}

impl HostAddress {
    pub fn create() -> Result<HostAddress, String> {
        let ip = format!("{}.254", block()?);
        self::ip(&["addr", "add", &format!("{ip}/32"), "dev", "lo"])?;
        Ok(HostAddress { ip })
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = ip(&["addr", "del", &format!("{}/32", self.ip), "dev", "lo"]);
    }
}

/// A network namespace and its veth pair.
pub struct Netns {
    pub name: String,
    host_if: String,
    /// The host end's address, the namespace's gateway.
    pub host_ip: String,
}

impl Netns {
    /// Namespace `index` (0..63) of this process.
    pub fn create(index: u32) -> Result<Netns, String> {
        assert!(index < 63, "at most 63 namespaces per test process");
        let block = block()?;
        let pid = std::process::id();
        let ns = Netns {
            name: format!("mesh-{pid}-{index}"),
            host_if: format!("mh{}x{index}", pid % 1_000_000),
            host_ip: format!("{block}.{}", 4 * index + 1),
        };
        let node_ip = format!("{block}.{}", 4 * index + 2);
        let inner = format!("mn{}x{index}", pid % 1_000_000);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
        ])?;
        ip(&["link", "set", &inner, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        let inside = |args: &[&str]| {
            let mut all = vec!["netns", "exec", &ns.name, "ip"];
            all.extend_from_slice(args);
            ip(&all)
        };
        inside(&["addr", "add", &format!("{node_ip}/30"), "dev", &inner])?;
        inside(&["link", "set", &inner, "up"])?;
        inside(&["link", "set", "lo", "up"])?;
        inside(&["route", "add", "default", "via", &ns.host_ip])?;
        Ok(ns)
    }

    /// Cuts the namespace off: packets both ways vanish.
    pub fn cut(&self) {
        ip(&["link", "set", &self.host_if, "down"]).expect("cut the link");
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.host_if, "up"]).expect("heal the link");
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
