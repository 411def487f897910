//! Every validation error names its field, says what is wrong and how to fix it, and all
//! errors of a file are reported at once.

use hitless_model::{Architecture, Health, ModelError, PreStop};

const GOOD: &str = r#"
nodes: [node-a, node-b, node-c]
services:
  - name: inventory
    version: v1
    port: 9090
    run: { command: ["./inventory"] }
    health: { tcp: true }
    placement: { node-a: 1, node-b: 1 }
  - name: cart
    version: v2
    port: 8080
    vips: ["127.77.0.1:8080"]
    run: { command: ["./cart", "--listen", "{address}:{port}"], env: { MODE: fast, THREADS: 4 } }
    health: { http: /healthz }
    prestop: { exec: ["./drain.sh"] }
    drain_deadline: 30s
    config: { cache_size: "128" }
    depends_on: [inventory]
    placement: { node-a: 2, node-b: 2, node-c: 2 }
"#;

/// The problems of `text`, as `path: problem; fix` lines.
fn problems(text: &str) -> Vec<String> {
    match Architecture::parse(text) {
        Ok(_) => panic!("expected errors in:\n{text}"),
        Err(e) => e.problems().iter().map(ToString::to_string).collect(),
    }
}

/// Asserts one of the problems starts with `path: ` and contains every word of `words`.
fn assert_problem(text: &str, path: &str, words: &[&str]) {
    let all = problems(text);
    let hit = all.iter().any(|p| p.starts_with(&format!("{path}: ")) && words.iter().all(|w| p.contains(w)));
    assert!(hit, "no problem at {path} with {words:?}; got:\n{}", all.join("\n"));
}

fn good_with(from: &str, to: &str) -> String {
    assert!(GOOD.contains(from), "{from:?} not in the example");
    GOOD.replacen(from, to, 1)
}

#[test]
fn good_file_parses_into_types() {
    let a = Architecture::parse(GOOD).unwrap();
    assert_eq!(a.nodes, ["node-a", "node-b", "node-c"]);
    let cart = a.service("cart").unwrap();
    assert_eq!(cart.version, "v2");
    assert_eq!(cart.port, 8080);
    assert_eq!(cart.vips[0].to_string(), "127.77.0.1:8080");
    assert_eq!(cart.run.command, ["./cart", "--listen", "{address}:{port}"]);
    assert_eq!(cart.run.env["THREADS"], "4");
    assert_eq!(cart.health, Some(Health::Http("/healthz".into())));
    assert_eq!(cart.prestop, Some(PreStop::Exec(vec!["./drain.sh".into()])));
    assert_eq!(cart.drain_deadline.unwrap().as_millis(), 30_000);
    assert_eq!(cart.depends_on, ["inventory"]);
    assert_eq!(cart.instances(), 6);
    assert_eq!(a.service("inventory").unwrap().health, Some(Health::Tcp(true)));
}

#[test]
fn yaml_form_round_trips() {
    let a = Architecture::parse(GOOD).unwrap();
    assert_eq!(Architecture::parse(&a.to_yaml()).unwrap(), a);
}

#[test]
fn empty_file_is_an_empty_architecture() {
    assert_eq!(Architecture::parse("").unwrap(), Architecture::default());
}

#[test]
fn syntax_error_names_the_line() {
    let e = Architecture::parse("services: [\n  - name: x\n").unwrap_err();
    assert!(matches!(e, ModelError::Syntax(_)));
    assert!(e.to_string().contains("line"), "{e}");
}

#[test]
fn unknown_field_suggests_the_closest() {
    assert_problem(
        &good_with("depends_on: [inventory]", "depend_on: [inventory]"),
        "services[1].depend_on",
        &["unknown field", "did you mean `depends_on`"],
    );
    assert_problem(&good_with("nodes:", "node:"), "node", &["unknown field", "did you mean `nodes`"]);
    assert_problem(
        &good_with("health: { http: /healthz }", "health: { htp: /healthz }"),
        "services[1].health.htp",
        &["did you mean `http`"],
    );
    assert_problem(&good_with("env: { MODE", "envs: { MODE"), "services[1].run.envs", &["did you mean `env`"]);
    assert_problem(
        &good_with("    port: 9090", "    colour: red\n    port: 9090"),
        "services[0].colour",
        &["known fields are"],
    );
}

