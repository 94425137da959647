//! The selection rules as a pure function of flags and host state, so every rule can
//! be tested without root. Logs are upstream's lines, with fields.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use regex::Regex;
use tracing::info;

use super::{ExternalInterface, HostView, IfaceError, IfaceSelection};
use crate::netlink::{AddrInfo, DefaultRoute, LinkInfo};

/// An interface picked by one rule, with the addresses that rule already fixed.
struct Pick<'a> {
    link: &'a LinkInfo,
    v4: Option<Ipv4Addr>,
    v6: Option<Ipv6Addr>,
}

impl<'a> Pick<'a> {
    fn link(link: &'a LinkInfo) -> Self {
        Pick {
            link,
            v4: None,
            v6: None,
        }
    }
}

/// Chooses the external interface from `host` as upstream does (see the module docs).
pub fn select(sel: &IfaceSelection, host: &HostView) -> Result<ExternalInterface, IfaceError> {
    if !sel.ipv4 && !sel.ipv6 {
        return Err(IfaceError::NoIpFamily);
    }
    if !sel.explicit() {
        let spec = sel.public_ip.map(IpAddr::V4).or(sel.public_ipv6.map(IpAddr::V6));
        let pick = match spec {
            Some(ip) => by_address(sel, host, ip, &ip.to_string()),
            None => by_default_route(sel, host),
        };
        return pick
            .and_then(|pick| finish(sel, pick))
            .map_err(|e| IfaceError::NoValidInterface(Box::new(e)));
    }

    let mut tried = Vec::new();
    for spec in &sel.ifaces {
        match by_iface_flag(sel, host, spec).and_then(|pick| finish(sel, pick)) {
            Ok(ext) => return Ok(ext),
            Err(error) => {
                info!(iface = %spec, %error, "Could not find valid interface matching {spec}: {error}");
                tried.push(format!("{spec}: {error}"));
            }
        }
    }
    for pattern in &sel.iface_regex {
        match by_regex(sel, host, pattern).and_then(|pick| finish(sel, pick)) {
            Ok(ext) => return Ok(ext),
            Err(error) => {
                info!(iface_regex = %pattern, %error, "Could not find valid interface matching {pattern}: {error}");
                tried.push(format!("{pattern}: {error}"));
            }
        }
    }
    if let Some(target) = sel.iface_can_reach {
        match by_route(sel, host, target).and_then(|pick| finish(sel, pick)) {
            Ok(ext) => return Ok(ext),
            Err(error) => {
                info!(
                    iface_can_reach = %target, %error,
                    "Could not find valid interface matching ifaceCanReach: {target}: {error}"
                );
                tried.push(format!("{target}: {error}"));
            }
        }
    }
    Err(IfaceError::NoMatchingInterface { tried })
}

/// One `--iface` value: an address if it parses as one, else an interface name.
fn by_iface_flag<'a>(sel: &IfaceSelection, host: &'a HostView, spec: &str) -> Result<Pick<'a>, IfaceError> {
    match spec.parse::<IpAddr>() {
        Ok(ip) => by_address(sel, host, ip, spec),
        Err(_) => host
            .links
            .iter()
            .find(|link| link.name == spec)
            .map(Pick::link)
            .ok_or_else(|| IfaceError::NoInterfaceNamed { name: spec.to_owned() }),
    }
}

/// The interface holding `ip`, which becomes that family's interface address.
///
/// In dual stack with `--public-ipv6`, that address must be on the same interface
/// (upstream's rule). Upstream dereferences a nil interface when given an IPv6
/// address in dual stack without `--public-ipv6`; we look it up like an IPv4 one.
fn by_address<'a>(sel: &IfaceSelection, host: &'a HostView, ip: IpAddr, spec: &str) -> Result<Pick<'a>, IfaceError> {
    info!(address = %ip, "Searching for interface using {ip}");
    // Go's To4() treats a v4-mapped IPv6 address as IPv4.
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let mut pick = match ip {
        // IPv6-only stack looks up by IPv6 address only, as upstream does.
        IpAddr::V4(v4) if sel.ipv4 => Pick {
            v4: Some(v4),
            ..Pick::link(owner(host, ip).ok_or_else(|| IfaceError::NoInterfaceWithIp { spec: spec.to_owned() })?)
        },
        IpAddr::V6(v6) if sel.ipv6 => Pick {
            v6: Some(v6),
            ..Pick::link(owner(host, ip).ok_or_else(|| IfaceError::NoInterfaceWithIpv6 { spec: spec.to_owned() })?)
        },
        _ if sel.ipv4 => return Err(IfaceError::NoInterfaceWithIp { spec: spec.to_owned() }),
        _ => return Err(IfaceError::NoInterfaceWithIpv6 { spec: spec.to_owned() }),
    };
    if let (true, true, Some(public_v6)) = (sel.ipv4, sel.ipv6, sel.public_ipv6) {
        let v6_link = owner(host, IpAddr::V6(public_v6)).ok_or_else(|| IfaceError::NoInterfaceWithIpv6 {
            spec: public_v6.to_string(),
        })?;
        if v6_link.index != pick.link.index {
            return Err(IfaceError::V6InterfaceMismatch {
                v6: v6_link.name.clone(),
                v4: pick.link.name.clone(),
            });
        }
        pick.v6 = Some(public_v6);
    }
    Ok(pick)
}

