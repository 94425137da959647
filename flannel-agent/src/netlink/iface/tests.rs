//! Every selection rule against a fixed host, no root needed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::select::usable;
use super::*;
use crate::netlink::AddrInfo;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn v4(s: &str) -> Option<Ipv4Addr> {
    Some(s.parse().unwrap())
}

fn v6(s: &str) -> Option<Ipv6Addr> {
    Some(s.parse().unwrap())
}

fn perm(s: &str) -> AddrInfo {
    AddrInfo::permanent(ip(s), 24)
}

fn dynamic(s: &str) -> AddrInfo {
    AddrInfo {
        permanent: false,
        ..perm(s)
    }
}

fn link(index: u32, name: &str, mtu: u32, addrs: Vec<AddrInfo>) -> LinkInfo {
    LinkInfo {
        index,
        name: name.into(),
        mtu,
        addrs,
    }
}

/// lo; eth0 (default route, one address per kind); eth1 with every kind of address;
/// ll0 with only link-local addresses; dead0 with MTU 0; v6only.
fn host() -> HostView {
    HostView {
        links: vec![
            link(1, "lo", 65536, vec![perm("127.0.0.1"), perm("::1")]),
            link(
                2,
                "eth0",
                1500,
                vec![perm("10.0.0.5"), perm("2001:db8::5"), perm("fe80::5")],
            ),
            link(
                3,
                "eth1",
                9000,
                vec![
                    dynamic("192.168.1.10"),
                    perm("169.254.3.3"),
                    perm("192.168.1.11"),
                    perm("fe80::3"),
                    AddrInfo {
                        temporary: true,
                        ..dynamic("2001:db8:1::10")
                    },
                    AddrInfo {
                        deprecated: true,
                        ..perm("2001:db8:1::11")
                    },
                    AddrInfo {
                        tentative: true,
                        ..perm("2001:db8:1::12")
                    },
                    dynamic("2001:db8:1::13"),
                ],
            ),
            link(4, "ll0", 1500, vec![perm("169.254.9.9"), perm("fe80::9")]),
            link(5, "dead0", 0, vec![perm("10.9.9.9")]),
            link(6, "v6only", 1500, vec![perm("2001:db8:6::6")]),
        ],
        default_v4: DefaultRoute::Via(2),
        default_v6: DefaultRoute::Via(2),
        can_reach: None,
    }
}

fn sel(ipv4: bool, ipv6: bool) -> IfaceSelection {
    IfaceSelection {
        ipv4,
        ipv6,
        ..Default::default()
    }
}

fn v4_only() -> IfaceSelection {
    sel(true, false)
}

fn ifaces(mut s: IfaceSelection, list: &[&str]) -> IfaceSelection {
    s.ifaces = list.iter().map(|x| x.to_string()).collect();
    s
}

fn regexes(mut s: IfaceSelection, list: &[&str]) -> IfaceSelection {
    s.iface_regex = list.iter().map(|x| x.to_string()).collect();
    s
}

const NO_MATCH: &str = "Failed to find interface to use that matches the interfaces and/or regexes provided";
const CHECK_V4: &str = " (it must be assigned to a local interface; check `ip -4 addr`)";
const CHECK_V6: &str = " (it must be assigned to a local interface; check `ip -6 addr`)";

fn pick(s: &IfaceSelection) -> ExternalInterface {
    select(s, &host()).unwrap_or_else(|e| panic!("{s:?}: {e}"))
}

fn fail(s: &IfaceSelection, h: &HostView) -> String {
    select(s, h)
        .map(|ok| panic!("{s:?}: expected an error, got {ok:?}"))
        .unwrap_err()
        .to_string()
}

#[test]
fn default_route_interface_with_its_best_address() {
    let ext = pick(&v4_only());
    assert_eq!(
        ext,
        ExternalInterface {
            name: "eth0".into(),
            index: 2,
            mtu: 1500,
            iface_addr: v4("10.0.0.5"),
            iface_v6_addr: None,
            ext_addr: v4("10.0.0.5"),
            ext_v6_addr: None,
        }
    );
    let ext = pick(&sel(false, true));
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr, ext.iface_v6_addr),
        ("eth0", None, v6("2001:db8::5"))
    );
    assert_eq!(ext.ext_v6_addr, v6("2001:db8::5"));
    let ext = pick(&sel(true, true));
    assert_eq!((ext.iface_addr, ext.iface_v6_addr), (v4("10.0.0.5"), v6("2001:db8::5")));
}