#[test]
fn wrong_types_name_the_field() {
    assert_problem(
        &good_with("port: 8080", "port: \"8080\""),
        "services[1].port",
        &["expected a whole number", "a string"],
    );
    assert_problem(
        &good_with("depends_on: [inventory]", "depends_on: inventory"),
        "services[1].depends_on",
        &["expected a list"],
    );
    assert_problem(
        &good_with("node-c: 2", "node-c: two"),
        "services[1].placement.node-c",
        &["expected a whole number"],
    );
    assert_problem(
        &good_with("drain_deadline: 30s", "drain_deadline: 30"),
        "services[1].drain_deadline",
        &["expected a string"],
    );
    assert_problem(
        &good_with("drain_deadline: 30s", "drain_deadline: 30 sec"),
        "services[1].drain_deadline",
        &["not a duration", "30s"],
    );
    assert_problem(&good_with("services:", "services: {}\nx:"), "services", &["expected a list"]);
    assert_problem(
        &good_with("vips: [\"127.77.0.1:8080\"]", "vips: [\"cart:8080\"]"),
        "services[1].vips[0]",
        &["not an IP address"],
    );
    assert_problem(
        &good_with("health: { tcp: true }", "health: { tcp: true, http: /x }"),
        "services[0].health",
        &["exactly one of"],
    );
}

#[test]
fn missing_fields_say_what_to_add() {
    assert_problem(&good_with("    version: v1\n", ""), "services[0].version", &["is missing", "add `version:"]);
    assert_problem(&good_with("    run: { command: [\"./inventory\"] }\n", ""), "services[0].run", &["is missing"]);
    assert_problem(&good_with("command: [\"./inventory\"]", "command: []"), "services[0].run.command", &["empty"]);
}

#[test]
fn negative_counts_are_rejected() {
    assert_problem(&good_with("node-a: 2", "node-a: -2"), "services[1].placement.node-a", &["negative", "0 to"]);
    assert_problem(&good_with("port: 9090", "port: -1"), "services[0].port", &["negative"]);
    assert_problem(&good_with("port: 9090", "port: 70000"), "services[0].port", &["out of range"]);
}

#[test]
fn duplicate_names_are_rejected() {
    assert_problem(
        &good_with("name: cart", "name: inventory"),
        "services[1].name",
        &["already defined at services[0]"],
    );
    assert_problem(&good_with("nodes: [node-a,", "nodes: [node-a, node-a,"), "nodes[1]", &["already listed"]);
    assert_problem(&good_with("name: cart", "name: Cart"), "services[1].name", &["not a valid service name"]);
}

#[test]
fn depends_on_cycles_and_unknown_services_are_rejected() {
    let cycle = good_with("    health: { tcp: true }", "    health: { tcp: true }\n    depends_on: [cart]");
    assert_problem(&cycle, "services[1].depends_on", &["dependency cycle", "inventory", "cart", "remove one"]);
    assert_eq!(problems(&cycle).len(), 1, "one cycle, one report");
    assert_problem(
        &good_with("depends_on: [inventory]", "depends_on: [inventry]"),
        "services[1].depends_on[0]",
        &["unknown service", "did you mean `inventory`"],
    );
    assert_problem(
        &good_with("depends_on: [inventory]", "depends_on: [cart]"),
        "services[1].depends_on[0]",
        &["depends on itself"],
    );
}

#[test]
fn unknown_nodes_are_rejected() {
    assert_problem(
        &good_with("node-c: 2", "node-d: 2"),
        "services[1].placement.node-d",
        &["unknown node", "did you mean `node-a`"],
    );
    assert_problem(
        &good_with("node-c: 2", "gpu-box: 2"),
        "services[1].placement.gpu-box",
        &["unknown node", "add \"gpu-box\" to `nodes`"],
    );
}

