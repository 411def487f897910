//! What can go wrong in the driver, each naming the instance or path and what to do.

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

/// A driver operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    /// No cgroup v2 hierarchy is mounted.
    #[error("the instance driver needs cgroup v2: {0}")]
    NoCgroup2(#[source] std::io::Error),
    /// The workload cgroup is not usable.
    #[error("workload cgroup {path}: {reason}; pass --workload-cgroup with a directory under the cgroup2 mount {mount} (the agent needs root to create it)")]
    Workload {
        /// The directory given.
        path: PathBuf,
        /// The cgroup v2 mount point.
        mount: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// A cgroup could not be created, read or removed.
    #[error(
        "instance {id}: cgroup {path}: {source}; check that the agent runs as root and the workload cgroup is writable"
    )]
    Cgroup {
        /// The instance.
        id: String,
        /// The cgroup directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The state directory is not usable.
    #[error("state directory {path}: {source}; create it or choose a writable directory")]
    StateDir {
        /// The directory.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// Another driver holds the state directory.
    #[error("another agent's instance driver is using {0}; stop it first (one driver per state directory)")]
    Locked(PathBuf),
    /// The address pool does not parse.
    #[error("instance address pool {pool:?}: {reason}; write an IPv4 CIDR such as 127.1.0.0/24")]
    BadPool {
        /// The pool as given.
        pool: String,
        /// What is wrong.
        reason: String,
    },
    /// Every address of the pool is taken.
    #[error("no free address in pool {pool} for a new {service} instance ({in_use} in use); stop an instance or give the agent a larger --instance-addresses")]
    PoolExhausted {
        /// The pool.
        pool: String,
        /// The service that wanted one.
        service: String,
        /// Addresses in use.
        in_use: usize,
    },
    /// The instance spec cannot be run.
    #[error("service {service:?}: {reason}")]
    BadSpec {
        /// The service.
        service: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An instance record could not be written or removed.
    #[error("instance {id}: record {path}: {source}; check that the state directory is writable and not full")]
    Record {
        /// The instance.
        id: String,
        /// The record file.
        path: PathBuf,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The process could not be started.
    #[error("instance {id} of {service}: cannot run {program:?}: {source}; check run.command (argv[0] must be a path or a program on PATH)")]
    Spawn {
        /// The instance.
        id: String,
        /// Its service.
        service: String,
        /// argv[0].
        program: String,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// No such instance on this node.
    #[error(
        "no instance {0} on this node (stopped already, or never started here); list the instances to see what runs"
    )]
    UnknownInstance(String),
    /// A stop of this instance is under way.
    #[error("instance {0} is already being stopped")]
    Stopping(String),
    /// The instance's process ended before it became healthy.
    #[error("instance {} ({} at {}) {how} before it was healthy; last output ({}):\n{}", .instance.id, .instance.service, .instance.address, .instance.log.display(), .instance.tail)]
    Exited {
        /// How it ended.
        how: String,
        /// The instance and its last output.
        instance: Box<Failed>,
    },
    /// The instance did not pass its health check in time.
    #[error("instance {} ({} at {}) not healthy after {waited:?}: {last_error}; last output ({}):\n{}", .instance.id, .instance.service, .instance.address, .instance.log.display(), .instance.tail)]
    Unhealthy {
        /// How long the driver probed.
        waited: Duration,
        /// Why the last probe failed.
        last_error: String,
        /// The instance and its last output.
        instance: Box<Failed>,
    },
    /// Processes survived SIGKILL.
    #[error("instance {id}: cgroup {path} still holds processes {waited:?} after SIGKILL (stuck in the kernel?); its record is kept, retry the stop later")]
    Unkillable {
        /// The instance.
        id: String,
        /// Its cgroup.
        path: PathBuf,
        /// How long the driver waited.
        waited: Duration,
    },
}

/// The instance a start failed for, and what it printed last.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failed {
    /// The instance.
    pub id: String,
    /// Its service.
    pub service: String,
    /// Its address.
    pub address: Ipv4Addr,
    /// Its log file.
    pub log: PathBuf,
    /// The last lines of its log.
    pub tail: String,
}

impl DriverError {
    /// Whether the instance died of SIGKILL before it was healthy: something outside
    /// killed it (the OOM killer, an operator), it did not fail on its own.
    pub fn killed(&self) -> bool {
        matches!(self, Self::Exited { how, .. } if *how == super::process::killed_by(libc::SIGKILL))
    }
}
