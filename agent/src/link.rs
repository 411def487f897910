//! Coordinator mode: the agent's end of the `AgentLink` session.
//!
//! The agent dials out, says which revision its pinned maps hold, receives the
//! registry as a snapshot and then as deltas, applies each to the maps through the
//! [`Writer`], and only then acknowledges the revision. When the coordinator is
//! unreachable the maps keep the last state (fail static) and the agent redials with
//! backoff; a delta that does not follow what it holds ends the session, and the next
//! one starts from a snapshot.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use hitless_proto::v1::{self as pb, agent_link_client::AgentLinkClient, agent_message, coordinator_message};
use hitless_tls::client::Transport;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tracing::{info, warn};

use crate::abi::{Endpoint, PROTO_TCP};
use crate::desired;
use crate::driver::{Driver, InstanceInfo, InstanceSpec, InstanceState};
use crate::registry::{BackendSpec, BackendState, Policy, Protocol, Registry, ServiceSpec};
use crate::writer::{Maps, WriteError, Writer};

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// The coordinator could not be reached.
    #[error("cannot reach the coordinator at {url}: {source}")]
    Connect {
        /// Its URL.
        url: String,
        /// Cause.
        source: tonic::transport::Error,
    },
    /// The stream failed.
    #[error("session failed: {0}")]
    Stream(#[from] tonic::Status),
    /// The coordinator closed the session.
    #[error("the coordinator closed the session")]
    Closed,
    /// A delta did not start where the mirror is.
    #[error("delta from revision {base} but the agent holds {have}; resyncing from a snapshot")]
    OutOfSync {
        /// Revision the delta starts from.
        base: u64,
        /// Revision the agent holds.
        have: u64,
    },
    /// The maps could not be written.
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// The registry as the agent mirrors it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Mirror {
    /// Revision of the last snapshot or delta.
    pub revision: u64,
    services: BTreeMap<String, pb::Service>,
    instances: BTreeMap<(String, String), pb::Instance>,
}

impl Mirror {
    /// The registry at a snapshot.
    pub fn from_snapshot(s: pb::Snapshot) -> Self {
        Self {
            revision: s.revision,
            services: s.services.into_iter().map(|s| (s.name.clone(), s)).collect(),
            instances: s.instances.into_iter().map(|i| ((i.service.clone(), i.address.clone()), i)).collect(),
        }
    }

    /// Moves the mirror forward by a delta that starts where it is.
    pub fn apply_delta(&mut self, d: pb::Delta) -> Result<(), LinkError> {
        if d.base_revision != self.revision {
            return Err(LinkError::OutOfSync { base: d.base_revision, have: self.revision });
        }
        for name in d.removed_services {
            self.services.remove(&name);
        }
        for s in d.services {
            self.services.insert(s.name.clone(), s);
        }
        for k in d.removed_instances {
            self.instances.remove(&(k.service, k.address));
        }
        for i in d.instances {
            self.instances.insert((i.service.clone(), i.address.clone()), i);
        }
        self.revision = d.revision;
        Ok(())
    }

    /// The registry the datapath should steer by. The coordinator validated every
    /// entry; one that still does not parse is skipped with a warning, never fatal.
    pub fn to_registry(&self) -> Registry {
        let mut services = Vec::with_capacity(self.services.len());
        for s in self.services.values() {
            let vips = s
                .vips
                .iter()
                .filter_map(|v| {
                    v.parse::<SocketAddr>()
                        .map_err(|_| warn!(service = %s.name, vip = %v, "skipping unparsable VIP"))
                        .ok()
                })
                .collect();
            let backends = self
                .instances
                .range((s.name.clone(), String::new())..)
                .take_while(|((svc, _), _)| *svc == s.name)
                .filter_map(|(_, i)| {
                    let address = i
                        .address
                        .parse::<SocketAddr>()
                        .map_err(
                            |_| warn!(service = %s.name, address = %i.address, "skipping unparsable instance address"),
                        )
                        .ok()?;
                    Some(BackendSpec {
                        address,
                        state: match i.state() {
                            pb::InstanceState::Serving => BackendState::Serving,
                            pb::InstanceState::Draining => BackendState::Draining,
                            pb::InstanceState::Down => BackendState::Down,
                        },
                        weight: i.weight,
                        version: (!i.version.is_empty()).then(|| i.version.clone()),
                    })
                })
                .collect();
            services.push(ServiceSpec {
                name: s.name.clone(),
                vips,
                protocol: match s.protocol() {
                    pb::Protocol::Tcp => Protocol::Tcp,
                    pb::Protocol::Udp => Protocol::Udp,
                },
                policy: match s.policy() {
                    pb::Policy::Steer => Policy::Steer,
                    pb::Policy::Reject => Policy::Reject,
                    pb::Policy::Allow => Policy::Allow,
                },
                backends,
            });
        }
        Registry { services }
    }
}

