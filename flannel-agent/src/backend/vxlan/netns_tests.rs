//! Privileged: the vxlan backend between two namespaces playing two nodes (see
//! `netlink::lab`), asserted with ip(8)/bridge(8) and real traffic.

use super::VxlanBackend;
use crate::backend::{Backend, BackendInfo};
use crate::config::NetworkConfig;
use crate::netlink::lab::{config, lab_ext, lease, peers, Lab, NsPath};
use crate::netlink::testutil::privileged;

/// A fresh backend instance in the calling namespace: prepare, own lease (node `n`).
pub(super) async fn start(cfg: &NetworkConfig, n: u8, v6: bool) -> (VxlanBackend, BackendInfo) {
    let ul4 = format!("192.168.50.{n}").parse().ok();
    let ul6 = v6.then(|| format!("fd50::{n}").parse().unwrap());
    let ext = lab_ext(ul4, ul6).await;
    let mut be = VxlanBackend::new(cfg).unwrap();
    let info = be.prepare(&ext, cfg).await.unwrap();
    be.set_own_lease(&lease(n, &info, v6)).await.unwrap();
    (be, info)
}

/// Prepares node A (so its MAC is known) and programs node B with A as its peer.
pub(super) fn setup(lab: &Lab, cfg: &NetworkConfig, v6: bool) -> (BackendInfo, BackendInfo) {
    let c = cfg.clone();
    let info_a = lab.a.ns.run(move || async move { start(&c, 1, v6).await.1 });
    let (c, ia) = (cfg.clone(), info_a.clone());
    let info_b = lab.b.ns.run(move || async move {
        let (mut be, info) = start(&c, 2, v6).await;
        assert_eq!(
            be.reconcile(&peers(&[("a", &lease(1, &ia, v6))], true)).await.unwrap(),
            1
        );
        info
    });
    (info_a, info_b)
}

pub(super) fn mac_of(info: &BackendInfo, v6: bool) -> String {
    let d = if v6 { &info.backend_v6_data } else { &info.backend_data };
    d.as_ref().unwrap()["VtepMAC"].as_str().unwrap().to_string()
}

/// What the backend owns or touches in a node, for "nothing changed" checks.
pub(super) fn snapshot(p: &NsPath) -> String {
    let mut s = String::new();
    for args in [
        &["ip", "-d", "link", "show", "type", "vxlan"][..],
        &["ip", "-br", "addr", "show", "type", "vxlan"],
        &["ip", "neigh", "show", "nud", "permanent"],
        &["ip", "-6", "neigh", "show", "nud", "permanent"],
        &["bridge", "fdb", "show"],
        &["ip", "route", "show", "table", "main"],
        &["ip", "-6", "route", "show", "table", "main"],
        &["ip", "nexthop", "show"],
    ] {
        s += &p.sh(args);
    }
    s
}

pub(super) fn has(out: &str, needle: &str) -> bool {
    out.lines().any(|l| l.contains(needle))
}

#[test]
fn vxlan_v4_traffic_flows_both_ways_and_restart_changes_nothing() {
    if !privileged("backend::vxlan::vxlan_v4_traffic_flows_both_ways_and_restart_changes_nothing") {
        return;
    }
    let lab = Lab::new("flv-v4");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (info_a, info_b) = setup(&lab, &cfg, false);
    assert_eq!(info_a.mtu, 1450);
    assert_eq!(
        info_a.backend_data.as_ref().unwrap().to_string(),
        format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, mac_of(&info_a, false))
    );
    let (a, b) = (lab.a.path(), lab.b.path());
    let (mac_a, mac_b) = (mac_of(&info_a, false), mac_of(&info_b, false));
    let c = cfg.clone();
    lab.a.ns.run(move || async move {
        // A new instance adopts the device prepared before: same MAC.
        let (mut be, info) = start(&c, 1, false).await;
        assert_eq!(info, info_a);
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, false))], true))
                .await
                .unwrap(),
            1
        );

        let link = a.sh(&["ip", "-d", "link", "show", "flannel.1"]);
        for want in [
            "mtu 1450",
            "vxlan id 1 local 192.168.50.1 dev ul",
            "dstport 8472",
            "nolearning",
            &mac_a,
            "UP",
        ] {
            assert!(link.contains(want), "{want:?} not in {link}");
        }
        assert!(
            !link.contains("l2miss") && !link.contains("l3miss") && !link.contains("gbp"),
            "{link}"
        );
        assert_eq!(
            a.sh(&["cat", "/proc/sys/net/ipv6/conf/flannel.1/accept_ra"]).trim(),
            "0"
        );
        assert!(has(&a.sh(&["ip", "-br", "addr", "show", "flannel.1"]), "10.244.1.0/32"));
        let neigh = a.sh(&["ip", "neigh", "show", "dev", "flannel.1"]);
        assert!(has(&neigh, &format!("10.244.2.0 lladdr {mac_b} PERMANENT")), "{neigh}");
        let fdb = a.sh(&["bridge", "fdb", "show", "dev", "flannel.1"]);
        assert!(has(&fdb, &format!("{mac_b} dst 192.168.50.2 self permanent")), "{fdb}");
        let routes = a.sh(&["ip", "route"]);
        assert!(
            has(
                &routes,
                &format!(
                    "10.244.2.0/24 nhid {} via 10.244.2.0 dev flannel.1 proto 102 onlink",
                    super::nexthops::nexthop_id("10.244.2.0".parse().unwrap()).unwrap()
                )
            ),
            "{routes}"
        );

        assert!(a.ping("10.244.1.1", "10.244.2.1"), "A -> B over VXLAN");
        assert!(b.ping("10.244.2.1", "10.244.1.1"), "B -> A over VXLAN");

        // Reconciling again, and a restart (a new instance adopting everything),
        // change nothing.
        let before = snapshot(&a);
        let monitor = a.monitor();
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, false))], true))
                .await
                .unwrap(),
            1
        );
        drop(be);
        let (mut be, info) = start(&c, 1, false).await;
        assert_eq!(info, info_a);
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, false))], true))
                .await
                .unwrap(),
            1
        );
        // Not one change reached the kernel. (The kernel's own work goes on: ARP
        // entries on the underlay age, IPv6 DAD finishes on link-local addresses.)
        let events = monitor.stop();
        let ours: Vec<&str> = events
            .lines()
            .filter(|l| (l.contains("flannel") || l.contains("10.244.")) && !l.contains("fe80::"))
            .collect();
        assert!(ours.is_empty(), "{ours:#?}");
        assert_eq!(snapshot(&a), before);
    });
}

