//! The datapath's map keys and values, mirrored from `ebpf/include/hitless_types.h`.
//!
//! Every type is `#[repr(C)]` with explicit padding so that it is `aya::Pod`; the
//! sizes and offsets are asserted at compile time here and with `_Static_assert` in
//! the header, so a drift on either side fails the build instead of misreading maps.

use std::mem::{offset_of, size_of};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Backend states. Only [`STATE_SERVING`] backends ever get slots.
pub const STATE_SERVING: u8 = 0;
/// The backend finishes its open connections and gets no new ones.
pub const STATE_DRAINING: u8 = 1;
/// The backend is gone or failing: connects to it are steered or refused.
pub const STATE_DOWN: u8 = 2;

/// A direct connect to a draining/down backend goes to a serving sibling.
pub const POLICY_STEER: u8 = 0;
/// A direct connect to a draining/down backend fails with `ECONNREFUSED`.
pub const POLICY_REJECT: u8 = 1;
/// A direct connect to a draining/down backend is left alone.
pub const POLICY_ALLOW: u8 = 2;

/// Slot table used by `AF_INET` sockets (IPv4 backends only).
pub const TABLE_V4: u8 = 4;
/// Slot table used by `AF_INET6` sockets (all backends, IPv4 ones mapped).
pub const TABLE_V6: u8 = 6;

/// Highest number of slots in one table.
pub const MAX_SLOTS: usize = 1024;

/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;
/// `IPPROTO_UDP`.
pub const PROTO_UDP: u8 = 17;

/// An address, port and protocol: a VIP, a backend, or an active-connection key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Endpoint {
    /// IPv6 address, network byte order; IPv4 is stored as `::ffff:a.b.c.d`.
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// `IPPROTO_TCP` or `IPPROTO_UDP`.
    pub proto: u8,
    /// Always 0.
    pub pad: u8,
}

impl Endpoint {
    /// The key for `addr` with `proto`.
    pub fn new(addr: SocketAddr, proto: u8) -> Self {
        let v6 = match addr.ip() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped(),
            IpAddr::V6(v6) => v6,
        };
        Self { addr: v6.octets(), port: addr.port().to_be_bytes(), proto, pad: 0 }
    }

    /// The socket address this key stands for (IPv4 when mapped).
    pub fn socket_addr(&self) -> SocketAddr {
        let v6 = Ipv6Addr::from(self.addr);
        let ip = match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        };
        SocketAddr::new(ip, u16::from_be_bytes(self.port))
    }

    /// 4 for an IPv4 (mapped) address, 6 otherwise.
    pub fn family(&self) -> u8 {
        if Ipv6Addr::from(self.addr).to_ipv4_mapped().is_some() {
            4
        } else {
            6
        }
    }
}

/// `hl_frontends` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Frontend {
    /// The service this VIP belongs to.
    pub service_id: u32,
    /// Reserved, 0.
    pub flags: u32,
}

/// `hl_services` value: which slot generation is in force and how many slots it has.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Service {
    /// Slot generation in force, 0 or 1.
    pub gen: u32,
    /// Slots in the IPv4 table of that generation.
    pub slots4: u16,
    /// Slots in the IPv6 table of that generation.
    pub slots6: u16,
    /// `POLICY_*`.
    pub policy: u8,
    /// Always 0.
    pub pad: [u8; 3],
}

/// `hl_slots` key; the value is a backend id.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct SlotKey {
    /// Service id.
    pub service_id: u32,
    /// Slot index, below the table's count.
    pub slot: u16,
    /// `TABLE_V4` or `TABLE_V6`.
    pub table: u8,
    /// Generation, 0 or 1.
    pub gen: u8,
}

/// `hl_backends` value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// Address, as in [`Endpoint::addr`].
    pub addr: [u8; 16],
    /// Port, network byte order.
    pub port: [u8; 2],
    /// `STATE_*`.
    pub state: u8,
    /// 4 or 6.
    pub family: u8,
    /// The service the backend belongs to.
    pub service_id: u32,
}

/// `hl_rev_nat` key.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RevKey {
    /// Socket cookie.
    pub cookie: u64,
    /// Backend address the socket was steered to.
    pub addr: [u8; 16],
    /// Backend port, network byte order.
    pub port: [u8; 2],
    /// Always 0.
    pub pad0: u16,
    /// Always 0.
    pub pad1: u32,
}

/// `hl_rev_nat` value: what the application dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Rev {
    /// Dialled address.
    pub addr: [u8; 16],
    /// Dialled port, network byte order.
    pub port: [u8; 2],
    /// Always 0.
    pub pad: u16,
}

/// `hl_counters` value, one per CPU per service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counters {
    /// VIP connects and datagrams sent to a backend.
    pub steered: u64,
    /// Direct connects moved off a draining or down backend.
    pub redirected: u64,
    /// Refused: no serving backend, or policy reject.
    pub refused: u64,
    /// Direct connects let through to a draining backend (no serving sibling).
    pub passed_draining: u64,
}

/// Buckets of the connect latency histogram: bucket `b` counts connects that took
/// `[2^b, 2^(b+1))` µs (the first also below 1 µs, the last everything above).
pub const LAT_BUCKETS: usize = 16;

