//! The one writer of the datapath's maps.
//!
//! Everything that changes what the kernel steers goes through [`Writer::apply`],
//! which knows the safe order:
//!
//! 1. backends are written before any slot points to them;
//! 2. a service's new slot table is written under the other generation (over the
//!    table retired there by the swap before, in place), then the service entry is
//!    swapped to it in one update; the old generation stays, retired, so that a reader
//!    that read the service before the swap (or before two swaps) still finds a slot,
//!    and is trimmed ~1 s after the service's last swap ([`RETIRE`]);
//! 3. only then are backends marked draining or down (their slots are gone);
//! 4. VIPs, services and backends that left are deleted last, when nothing refers
//!    to them.
//!
//! A reader in the kernel therefore never follows a slot to nowhere, and once
//! `apply` returns, no new connect picks a backend that the apply took out.
//! Capacities are checked before the first write, so a registry too large for the
//! maps changes nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuHashMap, PerCpuValues};

use crate::abi::{self, Backend, BackendStats, Counters, Endpoint, Frontend, Meta, Service, SlotKey};
use crate::desired::{self, DesiredService};

/// Map names, as pinned in the node's pin directory.
pub mod names {
    /// VIPs.
    pub const FRONTENDS: &str = "hl_frontends";
    /// Services.
    pub const SERVICES: &str = "hl_services";
    /// Slot tables.
    pub const SLOTS: &str = "hl_slots";
    /// Backends.
    pub const BACKENDS: &str = "hl_backends";
    /// Backends by address.
    pub const BACKEND_ADDR: &str = "hl_backend_addr";
    /// Reverse translation per socket.
    pub const REV_NAT: &str = "hl_rev_nat";
    /// Per-service counters.
    pub const COUNTERS: &str = "hl_counters";
    /// Active connections per local backend.
    pub const ACTIVE: &str = "hl_active";
    /// Counted-socket marks.
    pub const SK_MARK: &str = "hl_sk_mark";
    /// Applied revision.
    pub const META: &str = "hl_meta";
    /// What this node's clients saw of each backend.
    pub const BACKEND_STATS: &str = "hl_backend_stats";
    /// Reverse translations of steered TCP sockets, by socket cookie.
    pub const REV_RING: &str = "hl_rev_ring";
    /// Start times of outgoing connects to backends, by socket cookie.
    pub const CONN_RING: &str = "hl_conn_ring";
    /// Connects from this node still in their handshake, per remote backend.
    pub const PENDING: &str = "hl_pending";
    /// Backends whose failure is signalled and not yet looked at.
    pub const FAILED_FLAG: &str = "hl_failed_flag";
    /// Failure signals (a ring buffer of backend endpoints).
    pub const FAILURES: &str = "hl_failures";
}

/// Why an apply did not happen or did not finish.
#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The registry needs more entries than a map holds; nothing was written.
    #[error("{what} needs {needed} entries in map {map}, which holds {capacity}; start the agent with {flag} {needed} or more, or shrink the registry (nothing was changed)")]
    Capacity {
        /// What overflows.
        what: String,
        /// The map.
        map: &'static str,
        /// Entries needed at the peak of the apply.
        needed: usize,
        /// Entries the map holds.
        capacity: usize,
        /// The agent flag that sets the capacity.
        flag: &'static str,
    },
    /// A pinned map could not be opened.
    #[error("cannot open pinned map {path}: {source}")]
    Open {
        /// Pin path.
        path: String,
        /// Cause.
        source: MapError,
    },
    /// The number of possible CPUs could not be read (per-CPU counters need it).
    #[error("reading the possible CPUs: {0}")]
    Cpus(std::io::Error),
    /// A kernel map operation failed mid-apply. Every step keeps the datapath
    /// consistent, so the maps are safe to read; the next apply reconciles.
    #[error("{op} in map {map} failed: {source}")]
    Kernel {
        /// insert or remove.
        op: &'static str,
        /// The map.
        map: &'static str,
        /// Cause.
        source: MapError,
    },
}

/// The capacity of each map, read from the kernel (a reused pin keeps its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// `hl_services` and `hl_counters`.
    pub services: usize,
    /// `hl_frontends`.
    pub vips: usize,
    /// `hl_backends`, `hl_backend_addr`, `hl_active`, `hl_pending`.
    pub backends: usize,
    /// `hl_slots`.
    pub slots: usize,
}

/// Handles to the pinned maps.
pub struct Maps {
    frontends: HashMap<MapData, Endpoint, Frontend>,
    services: HashMap<MapData, u32, Service>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    backend_addr: HashMap<MapData, Endpoint, u32>,
    active: HashMap<MapData, Endpoint, i64>,
    pending: HashMap<MapData, Endpoint, i64>,
    counters: PerCpuArray<MapData, Counters>,
    meta: Array<MapData, Meta>,
    backend_stats: PerCpuHashMap<MapData, Endpoint, BackendStats>,
    capacity: Capacity,
    /// Per-backend (connects, failed) when the agent's writer opened the maps: what
    /// happened before this agent ran (see [`Maps::stats_at_start`]).
    at_start: Option<BTreeMap<Endpoint, (u64, u64)>>,
    /// Where the maps are pinned.
    pin_dir: PathBuf,
    /// Lookups of `hl_backend_stats` so far (see [`Maps::stats_reads`]).
    stats_reads: AtomicU64,
}

