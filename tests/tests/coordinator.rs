//! Coordinator mode end to end: a real `hitless coordinator`, real agents in their own
//! node cgroups, real backends and clients. Run as root.

use std::process::Stdio;
use std::time::{Duration, Instant};

use hitless_tests::{bin, connects, serve, Coordinator, Node, Summary};

fn registry(vip: &str, backends: &[&str]) -> String {
    let mut s = format!("services:\n  - name: cart\n    vips: [\"{vip}\"]\n    policy: steer\n    backends:\n");
    for b in backends {
        s += &format!("      - {{ address: \"{b}\", version: v1 }}\n");
    }
    s
}

/// A coordinator with `n` nodes following it, all synced to the applied registry.
fn cluster(name: &str, listen: &str, n: usize, reg: &str) -> (Coordinator, Vec<Node>) {
    let coord = Coordinator::start(name, listen);
    let file = std::env::temp_dir().join(format!("hitless-{name}-{}.yaml", std::process::id()));
    std::fs::write(&file, reg).expect("registry file");
    let out = coord.cli(&["registry", "apply", file.to_str().expect("utf-8 path")]);
    let _ = std::fs::remove_file(&file);
    assert!(out.status.success(), "registry apply: {}", String::from_utf8_lossy(&out.stderr));
    let mut nodes = Vec::new();
    for i in 0..n {
        let mut node = Node::new(&format!("{name}-{i}"));
        node.follow(&coord.url);
        node.spawn_agent();
        nodes.push(node);
    }
    coord.wait_synced(n);
    (coord, nodes)
}

#[test]
fn drain_returns_when_every_node_has_it_and_undrain_brings_it_back() {
    let b = ["127.131.1.1:8080", "127.131.1.2:8080", "127.131.1.3:8080"];
    let vip = "127.77.31.1:8080";
    let _srv = serve(None, &b, &[]);
    let (coord, nodes) = cluster("drain3", "127.130.1.1:7070", 3, &registry(vip, &b));
    for n in &nodes {
        let s = connects(Some(&n.cgroup), vip, 100);
        assert_eq!(s.ok, 100, "{}: {s:?}", n.name);
    }

    let d = coord.json(&["drain", "cart", b[2], "-o", "json"]);
    assert_eq!(d["complete"], true, "{d}");
    let acks = d["nodes"].as_array().expect("nodes");
    assert_eq!(acks.len(), 3, "{d}");
    assert!(acks.iter().all(|a| a["acked"] == true), "every node acked: {d}");
    for n in &nodes {
        let s = connects(Some(&n.cgroup), vip, 1000);
        assert_eq!((s.ok, s.from(b[2])), (1000, 0), "{}: a drained backend got new connects: {s:?}", n.name);
    }

    let u = coord.json(&["undrain", "cart", b[2], "-o", "json"]);
    assert_eq!(u["complete"], true, "{u}");
    for n in &nodes {
        let s = connects(Some(&n.cgroup), vip, 300);
        assert!(s.from(b[2]) > 0, "{}: undrained backend is back: {s:?}", n.name);
    }
}

fn loops(nodes: &[Node], vip: &str, stop: &std::path::Path) -> Vec<std::process::Child> {
    nodes
        .iter()
        .map(|n| {
            n.cgroup
                .command(bin("hitless-probe"))
                .args(["loop", vip, "--max-secs", "60", "--stop-file"])
                .arg(stop)
                .stdout(Stdio::piped())
                .spawn()
                .expect("client loop")
        })
        .collect()
}

fn finish(children: Vec<std::process::Child>, stop: &std::path::Path) -> Vec<Summary> {
    std::fs::write(stop, "").expect("stop file");
    children
        .into_iter()
        .map(|c| serde_json::from_slice(&c.wait_with_output().expect("loop").stdout).expect("summary"))
        .collect()
}

