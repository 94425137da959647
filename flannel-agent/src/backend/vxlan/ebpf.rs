//! The vxlan backend's eBPF datapath: choosing it (the `Datapath` option and the kernel
//! probe), loading it, and keeping its maps equal to the leases.
//!
//! The kernel's `flannel.<VNI>` keeps every neighbour, FDB entry and route in eBPF mode too:
//! the programs only replace the vxlan driver's transmit (and receive) for destinations in
//! the maps, so detaching them (`flannelctl uninstall`) leaves a working network. Hence the
//! order the dataplane module asks for: the kernel's entries first and the map second when a
//! peer comes, the map first and the kernel's entries second when it goes.

use std::collections::{BTreeMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use flannel_common::{RemoteVtep, VTEP_F_DIRECT_ROUTING};
use ipnet::{IpNet, Ipv4Net};
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::config::{peer_vtep_mac, DatapathMode, VxlanOptions};
use super::device::Vtep;
use super::plan::Desired;
use super::pods::{PodPorts, POD_BRIDGE};
use crate::backend::BackendError;
use crate::dataplane::{
    self, chain, Datapath, DatapathConfig, DataplaneError, ProbeFeature, ProbeOptions, ProbeReport,
};
use crate::netlink::{ExternalInterface, Netlink};
use crate::subnet::Lease;

/// The kernel's default VXLAN port, which flannel's `Port: 0` means.
const DEFAULT_PORT: u16 = 8472;

/// What the agent's command line (not net-conf) says about the eBPF datapath.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EbpfSettings {
    /// `--bpf-pin-dir`; `None` (tests that build the backend directly) rules eBPF out.
    pub pin_dir: Option<PathBuf>,
    /// Test hook (`FLANNEL_EBPF_PRETEND_MISSING`, read once by `main`): the probe reports
    /// this feature as missing, to exercise the fallback on a kernel that has everything.
    pub pretend_missing: Option<ProbeFeature>,
    /// flanneld runs without `--ip-masq`, so `subnet.env` has the CNI plugin masquerade pod
    /// traffic that leaves the node, pod-to-pod included: the pod fast path, which skips
    /// that NAT, then stays off.
    pub pods_masqueraded: bool,
    /// Test hook (`FLANNEL_PRETEND_NO_NEXTHOPS`, read once by `main`): the nexthop probe
    /// fails, so IPv4 peer routes are plain gateway routes as on a kernel before 5.3.
    pub pretend_no_nexthops: bool,
}

/// Parses a value of `FLANNEL_EBPF_PRETEND_MISSING`: `bpf`, `helpers`, `adjust-room-encap`
/// or `adjust-room-decap`.
pub fn parse_probe_feature(name: &str) -> Result<ProbeFeature, String> {
    match name.trim().to_ascii_lowercase().replace('_', "-").as_str() {
        "bpf" => Ok(ProbeFeature::Bpf),
        "helpers" => Ok(ProbeFeature::Helpers),
        "adjust-room-encap" => Ok(ProbeFeature::AdjustRoomEncap),
        "adjust-room-decap" => Ok(ProbeFeature::AdjustRoomDecap),
        other => Err(format!(
            "unknown eBPF feature {other:?}; expected bpf, helpers, adjust-room-encap or adjust-room-decap"
        )),
    }
}

/// Which datapath runs, and why: what `flannelctl status` shows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The `Datapath` option.
    pub requested: DatapathMode,
    /// True for the eBPF datapath, false for the kernel's.
    pub ebpf: bool,
    /// Why, in one sentence.
    pub reason: String,
}

impl Choice {
    fn kernel(requested: DatapathMode, reason: impl Into<String>) -> Self {
        Self {
            requested,
            ebpf: false,
            reason: reason.into(),
        }
    }
}