#[test]
fn default_route_failures_use_upstreams_words() {
    let with = |v4r, v6r| HostView {
        default_v4: v4r,
        default_v6: v6r,
        ..host()
    };
    let prefix = "Failed to find any valid interface to use: ";
    let cases = [
        (
            v4_only(),
            with(DefaultRoute::Missing, DefaultRoute::Via(2)),
            "failed to get default interface: unable to find default route",
        ),
        (
            v4_only(),
            with(DefaultRoute::NoInterface, DefaultRoute::Via(2)),
            "failed to get default interface: found default route but could not determine interface",
        ),
        (
            v4_only(),
            with(DefaultRoute::Via(99), DefaultRoute::Via(2)),
            "failed to get default interface: found default route but could not determine interface",
        ),
        (
            sel(true, true),
            with(DefaultRoute::Via(2), DefaultRoute::Missing),
            "failed to get default v6 interface: unable to find default v6 route",
        ),
        (
            sel(false, true),
            with(DefaultRoute::Via(2), DefaultRoute::NoInterface),
            "failed to get default v6 interface: found default v6 route but could not determine interface",
        ),
        (
            sel(true, true),
            with(DefaultRoute::Via(2), DefaultRoute::Via(3)),
            "v6 default route interface eth1 must be the same with v4 default route interface eth0",
        ),
        (
            v4_only(),
            with(DefaultRoute::Via(6), DefaultRoute::Missing),
            "failed to find IPv4 address for interface v6only",
        ),
        (
            sel(false, true),
            with(DefaultRoute::Missing, DefaultRoute::Via(5)),
            "failed to find IPv6 address for interface dead0",
        ),
    ];
    for (s, h, want) in cases {
        let got = fail(&s, &h);
        assert!(
            got.starts_with(&format!("{prefix}{want}")),
            "got {got:?}, want {want:?}"
        );
    }
    assert!(fail(&sel(false, false), &host()).starts_with("none defined stack"));
}

#[test]
fn address_preference_and_filtering() {
    let h = host();
    // Global before link-local, then permanent before dynamic; kernel order breaks ties.
    assert_eq!(
        usable(&h.links[2], false),
        [ip("192.168.1.11"), ip("192.168.1.10"), ip("169.254.3.3")]
    );
    // Deprecated and tentative are dropped; temporary goes after dynamic.
    assert_eq!(
        usable(&h.links[2], true),
        [ip("2001:db8:1::13"), ip("2001:db8:1::10"), ip("fe80::3")]
    );
    // Loopback is never usable.
    assert!(usable(&h.links[0], false).is_empty() && usable(&h.links[0], true).is_empty());
    let ext = pick(&ifaces(sel(true, true), &["eth1"]));
    assert_eq!(
        (ext.iface_addr, ext.iface_v6_addr),
        (v4("192.168.1.11"), v6("2001:db8:1::13"))
    );
    // Link-local is used when there is nothing else.
    let ext = pick(&ifaces(sel(true, true), &["ll0"]));
    assert_eq!((ext.iface_addr, ext.iface_v6_addr), (v4("169.254.9.9"), v6("fe80::9")));
}

