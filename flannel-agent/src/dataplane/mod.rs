//! The eBPF VXLAN datapath: the one module of the agent that uses aya.
//!
//! build.rs builds `flannel-ebpf` and this module embeds the object. [`Datapath::load`] loads
//! it with this node's configuration, pins its maps under `<pin-dir>/v1/` (reused by the next
//! agent), and attaches `flannel_encap` to the egress of `flannel.<VNI>` and `flannel_decap`
//! to the ingress of the underlay device, adopting the attachments of an earlier agent
//! without a gap. The attachments outlive the agent; [`detach_all`] removes them.
//!
//! The kernel's `flannel.<VNI>`, with the neighbour and FDB entries and routes upstream
//! flannel programs, stays the datapath of record: everything the programs do not handle,
//! including any destination missing from the maps, goes through it. The vxlan backend
//! therefore programs the kernel first and the maps second, and removes in the other order:
//!
//! ```text
//! add peer:    neighbour, FDB entry, route  ->  Datapath::upsert_vtep
//! remove peer: Datapath::remove_vtep        ->  route, FDB entry, neighbour
//! ```

mod attach;
mod bpffs;
mod config;
mod maps;
mod probe;
#[cfg(test)]
mod tests;

use std::{
    collections::{BTreeMap, BTreeSet},
    error::Error,
    fs, io,
    mem::size_of,
    path::{Path, PathBuf},
};

use aya::{
    maps::{MapData, MapError, MapInfo, MapType, PerCpuArray},
    programs::{ProgramError, SchedClassifier, TcAttachType, Xdp},
    Ebpf, EbpfError, EbpfLoader,
};
use flannel_common::{
    DatapathConfig as ProgramConfig, FlowKey, KernelFlow, LocalPod, PeerStats, PodStat, RemoteVtep, Stat, XdpStat,
    CFG_F_DECAP_GSO, CFG_F_DECAP_L4_UDP, CFG_F_POD_FAST_PATH, CFG_F_XDP_DECAP, GLOBAL_CONFIG, KERNEL_FLOWS_MAX_ENTRIES,
    LOCAL_PODS_MAX_ENTRIES, MAP_KERNEL_FLOWS, MAP_LOCAL_PODS, MAP_NAMES, MAP_PEER_STATS, MAP_POD_STATS, MAP_STATS,
    MAP_VTEPS, MAP_VTEP_ADDRS, MAP_XDP_STATS, PEER_STATS_MAX_ENTRIES, PIN_SUBDIR, PROGRAM_NAMES, PROG_DECAP,
    PROG_ENCAP, PROG_POD_EGRESS, PROG_XDP_DECAP, VTEPS_MAX_ENTRIES, VTEP_ADDRS_MAX_ENTRIES,
};
use ipnet::Ipv4Net;
use std::net::Ipv4Addr;
use tracing::{debug, info, warn};

pub use attach::{AttachMode, NL_HANDLE, NL_PRIORITY};
#[cfg(test)]
use config::parse_port_range;
use config::{default_ttl, ifindex, local_port_range};
pub use config::{DatapathConfig, GsoDecap};
pub use maps::{Counters, PodCounters, XdpCounters};
pub use probe::{probe, ProbeError, ProbeFeature, ProbeOptions, ProbeReport};

/// The object built from flannel-ebpf by build.rs, aligned as aya's ELF parser requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel-ebpf.o"));

/// The embedded eBPF object: an ELF file for `bpfel-unknown-none`, with BTF.
pub fn object_bytes() -> &'static [u8] {
    OBJECT
}

