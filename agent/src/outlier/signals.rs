//! The datapath's failure signals: sockops writes a backend's endpoint to the
//! `hl_failures` ring buffer when a connect to it fails, and sets its entry in
//! `hl_failed_flag` so that further failures do not signal again until the agent has
//! looked. The agent sleeps on the ring's descriptor (poll(2) in static mode, tokio's
//! `AsyncFd` in a coordinator session: [`FailureWatch`]), takes the signalled backends,
//! clears their flags, and only then reads their counters: a failure counted after that
//! read signals again, one counted before it is in the read.

use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{HashMap, MapData, MapError, RingBuf};
use tokio::io::unix::AsyncFd;

use super::Outliers;
use crate::abi::Endpoint;
use crate::desired::DesiredService;
use crate::writer::{names, Maps, WriteError};

/// Bytes of `hl_failures` for `backends` backends: a record (8 bytes of header, the
/// 20-byte endpoint, padded to 8) per backend, since the flag leaves at most one
/// outstanding per backend; a power of two, at least a page, as the kernel requires.
pub fn failure_ring_bytes(backends: u32) -> u32 {
    // SAFETY: sysconf reads a constant of the system.
    let page = u32::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(4096);
    backends.saturating_mul(32).clamp(page, 1 << 30).next_power_of_two()
}

/// The node's failure signals (the ring buffer and the flags), as the agent reads them.
pub struct Signals {
    ring: RingBuf<MapData>,
    flags: HashMap<MapData, Endpoint, u8>,
    /// Signals found when the handles were opened: the first [`Signals::take`] returns them.
    held: BTreeSet<Endpoint>,
}

impl Signals {
    /// Opens the signals pinned in `pin_dir`. What the ring holds is kept for the first
    /// [`Signals::take`], and every flag is cleared: a flag whose signal an earlier agent
    /// took but never handled would otherwise silence that backend for good.
    pub fn open(pin_dir: &Path) -> Result<Self, WriteError> {
        let wrap = |name: &str| {
            let path = pin_dir.join(name).display().to_string();
            move |source| WriteError::Open { path, source }
        };
        let (ring, _) = crate::writer::open(pin_dir, names::FAILURES)?;
        let ring = RingBuf::try_from(ring).map_err(wrap(names::FAILURES))?;
        let (flags, _) = crate::writer::open(pin_dir, names::FAILED_FLAG)?;
        let flags = HashMap::try_from(flags).map_err(wrap(names::FAILED_FLAG))?;
        let mut s = Self { ring, flags, held: BTreeSet::new() };
        s.held = s.drain();
        let stale: Vec<Endpoint> = s.flags.keys().filter_map(Result::ok).collect();
        for ep in stale {
            s.clear(&ep);
        }
        Ok(s)
    }

    /// The backends signalled since the last call (none when nothing failed), with their
    /// flags cleared so that their next failure signals again. Read their counters after
    /// this call, never before. Reads shared memory only: no system call when empty.
    pub fn take(&mut self) -> BTreeSet<Endpoint> {
        let mut got = std::mem::take(&mut self.held);
        got.append(&mut self.drain());
        for ep in &got {
            self.clear(ep);
        }
        got
    }

    fn drain(&mut self) -> BTreeSet<Endpoint> {
        let mut got = BTreeSet::new();
        while let Some(item) = self.ring.next() {
            if let Some(ep) = endpoint(&item) {
                got.insert(ep);
            }
        }
        got
    }

    fn clear(&mut self, ep: &Endpoint) {
        match self.flags.remove(ep) {
            Ok(()) | Err(MapError::KeyNotFound | MapError::ElementNotFound) => {}
            // Left set, the backend would never signal again: say so.
            Err(e) => tracing::warn!(backend = %ep.socket_addr(), error = %e, "cannot clear a failure flag"),
        }
    }
}

/// A ring record as the endpoint it carries (`struct hl_endpoint`).
fn endpoint(b: &[u8]) -> Option<Endpoint> {
    let b: &[u8; 20] = b.get(..20)?.try_into().ok()?;
    let mut ep = Endpoint::default();
    ep.addr.copy_from_slice(&b[..16]);
    ep.port.copy_from_slice(&b[16..18]);
    ep.proto = b[18];
    ep.pad = b[19];
    Some(ep)
}

