//! The coordinator's shared state: the registry (in memory and in the store), the
//! leases of registered instances, and the agents with what each has applied.
//!
//! Every change goes through [`Shared::mutate`]: compute, commit to the store, apply in
//! memory, publish — under one lock, so revisions are strictly ordered and what agents
//! receive is always what the store holds.
//!
//! The node roster (every node whose agent said hello, until an operator removes it) and
//! the tombstones of stopped instances are stored too, so that a restarted coordinator
//! still waits for a node whose agent is away and still reaps what it buried.
//! Locks are taken in the order nodes, inner, tombstones.

mod fleet_port;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hitless_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc, watch, Notify};
use tonic::Status;
use tracing::{info, warn};

pub use crate::engine::fleet::{NodeInfo, VersionTotals};
use crate::engine::record::Rollout;
use crate::registry::{Changes, Key, RegistryError, RegistryState};
use crate::store::Store;

/// Name of the rollout's record in the store.
const ROLLOUT: &str = "rollout";

/// An agent's acknowledgement: its maps hold `revision` since `at`.
#[derive(Debug, Clone)]
pub struct AckEvent {
    /// Node name.
    pub node: String,
    /// Revision its maps hold.
    pub revision: u64,
    /// When the ack arrived.
    pub at: Instant,
}

struct Inner {
    state: RegistryState,
    store: Store,
    /// Lease deadline of each instance registered with a TTL.
    leases: BTreeMap<Key, Instant>,
    /// Instances marked down because their lease lapsed (a heartbeat brings them back).
    lapsed: BTreeSet<Key>,
}

/// State shared by every RPC handler.
pub struct Shared {
    inner: Mutex<Inner>,
    nodes: Mutex<BTreeMap<String, NodeInfo>>,
    next_session: Mutex<u64>,
    /// The registry as last committed; agents' sessions follow it.
    pub published: watch::Sender<Arc<pb::Snapshot>>,
    /// Acknowledgements as they arrive (drain barriers listen here).
    pub acks: broadcast::Sender<AckEvent>,
    /// The services whose per-backend counters agents should send each second: those
    /// an analysis gate watches (none, most of the time: idle agents read nothing).
    pub summaries: watch::Sender<BTreeSet<String>>,
    /// Instances each node's agent runs, by address.
    instances: Mutex<BTreeMap<String, BTreeMap<String, pb::InstanceReport>>>,
    /// The operation channel of each node's session in force.
    ops: Mutex<BTreeMap<String, (u64, mpsc::Sender<pb::CoordinatorMessage>)>>,
    /// Instance reports as they arrive (the engine listens here).
    pub reports: broadcast::Sender<(String, pb::InstanceReport)>,
    /// The rollout, as last stored.
    rollout: Mutex<Option<Rollout>>,
    /// Wakes the engine: a push, pause, resume, promote or abort.
    pub wake: Notify,
    /// Stopped instances kept `down` so that stale clients dialling them are still
    /// steered, with when each is due for removal (also in the store).
    tombstones: Mutex<BTreeMap<Key, Instant>>,
    /// How long a tombstone lasts.
    pub tombstone: Duration,
    /// When the roster's last contacts were last stored.
    roster_flushed: Mutex<Instant>,
    /// Longest wait for a new instance to become healthy.
    pub health_timeout: Duration,
    /// The Prometheus server analysis gates query, when one is configured, and how long
    /// after a window its samples are in.
    pub prometheus: Option<(crate::engine::prometheus::PromUrl, Duration)>,
    /// Each node's latest per-backend totals: node -> (service, address) -> counters.
    counters: Mutex<BTreeMap<String, BTreeMap<Key, pb::BackendCounters>>>,
}

/// How long a stopped instance stays in the registry as `down`, unless the coordinator
/// is told otherwise (`--tombstone`): clients whose registry cache still lists it (caches
/// refresh every 30 s; Eureka can lag 2 minutes) keep being steered to a serving sibling
/// meanwhile.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(180);

/// How often the nodes' last contacts are stored.
pub const ROSTER_FLUSH: Duration = Duration::from_secs(30);

/// What `remove_node` did.
#[derive(Debug, Clone, Default)]
pub struct Removed {
    /// Its agent was connected (a forced removal ended its session).
    pub was_connected: bool,
    /// Instances still registered on it (a forced removal leaves them).
    pub instances: Vec<Key>,
}

/// Milliseconds since the Unix epoch.
fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// The instant of a wall-clock deadline (now when it has passed).
fn instant_of(due_ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(due_ms.saturating_sub(unix_ms(SystemTime::now())))
}

