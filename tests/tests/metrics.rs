//! `/metrics` counts exactly what the kernel did. Run as root.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use hitless_tests::{connects, serve, Held, Node};

/// One scrape as `name{labels}` -> value.
fn scrape(addr: &str) -> BTreeMap<String, f64> {
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("");
    body.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn value(m: &BTreeMap<String, f64>, name: &str, labels: &[(&str, &str)]) -> f64 {
    m.iter()
        .filter(|(k, _)| {
            k.starts_with(&format!("{name}{{")) && labels.iter().all(|(l, v)| k.contains(&format!("{l}=\"{v}\"")))
        })
        .map(|(_, v)| *v)
        .sum()
}

#[test]
fn counters_and_gauges_move_by_exactly_what_the_test_did() {
    let mut node = Node::new("metrics");
    let addr = "127.135.1.1:9477";
    node.agent_args(&["--metrics-addr", addr]);
    let b1 = "127.135.0.1:8080";
    let _srv = serve(Some(&node.cgroup), &[b1], &[]);
    node.write_registry(&format!(
        "services:\n  - name: cart\n    vips: [\"127.77.70.1:8080\"]\n    backends: [{{ address: \"{b1}\", version: v7 }}]\n  - name: empty\n    vips: [\"127.77.70.2:8080\"]\n    backends: [{{ address: \"127.135.0.2:8080\", state: down }}]\n  - name: dead\n    backends: [{{ address: \"127.135.0.3:8080\" }}]\n"
    ));
    node.start_agent();
    let before = scrape(addr);

    let n = connects(Some(&node.cgroup), "127.77.70.1:8080", 300);
    assert_eq!(n.ok, 300);
    let m = connects(Some(&node.cgroup), "127.77.70.2:8080", 20);
    assert_eq!(m.errors.get("ConnectionRefused"), Some(&20));
    // Nothing listens on the dead service's instance: every connect is reset.
    let f = connects(Some(&node.cgroup), "127.135.0.3:8080", 10);
    assert_eq!(f.errors.get("ConnectionRefused"), Some(&10));
    let held = Held::open(&node.cgroup, "127.77.70.1:8080", 4);
    let deadline = Instant::now() + Duration::from_secs(5);
    let after = loop {
        let s = scrape(addr);
        if value(&s, "hitless_active_connections", &[("instance", b1)]) == 4.0 || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let name = node.name.clone();
    let delta = |metric: &str, service: &str| {
        value(&after, metric, &[("service", service), ("node", &name)])
            - value(&before, metric, &[("service", service), ("node", &name)])
    };
    assert_eq!(delta("hitless_connects_steered_total", "cart"), 304.0, "300 connects + 4 held");
    assert_eq!(delta("hitless_connects_refused_total", "empty"), 20.0);
    assert_eq!(delta("hitless_connects_refused_total", "cart"), 0.0);
    assert_eq!(
        value(&after, "hitless_active_connections", &[("instance", b1), ("version", "v7"), ("service", "cart")]),
        4.0
    );
    assert_eq!(value(&after, "hitless_agent_applied_revision", &[("node", &name)]), node.revision() as f64);
    // What the clients on the node saw of each instance, from sockops.
    let backend = |m: &BTreeMap<String, f64>, metric: &str, inst: &str| value(m, metric, &[("instance", inst)]);
    let d = |metric: &str, inst: &str| backend(&after, metric, inst) - backend(&before, metric, inst);
    assert_eq!(d("hitless_backend_connects_total", b1), 304.0);
    assert_eq!(d("hitless_backend_connect_failures_total", b1), 0.0);
    assert_eq!(d("hitless_backend_connect_failures_total", "127.135.0.3:8080"), 10.0);
    assert_eq!(d("hitless_backend_connect_latency_seconds_count", b1), 304.0);
    assert!(after
        .keys()
        .any(|k| k.starts_with("hitless_backend_connect_latency_seconds_bucket{") && k.contains("le=\"+Inf\"")));
    assert_eq!(d("hitless_backend_closed_connections_total", b1), 300.0, "the 300 closed, the 4 held still open");
    // The probe closes each connection abortively (SO_LINGER 0): its own aborts are no
    // resets (a gate would count them as the new version's failures).
    assert_eq!(d("hitless_backend_resets_total", b1), 0.0, "the client's own aborts are not resets");
    assert_eq!(value(&after, "hitless_agent_map_entries", &[("map", "hl_frontends")]), 2.0);
    assert!(value(&after, "hitless_agent_map_capacity", &[("map", "hl_frontends")]) > 2.0);
    let h = held.release();
    assert_eq!(h.still_working, 4);
    // A bad file counts as a reconcile error and changes nothing.
    node.write_registry("services: [{ name: cart, polcy: x }]\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while value(&scrape(addr), "hitless_agent_reconcile_errors_total", &[]) < 1.0 {
        assert!(Instant::now() < deadline, "no reconcile error counted");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn an_oversized_request_line_is_answered_without_being_read_whole() {
    let mut node = Node::new("metricsbig");
    let addr = "127.135.2.1:9477";
    node.agent_args(&["--metrics-addr", addr]);
    node.write_registry("services:\n  - name: cart\n    backends: [{ address: \"127.135.2.2:8080\" }]\n");
    node.start_agent();
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    // 64 KiB with no end of line, and the connection kept open: a server reading the
    // line whole would wait for more (until its read timeout) and answer nothing.
    let _ = c.write_all(&vec![b'A'; 64 * 1024]);
    let mut text = String::new();
    let _ = c.read_to_string(&mut text);
    assert!(text.starts_with("HTTP/1.1 404"), "an answer, not a hang-up after the read timeout: {text:?}");
    // Still serving afterwards.
    assert!(scrape(addr).contains_key(&format!("hitless_agent_applied_revision{{node=\"{}\"}}", node.name)));
}

#[test]
fn the_invariant_check_counts_slots_that_point_at_a_backend_not_serving() {
    use aya::maps::{HashMap as BpfHash, Map, MapData};
    use hitless_agent::abi::{Backend, STATE_DRAINING};
    let mut node = Node::new("invariant");
    let addr = "127.135.3.1:9477";
    node.agent_args(&["--metrics-addr", addr]);
    node.write_registry(
        "services:\n  - name: cart\n    vips: [\"127.77.70.9:8080\"]\n    backends: [{ address: \"127.135.3.2:8080\" }, { address: \"127.135.3.3:8080\", state: draining }]\n",
    );
    node.start_agent();
    assert_eq!(node.slots_to_unserving(), 0, "the agent keeps the invariant");
    let gauge = |m: &BTreeMap<String, f64>| value(m, "hitless_agent_slots_to_unserving_backends", &[]);
    assert_eq!(gauge(&scrape(addr)), 0.0);

    // Break it behind the agent's back: mark the serving backend draining in the kernel
    // while its slots still point at it. The check must see every such slot.
    let data = MapData::from_pin(node.pin_dir.join("hl_backends")).expect("pinned hl_backends");
    let mut backends: BpfHash<MapData, u32, Backend> = Map::HashMap(data).try_into().expect("hash map");
    let serving: Vec<(u32, Backend)> =
        backends.iter().filter_map(Result::ok).filter(|(_, b)| b.state != STATE_DRAINING).collect();
    assert_eq!(serving.len(), 1, "one serving backend");
    let (id, mut b) = serving[0];
    let original = b;
    b.state = STATE_DRAINING;
    backends.insert(id, b, 0).expect("write");
    let broken = node.slots_to_unserving();
    assert!(broken > 0, "the check sees slots pointing at a draining backend");
    assert_eq!(gauge(&scrape(addr)), broken as f64, "and /metrics says so");
    backends.insert(id, original, 0).expect("restore");
    assert_eq!(node.slots_to_unserving(), 0);
}

#[test]
fn a_reset_counts_only_when_the_peer_sends_it() {
    let mut node = Node::new("resets");
    let addr = "127.135.4.1:9477";
    node.agent_args(&["--metrics-addr", addr]);
    let b = "127.135.4.2:8080";
    // An HTTP server that resets every second connection instead of answering.
    let mut svc = std::process::Command::new(hitless_tests::bin("hitless-testsvc"))
        .args(["--listen", b, "--version", "v1", "--reset-half"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("hitless-testsvc");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(svc.stdout.take().expect("piped")), &mut line)
        .expect("its first line");
    assert!(line.contains("listening"), "{line}");
    let _svc = hitless_tests::Proc::new(svc);
    node.write_registry(&format!(
        "services:\n  - name: web\n    vips: [\"127.77.70.4:8080\"]\n    backends: [{{ address: \"{b}\", version: v1 }}]\n"
    ));
    node.start_agent();
    let before = scrape(addr);
    // 20 requests from the node, each closing its connection gracefully when answered.
    let mut answered = 0;
    for _ in 0..20 {
        let ok = node
            .cgroup
            .command("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "5", "http://127.77.70.4:8080/"])
            .status()
            .expect("curl")
            .success();
        answered += u32::from(ok);
    }
    assert_eq!(answered, 10, "the server answers every second connection");
    let after = scrape(addr);
    let d = |metric: &str| value(&after, metric, &[("instance", b)]) - value(&before, metric, &[("instance", b)]);
    assert_eq!(d("hitless_backend_connects_total"), 20.0);
    assert_eq!(d("hitless_backend_resets_total"), 10.0, "the server's resets, and not the graceful closes");
}

#[test]
fn ready_answers_once_the_maps_hold_a_revision() {
    let mut node = Node::new("ready");
    let addr = "127.135.5.1:9477";
    node.agent_args(&["--metrics-addr", addr]);
    node.write_registry("services:\n  - name: cart\n    backends: [{ address: \"127.135.5.2:8080\" }]\n");
    node.start_agent();
    let mut c = std::net::TcpStream::connect(addr).expect("metrics endpoint");
    c.write_all(b"GET /ready HTTP/1.1\r\nHost: x\r\n\r\n").expect("request");
    let mut text = String::new();
    c.read_to_string(&mut text).expect("response");
    assert!(text.starts_with("HTTP/1.1 200") && text.contains("revision 1"), "{text}");
}
