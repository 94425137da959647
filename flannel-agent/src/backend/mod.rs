//! Backends: how this node reaches the other nodes' subnets.
//!
//! A backend prepares its devices before the lease is acquired (so the lease can
//! carry its data, such as the VTEP MAC), then converges the datapath on the
//! current [`PeerSet`] whenever it changes and periodically. It is never told
//! "add this" or "remove that": it compares the desired set with what it owns,
//! and deletes only when the set is [`PeerSet::complete`]. Nothing is removed on
//! shutdown, so a restart does not disturb traffic.

pub mod hostgw;
pub mod none;
pub mod routes;
pub mod udp;
pub mod vxlan;

use async_trait::async_trait;
use serde_json::Value;

use crate::config::NetworkConfig;
use crate::netlink::ExternalInterface;
use crate::subnet::{Lease, PeerSet, StoredNode};

/// What a backend publishes in the lease, and the MTU pods get.
#[derive(Debug, Clone, PartialEq)]
pub struct BackendInfo {
    /// `BackendType` of the lease.
    pub backend_type: String,
    /// `BackendData` of the lease.
    pub backend_data: Option<Value>,
    /// `BackendV6Data` of the lease.
    pub backend_v6_data: Option<Value>,
    /// `FLANNEL_MTU`.
    pub mtu: u32,
}

/// A backend failure; each names the object and the operation.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The backend's options in net-conf are wrong.
    #[error("invalid Backend option {option} = {value}: {expected}")]
    Option {
        /// The option name, as in net-conf.json.
        option: &'static str,
        /// The value found.
        value: String,
        /// What is accepted.
        expected: String,
    },
    /// The backend cannot run here (kernel, interface, address).
    #[error("{0}")]
    Unsupported(String),
    /// A kernel operation failed.
    #[error("{op} {object} failed: {detail}")]
    Kernel {
        /// The operation (`create link`, `replace route`, ...).
        op: &'static str,
        /// The object it was applied to.
        object: String,
        /// The kernel's error.
        detail: String,
    },
}

/// How remote subnets are reached.
#[async_trait]
pub trait Backend: Send {
    /// The backend's name for logs.
    fn name(&self) -> &'static str;

    /// Creates or adopts the backend's devices and says what goes in the lease.
    async fn prepare(&mut self, ext: &ExternalInterface, config: &NetworkConfig) -> Result<BackendInfo, BackendError>;

    /// Configures what depends on our own lease (device addresses).
    async fn set_own_lease(&mut self, lease: &Lease) -> Result<(), BackendError>;

    /// Converges the datapath on `peers`; returns how many peers are programmed.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<usize, BackendError>;

    /// Hands over what this node stored before (e.g. its VTEP MACs), called once
    /// before [`Backend::prepare`]; backends with nothing to reuse ignore it.
    fn use_stored(&mut self, _stored: &StoredNode) {}

    /// The datapath's state for `/status/datapath` and `flannelctl` (which datapath runs and
    /// why, the peers as programmed); `null` for a backend with nothing to say.
    fn status(&self) -> Value {
        Value::Null
    }

    /// Counters the backend updates on its own (a userspace datapath's), for `/metrics`
    /// and `/status/datapath`; asked once, after [`Backend::prepare`].
    fn live_report(&self) -> Option<std::sync::Arc<dyn crate::health::LiveReport>> {
        None
    }
}

/// The backend types upstream has that flannel-rs does not implement, with why.
pub fn unsupported_reason(backend_type: &str) -> Option<&'static str> {
    match backend_type {
        "ipip" | "wireguard" | "ipsec" => {
            Some("is not implemented by flannel-rs; use vxlan (eBPF or kernel datapath), host-gw or udp")
        }
        "extension" | "alloc" | "tencent-vpc" => Some("is not implemented by flannel-rs"),
        _ => None,
    }
}
