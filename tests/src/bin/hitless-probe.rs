//! `hitless-probe`: the servers and clients the kernel and end-to-end tests run
//! inside node cgroups. Every loop is bounded in count and time.
//!
//! - `serve --tcp ADDR.. --udp ADDR..`: each accepted TCP connection gets the
//!   listening address and a newline, then an echo of what it sends until EOF; each
//!   UDP datagram is answered with the listening address. Prints `ready`.
//! - `connect ADDR --count N [--udp]`: N connects (or datagrams); prints a JSON
//!   summary: successes, failures by error, which backend answered, which peer
//!   address the socket reported.
//! - `loop ADDR --stop-file F --max-secs S`: like connect, until F exists.
//! - `hold ADDR --count K`: opens K connections, prints `held`, keeps them until
//!   stdin closes, checks each still echoes, closes them, prints a JSON summary.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use serde::Serialize;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    Serve {
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        #[arg(long)]
        udp: Vec<SocketAddr>,
    },
    Connect {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        #[arg(long)]
        udp: bool,
    },
    Loop {
        addr: SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
    },
    Hold {
        addr: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// The server speaks HTTP: hold keep-alive connections and check them with GETs.
        #[arg(long)]
        http: bool,
    },
    /// HTTP GETs (one connection each) until the stop file exists; prints a summary
    /// whose `backends` are the response bodies (version and address).
    HttpLoop {
        addr: SocketAddr,
        #[arg(long)]
        stop_file: PathBuf,
        #[arg(long, default_value_t = 120)]
        max_secs: u64,
        /// Pause between requests, in milliseconds (bounds the request rate).
        #[arg(long, default_value_t = 5)]
        pause_ms: u64,
    },
    /// Accepts and closes at once: the cheapest server, for connect-rate benchmarks.
    Sink {
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// Pin to this CPU (benchmarks: keep client and server apart).
        #[arg(long)]
        cpu: Option<usize>,
    },
    /// N connect+close as fast as possible; prints {"ok","failed","secs"}.
    Rate {
        addr: SocketAddr,
        #[arg(long, default_value_t = 10_000)]
        count: u32,
        /// Pin to this CPU.
        #[arg(long)]
        cpu: Option<usize>,
    },
}

/// What a client saw.
#[derive(Serialize, Default)]
struct Summary {
    ok: u64,
    failed: u64,
    /// Failures by error kind.
    errors: BTreeMap<String, u64>,
    /// Which backend answered (the address it reported).
    backends: BTreeMap<String, u64>,
    /// The peer address the socket reported (getpeername, or recvfrom's source).
    peers: BTreeMap<String, u64>,
    /// Slowest failure, in milliseconds: a refusal must be immediate, not a timeout.
    max_fail_ms: u64,
    /// Connects that timed out, by where their SYN went (the address the kernel's socket
    /// held once the datapath had chosen, read from /proc/net/tcp) and that address's
    /// listen queue: who dropped the SYNs.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    timed_out: BTreeMap<String, u64>,
    /// Connects that succeeded after a SYN retransmission, by peer: a full accept queue
    /// dropped the first SYN (load, not a failure).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    slow_connects: BTreeMap<String, u64>,
}

impl Summary {
    fn fail(&mut self, e: &std::io::Error, started: Instant) {
        self.failed += 1;
        if let Some(to) = e.get_ref().and_then(|inner| inner.downcast_ref::<TimedOutTo>()) {
            *self.timed_out.entry(to.0.clone()).or_default() += 1;
        }
        *self.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
        self.max_fail_ms = self.max_fail_ms.max(started.elapsed().as_millis() as u64);
    }
    fn hit(&mut self, backend: String, peer: SocketAddr, connect: Duration) {
        if connect >= RETRANSMITTED {
            *self.slow_connects.entry(peer.to_string()).or_default() += 1;
        }
        self.ok += 1;
        *self.backends.entry(backend).or_default() += 1;
        *self.peers.entry(peer.to_string()).or_default() += 1;
    }
}

/// A datagram's answer, and a benchmark's connect.
const TIMEOUT: Duration = Duration::from_secs(2);
/// A TCP client as patient as TCP: longer than the kernel's first three SYN
/// retransmissions (1, 3 and 7 s after the SYN), for the connect and then for the answer.
/// The instances the soak and the real-client suite start have a backlog of 5, so load
/// overflows their accept queues and SYNs to serving instances are dropped and sent again;
/// a client that gave up after 2 s failed a connect the kernel went on to establish (seen
/// in the soak: the timed-out socket was ESTABLISHED with a serving instance when read
/// back). A refusal or a reset, which is what a connect steered to a stopped instance
/// gets on loopback, still fails at once. Connects that needed a retransmission are
/// counted apart (`slow_connects`).
const PATIENCE: Duration = Duration::from_secs(8);
/// A connect slower than this needed a SYN retransmission (the first comes after 1 s).
const RETRANSMITTED: Duration = Duration::from_millis(900);

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { tcp, udp } => serve(&tcp, &udp),
        Cmd::Connect { addr, count, udp } => {
            let mut s = Summary::default();
            for _ in 0..count {
                if udp {
                    udp_once(addr, &mut s);
                } else {
                    tcp_once(addr, &mut s);
                }
            }
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Cmd::Loop { addr, stop_file, max_secs } => {
            let mut s = Summary::default();
            let end = Instant::now() + Duration::from_secs(max_secs);
            while !stop_file.exists() && Instant::now() < end {
                tcp_once(addr, &mut s);
            }
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Cmd::Hold { addr, count, http } => hold(addr, count, http),
        Cmd::HttpLoop { addr, stop_file, max_secs, pause_ms } => {
            let mut s = Summary::default();
            let end = Instant::now() + Duration::from_secs(max_secs);
            while !stop_file.exists() && Instant::now() < end {
                http_once(addr, &mut s);
                std::thread::sleep(Duration::from_millis(pause_ms));
            }
            println!("{}", serde_json::to_string(&s)?);
            Ok(())
        }
        Cmd::Sink { tcp, cpu } => {
            pin_cpu(cpu);
            sink(&tcp)
        }
        Cmd::Rate { addr, count, cpu } => {
            pin_cpu(cpu);
            rate(addr, count)
        }
    }
}

