//! Handshakes in flight from this node to backends that stopped serving: what a drain
//! must wait for besides the instance's open connections.
//!
//! A connect steered to an instance just before its drain may still be in its
//! handshake when the drain is in effect everywhere: its SYN was dropped by a full
//! accept queue (any server under overload does this) and is retransmitted a second
//! later. No server-side count sees it, and if the instance is stopped meanwhile the
//! retransmission is refused. The kernel counts such connects per backend
//! (`hl_pending`, from `TCP_CONNECT_CB` to established or failed); after each apply
//! the agent reports them for every draining or down backend in its acks, and the
//! coordinator stops an instance only once no node lists it.
//!
//! Nothing is watched while nothing is in flight: a watch ends once its list is empty
//! and settled, so an idle agent does no work here.

use std::time::{Duration, Instant};

use hitless_proto::v1 as pb;

use crate::abi::{Endpoint, PROTO_TCP, STATE_SERVING};
use crate::desired::DesiredService;
use crate::writer::Maps;

/// How often a watch looks at the kernel's counts.
pub const WATCH_EVERY: Duration = Duration::from_millis(5);

/// How long after an apply a list becomes "settled". A connect whose program ran
/// before the apply counts itself at `TCP_CONNECT_CB`, later in the same `connect()`
/// call, microseconds after; this leaves room for that call to be preempted.
pub const SETTLE: Duration = Duration::from_millis(20);

/// The watch of one revision's non-serving backends.
#[derive(Debug)]
pub struct Watch {
    revision: u64,
    applied_at: Instant,
    targets: Vec<Endpoint>,
    last: Vec<pb::InFlight>,
    settled: bool,
}

impl Watch {
    /// Starts watching the draining and down TCP backends of `desired`, applied as
    /// `revision` at `applied_at`; returns the watch and the ack to send now.
    pub fn start(revision: u64, desired: &[DesiredService], maps: &Maps, applied_at: Instant) -> (Self, pb::Ack) {
        let targets: Vec<Endpoint> = desired
            .iter()
            .flat_map(|s| s.backends.iter())
            .filter(|b| b.state != STATE_SERVING && b.ep.proto == PROTO_TCP)
            .map(|b| b.ep)
            .collect();
        let mut w = Self { revision, applied_at, targets, last: Vec::new(), settled: false };
        w.last = w.read(maps);
        // Nothing that stopped serving: nothing can be in flight to it.
        w.settled = w.targets.is_empty();
        let ack = w.ack();
        (w, ack)
    }

    /// Looks again; returns the ack to send when the list or its settledness changed.
    pub fn look(&mut self, maps: &Maps, now: Instant) -> Option<pb::Ack> {
        let list = self.read(maps);
        let settled = now.saturating_duration_since(self.applied_at) >= SETTLE;
        if list == self.last && settled == self.settled {
            return None;
        }
        self.last = list;
        self.settled = settled;
        Some(self.ack())
    }

    /// Whether the watch has nothing left to report: settled, and nothing in flight.
    pub fn done(&self) -> bool {
        self.settled && self.last.is_empty()
    }

    fn read(&self, maps: &Maps) -> Vec<pb::InFlight> {
        self.targets
            .iter()
            .filter_map(|ep| {
                let n = maps.handshakes_in_flight(ep);
                (n > 0).then(|| pb::InFlight { address: ep.socket_addr().to_string(), handshakes: n })
            })
            .collect()
    }

    fn ack(&self) -> pb::Ack {
        pb::Ack { revision: self.revision, in_flight: self.last.clone(), settled: self.settled }
    }
}

/// Handshakes the listener at `addr` has answered but not finished (`SYN_RECV`: a
/// SYN-ACK sent, the client's ACK not yet taken, e.g. dropped by a full accept
/// queue), read from `/proc/net/tcp` and `tcp6` of the agent's network namespace.
/// The client already counts such a connect as established, and the instance would
/// refuse its next segment once stopped. Connections already established are
/// counted by the kernel's `hl_active`; these are not.
pub fn half_open(addr: std::net::SocketAddr) -> usize {
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .map(|text| count_syn_recv(&text, addr))
        .sum()
}

/// `SYN_RECV` entries of a `/proc/net/tcp`-format table whose local address is `addr`
/// (an IPv4 address also matches its IPv4-mapped form in `tcp6`).
fn count_syn_recv(text: &str, addr: std::net::SocketAddr) -> usize {
    const SYN_RECV: &str = "03";
    let want = std::net::SocketAddr::new(
        match addr.ip() {
            std::net::IpAddr::V4(v4) => std::net::IpAddr::V6(v4.to_ipv6_mapped()),
            v6 => v6,
        },
        addr.port(),
    );
    text.lines()
        .skip(1)
        .filter(|line| {
            let mut f = line.split_whitespace();
            let (Some(local), Some(_remote), Some(state)) = (f.nth(1), f.next(), f.next()) else {
                return false;
            };
            state == SYN_RECV && parse_local(local) == Some(want)
        })
        .count()
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6), each 32-bit word in
/// the kernel's byte order; IPv4 is returned IPv4-mapped.
fn parse_local(s: &str) -> Option<std::net::SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let mut octets = [0u8; 16];
    match ip.len() {
        8 => {
            octets[10] = 0xff;
            octets[11] = 0xff;
            octets[12..].copy_from_slice(&u32::from_str_radix(ip, 16).ok()?.to_le_bytes());
        }
        32 => {
            for (i, chunk) in octets.chunks_mut(4).enumerate() {
                let word = u32::from_str_radix(ip.get(i * 8..i * 8 + 8)?, 16).ok()?;
                chunk.copy_from_slice(&word.to_le_bytes());
            }
        }
        _ => return None,
    }
    Some(std::net::SocketAddr::new(std::net::Ipv6Addr::from(octets).into(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0101A17F:1F90 00000000:0000 0A 00000000:00000005 00:00000000 00000000     0        0 1 1 0 100 0 0 10 0
   1: 0101A17F:1F90 0100007F:A1B2 03 00000000:00000000 02:00000064 00000000     0        0 0 0 0
   2: 0101A17F:1F90 0100007F:A1B3 03 00000000:00000000 02:00000064 00000000     0        0 0 0 0
   3: 0201A17F:1F90 0100007F:A1B4 03 00000000:00000000 02:00000064 00000000     0        0 0 0 0
   4: 0101A17F:1F90 0100007F:A1B5 01 00000000:00000000 00:00000000 00000000     0        0 2 1 0
";
    const TCP6: &str = "  sl  local_address                         remote_address                        st
   0: 0000000000000000FFFF00000101A17F:1F90 0000000000000000FFFF00000100007F:C000 03 00000000:00000000
   1: 00000000000000000000000001000000:1F90 00000000000000000000000001000000:C001 03 00000000:00000000
";

    #[test]
    fn counts_syn_recv_of_the_listener_only() {
        let a: std::net::SocketAddr = "127.161.1.1:8080".parse().unwrap();
        assert_eq!(
            count_syn_recv(TCP, a),
            2,
            "SYN_RECV of 127.161.1.1:8080, not the listener, the other address or ESTABLISHED"
        );
        assert_eq!(count_syn_recv(TCP6, a), 1, "its IPv4-mapped form in tcp6");
        let v6: std::net::SocketAddr = "[::1]:8080".parse().unwrap();
        assert_eq!(count_syn_recv(TCP6, v6), 1);
        assert_eq!(count_syn_recv(TCP, "127.161.1.9:8080".parse().unwrap()), 0);
    }
}
