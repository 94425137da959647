//! `flannelctl peers`: every lease the agent programs beside the eBPF map entry for it, with
//! drift flagged. Pure logic; the caller reads the agent's report and the pinned map.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use flannel_common::{PeerStats, RemoteVtep, VTEP_F_DIRECT_ROUTING};
use ipnet::Ipv4Net;
use serde::Serialize;

use crate::backend::vxlan::PeerView;
use crate::netlink::MacAddr;

/// How a lease and the datapath's entry for it compare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The map entry matches the lease.
    Ok,
    /// The kernel datapath serves it (there is no map to compare).
    Kernel,
    /// A lease with no map entry.
    MissingInMap,
    /// A map entry with no lease.
    NoLease,
    /// Both exist and the VTEP address, MAC or flags differ.
    Mismatch,
}

/// A map entry, readable.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// The outer destination.
    pub vtep_ip: Ipv4Addr,
    /// The inner destination MAC.
    pub vtep_mac: String,
    /// Whether `VTEP_F_DIRECT_ROUTING` is set.
    pub direct_routing: bool,
}

impl From<&RemoteVtep> for MapEntry {
    fn from(v: &RemoteVtep) -> Self {
        Self {
            vtep_ip: v.ipv4(),
            vtep_mac: MacAddr(v.vtep_mac).to_string(),
            direct_routing: v.flags & VTEP_F_DIRECT_ROUTING != 0,
        }
    }
}

/// What this node exchanged with a peer's VTEP, from `FLANNEL_PEER_STATS`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct PeerCounters {
    /// Packets encapsulated to the VTEP in BPF.
    pub encap_packets: u64,
    /// Their bytes, outer headers included.
    pub encap_bytes: u64,
    /// Packets from the VTEP decapsulated in BPF.
    pub decap_packets: u64,
    /// Their bytes (inner frames).
    pub decap_bytes: u64,
}

impl From<&PeerStats> for PeerCounters {
    fn from(s: &PeerStats) -> Self {
        Self {
            encap_packets: s.encap_packets,
            encap_bytes: s.encap_bytes,
            decap_packets: s.decap_packets,
            decap_bytes: s.decap_bytes,
        }
    }
}

/// One row of `flannelctl peers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Row {
    /// The subnet (the map's key).
    pub subnet: Ipv4Net,
    /// The lease, when there is one.
    pub lease: Option<PeerView>,
    /// The map entry, when there is one.
    pub map: Option<MapEntry>,
    /// The verdict.
    pub state: State,
    /// What differs, for [`State::Mismatch`].
    pub detail: String,
    /// The per-peer counters of the row's VTEP (the map entry's address, else the lease's),
    /// when the datapath has them. Peers sharing a VTEP share its counters.
    pub counters: Option<PeerCounters>,
}

/// Fills in each row's per-peer counters from `stats` (by VTEP address).
pub fn add_counters(rows: &mut [Row], stats: &BTreeMap<Ipv4Addr, PeerStats>) {
    for row in rows {
        let vtep = row
            .map
            .as_ref()
            .map(|m| m.vtep_ip)
            .or_else(|| row.lease.as_ref().map(|l| l.public_ip));
        // The programs create a peer's entry on its first packet: a VTEP in the map without
        // one has exchanged nothing yet.
        row.counters = vtep
            .and_then(|ip| stats.get(&ip))
            .map(PeerCounters::from)
            .or_else(|| row.map.is_some().then(PeerCounters::default));
    }
}

/// Compares the agent's peers with the map entries; `map` is `None` for the kernel datapath.
pub fn compare(peers: &[PeerView], map: Option<&[(Ipv4Net, RemoteVtep)]>) -> Vec<Row> {
    let mut rows: BTreeMap<Ipv4Net, Row> = BTreeMap::new();
    for p in peers {
        let subnet = p.subnet.trunc();
        let state = if map.is_some() {
            State::MissingInMap
        } else {
            State::Kernel
        };
        rows.insert(
            subnet,
            Row {
                subnet,
                lease: Some(p.clone()),
                map: None,
                state,
                detail: String::new(),
                counters: None,
            },
        );
    }
    for (subnet, vtep) in map.unwrap_or_default() {
        let entry = MapEntry::from(vtep);
        let row = rows.entry(subnet.trunc()).or_insert_with(|| Row {
            subnet: subnet.trunc(),
            lease: None,
            map: None,
            state: State::NoLease,
            detail: String::new(),
            counters: None,
        });
        if let Some(lease) = &row.lease {
            let mut diffs = Vec::new();
            if lease.public_ip != entry.vtep_ip {
                diffs.push(format!(
                    "VTEP IP {} in the lease, {} in the map",
                    lease.public_ip, entry.vtep_ip
                ));
            }
            if !lease.vtep_mac.eq_ignore_ascii_case(&entry.vtep_mac) {
                diffs.push(format!(
                    "MAC {} in the lease, {} in the map",
                    lease.vtep_mac, entry.vtep_mac
                ));
            }
            if lease.direct_routing != entry.direct_routing {
                diffs.push(format!(
                    "DirectRouting {} for the agent, {} in the map",
                    lease.direct_routing, entry.direct_routing
                ));
            }
            row.state = if diffs.is_empty() { State::Ok } else { State::Mismatch };
            row.detail = diffs.join("; ");
        }
        row.map = Some(entry);
    }
    rows.into_values().collect()
}

