//! Link change notifications (RTNLGRP_LINK), so the agent reacts within moments
//! when someone deletes or recreates a device it owns, instead of waiting for the
//! next periodic reconcile. Upstream watches only its vxlan device's deletion and
//! then forgets the peers' entries; here any link event just wakes the reconcile,
//! which restores the whole desired state.

use futures::StreamExt;
use netlink_packet_route::RouteNetlinkMessage;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::sys::{AsyncSocket, SocketAddr};
use tokio::sync::mpsc;

use super::NetlinkError;

/// RTMGRP_LINK: the legacy multicast group bit for link changes.
const RTMGRP_LINK: u32 = 1;

/// A change to a network device, as announced by the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkEvent {
    /// The interface index.
    pub index: u32,
    /// True for RTM_DELLINK, false for RTM_NEWLINK (created or changed).
    pub deleted: bool,
}

/// Subscribes to link changes in the current network namespace. Events arrive
/// on the returned channel until it is dropped; a burst that overflows the
/// channel is collapsed (the receiver only needs to know that something changed).
pub fn link_events() -> Result<mpsc::Receiver<LinkEvent>, NetlinkError> {
    let (mut conn, _handle, mut messages) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
    conn.socket_mut()
        .socket_mut()
        .bind(&SocketAddr::new(0, RTMGRP_LINK))
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