/// One `--iface-regex`: first the usable addresses of each interface (in dual stack an
/// IPv4 and an IPv6 address must both match), then the interface names.
fn by_regex<'a>(sel: &IfaceSelection, host: &'a HostView, pattern: &str) -> Result<Pick<'a>, IfaceError> {
    let re = Regex::new(pattern).map_err(|e| IfaceError::BadRegex {
        pattern: pattern.to_owned(),
        reason: e.to_string(),
    })?;
    let matching = |addrs: Vec<IpAddr>| addrs.into_iter().find(|ip| re.is_match(&ip.to_string()));
    for link in &host.links {
        let v4 = if sel.ipv4 { matching(usable(link, false)) } else { None };
        let v6 = if sel.ipv6 { matching(usable(link, true)) } else { None };
        if (v4.is_some() || !sel.ipv4) && (v6.is_some() || !sel.ipv6) {
            return Ok(Pick {
                link,
                v4: v4.and_then(as_v4),
                v6: v6.and_then(as_v6),
            });
        }
    }
    if let Some(link) = host.links.iter().find(|link| re.is_match(&link.name)) {
        return Ok(Pick::link(link));
    }
    // Upstream lists the IPv4 addresses in v4 and dual stack, the IPv6 ones in v6-only.
    let available = host
        .links
        .iter()
        .map(|link| {
            let addrs: Vec<String> = usable(link, !sel.ipv4).iter().map(IpAddr::to_string).collect();
            format!("{}:[{}]", link.name, addrs.join(" "))
        })
        .collect::<Vec<_>>()
        .join(", ");
    Err(IfaceError::NoPatternMatch {
        pattern: pattern.to_owned(),
        available,
    })
}

/// `--iface-can-reach`: the route's interface, and its source address for that
/// family. (Upstream stores an IPv6 source as the IPv4 address.)
fn by_route<'a>(sel: &IfaceSelection, host: &'a HostView, target: IpAddr) -> Result<Pick<'a>, IfaceError> {
    info!(iface_can_reach = %target, "Determining interface to use based on given ifcanreach: {target}");
    let failed = |reason: &str| IfaceError::CanReach {
        target,
        reason: reason.to_owned(),
    };
    let route = match &host.can_reach {
        Some(Ok(route)) => route,
        Some(Err(reason)) => return Err(failed(reason)),
        None => return Err(failed("the route was not looked up")),
    };
    let oif = route.oif.ok_or_else(|| failed("the route has no output interface"))?;
    let link = by_index(host, oif).ok_or_else(|| failed(&format!("couldn't lookup interface: index {oif}")))?;
    let src = route
        .src
        .filter(|ip| (ip.is_ipv4() && sel.ipv4) || (ip.is_ipv6() && sel.ipv6));
    Ok(Pick {
        link,
        v4: src.and_then(as_v4),
        v6: src.and_then(as_v6),
    })
}

/// The interface of the default route (both families must agree in dual stack).
fn by_default_route<'a>(sel: &IfaceSelection, host: &'a HostView) -> Result<Pick<'a>, IfaceError> {
    info!("Determining IP address of default interface");
    let v4 = if sel.ipv4 {
        Some(default_link(host, host.default_v4, false)?)
    } else {
        None
    };
    let v6 = if sel.ipv6 {
        Some(default_link(host, host.default_v6, true)?)
    } else {
        None
    };
    match (v4, v6) {
        (Some(v4), Some(v6)) if v4.index != v6.index => Err(IfaceError::DefaultRouteMismatch {
            v6: v6.name.clone(),
            v4: v4.name.clone(),
        }),
        (Some(link), _) | (None, Some(link)) => Ok(Pick::link(link)),
        (None, None) => Err(IfaceError::NoIpFamily),
    }
}

fn default_link(host: &HostView, route: DefaultRoute, v6: bool) -> Result<&LinkInfo, IfaceError> {
    let (missing, no_iface) = if v6 {
        (IfaceError::NoDefaultV6Route, IfaceError::DefaultV6RouteWithoutInterface)
    } else {
        (IfaceError::NoDefaultRoute, IfaceError::DefaultRouteWithoutInterface)
    };
    match route {
        DefaultRoute::Missing => Err(missing),
        DefaultRoute::NoInterface => Err(no_iface),
        // An index that vanished between the dumps is as good as none.
        DefaultRoute::Via(index) => by_index(host, index).ok_or(no_iface),
    }
}