/// Errors of the eBPF datapath; each says which operation failed on which object.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// A field of [`DatapathConfig`] is unusable.
    #[error("invalid eBPF datapath configuration: {field} {detail}")]
    Config {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        detail: String,
    },
    /// A device named in the configuration does not exist (in this network namespace).
    #[error("look up interface {name}")]
    Interface {
        /// The device name.
        name: String,
        /// The error of `if_nametoindex`.
        #[source]
        source: io::Error,
    },
    /// A file operation on the pin directory, mountinfo or a sysctl failed.
    #[error("{op} {}", path.display())]
    Io {
        /// The operation (`read`, `create directory`, ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// bpffs could not be mounted where the pins go.
    #[error("mount bpffs on {} (needed to pin the datapath's maps and links)", path.display())]
    MountBpffs {
        /// The mount point.
        path: PathBuf,
        /// The error of mount(2).
        #[source]
        source: io::Error,
    },
    /// A pinned map was made by a flannel-rs with another layout of the same version.
    #[error(
        "the pinned map {} does not match this flanneld ({detail}); remove {} (the datapath \
         uninstall, dataplane::detach_all, does) to start with fresh maps",
        path.display(),
        path.parent().unwrap_or(path).display()
    )]
    IncompatiblePin {
        /// The pin.
        path: PathBuf,
        /// What differs.
        detail: String,
    },
    /// The kernel refused the object (creating its maps needs root, or CAP_BPF).
    #[error("load the embedded eBPF object (flannel-ebpf) into the kernel; run flanneld as root")]
    Load(#[source] Box<EbpfError>),
    /// The embedded object lacks maps or programs that flannel-common names: flannel-ebpf and
    /// flannel-common disagree, which a rebuild of the agent should fix.
    #[error("the embedded eBPF object lacks {missing:?}, which flannel-common names; rebuild flanneld")]
    MissingNames {
        /// The names from flannel-common that the object does not have.
        missing: Vec<&'static str>,
    },
    /// Loading (verifying) a program failed.
    #[error("load {program} into the kernel")]
    Program {
        /// The program.
        program: &'static str,
        /// aya's error, with the verifier log.
        #[source]
        source: Box<ProgramError>,
    },
    /// Attaching a program failed.
    #[error("attach {program} to {hook}")]
    Attach {
        /// The program.
        program: &'static str,
        /// "egress of flannel.1".
        hook: String,
        /// The error of aya or the kernel.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// Detaching a program failed.
    #[error("detach {program} from {hook}")]
    Detach {
        /// The program.
        program: &'static str,
        /// "egress of flannel.1".
        hook: String,
        /// The error of aya or the kernel.
        #[source]
        source: Box<dyn Error + Send + Sync>,
    },
    /// A map operation failed.
    #[error("{op} {object} in {map}")]
    Map {
        /// The operation (`insert`, `remove`, `read`).
        op: &'static str,
        /// The map.
        map: &'static str,
        /// The entry or aspect operated on.
        object: String,
        /// aya's error.
        #[source]
        source: Box<MapError>,
    },
    /// The kernel cannot run the datapath.
    #[error("the kernel cannot run the eBPF datapath")]
    Probe(#[source] ProbeError),
}

/// The loaded and attached datapath. Dropping it leaves everything attached and pinned.
pub struct Datapath {
    /// The object: its programs (the maps are taken out into the fields below).
    ebpf: Ebpf,
    /// `FLANNEL_VTEPS` and `FLANNEL_VTEP_ADDRS`.
    vteps: maps::VtepTable,
    /// `FLANNEL_STATS`.
    stats: PerCpuArray<MapData, u64>,
    /// `FLANNEL_LOCAL_PODS`.
    pods: maps::PodTable,
    /// `FLANNEL_POD_STATS`.
    pod_stats: PerCpuArray<MapData, u64>,
    /// `FLANNEL_XDP_STATS`.
    xdp_stats: PerCpuArray<MapData, u64>,
    /// `flannel_xdp_decap` is wanted on the uplink (attached together with `flannel_decap`).
    decap_xdp: bool,
    /// The underlay device.
    uplink: String,
    /// The pod fast path is on.
    pod_fast_path: bool,
    /// The pod veths (by index) `flannel_pod_egress` has been attached to by this
    /// `Datapath`, with their names.
    pod_ports: BTreeMap<u32, String>,
    /// `<pin-dir>/v1`.
    dir: PathBuf,
    /// The configuration the programs were loaded with.
    program_config: ProgramConfig,
    /// The attach mode in use (resolved).
    mode: AttachMode,
    /// Whether `flannel_decap` is wanted at all.
    decap: bool,
    /// The decap hook while it waits for the first [`Datapath::sync_vteps`].
    pending_decap: Option<attach::Hook>,
    /// What the probe found.
    probe: ProbeReport,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("dir", &self.dir)
            .field("mode", &self.mode)
            .field("decap_attached", &self.decap_attached())
            .field("gso_decap", &self.gso_decap())
            .field("vteps", &self.vteps.entries().len())
            .finish_non_exhaustive()
    }
}

impl Datapath {
    /// Loads and attaches the datapath; see the module docs. Runs in the calling thread's
    /// network namespace.
    ///
    /// `flannel_decap` drops VXLAN from unknown VTEPs, so on a first start (no pinned VTEPs)
    /// it is attached only by the first [`Datapath::sync_vteps`], once the peers are known;
    /// until then the kernel decapsulates. After a restart the pinned VTEPs are known and it
    /// is attached (replaced) right away.
    pub fn load(config: &DatapathConfig, pin_dir: &Path) -> Result<Self, DataplaneError> {
        config.validate()?;
        let probe = probe(&ProbeOptions::default()).map_err(DataplaneError::Probe)?;
        let vxlan_ifindex = ifindex(&config.vxlan_dev)?;
        let uplink_ifindex = ifindex(&config.uplink_dev)?;
        let (src_port_min, src_port_max) = match config.src_port_range {
            Some(range) => range,
            None => local_port_range()?,
        };
        let gso = match config.gso_decap {
            GsoDecap::Auto => probe.decap_l4_udp,
            GsoDecap::Force => true,
            GsoDecap::Off => false,
        };
        let program_config = ProgramConfig {
            vtep_ip: config.vtep_ip.octets(),
            vni: config.vni,
            vxlan_ifindex,
            uplink_ifindex,
            flags: if gso { CFG_F_DECAP_GSO } else { 0 }
                | if probe.decap_l4_udp { CFG_F_DECAP_L4_UDP } else { 0 }
                | if config.pod_fast_path { CFG_F_POD_FAST_PATH } else { 0 }
                | if config.decap_xdp { CFG_F_XDP_DECAP } else { 0 },
            vtep_mac: config.vtep_mac,
            port: config.port,
            src_port_min,
            src_port_max,
            ttl: default_ttl()?,
            _pad: [0; 3],
        };

        bpffs::ensure(pin_dir)?;
        let dir = pin_dir.join(PIN_SUBDIR);
        fs::create_dir_all(&dir).map_err(|source| DataplaneError::Io {
            op: "create directory",
            path: dir.clone(),
            source,
        })?;
        check_pinned_maps(&dir)?;

        let mut loader = EbpfLoader::new();
        for name in MAP_NAMES {
            loader.map_pin_path(name, dir.join(name));
        }
        let mut ebpf = loader
            .override_global(GLOBAL_CONFIG, &program_config, true)
            .load(object_bytes())
            .map_err(|err| DataplaneError::Load(Box::new(err)))?;
        let missing = contents(&ebpf).missing();
        if !missing.is_empty() {
            return Err(DataplaneError::MissingNames { missing });
        }
        let take = |ebpf: &mut Ebpf, name: &'static str| {
            ebpf.take_map(name)
                .ok_or(DataplaneError::MissingNames { missing: vec![name] })
        };
        let vteps = maps::VtepTable::new(
            take(&mut ebpf, MAP_VTEPS)?,
            take(&mut ebpf, MAP_VTEP_ADDRS)?,
            take(&mut ebpf, MAP_PEER_STATS)?,
        )?;
        let stats = per_cpu_array(take(&mut ebpf, MAP_STATS)?, MAP_STATS)?;
        let pod_stats = per_cpu_array(take(&mut ebpf, MAP_POD_STATS)?, MAP_POD_STATS)?;
        let xdp_stats = per_cpu_array(take(&mut ebpf, MAP_XDP_STATS)?, MAP_XDP_STATS)?;
        xdp_program(&mut ebpf)?;
        let xdp_pin = attach::link_pin(&dir, PROG_XDP_DECAP);
        if !config.decap_xdp {
            // XDP strips only what flannel_decap then delivers: it goes first.
            attach::detach_pinned_link(&xdp_pin).map_err(|source| DataplaneError::Io {
                op: "detach and unpin",
                path: xdp_pin.clone(),
                source,
            })?;
        }
        let mut pods = maps::PodTable::new(take(&mut ebpf, MAP_LOCAL_PODS)?)?;
        let mode = config.attach.resolve();
        if !config.pod_fast_path {
            // Left by a run with the fast path on: the old flannel_pod_egress (loaded with the
            // fast path on) would keep running on the veths. The local pods are only read by
            // programs that now ignore them, but keep the map honest for bpftool.
            pods.sync(&BTreeMap::new())?;
            detach_pod_ports(&dir, &BTreeSet::new())?;
            if mode == AttachMode::Netlink {
                // cls_bpf filters have no pins to find them by: look on every device.
                let names = attach::interfaces().map_err(|source| DataplaneError::Io {
                    op: "list network interfaces for",
                    path: dir.clone(),
                    source,
                })?;
                for iface in names {
                    attach::detach(&attach::Hook::new(PROG_POD_EGRESS, &iface, TcAttachType::Ingress, &dir))?;
                }
            }
        }

        let encap = attach::Hook::new(PROG_ENCAP, &config.vxlan_dev, TcAttachType::Egress, &dir);
        attach::attach(program(&mut ebpf, PROG_ENCAP)?, &encap, mode)?;
        let decap = attach::Hook::new(PROG_DECAP, &config.uplink_dev, TcAttachType::Ingress, &dir);
        program(&mut ebpf, PROG_DECAP)?;
        let mut pending_decap = None;
        if !config.decap {
            attach::detach(&decap)?;
        } else if vteps.entries().is_empty() {
            pending_decap = Some(decap);
        } else {
            attach::attach(program(&mut ebpf, PROG_DECAP)?, &decap, mode)?;
            if config.decap_xdp {
                attach::attach_xdp(xdp_program(&mut ebpf)?, PROG_XDP_DECAP, &config.uplink_dev, &xdp_pin)?;
            }
        }
        info!(
            pin_dir = %dir.display(),
            ?mode,
            gso_decap = gso,
            decap = config.decap,
            decap_waits_for_peers = pending_decap.is_some(),
            vteps = vteps.entries().len(),
            "eBPF datapath attached"
        );
        program(&mut ebpf, PROG_POD_EGRESS)?;
        Ok(Self {
            ebpf,
            vteps,
            stats,
            pods,
            pod_stats,
            xdp_stats,
            decap_xdp: config.decap_xdp,
            uplink: config.uplink_dev.clone(),
            pod_fast_path: config.pod_fast_path,
            pod_ports: BTreeMap::new(),
            dir,
            program_config,
            mode,
            decap: config.decap,
            pending_decap,
            probe,
        })
    }

    /// Sets the VTEP that serves `subnet` (a remote node's lease).
    pub fn upsert_vtep(&mut self, subnet: Ipv4Net, vtep: RemoteVtep) -> Result<(), DataplaneError> {
        self.vteps.sweep_strays()?;
        self.vteps.upsert(subnet, vtep)
    }

    /// Removes the VTEP of `subnet`; `false` if there was none.
    pub fn remove_vtep(&mut self, subnet: Ipv4Net) -> Result<bool, DataplaneError> {
        self.vteps.sweep_strays()?;
        self.vteps.remove(subnet)
    }

    /// Makes the maps hold exactly `desired` (call it with the complete peer set), and
    /// attaches `flannel_decap` if it waited for the peers. Returns how many entries changed.
    pub fn sync_vteps(&mut self, desired: &BTreeMap<Ipv4Net, RemoteVtep>) -> Result<usize, DataplaneError> {
        self.vteps.sweep_strays()?;
        let desired: BTreeMap<Ipv4Net, RemoteVtep> = desired.iter().map(|(net, vtep)| (net.trunc(), *vtep)).collect();
        let stale: Vec<Ipv4Net> = self
            .vteps
            .entries()
            .keys()
            .filter(|net| !desired.contains_key(net))
            .copied()
            .collect();
        let mut changed = 0;
        for (net, vtep) in &desired {
            if self.vteps.entries().get(net) != Some(vtep) {
                self.vteps.upsert(*net, *vtep)?;
                changed += 1;
            }
        }
        for net in stale {
            self.vteps.remove(net)?;
            changed += 1;
        }
        if let Some(hook) = self.pending_decap.take() {
            let prog = program(&mut self.ebpf, PROG_DECAP)?;
            if let Err(err) = attach::attach(prog, &hook, self.mode) {
                self.pending_decap = Some(hook);
                return Err(err);
            }
            info!(hook = %hook.describe(), "flannel_decap attached now that the peers are known");
            if self.decap_xdp {
                let pin = attach::link_pin(&self.dir, PROG_XDP_DECAP);
                attach::attach_xdp(xdp_program(&mut self.ebpf)?, PROG_XDP_DECAP, &self.uplink, &pin)?;
                info!(iface = %self.uplink, "flannel_xdp_decap attached");
            }
        }
        Ok(changed)
    }

    /// The remote VTEPs as the kernel has them (for reconcile diffing and `flannelctl peers`).
    pub fn vteps(&self) -> Result<Vec<(Ipv4Net, RemoteVtep)>, DataplaneError> {
        self.vteps.read()
    }

    /// The datapath counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, DataplaneError> {
        maps::read_counters(&self.stats)
    }

    /// The per-peer counters, summed over CPUs, by VTEP address.
    pub fn peer_counters(&self) -> Result<BTreeMap<Ipv4Addr, PeerStats>, DataplaneError> {
        self.vteps.peer_counters()
    }

    /// The pod fast path's counters, summed over CPUs.
    pub fn pod_counters(&self) -> Result<PodCounters, DataplaneError> {
        maps::read_pod_counters(&self.pod_stats)
    }

    /// `flannel_xdp_decap`'s counters, summed over CPUs.
    pub fn xdp_counters(&self) -> Result<XdpCounters, DataplaneError> {
        maps::read_xdp_counters(&self.xdp_stats)
    }

    /// Whether XDP decapsulation is on.
    pub fn decap_xdp(&self) -> bool {
        self.decap_xdp
    }

    /// Whether the pod fast path is on.
    pub fn pod_fast_path(&self) -> bool {
        self.pod_fast_path
    }

    /// Pod fast path: attaches `flannel_pod_egress` to the ingress of each pod veth in
    /// `ports` (index -> name) it is not yet attached to by this `Datapath` (replacing, without
    /// a gap, what an earlier agent attached), and releases the attachments of veths that are
    /// gone. Returns how many attachments changed. Does nothing with the fast path off.
    ///
    /// A veth that cannot be attached (it vanished meanwhile) is skipped with a warning: its
    /// pod keeps the kernel path, and the next call tries again.
    pub fn sync_pod_ports(&mut self, ports: &BTreeMap<u32, String>) -> Result<usize, DataplaneError> {
        if !self.pod_fast_path {
            return Ok(0);
        }
        let mut changed = 0;
        self.pod_ports
            .retain(|index, name| ports.get(index).is_some_and(|now| now == name));
        for (index, name) in ports {
            if self.pod_ports.contains_key(index) {
                continue;
            }
            let hook = pod_hook(&self.dir, *index, name);
            let prog = program(&mut self.ebpf, PROG_POD_EGRESS)?;
            match attach::attach(prog, &hook, self.mode) {
                Ok(()) => {
                    debug!(hook = %hook.describe(), "flannel_pod_egress attached");
                    self.pod_ports.insert(*index, name.clone());
                    changed += 1;
                }
                Err(err) => {
                    warn!(hook = %hook.describe(), error = %chain(&err), "cannot attach the pod fast path; the pod keeps the kernel path")
                }
            }
        }
        let keep: BTreeSet<u32> = self.pod_ports.keys().copied().collect();
        changed += detach_pod_ports(&self.dir, &keep)?;
        Ok(changed)
    }

    /// Pod fast path: makes `FLANNEL_LOCAL_PODS` hold exactly `desired` (nothing with the
    /// fast path off). Returns how many entries changed.
    pub fn sync_local_pods(&mut self, desired: &BTreeMap<Ipv4Addr, LocalPod>) -> Result<usize, DataplaneError> {
        if !self.pod_fast_path {
            return self.pods.sync(&BTreeMap::new());
        }
        self.pods.sync(desired)
    }

    /// The local pods as the agent last wrote them.
    pub fn local_pods(&self) -> &BTreeMap<Ipv4Addr, LocalPod> {
        self.pods.entries()
    }

    /// Whether `flannel_decap` is attached (it waits for the first [`Datapath::sync_vteps`]
    /// on a first start, and is off when the configuration says so).
    pub fn decap_attached(&self) -> bool {
        self.decap && self.pending_decap.is_none()
    }

    /// The attach mode in use.
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// `<pin-dir>/v1`, where the maps and links are pinned.
    pub fn pin_dir(&self) -> &Path {
        &self.dir
    }

    /// What the probe found when loading.
    pub fn probe_report(&self) -> &ProbeReport {
        &self.probe
    }

    /// Whether GRO aggregates are decapsulated in BPF.
    pub fn gso_decap(&self) -> bool {
        self.program_config.flags & CFG_F_DECAP_GSO != 0
    }
}

