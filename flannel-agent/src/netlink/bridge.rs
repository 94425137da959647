//! What the pod fast path needs to know about the pod bridge (`cni0`): its ports (the pods'
//! host-side veths) and the MAC addresses the bridge has learned on each port.

use std::collections::BTreeMap;

use futures::TryStreamExt;
use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
use netlink_packet_route::neighbour::NeighbourAttribute;
use netlink_packet_route::AddressFamily;

use super::{MacAddr, Netlink, NetlinkError};

/// `NUD_PERMANENT` (a `local` FDB entry: a port's own address, not a pod's).
const NUD_PERMANENT: u16 = 0x80;

impl Netlink {
    /// The veth ports of bridge `bridge` (index -> name).
    pub async fn bridge_veth_ports(&self, bridge: u32) -> Result<BTreeMap<u32, String>, NetlinkError> {
        let mut dump = self.handle.link().get().execute();
        let mut ports = BTreeMap::new();
        while let Some(msg) = dump
            .try_next()
            .await
            .map_err(|e| NetlinkError::request(format!("link dump for the ports of bridge {bridge}"), e))?
        {
            let (mut name, mut master, mut veth) = (None, None, false);
            for attr in msg.attributes {
                match attr {
                    LinkAttribute::IfName(n) => name = Some(n),
                    LinkAttribute::Controller(m) => master = Some(m),
                    LinkAttribute::LinkInfo(infos) => {
                        veth = infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth)));
                    }
                    _ => {}
                }
            }
            if let (Some(name), Some(master), true) = (name, master, veth) {
                if master == bridge {
                    ports.insert(msg.header.index, name);
                }
            }
        }
        Ok(ports)
    }

    /// The addresses bridge `bridge` has learned, with the port each was learned on
    /// (`bridge fdb show br <bridge>`, without the ports' own `permanent` addresses).
    pub async fn bridge_learned_macs(&self, bridge: u32) -> Result<Vec<(MacAddr, u32)>, NetlinkError> {
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
            .map_err(|e| NetlinkError::request(format!("FDB dump of bridge {bridge}"), e))?
        {
            if u16::from(msg.header.state) & NUD_PERMANENT != 0 || msg.header.ifindex == bridge {
                continue;
            }
            let mut on_bridge = false;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Controller(m) => on_bridge = *m == bridge,
                    NeighbourAttribute::LinkLayerAddress(b) => mac = MacAddr::from_slice(b),
                    _ => {}
                }
            }
            if let (true, Some(mac)) = (on_bridge, mac) {
                out.push((mac, msg.header.ifindex));
            }
        }
        Ok(out)
    }
}
