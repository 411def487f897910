//! Real clients that nobody here wrote, for the end-to-end suite `real_clients`: an nginx
//! gateway (Debian `nginx-light`) in a cgroup of its own, `wrk` driving it, and `curl`
//! dialling instance addresses from a stale list. Every process is killed and every
//! cgroup and scratch directory removed by a guard, also when the test panics; every
//! loop is bounded in count and time.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::Proc;

const MISSING: &str = "apt-get install nginx-light wrk (cargo xtask test installs them)";

/// Fails with what to install when nginx, wrk or curl is missing.
pub fn require_tools() {
    for (tool, flag) in [("nginx", "-v"), ("wrk", "--version"), ("curl", "--version")] {
        let found = Command::new(tool).arg(flag).stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok();
        assert!(found, "{tool} is missing: this suite drives real nginx, wrk and curl: {MISSING}");
    }
}

/// A cgroup directory below `parent` (a node's cgroup, or a plain one); every process in
/// it is killed and the directory removed on drop.
struct SubCgroup {
    path: PathBuf,
}

impl SubCgroup {
    fn new(parent: &Path, name: &str) -> Self {
        let path = parent.join(name);
        let _ = std::fs::create_dir(&path);
        assert!(path.join("cgroup.procs").exists(), "could not create cgroup {}", path.display());
        Self { path }
    }
}

impl Drop for SubCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let procs = std::fs::read_to_string(self.path.join("cgroup.procs")).unwrap_or_default();
            if procs.trim().is_empty() && std::fs::remove_dir(&self.path).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("warning: could not remove cgroup {}", self.path.display());
    }
}

/// Where an nginx gateway sends its requests.
#[derive(Clone, Debug)]
pub enum Upstream {
    /// `proxy_pass http://ADDR` (or an upstream block listing several): a new upstream
    /// connection per request (HTTP/1.0 to the upstream, nginx's default).
    PerRequest(Vec<String>),
    /// `upstream { server ADDR; keepalive 16; }` with `proxy_http_version 1.1` and an empty
    /// `Connection` header: upstream connections are reused. `keepalive_requests 100` and
    /// `keepalive_timeout 1s` retire them, so a draining instance sees its connections end.
    KeepAlive(Vec<String>),
}

impl Upstream {
    fn config(&self) -> (String, String) {
        let (servers, keepalive) = match self {
            Upstream::PerRequest(s) => (s, false),
            Upstream::KeepAlive(s) => (s, true),
        };
        if servers.len() == 1 && !keepalive {
            return (String::new(), format!("proxy_pass http://{};", servers[0]));
        }
        let list: String = servers.iter().map(|s| format!("    server {s};\n")).collect();
        let mut block = format!("  upstream backend {{\n{list}");
        let mut pass = "proxy_pass http://backend;".to_owned();
        if keepalive {
            block.push_str("    keepalive 16;\n    keepalive_requests 100;\n    keepalive_timeout 1s;\n");
            pass.push_str(" proxy_http_version 1.1; proxy_set_header Connection \"\";");
        }
        block.push_str("  }\n");
        (block, pass)
    }
}

/// An nginx (one worker, access log off, error log in its directory) listening on a
/// loopback address, running in its own cgroup below `parent`. Killed on drop: master
/// and workers, by the cgroup.
pub struct Gateway {
    /// The address it listens on.
    pub listen: String,
    dir: PathBuf,
    master: Option<Proc>,
    cgroup: Option<SubCgroup>,
}

