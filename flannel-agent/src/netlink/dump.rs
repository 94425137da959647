//! Reads of links, addresses and routes, turned into plain data.

use std::collections::BTreeMap;
use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::address::{AddressAttribute, AddressFlags, AddressMessage};
use netlink_packet_route::link::LinkAttribute;
use netlink_packet_route::route::{RouteAttribute, RouteHeader, RouteMessage, RouteType};
use netlink_packet_route::AddressFamily;

use super::{Netlink, NetlinkError};

/// A network interface and its addresses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkInfo {
    /// Interface index (`ifindex`), never 0.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// MTU; 0 if the kernel did not report one.
    pub mtu: u32,
    /// Addresses in kernel order: IPv4 first, primaries before secondaries.
    pub addrs: Vec<AddrInfo>,
}

/// One address of a link and the `IFA_F_*` flags that decide whether to use it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AddrInfo {
    /// The local address (`IFA_LOCAL`, else `IFA_ADDRESS`: they differ on
    /// point-to-point links, where `IFA_ADDRESS` is the peer).
    pub addr: IpAddr,
    /// Prefix length.
    pub prefix_len: u8,
    /// `IFA_F_PERMANENT`: configured by hand, not by DHCP/SLAAC (no lifetime).
    pub permanent: bool,
    /// `IFA_F_TEMPORARY`, which is the same bit as `IFA_F_SECONDARY`: an IPv6
    /// privacy address, or an IPv4 secondary address.
    pub temporary: bool,
    /// `IFA_F_DEPRECATED`: past its preferred lifetime.
    pub deprecated: bool,
    /// `IFA_F_TENTATIVE` without `IFA_F_OPTIMISTIC` (duplicate address detection has
    /// not finished), or `IFA_F_DADFAILED`: the kernel will not use it as a source.
    pub tentative: bool,
}

impl AddrInfo {
    /// A permanent address with no other flags, as `ip addr add` creates.
    pub fn permanent(addr: IpAddr, prefix_len: u8) -> Self {
        AddrInfo {
            addr,
            prefix_len,
            permanent: true,
            temporary: false,
            deprecated: false,
            tentative: false,
        }
    }
}

/// The first default route of the main table, for one address family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DefaultRoute {
    /// There is none.
    Missing,
    /// There is one, but it names no output interface (for example a nexthop object).
    NoInterface,
    /// It leaves through this interface index.
    Via(u32),
}

/// The kernel's answer to `ip route get <dst>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteLookup {
    /// Output interface index, if the route has one.
    pub oif: Option<u32>,
    /// Preferred source address (`RTA_PREFSRC`).
    pub src: Option<IpAddr>,
}