/// Opens the map pinned as `name` in `dir`, with its capacity.
pub(crate) fn open(dir: &Path, name: &'static str) -> Result<(Map, usize), WriteError> {
    let path = dir.join(name);
    let wrap = |source| WriteError::Open { path: path.display().to_string(), source };
    let data = MapData::from_pin(&path).map_err(wrap)?;
    let cap = data.info().map_err(wrap)?.max_entries() as usize;
    Ok((Map::from_map_data(data).map_err(wrap)?, cap))
}

macro_rules! typed {
    ($dir:expr, $name:expr) => {{
        let (map, cap) = open($dir, $name)?;
        let typed = map
            .try_into()
            .map_err(|source| WriteError::Open { path: $dir.join($name).display().to_string(), source })?;
        (typed, cap)
    }};
}

impl Maps {
    /// Opens the maps pinned in `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Self, WriteError> {
        let (frontends, vips) = typed!(pin_dir, names::FRONTENDS);
        let (services, services_cap) = typed!(pin_dir, names::SERVICES);
        let (slots, slots_cap) = typed!(pin_dir, names::SLOTS);
        let (backends, backends_cap) = typed!(pin_dir, names::BACKENDS);
        let (backend_addr, addr_cap) = typed!(pin_dir, names::BACKEND_ADDR);
        let (active, _) = typed!(pin_dir, names::ACTIVE);
        let (pending, _) = typed!(pin_dir, names::PENDING);
        let (counters, counters_cap) = typed!(pin_dir, names::COUNTERS);
        let (meta, _) = typed!(pin_dir, names::META);
        let (backend_stats, _) = typed!(pin_dir, names::BACKEND_STATS);
        Ok(Self {
            frontends,
            services,
            slots,
            backends,
            backend_addr,
            active,
            pending,
            counters,
            meta,
            backend_stats,
            capacity: Capacity {
                services: services_cap.min(counters_cap),
                vips,
                backends: backends_cap.min(addr_cap),
                slots: slots_cap,
            },
            at_start: None,
            pin_dir: pin_dir.to_owned(),
            stats_reads: AtomicU64::new(0),
        })
    }

    /// The pin directory the maps were opened from.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// How many times these handles looked up a backend's counters (one per-CPU hash
    /// lookup each, the outlier detector's cost). Tests use it to prove that an idle
    /// agent reads none.
    pub fn stats_reads(&self) -> u64 {
        self.stats_reads.load(Ordering::Relaxed)
    }

    /// Per-backend (connects, failed) as they were when [`Writer::new`] took these maps,
    /// i.e. before the agent's first apply; `None` for maps no writer took. Failures
    /// counted since then happened while this agent ran; the ones before are history
    /// (an agent restart must not isolate a backend for them).
    pub fn stats_at_start(&self) -> Option<&BTreeMap<Endpoint, (u64, u64)>> {
        self.at_start.as_ref()
    }

    /// Per-backend (connects, failed) of every backend this node's clients dialled.
    fn all_backend_stats(&self) -> BTreeMap<Endpoint, (u64, u64)> {
        let mut all = BTreeMap::new();
        for ep in self.backend_stats.keys().filter_map(Result::ok) {
            if let Some(st) = self.backend_stats(&ep) {
                all.insert(ep, (st.connects, st.failed));
            }
        }
        all
    }

    /// What the maps hold.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// The revision the maps hold (0 when never written).
    pub fn revision(&self) -> Result<u64, WriteError> {
        self.meta.get(&0, 0).map(|m| m.revision).map_err(|source| WriteError::Kernel {
            op: "lookup",
            map: names::META,
            source,
        })
    }

    /// Open server-side connections of the local backend at `ep` (0 when unknown).
    pub fn active_connections(&self, ep: &Endpoint) -> i64 {
        self.active.get(ep, 0).unwrap_or(0).max(0)
    }

    /// Connects from this node to the backend at `ep` still in their handshake: sent a
    /// SYN, neither established nor failed yet (0 when none).
    pub fn handshakes_in_flight(&self, ep: &Endpoint) -> u64 {
        self.pending.get(ep, 0).map_or(0, |n| n.max(0) as u64)
    }

    /// What this node's clients saw of the backend at `ep`, summed over CPUs.
    pub fn backend_stats(&self, ep: &Endpoint) -> Option<BackendStats> {
        self.stats_reads.fetch_add(1, Ordering::Relaxed);
        let per_cpu = self.backend_stats.get(ep, 0).ok()?;
        let mut sum = BackendStats::default();
        for s in per_cpu.iter() {
            sum.add(s);
        }
        Some(sum)
    }

    /// Whether the kernel has counted connections for the local backend at `ep`.
    pub fn has_active_entry(&self, ep: &Endpoint) -> bool {
        self.active.get(ep, 0).is_ok()
    }

    /// The datapath's first invariant, read back from the kernel: slots of the
    /// generation in force (the tables `pick()` reads) that point at a backend that is
    /// missing, not serving, or of another service. Always 0 unless an apply broke the
    /// update order. One lookup per slot in force and per backend they name: for
    /// scrapes and tests, not for a hot path.
    pub fn slots_to_unserving(&self) -> usize {
        let mut bad = 0;
        let mut backends: std::collections::HashMap<u32, Option<Backend>> = std::collections::HashMap::new();
        for (sid, svc) in self.services.iter().filter_map(Result::ok) {
            for (table, n) in [(crate::abi::TABLE_V4, svc.slots4), (crate::abi::TABLE_V6, svc.slots6)] {
                for slot in 0..n {
                    let key = SlotKey { service_id: sid, slot, table, gen: svc.gen as u8 };
                    let Ok(bid) = self.slots.get(&key, 0) else {
                        bad += 1;
                        continue;
                    };
                    let be = *backends.entry(bid).or_insert_with(|| self.backends.get(&bid, 0).ok());
                    if !be.is_some_and(|b| b.state == crate::abi::STATE_SERVING && b.service_id == sid) {
                        bad += 1;
                    }
                }
            }
        }
        bad
    }

    /// Entries and capacity of each map the agent writes: (name, entries, capacity).
    pub fn fill(&self) -> Vec<(&'static str, usize, usize)> {
        vec![
            (names::FRONTENDS, self.frontends.keys().count(), self.capacity.vips),
            (names::SERVICES, self.services.keys().count(), self.capacity.services),
            (names::SLOTS, self.slots.keys().count(), self.capacity.slots),
            (names::BACKENDS, self.backends.keys().count(), self.capacity.backends),
            (names::BACKEND_ADDR, self.backend_addr.keys().count(), self.capacity.backends),
            (names::ACTIVE, self.active.keys().count(), self.capacity.backends),
        ]
    }

    /// Counters of a service id, summed over CPUs.
    pub fn counters(&self, service_id: u32) -> Counters {
        let mut sum = Counters::default();
        if let Ok(per_cpu) = self.counters.get(&service_id, 0) {
            for c in per_cpu.iter() {
                sum.steered += c.steered;
                sum.redirected += c.redirected;
                sum.refused += c.refused;
                sum.passed_draining += c.passed_draining;
            }
        }
        sum
    }
}

