//! Values loaded from files and loaded again when the files change: certificate
//! rotation without a restart. Each use looks at the files' metadata at most once per
//! [`CHECK_EVERY`] (a TLS handshake is the only user, so an idle process does nothing);
//! a change that does not load (a certificate written before its key) keeps the value
//! in force and is tried again at the next look.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use tracing::{info, warn};

use crate::TlsError;

/// How often a value's files are looked at, at most.
pub const CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// What identifies a file's content without reading it: modification time, size, inode
/// (a Secret's or ConfigMap's symlink swap changes the inode).
type Stamp = Vec<Option<(SystemTime, u64, u64)>>;

fn stamp(paths: &[PathBuf]) -> Stamp {
    use std::os::unix::fs::MetadataExt as _;
    paths.iter().map(|p| std::fs::metadata(p).ok().and_then(|m| Some((m.modified().ok()?, m.len(), m.ino())))).collect()
}

struct State<T> {
    value: Arc<T>,
    stamp: Stamp,
    checked: Instant,
}

/// A value loaded from `paths`, reloaded when they change.
pub struct Reloading<T> {
    what: &'static str,
    paths: Vec<PathBuf>,
    load: fn(&[PathBuf]) -> Result<T, TlsError>,
    state: Mutex<State<T>>,
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading").field("what", &self.what).field("paths", &self.paths).finish()
    }
}

impl<T> Reloading<T> {
    /// Loads the value now; fails if it does not load.
    pub fn new(
        what: &'static str,
        paths: Vec<PathBuf>,
        load: fn(&[PathBuf]) -> Result<T, TlsError>,
    ) -> Result<Self, TlsError> {
        let before = stamp(&paths);
        let value = Arc::new(load(&paths)?);
        let state = Mutex::new(State { value, stamp: before, checked: Instant::now() });
        Ok(Self { what, paths, load, state })
    }

    /// The value in force, loaded again first if its files changed since the last look.
    pub fn current(&self) -> Arc<T> {
        // A poisoned lock only means a load panicked; the state is still consistent.
        let mut s = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if s.checked.elapsed() >= CHECK_EVERY {
            s.checked = Instant::now();
            let now = stamp(&self.paths);
            if now != s.stamp {
                match (self.load)(&self.paths) {
                    Ok(v) => {
                        info!(what = self.what, files = ?self.paths, "reloaded after its files changed");
                        s.value = Arc::new(v);
                        s.stamp = now;
                    }
                    Err(e) => {
                        warn!(what = self.what, error = %e, "its files changed but do not load; keeping the one in force")
                    }
                }
            }
        }
        Arc::clone(&s.value)
    }
}
