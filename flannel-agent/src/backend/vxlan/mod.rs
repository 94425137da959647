//! The `vxlan` backend with the kernel's VXLAN datapath, programmed through
//! rtnetlink as upstream does: a device `flannel.<VNI>` (and `flannel-v6.<VNI>`),
//! and per peer a permanent neighbour entry, an FDB entry and a route (for IPv4 peers
//! through a nexthop object, see `nexthops`).
//!
//! Ownership (what reconcile may change or delete):
//! * everything permanent on `flannel.<VNI>` / `flannel-v6.<VNI>`: neighbour and
//!   FDB entries, and main-table routes through the device except those the kernel
//!   made itself (`proto kernel`, such as `fe80::/64`). Entries the kernel creates
//!   (ARP/NDP cache, learned FDB entries) stay the kernel's;
//! * DirectRouting routes, which leave through the underlay interface: those are
//!   main-table routes marked [`RTPROT_FLANNEL`](crate::backend::routes::RTPROT_FLANNEL) whose destination lies inside the
//!   cluster network (host-gw's rule);
//! * nexthop objects marked `RTPROT_FLANNEL` whose gateway lies inside the cluster
//!   network (see `nexthops`);
//! * nothing else. A foreign route is replaced only if it occupies the exact slot a
//!   peer's route needs (see [`crate::backend::routes`]).

mod config;
mod device;
pub mod ebpf;
#[cfg(test)]
mod netns_bulk_tests;
#[cfg(test)]
mod netns_gc_tests;
#[cfg(test)]
mod netns_nexthop_tests;
#[cfg(test)]
mod netns_tests;
mod nexthops;
mod plan;
mod pods;
mod sync;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use async_trait::async_trait;
use ipnet::IpNet;
use tracing::{debug, info, warn};

pub use config::{backend_data, peer_vtep_mac, DatapathMode, VxlanOptions, OVERHEAD};
use device::Vtep;
pub use ebpf::{parse_probe_feature, Choice, EbpfSettings, PeerView};
use nexthops::NexthopState;
use plan::FamilyCtx;
use sync::{on_link_peers, sync_family, Tally};

use super::{Backend, BackendError, BackendInfo};
use crate::config::NetworkConfig;
use crate::netlink::{ExternalInterface, MacAddr, Netlink, VxlanParams};
use crate::subnet::{Lease, PeerSet, StoredNode};

/// The kernel-datapath vxlan backend.
#[derive(Debug)]
pub struct VxlanBackend {
    /// The parsed `Backend` options.
    opts: VxlanOptions,
    /// The IPv4 cluster network, when IPv4 is on.
    network: Option<IpNet>,
    /// The IPv6 cluster network, when IPv6 is on.
    ipv6_network: Option<IpNet>,
    /// Opened in `prepare`, on the runtime that drives the backend.
    nl: Option<Netlink>,
    /// The IPv4 device, once prepared.
    v4: Option<Vtep>,
    /// The IPv6 device, once prepared.
    v6: Option<Vtep>,
    /// Our lease, once acquired.
    own: Option<Lease>,
    /// Per (peer, IPv6?) the last reason it was skipped, so each is warned about once.
    warned: HashMap<(String, bool), String>,
    /// Peers of another backend type already logged.
    ignored: HashSet<String>,
    /// `--bpf-pin-dir` and the test hook, from the command line.
    settings: EbpfSettings,
    /// The datapath chosen in `prepare`, and why.
    choice: Option<Choice>,
    /// The eBPF datapath, when chosen and loaded.
    ebpf: Option<ebpf::Ebpf>,
    /// The IPv4 peers of the last reconcile, for `/status/datapath`.
    last_peers: Vec<PeerView>,
    /// The VTEP MACs this node published before (kube annotations), reused when
    /// the devices have to be created, so peers' entries stay valid.
    stored_macs: (Option<MacAddr>, Option<MacAddr>),
    /// Whether IPv4 peer routes go through nexthop objects (probed in `prepare`).
    nexthops: NexthopState,
}

