//! Routes of the main table: list, replace, delete, and the next hop the kernel
//! would use for an address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use futures::TryStreamExt;
use ipnet::IpNet;
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope, RouteType,
};
use netlink_packet_route::AddressFamily;
use rtnetlink::RouteMessageBuilder;

use super::{Netlink, NetlinkError};

/// `RTN_UNICAST`: a gateway or direct route (as opposed to blackhole, local, ...).
pub const RTN_UNICAST: u8 = 1;
/// `RTPROT_KERNEL`: a route the kernel made itself, such as an address's prefix route.
pub const RTPROT_KERNEL: u8 = 2;

/// A route of the main table, as dumped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteEntry {
    /// Destination prefix.
    pub dst: IpNet,
    /// `RTA_GATEWAY`, if any.
    pub gateway: Option<IpAddr>,
    /// `RTA_OIF`, if any (multipath routes have none at the top level).
    pub oif: Option<u32>,
    /// `RTNH_F_ONLINK`: the gateway is taken to be on the link without checking.
    pub onlink: bool,
    /// `rtm_protocol`: who installed it (`RTPROT_*`).
    pub protocol: u8,
    /// `RTA_PRIORITY` (the metric); 0 when absent.
    pub metric: u32,
    /// `rtm_tos`; part of an IPv4 route's key.
    pub tos: u8,
    /// `rtm_scope`.
    pub scope: u8,
    /// `rtm_type` (`RTN_*`).
    pub kind: u8,
    /// `RTA_NH_ID`: the route uses this nexthop object. The kernel still reports the
    /// object's gateway, device and `onlink` above unless `net.ipv4.nexthop_compat_mode`
    /// is 0.
    pub nhid: Option<u32>,
}

/// A unicast route to install in the main table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteSpec {
    /// Destination prefix.
    pub dst: IpNet,
    /// Next hop; same family as `dst`.
    pub gateway: IpAddr,
    /// Output interface.
    pub oif: u32,
    /// Install with `onlink` (no check that `gateway` is on the link).
    pub onlink: bool,
    /// `rtm_protocol` to mark the route with.
    pub protocol: u8,
    /// Install as `<dst> nhid <id>` through this nexthop object instead; `gateway`, `oif`
    /// and `onlink` then describe the object (for logs and comparisons).
    pub nhid: Option<u32>,
}

/// The kernel's choice of next hop for one address (`ip route get`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NextHop {
    /// Output interface.
    pub oif: Option<u32>,
    /// The gateway; `None` when the address is on-link.
    pub gateway: Option<IpAddr>,
}