/// How long a retired slot table stays after its service's last swap. A reader (the
/// steering program, which runs for microseconds) that read the service entry before a
/// swap looks up a slot of the generation it read; the datapath tries twice, and a
/// reader delayed across two swaps found the old generation deleted both times and
/// refused the connect (issue 18.9). Retired tables stay, and the next swap overwrites
/// them in place, so such a reader always finds a slot naming a backend (which it
/// still checks is serving and of the service).
pub const RETIRE: std::time::Duration = std::time::Duration::from_secs(1);

/// A service as the writer last wrote it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Written {
    value: Service,
    /// Backend ids of the slots of the generation in force, per table.
    slots4: Vec<u32>,
    slots6: Vec<u32>,
    /// Slot keys that may exist, per generation and table (v4, v6): slots `0..n`
    /// (tables are written and trimmed as prefixes). Beyond the tables in force, these
    /// are retired keys, trimmed [`RETIRE`] after `swapped_at`.
    present: [[usize; 2]; 2],
    /// The service's last swap, while it has retired keys.
    swapped_at: Option<std::time::Instant>,
}

impl Written {
    /// Keys of the tables in force, per table.
    fn live(&self) -> [usize; 2] {
        [self.slots4.len(), self.slots6.len()]
    }

    /// Slot keys that may exist, all generations.
    fn keys(&self) -> usize {
        self.present.iter().flatten().sum()
    }

    /// Retired keys (the keys beyond the tables in force).
    fn retired(&self) -> usize {
        self.keys().saturating_sub(self.live().iter().sum::<usize>())
    }

    fn gen(&self) -> usize {
        (self.value.gen as usize).min(1)
    }
}

/// Table index in [`Written::present`].
fn table_index(table: u8) -> usize {
    usize::from(table != abi::TABLE_V4)
}

/// Summary of one apply, for logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ApplyReport {
    /// Services whose slot table was swapped to a new generation.
    pub tables_swapped: usize,
    /// Map writes and deletes made.
    pub writes: usize,
    /// Services, VIPs and backends in force after the apply.
    pub services: usize,
    /// VIPs in force.
    pub vips: usize,
    /// Backends in force.
    pub backends: usize,
}

/// The single writer of the datapath, with its view of what the maps hold.
pub struct Writer {
    maps: Maps,
    services: BTreeMap<u32, Written>,
    frontends: BTreeMap<Endpoint, u32>,
    backends: BTreeMap<u32, Backend>,
    by_addr: BTreeMap<Endpoint, u32>,
    /// Slot keys of no generation in force (left by an apply that was killed).
    stray_slots: Vec<SlotKey>,
    /// Names of the services, by id; rebuilt from VIPs and backends after a restart.
    names: BTreeMap<u32, String>,
    next_backend: u32,
    report: ApplyReport,
    /// Whether this apply keeps the tables it retires (see [`RETIRE`]); false only when
    /// the slot map cannot hold them.
    keep_retired: bool,
}

