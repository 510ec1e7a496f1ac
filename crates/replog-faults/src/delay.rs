//! Network delay without netem (this kernel has no `sch_netem`): a
//! userspace TCP proxy in every replica namespace, put on the path of the
//! delayed links with iptables.
//!
//! For a delayed link from namespace X to replica Y, X's nat OUTPUT chain
//! [`NAT_CHAIN`] redirects new connections to `Y:PORT` to X's proxy on
//! `127.0.0.1:`[`PROXY_PORT`]; a filter rule (in the nemesis chain, flushed
//! at heal) resets the direct connections that were open before, so the
//! replicas reconnect through the proxy. The proxy reads the original
//! destination (`SO_ORIGINAL_DST`), connects to it with [`MARK`] on its
//! socket (exempt from both rules) and forwards each direction's bytes
//! after the link's delay, keeping their order. Delays are looked up per
//! chunk, so clearing them takes effect at once for open connections too.
//!
//! Each proxy runs on its own thread that entered the namespace with
//! `setns` (sockets belong to the namespace of the thread that creates
//! them), with a current-thread tokio runtime. Queues are bounded (a full
//! one stops reading: TCP back-pressure). Dropping [`DelayProxy`] stops the
//! threads.

use std::collections::HashMap;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
use tracing::{debug, warn};

use crate::cluster::{Cluster, ClusterError, PORT};
use crate::nemesis::CHAIN;

/// The nat chain of the redirections, in every replica namespace.
pub const NAT_CHAIN: &str = "REPLOG_FAULTS_NAT";
/// Where each namespace's proxy listens (on its loopback).
pub const PROXY_PORT: u16 = 7199;
/// The firewall mark of the proxy's own outgoing connections.
pub const MARK: u32 = 0x52;
/// Chunks in flight per direction of one proxied connection.
const QUEUE_CHUNKS: usize = 256;
const CHUNK_BYTES: usize = 64 * 1024;

/// Delay in ms per destination address, of one namespace's proxy.
type Delays = Arc<Mutex<HashMap<Ipv4Addr, u64>>>;

/// The proxies of every namespace of a cluster; see the module docs.
pub struct DelayProxy {
    cluster: Arc<Cluster>,
    delays: HashMap<u64, Delays>,
    stop: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
}

impl DelayProxy {
    /// Starts a proxy in every replica namespace and creates the nat chain.
    pub fn start(cluster: Arc<Cluster>) -> Result<DelayProxy, ClusterError> {
        let (stop, stopped) = watch::channel(false);
        let mut delays = HashMap::new();
        let mut threads = Vec::new();
        for id in cluster.ids() {
            let net = cluster.net();
            net.iptables(id, &["-t", "nat", "-N", NAT_CHAIN])?;
            net.iptables(id, &["-t", "nat", "-I", "OUTPUT", "-j", NAT_CHAIN])?;
            let d: Delays = Arc::default();
            delays.insert(id, d.clone());
            let ns = File::open(format!("/var/run/netns/{}", net.namespace(id)))?;
            let (ready_tx, ready_rx) = std::sync::mpsc::channel();
            let stopped = stopped.clone();
            threads.push(
                std::thread::Builder::new()
                    .name(format!("delay-proxy-{id}"))
                    .spawn(move || proxy_thread(ns, d, stopped, ready_tx))?,
            );
            ready_rx
                .recv()
                .map_err(|_| std::io::Error::other("the proxy thread died"))?
                .map_err(std::io::Error::other)?;
        }
        Ok(DelayProxy {
            cluster,
            delays,
            stop,
            threads,
        })
    }

    /// Delays every peer connection of replica `r`, both ways, by `delay`
    /// each way.
    pub fn delay_replica(&self, r: u64, delay: Duration) -> Result<(), ClusterError> {
        let ms = delay.as_millis() as u64;
        for x in self.cluster.ids().into_iter().filter(|x| *x != r) {
            self.delay_link(r, x, ms)?;
            self.delay_link(x, r, ms)?;
        }
        Ok(())
    }

