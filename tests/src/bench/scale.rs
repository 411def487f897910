//! `scale`: one real coordinator (`hitless coordinator`, its own process) and N
//! simulated agents: real `AgentLink` sessions over real loopback sockets, run as
//! tokio tasks in this process. A simulated agent says hello, applies nothing (no
//! kernel, no maps) and acks every snapshot or delta at once, and sends a metric
//! summary every second as a real agent does. What is left is the coordinator's own
//! cost: drain barriers over N sessions, snapshots of a large registry, and memory
//! and CPU at rest per session.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use hitless_proto::v1::{
    self as pb, agent_link_client::AgentLinkClient, agent_message, coordinator_client::CoordinatorClient,
    coordinator_message,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

use super::{measured, thousands, Coord, Usage};

/// Where the coordinator listens (loopback only).
const LISTEN: &str = "127.131.0.1:7071";
/// The drained instance.
const SERVICE: &str = "cart";
const ADDRESS: &str = "127.140.0.2:8080";
const REGISTRY: &str = "services:\n  - name: cart\n    vips: [\"127.77.100.9:8080\"]\n    backends:\n      - { address: \"127.140.0.1:8080\" }\n      - { address: \"127.140.0.2:8080\" }\n";
/// Goal: the last ack of a drain barrier at 1,000 agents, p99.
const GOAL_AGENTS: usize = 1_000;
const GOAL_MS: f64 = 100.0;

/// Options of `hitless-bench scale`.
struct Opts {
    agents: Vec<usize>,
    drains: usize,
    instances: usize,
    window: Duration,
    snapshots: usize,
}

/// What one size measured.
struct Row {
    agents: usize,
    connect_secs: f64,
    idle: Usage,
    rest: Usage,
    ack_p50: f64,
    ack_p99: f64,
    rpc_p50: f64,
    rpc_p99: f64,
    incomplete: usize,
}

/// `hitless-bench scale [--agents 100,1000,5000,10000] [--drains 200]
/// [--instances 100000] [--window SECS] [--snapshots 5]`.
pub fn run(args: &[String]) -> anyhow::Result<()> {
    let opts = Opts {
        agents: super::sizes(args, "--agents", &[100, 1_000, 5_000, 10_000])?,
        drains: crate::flag(args, "--drains").unwrap_or(200),
        instances: crate::flag(args, "--instances").unwrap_or(100_000),
        window: Duration::from_secs_f64(crate::flag(args, "--window").unwrap_or(10.0)),
        snapshots: crate::flag(args, "--snapshots").unwrap_or(5),
    };
    let biggest = opts.agents.iter().copied().max().unwrap_or(0) as u64;
    // One socket per session on each side, plus room for everything else.
    let nofile = super::raise_nofile(biggest + 1_024);
    println!(
        "scale: simulated agents are real AgentLink sessions over loopback TCP, run as tasks of this \
         process; they skip the kernel (apply nothing, ack at once) and send one metric summary a second"
    );
    println!("open files limit: {nofile} (this process and the coordinator it starts)");
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;

    let mut rows = Vec::new();
    let mut broke: Option<String> = None;
    for &n in &opts.agents {
        if (n as u64) + 64 > nofile {
            broke = Some(format!("{n} agents: the open files limit is {nofile}"));
            break;
        }
        match size(&rt, n, &opts) {
            Ok(r) => rows.push(r),
            Err(e) => {
                broke = Some(format!("{n} agents: {e:#}"));
                break;
            }
        }
    }
    let snap = snapshot(&rt, &opts);

    println!("\nscale: one coordinator, N simulated agents; drain barriers on one instance, {} each", opts.drains);
    println!(
        "| agents | connect all | last ack p50 | last ack p99 | drain RPC p50 | drain RPC p99 | incomplete | RSS | RSS / agent | CPU at rest | CPU / agent |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in &rows {
        let per_kib = r.rest.rss_kib.saturating_sub(r.idle.rss_kib) as f64 / r.agents as f64;
        let cpu = r.rest.cpu_pct - r.idle.cpu_pct;
        println!(
            "| {} | {:.1} s | {:.2} ms | {:.2} ms | {:.2} ms | {:.2} ms | {} | {:.1} MiB | {per_kib:.1} KiB | {:.2} % | {:.4} % |",
            thousands(r.agents),
            r.connect_secs,
            r.ack_p50,
            r.ack_p99,
            r.rpc_p50,
            r.rpc_p99,
            r.incomplete,
            r.rest.rss_kib as f64 / 1024.0,
            r.rest.cpu_pct,
            cpu / r.agents as f64,
        );
    }
    if let Some(r) = rows.first() {
        println!(
            "RSS and CPU are the coordinator's (/proc/PID/status VmRSS, /proc/PID/stat utime+stime over {:.0} s at \
             rest); per agent: above the same coordinator with no agent ({:.1} MiB, {:.2} % of a core)",
            opts.window.as_secs_f64(),
            r.idle.rss_kib as f64 / 1024.0,
            r.idle.cpu_pct
        );
    }
    match &broke {
        Some(why) => println!("breaks at {why}"),
        None => println!("no break up to {} agents", thousands(rows.last().map_or(0, |r| r.agents))),
    }
    match &snap {
        Ok(s) => s.print(),
        Err(e) => println!("\nsnapshot: not measured: {e:#}"),
    }

    if let Some(r) = rows.iter().find(|r| r.agents == GOAL_AGENTS) {
        let ratio = r.ack_p99 / GOAL_MS;
        let what = format!("drain barrier last ack p99 at {} agents / {GOAL_MS:.0} ms", thousands(r.agents));
        crate::summary("scale", &what, ratio, "<= 1", Some(ratio <= 1.0 && r.incomplete == 0));
    }
    if let Some(r) = rows.last() {
        let per_kib = r.rest.rss_kib.saturating_sub(r.idle.rss_kib) as f64 / r.agents as f64;
        measured("scale", &format!("coordinator RSS per agent at {} agents", thousands(r.agents)), per_kib, "KiB");
        let cpu = (r.rest.cpu_pct - r.idle.cpu_pct) / r.agents as f64;
        measured(
            "scale",
            &format!("coordinator CPU at rest per agent at {} agents", thousands(r.agents)),
            cpu,
            "% of a core",
        );
    }
    if let Ok(s) = &snap {
        if let Some(t) = s.median_ms() {
            measured("scale", &format!("snapshot of {} instances, hello to whole", thousands(s.instances)), t, "ms");
        }
    }
    if rows.is_empty() {
        bail!("no size could be measured: {}", broke.unwrap_or_default());
    }
    Ok(())
}

