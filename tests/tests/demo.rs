//! `hitless demo` end to end, without the display: the hitless way loses no request
//! while the conventional way loses some (and a wait long enough for every cache loses
//! none but takes longer), stale caches are steered, and a second run
//! right after the first works because the first left nothing behind. Run as root.

use std::path::Path;
use std::process::Command;

use hitless_tests::{bin, require_root};

fn demo() -> serde_json::Value {
    let out = Command::new(bin("hitless"))
        .args(["demo", "-o", "json", "--nodes", "2", "--instances", "2", "--cache-refresh", "3s"])
        .args(["--fixed-wait", "1500ms", "--warmup", "1s"])
        .output()
        .expect("run hitless demo");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "hitless demo failed: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("demo printed {stdout:?}: {e}"))
}

fn left_behind() -> Vec<String> {
    let mut found = Vec::new();
    let cg = hitless_agent::cgroup::v2_mount().expect("cgroup2").join("hitless-demo");
    if cg.exists() {
        found.push(cg.display().to_string());
    }
    if let Ok(pins) = std::fs::read_dir("/sys/fs/bpf/hitless") {
        found.extend(pins.flatten().map(|e| e.path().display().to_string()).filter(|p| p.contains("demo-node")));
    }
    let scratch = std::env::temp_dir().join("hitless-demo");
    if Path::new(&scratch).exists() {
        found.push(scratch.display().to_string());
    }
    found
}

#[test]
fn the_demo_loses_nothing_the_hitless_way_shows_the_conventional_losses_and_cleans_up() {
    require_root();
    for run in 0..2 {
        let r = demo();
        println!("run {run}: {r}");
        let (h, c) = (&r["hitless"], &r["conventional"]);
        assert_eq!(h["failed"], 0, "run {run}: the hitless way lost requests: {r}");
        assert!(h["requests"].as_u64().unwrap_or(0) > 500, "run {run}: load ran: {r}");
        assert!(h["steered"].as_u64().unwrap_or(0) > 0, "run {run}: stale caches were steered: {r}");
        assert_eq!(h["versions"].as_object().map(|v| v.contains_key("v2")), Some(true), "run {run}: v2 served: {r}");
        assert!(
            c["failed"].as_u64().unwrap_or(0) > 0,
            "run {run}: stale caches dialled stopped instances the conventional way: {r}"
        );
        assert!(h["extra_instances"].as_u64().unwrap_or(99) <= 2, "run {run}: surge bounded: {r}");
        // Waiting for every cache to refresh is safe too, and far slower than hitless.
        let safe = &r["conventional_safe"];
        assert_eq!(safe["failed"], 0, "run {run}: a wait longer than the cache refresh loses nothing: {r}");
        let (hs, ss) = (h["rollout_s"].as_f64().unwrap_or(f64::MAX), safe["rollout_s"].as_f64().unwrap_or(0.0));
        assert!(ss > hs, "run {run}: the safe wait takes longer than hitless ({ss} s vs {hs} s): {r}");
        assert_eq!(left_behind(), Vec::<String>::new(), "run {run} left these behind");
    }
}
