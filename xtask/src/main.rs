//! `cargo xtask`: the project's chores.
//!
//! - `cargo xtask test [-- ARGS]`: check the machine (kernel, cgroup v2, root), install the
//!   Debian packages the tests use if any is missing, then run `cargo test --workspace ARGS`
//!   (`-p PKG` in ARGS narrows it to that package); then, unless narrowed, the fail-point
//!   suite against binaries built with fail points in target/failpoints; exit with the status.
//! - `cargo xtask deps`: only install the packages the tests and CI use (as root).
//! - `cargo xtask ebpf [--check]`: compile `ebpf/*.bpf.c` into the committed
//!   `ebpf/*.bpf.o`, or check that the committed objects match their sources; then
//!   check the Rust mirrors of every shared struct against the objects' BTF.
//! - `cargo xtask demo [-- ARGS]`: build in release mode and run `hitless demo` (as root).
//! - `cargo xtask soak [--rollouts N] [--kills K] [--seed S]`: chaos at scale under nginx
//!   and wrk; one line of totals at the end, exit 1 on any loss (as root).
//! - `cargo xtask bench [datapath|propagation|metrics|planner|scale|agent|all] [-- ARGS]`: build
//!   in release mode and run the benchmarks; each prints ratios against a baseline measured in
//!   the same run, or percentiles of many repetitions (`scale`: the coordinator with 100 to
//!   10,000 simulated agents; `agent`: one agent's memory and CPU at 100 to 50,000 backends).
//! - `cargo xtask image [--tag NAME] [--base IMAGE]`: build the release binaries and the
//!   container image with buildah (`FROM scratch` by default: no registry), then check it.

