//! Turns whatever the store holds into the set of peers the datapath may use.
//!
//! Every lease read from etcd or the Kubernetes API passes through here before a
//! backend sees it. Upstream trusts the store; a lease claiming our own subnet or
//! another node's would hijack traffic there (flannel-io/flannel#2554). Here a
//! lease is used only if its subnet lies inside the cluster network, overlaps
//! neither our subnet nor an older lease, and names a usable underlay address.
//! A rejected lease is warned about once per version and counted.

use std::collections::{BTreeMap, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};
use std::sync::Arc;

use ipnet::{Ipv4Net, Ipv6Net};

use super::Lease;
use crate::config::NetworkConfig;
use crate::metrics::{Metrics, Rejection};

/// One entry of the store, as read, before validation.
#[derive(Debug, Clone)]
pub struct Candidate {
    /// The store's name for it: the etcd key's last component, or the node name.
    pub name: String,
    /// Changes whenever the entry changes (etcd mod revision, node resourceVersion).
    pub version: i64,
    /// Orders entries by age: the older one wins an overlap (etcd create revision).
    pub age: i64,
    /// The parsed lease, or why it could not be parsed.
    pub lease: Result<Lease, (Rejection, String)>,
}

/// The validated peers: every usable lease except our own, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PeerSet {
    /// The peers' leases, keyed by the store's name for them.
    pub leases: BTreeMap<String, Lease>,
    /// True once the set comes from a complete, fresh read of the store; only
    /// then may a backend delete what the set lacks.
    pub complete: bool,
    /// Bumped on every complete re-list, so a backend can tell a resync from an update.
    pub generation: u64,
}

/// Validates candidates against the network config and our own lease.
#[derive(Debug)]
pub struct LeaseValidator {
    network: Option<Ipv4Net>,
    ipv6_network: Option<Ipv6Net>,
    own: Option<Lease>,
    metrics: Arc<Metrics>,
    /// The last version of each name we warned about, so a bad entry is
    /// reported once, not on every update of another key.
    warned: HashMap<String, i64>,
}

impl LeaseValidator {
    /// A validator for `config`, excluding (and protecting) `own`.
    pub fn new(config: &NetworkConfig, own: Option<Lease>, metrics: Arc<Metrics>) -> Self {
        Self {
            network: config.enable_ipv4.then_some(config.network).flatten(),
            ipv6_network: config.enable_ipv6.then_some(config.ipv6_network).flatten(),
            own,
            metrics,
            warned: HashMap::new(),
        }
    }

    /// Replaces the own lease (after a re-acquire).
    pub fn set_own(&mut self, own: Option<Lease>) {
        self.own = own;
    }