/// Detaches every flannel-rs program in the calling thread's network namespace (TCX links
/// pinned under `pin_dir`, and `cls_bpf` filters running our programs on any device), then
/// removes the pins. Traffic continues through the kernel's `flannel.<VNI>`. For uninstall.
pub fn detach_all(pin_dir: &Path) -> Result<(), DataplaneError> {
    let dir = pin_dir.join(PIN_SUBDIR);
    // XDP strips what flannel_decap delivers: detach it first.
    let xdp_pin = attach::link_pin(&dir, PROG_XDP_DECAP);
    attach::detach_pinned_link(&xdp_pin).map_err(|source| DataplaneError::Io {
        op: "detach and unpin",
        path: xdp_pin.clone(),
        source,
    })?;
    let names = attach::interfaces().map_err(|source| DataplaneError::Io {
        op: "list network interfaces for",
        path: dir.clone(),
        source,
    })?;
    for iface in names {
        for (program, direction) in [
            (PROG_ENCAP, TcAttachType::Egress),
            (PROG_DECAP, TcAttachType::Ingress),
            (PROG_POD_EGRESS, TcAttachType::Ingress),
        ] {
            attach::detach(&attach::Hook::new(program, &iface, direction, &dir))?;
        }
    }
    detach_pod_ports(&dir, &BTreeSet::new())?;
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(DataplaneError::Io {
                op: "list",
                path: dir,
                source,
            })
        }
    };
    for entry in entries {
        let entry = entry.map_err(|source| DataplaneError::Io {
            op: "list",
            path: dir.clone(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if attach::is_link_pin(&name) || MAP_NAMES.contains(&name.as_str()) {
            let path = entry.path();
            fs::remove_file(&path).map_err(|source| DataplaneError::Io {
                op: "remove pin",
                path,
                source,
            })?;
        }
    }
    match fs::remove_dir(&dir) {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DataplaneError::Io {
            op: "remove directory",
            path: dir,
            source,
        }),
    }
}

/// The hook of `flannel_pod_egress` on pod veth `index` (`name`); its TCX link is pinned as
/// `link_flannel_pod_egress_<index>`.
fn pod_hook(dir: &Path, index: u32, name: &str) -> attach::Hook {
    let mut hook = attach::Hook::new(PROG_POD_EGRESS, name, TcAttachType::Ingress, dir);
    hook.pin = dir.join(format!("{POD_LINK_PREFIX}{index}"));
    hook
}

/// File name prefix of the pinned TCX links of `flannel_pod_egress`, followed by the veth's
/// index.
const POD_LINK_PREFIX: &str = "link_flannel_pod_egress_";

/// Detaches and unpins the `flannel_pod_egress` links in `dir` of veths not in `keep`;
/// returns how many. (In netlink mode the filters go with their veth.)
fn detach_pod_ports(dir: &Path, keep: &BTreeSet<u32>) -> Result<usize, DataplaneError> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(DataplaneError::Io {
                op: "list",
                path: dir.to_owned(),
                source,
            })
        }
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(index) = name.strip_prefix(POD_LINK_PREFIX).and_then(|i| i.parse::<u32>().ok()) else {
            continue;
        };
        if keep.contains(&index) {
            continue;
        }
        let path = entry.path();
        attach::detach_pinned_link(&path).map_err(|source| DataplaneError::Io {
            op: "detach and unpin",
            path: path.clone(),
            source,
        })?;
        debug!(pin = %path.display(), "released the pod fast path of a veth that is gone");
        removed += 1;
    }
    Ok(removed)
}