/// The tombstones of a store just opened: those stored, and a full `period` for any
/// instance a rollout stopped that has none (a store written before tombstones were
/// stored). Records of instances no longer down are dropped.
fn load_tombstones(store: &Store, state: &RegistryState, period: Duration) -> BTreeMap<Key, Instant> {
    let stored = store.tombstones().unwrap_or_else(|e| {
        warn!(error = %e, "tombstones not read; every stopped instance gets a full tombstone period");
        Vec::new()
    });
    let mut out = BTreeMap::new();
    for (key, due) in stored {
        if state.instance(&key).is_some_and(|i| i.state() == pb::InstanceState::Down) {
            out.insert(key, instant_of(due));
        } else if let Err(e) = store.remove_tombstone(&key) {
            warn!(service = %key.0, address = %key.1, error = %e, "stale tombstone not removed");
        }
    }
    // Only instances a rollout ran (on a node, with no lease) are buried: a registry
    // file's `state: down` backend or a lapsed lease is not a tombstone.
    let due = unix_ms(SystemTime::now()) + period.as_millis() as u64;
    for i in state.instances() {
        let key = (i.service.clone(), i.address.clone());
        let buried = i.state() == pb::InstanceState::Down && !i.node.is_empty() && i.ttl_ms == 0;
        if buried && !out.contains_key(&key) {
            info!(service = %key.0, address = %key.1, "down with no tombstone stored: kept for a full tombstone period");
            if let Err(e) = store.put_tombstone(&key, due) {
                warn!(service = %key.0, address = %key.1, error = %e, "tombstone not stored");
            }
            out.insert(key, Instant::now() + period);
        }
    }
    out
}

/// The node roster of a store just opened, every agent disconnected.
fn load_roster(store: &Store) -> BTreeMap<String, NodeInfo> {
    let stored = store.nodes().unwrap_or_else(|e| {
        warn!(error = %e, "node roster not read; nodes join it again when their agents say hello");
        Vec::new()
    });
    stored
        .into_iter()
        .map(|(node, last)| {
            let info = NodeInfo {
                session: 0,
                connected: false,
                applied: 0,
                last_contact: UNIX_EPOCH + Duration::from_millis(last),
                settled: 0,
                in_flight: BTreeMap::new(),
            };
            (node, info)
        })
        .collect()
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A handler that panicked while holding the lock left the data consistent (every
    // mutation is computed before anything is written), so keep going with it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl From<RegistryError> for Status {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid { .. } => Status::invalid_argument(e.to_string()),
            RegistryError::NotFound { .. } => Status::not_found(e.to_string()),
        }
    }
}

impl Shared {
    /// State loaded from `store`; every leased instance gets a full TTL of grace, every
    /// node of the roster starts disconnected.
    pub fn new(state: RegistryState, store: Store, settings: super::Settings) -> Arc<Self> {
        let tombstones = load_tombstones(&store, &state, settings.tombstone);
        let roster = load_roster(&store);
        if !roster.is_empty() {
            info!(nodes = roster.len(), tombstones = tombstones.len(), "node roster loaded");
        }
        let now = Instant::now();
        let leases = state
            .instances()
            .filter(|i| i.ttl_ms > 0)
            .map(|i| ((i.service.clone(), i.address.clone()), now + Duration::from_millis(i.ttl_ms)))
            .collect();
        let (published, _) = watch::channel(Arc::new(state.snapshot()));
        let (acks, _) = broadcast::channel(4096);
        let (summaries, _) = watch::channel(BTreeSet::new());
        let (reports, _) = broadcast::channel(4096);
        let rollout = store.record(ROLLOUT).ok().flatten().and_then(|b| serde_json::from_slice(&b).ok());
        Arc::new(Self {
            inner: Mutex::new(Inner { state, store, leases, lapsed: BTreeSet::new() }),
            nodes: Mutex::new(roster),
            next_session: Mutex::new(0),
            published,
            acks,
            summaries,
            instances: Mutex::new(BTreeMap::new()),
            ops: Mutex::new(BTreeMap::new()),
            reports,
            rollout: Mutex::new(rollout),
            wake: Notify::new(),
            tombstones: Mutex::new(tombstones),
            tombstone: settings.tombstone,
            roster_flushed: Mutex::new(Instant::now()),
            health_timeout: settings.health_timeout,
            prometheus: settings.prometheus.map(|u| (u, settings.prometheus_lag)),
            counters: Mutex::new(BTreeMap::new()),
        })
    }

