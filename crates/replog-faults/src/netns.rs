//! Network namespaces for a cluster under test: one namespace per replica,
//! each with a veth pair whose host end is enslaved to one bridge in the
//! root namespace. The bridge holds `10.199.<subnet>.1/24` (the test
//! client talks to the replicas through it); replica `i` is at
//! `10.199.<subnet>.<10 + i>`.
//!
//! Invariants:
//! - every name starts with [`PREFIX`] followed by the owning process id, so
//!   leftovers of a crashed run are recognised (their process is gone) and
//!   removed by the next [`Network::create`];
//! - subnets are allocated under an exclusive `flock` on [`LOCK_FILE`], so
//!   test binaries running in parallel never share one;
//! - [`Network`]'s `Drop` kills every process left in its namespaces and
//!   removes the namespaces (their veths go with them) and the bridge, also
//!   when the test fails.

use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use tracing::{debug, warn};

/// Prefix of every bridge, veth and namespace this module creates.
pub const PREFIX: &str = "rpf";
/// Serialises subnet allocation and stale cleanup between processes.
pub const LOCK_FILE: &str = "/run/replog-faults.lock";

/// What setting up or changing the namespaces can fail with.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(
        "fault campaigns need root (CAP_NET_ADMIN) to create network namespaces; running as uid {0}"
    )]
    NotRoot(u32),
    #[error("`{command}` failed ({status}): {stderr}")]
    Command {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("cannot run `{command}`: {source} (is iproute2/iptables installed? tools/setup.sh installs iptables)")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("no free 10.199.N.0/24 subnet: 254 in use")]
    NoSubnet,
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs `program args`, failing with its stderr when it exits non-zero.
pub fn run(program: &str, args: &[&str]) -> Result<Output, NetError> {
    let command = format!("{program} {}", args.join(" "));
    debug!(%command, "run");
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

/// Checks that this process can create namespaces and has `ip` and
/// `iptables`; a clear error otherwise (tests fail with it, never skip).
pub fn preflight() -> Result<(), NetError> {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    if uid != 0 {
        return Err(NetError::NotRoot(uid));
    }
    run("ip", &["netns", "list"])?;
    run("iptables", &["--version"])?;
    Ok(())
}

/// An exclusive advisory lock on [`LOCK_FILE`], released on drop.
struct Lock(File);

impl Lock {
    fn take() -> Result<Lock, NetError> {
        let f = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_FILE)?;
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(Lock(f))
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // SAFETY: as above; closing the file would release it too.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

/// The process id a name of ours carries (`rpf<pid><letter>...`).
fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    digits.parse().ok()
}

fn process_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

fn namespaces() -> Result<Vec<String>, NetError> {
    let out = run("ip", &["netns", "list"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_string)
        .collect())
}

fn links() -> Result<Vec<String>, NetError> {
    let out = run("ip", &["-o", "link", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or("").to_string())
        .collect())
}

/// SIGKILLs every process in namespace `ns` and deletes it.
fn remove_namespace(ns: &str) {
    if let Ok(out) = run("ip", &["netns", "pids", ns]) {
        for pid in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = pid.parse::<i32>() {
                // SAFETY: kill has no memory preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
    if let Err(e) = run("ip", &["netns", "delete", ns]) {
        warn!(%ns, error = %e, "cannot delete a network namespace");
    }
}

/// Removes namespaces and links of ours whose process is gone.
fn remove_stale() -> Result<(), NetError> {
    for ns in namespaces()? {
        if owner_pid(&ns).is_some_and(|pid| !process_alive(pid)) {
            warn!(%ns, "removing a network namespace left by a crashed run");
            remove_namespace(&ns);
        }
    }
    for link in links()? {
        if owner_pid(&link).is_some_and(|pid| !process_alive(pid)) {
            warn!(%link, "removing a link left by a crashed run");
            let _ = run("ip", &["link", "delete", &link]);
        }
    }
    Ok(())
}

/// Third octets of the 10.199.N.0/24 subnets our bridges hold now.
fn subnets_in_use() -> Result<Vec<u8>, NetError> {
    let out = run("ip", &["-o", "-4", "addr", "show"])?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let addr = l.split_whitespace().skip_while(|w| *w != "inet").nth(1)?;
            let ip: Ipv4Addr = addr.split('/').next()?.parse().ok()?;
            let o = ip.octets();
            (o[0] == 10 && o[1] == 199).then_some(o[2])
        })
        .collect())
}