/// Decides between the datapaths before anything is loaded; `Ok(None)` means "eBPF, if the
/// probe agrees". Errors are for `Datapath: ebpf` in a setup eBPF cannot serve.
fn precheck(opts: &VxlanOptions, settings: &EbpfSettings, ipv4: bool) -> Result<Option<Choice>, BackendError> {
    let requested = opts.datapath;
    let blocker = if requested == DatapathMode::Kernel {
        return Ok(Some(Choice::kernel(requested, "Datapath is \"kernel\"")));
    } else if opts.gbp {
        "GBP is on, and the eBPF datapath does not carry VXLAN group policy"
    } else if !ipv4 {
        "IPv4 is off, and the eBPF datapath encapsulates IPv4 only"
    } else if settings.pin_dir.is_none() {
        "no bpffs pin directory was given"
    } else {
        return Ok(None);
    };
    match requested {
        DatapathMode::Ebpf => Err(BackendError::Unsupported(format!(
            "vxlan: Datapath \"ebpf\" cannot be used: {blocker}; set Datapath to \"auto\" or \"kernel\""
        ))),
        _ => Ok(Some(Choice::kernel(requested, blocker))),
    }
}

/// The loaded eBPF datapath and the desired map contents last applied.
pub(super) struct Ebpf {
    /// The programs and maps.
    pub(super) dp: Datapath,
    /// `--bpf-pin-dir`.
    pub(super) pin_dir: PathBuf,
    /// The indexes of the VXLAN device and of the uplink the programs were loaded for: they
    /// are baked into the programs' config, and the encap hook lives on the device.
    loaded_for: (u32, u32),
    /// `FLANNEL_VTEPS` as [`Ebpf::remove_gone`] read it, minus what it removed: the
    /// reconcile's [`Ebpf::apply`] compares with this instead of reading 10,000 entries
    /// (two syscalls each) a second time; only this agent writes the map in between.
    read: Option<BTreeMap<Ipv4Net, RemoteVtep>>,
    /// Entries in `FLANNEL_VTEPS` after the last [`Ebpf::apply`], for `/status/datapath`
    /// (read once per reconcile already; not again for every status).
    vtep_count: usize,
    /// Pod fast path: which veth each pod MAC is behind.
    pod_ports: PodPorts,
}

impl std::fmt::Debug for Ebpf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ebpf").field("dp", &self.dp).finish()
    }
}

/// Chooses the datapath for the prepared IPv4 device `v4` and loads eBPF if chosen. Under
/// `auto` any failure falls back to the kernel datapath with one warning that says why.
pub(super) fn select(
    opts: &VxlanOptions,
    settings: &EbpfSettings,
    v4: Option<&Vtep>,
    ext: &ExternalInterface,
) -> Result<(Choice, Option<Ebpf>), BackendError> {
    let requested = opts.datapath;
    if let Some(choice) = precheck(opts, settings, v4.is_some())? {
        if requested == DatapathMode::Auto {
            warn!(reason = %choice.reason, "eBPF datapath unavailable, falling back to the kernel vxlan datapath");
        } else {
            info!(reason = %choice.reason, "using the kernel vxlan datapath");
        }
        warn_fast_path_off(opts);
        detach_leftovers(settings);
        return Ok((choice, None));
    }
    let (Some(v4), Some(pin_dir)) = (v4, settings.pin_dir.clone()) else {
        unreachable!("precheck rules out a missing device or pin directory");
    };
    let probe = ProbeOptions {
        pretend_missing: settings.pretend_missing,
    };
    let probed = dataplane::probe(&probe);
    if let Some(reason) = probed
        .as_ref()
        .ok()
        .and_then(|report| auto_prefers_kernel(opts, report))
    {
        info!(reason, "using the kernel vxlan datapath");
        detach_leftovers(settings);
        return Ok((Choice::kernel(requested, reason), None));
    }
    let loaded = probed
        .map_err(DataplaneError::Probe)
        .and_then(|_| Datapath::load(&datapath_config(opts, v4, &ext.name)?, &pin_dir));
    match loaded {
        Ok(dp) => {
            let reason = match requested {
                DatapathMode::Ebpf => "Datapath is \"ebpf\"".to_owned(),
                _ => "Datapath is \"auto\" and the kernel passed the eBPF probe".to_owned(),
            };
            info!(reason = %reason, pin_dir = %pin_dir.display(), "using the eBPF vxlan datapath");
            let choice = Choice {
                requested,
                ebpf: true,
                reason,
            };
            let loaded_for = (v4.index, v4.params.dev_index);
            Ok((
                choice,
                Some(Ebpf {
                    dp,
                    pin_dir,
                    loaded_for,
                    read: None,
                    vtep_count: 0,
                    pod_ports: PodPorts::default(),
                }),
            ))
        }
        Err(e) if requested == DatapathMode::Ebpf => Err(BackendError::Unsupported(format!(
            "vxlan: Datapath \"ebpf\" cannot be used: {}; set Datapath to \"auto\" or \"kernel\"",
            chain(&e)
        ))),
        Err(e) => {
            let reason = chain(&e);
            warn!(reason = %reason, "eBPF datapath unavailable, falling back to the kernel vxlan datapath");
            warn_fast_path_off(opts);
            detach_leftovers(settings);
            Ok((Choice::kernel(requested, reason), None))
        }
    }
}