impl VxlanBackend {
    /// Reads the options from `config.backend`; nothing touches the kernel yet. Without
    /// [`EbpfSettings`] (no pin directory) only the kernel datapath is available.
    pub fn new(config: &NetworkConfig) -> Result<Self, BackendError> {
        Self::with_settings(config, EbpfSettings::default())
    }

    /// [`Self::new`] with the command line's eBPF settings, as flanneld builds it.
    pub fn with_settings(config: &NetworkConfig, settings: EbpfSettings) -> Result<Self, BackendError> {
        let mut opts = VxlanOptions::parse(&config.backend)?;
        if opts.pod_fast_path && settings.pods_masqueraded {
            // Pod-to-pod traffic is NAT'ed by the CNI plugin on the host's path; the fast path
            // would send it unmasqueraded, and a flow that moved from one to the other would
            // change its source address mid-connection.
            warn!(
                "PodFastPath is off: flanneld runs without --ip-masq, so the CNI plugin masquerades pod traffic, which the fast path would bypass; run flanneld with --ip-masq to use it"
            );
            opts.pod_fast_path = false;
        }
        Ok(VxlanBackend {
            opts,
            network: config.enable_ipv4.then_some(config.network).flatten().map(IpNet::V4),
            ipv6_network: config
                .enable_ipv6
                .then_some(config.ipv6_network)
                .flatten()
                .map(IpNet::V6),
            nl: None,
            v4: None,
            v6: None,
            own: None,
            warned: HashMap::new(),
            ignored: HashSet::new(),
            settings,
            choice: None,
            ebpf: None,
            last_peers: Vec::new(),
            stored_macs: (None, None),
            nexthops: NexthopState::default(),
        })
    }

    fn netlink(&self) -> Result<&Netlink, BackendError> {
        self.nl
            .as_ref()
            .ok_or_else(|| BackendError::Unsupported("vxlan: reconcile before prepare".into()))
    }

    fn params(&self, ext: &ExternalInterface, local: IpAddr) -> VxlanParams {
        VxlanParams {
            vni: self.opts.vni,
            dev_index: ext.index,
            local: Some(local),
            port: self.opts.port,
            learning: self.opts.learning,
            gbp: self.opts.gbp,
            ..Default::default()
        }
    }
}