#[test]
fn iface_by_name_or_address_in_order() {
    assert_eq!(pick(&ifaces(v4_only(), &["eth1", "eth0"])).name, "eth1");
    // Unknown name, MTU 0 and a foreign address fail; the next entry is tried.
    let ext = pick(&ifaces(v4_only(), &["nope0", "dead0", "203.0.113.9", "10.0.0.5"]));
    assert_eq!((ext.name.as_str(), ext.iface_addr), ("eth0", v4("10.0.0.5")));
    // The named address is used even if it is not the preferred one.
    let ext = pick(&ifaces(v4_only(), &["192.168.1.10"]));
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr, ext.ext_addr),
        ("eth1", v4("192.168.1.10"), v4("192.168.1.10"))
    );
    // Go's ParseIP().To4() treats a v4-mapped address as IPv4.
    assert_eq!(
        pick(&ifaces(v4_only(), &["::ffff:10.0.0.5"])).iface_addr,
        v4("10.0.0.5")
    );
    // The family of the address must be enabled.
    assert_eq!(
        fail(&ifaces(sel(false, true), &["10.0.0.5"]), &host()),
        format!(
            "{NO_MATCH}: 10.0.0.5: error looking up v6 interface 10.0.0.5: \
             no interface with given IPv6 found{CHECK_V6}"
        )
    );
    assert_eq!(
        fail(&ifaces(v4_only(), &["2001:db8::5", "eth9"]), &host()),
        format!(
            "{NO_MATCH}: 2001:db8::5: error looking up interface 2001:db8::5: \
             no interface with given IP found{CHECK_V4}; \
             eth9: error looking up interface eth9: route ip+net: no such network interface (check `ip link`)"
        )
    );
}

#[test]
fn iface_address_in_dual_stack() {
    // Upstream leaves the IPv6 address empty here; we take the interface's.
    let ext = pick(&ifaces(sel(true, true), &["192.168.1.10"]));
    assert_eq!(
        (ext.iface_addr, ext.iface_v6_addr),
        (v4("192.168.1.10"), v6("2001:db8:1::13"))
    );
    // Upstream crashes on an IPv6 --iface in dual stack without --public-ipv6.
    let ext = pick(&ifaces(sel(true, true), &["2001:db8:1::10"]));
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr, ext.iface_v6_addr),
        ("eth1", v4("192.168.1.11"), v6("2001:db8:1::10"))
    );
    // --public-ipv6 must sit on the same interface, and becomes the interface address.
    let mut s = ifaces(sel(true, true), &["10.0.0.5"]);
    s.public_ipv6 = v6("2001:db8::5");
    let ext = pick(&s);
    assert_eq!(
        (ext.iface_v6_addr, ext.ext_v6_addr),
        (v6("2001:db8::5"), v6("2001:db8::5"))
    );
    let mut s = sel(true, true);
    s.public_ip = v4("10.0.0.5");
    s.public_ipv6 = v6("2001:db8:1::13");
    assert!(fail(&s, &host()).starts_with(
        "Failed to find any valid interface to use: v6 interface eth1 must be the same with v4 interface eth0"
    ));
}

#[test]
fn regex_matches_addresses_before_names() {
    let ext = pick(&regexes(v4_only(), &[r"192\.168\.1\.1[01]"]));
    // The first match in preference order.
    assert_eq!((ext.name.as_str(), ext.iface_addr), ("eth1", v4("192.168.1.11")));
    let ext = pick(&regexes(v4_only(), &["^eth1$"]));
    assert_eq!((ext.name.as_str(), ext.iface_addr), ("eth1", v4("192.168.1.11")));
    // eth0 matches by name, eth1 by address: the address pass runs first.
    assert_eq!(pick(&regexes(v4_only(), &[r"^(eth0|192\.168\.1\.11)$"])).name, "eth1");
    // IPv6-only looks at IPv6 addresses; unusable ones never match.
    assert_eq!(pick(&regexes(sel(false, true), &["^2001:db8:6::"])).name, "v6only");
    assert!(select(&regexes(sel(false, true), &["^2001:db8:1::1[12]$"]), &host()).is_err());
}

#[test]
fn regex_in_dual_stack_needs_both_families() {
    let ext = pick(&regexes(sel(true, true), &[r"^(10\.0\.0\.5|2001:db8::5)$"]));
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr, ext.iface_v6_addr),
        ("eth0", v4("10.0.0.5"), v6("2001:db8::5"))
    );
    // v4 of eth0 and v6 of eth1 match, but no interface has both.
    let s = regexes(sel(true, true), &[r"^(10\.0\.0\.5|2001:db8:1::13)$"]);
    assert!(matches!(
        select(&s, &host()),
        Err(IfaceError::NoMatchingInterface { .. })
    ));
}

