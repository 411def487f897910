//! Static mode: the registry comes from a file, and every change on disk is applied.
//!
//! The file is polled (metadata every `poll`, content only when it changed), which
//! keeps the agent free of inotify corner cases (editors that replace the file,
//! ConfigMap symlink swaps) and applies a change within one poll interval. Between
//! two looks the agent sleeps on the datapath's failure signals: outlier detection
//! reads the counters of the backends that failed, and of no other.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tracing::{error, warn};

use crate::outlier::{Outliers, Signals};
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
    let reg = Registry::parse(&text).map_err(|source| FileError::Invalid { path: path.to_owned(), source });
    release_freed_memory();
    reg
}

/// Hands the heap freed by a parse back to the system. Parsing a registry file builds a
/// YAML tree about 35 times the file's size; glibc keeps that memory in the process
/// once freed, so an agent at rest would hold the peak of its last parse (at 10,000
/// backends: 32 MiB resident instead of 21).
fn release_freed_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap pages to the kernel; it has no
    // preconditions and touches no memory in use.
    unsafe {
        libc::malloc_trim(0);
    }
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
    let mut w = Watcher::new(path, writer, poll, metrics, node, reg, outliers);
    loop {
        w.turn();
    }
}

/// With inotify, the file's metadata is still looked at this often: a safety net for
/// file systems whose changes inotify does not see (some network and bind mounts).
pub const STAT_SAFETY: Duration = Duration::from_secs(1);

/// An inotify watch of `path`'s directory for anything that can replace or change it.
fn watch_dir(path: &Path) -> std::io::Result<inotify::Inotify> {
    use inotify::{Inotify, WatchMask};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let i = Inotify::init()?;
    i.watches().add(
        &dir,
        WatchMask::CLOSE_WRITE
            | WatchMask::MOVED_TO
            | WatchMask::CREATE
            | WatchMask::DELETE
            | WatchMask::ATTRIB
            | WatchMask::MODIFY,
    )?;
    Ok(i)
}

/// The static-mode loop, one turn at a time. It sleeps in poll(2) on the datapath's
/// failure signals and on inotify events of the registry file's directory, until one of
/// them, the next outlier deadline or the next look at the file: every `poll` without
/// inotify, every [`STAT_SAFETY`] with it. An idle agent reads no kernel counter.
pub struct Watcher<'a> {
    path: PathBuf,
    writer: &'a mut Writer,
    poll: Duration,
    metrics: &'a metrics::State,
    node: String,
    outliers: &'a mut Outliers,
    /// The failure signals; `None` when they cannot be opened (then every poll reads
    /// every backend's counters, as before signals).
    signals: Option<Signals>,
    /// No signal is taken before then: a backend that keeps failing costs one look per poll.
    rest_until: Instant,
    /// Events of the registry file's directory (a write, a rename over it, a ConfigMap's
    /// symlink swap); `None` when inotify is not available: then the file is stat'ed
    /// every `poll`.
    inotify: Option<inotify::Inotify>,
    /// Time between two looks at the file's metadata.
    stat_every: Duration,
    next_stat: Instant,
    last_stamp: Option<Stamp>,
    last_text: Option<String>,
    /// What the maps should hold: rebuilt only when the registry changes, never per poll.
    d: Vec<desired::DesiredService>,
    /// A valid file whose apply failed (a transient map error): retried with backoff
    /// until it lands, not only when the file changes again.
    unapplied: Option<Registry>,
    retry_at: Instant,
    backoff: Duration,
}

impl<'a> Watcher<'a> {
    /// A watcher of `path`, whose registry `reg` the maps hold now.
    pub fn new(
        path: &Path,
        writer: &'a mut Writer,
        poll: Duration,
        metrics: &'a metrics::State,
        node: &str,
        reg: Registry,
        outliers: &'a mut Outliers,
    ) -> Self {
        // The first apply's peak is behind us: hand it back before settling down.
        release_freed_memory();
        let signals = Signals::open(writer.maps().pin_dir())
            .inspect_err(|e| {
                metrics.error();
                error!(error = %e, "cannot open the failure signals; outlier detection reads every backend's counters every poll");
            })
            .ok();
        let inotify = watch_dir(path)
            .inspect_err(|e| warn!(file = %path.display(), error = %e, "cannot watch the registry file's directory; looking at the file every poll"))
            .ok();
        let stat_every = if inotify.is_some() { STAT_SAFETY.max(poll) } else { poll };
        // The file may have changed since `reg` was read from it (a write right after
        // the first apply): remember it only if it still holds `reg`, else the first look
        // takes the change. The stamp first: a write after it shows as a new stamp.
        let last_stamp = stamp(path);
        let last_text = std::fs::read_to_string(path).ok().filter(|t| Registry::parse(t).ok().as_ref() == Some(&reg));
        let last_stamp = last_stamp.filter(|_| last_text.is_some());
        let now = Instant::now();
        Self {
            path: path.to_owned(),
            writer,
            poll,
            metrics,
            node: node.to_owned(),
            outliers,
            signals,
            rest_until: now,
            inotify,
            stat_every,
            next_stat: now + stat_every,
            last_stamp,
            last_text,
            d: desired::from_registry(&reg),
            unapplied: None,
            retry_at: now,
            backoff: poll,
        }
    }

    /// The maps, as the loop reads them.
    pub fn maps(&self) -> &crate::writer::Maps {
        self.writer.maps()
    }

    /// The node's outlier detector.
    pub fn outliers(&self) -> &Outliers {
        self.outliers
    }

