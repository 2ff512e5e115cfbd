//! A network namespace of the test's own, joined to the host by a veth
//! pair, for faults that cross a network: a process started in it reaches
//! the host (and is reached) only through that pair, and iptables rules
//! inside the namespace cut it off from one peer while the others go on.
//! Nothing here touches the host's own firewall; dropping the namespace
//! removes the pair and every rule with it.

use anyhow::{Context, Result, bail};
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

static NEXT: AtomicU32 = AtomicU32::new(0);

pub struct NetNs {
    pub name: String,
    /// The host's end of the pair.
    pub host_ip: Ipv4Addr,
    /// The namespace's end: where its processes listen.
    pub ns_ip: Ipv4Addr,
}

fn run(args: &[&str]) -> Result<()> {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .with_context(|| format!("cannot run {}", args[0]))?;
    if !out.status.success() {
        bail!(
            "{} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

impl NetNs {
    /// A new namespace with its own /30 in 10.231.0.0/16 (by process and
    /// a counter, so parallel tests never share one).
    pub fn create() -> Result<Self> {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        anyhow::ensure!(k < 64, "at most 64 namespaces per test process");
        let pid = std::process::id() % 100_000;
        let name = format!("hc{pid}n{k}");
        // 256 /30 blocks per third octet; the third octet from the pid.
        let third = (pid % 250) as u8;
        let base = (k * 4) as u8;
        let host_ip = Ipv4Addr::new(10, 231, third, base + 1);
        let ns_ip = Ipv4Addr::new(10, 231, third, base + 2);
        let (vh, vn) = (format!("hc{pid}h{k}"), format!("hc{pid}v{k}"));
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        run(&["ip", "netns", "add", &name])?;
        let ns = Self {
            name,
            host_ip,
            ns_ip,
        };
        let inside = |args: &[&str]| {
            let mut full = vec!["ip", "netns", "exec", ns.name.as_str()];
            full.extend_from_slice(args);
            run(&full)
        };
        run(&[
            "ip", "link", "add", &vh, "type", "veth", "peer", "name", &vn,
        ])?;
        run(&["ip", "link", "set", &vn, "netns", &ns.name])?;
        run(&["ip", "addr", "add", &format!("{host_ip}/30"), "dev", &vh])?;
        run(&["ip", "link", "set", &vh, "up"])?;
        inside(&["ip", "addr", "add", &format!("{ns_ip}/30"), "dev", &vn])?;
        inside(&["ip", "link", "set", &vn, "up"])?;
        inside(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// `program` to be run inside the namespace.
    pub fn command(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    fn iptables(&self, rule: &[&str]) -> Result<()> {
        let mut full = vec!["ip", "netns", "exec", self.name.as_str(), "iptables"];
        full.extend_from_slice(rule);
        run(&full)
    }

    /// Silently drops this namespace's TCP to `port` on the host (packets
    /// vanish: connections hang rather than fail, as on a real partition).
    pub fn cut_to_host(&self, port: u16) -> Result<()> {
        let (ip, port) = (self.host_ip.to_string(), port.to_string());
        self.iptables(&[
            "-A", "OUTPUT", "-p", "tcp", "-d", &ip, "--dport", &port, "-j", "DROP",
        ])?;
        self.iptables(&[
            "-A", "INPUT", "-p", "tcp", "-s", &ip, "--sport", &port, "-j", "DROP",
        ])
    }

    /// Silently drops all TCP to and from `port` inside the namespace (its
    /// server on that port is cut off from every client).
    pub fn cut_port(&self, port: u16) -> Result<()> {
        let port = port.to_string();
        self.iptables(&["-A", "INPUT", "-p", "tcp", "--dport", &port, "-j", "DROP"])?;
        self.iptables(&["-A", "OUTPUT", "-p", "tcp", "--sport", &port, "-j", "DROP"])
    }

    /// Silently drops everything in and out of the namespace but its own
    /// loopback: whatever runs in it is cut off from the world.
    pub fn cut_all(&self) -> Result<()> {
        self.iptables(&["-A", "INPUT", "!", "-i", "lo", "-j", "DROP"])?;
        self.iptables(&["-A", "OUTPUT", "!", "-o", "lo", "-j", "DROP"])
    }

    /// Removes every cut.
    pub fn heal(&self) -> Result<()> {
        self.iptables(&["-F", "INPUT"])?;
        self.iptables(&["-F", "OUTPUT"])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Its veth pair goes with it.
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}
