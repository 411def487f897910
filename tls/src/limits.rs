//! The limits of every hitless gRPC connection, in one place for the coordinator (the
//! server) and its clients (agents, the CLI).

use std::time::Duration;

/// Largest request message: the server decodes no larger, clients encode no larger.
/// Registry files beyond one `Apply` go in 1 MiB parts (`ApplyStream`).
pub const MAX_REQUEST: usize = 4 << 20;

/// Largest response message: clients decode up to this, the server encodes no larger.
/// Room for the snapshot of the largest registry the coordinator accepts (16 MiB of
/// registry file, whose snapshot is smaller); agents get snapshots in 1 MiB parts.
pub const MAX_RESPONSE: usize = 32 << 20;

/// Longest any call may take on the server, the longest drain barrier (10 minutes)
/// included; streams (agent sessions, watches) are bounded until their response starts.
pub const RPC_TIMEOUT: Duration = Duration::from_secs(11 * 60);

/// Longest a client waits for an answer to a call other than a drain barrier.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// Concurrent streams (calls) one connection may have open.
pub const STREAMS_PER_CONNECTION: u32 = 64;

/// What one identity (one certificate) may ask of the coordinator; beyond it, calls are
/// refused with RESOURCE_EXHAUSTED.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PerIdentity {
    /// Calls per second, sustained.
    pub rate: f64,
    /// Calls at once above the rate (a token bucket's depth).
    pub burst: u32,
    /// Calls in progress at once.
    pub concurrent: u32,
}

impl Default for PerIdentity {
    /// 100 calls/s, bursts of 200, 32 at once: far above an agent's or a person's use
    /// (an agent's node-local API renews leases once per lease period, `push --wait`
    /// polls 5 times a second).
    fn default() -> Self {
        Self { rate: 100.0, burst: 200, concurrent: 32 }
    }
}