/// A fail point (README "Failpoints"), compiled in only with the `failpoints` feature:
/// without it this expands to nothing. `failpoint!(NAME)` panics or sleeps as `FAILPOINTS`
/// says; `failpoint!(NAME, |fp| ERR)` also makes `return` the enclosing function's
/// `Err(ERR)` (`fp` is the point's name); `failpoint!(NAME, return)` returns `()` and
/// `failpoint!(NAME, break)` leaves the enclosing loop; `failpoint!(NAME, io)` is an
/// `io::Result<()>`, the injected error on `return`.
#[doc(hidden)]
#[macro_export]
macro_rules! failpoint {
    ($name:literal) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name);
    };
    ($name:literal, return) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name, |_| ());
    };
    ($name:literal, break) => {
        #[cfg(feature = "failpoints")]
        if ::fail::eval($name, |_| ()).is_some() {
            break;
        }
    };
    ($name:literal, io) => {{
        #[cfg(feature = "failpoints")]
        let result = ::fail::eval($name, |_| $crate::writer::injected_io($name)).map_or(Ok(()), Err);
        #[cfg(not(feature = "failpoints"))]
        let result: std::io::Result<()> = Ok(());
        result
    }};
    ($name:literal, |$fp:ident| $err:expr) => {
        #[cfg(feature = "failpoints")]
        ::fail::fail_point!($name, |_| {
            let $fp: &'static str = $name;
            Err($err)
        });
    };
}

/// Configures the fail points from `FAILPOINTS` (`name=action;...`, fail's syntax), once
/// per process, and makes a panic anywhere end the process (as a crash would: a panic
/// in a task would otherwise leave the agent up without it). Only with the `failpoints`
/// feature (without it, neither this nor any fail point exists).
#[cfg(feature = "failpoints")]
pub fn failpoints_setup() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The scenario lives as long as the process (its drop would clear the points).
        std::mem::forget(fail::FailScenario::setup());
        let report = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            report(info);
            std::process::exit(101);
        }));
    });
}

/// The I/O error a fail point injects, naming it.
#[cfg(feature = "failpoints")]
pub(crate) fn injected_io(fp: &str) -> std::io::Error {
    std::io::Error::other(format!("injected by failpoint {fp}"))
}

/// A map operation's error, as the kernel would return it, injected by fail point `fp`.
#[cfg(feature = "failpoints")]
fn injected(op: &'static str, map: &'static str, fp: &str) -> WriteError {
    let call = if op == "remove" { "bpf_map_delete_elem" } else { "bpf_map_update_elem" };
    let source = MapError::SyscallError(aya::sys::SyscallError { call, io_error: injected_io(fp) });
    WriteError::Kernel { op, map, source }
}

fn kernel(op: &'static str, map: &'static str) -> impl FnOnce(MapError) -> WriteError {
    move |source| WriteError::Kernel { op, map, source }
}

impl Writer {
    /// Reads what the pinned maps hold, so that the next apply changes only what differs.
    pub fn new(mut maps: Maps) -> Result<Self, WriteError> {
        // The writer opens first in both modes: fail points are set before any boundary.
        #[cfg(feature = "failpoints")]
        failpoints_setup();
        maps.at_start = Some(maps.all_backend_stats());
        let mut services = BTreeMap::new();
        for item in maps.services.iter() {
            let (id, value) = item.map_err(kernel("iterate", names::SERVICES))?;
            services.insert(id, Written { value, ..Written::default() });
        }
        let mut stray_slots = Vec::new();
        let mut slot_entries: Vec<(SlotKey, u32)> = Vec::new();
        for item in maps.slots.iter() {
            slot_entries.push(item.map_err(kernel("iterate", names::SLOTS))?);
        }
        slot_entries.sort_by_key(|(k, _)| *k);
        let started = std::time::Instant::now();
        for (key, bid) in slot_entries {
            let known = key.gen <= 1 && (key.table == abi::TABLE_V4 || key.table == abi::TABLE_V6);
            let Some(w) = services.get_mut(&key.service_id).filter(|_| known) else {
                stray_slots.push(key);
                continue;
            };
            let (g, t) = (usize::from(key.gen), table_index(key.table));
            w.present[g][t] = w.present[g][t].max(usize::from(key.slot) + 1);
            let count = if key.table == abi::TABLE_V4 { w.value.slots4 } else { w.value.slots6 };
            if u32::from(key.gen) == w.value.gen && key.slot < count {
                if key.table == abi::TABLE_V4 {
                    w.slots4.push(bid);
                } else {
                    w.slots6.push(bid);
                }
            } else {
                // Retired by the previous agent, or left by an apply it did not finish:
                // trimmed like any retired table (a reader may hold that generation).
                w.swapped_at = Some(started);
            }
        }
        let mut frontends = BTreeMap::new();
        for item in maps.frontends.iter() {
            let (ep, fe) = item.map_err(kernel("iterate", names::FRONTENDS))?;
            frontends.insert(ep, fe.service_id);
        }
        let mut backends = BTreeMap::new();
        for item in maps.backends.iter() {
            let (id, be) = item.map_err(kernel("iterate", names::BACKENDS))?;
            backends.insert(id, be);
        }
        let mut by_addr = BTreeMap::new();
        for item in maps.backend_addr.iter() {
            let (ep, id) = item.map_err(kernel("iterate", names::BACKEND_ADDR))?;
            by_addr.insert(ep, id);
        }
        let next_backend = backends.keys().next_back().map_or(0, |id| id.wrapping_add(1));
        Ok(Self {
            maps,
            services,
            frontends,
            backends,
            by_addr,
            stray_slots,
            names: BTreeMap::new(),
            next_backend,
            report: ApplyReport::default(),
            keep_retired: true,
        })
    }

