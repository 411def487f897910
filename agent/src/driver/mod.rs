//! The instance driver: the site operations of an architecture-based update on one node
//! (start, get, list, stop an instance), running each instance as a process in its own
//! child cgroup `inst-<id>` of the node's workload cgroup.
//!
//! Instances outlive the agent: each leads its own session, its output goes to a file in
//! the state directory (never a pipe to the agent), and a record there says what it is.
//! A restarted agent [`adopts`](Driver::adopt) the live ones and never restarts anything.
//! Everything an instance forks stays in its cgroup, so stopping or cleaning up acts on
//! the cgroup and leaves no orphan.
//!
//! Stop sequence ([`Driver::stop`]), once the caller made the drain effective on every
//! node: pre-stop hook → open connections reach 0 or the drain deadline → SIGTERM →
//! grace → SIGKILL → cgroup, address and record removed. No fixed sleeps: each wait ends
//! as soon as its condition holds.

mod adopt;
mod error;
mod health;
mod pool;
mod process;
mod record;
mod stop;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hitless_model::{Health, PreStop, RunSpec};
use tokio::time::{sleep, Instant};
use tracing::{info, warn};

pub use error::{DriverError, Failed};
pub use pool::Pool;
pub use stop::{DrainEnd, StopReport};

use record::{Phase, Record};

/// Everything needed to run one instance of a service version on this node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceSpec {
    /// Service name (letters, digits, `.`, `_`, `-`); part of the instance id.
    pub service: String,
    /// Version, handed to the process as `HITLESS_VERSION`.
    pub version: String,
    /// Port the instance listens on at its own address.
    pub port: u16,
    /// argv (with `{address}` and `{port}` replaced) and environment.
    pub run: RunSpec,
    /// Readiness check; `None` means a TCP connect to the instance's address and port.
    pub health: Option<Health>,
    /// Hook called first when the instance is stopped.
    pub prestop: Option<PreStop>,
    /// Longest a stop waits, pre-stop hook included, for open connections to finish.
    pub drain_deadline: Duration,
    /// Longest a stop waits after SIGTERM before SIGKILL.
    pub grace: Duration,
    /// Configuration pairs, handed to the process as `HITLESS_CONFIG_<KEY>`.
    pub config: BTreeMap<String, String>,
}

impl InstanceSpec {
    /// The spec of an instance of `service` as the architecture file declares it; a
    /// service without a drain deadline gets `default_drain`.
    pub fn from_service(service: &hitless_model::Service, default_drain: Duration, grace: Duration) -> Self {
        Self {
            service: service.name.clone(),
            version: service.version.clone(),
            port: service.port,
            run: service.run.clone(),
            health: service.health.clone(),
            prestop: service.prestop.clone(),
            drain_deadline: service.drain_deadline.map_or(default_drain, hitless_model::Duration::to_std),
            grace,
            config: service.config.clone(),
        }
    }
}

/// Where an instance is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InstanceState {
    /// Started, not yet seen healthy.
    Starting,
    /// Passed its health check.
    Serving,
    /// A stop is under way.
    Stopping,
    /// Its process exited (or its cgroup emptied) without being stopped.
    Crashed,
}

/// What the driver reports about an instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Unique on this node: `<service>-<hex>`.
    pub id: String,
    /// Service name.
    pub service: String,
    /// Service version.
    pub version: String,
    /// The instance's own address, from the pool.
    pub address: Ipv4Addr,
    /// Its port.
    pub port: u16,
    /// Its main process.
    pub pid: u32,
    /// Where it is in its life.
    pub state: InstanceState,
    /// For a crashed instance, how it ended ("exited with status 2", "killed by signal 9").
    pub exit: Option<String>,
    /// Its output (stdout and stderr).
    pub log: PathBuf,
}

impl InstanceInfo {
    /// Whether it crashed of SIGKILL: killed from outside (the OOM killer, an operator).
    pub fn killed(&self) -> bool {
        self.exit.as_deref() == Some(process::killed_by(libc::SIGKILL).as_str())
    }
}

