//! Adoption: a restarted agent takes over the instances the previous one left running,
//! and cleans up after those that died meanwhile. Nothing is ever restarted here.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tracing::{error, info, warn};

use super::{process, record, Driver, Instance, InstanceInfo, Record};

impl Driver {
    /// Takes over the instances a previous agent started that are still alive (record,
    /// live main process and populated cgroup), and returns them. Instances whose process
    /// is gone are cleaned up (leftover processes killed, cgroup and record removed, the
    /// log kept) and returned as [`InstanceState::Crashed`]. Cgroups `inst-*` without a
    /// record are killed and removed. Never restarts anything.
    pub fn adopt(&self) -> Vec<InstanceInfo> {
        let mut found = Vec::new();
        let mut table = self.lock();
        for (id, path) in self.record_files() {
            if table.contains_key(&id) {
                continue;
            }
            let rec = match std::fs::read_to_string(&path).map_err(|e| e.to_string()).and_then(|t| Record::decode(&t)) {
                Ok(rec) if rec.id == id => rec,
                Ok(rec) => {
                    error!(node = %self.node, record = %path.display(), inner = %rec.id, "instance record names another instance; left as it is, remove it by hand");
                    continue;
                }
                Err(e) => {
                    error!(node = %self.node, record = %path.display(), error = %e, "unreadable instance record; left as it is, remove it by hand once its instance is gone");
                    continue;
                }
            };
            let cg = self.cgroup_dir(&id);
            let alive = process::alive_in(rec.pid, &self.cgroup_rel(&id)) && process::populated(&cg).unwrap_or(true);
            let mut inst = Instance { rec, child: None, crashed: None, stopping: false };
            if alive {
                info!(node = %self.node, service = %inst.rec.spec.service, instance = %id, address = %inst.rec.address, pid = inst.rec.pid, phase = "adopt", "instance adopted");
                found.push(self.info(&inst));
                table.insert(id, inst);
                continue;
            }
            let how = format!("process {} is gone", inst.rec.pid);
            warn!(node = %self.node, service = %inst.rec.spec.service, instance = %id, address = %inst.rec.address, pid = inst.rec.pid, phase = "adopt", "instance died while no agent watched; cleaning up");
            self.sweep(&id, &cg);
            if let Err(e) = std::fs::remove_file(&path) {
                error!(node = %self.node, instance = %id, record = %path.display(), error = %e, "cannot remove the record of a dead instance");
            }
            inst.crashed = Some(how);
            found.push(self.info(&inst));
        }
        // Cgroups without a record: a start interrupted before its record was written is
        // impossible (the record comes first), so these are leftovers; none may run on.
        if let Ok(entries) = std::fs::read_dir(&self.workload) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(id) = name.strip_prefix("inst-") else { continue };
                if !table.contains_key(id) && !Record::path(&self.state_dir, id).exists() {
                    warn!(node = %self.node, instance = id, cgroup = %e.path().display(), phase = "adopt", "instance cgroup without a record; killing what it holds");
                    self.sweep(id, &e.path());
                }
            }
        }
        found
    }

    /// Kills whatever `cg` holds and removes it (bounded: 2 s), for dead instances.
    fn sweep(&self, id: &str, cg: &Path) {
        let rel = self.cgroup_rel(id);
        let until = Instant::now() + Duration::from_secs(2);
        while process::populated(cg).unwrap_or(false) && Instant::now() < until {
            if let Err(e) = process::kill_all(cg, &rel) {
                warn!(node = %self.node, instance = id, cgroup = %cg.display(), error = %e, "cannot kill leftover processes");
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if let Err(e) = process::remove_cgroup(cg) {
            error!(node = %self.node, instance = id, cgroup = %cg.display(), error = %e, "cannot remove the cgroup of a dead instance");
        }
    }

    pub(super) fn record_files(&self) -> Vec<(String, PathBuf)> {
        let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(&self.state_dir)
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name().to_string_lossy().into_owned();
                        let id = name.strip_suffix(record::SUFFIX).filter(|id| !id.starts_with('.'))?.to_string();
                        Some((id, e.path()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }
}