#[test]
fn killing_the_coordinator_or_an_agent_loses_nothing() {
    let b = ["127.131.2.1:8080", "127.131.2.2:8080"];
    let vip = "127.77.32.1:8080";
    let _srv = serve(None, &b, &[]);
    let (mut coord, mut nodes) = cluster("kill", "127.130.2.1:7070", 3, &registry(vip, &b));
    let d = coord.json(&["drain", "cart", b[1], "-o", "json"]);
    assert_eq!(d["complete"], true, "{d}");
    let before = coord.revision();
    let listed = coord.json(&["registry", "list", "-o", "json"]);

    // SIGKILL the coordinator under load: every node keeps steering (fail static).
    let stop = std::env::temp_dir().join(format!("hitless-kill-stop-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let clients = loops(&nodes, vip, &stop);
    std::thread::sleep(Duration::from_millis(300));
    coord.kill();
    std::thread::sleep(Duration::from_millis(700));
    coord.restart();
    let rev = coord.wait_synced(3);
    std::thread::sleep(Duration::from_millis(200));
    for (n, s) in nodes.iter().zip(finish(clients, &stop)) {
        assert!(s.ok > 50, "{}: the loop ran: {s:?}", n.name);
        assert_eq!(s.failed, 0, "{}: connects failed while the coordinator was down: {s:?}", n.name);
        assert_eq!(s.from(b[1]), 0, "{}: the drained backend got connects: {s:?}", n.name);
    }
    let _ = std::fs::remove_file(&stop);

    // Same data dir: same revision, same registry; no node went backwards.
    assert_eq!(rev, before, "the revision survives a SIGKILL");
    assert_eq!(coord.json(&["registry", "list", "-o", "json"]), listed, "the registry survives a SIGKILL");
    for n in &nodes {
        assert_eq!(n.revision(), before, "{}: maps hold the registry revision", n.name);
    }

    // SIGKILL one agent and start it again: it resyncs from what its maps hold.
    nodes[0].kill_agent();
    let d = coord.json(&["undrain", "cart", b[1], "-o", "json"]);
    assert_eq!(d["complete"], true, "a lost node does not block the barrier: {d}");
    let lost: Vec<&serde_json::Value> =
        d["nodes"].as_array().expect("nodes").iter().filter(|a| a["connected"] == false).collect();
    assert_eq!(lost.len(), 1, "the killed node is reported, not skipped: {d}");
    nodes[0].spawn_agent();
    let rev = coord.wait_synced(3);
    assert_eq!(nodes[0].revision(), rev);
    let s = connects(Some(&nodes[0].cgroup), vip, 200);
    assert!(s.from(b[1]) > 0, "the restarted agent applied the undrain: {s:?}");
}

#[test]
fn an_instance_whose_heartbeats_stop_leaves_every_node() {
    let b = ["127.131.3.1:8080", "127.131.3.2:8080"];
    let vip = "127.77.33.1:8080";
    let _srv = serve(None, &b, &[]);
    let (coord, nodes) = cluster("lease", "127.130.3.1:7070", 2, &registry(vip, &b[..1]));
    let out = coord.cli(&["registry", "register", "cart", b[1], "--ttl", "1s", "--version", "v1"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    coord.wait_synced(2);
    for n in &nodes {
        assert!(connects(Some(&n.cgroup), vip, 200).from(b[1]) > 0, "registered instance serves");
    }
    // No heartbeat: the lease lapses, the instance goes down on every node.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = coord.json(&["registry", "list", "-o", "json"]);
        let down = list["services"][0]["instances"]
            .as_array()
            .is_some_and(|v| v.iter().any(|i| i["address"] == b[1] && i["state"] == "down"));
        if down {
            break;
        }
        assert!(Instant::now() < deadline, "lease never lapsed: {list}");
        std::thread::sleep(Duration::from_millis(50));
    }
    coord.wait_synced(2);
    for n in &nodes {
        let s = connects(Some(&n.cgroup), vip, 300);
        assert_eq!((s.ok, s.from(b[1])), (300, 0), "{}: {s:?}", n.name);
    }
}

#[test]
fn bad_requests_name_the_field_and_change_nothing() {
    let coord = Coordinator::start("bad", "127.130.4.1:7070");
    let before = coord.revision();
    let file = std::env::temp_dir().join(format!("hitless-bad-{}.yaml", std::process::id()));
    std::fs::write(&file, "services:\n  - name: cart\n    polcy: steer\n").expect("file");
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["registry", "apply", file.to_str().expect("utf-8")],
            "services[0].polcy: unknown field `polcy`; did you mean `policy`?",
        ),
        (
            vec!["registry", "register", "Cart", "127.131.4.1:80"],
            "instance.service: \"Cart\" is not a valid service name",
        ),
        (
            vec!["registry", "register", "cart", "localhost:80"],
            "instance.address: \"localhost:80\" is not an IP address",
        ),
        (
            vec!["registry", "register", "cart", "127.131.4.1:80", "--weight", "2000000"],
            "instance.weight: weight 2000000 is out of range",
        ),
        (vec!["drain", "cart", "127.131.4.9:80"], "instance 127.131.4.9:80 of service cart is not registered"),
        (vec!["registry", "deregister", "cart", "nonsense"], "key.address: \"nonsense\" is not an IP address"),
    ];
    for (args, want) in cases {
        let out = coord.cli(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(err.contains(want), "{args:?}: want {want:?} in {err}");
    }
    let _ = std::fs::remove_file(&file);
    assert_eq!(coord.revision(), before, "bad requests change nothing");
}

#[test]
fn health_reports_serving_and_reflection_lists_every_service() {
    use tonic_health::pb::{health_check_response::ServingStatus, health_client::HealthClient, HealthCheckRequest};
    use tonic_reflection::pb::v1::{
        server_reflection_client::ServerReflectionClient, server_reflection_request::MessageRequest,
        server_reflection_response::MessageResponse, ServerReflectionRequest,
    };

    let coord = Coordinator::start("grpc", "127.130.5.1:7070");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    rt.block_on(async {
        let channel =
            tonic::transport::Channel::from_shared(coord.url.clone()).expect("url").connect().await.expect("dial");
        let mut health = HealthClient::new(channel.clone());
        for service in ["", "hitless.v1.Registry", "hitless.v1.AgentLink", "hitless.v1.Coordinator"] {
            let r = health.check(HealthCheckRequest { service: service.into() }).await.expect("health check");
            assert_eq!(r.into_inner().status(), ServingStatus::Serving, "{service:?}");
        }
        let mut refl = ServerReflectionClient::new(channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = refl.server_reflection_info(tokio_stream_once(req)).await.expect("reflection").into_inner();
        let msg = stream.message().await.expect("reply").expect("one reply");
        let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
            panic!("not a service list: {msg:?}")
        };
        let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
        for want in ["hitless.v1.Registry", "hitless.v1.AgentLink", "hitless.v1.Coordinator", "grpc.health.v1.Health"] {
            assert!(names.iter().any(|n| n == want), "{want} missing from {names:?}");
        }
    });
}

/// A one-message request stream.
fn tokio_stream_once<T: Send + 'static>(
    item: T,
) -> impl tonic::codegen::tokio_stream::Stream<Item = T> + Send + 'static {
    tonic::codegen::tokio_stream::iter(vec![item])
}

