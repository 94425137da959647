//! Subnet keys as upstream writes them under `<prefix>/subnets/`:
//! `10.5.34.0-24`, or `10.12.13.0-24&fd00:12:13::-56` for dual stack.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};

/// The subnet(s) a lease key names. Upstream's etcd keys always carry an IPv4
/// subnet; the IPv6 one is optional.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SubnetKey {
    /// The IPv4 subnet.
    pub v4: Ipv4Net,
    /// The IPv6 subnet, for dual-stack leases.
    pub v6: Option<Ipv6Net>,
}

impl fmt::Display for SubnetKey {
    /// Upstream's `MakeSubnetKey`. Rust prints IPv6 addresses in RFC 5952 form,
    /// as Go's `net.IP.String()` does.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.v4.network(), self.v4.prefix_len())?;
        if let Some(v6) = self.v6 {
            write!(f, "&{}-{}", v6.network(), v6.prefix_len())?;
        }
        Ok(())
    }
}

impl SubnetKey {
    /// Parses a key, or the last path component of one. Stricter than upstream's
    /// unanchored regex: the whole string must be a key, and the address must be
    /// the subnet's network address (a key with host bits names no subnet).
    pub fn parse(s: &str) -> Option<Self> {
        let (v4part, v6part) = match s.split_once('&') {
            Some((a, b)) => (a, Some(b)),
            None => (s, None),
        };
        let v4 = parse_v4(v4part)?;
        let v6 = match v6part {
            None => None,
            Some(p) => Some(parse_v6(p)?),
        };
        Some(Self { v4, v6 })
    }
}

fn split_len(s: &str, max: u8) -> Option<(&str, u8)> {
    let (addr, len) = s.rsplit_once('-')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    (len <= max).then_some((addr, len))
}

fn parse_v4(s: &str) -> Option<Ipv4Net> {
    // Upstream parses the prefix as a 5-bit number, so `-32` is not a key.
    let (addr, len) = split_len(s, 31)?;
    if !addr.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return None;
    }
    let addr: Ipv4Addr = addr.parse().ok()?;
    let net = Ipv4Net::new(addr, len).ok()?;
    (net.network() == addr).then_some(net)
}

fn parse_v6(s: &str) -> Option<Ipv6Net> {
    let (addr, len) = split_len(s, 127)?;
    if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
        return None;
    }
    let addr: Ipv6Addr = addr.parse().ok()?;
    let net = Ipv6Net::new(addr, len).ok()?;
    (net.network() == addr).then_some(net)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in [
            "10.5.34.0-24",
            "10.12.13.0-24&fd00:12:13::-56",
            "0.0.0.0-0",
            "10.244.3.0-24&2001:db8::-64",
        ] {
            let k = SubnetKey::parse(s).unwrap();
            assert_eq!(k.to_string(), s);
        }
        let k = SubnetKey::parse("10.12.13.0-24&fd00:12:13::-56").unwrap();
        assert_eq!(k.v4, "10.12.13.0/24".parse().unwrap());
        assert_eq!(k.v6, Some("fd00:12:13::/56".parse().unwrap()));
    }

    #[test]
    fn rejects_upstream_invalid_vectors_and_more() {
        for s in [
            "10",
            "10.12.13.0",
            "10.12.13-24",
            "10.12.13.300-24",
            "10.12.13.0-24hi",
            "&2001::-56",
            "10.12.13.0-24&:12:13:-56",
            "10.12.13.0-24&20011::-56",
            "10.12.13.0-24&2001-56",
            "10.12.13.0-24&2001::",
            "10.12.13.0-24&2001::-56hi",
            "10.12.13.0-32",
            "10.12.13.0-",
            "10.12.13.1-24",
            "x10.12.13.0-24",
            "10.12.13.0-24&2001::1-64",
            "10.12.13.0-24&2001::-128",
            "",
            "$(reboot)-24",
        ] {
            assert_eq!(SubnetKey::parse(s), None, "{s}");
        }
    }
}
