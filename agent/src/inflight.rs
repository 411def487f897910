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
/// queue), in the agent's network namespace. The client already counts such a connect
/// as established, and the instance would refuse its next segment once stopped.
/// Connections already established are counted by the kernel's `hl_active`; these
/// are not. Asked of sock_diag with a state filter, so its cost follows the half-open
/// sockets, not the whole table: reading `/proc/net/tcp` took 1.5-2 s with the tens
/// of thousands of TIME_WAIT sockets a loaded node holds, and every drain paid it.
/// `/proc/net/tcp` remains the fallback where sock_diag cannot be used.
pub fn half_open(addr: std::net::SocketAddr) -> usize {
    match diag::syn_recv(addr) {
        Ok(n) => n,
        Err(_) => ["/proc/net/tcp", "/proc/net/tcp6"]
            .iter()
            .filter_map(|f| std::fs::read_to_string(f).ok())
            .map(|text| count_syn_recv(&text, addr))
            .sum(),
    }
}

/// A minimal NETLINK_SOCK_DIAG client: dumps TCP sockets in SYN_RECV (request sockets
/// included) of one family and counts those whose local address is the listener's.
mod diag {
    use std::io;
    use std::net::{IpAddr, SocketAddr};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    const NETLINK_SOCK_DIAG: libc::c_int = 4;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    const NLMSG_ERROR: u16 = 2;
    const NLMSG_DONE: u16 = 3;
    const TCP_SYN_RECV: u32 = 3;
    /// nlmsghdr (16) + inet_diag_req_v2 (56).
    const REQ_LEN: usize = 72;
    /// Offset of inet_diag_msg's id.idiag_src in a message (after the 16-byte nlmsghdr
    /// and family, state, timer, retrans, sport, dport).
    const SRC_AT: usize = 16 + 8;
    const SPORT_AT: usize = 16 + 4;

    /// SYN_RECV sockets on `addr` (for an IPv4 listener, also its IPv4-mapped form on
    /// IPv6 sockets).
    pub fn syn_recv(addr: SocketAddr) -> io::Result<usize> {
        in_state(addr, TCP_SYN_RECV)
    }

    /// Sockets in TCP state `state` whose local address is `addr`.
    pub fn in_state(addr: SocketAddr, state: u32) -> io::Result<usize> {
        let mut n = dump(libc::AF_INET6 as u8, addr, state)?;
        if addr.is_ipv4() {
            n += dump(libc::AF_INET as u8, addr, state)?;
        }
        Ok(n)
    }

    fn dump(family: u8, addr: SocketAddr, state: u32) -> io::Result<usize> {
        // SAFETY: a plain socket call; the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, NETLINK_SOCK_DIAG) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nothing else owns.
        let sock = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut req = [0u8; REQ_LEN];
        req[0..4].copy_from_slice(&(REQ_LEN as u32).to_ne_bytes());
        req[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
        let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
        req[6..8].copy_from_slice(&flags.to_ne_bytes());
        req[8..12].copy_from_slice(&1u32.to_ne_bytes());
        // inet_diag_req_v2: family, protocol, ext, pad, states; the socket id (zero:
        // no filter in the kernel but the state).
        req[16] = family;
        req[17] = libc::IPPROTO_TCP as u8;
        req[20..24].copy_from_slice(&(1u32 << state).to_ne_bytes());
        // SAFETY: sends our buffer, whose length is given.
        let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        let want_ip: [u8; 16] = match addr.ip() {
            IpAddr::V4(v4) if family == libc::AF_INET as u8 => {
                let mut b = [0u8; 16];
                b[..4].copy_from_slice(&v4.octets());
                b
            }
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        let want_port = addr.port().to_be_bytes();
        let mut count = 0;
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            // SAFETY: receives into our buffer, whose length is given.
            let got = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if got < 0 {
                return Err(io::Error::last_os_error());
            }
            let mut at = 0;
            let got = got as usize;
            while at + 16 <= got {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap_or_default()) as usize;
                let kind = u16::from_ne_bytes(buf[at + 4..at + 6].try_into().unwrap_or_default());
                if len < 16 || at + len > got {
                    return Err(io::Error::new(io::ErrorKind::InvalidData, "short sock_diag message"));
                }
                match kind {
                    NLMSG_DONE => return Ok(count),
                    NLMSG_ERROR => return Err(io::Error::other("sock_diag refused the dump")),
                    _ if len >= SRC_AT + 16 => {
                        let m = &buf[at..at + len];
                        if m[SPORT_AT..SPORT_AT + 2] == want_port && m[SRC_AT..SRC_AT + 16] == want_ip {
                            count += 1;
                        }
                    }
                    _ => {}
                }
                at += (len + 3) & !3;
            }
            if got == 0 {
                return Ok(count);
            }
        }
    }
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
    fn sock_diag_answers_for_an_idle_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let addr = l.local_addr().expect("addr");
        // Needs no privilege: a dump of this namespace's SYN_RECV sockets.
        assert_eq!(diag::syn_recv(addr).expect("sock_diag"), 0);
        // The parsing, on a state that is easy to make: one accepted connection is one
        // ESTABLISHED socket on the listener's address (the client's is on its own).
        let _c = std::net::TcpStream::connect(addr).expect("connect");
        let _s = l.accept().expect("accept");
        const TCP_ESTABLISHED: u32 = 1;
        assert_eq!(diag::in_state(addr, TCP_ESTABLISHED).expect("sock_diag"), 1);
    }

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