/// Where the session finds the node's instances and its datapath.
#[derive(Clone)]
pub struct Site {
    /// The instance driver, when this agent runs instances.
    pub driver: Option<Arc<Driver>>,
    /// The node's pin directory (the stop sequence reads open connections there).
    pub pin_dir: PathBuf,
    /// Labels and error count for `/metrics`.
    pub metrics: Arc<crate::metrics::State>,
    /// This node's outlier detector (kept across sessions).
    pub outliers: Arc<std::sync::Mutex<crate::outlier::Outliers>>,
}

/// The least time between two looks at signalled backends (a backend that keeps
/// failing costs one look per interval, however many connects fail).
const OUTLIER_LOOK: Duration = Duration::from_millis(50);
/// How often the session sends the per-backend counters (analysis gates read them).
const SUMMARY_EVERY: Duration = Duration::from_secs(1);

/// The kernel's per-backend totals for the backends of `reg`, of the services in
/// `wanted` (all when `None`: a coordinator that never said).
fn summary(
    writer: &Writer,
    desired: &[desired::DesiredService],
    names: &[String],
    wanted: Option<&std::collections::BTreeSet<String>>,
) -> pb::MetricSummary {
    let mut backends = Vec::new();
    for (s, name) in desired.iter().zip(names).filter(|(_, n)| wanted.is_none_or(|w| w.contains(*n))) {
        for b in s.backends.iter().filter(|b| b.ep.proto == PROTO_TCP) {
            if let Some(st) = writer.maps().backend_stats(&b.ep) {
                backends.push(pb::BackendCounters {
                    service: name.clone(),
                    address: b.ep.socket_addr().to_string(),
                    connects: st.connects,
                    failed: st.failed,
                    resets: st.resets,
                });
            }
        }
    }
    pb::MetricSummary { backends }
}

/// Judges the backends the kernel signalled failed connects to, and returns those due
/// back; re-applies the revision in force (if any yet) when the set of isolated
/// backends changed. Reads no counter when nothing was signalled.
fn look_at_outliers(
    site: &Site,
    writer: &mut Writer,
    desired: &[desired::DesiredService],
    revision: Option<u64>,
    failures: &mut crate::outlier::FailureWatch,
) -> Result<(), LinkError> {
    let Ok(mut o) = site.outliers.lock() else { return Ok(()) };
    if failures.look(&mut o, writer.maps(), desired, std::time::Instant::now()) {
        if let Some(r) = revision {
            writer.apply(&o.overlay(desired), r)?;
        }
        site.metrics.set_outliers(&o);
    }
    Ok(())
}