/// One size: a fresh coordinator, N agents, rest, barriers.
fn size(rt: &tokio::runtime::Runtime, n: usize, opts: &Opts) -> anyhow::Result<Row> {
    let mut coord = Coord::start(&format!("scale{n}"), LISTEN);
    let pid = coord.pid();
    let url = coord.url.clone();
    rt.block_on(super::apply(&url, REGISTRY))?;
    let idle = super::usage(pid, opts.window, |_| {})?;

    let t = Instant::now();
    let fleet = Fleet::start(rt, &url, n);
    let deadline = Duration::from_secs(60) + Duration::from_millis(20 * n as u64);
    let failed = fleet.wait_connected(n, deadline);
    let connect_secs = t.elapsed().as_secs_f64();
    if let Some(e) = failed {
        bail!(
            "{} of {n} sessions connected within {deadline:?} ({}); coordinator log:\n{}",
            fleet.connected(),
            e,
            coord.log_tail()
        );
    }
    rt.block_on(wait_synced(&url, n, deadline)).with_context(|| coord.log_tail())?;
    eprintln!("scale: {n} agents connected and synced in {connect_secs:.1} s");
    std::thread::sleep(Duration::from_secs(2));
    let rest = super::usage(pid, opts.window, |_| {})?;

    let (mut acks, mut rpcs, incomplete) = rt.block_on(barriers(&url, n, opts.drains))?;
    acks.sort_by(f64::total_cmp);
    rpcs.sort_by(f64::total_cmp);
    if acks.is_empty() {
        bail!("no barrier completed");
    }
    let p = |v: &[f64], q| crate::percentile(v, q);
    let row = Row {
        agents: n,
        connect_secs,
        idle,
        rest,
        ack_p50: p(&acks, 0.5),
        ack_p99: p(&acks, 0.99),
        rpc_p50: p(&rpcs, 0.5),
        rpc_p99: p(&rpcs, 0.99),
        incomplete,
    };
    drop(fleet);
    drop(coord);
    Ok(row)
}