impl Netlink {
    /// All links with their addresses, sorted by index (the order Go's
    /// `net.Interfaces()` gives on current kernels).
    pub async fn links(&self) -> Result<Vec<LinkInfo>, NetlinkError> {
        let mut links = BTreeMap::new();
        let mut dump = self.handle.link().get().execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request("link dump", e))?
        {
            let mut link = LinkInfo {
                index: msg.header.index,
                name: String::new(),
                mtu: 0,
                addrs: Vec::new(),
            };
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(name) => link.name = name,
                    LinkAttribute::Mtu(mtu) => link.mtu = mtu,
                    _ => {}
                }
            }
            links.insert(link.index, link);
        }
        let mut dump = self.handle.address().get().execute();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request("address dump", e))?
        {
            // A link created between the two dumps is simply not seen yet.
            if let (Some(link), Some(addr)) = (links.get_mut(&msg.header.index), addr_info(&msg)) {
                link.addrs.push(addr);
            }
        }
        Ok(links.into_values().collect())
    }

    /// The first default route (`0.0.0.0/0` or `::/0`) of the main table, as upstream's
    /// `GetDefaultGatewayInterface` finds it. Only unicast routes count: upstream also
    /// takes `unreachable`/`blackhole` defaults, which made it pick `lo` on hosts with
    /// an `unreachable default` IPv6 route.
    pub async fn default_route(&self, v6: bool) -> Result<DefaultRoute, NetlinkError> {
        let mut query = RouteMessage::default();
        query.header.address_family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let mut found = None;
        let mut dump = self.handle.route().get(query).execute();
        // Read the whole dump even after a match, so the socket is left clean.
        while let Some(route) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(if v6 { "IPv6 route dump" } else { "IPv4 route dump" }, e))?
        {
            let main = route_table(&route) == u32::from(RouteHeader::RT_TABLE_MAIN);
            let default = route.header.destination_prefix_length == 0;
            if found.is_none() && main && default && route.header.kind == RouteType::Unicast {
                found = Some(route_oif(&route).map_or(DefaultRoute::NoInterface, DefaultRoute::Via));
            }
        }
        Ok(found.unwrap_or(DefaultRoute::Missing))
    }

    /// `ip route get <dst>`: the route the kernel would use for `dst`.
    pub async fn route_get(&self, dst: IpAddr) -> Result<RouteLookup, NetlinkError> {
        let mut query = RouteMessage::default();
        let (family, len) = match dst {
            IpAddr::V4(_) => (AddressFamily::Inet, 32),
            IpAddr::V6(_) => (AddressFamily::Inet6, 128),
        };
        query.header.address_family = family;
        query.header.destination_prefix_length = len;
        query.attributes.push(RouteAttribute::Destination(dst.into()));
        let op = || format!("route lookup for {dst}");
        let mut reply = self.handle.route().get(query).execute();
        let mut answer = None;
        while let Some(route) = reply.try_next().await.map_err(|e| NetlinkError::request(op(), e))? {
            answer.get_or_insert(route);
        }
        let route = answer.ok_or_else(|| NetlinkError::request(op(), rtnetlink::Error::RequestFailed))?;
        let src = route.attributes.iter().find_map(|attr| match attr {
            RouteAttribute::PrefSource(addr) => route_ip(addr),
            _ => None,
        });
        Ok(RouteLookup {
            oif: route_oif(&route),
            src,
        })
    }
}

fn addr_info(msg: &AddressMessage) -> Option<AddrInfo> {
    let mut local = None;
    let mut address = None;
    // IFA_FLAGS (32 bits) supersedes the 8-bit header field when present.
    let mut flags = AddressFlags::from_bits_retain(u32::from(msg.header.flags.bits()));
    for attr in &msg.attributes {
        match attr {
            AddressAttribute::Local(ip) => local = Some(*ip),
            AddressAttribute::Address(ip) => address = Some(*ip),
            AddressAttribute::Flags(f) => flags = *f,
            _ => {}
        }
    }
    Some(AddrInfo {
        addr: local.or(address)?,
        prefix_len: msg.header.prefix_len,
        permanent: flags.contains(AddressFlags::Permanent),
        temporary: flags.contains(AddressFlags::Secondary),
        deprecated: flags.contains(AddressFlags::Deprecated),
        tentative: (flags.contains(AddressFlags::Tentative) && !flags.contains(AddressFlags::Optimistic))
            || flags.contains(AddressFlags::Dadfailed),
    })
}

/// `RTA_TABLE` when present (tables above 255 only fit there), else the header field.
fn route_table(route: &RouteMessage) -> u32 {
    route
        .attributes
        .iter()
        .find_map(|attr| match attr {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(route.header.table))
}

/// `RTA_OIF`, or the first nexthop's interface of a multipath route (upstream reads
/// only `RTA_OIF` and so fails on ECMP default routes).
fn route_oif(route: &RouteMessage) -> Option<u32> {
    route.attributes.iter().find_map(|attr| match attr {
        RouteAttribute::Oif(index) => Some(*index),
        RouteAttribute::MultiPath(hops) => hops.first().map(|hop| hop.interface_index),
        _ => None,
    })
}

fn route_ip(addr: &netlink_packet_route::route::RouteAddress) -> Option<IpAddr> {
    use netlink_packet_route::route::RouteAddress;
    match addr {
        RouteAddress::Inet(ip) => Some(IpAddr::V4(*ip)),
        RouteAddress::Inet6(ip) => Some(IpAddr::V6(*ip)),
        _ => None,
    }
}
