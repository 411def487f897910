//! Rollouts under clients that nobody here wrote: nginx as a gateway, wrk driving it,
//! curl with a stale address list. Run as root; needs `nginx-light` and `wrk` (Debian).
//!
//! What each part proves:
//!
//! - **nginx, a new upstream connection per request** (`proxy_pass http://VIP`, HTTP/1.0
//!   upstream, `proxy_next_upstream off`), running inside node 0's cgroup: every request is
//!   a `connect()` to the VIP that the kernel steers. nginx does not retry, so a connect
//!   that is refused or reset during a rollout is a 502 for wrk and a `connect() failed`
//!   (or `recv() failed`, `upstream prematurely closed`...) line in nginx's error log.
//! - **nginx with upstream keep-alive** (`keepalive 16`, HTTP/1.1), inside node 1's cgroup:
//!   connections opened before an instance drains are reused while it drains; they must
//!   finish their requests, never end in a reset or a premature close.
//! - **wrk** (`-t2 -c16`) keeps at least 2,000 requests/s through the gateway during each
//!   rollout. Below that the load was too low to prove anything, and the suite fails.
//! - **curl from a stale list**: inside node 2's cgroup, curl dials the instance addresses
//!   read from the registry before the rollout, one new process and connection per request,
//!   as a client with a stale registry cache does; those connects must be steered.
//! - The instances are `hitless-testsvc --backlog 5` (Python's `http.server` backlog): under
//!   this load their accept queues overflow, the kernel drops SYNs and clients retransmit
//!   them a second later, so handshakes are in flight when an instance is stopped.
//! - Every lossless strategy (rolling with max surge 1 and max unavailable 0, canary,
//!   blue-green, mixed, weighted) rolls under each gateway variant: 0 failed requests.
//! - **The conventional baseline, in the same run**: the same service, tools and load, with
//!   no hitless: an nginx in a plain cgroup of its own whose upstream block lists the v1
//!   addresses (a stale list), v2 instances started one by one, each v1 instance SIGTERMed
//!   after a fixed wait, nginx reloaded with the v2 list at the end. wrk must count failed
//!   requests there: that proves the counters above can see failures at all.

use std::time::{Duration, Instant};

use hitless_tests::gateway::{
    listen_overflows, require_tools, CurlLoop, CurlReport, Gateway, Upstream, Wrk, WrkReport,
};
use hitless_tests::rig::{instances, nodes_with, Rig};
use hitless_tests::{bin, require_root, Cgroup, Coordinator, Proc};

/// Bound of the wrk load around one rollout, in seconds (wrk is stopped once it ends).
const MAX_LOAD_SECS: u64 = 30;
/// Load before the rollout starts, and after it ended.
const WARMUP: Duration = Duration::from_millis(700);
const TAIL: Duration = Duration::from_millis(500);
/// Below this the load was too low to prove anything.
const MIN_RATE: f64 = 2000.0;
/// The conventional way's guess of how long clients need to notice a change.
const FIXED_WAIT: Duration = Duration::from_millis(300);
const COORDINATOR: &str = "127.130.30.1:7070";
const VIP: &str = "127.77.160.1:8080";
const CURL_MAX: u64 = 5000;

/// One rollout under load, as the clients saw it.
struct Row {
    strategy: String,
    variant: &'static str,
    versions: String,
    rollout: Duration,
    wrk: WrkReport,
    nginx: Vec<String>,
    curl: CurlReport,
    overflows: u64,
}

impl Row {
    fn what(&self) -> String {
        format!("{} / {} ({})", self.strategy, self.variant, self.versions)
    }

    fn print(&self) {
        let w = &self.wrk;
        println!("{}: rollout {:.2}s", self.what(), self.rollout.as_secs_f64());
        println!(
            "  wrk: {} requests in {:.2}s = {:.0}/s; socket errors {} (connect {}, read {}, write {}, timeout {}); non-2xx {}; max latency {}",
            w.requests,
            w.secs,
            w.rate(),
            w.socket_errors(),
            w.connect,
            w.read,
            w.write,
            w.timeout,
            w.non2xx,
            w.max_latency
        );
        println!("  nginx error lines: {}", self.nginx.len());
        for l in self.nginx.iter().take(8) {
            println!("    {l}");
        }
        if self.nginx.len() > 8 {
            println!("    ... {} more", self.nginx.len() - 8);
        }
        println!(
            "  curl with the stale list: {} requests, {} failed {:?}; answered by {:?}",
            self.curl.requests, self.curl.failed, self.curl.reasons, self.curl.answered_by
        );
        println!("  accept-queue overflows on this machine meanwhile (ListenOverflows): +{}", self.overflows);
    }