    /// The maps, for reading counters and gauges.
    pub fn maps(&self) -> &Maps {
        &self.maps
    }

    /// The service id the datapath uses for `name`, if it is in force.
    pub fn service_id(&self, name: &str) -> Option<u32> {
        self.names.iter().find(|(_, n)| n.as_str() == name).map(|(id, _)| *id)
    }

    /// Makes the maps hold `desired`, in the safe order, and records `revision` last.
    pub fn apply(&mut self, desired: &[DesiredService], revision: u64) -> Result<ApplyReport, WriteError> {
        self.report = ApplyReport::default();
        let target = self.target(desired)?;
        let keep = self.check_capacity(&target)?;

        // 0. Leftovers of a killed apply of services that are gone; retired tables
        //    older than RETIRE (all of them when the slot map is too small to keep any).
        for key in std::mem::take(&mut self.stray_slots) {
            self.remove_slot(&key)?;
        }
        self.trim(if keep { RETIRE } else { std::time::Duration::ZERO })?;
        self.keep_retired = keep;

        // 1. Backends that are new, or whose state rises or stays: before any slot.
        for (id, be) in &target.backends {
            let falls = self.backends.get(id).is_some_and(|old| old.state < be.state);
            if self.backends.get(id) != Some(be) && !falls {
                self.put_backend(*id, *be)?;
            }
        }
        for (ep, id) in &target.by_addr {
            if self.by_addr.get(ep) != Some(id) {
                crate::failpoint!("agent.writer.backend_addr_insert", |fp| injected("insert", names::BACKEND_ADDR, fp));
                self.maps.backend_addr.insert(ep, id, 0).map_err(kernel("insert", names::BACKEND_ADDR))?;
                self.by_addr.insert(*ep, *id);
                self.report.writes += 1;
            }
        }

        // 2. Slot tables, then VIPs.
        for (id, t) in &target.services {
            self.put_service(*id, t)?;
        }
        for (ep, id) in &target.frontends {
            if self.frontends.get(ep) != Some(id) {
                let fe = Frontend { service_id: *id, flags: 0 };
                self.maps.frontends.insert(ep, fe, 0).map_err(kernel("insert", names::FRONTENDS))?;
                self.frontends.insert(*ep, *id);
                self.report.writes += 1;
            }
        }

        // 3. Backends leaving service: their slots are gone now.
        for (id, be) in &target.backends {
            if self.backends.get(id) != Some(be) {
                self.put_backend(*id, *be)?;
            }
        }

        // 4. What left: VIPs, then services, then backends nothing points to.
        let gone: Vec<Endpoint> =
            self.frontends.keys().filter(|ep| !target.frontends.contains_key(ep)).copied().collect();
        for ep in gone {
            self.maps.frontends.remove(&ep).map_err(kernel("remove", names::FRONTENDS))?;
            self.frontends.remove(&ep);
            self.report.writes += 1;
        }
        let gone: Vec<u32> = self.services.keys().filter(|id| !target.services.contains_key(id)).copied().collect();
        for id in gone {
            self.remove_service(id)?;
        }
        let gone: Vec<u32> = self.backends.keys().filter(|id| !target.backends.contains_key(id)).copied().collect();
        for id in gone {
            self.remove_backend(id)?;
        }

        // 5. The revision, last: whoever reads it knows the maps hold all of the above.
        let meta = Meta { revision, applied_at_ns: now_ns() };
        crate::failpoint!("agent.writer.revision_set", |fp| injected("update", names::META, fp));
        self.maps.meta.set(0, meta, 0).map_err(kernel("update", names::META))?;
        self.names = target.names;
        self.report.services = self.services.len();
        self.report.vips = self.frontends.len();
        self.report.backends = self.backends.len();
        Ok(self.report)
    }

