//! `hitless-bench`: benchmarks that need root and the real kernel, run by
//! `cargo xtask bench`. Every figure is a ratio against a baseline measured in the
//! same run, rounds interleaved so that drift on a shared machine hits all alike.
//!
//! `propagation`: a coordinator and 1, 10 and 50 real agents (each its own cgroup and
//! pin dir); an instance is drained and undrained N times, and each barrier reports
//! the time from the decision to the last agent's ack (its maps hold the change, so
//! from then on every connect on that node avoids the instance).
//!
//! `metrics`: connect+close rate through the hook with the counting program (sockops:
//! per-backend connects, failures, latency histogram, open connections) attached and
//! detached, against direct, in one run.
//!
//! `scale`: one real coordinator and 100 to 10,000 simulated agents (real sessions,
//! no kernel): drain barrier latency, snapshot time and size of a large registry, and
//! the coordinator's memory and CPU per agent (see `bench/scale.rs`).
//!
//! `agent`: one real agent in static and coordinator mode at 100 to 50,000 backends:
//! RSS and CPU at rest and under churn (see `bench/agent.rs`).
//!
//! `datapath`: connect+close rate to a VIP through the steering hook (the counting
//! program detached; `metrics` measures it) with 1, 1,000 and 10,000 services, against dialling the backend directly without the hook; then the same
//! through iptables DNAT chains of 1, 1,000 and 10,000 rules (kube-proxy's iptables
//! mode), against direct with the nat table loaded.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use hitless_tests::{bin, require_root, spawn_ready, Cgroup, Node};

#[path = "../bench/mod.rs"]
mod bench;

const SINK: &str = "127.110.0.1:9000";
/// Sinks run inside a node's cgroup for the server side of `metrics` (counting on, off).
const SERVER_SINKS: [&str; 2] = ["127.110.0.2:9000", "127.110.0.3:9000"];
const SIZES: [usize; 3] = [1, 1_000, 10_000];

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map_or("datapath", String::as_str);
    let count: u32 = flag(&args, "--count").unwrap_or(10_000);
    let rounds: usize = flag(&args, "--rounds").unwrap_or(11);
    match what {
        "datapath" => datapath(count, rounds),
        "propagation" => propagation(flag(&args, "--drains").unwrap_or(200)),
        "metrics" => metrics(count, rounds),
        "scale" => bench::scale::run(&args[1..]),
        "agent" => bench::agent::run(&args[1..]),
        other => bail!("unknown benchmark {other:?}; known: datapath, propagation, metrics, scale, agent"),
    }
}

fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).and_then(|v| v.parse().ok())
}

/// One measured configuration: where the client runs and what it dials.
struct Config {
    label: String,
    cgroup: Option<std::path::PathBuf>,
    addr: String,
}

/// Connects per second of one run of `hitless-probe rate`.
fn rate(cfg: &Config, cgroups: &BTreeMap<std::path::PathBuf, &Cgroup>, count: u32) -> anyhow::Result<f64> {
    let probe = bin("hitless-probe");
    let mut cmd = match &cfg.cgroup {
        Some(p) => cgroups[p].command(&probe),
        None => Command::new(&probe),
    };
    let out =
        cmd.args(["rate", &cfg.addr, "--count", &count.to_string(), "--cpu", "0"]).stdin(Stdio::null()).output()?;
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).with_context(|| format!("probe rate for {}", cfg.label))?;
    let failed = v["failed"].as_u64().unwrap_or(u64::MAX);
    if failed != 0 {
        bail!("{}: {failed} connects failed", cfg.label);
    }
    Ok(f64::from(count) / v["secs"].as_f64().unwrap_or(f64::NAN))
}

/// Rates per config and round. Rounds interleave the configs, each round starting
/// at the next config, so drift and position effects hit every config alike.
fn measure(
    configs: &[Config],
    cgroups: &BTreeMap<std::path::PathBuf, &Cgroup>,
    count: u32,
    rounds: usize,
) -> anyhow::Result<Vec<Vec<f64>>> {
    // Warm-up round, not counted.
    for c in configs {
        rate(c, cgroups, count / 5)?;
    }
    let mut samples = vec![Vec::with_capacity(rounds); configs.len()];
    for r in 0..rounds {
        for k in 0..configs.len() {
            // One sample per config per round, so each Vec stays in round order.
            let i = (r + k) % configs.len();
            samples[i].push(rate(&configs[i], cgroups, count)?);
        }
    }
    Ok(samples)
}

