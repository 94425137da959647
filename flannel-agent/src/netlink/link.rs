//! Links: looking one up by name with its VXLAN parameters, creating a VXLAN
//! device, deleting a link, setting it up or changing its MAC address.

use std::net::IpAddr;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoData, InfoKind, InfoVxlan, LinkAttribute, LinkFlags, LinkInfo, LinkMessage};
use rtnetlink::{LinkUnspec, LinkVxlan};

use super::{MacAddr, Netlink, NetlinkError};

/// A link as [`Netlink::link_by_name`] reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkDetails {
    /// Interface index.
    pub index: u32,
    /// Interface name.
    pub name: String,
    /// `IFLA_INFO_KIND` (`"vxlan"`, `"veth"`, ...); empty for a physical device.
    pub kind: String,
    /// The link-layer address, when it is an Ethernet one.
    pub mac: Option<MacAddr>,
    /// MTU.
    pub mtu: u32,
    /// `IFF_UP` is set.
    pub up: bool,
    /// The VXLAN parameters, when `kind` is `vxlan`.
    pub vxlan: Option<VxlanParams>,
}

/// The parameters of a VXLAN device that flannel sets or compares
/// (upstream's `vxlanLinksIncompat`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VxlanParams {
    /// VNI (`id`).
    pub vni: u32,
    /// Index of the underlay device (`dev`); 0 when unset.
    pub dev_index: u32,
    /// Source address of encapsulated packets (`local`).
    pub local: Option<IpAddr>,
    /// Multicast group or default remote (`group`/`remote`); flannel sets none.
    pub group: Option<IpAddr>,
    /// UDP destination port (`dstport`); 0 on creation means the kernel default (8472).
    pub port: u16,
    /// Kernel MAC learning.
    pub learning: bool,
    /// VXLAN Group Based Policy extension.
    pub gbp: bool,
    /// Netlink notifications on FDB misses.
    pub l2miss: bool,
    /// Netlink notifications on neighbour misses.
    pub l3miss: bool,
}

impl Netlink {
    /// The link called `name`, or `None` if there is none.
    pub async fn link_by_name(&self, name: &str) -> Result<Option<LinkDetails>, NetlinkError> {
        let mut reply = self.handle.link().get().match_name(name).execute();
        match reply.try_next().await {
            Ok(Some(msg)) => Ok(Some(link_details(msg))),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = NetlinkError::request(format!("get link {name}"), e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `ip link add <name> address <mac> mtu <mtu> type vxlan ...`: creates the device
    /// (down) and returns its index. Fails with `EEXIST` if the name is taken.
    pub async fn create_vxlan(&self, name: &str, p: &VxlanParams, mac: MacAddr, mtu: u32) -> Result<u32, NetlinkError> {
        let mut b = LinkVxlan::new(name, p.vni)
            .address(mac.0.to_vec())
            .mtu(mtu)
            .learning(p.learning)
            .l2miss(p.l2miss)
            .l3miss(p.l3miss);
        if p.dev_index > 0 {
            b = b.dev(p.dev_index);
        }
        match p.local {
            Some(IpAddr::V4(a)) => b = b.local(a),
            Some(IpAddr::V6(a)) => b = b.local6(a),
            None => {}
        }
        match p.group {
            Some(IpAddr::V4(a)) => b = b.group(a),
            Some(IpAddr::V6(a)) => b = b.group6(a),
            None => {}
        }
        // Without IFLA_VXLAN_PORT the kernel uses its default (8472), as upstream relies on.
        if p.port > 0 {
            b = b.port(p.port);
        }
        if p.gbp {
            b = b.gbp();
        }
        let op = || format!("create vxlan link {name}");
        self.handle
            .link()
            .add(b.build())
            .execute()
            .await
            .map_err(|e| NetlinkError::request(op(), e))?;
        match self.link_by_name(name).await? {
            Some(l) => Ok(l.index),
            // Deleted again between the two calls: report it as the kernel would.
            None => Err(NetlinkError::request(op(), rtnetlink::Error::RequestFailed)),
        }
    }

    /// `ip link del`; a link that is already gone is not an error.
    pub async fn delete_link(&self, index: u32) -> Result<(), NetlinkError> {
        match self.handle.link().del(index).execute().await {
            Ok(()) => Ok(()),
            Err(e) => {
                let e = NetlinkError::request(format!("delete link {index}"), e);
                if e.raw_os_error() == Some(libc::ENODEV) {
                    Ok(())
                } else {
                    Err(e)
                }
            }
        }
    }

    /// `ip link set <index> up`.
    pub async fn set_link_up(&self, index: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).up().build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("set link {index} up"), e))
    }

