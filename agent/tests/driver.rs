//! The instance driver against real processes (`hitless-testsvc`) in a throwaway cgroup.
//! Needs root (cgroups) and the workspace binaries (`cargo build -p hitless-tests --bins`,
//! or `cargo test --workspace`). Each test has its own cgroup, state directory and /24 of
//! 127.150.x.0, all removed on drop, also when the test fails.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hitless_agent::driver::{DrainEnd, Driver, DriverError, InstanceInfo, InstanceSpec, InstanceState};
use hitless_model::{Health, PreStop, RunSpec};

const PORT: u16 = 8080;

fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert!(
        euid == 0,
        "the driver tests create cgroups: run them as root (sudo -E cargo test -p hitless-agent --test driver)"
    );
    assert!(
        hitless_agent::cgroup::v2_mount().is_ok(),
        "the driver tests need a cgroup v2 hierarchy (none in /proc/mounts): mount one with mount -t cgroup2 none DIR"
    );
}

/// `hitless-testsvc`, built next to this test.
fn testsvc() -> String {
    let exe = std::env::current_exe().expect("test executable path");
    let mut dir = exe.parent().expect("target dir");
    if dir.ends_with("deps") {
        dir = dir.parent().expect("target dir");
    }
    let path = dir.join("hitless-testsvc");
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build -p hitless-tests --bins, or cargo test --workspace)",
        path.display()
    );
    path.display().to_string()
}

/// A workload cgroup, a state directory and a pool for one test; removed on drop.
struct Fixture {
    cgroup: PathBuf,
    dir: PathBuf,
    pool: String,
    net: u8,
}