/// Under `auto`, on a kernel that can run the eBPF datapath: the kernel's datapath where eBPF
/// is measured slower on some metric (the rule: never worse, or `auto` must not
/// choose it). Without `PodFastPath` or XDP decap, and without `BPF_F_ADJ_ROOM_DECAP_L4_UDP`
/// (GRO aggregates then take the kernel's decap anyway), `cargo xtask bench` measures eBPF at
/// 0.91× kernel VXLAN's single-stream TCP on 6.18 (better latency and packet rate). With
/// `PodFastPath` it wins every metric.
pub(super) fn auto_prefers_kernel(opts: &VxlanOptions, report: &ProbeReport) -> Option<&'static str> {
    (opts.datapath == DatapathMode::Auto && !opts.pod_fast_path && !opts.decap_xdp && !report.decap_l4_udp).then_some(
        "Datapath is \"auto\": without PodFastPath, and on a kernel without BPF_F_ADJ_ROOM_DECAP_L4_UDP, the eBPF \
         datapath measures slower than the kernel's on single-stream TCP; set Datapath to \"ebpf\" to use it anyway",
    )
}

/// `PodFastPath` needs the eBPF datapath: say once that it is off.
fn warn_fast_path_off(opts: &VxlanOptions) {
    if opts.pod_fast_path {
        warn!("PodFastPath is set but the kernel vxlan datapath runs: pod traffic takes the kernel path");
    }
    if opts.decap_xdp {
        warn!("DecapMode is \"xdp\" but the kernel vxlan datapath runs: the kernel decapsulates");
    }
}

/// With the kernel datapath chosen, programs an earlier eBPF run left attached would keep
/// encapsulating from maps nobody updates any more; remove them (the kernel's entries carry
/// the traffic, so this costs no packet).
fn detach_leftovers(settings: &EbpfSettings) {
    let Some(pin_dir) = &settings.pin_dir else { return };
    if !pin_dir.join(flannel_common::PIN_SUBDIR).exists() {
        return;
    }
    match dataplane::detach_all(pin_dir) {
        Ok(()) => info!(pin_dir = %pin_dir.display(), "removed the eBPF datapath an earlier run left attached"),
        Err(e) => {
            warn!(pin_dir = %pin_dir.display(), error = %chain(&e), "cannot remove the eBPF datapath an earlier run left")
        }
    }
}

fn datapath_config(opts: &VxlanOptions, v4: &Vtep, uplink: &str) -> Result<DatapathConfig, DataplaneError> {
    let Some(IpAddr::V4(local)) = v4.params.local else {
        return Err(DataplaneError::Config {
            field: "vtep_ip",
            detail: format!("{} has no IPv4 local address", v4.name),
        });
    };
    let port = if opts.port == 0 { DEFAULT_PORT } else { opts.port };
    let mut config = DatapathConfig::new(&v4.name, uplink, local, v4.mac.0, opts.vni, port);
    config.pod_fast_path = opts.pod_fast_path;
    config.decap_xdp = opts.decap_xdp;
    Ok(config)
}

/// One peer as the backend wants it programmed: for `/status/datapath` and `flannelctl peers`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PeerView {
    /// The store's name for the lease.
    pub lease: String,
    /// Its IPv4 subnet.
    pub subnet: Ipv4Net,
    /// Its `PublicIP`.
    pub public_ip: Ipv4Addr,
    /// Its `VtepMAC`.
    pub vtep_mac: String,
    /// Reached by DirectRouting rather than encapsulated.
    pub direct_routing: bool,
}

