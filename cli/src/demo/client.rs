//! `hitless demo-client` (hidden): the demo's load, one process per simulated node so
//! that it runs inside that node's cgroup. Threads send HTTP/1.1 requests, one new
//! connection each, either through the service's VIP or to instance addresses taken
//! from a cache of the registry that is refreshed every `--cache-refresh` (each
//! thread at its own phase, like a fleet of registry clients). Failures are not
//! retried: every failed request is counted.
//!
//! Every 250 ms it prints a [`Progress`] line (JSON, cumulative); it stops when its
//! standard input closes, so it never outlives the demo, even one killed by SIGKILL.

use std::collections::BTreeMap;
use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use serde::{Deserialize, Serialize};

/// `hitless demo-client`.
#[derive(Args)]
pub struct ClientArgs {
    /// Threads that dial the VIP.
    #[arg(long, default_value_t = 0)]
    vip_clients: u32,
    /// The VIP.
    #[arg(long, value_name = "ADDR")]
    vip: Option<SocketAddr>,
    /// Threads that dial instance addresses from their cached copy of the registry.
    #[arg(long, default_value_t = 0)]
    cache_clients: u32,
    /// The registry as the cache clients read it: one instance address per line.
    #[arg(long, value_name = "FILE")]
    registry_view: Option<PathBuf>,
    /// How often a cache client reads the registry again, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    cache_refresh_ms: u64,
    /// Pause between two requests of one thread, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 10)]
    pause_ms: u64,
}

/// What a client process saw so far (cumulative).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Progress {
    /// Requests answered with 200.
    pub ok: u64,
    /// Requests that failed (refused, reset, timed out, bad answer).
    pub failed: u64,
    /// Failures by kind.
    pub errors: BTreeMap<String, u64>,
    /// Requests a cache client sent to one instance's address that another instance
    /// answered: the kernel steered a stale connect.
    pub steered: u64,
    /// Answers by version.
    pub versions: BTreeMap<String, u64>,
    /// "VERSION ADDRESS" of an instance -> when (ms since the epoch) the last
    /// connection it answered was established.
    pub last_connect_ms: BTreeMap<String, u64>,
}

impl Progress {
    /// Adds another client's counts to these.
    pub fn merge(&mut self, other: &Progress) {
        self.ok += other.ok;
        self.failed += other.failed;
        self.steered += other.steered;
        for (k, v) in &other.errors {
            *self.errors.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.versions {
            *self.versions.entry(k.clone()).or_default() += v;
        }
        for (k, v) in &other.last_connect_ms {
            let e = self.last_connect_ms.entry(k.clone()).or_default();
            *e = (*e).max(*v);
        }
    }
}

/// Milliseconds since the epoch: the one clock the demo and its clients share.
pub fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Runs the client until standard input closes.
pub fn run(args: &ClientArgs) -> anyhow::Result<()> {
    if args.vip_clients > 0 && args.vip.is_none() {
        anyhow::bail!("--vip-clients needs --vip ADDR");
    }
    if args.cache_clients > 0 && args.registry_view.is_none() {
        anyhow::bail!("--cache-clients needs --registry-view FILE");
    }
    let stop = Arc::new(AtomicBool::new(false));
    let progress = Arc::new(Mutex::new(Progress::default()));
    let pause = Duration::from_millis(args.pause_ms);
    let refresh = Duration::from_millis(args.cache_refresh_ms.max(1));
    let mut threads = Vec::new();
    let vip_targets = args.vip.into_iter().cycle().take(args.vip_clients as usize);
    for vip in vip_targets {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        threads.push(std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                request(vip, false, &progress);
                std::thread::sleep(pause);
            }
        }));
    }
    for i in 0..args.cache_clients {
        let (stop, progress) = (Arc::clone(&stop), Arc::clone(&progress));
        let view = args.registry_view.clone().unwrap_or_default();
        // Spread the refresh phases over the period, as independent clients would be.
        let phase = refresh.mul_f64(f64::from(i) / f64::from(args.cache_clients) + jitter());
        threads.push(std::thread::spawn(move || cache_client(&view, refresh, phase, pause, &stop, &progress)));
    }

    // Stop when the demo closes our stdin (or goes away).
    let stopper = Arc::clone(&stop);
    std::thread::spawn(move || {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        stopper.store(true, Ordering::Relaxed);
    });
    let mut out = std::io::stdout().lock();
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(250));
        report(&mut out, &progress)?;
    }
    for t in threads {
        let _ = t.join();
    }
    report(&mut out, &progress)
}

