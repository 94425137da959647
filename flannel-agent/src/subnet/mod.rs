//! Subnet leases: what they are, where they are kept, and which of them the
//! datapath may use.
//!
//! A [`SubnetManager`] reads the network config, acquires this node's lease,
//! keeps it alive and publishes the validated set of peers ([`PeerSet`]) on a
//! `tokio::sync::watch` channel. Backends converge on the latest set; they never
//! replay individual events, so a missed or reordered event cannot leave stale
//! state behind.

pub mod alloc;
pub mod etcd;
pub mod key;
pub mod kube;
pub mod lease;
pub mod memory;
pub mod validate;

use std::net::Ipv4Addr;

use async_trait::async_trait;
use ipnet::{Ipv4Net, Ipv6Net};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub use key::SubnetKey;
pub use lease::{Lease, LeaseAttrs, LeaseParseError};
pub use validate::{Candidate, LeaseValidator, PeerSet};

use crate::config::{ConfigError, NetworkConfig};

/// The subnets this node held before, read back from `subnet.env`; tried after
/// a lease with our PublicIP and before a random subnet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreviousSubnets {
    /// `FLANNEL_SUBNET`, as a network.
    pub v4: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_SUBNET`, as a network.
    pub v6: Option<Ipv6Net>,
}

/// What this node published in the store before, read back at start-up so a
/// restart keeps it (upstream's `GetStoredMacAddresses` and `GetStoredPublicIP`).
/// Every field is `None` when the store has nothing, or when reading it failed:
/// this is a hint, never a reason to stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StoredNode {
    /// The stored IPv4 backend data (vxlan: `{"VNI":1,"VtepMAC":"..."}`).
    pub backend_data: Option<serde_json::Value>,
    /// The stored IPv6 backend data.
    pub backend_v6_data: Option<serde_json::Value>,
    /// An operator-set address that replaces `--public-ip` (kube: `node-public-ip`).
    pub public_ip: Option<Ipv4Addr>,
    /// An operator-set address that replaces `--public-ipv6` (kube: `node-public-ipv6`).
    pub public_ipv6: Option<std::net::Ipv6Addr>,
}

impl StoredNode {
    /// The VTEP MAC of the stored IPv4 backend data, for the vxlan device to reuse so
    /// that peers' FDB and neighbour entries stay valid across a restart.
    pub fn vtep_mac(&self) -> Option<&str> {
        self.backend_data.as_ref()?.get("VtepMAC")?.as_str()
    }

    /// The VTEP MAC of the stored IPv6 backend data.
    pub fn vtep_v6_mac(&self) -> Option<&str> {
        self.backend_v6_data.as_ref()?.get("VtepMAC")?.as_str()
    }
}

/// A failure of the subnet manager. Variants say what failed on which object.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    /// A call to the store failed (it is retried where that makes sense).
    #[error("{op} {object} failed: {detail}; check that the store is reachable and the credentials are valid")]
    Store {
        /// What was being done (`get`, `put`, `watch`, `lease grant`, ...).
        op: &'static str,
        /// The key or prefix, or the store endpoint.
        object: String,
        /// The store's own error text.
        detail: String,
    },
    /// The network config is absent from the store.
    #[error("flannel config not found in etcd store at {key}: write it with `etcdctl put {key} '{{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}'` (etcd v3 API)")]
    ConfigMissing {
        /// The key that was read.
        key: String,
    },
    /// The network config is present but invalid.
    #[error("invalid network config at {location}: {error}")]
    Config {
        /// The key or file it came from.
        location: String,
        /// What is wrong with it (shown in the message, so not also a `source`).
        error: ConfigError,
    },
    /// No free subnet is left in `SubnetMin..SubnetMax`.
    #[error("out of subnets: every /{len} between {min} and {max} is leased; widen SubnetMin/SubnetMax or remove stale leases")]
    OutOfSubnets {
        /// `SubnetLen`.
        len: u8,
        /// `SubnetMin`.
        min: String,
        /// `SubnetMax`.
        max: String,
    },
    /// Other nodes kept winning the race for free subnets.
    #[error("could not acquire a subnet lease after {0} attempts: other nodes kept taking the candidates; retry")]
    Contended(u32),
    /// The config is one the store cannot serve.
    #[error("{0}")]
    Unsupported(String),
}

/// Where leases are kept: etcd, the Kubernetes API, or memory (tests).
#[async_trait]
pub trait SubnetManager: Send + Sync {
    /// A short name for logs (`etcd`, `kube`, `memory`).
    fn name(&self) -> &'static str;

    /// Reads and validates the network config.
    async fn network_config(&self) -> Result<NetworkConfig, SubnetError>;

    /// Acquires this node's lease: reuses one with our PublicIP, else the
    /// previous subnet, else a free one. Safe against other nodes doing the same.
    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: PreviousSubnets,
    ) -> Result<Lease, SubnetError>;

    /// What this node stored before (its VTEP MACs, an operator-set public IP),
    /// read before the backend is prepared. Stores that keep nothing of the kind
    /// answer [`StoredNode::default`].
    async fn stored_node(&self) -> StoredNode {
        StoredNode::default()
    }

    /// Keeps `own` alive and publishes the validated peers on `peers` until
    /// `shutdown` fires. Store outages are retried inside; the last published
    /// set stays in place meanwhile. Returns on shutdown.
    async fn run(
        &self,
        config: NetworkConfig,
        own: Lease,
        peers: watch::Sender<PeerSet>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError>;
}

/// Whether an address can stand for this node on the underlay.
pub fn usable_public_ip(ip: Ipv4Addr) -> bool {
    !(ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() || ip.is_broadcast())
}