#[test]
fn regex_failures_and_order() {
    // A bad pattern is skipped like a non-matching one.
    assert_eq!(pick(&regexes(v4_only(), &["(", "^zz", "^eth0$"])).name, "eth0");
    // --iface entries are tried before regexes.
    let mut s = regexes(v4_only(), &["^eth0$"]);
    s.ifaces = vec!["eth1".into()];
    assert_eq!(pick(&s).name, "eth1");
}

#[test]
fn can_reach_uses_the_route() {
    let routed = |oif, src: &str| HostView {
        can_reach: Some(Ok(RouteLookup {
            oif,
            src: Some(ip(src)),
        })),
        ..host()
    };
    let mut s = v4_only();
    s.iface_can_reach = Some(ip("192.168.1.200"));
    let ext = select(&s, &routed(Some(3), "192.168.1.10")).unwrap();
    assert_eq!((ext.name.as_str(), ext.iface_addr), ("eth1", v4("192.168.1.10")));
    // An IPv6 source never becomes the IPv4 address (upstream's bug).
    let ext = select(&s, &routed(Some(3), "2001:db8:1::13")).unwrap();
    assert_eq!(ext.iface_addr, v4("192.168.1.11"));
    // Tried last: an --iface that works wins.
    s.ifaces = vec!["nope".into(), "eth0".into()];
    assert_eq!(select(&s, &routed(Some(3), "192.168.1.10")).unwrap().name, "eth0");
    s.ifaces = vec!["nope".into()];
    s.iface_regex = vec!["^zz".into()];
    assert_eq!(select(&s, &routed(Some(3), "192.168.1.10")).unwrap().name, "eth1");
    // Failures.
    let unreachable = HostView {
        can_reach: Some(Err("Network is unreachable (os error 101)".into())),
        ..host()
    };
    let cases = [
        (unreachable, "Network is unreachable (os error 101)"),
        (routed(None, "10.0.0.5"), "the route has no output interface"),
        (routed(Some(77), "10.0.0.5"), "couldn't lookup interface: index 77"),
    ];
    for (h, why) in cases {
        let got = fail(&s, &h);
        let want = format!(
            "192.168.1.200: failed to get ifcanreach based interface: couldn't lookup route to 192.168.1.200: {why}"
        );
        assert!(got.starts_with(NO_MATCH) && got.ends_with(&want), "{got}");
    }
}

#[test]
fn public_ip_is_the_interface_spec_without_flags() {
    let mut s = v4_only();
    s.public_ip = v4("192.168.1.10");
    let ext = pick(&s);
    assert_eq!(
        (ext.name.as_str(), ext.iface_addr, ext.ext_addr),
        ("eth1", v4("192.168.1.10"), v4("192.168.1.10"))
    );
    // It must then be local.
    s.public_ip = v4("203.0.113.1");
    assert!(fail(&s, &host()).starts_with(
        "Failed to find any valid interface to use: \
         error looking up interface 203.0.113.1: no interface with given IP found"
    ));
    // --public-ipv6 plays the same role when --public-ip is empty.
    let mut s = sel(false, true);
    s.public_ipv6 = v6("2001:db8:6::6");
    assert_eq!(pick(&s).name, "v6only");
    // Dual stack with only --public-ipv6: the IPv4 address comes from that interface.
    let mut s = sel(true, true);
    s.public_ipv6 = v6("2001:db8::5");
    let ext = pick(&s);
    assert_eq!(
        (ext.iface_addr, ext.ext_addr, ext.ext_v6_addr),
        (v4("10.0.0.5"), v4("10.0.0.5"), v6("2001:db8::5"))
    );
}

#[test]
fn public_ip_with_flags_is_only_advertised() {
    let mut s = ifaces(sel(true, true), &["eth0"]);
    s.public_ip = v4("203.0.113.1");
    let ext = pick(&s);
    assert_eq!((ext.iface_addr, ext.ext_addr), (v4("10.0.0.5"), v4("203.0.113.1")));
    assert_eq!(ext.ext_v6_addr, v6("2001:db8::5"));
}