#[async_trait]
impl Backend for VxlanBackend {
    fn name(&self) -> &'static str {
        "vxlan"
    }

    fn use_stored(&mut self, stored: &StoredNode) {
        // Only a unicast MAC is worth reusing; anything else gets a fresh one.
        let parse = |m: Option<&str>| m.and_then(|m| m.parse::<MacAddr>().ok()).filter(MacAddr::is_unicast);
        self.stored_macs = (parse(stored.vtep_mac()), parse(stored.vtep_v6_mac()));
    }

    async fn prepare(&mut self, ext: &ExternalInterface, config: &NetworkConfig) -> Result<BackendInfo, BackendError> {
        let o = &self.opts;
        info!(
            "VXLAN config: VNI={} Port={} GBP={} Learning={} DirectRouting={}",
            o.vni, o.port, o.gbp, o.learning, o.direct_routing
        );
        let nl = Netlink::new().map_err(|e| BackendError::Kernel {
            op: "open",
            object: "rtnetlink socket".into(),
            detail: e.to_string(),
        })?;
        let underlay_mtu = if o.mtu > 0 { o.mtu } else { ext.mtu };
        let dev_mtu = underlay_mtu.saturating_sub(OVERHEAD);
        let mut info = BackendInfo {
            backend_type: "vxlan".into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: dev_mtu,
        };
        if config.enable_ipv4 {
            let local = ext.ext_addr.ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "vxlan: interface {} has no IPv4 address to use as VTEP",
                    ext.name
                ))
            })?;
            let v = Vtep::prepare(
                &nl,
                self.opts.v4_name(),
                self.params(ext, local.into()),
                dev_mtu,
                ext.name.clone(),
                self.stored_macs.0,
            )
            .await?;
            info.backend_data = Some(backend_data(self.opts.vni, v.mac));
            self.v4 = Some(v);
            self.nexthops = NexthopState::probe(&nl, self.settings.pretend_no_nexthops).await;
        }
        if config.enable_ipv6 {
            let local = ext.ext_v6_addr.ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "vxlan: interface {} has no IPv6 address to use as VTEP",
                    ext.name
                ))
            })?;
            let v = Vtep::prepare(
                &nl,
                self.opts.v6_name(),
                self.params(ext, local.into()),
                dev_mtu,
                ext.name.clone(),
                self.stored_macs.1,
            )
            .await?;
            info.backend_v6_data = Some(backend_data(self.opts.vni, v.mac));
            self.v6 = Some(v);
        }
        let (choice, ebpf) = ebpf::select(&self.opts, &self.settings, self.v4.as_ref(), ext)?;
        self.choice = Some(choice);
        self.ebpf = ebpf;
        self.nl = Some(nl);
        Ok(info)
    }

    async fn set_own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        let nl = self.netlink()?.clone();
        if let Some(v) = self.v4.as_mut() {
            let sn = lease
                .subnet
                .ok_or_else(|| BackendError::Unsupported("vxlan: our lease has no IPv4 subnet".into()))?;
            v.addr = Some((sn.network().into(), 32));
            v.ensure(&nl, self.network).await?;
        }
        if let Some(v) = self.v6.as_mut() {
            let sn = lease
                .ipv6_subnet
                .ok_or_else(|| BackendError::Unsupported("vxlan: our lease has no IPv6 subnet".into()))?;
            v.addr = Some((sn.network().into(), 128));
            v.ensure(&nl, self.ipv6_network).await?;
        }
        self.own = Some(lease.clone());
        Ok(())
    }

    /// Converges on `peers`: (a) the devices are made right (re-created with the
    /// same MAC if they were deleted), (b) the kernel's neighbour, FDB and route
    /// tables are dumped and compared with the peers' entries: what is missing or
    /// different is replaced, and what flannel owns but no peer wants is deleted
    /// only when `peers.complete`; (c) nothing flannel does not own is touched
    /// (see the module's ownership rule). Unchanged entries cost no write and no log.
    ///
    /// Upstream differs: it replays lease *events* (add/remove) and keeps no desired
    /// state. When it re-creates a deleted `flannel.1` it does not re-add the peers'
    /// neighbour, FDB and route entries (they come back only on later lease
    /// events), and nothing ever garbage-collects, so entries for nodes removed
    /// while flanneld was down, or whose removal event was missed, stay forever
    /// (flannel-io/flannel#2554); a changed peer MAC is fixed only by a restart.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<usize, BackendError> {
        let nl = self.netlink()?.clone();
        if self.own.is_none() {
            return Err(BackendError::Unsupported(
                "vxlan: reconcile before the lease was acquired".into(),
            ));
        }
        self.log_ignored(peers);
        let leases: BTreeMap<&String, &Lease> = peers
            .leases
            .iter()
            .filter(|(_, l)| l.attrs.backend_type == "vxlan")
            .collect();
        let mut tally = Tally::default();
        for v6 in [false, true] {
            let network = if v6 { self.ipv6_network } else { self.network };
            let Some(vtep) = (if v6 { self.v6.as_mut() } else { self.v4.as_mut() }) else {
                continue;
            };
            vtep.ensure(&nl, network).await?;
            let (vtep, direct_routing) = (vtep.clone(), self.opts.direct_routing);
            let direct = if direct_routing {
                on_link_peers(&nl, &leases, v6).await
            } else {
                HashMap::new()
            };
            let ctx = FamilyCtx {
                v6,
                vni: self.opts.vni,
                dev_index: vtep.index,
                direct: &direct,
            };
            let desired = plan::desired(&ctx, leases.iter().map(|(n, l)| (*n, *l)));
            self.warn_skipped(&desired.skipped, v6);
            tally
                .failed_peers
                .extend(desired.skipped.iter().map(|(n, _)| n.clone()));
            if v6 {
                sync_family(&nl, &vtep, v6, network, &desired, peers.complete, None, &mut tally).await?;
                continue;
            }
            // IPv4: the kernel's entries and the eBPF map, in the order that never leaves the
            // programs a VTEP the kernel has no entries for (see the `ebpf` module).
            let views = ebpf::peer_views(&desired, &leases, self.opts.vni);
            let t = std::time::Instant::now();
            if let Some(e) = self.ebpf.as_mut() {
                tally.changes += usize::from(e.follow_device(&self.opts, &vtep)?);
                tally.changes += e.remove_gone(&views, peers.complete)?;
            }
            tally.time("map", t);
            let nh = Some(&mut self.nexthops);
            sync_family(&nl, &vtep, v6, network, &desired, peers.complete, nh, &mut tally).await?;
            let t = std::time::Instant::now();
            if let Some(e) = self.ebpf.as_mut() {
                tally.changes += e.apply(&views, &tally.failed_peers, peers.complete)?;
                if let Some(subnet) = self.own.as_ref().and_then(|l| l.subnet) {
                    // The fast path is an optimisation over a working kernel path: a failure
                    // here is logged, not a failed reconcile.
                    match e.sync_pods(&nl, subnet).await {
                        Ok(n) => tally.changes += n,
                        Err(err) => {
                            warn!(error = %err, "pod fast path: cannot sync the local pods; they keep the kernel path")
                        }
                    }
                }
            }
            tally.time("map", t);
            self.last_peers = views;
        }
        let keep: HashSet<&String> = peers.leases.keys().collect();
        self.warned.retain(|(name, _), _| keep.contains(name));
        tally.finish(leases.len())
    }

    fn status(&self) -> serde_json::Value {
        let Some(choice) = &self.choice else {
            return serde_json::Value::Null;
        };
        let mut status = serde_json::json!({
            "datapath": if choice.ebpf { "ebpf" } else { "kernel" },
            "requested": choice.requested.as_str(),
            "reason": choice.reason,
            "vxlan_dev": self.v4.as_ref().map(|v| v.name.clone()),
            "vni": self.opts.vni,
            "peers": self.last_peers,
        });
        if let (Some(obj), true) = (status.as_object_mut(), self.v4.is_some()) {
            obj.insert("nexthops".into(), self.nexthops.status());
        }
        if let (Some(e), Some(obj)) = (&self.ebpf, status.as_object_mut()) {
            obj.insert("ebpf".into(), e.status());
        }
        status
    }
}

