//! Handshakes in flight: the kernel counts every connect from a node to a backend from
//! its SYN until it establishes or fails (`hl_pending`), which is what a drain waits
//! on besides open connections. Run as root.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Stdio;
use std::time::{Duration, Instant};

use hitless_agent::abi::{Endpoint, PROTO_TCP};
use hitless_agent::writer::Maps;
use hitless_tests::{Node, Proc};

/// A listener (close-on-exec: the clients this test spawns must not hold it open) with an accept queue of one that accepts nothing until asked: the second
/// SYN to it is dropped (ListenOverflows) and retransmitted a second later, as under
/// overload.
fn tiny_listener(addr: std::net::SocketAddrV4) -> OwnedFd {
    // SAFETY: plain socket calls on a descriptor this function owns; the sockaddr is
    // built in full before use.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        assert!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
        let fd = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
        let sa = libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: addr.port().to_be(),
            sin_addr: libc::in_addr { s_addr: u32::from_ne_bytes(addr.ip().octets()) },
            sin_zero: [0; 8],
        };
        let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        assert_eq!(libc::bind(fd.as_raw_fd(), (&sa as *const libc::sockaddr_in).cast(), len), 0, "bind {addr}");
        assert_eq!(libc::listen(fd.as_raw_fd(), 0), 0, "listen");
        fd
    }
}

fn accept_one(l: &OwnedFd) -> OwnedFd {
    // SAFETY: accept on a listening socket this test owns; the result is checked.
    let fd = unsafe { libc::accept4(l.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC) };
    assert!(fd >= 0, "accept: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor from accept, owned from here on.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn wait_for(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let end = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < end, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn a_dropped_syn_counts_in_flight_until_it_establishes() {
    let mut node = Node::new("hs");
    let backend = "127.136.0.1:8080";
    let listener = tiny_listener(backend.parse().expect("addr"));
    node.write_registry(&format!(
        "services:\n  - name: cart\n    vips: [\"127.77.71.1:8080\"]\n    backends: [{{ address: \"{backend}\" }}]\n"
    ));
    node.start_agent();
    let maps = Maps::open(&node.pin_dir).expect("pinned maps");
    let ep = Endpoint::new(backend.parse().expect("addr"), PROTO_TCP);
    let in_flight = || maps.handshakes_in_flight(&ep);
    let stats = || maps.backend_stats(&ep).map_or((0, 0), |s| (s.connects, s.failed));
    assert_eq!(in_flight(), 0);
    let before = stats();

    // Two clients on the node dial the VIP: the first fills the accept queue, the
    // second's SYN is dropped and stays in flight until it is retransmitted.
    let dial = || {
        Proc::new(
            node.cgroup
                .command("timeout")
                .args(["10", "bash", "-c", "exec 3<>/dev/tcp/127.77.71.1/8080 && sleep 3"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("bash"),
        )
    };
    let _first = dial();
    wait_for("the first connect established", Duration::from_secs(5), || stats().0 == before.0 + 1);
    let _second = dial();
    wait_for("the second connect counted in flight", Duration::from_secs(5), || in_flight() == 1);
    // Still in flight while its SYN waits for the retransmission (1 s).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(in_flight(), 1, "a connect in its handshake must stay counted");
    assert_eq!(stats().0, before.0 + 1, "the second connect has not established yet");

    // Room in the queue: the retransmitted SYN gets through and the count returns to 0.
    let _a = accept_one(&listener);
    wait_for("the second connect established", Duration::from_secs(5), || stats().0 == before.0 + 2);
    assert_eq!(in_flight(), 0, "an established connect is no longer in flight");
    let _b = accept_one(&listener);

    // A connect that fails (nothing listens any more) is counted and then uncounted.
    drop((_a, _b, listener));
    let failed = node
        .cgroup
        .command("timeout")
        .args(["5", "bash", "-c", "exec 3<>/dev/tcp/127.77.71.1/8080"])
        .stderr(Stdio::null())
        .status()
        .expect("bash");
    assert!(!failed.success(), "nothing listens: the connect must fail");
    assert_eq!(stats().1, before.1 + 1, "one failed connect");
    assert_eq!(in_flight(), 0, "a failed connect is no longer in flight");
}
