//! The agent's only user of rtnetlink.
//!
//! [`Netlink`] owns the rtnetlink connection; everything that reads or changes links,
//! addresses, routes, neighbours or FDB entries is a method on it, so the rest of the
//! agent (backends included) never sees netlink message types. Methods return plain
//! data ([`LinkInfo`], [`AddrInfo`], ...) and [`NetlinkError`].
//!
//! * `dump`: link, address and route reads.
//! * [`iface`]: upstream's external interface selection (`--iface` and friends).
//! * `nexthop`: nexthop objects, hand-encoded (rtnetlink has no such messages).
//! * `link`, `addr`, `neigh`, `route`: the objects the kernel-datapath backends
//!   (vxlan, host-gw) create and reconcile: VXLAN devices, their addresses,
//!   neighbour and FDB entries, and routes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

mod addr;
mod bridge;
mod dump;
mod events;
pub mod iface;
#[cfg(test)]
pub(crate) mod lab;
mod link;
mod mac;
mod neigh;
mod nexthop;
mod pipeline;
mod route;
#[cfg(test)]
pub(crate) mod testutil;

pub use dump::{AddrInfo, DefaultRoute, LinkInfo, RouteLookup};
pub use events::{link_events, LinkEvent};
pub use iface::{ExternalInterface, HostView, IfaceError, IfaceSelection};
pub use link::{disable_accept_ra, LinkDetails, VxlanParams};
pub use mac::{MacAddr, MacParseError};
pub use neigh::{FdbEntry, Neighbour};
pub use nexthop::{NexthopEntry, NexthopSpec};
pub use pipeline::{pipelined, REQUEST_TIMEOUT, WINDOW};
pub use route::{NextHop, RouteEntry, RouteSpec, RTN_UNICAST, RTPROT_KERNEL};

/// A handle on an rtnetlink socket in the network namespace of the thread that
/// created it. Cheap to clone; all clones share one socket.
#[derive(Clone, Debug)]
pub struct Netlink {
    handle: rtnetlink::Handle,
    /// A second socket for the messages rtnetlink cannot carry (see `nexthop`).
    nexthop: nexthop::NexthopHandle,
}

impl Netlink {
    /// Opens an rtnetlink socket and spawns its connection task on the current tokio
    /// runtime. The task ends when the last clone of the returned handle is dropped.
    ///
    /// Panics if called outside a tokio runtime (the task has to run somewhere).
    pub fn new() -> Result<Self, NetlinkError> {
        let (mut connection, handle, _) = rtnetlink::new_connection().map_err(NetlinkError::Socket)?;
        grow_receive_buffer(connection.socket_mut().as_raw_fd());
        tokio::spawn(connection);
        let nexthop = nexthop::connect().map_err(NetlinkError::Socket)?;
        Ok(Self { handle, nexthop })
    }
}

/// Asks for [`pipeline::RECV_BUFFER`] bytes of receive buffer: with many requests in flight
/// ([`pipelined`]) their answers queue there, and an answer that does not fit is dropped by
/// the kernel. `SO_RCVBUFFORCE` (root, `CAP_NET_ADMIN`) may exceed `net.core.rmem_max`;
/// without the capability `SO_RCVBUF` gets what the sysctl allows, and a lost answer
/// surfaces as a timeout of that one request.
fn grow_receive_buffer(fd: RawFd) {
    let size = libc::c_int::try_from(pipeline::RECV_BUFFER).unwrap_or(libc::c_int::MAX);
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_RCVBUF] {
        // SAFETY: fd is the open netlink socket; the option value is a c_int of the size passed.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                std::ptr::from_ref(&size).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc == 0 {
            return;
        }
    }
    tracing::debug!(error = %io::Error::last_os_error(), "could not grow the rtnetlink receive buffer");
}

/// A netlink operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    /// The rtnetlink socket could not be opened.
    #[error("could not open an rtnetlink socket: {0}")]
    Socket(io::Error),
    /// The kernel (or rtnetlink) rejected a request.
    #[error("netlink {op} failed: {}", describe(.cause))]
    Request {
        /// What was asked, with its object: `"route lookup for 10.0.0.1"`.
        op: String,
        /// The error from rtnetlink.
        cause: rtnetlink::Error,
    },
    /// The kernel did not answer a request in time (its answer was lost, for example
    /// because the socket's receive buffer overflowed); the next reconcile retries.
    #[error("netlink request got no answer within {} s", .0.as_secs())]
    Timeout(std::time::Duration),
}

impl NetlinkError {
    fn request(op: impl Into<String>, cause: rtnetlink::Error) -> Self {
        NetlinkError::Request { op: op.into(), cause }
    }

    /// The errno the kernel answered with, if it was a kernel error. Callers use it to
    /// treat `EEXIST`/`ENOENT` as success where the operation is idempotent.
    pub fn raw_os_error(&self) -> Option<i32> {
        match self {
            NetlinkError::Socket(e) => e.raw_os_error(),
            NetlinkError::Request {
                cause: rtnetlink::Error::NetlinkError(msg),
                ..
            } => Some(msg.raw_code().abs()),
            NetlinkError::Request { .. } | NetlinkError::Timeout(_) => None,
        }
    }
}

/// rtnetlink's Display for kernel errors is "Received a netlink error message X";
/// the errno text alone reads better in one log line.
fn describe(cause: &rtnetlink::Error) -> String {
    match cause {
        rtnetlink::Error::NetlinkError(msg) => msg.to_io().to_string(),
        other => other.to_string(),
    }
}