/// An error and its sources on one line (also the vxlan backend's, for the probe's reason).
pub(crate) fn chain(e: &dyn Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Opens a per-CPU array map of counters.
fn per_cpu_array(map: aya::maps::Map, name: &'static str) -> Result<PerCpuArray<MapData, u64>, DataplaneError> {
    PerCpuArray::try_from(map).map_err(|source| DataplaneError::Map {
        op: "open",
        map: name,
        object: "as a per-CPU array".into(),
        source: Box::new(source),
    })
}

/// The per-peer counters from the pinned `FLANNEL_PEER_STATS` under `pin_dir`
/// (`flannelctl peers`). A pin directory of an agent from before the map existed has none:
/// then the answer is empty.
pub fn pinned_peer_counters(pin_dir: &Path) -> Result<BTreeMap<Ipv4Addr, PeerStats>, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_PEER_STATS);
    if !path.exists() {
        return Ok(BTreeMap::new());
    }
    let map = maps::PeerStatsHash::try_from(maps::open_pinned(&path, MAP_PEER_STATS)?).map_err(|source| {
        DataplaneError::Map {
            op: "open",
            map: MAP_PEER_STATS,
            object: "as a per-CPU hash".into(),
            source: Box::new(source),
        }
    })?;
    maps::read_peer_counters(&map)
}