/// Runs sessions forever, redialling with backoff; the maps keep the last state in
/// between (fail static).
pub async fn run(url: String, transport: Transport, node: String, mut writer: Writer, site: Site) -> ! {
    let mut backoff = MIN_BACKOFF;
    let to = (url.as_str(), &transport);
    loop {
        let e = session(to, &node, &mut writer, &site, &mut backoff).await;
        site.metrics.error();
        let held = writer.maps().revision().unwrap_or(0);
        warn!(%node, error = %e, revision = held, retry_ms = backoff.as_millis() as u64, "no coordinator session; steering with the state in force");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(50);
/// Longest wait for the coordinator's connection (TCP and TLS).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// One session: hello, then apply-and-ack until the stream ends (always with an error).
async fn session(
    to: (&str, &Transport),
    node: &str,
    writer: &mut Writer,
    site: &Site,
    backoff: &mut Duration,
) -> LinkError {
    match session_inner(to, node, writer, site, backoff).await {
        Ok(never) => match never {},
        Err(e) => e,
    }
}

async fn session_inner(
    (url, transport): (&str, &Transport),
    node: &str,
    writer: &mut Writer,
    site: &Site,
    backoff: &mut Duration,
) -> Result<std::convert::Infallible, LinkError> {
    crate::failpoint!("agent.link.connect", |fp| injected(fp));
    let connect = async {
        let endpoint = tonic::transport::Endpoint::from_shared(url.to_owned())?.connect_timeout(CONNECT_TIMEOUT);
        transport.connect(endpoint).await
    };
    let mut client =
        AgentLinkClient::new(connect.await.map_err(|source| LinkError::Connect { url: url.to_owned(), source })?)
            .max_decoding_message_size(hitless_tls::limits::MAX_RESPONSE)
            .max_encoding_message_size(hitless_tls::limits::MAX_REQUEST);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::Hello {
        node: node.to_owned(),
        applied_revision: writer.maps().revision()?,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        snapshot_parts: true,
        instances: site
            .driver
            .as_ref()
            .map(|d| d.list().iter().filter_map(|i| report(i, "")).collect())
            .unwrap_or_default(),
    };
    // The channel has room: the receiver is not even polled yet.
    let _ = tx.try_send(pb::AgentMessage { msg: Some(agent_message::Msg::Hello(hello)) });
    let mut inbound = client.session(ReceiverStream::new(rx)).await?.into_inner();
    info!(%node, %url, "coordinator session open");
    *backoff = MIN_BACKOFF;
    let _crash_watch = site.driver.clone().map(|d| tokio::spawn(watch_crashes(d, tx.clone())));
    let _guard = AbortOnDrop(_crash_watch);
    // An instance adopted while starting (its agent died before it was healthy) has no
    // health check running: watch it again, so the coordinator hears when it serves.
    if let Some(d) = &site.driver {
        for i in d.list().into_iter().filter(|i| i.state == InstanceState::Starting) {
            let (d, tx) = (Arc::clone(d), tx.clone());
            tokio::spawn(async move { watch_health(&d, &i, "", ADOPTED_HEALTH_TIMEOUT, &tx).await });
        }
    }
    let mut mirror: Option<Mirror> = None;
    // A snapshot arriving in parts, until its last part.
    let mut parts = Parts::default();
    let mut wanted: Vec<desired::DesiredService> = Vec::new();
    // Handshakes in flight to the backends the last revision took out of service.
    let mut watch: Option<crate::inflight::Watch> = None;
    // Failed connects, as the kernel signals them: an idle node reads no counters.
    let mut failures = crate::outlier::FailureWatch::open(writer.maps().pin_dir(), OUTLIER_LOOK)?;
    let mut summaries = tokio::time::interval(SUMMARY_EVERY);
    // Whose counters the coordinator wants each second (None: it never said, so all).
    let mut summarize: Option<std::collections::BTreeSet<String>> = None;
    loop {
        let due = site.outliers.lock().ok().and_then(|o| o.next_deadline());
        let msg = tokio::select! {
            m = inbound.message() => match m? {
                Some(m) => m,
                None => break,
            },
            () = failures.ready(due) => {
                look_at_outliers(site, writer, &wanted, mirror.as_ref().map(|m| m.revision), &mut failures)?;
                continue;
            }
            _ = tokio::time::sleep(crate::inflight::WATCH_EVERY), if watch.is_some() => {
                if let Some(w) = watch.as_mut() {
                    if let Some(ack) = w.look(writer.maps(), std::time::Instant::now()) {
                        if tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Ack(ack)) }).await.is_err() {
                            return Err(LinkError::Closed);
                        }
                    }
                    if w.done() {
                        watch = None;
                    }
                }
                continue;
            }
            _ = summaries.tick(), if summarize.as_ref().is_none_or(|s| !s.is_empty()) => {
                let names: Vec<String> = wanted.iter().map(|d| d.name.clone()).collect();
                let sum = summary(writer, &wanted, &names, summarize.as_ref());
                if !sum.backends.is_empty() && tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Metrics(sum)) }).await.is_err() {
                    return Err(LinkError::Closed);
                }
                continue;
            }
        };
        let next = match msg.msg {
            Some(coordinator_message::Msg::Snapshot(s)) => Mirror::from_snapshot(s),
            Some(coordinator_message::Msg::SnapshotPart(p)) => match parts.add(p) {
                Some(s) => Mirror::from_snapshot(s),
                None => continue,
            },
            Some(coordinator_message::Msg::Delta(d)) => {
                let mut m = mirror.take().unwrap_or_default();
                m.apply_delta(d)?;
                m
            }
            Some(coordinator_message::Msg::Summaries(w)) => {
                summarize = Some(w.services.into_iter().collect());
                continue;
            }
            Some(coordinator_message::Msg::Start(op)) => {
                match &site.driver {
                    Some(d) => {
                        tokio::spawn(start_instance(d.clone(), op, tx.clone()));
                    }
                    None => {
                        let spec = op.spec.unwrap_or_default();
                        refuse(&tx, &op.op_id, &spec.service, &spec.version, "").await;
                    }
                }
                continue;
            }
            Some(coordinator_message::Msg::Stop(op)) => {
                match &site.driver {
                    Some(d) => {
                        tokio::spawn(stop_instance(d.clone(), site.pin_dir.clone(), op, tx.clone()));
                    }
                    None => refuse(&tx, &op.op_id, &op.service, "", &op.address).await,
                }
                continue;
            }
            None => continue,
        };
        let reg = next.to_registry();
        wanted = desired::from_registry(&reg);
        crate::failpoint!("agent.link.apply", |fp| injected(fp));
        {
            let outliers = site.outliers.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            crate::apply::revision(writer, &wanted, &reg, next.revision, &site.metrics, node, &outliers)?;
        }
        let (w, ack) = crate::inflight::Watch::start(next.revision, &wanted, writer.maps(), std::time::Instant::now());
        watch = (!w.done()).then_some(w);
        let ack = pb::AgentMessage { msg: Some(agent_message::Msg::Ack(ack)) };
        crate::failpoint!("agent.link.ack_send", |fp| injected(fp));
        if tx.send(ack).await.is_err() {
            return Err(LinkError::Closed);
        }
        mirror = Some(next);
    }
    Err(LinkError::Closed)
}

