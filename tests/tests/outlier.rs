//! Per-node outlier isolation in the real kernel. Run as root.

use std::time::{Duration, Instant};

use hitless_agent::outlier::Outliers;
use hitless_agent::writer::{Maps, Writer};
use hitless_tests::{connects, serve, Node};

#[test]
fn a_refusing_backend_is_isolated_on_the_node_then_returns_and_never_the_last_one() {
    let mut node = Node::new("outlier");
    node.agent_args(&["--outlier-period", "1s"]);
    let good = "127.137.0.1:8080";
    let bad = "127.137.0.2:8080";
    let alone = "127.137.0.3:8080";
    let _srv = serve(Some(&node.cgroup), &[good], &[]);
    node.write_registry(&format!(
        "services:\n  - name: cart\n    vips: [\"127.77.80.1:8080\"]\n    backends: [{{ address: \"{good}\" }}, {{ address: \"{bad}\" }}]\n  - name: solo\n    vips: [\"127.77.80.2:8080\"]\n    backends: [{{ address: \"{alone}\" }}]\n"
    ));
    node.start_agent();

    // Nothing listens on `bad`: its connects are refused until it is isolated.
    let first = connects(Some(&node.cgroup), "127.77.80.1:8080", 20);
    assert!(first.failed >= 2, "the failures that trigger isolation: {first:?}");
    std::thread::sleep(Duration::from_millis(200));
    let s = connects(Some(&node.cgroup), "127.77.80.1:8080", 300);
    assert_eq!((s.ok, s.from(good)), (300, 300), "isolated: every connect goes to the healthy backend: {s:?}");

    // It recovers; after the period it gets traffic again.
    let _back = serve(Some(&node.cgroup), &[bad], &[]);
    std::thread::sleep(Duration::from_millis(1300));
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = connects(Some(&node.cgroup), "127.77.80.1:8080", 100);
        assert_eq!(s.failed, 0, "{s:?}");
        if s.from(bad) > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the recovered backend never got traffic back: {s:?}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The last serving backend of a service is never isolated: its VIP keeps dialling it.
    for _ in 0..3 {
        let s = connects(Some(&node.cgroup), "127.77.80.2:8080", 10);
        assert_eq!(s.errors.get("ConnectionRefused"), Some(&10), "{s:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // The agent's text log is coloured (ANSI escapes between a field's name, `=` and
    // its value): match on the log without them, or `backend=` never matches.
    let log = plain(&node.log());
    assert!(log.contains(&format!("backend={bad}")), "the check below must be able to match:\n{log}");
    assert!(!log.contains(&format!("backend={alone}")), "the only backend of solo was isolated:\n{log}");
    assert!(log.contains("isolated on this node"), "{log}");
}

/// `text` without ANSI escape sequences (ESC `[` ... final byte).
fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[test]
fn coordinator_mode_isolates_per_node_too() {
    let coord = hitless_tests::Coordinator::start("outlier", "127.130.20.1:7070");
    let good = "127.137.1.1:8080";
    let bad = "127.137.1.2:8080";
    let file = std::env::temp_dir().join(format!("hitless-outlier-{}.yaml", std::process::id()));
    std::fs::write(
        &file,
        format!("services:\n  - name: cart\n    vips: [\"127.77.81.1:8080\"]\n    backends: [{{ address: \"{good}\" }}, {{ address: \"{bad}\" }}]\n"),
    )
    .expect("registry");
    let out = coord.cli(&["registry", "apply", file.to_str().expect("utf-8")]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success());
    let mut a = Node::new("outlier-a");
    let mut b = Node::new("outlier-b");
    let _srv = serve(None, &[good], &[]);
    for n in [&mut a, &mut b] {
        n.agent_args(&["--outlier-period", "30s"]);
        n.follow(&coord.url);
        n.spawn_agent();
    }
    coord.wait_synced(2);
    // Node a's clients hit the dead instance and isolate it there; node b never dialled it.
    let first = connects(Some(&a.cgroup), "127.77.81.1:8080", 20);
    assert!(first.failed >= 2, "{first:?}");
    std::thread::sleep(Duration::from_millis(300));
    let s = connects(Some(&a.cgroup), "127.77.81.1:8080", 200);
    assert_eq!((s.ok, s.failed), (200, 0), "isolated on node a: {s:?}\n{}", plain(&a.log()));
    let other = connects(Some(&b.cgroup), "127.77.81.1:8080", 200);
    assert!(other.failed > 0, "node b has not isolated it (per-node decision): {other:?}");
}

/// Issue 12: a coordinator session looks at the counters every 50 ms, the first time
/// after its first apply. Failed connects between that apply and that look were taken
/// for history, so the dead backend was never isolated and node a refused about half
/// of its VIP connects (95 of 200 in the flake). This drives the agent's own writer and
/// detector in that order, deterministically.
#[test]
fn failures_between_the_first_apply_and_the_first_look_count() {
    let mut node = Node::new("outlier-first");
    let good = "127.137.2.1:8080";
    let bad = "127.137.2.2:8080";
    let vip = "127.77.82.1:8080";
    let _srv = serve(None, &[good], &[]);
    let text = format!(
        "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    backends: [{{ address: \"{good}\" }}, {{ address: \"{bad}\" }}]\n"
    );
    node.write_registry(&text);
    node.start_agent();
    // From here on this process is the node's agent: its writer and its detector.
    node.kill_agent();
    let wanted =
        hitless_agent::desired::from_registry(&hitless_agent::registry::Registry::parse(&text).expect("registry"));

    // Failures before the agent started are history.
    let old = connects(Some(&node.cgroup), vip, 20);
    assert!(old.failed >= 2, "{old:?}");
    let mut writer = Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer");
    let mut outliers = Outliers::new(2, Duration::from_secs(30));
    let revision = writer.maps().revision().expect("revision") + 1;
    writer.apply(&outliers.overlay(&wanted), revision).expect("first apply");
    // The agent's clients fail right after its first apply, before its first look.
    let first = connects(Some(&node.cgroup), vip, 20);
    assert!(first.failed >= 2, "{first:?}");
    assert!(outliers.observe(writer.maps(), &wanted, Instant::now()), "failures after the first apply were ignored");
    let bad_ep = hitless_agent::abi::Endpoint::new(bad.parse().expect("addr"), hitless_agent::abi::PROTO_TCP);
    assert_eq!(outliers.isolated().into_iter().collect::<Vec<_>>(), vec![bad_ep]);
    writer.apply(&outliers.overlay(&wanted), revision).expect("isolating apply");
    let s = connects(Some(&node.cgroup), vip, 200);
    assert_eq!((s.ok, s.failed), (200, 0), "{s:?}");

    // A restarted agent does not isolate for what it did not see.
    let writer = Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer");
    let mut restarted = Outliers::new(2, Duration::from_secs(30));
    assert!(!restarted.observe(writer.maps(), &wanted, Instant::now()));
    assert!(restarted.isolated().is_empty());
}

/// Issue 13.2: an idle agent costs nothing. At 1,000 services x 10 backends the
/// static-mode loop used to read every serving backend's counters (a per-CPU hash
/// lookup each, 10,000 per look) every 20 ms. Now it sleeps on the datapath's failure
/// signals: this drives the agent's own loop ([`Watcher`]) on a real node and counts
/// the counter lookups it makes: none while idle, none for successful connects, one for
/// a backend that fails (however many of its connects fail), none while it is isolated,
/// one when it returns.
#[test]
fn an_idle_agent_reads_no_counters() {
    use hitless_agent::static_mode::Watcher;

    let mut node = Node::new("outlier-idle");
    let good = "127.139.0.1:8080";
    let bad = "127.139.0.2:8080";
    let other = "127.139.0.3:8080";
    let vip = "127.76.0.1:8080";
    let _srv = serve(None, &[good, other], &[]);
    let mut text = format!(
        "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    backends: [{{ address: \"{good}\" }}, {{ address: \"{bad}\" }}]\n  - name: one\n    vips: [\"127.76.0.2:8080\"]\n    backends: [{{ address: \"{other}\" }}]\n"
    );
    // 998 more services of 10 backends: 1,000 services, 9,983 backends.
    for s in 2..1000u32 {
        let (a, b) = (s / 250, s % 250);
        let backends: Vec<String> =
            (0..10).map(|i| format!("{{ address: \"127.139.{}.{}:{}\" }}", 1 + a, b, 9000 + i)).collect();
        text.push_str(&format!(
            "  - name: s{s}\n    vips: [\"127.76.{}.{}:8080\"]\n    backends: [{}]\n",
            1 + a,
            b,
            backends.join(", ")
        ));
    }
    node.write_registry(&text);
    node.start_agent();
    // From here on this process is the node's agent: its writer, detector and loop.
    node.kill_agent();
    let reg = hitless_agent::registry::Registry::parse(&text).expect("registry");
    let mut writer = Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer");
    let mut outliers = Outliers::new(2, Duration::from_secs(1));
    let metrics = hitless_agent::metrics::State::default();

    // The counter sees a full look: the old loop's, at every poll.
    let wanted = hitless_agent::desired::from_registry(&reg);
    let before = writer.maps().stats_reads();
    outliers.observe(writer.maps(), &wanted, Instant::now());
    assert_eq!(writer.maps().stats_reads() - before, 9_983, "one lookup per serving backend");

    let poll = Duration::from_millis(20);
    let mut w = Watcher::new(&node.registry(), &mut writer, poll, &metrics, &node.name, reg, &mut outliers);
    let turns = |w: &mut Watcher<'_>, for_: Duration| {
        let (end, mut n) = (Instant::now() + for_, 0);
        while Instant::now() < end {
            w.turn();
            n += 1;
        }
        n
    };
    let reads = |w: &Watcher<'_>| w.maps().stats_reads();

    // Idle: 1 s of turns, no counter read.
    let r0 = reads(&w);
    let n = turns(&mut w, Duration::from_secs(1));
    // With inotify on the file's directory the loop wakes on a change (or once a second
    // as a safety net), not at every 20 ms poll.
    assert!((1..=3).contains(&n), "the idle loop wakes once a second at most: {n} turns in 1 s");
    assert_eq!(reads(&w) - r0, 0, "idle: no counter read in {n} turns");

    // Successful connects signal nothing.
    let ok = connects(Some(&node.cgroup), "127.76.0.2:8080", 50);
    assert_eq!(ok.ok, 50, "{ok:?}");
    turns(&mut w, Duration::from_millis(300));
    assert_eq!(reads(&w) - r0, 0, "successful connects made the agent read counters");

    // Failures: one signal for the failing backend however many of its connects fail,
    // one read, isolated.
    let bad_ep = hitless_agent::abi::Endpoint::new(bad.parse().expect("addr"), hitless_agent::abi::PROTO_TCP);
    let s = connects(Some(&node.cgroup), vip, 40);
    assert!(s.failed >= 2, "{s:?}");
    let r1 = reads(&w);
    w.turn();
    assert_eq!(reads(&w) - r1, 1, "{} failed connects cost one read of the failing backend", s.failed);
    assert_eq!(w.outliers().isolated().into_iter().collect::<Vec<_>>(), vec![bad_ep]);
    let isolated_at = Instant::now();
    let s = connects(Some(&node.cgroup), vip, 100);
    assert_eq!((s.ok, s.failed), (100, 0), "isolated: every connect goes to the healthy backend: {s:?}");

    // Isolated and idle: nothing read until its period ends (a timer, not a poll: a poll
    // would read at each of the ~30 turns). One more read is allowed: a flag insert that
    // meets its bucket locked by the same CPU (-EBUSY, under load) signals again rather
    // than lose the failure (see signal_failure in sockops.bpf.c).
    turns(&mut w, Duration::from_millis(600));
    let extra = reads(&w) - r1 - 1;
    assert!(extra <= 1, "no read while the backend is isolated ({extra} reads in ~30 turns)");
    while !w.outliers().isolated().is_empty() {
        assert!(isolated_at.elapsed() < Duration::from_secs(3), "never returned");
        w.turn();
    }
    assert!(isolated_at.elapsed() >= Duration::from_millis(950), "returned early: {:?}", isolated_at.elapsed());
    assert_eq!(reads(&w) - r1 - extra, 2, "its return reads the returning backend only");
    let r2 = reads(&w);
    turns(&mut w, Duration::from_millis(500));
    assert_eq!(reads(&w) - r2, 0, "idle again: no counter read");
}

/// Issue 13.2, coordinator mode: what a session awaits ([`FailureWatch::ready`] in its
/// `tokio::select!`) does not wake while nothing fails, wakes on a failed connect
/// (also one made before the session's first look, issue 12), and wakes again when the
/// isolated backend is due back; each look reads the failing backend's counters only.
#[test]
fn a_session_wakes_on_failures_and_deadlines_only() {
    use hitless_agent::outlier::FailureWatch;

    let mut node = Node::new("outlier-watch");
    let good = "127.139.5.1:8080";
    let bad = "127.139.5.2:8080";
    let vip = "127.76.5.1:8080";
    let _srv = serve(None, &[good], &[]);
    let text = format!(
        "services:\n  - name: cart\n    vips: [\"{vip}\"]\n    backends: [{{ address: \"{good}\" }}, {{ address: \"{bad}\" }}]\n"
    );
    node.write_registry(&text);
    node.start_agent();
    node.kill_agent();
    let wanted =
        hitless_agent::desired::from_registry(&hitless_agent::registry::Registry::parse(&text).expect("registry"));
    let bad_ep = hitless_agent::abi::Endpoint::new(bad.parse().expect("addr"), hitless_agent::abi::PROTO_TCP);
    let mut writer = Writer::new(Maps::open(&node.pin_dir).expect("maps")).expect("writer");
    let mut outliers = Outliers::new(2, Duration::from_secs(1));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let quiet = |ms| Duration::from_millis(ms);
        let mut fw = FailureWatch::open(writer.maps().pin_dir(), quiet(50)).expect("failure signals");
        let revision = writer.maps().revision().expect("revision") + 1;
        writer.apply(&outliers.overlay(&wanted), revision).expect("first apply");
        let r0 = writer.maps().stats_reads();
        assert!(tokio::time::timeout(quiet(500), fw.ready(outliers.next_deadline())).await.is_err(), "woke while idle");
        let ok = connects(Some(&node.cgroup), good, 20);
        assert_eq!(ok.ok, 20, "{ok:?}");
        assert!(tokio::time::timeout(quiet(300), fw.ready(None)).await.is_err(), "woke on successful connects");
        assert_eq!(writer.maps().stats_reads(), r0);

        // Failures (before any look of this session): a wake, one read, isolated.
        let s = connects(Some(&node.cgroup), vip, 40);
        assert!(s.failed >= 2, "{s:?}");
        tokio::time::timeout(quiet(1000), fw.ready(outliers.next_deadline())).await.expect("no wake on failures");
        assert!(fw.look(&mut outliers, writer.maps(), &wanted, Instant::now()), "not isolated");
        let isolated_at = Instant::now();
        assert_eq!(writer.maps().stats_reads() - r0, 1);
        assert_eq!(outliers.isolated().into_iter().collect::<Vec<_>>(), vec![bad_ep]);
        writer.apply(&outliers.overlay(&wanted), revision).expect("isolating apply");
        let s = connects(Some(&node.cgroup), vip, 100);
        assert_eq!((s.ok, s.failed), (100, 0), "{s:?}");

        // The next wake is the deadline, and the look gives the backend traffic back.
        fw.ready(outliers.next_deadline()).await;
        assert!(isolated_at.elapsed() >= quiet(950), "woke early: {:?}", isolated_at.elapsed());
        assert!(fw.look(&mut outliers, writer.maps(), &wanted, Instant::now()), "did not return");
        assert!(outliers.isolated().is_empty());
        assert_eq!(outliers.next_deadline(), None);
        assert_eq!(writer.maps().stats_reads() - r0, 2, "the return reads the returning backend only");
        assert!(tokio::time::timeout(quiet(300), fw.ready(None)).await.is_err(), "woke while idle again");
    });
}
