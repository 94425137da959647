//! Privileged: what the vxlan backend removes, keeps and adopts (stale entries,
//! foreign routes, incomplete peer sets, a peer's new MAC, existing devices).

use super::netns_tests::{has, mac_of, setup, snapshot, start};
use crate::backend::Backend;
use crate::netlink::lab::{config, lease, peers, Lab};
use crate::netlink::testutil::privileged;

#[test]
fn vxlan_deletes_only_what_it_owns_and_only_from_a_complete_set() {
    if !privileged("backend::vxlan::vxlan_deletes_only_what_it_owns_and_only_from_a_complete_set") {
        return;
    }
    let lab = Lab::new("flv-gc");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (_, info_b) = setup(&lab, &cfg, false);
    let a = lab.a.path();
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;
        let lb = lease(2, &info_b, false);
        be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap();
        // Not flannel's: a route outside Network, and one inside it made by hand.
        a.sh(&[
            "ip",
            "route",
            "add",
            "10.99.0.0/24",
            "via",
            "192.168.50.254",
            "dev",
            "ul",
        ]);
        a.sh(&[
            "ip",
            "route",
            "add",
            "10.244.99.0/24",
            "via",
            "192.168.50.254",
            "dev",
            "ul",
            "proto",
            "static",
        ]);
        // Flannel's: a stale peer on the device, and a stale direct route.
        a.sh(&[
            "ip",
            "neigh",
            "replace",
            "10.244.7.0",
            "lladdr",
            "02:00:00:00:00:07",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ]);
        a.sh(&[
            "bridge",
            "fdb",
            "append",
            "02:00:00:00:00:07",
            "dev",
            "flannel.1",
            "dst",
            "192.168.50.7",
            "self",
            "permanent",
        ]);
        a.sh(&[
            "ip",
            "route",
            "replace",
            "10.244.7.0/24",
            "via",
            "10.244.7.0",
            "dev",
            "flannel.1",
            "onlink",
        ]);
        a.sh(&[
            "ip",
            "route",
            "add",
            "10.244.8.0/24",
            "via",
            "192.168.50.8",
            "dev",
            "ul",
            "proto",
            "102",
        ]);
        let stale = |s: &str| {
            ["10.244.7.0", "02:00:00:00:00:07", "10.244.8.0/24"]
                .iter()
                .filter(|n| s.contains(*n))
                .count()
        };
        let peer_b = |s: &str| s.contains("10.244.2.0");

        // Incomplete sets delete nothing, even with the peer gone from them.
        be.reconcile(&peers(&[("b", &lb)], false)).await.unwrap();
        be.reconcile(&peers(&[], false)).await.unwrap();
        let s = snapshot(&a);
        assert_eq!(stale(&s), 3, "{s}");
        assert!(peer_b(&s), "{s}");

        // A complete set removes flannel's stale entries, nothing else.
        assert_eq!(be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap(), 1);
        let s = snapshot(&a);
        assert_eq!(stale(&s), 0, "{s}");
        assert!(
            peer_b(&s)
                && s.contains("10.99.0.0/24")
                && s.contains("10.244.99.0/24 via 192.168.50.254 dev ul proto static"),
            "{s}"
        );
        assert!(a.ping("10.244.1.1", "10.244.2.1"));

        // The peer removed: its neighbour, FDB entry and route go.
        assert_eq!(be.reconcile(&peers(&[], true)).await.unwrap(), 0);
        let s = snapshot(&a);
        assert!(!peer_b(&s) && !s.contains(&mac_of(&info_b, false)), "{s}");
        assert!(s.contains("10.99.0.0/24") && s.contains("10.244.99.0/24"), "{s}");
        assert!(!a.ping("10.244.1.1", "10.244.2.1"));
    });
}