/// Fills in the addresses the rule left open, checks the MTU and sets the external
/// addresses. Upstream leaves the second family empty in dual stack when the rule
/// fixed one (`--iface <v4>` without `--public-ipv6`); we take the interface's.
fn finish(sel: &IfaceSelection, pick: Pick<'_>) -> Result<ExternalInterface, IfaceError> {
    let link = pick.link;
    let name = || link.name.clone();
    let iface_addr = match (sel.ipv4, pick.v4) {
        (false, _) => None,
        (true, Some(v4)) => Some(v4),
        (true, None) => Some(
            usable(link, false)
                .into_iter()
                .find_map(as_v4)
                .ok_or_else(|| IfaceError::NoIpv4Address { name: name() })?,
        ),
    };
    let iface_v6_addr = match (sel.ipv6, pick.v6) {
        (false, _) => None,
        (true, Some(v6)) => Some(v6),
        (true, None) => Some(
            usable(link, true)
                .into_iter()
                .find_map(as_v6)
                .ok_or_else(|| IfaceError::NoIpv6Address { name: name() })?,
        ),
    };
    if let Some(address) = iface_addr {
        info!(iface = %link.name, %address, "Using interface with name {} and address {address}", link.name);
    }
    if let Some(address) = iface_v6_addr {
        info!(iface = %link.name, %address, "Using interface with name {} and v6 address {address}", link.name);
    }
    if link.mtu == 0 {
        return Err(IfaceError::ZeroMtu { name: name() });
    }

    let ext_addr = match (sel.public_ip, iface_addr) {
        (Some(public), _) => {
            info!(address = %public, "Using {public} as external address");
            Some(public)
        }
        (None, Some(address)) => {
            info!(%address, "Defaulting external address to interface address ({address})");
            Some(address)
        }
        (None, None) => None,
    };
    let ext_v6_addr = match (sel.public_ipv6, iface_v6_addr) {
        (Some(public), _) => {
            info!(address = %public, "Using {public} as external address");
            Some(public)
        }
        (None, Some(address)) => {
            info!(%address, "Defaulting external v6 address to interface address ({address})");
            Some(address)
        }
        (None, None) => None,
    };
    Ok(ExternalInterface {
        name: name(),
        index: link.index,
        mtu: link.mtu,
        iface_addr,
        iface_v6_addr,
        ext_addr,
        ext_v6_addr,
    })
}

/// The addresses of one family that may be used, best first (upstream's
/// `GetInterfaceIP4Addrs`/`GetInterfaceIP6Addrs`): global or link-local unicast and
/// not deprecated, and (our addition) not tentative, since the kernel will not use a
/// tentative address as a source until duplicate address detection passes. Then:
/// global before link-local, permanent before dynamic, non-temporary before
/// temporary. The sort is stable, so kernel order breaks ties (Go's
/// `slices.SortFunc` is not stable, so upstream's tie order is arbitrary).
pub(super) fn usable(link: &LinkInfo, v6: bool) -> Vec<IpAddr> {
    let mut addrs: Vec<&AddrInfo> = link
        .addrs
        .iter()
        .filter(|a| a.addr.is_ipv6() == v6 && !a.deprecated && !a.tentative)
        .filter(|a| is_global_unicast(a.addr) || is_link_local_unicast(a.addr))
        .collect();
    addrs.sort_by_key(|a| (is_link_local_unicast(a.addr), !a.permanent, a.temporary));
    addrs.into_iter().map(|a| a.addr).collect()
}

/// Go's `net.IP.IsGlobalUnicast` (private ranges and ULAs included).
fn is_global_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            !(v4.is_unspecified() || v4.is_loopback() || v4.is_multicast() || v4.is_broadcast() || v4.is_link_local())
        }
        IpAddr::V6(v6) => !(v6.is_unspecified() || v6.is_loopback() || v6.is_multicast() || is_link_local_unicast(ip)),
    }
}

/// Go's `net.IP.IsLinkLocalUnicast`: 169.254.0.0/16 and fe80::/10.
fn is_link_local_unicast(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
    }
}

fn owner(host: &HostView, ip: IpAddr) -> Option<&LinkInfo> {
    // Any address counts here, deprecated or not: the user named it.
    host.links.iter().find(|link| link.addrs.iter().any(|a| a.addr == ip))
}

fn by_index(host: &HostView, index: u32) -> Option<&LinkInfo> {
    host.links.iter().find(|link| link.index == index)
}

fn as_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V4(v4) => Some(v4),
        IpAddr::V6(_) => None,
    }
}

fn as_v6(ip: IpAddr) -> Option<Ipv6Addr> {
    match ip {
        IpAddr::V6(v6) => Some(v6),
        IpAddr::V4(_) => None,
    }
}
