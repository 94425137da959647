//! External interface selection: which interface and addresses flanneld uses to talk
//! to other nodes, decided exactly as upstream's `main.go` + `pkg/ipmatch` do.
//!
//! The decision is a pure function, [`select`], of the flags ([`IfaceSelection`]) and
//! what the kernel reports ([`HostView`]); [`Netlink::select_external_interface`]
//! gathers the view and calls it. The rules, in upstream's order:
//! 1. With no `--iface`, `--iface-regex` or `--iface-can-reach`: the interface that
//!    owns `--public-ip` (or `--public-ipv6`), which must then be local; else the
//!    interface of the main table's default route (v4 and v6 must agree in dual stack).
//! 2. Otherwise each `--iface` (an address or a name) in order, then each
//!    `--iface-regex` (first against usable addresses, then names), then
//!    `--iface-can-reach` (`ip route get`); the first that fully works wins.
//! 3. Addresses: global before link-local, permanent before dynamic, non-temporary
//!    before temporary; deprecated and tentative ones are never used.
//! 4. `--public-ip`/`--public-ipv6` become the external addresses, else the interface
//!    addresses do.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::{DefaultRoute, LinkInfo, Netlink, NetlinkError, RouteLookup};
use crate::flags::Flags;

#[cfg(test)]
mod netns_tests;
mod select;
#[cfg(test)]
mod tests;

pub use select::select;

/// What the flags and the network config ask for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IfaceSelection {
    /// `--iface`: interface names or addresses, tried in order.
    pub ifaces: Vec<String>,
    /// `--iface-regex`: patterns tried after `ifaces`, in order.
    pub iface_regex: Vec<String>,
    /// `--iface-can-reach`: pick the interface the kernel routes this address through.
    pub iface_can_reach: Option<IpAddr>,
    /// `--public-ip` (or the kube `node-public-ip` annotation, which overrides it).
    pub public_ip: Option<Ipv4Addr>,
    /// `--public-ipv6` (or the kube `node-public-ipv6` annotation).
    pub public_ipv6: Option<Ipv6Addr>,
    /// The network config enables IPv4.
    pub ipv4: bool,
    /// The network config enables IPv6.
    pub ipv6: bool,
}

impl IfaceSelection {
    /// Reads the interface flags. Address values are checked here, before any lookup,
    /// with upstream's messages.
    pub fn from_flags(flags: &Flags, ipv4: bool, ipv6: bool) -> Result<Self, IfaceError> {
        let public_ip = match flags.public_ip.as_str() {
            "" => None,
            s => Some(parse_v4(s).ok_or_else(|| IfaceError::InvalidPublicIp { value: s.to_owned() })?),
        };
        let public_ipv6 = match flags.public_ipv6.as_str() {
            "" => None,
            s => Some(parse_v6(s).ok_or_else(|| IfaceError::InvalidPublicIpv6 { value: s.to_owned() })?),
        };
        let iface_can_reach = match flags.iface_can_reach.as_str() {
            "" => None,
            s => Some(
                s.parse()
                    .map_err(|_| IfaceError::InvalidCanReach { value: s.to_owned() })?,
            ),
        };
        Ok(IfaceSelection {
            ifaces: flags.iface.clone(),
            iface_regex: flags.iface_regex.clone(),
            iface_can_reach,
            public_ip,
            public_ipv6,
            ipv4,
            ipv6,
        })
    }

    /// Whether any of `--iface`, `--iface-regex`, `--iface-can-reach` was given.
    fn explicit(&self) -> bool {
        !self.ifaces.is_empty() || !self.iface_regex.is_empty() || self.iface_can_reach.is_some()
    }
}

/// Upstream parses `--public-ip` with `net.ParseIP`, so an IPv6 value slips through and
/// ends up advertised as the IPv4 address; we accept only IPv4 (or v4-mapped IPv6).
fn parse_v4(s: &str) -> Option<Ipv4Addr> {
    match s.parse().ok()? {
        IpAddr::V4(ip) => Some(ip),
        IpAddr::V6(ip) => ip.to_ipv4_mapped(),
    }
}

fn parse_v6(s: &str) -> Option<Ipv6Addr> {
    match s.parse().ok()? {
        IpAddr::V6(ip) if ip.to_ipv4_mapped().is_none() => Some(ip),
        _ => None,
    }
}