/// The IPv4 peers of a plan with their VTEP (the map's desired content comes from these).
pub(super) fn peer_views(desired: &Desired, leases: &BTreeMap<&String, &Lease>, vni: u32) -> Vec<PeerView> {
    let mut views = Vec::new();
    for p in &desired.peers {
        let IpNet::V4(subnet) = p.subnet else { continue };
        let lease = leases.get(&p.name);
        let public_ip = match (p.vtep, lease) {
            (Some((_, _, IpAddr::V4(ip))), _) => ip,
            (_, Some(l)) => l.attrs.public_ip,
            _ => continue,
        };
        let mac = match p.vtep {
            Some((_, mac, _)) => Some(mac),
            None => lease.and_then(|l| peer_vtep_mac(l.attrs.backend_data.as_ref(), vni).ok()),
        };
        let Some(mac) = mac else { continue };
        views.push(PeerView {
            lease: p.name.clone(),
            subnet,
            public_ip,
            vtep_mac: mac.to_string(),
            direct_routing: p.vtep.is_none(),
        });
    }
    views
}

/// The map's desired content for these peers.
fn map_entries<'a>(peers: impl IntoIterator<Item = &'a PeerView>) -> BTreeMap<Ipv4Net, RemoteVtep> {
    peers
        .into_iter()
        .filter_map(|p| {
            let mac: crate::netlink::MacAddr = p.vtep_mac.parse().ok()?;
            let flags = if p.direct_routing { VTEP_F_DIRECT_ROUTING } else { 0 };
            Some((p.subnet.trunc(), RemoteVtep::new(p.public_ip, mac.0, flags)))
        })
        .collect()
}

fn reload_error(e: DataplaneError) -> BackendError {
    BackendError::Kernel {
        op: "reload",
        object: "the eBPF datapath".into(),
        detail: chain(&e),
    }
}

fn map_error(op: &'static str) -> impl Fn(DataplaneError) -> BackendError {
    move |e| BackendError::Kernel {
        op,
        object: "the eBPF map FLANNEL_VTEPS".into(),
        detail: chain(&e),
    }
}

impl Ebpf {
    /// Loads and attaches the programs again when the VXLAN device or the uplink is not the
    /// one they were loaded for (someone deleted `flannel.<VNI>` and [`Vtep::ensure`] made it
    /// again, or the uplink was re-created): the encap hook went with the old device, and
    /// `flannel_decap` on the uplink still redirects to the old device's index, which drops
    /// every packet from the peers. The pinned maps keep the VTEPs, so both hooks are
    /// attached (replaced) at once, as after an agent restart. Returns whether it reloaded.
    pub(super) fn follow_device(&mut self, opts: &VxlanOptions, v4: &Vtep) -> Result<bool, BackendError> {
        let now = (v4.index, v4.params.dev_index);
        if now == self.loaded_for {
            return Ok(false);
        }
        let config = datapath_config(opts, v4, &v4.ext_name).map_err(reload_error)?;
        self.dp = Datapath::load(&config, &self.pin_dir).map_err(reload_error)?;
        info!(dev = %v4.name, ifindex = now.0, uplink_ifindex = now.1, "eBPF datapath re-attached to the re-created device");
        self.loaded_for = now;
        Ok(true)
    }

    /// Before the kernel's entries change: removes the map entries of peers that are gone
    /// (only with a complete peer set), so the programs never use a VTEP whose route is gone.
    pub(super) fn remove_gone(&mut self, peers: &[PeerView], complete: bool) -> Result<usize, BackendError> {
        // A read left by a reconcile that failed half-way is stale by now.
        self.read = None;
        if !complete {
            return Ok(0);
        }
        let want: HashSet<Ipv4Net> = peers.iter().map(|p| p.subnet.trunc()).collect();
        let mut have: BTreeMap<Ipv4Net, RemoteVtep> = self.dp.vteps().map_err(map_error("read"))?.into_iter().collect();
        let gone: Vec<(Ipv4Net, RemoteVtep)> = have
            .iter()
            .filter(|(subnet, _)| !want.contains(subnet))
            .map(|(s, v)| (*s, *v))
            .collect();
        let each = gone.len() <= crate::backend::routes::LOG_EACH;
        let mut removed = 0;
        for (subnet, vtep) in gone {
            have.remove(&subnet);
            if self.dp.remove_vtep(subnet).map_err(map_error("remove"))? {
                if each {
                    info!(%subnet, vtep = %vtep.ipv4(), "eBPF VTEP removed");
                } else {
                    debug!(%subnet, vtep = %vtep.ipv4(), "eBPF VTEP removed");
                }
                removed += 1;
            }
        }
        if !each {
            info!(removed, "eBPF VTEPs removed");
        }
        self.read = Some(have);
        Ok(removed)
    }