/// The session's stream failing, injected by fail point `fp`.
#[cfg(feature = "failpoints")]
fn injected(fp: &str) -> LinkError {
    LinkError::Stream(tonic::Status::unavailable(format!("injected by failpoint {fp}")))
}

/// A snapshot sent in parts ([`pb::SnapshotPart`]), assembled until its last part.
/// The mirror in force is kept meanwhile: a session that ends mid-way leaves it whole.
#[derive(Debug, Default)]
struct Parts(Option<pb::Snapshot>);

impl Parts {
    /// Adds a part; returns the whole snapshot with its last part. A part of another
    /// revision than the ones before starts over (the coordinator never interleaves
    /// two snapshots; this only keeps a mix from ever being applied).
    fn add(&mut self, p: pb::SnapshotPart) -> Option<pb::Snapshot> {
        let part = p.part.unwrap_or_default();
        match &mut self.0 {
            Some(s) if s.revision == part.revision => {
                s.services.extend(part.services);
                s.instances.extend(part.instances);
            }
            slot => *slot = Some(part),
        }
        if p.last {
            self.0.take()
        } else {
            None
        }
    }
}

/// Aborts a task when the session ends.
struct AbortOnDrop(Option<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.abort();
        }
    }
}

fn report(i: &InstanceInfo, op_id: &str) -> Option<pb::InstanceReport> {
    let phase = match i.state {
        InstanceState::Starting => pb::InstancePhase::Starting,
        InstanceState::Serving => pb::InstancePhase::Serving,
        InstanceState::Stopping => pb::InstancePhase::Stopping,
        InstanceState::Crashed => pb::InstancePhase::Crashed,
    };
    Some(pb::InstanceReport {
        service: i.service.clone(),
        version: i.version.clone(),
        address: SocketAddr::new(i.address.into(), i.port).to_string(),
        phase: phase as i32,
        detail: i.exit.clone().unwrap_or_default(),
        op_id: op_id.to_owned(),
        id: i.id.clone(),
        killed: i.killed(),
    })
}