/// The interface flanneld uses for inter-host traffic, and the addresses it
/// advertises.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExternalInterface {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub index: u32,
    /// Interface MTU (never 0).
    pub mtu: u32,
    /// The IPv4 address used on the interface; set when IPv4 is enabled.
    pub iface_addr: Option<Ipv4Addr>,
    /// The IPv6 address used on the interface; set when IPv6 is enabled.
    pub iface_v6_addr: Option<Ipv6Addr>,
    /// The IPv4 address advertised to other nodes (`--public-ip` or `iface_addr`).
    pub ext_addr: Option<Ipv4Addr>,
    /// The IPv6 address advertised to other nodes (`--public-ipv6` or `iface_v6_addr`).
    pub ext_v6_addr: Option<Ipv6Addr>,
}

/// Everything [`select`] looks at, read from the kernel in one go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostView {
    /// All links with their addresses, by index.
    pub links: Vec<LinkInfo>,
    /// The IPv4 default route (only read when selection falls back to it).
    pub default_v4: DefaultRoute,
    /// The IPv6 default route (only read when selection falls back to it).
    pub default_v6: DefaultRoute,
    /// The route to `--iface-can-reach`, or the kernel's error text.
    pub can_reach: Option<Result<RouteLookup, String>>,
}

/// Why no external interface could be chosen. The text starts with upstream's
/// message (operators grep for those) and then says what to do.
#[derive(Debug, thiserror::Error)]
pub enum IfaceError {
    /// The network config enables neither family.
    #[error("none defined stack: enable IPv4 or IPv6 in the network config")]
    NoIpFamily,
    /// `--public-ip` is not an IPv4 address.
    #[error("invalid public IP address: {value} (--public-ip takes an IPv4 address)")]
    InvalidPublicIp {
        /// The value given.
        value: String,
    },
    /// `--public-ipv6` is not an IPv6 address.
    #[error("invalid public IPv6 address: {value} (--public-ipv6 takes an IPv6 address)")]
    InvalidPublicIpv6 {
        /// The value given.
        value: String,
    },
    /// `--iface-can-reach` is not an address.
    #[error("invalid iface-can-reach address: {value} (give an IP address other nodes are reached through)")]
    InvalidCanReach {
        /// The value given.
        value: String,
    },
    /// An `--iface-regex` that does not compile.
    #[error("could not compile the IP address regex '{pattern}': {reason}")]
    BadRegex {
        /// The pattern.
        pattern: String,
        /// The regex error.
        reason: String,
    },
    /// No interface holds this IPv4 address.
    #[error(
        "error looking up interface {spec}: no interface with given IP found \
        (it must be assigned to a local interface; check `ip -4 addr`)"
    )]
    NoInterfaceWithIp {
        /// The address as given.
        spec: String,
    },
    /// No interface holds this IPv6 address.
    #[error(
        "error looking up v6 interface {spec}: no interface with given IPv6 found \
        (it must be assigned to a local interface; check `ip -6 addr`)"
    )]
    NoInterfaceWithIpv6 {
        /// The address as given.
        spec: String,
    },
    /// No interface has this name.
    #[error("error looking up interface {name}: route ip+net: no such network interface (check `ip link`)")]
    NoInterfaceNamed {
        /// The name given.
        name: String,
    },
    /// In dual stack, `--public-ipv6` lives on another interface than the chosen one.
    #[error(
        "v6 interface {v6} must be the same with v4 interface {v4} \
        (put both addresses on one interface, or drop --public-ipv6)"
    )]
    V6InterfaceMismatch {
        /// The interface holding the IPv6 address.
        v6: String,
        /// The interface chosen for IPv4.
        v4: String,
    },
    /// An `--iface-regex` matched no address and no name.
    #[error("Could not match pattern {pattern} to any of the available network interfaces ({available})")]
    NoPatternMatch {
        /// The pattern.
        pattern: String,
        /// Every interface with its usable addresses, as `name:[a b]`.
        available: String,
    },
    /// The route lookup for `--iface-can-reach` failed.
    #[error("failed to get ifcanreach based interface: couldn't lookup route to {target}: {reason}")]
    CanReach {
        /// The `--iface-can-reach` address.
        target: IpAddr,
        /// The kernel's answer.
        reason: String,
    },
    /// No IPv4 default route in the main table.
    #[error(
        "failed to get default interface: unable to find default route \
        (add one, or choose the interface with --iface, --iface-regex or --iface-can-reach)"
    )]
    NoDefaultRoute,
    /// No IPv6 default route in the main table.
    #[error(
        "failed to get default v6 interface: unable to find default v6 route \
        (add one, or choose the interface with --iface, --iface-regex or --iface-can-reach)"
    )]
    NoDefaultV6Route,
    /// The IPv4 default route has no usable output interface.
    #[error(
        "failed to get default interface: found default route but could not determine interface \
        (choose it with --iface)"
    )]
    DefaultRouteWithoutInterface,
    /// The IPv6 default route has no usable output interface.
    #[error(
        "failed to get default v6 interface: found default v6 route but could not determine interface \
        (choose it with --iface)"
    )]
    DefaultV6RouteWithoutInterface,
    /// Dual stack with default routes through different interfaces.
    #[error(
        "v6 default route interface {v6} must be the same with v4 default route interface {v4} \
        (fix the routes, or choose the interface with --iface)"
    )]
    DefaultRouteMismatch {
        /// The IPv6 default route's interface.
        v6: String,
        /// The IPv4 default route's interface.
        v4: String,
    },
    /// The chosen interface has no usable IPv4 address.
    #[error(
        "failed to find IPv4 address for interface {name} \
        (it needs a global or link-local IPv4 address that is not deprecated)"
    )]
    NoIpv4Address {
        /// The interface.
        name: String,
    },
    /// The chosen interface has no usable IPv6 address.
    #[error(
        "failed to find IPv6 address for interface {name} \
        (it needs a global or link-local IPv6 address that is not deprecated or tentative)"
    )]
    NoIpv6Address {
        /// The interface.
        name: String,
    },
    /// The chosen interface reports MTU 0. Upstream prints the address where the
    /// name belongs; we print the name.
    #[error("failed to determine MTU for {name} interface")]
    ZeroMtu {
        /// The interface.
        name: String,
    },
    /// No flags given and the fallback (public IP or default route) failed.
    #[error("Failed to find any valid interface to use: {0}")]
    NoValidInterface(Box<IfaceError>),
    /// Every `--iface`, `--iface-regex` and `--iface-can-reach` failed. Each failure
    /// was also logged at info level, as upstream does.
    #[error("Failed to find interface to use that matches the interfaces and/or regexes provided: \
        {}", .tried.join("; "))]
    NoMatchingInterface {
        /// `"<flag value>: <why it failed>"` for each attempt, in order.
        tried: Vec<String>,
    },
    /// Reading links or routes failed.
    #[error(transparent)]
    Netlink(#[from] NetlinkError),
}

