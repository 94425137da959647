//! The host-gw backend: the NAT refusal (unprivileged), and routes between two
//! namespaces playing two nodes with real traffic (privileged).

use super::HostGwBackend;
use crate::backend::{Backend, BackendError, BackendInfo};
use crate::config::NetworkConfig;
use crate::netlink::lab::{config, lab_ext, lease, peers, Lab, NsPath};
use crate::netlink::testutil::privileged;
use crate::netlink::ExternalInterface;

#[tokio::test]
async fn refuses_a_public_ip_that_is_not_the_interface_ip() {
    let cfg = config(r#"{"Type":"host-gw"}"#, false);
    let ext = ExternalInterface {
        name: "eth0".into(),
        index: 2,
        mtu: 1500,
        iface_addr: Some("10.0.0.5".parse().unwrap()),
        iface_v6_addr: None,
        ext_addr: Some("203.0.113.5".parse().unwrap()),
        ext_v6_addr: None,
    };
    let mut be = HostGwBackend::new(&cfg).unwrap();
    match be.prepare(&ext, &cfg).await {
        Err(BackendError::Unsupported(m)) => assert_eq!(
            m,
            "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend"
        ),
        other => panic!("{other:?}"),
    }
}

async fn start(cfg: &NetworkConfig, n: u8) -> (HostGwBackend, BackendInfo) {
    let ext = lab_ext(
        format!("192.168.50.{n}").parse().ok(),
        format!("fd50::{n}").parse().ok(),
    )
    .await;
    let mut be = HostGwBackend::new(cfg).unwrap();
    let info = be.prepare(&ext, cfg).await.unwrap();
    be.set_own_lease(&lease(n, &info, true)).await.unwrap();
    (be, info)
}

fn routes(p: &NsPath) -> String {
    p.sh(&["ip", "route"]) + &p.sh(&["ip", "-6", "route"])
}

#[test]
fn hostgw_routes_traffic_and_reconcile() {
    if !privileged("backend::hostgw::hostgw_routes_traffic_and_reconcile") {
        return;
    }
    let lab = Lab::new("flh");
    let cfg = config(r#"{"Type":"host-gw"}"#, true);
    let c = cfg.clone();
    let info_a = lab.a.ns.run(move || async move {
        let (mut be, info) = start(&c, 1).await;
        assert_eq!(
            info,
            BackendInfo {
                backend_type: "host-gw".into(),
                backend_data: None,
                backend_v6_data: None,
                mtu: 1500
            }
        );
        // Before B has a lease there is nothing to route to.
        assert_eq!(be.reconcile(&peers(&[], true)).await.unwrap(), 0);
        info
    });
    let c = cfg.clone();
    let ia = info_a.clone();
    let info_b = lab.b.ns.run(move || async move {
        let (mut be, info) = start(&c, 2).await;
        assert_eq!(
            be.reconcile(&peers(&[("a", &lease(1, &ia, true))], true))
                .await
                .unwrap(),
            1
        );
        info
    });
    let (a, b) = (lab.a.path(), lab.b.path());
    lab.a.ns.run(move || async move {
        let lb = lease(2, &info_b, true);
        let (mut be, _) = start(&cfg, 1).await;
        assert_eq!(be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap(), 1);
        let r = routes(&a);
        assert!(r.contains("10.244.2.0/24 via 192.168.50.2 dev ul proto 102"), "{r}");
        assert!(
            r.contains("fd10:0:0:2::/64 via fd50::2 dev ul proto 102 metric 1024"),
            "{r}"
        );
        assert!(a.ping("10.244.1.1", "10.244.2.1") && b.ping("10.244.2.1", "10.244.1.1"));
        assert!(a.ping("fd10:0:0:1::1", "fd10:0:0:2::1") && b.ping("fd10:0:0:2::1", "fd10:0:0:1::1"));

        // Again, and after a restart: nothing changes.
        let before = routes(&a);
        let monitor = a.monitor();
        be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap();
        let (mut be, _) = start(&cfg, 1).await;
        be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap();
        let events = monitor.stop();
        assert!(!events.contains("10.244.") && !events.contains("fd10:"), "{events}");
        assert_eq!(routes(&a), before);

        // Upstream's route (proto boot) is adopted; a foreign route in the way is replaced.
        a.sh(&["ip", "route", "del", "10.244.2.0/24"]);
        a.sh(&[
            "ip",
            "route",
            "add",
            "10.244.2.0/24",
            "via",
            "192.168.50.2",
            "dev",
            "ul",
        ]);
        a.sh(&[
            "ip",
            "-6",
            "route",
            "replace",
            "fd10:0:0:2::/64",
            "via",
            "fd50::99",
            "dev",
            "ul",
            "proto",
            "static",
        ]);
        be.reconcile(&peers(&[("b", &lb)], true)).await.unwrap();
        assert_eq!(routes(&a), before);

        // Foreign routes stay; ours go only once the set is complete.
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
        a.sh(&[
            "ip",
            "route",
            "add",
            "10.244.7.0/24",
            "via",
            "192.168.50.7",
            "dev",
            "ul",
            "proto",
            "102",
        ]);
        be.reconcile(&peers(&[], false)).await.unwrap();
        let r = routes(&a);
        assert!(
            r.contains("10.244.2.0/24") && r.contains("fd10:0:0:2::/64") && r.contains("10.244.7.0/24"),
            "{r}"
        );
        assert_eq!(be.reconcile(&peers(&[], true)).await.unwrap(), 0);
        let r = routes(&a);
        assert!(
            !r.contains("10.244.2.0/24") && !r.contains("fd10:0:0:2::/64") && !r.contains("10.244.7.0/24"),
            "{r}"
        );
        assert!(
            r.contains("10.99.0.0/24 via 192.168.50.254")
                && r.contains("10.244.99.0/24 via 192.168.50.254 dev ul proto static"),
            "{r}"
        );
        assert!(!a.ping("10.244.1.1", "10.244.2.1"));

        // A peer that is not on our link is reported, not retried as an error.
        let mut far = lease(3, &info_b, false);
        far.attrs.public_ip = "192.168.77.3".parse().unwrap();
        assert_eq!(
            be.reconcile(&peers(&[("b", &lb), ("far", &far)], true)).await.unwrap(),
            1
        );
        assert!(!routes(&a).contains("10.244.3.0/24"));
    });
}