    /// Resolves ids and slot tables for `desired`, reusing the ids in force.
    fn target(&mut self, desired: &[DesiredService]) -> Result<Target, WriteError> {
        let mut t = Target::default();
        let mut taken: BTreeSet<u32> = BTreeSet::new();
        // Match each desired service to the id in force: by name, else (after a
        // restart) by any of its VIPs, else by any of its backends.
        let mut ids = Vec::with_capacity(desired.len());
        for s in desired {
            let found = self
                .names
                .iter()
                .find(|(_, n)| **n == s.name)
                .map(|(id, _)| *id)
                .or_else(|| s.vips.iter().find_map(|v| self.frontends.get(v).copied()))
                .or_else(|| {
                    s.backends.iter().find_map(|b| {
                        self.by_addr.get(&b.ep).and_then(|id| self.backends.get(id)).map(|be| be.service_id)
                    })
                })
                .filter(|id| self.services.contains_key(id) && !taken.contains(id));
            if let Some(id) = found {
                taken.insert(id);
            }
            ids.push(found);
        }
        // New services get the lowest ids in use by nobody, now or before this apply
        // (a reader racing the apply must not mistake one service for another).
        let mut next = 0u32;
        for id in &mut ids {
            if id.is_none() {
                while taken.contains(&next) || self.services.contains_key(&next) {
                    next += 1;
                }
                if next as usize >= self.maps.capacity.services {
                    return Err(WriteError::Capacity {
                        what: format!("{} services", desired.len()),
                        map: names::SERVICES,
                        needed: desired.len() + self.services.len(),
                        capacity: self.maps.capacity.services,
                        flag: "--max-services",
                    });
                }
                taken.insert(next);
                *id = Some(next);
            }
        }

        for (s, id) in desired.iter().zip(ids) {
            let Some(sid) = id else { continue };
            t.names.insert(sid, s.name.clone());
            let mut bids = Vec::with_capacity(s.backends.len());
            for b in &s.backends {
                let bid = match self.by_addr.get(&b.ep) {
                    Some(bid) if self.backends.get(bid).is_some_and(|be| be.service_id == sid) => *bid,
                    _ => self.alloc_backend(&t),
                };
                let value = Backend {
                    addr: b.ep.addr,
                    port: b.ep.port,
                    state: b.state,
                    family: b.ep.family(),
                    service_id: sid,
                };
                t.backends.insert(bid, value);
                t.by_addr.insert(b.ep, bid);
                bids.push(bid);
            }
            let table = |tab: u8| -> Result<Vec<u32>, WriteError> {
                let weights: Vec<u32> = s.backends.iter().map(|b| if b.in_table(tab) { b.weight } else { 0 }).collect();
                let slots = desired::slot_table(&weights).ok_or_else(|| WriteError::Capacity {
                    what: format!("service {:?} with more than {} serving backends", s.name, abi::MAX_SLOTS),
                    map: names::SLOTS,
                    needed: weights.iter().filter(|w| **w > 0).count(),
                    capacity: abi::MAX_SLOTS,
                    flag: "(a per-service limit; split the service)",
                })?;
                Ok(slots.into_iter().map(|i| bids[i]).collect())
            };
            let slots4 = table(abi::TABLE_V4)?;
            let slots6 = table(abi::TABLE_V6)?;
            for v in &s.vips {
                t.frontends.insert(*v, sid);
            }
            t.services.insert(sid, TargetService { policy: s.policy, slots4, slots6 });
        }
        Ok(t)
    }

    fn alloc_backend(&mut self, t: &Target) -> u32 {
        // Monotonic ids: a deleted backend's id is not handed out again soon.
        while self.backends.contains_key(&self.next_backend) || t.backends.contains_key(&self.next_backend) {
            self.next_backend = self.next_backend.wrapping_add(1);
        }
        let id = self.next_backend;
        self.next_backend = self.next_backend.wrapping_add(1);
        id
    }

    /// Checks that the maps hold what `t` needs at the peak of the apply; returns
    /// whether the slot map also holds the tables the apply retires (else they go at
    /// once, as before [`RETIRE`]: a reader racing two swaps may then refuse).
    fn check_capacity(&self, t: &Target) -> Result<bool, WriteError> {
        let over = |what: &str, map, needed: usize, capacity: usize, flag| {
            (needed > capacity).then(|| WriteError::Capacity { what: what.to_owned(), map, needed, capacity, flag })
        };
        let vips = self.frontends.keys().chain(t.frontends.keys()).collect::<BTreeSet<_>>().len();
        let backends = self.backends.keys().chain(t.backends.keys()).collect::<BTreeSet<_>>().len();
        let addrs = self.by_addr.keys().chain(t.by_addr.keys()).collect::<BTreeSet<_>>().len();
        let services = self.services.keys().chain(t.services.keys()).collect::<BTreeSet<_>>().len();
        // Slots, without retired tables: replay the apply's order; a swapped service
        // briefly holds both tables.
        let mut slots: usize = self.services.values().map(|w| w.slots4.len() + w.slots6.len()).sum();
        let mut peak = slots;
        for (id, ts) in &t.services {
            let old = self.services.get(id).map_or(0, |w| w.slots4.len() + w.slots6.len());
            let new = ts.slots4.len() + ts.slots6.len();
            peak = peak.max(slots + new);
            slots = slots + new - old;
        }
        // Keeping retired tables: what stays after the trim of step 0, and every new
        // table on top (written over its generation's retired keys); nothing is deleted
        // before step 4.
        let now = std::time::Instant::now();
        let kept = |w: &Written| w.swapped_at.is_some_and(|at| now.duration_since(at) < RETIRE);
        let mut keeping: usize =
            self.services.values().map(|w| if kept(w) { w.keys() } else { w.keys() - w.retired() }).sum();
        for (id, ts) in &t.services {
            let new = [ts.slots4.len(), ts.slots6.len()];
            keeping += match self.services.get(id) {
                None => new.iter().sum(),
                Some(w) if w.slots4 == ts.slots4 && w.slots6 == ts.slots6 => 0,
                Some(w) => {
                    let other = 1 - w.gen();
                    let there = if kept(w) { w.present[other] } else { [0, 0] };
                    (0..2).map(|i| new[i].saturating_sub(there[i])).sum()
                }
            };
        }
        let err =
            over(&format!("{} VIPs", t.frontends.len()), names::FRONTENDS, vips, self.maps.capacity.vips, "--max-vips")
                .or_else(|| {
                    over(
                        &format!("{} services", t.services.len()),
                        names::SERVICES,
                        services,
                        self.maps.capacity.services,
                        "--max-services",
                    )
                })
                .or_else(|| {
                    over(
                        &format!("{} backends", t.backends.len()),
                        names::BACKENDS,
                        backends.max(addrs),
                        self.maps.capacity.backends,
                        "--max-backends",
                    )
                })
                .or_else(|| over("the slot tables", names::SLOTS, peak, self.maps.capacity.slots, "--max-slots"));
        match err {
            Some(e) => Err(e),
            None => {
                let keep = keeping <= self.maps.capacity.slots;
                if !keep {
                    tracing::warn!(
                        needed = keeping,
                        capacity = self.maps.capacity.slots,
                        "the slot map cannot keep retired slot tables; they are deleted at each swap (a connect racing two swaps may be refused); raise --max-slots"
                    );
                }
                Ok(keep)
            }
        }
    }