    /// The rollout as last stored.
    pub fn rollout(&self) -> Option<Rollout> {
        lock(&self.rollout).clone()
    }

    /// Stores the rollout durably, then makes it the one in force.
    pub fn save_rollout(&self, r: &Rollout) -> Result<(), Status> {
        let bytes = serde_json::to_vec(r).map_err(|e| Status::internal(format!("encoding the rollout: {e}")))?;
        {
            let inner = lock(&self.inner);
            tokio::task::block_in_place(|| inner.store.put_record(ROLLOUT, &bytes))
                .map_err(|e| Status::internal(format!("the rollout was not stored: {e}")))?;
        }
        // Stored; not yet the one in force.
        crate::failpoint!("coordinator.state.save_rollout.after_store");
        *lock(&self.rollout) = Some(r.clone());
        self.wake.notify_one();
        Ok(())
    }

    /// The registry's instance at `key`.
    pub fn instance(&self, key: &Key) -> Option<pb::Instance> {
        lock(&self.inner).state.instance(key).cloned()
    }

    /// Replaces what `node` runs (its hello after a (re)connect).
    pub fn set_instances(&self, node: &str, reports: Vec<pb::InstanceReport>) {
        let map = reports.into_iter().map(|r| (r.address.clone(), r)).collect();
        lock(&self.instances).insert(node.to_owned(), map);
    }

    /// Records an instance report of `node` and passes it on.
    pub fn instance_report(&self, node: &str, r: pb::InstanceReport) {
        {
            let mut all = lock(&self.instances);
            let map = all.entry(node.to_owned()).or_default();
            match r.phase() {
                pb::InstancePhase::Stopped | pb::InstancePhase::Failed | pb::InstancePhase::Crashed => {
                    map.remove(&r.address);
                }
                _ => {
                    map.insert(r.address.clone(), r.clone());
                }
            }
        }
        let _ = self.reports.send((node.to_owned(), r));
    }

    /// What every node runs.
    pub fn running(&self) -> BTreeMap<String, BTreeMap<String, pb::InstanceReport>> {
        lock(&self.instances).clone()
    }

    /// Sends an instance operation to `node`'s agent, through the session in force only:
    /// between a new session's hello and its operation channel, the channel held is the
    /// previous session's, and what went there would be lost unseen.
    pub fn send_op(&self, node: &str, msg: pb::coordinator_message::Msg) -> Result<(), String> {
        let current = lock(&self.nodes).get(node).filter(|n| n.connected).map(|n| n.session);
        let Some(current) = current else { return Err(format!("node {node} has no agent connected")) };
        let tx = lock(&self.ops).get(node).filter(|(s, _)| *s == current).map(|(_, tx)| tx.clone());
        let Some(tx) = tx else { return Err(format!("node {node}: its agent is still opening its session")) };
        tx.try_send(pb::CoordinatorMessage { msg: Some(msg) })
            .map_err(|e| format!("node {node}: the operation could not be queued ({e})"))
    }

    /// Ends the session in force of `node` (its operation channel closes, and with it the
    /// stream to the agent), so that its agent dials again and says hello with what it
    /// runs now. For reports that were owed on a session that ended: the hello an agent
    /// sent when it reconnected may list an instance as starting that turned healthy
    /// before the new session took over its reports. Returns false when no session is open.
    pub fn resync(&self, node: &str) -> bool {
        let ended = lock(&self.ops).remove(node);
        if let Some((session, _)) = &ended {
            warn!(%node, session, "asking the agent to reconnect and report what it runs: reports it owed never came");
        }
        ended.is_some()
    }

    /// Registers the operation channel of `session` of `node`.
    pub fn set_ops(&self, node: &str, session: u64, tx: mpsc::Sender<pb::CoordinatorMessage>) {
        lock(&self.ops).insert(node.to_owned(), (session, tx));
    }

    /// The registry revision.
    pub fn revision(&self) -> u64 {
        lock(&self.inner).state.revision()
    }

    /// The registry now.
    pub fn snapshot(&self) -> Arc<pb::Snapshot> {
        self.published.borrow().clone()
    }

    /// Computes a change from the state in force, makes it durable, applies and
    /// publishes it. Returns the revision that holds it (unchanged when nothing changed).
    pub fn mutate(&self, f: impl FnOnce(&RegistryState) -> Result<Changes, RegistryError>) -> Result<u64, Status> {
        let mut inner = lock(&self.inner);
        let changes = f(&inner.state)?;
        self.commit(&mut inner, &changes)
    }

