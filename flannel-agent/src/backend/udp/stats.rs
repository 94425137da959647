//! The udp proxy's counters: packets and bytes each way, ICMP errors sent, and drops by
//! reason. The forwarding tasks count into a local [`Tally`] and add it to the shared
//! [`Counters`] once per batch, so a packet costs no atomic operation.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{Map, Value};
use tracing::warn;

/// One counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Stat {
    /// Packets read from the TUN and sent to a peer.
    EncapPackets,
    /// Their bytes (inner packets).
    EncapBytes,
    /// Packets received from a peer and written to the TUN.
    DecapPackets,
    /// Their bytes (inner packets).
    DecapBytes,
    /// ICMP net-unreachable errors written back to the TUN.
    IcmpUnreachableSent,
    /// Datagram from an address that is not a peer's `PublicIP:Port`.
    DropNotAPeer,
    /// Datagram from a peer whose inner source is outside that peer's subnets.
    DropForeignSource,
    /// Not a valid IPv4 packet (length, header, checksum, truncated).
    DropMalformed,
    /// Not IPv4 (the kernel's own IPv6 on the TUN, or garbage from the network).
    DropNotIpv4,
    /// TTL would reach 0.
    DropTtlExpired,
    /// From the TUN, for an address no peer's subnet holds (answered with ICMP).
    DropNoRoute,
    /// The TUN refused a packet.
    DropTunWrite,
    /// The UDP socket refused a datagram.
    DropUdpSend,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Stat; 13] = [
        Stat::EncapPackets,
        Stat::EncapBytes,
        Stat::DecapPackets,
        Stat::DecapBytes,
        Stat::IcmpUnreachableSent,
        Stat::DropNotAPeer,
        Stat::DropForeignSource,
        Stat::DropMalformed,
        Stat::DropNotIpv4,
        Stat::DropTtlExpired,
        Stat::DropNoRoute,
        Stat::DropTunWrite,
        Stat::DropUdpSend,
    ];

    /// The name in JSON, and the `reason` label of drops in metrics.
    pub fn name(self) -> &'static str {
        match self {
            Stat::EncapPackets => "encap_packets",
            Stat::EncapBytes => "encap_bytes",
            Stat::DecapPackets => "decap_packets",
            Stat::DecapBytes => "decap_bytes",
            Stat::IcmpUnreachableSent => "icmp_unreachable_sent",
            Stat::DropNotAPeer => "not_a_peer",
            Stat::DropForeignSource => "foreign_source",
            Stat::DropMalformed => "malformed",
            Stat::DropNotIpv4 => "not_ipv4",
            Stat::DropTtlExpired => "ttl_expired",
            Stat::DropNoRoute => "no_route",
            Stat::DropTunWrite => "tun_write_error",
            Stat::DropUdpSend => "udp_send_error",
        }
    }

    fn is_drop(self) -> bool {
        self as usize >= Stat::DropNotAPeer as usize
    }
}

const N: usize = Stat::ALL.len();

/// The shared counters.
#[derive(Debug, Default)]
pub struct Counters {
    values: [AtomicU64; N],
}

/// A task's counts since its last [`Counters::add`].
#[derive(Debug, Default)]
pub struct Tally {
    values: [u64; N],
}

impl Tally {
    /// Counts `n` of `stat`.
    #[inline]
    pub fn count(&mut self, stat: Stat, n: u64) {
        self.values[stat as usize] += n;
    }
}

impl Counters {
    /// Adds a task's tally and clears it. The first drop of each reason is logged, once
    /// per process: after that only the counters say it (a flood of bad datagrams must
    /// not become a flood of log lines).
    pub fn add(&self, tally: &mut Tally) {
        for (i, v) in tally.values.iter_mut().enumerate() {
            if *v == 0 {
                continue;
            }
            let before = self.values[i].fetch_add(*v, Ordering::Relaxed);
            let stat = Stat::ALL[i];
            if before == 0 && stat.is_drop() && stat != Stat::DropNotIpv4 {
                warn!(
                    reason = stat.name(),
                    "udp backend dropped a packet; further drops are only counted (flannelctl status, /metrics)"
                );
            }
            *v = 0;
        }
    }

    /// One counter's value.
    pub fn get(&self, stat: Stat) -> u64 {
        self.values[stat as usize].load(Ordering::Relaxed)
    }

    /// `{"encap_packets": .., ..., "drops": {"not_a_peer": .., ...}}`.
    pub fn json(&self) -> Value {
        let mut top = Map::new();
        let mut drops = Map::new();
        for s in Stat::ALL {
            let target = if s.is_drop() { &mut drops } else { &mut top };
            target.insert(s.name().into(), self.get(s).into());
        }
        top.insert("drops".into(), Value::Object(drops));
        Value::Object(top)
    }

    /// Prometheus text for `/metrics`.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(out, "# TYPE flannel_udp_packets_total counter");
        let _ = writeln!(out, "# TYPE flannel_udp_bytes_total counter");
        for (dir, p, b) in [
            ("encap", Stat::EncapPackets, Stat::EncapBytes),
            ("decap", Stat::DecapPackets, Stat::DecapBytes),
        ] {
            let _ = writeln!(out, "flannel_udp_packets_total{{direction=\"{dir}\"}} {}", self.get(p));
            let _ = writeln!(out, "flannel_udp_bytes_total{{direction=\"{dir}\"}} {}", self.get(b));
        }
        let _ = writeln!(
            out,
            "# TYPE flannel_udp_icmp_unreachable_total counter\nflannel_udp_icmp_unreachable_total {}",
            self.get(Stat::IcmpUnreachableSent)
        );
        let _ = writeln!(out, "# TYPE flannel_udp_drops_total counter");
        for s in Stat::ALL.into_iter().filter(|s| s.is_drop()) {
            let _ = writeln!(
                out,
                "flannel_udp_drops_total{{reason=\"{}\"}} {}",
                s.name(),
                self.get(s)
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_match_the_list() {
        for (i, s) in Stat::ALL.iter().enumerate() {
            assert_eq!(*s as usize, i);
        }
    }

    #[test]
    fn tallies_add_up_and_render() {
        let c = Counters::default();
        let mut t = Tally::default();
        t.count(Stat::EncapPackets, 2);
        t.count(Stat::DropNotAPeer, 1);
        c.add(&mut t);
        t.count(Stat::DropNotAPeer, 3);
        c.add(&mut t);
        assert_eq!(c.get(Stat::EncapPackets), 2);
        assert_eq!(c.get(Stat::DropNotAPeer), 4);
        let j = c.json();
        assert_eq!(j["encap_packets"], 2);
        assert_eq!(j["drops"]["not_a_peer"], 4);
        let mut m = String::new();
        c.render(&mut m);
        assert!(m.contains("flannel_udp_drops_total{reason=\"not_a_peer\"} 4"), "{m}");
        assert!(m.contains("flannel_udp_packets_total{direction=\"encap\"} 2"), "{m}");
    }
}
