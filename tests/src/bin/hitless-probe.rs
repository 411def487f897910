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
}

impl Summary {
    fn fail(&mut self, e: &std::io::Error, started: Instant) {
        self.failed += 1;
        *self.errors.entry(format!("{:?}", e.kind())).or_default() += 1;
        self.max_fail_ms = self.max_fail_ms.max(started.elapsed().as_millis() as u64);
    }
    fn hit(&mut self, backend: String, peer: SocketAddr) {
        self.ok += 1;
        *self.backends.entry(backend).or_default() += 1;
        *self.peers.entry(peer.to_string()).or_default() += 1;
    }
}

const TIMEOUT: Duration = Duration::from_secs(2);

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
        let mut c = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT))?;
        let peer = c.peer_addr()?;
        let mut line = String::new();
        BufReader::new(&mut c).read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "no greeting"));
        }
        // Abortive close: no TIME_WAIT pile-up across thousands of connects.
        set_linger_zero(&c);
        Ok((line.trim().to_owned(), peer))
    })();
    match result {
        Ok((backend, peer)) => s.hit(backend, peer),
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
        Ok((backend, peer)) => s.hit(backend, peer),
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
        let mut c = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT))?;
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
        let mut c = TcpStream::connect_timeout(&addr, TIMEOUT)?;
        c.set_read_timeout(Some(TIMEOUT))?;
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
        Ok((body, peer))
    })();
    match result {
        Ok((body, peer)) => s.hit(body, peer),
        Err(e) => s.fail(&e, started),
    }
}
