//! Privileged: a few hundred peers programmed at once through the pipelined writes, checked
//! entry by entry with ip(8)/bridge(8); a repeated reconcile must send the kernel nothing,
//! and a smaller complete set removes exactly the peers that went.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use super::netns_tests::start;
use super::{backend_data, Backend};
use crate::netlink::lab::{config, Lab, NsPath};
use crate::netlink::testutil::privileged;
use crate::netlink::MacAddr;
use crate::subnet::{Lease, LeaseAttrs, PeerSet};

/// More than one window of requests in flight ([`crate::netlink::WINDOW`]), so the
/// pipeline wraps, but small enough for CI.
const PEERS: usize = 300;

/// Peer `i`: a /26 of `10.244.8.0`–`10.244.83.255` (clear of the lab's nodes), a public IP in
/// `192.168.100.0/22` and a VTEP MAC, all distinct.
fn peer(i: usize) -> (String, Lease, Ipv4Addr, MacAddr) {
    let i = u16::try_from(i).unwrap();
    let [hi, lo] = i.to_be_bytes();
    let subnet = Ipv4Addr::new(10, 244, 8 + (i / 4) as u8, (i % 4) as u8 * 64);
    let public = Ipv4Addr::from(u32::from(Ipv4Addr::new(192, 168, 100, 1)) + u32::from(i));
    let mac = MacAddr([0x0a, 0x58, 0xbb, 0, hi, lo]);
    let lease = Lease {
        subnet: Some(format!("{subnet}/26").parse().unwrap()),
        ipv6_subnet: None,
        attrs: LeaseAttrs {
            public_ip: public,
            public_ipv6: None,
            backend_type: "vxlan".into(),
            backend_data: Some(backend_data(1, mac)),
            backend_v6_data: None,
        },
        expiration: None,
    };
    (format!("peer-{i}"), lease, subnet, mac)
}

fn peer_set(range: std::ops::Range<usize>, complete: bool) -> PeerSet {
    PeerSet {
        leases: range
            .map(|i| {
                let (name, lease, ..) = peer(i);
                (name, lease)
            })
            .collect(),
        complete,
        generation: 1,
    }
}

/// The node's flannel entries as (neighbours, FDB entries, routes), one normalised line each.
fn entries(p: &NsPath) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let lines = |out: String| out.lines().map(|l| l.trim().to_owned()).collect::<BTreeSet<_>>();
    (
        lines(p.sh(&["ip", "-4", "neigh", "show", "dev", "flannel.1", "nud", "permanent"])),
        lines(p.sh(&["bridge", "fdb", "show", "dev", "flannel.1"]))
            .into_iter()
            .filter(|l| l.contains(" dst "))
            .collect(),
        lines(p.sh(&["ip", "-4", "route", "show", "proto", "102"])),
    )
}

/// What [`entries`] should show for peers `range`.
fn expected(range: std::ops::Range<usize>) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let (mut neigh, mut fdb, mut routes) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
    for i in range {
        let (_, lease, subnet, mac) = peer(i);
        neigh.insert(format!("{subnet} lladdr {mac} PERMANENT"));
        fdb.insert(format!("{mac} dst {} self permanent", lease.attrs.public_ip));
        let id = super::nexthops::nexthop_id(subnet).unwrap();
        routes.insert(format!("{subnet}/26 nhid {id} via {subnet} onlink"));
    }
    (neigh, fdb, routes)
}

#[test]
fn hundreds_of_peers_are_programmed_entry_by_entry_and_a_rerun_writes_nothing() {
    if !privileged("backend::vxlan::hundreds_of_peers_are_programmed_entry_by_entry_and_a_rerun_writes_nothing") {
        return;
    }
    let lab = Lab::new("flv-bulk");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let a = lab.a.path();
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;

        // An incomplete set first: everything is added, nothing may be deleted later by it.
        assert_eq!(be.reconcile(&peer_set(0..PEERS, false)).await.unwrap(), PEERS);
        let (neigh, fdb, routes) = entries(&a);
        let (want_neigh, want_fdb, want_routes) = expected(0..PEERS);
        assert_eq!(neigh, want_neigh, "neighbours");
        assert_eq!(fdb, want_fdb, "FDB entries");
        // `ip route show proto 102` prints "<subnet> nhid <id> via <gateway> dev flannel.1
        // proto 102 onlink" (the object's gateway and device: `nexthop_compat_mode`); compare
        // without the device and protocol, which the filter already fixes.
        let routes: BTreeSet<String> = routes
            .iter()
            .map(|r| r.replace(" dev flannel.1", "").replace(" proto 102", ""))
            .collect();
        assert_eq!(routes, want_routes, "routes");

        // In sync: a complete reconcile sends the kernel no change at all.
        let monitor = a.monitor();
        assert_eq!(be.reconcile(&peer_set(0..PEERS, true)).await.unwrap(), PEERS);
        let events = monitor.stop();
        assert!(events.trim().is_empty(), "a reconcile in sync changed: {events}");

        // An incomplete smaller set deletes nothing; a complete one deletes exactly the rest.
        be.reconcile(&peer_set(0..100, false)).await.unwrap();
        assert_eq!(entries(&a).0.len(), PEERS);
        assert_eq!(be.reconcile(&peer_set(0..100, true)).await.unwrap(), 100);
        let (neigh, fdb, routes) = entries(&a);
        let (want_neigh, want_fdb, _) = expected(0..100);
        assert_eq!((neigh, fdb), (want_neigh, want_fdb));
        assert_eq!(routes.len(), 100, "{routes:?}");
        let objects = a.sh(&["ip", "nexthop", "show", "proto", "102"]);
        assert_eq!(objects.lines().count(), 100, "{objects}");
    });
}
