//! Neighbour (ARP/NDP) entries and VXLAN forwarding-database (FDB) entries of one
//! link: list, replace, delete. Both are `RTM_*NEIGH` messages; FDB entries use
//! `AF_BRIDGE` with `NTF_SELF`, which addresses the VXLAN device's own table.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourFlags, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::AddressFamily;

use super::{MacAddr, Netlink, NetlinkError};

/// A neighbour entry of one link.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbour {
    /// The neighbour's IP address.
    pub ip: IpAddr,
    /// Its link-layer address, when the entry has one (an `INCOMPLETE` entry has none).
    pub mac: Option<MacAddr>,
    /// `NUD_PERMANENT`: installed by someone, never aged out by the kernel.
    pub permanent: bool,
}

/// A forwarding-database entry of a VXLAN device (`bridge fdb ... self`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FdbEntry {
    /// The inner destination MAC.
    pub mac: MacAddr,
    /// The remote VTEP address packets for `mac` are sent to.
    pub dst: Option<IpAddr>,
    /// `NUD_PERMANENT`: installed, not learned.
    pub permanent: bool,
}

impl Netlink {
    /// The IPv4 (or, with `v6`, IPv6) neighbour entries of link `index`.
    pub async fn neighbours(&self, index: u32, v6: bool) -> Result<Vec<Neighbour>, NetlinkError> {
        let family = if v6 { AddressFamily::Inet6 } else { AddressFamily::Inet };
        let mut req = self.handle.neighbours().get().set_address_family(family);
        // The kernel filters on NDA_IFINDEX; the check below covers kernels that don't.
        req.message_mut().attributes.push(NeighbourAttribute::IfIndex(index));
        let mut dump = req.execute();
        let mut out = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(format!("neighbour dump of link {index}"), e))?
        {
            if msg.header.ifindex != index || msg.header.family != family {
                continue;
            }
            if let Some(ip) = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => neighbour_ip(d),
                _ => None,
            }) {
                out.push(Neighbour {
                    ip,
                    mac: lladdr(&msg),
                    permanent: is_permanent(&msg),
                });
            }
        }
        Ok(out)
    }

    /// `ip neigh replace <ip> lladdr <mac> dev <index> nud permanent`.
    pub async fn replace_neighbour(&self, index: u32, ip: IpAddr, mac: MacAddr) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add(index, ip)
            .link_layer_address(&mac.0)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("replace neighbour {ip} lladdr {mac} on link {index}"), e))
    }

    /// `ip neigh del <ip> dev <index>`; an entry already gone is not an error.
    pub async fn delete_neighbour(&self, index: u32, ip: IpAddr) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = if ip.is_ipv6() {
            AddressFamily::Inet6
        } else {
            AddressFamily::Inet
        };
        msg.header.ifindex = index;
        msg.attributes.push(NeighbourAttribute::Destination(match ip {
            IpAddr::V4(a) => NeighbourAddress::Inet(a),
            IpAddr::V6(a) => NeighbourAddress::Inet6(a),
        }));
        let r = self.handle.neighbours().del(msg).execute().await;
        absent_is_ok(r, || format!("delete neighbour {ip} on link {index}"))
    }

    /// The FDB entries of VXLAN link `index` (its own table, `NTF_SELF`).
    pub async fn fdb_entries(&self, index: u32) -> Result<Vec<FdbEntry>, NetlinkError> {
        let mut dump = self
            .handle
            .neighbours()
            .get()
            .set_address_family(AddressFamily::Bridge)
            .execute();
        let mut out = Vec::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(format!("FDB dump of link {index}"), e))?
        {
            // The dump covers every bridge and bridge port too; keep this device's own entries.
            if msg.header.ifindex != index || !msg.header.flags.contains(NeighbourFlags::Own) {
                continue;
            }
            let Some(mac) = lladdr(&msg) else { continue };
            let dst = msg.attributes.iter().find_map(|a| match a {
                NeighbourAttribute::Destination(d) => neighbour_ip(d),
                _ => None,
            });
            out.push(FdbEntry {
                mac,
                dst,
                permanent: is_permanent(&msg),
            });
        }
        Ok(out)
    }

    /// `bridge fdb replace <mac> dev <index> dst <dst> self permanent`. On a VXLAN
    /// device, replace rewrites the first remote of an existing entry for `mac`.
    pub async fn replace_fdb(&self, index: u32, mac: MacAddr, dst: IpAddr) -> Result<(), NetlinkError> {
        self.handle
            .neighbours()
            .add_bridge(index, &mac.0)
            .destination(dst)
            .flags(NeighbourFlags::Own)
            .state(NeighbourState::Permanent)
            .replace()
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("replace FDB entry {mac} dst {dst} on link {index}"), e))
    }

    /// `bridge fdb del <mac> dev <index> dst <dst> self`: removes that one remote;
    /// an entry already gone is not an error.
    pub async fn delete_fdb(&self, index: u32, mac: MacAddr, dst: Option<IpAddr>) -> Result<(), NetlinkError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Bridge;
        msg.header.ifindex = index;
        msg.header.flags = NeighbourFlags::Own;
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.0.to_vec()));
        if let Some(ip) = dst {
            msg.attributes.push(NeighbourAttribute::Destination(match ip {
                IpAddr::V4(a) => NeighbourAddress::Inet(a),
                IpAddr::V6(a) => NeighbourAddress::Inet6(a),
            }));
        }
        let r = self.handle.neighbours().del(msg).execute().await;
        absent_is_ok(r, || format!("delete FDB entry {mac} on link {index}"))
    }
}

fn absent_is_ok(r: Result<(), rtnetlink::Error>, op: impl FnOnce() -> String) -> Result<(), NetlinkError> {
    match r {
        Ok(()) => Ok(()),
        Err(e) => {
            let e = NetlinkError::request(op(), e);
            if e.raw_os_error() == Some(libc::ENOENT) {
                Ok(())
            } else {
                Err(e)
            }
        }
    }
}

/// `NUD_PERMANENT` is a bit: `bridge fdb add ... permanent` stores
/// `NUD_NOARP | NUD_PERMANENT`, which the parsed state shows as `Other(0xc0)`.
fn is_permanent(msg: &NeighbourMessage) -> bool {
    const NUD_PERMANENT: u16 = 0x80;
    u16::from(msg.header.state) & NUD_PERMANENT != 0
}

fn lladdr(msg: &NeighbourMessage) -> Option<MacAddr> {
    msg.attributes.iter().find_map(|a| match a {
        NeighbourAttribute::LinkLayerAddress(b) => MacAddr::from_slice(b),
        _ => None,
    })
}

/// The IP in `NDA_DST`. In an `AF_BRIDGE` message the attribute is parsed as raw
/// bytes (its family is not in the header), so its length says which it is.
fn neighbour_ip(d: &NeighbourAddress) -> Option<IpAddr> {
    match d {
        NeighbourAddress::Inet(a) => Some((*a).into()),
        NeighbourAddress::Inet6(a) => Some((*a).into()),
        NeighbourAddress::Other(b) => match b.len() {
            4 => <[u8; 4]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            16 => <[u8; 16]>::try_from(b.as_slice()).ok().map(IpAddr::from),
            _ => None,
        },
        _ => None,
    }
}
