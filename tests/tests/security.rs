//! Mutual TLS end to end (issue 14): certificates from `hitless certs`, a coordinator
//! with `--tls-dir`, an agent with its node's certificate, the CLI with an operator's;
//! plaintext, another CA's certificates and `--insecure` off loopback refused. Run as
//! root (the agent loads its datapath).
//!
//! Addresses: coordinator 127.130.200.1 (no other suite uses it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use hitless_tests::{bin, require_root, Coordinator, Node};

const LISTEN: &str = "127.130.200.1:7070";

/// A fresh directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("hitless-security-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Self(d)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn hitless(args: &[&str]) -> Output {
    Command::new(bin("hitless")).args(args).output().expect("run hitless")
}

fn ok(out: &Output) -> String {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `hitless certs init` with the coordinator's address, and `certs issue` for `nodes`
/// and operator ana (admin).
fn certs(dir: &Path, nodes: &[&str]) {
    let d = dir.to_str().expect("utf-8");
    ok(&hitless(&["certs", "init", "--dir", d, "--san", "127.130.200.1"]));
    for n in nodes {
        ok(&hitless(&["certs", "issue", "--dir", d, "--node", n]));
    }
    ok(&hitless(&["certs", "issue", "--dir", d, "--operator", "ana", "--role", "admin"]));
}

/// `hitless --tls-dir DIR --identity operator-ana --coordinator URL <args>`.
fn as_ana(dir: &Path, url: &str, args: &[&str]) -> Output {
    let mut all = vec!["--tls-dir", dir.to_str().expect("utf-8"), "--identity", "operator-ana", "--coordinator", url];
    all.extend_from_slice(args);
    hitless(&all)
}

#[test]
fn an_agent_and_the_cli_speak_mutual_tls_and_plaintext_or_another_ca_is_refused() {
    require_root();
    let mut node = Node::new("sec-a");
    let tls = TempDir::new("ca");
    certs(&tls.0, &[&node.name]);
    let coord = Coordinator::start_tls("security", LISTEN, &tls.0);
    let url = coord.url.clone();
    assert!(url.starts_with("https://"));

    node.follow(&url).agent_args(&["--tls-dir", tls.0.to_str().expect("utf-8")]);
    node.spawn_agent();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let out = as_ana(&tls.0, &url, &["status", "-o", "json"]);
        let text = ok(&out);
        let v: serde_json::Value = serde_json::from_str(&text).expect("json");
        let connected = v["nodes"]
            .as_array()
            .is_some_and(|n| n.iter().any(|n| n["node"] == node.name.as_str() && n["connected"] == true));
        if connected {
            break;
        }
        assert!(Instant::now() < deadline, "the agent never connected over mTLS:\n{}", node.log());
        std::thread::sleep(Duration::from_millis(100));
    }

    // Plaintext to the TLS port: no answer.
    let plain = hitless(&["--insecure", "--coordinator", &format!("http://{LISTEN}"), "status"]);
    assert!(!plain.status.success(), "plaintext was answered: {}", String::from_utf8_lossy(&plain.stdout));

    // Certificates of another CA: the CLI does not trust the coordinator's certificate
    // (and the coordinator would not trust the CLI's).
    let other = TempDir::new("other-ca");
    certs(&other.0, &[]);
    let foreign = as_ana(&other.0, &url, &["status"]);
    assert!(!foreign.status.success(), "another CA's certificate was accepted");
    assert!(stderr(&foreign).contains("cannot reach the coordinator"), "{}", stderr(&foreign));

    // No TLS flags at all: the CLI says what to give.
    let none = hitless(&["--coordinator", &url, "status"]);
    assert_eq!(none.status.code(), Some(2));
    assert!(stderr(&none).contains("--tls-dir") && stderr(&none).contains("--insecure"), "{}", stderr(&none));
}

#[test]
fn insecure_is_refused_off_loopback_naming_the_flag_and_the_fix() {
    let data = TempDir::new("insecure");
    let out =
        hitless(&["coordinator", "--insecure", "--listen", "0.0.0.0:0", "--data-dir", data.0.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("--insecure") && stderr(&out).contains("--tls-dir"), "{}", stderr(&out));
    let out = hitless(&["coordinator", "--listen", "127.0.0.1:0", "--data-dir", data.0.to_str().expect("utf-8")]);
    assert_eq!(out.status.code(), Some(2), "neither --tls-dir nor --insecure: {}", stderr(&out));
    let out = hitless(&["--insecure", "--coordinator", "http://10.1.2.3:7070", "status"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("loopback"), "{}", stderr(&out));
}

#[test]
fn certs_init_refuses_to_replace_a_ca() {
    let tls = TempDir::new("twice");
    let d = tls.0.to_str().expect("utf-8");
    ok(&hitless(&["certs", "init", "--dir", d]));
    let again = hitless(&["certs", "init", "--dir", d]);
    assert_eq!(again.status.code(), Some(2));
    assert!(stderr(&again).contains("already holds a CA"), "{}", stderr(&again));
    let bad = hitless(&["certs", "issue", "--dir", d, "--node", "Bad/Name"]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));
}