impl Netlink {
    /// Every route of the main table for one family, of every type.
    pub async fn main_routes(&self, v6: bool) -> Result<Vec<RouteEntry>, NetlinkError> {
        let mut query = RouteMessage::default();
        query.header.address_family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let mut dump = self.handle.route().get(query).execute();
        let mut out = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(if v6 { "IPv6 route dump" } else { "IPv4 route dump" }, e))?
        {
            if let Some(r) = route_entry(&msg).filter(|_| table(&msg) == u32::from(RouteHeader::RT_TABLE_MAIN)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// `ip route replace <dst> via <gateway> dev <oif> [onlink] proto <protocol>`, or
    /// with `nhid`, `ip route replace <dst> nhid <id> proto <protocol>`.
    pub async fn replace_route(&self, r: &RouteSpec) -> Result<(), NetlinkError> {
        let op = || match r.nhid {
            Some(id) => format!("replace route {} nhid {id}", r.dst),
            None => format!("replace route {} via {} dev {}", r.dst, r.gateway, r.oif),
        };
        let mut msg = match (r.dst, r.gateway, r.nhid) {
            (IpNet::V4(d), IpAddr::V4(_), Some(id)) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .nhid(id)
                .build(),
            (IpNet::V6(d), IpAddr::V6(_), Some(id)) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .nhid(id)
                .build(),
            (IpNet::V4(d), IpAddr::V4(g), None) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(g)
                .output_interface(r.oif)
                .build(),
            (IpNet::V6(d), IpAddr::V6(g), None) => RouteMessageBuilder::<Ipv6Addr>::new()
                .destination_prefix(d.network(), d.prefix_len())
                .gateway(g)
                .output_interface(r.oif)
                .build(),
            _ => {
                return Err(NetlinkError::request(
                    op(),
                    rtnetlink::Error::InvalidNla("mixed families".into()),
                ))
            }
        };
        msg.header.protocol = RouteProtocol::from(r.protocol);
        if r.onlink && r.nhid.is_none() {
            msg.header.flags.insert(RouteFlags::Onlink);
        }
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request(op(), e))
    }

    /// `ip route replace <dst> dev <oif> scope universe proto <protocol>`: a route with no
    /// gateway, as upstream's udp backend installs for the whole cluster network through
    /// its TUN device (a point-to-point device needs no next hop).
    pub async fn replace_device_route(&self, dst: ipnet::Ipv4Net, oif: u32, protocol: u8) -> Result<(), NetlinkError> {
        let mut msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst.network(), dst.prefix_len())
            .output_interface(oif)
            .build();
        msg.header.protocol = RouteProtocol::from(protocol);
        msg.header.scope = RouteScope::Universe;
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("replace route {dst} dev {oif}"), e))
    }

    /// Deletes exactly `r` (matching its gateway and device, or its nexthop object, and
    /// its metric, protocol, scope and type); a route already gone is not an error.
    pub async fn delete_route(&self, r: &RouteEntry) -> Result<(), NetlinkError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = if r.dst.addr().is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.destination_prefix_length = r.dst.prefix_len();
        msg.header.table = RouteHeader::RT_TABLE_MAIN;
        msg.header.tos = r.tos;
        msg.header.protocol = RouteProtocol::from(r.protocol);
        msg.header.scope = RouteScope::from(r.scope);
        msg.header.kind = RouteType::from(r.kind);
        msg.attributes.push(RouteAttribute::Destination(r.dst.network().into()));
        if let Some(id) = r.nhid {
            // A route through a nexthop object matches a delete only by its id: with a
            // gateway or device in the request the kernel finds nothing (ESRCH).
            msg.attributes.push(RouteAttribute::NhId(id));
        } else {
            if let Some(g) = r.gateway {
                msg.attributes.push(RouteAttribute::Gateway(g.into()));
            }
            if let Some(oif) = r.oif {
                msg.attributes.push(RouteAttribute::Oif(oif));
            }
        }
        if r.metric > 0 {
            msg.attributes.push(RouteAttribute::Priority(r.metric));
        }
        match self.handle.route().del(msg).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::request(format!("delete route {} via {:?} dev {:?}", r.dst, r.gateway, r.oif), e);
                // IPv4 answers ESRCH for a missing route, IPv6 ENOENT.
                if matches!(e.raw_os_error(), Some(libc::ESRCH | libc::ENOENT)) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `ip route get <dst>`: the interface and gateway the kernel would use.
    pub async fn next_hop(&self, dst: IpAddr) -> Result<NextHop, NetlinkError> {
        let mut query = RouteMessage::default();
        let (family, len) = if dst.is_ipv6() {
            (AddressFamily::Inet6, 128)
        } else {
            (AddressFamily::Inet, 32)
        };
        query.header.address_family = family;
        query.header.destination_prefix_length = len;
        query.attributes.push(RouteAttribute::Destination(dst.into()));
        let op = || format!("route lookup for {dst}");
        let mut reply = self.handle.route().get(query).execute();
        let mut answer = None;
        while let Some(msg) = reply.try_next().await.map_err(|e| NetlinkError::request(op(), e))? {
            answer.get_or_insert(msg);
        }
        let msg = answer.ok_or_else(|| NetlinkError::request(op(), rtnetlink::Error::RequestFailed))?;
        let r = route_entry(&msg);
        Ok(NextHop {
            oif: r.and_then(|r| r.oif),
            gateway: r.and_then(|r| r.gateway),
        })
    }
}

fn table(msg: &RouteMessage) -> u32 {
    msg.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(msg.header.table))
}

fn route_entry(msg: &RouteMessage) -> Option<RouteEntry> {
    let h = &msg.header;
    let v6 = match h.address_family {
        AddressFamily::Inet => false,
        AddressFamily::Inet6 => true,
        _ => return None,
    };
    let mut dst = None;
    let mut r = RouteEntry {
        dst: IpNet::default(),
        gateway: None,
        oif: None,
        onlink: h.flags.contains(RouteFlags::Onlink),
        protocol: h.protocol.into(),
        metric: 0,
        tos: h.tos,
        scope: h.scope.into(),
        kind: h.kind.into(),
        nhid: None,
    };
    for a in &msg.attributes {
        match a {
            RouteAttribute::Destination(d) => dst = address(d),
            RouteAttribute::Gateway(g) => r.gateway = address(g),
            RouteAttribute::Oif(i) => r.oif = Some(*i),
            RouteAttribute::Priority(p) => r.metric = *p,
            RouteAttribute::NhId(id) => r.nhid = Some(*id),
            _ => {}
        }
    }
    let unspecified: IpAddr = if v6 {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    r.dst = IpNet::new(dst.unwrap_or(unspecified), h.destination_prefix_length).ok()?;
    Some(r)
}

fn address(a: &RouteAddress) -> Option<IpAddr> {
    match a {
        RouteAddress::Inet(ip) => Some((*ip).into()),
        RouteAddress::Inet6(ip) => Some((*ip).into()),
        _ => None,
    }
}
