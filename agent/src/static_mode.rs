//! Static mode: the registry comes from a file, and every change on disk is applied.
//!
//! The file is polled (metadata every `poll`, content only when it changed), which
//! keeps the agent free of inotify corner cases (editors that replace the file,
//! ConfigMap symlink swaps) and applies a change within one poll interval.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use tracing::{error, warn};

use crate::outlier::Outliers;
use crate::{desired, metrics};
use hitless_model::ModelError;

use crate::registry::Registry;
use crate::writer::{WriteError, Writer};

/// Why the registry file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// Not readable.
    #[error("cannot read registry file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// Not valid.
    #[error("registry file {path} is invalid:\n{source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// Every problem.
        source: ModelError,
    },
}

/// Reads and validates a registry file.
pub fn read(path: &Path) -> Result<Registry, FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read { path: path.to_owned(), source })?;
    Registry::parse(&text).map_err(|source| FileError::Invalid { path: path.to_owned(), source })
}

#[derive(PartialEq, Eq, Clone, Copy)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    ino: u64,
    ctime: i64,
    ctime_nsec: i64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        modified: m.modified().ok(),
        len: m.len(),
        ino: m.ino(),
        ctime: m.ctime(),
        ctime_nsec: m.ctime_nsec(),
    })
}

/// Applies `reg` as the next revision (with this node's isolated outliers given no
/// slots), refreshes the metrics' labels, logs the outcome.
pub fn apply(
    writer: &mut Writer,
    reg: &Registry,
    metrics: &metrics::State,
    node: &str,
    outliers: &Outliers,
) -> Result<u64, WriteError> {
    let revision = writer.maps().revision()? + 1;
    crate::apply::revision(writer, &desired::from_registry(reg), reg, revision, metrics, node, outliers)?;
    Ok(revision)
}

/// Longest wait between two tries of a registry whose apply failed.
const MAX_RETRY: Duration = Duration::from_secs(2);

/// Watches `path` forever, applying each valid change. An invalid file is logged with
/// every problem and the last good state stays in force.
pub fn watch(
    path: &Path,
    writer: &mut Writer,
    poll: Duration,
    metrics: &metrics::State,
    node: &str,
    reg: Registry,
    outliers: &mut Outliers,
) -> ! {
    let mut last_stamp = stamp(path);
    let mut last_text = std::fs::read_to_string(path).ok();
    // What the maps should hold: rebuilt only when the registry changes, never per poll.
    let mut d = desired::from_registry(&reg);
    // A valid file whose apply failed (a transient map error): retried every poll until
    // it lands, not only when the file changes again.
    let mut unapplied: Option<Registry> = None;
    let (mut retry_at, mut backoff) = (std::time::Instant::now(), poll);
    loop {
        std::thread::sleep(poll);
        // Outliers: a change in who is isolated re-applies the same revision.
        if outliers.observe(writer.maps(), &d, std::time::Instant::now()) {
            let revision = writer.maps().revision().unwrap_or(0);
            if let Err(e) = writer.apply(&outliers.overlay(&d), revision) {
                metrics.error();
                error!(error = %e, "outlier change not applied");
            }
            metrics.set_outliers(outliers);
        }
        let now = stamp(path);
        if now != last_stamp {
            last_stamp = now;
            match std::fs::read_to_string(path) {
                Err(_) => warn!(file = %path.display(), "registry file unreadable; keeping the state in force"),
                Ok(text) if last_text.as_deref() == Some(text.as_str()) => {}
                Ok(text) => {
                    last_text = Some(text.clone());
                    match Registry::parse(&text) {
                        Ok(next) => {
                            unapplied = Some(next);
                            (retry_at, backoff) = (std::time::Instant::now(), poll);
                        }
                        Err(e) => {
                            metrics.error();
                            for p in e.problems() {
                                error!(file = %path.display(), field = %p.path, problem = %p.problem, fix = %p.fix, "invalid registry file; keeping the state in force");
                            }
                        }
                    }
                }
            }
        }
        if let Some(next) = unapplied.take_if(|_| std::time::Instant::now() >= retry_at) {
            match apply(writer, &next, metrics, node, outliers) {
                Ok(_) => d = desired::from_registry(&next),
                Err(e @ WriteError::Capacity { .. }) => {
                    // Only a smaller file (or larger maps) can fix this: wait for a change.
                    metrics.error();
                    error!(file = %path.display(), error = %e, "registry not applied; nothing was changed");
                }
                Err(e) => {
                    metrics.error();
                    error!(file = %path.display(), error = %e, retry_ms = backoff.as_millis() as u64, "registry not applied; the state in force is unchanged or safely partial; retrying");
                    unapplied = Some(next);
                    retry_at = std::time::Instant::now() + backoff;
                    backoff = (backoff * 2).min(MAX_RETRY);
                }
            }
        }
    }
}
