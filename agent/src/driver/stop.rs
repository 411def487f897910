//! The stop sequence of one instance: pre-stop hook, drain, SIGTERM, grace, SIGKILL,
//! cleanup. Every wait polls its condition every 10 ms and ends as soon as it holds.

use std::collections::BTreeSet;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

use hitless_model::PreStop;
use tokio::time::{sleep, Instant};
use tracing::{info, warn};

use super::{health, process, substitute, Driver, DriverError, Record};

const POLL: Duration = Duration::from_millis(10);
/// Longest wait for a cgroup to empty after `cgroup.kill`.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Why the drain phase of a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrainEnd {
    /// The instance's open connections reached 0.
    Connections,
    /// The drain deadline passed with connections still open.
    Deadline,
    /// The instance had no process left (it had crashed, or exited during the drain).
    Exited,
}

impl fmt::Display for DrainEnd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Connections => "connections",
            Self::Deadline => "deadline",
            Self::Exited => "exited",
        })
    }
}

/// How a stop went, phase by phase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StopReport {
    /// The instance.
    pub id: String,
    /// Time in the pre-stop hook (zero without one).
    pub prestop: Duration,
    /// Why the hook failed, if it did (the stop goes on regardless).
    pub prestop_error: Option<String>,
    /// Time waiting for open connections to finish.
    pub drain: Duration,
    /// Why the drain ended.
    pub drain_end: DrainEnd,
    /// Open connections when the drain ended.
    pub active_at_end: i64,
    /// Time from SIGTERM until the cgroup emptied or the grace ran out.
    pub term: Duration,
    /// Whether SIGKILL was needed.
    pub killed: bool,
    /// Time from SIGKILL until the cgroup emptied (zero without SIGKILL).
    pub kill: Duration,
    /// The whole stop.
    pub total: Duration,
}

