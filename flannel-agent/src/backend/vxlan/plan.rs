//! What the vxlan backend wants in the kernel for a peer set (pure), and how the
//! neighbour and FDB tables of its device differ from it.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;

use super::config::peer_vtep_mac;
use crate::backend::routes::{family_of, RTPROT_FLANNEL};
use crate::netlink::{FdbEntry, MacAddr, Neighbour, RouteSpec};
use crate::subnet::Lease;

/// The entries one peer needs on one address family.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerEntries {
    /// The store's name for the peer.
    pub name: String,
    /// The peer's subnet.
    pub subnet: IpNet,
    /// Encapsulated: the neighbour (subnet address → VTEP MAC) and FDB entry (VTEP
    /// MAC → PublicIP). `None` for a peer reached by DirectRouting.
    pub vtep: Option<(IpAddr, MacAddr, IpAddr)>,
    /// The route to the subnet.
    pub route: RouteSpec,
}

/// Everything one family of the backend wants, keyed as the kernel keys it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Desired {
    /// The peers that have entries.
    pub peers: Vec<PeerEntries>,
    /// Neighbour entries on the VXLAN device.
    pub neigh: BTreeMap<IpAddr, MacAddr>,
    /// FDB entries on the VXLAN device.
    pub fdb: BTreeMap<MacAddr, IpAddr>,
    /// Routes, through the device or direct.
    pub routes: BTreeMap<IpNet, RouteSpec>,
    /// Peers left out, with why (to be warned about once).
    pub skipped: Vec<(String, String)>,
}

/// How one family of the backend reaches peers.
#[derive(Clone, Debug)]
pub struct FamilyCtx<'a> {
    /// IPv6 (`flannel-v6.N`, `ipv6_subnet`, `PublicIPv6`, `BackendV6Data`) or IPv4.
    pub v6: bool,
    /// Our VNI; peers must use the same.
    pub vni: u32,
    /// Index of our VXLAN device for this family.
    pub dev_index: u32,
    /// With DirectRouting: the peers' public IPs the kernel reaches without a
    /// gateway, and through which interface.
    pub direct: &'a HashMap<IpAddr, u32>,
}

/// Computes the desired entries from vxlan leases (others must be filtered out
/// before). A peer whose data is unusable, or whose VTEP MAC another peer already
/// uses, is skipped and reported.
pub fn desired<'a>(ctx: &FamilyCtx<'_>, leases: impl IntoIterator<Item = (&'a String, &'a Lease)>) -> Desired {
    let mut d = Desired::default();
    // One FDB entry per MAC: a second peer claiming a MAC would steal the first's traffic.
    let mut mac_owner: HashMap<MacAddr, String> = HashMap::new();
    for (name, lease) in leases {
        let Some((subnet, public_ip)) = family_of(lease, ctx.v6) else {
            continue;
        };
        let gw = subnet.network();
        if let Some(&oif) = ctx.direct.get(&public_ip) {
            let route = RouteSpec {
                dst: subnet,
                gateway: public_ip,
                oif,
                onlink: false,
                protocol: RTPROT_FLANNEL,
                nhid: None,
            };
            d.routes.insert(subnet, route);
            d.peers.push(PeerEntries {
                name: name.clone(),
                subnet,
                vtep: None,
                route,
            });
            continue;
        }
        let data = if ctx.v6 {
            lease.attrs.backend_v6_data.as_ref()
        } else {
            lease.attrs.backend_data.as_ref()
        };
        let mac = match peer_vtep_mac(data, ctx.vni) {
            Ok(m) => m,
            Err(why) => {
                d.skipped.push((name.clone(), why));
                continue;
            }
        };
        if let Some(other) = mac_owner.get(&mac) {
            d.skipped
                .push((name.clone(), format!("VtepMAC {mac} is already used by {other}")));
            continue;
        }
        mac_owner.insert(mac, name.clone());
        let route = RouteSpec {
            dst: subnet,
            gateway: gw,
            oif: ctx.dev_index,
            onlink: true,
            protocol: RTPROT_FLANNEL,
            nhid: None,
        };
        d.neigh.insert(gw, mac);
        d.fdb.insert(mac, public_ip);
        d.routes.insert(subnet, route);
        d.peers.push(PeerEntries {
            name: name.clone(),
            subnet,
            vtep: Some((gw, mac, public_ip)),
            route,
        });
    }
    d
}