    /// `ip link set <index> mtu <mtu> txqueuelen <qlen>`.
    pub async fn set_link_mtu(&self, index: u32, mtu: u32, qlen: u32) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).mtu(mtu).txqueuelen(qlen).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("set link {index} mtu {mtu} txqueuelen {qlen}"), e))
    }

    /// `ip link set <index> address <mac>`.
    pub async fn set_link_mac(&self, index: u32, mac: MacAddr) -> Result<(), NetlinkError> {
        let msg = LinkUnspec::new_with_index(index).address(mac.0.to_vec()).build();
        self.handle
            .link()
            .set(msg)
            .execute()
            .await
            .map_err(|e| NetlinkError::request(format!("set link {index} address {mac}"), e))
    }
}

/// Sets `net.ipv6.conf.<dev>.accept_ra` to 0, as upstream does for its VXLAN devices:
/// a router advertisement arriving over the overlay must not add routes or addresses.
/// This is a sysctl, not netlink, but it belongs with the link it configures.
/// `/proc/sys/net` is that of the calling thread's network namespace.
pub fn disable_accept_ra(dev: &str) -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv6/conf/{dev}/accept_ra"), "0")
}

fn link_details(msg: LinkMessage) -> LinkDetails {
    let mut l = LinkDetails {
        index: msg.header.index,
        name: String::new(),
        kind: String::new(),
        mac: None,
        mtu: 0,
        up: msg.header.flags.contains(LinkFlags::Up),
        vxlan: None,
    };
    for attr in msg.attributes {
        match attr {
            LinkAttribute::IfName(n) => l.name = n,
            LinkAttribute::Mtu(m) => l.mtu = m,
            LinkAttribute::Address(a) => l.mac = MacAddr::from_slice(&a),
            LinkAttribute::LinkInfo(infos) => {
                for info in infos {
                    match info {
                        LinkInfo::Kind(k) => l.kind = k.to_string(),
                        LinkInfo::Data(InfoData::Vxlan(v)) => l.vxlan = Some(vxlan_params(&v)),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    if l.kind != InfoKind::Vxlan.to_string() {
        l.vxlan = None;
    }
    l
}

fn vxlan_params(attrs: &[InfoVxlan]) -> VxlanParams {
    let mut p = VxlanParams::default();
    for a in attrs {
        match a {
            InfoVxlan::Id(v) => p.vni = *v,
            InfoVxlan::Link(i) => p.dev_index = *i,
            InfoVxlan::Local(a) => p.local = Some((*a).into()),
            InfoVxlan::Local6(a) => p.local = Some((*a).into()),
            InfoVxlan::Group(a) => p.group = Some((*a).into()),
            InfoVxlan::Group6(a) => p.group = Some((*a).into()),
            InfoVxlan::Port(v) => p.port = *v,
            InfoVxlan::Learning(b) => p.learning = *b,
            InfoVxlan::Gbp => p.gbp = true,
            InfoVxlan::L2Miss(b) => p.l2miss = *b,
            InfoVxlan::L3Miss(b) => p.l3miss = *b,
            _ => {}
        }
    }
    // The kernel reports an unset local/group as 0.0.0.0 or ::.
    p.local = p.local.filter(|a| !a.is_unspecified());
    p.group = p.group.filter(|a| !a.is_unspecified());
    p
}
