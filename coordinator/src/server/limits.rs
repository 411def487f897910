//! Per-identity limits: calls per second (a token bucket) and calls in progress, for
//! each certificate's identity; beyond either, RESOURCE_EXHAUSTED. Plaintext
//! (`--insecure`, loopback) is not limited.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use hitless_tls::limits::PerIdentity;
use tonic::Status;
use tracing::warn;

struct Bucket {
    tokens: f64,
    at: Instant,
    in_flight: u32,
}

/// The state of every identity's limits.
pub struct Limiter {
    limits: PerIdentity,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// A call in progress; dropping it ends the call's count.
pub struct Admitted {
    limiter: Arc<Limiter>,
    key: String,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut b = self.limiter.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(b) = b.get_mut(&self.key) {
            b.in_flight = b.in_flight.saturating_sub(1);
        }
    }
}

impl Limiter {
    /// A limiter applying `limits` to each identity.
    pub fn new(limits: PerIdentity) -> Arc<Self> {
        Arc::new(Self { limits, buckets: Mutex::new(HashMap::new()) })
    }

    /// Admits one call of `key` (an identity's URI) now, or refuses it.
    pub fn admit(self: &Arc<Self>, key: &str, method: &str) -> Result<Admitted, Status> {
        let now = Instant::now();
        let l = self.limits;
        let mut all = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let b = all.entry(key.to_owned()).or_insert(Bucket { tokens: f64::from(l.burst), at: now, in_flight: 0 });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * l.rate).min(f64::from(l.burst));
        b.at = now;
        let why = if b.in_flight >= l.concurrent {
            format!("{} calls in progress, the most one identity may have", l.concurrent)
        } else if b.tokens < 1.0 {
            format!("more than {} calls per second (bursts of {})", l.rate, l.burst)
        } else {
            b.tokens -= 1.0;
            b.in_flight += 1;
            return Ok(Admitted { limiter: Arc::clone(self), key: key.to_owned() });
        };
        warn!(identity = key, method, "refused: {why}");
        Err(Status::resource_exhausted(format!("{method}: {why}; slow down and retry")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_the_bucket_and_calls_beyond_the_concurrency_are_refused() {
        let l = Limiter::new(PerIdentity { rate: 0.001, burst: 3, concurrent: 2 });
        let a = l.admit("x", "m").expect("1");
        let b = l.admit("x", "m").expect("2");
        let busy = l.admit("x", "m").map(|_| ()).expect_err("a third at once");
        assert_eq!(busy.code(), tonic::Code::ResourceExhausted);
        assert!(busy.message().contains("in progress"), "{}", busy.message());
        drop((a, b));
        let _c = l.admit("x", "m").expect("3");
        let fast = l.admit("x", "m").map(|_| ()).expect_err("a fourth in the burst");
        assert!(fast.message().contains("per second"), "{}", fast.message());
        // Another identity has its own bucket.
        assert!(l.admit("y", "m").is_ok());
    }
}