/// The local pods from the pinned `FLANNEL_LOCAL_PODS` under `pin_dir` (tests, debugging).
pub fn pinned_local_pods(pin_dir: &Path) -> Result<BTreeMap<Ipv4Addr, LocalPod>, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_LOCAL_PODS);
    let table = maps::PodTable::new(maps::open_pinned(&path, MAP_LOCAL_PODS)?)?;
    Ok(table.entries().clone())
}

/// The flows the pinned `FLANNEL_KERNEL_FLOWS` under `pin_dir` keeps on the host's path
/// (tests, debugging).
pub fn pinned_kernel_flows(pin_dir: &Path) -> Result<Vec<(FlowKey, KernelFlow)>, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_KERNEL_FLOWS);
    maps::read_kernel_flows(maps::open_pinned(&path, MAP_KERNEL_FLOWS)?)
}

/// The pod fast path's counters from the pinned `FLANNEL_POD_STATS` under `pin_dir`.
pub fn pinned_pod_counters(pin_dir: &Path) -> Result<PodCounters, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_POD_STATS);
    let stats = per_cpu_array(maps::open_pinned(&path, MAP_POD_STATS)?, MAP_POD_STATS)?;
    maps::read_pod_counters(&stats)
}

/// `flannel_xdp_decap`'s counters from the pinned `FLANNEL_XDP_STATS` under `pin_dir`.
pub fn pinned_xdp_counters(pin_dir: &Path) -> Result<XdpCounters, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_XDP_STATS);
    let stats = per_cpu_array(maps::open_pinned(&path, MAP_XDP_STATS)?, MAP_XDP_STATS)?;
    maps::read_xdp_counters(&stats)
}