#[test]
fn port_clashes_on_a_node_are_rejected() {
    let clash = good_with("port: 9090", "port: 8080");
    assert_problem(
        &clash,
        "services[1].port",
        &["port 8080 on node \"node-a\"", "services[0] (inventory)", "another port"],
    );
    // Same port on disjoint nodes is fine.
    let disjoint = clash
        .replace("placement: { node-a: 1, node-b: 1 }", "placement: { node-d: 1 }")
        .replace("nodes: [node-a, node-b, node-c]", "nodes: [node-a, node-b, node-c, node-d]");
    Architecture::parse(&disjoint).unwrap();
}

#[test]
fn all_errors_are_reported_at_once() {
    let text = GOOD
        .replace("port: 9090", "port: -1")
        .replace("depend_on", "x")
        .replace("depends_on: [inventory]", "depends_on: [nope]")
        .replace("node-c: 2", "node-z: 2")
        .replace("drain_deadline: 30s", "drain_deadline: soon");
    let all = problems(&text);
    for path in
        ["services[0].port", "services[1].depends_on[0]", "services[1].placement.node-z", "services[1].drain_deadline"]
    {
        assert!(all.iter().any(|p| p.starts_with(path)), "{path} missing from:\n{}", all.join("\n"));
    }
    assert_eq!(all.len(), 4, "{}", all.join("\n"));
}

#[test]
fn a_huge_value_is_quoted_by_its_start_and_length_not_whole() {
    let name = "s".repeat(5 << 20);
    // A registry file whose service name is 5 MiB, and an unknown 5 MiB key.
    let registry = format!("services:\n  - name: {name}\n    backends: [{{ address: \"127.0.1.1:8080\" }}]\n");
    let e = hitless_model::registry::Registry::parse(&registry).expect_err("invalid name");
    let text = e.to_string();
    assert!(text.len() < 500, "the error is short: {} bytes", text.len());
    assert!(text.contains("(5242880 bytes)"), "it says how long the value was: {text}");
    assert!(text.contains("services[0].name"), "it names the field: {text}");
    // YAML allows implicit keys of 1,024 characters at most: a long one, shortened too.
    let key = "k".repeat(1000);
    let arch = GOOD.replace("  - name: inventory\n", &format!("  - name: inventory\n    {key}: 1\n"));
    let p = problems(&arch).join("\n");
    assert!(p.len() < 1000, "the error is short: {} bytes", p.len());
    assert!(p.contains("unknown field `kkkk") && p.contains('…'), "the key is shortened: {p}");
}

#[test]
fn protocol_and_policy_are_optional_and_checked() {
    use hitless_model::registry::{Policy, Protocol};
    let arch = Architecture::parse(GOOD).expect("good");
    assert!(arch.services.iter().all(|s| s.protocol.is_none() && s.policy.is_none()), "absent: the registry's");
    let named = good_with("    drain_deadline: 30s", "    protocol: udp\n    policy: reject\n    drain_deadline: 30s");
    let arch = Architecture::parse(&named).expect("named");
    let cart = arch.service("cart").expect("cart");
    assert_eq!((cart.protocol, cart.policy), (Some(Protocol::Udp), Some(Policy::Reject)));
    assert_eq!(Architecture::parse(&arch.to_yaml()).expect("round trip"), arch);
    let bad = good_with("    drain_deadline: 30s", "    protocol: sctp\n    policy: rejct\n    drain_deadline: 30s");
    assert_problem(&bad, "services[1].protocol", &["sctp", "tcp, udp"]);
    assert_problem(&bad, "services[1].policy", &["rejct", "reject"]);
}

#[test]
fn kubernetes_node_names_are_node_names() {
    use hitless_model::registry::valid_node_name;
    for ok in ["node-a", "ip-10-0-0-1.ec2.internal", "10-0-0-1", "gke-pool_1.zone-b", &"a".repeat(253)] {
        assert!(valid_node_name(ok), "{ok:?}");
    }
    for bad in ["", "Node-a", "-a", "a-", "a.", ".a", "a/b", "a b", "a..b/../c", &"a".repeat(254)] {
        assert!(!valid_node_name(bad), "{bad:?}");
    }
    // And an architecture may place instances on such a node.
    let arch = GOOD.replace("node-a", "ip-10-0-0-1.ec2.internal");
    let parsed = Architecture::parse(&arch);
    assert!(parsed.is_ok(), "{:?}", parsed.err());
}