fn tcp_once(addr: SocketAddr, s: &mut Summary) {
    let started = Instant::now();
    let result = (|| {
        let mut c = connect(addr)?;
        let connected = started.elapsed();
        c.set_read_timeout(Some(PATIENCE))?;
        let peer = c.peer_addr()?;
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"));
        }
        // Abortive close: no TIME_WAIT pile-up across thousands of connects.
        set_linger_zero(&c);
        Ok((line.trim().to_owned(), peer, connected))
    })();
    match result {
        Ok((backend, peer, connected)) => s.hit(backend, peer, connected),
        Err(e) => s.fail(&e, started),
    }
}

fn udp_once(addr: SocketAddr, s: &mut Summary) {
    let started = Instant::now();
    let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("literal");
    let result = (|| {
        let sock = UdpSocket::bind(bind)?;
        sock.set_read_timeout(Some(TIMEOUT))?;
        sock.send_to(b"?", addr)?;
        let mut buf = [0u8; 128];
        let (n, from) = sock.recv_from(&mut buf)?;
        Ok((String::from_utf8_lossy(&buf[..n]).trim().to_owned(), from))
    })();
    match result {
        Ok((backend, peer)) => s.hit(backend, peer, Duration::ZERO),
        Err(e) => s.fail(&e, started),
    }
}

fn set_linger_zero(c: &TcpStream) {
    use std::os::fd::AsRawFd;
    let l = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setsockopt on a socket we own with a properly sized linger struct.
    unsafe {
        libc::setsockopt(
            c.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            std::ptr::addr_of!(l).cast(),
            std::mem::size_of::<libc::linger>() as u32,
        );
    }
}