/// One row of the summary `cargo xtask bench` prints after all benchmarks: appended,
/// tab-separated, to the file named by `HITLESS_BENCH_SUMMARY` when it is set.
fn summary(bench: &str, measure: &str, ratio: f64, target: &str, met: Option<bool>) {
    let Some(path) = std::env::var_os("HITLESS_BENCH_SUMMARY") else { return };
    let verdict = match met {
        Some(true) => "met",
        Some(false) => "NOT MET",
        None => "anchor",
    };
    let line = format!("{bench}\t{measure}\t{ratio:.4}\t{target}\t{verdict}\n");
    let file = std::fs::OpenOptions::new().create(true).append(true).open(path);
    if let Err(e) = file.and_then(|mut f| std::io::Write::write_all(&mut f, line.as_bytes())) {
        eprintln!("cannot append to the summary: {e}");
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Median over rounds of the per-round ratio a/b: paired, so drift between rounds cancels.
fn ratio(a: &[f64], b: &[f64]) -> f64 {
    median(a.iter().zip(b).map(|(x, y)| x / y).collect())
}

/// A registry of `n` services; the measured one (last) has `vip` and the sink as backend.
fn registry(n: usize, vip: &str) -> String {
    let mut s = String::from("services:\n");
    for i in 0..n - 1 {
        // Other services: their own VIPs and backends, never dialled.
        let (hi, lo) = (i / 250, i % 250 + 1);
        s += &format!(
            "  - {{ name: s{i}, vips: [\"127.78.{hi}.{lo}:9000\"], backends: [{{ address: \"127.112.{hi}.{lo}:9000\" }}] }}\n"
        );
    }
    s += &format!("  - {{ name: measured, vips: [\"{vip}\"], backends: [{{ address: \"{SINK}\" }}] }}\n");
    s
}

/// iptables nat chains for the DNAT baseline, removed on drop.
struct Dnat {
    chains: Vec<String>,
    conntrack_max: Option<String>,
    conntrack_close: Option<String>,
}

const CT_MAX: &str = "/proc/sys/net/netfilter/nf_conntrack_max";
const CT_CLOSE: &str = "/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_close";

impl Dnat {
    /// One chain per size, reached by destination address, measured rule last.
    fn install() -> anyhow::Result<(Self, Vec<String>)> {
        let mut rules = String::from("*nat\n");
        let mut chains = Vec::new();
        let mut vips = Vec::new();
        for (k, n) in SIZES.iter().enumerate() {
            let chain = format!("HITLESS-BENCH-{n}");
            let dst = format!("127.79.{k}.1");
            rules += &format!(":{chain} - [0:0]\n-A OUTPUT -d {dst}/32 -p tcp -j {chain}\n");
            for i in 0..n - 1 {
                rules += &format!(
                    "-A {chain} -d {dst}/32 -p tcp --dport {} -j DNAT --to-destination 127.112.200.1:9000\n",
                    20_000 + i
                );
            }
            rules += &format!("-A {chain} -d {dst}/32 -p tcp --dport 9000 -j DNAT --to-destination {SINK}\n");
            chains.push(chain);
            vips.push(format!("{dst}:9000"));
        }
        rules += "COMMIT\n";
        let mut child = Command::new("iptables-restore")
            .arg("--noflush")
            .stdin(Stdio::piped())
            .spawn()
            .context("running iptables-restore (apt-get install iptables)")?;
        std::io::Write::write_all(child.stdin.as_mut().context("stdin")?, rules.as_bytes())?;
        drop(child.stdin.take());
        let guard = Self {
            chains,
            conntrack_max: std::fs::read_to_string(CT_MAX).ok(),
            conntrack_close: std::fs::read_to_string(CT_CLOSE).ok(),
        };
        if !child.wait()?.success() {
            bail!("iptables-restore failed");
        }
        // Thousands of connections a second stay in conntrack for a while after RST.
        // Closed (RST) connections then leave conntrack after 1 s instead of 10 s, so
        // the table does not grow across rounds and skew later configs.
        let _ = std::fs::write(CT_MAX, "2000000");
        let _ = std::fs::write(CT_CLOSE, "1");
        Ok((guard, vips))
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        for (k, chain) in self.chains.iter().enumerate() {
            let dst = format!("127.79.{k}.1/32");
            let _ = Command::new("iptables")
                .args(["-t", "nat", "-D", "OUTPUT", "-d", &dst, "-p", "tcp", "-j", chain])
                .status();
            let _ = Command::new("iptables").args(["-t", "nat", "-F", chain]).status();
            let _ = Command::new("iptables").args(["-t", "nat", "-X", chain]).status();
        }
        if let Some(v) = &self.conntrack_max {
            let _ = std::fs::write(CT_MAX, v.trim());
        }
        if let Some(v) = &self.conntrack_close {
            let _ = std::fs::write(CT_CLOSE, v.trim());
        }
    }
}

/// Kernel time spent in a node's program and its number of runs (with
/// `kernel.bpf_stats_enabled`): the program's own cost, free of the machine's noise.
fn prog_stats(pin_dir: &std::path::Path, prog: &str) -> Option<(u64, u64)> {
    let link = aya::programs::links::PinnedLink::from_pin(pin_dir.join("links").join(prog)).ok()?;
    let id = aya::programs::links::FdLink::from(link).info().ok()?.program_id();
    let info = aya::programs::loaded_programs().flatten().find(|p| p.id() == id)?;
    Some((info.run_time().as_nanos() as u64, info.run_count()))
}

const BPF_STATS: &str = "/proc/sys/kernel/bpf_stats_enabled";

/// `kernel.bpf_stats_enabled` on for the guard's lifetime, then back as it was.
struct BpfStats(Option<String>);

impl BpfStats {
    fn enable() -> Self {
        let before = std::fs::read_to_string(BPF_STATS).ok();
        let _ = std::fs::write(BPF_STATS, "1");
        Self(before)
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Some(v) = &self.0 {
            let _ = std::fs::write(BPF_STATS, v.trim());
        }
    }
}

/// The server every benchmark connects to: accepts and closes, pinned to CPU 1.
fn sink() -> hitless_tests::Proc {
    let mut sink = Command::new(bin("hitless-probe"));
    sink.args(["sink", "--tcp", SINK, "--cpu", "1"]);
    spawn_ready(sink)
}

fn datapath(count: u32, rounds: usize) -> anyhow::Result<()> {
    require_root();
    let stats = BpfStats::enable();
    let _sink = sink();
    let direct_cg = Cgroup::new("bench-direct");
    let mut nodes = Vec::new();
    for n in SIZES {
        let mut node = Node::new(&format!("bench-{n}"));
        node.agent_args(&["--max-services", "16384", "--max-vips", "16384", "--max-backends", "16384"]);
        node.write_registry(&registry(n, "127.79.9.1:9000"));
        node.start_agent();
        // The datapath is pinned: measure without the agent running beside it.
        node.kill_agent();
        // Steering only: the counting program has its own benchmark (`metrics`).
        std::fs::remove_file(node.pin_dir.join("links/hl_sockops")).context("detaching sockops")?;
        nodes.push(node);
    }
    let mut cgroups: BTreeMap<std::path::PathBuf, &Cgroup> = BTreeMap::new();
    cgroups.insert(direct_cg.path().to_owned(), &direct_cg);
    for n in &nodes {
        cgroups.insert(n.cgroup.path().to_owned(), &n.cgroup);
    }

    let direct =
        || Config { label: "direct, no hook".into(), cgroup: Some(direct_cg.path().to_owned()), addr: SINK.into() };
    let mut a = vec![direct()];
    for (n, node) in SIZES.iter().zip(&nodes) {
        a.push(Config {
            label: format!("hook, {n} services"),
            cgroup: Some(node.cgroup.path().to_owned()),
            addr: "127.79.9.1:9000".into(),
        });
    }
    eprintln!("measuring the hook: {} configs x {rounds} rounds x {count} connects", a.len());
    let before: Vec<Option<(u64, u64)>> = nodes.iter().map(|n| prog_stats(&n.pin_dir, "hl_connect4")).collect();
    let ra = measure(&a, &cgroups, count, rounds)?;
    let after: Vec<Option<(u64, u64)>> = nodes.iter().map(|n| prog_stats(&n.pin_dir, "hl_connect4")).collect();
    drop(stats);
    // ns per run of cgroup/connect4, and its share of a direct connect+close.
    let per_run: Vec<Option<f64>> = before
        .iter()
        .zip(&after)
        .map(|(b, a)| match (b, a) {
            (Some((t0, n0)), Some((t1, n1))) if n1 > n0 => Some((t1 - t0) as f64 / (n1 - n0) as f64),
            _ => None,
        })
        .collect();

    let (dnat, vips) = Dnat::install()?;
    let mut b = vec![Config { label: "direct, nat table loaded".into(), ..direct() }];
    for (n, vip) in SIZES.iter().zip(&vips) {
        b.push(Config {
            label: format!("iptables DNAT, {n} rules"),
            cgroup: Some(direct_cg.path().to_owned()),
            addr: vip.clone(),
        });
    }
    eprintln!("measuring iptables DNAT: {} configs x {rounds} rounds x {count} connects", b.len());
    let rb = measure(&b, &cgroups, count, rounds)?;
    drop(dnat);

    println!("\ndatapath: connect+close to a VIP; {rounds} interleaved rounds of {count} connects;");
    println!("rates are medians, ratios are medians of per-round ratios");
    println!("| path | connects/s | vs direct |");
    println!("|---|---:|---:|");
    for (c, r) in a.iter().zip(&ra) {
        println!("| {} | {:.0} | {:.3} |", c.label, median(r.clone()), ratio(r, &ra[0]));
    }
    for (c, r) in b.iter().zip(&rb) {
        println!("| {} | {:.0} | {:.3} |", c.label, median(r.clone()), ratio(r, &rb[0]));
    }
    println!("hook, 10,000 vs 1 service: {:.3}x the time per connect (target <= 1.05)", ratio(&ra[1], &ra[3]));
    let connect_ns = 1e9 / median(ra[0].clone());
    println!(
        "\nthe program's own cost (kernel.bpf_stats_enabled; a direct connect+close takes {:.1} µs here):",
        connect_ns / 1e3
    );
    println!("| services | ns per connect4 run | share of a connect+close |");
    println!("|---:|---:|---:|");
    for (n, ns) in SIZES.iter().zip(&per_run) {
        match ns {
            Some(ns) => println!("| {n} | {ns:.0} | {:.2} % |", 100.0 * ns / connect_ns),
            None => println!("| {n} | n/a | n/a |"),
        }
    }
    if let (Some(Some(one)), Some(Some(many))) = (per_run.first(), per_run.last()) {
        println!(
            "connect time at 10,000 vs 1 service from the program's cost: {:.4}x",
            (connect_ns + many) / (connect_ns + one)
        );
    }
    println!("DNAT, 10,000 vs 1 rule:    {:.3}x the time per connect", ratio(&rb[1], &rb[3]));
    let hook = ratio(&ra[1], &ra[0]);
    summary("datapath", "hook (1 service) vs direct: connect+close rate", hook, ">= 0.98", Some(hook >= 0.98));
    let scale = ratio(&ra[1], &ra[3]);
    summary("datapath", "hook 10,000 vs 1 service: time per connect", scale, "<= 1.05", Some(scale <= 1.05));
    if let Some(Some(ns)) = per_run.first() {
        let share = ns / connect_ns;
        summary("datapath", "connect4 program time / direct connect+close", share, "<= 0.02", Some(share <= 0.02));
    }
    summary("datapath", "iptables DNAT 10,000 vs 1 rule: time per connect", ratio(&rb[1], &rb[3]), "degrades", None);
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn propagation(drains: usize) -> anyhow::Result<()> {
    use hitless_proto::v1::{coordinator_client::CoordinatorClient, DrainRequest, InstanceKey};
    require_root();
    let coord = hitless_tests::Coordinator::start("prop", "127.130.100.1:7070");
    let reg = std::env::temp_dir().join(format!("hitless-prop-{}.yaml", std::process::id()));
    std::fs::write(
        &reg,
        "services:\n  - name: cart\n    vips: [\"127.77.100.9:8080\"]\n    backends:\n      - { address: \"127.140.0.1:8080\" }\n      - { address: \"127.140.0.2:8080\" }\n",
    )?;
    let out = coord.cli(&["registry", "apply", reg.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&reg);
    if !out.status.success() {
        bail!("registry apply: {}", String::from_utf8_lossy(&out.stderr));
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut rows = Vec::new();
    for n in [1usize, 10, 50] {
        let mut nodes = Vec::with_capacity(n);
        for i in 0..n {
            let mut node = Node::new(&format!("prop{n}-{i}"));
            // Small maps: 50 datapaths on one machine.
            node.agent_args(&[
                "--max-services",
                "64",
                "--max-vips",
                "64",
                "--max-backends",
                "256",
                "--max-slots",
                "4096",
                "--max-connections",
                "4096",
            ]);
            node.follow(&coord.url);
            node.spawn_agent();
            nodes.push(node);
        }
        coord.wait_synced(n);
        eprintln!("propagation: {n} agents synced; {drains} barriers");
        let (acks, rtts) = rt.block_on(async {
            let mut client = CoordinatorClient::connect(coord.url.clone()).await?;
            let mut acks = Vec::with_capacity(drains);
            let mut rtts = Vec::with_capacity(drains);
            for k in 0..drains {
                let req = DrainRequest {
                    key: Some(InstanceKey { service: "cart".into(), address: "127.140.0.2:8080".into() }),
                    timeout_ms: 10_000,
                };
                let t = std::time::Instant::now();
                let r = if k % 2 == 0 { client.drain(req).await? } else { client.undrain(req).await? }.into_inner();
                rtts.push(t.elapsed().as_secs_f64() * 1e3);
                if !r.complete || r.nodes.iter().filter(|x| x.acked).count() != n {
                    bail!("barrier {k} incomplete: {r:?}");
                }
                let last = r.nodes.iter().map(|x| x.latency_us).max().unwrap_or(0);
                acks.push(last as f64 / 1e3);
            }
            Ok::<_, anyhow::Error>((acks, rtts))
        })?;
        let mut acks = acks;
        let mut rtts = rtts;
        acks.sort_by(f64::total_cmp);
        rtts.sort_by(f64::total_cmp);
        rows.push((
            n,
            percentile(&acks, 0.5),
            percentile(&acks, 0.99),
            percentile(&rtts, 0.5),
            percentile(&rtts, 0.99),
        ));
        drop(nodes);
    }
    println!("\npropagation: decision to the last agent's ack ({drains} barriers each, drain and undrain alternating)");
    println!("| agents | last ack p50 | last ack p99 | drain RPC p50 | drain RPC p99 |");
    println!("|---:|---:|---:|---:|---:|");
    for (n, a50, a99, r50, r99) in &rows {
        println!("| {n} | {a50:.2} ms | {a99:.2} ms | {r50:.2} ms | {r99:.2} ms |");
    }
    println!("anchors: client registry caches refresh every 30 s; Eureka can take 2 min, Nacos 50 s");
    if let Some((n, _, a99, _, _)) = rows.last() {
        let share = a99 / 30_000.0;
        let what = format!("last ack p99 ({n} agents) / a 30 s registry cache refresh");
        summary("propagation", &what, share, "< 0.001", Some(share < 0.001));
    }
    Ok(())
}

fn metrics(count: u32, rounds: usize) -> anyhow::Result<()> {
    require_root();
    let stats = BpfStats::enable();
    let _sink = sink();
    let direct_cg = Cgroup::new("bench-m-direct");
    // Client side: a client in the node's cgroup dials a VIP; the sink is outside it.
    let mut nodes = Vec::new();
    for name in ["bench-m-on", "bench-m-off"] {
        let mut node = Node::new(name);
        node.write_registry(&registry(1, "127.79.9.1:9000"));
        node.start_agent();
        node.kill_agent();
        nodes.push(node);
    }
    // Server side: the sink runs in the node's cgroup as a registered backend (what a
    // drain waits on), dialled directly by a client outside any hook.
    let mut servers = Vec::new();
    let mut server_sinks = Vec::new();
    for (name, addr) in [("bench-m-srv-on", SERVER_SINKS[0]), ("bench-m-srv-off", SERVER_SINKS[1])] {
        let mut node = Node::new(name);
        node.write_registry(&format!(
            "services:\n  - {{ name: served, vips: [\"127.79.9.2:9000\"], backends: [{{ address: \"{addr}\" }}] }}\n"
        ));
        node.start_agent();
        node.kill_agent();
        let mut cmd = node.cgroup.command(bin("hitless-probe"));
        cmd.args(["sink", "--tcp", addr, "--cpu", "1"]);
        server_sinks.push(spawn_ready(cmd));
        servers.push(node);
    }
    // Detach the counting program on the "off" nodes: removing a link's pin detaches it.
    for n in [&nodes[1], &servers[1]] {
        std::fs::remove_file(n.pin_dir.join("links/hl_sockops")).context("detaching sockops")?;
    }
    let mut cgroups: BTreeMap<std::path::PathBuf, &Cgroup> = BTreeMap::new();
    cgroups.insert(direct_cg.path().to_owned(), &direct_cg);
    for n in nodes.iter().chain(&servers) {
        cgroups.insert(n.cgroup.path().to_owned(), &n.cgroup);
    }
    let direct = || Some(direct_cg.path().to_owned());
    let configs = vec![
        Config { label: "direct, no hook".into(), cgroup: direct(), addr: SINK.into() },
        Config {
            label: "client side: hook, counting on".into(),
            cgroup: Some(nodes[0].cgroup.path().to_owned()),
            addr: "127.79.9.1:9000".into(),
        },
        Config {
            label: "client side: hook, counting off".into(),
            cgroup: Some(nodes[1].cgroup.path().to_owned()),
            addr: "127.79.9.1:9000".into(),
        },
        Config { label: "server side: counting on".into(), cgroup: direct(), addr: SERVER_SINKS[0].into() },
        Config { label: "server side: counting off".into(), cgroup: direct(), addr: SERVER_SINKS[1].into() },
    ];
    eprintln!("measuring the counting program: {} configs x {rounds} rounds x {count} connects", configs.len());
    let before = [prog_stats(&nodes[0].pin_dir, "hl_sockops"), prog_stats(&servers[0].pin_dir, "hl_sockops")];
    let r = measure(&configs, &cgroups, count, rounds)?;
    let after = [prog_stats(&nodes[0].pin_dir, "hl_sockops"), prog_stats(&servers[0].pin_dir, "hl_sockops")];
    drop(stats);
    drop(server_sinks);
    println!("\nmetrics: connect+close; {rounds} interleaved rounds of {count} connects");
    println!("| path | connects/s | vs direct |");
    println!("|---|---:|---:|");
    for (c, x) in configs.iter().zip(&r) {
        println!("| {} | {:.0} | {:.3} |", c.label, median(x.clone()), ratio(x, &r[0]));
    }
    let client = ratio(&r[1], &r[2]);
    let server = ratio(&r[3], &r[4]);
    println!(
        "client-side counting costs {:.1} % of the connect rate, server-side {:.1} % (target <= 3 % each)",
        (1.0 - client) * 100.0,
        (1.0 - server) * 100.0
    );
    summary("metrics", "client-side counting on vs off: connect+close rate", client, ">= 0.97", Some(client >= 0.97));
    summary("metrics", "server-side counting on vs off: connect+close rate", server, ">= 0.97", Some(server >= 0.97));
    // Each side's own kernel time per connection (the program runs at several TCP events
    // of each), against a direct connect+close: the same cost, free of the machine's noise.
    let connections = f64::from(count / 5) + f64::from(count) * rounds as f64; // warm-up + rounds
    let connect_ns = 1e9 / median(r[0].clone());
    for (side, b, a) in [("client", before[0], after[0]), ("server", before[1], after[1])] {
        let (Some((t0, n0)), Some((t1, n1))) = (b, a) else { continue };
        let per_conn = (t1 - t0) as f64 / connections;
        let share = per_conn / connect_ns;
        println!(
            "{side} side: the counting program's own cost is {per_conn:.0} ns per connection ({:.1} runs), {:.2} % of a {:.1} µs connect+close",
            (n1 - n0) as f64 / connections,
            share * 100.0,
            connect_ns / 1e3
        );
        summary(
            "metrics",
            &format!("{side}-side sockops time per connection / direct connect+close"),
            share,
            "<= 0.03",
            Some(share <= 0.03),
        );
    }
    Ok(())
}