    /// Validates a full list of candidates and returns the usable peers.
    pub fn validate<'a>(&mut self, candidates: impl IntoIterator<Item = &'a Candidate>) -> BTreeMap<String, Lease> {
        let mut sorted: Vec<&Candidate> = candidates.into_iter().collect();
        // Oldest first, so an overlap is always won by the lease that was there first.
        sorted.sort_by(|a, b| (a.age, &a.name).cmp(&(b.age, &b.name)));
        let mut out: BTreeMap<String, Lease> = BTreeMap::new();
        let mut taken_v4 = Taken::default();
        let mut taken_v6 = Taken::default();
        let mut seen = HashMap::new();
        for c in sorted {
            seen.insert(c.name.clone(), ());
            let lease = match &c.lease {
                Ok(l) => l,
                Err((why, detail)) => {
                    self.reject(c, *why, detail);
                    continue;
                }
            };
            if self.is_own(lease) {
                continue;
            }
            if let Err((why, detail)) = self.check(lease, &taken_v4, &taken_v6) {
                self.reject(c, why, &detail);
                continue;
            }
            if let Some(v4) = lease.subnet {
                taken_v4.insert(
                    u32::from(v4.network()).into(),
                    u32::from(v4.broadcast()).into(),
                    &c.name,
                );
            }
            if let Some(v6) = lease.ipv6_subnet {
                taken_v6.insert(u128::from(v6.network()), u128::from(v6.broadcast()), &c.name);
            }
            out.insert(c.name.clone(), lease.clone());
        }
        // Forget warnings about entries that are gone, so the map stays bounded.
        self.warned.retain(|k, _| seen.contains_key(k));
        out
    }

    fn is_own(&self, lease: &Lease) -> bool {
        self.own
            .as_ref()
            .is_some_and(|o| o.subnet == lease.subnet && o.ipv6_subnet == lease.ipv6_subnet)
    }

    fn check(&self, lease: &Lease, taken_v4: &Taken, taken_v6: &Taken) -> Result<(), (Rejection, String)> {
        if lease.subnet.is_none() && lease.ipv6_subnet.is_none() {
            return Err((Rejection::BadKey, "no subnet".into()));
        }
        let own = self.own.as_ref();
        if let Some(sn) = lease.subnet {
            match self.network {
                Some(net) if net.contains(&sn) => {}
                Some(net) => return Err((Rejection::OutsideNetwork, format!("{sn} is outside Network {net}"))),
                // IPv4 is off here; an IPv4 subnet in the lease is harmless and unused.
                None => {}
            }
            if let Some(o) = own.and_then(|o| o.subnet).filter(|o| overlaps4(o, &sn)) {
                return Err((Rejection::OverlapsOwn, format!("{sn} overlaps this node's subnet {o}")));
            }
            if let Some(who) = taken_v4.overlapping(u32::from(sn.network()).into(), u32::from(sn.broadcast()).into()) {
                return Err((
                    Rejection::OverlapsPeer,
                    format!("{sn} overlaps the subnet of {who}, which is older"),
                ));
            }
            if self.network.is_some() {
                check_v4_underlay(lease.attrs.public_ip, own.map(|o| o.attrs.public_ip))?;
            }
        }
        if let Some(sn) = lease.ipv6_subnet {
            match self.ipv6_network {
                Some(net) if net.contains(&sn) => {}
                Some(net) => {
                    return Err((Rejection::OutsideNetwork, format!("{sn} is outside IPv6Network {net}")));
                }
                None => {}
            }
            if let Some(o) = own.and_then(|o| o.ipv6_subnet).filter(|o| overlaps6(o, &sn)) {
                return Err((Rejection::OverlapsOwn, format!("{sn} overlaps this node's subnet {o}")));
            }
            if let Some(who) = taken_v6.overlapping(u128::from(sn.network()), u128::from(sn.broadcast())) {
                return Err((
                    Rejection::OverlapsPeer,
                    format!("{sn} overlaps the subnet of {who}, which is older"),
                ));
            }
            if self.ipv6_network.is_some() {
                check_v6_underlay(lease.attrs.public_ipv6, own.and_then(|o| o.attrs.public_ipv6))?;
            }
        }
        Ok(())
    }

    fn reject(&mut self, c: &Candidate, why: Rejection, detail: &str) {
        if self.warned.get(&c.name) == Some(&c.version) {
            return;
        }
        self.warned.insert(c.name.clone(), c.version);
        self.metrics.reject(why);
        tracing::warn!(lease = %c.name, reason = why.as_str(), detail, "ignoring lease from the store");
    }
}

/// Address ranges already given to older leases, disjoint, keyed by their first
/// address, so that an overlap check costs O(log n) and a full validation of n
/// leases O(n log n) (a linear scan made 5,000 nodes cost 25 million checks).
#[derive(Debug, Default)]
struct Taken {
    ranges: BTreeMap<u128, (u128, String)>,
}

impl Taken {
    fn insert(&mut self, first: u128, last: u128, name: &str) {
        self.ranges.insert(first, (last, name.to_owned()));
    }

    /// The owner of a range overlapping `first..=last`, if any. The ranges are
    /// disjoint, so only the last one starting at or before `last` can overlap.
    fn overlapping(&self, first: u128, last: u128) -> Option<&str> {
        let (_, (end, name)) = self.ranges.range(..=last).next_back()?;
        (*end >= first).then_some(name.as_str())
    }
}

