//! Simulated agents: real `AgentLink` sessions over loopback TCP, run as tasks of this
//! process, that apply nothing and ack every snapshot or delta at once, and send a
//! metric summary every second as a real agent does.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use hitless_proto::v1::{self as pb, agent_link_client::AgentLinkClient, agent_message, coordinator_message};
use tokio::sync::{mpsc, Semaphore};
use tokio::task::JoinSet;
use tonic::codegen::tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};

/// N simulated agents; every session ends when this is dropped.
pub(super) struct Fleet {
    tasks: JoinSet<()>,
    connected: Arc<AtomicUsize>,
    failed: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    /// Starts `n` sessions, at most 64 connecting at a time.
    pub(super) fn start(rt: &tokio::runtime::Runtime, url: &str, n: usize) -> Self {
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

    pub(super) fn connected(&self) -> usize {
        self.connected.load(Ordering::Relaxed)
    }

    /// Waits until `n` sessions are open; the first error when some failed or
    /// `within` passed.
    pub(super) fn wait_connected(&self, n: usize, within: Duration) -> Option<String> {
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
pub(super) async fn dial(url: &str) -> anyhow::Result<Channel> {
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
pub(super) async fn open(
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