impl Fixture {
    fn new(name: &str, net: u8) -> Self {
        require_root();
        let root = hitless_agent::cgroup::v2_mount().expect("cgroup2 mount");
        let tag = format!("hitless-test-driver-{}-{name}", std::process::id());
        let cgroup = root.join(&tag);
        let dir = std::env::temp_dir().join(&tag);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("temp dir");
        Self { cgroup, dir, pool: format!("127.150.{net}.0/24"), net }
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn driver(&self) -> Driver {
        Driver::open("test-node", &self.cgroup, &self.pool, &self.state()).expect("open driver")
    }

    fn addr(&self, host: u8) -> String {
        format!("127.150.{}.{host}", self.net)
    }

    /// The cgroup, record and process of `info` are gone.
    fn assert_gone(&self, d: &Driver, info: &InstanceInfo) {
        assert!(!self.cgroup.join(format!("inst-{}", info.id)).exists(), "cgroup of {} left behind", info.id);
        assert!(!self.state().join(format!("{}.instance", info.id)).exists(), "record of {} left behind", info.id);
        assert!(d.get(&info.id).is_none(), "{} still listed", info.id);
        assert!(!alive(info.pid), "process {} of {} still running", info.pid, info.id);
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // cgroup.kill kills the whole subtree; then remove the children, then the cgroup.
        let _ = std::fs::write(self.cgroup.join("cgroup.kill"), "1");
        let until = Instant::now() + Duration::from_secs(5);
        while Instant::now() < until {
            let events = std::fs::read_to_string(self.cgroup.join("cgroup.events")).unwrap_or_default();
            if !events.contains("populated 1") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Ok(entries) = std::fs::read_dir(&self.cgroup) {
            for e in entries.flatten() {
                if e.path().is_dir() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        if self.cgroup.exists() && std::fs::remove_dir(&self.cgroup).is_err() {
            eprintln!("warning: could not remove cgroup {}", self.cgroup.display());
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn spec(version: &str, extra: &[&str]) -> InstanceSpec {
    let mut command = vec![testsvc(), "--listen".into(), "{address}:{port}".into(), "--version".into(), version.into()];
    command.extend(extra.iter().map(|s| s.to_string()));
    InstanceSpec {
        service: "web".into(),
        version: version.into(),
        port: PORT,
        run: RunSpec { command, env: BTreeMap::new() },
        health: Some(Health::Http("/healthz".into())),
        prestop: None,
        drain_deadline: Duration::from_secs(5),
        grace: Duration::from_secs(2),
        config: BTreeMap::new(),
    }
}

/// One GET with `Connection: close`: (status, body).
fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect((addr, PORT)).unwrap_or_else(|e| panic!("connect {addr}:{PORT}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("read timeout");
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut text = String::new();
    s.read_to_string(&mut text).expect("read answer");
    let code = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    (code, body)
}

/// A keep-alive connection that has completed one request.
fn held(addr: &str) -> TcpStream {
    let mut s = TcpStream::connect((addr, PORT)).unwrap_or_else(|e| panic!("connect {addr}:{PORT}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(3))).expect("read timeout");
    write!(s, "GET / HTTP/1.1\r\nHost: {addr}\r\n\r\n").expect("send request");
    let mut buf = [0u8; 512];
    let n = s.read(&mut buf).expect("read answer");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{}", String::from_utf8_lossy(&buf[..n]));
    s
}

fn alive(pid: u32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_string));
    matches!(state.as_deref(), Some(s) if s != "Z" && s != "X")
}

/// Field `n` (1-based, as in proc(5)) of /proc/<pid>/stat.
fn stat_field(pid: u32, n: usize) -> String {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process alive");
    let rest = &stat[stat.rfind(')').expect("(comm)") + 2..];
    rest.split_whitespace().nth(n - 3).expect("field").to_string()
}

fn kill9(pid: u32) {
    // SAFETY: kill with a pid and a signal.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

/// Waits (bounded) until `f` holds.
fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    for _ in 0..10_000 {
        if f() {
            return;
        }
        assert!(Instant::now() < until, "{what}: not within {limit:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{what}: gave up");
}

#[test]
fn driver_is_shareable_and_its_futures_are_send() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>(_: &T) {}
    send_sync::<Driver>();
    fn check(d: &Driver) {
        send(&d.wait_healthy("x", Duration::ZERO));
        send(&d.stop("x", || 0));
    }
    let _ = check;
}

#[tokio::test]
async fn starts_an_instance_that_serves_on_its_pool_address() {
    let fx = Fixture::new("serve", 1);
    let d = fx.driver();
    assert!(d.adopt().is_empty());
    let mut s = spec("v1", &[]);
    s.run.env.insert("MODE".into(), "fast".into());
    s.config.insert("cache_size".into(), "128".into());
    let a = d.start(s.clone()).unwrap();
    assert_eq!(a.state, InstanceState::Starting);
    assert_eq!(a.address.to_string(), fx.addr(1));
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(d.get(&a.id).unwrap().state, InstanceState::Serving);
    assert_eq!(get(&fx.addr(1), "/"), (200, format!("v1 {}:{PORT}\n", fx.addr(1))));

    // Its own cgroup, its own session, the environment the spec asks for.
    let procs = std::fs::read_to_string(fx.cgroup.join(format!("inst-{}", a.id)).join("cgroup.procs")).unwrap();
    assert_eq!(procs.trim(), a.pid.to_string());
    assert_eq!(stat_field(a.pid, 6), a.pid.to_string(), "the instance leads its own session");
    let environ = std::fs::read(format!("/proc/{}/environ", a.pid)).unwrap();
    let env: Vec<String> = environ.split(|&b| b == 0).map(|v| String::from_utf8_lossy(v).into_owned()).collect();
    for want in [
        "MODE=fast".to_string(),
        "HITLESS_SERVICE=web".into(),
        "HITLESS_VERSION=v1".into(),
        format!("HITLESS_ADDRESS={}", fx.addr(1)),
        format!("HITLESS_PORT={PORT}"),
        "HITLESS_CONFIG_CACHE_SIZE=128".into(),
    ] {
        assert!(env.contains(&want), "{want} missing from {env:?}");
    }

    // A second instance gets the next address; both are listed.
    let b = d.start(spec("v2", &[])).unwrap();
    assert_eq!(b.address.to_string(), fx.addr(2));
    d.wait_healthy(&b.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(get(&fx.addr(2), "/").1, format!("v2 {}:{PORT}\n", fx.addr(2)));
    assert_eq!(d.list().len(), 2);

    for info in [a, b] {
        let r = d.stop(&info.id, || 0).await.unwrap();
        assert_eq!((r.drain_end, r.killed), (DrainEnd::Connections, false), "{r:?}");
        fx.assert_gone(&d, &info);
    }
    assert!(d.list().is_empty());
    // The address is free again.
    let c = d.start(spec("v3", &[])).unwrap();
    assert_eq!(c.address.to_string(), fx.addr(1));
    d.stop(&c.id, || 0).await.unwrap();
}

#[tokio::test]
async fn an_instance_that_never_gets_healthy_is_named_with_its_output() {
    let fx = Fixture::new("unhealthy", 2);
    let d = fx.driver();
    let sick = d.start(spec("v1", &["--unhealthy"])).unwrap();
    let t = Instant::now();
    let err = d.wait_healthy(&sick.id, Duration::from_millis(600)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, DriverError::Unhealthy { .. }), "{msg}");
    assert!(msg.contains(&sick.id) && msg.contains("answered 503") && msg.contains("listening on"), "{msg}");

    // A process that exits at once fails at once, with what it printed.
    let broken = d.start(spec("v1", &["--no-such-flag"])).unwrap();
    let t = Instant::now();
    let err = d.wait_healthy(&broken.id, Duration::from_secs(10)).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2), "took {:?}", t.elapsed());
    let msg = err.to_string();
    assert!(matches!(err, DriverError::Exited { .. }), "{msg}");
    assert!(msg.contains(&broken.id) && msg.contains("exited with status 2") && msg.contains("no-such-flag"), "{msg}");
    assert_eq!(d.get(&broken.id).unwrap().state, InstanceState::Crashed);

    for info in [sick, broken] {
        d.stop(&info.id, || 0).await.unwrap();
        fx.assert_gone(&d, &info);
    }

    // A stop while someone waits for health ends the wait at once.
    let sick = d.start(spec("v1", &["--unhealthy"])).unwrap();
    let t = Instant::now();
    let (waited, stopped) = tokio::join!(d.wait_healthy(&sick.id, Duration::from_secs(10)), async {
        tokio::time::sleep(Duration::from_millis(200)).await;
        d.stop(&sick.id, || 0).await
    });
    assert!(matches!(waited, Err(DriverError::Stopping(_) | DriverError::UnknownInstance(_))), "{waited:?}");
    stopped.unwrap();
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    fx.assert_gone(&d, &sick);
}

#[tokio::test]
async fn a_crash_is_detected_and_cleaned_up_by_stop() {
    let fx = Fixture::new("crash", 3);
    let d = fx.driver();
    let a = d.start(spec("v1", &[])).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    kill9(a.pid);
    eventually("crash seen", Duration::from_secs(3), || d.get(&a.id).unwrap().state == InstanceState::Crashed);
    let listed = d.list();
    assert_eq!(listed[0].exit.as_deref(), Some("killed by signal 9"));
    let r = d.stop(&a.id, || 1).await.unwrap();
    assert_eq!((r.drain_end, r.killed), (DrainEnd::Exited, false), "{r:?}");
    assert!(r.total < Duration::from_secs(1), "{r:?}");
    fx.assert_gone(&d, &a);
}

#[tokio::test]
async fn a_restarted_agent_adopts_live_instances_and_reports_dead_ones() {
    let fx = Fixture::new("adopt", 4);
    let d = fx.driver();
    let a = d.start(spec("v1", &[])).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    let started = stat_field(a.pid, 22);
    assert!(matches!(fx.driver_again(), Err(DriverError::Locked(_))), "a second driver on the same state directory");
    drop(d); // the agent goes away; the instance must not

    let d = fx.driver();
    let adopted = d.adopt();
    assert_eq!(adopted.len(), 1, "{adopted:?}");
    let b = &adopted[0];
    assert_eq!((&b.id, b.pid, b.address, b.state), (&a.id, a.pid, a.address, InstanceState::Serving));
    assert_eq!(stat_field(a.pid, 22), started, "same process, not restarted");
    assert_eq!(get(&fx.addr(1), "/").0, 200);
    assert!(d.adopt().is_empty(), "adopting twice adds nothing");
    // A new instance does not take the adopted one's address.
    let c = d.start(spec("v2", &[])).unwrap();
    assert_eq!(c.address.to_string(), fx.addr(2));
    drop(d);

    // Both die while no agent runs: the next agent reports them crashed and cleans up.
    kill9(a.pid);
    kill9(c.pid);
    let cg = |id: &str| fx.cgroup.join(format!("inst-{id}"));
    eventually("cgroups empty", Duration::from_secs(3), || {
        [&a.id, &c.id].iter().all(|id| {
            std::fs::read_to_string(cg(id).join("cgroup.events")).expect("cgroup.events").contains("populated 0")
        })
    });
    let d = fx.driver();
    let mut dead = d.adopt();
    dead.sort_by_key(|i| i.address);
    assert_eq!(
        dead.iter().map(|i| (i.id.as_str(), i.state)).collect::<Vec<_>>(),
        [(a.id.as_str(), InstanceState::Crashed), (c.id.as_str(), InstanceState::Crashed)]
    );
    for info in [&a, &c] {
        fx.assert_gone(&d, info);
    }
    assert_eq!(d.start(spec("v3", &[])).unwrap().address.to_string(), fx.addr(1), "addresses freed");

    // A cgroup `inst-*` without a record (nothing knows it) is emptied and removed.
    drop(d);
    let stray = fx.cgroup.join("inst-stray-1");
    std::fs::create_dir(&stray).unwrap();
    let script = format!("echo $$ > {}/cgroup.procs && exec sleep 30", stray.display());
    let mut sleeper = std::process::Command::new("/bin/sh").args(["-c", &script]).spawn().unwrap();
    let procs = stray.join("cgroup.procs");
    eventually("stray process in its cgroup", Duration::from_secs(3), || {
        !std::fs::read_to_string(&procs).unwrap_or_default().trim().is_empty()
    });
    let d = fx.driver();
    let adopted = d.adopt();
    assert_eq!(adopted.len(), 1, "only the v3 instance: {adopted:?}");
    assert!(!stray.exists(), "stray cgroup removed");
    let status = sleeper.wait().unwrap();
    assert!(!status.success(), "stray process killed: {status:?}");
}

impl Fixture {
    fn driver_again(&self) -> Result<Driver, DriverError> {
        Driver::open("test-node", &self.cgroup, &self.pool, &self.state())
    }
}

#[tokio::test]
async fn stop_drains_until_the_last_connection_closes() {
    let fx = Fixture::new("drain", 5);
    let d = fx.driver();
    let mut s = spec("v1", &[]);
    s.prestop = Some(PreStop::Http("/drain".into()));
    s.drain_deadline = Duration::from_secs(10);
    let a = d.start(s).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();

    // A stop the caller gives up on hands the instance back, still serving.
    assert!(tokio::time::timeout(Duration::from_millis(100), d.stop(&a.id, || 1)).await.is_err());
    assert_eq!(d.get(&a.id).unwrap().state, InstanceState::Serving, "a cancelled stop hands the instance back");
    assert_eq!(get(&fx.addr(1), "/").0, 200);

    let conn = held(&fx.addr(1));
    let active = Arc::new(AtomicI64::new(1));
    let closer = {
        let (active, addr) = (Arc::clone(&active), fx.addr(1));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(300));
            let health = get(&addr, "/healthz").0; // the pre-stop hook ran
            drop(conn);
            active.store(0, Ordering::SeqCst);
            health
        })
    };
    let r = d.stop(&a.id, || active.load(Ordering::SeqCst)).await.unwrap();
    assert_eq!(closer.join().unwrap(), 503, "/drain was called before the drain");
    assert_eq!(r.drain_end, DrainEnd::Connections, "{r:?}");
    assert!(r.prestop_error.is_none(), "{r:?}");
    assert!(r.drain >= Duration::from_millis(250) && r.drain < Duration::from_secs(3), "{r:?}");
    assert!(!r.killed && r.term < Duration::from_secs(1), "{r:?}");
    fx.assert_gone(&d, &a);
}

#[tokio::test]
async fn stop_ends_the_drain_at_the_deadline_and_kills_after_the_grace() {
    let fx = Fixture::new("deadline", 6);
    let d = fx.driver();
    let mut s = spec("v1", &[]);
    s.drain_deadline = Duration::from_millis(400);
    s.grace = Duration::from_millis(300);
    let a = d.start(s).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    // Held through the whole stop: the service finishes open connections after SIGTERM,
    // so it outlives the grace.
    let conn = held(&fx.addr(1));
    let r = d.stop(&a.id, || 1).await.unwrap();
    drop(conn);
    assert_eq!((r.drain_end, r.active_at_end), (DrainEnd::Deadline, 1), "{r:?}");
    assert!(r.prestop + r.drain >= Duration::from_millis(390) && r.drain < Duration::from_secs(1), "{r:?}");
    assert!(r.killed && r.term >= Duration::from_millis(290) && r.term < Duration::from_secs(1), "{r:?}");
    fx.assert_gone(&d, &a);
}

#[tokio::test]
async fn processes_that_ignore_sigterm_are_killed_after_the_grace() {
    let fx = Fixture::new("ignore-term", 7);
    let d = fx.driver();
    let mut s = spec("v1", &[]);
    // A shell and its child, both ignoring SIGTERM: everything in the cgroup must go.
    s.run.command = vec!["/bin/sh".into(), "-c".into(), "trap '' TERM; while :; do sleep 1; done".into()];
    s.health = None;
    s.grace = Duration::from_millis(300);
    let a = d.start(s).unwrap();
    let procs = fx.cgroup.join(format!("inst-{}", a.id)).join("cgroup.procs");
    eventually("shell and sleep running", Duration::from_secs(3), || {
        std::fs::read_to_string(&procs).unwrap_or_default().lines().count() >= 2
    });
    let pids: Vec<u32> = std::fs::read_to_string(&procs).unwrap().lines().map(|l| l.parse().unwrap()).collect();
    let r = d.stop(&a.id, || 0).await.unwrap();
    assert!(r.killed, "{r:?}");
    assert!(r.term >= Duration::from_millis(290) && r.term < Duration::from_secs(1), "{r:?}");
    assert!(r.kill < Duration::from_secs(1), "{r:?}");
    for pid in pids {
        assert!(!alive(pid), "{pid} survived");
    }
    fx.assert_gone(&d, &a);
}

#[tokio::test]
async fn exec_and_tcp_checks_and_an_exec_prestop_hook() {
    let fx = Fixture::new("exec", 8);
    let d = fx.driver();
    let marker = fx.dir.join("prestop-ran");
    let mut s = spec("v1", &[]);
    s.health =
        Some(Health::Exec(vec!["/bin/sh".into(), "-c".into(), format!("test \"$HITLESS_ADDRESS\" = {}", fx.addr(1))]));
    s.prestop = Some(PreStop::Exec(vec![
        "/bin/sh".into(),
        "-c".into(),
        format!("echo \"$HITLESS_SERVICE {{address}}\" > {}", marker.display()),
    ]));
    let a = d.start(s).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    let mut t = spec("v1", &[]);
    t.health = None; // a TCP connect
    let b = d.start(t).unwrap();
    d.wait_healthy(&b.id, Duration::from_secs(5)).await.unwrap();
    assert_eq!(get(&fx.addr(2), "/").0, 200);

    let r = d.stop(&a.id, || 0).await.unwrap();
    assert!(r.prestop_error.is_none(), "{r:?}");
    assert_eq!(std::fs::read_to_string(&marker).unwrap(), format!("web {}\n", fx.addr(1)));
    fx.assert_gone(&d, &a);
    d.stop(&b.id, || 0).await.unwrap();
    fx.assert_gone(&d, &b);
    assert!(matches!(d.stop(&b.id, || 0).await, Err(DriverError::UnknownInstance(_))));
}

#[test]
fn bad_inputs_are_refused_with_what_to_do() {
    let fx = Fixture::new("bad", 9);
    let err = Driver::open("n", &fx.cgroup, "127.150.9.0", &fx.state()).err().unwrap().to_string();
    assert!(err.contains("127.150.9.0") && err.contains("CIDR"), "{err}");
    let err = Driver::open("n", Path::new("/tmp"), &fx.pool, &fx.state()).err().unwrap().to_string();
    assert!(err.contains("/tmp") && err.contains("--workload-cgroup"), "{err}");
    let d = fx.driver();
    let mut s = spec("v1", &[]);
    s.service = "we/b".into();
    assert!(d.start(s).unwrap_err().to_string().contains("service name"));
    let mut s = spec("v1", &[]);
    s.run.command = vec!["/nonexistent/program".into()];
    let err = d.start(s).unwrap_err().to_string();
    assert!(err.contains("/nonexistent/program") && err.contains("run.command"), "{err}");
    assert!(d.list().is_empty(), "a failed start leaves nothing");
    assert_eq!(std::fs::read_dir(&fx.cgroup).unwrap().flatten().filter(|e| e.path().is_dir()).count(), 0);
}

/// One request on a kept-alive connection: (status, `Connection` header, body).
fn request(s: &mut TcpStream, path: &str) -> std::io::Result<(u16, String, String)> {
    write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n")?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let header = |name: &str| {
        head.lines()
            .find_map(|l| {
                l.split_once(':').filter(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_default()
    };
    let mut body = vec![0u8; header("content-length").parse().unwrap_or(0)];
    s.read_exact(&mut body)?;
    let code = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((code, header("connection"), String::from_utf8_lossy(&body).into_owned()))
}

#[tokio::test]
async fn the_test_service_keeps_alive_resets_half_and_finishes_requests_on_sigterm() {
    let fx = Fixture::new("testsvc", 10);
    let d = fx.driver();
    let mut s = spec("v9", &["--reset-half"]);
    s.health = None; // TCP: its one accepted connection is the first of the service
    let a = d.start(s).unwrap();
    d.wait_healthy(&a.id, Duration::from_secs(5)).await.unwrap();
    let addr = fx.addr(1);

    // Every second connection is reset; the others answer request after request.
    let mut kept = Vec::new();
    let mut resets = 0;
    for _ in 0..4 {
        let mut c = TcpStream::connect((addr.as_str(), PORT)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        match request(&mut c, "/") {
            Ok(answer) => {
                assert_eq!(answer, (200, "keep-alive".to_string(), format!("v9 {addr}:{PORT}\n")));
                assert_eq!(request(&mut c, "/healthz").unwrap().0, 200);
                assert_eq!(request(&mut c, "/x").unwrap().2, format!("v9 {addr}:{PORT}\n"));
                kept.push(c);
            }
            Err(e) => {
                assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}");
                resets += 1;
            }
        }
    }
    assert_eq!((kept.len(), resets), (2, 2));

    // SIGTERM: no new connections, open ones are answered (then closed) until the last goes.
    // SAFETY: kill with a pid and a signal.
    assert_eq!(unsafe { libc::kill(a.pid as i32, libc::SIGTERM) }, 0);
    eventually("listener closed", Duration::from_secs(3), || TcpStream::connect((addr.as_str(), PORT)).is_err());
    let mut last = kept.pop().unwrap();
    assert_eq!(request(&mut kept[0], "/drain").unwrap().1, "close");
    drop(kept);
    assert!(alive(a.pid), "exited with a connection still open");
    let (code, connection, _) = request(&mut last, "/").unwrap();
    assert_eq!((code, connection.as_str()), (200, "close"));
    let mut rest = Vec::new();
    assert_eq!(last.read_to_end(&mut rest).unwrap(), 0, "closed after the answer");
    eventually("exit", Duration::from_secs(3), || d.get(&a.id).unwrap().state == InstanceState::Crashed);
    assert_eq!(d.get(&a.id).unwrap().exit.as_deref(), Some("exited with status 0"));
    d.stop(&a.id, || 0).await.unwrap();
    fx.assert_gone(&d, &a);
}