    /// Waits for the next thing to do (at most one `poll`), then does what is due.
    pub fn turn(&mut self) {
        self.wait();
        let now = Instant::now();
        // Outliers: a change in who is isolated re-applies the same revision.
        let changed = match self.signals.as_mut() {
            Some(signals) => {
                let mut changed = false;
                if now >= self.rest_until {
                    let signalled = signals.take();
                    if !signalled.is_empty() {
                        self.rest_until = now + self.poll;
                        changed = self.outliers.on_failures(self.writer.maps(), &self.d, &signalled, now);
                    }
                }
                self.outliers.on_deadline(self.writer.maps(), &self.d, now) || changed
            }
            None if now >= self.next_stat => self.outliers.observe(self.writer.maps(), &self.d, now),
            None => false,
        };
        if changed {
            let revision = self.writer.maps().revision().unwrap_or(0);
            if let Err(e) = self.writer.apply(&self.outliers.overlay(&self.d), revision) {
                self.metrics.error();
                error!(error = %e, "outlier change not applied");
            }
            self.metrics.set_outliers(self.outliers);
        }
        if now >= self.next_stat {
            self.next_stat = now + self.stat_every;
            // Slot tables retired by a swap a second ago or more (nothing to do mostly).
            if let Err(e) = self.writer.trim_retired() {
                self.metrics.error();
                error!(error = %e, "retired slot tables not trimmed; the next apply retries");
            }
            self.look_at_file();
        }
        if let Some(next) = self.unapplied.take_if(|_| Instant::now() >= self.retry_at) {
            self.apply_file(next);
        }
    }

    /// Sleeps until a failure signal (unless resting), the next outlier deadline, the
    /// next look at the file or the next retry, whichever comes first.
    fn wait(&mut self) {
        let now = Instant::now();
        let mut wake = self.next_stat;
        if let Some(d) = self.outliers.next_deadline() {
            wake = wake.min(d);
        }
        if self.unapplied.is_some() {
            wake = wake.min(self.retry_at);
        }
        let listen = self.signals.as_ref().filter(|_| now >= self.rest_until);
        if self.signals.is_some() && listen.is_none() {
            wake = wake.min(self.rest_until);
        }
        let timeout = wake.saturating_duration_since(now);
        // Round up: waking a little early would spin until the deadline.
        let ms = i32::try_from(timeout.as_nanos().div_ceil(1_000_000)).unwrap_or(i32::MAX);
        let mut fds: Vec<libc::pollfd> = listen
            .map(|s| s.as_raw_fd())
            .into_iter()
            .chain(self.inotify.as_ref().map(|i| i.as_raw_fd()))
            .map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 })
            .collect();
        if fds.is_empty() {
            std::thread::sleep(Duration::from_millis(ms as u64));
            return;
        }
        // SAFETY: valid pollfds, for the duration of the call. EINTR or an error only
        // ends the wait early; the turn then finds nothing due.
        unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if let Some(i) = self.inotify.as_mut() {
            let mut buf = [0u8; 4096];
            let file = self.path.file_name();
            // Drain the events. One about the file, or about a `..`-prefixed entry (a
            // ConfigMap swaps its `..data` symlink), means: look at the file now; the
            // directory's other files (logs beside it) are not worth a look.
            let mut look = false;
            while let Ok(events) = i.read_events(&mut buf) {
                let mut n = 0;
                for e in events {
                    n += 1;
                    look |= e.name.is_none_or(|name| Some(name) == file || name.as_encoded_bytes().starts_with(b".."));
                }
                if n == 0 {
                    break;
                }
            }
            if look {
                self.next_stat = Instant::now();
            }
        }
    }

    /// Reads the file if its metadata changed; a new valid registry is applied.
    fn look_at_file(&mut self) {
        let path = &self.path;
        let now = stamp(path);
        if now == self.last_stamp {
            return;
        }
        self.last_stamp = now;
        match std::fs::read_to_string(path) {
            Err(_) => warn!(file = %path.display(), "registry file unreadable; keeping the state in force"),
            Ok(text) if self.last_text.as_deref() == Some(text.as_str()) => {}
            Ok(text) => {
                self.last_text = Some(text.clone());
                let parsed = Registry::parse(&text);
                release_freed_memory();
                match parsed {
                    Ok(next) => {
                        self.unapplied = Some(next);
                        (self.retry_at, self.backoff) = (Instant::now(), self.poll);
                    }
                    Err(e) => {
                        self.metrics.error();
                        for p in e.problems() {
                            error!(file = %path.display(), field = %p.path, problem = %p.problem, fix = %p.fix, "invalid registry file; keeping the state in force");
                        }
                    }
                }
            }
        }
    }

    fn apply_file(&mut self, next: Registry) {
        let path = &self.path;
        match apply(self.writer, &next, self.metrics, &self.node, self.outliers) {
            Ok(_) => {
                self.d = desired::from_registry(&next);
                release_freed_memory();
            }
            Err(e @ WriteError::Capacity { .. }) => {
                // Only a smaller file (or larger maps) can fix this: wait for a change.
                self.metrics.error();
                error!(file = %path.display(), error = %e, "registry not applied; nothing was changed");
            }
            Err(e) => {
                self.metrics.error();
                error!(file = %path.display(), error = %e, retry_ms = self.backoff.as_millis() as u64, "registry not applied; the state in force is unchanged or safely partial; retrying");
                self.unapplied = Some(next);
                self.retry_at = Instant::now() + self.backoff;
                self.backoff = (self.backoff * 2).min(MAX_RETRY);
            }
        }
    }
}