    fn commit(&self, inner: &mut Inner, changes: &Changes) -> Result<u64, Status> {
        self.commit_burying(inner, changes, None)
    }

    /// Commits `changes`, and the tombstone `buried` (due at a wall-clock time) with them.
    fn commit_burying(
        &self,
        inner: &mut Inner,
        changes: &Changes,
        buried: Option<&crate::store::Tombstone>,
    ) -> Result<u64, Status> {
        if changes.is_empty() {
            return Ok(inner.state.revision());
        }
        let revision = inner.state.revision() + 1;
        // Durable first: a SIGKILL after this line loses nothing that was acknowledged.
        tokio::task::block_in_place(|| inner.store.commit_burying(changes, revision, buried))
            .map_err(|e| Status::internal(format!("the change was not stored (nothing changed): {e}")))?;
        // Durable; neither applied in memory nor published to agents yet.
        crate::failpoint!("coordinator.state.commit.after_store");
        inner.state.commit(changes);
        {
            // As in the store: a tombstone goes with its instance.
            let mut t = lock(&self.tombstones);
            for k in &changes.removed_instances {
                t.remove(k);
            }
            for name in &changes.removed_services {
                t.retain(|(s, _), _| s != name);
            }
            for i in changes.instances.iter().filter(|i| i.state() != pb::InstanceState::Down) {
                t.remove(&(i.service.clone(), i.address.clone()));
            }
        }
        for k in &changes.removed_instances {
            inner.leases.remove(k);
            inner.lapsed.remove(k);
        }
        for name in &changes.removed_services {
            inner.leases.retain(|(s, _), _| s != name);
            inner.lapsed.retain(|(s, _)| s != name);
        }
        let now = Instant::now();
        for i in &changes.instances {
            let key = (i.service.clone(), i.address.clone());
            if i.ttl_ms > 0 {
                inner.leases.entry(key).or_insert(now + Duration::from_millis(i.ttl_ms));
            } else {
                inner.leases.remove(&key);
            }
        }
        self.published.send_replace(Arc::new(inner.state.snapshot()));
        Ok(revision)
    }

    /// Renews leases; returns the keys that are not registered.
    pub fn heartbeat(&self, keys: &[Key]) -> Result<(u64, Vec<Key>), Status> {
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        let mut unknown = Vec::new();
        let mut revive = Vec::new();
        for k in keys {
            match inner.state.instance(k) {
                Some(i) if i.ttl_ms > 0 => {
                    let ttl = Duration::from_millis(i.ttl_ms);
                    inner.leases.insert(k.clone(), now + ttl);
                    if inner.lapsed.contains(k) {
                        revive.push(k.clone());
                    }
                }
                Some(_) => {}
                None => unknown.push(k.clone()),
            }
        }
        let mut changes = Changes::default();
        for k in revive {
            inner.lapsed.remove(&k);
            if let Ok(c) = inner.state.set_state(&k, pb::InstanceState::Serving) {
                changes.instances.extend(c.instances);
            }
            info!(service = %k.0, address = %k.1, "lease renewed: instance serving again");
        }
        let revision = self.commit(&mut inner, &changes)?;
        Ok((revision, unknown))
    }

    /// Records a node's metric summary.
    pub fn metrics(&self, node: &str, m: pb::MetricSummary) {
        let map = m.backends.into_iter().map(|b| ((b.service.clone(), b.address.clone()), b)).collect();
        lock(&self.counters).insert(node.to_owned(), map);
    }

    /// What every node's clients saw, per (service, version), summed over nodes; the
    /// version of an address is the registry's.
    pub fn version_totals(&self) -> VersionTotals {
        let mut out = VersionTotals::new();
        for per_node in lock(&self.counters).values() {
            for (key, c) in per_node {
                let version = self.instance(key).map(|i| i.version).unwrap_or_default();
                let e = out.entry((key.0.clone(), version)).or_default();
                e.0 += c.connects;
                e.1 += c.failed;
                e.2 += c.resets;
            }
        }
        out
    }

