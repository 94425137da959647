//! Privileged: IPv4 peer routes through nexthop objects: what is created, replaced,
//! adopted after a restart, collected and left alone, and the plain-route fallback.

use super::ebpf::EbpfSettings;
use super::netns_tests::{setup, snapshot, start};
use super::nexthops::nexthop_id;
use super::VxlanBackend;
use crate::backend::vxlan::config::backend_data;
use crate::backend::Backend;
use crate::netlink::lab::{config, lab_ext, lease, peers, Lab};
use crate::netlink::testutil::privileged;

/// The id flannel derives for a peer subnet's gateway, as text for ip(8).
fn id(gw: &str) -> String {
    nexthop_id(gw.parse().unwrap()).unwrap().to_string()
}

#[test]
fn nexthops_replace_plain_routes_are_adopted_collected_and_spare_foreign_objects() {
    if !privileged("backend::vxlan::nexthops_replace_plain_routes_are_adopted_collected_and_spare_foreign_objects") {
        return;
    }
    let lab = Lab::new("flv-nh");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (_, info_b) = setup(&lab, &cfg, false);
    let a = lab.a.path();
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;
        let lb = lease(2, &info_b, false);
        // Peer c (10.244.3.0/24) exists only in the store: enough for its entries.
        let mut lc = lease(3, &info_b, false);
        lc.attrs.backend_data = Some(backend_data(1, "02:00:00:00:00:03".parse().unwrap()));
        let (idb, idc, id7) = (id("10.244.2.0"), id("10.244.3.0"), id("10.244.7.0"));
        // What an older flannel-rs or upstream flanneld left: a plain route to b.
        a.sh(&[
            "ip",
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "10.244.2.0",
            "dev",
            "flannel.1",
            "onlink",
        ]);
        // Ours, stale: an object and its route for a peer that is gone.
        a.sh(&[
            "ip",
            "nexthop",
            "add",
            "id",
            &id7,
            "via",
            "10.244.7.0",
            "dev",
            "flannel.1",
            "onlink",
            "proto",
            "102",
        ]);
        a.sh(&["ip", "route", "add", "10.244.7.0/24", "nhid", &id7, "proto", "102"]);
        // Someone else's object at c's id.
        a.sh(&[
            "ip",
            "nexthop",
            "add",
            "id",
            &idc,
            "via",
            "192.168.50.254",
            "dev",
            "ul",
            "proto",
            "static",
        ]);
        let foreign = a.sh(&["ip", "nexthop", "show", "id", &idc]);

        assert_eq!(be.reconcile(&peers(&[("b", &lb), ("c", &lc)], true)).await.unwrap(), 2);
        // b: one route, through its object, replacing the plain one.
        let rb = a.sh(&["ip", "route", "show", "10.244.2.0/24"]);
        assert_eq!(rb.lines().count(), 1, "{rb}");
        assert!(
            rb.starts_with(&format!(
                "10.244.2.0/24 nhid {idb} via 10.244.2.0 dev flannel.1 proto 102"
            )),
            "{rb}"
        );
        let nb = a.sh(&["ip", "nexthop", "show", "id", &idb]);
        assert!(
            nb.contains("via 10.244.2.0 dev flannel.1") && nb.contains("proto 102") && nb.contains("onlink"),
            "{nb}"
        );
        // c: the foreign object untouched, c on a plain route, and the conflict reported.
        assert_eq!(a.sh(&["ip", "nexthop", "show", "id", &idc]), foreign);
        let rc = a.sh(&["ip", "route", "show", "10.244.3.0/24"]);
        assert_eq!(
            rc.trim(),
            "10.244.3.0/24 via 10.244.3.0 dev flannel.1 proto 102 onlink",
            "{rc}"
        );
        let status = be.status();
        assert_eq!(status["nexthops"]["routes"], "nexthop", "{status}");
        assert_eq!(
            status["nexthops"]["foreign_ids"],
            serde_json::json!([idc.parse::<u32>().unwrap()])
        );
        // The stale object and its route are gone.
        assert!(a.try_sh(&["ip", "nexthop", "show", "id", &id7]).is_err());
        assert!(a.sh(&["ip", "route", "show", "10.244.7.0/24"]).is_empty());
        assert!(a.ping("10.244.1.1", "10.244.2.1"), "A -> B through the nexthop object");

        // A restarted agent adopts its objects: not one change reaches the kernel.
        let before = snapshot(&a);
        let monitor = a.monitor();
        drop(be);
        let (mut be, _) = start(&cfg, 1, false).await;
        assert_eq!(be.reconcile(&peers(&[("b", &lb), ("c", &lc)], true)).await.unwrap(), 2);
        let events = monitor.stop();
        let ours: Vec<&str> = events
            .lines()
            .filter(|l| (l.contains("flannel") || l.contains("10.244.")) && !l.contains("fe80::"))
            .collect();
        assert!(ours.is_empty(), "{ours:#?}");
        assert_eq!(snapshot(&a), before);

        // Upstream flanneld taking over rewrites the route the plain way; the unused
        // object is harmless, and flannel-rs coming back moves the route onto it again.
        a.sh(&[
            "ip",
            "route",
            "replace",
            "10.244.2.0/24",
            "via",
            "10.244.2.0",
            "dev",
            "flannel.1",
            "onlink",
        ]);
        assert!(a.ping("10.244.1.1", "10.244.2.1"), "A -> B on upstream's plain route");
        be.reconcile(&peers(&[("b", &lb), ("c", &lc)], true)).await.unwrap();
        assert_eq!(snapshot(&a), before);

        // b leaves: its route, then its object, go.
        assert_eq!(be.reconcile(&peers(&[("c", &lc)], true)).await.unwrap(), 1);
        assert!(a.try_sh(&["ip", "nexthop", "show", "id", &idb]).is_err());
        assert!(a.sh(&["ip", "route", "show", "10.244.2.0/24"]).is_empty());
        assert_eq!(a.sh(&["ip", "nexthop", "show", "id", &idc]), foreign);
    });
}