fn overlaps4(a: &Ipv4Net, b: &Ipv4Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn overlaps6(a: &Ipv6Net, b: &Ipv6Net) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

fn check_v4_underlay(ip: Ipv4Addr, own: Option<Ipv4Addr>) -> Result<(), (Rejection, String)> {
    let bad = ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast();
    if bad {
        return Err((
            Rejection::BadPublicIp,
            format!("PublicIP {ip} cannot be an underlay address"),
        ));
    }
    if Some(ip) == own {
        return Err((
            Rejection::BadPublicIp,
            format!("PublicIP {ip} is this node's own address"),
        ));
    }
    Ok(())
}

fn check_v6_underlay(ip: Option<Ipv6Addr>, own: Option<Ipv6Addr>) -> Result<(), (Rejection, String)> {
    let Some(ip) = ip else {
        return Err((Rejection::BadPublicIp, "an IPv6 subnet without PublicIPv6".into()));
    };
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return Err((
            Rejection::BadPublicIp,
            format!("PublicIPv6 {ip} cannot be an underlay address"),
        ));
    }
    if Some(ip) == own {
        return Err((
            Rejection::BadPublicIp,
            format!("PublicIPv6 {ip} is this node's own address"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::subnet::LeaseAttrs;

    fn lease(sn: &str, ip: &str) -> Lease {
        Lease {
            subnet: Some(sn.parse().unwrap()),
            ipv6_subnet: None,
            attrs: LeaseAttrs {
                public_ip: ip.parse().unwrap(),
                public_ipv6: None,
                backend_type: "vxlan".into(),
                backend_data: None,
                backend_v6_data: None,
            },
            expiration: None,
        }
    }

    fn cand(name: &str, age: i64, l: Lease) -> Candidate {
        Candidate {
            name: name.into(),
            version: age,
            age,
            lease: Ok(l),
        }
    }

    fn validator(metrics: &Arc<Metrics>) -> LeaseValidator {
        let cfg = NetworkConfig::parse_and_check(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        LeaseValidator::new(&cfg, Some(lease("10.244.1.0/24", "198.18.0.1")), metrics.clone())
    }

    #[test]
    fn keeps_good_peers_and_drops_own() {
        let m = Arc::new(Metrics::default());
        let mut v = validator(&m);
        let cs = [
            cand("a", 1, lease("10.244.1.0/24", "198.18.0.1")),
            cand("b", 2, lease("10.244.2.0/24", "198.18.0.2")),
        ];
        let out = v.validate(&cs);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["b"]);
        assert!(Rejection::ALL.iter().all(|r| m.rejected(*r) == 0));
    }

    #[test]
    fn rejects_each_kind_of_bad_lease_once() {
        let m = Arc::new(Metrics::default());
        let mut v = validator(&m);
        let cs = [
            cand("old", 1, lease("10.244.5.0/24", "198.18.0.5")),
            cand("outside", 2, lease("10.9.0.0/24", "198.18.0.9")),
            cand("hijack", 3, lease("10.244.1.0/25", "198.18.0.3")),
            cand("dup", 4, lease("10.244.5.0/24", "198.18.0.4")),
            cand("lo", 5, lease("10.244.7.0/24", "127.0.0.1")),
            cand("me", 6, lease("10.244.8.0/24", "198.18.0.1")),
            cand("mc", 7, lease("10.244.9.0/24", "224.0.0.1")),
            Candidate {
                name: "junk".into(),
                version: 8,
                age: 8,
                lease: Err((Rejection::BadValue, "x".into())),
            },
        ];
        let out = v.validate(&cs);
        assert_eq!(out.keys().collect::<Vec<_>>(), ["old"]);
        assert_eq!(m.rejected(Rejection::OutsideNetwork), 1);
        assert_eq!(m.rejected(Rejection::OverlapsOwn), 1);
        assert_eq!(m.rejected(Rejection::OverlapsPeer), 1);
        assert_eq!(m.rejected(Rejection::BadPublicIp), 3);
        assert_eq!(m.rejected(Rejection::BadValue), 1);
        // The same store contents again: nothing new is counted.
        v.validate(&cs);
        assert_eq!(m.rejected(Rejection::BadPublicIp), 3);
    }

    #[test]
    fn ten_thousand_disjoint_leases_are_all_kept_and_a_wide_one_is_not() {
        let m = Arc::new(Metrics::default());
        let cfg = NetworkConfig::parse_and_check(r#"{"Network":"10.0.0.0/8","Backend":{"Type":"vxlan"}}"#).unwrap();
        let mut v = LeaseValidator::new(&cfg, None, m.clone());
        let mut cs: Vec<Candidate> = (0..10_000u32)
            .map(|i| {
                let sn = format!("10.{}.{}.0/24", 1 + i / 256, i % 256);
                let ip = format!("198.18.{}.{}", i / 250, 1 + i % 250);
                cand(&format!("n{i}"), i64::from(i), lease(&sn, &ip))
            })
            .collect();
        // Younger than all of them, and covering a few: refused whatever its position.
        cs.insert(17, cand("wide", 20_000, lease("10.3.0.0/16", "198.19.0.1")));
        let out = v.validate(&cs);
        assert_eq!(out.len(), 10_000);
        assert!(!out.contains_key("wide"));
        assert_eq!(m.rejected(Rejection::OverlapsPeer), 1);
    }

    #[test]
    fn older_lease_wins_an_overlap_whatever_the_order() {
        let m = Arc::new(Metrics::default());
        let mut v = validator(&m);
        let cs = [
            cand("young", 9, lease("10.244.4.0/24", "198.18.0.9")),
            cand("old", 3, lease("10.244.4.0/23", "198.18.0.3")),
        ];
        assert_eq!(v.validate(&cs).keys().collect::<Vec<_>>(), ["old"]);
    }
}