    /// Marks a stopped instance down and keeps it for the tombstone time: the state
    /// and its tombstone (due at a wall-clock time) are stored in one transaction.
    pub fn bury(&self, key: &Key) -> Result<u64, Status> {
        let buried = (key.clone(), unix_ms(SystemTime::now()) + self.tombstone.as_millis() as u64);
        let mut inner = lock(&self.inner);
        let changes = inner.state.set_state(key, pb::InstanceState::Down)?;
        let revision = if changes.is_empty() {
            // Down already (a retried stop): its tombstone starts again.
            tokio::task::block_in_place(|| inner.store.put_tombstone(key, buried.1))
                .map_err(|e| Status::internal(format!("the tombstone was not stored: {e}")))?;
            inner.state.revision()
        } else {
            self.commit_burying(&mut inner, &changes, Some(&buried))?
        };
        lock(&self.tombstones).insert(key.clone(), Instant::now() + self.tombstone);
        Ok(revision)
    }

    /// Removes the tombstones that are due (unless the address came back); one whose
    /// removal fails is tried again a tombstone time later.
    fn reap_tombstones(&self) {
        let now = Instant::now();
        let due: Vec<Key> = {
            let mut t = lock(&self.tombstones);
            let due: Vec<Key> = t.iter().filter(|(_, at)| **at <= now).map(|(k, _)| k.clone()).collect();
            for k in &due {
                t.remove(k);
            }
            due
        };
        for k in due {
            let still_down = self.instance(&k).is_some_and(|i| i.state() == pb::InstanceState::Down);
            if !still_down {
                continue;
            }
            match self.mutate(|s| s.deregister(&k)) {
                Ok(_) => info!(service = %k.0, address = %k.1, "tombstone removed"),
                Err(e) => {
                    warn!(service = %k.0, address = %k.1, error = %e, "tombstone not removed; retrying");
                    let again = unix_ms(SystemTime::now()) + self.tombstone.as_millis() as u64;
                    let _ = tokio::task::block_in_place(|| lock(&self.inner).store.put_tombstone(&k, again));
                    lock(&self.tombstones).insert(k, Instant::now() + self.tombstone);
                }
            }
        }
    }

    /// When each tombstone is due.
    pub fn tombstones(&self) -> BTreeMap<Key, Instant> {
        lock(&self.tombstones).clone()
    }

    /// Marks instances whose lease lapsed down; removes those lapsed for 3 TTLs. Also
    /// removes the tombstones that are due and stores the nodes' last contacts.
    pub fn expire_leases(&self) {
        self.reap_tombstones();
        self.flush_roster();
        let mut inner = lock(&self.inner);
        let now = Instant::now();
        let mut changes = Changes::default();
        let mut newly_lapsed = Vec::new();
        for (k, deadline) in &inner.leases {
            let Some(i) = inner.state.instance(k) else { continue };
            let ttl = Duration::from_millis(i.ttl_ms);
            if now > *deadline + 2 * ttl {
                changes.removed_instances.push(k.clone());
                info!(service = %k.0, address = %k.1, "lease lapsed three times over: instance deregistered");
            } else if now > *deadline && !inner.lapsed.contains(k) {
                let mut down = i.clone();
                down.set_state(pb::InstanceState::Down);
                changes.instances.push(down);
                newly_lapsed.push(k.clone());
                warn!(service = %k.0, address = %k.1, ttl_ms = i.ttl_ms, "no heartbeat within the lease: instance down");
            }
        }
        inner.lapsed.extend(newly_lapsed);
        if let Err(e) = self.commit(&mut inner, &changes) {
            warn!(error = %e, "lease expiry not stored; retrying");
        }
    }

    /// Records a new session of `node`; returns its id.
    pub fn connect(&self, node: &str, applied: u64) -> u64 {
        let id = {
            let mut n = lock(&self.next_session);
            *n += 1;
            *n
        };
        let now = SystemTime::now();
        let joins = lock(&self.nodes)
            .insert(
                node.to_owned(),
                NodeInfo {
                    session: id,
                    connected: true,
                    applied,
                    last_contact: now,
                    settled: 0,
                    in_flight: BTreeMap::new(),
                },
            )
            .is_none();
        if joins {
            // Stored before the session goes on: a coordinator restarted from here on
            // waits for this node while its agent is away. (Later contacts are stored
            // every ROSTER_FLUSH, with every node's.)
            let inner = lock(&self.inner);
            match tokio::task::block_in_place(|| inner.store.put_node(node, unix_ms(now))) {
                Ok(()) => info!(%node, "node joined the roster"),
                Err(e) => {
                    warn!(%node, error = %e, "node roster not stored; a restarted coordinator learns of it at its next hello")
                }
            }
        }
        info!(%node, applied, session = id, "agent connected");
        id
    }

