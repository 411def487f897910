//! `hitless plan` end to end: the readable table, the pinned JSON, and exit status 2 with
//! every problem for bad input. `UPDATE_SNAPSHOTS=1` rewrites the pinned JSON.

#![allow(clippy::unwrap_used, reason = "tests fail loudly")]

use std::path::PathBuf;
use std::process::{Command, Output};

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn hitless(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_hitless")).current_dir(dir()).args(args).output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

const SHOP: [&str; 4] = ["--target", "examples/shop.yaml", "--current", "examples/shop-current.yaml"];

#[test]
fn plan_prints_a_readable_table() {
    let out = hitless(&[&["plan"][..], &SHOP, &["--strategy", "gray"]].concat());
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let t = text(&out.stdout);
    assert!(t.starts_with("strategy gray (first batch 1, then 3 batches): 6 steps, 2 gates"), "{t}");
    assert!(t.contains("STEP  SERVICE    START (new)"), "{t}");
    assert!(t.contains("⏸ after step 1: gate (strategy): approval"), "{t}");
    // Providers first: inventory before cart; storefront already runs its target.
    let (inv, cart) = (t.find("inventory").unwrap(), t.find("cart").unwrap());
    assert!(inv < cart && !t.contains("storefront"), "{t}");
}

#[test]
fn straight_warns_of_downtime() {
    let out = hitless(&[&["plan"][..], &SHOP, &["--strategy", "straight"]].concat());
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out.stdout).contains("⚠ cart: no instance serves during this step: requests fail (downtime)"));
}

#[test]
fn first_deploy_plans_from_nothing() {
    let out = hitless(&["plan", "--target", "examples/shop.yaml", "--strategy", "canary", "-o", "json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["summary"]["steps"], 3, "one wave per depends_on level");
}

#[test]
fn json_matches_the_pinned_snapshot() {
    let out = hitless(
        &[
            &["plan"][..],
            &SHOP,
            &[
                "--strategy",
                "rolling",
                "--max-surge",
                "1",
                "--max-unavailable",
                "0",
                "--gate",
                "3:analysis",
                "-o",
                "json",
            ],
        ]
        .concat(),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let got = text(&out.stdout);
    let path = dir().join("tests/snapshots/plan-shop-rolling.json");
    if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
        std::fs::write(&path, &got).unwrap();
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    assert_eq!(got, want, "the JSON schema changed; if on purpose, rerun with UPDATE_SNAPSHOTS=1 and document it");
}

#[test]
fn bad_files_report_every_problem_and_exit_2() {
    let tmp = std::env::temp_dir().join(format!("hitless-cli-{}.yaml", std::process::id()));
    let shop = std::fs::read_to_string(dir().join("examples/shop.yaml")).unwrap();
    let bad = shop
        .replace("depends_on: [inventory]", "depends_on: [inventroy]")
        .replace("node-c: 2", "node-d: 2")
        .replace("drain_deadline: 30s", "drain_deadlin: 30s");
    std::fs::write(&tmp, bad).unwrap();
    let out = hitless(&["plan", "--target", tmp.to_str().unwrap(), "--strategy", "rolling"]);
    std::fs::remove_file(&tmp).unwrap();
    assert_eq!(out.status.code(), Some(2));
    let e = text(&out.stderr);
    for want in [
        "services[1].depends_on[0]: unknown service \"inventroy\"; did you mean `inventory`?",
        "services[1].placement.node-d: unknown node \"node-d\"",
        "services[1].drain_deadlin: unknown field `drain_deadlin`; did you mean `drain_deadline`?",
    ] {
        assert!(e.contains(want), "missing {want:?} in:\n{e}");
    }
    assert_eq!(e.lines().count(), 3, "{e}");
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        &["plan", "--target", "examples/shop.yaml", "--strategy", "sideways"][..],
        &["plan", "--target", "examples/nope.yaml", "--strategy", "canary"],
        &["plan", "--target", "examples/shop.yaml", "--strategy", "canary", "--max-surge", "1"],
        &[
            "plan",
            "--target",
            "examples/shop.yaml",
            "--strategy",
            "rolling",
            "--max-surge",
            "0",
            "--max-unavailable",
            "0",
        ],
        &["plan", "--target", "examples/shop.yaml", "--strategy", "weighted", "--steps", "50,25"],
        &["plan", "--target", "examples/shop.yaml", "--strategy", "canary", "--gate", "99"],
        &["plan", "--target", "examples/shop.yaml", "--strategy", "rolling", "--max-surge", "lots"],
    ] {
        let out = hitless(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", text(&out.stderr));
        assert!(!text(&out.stderr).is_empty(), "{args:?}");
    }
}