#[test]
fn a_registry_larger_than_one_message_is_applied_in_parts_and_a_too_large_one_is_refused_plainly() {
    let coord = Coordinator::start("big", "127.130.7.1:7070");
    // 600 services × 40 instances: about 1.3 MB of YAML, more than one Apply request
    // carries (1 MiB).
    let mut text = String::from("services:\n");
    for s in 0..600 {
        text += &format!("  - name: s{s}\n    backends:\n");
        for i in 0..40 {
            text +=
                &format!("      - {{ address: \"127.{}.{}.{}:8080\", version: v1 }}\n", 140 + s / 250, s % 250, i + 1);
        }
    }
    assert!(text.len() > 1 << 20, "{} bytes", text.len());
    let file = std::env::temp_dir().join(format!("hitless-big-{}.yaml", std::process::id()));
    std::fs::write(&file, &text).expect("file");
    let out = coord.cli(&["registry", "apply", file.to_str().expect("utf-8")]);
    assert!(out.status.success(), "registry apply of {} bytes: {}", text.len(), String::from_utf8_lossy(&out.stderr));
    let list = coord.json(&["registry", "list", "-o", "json"]);
    let instances: usize = list["services"]
        .as_array()
        .map_or(0, |s| s.iter().map(|s| s["instances"].as_array().map_or(0, Vec::len)).sum());
    assert_eq!(instances, 24_000, "every instance applied");
    let applied = coord.revision();

    // Over the 16 MiB a registry may have: refused before anything is sent, saying
    // what was too large, the limit and what to do.
    let huge = format!("# {}\n{text}", "x".repeat(17 << 20));
    std::fs::write(&file, huge).expect("file");
    let out = coord.cli(&["registry", "apply", file.to_str().expect("utf-8")]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("is more than the 16 MiB a registry may have") && err.contains("Split"), "{err}");
    assert!(err.len() < 1000, "a short message: {err}");
    let _ = std::fs::remove_file(&file);
    assert_eq!(coord.revision(), applied, "a refused apply changes nothing");
}