/// The XDP program of a loaded object, loaded into the kernel (verified) if it is not yet.
fn xdp_program(ebpf: &mut Ebpf) -> Result<&mut Xdp, DataplaneError> {
    loaded_program(ebpf, PROG_XDP_DECAP, Xdp::load, |p| p.fd().is_ok())
}

/// The counters from the pinned `FLANNEL_STATS` under `pin_dir`, for processes other than the
/// agent (`flannelctl`).
pub fn pinned_counters(pin_dir: &Path) -> Result<Counters, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_STATS);
    let stats = per_cpu_array(maps::open_pinned(&path, MAP_STATS)?, MAP_STATS)?;
    maps::read_counters(&stats)
}

/// The remote VTEPs from the pinned `FLANNEL_VTEPS` under `pin_dir` (`flannelctl peers`).
pub fn pinned_vteps(pin_dir: &Path) -> Result<Vec<(Ipv4Net, RemoteVtep)>, DataplaneError> {
    let path = pin_dir.join(PIN_SUBDIR).join(MAP_VTEPS);
    maps::read_pinned_vteps(maps::open_pinned(&path, MAP_VTEPS)?)
}

/// A loaded object's program, loaded into the kernel (verified) if it is not yet.
fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, DataplaneError> {
    loaded_program(ebpf, name, SchedClassifier::load, |p| p.fd().is_ok())
}