/// Changes to the neighbour and FDB tables of the VXLAN device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct L2Plan {
    /// Neighbours to install (`ip neigh replace ... nud permanent`).
    pub neigh_replace: Vec<(IpAddr, MacAddr)>,
    /// FDB entries to install (`bridge fdb replace ... self permanent`).
    pub fdb_replace: Vec<(MacAddr, IpAddr)>,
    /// FDB remotes to delete.
    pub fdb_delete: Vec<FdbEntry>,
    /// Neighbours to delete.
    pub neigh_delete: Vec<IpAddr>,
}

impl L2Plan {
    /// Whether the plan changes nothing.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.neigh_replace.is_empty()
            && self.fdb_replace.is_empty()
            && self.fdb_delete.is_empty()
            && self.neigh_delete.is_empty()
    }
}

/// Compares the device's tables with the desired entries. Everything permanent on
/// the device is flannel's; entries the kernel made itself (ARP/NDP cache entries,
/// learned FDB entries) are left to the kernel. A permanent entry no peer wants is
/// deleted only when `complete`; a wrong extra remote of a desired MAC is deleted
/// in any case (after the replace, which rewrites the first remote).
pub fn plan_l2(
    neigh: &BTreeMap<IpAddr, MacAddr>,
    fdb: &BTreeMap<MacAddr, IpAddr>,
    actual_neigh: &[Neighbour],
    actual_fdb: &[FdbEntry],
    complete: bool,
) -> L2Plan {
    // Indexed once, so that comparing 10,000 peers with 10,000 entries stays linear.
    let have_neigh: HashSet<(IpAddr, MacAddr)> = actual_neigh
        .iter()
        .filter(|n| n.permanent)
        .filter_map(|n| Some((n.ip, n.mac?)))
        .collect();
    let have_fdb: HashSet<(MacAddr, IpAddr)> = actual_fdb
        .iter()
        .filter(|f| f.permanent)
        .filter_map(|f| Some((f.mac, f.dst?)))
        .collect();
    let mut p = L2Plan::default();
    for (&ip, &mac) in neigh {
        if !have_neigh.contains(&(ip, mac)) {
            p.neigh_replace.push((ip, mac));
        }
    }
    for (&mac, &dst) in fdb {
        if !have_fdb.contains(&(mac, dst)) {
            p.fdb_replace.push((mac, dst));
        }
    }
    for f in actual_fdb.iter().filter(|f| f.permanent) {
        let stale = match fdb.get(&f.mac) {
            Some(dst) => f.dst != Some(*dst),
            None => complete,
        };
        if stale {
            p.fdb_delete.push(*f);
        }
    }
    if complete {
        p.neigh_delete.extend(
            actual_neigh
                .iter()
                .filter(|n| n.permanent && !neigh.contains_key(&n.ip))
                .map(|n| n.ip),
        );
    }
    p
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::backend::vxlan::config::backend_data;
    use crate::subnet::LeaseAttrs;

    fn mac(s: &str) -> MacAddr {
        s.parse().unwrap()
    }

    fn lease(sn: &str, ip: &str, m: &str) -> Lease {
        Lease {
            subnet: Some(sn.parse().unwrap()),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: Some(backend_data(1, mac(m))),
                backend_v6_data: None,
            },
            expiration: None,
        }
    }

    fn ctx(direct: &HashMap<IpAddr, u32>) -> FamilyCtx<'_> {
        FamilyCtx {
            v6: false,
            vni: 1,
            dev_index: 9,
            direct,
        }
    }

    #[test]
    fn encapsulated_and_direct_peers() {
        let leases: BTreeMap<String, Lease> = [
            (
                "a".to_string(),
                lease("10.244.2.0/24", "192.168.0.2", "02:00:00:00:00:02"),
            ),
            (
                "b".to_string(),
                lease("10.244.3.0/24", "192.168.0.3", "02:00:00:00:00:03"),
            ),
        ]
        .into();
        let direct = HashMap::from([("192.168.0.3".parse().unwrap(), 2)]);
        let d = desired(&ctx(&direct), &leases);
        assert_eq!(
            d.neigh,
            BTreeMap::from([("10.244.2.0".parse().unwrap(), mac("02:00:00:00:00:02"))])
        );
        assert_eq!(
            d.fdb,
            BTreeMap::from([(mac("02:00:00:00:00:02"), "192.168.0.2".parse().unwrap())])
        );
        let r = |dst: &str| d.routes[&dst.parse::<IpNet>().unwrap()];
        assert_eq!(
            (r("10.244.2.0/24").gateway.to_string(), r("10.244.2.0/24").oif),
            ("10.244.2.0".into(), 9)
        );
        assert!(r("10.244.2.0/24").onlink);
        assert_eq!(
            (r("10.244.3.0/24").gateway.to_string(), r("10.244.3.0/24").oif),
            ("192.168.0.3".into(), 2)
        );
        assert!(!r("10.244.3.0/24").onlink);
        assert!(d.skipped.is_empty());
    }

    #[test]
    fn bad_data_and_duplicate_macs_are_skipped() {
        let mut bad = lease("10.244.4.0/24", "192.168.0.4", "02:00:00:00:00:04");
        bad.attrs.backend_data = Some(json!({"VNI": 2, "VtepMAC": "02:00:00:00:00:04"}));
        let leases: BTreeMap<String, Lease> = [
            (
                "a".to_string(),
                lease("10.244.2.0/24", "192.168.0.2", "02:00:00:00:00:02"),
            ),
            (
                "b".to_string(),
                lease("10.244.3.0/24", "192.168.0.3", "02:00:00:00:00:02"),
            ),
            ("c".to_string(), bad),
        ]
        .into();
        let d = desired(&ctx(&HashMap::new()), &leases);
        assert_eq!(d.peers.iter().map(|p| p.name.as_str()).collect::<Vec<_>>(), ["a"]);
        assert_eq!(d.skipped.len(), 2);
        assert!(d.skipped[0].1.contains("already used by a"), "{:?}", d.skipped);
        assert!(d.skipped[1].1.contains("VNI 2"), "{:?}", d.skipped);
    }

    #[test]
    fn l2_diff() {
        let (ip2, ip3, ip9) = (
            "10.244.2.0".parse().unwrap(),
            "10.244.3.0".parse().unwrap(),
            "10.244.9.0".parse().unwrap(),
        );
        let (m2, m3, m3new, m9) = (
            mac("02:00:00:00:00:02"),
            mac("02:00:00:00:00:03"),
            mac("02:00:00:00:00:33"),
            mac("02:00:00:00:00:09"),
        );
        let (p2, p3, p9, p3old) = (
            "192.168.0.2".parse().unwrap(),
            "192.168.0.3".parse().unwrap(),
            "192.168.0.9".parse().unwrap(),
            "192.168.0.33".parse().unwrap(),
        );
        let neigh = BTreeMap::from([(ip2, m2), (ip3, m3new)]);
        let fdb = BTreeMap::from([(m2, p2), (m3new, p3)]);
        let n = |ip, m, permanent| Neighbour {
            ip,
            mac: Some(m),
            permanent,
        };
        let f = |m, d, permanent| FdbEntry {
            mac: m,
            dst: Some(d),
            permanent,
        };
        let actual_neigh = [
            n(ip2, m2, true),
            n(ip3, m3, true),
            n(ip9, m9, true),
            n("10.244.7.0".parse().unwrap(), m9, false),
        ];
        let actual_fdb = [
            f(m2, p2, true),
            f(m2, p3old, true),
            f(m3, p3, true),
            f(m9, p9, true),
            f(m9, p2, false),
        ];

        let p = plan_l2(&neigh, &fdb, &actual_neigh, &actual_fdb, true);
        assert_eq!(p.neigh_replace, vec![(ip3, m3new)]);
        assert_eq!(p.fdb_replace, vec![(m3new, p3)]);
        assert_eq!(p.fdb_delete, vec![f(m2, p3old, true), f(m3, p3, true), f(m9, p9, true)]);
        assert_eq!(p.neigh_delete, vec![ip9]);

        // Incomplete: the same additions, and only the wrong remote of a wanted MAC goes.
        let p = plan_l2(&neigh, &fdb, &actual_neigh, &actual_fdb, false);
        assert_eq!((p.neigh_replace.len(), p.fdb_replace.len()), (1, 1));
        assert_eq!(p.fdb_delete, vec![f(m2, p3old, true)]);
        assert!(p.neigh_delete.is_empty());

        // In sync.
        let actual_neigh = [n(ip2, m2, true), n(ip3, m3new, true)];
        let actual_fdb = [f(m2, p2, true), f(m3new, p3, true)];
        assert!(plan_l2(&neigh, &fdb, &actual_neigh, &actual_fdb, true).is_empty());
    }
}
