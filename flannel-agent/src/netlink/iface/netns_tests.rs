//! Privileged: interface selection against a real kernel, in a throw-away netns.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{IfaceError, IfaceSelection};
use crate::netlink::testutil::{privileged, TestNetns};
use crate::netlink::{DefaultRoute, Netlink};

fn v4(s: &str) -> Option<Ipv4Addr> {
    Some(s.parse().unwrap())
}

fn v6(s: &str) -> Option<Ipv6Addr> {
    Some(s.parse().unwrap())
}

/// A veth pair `flt-a`/`flt-b` (both ends in the namespace) with addresses in
/// 198.18.0.0/15 and 2001:db8::/32, default routes through `flt-a` and a route to
/// 198.19.200.0/24 through `flt-b`.
fn lab() -> TestNetns {
    let ns = TestNetns::new("flt-iface");
    ns.ip(&["link", "add", "flt-a", "type", "veth", "peer", "name", "flt-b"]);
    ns.ip(&["link", "set", "flt-b", "mtu", "1400"]);
    for dev in ["lo", "flt-a", "flt-b"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "flt-a"]);
    ns.ip(&["addr", "add", "198.18.1.1/24", "dev", "flt-b"]);
    ns.ip(&["addr", "add", "198.18.1.2/24", "dev", "flt-b"]);
    // nodad: a tentative address is (rightly) never selected, and DAD takes a second.
    ns.ip(&["-6", "addr", "add", "2001:db8:a::1/64", "dev", "flt-a", "nodad"]);
    ns.ip(&["-6", "addr", "add", "2001:db8:b::1/64", "dev", "flt-b", "nodad"]);
    ns.ip(&["route", "add", "default", "via", "198.18.0.254", "dev", "flt-a"]);
    ns.ip(&["-6", "route", "add", "default", "via", "2001:db8:a::fe", "dev", "flt-a"]);
    ns.ip(&["route", "add", "198.19.200.0/24", "via", "198.18.1.254", "dev", "flt-b"]);
    ns
}

fn sel(ipv4: bool, ipv6: bool) -> IfaceSelection {
    IfaceSelection {
        ipv4,
        ipv6,
        ..Default::default()
    }
}

#[test]
fn selects_the_external_interface_in_a_netns() {
    if !privileged("netlink::iface::selects_the_external_interface_in_a_netns") {
        return;
    }
    let ns = lab();
    ns.run(|| async {
        let nl = Netlink::new().expect("netlink socket");
        let links = nl.links().await.unwrap();
        let index_of = |name: &str| links.iter().find(|l| l.name == name).unwrap().index;
        let (a, b) = (index_of("flt-a"), index_of("flt-b"));

        assert_eq!(nl.default_route(false).await.unwrap(), DefaultRoute::Via(a));
        assert_eq!(nl.default_route(true).await.unwrap(), DefaultRoute::Via(a));

        // Default route, dual stack.
        let ext = nl.select_external_interface(&sel(true, true)).await.unwrap();
        assert_eq!((ext.name.as_str(), ext.index, ext.mtu), ("flt-a", a, 1500));
        assert_eq!(
            (ext.iface_addr, ext.iface_v6_addr),
            (v4("198.18.0.1"), v6("2001:db8:a::1"))
        );
        assert_eq!((ext.ext_addr, ext.ext_v6_addr), (ext.iface_addr, ext.iface_v6_addr));

        // --iface by name: the first (primary) address; MTU from the link.
        let mut s = sel(true, false);
        s.ifaces = vec!["nope0".into(), "flt-b".into()];
        let ext = nl.select_external_interface(&s).await.unwrap();
        assert_eq!(
            (ext.name.as_str(), ext.index, ext.mtu, ext.iface_addr),
            ("flt-b", b, 1400, v4("198.18.1.1"))
        );

        // --iface by address.
        s.ifaces = vec!["198.18.1.2".into()];
        assert_eq!(
            nl.select_external_interface(&s).await.unwrap().iface_addr,
            v4("198.18.1.2")
        );

        // --iface-regex on addresses, then on names.
        s.ifaces.clear();
        s.iface_regex = vec![r"^198\.18\.1\.2$".into()];
        let ext = nl.select_external_interface(&s).await.unwrap();
        assert_eq!((ext.name.as_str(), ext.iface_addr), ("flt-b", v4("198.18.1.2")));
        s.iface_regex = vec!["^flt-a$".into()];
        assert_eq!(nl.select_external_interface(&s).await.unwrap().name, "flt-a");

        // --iface-can-reach through RTM_GETROUTE; the source is the route's.
        s.iface_regex.clear();
        s.iface_can_reach = Some(IpAddr::from([198, 19, 200, 7]));
        let ext = nl.select_external_interface(&s).await.unwrap();
        assert_eq!((ext.name.as_str(), ext.iface_addr), ("flt-b", v4("198.18.1.1")));
        let lookup = nl.route_get(IpAddr::from([198, 19, 200, 7])).await.unwrap();
        assert_eq!((lookup.oif, lookup.src), (Some(b), Some(IpAddr::from([198, 18, 1, 1]))));

        // --public-ip without interface flags must be local.
        let mut s = sel(true, false);
        s.public_ip = v4("198.18.1.2");
        let ext = nl.select_external_interface(&s).await.unwrap();
        assert_eq!((ext.name.as_str(), ext.ext_addr), ("flt-b", v4("198.18.1.2")));
        s.public_ip = v4("192.0.2.1");
        let err = nl.select_external_interface(&s).await.unwrap_err();
        let IfaceError::NoValidInterface(inner) = &err else {
            panic!("{err}");
        };
        assert!(matches!(**inner, IfaceError::NoInterfaceWithIp { .. }), "{err}");
    });

    // Dual stack needs both default routes on one interface.
    ns.ip(&[
        "-6",
        "route",
        "replace",
        "default",
        "via",
        "2001:db8:b::fe",
        "dev",
        "flt-b",
    ]);
    ns.run(|| async {
        let nl = Netlink::new().expect("netlink socket");
        let err = nl.select_external_interface(&sel(true, true)).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "Failed to find any valid interface to use: v6 default route interface flt-b must be the same \
             with v4 default route interface flt-a (fix the routes, or choose the interface with --iface)"
        );
        // IPv6 alone is fine.
        assert_eq!(
            nl.select_external_interface(&sel(false, true)).await.unwrap().name,
            "flt-b"
        );
    });

    ns.ip(&["route", "del", "default"]);
    ns.run(|| async {
        let nl = Netlink::new().expect("netlink socket");
        assert_eq!(nl.default_route(false).await.unwrap(), DefaultRoute::Missing);
        let err = nl.select_external_interface(&sel(true, false)).await.unwrap_err();
        assert!(err.to_string().starts_with(
            "Failed to find any valid interface to use: failed to get default interface: unable to find default route"
        ));
        // An unreachable target is an answer, not a netlink fault.
        let mut s = sel(true, false);
        s.iface_can_reach = Some(IpAddr::from([203, 0, 113, 1]));
        let err = nl.select_external_interface(&s).await.unwrap_err().to_string();
        assert!(
            err.contains("couldn't lookup route to 203.0.113.1: Network is unreachable"),
            "{err}"
        );
    });
}
