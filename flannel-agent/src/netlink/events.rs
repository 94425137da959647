//! Link change notifications (RTNLGRP_LINK), so the agent reacts within moments
//! when someone deletes or recreates a device it owns, instead of waiting for the
//! next periodic reconcile. Upstream watches only its vxlan device's deletion and
//! then forgets the peers' entries; here any link event just wakes the reconcile,
//! which restores the whole desired state.
//!
//! The same subscription reports addresses a bridge learns on a port (a new pod's first
//! frame through `cni0`), which the pod fast path needs to map the pod's address to its veth.

use futures::StreamExt;
use netlink_packet_route::neighbour::NeighbourAttribute;
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

use super::NetlinkError;

/// RTMGRP_LINK: the legacy multicast group bit for link changes.
const RTMGRP_LINK: u32 = 1;
/// RTMGRP_NEIGH: neighbour and FDB changes.
const RTMGRP_NEIGH: u32 = 4;
/// `NUD_PERMANENT`: a port's own address in the FDB, not a learned one.
const NUD_PERMANENT: u16 = 0x80;

/// A change to a network device, as announced by the kernel, or an address a bridge learned
/// on one of its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// The interface index (the bridge port, for a learned address).
    pub index: u32,
    /// True for RTM_DELLINK, false for RTM_NEWLINK (created or changed) and learned addresses.
    pub deleted: bool,
}

/// Subscribes to link changes (and addresses learned by bridges) in the current network
/// namespace. Events arrive
/// on the returned channel until it is dropped; a burst that overflows the
/// channel is collapsed (the receiver only needs to know that something changed).
pub fn link_events() -> Result<mpsc::Receiver<LinkEvent>, NetlinkError> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK | RTMGRP_NEIGH))
        .map_err(NetlinkError::Socket)?;
    tokio::spawn(conn);
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        // `_handle` must outlive the loop: dropping it would end the connection task.
        let _keep = _handle;
        while let Some((msg, _)) = messages.next().await {
            let ev = match msg.payload {
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewLink(l)) => LinkEvent {
                    index: l.header.index,
                    deleted: false,
                },
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelLink(l)) => LinkEvent {
                    index: l.header.index,
                    deleted: true,
                },
                // Only new learned bridge entries: ARP/NDP state changes are far too frequent
                // to wake the reconcile, and the periodic pass catches the rest.
                NetlinkPayload::InnerMessage(RouteNetlinkMessage::NewNeighbour(n))
                    if n.header.family == AddressFamily::Bridge
                        && u16::from(n.header.state) & NUD_PERMANENT == 0
                        && n.attributes
                            .iter()
                            .any(|a| matches!(a, NeighbourAttribute::Controller(_))) =>
                {
                    LinkEvent {
                        index: n.header.ifindex,
                        deleted: false,
                    }
                }
                _ => continue,
            };
            match tx.try_send(ev) {
                Ok(()) | Err(mpsc::error::TrySendError::Full(_)) => {}
                Err(mpsc::error::TrySendError::Closed(_)) => return,
            }
        }
    });
    Ok(rx)
}