impl Gateway {
    /// Starts nginx in `<parent>/gateway-<name>` and waits until it accepts connections.
    pub fn start(parent: &Path, name: &str, listen: &str, upstream: &Upstream) -> Self {
        let dir = std::env::temp_dir().join(format!("hitless-gw-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("tmp")).expect("gateway dir");
        let cgroup = SubCgroup::new(parent, &format!("gateway-{name}"));
        let mut gw = Self { listen: listen.to_owned(), dir, master: None, cgroup: None };
        gw.write_config(upstream);
        let mut cmd = Command::new("nginx");
        hitless_agent::cgroup::join_on_exec(&mut cmd, &cgroup.path).expect("no NUL in the cgroup path");
        gw.cgroup = Some(cgroup);
        let pid = gw.dir.join("nginx.pid");
        cmd.arg("-p")
            .arg(&gw.dir)
            .arg("-c")
            .arg(gw.dir.join("nginx.conf"))
            .arg("-g")
            .arg(format!("daemon off; pid {};", pid.display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(gw.dir.join("stderr.log")).expect("nginx stderr"));
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run nginx ({e}): {MISSING}"));
        gw.master = Some(Proc::new(child));
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(listen).is_err() {
            if let Some(status) = gw.master.as_mut().and_then(|m| m.child().try_wait().ok().flatten()) {
                panic!("nginx {name} exited with {status}: {}{}", gw.read("stderr.log"), gw.read("error.log"));
            }
            assert!(Instant::now() < deadline, "nginx {name} never listened on {listen}: {}", gw.read("error.log"));
            std::thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    fn read(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(file)).unwrap_or_default()
    }

    fn write_config(&self, upstream: &Upstream) {
        let d = self.dir.display();
        let (block, pass) = upstream.config();
        let conf = format!(
            "worker_processes 1;\nerror_log {d}/error.log warn;\nevents {{ worker_connections 4096; }}\nhttp {{\n  access_log off;\n  client_body_temp_path {d}/tmp/body;\n  proxy_temp_path {d}/tmp/proxy;\n  fastcgi_temp_path {d}/tmp/fastcgi;\n  uwsgi_temp_path {d}/tmp/uwsgi;\n  scgi_temp_path {d}/tmp/scgi;\n{block}  server {{\n    listen {};\n    location / {{ {pass} proxy_next_upstream off; }}\n  }}\n}}\n",
            self.listen
        );
        let tmp = self.dir.join("nginx.conf.tmp");
        std::fs::write(&tmp, conf).expect("nginx.conf");
        std::fs::rename(&tmp, self.dir.join("nginx.conf")).expect("nginx.conf");
    }

    /// Rewrites the upstreams and reloads (SIGHUP: a new worker takes them, the old one
    /// finishes its requests), as a config-management tool does when its list refreshes.
    pub fn reload(&mut self, upstream: &Upstream) {
        self.write_config(upstream);
        let pid = self.master.as_mut().map(|m| m.child().id()).expect("nginx runs");
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGHUP) };
    }

    /// `http://LISTEN/`.
    pub fn url(&self) -> String {
        format!("http://{}/", self.listen)
    }

    /// Where the error log ends now; [`Gateway::errors_since`] reads from there.
    pub fn log_mark(&self) -> usize {
        self.read("error.log").len()
    }

    /// Error log lines written since `mark` at level error or worse: `connect() failed`,
    /// `upstream prematurely closed`, `recv() failed`, `no live upstreams`, timeouts...
    /// each is a request that failed.
    pub fn errors_since(&self, mark: usize) -> Vec<String> {
        let log = self.read("error.log");
        log.get(mark..)
            .unwrap_or("")
            .lines()
            .filter(|l| ["[error]", "[crit]", "[alert]", "[emerg]"].iter().any(|lvl| l.contains(lvl)))
            .map(str::to_owned)
            .collect()
    }

    /// One GET through the gateway: the response body, or what went wrong.
    pub fn get(&self) -> String {
        http_get(&self.listen)
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut m) = self.master.take() {
            m.kill();
        }
        // The workers outlive a SIGKILLed master: the cgroup takes them.
        drop(self.cgroup.take());
        if std::env::var_os("HITLESS_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `GET /` over HTTP/1.0 to `addr`: the body of a 200, or a description of the failure.
pub fn http_get(addr: &str) -> String {
    let answer = (|| {
        let mut s = std::net::TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET / HTTP/1.0\r\nHost: hitless\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok::<_, std::io::Error>(text)
    })();
    match answer {
        Ok(text) if text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200") => {
            text.split("\r\n\r\n").nth(1).unwrap_or("").trim().to_owned()
        }
        Ok(text) => format!("error: {:?}", text.lines().next().unwrap_or("")),
        Err(e) => format!("error: {e}"),
    }
}

/// What wrk reported.
#[derive(Debug, Default, Clone)]
pub struct WrkReport {
    /// "N requests in".
    pub requests: u64,
    /// "... in Xs": the measured duration in seconds.
    pub secs: f64,
    /// Socket errors: connect, read, write, timeout.
    pub connect: u64,
    /// Socket errors: read.
    pub read: u64,
    /// Socket errors: write.
    pub write: u64,
    /// Socket errors: timeout.
    pub timeout: u64,
    /// "Non-2xx or 3xx responses".
    pub non2xx: u64,
    /// Slowest request, as wrk prints it (e.g. "1.02s").
    pub max_latency: String,
    /// wrk's whole output.
    pub text: String,
}

impl WrkReport {
    /// Socket errors of every kind.
    pub fn socket_errors(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }

    /// Requests that failed: socket errors and non-2xx/3xx answers.
    pub fn failed(&self) -> u64 {
        self.socket_errors() + self.non2xx
    }

    /// Requests per second.
    pub fn rate(&self) -> f64 {
        if self.secs > 0.0 {
            self.requests as f64 / self.secs
        } else {
            0.0
        }
    }

    /// Parses wrk's text output (the "Socket errors" and "Non-2xx" lines appear only
    /// when not zero).
    pub fn parse(text: &str) -> Self {
        let mut r = WrkReport { text: text.to_owned(), ..Self::default() };
        for line in text.lines().map(str::trim) {
            if let Some((n, rest)) = line.split_once(" requests in ") {
                r.requests = n.trim().parse().unwrap_or(0);
                r.secs = duration_secs(rest.split(',').next().unwrap_or(""));
            } else if let Some(rest) = line.strip_prefix("Socket errors:") {
                for part in rest.split(',') {
                    let mut it = part.split_whitespace();
                    let (kind, n) = (it.next().unwrap_or(""), it.next().and_then(|n| n.parse().ok()).unwrap_or(0));
                    match kind {
                        "connect" => r.connect = n,
                        "read" => r.read = n,
                        "write" => r.write = n,
                        "timeout" => r.timeout = n,
                        _ => {}
                    }
                }
            } else if let Some(n) = line.strip_prefix("Non-2xx or 3xx responses:") {
                r.non2xx = n.trim().parse().unwrap_or(0);
            } else if let Some(rest) = line.strip_prefix("Latency ").filter(|r| !r.contains("Distribution")) {
                // "Latency   1.66ms  554.95us   8.68ms   79.07%": avg, stdev, max, +/-.
                r.max_latency = rest.split_whitespace().nth(2).unwrap_or("").to_owned();
            }
        }
        r
    }
}

/// "4.01s", "250.00ms", "1.00m" -> seconds.
fn duration_secs(text: &str) -> f64 {
    let t = text.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("us") {
        (n, 1e-6)
    } else if let Some(n) = t.strip_suffix("ms") {
        (n, 1e-3)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    num.parse::<f64>().map_or(0.0, |n| n * scale)
}

/// A running `wrk -t2 -c16 -dMAX --latency --timeout 10s URL`, killed on drop.
///
/// The 10 s timeout makes a request delayed by a dropped SYN (retransmitted after 1 s,
/// then 3 s) count as slow (see the maximum latency), not as failed: only refused,
/// reset or unanswered requests and error responses count.
pub struct Wrk {
    proc: Proc,
    max_secs: u64,
    started: Instant,
}

impl Wrk {
    /// Starts wrk against `url`; it runs until [`Wrk::stop`], `max_secs` at most.
    pub fn start(url: &str, max_secs: u64) -> Self {
        let child = Command::new("wrk")
            .args(["-t2", "-c16", &format!("-d{max_secs}s"), "--latency", "--timeout", "10s", url])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run wrk ({e}): {MISSING}"));
        Self { proc: Proc::new(child), max_secs, started: Instant::now() }
    }

    /// Stops wrk (SIGINT: it ends its run and prints its report, as on Ctrl-C) unless its
    /// time is up already, and returns the report. Bounded: killed 20 s after its time.
    pub fn stop(mut self) -> WrkReport {
        let pid = self.proc.child().id();
        // SAFETY: kill(2) on our own child's pid (not reaped yet, so not reused).
        unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
        let deadline = self.started + Duration::from_secs(self.max_secs + 20);
        loop {
            match self.proc.child().try_wait() {
                Ok(Some(_)) => break,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                _ => {
                    self.proc.kill();
                    panic!("wrk did not end within {} s of its {} s run", 20, self.max_secs);
                }
            }
        }
        let mut text = String::new();
        if let Some(mut out) = self.proc.child().stdout.take() {
            let _ = out.read_to_string(&mut text);
        }
        let report = WrkReport::parse(&text);
        if report.requests == 0 {
            let mut err = String::new();
            if let Some(mut e) = self.proc.child().stderr.take() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("wrk reported no requests: {text}{err}");
        }
        report
    }
}

/// What a curl loop saw.
#[derive(Debug, Default, Clone)]
pub struct CurlReport {
    /// curl runs.
    pub requests: u64,
    /// Runs that exited non-zero or got another status than 200.
    pub failed: u64,
    /// Failures by reason ("exit 7", "http 502").
    pub reasons: BTreeMap<String, u64>,
    /// Who answered (the first word of the body: the version) -> count.
    pub answered_by: BTreeMap<String, u64>,
}

/// `curl` run again and again inside a cgroup, each run one GET to the next address of
/// a fixed (stale) list, until told to stop, `max_count` runs or `max_time`.
pub struct CurlLoop {
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<CurlReport>>,
}

impl CurlLoop {
    /// Starts the loop in a thread; each curl process starts inside `cgroup`.
    pub fn start(cgroup: &Path, addrs: Vec<String>, max_count: u64, max_time: Duration) -> Self {
        assert!(!addrs.is_empty(), "curl needs addresses to dial");
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let cgroup = cgroup.to_owned();
        let handle = std::thread::spawn(move || {
            let mut r = CurlReport::default();
            let end = Instant::now() + max_time;
            while !flag.load(Ordering::SeqCst) && r.requests < max_count && Instant::now() < end {
                let addr = &addrs[(r.requests % addrs.len() as u64) as usize];
                let mut cmd = Command::new("curl");
                hitless_agent::cgroup::join_on_exec(&mut cmd, &cgroup).expect("no NUL in the cgroup path");
                let out = cmd
                    .args(["-s", "--connect-timeout", "4", "--max-time", "5", "-w", "\n%{http_code}"])
                    .arg(format!("http://{addr}/"))
                    .stdin(Stdio::null())
                    .stderr(Stdio::null())
                    .output();
                r.requests += 1;
                let out = match out {
                    Ok(o) => o,
                    Err(e) => {
                        r.failed += 1;
                        *r.reasons.entry(format!("spawn: {e}")).or_default() += 1;
                        continue;
                    }
                };
                let text = String::from_utf8_lossy(&out.stdout);
                let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
                if !out.status.success() {
                    r.failed += 1;
                    *r.reasons.entry(format!("exit {}", out.status.code().unwrap_or(-1))).or_default() += 1;
                } else if code != "200" {
                    r.failed += 1;
                    *r.reasons.entry(format!("http {code}")).or_default() += 1;
                } else {
                    let who = body.split_whitespace().next().unwrap_or("?").to_owned();
                    *r.answered_by.entry(who).or_default() += 1;
                }
            }
            r
        });
        Self { stop, handle: Some(handle) }
    }

    /// Stops the loop and returns what it saw.
    pub fn finish(mut self) -> CurlReport {
        self.stop.store(true, Ordering::SeqCst);
        self.handle.take().map(|h| h.join().expect("curl loop thread")).unwrap_or_default()
    }
}

impl Drop for CurlLoop {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// The machine's TCP `ListenOverflows` counter (/proc/net/netstat): connections dropped
/// because an accept queue was full. Machine-wide, so a diagnostic, not a measure.
pub fn listen_overflows() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else { return 0 };
    names
        .split_whitespace()
        .zip(values.split_whitespace())
        .find(|(n, _)| *n == "ListenOverflows")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_wrk_output_with_and_without_error_lines() {
        let clean = "Running 4s test @ http://127.181.0.1:8081/\n  2 threads and 16 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     1.66ms  554.95us   8.68ms   79.07%\n    Req/Sec     4.85k   527.01     5.67k    62.50%\n  Latency Distribution\n     50%    1.58ms\n     99%    3.58ms\n  38627 requests in 4.01s, 6.19MB read\nRequests/sec:   9639.56\n";
        let r = WrkReport::parse(clean);
        assert_eq!((r.requests, r.failed(), r.max_latency.as_str()), (38627, 0, "8.68ms"));
        assert!((r.rate() - 38627.0 / 4.01).abs() < 0.01);
        let bad = "  24903 requests in 1.00m, 3.99MB read\n  Socket errors: connect 1, read 2, write 3, timeout 4\n  Non-2xx or 3xx responses: 5\n";
        let r = WrkReport::parse(bad);
        assert_eq!((r.requests, r.socket_errors(), r.non2xx, r.failed()), (24903, 10, 5, 15));
        assert!((r.secs - 60.0).abs() < 1e-9);
    }

    #[test]
    fn nginx_config_per_request_or_keepalive() {
        let (block, pass) = Upstream::PerRequest(vec!["127.77.0.1:8080".into()]).config();
        assert_eq!((block.as_str(), pass.as_str()), ("", "proxy_pass http://127.77.0.1:8080;"));
        let (block, pass) = Upstream::KeepAlive(vec!["127.77.0.1:8080".into()]).config();
        assert!(block.contains("server 127.77.0.1:8080;") && block.contains("keepalive 16;"), "{block}");
        assert!(pass.contains("proxy_http_version 1.1;") && pass.contains("Connection \"\""), "{pass}");
        let (block, _) = Upstream::PerRequest(vec!["127.0.0.1:1".into(), "127.0.0.1:2".into()]).config();
        assert!(block.contains("server 127.0.0.1:2;") && !block.contains("keepalive"), "{block}");
    }
}
