//! The namespaces themselves: a listener inside a replica's namespace is
//! reached from the root namespace through the bridge and from another
//! replica's namespace, and dropping the network removes every namespace,
//! veth and the bridge. Needs root (fails, never skips, without it).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::time::Duration;

use replog_faults::netns::{self, Network};

/// Runs `f` on a thread inside namespace `ns` and returns its result.
fn in_namespace<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}")).unwrap();
    std::thread::spawn(move || {
        // SAFETY: setns on an open namespace file; affects this thread only.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .unwrap()
}

fn exchange(to: SocketAddr) -> String {
    let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(2)).expect("connect");
    s.write_all(b"ping").unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).unwrap();
    buf
}

#[test]
fn namespaces_connect_through_the_bridge_and_are_removed_on_drop() {
    netns::preflight().expect("this test needs root and a working `ip netns`");
    let net = Network::create(&[1, 2]).expect("two namespaces");
    let addr: SocketAddr = (net.node_addr(2), 7100).into();
    let listener = in_namespace(&net.namespace(2), move || TcpListener::bind(addr).unwrap());
    let server = std::thread::spawn(move || {
        for _ in 0..2 {
            let (mut c, peer) = listener.accept().unwrap();
            let mut buf = [0u8; 4];
            c.read_exact(&mut buf).unwrap();
            c.write_all(format!("pong to {}", peer.ip()).as_bytes())
                .unwrap();
        }
    });
    assert_eq!(exchange(addr), format!("pong to {}", net.host_addr()));
    let from_1 = in_namespace(&net.namespace(1), move || exchange(addr));
    assert_eq!(from_1, format!("pong to {}", net.node_addr(1)));
    server.join().unwrap();

    let names = [net.namespace(1), net.namespace(2), net.bridge()];
    drop(net);
    let namespaces = netns::run("ip", &["netns", "list"]).unwrap();
    let links = netns::run("ip", &["-o", "link", "show"]).unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&namespaces.stdout),
        String::from_utf8_lossy(&links.stdout)
    );
    for n in names {
        assert!(!all.contains(&n), "{n} is still there after drop");
    }
}
