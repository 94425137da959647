//! The `host-gw` backend: a route per peer, `<peer subnet> via <peer PublicIP>
//! dev <external interface>` (and the same for IPv6 via `PublicIPv6`). No device,
//! no encapsulation; every node must be on one L2 segment.
//!
//! Ownership: the main-table routes marked [`RTPROT_FLANNEL`] whose destination
//! lies inside the cluster network (`Network` / `IPv6Network`) are flannel's. A
//! route matching a peer's route exactly but marked otherwise (upstream flanneld
//! uses the kernel default `boot`) is adopted by re-marking it. Everything else is
//! left alone, except a route sitting in the exact slot a peer's route needs (see
//! [`crate::backend::routes`]).
//!
//! Upstream keeps the routes it added in memory and re-adds missing ones every
//! 10 s; it never deletes a route it did not see a removal event for, so routes of
//! nodes removed while it was down stay forever. Here the table is reconciled.

#[cfg(test)]
mod netns_tests;

use std::collections::{BTreeMap, HashMap, HashSet};

use async_trait::async_trait;
use ipnet::IpNet;
use tracing::{debug, info, warn};

use super::routes::{self, family_of, RTPROT_FLANNEL};
use super::{Backend, BackendError, BackendInfo};
use crate::config::NetworkConfig;
use crate::netlink::{ExternalInterface, Netlink, NetlinkError, RouteSpec};
use crate::subnet::{Lease, PeerSet};

/// Upstream's refusal, word for word.
const NAT_MESSAGE: &str = "your PublicIP differs from interface IP, meaning that probably you're on a NAT, which is not supported by host-gw backend";

/// The host-gw backend.
#[derive(Debug)]
pub struct HostGwBackend {
    /// The IPv4 cluster network, when IPv4 is on.
    network: Option<IpNet>,
    /// The IPv6 cluster network, when IPv6 is on.
    ipv6_network: Option<IpNet>,
    /// Opened in `prepare`.
    nl: Option<Netlink>,
    /// The external interface; its index is looked up again on every reconcile.
    ext: Option<ExternalInterface>,
    /// Per (peer, IPv6?) the last warning, so each problem is logged once.
    warned: HashMap<(String, bool), String>,
    /// Peers of another backend type already logged.
    ignored: HashSet<String>,
}

impl HostGwBackend {
    /// A host-gw backend for `config`; it has no options.
    pub fn new(config: &NetworkConfig) -> Result<Self, BackendError> {
        Ok(HostGwBackend {
            network: config.enable_ipv4.then_some(config.network).flatten().map(IpNet::V4),
            ipv6_network: config
                .enable_ipv6
                .then_some(config.ipv6_network)
                .flatten()
                .map(IpNet::V6),
            nl: None,
            ext: None,
            warned: HashMap::new(),
            ignored: HashSet::new(),
        })
    }

    fn warn_once(&mut self, name: &str, v6: bool, why: String) {
        if self.warned.get(&(name.to_string(), v6)) != Some(&why) {
            warn!(lease = %name, ipv6 = v6, reason = %why, "cannot route to host-gw peer");
            self.warned.insert((name.to_string(), v6), why);
        }
    }
}

/// Whether a route add failed because the gateway is not on the link: the peer is
/// not on our L2 segment, which host-gw cannot fix (IPv4 says ENETUNREACH, IPv6
/// EHOSTUNREACH).
fn not_on_link(e: &NetlinkError) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENETUNREACH | libc::EHOSTUNREACH))
}