/// Waits until `n` agents are connected and hold the registry's revision.
async fn wait_synced(url: &str, n: usize, within: Duration) -> anyhow::Result<()> {
    let mut c = CoordinatorClient::connect(url.to_owned()).await?.max_decoding_message_size(64 << 20);
    let t = Instant::now();
    loop {
        let s = c.status(pb::StatusRequest {}).await?.into_inner();
        let synced = s.nodes.iter().filter(|x| x.connected && x.applied_revision == s.revision).count();
        if synced >= n {
            return Ok(());
        }
        if t.elapsed() > within {
            bail!("only {synced} of {n} agents hold revision {} after {within:?}", s.revision);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `count` drain/undrain barriers; the last ack and the RPC time of each complete one
/// in ms, and how many were incomplete (stops after 3 of those).
async fn barriers(url: &str, n: usize, count: usize) -> anyhow::Result<(Vec<f64>, Vec<f64>, usize)> {
    let mut client = CoordinatorClient::connect(url.to_owned()).await?.max_decoding_message_size(64 << 20);
    let (mut acks, mut rpcs, mut incomplete) = (Vec::with_capacity(count), Vec::with_capacity(count), 0);
    for k in 0..count {
        let req = pb::DrainRequest {
            key: Some(pb::InstanceKey { service: SERVICE.into(), address: ADDRESS.into() }),
            timeout_ms: 10_000,
        };
        let t = Instant::now();
        let r = if k % 2 == 0 { client.drain(req).await? } else { client.undrain(req).await? }.into_inner();
        let rpc = t.elapsed().as_secs_f64() * 1e3;
        if !r.complete || r.nodes.iter().filter(|x| x.acked).count() != n {
            incomplete += 1;
            let acked = r.nodes.iter().filter(|x| x.acked).count();
            eprintln!("scale: barrier {k} at {n} agents incomplete: {acked} acked of {} nodes", r.nodes.len());
            if incomplete >= 3 {
                break;
            }
            continue;
        }
        rpcs.push(rpc);
        acks.push(r.nodes.iter().map(|x| x.latency_us).max().unwrap_or(0) as f64 / 1e3);
    }
    Ok((acks, rpcs, incomplete))
}

/// N simulated agents; every session ends when this is dropped.
struct Fleet {
    tasks: JoinSet<()>,
    connected: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    /// Starts `n` sessions, at most 64 connecting at a time.
    fn start(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> Self {
        let connected = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(64));
        let mut tasks = JoinSet::new();
        let _enter = rt.enter();
        for i in 0..n {
            let (url, connected, failed, gate) = (url.to_owned(), connected.clone(), failed.clone(), gate.clone());
            tasks.spawn(async move {
                let node = format!("sim-{i:05}");
                // Summaries spread over the second, as independent agents' would be.
                let phase = Duration::from_millis((i as u64 * 7_919) % 1_000);
                if let Err(e) = sim(&url, &node, phase, &gate, &connected).await {
                    if let Ok(mut f) = failed.lock() {
                        f.push(format!("{node}: {e:#}"));
                    }
                }
            });
        }
        Self { tasks, connected, failed }
    }

    fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` sessions are open; the first error when some failed or
    /// `within` passed.
    fn wait_connected(&self, n: usize, within: Duration) -> Option<String> {
        let t = Instant::now();
        loop {
            let failed = self.failed.lock().map(|f| (f.len(), f.first().cloned())).unwrap_or_default();
            if failed.0 > 0 {
                return Some(format!("{} failed, first: {}", failed.0, failed.1.unwrap_or_default()));
            }
            if self.connected() >= n {
                return None;
            }
            if t.elapsed() > within {
                return Some("timed out".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        self.tasks.abort_all();
    }
}

/// A channel to the coordinator (its own TCP connection).
async fn dial(url: &str) -> anyhow::Result<Channel> {
    let ep = Endpoint::from_shared(url.to_owned())?.connect_timeout(Duration::from_secs(10)).tcp_nodelay(true);
    Ok(ep.connect().await?)
}

/// One simulated agent: hello, then an ack for every snapshot or delta at once, and a
/// summary of the registry's backends every second. Runs until the session ends.
async fn sim(url: &str, node: &str, phase: Duration, gate: &Semaphore, connected: &AtomicUsize) -> anyhow::Result<()> {
    let permit = gate.acquire().await?;
    let channel = dial(url).await?;
    let (tx, mut inbound) = open(channel.clone(), node, true).await?;
    // The first message (a snapshot) proves the session is served.
    let first = inbound.message().await?.context("the coordinator closed the session at once")?;
    drop(permit);
    connected.fetch_add(1, Ordering::Relaxed);
    let mut mirror = SimMirror::default();
    if let Some(rev) = mirror.take(first) {
        ack(&tx, rev).await?;
    }
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + phase, Duration::from_secs(1));
    loop {
        tokio::select! {
            m = inbound.message() => {
                let m = m?.context("the coordinator closed the session")?;
                if let Some(rev) = mirror.take(m) {
                    ack(&tx, rev).await?;
                }
            }
            _ = tick.tick() => {
                let backends = mirror.backends.iter().map(|(s, a)| pb::BackendCounters {
                    service: s.clone(), address: a.clone(), ..Default::default()
                }).collect();
                let m = pb::AgentMessage { msg: Some(agent_message::Msg::Metrics(pb::MetricSummary { backends })) };
                tx.send(m).await.context("the session's sender closed")?;
            }
        }
    }
}

/// Opens a session on `channel` with a hello.
async fn open(
    channel: Channel,
    node: &str,
    parts: bool,
) -> anyhow::Result<(mpsc::Sender<pb::AgentMessage>, tonic::Streaming<pb::CoordinatorMessage>)> {
    let mut client = AgentLinkClient::new(channel);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node: node.to_owned(),
        applied_revision: 0,
        agent_version: "bench-sim".into(),
        instances: Vec::new(),
        snapshot_parts: parts,
    };
    tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) }).await?;
    let inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    Ok((tx, inbound))
}

async fn ack(tx: &mpsc::Sender<pb::AgentMessage>, revision: u64) -> anyhow::Result<()> {
    let ack = pb::Ack { revision, in_flight: Vec::new(), settled: true };
    tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Ack(ack)) }).await.context("the session's sender closed")
}

/// What a simulated agent keeps: the registry's backends (for its summaries).
#[derive(Default)]
struct SimMirror {
    backends: BTreeSet<(String, String)>,
    /// A snapshot arriving in parts.
    pending: Option<BTreeSet<(String, String)>>,
}

impl SimMirror {
    /// Takes a message; the revision to ack, if it completes one.
    fn take(&mut self, m: pb::CoordinatorMessage) -> Option<u64> {
        let key = |i: &pb::Instance| (i.service.clone(), i.address.clone());
        match m.msg? {
            coordinator_message::Msg::Snapshot(s) => {
                self.backends = s.instances.iter().map(key).collect();
                Some(s.revision)
            }
            coordinator_message::Msg::Delta(d) => {
                for k in &d.removed_instances {
                    self.backends.remove(&(k.service.clone(), k.address.clone()));
                }
                self.backends.retain(|(s, _)| !d.removed_services.contains(s));
                self.backends.extend(d.instances.iter().map(key));
                Some(d.revision)
            }
            coordinator_message::Msg::SnapshotPart(p) => {
                let part = p.part.unwrap_or_default();
                self.pending.get_or_insert_with(BTreeSet::new).extend(part.instances.iter().map(key));
                if p.last {
                    self.backends = self.pending.take().unwrap_or_default();
                    Some(part.revision)
                } else {
                    None
                }
            }
            coordinator_message::Msg::Start(_)
            | coordinator_message::Msg::Stop(_)
            | coordinator_message::Msg::Summaries(_) => None,
        }
    }
}

/// Fresh sessions receiving a large registry.
struct Snap {
    instances: usize,
    /// Size of the registry file and the time its apply took.
    yaml_bytes: usize,
    apply_ms: f64,
    rss_before_kib: u64,
    rss_after_kib: u64,
    /// (ms, bytes, messages) of each session that assembled parts.
    parts: Vec<(f64, usize, usize)>,
    /// One session of an agent that does not assemble parts (as before this change).
    whole: Result<(f64, usize, usize), String>,
}

impl Snap {
    fn median_ms(&self) -> Option<f64> {
        let mut v: Vec<f64> = self.parts.iter().map(|p| p.0).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied()
    }

    fn print(&self) {
        println!("\nsnapshot: a registry of {} instances (services x 10), fresh sessions", thousands(self.instances));
        println!(
            "registry file: {} bytes, applied in {:.0} ms (Registry.ApplyStream in 1 MiB parts)",
            thousands(self.yaml_bytes),
            self.apply_ms
        );
        println!(
            "coordinator RSS: {:.1} MiB before the registry, {:.1} MiB holding it",
            self.rss_before_kib as f64 / 1024.0,
            self.rss_after_kib as f64 / 1024.0
        );
        println!("| session | hello to whole snapshot | protobuf bytes | messages |");
        println!("|---|---:|---:|---:|");
        for (ms, bytes, msgs) in &self.parts {
            println!("| in parts | {ms:.1} ms | {} | {msgs} |", thousands(*bytes));
        }
        match &self.whole {
            Ok((ms, bytes, msgs)) => {
                println!("| one message (older agent) | {ms:.1} ms | {} | {msgs} |", thousands(*bytes))
            }
            Err(e) => println!("| one message (older agent) | failed: {e} | | |"),
        }
        println!("(every session uses the 4 MiB default decode limit of a tonic client)");
    }
}

/// Applies a registry of about `opts.instances` instances and times fresh sessions.
fn snapshot(rt: &tokio::runtime::Runtime, opts: &Opts) -> anyhow::Result<Snap> {
    let mut coord = Coord::start("scale-snap", LISTEN);
    let pid = coord.pid();
    let url = coord.url.clone();
    let rss_before_kib = super::rss_kib(pid).unwrap_or(0);
    let instances = opts.instances / 10 * 10;
    let yaml = super::registry_yaml(instances / 10, 10, |_| "serving");
    let t = Instant::now();
    rt.block_on(super::apply(&url, &yaml)).context("applying the registry")?;
    let apply_ms = t.elapsed().as_secs_f64() * 1e3;
    let yaml_bytes = yaml.len();
    drop(yaml);
    std::thread::sleep(Duration::from_millis(500));
    let rss_after_kib = super::rss_kib(pid).unwrap_or(0);
    let mut parts = Vec::new();
    for k in 0..opts.snapshots {
        let r = rt.block_on(fresh(&url, &format!("snap-{k}"), true)).context("a session in parts")?;
        parts.push(r);
    }
    let whole = rt.block_on(fresh(&url, "snap-whole", false)).map_err(|e| format!("{e:#}"));
    drop(coord);
    Ok(Snap { instances, yaml_bytes, apply_ms, rss_before_kib, rss_after_kib, parts, whole })
}

/// Encoded size of protobuf messages, computed field by field (this crate does not
/// link prost itself): what a session receives, framing aside.
mod wire {
    use hitless_proto::v1 as pb;

    fn varint(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }
    fn num(v: u64) -> usize {
        if v == 0 {
            0
        } else {
            1 + varint(v)
        }
    }
    fn text(s: &str) -> usize {
        if s.is_empty() {
            0
        } else {
            nested(s.len())
        }
    }
    /// A length-delimited field of `len` bytes (tag below 16).
    fn nested(len: usize) -> usize {
        1 + varint(len as u64) + len
    }
    fn instance(i: &pb::Instance) -> usize {
        text(&i.service)
            + text(&i.address)
            + num(i.state as u64)
            + num(u64::from(i.weight))
            + text(&i.version)
            + text(&i.node)
            + num(i.ttl_ms)
    }
    fn service(s: &pb::Service) -> usize {
        text(&s.name)
            + s.vips.iter().map(|v| nested(v.len())).sum::<usize>()
            + num(s.protocol as u64)
            + num(s.policy as u64)
    }
    /// A snapshot's encoding.
    pub fn snapshot(s: &pb::Snapshot) -> usize {
        num(s.revision)
            + s.services.iter().map(|x| nested(service(x))).sum::<usize>()
            + s.instances.iter().map(|x| nested(instance(x))).sum::<usize>()
    }
    /// A coordinator message holding a snapshot, or a part of one.
    pub fn message(m: &pb::CoordinatorMessage) -> usize {
        use pb::coordinator_message::Msg;
        match &m.msg {
            Some(Msg::Snapshot(s)) => nested(snapshot(s)),
            Some(Msg::SnapshotPart(p)) => {
                nested(p.part.as_ref().map_or(0, |s| nested(snapshot(s))) + num(u64::from(p.last)))
            }
            _ => 0,
        }
    }
}

/// A fresh session: the time from its hello to holding the whole snapshot, its bytes
/// and its messages. The connection is made before the clock starts.
async fn fresh(url: &str, node: &str, parts: bool) -> anyhow::Result<(f64, usize, usize)> {
    let channel = dial(url).await?;
    let t = Instant::now();
    let (_tx, mut inbound) = open(channel, node, parts).await?;
    let (mut bytes, mut msgs) = (0, 0);
    let mut held: Vec<pb::Instance> = Vec::new();
    loop {
        let m = tokio::time::timeout(Duration::from_secs(60), inbound.message())
            .await
            .context("no snapshot within 60 s")??
            .context("the coordinator closed the session")?;
        msgs += 1;
        bytes += wire::message(&m);
        match m.msg {
            Some(coordinator_message::Msg::Snapshot(s)) => {
                held = s.instances;
                break;
            }
            Some(coordinator_message::Msg::SnapshotPart(p)) => {
                held.extend(p.part.unwrap_or_default().instances);
                if p.last {
                    break;
                }
            }
            _ => {}
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if held.is_empty() {
        bail!("the snapshot held no instance");
    }
    Ok((ms, bytes, msgs))
}