#[test]
fn zero_mtu_names_the_interface() {
    let mut s = v4_only();
    s.public_ip = v4("10.9.9.9");
    assert_eq!(
        fail(&s, &host()),
        "Failed to find any valid interface to use: failed to determine MTU for dead0 interface"
    );
}

#[test]
fn selection_from_flags() {
    let flags = |args: &[&str]| {
        let argv = std::iter::once("flanneld").chain(args.iter().copied());
        match crate::flags::parse_from(argv, &Default::default()) {
            Ok(crate::flags::Invocation::Run(f)) => *f,
            other => panic!("{other:?}"),
        }
    };
    let f = flags(&[
        "--iface=eth0",
        "--iface-regex=^en",
        "--iface-can-reach=10.1.1.1",
        "--public-ip=192.0.2.1",
        "--public-ipv6=2001:db8::1",
    ]);
    let s = IfaceSelection::from_flags(&f, true, false).unwrap();
    assert_eq!(
        s,
        IfaceSelection {
            ifaces: vec!["eth0".into()],
            iface_regex: vec!["^en".into()],
            iface_can_reach: Some(ip("10.1.1.1")),
            public_ip: v4("192.0.2.1"),
            public_ipv6: v6("2001:db8::1"),
            ipv4: true,
            ipv6: false,
        }
    );
    let err = |args: &[&str]| {
        IfaceSelection::from_flags(&flags(args), true, true)
            .unwrap_err()
            .to_string()
    };
    assert!(err(&["--public-ip=abc"]).starts_with("invalid public IP address: abc"));
    assert!(err(&["--public-ip=2001:db8::1"]).starts_with("invalid public IP address: 2001:db8::1"));
    assert!(err(&["--public-ipv6=10.0.0.1"]).starts_with("invalid public IPv6 address: 10.0.0.1"));
    assert!(err(&["--iface-can-reach=eth0"]).starts_with("invalid iface-can-reach address: eth0"));
}

#[test]
fn error_texts_start_with_upstreams() {
    use IfaceError as E;
    let cases: Vec<(IfaceError, &str)> = vec![
        (
            E::BadRegex {
                pattern: "(".into(),
                reason: "x".into(),
            },
            "could not compile the IP address regex '(': x",
        ),
        (
            E::NoInterfaceNamed { name: "eth9".into() },
            "error looking up interface eth9: route ip+net: no such network interface",
        ),
        (
            E::CanReach {
                target: ip("10.1.1.1"),
                reason: "Network is unreachable (os error 101)".into(),
            },
            "failed to get ifcanreach based interface: couldn't lookup route to 10.1.1.1: \
             Network is unreachable (os error 101)",
        ),
        (
            E::InvalidPublicIpv6 { value: "x".into() },
            "invalid public IPv6 address: x",
        ),
        (
            E::ZeroMtu { name: "eth0".into() },
            "failed to determine MTU for eth0 interface",
        ),
    ];
    for (e, want) in cases {
        assert!(e.to_string().starts_with(want), "{e}");
    }
}

#[test]
fn no_pattern_match_lists_usable_addresses() {
    let h = HostView {
        links: vec![host().links[0].clone(), host().links[2].clone()],
        ..host()
    };
    // Built at run time: clippy rightly flags a literal invalid regex.
    let unclosed = String::from("(");
    assert_eq!(
        fail(&regexes(v4_only(), &["^zz", &unclosed]), &h),
        format!(
            "{NO_MATCH}: ^zz: Could not match pattern ^zz to any of the available network interfaces \
             (lo:[], eth1:[192.168.1.11 192.168.1.10 169.254.3.3]); \
             (: could not compile the IP address regex '(': {}",
            regex::Regex::new(&unclosed).unwrap_err()
        )
    );
    let h6 = HostView {
        links: vec![host().links[2].clone()],
        ..host()
    };
    assert!(fail(&regexes(sel(false, true), &["^zz"]), &h6).contains("(eth1:[2001:db8:1::13 2001:db8:1::10 fe80::3])"));
}