mod image;
mod packages;
mod preflight;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: cargo xtask test [-- ARGS] | cargo xtask deps | cargo xtask ebpf [--check] | \
                     cargo xtask demo [-- ARGS] | cargo xtask soak [--rollouts N] [--kills K] [--seed S] | cargo xtask bench [datapath|propagation|metrics|planner|scale|agent|all] [-- ARGS] | \
                     cargo xtask image [--tag NAME] [--base IMAGE]";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("test") => test(&args[1..]),
        Some("deps") => deps().map(|()| ExitCode::SUCCESS),
        Some("ebpf") => ebpf(args.iter().any(|a| a == "--check")).map(|()| ExitCode::SUCCESS),
        Some("demo") => demo(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("soak") => soak(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("image") => image::image(&args[1..]).map(|()| ExitCode::SUCCESS),
        Some("bench") => {
            bench(args.get(1).map_or("all", String::as_str), &args[2.min(args.len())..]).map(|()| ExitCode::SUCCESS)
        }
        _ => Err(USAGE.to_owned()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("xtask: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `cargo xtask deps`: installs what the tests and CI use, and nothing else.
fn deps() -> Result<(), String> {
    packages::ensure(packages::TESTS, "the tests")?;
    println!("xtask: all present: {}", packages::TESTS.iter().map(|p| p.name).collect::<Vec<_>>().join(", "));
    Ok(())
}

/// `cargo xtask test [-- ARGS]`: preflight, packages, then `cargo test --workspace ARGS`.
fn test(rest: &[String]) -> Result<ExitCode, String> {
    let rest = rest.strip_prefix(&["--".to_owned()]).unwrap_or(rest);
    let machine = match preflight::check(true) {
        Ok(m) => m,
        Err(mut problems) => {
            let need = packages::missing(packages::TESTS);
            if !preflight::is_root() && !need.is_empty() {
                problems.push(format!(
                    "missing {}: as root, `cargo xtask test` installs them (`apt-get install --no-install-recommends {}`)",
                    packages::describe(&need),
                    packages::names(&need).join(" ")
                ));
            }
            let mut msg = preflight::report("cargo xtask test", &problems);
            if !preflight::is_root() {
                msg.push_str("\nrun it as root from the clone: `cargo xtask test` (with sudo: `sudo env PATH=\"$PATH\" cargo xtask test`)");
            }
            return Err(msg);
        }
    };
    println!(
        "xtask: preflight ok: Linux {} (>= {}.{}), cgroup v2 at {}, root",
        machine.kernel,
        preflight::MIN_KERNEL.0,
        preflight::MIN_KERNEL.1,
        machine.cgroup2.display()
    );
    packages::ensure(packages::TESTS, "the tests")?;
    let mut c = cargo();
    c.arg("test");
    // `-p PKG` in ARGS narrows the run to that package, so `--workspace` is left out then.
    let cargo_args = rest.split(|a| a == "--").next().unwrap_or_default();
    let narrowed = cargo_args
        .iter()
        .any(|a| a == "-p" || a == "--package" || a.starts_with("--package=") || (a.starts_with("-p") && a.len() > 2));
    if !narrowed {
        c.arg("--workspace");
    }
    c.args(rest);
    let status = c.status().map_err(|e| format!("running cargo test: {e}"))?;
    if status.success() && !narrowed {
        failpoints()?;
    }
    Ok(match status.code() {
        Some(0) => ExitCode::SUCCESS,
        Some(n) => ExitCode::from(u8::try_from(n).unwrap_or(1)),
        None => ExitCode::FAILURE,
    })
}

/// `tests/tests/failpoints.rs`, against the agent and the coordinator built with their
/// `failpoints` feature. Its own target directory: `target/debug` keeps the binaries
/// without fail points, which every other suite tests, and neither build relinks the other's.
fn failpoints() -> Result<(), String> {
    let dir = root().join("target/failpoints");
    let mut b = cargo();
    b.args(["build", "--target-dir"]).arg(&dir).args([
        "-p",
        "hitless-agent",
        "-p",
        "hitless-cli",
        "-p",
        "hitless-tests",
        "--bins",
        "--features",
        "hitless-agent/failpoints,hitless-coordinator/failpoints",
    ]);
    run(b, "building the agent and the coordinator with fail points")?;
    let mut t = cargo();
    t.args(["test", "--target-dir"]).arg(&dir).args([
        "-p",
        "hitless-tests",
        "--features",
        "hitless-agent/failpoints,failpoints",
        "--test",
        "failpoints",
    ]);
    run(t, "the fail-point suite (tests/tests/failpoints.rs)")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().map(Path::to_owned).unwrap_or_default()
}

fn multiarch() -> String {
    let arch = std::env::consts::ARCH;
    format!("/usr/include/{arch}-linux-gnu")
}

/// Compiles one datapath source. The flags are the contract: the same source and
/// flags give byte-identical objects, and the prefix map keeps the clone path out
/// of the debug info, so `--check` holds on any checkout.
fn compile(src: &str, out: &Path) -> Result<(), String> {
    let dir = root().join("ebpf");
    let status = Command::new("clang")
        .current_dir(&dir)
        .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
        .arg(format!("-I{}", multiarch()))
        .arg("-Iinclude")
        .arg(format!("-fdebug-prefix-map={}=.", dir.display()))
        .args(["-c", src, "-o"])
        .arg(out)
        .status()
        .map_err(|e| format!("running clang: {e} (install it: apt-get install clang libbpf-dev)"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("clang failed on ebpf/{src}"))
    }
}

fn sources() -> Result<Vec<String>, String> {
    let dir = root().join("ebpf");
    let mut v: Vec<String> = std::fs::read_dir(&dir)
        .map_err(|e| format!("reading {}: {e}", dir.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.ends_with(".bpf.c"))
        .collect();
    v.sort();
    Ok(v)
}

fn ebpf(check: bool) -> Result<(), String> {
    let dir = root().join("ebpf");
    let tmp = std::env::temp_dir().join(format!("hitless-xtask-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| e.to_string())?;
    let mut stale = Vec::new();
    for src in sources()? {
        let obj = src.replace(".bpf.c", ".bpf.o");
        if check {
            let fresh = tmp.join(&obj);
            compile(&src, &fresh)?;
            let a = std::fs::read(&fresh).map_err(|e| e.to_string())?;
            let b = std::fs::read(dir.join(&obj)).unwrap_or_default();
            if a != b {
                stale.push(obj);
            } else {
                println!("ebpf/{obj}: matches ebpf/{src}");
            }
        } else {
            compile(&src, &dir.join(&obj))?;
            println!("ebpf/{obj}: built");
        }
    }
    let _ = std::fs::remove_dir_all(&tmp);
    if !stale.is_empty() {
        return Err(format!(
            "committed objects differ from their sources: {}; run `cargo xtask ebpf` and commit",
            stale.join(", ")
        ));
    }
    // Every struct the agent mirrors, against the objects' BTF: offsets and sizes of
    // every field (agent/tests/btf_layout.rs names any that differ).
    let mut c = cargo();
    c.args(["test", "--quiet", "-p", "hitless-agent", "--test", "btf_layout"]);
    run(c, "the C/Rust layout check against the objects' BTF")
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command, what: &str) -> Result<(), String> {
    let status = c.status().map_err(|e| format!("{what}: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("{what} failed"))
    }
}

fn bench(which: &str, rest: &[String]) -> Result<(), String> {
    let known = ["datapath", "propagation", "metrics", "planner", "scale", "agent", "all"];
    if !known.contains(&which) {
        return Err(format!("unknown benchmark {which:?}; one of {}", known.join(", ")));
    }
    if which != "planner" {
        preflight::check(true).map_err(|p| preflight::report("cargo xtask bench", &p))?;
    }
    if which == "datapath" || which == "all" {
        packages::ensure(packages::BENCH_DATAPATH, "the datapath benchmark")?;
    }
    // Each benchmark appends its headline ratios here; printed as one table at the end.
    let summary = std::env::temp_dir().join(format!("hitless-bench-summary-{}", std::process::id()));
    let _ = std::fs::remove_file(&summary);
    std::env::set_var("HITLESS_BENCH_SUMMARY", &summary);
    let result = run_benches(which, rest);
    let rows = std::fs::read_to_string(&summary).unwrap_or_default();
    let _ = std::fs::remove_file(&summary);
    if !rows.is_empty() {
        println!("\nsummary: ratios against baselines measured in the same run");
        println!("| benchmark | measure | ratio | target | |");
        println!("|---|---|---:|---|---|");
        for row in rows.lines() {
            let f: Vec<&str> = row.split('\t').collect();
            if let [bench, measure, ratio, target, verdict] = f[..] {
                println!("| {bench} | {measure} | {ratio} | {target} | {verdict} |");
            }
        }
    }
    result
}

fn run_benches(which: &str, rest: &[String]) -> Result<(), String> {
    if which == "planner" || which == "all" {
        let mut c = cargo();
        c.args(["run", "--quiet", "--release", "-p", "hitless-coordinator", "--example", "bench_planner", "--"])
            .args(rest);
        run(c, "the planner benchmark")?;
    }
    for kernel in ["datapath", "propagation", "metrics", "scale", "agent"] {
        if which == kernel || which == "all" {
            let mut c = cargo();
            c.args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "hitless-agent",
                "-p",
                "hitless-cli",
                "-p",
                "hitless-tests",
            ]);
            run(c, "building the benchmarks")?;
            let mut c = Command::new(root().join("target/release/hitless-bench"));
            c.arg(kernel).args(rest);
            run(c, &format!("the {kernel} benchmark (needs root)"))?;
        }
    }
    Ok(())
}

/// `cargo xtask soak [--rollouts N] [--kills K] [--seed S]`: rollouts of every lossless
/// strategy under nginx + wrk with seeded SIGKILLs of the coordinator, agents and
/// starting instances (`hitless-soak`, as root); ends with its one-line verdict.
fn soak(rest: &[String]) -> Result<(), String> {
    packages::ensure(packages::TESTS, "the soak")?;
    let mut c = cargo();
    c.args(["build", "--quiet", "-p", "hitless-cli", "-p", "hitless-agent", "-p", "hitless-tests"]);
    run(c, "building the soak")?;
    let mut s = Command::new(root().join("target/debug/hitless-soak"));
    s.args(rest.iter().filter(|a| *a != "--"));
    run(s, "the soak (as root)")
}

/// Builds the binaries `hitless demo` runs (the CLI, the agent, the demo service) and
/// runs it, passing any further arguments on (`cargo xtask demo -- --nodes 5`).
fn demo(rest: &[String]) -> Result<(), String> {
    let mut c = cargo();
    c.args(["build", "--quiet", "--release", "-p", "hitless-cli", "-p", "hitless-agent"]).args([
        "-p",
        "hitless-tests",
        "--bin",
        "hitless",
        "--bin",
        "hitless-agent",
        "--bin",
        "hitless-testsvc",
    ]);
    run(c, "building the demo")?;
    let mut d = Command::new(root().join("target/release/hitless"));
    d.arg("demo").args(rest.iter().filter(|a| *a != "--"));
    run(d, "hitless demo (needs root)")
}