#[test]
fn vxlan_restores_a_deleted_device_with_the_same_mac_and_all_entries() {
    if !privileged("backend::vxlan::vxlan_restores_a_deleted_device_with_the_same_mac_and_all_entries") {
        return;
    }
    let lab = Lab::new("flv-del");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    let (info_a, info_b) = setup(&lab, &cfg, false);
    let (a, b) = (lab.a.path(), lab.b.path());
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;
        let set = peers(&[("b", &lease(2, &info_b, false))], true);
        be.reconcile(&set).await.unwrap();
        let before = snapshot(&a);
        a.sh(&["ip", "link", "del", "flannel.1"]);
        assert!(!a.ping("10.244.1.1", "10.244.2.1"));
        let monitor = a.monitor();
        assert_eq!(be.reconcile(&set).await.unwrap(), 1);
        // (Also shows that the monitor of the restart test does see changes.)
        let events = monitor.stop();
        assert!(
            events.contains("flannel.1") && events.contains("10.244.2.0/24"),
            "{events}"
        );
        let link = a.sh(&["ip", "-d", "link", "show", "flannel.1"]);
        assert!(link.contains(&mac_of(&info_a, false)) && link.contains("UP"), "{link}");
        // Same objects; only the interface index differs.
        let strip = |s: &str| {
            s.lines()
                .map(|l| l.split_once(": ").map_or(l, |(_, r)| r).to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(strip(&snapshot(&a)), strip(&before));
        assert!(a.ping("10.244.1.1", "10.244.2.1") && b.ping("10.244.2.1", "10.244.1.1"));

        // A MAC changed behind our back (udev, an operator) is put back.
        a.sh(&["ip", "link", "set", "flannel.1", "address", "02:00:00:00:99:99"]);
        be.reconcile(&set).await.unwrap();
        assert!(a
            .sh(&["ip", "link", "show", "flannel.1"])
            .contains(&mac_of(&info_a, false)));
    });
}