    /// After the kernel's entries: makes the map hold every peer whose kernel entries are in
    /// place. A peer whose kernel entries failed keeps whatever entry it had. With an
    /// incomplete set nothing is deleted.
    pub(super) fn apply(
        &mut self,
        peers: &[PeerView],
        failed: &HashSet<String>,
        complete: bool,
    ) -> Result<usize, BackendError> {
        let mut want = map_entries(peers.iter().filter(|p| !failed.contains(&p.lease)));
        let have = match self.read.take() {
            Some(read) => read,
            None => self.dp.vteps().map_err(map_error("read"))?.into_iter().collect(),
        };
        for p in peers.iter().filter(|p| failed.contains(&p.lease)) {
            if let Some(old) = have.get(&p.subnet.trunc()) {
                want.insert(p.subnet.trunc(), *old);
            }
        }
        if complete {
            let changed = self.dp.sync_vteps(&want).map_err(map_error("sync"))?;
            self.vtep_count = want.len();
            return Ok(changed);
        }
        let mut changed = 0;
        let mut count = have.len();
        for (subnet, vtep) in want {
            match have.get(&subnet) {
                Some(v) if *v == vtep => continue,
                Some(_) => {}
                None => count += 1,
            }
            self.dp.upsert_vtep(subnet, vtep).map_err(map_error("insert"))?;
            changed += 1;
        }
        self.vtep_count = count;
        Ok(changed)
    }