/// The program `name` of a loaded object as its type `P`, loaded into the kernel (verified)
/// unless `is_loaded` says it already is. aya's program types share no trait for `load`,
/// hence the two function arguments.
fn loaded_program<'a, P>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
    load: fn(&mut P) -> Result<(), ProgramError>,
    is_loaded: fn(&P) -> bool,
) -> Result<&'a mut P, DataplaneError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    let program: &mut P = ebpf
        .program_mut(name)
        .ok_or(DataplaneError::MissingNames { missing: vec![name] })?
        .try_into()
        .map_err(|source| DataplaneError::Program {
            program: name,
            source: Box::new(source),
        })?;
    if !is_loaded(program) {
        load(program).map_err(|source| DataplaneError::Program {
            program: name,
            source: Box::new(source),
        })?;
    }
    Ok(program)
}

/// The expected type, key size, value size and capacity of each pinned map.
const PINNED_LAYOUT: [(&str, MapType, u32, u32, u32); 8] = [
    (MAP_XDP_STATS, MapType::PerCpuArray, 4, 8, XdpStat::COUNT),
    (MAP_VTEPS, MapType::LpmTrie, 8, 12, VTEPS_MAX_ENTRIES),
    (MAP_VTEP_ADDRS, MapType::Hash, 4, 4, VTEP_ADDRS_MAX_ENTRIES),
    (MAP_STATS, MapType::PerCpuArray, 4, 8, Stat::COUNT),
    (MAP_PEER_STATS, MapType::PerCpuHash, 4, 32, PEER_STATS_MAX_ENTRIES),
    (MAP_LOCAL_PODS, MapType::Hash, 4, 16, LOCAL_PODS_MAX_ENTRIES),
    (MAP_POD_STATS, MapType::PerCpuArray, 4, 8, PodStat::COUNT),
    (MAP_KERNEL_FLOWS, MapType::LruHash, 16, 8, KERNEL_FLOWS_MAX_ENTRIES),
];