/// One instance as the driver holds it.
struct Instance {
    rec: Record,
    /// The process when this agent started it (to reap it); `None` when adopted.
    child: Option<Child>,
    /// How it ended, once seen dead.
    crashed: Option<String>,
    stopping: bool,
}

/// Runs a node's instances as processes in cgroups. Every method takes `&self`, so one
/// driver can be shared (in an `Arc`) by concurrent operations on different instances.
pub struct Driver {
    node: String,
    workload: PathBuf,
    /// The workload cgroup's path from the cgroup v2 root, as `/proc/<pid>/cgroup` shows it.
    workload_rel: String,
    pool: Pool,
    state_dir: PathBuf,
    _lock: File,
    table: Mutex<BTreeMap<String, Instance>>,
}

impl Driver {
    /// Opens the driver of `node`. `workload_cgroup` is a cgroup v2 directory (created if
    /// missing) under which each instance gets its own child cgroup `inst-<id>`; `pool`
    /// the addresses instances get (an IPv4 CIDR such as `127.1.0.0/24`); `state_dir`
    /// holds instance records and logs, and must survive agent restarts. Call
    /// [`adopt`](Self::adopt) next to take over what a previous agent left running.
    pub fn open(node: &str, workload_cgroup: &Path, pool: &str, state_dir: &Path) -> Result<Self, DriverError> {
        let mount = crate::cgroup::v2_mount().map_err(DriverError::NoCgroup2)?;
        let bad = |reason: String| DriverError::Workload {
            path: workload_cgroup.to_path_buf(),
            mount: mount.clone(),
            reason,
        };
        if !workload_cgroup.exists() {
            std::fs::create_dir(workload_cgroup).map_err(|e| bad(format!("cannot create it: {e}")))?;
        }
        if !crate::cgroup::is_cgroup(workload_cgroup) {
            return Err(bad("not a cgroup v2 directory (no cgroup.procs)".to_string()));
        }
        let workload = workload_cgroup.canonicalize().map_err(|e| bad(e.to_string()))?;
        let root = mount.canonicalize().map_err(|e| bad(format!("cgroup2 mount: {e}")))?;
        let rel = workload.strip_prefix(&root).map_err(|_| bad("not under the cgroup2 mount".to_string()))?;
        let workload_rel = format!("/{}", rel.display());
        let pool = Pool::parse(pool).map_err(|reason| DriverError::BadPool { pool: pool.to_string(), reason })?;
        let state_err = |source| DriverError::StateDir { path: state_dir.to_path_buf(), source };
        std::fs::create_dir_all(state_dir).map_err(state_err)?;
        let lock = File::create(state_dir.join("lock")).map_err(state_err)?;
        // SAFETY: flock on a descriptor we own.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(DriverError::Locked(state_dir.to_path_buf()));
        }
        info!(node, workload = %workload.display(), pool = pool.as_str(), state_dir = %state_dir.display(), "instance driver open");
        Ok(Self {
            node: node.to_string(),
            workload,
            workload_rel,
            pool,
            state_dir: state_dir.to_path_buf(),
            _lock: lock,
            table: Mutex::new(BTreeMap::new()),
        })
    }

    /// Starts an instance and returns at once ([`InstanceState::Starting`]): allocates
    /// an address, writes the record, creates the cgroup, and starts `run.command` (with
    /// `{address}` and `{port}` replaced) inside it, in its own session, output to its
    /// log. The environment is `run.env` plus `HITLESS_SERVICE`, `HITLESS_VERSION`,
    /// `HITLESS_ADDRESS`, `HITLESS_PORT`, `HITLESS_NODE` and `HITLESS_CONFIG_<KEY>` for
    /// each config pair. The process must stay in the foreground: its exit is a crash.
    pub fn start(&self, spec: InstanceSpec) -> Result<InstanceInfo, DriverError> {
        validate(&spec)?;
        let mut table = self.lock();
        let mut used: BTreeSet<Ipv4Addr> = table.values().map(|i| i.rec.address).collect();
        used.extend(self.recorded_addresses());
        let address = self.pool.allocate(&used).ok_or_else(|| DriverError::PoolExhausted {
            pool: self.pool.as_str().to_string(),
            service: spec.service.clone(),
            in_use: used.len(),
        })?;
        let id = self.new_id(&spec.service, &table);
        let mut rec = Record { id: id.clone(), address, pid: 0, phase: Phase::Starting, spec };
        let rec_path = Record::path(&self.state_dir, &id);
        let rec_err = |source| DriverError::Record { id: id.clone(), path: rec_path.clone(), source };
        rec.save(&self.state_dir).map_err(rec_err)?;
        let cg = self.cgroup_dir(&id);
        let created = crate::failpoint!("agent.driver.start.cgroup_create", io).and_then(|()| std::fs::create_dir(&cg));
        if let Err(source) = created {
            let _ = std::fs::remove_file(&rec_path);
            return Err(DriverError::Cgroup { id, path: cg, source });
        }
        let argv = substitute(&rec.spec.run.command, address, rec.spec.port);
        let env = self.env(&rec);
        let log = self.log_path(&id);
        let child = match process::spawn(&argv, &env, &cg, &log, true) {
            Ok(child) => child,
            Err(source) => {
                let _ = process::remove_cgroup(&cg);
                let _ = std::fs::remove_file(&rec_path);
                let (service, program) = (rec.spec.service.clone(), argv.first().cloned().unwrap_or_default());
                return Err(DriverError::Spawn { id, service, program, source });
            }
        };
        // Running, its record without a pid yet.
        crate::failpoint!("agent.driver.start.after_spawn");
        rec.pid = child.id();
        let mut inst = Instance { rec, child: Some(child), crashed: None, stopping: false };
        if let Err(e) = inst.rec.save(&self.state_dir) {
            // Without a record a restarted agent would not know it: take it down again.
            let _ = process::kill_all(&cg, &self.cgroup_rel(&id));
            if let Some(mut c) = inst.child.take() {
                let _ = c.wait();
            }
            let _ = process::remove_cgroup(&cg);
            let _ = std::fs::remove_file(&rec_path);
            return Err(rec_err(e));
        }
        info!(node = %self.node, service = %inst.rec.spec.service, version = %inst.rec.spec.version, instance = %id, address = %address, port = inst.rec.spec.port, pid = inst.rec.pid, phase = "start", "instance started");
        let info = self.info(&inst);
        table.insert(id, inst);
        Ok(info)
    }

    /// Probes the instance every 50 ms until it is healthy (an HTTP GET of the path
    /// answers 2xx, a TCP connect succeeds, or the exec argv exits 0; no check means TCP),
    /// for at most `timeout`; it is then [`InstanceState::Serving`]. Fails at once when its
    /// process exits, or when a stop of the instance begins. Errors name the instance and
    /// carry the last probe error and the tail of its log.
    pub async fn wait_healthy(&self, id: &str, timeout: Duration) -> Result<(), DriverError> {
        let (rec, env) = {
            let table = self.lock();
            let inst = table.get(id).ok_or_else(|| DriverError::UnknownInstance(id.to_string()))?;
            (inst.rec.clone(), self.env(&inst.rec))
        };
        let (started, deadline) = (Instant::now(), Instant::now() + timeout);
        let target = SocketAddr::from((rec.address, rec.spec.port));
        let (cg, log) = (self.cgroup_dir(id), self.log_path(id));
        let ctx = health::ExecContext { env: &env, cgroup: &cg, log: &log };
        let mut last_error = "no probe answered yet".to_string();
        loop {
            let failed = || {
                let tail = process::log_tail(&log, 20);
                let (id, service) = (id.to_string(), rec.spec.service.clone());
                Box::new(Failed { id, service, address: rec.address, log: log.clone(), tail })
            };
            if let Some(how) = self.crash_reason(id)? {
                warn!(node = %self.node, service = %rec.spec.service, instance = id, address = %rec.address, phase = "health", exit = %how, "instance exited before it was healthy");
                return Err(DriverError::Exited { how, instance: failed() });
            }
            let now = Instant::now();
            if now >= deadline {
                warn!(node = %self.node, service = %rec.spec.service, instance = id, address = %rec.address, phase = "health", error = %last_error, "instance not healthy in time");
                return Err(DriverError::Unhealthy { waited: now - started, last_error, instance: failed() });
            }
            let limit = (deadline - now).min(Duration::from_secs(2));
            let probe = match &rec.spec.health {
                None | Some(Health::Tcp(_)) => health::tcp(target, limit).await,
                Some(Health::Http(path)) => match health::http_get(target, path, limit).await {
                    Ok(code) if (200..300).contains(&code) => Ok(()),
                    Ok(code) => Err(format!("GET {path} on {target} answered {code}")),
                    Err(e) => Err(e),
                },
                Some(Health::Exec(argv)) => {
                    health::exec(&substitute(argv, rec.address, rec.spec.port), &ctx, limit).await
                }
            };
            match probe {
                Ok(()) => return self.mark_serving(id, started.elapsed()),
                Err(e) => last_error = e,
            }
            sleep(Duration::from_millis(50).min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// The instance `id`, with its state as of now.
    pub fn get(&self, id: &str) -> Option<InstanceInfo> {
        let mut table = self.lock();
        let inst = table.get_mut(id)?;
        self.refresh(inst);
        Some(self.info(inst))
    }

    /// Every instance this driver runs, with its state as of now: an instance whose main
    /// process exited or whose cgroup is no longer populated (`cgroup.events`) is
    /// [`InstanceState::Crashed`] until it is stopped.
    pub fn list(&self) -> Vec<InstanceInfo> {
        let mut table = self.lock();
        table
            .values_mut()
            .map(|inst| {
                self.refresh(inst);
                self.info(inst)
            })
            .collect()
    }

    fn mark_serving(&self, id: &str, waited: Duration) -> Result<(), DriverError> {
        let mut table = self.lock();
        let inst = table.get_mut(id).ok_or_else(|| DriverError::UnknownInstance(id.to_string()))?;
        if inst.stopping {
            // The stop owns the record now (it may have deleted it already).
            return Err(DriverError::Stopping(id.to_string()));
        }
        // Healthy; the record still says starting.
        crate::failpoint!("agent.driver.health.mark_serving");
        inst.rec.phase = Phase::Serving;
        inst.rec.save(&self.state_dir).map_err(|source| DriverError::Record {
            id: id.to_string(),
            path: Record::path(&self.state_dir, id),
            source,
        })?;
        info!(node = %self.node, service = %inst.rec.spec.service, instance = id, address = %inst.rec.address, phase = "health", waited_ms = waited.as_millis() as u64, "instance healthy");
        Ok(())
    }

    /// How the instance ended, if it did.
    fn crash_reason(&self, id: &str) -> Result<Option<String>, DriverError> {
        let mut table = self.lock();
        let inst = table.get_mut(id).ok_or_else(|| DriverError::UnknownInstance(id.to_string()))?;
        if inst.stopping {
            return Err(DriverError::Stopping(id.to_string()));
        }
        Ok(self.refresh(inst))
    }

    /// Notices a crash: main process exited (reaped here when this agent started it, else
    /// gone from the cgroup) or cgroup empty.
    fn refresh(&self, inst: &mut Instance) -> Option<String> {
        if inst.crashed.is_some() || inst.stopping {
            return inst.crashed.clone();
        }
        let id = inst.rec.id.clone();
        let mut how = match inst.child.as_mut() {
            Some(child) => child.try_wait().ok().flatten().map(process::describe),
            None => (!process::alive_in(inst.rec.pid, &self.cgroup_rel(&id)))
                .then(|| format!("process {} is gone", inst.rec.pid)),
        };
        if how.is_none() && !process::populated(&self.cgroup_dir(&id)).unwrap_or(true) {
            how = Some("its cgroup holds no process any more".to_string());
        }
        if let Some(how) = &how {
            warn!(node = %self.node, service = %inst.rec.spec.service, instance = %id, address = %inst.rec.address, pid = inst.rec.pid, exit = %how, "instance crashed");
        }
        inst.crashed = how.clone();
        how
    }

    fn info(&self, inst: &Instance) -> InstanceInfo {
        let state = match (&inst.crashed, inst.stopping, inst.rec.phase) {
            (Some(_), _, _) => InstanceState::Crashed,
            (None, true, _) => InstanceState::Stopping,
            (None, false, Phase::Starting) => InstanceState::Starting,
            (None, false, Phase::Serving) => InstanceState::Serving,
        };
        InstanceInfo {
            id: inst.rec.id.clone(),
            service: inst.rec.spec.service.clone(),
            version: inst.rec.spec.version.clone(),
            address: inst.rec.address,
            port: inst.rec.spec.port,
            pid: inst.rec.pid,
            state,
            exit: inst.crashed.clone(),
            log: self.log_path(&inst.rec.id),
        }
    }

    fn env(&self, rec: &Record) -> Vec<(String, String)> {
        let s = &rec.spec;
        let mut env: Vec<(String, String)> = s.run.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        env.push(("HITLESS_SERVICE".into(), s.service.clone()));
        env.push(("HITLESS_VERSION".into(), s.version.clone()));
        env.push(("HITLESS_ADDRESS".into(), rec.address.to_string()));
        env.push(("HITLESS_PORT".into(), s.port.to_string()));
        env.push(("HITLESS_NODE".into(), self.node.clone()));
        for (k, v) in &s.config {
            env.push((config_var(k), v.clone()));
        }
        env
    }

    /// Addresses held by records on disk (instances not adopted yet keep theirs).
    fn recorded_addresses(&self) -> Vec<Ipv4Addr> {
        self.record_files()
            .into_iter()
            .filter_map(|(_, p)| Record::decode(&std::fs::read_to_string(p).ok()?).ok().map(|r| r.address))
            .collect()
    }

    fn new_id(&self, service: &str, table: &BTreeMap<String, Instance>) -> String {
        let mut n = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0);
        loop {
            let id = format!("{service}-{n:x}");
            if !table.contains_key(&id)
                && !Record::path(&self.state_dir, &id).exists()
                && !self.cgroup_dir(&id).exists()
            {
                return id;
            }
            n += 1;
        }
    }

    fn cgroup_dir(&self, id: &str) -> PathBuf {
        self.workload.join(format!("inst-{id}"))
    }

    fn cgroup_rel(&self, id: &str) -> String {
        format!("{}/inst-{id}", self.workload_rel.trim_end_matches('/'))
    }

    fn log_path(&self, id: &str) -> PathBuf {
        self.state_dir.join(format!("{id}.log"))
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<String, Instance>> {
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

fn validate(spec: &InstanceSpec) -> Result<(), DriverError> {
    let bad = |reason: &str| Err(DriverError::BadSpec { service: spec.service.clone(), reason: reason.to_string() });
    let name_ok = |c: char| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-');
    if spec.service.is_empty()
        || spec.service.len() > 64
        || spec.service.starts_with('.')
        || !spec.service.chars().all(name_ok)
    {
        return bad("a service name is 1 to 64 letters, digits, `.`, `_` or `-`, not starting with `.`");
    }
    if spec.run.command.first().is_none_or(|p| p.is_empty()) {
        return bad("run.command is empty; give the program and its arguments");
    }
    if spec.port == 0 {
        return bad("port is 0; give the port the instance listens on");
    }
    Ok(())
}

/// `argv` with `{address}` and `{port}` replaced.
fn substitute(argv: &[String], address: Ipv4Addr, port: u16) -> Vec<String> {
    let (a, p) = (address.to_string(), port.to_string());
    argv.iter().map(|s| s.replace("{address}", &a).replace("{port}", &p)).collect()
}

/// `HITLESS_CONFIG_<KEY>`: the key uppercased, anything but letters and digits as `_`.
fn config_var(key: &str) -> String {
    let k: String = key.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' }).collect();
    format!("HITLESS_CONFIG_{k}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn substitutes_address_and_port() {
        let argv = vec!["svc".to_string(), "--listen".into(), "{address}:{port}".into(), "{port}{port}".into()];
        assert_eq!(substitute(&argv, Ipv4Addr::new(127, 1, 0, 2), 80), ["svc", "--listen", "127.1.0.2:80", "8080"]);
    }

    #[test]
    fn config_keys_become_variable_names() {
        assert_eq!(config_var("cache_size"), "HITLESS_CONFIG_CACHE_SIZE");
        assert_eq!(config_var("db.url-2"), "HITLESS_CONFIG_DB_URL_2");
    }
}