async fn send_report(tx: &mpsc::Sender<pb::AgentMessage>, r: pb::InstanceReport) {
    // `return`: the report is lost, as when the session's stream fails under it.
    crate::failpoint!("agent.link.report_send", return);
    let _ = tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Instance(r)) }).await;
}

fn spec_from(s: &pb::InstanceSpec) -> Result<InstanceSpec, String> {
    use hitless_model::{Health, PreStop, RunSpec};
    let port = u16::try_from(s.port).map_err(|_| format!("port {} is out of range", s.port))?;
    let health = s.health.as_ref().and_then(|c| c.kind.as_ref()).map(|k| match k {
        pb::check::Kind::Http(p) => Health::Http(p.clone()),
        pb::check::Kind::Tcp(b) => Health::Tcp(*b),
        pb::check::Kind::Exec(a) => Health::Exec(a.args.clone()),
    });
    let prestop = s.prestop.as_ref().and_then(|c| c.kind.as_ref()).and_then(|k| match k {
        pb::check::Kind::Http(p) => Some(PreStop::Http(p.clone())),
        pb::check::Kind::Exec(a) => Some(PreStop::Exec(a.args.clone())),
        pb::check::Kind::Tcp(_) => None,
    });
    Ok(InstanceSpec {
        service: s.service.clone(),
        version: s.version.clone(),
        port,
        run: RunSpec { command: s.command.clone(), env: s.env.clone().into_iter().collect() },
        health,
        prestop,
        drain_deadline: Duration::from_millis(s.drain_deadline_ms),
        grace: Duration::from_millis(s.grace_ms),
        config: s.config.clone().into_iter().collect(),
    })
}

/// Starts an instance and reports STARTING, then SERVING or FAILED with its last output.
async fn start_instance(driver: Arc<Driver>, op: pb::StartInstance, tx: mpsc::Sender<pb::AgentMessage>) {
    let spec = op.spec.unwrap_or_default();
    let failed = |detail: String, address: String| pb::InstanceReport {
        service: spec.service.clone(),
        version: spec.version.clone(),
        address,
        phase: pb::InstancePhase::Failed as i32,
        detail,
        op_id: op.op_id.clone(),
        id: String::new(),
        killed: false,
    };
    let s = match spec_from(&spec) {
        Ok(s) => s,
        Err(e) => return send_report(&tx, failed(e, String::new())).await,
    };
    let info = match driver.start(s) {
        Ok(i) => i,
        Err(e) => return send_report(&tx, failed(e.to_string(), String::new())).await,
    };
    if let Some(r) = report(&info, &op.op_id) {
        send_report(&tx, r).await;
    }
    let timeout = Duration::from_millis(op.health_timeout_ms.max(1_000));
    watch_health(&driver, &info, &op.op_id, timeout, &tx).await;
}