impl AsFd for Signals {
    /// The ring's descriptor: readable when a signal waits.
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.ring.as_fd()
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.ring.as_raw_fd()
    }
}

/// The failure signals for an async loop (a coordinator session): [`FailureWatch::ready`]
/// resolves when a signal waits or an isolated backend is due back, then
/// [`FailureWatch::look`] does the work. After a look that handled signals it rests
/// `gap` before it listens again: a backend that keeps failing costs one look per `gap`,
/// however many connects fail.
pub struct FailureWatch {
    fd: AsyncFd<Signals>,
    gap: Duration,
    rest_until: Instant,
}

impl FailureWatch {
    /// Opens the signals pinned in `pin_dir`; must run inside a tokio runtime with IO.
    pub fn open(pin_dir: &Path, gap: Duration) -> Result<Self, WriteError> {
        let signals = Signals::open(pin_dir)?;
        // SAFETY: the descriptor is the ring's, owned by `signals` (its MapData) for as
        // long as the AsyncFd holds it, and never replaced.
        let fd = unsafe { AsyncFd::register_with_interest(signals, tokio::io::Interest::READABLE) }.map_err(|e| {
            WriteError::Open {
                path: pin_dir.join(names::FAILURES).display().to_string(),
                source: MapError::SyscallError(aya::sys::SyscallError { call: "epoll_ctl", io_error: e.into() }),
            }
        })?;
        Ok(Self { fd, gap, rest_until: Instant::now() })
    }

    /// Resolves when signals wait (and the rest after the last look is over) or when
    /// `deadline` (from [`Outliers::next_deadline`]) has come. Cancel-safe: use it in a
    /// `tokio::select!`.
    pub async fn ready(&mut self, deadline: Option<Instant>) {
        let deadline = deadline.map(tokio::time::Instant::from_std);
        let rest = tokio::time::Instant::from_std(self.rest_until);
        if rest > tokio::time::Instant::now() {
            match deadline {
                Some(d) if d < rest => return tokio::time::sleep_until(d).await,
                _ => tokio::time::sleep_until(rest).await,
            }
        }
        let readable = async {
            if let Ok(mut guard) = self.fd.readable_mut().await {
                // The look drains the ring; a record written after this is notified again.
                guard.clear_ready();
            }
        };
        match deadline {
            Some(d) => tokio::select! {
                () = readable => {}
                () = tokio::time::sleep_until(d) => {}
            },
            None => readable.await,
        }
    }

    /// Takes the signals and judges the signalled backends, then returns the isolated
    /// backends that are due; returns whether the set of isolated backends changed (then
    /// apply [`Outliers::overlay`]). Call it after [`Self::ready`], also before the first
    /// revision (with no services): the signals must be taken or `ready` never waits.
    pub fn look(&mut self, outliers: &mut Outliers, maps: &Maps, desired: &[DesiredService], now: Instant) -> bool {
        let signalled = self.fd.get_mut().take();
        if !signalled.is_empty() {
            self.rest_until = now + self.gap;
        }
        let failed = outliers.on_failures(maps, desired, &signalled, now);
        outliers.on_deadline(maps, desired, now) || failed
    }

    /// The signals themselves.
    pub fn signals(&mut self) -> &mut Signals {
        self.fd.get_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The wiring a coordinator session uses compiles: `ready` in a `tokio::select!`
    /// arm, `look` in its handler (tokio drops the arms' futures before the handler).
    #[expect(dead_code, reason = "compiled, not run: it needs a node's pinned maps")]
    async fn session_wiring(fw: &mut FailureWatch, o: &mut Outliers, maps: &Maps, desired: &[DesiredService]) {
        let mut other = tokio::time::interval(Duration::from_secs(1));
        loop {
            let deadline = o.next_deadline();
            tokio::select! {
                () = fw.ready(deadline) => {
                    if fw.look(o, maps, desired, Instant::now()) {
                        // apply o.overlay(desired) here
                    }
                }
                _ = other.tick() => {}
            }
        }
    }

    #[test]
    fn the_ring_holds_one_record_per_backend() {
        assert_eq!(failure_ring_bytes(16_384), 16_384 * 32);
        assert_eq!(failure_ring_bytes(10_000), 512 * 1024);
        assert_eq!(failure_ring_bytes(1), 4096.max(failure_ring_bytes(1)));
        assert!(failure_ring_bytes(1).is_power_of_two());
    }
}