impl Driver {
    /// Stops an instance, once the caller has made its drain effective on every node:
    /// pre-stop hook (HTTP GET or exec argv, bounded by the drain deadline) → wait until
    /// `active()` (the kernel's count of the instance's open connections; 0 or less means
    /// none) is 0 or the
    /// drain deadline, counted from the start of the stop, passes → SIGTERM to every
    /// process of its cgroup → wait up to `grace` for the cgroup to empty → SIGKILL
    /// (`cgroup.kill`) → remove the cgroup, the record and the log, and free the address.
    /// A crashed instance is only cleaned up. On error the instance stays listed and the
    /// stop can be retried.
    pub async fn stop(&self, id: &str, active: impl Fn() -> i64) -> Result<StopReport, DriverError> {
        let t0 = Instant::now();
        let (rec, env, crashed, child) = {
            let mut table = self.lock();
            let inst = table.get_mut(id).ok_or_else(|| DriverError::UnknownInstance(id.to_string()))?;
            if inst.stopping {
                return Err(DriverError::Stopping(id.to_string()));
            }
            let crashed = self.refresh(inst).is_some();
            inst.stopping = true;
            (inst.rec.clone(), self.env(&inst.rec), crashed, inst.child.take())
        };
        // Until the instance is gone, an error or a dropped future hands it back (retryable).
        let mut guard = Handback { driver: self, id, child };
        let (cg, log, rel) = (self.cgroup_dir(id), self.log_path(id), self.cgroup_rel(id));
        let (service, address) = (rec.spec.service.as_str(), rec.address);
        let node = self.node.as_str();
        let deadline = t0 + rec.spec.drain_deadline;
        let populated = || process::populated(&cg).unwrap_or(true);

        // Pre-stop hook.
        crate::failpoint!("agent.driver.stop.before_prestop", |fp| cgroup_error(id, &cg, fp));
        let mut prestop_error = None;
        if let (false, Some(hook)) = (crashed, &rec.spec.prestop) {
            let limit = deadline.saturating_duration_since(Instant::now());
            let target = SocketAddr::from((address, rec.spec.port));
            let result = match hook {
                PreStop::Http(path) => match health::http_get(target, path, limit).await {
                    Ok(code) if (200..300).contains(&code) => Ok(()),
                    Ok(code) => Err(format!("GET {path} on {target} answered {code}")),
                    Err(e) => Err(e),
                },
                PreStop::Exec(argv) => {
                    let ctx = health::ExecContext { env: &env, cgroup: &cg, log: &log };
                    health::exec(&substitute(argv, address, rec.spec.port), &ctx, limit).await
                }
            };
            if let Err(e) = &result {
                warn!(node, service, instance = id, address = %address, phase = "prestop", error = %e, "pre-stop hook failed; stopping anyway");
            }
            prestop_error = result.err();
        }
        let t_drain = Instant::now();

        // Drain: open connections reach 0, or the deadline.
        let (drain_end, active_at_end) = loop {
            if !populated() {
                break (DrainEnd::Exited, 0);
            }
            let n = active();
            if n <= 0 {
                break (DrainEnd::Connections, n);
            }
            if Instant::now() >= deadline {
                break (DrainEnd::Deadline, n);
            }
            sleep(POLL).await;
        };
        let t_term = Instant::now();
        info!(node, service, instance = id, address = %address, phase = "drain", end = %drain_end, active = active_at_end, drain_ms = (t_term - t_drain).as_millis() as u64, "drain over");

        // SIGTERM to every process (also those forked meanwhile), up to the grace.
        crate::failpoint!("agent.driver.stop.before_sigterm", |fp| cgroup_error(id, &cg, fp));
        let mut signalled = BTreeSet::new();
        let grace_end = t_term + rec.spec.grace;
        while populated() {
            process::signal_all(&cg, &rel, libc::SIGTERM, &mut signalled);
            if Instant::now() >= grace_end {
                break;
            }
            sleep(POLL).await;
        }
        let t_kill = Instant::now();

        // SIGKILL for whatever is left.
        let killed = populated();
        if killed {
            warn!(node, service, instance = id, address = %address, phase = "kill", grace_ms = rec.spec.grace.as_millis() as u64, "still running after the grace; SIGKILL");
            let kill_end = t_kill + KILL_WAIT;
            let mut result = process::kill_all(&cg, &rel);
            while result.is_ok() && populated() && Instant::now() < kill_end {
                sleep(POLL).await;
                result = process::kill_all(&cg, &rel);
            }
            let err = match result {
                Err(source) => Some(DriverError::Cgroup { id: id.to_string(), path: cg.clone(), source }),
                Ok(()) if populated() => {
                    Some(DriverError::Unkillable { id: id.to_string(), path: cg.clone(), waited: KILL_WAIT })
                }
                Ok(()) => None,
            };
            if let Some(e) = err {
                return Err(e);
            }
        }
        let t_done = Instant::now();

        // Reap the main process (it has exited: its cgroup is empty), then clean up.
        if let Some(c) = guard.child.as_mut() {
            for _ in 0..100 {
                if !matches!(c.try_wait(), Ok(None)) {
                    break;
                }
                sleep(POLL).await;
            }
        }
        let removed =
            crate::failpoint!("agent.driver.stop.cgroup_remove", io).and_then(|()| process::remove_cgroup(&cg));
        if let Err(source) = removed {
            return Err(DriverError::Cgroup { id: id.to_string(), path: cg, source });
        }
        let rec_path = Record::path(&self.state_dir, id);
        let removed =
            crate::failpoint!("agent.driver.stop.record_remove", io).and_then(|()| std::fs::remove_file(&rec_path));
        match removed {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(DriverError::Record { id: id.to_string(), path: rec_path, source: e });
            }
            _ => {}
        }
        let _ = std::fs::remove_file(&log);
        self.lock().remove(id);

        let report = StopReport {
            id: id.to_string(),
            prestop: t_drain - t0,
            prestop_error,
            drain: t_term - t_drain,
            drain_end,
            active_at_end,
            term: t_kill - t_term,
            killed,
            kill: if killed { t_done - t_kill } else { Duration::ZERO },
            total: t0.elapsed(),
        };
        info!(node, service, instance = id, address = %address, phase = "stopped", drain_end = %drain_end, killed, total_ms = report.total.as_millis() as u64, "instance stopped; cgroup, address and record released");
        Ok(report)
    }
}

/// The cgroup read that a stop's step would fail with, injected by fail point `fp`.
#[cfg(feature = "failpoints")]
fn cgroup_error(id: &str, cg: &std::path::Path, fp: &str) -> DriverError {
    DriverError::Cgroup { id: id.to_string(), path: cg.to_path_buf(), source: crate::writer::injected_io(fp) }
}

/// Hands an instance back when its stop ends early (an error, or the caller dropped the
/// future): it stays listed, with its process handle, and may be stopped again. After a
/// complete stop the instance is no longer in the table and this does nothing.
struct Handback<'a> {
    driver: &'a Driver,
    id: &'a str,
    child: Option<std::process::Child>,
}

impl Drop for Handback<'_> {
    fn drop(&mut self) {
        if let Some(inst) = self.driver.lock().get_mut(self.id) {
            inst.stopping = false;
            inst.child = self.child.take();
        }
    }
}