    /// Deletes the retired slot keys of services whose last swap is `age` old or more.
    /// Returns how many services it trimmed.
    fn trim(&mut self, age: std::time::Duration) -> Result<usize, WriteError> {
        let now = std::time::Instant::now();
        let due: Vec<u32> = self
            .services
            .iter()
            .filter(|(_, w)| w.swapped_at.is_some_and(|at| now.duration_since(at) >= age))
            .map(|(id, _)| *id)
            .collect();
        self.trim_ids(&due)?;
        Ok(due.len())
    }

    /// Deletes the retired slot keys of the services `ids`: every key of the generation
    /// not in force, and the keys of the one in force beyond its tables.
    fn trim_ids(&mut self, ids: &[u32]) -> Result<(), WriteError> {
        for id in ids {
            let Some(mut w) = self.services.get(id).cloned() else { continue };
            let (live, cur) = (w.live(), w.gen());
            for (g, present) in w.present.iter_mut().enumerate() {
                for (t, table) in [abi::TABLE_V4, abi::TABLE_V6].into_iter().enumerate() {
                    let keep = if g == cur { live[t] } else { 0 };
                    for slot in keep..present[t] {
                        let key = SlotKey { service_id: *id, slot: slot as u16, table, gen: g as u8 };
                        self.remove_slot(&key)?;
                    }
                    present[t] = keep.min(present[t]);
                }
            }
            w.swapped_at = None;
            self.services.insert(*id, w);
        }
        Ok(())
    }

    /// Deletes the slot tables retired [`RETIRE`] ago or more (an apply also does).
    /// Call it now and then (a loop's tick): until then they only take room in the
    /// slot map, which capacity checks count. Returns how many services it trimmed.
    pub fn trim_retired(&mut self) -> Result<usize, WriteError> {
        if self.services.values().all(|w| w.swapped_at.is_none()) {
            return Ok(0);
        }
        self.trim(RETIRE)
    }

    fn put_backend(&mut self, id: u32, be: Backend) -> Result<(), WriteError> {
        crate::failpoint!("agent.writer.backend_insert", |fp| injected("insert", names::BACKENDS, fp));
        self.maps.backends.insert(id, be, 0).map_err(kernel("insert", names::BACKENDS))?;
        self.backends.insert(id, be);
        self.report.writes += 1;
        Ok(())
    }