    /// What disproves a lossless rollout (or shows the load could not prove it).
    fn problems(&self) -> Vec<String> {
        let mut p = self.load_problems();
        let w = &self.wrk;
        if w.failed() > 0 {
            p.push(format!(
                "{}: wrk counted {} failed requests ({} socket errors, {} non-2xx)",
                self.what(),
                w.failed(),
                w.socket_errors(),
                w.non2xx
            ));
        }
        if !self.nginx.is_empty() {
            p.push(format!(
                "{}: nginx logged {} failed upstream requests, the first: {}",
                self.what(),
                self.nginx.len(),
                self.nginx[0]
            ));
        }
        if self.curl.failed > 0 {
            p.push(format!(
                "{}: curl with the stale list lost {} of {} requests: {:?}",
                self.what(),
                self.curl.failed,
                self.curl.requests,
                self.curl.reasons
            ));
        }
        p
    }

    fn load_problems(&self) -> Vec<String> {
        let mut p = Vec::new();
        let rate = self.wrk.rate();
        if rate < MIN_RATE {
            p.push(format!(
                "{}: {rate:.0} requests/s through nginx, below {MIN_RATE:.0}: load was too low to prove anything",
                self.what()
            ));
        }
        if self.curl.requests < 20 {
            p.push(format!("{}: curl ran only {} times", self.what(), self.curl.requests));
        }
        if self.wrk.secs < (WARMUP + self.rollout).as_secs_f64() {
            p.push(format!(
                "{}: the rollout took {:.2}s and outlasted the {MAX_LOAD_SECS}s of load",
                self.what(),
                self.rollout.as_secs_f64()
            ));
        }
        p
    }
}

#[test]
fn nginx_wrk_and_curl_lose_nothing_in_hitless_rollouts_and_lose_requests_the_conventional_way() {
    require_root();
    require_tools();
    let started = Instant::now();

    let baseline = conventional();
    baseline.print();
    let rows = hitless();

    println!("\n| strategy | variant | requests | rate/s | wrk socket errors | non-2xx | nginx error lines | curl stale failed/sent |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for r in std::iter::once(&baseline).chain(&rows) {
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {}/{} |",
            r.strategy,
            r.variant,
            r.wrk.requests,
            r.wrk.rate(),
            r.wrk.socket_errors(),
            r.wrk.non2xx,
            r.nginx.len(),
            r.curl.failed,
            r.curl.requests
        );
    }
    println!("whole suite: {:.1}s", started.elapsed().as_secs_f64());

    let mut problems = baseline.load_problems();
    if baseline.wrk.failed() == 0 {
        problems.push(format!(
            "{}: the conventional rollout lost no request through nginx: this suite cannot see failures",
            baseline.what()
        ));
    }
    for r in &rows {
        problems.extend(r.problems());
    }
    assert!(problems.is_empty(), "{} problems:\n{}", problems.len(), problems.join("\n"));
}

/// A `hitless-testsvc --backlog 5` in `cg` on `addr`, accepting when this returns.
fn instance(cg: &Cgroup, addr: &str, version: &str) -> Proc {
    let child = cg
        .command(bin("hitless-testsvc"))
        .args(["--listen", addr, "--version", version, "--backlog", "5"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("spawn hitless-testsvc");
    let proc = Proc::new(child);
    let deadline = Instant::now() + Duration::from_secs(5);
    while std::net::TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "hitless-testsvc never listened on {addr}");
        std::thread::sleep(Duration::from_millis(10));
    }
    proc
}

