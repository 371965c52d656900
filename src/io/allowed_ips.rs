//! Cryptokey routing: which peer an inner address belongs to (longest prefix match over every
//! peer's `allowed_ips`), used both ways: an outgoing packet goes to the peer owning its
//! destination, and a received packet is accepted only if its source belongs to the peer it
//! came from.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Longest-prefix-match table from inner networks to peers.
#[derive(Clone, Debug, Default)]
pub struct AllowedIps {
    /// Sorted by prefix length, longest first, so the first match is the longest.
    entries: Vec<(IpNet, usize)>,
}

impl AllowedIps {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `net` for `peer`. A network already present keeps its first owner (config
    /// validation rejects overlaps between peers; this keeps lookups deterministic anyway).
    pub fn insert(&mut self, net: IpNet, peer: usize) {
        let net = net.trunc();
        if self.entries.iter().any(|(n, _)| *n == net) {
            return;
        }
        let at = self
            .entries
            .iter()
            .position(|(n, _)| n.prefix_len() < net.prefix_len())
            .unwrap_or(self.entries.len());
        self.entries.insert(at, (net, peer));
    }

    /// The peer owning `addr`, by longest prefix.
    pub fn lookup(&self, addr: IpAddr) -> Option<usize> {
        self.entries
            .iter()
            .find(|(n, _)| n.contains(&addr))
            .map(|&(_, p)| p)
    }
}

/// Source address of an IPv4/IPv6 packet.
pub fn packet_source(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(12..16)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(8..24)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

/// Destination address of an IPv4/IPv6 packet.
pub fn packet_destination(packet: &[u8]) -> Option<IpAddr> {
    match packet.first()? >> 4 {
        4 => {
            let b: [u8; 4] = packet.get(16..20)?.try_into().ok()?;
            Some(IpAddr::V4(Ipv4Addr::from(b)))
        }
        6 => {
            let b: [u8; 16] = packet.get(24..40)?.try_into().ok()?;
            Some(IpAddr::V6(Ipv6Addr::from(b)))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn longest_prefix_wins_whatever_the_insert_order() {
        let mut t = AllowedIps::new();
        t.insert(net("0.0.0.0/0"), 0);
        t.insert(net("10.1.0.0/16"), 1);
        t.insert(net("10.1.2.0/24"), 2);
        t.insert(net("::/0"), 0);
        t.insert(net("fd00::/8"), 3);
        assert_eq!(t.lookup(ip("10.1.2.3")), Some(2));
        assert_eq!(t.lookup(ip("10.1.9.9")), Some(1));
        assert_eq!(t.lookup(ip("192.0.2.1")), Some(0));
        assert_eq!(t.lookup(ip("fd12::1")), Some(3));
        assert_eq!(t.lookup(ip("2001:db8::1")), Some(0));

        let mut u = AllowedIps::new();
        u.insert(net("10.1.2.0/24"), 2);
        u.insert(net("10.1.0.0/16"), 1);
        assert_eq!(u.lookup(ip("10.1.2.3")), Some(2));
        assert_eq!(u.lookup(ip("10.2.0.1")), None);
        assert_eq!(u.lookup(ip("::1")), None);
    }

    #[test]
    fn host_bits_are_ignored() {
        let mut t = AllowedIps::new();
        t.insert(net("10.9.9.9/24"), 4);
        assert_eq!(t.lookup(ip("10.9.9.1")), Some(4));
    }

    #[test]
    fn addresses_of_packets() {
        let mut v4 = vec![0u8; 20];
        v4[0] = 0x45;
        v4[12..16].copy_from_slice(&[10, 0, 0, 1]);
        v4[16..20].copy_from_slice(&[10, 0, 0, 2]);
        assert_eq!(packet_source(&v4), Some(ip("10.0.0.1")));
        assert_eq!(packet_destination(&v4), Some(ip("10.0.0.2")));
        let mut v6 = vec![0u8; 40];
        v6[0] = 0x60;
        v6[23] = 1;
        v6[39] = 2;
        assert_eq!(packet_source(&v6), Some(ip("::1")));
        assert_eq!(packet_destination(&v6), Some(ip("::2")));
        assert_eq!(packet_source(&v4[..15]), None);
        assert_eq!(packet_destination(&v6[..39]), None);
        assert_eq!(packet_source(&[]), None);
        assert_eq!(packet_source(&[0x10; 40]), None);
    }
}