    /// Pod fast path: attaches `flannel_pod_egress` to every veth of the pod bridge and makes
    /// `FLANNEL_LOCAL_PODS` hold the pods of our lease `subnet` (see the `pods` module).
    /// Without the bridge (no pod yet) there is nothing to do. Returns how many attachments and
    /// entries changed.
    pub(super) async fn sync_pods(&mut self, nl: &Netlink, subnet: Ipv4Net) -> Result<usize, BackendError> {
        if !self.dp.pod_fast_path() {
            return Ok(0);
        }
        let netlink_error = |op: &'static str| {
            move |e: crate::netlink::NetlinkError| BackendError::Kernel {
                op,
                object: format!("the pod bridge {POD_BRIDGE}"),
                detail: e.to_string(),
            }
        };
        let bridge = nl
            .link_by_name(POD_BRIDGE)
            .await
            .map_err(netlink_error("look up"))?
            .filter(|b| b.kind == "bridge");
        let (ports, pods) = match bridge.as_ref().and_then(|b| b.mac.map(|mac| (b.index, mac))) {
            Some((index, gw_mac)) => {
                let ports = nl
                    .bridge_veth_ports(index)
                    .await
                    .map_err(netlink_error("list the ports of"))?;
                let learned = nl
                    .bridge_learned_macs(index)
                    .await
                    .map_err(netlink_error("read the FDB of"))?;
                self.pod_ports.update(&ports, &learned);
                let neighbours = nl
                    .neighbours(index, false)
                    .await
                    .map_err(netlink_error("read the neighbours of"))?;
                let pods = self.pod_ports.local_pods(subnet, &neighbours, gw_mac);
                (ports, pods)
            }
            None => Default::default(),
        };
        let pod_error = |e: DataplaneError| BackendError::Kernel {
            op: "sync",
            object: "the pod fast path".into(),
            detail: chain(&e),
        };
        let mut changed = self.dp.sync_pod_ports(&ports).map_err(pod_error)?;
        changed += self.dp.sync_local_pods(&pods).map_err(pod_error)?;
        Ok(changed)
    }

    /// What `/status/datapath` shows about the loaded programs.
    pub(super) fn status(&self) -> Value {
        let counters: serde_json::Map<String, Value> = match self.dp.counters() {
            Ok(c) => c
                .iter()
                .map(|(stat, v)| (stat.name().to_owned(), Value::from(v)))
                .collect(),
            Err(_) => serde_json::Map::new(),
        };
        let mut counters = counters;
        if let Ok(pod) = self.dp.pod_counters() {
            counters.extend(pod.iter().map(|(stat, v)| (stat.name().to_owned(), Value::from(v))));
        }
        if let Ok(xdp) = self.dp.xdp_counters() {
            counters.extend(xdp.iter().map(|(stat, v)| (stat.name().to_owned(), Value::from(v))));
        }
        json!({
            "pin_dir": self.pin_dir.display().to_string(),
            "maps_dir": self.dp.pin_dir().display().to_string(),
            "attach_mode": format!("{:?}", self.dp.attach_mode()).to_lowercase(),
            "decap_attached": self.dp.decap_attached(),
            "gso_decap": self.dp.gso_decap(),
            "vteps": self.vtep_count,
            "pod_fast_path": self.dp.pod_fast_path(),
            "decap_mode": if self.dp.decap_xdp() { "xdp" } else { "tc" },
            "local_pods": self.dp.local_pods().len(),
            "counters": counters,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pretend_missing_names() {
        assert_eq!(parse_probe_feature("BPF"), Ok(ProbeFeature::Bpf));
        assert_eq!(
            parse_probe_feature("adjust_room_encap"),
            Ok(ProbeFeature::AdjustRoomEncap)
        );
        assert_eq!(
            parse_probe_feature("adjust-room-decap"),
            Ok(ProbeFeature::AdjustRoomDecap)
        );
        assert!(parse_probe_feature("xdp").is_err());
    }

    #[test]
    fn precheck_explains_every_kernel_choice() {
        let settings = EbpfSettings {
            pin_dir: Some("/sys/fs/bpf/flannel".into()),
            ..EbpfSettings::default()
        };
        let opts = |datapath, gbp| VxlanOptions {
            datapath,
            gbp,
            ..VxlanOptions::default()
        };
        assert_eq!(
            precheck(&opts(DatapathMode::Auto, false), &settings, true).unwrap(),
            None
        );
        let kernel = precheck(&opts(DatapathMode::Kernel, false), &settings, true)
            .unwrap()
            .unwrap();
        assert!(!kernel.ebpf && kernel.reason.contains("kernel"));
        let gbp = precheck(&opts(DatapathMode::Auto, true), &settings, true)
            .unwrap()
            .unwrap();
        assert!(gbp.reason.contains("GBP"));
        assert!(precheck(&opts(DatapathMode::Ebpf, true), &settings, true).is_err());
        assert!(precheck(&opts(DatapathMode::Ebpf, false), &settings, false).is_err());
        let no_pins = precheck(&opts(DatapathMode::Auto, false), &EbpfSettings::default(), true).unwrap();
        assert!(no_pins.unwrap().reason.contains("pin directory"));
    }

    #[test]
    fn auto_takes_ebpf_only_where_it_is_not_slower() {
        let opts = |datapath, pod_fast_path, decap_xdp| VxlanOptions {
            datapath,
            pod_fast_path,
            decap_xdp,
            ..VxlanOptions::default()
        };
        let report = |decap_l4_udp| ProbeReport {
            decap_l4_udp,
            tcx: true,
        };
        let kernel = auto_prefers_kernel(&opts(DatapathMode::Auto, false, false), &report(false));
        assert!(kernel.is_some_and(|r| r.contains("PodFastPath")));
        for (o, r) in [
            (opts(DatapathMode::Auto, true, false), report(false)),
            (opts(DatapathMode::Auto, false, true), report(false)),
            (opts(DatapathMode::Auto, false, false), report(true)),
            (opts(DatapathMode::Ebpf, false, false), report(false)),
        ] {
            assert_eq!(auto_prefers_kernel(&o, &r), None, "{o:?} {r:?}");
        }
    }

    #[test]
    fn map_entries_carry_direct_routing() {
        let peer = |direct_routing| PeerView {
            lease: "10.244.1.0-24".into(),
            subnet: "10.244.1.0/24".parse().unwrap(),
            public_ip: Ipv4Addr::new(198, 18, 0, 2),
            vtep_mac: "c6:d2:32:6f:8f:44".into(),
            direct_routing,
        };
        let m = map_entries(&[peer(false)]);
        let v = m[&"10.244.1.0/24".parse().unwrap()];
        assert_eq!(
            (v.ipv4(), v.vtep_mac, v.flags),
            (Ipv4Addr::new(198, 18, 0, 2), [0xc6, 0xd2, 0x32, 0x6f, 0x8f, 0x44], 0)
        );
        let m = map_entries(&[peer(true)]);
        assert_eq!(m.values().next().unwrap().flags, VTEP_F_DIRECT_ROUTING);
    }
}
