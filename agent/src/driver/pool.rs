//! The addresses instances get: an IPv4 CIDR, handed out lowest first.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

/// An IPv4 address pool such as `127.1.0.0/24`. The network and broadcast addresses, and
/// any address ending in `.0` or `.255`, are never handed out (some stacks treat them
/// specially).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pool {
    text: String,
    first: u32,
    last: u32,
}

impl Pool {
    /// Parses `a.b.c.d/len` (len 8 to 30).
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, len) = text.split_once('/').ok_or_else(|| "no prefix length (/N)".to_string())?;
        let addr: Ipv4Addr = addr.trim().parse().map_err(|_| format!("{addr:?} is not an IPv4 address"))?;
        let len: u32 = len.trim().parse().map_err(|_| format!("{len:?} is not a prefix length"))?;
        if !(8..=30).contains(&len) {
            return Err(format!("prefix length {len} is out of range (8 to 30)"));
        }
        let mask = u32::MAX << (32 - len);
        let network = u32::from(addr) & mask;
        Ok(Self { text: text.trim().to_string(), first: network + 1, last: (network | !mask) - 1 })
    }

    /// The pool as it was written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Whether `addr` is one this pool hands out.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let a = u32::from(addr);
        (self.first..=self.last).contains(&a) && usable(a)
    }

    /// The lowest address of the pool not in `used`.
    pub fn allocate(&self, used: &BTreeSet<Ipv4Addr>) -> Option<Ipv4Addr> {
        (self.first..=self.last).filter(|&a| usable(a)).map(Ipv4Addr::from).find(|a| !used.contains(a))
    }
}

fn usable(a: u32) -> bool {
    !matches!(a & 0xff, 0 | 255)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hands_out_hosts_lowest_first() {
        let p = Pool::parse("127.1.0.0/24").unwrap();
        let mut used = BTreeSet::new();
        assert_eq!(p.allocate(&used), Some(Ipv4Addr::new(127, 1, 0, 1)));
        used.insert(Ipv4Addr::new(127, 1, 0, 1));
        used.insert(Ipv4Addr::new(127, 1, 0, 3));
        assert_eq!(p.allocate(&used), Some(Ipv4Addr::new(127, 1, 0, 2)));
        assert!(!p.contains(Ipv4Addr::new(127, 1, 0, 255)));
        assert!(p.contains(Ipv4Addr::new(127, 1, 0, 254)));
    }

    #[test]
    fn skips_dot_zero_and_broadcast_and_runs_out() {
        let p = Pool::parse("10.0.0.252/30").unwrap();
        let mut used = BTreeSet::new();
        for want in [253, 254] {
            let a = p.allocate(&used).unwrap();
            assert_eq!(a, Ipv4Addr::new(10, 0, 0, want));
            used.insert(a);
        }
        assert_eq!(p.allocate(&used), None);
        let wide = Pool::parse("10.0.0.0/23").unwrap();
        let all: BTreeSet<_> = (1..=254).map(|i| Ipv4Addr::new(10, 0, 0, i)).collect();
        assert_eq!(wide.allocate(&all), Some(Ipv4Addr::new(10, 0, 1, 1)));
    }

    #[test]
    fn rejects_bad_pools() {
        for bad in ["127.1.0.0", "127.1.0/24", "127.1.0.0/31", "::1/64", "127.1.0.0/x"] {
            assert!(Pool::parse(bad).is_err(), "{bad}");
        }
    }
}
