//! Per-node outlier isolation in the real kernel. Run as root.

use std::time::{Duration, Instant};

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