/// The namespaces, veths and bridge of one cluster. See the module docs.
#[derive(Debug)]
pub struct Network {
    tag: String,
    subnet: u8,
    nodes: Vec<u64>,
}

impl Network {
    /// Creates a bridge and one namespace per id in `nodes` (ids 1..=200).
    pub fn create(nodes: &[u64]) -> Result<Network, NetError> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        preflight()?;
        let k = NEXT.fetch_add(1, Ordering::SeqCst);
        let tag = format!(
            "{PREFIX}{}{}",
            std::process::id(),
            char::from(b'a' + (k % 26) as u8)
        );
        let _lock = Lock::take()?;
        remove_stale()?;
        let used = subnets_in_use()?;
        let subnet = (1..=254u8)
            .find(|n| !used.contains(n))
            .ok_or(NetError::NoSubnet)?;
        // From here on, Drop removes whatever was made.
        let mut net = Network {
            tag,
            subnet,
            nodes: Vec::new(),
        };
        let bridge = net.bridge();
        run("ip", &["link", "add", &bridge, "type", "bridge"])?;
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", net.host_addr()),
                "dev",
                &bridge,
            ],
        )?;
        run("ip", &["link", "set", &bridge, "up"])?;
        for &id in nodes {
            assert!((1..=200).contains(&id), "replica ids are 1..=200");
            net.nodes.push(id);
            net.add_node(id)?;
        }
        Ok(net)
    }

    fn add_node(&self, id: u64) -> Result<(), NetError> {
        let ns = self.namespace(id);
        let host = format!("{}h{id}", self.tag);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &host, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &host, "master", &self.bridge(), "up"],
        )?;
        let addr = format!("{}/24", self.node_addr(id));
        self.exec(id, "ip", &["addr", "add", &addr, "dev", "eth0"])?;
        self.exec(id, "ip", &["link", "set", "eth0", "up"])?;
        self.exec(id, "ip", &["link", "set", "lo", "up"])?;
        Ok(())
    }

    /// The bridge's name.
    pub fn bridge(&self) -> String {
        format!("{}b", self.tag)
    }

    /// The namespace of replica `id`.
    pub fn namespace(&self, id: u64) -> String {
        format!("{}n{id}", self.tag)
    }

    /// The replica ids this network has a namespace for.
    pub fn nodes(&self) -> &[u64] {
        &self.nodes
    }

    /// The root namespace's address on the bridge.
    pub fn host_addr(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, 1)
    }

    /// Replica `id`'s address.
    pub fn node_addr(&self, id: u64) -> Ipv4Addr {
        Ipv4Addr::new(10, 199, self.subnet, 10 + id as u8)
    }

    /// Runs `program args` inside replica `id`'s namespace.
    pub fn exec(&self, id: u64, program: &str, args: &[&str]) -> Result<Output, NetError> {
        let ns = self.namespace(id);
        let mut all = vec!["netns", "exec", &ns, program];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// A command that runs `program` inside replica `id`'s namespace
    /// (`ip netns exec` execs it: the child's pid is the program's).
    pub fn command(&self, id: u64, program: &std::path::Path) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace(id)])
            .arg(program);
        cmd
    }

    /// Runs `iptables -w ARGS` inside replica `id`'s namespace.
    pub fn iptables(&self, id: u64, args: &[&str]) -> Result<Output, NetError> {
        let mut all = vec!["-w"];
        all.extend_from_slice(args);
        self.exec(id, "iptables", &all)
    }
}

impl Drop for Network {
    fn drop(&mut self) {
        for &id in &self.nodes {
            remove_namespace(&self.namespace(id));
        }
        if let Err(e) = run("ip", &["link", "delete", &self.bridge()]) {
            warn!(bridge = %self.bridge(), error = %e, "cannot delete the bridge");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pid_reads_our_names_only() {
        assert_eq!(owner_pid("rpf1234an3"), Some(1234));
        assert_eq!(owner_pid("rpf99bh1"), Some(99));
        assert_eq!(owner_pid("rpfxb"), None);
        assert_eq!(owner_pid("eth0"), None);
    }
}