    /// Stores every node's last contact, at most once per [`ROSTER_FLUSH`] (one
    /// transaction for all), so that a restarted coordinator knows when it last heard
    /// from a node whose agent does not come back.
    fn flush_roster(&self) {
        {
            let mut last = lock(&self.roster_flushed);
            if last.elapsed() < ROSTER_FLUSH {
                return;
            }
            *last = Instant::now();
        }
        let nodes = lock(&self.nodes);
        let rows: Vec<(String, u64)> = nodes.iter().map(|(n, i)| (n.clone(), unix_ms(i.last_contact))).collect();
        let inner = lock(&self.inner);
        if let Err(e) = tokio::task::block_in_place(|| inner.store.put_nodes(&rows)) {
            warn!(error = %e, "nodes' last contacts not stored; retrying later");
        }
    }

    /// Records an ack of `session` of `node`: the revision its maps hold, and the
    /// handshakes in flight from it to backends that stopped serving.
    pub fn ack(&self, node: &str, session: u64, ack: &pb::Ack) {
        crate::failpoint!("coordinator.state.ack");
        let at = Instant::now();
        let revision = ack.revision;
        if let Some(n) = lock(&self.nodes).get_mut(node) {
            if n.session == session {
                n.applied = revision;
                n.last_contact = SystemTime::now();
                n.in_flight = ack.in_flight.iter().map(|f| (f.address.clone(), f.handshakes)).collect();
                if ack.settled {
                    n.settled = revision;
                }
            }
        }
        let _ = self.acks.send(AckEvent { node: node.to_owned(), revision, at });
    }

    /// Records the end of `session` of `node` (a newer session is left alone).
    pub fn disconnect(&self, node: &str, session: u64) {
        {
            let mut ops = lock(&self.ops);
            if ops.get(node).is_some_and(|(s, _)| *s == session) {
                ops.remove(node);
            }
        }
        if let Some(n) = lock(&self.nodes).get_mut(node) {
            if n.session == session {
                n.connected = false;
                warn!(%node, session, "agent disconnected; its datapath keeps the last state it applied");
            }
        }
    }

    /// The node roster: every node whose agent said hello (to this coordinator or to an
    /// earlier run of it on the same store) and that was not removed since, with its
    /// agent's session.
    pub fn nodes(&self) -> BTreeMap<String, NodeInfo> {
        lock(&self.nodes).clone()
    }

    /// Whether `node` is in the roster.
    pub fn knows_node(&self, node: &str) -> bool {
        lock(&self.nodes).contains_key(node)
    }

    /// Retires `node` from the roster: the engine stops waiting for it. Refused while its
    /// agent is connected or it runs registered instances (not down), unless `force`: then
    /// a connected agent's session ends (it joins again at its next hello) and its
    /// instances stay registered.
    pub fn remove_node(&self, node: &str, force: bool) -> Result<Removed, Status> {
        let mut nodes = lock(&self.nodes);
        let Some(info) = nodes.get(node) else {
            return Err(Status::not_found(format!(
                "node: {node:?} is not in the roster; `hitless node list` shows the nodes known"
            )));
        };
        let inner = lock(&self.inner);
        let instances: Vec<Key> = inner
            .state
            .instances()
            .filter(|i| i.node == node && i.state() != pb::InstanceState::Down)
            .map(|i| (i.service.clone(), i.address.clone()))
            .collect();
        let removed = Removed { was_connected: info.connected, instances };
        if !force {
            let mut why = Vec::new();
            if removed.was_connected {
                why.push("its agent is connected (stop the agent first)".to_owned());
            }
            if !removed.instances.is_empty() {
                let list: Vec<String> = removed.instances.iter().map(|(s, a)| format!("{s} {a}")).collect();
                why.push(format!(
                    "it runs {} registered instances ({}): move them off it first",
                    list.len(),
                    list.join(", ")
                ));
            }
            if !why.is_empty() {
                return Err(Status::failed_precondition(format!(
                    "node {node} not removed: {}; or remove it anyway with --force",
                    why.join("; ")
                )));
            }
        }
        tokio::task::block_in_place(|| inner.store.remove_node(node))
            .map_err(|e| Status::internal(format!("node {node} not removed (the roster was not stored): {e}")))?;
        drop(inner);
        nodes.remove(node);
        drop(nodes);
        lock(&self.instances).remove(node);
        lock(&self.counters).remove(node);
        if lock(&self.ops).remove(node).is_some() {
            warn!(%node, "node removed with its agent connected: its session ends");
        }
        info!(%node, forced = force, "node removed from the roster");
        Ok(removed)
    }
}