/// Waits until the instance is healthy and reports it serving; an instance that never
/// becomes healthy is stopped at once (nothing left behind) and reported failed.
async fn watch_health(
    driver: &Driver,
    info: &InstanceInfo,
    op_id: &str,
    timeout: Duration,
    tx: &mpsc::Sender<pb::AgentMessage>,
) {
    let mut r = report(info, op_id).unwrap_or_default();
    match driver.wait_healthy(&info.id, timeout).await {
        Ok(()) => {
            r.phase = pb::InstancePhase::Serving as i32;
            info!(service = %info.service, id = %info.id, address = %r.address, "instance healthy");
        }
        Err(e) => {
            warn!(service = %info.service, id = %info.id, address = %r.address, error = %e, "instance never became healthy");
            let _ = driver.stop(&info.id, || 0).await;
            r.phase = pb::InstancePhase::Failed as i32;
            r.killed = e.killed();
            r.detail = e.to_string();
        }
    }
    send_report(tx, r).await;
}

/// Longest health wait for an instance adopted while it was starting (its start
/// operation's own timeout died with the previous agent).
const ADOPTED_HEALTH_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs the stop sequence, reading the instance's open connections from the kernel.
async fn stop_instance(
    driver: Arc<Driver>,
    pin_dir: PathBuf,
    op: pb::StopInstance,
    tx: mpsc::Sender<pb::AgentMessage>,
) {
    let found = driver.list().into_iter().find(|i| SocketAddr::new(i.address.into(), i.port).to_string() == op.address);
    let mut r = pb::InstanceReport {
        service: op.service.clone(),
        address: op.address.clone(),
        phase: pb::InstancePhase::Stopped as i32,
        op_id: op.op_id.clone(),
        ..Default::default()
    };
    let Some(info) = found else {
        r.detail = "not running on this node (already stopped)".into();
        return send_report(&tx, r).await;
    };
    r.version = info.version.clone();
    r.id = info.id.clone();
    let addr = SocketAddr::new(info.address.into(), info.port);
    let maps = match Maps::open(&pin_dir) {
        Ok(m) => Some(m),
        Err(e) => {
            // Connections it cannot see are never "0 open": wait out the deadline.
            warn!(service = %op.service, address = %op.address, error = %e, "cannot read the connection counts; the drain waits for its deadline");
            None
        }
    };
    let ep = Endpoint::new(addr, PROTO_TCP);
    // Open connections, and handshakes the instance's listener holds but has not
    // finished (a SYN answered, its ACK not yet accepted): both would fail on SIGTERM.
    let active = move || match &maps {
        Some(m) => m.active_connections(&ep) + crate::inflight::half_open(addr) as i64,
        None => 1,
    };
    match driver.stop(&info.id, active).await {
        Ok(rep) => {
            r.detail = format!(
                "prestop {:?}, drain {:?} (ended by {:?}, {} open), SIGTERM {:?}{}, total {:?}",
                rep.prestop,
                rep.drain,
                rep.drain_end,
                rep.active_at_end,
                rep.term,
                if rep.killed { ", SIGKILL" } else { "" },
                rep.total
            );
            info!(service = %op.service, address = %op.address, report = %r.detail, "instance stopped");
        }
        Err(e) => {
            // The driver handed the instance back, still running: report it as it is
            // (not STOPPED), so the coordinator neither marks it down nor forgets it.
            if let Some(now) = driver.get(&info.id).and_then(|i| report(&i, &op.op_id)) {
                r = now;
            }
            r.detail = format!("stop failed: {e}");
            warn!(service = %op.service, address = %op.address, error = %e, "stop failed");
        }
    }
    send_report(&tx, r).await;
}

/// Reports instances that exit on their own.
async fn watch_crashes(driver: Arc<Driver>, tx: mpsc::Sender<pb::AgentMessage>) {
    let mut seen: BTreeMap<String, InstanceState> = BTreeMap::new();
    loop {
        tokio::time::sleep(Duration::from_millis(200)).await;
        for i in driver.list() {
            if i.state == InstanceState::Crashed && seen.get(&i.id) != Some(&InstanceState::Crashed) {
                warn!(service = %i.service, id = %i.id, exit = ?i.exit, "instance crashed");
                if let Some(r) = report(&i, "") {
                    send_report(&tx, r).await;
                }
            }
            seen.insert(i.id.clone(), i.state);
        }
    }
}