#[test]
fn vxlan_follows_a_peer_vtep_mac_change() {
    if !privileged("backend::vxlan::vxlan_follows_a_peer_vtep_mac_change") {
        return;
    }
    let lab = Lab::new("flv-mac");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (info_a, info_b) = setup(&lab, &cfg, false);
    let (a, b) = (lab.a.path(), lab.b.path());
    let (c, ib) = (cfg.clone(), info_b.clone());
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&c, 1, false).await;
        be.reconcile(&peers(&[("b", &lease(2, &ib, false))], true))
            .await
            .unwrap();
    });
    assert!(a.ping("10.244.1.1", "10.244.2.1"));

    // B's device comes back with another MAC (re-created, or changed by udev), and
    // B's agent, restarting, adopts it and publishes it.
    let new_mac = "02:00:00:00:bb:bb";
    b.sh(&["ip", "link", "set", "flannel.1", "address", new_mac]);
    assert!(!a.ping("10.244.1.1", "10.244.2.1"));
    let (c, ia) = (cfg.clone(), info_a.clone());
    let info_b2 = lab.b.ns.run(move || async move {
        let (mut be, info) = start(&c, 2, false).await;
        be.reconcile(&peers(&[("a", &lease(1, &ia, false))], true))
            .await
            .unwrap();
        info
    });
    assert_eq!(mac_of(&info_b2, false), new_mac);

    let a2 = a.clone();
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b2, false))], true))
                .await
                .unwrap(),
            1
        );
        let neigh = a2.sh(&["ip", "neigh", "show", "dev", "flannel.1"]);
        assert!(
            has(&neigh, &format!("10.244.2.0 lladdr {new_mac} PERMANENT")),
            "{neigh}"
        );
        let fdb = a2.sh(&["bridge", "fdb", "show", "dev", "flannel.1"]);
        assert!(
            has(&fdb, &format!("{new_mac} dst 192.168.50.2 self permanent")),
            "{fdb}"
        );
        assert!(!fdb.contains(&mac_of(&info_b, false)), "old MAC left in the FDB: {fdb}");

        // Unusable backend data (another VNI): the peer is skipped; with an
        // incomplete set nothing is removed either.
        let mut bad = info_b2.clone();
        bad.backend_data = Some(super::backend_data(9, new_mac.parse().unwrap()));
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &bad, false))], false))
                .await
                .unwrap(),
            0
        );
        assert!(a2
            .sh(&["ip", "route"])
            .lines()
            .any(|l| l.starts_with("10.244.2.0/24 nhid") && l.contains("via 10.244.2.0 dev flannel.1")));
    });
    assert!(a.ping("10.244.1.1", "10.244.2.1") && b.ping("10.244.2.1", "10.244.1.1"));
}

#[test]
fn vxlan_adopts_a_compatible_device_and_recreates_an_incompatible_one() {
    if !privileged("backend::vxlan::vxlan_adopts_a_compatible_device_and_recreates_an_incompatible_one") {
        return;
    }
    let lab = Lab::new("flv-adopt");
    let cfg = config(r#"{"Type":"vxlan","VNI":1}"#, false);
    let a = lab.a.path();
    a.sh(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        "02:aa:aa:aa:aa:aa",
        "mtu",
        "1400",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "ul",
        "local",
        "192.168.50.1",
        "dstport",
        "0",
        "nolearning",
    ]);
    let c = cfg.clone();
    let info = lab.a.ns.run(move || async move { start(&c, 1, false).await.1 });
    // MAC and MTU kept; the lease still reports underlay - 50.
    assert_eq!(mac_of(&info, false), "02:aa:aa:aa:aa:aa");
    assert!(a.sh(&["ip", "link", "show", "flannel.1"]).contains("mtu 1400"));
    assert_eq!(info.mtu, 1450);

    a.sh(&["ip", "link", "del", "flannel.1"]);
    a.sh(&[
        "ip",
        "link",
        "add",
        "flannel.1",
        "address",
        "02:aa:aa:aa:aa:aa",
        "type",
        "vxlan",
        "id",
        "2",
        "dev",
        "ul",
        "local",
        "192.168.50.1",
        "dstport",
        "0",
    ]);
    let info = lab.a.ns.run(move || async move { start(&cfg, 1, false).await.1 });
    assert_ne!(mac_of(&info, false), "02:aa:aa:aa:aa:aa");
    let link = a.sh(&["ip", "-d", "link", "show", "flannel.1"]);
    assert!(link.contains("vxlan id 1 ") && link.contains("mtu 1450"), "{link}");
}