/// The conventional way, no hitless anywhere: a gateway with a stale list, new instances
/// started, old ones SIGTERMed after a fixed wait, the list refreshed at the end.
fn conventional() -> Row {
    let cg = Cgroup::new("rc-base");
    let v1: Vec<String> = (1..=6).map(|i| format!("127.182.0.{i}:8080")).collect();
    let v2: Vec<String> = (1..=6).map(|i| format!("127.182.1.{i}:8080")).collect();
    let mut old: Vec<Proc> = v1.iter().map(|a| instance(&cg, a, "v1")).collect();
    let mut new = Vec::new();
    let mut gw = Gateway::start(cg.path(), "rc-base", "127.181.0.1:8081", &Upstream::PerRequest(v1.clone()));
    let (mark, overflows) = (gw.log_mark(), listen_overflows());
    let curl = CurlLoop::start(cg.path(), v1.clone(), CURL_MAX, Duration::from_secs(MAX_LOAD_SECS));
    let wrk = Wrk::start(&gw.url(), MAX_LOAD_SECS);
    std::thread::sleep(WARMUP);
    let t = Instant::now();
    for (old, addr) in old.iter_mut().zip(&v2) {
        new.push(instance(&cg, addr, "v2"));
        std::thread::sleep(FIXED_WAIT);
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(old.child().id() as libc::pid_t, libc::SIGTERM) };
    }
    gw.reload(&Upstream::PerRequest(v2.clone()));
    let rollout = t.elapsed();
    std::thread::sleep(TAIL);
    let wrk = wrk.stop();
    let curl = curl.finish();
    let answer = gw.get();
    assert!(answer.starts_with("v2 "), "the reloaded gateway answers from v2: {answer}");
    Row {
        strategy: format!("conventional: stale list, wait {}ms, SIGTERM", FIXED_WAIT.as_millis()),
        variant: "new connection per request",
        versions: "v1→v2".to_owned(),
        rollout,
        wrk,
        nginx: gw.errors_since(mark),
        curl,
        overflows: listen_overflows().saturating_sub(overflows),
    }
}

/// Every lossless strategy, under each gateway variant in turn.
fn hitless() -> Vec<Row> {
    let coord = Coordinator::start("rc", COORDINATOR);
    let nodes = nodes_with(&coord, "rc", 0, |_| Vec::new());
    coord.wait_synced(3);
    let dir = nodes[0].dir.clone();
    let rig = Rig { coord, nodes, dir, vip: VIP.to_owned(), svc_flags: vec!["--backlog".into(), "5".into()] };
    let out = rig.push("v1", &[], &["--strategy", "straight"]);
    assert!(out.status.success(), "first deploy: {}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rig.versions(), vec!["v1".to_owned(); 6]);

    let vip = vec![VIP.to_owned()];
    let per_request =
        Gateway::start(rig.nodes[0].cgroup.path(), "rc-vip", "127.180.0.1:8081", &Upstream::PerRequest(vip.clone()));
    let keep_alive =
        Gateway::start(rig.nodes[1].cgroup.path(), "rc-vip-ka", "127.180.0.2:8081", &Upstream::KeepAlive(vip));
    let strategies: [&[&str]; 5] = [
        &["rolling", "--max-surge", "1", "--max-unavailable", "0"],
        &["canary"],
        &["blue-green"],
        &["mixed"],
        &["weighted", "--steps", "25,50,100"],
    ];
    let mut rows = Vec::new();
    let mut version = 1;
    for strategy in strategies {
        for (variant, gw) in [("new connection per request", &per_request), ("keep-alive", &keep_alive)] {
            version += 1;
            let row = rollout(&rig, gw, strategy, variant, version);
            row.print();
            rows.push(row);
        }
    }
    rows
}

/// Rolls `v(version-1)` → `v(version)` with `strategy` under wrk through `gw`, with curl
/// dialling the addresses served before the rollout.
fn rollout(rig: &Rig, gw: &Gateway, strategy: &[&str], variant: &'static str, version: u32) -> Row {
    let (from, to) = (format!("v{}", version - 1), format!("v{version}"));
    let stale: Vec<String> =
        instances(&rig.coord).iter().filter_map(|i| i["address"].as_str().map(str::to_owned)).collect();
    assert_eq!(stale.len(), 6, "six {from} instances serve before the rollout: {stale:?}");
    let (mark, overflows) = (gw.log_mark(), listen_overflows());
    let curl = CurlLoop::start(rig.nodes[2].cgroup.path(), stale, CURL_MAX, Duration::from_secs(MAX_LOAD_SECS));
    let wrk = Wrk::start(&gw.url(), MAX_LOAD_SECS);
    std::thread::sleep(WARMUP);
    let t = Instant::now();
    let mut args = vec!["--strategy"];
    args.extend_from_slice(strategy);
    let out = rig.push(&to, &[], &args);
    let rollout = t.elapsed();
    std::thread::sleep(TAIL);
    let wrk = wrk.stop();
    let curl = curl.finish();
    let what = format!("{} / {variant} ({from}→{to})", strategy.join(" "));
    assert!(
        out.status.success(),
        "{what}: push failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(rig.versions(), vec![to.clone(); 6], "{what}: target reached");
    let answer = gw.get();
    assert!(answer.starts_with(&format!("{to} ")), "{what}: the gateway answers from {to}: {answer}");
    Row {
        strategy: strategy.join(" "),
        variant,
        versions: format!("{from}→{to}"),
        rollout,
        wrk,
        nginx: gw.errors_since(mark),
        curl,
        overflows: listen_overflows().saturating_sub(overflows),
    }
}