// The sizes above are those of the types the maps hold.
const _: () = {
    assert!(size_of::<flannel_common::VtepKey>() == 8);
    assert!(size_of::<RemoteVtep>() == 12);
    assert!(size_of::<PeerStats>() == 32);
    assert!(size_of::<LocalPod>() == 16);
    assert!(size_of::<flannel_common::FlowKey>() == 16);
    assert!(size_of::<flannel_common::KernelFlow>() == 8);
};

/// Fails if a map pinned in `dir` does not have the layout this build expects: aya would
/// reuse it without checking (`MapData::create_pinned_by_name`), and the programs would then
/// read garbage.
fn check_pinned_maps(dir: &Path) -> Result<(), DataplaneError> {
    for (name, map_type, key_size, value_size, max_entries) in PINNED_LAYOUT {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info = MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map {
            op: "inspect pinned",
            map: name,
            object: path.display().to_string(),
            source: Box::new(source),
        })?;
        let found = (
            info.map_type().ok(),
            info.key_size(),
            info.value_size(),
            info.max_entries(),
        );
        let want = (Some(map_type), key_size, value_size, max_entries);
        if found != want {
            return Err(DataplaneError::IncompatiblePin {
                path,
                detail: format!("found (type, key, value, capacity) = {found:?}, this build uses {want:?}"),
            });
        }
    }
    Ok(())
}

/// The maps and programs an eBPF object contains, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectContents {
    /// Map names, including sections such as `.rodata`.
    pub maps: BTreeSet<String>,
    /// Program names (the names of the entry-point functions).
    pub programs: BTreeSet<String>,
}

impl ObjectContents {
    /// Collects map and program names.
    pub fn new<'a>(maps: impl IntoIterator<Item = &'a str>, programs: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            maps: maps.into_iter().map(str::to_owned).collect(),
            programs: programs.into_iter().map(str::to_owned).collect(),
        }
    }

    /// The map and program names from flannel-common that are not in this object.
    pub fn missing(&self) -> Vec<&'static str> {
        let maps = MAP_NAMES.into_iter().filter(|name| !self.maps.contains(*name));
        let programs = PROGRAM_NAMES.into_iter().filter(|name| !self.programs.contains(*name));
        maps.chain(programs).collect()
    }
}

/// The names of the maps and programs of a loaded object.
fn contents(ebpf: &Ebpf) -> ObjectContents {
    ObjectContents::new(ebpf.maps().map(|(name, _)| name), ebpf.programs().map(|(name, _)| name))
}