impl VxlanBackend {
    fn log_ignored(&mut self, peers: &PeerSet) {
        for (name, l) in &peers.leases {
            if l.attrs.backend_type != "vxlan" && self.ignored.insert(name.clone()) {
                debug!(lease = %name, backend_type = %l.attrs.backend_type, "ignoring non-vxlan subnet");
            }
        }
        self.ignored.retain(|n| peers.leases.contains_key(n));
    }

    fn warn_skipped(&mut self, skipped: &[(String, String)], v6: bool) {
        for (name, why) in skipped {
            if self.warned.get(&(name.clone(), v6)) != Some(why) {
                warn!(lease = %name, ipv6 = v6, reason = %why, "ignoring vxlan peer: its backend data is unusable");
                self.warned.insert((name.clone(), v6), why.clone());
            }
        }
    }
}

#[cfg(test)]
mod stored_tests {
    use super::*;

    #[test]
    fn stored_unicast_macs_are_reused_and_others_ignored() {
        let cfg = NetworkConfig::parse_and_check(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        let mut b = VxlanBackend::new(&cfg).unwrap();
        let stored = StoredNode {
            backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": "0a:58:0a:f4:01:01"})),
            backend_v6_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": "01:00:5e:00:00:01"})),
            ..StoredNode::default()
        };
        b.use_stored(&stored);
        assert_eq!(b.stored_macs.0, Some("0a:58:0a:f4:01:01".parse().unwrap()));
        assert_eq!(b.stored_macs.1, None, "a multicast MAC is not a VTEP MAC");
    }
}