#[test]
fn without_nexthop_objects_routes_are_plain() {
    if !privileged("backend::vxlan::without_nexthop_objects_routes_are_plain") {
        return;
    }
    let lab = Lab::new("flv-nh0");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (_, info_b) = setup(&lab, &cfg, false);
    let a = lab.a.path();
    lab.a.ns.run(move || async move {
        // First with nexthop objects, as an agent on a newer kernel left it.
        let (mut be, _) = start(&cfg, 1, false).await;
        let lb = lease(2, &info_b, false);
        be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap();
        assert!(a.sh(&["ip", "route", "show", "10.244.2.0/24"]).contains("nhid"));
        drop(be);

        // The probe hook: as on a kernel before 5.3.
        let settings = EbpfSettings {
            pretend_no_nexthops: true,
            ..EbpfSettings::default()
        };
        let mut be = VxlanBackend::with_settings(&cfg, settings).unwrap();
        let ext = lab_ext("192.168.50.1".parse().ok(), None).await;
        let info = be.prepare(&ext, &cfg).await.unwrap();
        be.set_own_lease(&lease(1, &info, false)).await.unwrap();
        assert_eq!(be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap(), 1);
        let routes = a.sh(&["ip", "route", "show", "10.244.2.0/24"]);
        assert_eq!(
            routes.trim(),
            "10.244.2.0/24 via 10.244.2.0 dev flannel.1 proto 102 onlink"
        );
        let status = be.status();
        assert_eq!(status["nexthops"]["routes"], "plain", "{status}");
        assert!(
            status["nexthops"]["reason"]
                .as_str()
                .unwrap()
                .contains("FLANNEL_PRETEND_NO_NEXTHOPS"),
            "{status}"
        );
        assert!(a.ping("10.244.1.1", "10.244.2.1"), "A -> B on the plain route");
    });
}