#[test]
fn vxlan_ipv6_and_dual_stack_between_two_nodes() {
    if !privileged("backend::vxlan::vxlan_ipv6_and_dual_stack_between_two_nodes") {
        return;
    }
    let lab = Lab::new("flv-v6");
    let cfg = config(r#"{"Type":"vxlan","VNI":7,"Port":4789}"#, true);
    let (info_a, info_b) = setup(&lab, &cfg, true);
    assert_ne!(mac_of(&info_a, true), mac_of(&info_a, false));
    let (a, b) = (lab.a.path(), lab.b.path());
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, true).await;
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, true))], true))
                .await
                .unwrap(),
            1
        );
        let link = a.sh(&["ip", "-d", "link", "show", "flannel-v6.7"]);
        for want in [
            "vxlan id 7 local fd50::1 dev ul",
            "dstport 4789",
            &mac_of(&info_a, true),
        ] {
            assert!(link.contains(want), "{want:?} not in {link}");
        }
        assert!(has(
            &a.sh(&["ip", "-br", "addr", "show", "flannel-v6.7"]),
            "fd10:0:0:1::/128"
        ));
        let mac_b6 = mac_of(&info_b, true);
        assert!(has(
            &a.sh(&["ip", "-6", "neigh", "show", "dev", "flannel-v6.7"]),
            &format!("fd10:0:0:2:: lladdr {mac_b6} PERMANENT")
        ));
        assert!(has(
            &a.sh(&["bridge", "fdb", "show", "dev", "flannel-v6.7"]),
            &format!("{mac_b6} dst fd50::2 self permanent")
        ));
        let routes = a.sh(&["ip", "-6", "route"]);
        assert!(
            has(
                &routes,
                "fd10:0:0:2::/64 via fd10:0:0:2:: dev flannel-v6.7 proto 102 metric 1024 onlink"
            ),
            "{routes}"
        );
        assert!(a.ping("fd10:0:0:1::1", "fd10:0:0:2::1"), "A -> B over IPv6 VXLAN");
        assert!(b.ping("fd10:0:0:2::1", "fd10:0:0:1::1"), "B -> A over IPv6 VXLAN");
        assert!(a.ping("10.244.1.1", "10.244.2.1") && b.ping("10.244.2.1", "10.244.1.1"));

        let before = snapshot(&a);
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, true))], true))
                .await
                .unwrap(),
            1
        );
        assert_eq!(snapshot(&a), before);
        assert_eq!(be.reconcile(&peers(&[], true)).await.unwrap(), 0);
        assert!(!a
            .sh(&["bridge", "fdb", "show", "dev", "flannel-v6.7"])
            .contains(&mac_b6));
        assert!(!a.ping("fd10:0:0:1::1", "fd10:0:0:2::1"));
    });
}

#[test]
fn vxlan_direct_routing_to_on_link_peers() {
    if !privileged("backend::vxlan::vxlan_direct_routing_to_on_link_peers") {
        return;
    }
    let lab = Lab::new("flv-dr");
    let cfg = config(r#"{"Type":"vxlan","DirectRouting":true}"#, false);
    let (_, info_b) = setup(&lab, &cfg, false);
    let (a, b) = (lab.a.path(), lab.b.path());
    lab.a.ns.run(move || async move {
        let (mut be, _) = start(&cfg, 1, false).await;
        assert_eq!(
            be.reconcile(&peers(&[("b", &lease(2, &info_b, false))], true))
                .await
                .unwrap(),
            1
        );
        let routes = a.sh(&["ip", "route"]);
        assert!(
            has(&routes, "10.244.2.0/24 via 192.168.50.2 dev ul proto 102"),
            "{routes}"
        );
        assert!(a.sh(&["ip", "neigh", "show", "dev", "flannel.1"]).trim().is_empty());
        assert!(!a.sh(&["bridge", "fdb", "show", "dev", "flannel.1"]).contains("dst"));
        assert!(a.ping("10.244.1.1", "10.244.2.1") && b.ping("10.244.2.1", "10.244.1.1"));
        // Peer gone from a complete set: the direct route goes too.
        be.reconcile(&peers(&[], true)).await.unwrap();
        assert!(!a.sh(&["ip", "route"]).contains("10.244.2.0/24"));
    });
}

/// Makes `/proc/sys` read-only for the calling thread, as in an unprivileged container: a
/// mount namespace of its own (a per-thread attribute, like the network namespace) with a
/// read-only bind mount over `/proc/sys`.
fn read_only_proc_sys() {
    let null = std::ptr::null();
    // SAFETY: the paths are NUL-terminated literals; the other pointers may be null for
    // these calls. They change only this thread's mount namespace, made here.
    unsafe {
        assert_eq!(
            libc::unshare(libc::CLONE_NEWNS),
            0,
            "unshare: {}",
            std::io::Error::last_os_error()
        );
        let flags = libc::MS_REC | libc::MS_PRIVATE;
        assert_eq!(libc::mount(null, c"/".as_ptr(), null, flags, std::ptr::null()), 0);
        let dir = c"/proc/sys".as_ptr();
        assert_eq!(libc::mount(dir, dir, null, libc::MS_BIND, std::ptr::null()), 0);
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY;
        assert_eq!(
            libc::mount(null, dir, null, flags, std::ptr::null()),
            0,
            "{}",
            std::io::Error::last_os_error()
        );
    }
}

#[test]
fn a_read_only_proc_sys_does_not_stop_the_backend() {
    if !privileged("backend::vxlan::a_read_only_proc_sys_does_not_stop_the_backend") {
        return;
    }
    let lab = Lab::new("flv-ro");
    let cfg = config(r#"{"Type":"vxlan"}"#, false);
    lab.a.ns.run(move || async move {
        read_only_proc_sys();
        assert!(
            std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").is_err(),
            "still writable"
        );
        // `start` unwraps prepare and the own lease: a fatal accept_ra failure panics here.
        let (_be, info) = start(&cfg, 1, false).await;
        assert_eq!(info.mtu, 1450);
        let ra = std::fs::read_to_string("/proc/sys/net/ipv6/conf/flannel.1/accept_ra").unwrap();
        assert_ne!(
            ra.trim(),
            "0",
            "the sysctl was written after all: the test proves nothing"
        );
    });
}