impl Netlink {
    /// Reads what [`select`] needs: links and addresses always, default routes only
    /// when no interface flag is given, and the `--iface-can-reach` route if set.
    pub async fn host_view(&self, sel: &IfaceSelection) -> Result<HostView, NetlinkError> {
        let use_default = !sel.explicit() && sel.public_ip.is_none() && sel.public_ipv6.is_none();
        let mut default_v4 = DefaultRoute::Missing;
        let mut default_v6 = DefaultRoute::Missing;
        if use_default && sel.ipv4 {
            default_v4 = self.default_route(false).await?;
        }
        if use_default && sel.ipv6 {
            default_v6 = self.default_route(true).await?;
        }
        let can_reach = match sel.iface_can_reach {
            // A failed lookup is an answer ("network unreachable"), not a netlink fault.
            Some(target) => Some(self.route_get(target).await.map_err(|e| match e {
                NetlinkError::Request { cause, .. } => super::describe(&cause),
                other => other.to_string(),
            })),
            None => None,
        };
        Ok(HostView {
            links: self.links().await?,
            default_v4,
            default_v6,
            can_reach,
        })
    }

    /// Chooses the external interface on this host (upstream's `LookupExtIface` loop).
    pub async fn select_external_interface(&self, sel: &IfaceSelection) -> Result<ExternalInterface, IfaceError> {
        let view = self.host_view(sel).await?;
        select(sel, &view)
    }
}