fn serve(tcp: &[SocketAddr], udp: &[SocketAddr]) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr)?;
        let name = addr.to_string();
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming().flatten() {
                let name = name.clone();
                std::thread::spawn(move || echo(conn, &name));
            }
        }));
    }
    for addr in udp {
        let sock = UdpSocket::bind(addr)?;
        let name = addr.to_string();
        threads.push(std::thread::spawn(move || {
            let mut buf = [0u8; 512];
            while let Ok((_, from)) = sock.recv_from(&mut buf) {
                let _ = sock.send_to(name.as_bytes(), from);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn echo(mut conn: TcpStream, name: &str) {
    if conn.write_all(format!("{name}\n").as_bytes()).is_err() {
        return;
    }
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

#[derive(Serialize, Default)]
struct HoldSummary {
    opened: u64,
    still_working: u64,
    backends: BTreeMap<String, u64>,
}

/// One HTTP/1.1 keep-alive GET on an open connection; returns the body.
fn http_get(c: &mut TcpStream, r: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    c.write_all(b"GET / HTTP/1.1\r\nHost: hitless\r\n\r\n")?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("bad status {status:?}")));
    }
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(String::from_utf8_lossy(&body).trim().to_owned())
}

fn hold(addr: SocketAddr, count: u32, http: bool) -> anyhow::Result<()> {
    let mut conns = Vec::new();
    let mut sum = HoldSummary::default();
    for _ in 0..count {
        let mut c = connect(addr)?;
        c.set_read_timeout(Some(PATIENCE))?;
        let mut r = BufReader::new(c.try_clone()?);
        let who = if http {
            http_get(&mut c, &mut r)?
        } else {
            let mut line = String::new();
            r.read_line(&mut line)?;
            line.trim().to_owned()
        };
        *sum.backends.entry(who).or_default() += 1;
        conns.push((c, r));
        sum.opened += 1;
    }
    println!("held");
    std::io::stdout().flush()?;
    // Wait for the test to close our stdin (bounded by the test's own timeout).
    let mut sink = String::new();
    let _ = std::io::stdin().read_to_string(&mut sink);
    for (c, r) in &mut conns {
        let ok = if http {
            http_get(c, r).is_ok()
        } else {
            let mut line = String::new();
            c.write_all(b"still there?\n").is_ok() && r.read_line(&mut line).is_ok() && line == "still there?\n"
        };
        if ok {
            sum.still_working += 1;
        }
    }
    drop(conns);
    println!("{}", serde_json::to_string(&sum)?);
    Ok(())
}

fn sink(tcp: &[SocketAddr]) -> anyhow::Result<()> {
    let mut threads = Vec::new();
    for addr in tcp {
        let l = TcpListener::bind(addr)?;
        threads.push(std::thread::spawn(move || {
            for conn in l.incoming() {
                drop(conn);
            }
        }));
    }
    println!("ready");
    std::io::stdout().flush()?;
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

fn rate(addr: SocketAddr, count: u32) -> anyhow::Result<()> {
    let (mut ok, mut failed) = (0u64, 0u64);
    let started = Instant::now();
    for _ in 0..count {
        match TcpStream::connect_timeout(&addr, TIMEOUT) {
            Ok(c) => {
                set_linger_zero(&c);
                ok += 1;
            }
            Err(_) => failed += 1,
        }
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{}", serde_json::json!({ "ok": ok, "failed": failed, "secs": secs }));
    Ok(())
}

fn pin_cpu(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET and sched_setaffinity only touch it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

fn http_once(addr: SocketAddr, s: &mut Summary) {
    let started = Instant::now();
    let result = (|| {
        let mut c = connect(addr)?;
        let connected = started.elapsed();
        c.set_read_timeout(Some(PATIENCE))?;
        let peer = c.peer_addr()?;
        c.write_all(b"GET / HTTP/1.1\r\nHost: hitless\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        c.read_to_string(&mut text)?;
        let ok = text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200");
        if !ok {
            let first = text.lines().next().unwrap_or("").to_owned();
            return Err(std::io::Error::other(format!("bad response {first:?}")));
        }
        let body = text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned();
        Ok((body, peer, connected))
    })();
    match result {
        Ok((body, peer, connected)) => s.hit(body, peer, connected),
        Err(e) => s.fail(&e, started),
    }
}

/// Where a connect that timed out had sent its SYN, and what the kernel knew of that
/// address's listener at the time: "dest (state; listener: ...)".
#[derive(Debug)]
struct TimedOutTo(String);

impl std::fmt::Display for TimedOutTo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "connect timed out; SYN sent to {}", self.0)
    }
}

impl std::error::Error for TimedOutTo {}

/// `TcpStream::connect_timeout`, keeping the socket when the connect times out so that
/// the error can say where the datapath sent the SYN (a connect to a VIP or to a stale
/// address is rewritten inside connect(); only the socket knows the destination).
fn connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let sock = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None)?;
    match sock.connect_timeout(&addr.into(), PATIENCE) {
        Ok(()) => Ok(sock.into()),
        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
            let local = sock.local_addr().ok().and_then(|a| a.as_socket());
            let seen = local.and_then(syn_destination).unwrap_or_else(|| format!("? (local {local:?})"));
            Err(std::io::Error::new(std::io::ErrorKind::TimedOut, TimedOutTo(seen)))
        }
        Err(e) => Err(e),
    }
}

/// The remote address and state of the socket bound to `local` in /proc/net/tcp[6], and
/// the listen queue (current/max) of the listener at that remote address.
fn syn_destination(local: SocketAddr) -> Option<String> {
    let table = if local.is_ipv4() { "/proc/net/tcp" } else { "/proc/net/tcp6" };
    let text = std::fs::read_to_string(table).ok()?;
    let rows: Vec<Vec<&str>> = text.lines().skip(1).map(|l| l.split_whitespace().collect()).collect();
    let mine = rows.iter().find(|r| r.get(1).and_then(|a| proc_addr(a)) == Some(local))?;
    let remote = proc_addr(mine.get(2)?)?;
    // A listener's row: state 0A, rx_queue = its accept queue, the max is not shown
    // (ss shows it); the queue length is what tells a full backlog.
    let listener = rows
        .iter()
        .find(|r| r.get(3) == Some(&"0A") && r.get(1).and_then(|a| proc_addr(a)).is_some_and(|a| a == remote))
        .map_or_else(
            || "no listener".to_owned(),
            |r| {
                let rx = r.get(4).and_then(|q| q.split(':').nth(1)).and_then(|h| u64::from_str_radix(h, 16).ok());
                format!("listener accept queue {}", rx.map_or("?".to_owned(), |n| n.to_string()))
            },
        );
    Some(format!("{remote} (state {}; {listener})", mine.get(3).copied().unwrap_or("?")))
}

/// Parses /proc/net/tcp's "0100007F:1F90" (IPv4, host-order hex words) or the IPv6 form.
fn proc_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let words: Vec<u32> =
        (0..ip.len() / 8).map(|i| u32::from_str_radix(&ip[i * 8..i * 8 + 8], 16)).collect::<Result<_, _>>().ok()?;
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    match bytes.len() {
        4 => Some(SocketAddr::from(([bytes[0], bytes[1], bytes[2], bytes[3]], port))),
        16 => {
            let b: [u8; 16] = bytes.try_into().ok()?;
            Some(SocketAddr::from((std::net::Ipv6Addr::from(b), port)))
        }
        _ => None,
    }
}