    /// Writes a service's slot tables and entry, swapping generations when the tables change.
    fn put_service(&mut self, id: u32, t: &TargetService) -> Result<(), WriteError> {
        let old = self.services.get(&id).cloned();
        let same_tables = old.as_ref().is_some_and(|w| w.slots4 == t.slots4 && w.slots6 == t.slots6);
        if same_tables {
            let w = old.as_ref().map(|w| w.value).unwrap_or_default();
            if w.policy != t.policy {
                let value = Service { policy: t.policy, ..w };
                self.maps.services.insert(id, value, 0).map_err(kernel("insert", names::SERVICES))?;
                if let Some(w) = self.services.get_mut(&id) {
                    w.value = value;
                }
                self.report.writes += 1;
            }
            return Ok(());
        }
        // A new service starts at generation 0 with fresh counters; a changed one
        // flips to the generation not in force, over the table retired there.
        let gen = old.as_ref().map_or(0, |w| 1 - w.gen());
        if old.is_none() {
            let zero = PerCpuValues::try_from(vec![Counters::default(); aya::util::nr_cpus().map_or(1, |n| n)])
                .map_err(WriteError::Cpus)?;
            self.maps.counters.set(id, zero, 0).map_err(kernel("update", names::COUNTERS))?;
        }
        let mut w = old.clone().unwrap_or_default();
        for (table, ids) in [(abi::TABLE_V4, &t.slots4), (abi::TABLE_V6, &t.slots6)] {
            for (slot, bid) in ids.iter().enumerate() {
                let key = SlotKey { service_id: id, slot: slot as u16, table, gen: gen as u8 };
                crate::failpoint!("agent.writer.slot_insert", |fp| injected("insert", names::SLOTS, fp));
                self.maps.slots.insert(key, bid, 0).map_err(kernel("insert", names::SLOTS))?;
                self.report.writes += 1;
            }
            let present = &mut w.present[gen][table_index(table)];
            *present = (*present).max(ids.len());
            if old.is_some() {
                // Recorded as written: should the apply fail below, a trim finds them.
                self.services.insert(id, w.clone());
            }
        }
        let value = Service {
            gen: gen as u32,
            slots4: t.slots4.len() as u16,
            slots6: t.slots6.len() as u16,
            policy: t.policy,
            pad: [0; 3],
        };
        // The swap: one update replaces the whole entry for every reader at once.
        crate::failpoint!("agent.writer.service_swap", |fp| injected("insert", names::SERVICES, fp));
        self.maps.services.insert(id, value, 0).map_err(kernel("insert", names::SERVICES))?;
        w.value = value;
        w.slots4 = t.slots4.clone();
        w.slots6 = t.slots6.clone();
        self.report.writes += 1;
        if old.is_some() {
            self.report.tables_swapped += 1;
            // The old generation (and keys beyond the new table) retire now.
            w.swapped_at = Some(std::time::Instant::now());
        }
        self.services.insert(id, w);
        if old.is_some() && !self.keep_retired {
            self.trim_service(id)?;
        }
        Ok(())
    }

    /// Deletes one service's retired keys at once.
    fn trim_service(&mut self, id: u32) -> Result<(), WriteError> {
        self.trim_ids(&[id])
    }

    /// Deletes every slot key of a service, all generations.
    fn remove_slots(&mut self, id: u32, w: &Written) -> Result<(), WriteError> {
        for (g, present) in w.present.iter().enumerate() {
            for (t, table) in [abi::TABLE_V4, abi::TABLE_V6].into_iter().enumerate() {
                for slot in 0..present[t] {
                    let key = SlotKey { service_id: id, slot: slot as u16, table, gen: g as u8 };
                    self.remove_slot(&key)?;
                }
            }
        }
        Ok(())
    }

    fn remove_slot(&mut self, key: &SlotKey) -> Result<(), WriteError> {
        crate::failpoint!("agent.writer.slot_remove", |fp| injected("remove", names::SLOTS, fp));
        match self.maps.slots.remove(key) {
            Ok(()) | Err(MapError::KeyNotFound) | Err(MapError::ElementNotFound) => {}
            Err(e) => return Err(kernel("remove", names::SLOTS)(e)),
        }
        self.report.writes += 1;
        Ok(())
    }

    fn remove_service(&mut self, id: u32) -> Result<(), WriteError> {
        let Some(w) = self.services.get(&id).cloned() else { return Ok(()) };
        // Entry first: a reader then finds no service and refuses, never a slot to nowhere.
        self.maps.services.remove(&id).map_err(kernel("remove", names::SERVICES))?;
        self.services.remove(&id);
        self.report.writes += 1;
        self.remove_slots(id, &w)
    }

    fn remove_backend(&mut self, id: u32) -> Result<(), WriteError> {
        if !self.backends.contains_key(&id) {
            return Ok(());
        }
        crate::failpoint!("agent.writer.backend_remove", |fp| injected("remove", names::BACKENDS, fp));
        let addr_keys: Vec<Endpoint> = self.by_addr.iter().filter(|(_, b)| **b == id).map(|(ep, _)| *ep).collect();
        for ep in addr_keys {
            self.maps.backend_addr.remove(&ep).map_err(kernel("remove", names::BACKEND_ADDR))?;
            self.by_addr.remove(&ep);
            // A gauge nothing will move again: drop it once it reads zero.
            if self.maps.active.get(&ep, 0).is_ok_and(|n| n <= 0) {
                let _ = self.maps.active.remove(&ep);
            }
            // No connect can start to an address that is no backend; one that ends
            // after the entry is gone finds none and counts nothing.
            if self.maps.pending.get(&ep, 0).is_ok_and(|n| n <= 0) {
                let _ = self.maps.pending.remove(&ep);
            }
            self.report.writes += 1;
        }
        self.maps.backends.remove(&id).map_err(kernel("remove", names::BACKENDS))?;
        self.backends.remove(&id);
        self.report.writes += 1;
        Ok(())
    }
}

#[derive(Default)]
struct Target {
    names: BTreeMap<u32, String>,
    services: BTreeMap<u32, TargetService>,
    frontends: BTreeMap<Endpoint, u32>,
    backends: BTreeMap<u32, Backend>,
    by_addr: BTreeMap<Endpoint, u32>,
}

struct TargetService {
    policy: u8,
    slots4: Vec<u32>,
    slots6: Vec<u32>,
}

fn now_ns() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}