/// `hl_backend_stats` value, one per CPU per remote backend: what this node's clients
/// saw of it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct BackendStats {
    /// Connects that established.
    pub connects: u64,
    /// Connects that never established (refused, reset, timed out).
    pub failed: u64,
    /// Established connections that closed.
    pub closed: u64,
    /// Retransmits of the closed connections.
    pub retrans: u64,
    /// Bytes received on the closed connections.
    pub bytes_in: u64,
    /// Bytes acked on the closed connections.
    pub bytes_out: u64,
    /// Smoothed RTT at close, µs, summed over closed connections.
    pub srtt_us_sum: u64,
    /// Connect latency, µs, summed over connects.
    pub latency_us_sum: u64,
    /// Connect latency histogram.
    pub latency: [u64; LAT_BUCKETS],
    /// Established connections that went straight to CLOSE (reset, or aborted).
    pub resets: u64,
}

impl BackendStats {
    /// Adds another CPU's share.
    pub fn add(&mut self, o: &Self) {
        self.connects += o.connects;
        self.failed += o.failed;
        self.closed += o.closed;
        self.retrans += o.retrans;
        self.bytes_in += o.bytes_in;
        self.bytes_out += o.bytes_out;
        self.srtt_us_sum += o.srtt_us_sum;
        self.latency_us_sum += o.latency_us_sum;
        self.resets += o.resets;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            *a += *b;
        }
    }
}

/// `hl_meta` value: the revision the maps hold.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Meta {
    /// Registry revision the maps hold.
    pub revision: u64,
    /// `CLOCK_REALTIME` nanoseconds of that apply.
    pub applied_at_ns: u64,
}

// SAFETY: all of these are #[repr(C)] plain integers and byte arrays with explicit
// padding fields, so every bit pattern is valid and there are no implicit holes.
unsafe impl aya::Pod for Endpoint {}
// SAFETY: as above.
unsafe impl aya::Pod for Frontend {}
// SAFETY: as above.
unsafe impl aya::Pod for Service {}
// SAFETY: as above.
unsafe impl aya::Pod for SlotKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Backend {}
// SAFETY: as above.
unsafe impl aya::Pod for RevKey {}
// SAFETY: as above.
unsafe impl aya::Pod for Rev {}
// SAFETY: as above.
unsafe impl aya::Pod for Counters {}
// SAFETY: as above.
unsafe impl aya::Pod for Meta {}
// SAFETY: as above.
unsafe impl aya::Pod for BackendStats {}

// The same numbers as the _Static_asserts in hitless_types.h.
const _: () = {
    assert!(size_of::<Endpoint>() == 20);
    assert!(offset_of!(Endpoint, port) == 16);
    assert!(offset_of!(Endpoint, proto) == 18);
    assert!(size_of::<Frontend>() == 8);
    assert!(size_of::<Service>() == 12);
    assert!(offset_of!(Service, slots4) == 4);
    assert!(offset_of!(Service, slots6) == 6);
    assert!(offset_of!(Service, policy) == 8);
    assert!(size_of::<SlotKey>() == 8);
    assert!(offset_of!(SlotKey, slot) == 4);
    assert!(offset_of!(SlotKey, table) == 6);
    assert!(offset_of!(SlotKey, gen) == 7);
    assert!(size_of::<Backend>() == 24);
    assert!(offset_of!(Backend, state) == 18);
    assert!(offset_of!(Backend, family) == 19);
    assert!(offset_of!(Backend, service_id) == 20);
    assert!(size_of::<RevKey>() == 32);
    assert!(offset_of!(RevKey, addr) == 8);
    assert!(offset_of!(RevKey, port) == 24);
    assert!(size_of::<Rev>() == 20);
    assert!(size_of::<Counters>() == 32);
    assert!(size_of::<Meta>() == 16);
    assert!(size_of::<BackendStats>() == 200);
    assert!(offset_of!(BackendStats, resets) == 192);
    assert!(offset_of!(BackendStats, latency) == 64);
};

/// `Ipv4Addr` helper for tests and the CLI.
pub fn v4(a: u8, b: u8, c: u8, d: u8, port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(a, b, c, d)), port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_round_trips_both_families() {
        for s in ["127.0.1.1:8080", "[::1]:18080", "[2001:db8::5]:1"] {
            let addr: SocketAddr = s.parse().unwrap();
            let ep = Endpoint::new(addr, PROTO_TCP);
            assert_eq!(ep.socket_addr(), addr, "{s}");
        }
        assert_eq!(Endpoint::new(v4(127, 0, 0, 1, 1), PROTO_TCP).family(), 4);
        assert_eq!(Endpoint::new("[::1]:1".parse().unwrap(), PROTO_TCP).family(), 6);
    }

    #[test]
    fn endpoint_bytes_match_the_kernel_layout() {
        // ::ffff:127.0.1.2 port 8080 TCP, as the datapath builds it from a sockaddr_in.
        let ep = Endpoint::new(v4(127, 0, 1, 2, 8080), PROTO_TCP);
        let mut want = [0u8; 20];
        want[10] = 0xff;
        want[11] = 0xff;
        want[12..16].copy_from_slice(&[127, 0, 1, 2]);
        want[16..18].copy_from_slice(&8080u16.to_be_bytes());
        want[18] = 6;
        // SAFETY: Endpoint is repr(C), 20 bytes, no implicit padding (asserted above).
        let got: [u8; 20] = unsafe { std::mem::transmute(ep) };
        assert_eq!(got, want);
    }
}