/// Answers an instance operation this agent cannot carry out.
async fn refuse(tx: &mpsc::Sender<pb::AgentMessage>, op_id: &str, service: &str, version: &str, address: &str) {
    let report = pb::InstanceReport {
        service: service.to_owned(),
        version: version.to_owned(),
        address: address.to_owned(),
        phase: pb::InstancePhase::Failed as i32,
        detail: "this agent runs no instances: start it with --workload-cgroup and --instance-addresses".to_owned(),
        op_id: op_id.to_owned(),
        id: String::new(),
        killed: false,
    };
    let _ = tx.send(pb::AgentMessage { msg: Some(agent_message::Msg::Instance(report)) }).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inst(svc: &str, addr: &str, state: pb::InstanceState) -> pb::Instance {
        pb::Instance {
            service: svc.into(),
            address: addr.into(),
            state: state as i32,
            weight: 100,
            ..Default::default()
        }
    }

    #[test]
    fn deltas_move_the_mirror_and_out_of_order_ones_are_refused() {
        let mut m = Mirror::from_snapshot(pb::Snapshot {
            revision: 3,
            services: vec![pb::Service {
                name: "cart".into(),
                vips: vec!["127.77.0.1:80".into()],
                ..Default::default()
            }],
            instances: vec![inst("cart", "127.0.1.1:80", pb::InstanceState::Serving)],
        });
        m.apply_delta(pb::Delta {
            base_revision: 3,
            revision: 4,
            instances: vec![
                inst("cart", "127.0.1.1:80", pb::InstanceState::Draining),
                inst("cart", "127.0.1.2:80", pb::InstanceState::Serving),
            ],
            ..Default::default()
        })
        .unwrap();
        let reg = m.to_registry();
        assert_eq!(reg.services[0].backends.len(), 2);
        assert_eq!(reg.services[0].backends[0].state, BackendState::Draining);
        let err = m.apply_delta(pb::Delta { base_revision: 9, revision: 10, ..Default::default() }).unwrap_err();
        assert!(matches!(err, LinkError::OutOfSync { base: 9, have: 4 }));
    }

    #[test]
    fn snapshot_parts_assemble_in_order_and_a_new_revision_starts_over() {
        let part = |rev: u64, addr: &str, last: bool| pb::SnapshotPart {
            part: Some(pb::Snapshot {
                revision: rev,
                services: vec![],
                instances: vec![inst("cart", addr, pb::InstanceState::Serving)],
            }),
            last,
        };
        let mut p = Parts::default();
        assert!(p.add(part(5, "127.0.1.1:80", false)).is_none());
        // A part of another revision: what came before is dropped.
        assert!(p.add(part(6, "127.0.1.2:80", false)).is_none());
        let s = p.add(part(6, "127.0.1.3:80", true)).expect("whole at the last part");
        assert_eq!(s.revision, 6);
        let addrs: Vec<&str> = s.instances.iter().map(|i| i.address.as_str()).collect();
        assert_eq!(addrs, ["127.0.1.2:80", "127.0.1.3:80"]);
        assert!(p.0.is_none(), "nothing kept after the last part");
    }

    #[test]
    fn instances_are_grouped_under_their_own_service_only() {
        let m = Mirror::from_snapshot(pb::Snapshot {
            revision: 1,
            services: vec![
                pb::Service { name: "a".into(), ..Default::default() },
                pb::Service { name: "ab".into(), ..Default::default() },
            ],
            instances: vec![
                inst("a", "127.0.1.1:80", pb::InstanceState::Serving),
                inst("ab", "127.0.1.2:80", pb::InstanceState::Serving),
            ],
        });
        let reg = m.to_registry();
        assert_eq!(reg.services[0].backends.len(), 1);
        assert_eq!(reg.services[1].backends.len(), 1);
    }
}