fn report(out: &mut impl Write, progress: &Mutex<Progress>) -> anyhow::Result<()> {
    let line = serde_json::to_string(&*lock(progress))?;
    writeln!(out, "{line}")?;
    out.flush()?;
    Ok(())
}

fn lock(p: &Mutex<Progress>) -> std::sync::MutexGuard<'_, Progress> {
    // A panicking request thread cannot leave the counters half-updated: take them anyway.
    p.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A pseudo-random fraction in [0, 1) from the clock, enough to de-align phases.
fn jitter() -> f64 {
    f64::from(SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.subsec_nanos()) % 1000) / 1000.0 * 0.1
}

fn cache_client(
    view: &Path,
    refresh: Duration,
    phase: Duration,
    pause: Duration,
    stop: &AtomicBool,
    progress: &Mutex<Progress>,
) {
    let mut cache = read_view(view);
    let mut next_refresh = Instant::now() + phase;
    let mut turn = 0usize;
    while !stop.load(Ordering::Relaxed) {
        if Instant::now() >= next_refresh {
            cache = read_view(view);
            next_refresh += refresh;
        }
        if let Some(addr) = cache.get(turn % cache.len().max(1)) {
            request(*addr, true, progress);
        }
        turn = turn.wrapping_add(1);
        std::thread::sleep(pause);
    }
}

fn read_view(path: &Path) -> Vec<SocketAddr> {
    std::fs::read_to_string(path).unwrap_or_default().lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// One request on a new connection; the outcome goes into `progress`. `direct`: the
/// address is an instance's own, so another instance answering means a steered connect.
fn request(addr: SocketAddr, direct: bool, progress: &Mutex<Progress>) {
    match exchange(addr) {
        Ok((connected_ms, version, instance)) => {
            let mut p = lock(progress);
            p.ok += 1;
            if direct && instance.parse::<SocketAddr>().ok() != Some(addr) {
                p.steered += 1;
            }
            *p.versions.entry(version.clone()).or_default() += 1;
            let last = p.last_connect_ms.entry(format!("{version} {instance}")).or_default();
            *last = (*last).max(connected_ms);
        }
        Err(kind) => {
            let mut p = lock(progress);
            p.failed += 1;
            *p.errors.entry(kind.to_owned()).or_default() += 1;
        }
    }
}

/// Connects, sends `GET /`, and reads the "VERSION ADDR" answer.
fn exchange(addr: SocketAddr) -> Result<(u64, String, String), &'static str> {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).map_err(kind)?;
    let connected_ms = now_ms();
    stream.set_read_timeout(Some(Duration::from_secs(2))).map_err(kind)?;
    (&stream).write_all(b"GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n").map_err(kind)?;
    let mut reader = std::io::BufReader::new(&stream);
    let mut status = String::new();
    reader.read_line(&mut status).map_err(kind)?;
    if !status.starts_with("HTTP/1.1 200") {
        return Err(if status.is_empty() { "closed without an answer" } else { "non-200 answer" });
    }
    let mut body = String::new();
    let _ = reader.read_to_string(&mut body).map_err(kind)?;
    let line = body.rsplit("\r\n\r\n").next().unwrap_or_default().trim();
    let mut words = line.split_whitespace();
    match (words.next(), words.next()) {
        (Some(v), Some(a)) => Ok((connected_ms, v.to_owned(), a.to_owned())),
        _ => Err("malformed answer"),
    }
}

fn kind(e: std::io::Error) -> &'static str {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionRefused => "connection refused",
        K::ConnectionReset => "connection reset",
        K::TimedOut | K::WouldBlock => "timed out",
        K::UnexpectedEof | K::BrokenPipe => "closed without an answer",
        _ => "other error",
    }
}