/// Rows that show drift.
pub fn drift(rows: &[Row]) -> usize {
    rows.iter()
        .filter(|r| matches!(r.state, State::MissingInMap | State::NoLease | State::Mismatch))
        .count()
}

/// The human-readable table.
pub fn table(rows: &[Row]) -> String {
    let header = [
        "SUBNET",
        "LEASE PUBLIC-IP",
        "LEASE VTEP-MAC",
        "MAP VTEP-IP",
        "MAP VTEP-MAC",
        "ENCAP PKTS",
        "ENCAP BYTES",
        "DECAP PKTS",
        "DECAP BYTES",
        "STATE",
    ];
    let mut cells: Vec<[String; 10]> = vec![header.map(str::to_owned)];
    for r in rows {
        let (ip, mac) = match &r.lease {
            Some(l) => (l.public_ip.to_string(), l.vtep_mac.clone()),
            None => ("-".into(), "-".into()),
        };
        let (mip, mmac) = match &r.map {
            Some(m) => (m.vtep_ip.to_string(), m.vtep_mac.clone()),
            None if r.state == State::Kernel => ("(kernel)".into(), "(kernel)".into()),
            None => ("-".into(), "-".into()),
        };
        let mut state = serde_json::to_value(r.state)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        if r.lease.as_ref().is_some_and(|l| l.direct_routing) {
            state.push_str(" (direct)");
        }
        if !r.detail.is_empty() {
            state = format!("{state}: {}", r.detail);
        }
        let [ep, eb, dp, db] = match &r.counters {
            Some(c) => [c.encap_packets, c.encap_bytes, c.decap_packets, c.decap_bytes].map(|v| v.to_string()),
            None => ["-", "-", "-", "-"].map(str::to_owned),
        };
        cells.push([r.subnet.to_string(), ip, mac, mip, mmac, ep, eb, dp, db, state]);
    }
    let widths: Vec<usize> = (0..9)
        .map(|i| cells.iter().map(|c| c[i].len()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for c in &cells {
        for (i, w) in widths.iter().enumerate() {
            let _ = write!(out, "{:<w$}  ", c[i], w = *w);
        }
        let _ = writeln!(out, "{}", c[9]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(subnet: &str, ip: [u8; 4], mac: &str) -> PeerView {
        PeerView {
            lease: subnet.replace('/', "-"),
            subnet: subnet.parse().unwrap(),
            public_ip: ip.into(),
            vtep_mac: mac.into(),
            direct_routing: false,
        }
    }

    #[test]
    fn flags_every_kind_of_drift() {
        let mac: MacAddr = "02:00:00:00:00:01".parse().unwrap();
        let peers = [
            peer("10.244.1.0/24", [198, 18, 0, 1], "02:00:00:00:00:01"),
            peer("10.244.2.0/24", [198, 18, 0, 2], "02:00:00:00:00:02"),
            peer("10.244.3.0/24", [198, 18, 0, 3], "02:00:00:00:00:03"),
        ];
        let map = [
            (
                "10.244.1.0/24".parse().unwrap(),
                RemoteVtep::new([198, 18, 0, 1].into(), mac.0, 0),
            ),
            (
                "10.244.3.0/24".parse().unwrap(),
                RemoteVtep::new([198, 18, 0, 9].into(), mac.0, 0),
            ),
            (
                "10.244.4.0/24".parse().unwrap(),
                RemoteVtep::new([198, 18, 0, 4].into(), mac.0, 0),
            ),
        ];
        let mut rows = compare(&peers, Some(&map));
        let stats = BTreeMap::from([(
            Ipv4Addr::new(198, 18, 0, 1),
            PeerStats {
                encap_packets: 3,
                encap_bytes: 300,
                decap_packets: 4,
                decap_bytes: 400,
            },
        )]);
        add_counters(&mut rows, &stats);
        assert_eq!(
            rows[0].counters.map(|c| (c.encap_packets, c.decap_bytes)),
            Some((3, 400))
        );
        assert_eq!(rows[1].counters, None, "no counters for 198.18.0.2, not in the map");
        assert_eq!(
            rows[2].counters,
            Some(PeerCounters::default()),
            "in the map, no packet yet"
        );
        let states: Vec<State> = rows.iter().map(|r| r.state).collect();
        assert_eq!(
            states,
            [State::Ok, State::MissingInMap, State::Mismatch, State::NoLease]
        );
        assert!(rows[2].detail.contains("VTEP IP") && rows[2].detail.contains("MAC"));
        assert_eq!(drift(&rows), 3);
        let text = table(&rows);
        assert!(text.starts_with("SUBNET") && text.contains("no_lease"), "{text}");
        assert!(text.contains("ENCAP PKTS") && text.contains(" 300 "), "{text}");
        assert!(compare(&peers, None).iter().all(|r| r.state == State::Kernel));
    }
}