    /// Routes connections from namespace `from` to replica `to` through
    /// `from`'s proxy with `ms` of delay.
    fn delay_link(&self, from: u64, to: u64, ms: u64) -> Result<(), ClusterError> {
        let net = self.cluster.net();
        let addr = net.node_addr(to);
        self.delays[&from].lock().unwrap().insert(addr, ms);
        let (a, port, mark, proxy) = (
            addr.to_string(),
            PORT.to_string(),
            format!("{MARK:#x}"),
            PROXY_PORT.to_string(),
        );
        net.iptables(
            from,
            &[
                "-t",
                "nat",
                "-A",
                NAT_CHAIN,
                "-p",
                "tcp",
                "-d",
                &a,
                "--dport",
                &port,
                "-m",
                "mark",
                "!",
                "--mark",
                &mark,
                "-j",
                "REDIRECT",
                "--to-ports",
                &proxy,
            ],
        )?;
        net.iptables(
            from,
            &[
                "-A",
                CHAIN,
                "-p",
                "tcp",
                "-d",
                &a,
                "--dport",
                &port,
                "-m",
                "mark",
                "!",
                "--mark",
                &mark,
                "-j",
                "REJECT",
                "--reject-with",
                "tcp-reset",
            ],
        )?;
        Ok(())
    }

    /// Ends every delay: no more redirections, zero delay on the open
    /// proxied connections. (The nemesis flushes the reset rules.)
    pub fn clear(&self) -> Result<(), ClusterError> {
        for (id, d) in &self.delays {
            d.lock().unwrap().clear();
            self.cluster
                .net()
                .iptables(*id, &["-t", "nat", "-F", NAT_CHAIN])?;
        }
        Ok(())
    }
}

impl Drop for DelayProxy {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Enters the namespace `ns`, listens, reports readiness, proxies until
/// stopped.
fn proxy_thread(
    ns: File,
    delays: Delays,
    mut stopped: watch::Receiver<bool>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    // SAFETY: setns on a namespace file we hold open; it only affects
    // this thread.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let _ = ready.send(Err(format!("setns: {}", std::io::Error::last_os_error())));
        return;
    }
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(format!("runtime: {e}")));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::bind((Ipv4Addr::LOCALHOST, PROXY_PORT)).await {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(format!("bind 127.0.0.1:{PROXY_PORT}: {e}")));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                _ = stopped.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        tokio::spawn(proxy_connection(stream, delays.clone()));
                    }
                    Err(e) => warn!(error = %e, "delay proxy accept"),
                },
            }
        }
    });
}

/// The destination a REDIRECTed connection was meant for.
fn original_dst(stream: &TcpStream) -> std::io::Result<SocketAddrV4> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    // SAFETY: a zeroed sockaddr_in is valid; getsockopt writes at most
    // `len` bytes into it.
    let mut addr: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let rc = unsafe {
        libc::getsockopt(
            stream.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            (&mut addr as *mut libc::sockaddr_in).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(SocketAddrV4::new(
        Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr)),
        u16::from_be(addr.sin_port),
    ))
}

async fn proxy_connection(inbound: TcpStream, delays: Delays) {
    let dst = match original_dst(&inbound) {
        Ok(d) => d,
        Err(e) => {
            warn!(error = %e, "delay proxy: no original destination");
            return;
        }
    };
    let outbound = match connect_marked(dst).await {
        Ok(s) => s,
        Err(e) => {
            debug!(%dst, error = %e, "delay proxy: cannot connect");
            return;
        }
    };
    let _ = inbound.set_nodelay(true);
    let _ = outbound.set_nodelay(true);
    let (ri, wi) = inbound.into_split();
    let (ro, wo) = outbound.into_split();
    let ip = *dst.ip();
    tokio::spawn(pump(ri, wo, delays.clone(), ip));
    tokio::spawn(pump(ro, wi, delays, ip));
}

async fn connect_marked(dst: SocketAddrV4) -> std::io::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    let mark: libc::c_int = MARK as libc::c_int;
    // SAFETY: setsockopt with a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_MARK,
            (&mark as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    tokio::time::timeout(Duration::from_secs(2), sock.connect(SocketAddr::V4(dst)))
        .await
        .map_err(|_| std::io::Error::from(std::io::ErrorKind::TimedOut))?
}

/// Forwards `from` to `to`, each chunk after the delay of `link` as it is
/// when the chunk is read.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    delays: Delays,
    link: Ipv4Addr,
) {
    let (tx, mut rx) = mpsc::channel::<(tokio::time::Instant, Vec<u8>)>(QUEUE_CHUNKS);
    let writer = tokio::spawn(async move {
        while let Some((due, chunk)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            if to.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = to.shutdown().await;
    });
    let mut buf = vec![0u8; CHUNK_BYTES];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let ms = delays.lock().unwrap().get(&link).copied().unwrap_or(0);
        let due = tokio::time::Instant::now() + Duration::from_millis(ms);
        if tx.send((due, buf[..n].to_vec())).await.is_err() {
            break;
        }
    }
    drop(tx);
    let _ = writer.await;
}