#[test]
fn the_node_roster_outlives_a_restart_and_a_node_is_removed_only_once_gone() {
    use hitless_proto::v1::{self as pb, agent_link_client::AgentLinkClient, registry_client::RegistryClient};
    use tonic::codegen::tokio_stream;

    let mut coord = Coordinator::start("roster", "127.130.8.1:7070");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().expect("runtime");
    let roster = |coord: &Coordinator| -> Vec<(String, bool)> {
        let v = coord.json(&["node", "list", "-o", "json"]);
        let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
        nodes.iter().map(|n| (n["node"].as_str().unwrap_or("").to_owned(), n["connected"] == true)).collect()
    };
    let wait_roster = |coord: &Coordinator, want: &[(&str, bool)]| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let now = roster(coord);
            if now.iter().map(|(n, c)| (n.as_str(), *c)).eq(want.iter().copied()) {
                return;
            }
            assert!(Instant::now() < deadline, "roster {now:?}, want {want:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    // An agent of node-r says hello and keeps its session open until `close` is sent
    // (no kernel needed here).
    let (close, outbound) = tokio::sync::mpsc::channel(1);
    let hello = pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Hello(pb::Hello { node: "node-r".into(), ..Default::default() })),
    };
    close.try_send(hello).expect("queued");
    let session = rt.block_on(async {
        let outbound = tokio_stream::wrappers::ReceiverStream::new(outbound);
        let mut link = AgentLinkClient::connect(coord.url.clone()).await.expect("dial");
        link.session(outbound).await.expect("session").into_inner()
    });
    wait_roster(&coord, &[("node-r", true)]);

    // Register names the node: only a node of the roster.
    let instance = |node: &str| pb::Instance {
        service: "cart".into(),
        address: "127.131.8.1:80".into(),
        state: pb::InstanceState::Serving as i32,
        weight: 100,
        node: node.into(),
        ..Default::default()
    };
    rt.block_on(async {
        let mut reg = RegistryClient::connect(coord.url.clone()).await.expect("dial");
        let e =
            reg.register(pb::RegisterRequest { instance: Some(instance("node-x")) }).await.expect_err("unknown node");
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(
            e.message().starts_with("instance.node: \"node-x\"")
                && e.message().contains("start the node's agent first, or leave node empty"),
            "{e:?}"
        );
        reg.register(pb::RegisterRequest { instance: Some(instance("node-r")) }).await.expect("a node of the roster");
    });

    // Not removed while its agent is connected and it runs a registered instance.
    let out = coord.cli(&["node", "remove", "node-r"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("its agent is connected") && err.contains("registered instances (cart 127.131.8.1:80)"),
        "{err}"
    );
    assert!(err.contains("--force"), "{err}");

    // Its agent goes away; the coordinator restarts: the node is still in the roster.
    drop((close, session));
    wait_roster(&coord, &[("node-r", false)]);
    coord.kill();
    coord.restart();
    wait_roster(&coord, &[("node-r", false)]);
    let out = coord.cli(&["node", "list"]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("node-r") && table.contains("LOST") && table.contains("ago"), "{table}");

    let out = coord.cli(&["node", "remove", "node-r"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "still runs a registered instance: {err}");
    assert!(!err.contains("its agent is connected"), "{err}");
    let out = coord.cli(&["registry", "deregister", "cart", "127.131.8.1:80"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = coord.cli(&["node", "remove", "node-r"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    wait_roster(&coord, &[]);
    coord.kill();
    coord.restart();
    wait_roster(&coord, &[]);

    let out = coord.cli(&["node", "remove", "node-r"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("not in the roster"), "{err}");
}
