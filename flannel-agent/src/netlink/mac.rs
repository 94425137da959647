//! Ethernet (MAC) addresses as the kernel and the lease JSON carry them.

use std::fmt;
use std::str::FromStr;

/// A 48-bit Ethernet address.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// A random unicast, locally administered address, as upstream generates for
    /// a new VTEP (`b[0] = (b[0] & 0xfe) | 0x02`).
    pub fn random_local() -> Self {
        let mut b: [u8; 6] = rand::random();
        b[0] = (b[0] & 0xfe) | 0x02;
        MacAddr(b)
    }

    /// Whether this can name one station: not all-zero (which a VXLAN FDB takes as
    /// "default destination for every unknown MAC") and not multicast/broadcast.
    pub fn is_unicast(&self) -> bool {
        self.0 != [0; 6] && self.0[0] & 0x01 == 0
    }

    /// The address from a netlink `IFLA_ADDRESS`/`NDA_LLADDR` payload, if it is 6 bytes.
    pub fn from_slice(b: &[u8]) -> Option<Self> {
        <[u8; 6]>::try_from(b).ok().map(MacAddr)
    }
}

/// Lower-case and colon-separated, as Go's `net.HardwareAddr.String` (and so
/// upstream's `VtepMAC`) writes it.
impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid MAC address {0:?}: expected six hex pairs separated by ':' or '-'")]
pub struct MacParseError(pub String);

/// Accepts `aa:bb:cc:dd:ee:ff` and `aa-bb-cc-dd-ee-ff` in either case: the
/// 48-bit forms Go's `net.ParseMAC` reads. Longer (EUI-64, InfiniBand) forms are
/// refused since a VXLAN VTEP is always Ethernet.
impl FromStr for MacAddr {
    type Err = MacParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || MacParseError(s.chars().take(40).collect());
        let sep = if s.contains('-') { '-' } else { ':' };
        let mut out = [0u8; 6];
        let mut parts = s.split(sep);
        for byte in &mut out {
            let p = parts.next().ok_or_else(err)?;
            // from_str_radix alone would accept "+f".
            if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Err(err());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| err())?;
        }
        if parts.next().is_some() {
            return Err(err());
        }
        Ok(MacAddr(out))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_like_go() {
        let m: MacAddr = "C6:D2:32:6f:8f:44".parse().unwrap();
        assert_eq!(m.to_string(), "c6:d2:32:6f:8f:44");
        assert_eq!("c6-d2-32-6f-8f-44".parse::<MacAddr>().unwrap(), m);
        for bad in [
            "",
            "c6:d2:32:6f:8f",
            "c6:d2:32:6f:8f:44:00",
            "c6:d2:32:6f:8f:4",
            "c6:d2:32:6f:8f:zz",
            "+6:d2:32:6f:8f:44",
        ] {
            assert!(bad.parse::<MacAddr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn random_is_unicast_and_locally_administered() {
        for _ in 0..64 {
            let m = MacAddr::random_local();
            assert!(m.is_unicast());
            assert_eq!(m.0[0] & 0x03, 0x02);
        }
        assert!(!MacAddr([0; 6]).is_unicast());
        assert!(!MacAddr([0xff; 6]).is_unicast());
        assert!(!MacAddr([0x01, 0, 0x5e, 0, 0, 1]).is_unicast());
    }
}