#[async_trait]
impl Backend for HostGwBackend {
    fn name(&self) -> &'static str {
        "host-gw"
    }

    async fn prepare(&mut self, ext: &ExternalInterface, _config: &NetworkConfig) -> Result<BackendInfo, BackendError> {
        if ext.ext_addr != ext.iface_addr {
            return Err(BackendError::Unsupported(NAT_MESSAGE.into()));
        }
        let nl = Netlink::new().map_err(|e| BackendError::Kernel {
            op: "open",
            object: "rtnetlink socket".into(),
            detail: e.to_string(),
        })?;
        self.nl = Some(nl);
        self.ext = Some(ext.clone());
        Ok(BackendInfo {
            backend_type: "host-gw".into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: ext.mtu,
        })
    }

    async fn set_own_lease(&mut self, _lease: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    /// Converges the routes on `peers`; see the module's ownership rule. Owned
    /// routes no peer wants are deleted only when `peers.complete`.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<usize, BackendError> {
        let (Some(nl), Some(ext)) = (self.nl.clone(), self.ext.as_mut()) else {
            return Err(BackendError::Unsupported("host-gw: reconcile before prepare".into()));
        };
        // The interface may have been re-created (its routes went with it).
        match nl.link_by_name(&ext.name).await {
            Ok(Some(l)) => ext.index = l.index,
            Ok(None) => {
                return Err(BackendError::Unsupported(format!(
                    "host-gw: external interface {} is gone",
                    ext.name
                )))
            }
            Err(e) => {
                return Err(BackendError::Kernel {
                    op: "get link",
                    object: ext.name.clone(),
                    detail: e.to_string(),
                })
            }
        }
        let (oif, ext_name) = (ext.index, ext.name.clone());
        for (name, l) in &peers.leases {
            if l.attrs.backend_type != "host-gw" && self.ignored.insert(name.clone()) {
                debug!(lease = %name, backend_type = %l.attrs.backend_type, "ignoring non-host-gw subnet");
            }
        }
        self.ignored.retain(|n| peers.leases.contains_key(n));

        let mut changes = 0;
        let mut failed = Vec::new();
        let mut unreachable = HashSet::new();
        for (v6, network) in [(false, self.network), (true, self.ipv6_network)] {
            let Some(network) = network else { continue };
            let mut desired = BTreeMap::new();
            let mut owner = BTreeMap::new();
            for (name, l) in peers.leases.iter().filter(|(_, l)| l.attrs.backend_type == "host-gw") {
                let Some((dst, gateway)) = family_of(l, v6) else {
                    continue;
                };
                desired.insert(
                    dst,
                    RouteSpec {
                        dst,
                        gateway,
                        oif,
                        onlink: false,
                        protocol: RTPROT_FLANNEL,
                        nhid: None,
                    },
                );
                owner.insert(dst, name.clone());
            }
            let table = nl.main_routes(v6).await.map_err(|e| BackendError::Kernel {
                op: "list routes",
                object: if v6 { "IPv6 main table" } else { "IPv4 main table" }.into(),
                detail: e.to_string(),
            })?;
            let owns = |e: &crate::netlink::RouteEntry| e.protocol == RTPROT_FLANNEL && network.contains(&e.dst);
            let plan = routes::plan_routes(&desired, &table, owns, peers.complete);
            let dev = |i: u32| {
                if i == oif {
                    ext_name.clone()
                } else {
                    format!("ifindex {i}")
                }
            };
            changes += plan.replace.len() + plan.delete.len();
            for (dst, e) in routes::apply_replaces(&nl, &plan, dev).await {
                let name = owner.get(&dst).cloned().unwrap_or_default();
                if not_on_link(&e) {
                    let gw = desired[&dst].gateway;
                    self.warn_once(&name, v6, format!("its PublicIP {gw} is not on the link of {ext_name}; host-gw needs every node on one L2 segment (or use vxlan with DirectRouting)"));
                    unreachable.insert(name);
                    changes -= 1;
                } else {
                    failed.push((format!("route {dst}"), e));
                }
            }
            for (dst, e) in routes::apply_deletes(&nl, &plan, dev).await {
                failed.push((format!("delete route {dst}"), e));
            }
        }
        let keep: HashSet<&String> = peers.leases.keys().collect();
        self.warned.retain(|(name, _), _| keep.contains(name));
        if let Some((what, e)) = failed.first() {
            return Err(BackendError::Kernel {
                op: "reconcile",
                object: format!("{} of the host-gw routes (first: {what})", failed.len()),
                detail: e.to_string(),
            });
        }
        let total = peers
            .leases
            .values()
            .filter(|l| l.attrs.backend_type == "host-gw")
            .count();
        if changes > 0 {
            info!(host_gw_peers = total, changes, "host-gw routes reconciled");
        }
        Ok(total - unreachable.len().min(total))
    }
}
