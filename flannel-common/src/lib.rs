//! The kernel/user contract of flannel-rs: BPF map and program names, map keys and values,
//! the load-time configuration and the counters.
//!
//! `flannel-ebpf` (built for `bpfel-unknown-none`) and the agent's `dataplane` module both
//! use these definitions, so a layout change is one edit here and both sides follow. Every
//! type is `#[repr(C)]` with fixed-width fields, explicit padding and a compile-time size
//! assert; with the `user` feature each one is also an [`aya::Pod`] so aya can copy it in and
//! out of maps.
//!
//! IPv4 addresses are `[u8; 4]` in network byte order (the octets as they are on the wire), so
//! the datapath compares them with packet bytes without any byte swapping and `bpftool map
//! dump` prints them as four readable numbers.
//!
//! Maps are pinned under `<pin-dir>/v<DATAPATH_VERSION>/<MAP>`. aya reuses a pinned map without
//! checking its layout, so any change to a key, a value or a map's type or size below must bump
//! [`DATAPATH_VERSION`]: the agent then starts from fresh maps in a new directory.
#![no_std]

use core::{mem::size_of, net::Ipv4Addr};

/// Version of the map layout; part of the pin directory (`<pin-dir>/v1/...`).
pub const DATAPATH_VERSION: u32 = 1;
/// The pin subdirectory for [`DATAPATH_VERSION`].
pub const PIN_SUBDIR: &str = "v1";

// PIN_SUBDIR must name DATAPATH_VERSION (one digit while we are below v10).
const _: () = {
    let dir = PIN_SUBDIR.as_bytes();
    assert!(DATAPATH_VERSION < 10 && dir.len() == 2 && dir[0] == b'v');
    assert!(dir[1] == b'0' + DATAPATH_VERSION as u8);
};

/// Name of the LPM trie that maps a remote pod subnet ([`VtepKey`]) to the VTEP that serves it
/// ([`RemoteVtep`]). Read by `flannel_encap`.
pub const MAP_VTEPS: &str = "FLANNEL_VTEPS";
/// Name of the hash of known VTEP addresses (`[u8; 4]` → `u32`, the number of
/// [`MAP_VTEPS`] entries that name the address). `flannel_decap` drops VXLAN packets whose
/// outer source is not in it.
pub const MAP_VTEP_ADDRS: &str = "FLANNEL_VTEP_ADDRS";
/// Name of the per-CPU array of datapath counters, indexed by [`Stat`].
pub const MAP_STATS: &str = "FLANNEL_STATS";
/// Name of the per-CPU hash of per-peer counters: VTEP address (`[u8; 4]`) -> [`PeerStats`].
/// The agent creates an entry (zero) for every address of [`MAP_VTEP_ADDRS`] and removes it
/// with the address; the programs only add to entries that exist.
pub const MAP_PEER_STATS: &str = "FLANNEL_PEER_STATS";
/// Name of the hash of local pods for the pod fast path: pod IPv4 address (`[u8; 4]`) ->
/// [`LocalPod`]. Written by the agent, read by `flannel_decap`.
pub const MAP_LOCAL_PODS: &str = "FLANNEL_LOCAL_PODS";
/// Name of the per-CPU array of the pod fast path's counters, indexed by [`PodStat`].
pub const MAP_POD_STATS: &str = "FLANNEL_POD_STATS";
/// Name of the per-CPU array of `flannel_xdp_decap`'s counters, indexed by [`XdpStat`].
pub const MAP_XDP_STATS: &str = "FLANNEL_XDP_STATS";
/// Name of the LRU hash of the flows the host's own path (routing, netfilter, conntrack) has
/// carried on this node: [`FlowKey`] -> [`KernelFlow`]. With the pod fast path on,
/// `flannel_encap` and `flannel_decap` add every flow they hand to or take from the kernel's
/// path, and the fast path leaves those flows on that path for their lifetime, so conntrack
/// sees all of a flow's packets or none (a service's reverse NAT, `--ctstate INVALID` drops).
pub const MAP_KERNEL_FLOWS: &str = "FLANNEL_KERNEL_FLOWS";
/// Every map the agent pins, and expects in the built object.
///
/// The last five came after version 1 was released without them. Adding a map does not
/// change the layout of the others, so it needs no [`DATAPATH_VERSION`] bump: an agent that
/// finds the older pins reuses them and creates the new maps beside them.
pub const MAP_NAMES: [&str; 8] = [
    MAP_VTEPS,
    MAP_VTEP_ADDRS,
    MAP_STATS,
    MAP_PEER_STATS,
    MAP_LOCAL_PODS,
    MAP_POD_STATS,
    MAP_XDP_STATS,
    MAP_KERNEL_FLOWS,
];

/// Name of the TC classifier for the egress of `flannel.<VNI>`: encapsulates IPv4 packets for
/// known remote subnets and redirects them to the underlay device.
pub const PROG_ENCAP: &str = "flannel_encap";
/// Name of the TC classifier for the ingress of the underlay device: decapsulates VXLAN
/// packets from known VTEPs and redirects the inner frame into `flannel.<VNI>`.
pub const PROG_DECAP: &str = "flannel_decap";
/// Name of the TC classifier that `probe` runs with `BPF_PROG_TEST_RUN` to learn which
/// `bpf_skb_adjust_room` flags the kernel accepts; never attached. Returns [`PROBE_OK_ENCAP`]
/// and friends.
pub const PROG_PROBE: &str = "flannel_probe";
/// Name of the TC classifier for the ingress of each local pod's host-side veth (the pod
/// fast path): encapsulates IPv4 packets from the pod to a remote pod subnet and redirects
/// them straight to the underlay device, skipping the bridge and the host's routing.
pub const PROG_POD_EGRESS: &str = "flannel_pod_egress";
/// Name of the XDP program for the underlay device (vxlan option `DecapMode: "xdp"`): strips
/// the outer headers of VXLAN from known VTEPs before an skb exists, marks the frame in its
/// XDP metadata ([`XdpMeta`]) and passes it on, so that GRO aggregates the inner flow and
/// `flannel_decap` only has to deliver it.
pub const PROG_XDP_DECAP: &str = "flannel_xdp_decap";
/// Every program the agent expects in the built object.
pub const PROGRAM_NAMES: [&str; 5] = [PROG_ENCAP, PROG_DECAP, PROG_PROBE, PROG_POD_EGRESS, PROG_XDP_DECAP];

/// Name of the global ([`DatapathConfig`]) that the agent sets at load time.
pub const GLOBAL_CONFIG: &str = "FLANNEL_CONFIG";

/// [`PROG_PROBE`] result bit: `bpf_skb_adjust_room(+50, MAC, FIXED_GSO | ENCAP_L3_IPV4 |
/// ENCAP_L4_UDP | ENCAP_L2(14) | ENCAP_L2_ETH)` succeeded.
pub const PROBE_OK_ENCAP: u32 = 1 << 0;
/// [`PROG_PROBE`] result bit: `bpf_skb_adjust_room(-50, MAC, FIXED_GSO | DECAP_L3_IPV4)`
/// succeeded.
pub const PROBE_OK_DECAP: u32 = 1 << 1;
/// [`PROG_PROBE`] result bit: the kernel also accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, which
/// clears the UDP-tunnel GSO state on decap (not in 6.18; see [`CFG_F_DECAP_L4_UDP`]).
pub const PROBE_OK_DECAP_L4_UDP: u32 = 1 << 2;
/// Offset added to the probe's bits so that a result is never confused with a TC verdict.
pub const PROBE_RESULT_BASE: u32 = 0x100;

/// Capacity of [`MAP_VTEPS`]: one entry per remote node lease.
///
/// 65536 is a /16 cluster network cut into /32 leases, far above flannel's usual /8 into
/// /24s; the trie is created with `BPF_F_NO_PREALLOC` (the kernel insists), so the unused
/// capacity costs no memory.
pub const VTEPS_MAX_ENTRIES: u32 = 65536;
/// Capacity of [`MAP_VTEP_ADDRS`]: at most one address per [`MAP_VTEPS`] entry.
pub const VTEP_ADDRS_MAX_ENTRIES: u32 = VTEPS_MAX_ENTRIES;
/// Capacity of [`MAP_PEER_STATS`]: one entry per known VTEP address. Created with
/// `BPF_F_NO_PREALLOC`, so the unused capacity costs no per-CPU memory.
pub const PEER_STATS_MAX_ENTRIES: u32 = VTEP_ADDRS_MAX_ENTRIES;
/// Capacity of [`MAP_LOCAL_PODS`]: pods on this node (kubelet's default limit is 110; a /24
/// lease holds 254).
pub const LOCAL_PODS_MAX_ENTRIES: u32 = 4096;
/// Capacity of [`MAP_KERNEL_FLOWS`]. An LRU map is preallocated: about 5 MB. When it is full
/// the least recently used flow is forgotten, and its next packets may take the fast path;
/// the map only holds flows that crossed the host's path (service traffic, traffic of pods
/// not yet on the fast path), a small part of the conntrack table.
pub const KERNEL_FLOWS_MAX_ENTRIES: u32 = 65536;

/// Key of [`MAP_VTEPS`]: an IPv4 prefix in the layout the kernel's LPM trie expects.
///
/// The kernel reads `prefix_len` first and then compares `addr` byte by byte, most significant
/// bit first (`struct bpf_lpm_trie_key_u8` in `include/uapi/linux/bpf.h`), so `addr` holds the
/// octets in wire order. The layout is that of aya's `lpm_trie::Key<[u8; 4]>` (fields
/// `prefix_len` and `data`), which both aya crates use to address the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VtepKey {
    /// Number of leading bits of `addr` that are significant (0..=32).
    pub prefix_len: u32,
    /// The prefix, network byte order.
    pub addr: [u8; 4],
}

const _: () = assert!(size_of::<VtepKey>() == 8);

impl VtepKey {
    /// Builds the key for `addr/prefix_len`.
    pub const fn new(addr: Ipv4Addr, prefix_len: u32) -> Self {
        Self {
            prefix_len,
            addr: addr.octets(),
        }
    }

    /// The prefix address as an [`Ipv4Addr`].
    pub const fn ipv4(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.addr;
        Ipv4Addr::new(a, b, c, d)
    }
}

/// [`RemoteVtep::flags`] bit: the remote node shares an L2 segment with this one, so its
/// packets are routed directly instead of encapsulated (flannel's `DirectRouting`).
///
/// `flannel_encap` leaves such packets to the kernel (upstream routes them through the
/// underlay device, so they should not reach `flannel.<VNI>` at all); the pod fast path will
/// redirect them to the node without encapsulation.
pub const VTEP_F_DIRECT_ROUTING: u16 = 1 << 0;

/// Value of [`MAP_VTEPS`]: how to reach the VTEP of a remote node (from its lease).
///
/// Fields are ordered so that each is naturally aligned and the struct has no padding byte
/// (aya copies it as raw bytes, and padding would carry uninitialised memory into the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RemoteVtep {
    /// Underlay address of the remote node (the lease's `PublicIP`): the outer destination,
    /// network byte order.
    pub vtep_ip: [u8; 4],
    /// MAC address of the remote node's `flannel.<VNI>` (the lease's `VtepMAC`): the inner
    /// destination MAC.
    pub vtep_mac: [u8; 6],
    /// `VTEP_F_*` bits.
    pub flags: u16,
}

const _: () = assert!(size_of::<RemoteVtep>() == 12);
const _: () = assert!(size_of::<RemoteVtep>() == 4 + 6 + size_of::<u16>());

impl RemoteVtep {
    /// Builds the value for a remote VTEP at `vtep_ip` whose device has MAC `vtep_mac`.
    pub const fn new(vtep_ip: Ipv4Addr, vtep_mac: [u8; 6], flags: u16) -> Self {
        Self {
            vtep_ip: vtep_ip.octets(),
            vtep_mac,
            flags,
        }
    }

    /// The underlay address as an [`Ipv4Addr`].
    pub const fn ipv4(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.vtep_ip;
        Ipv4Addr::new(a, b, c, d)
    }
}

/// [`DatapathConfig::flags`] bit: `flannel_decap` also decapsulates GSO packets (GRO
/// aggregates, or GSO skbs a veth passed on unsegmented).
///
/// Off by default on kernels without [`CFG_F_DECAP_L4_UDP`]: there `bpf_skb_adjust_room`
/// leaves `skb->encapsulation` and `SKB_GSO_UDP_TUNNEL` set on the decapsulated packet
/// (`bpf_skb_net_shrink` in net/core/filter.c only pops bytes), unlike the vxlan driver
/// (`iptunnel_pull_offloads` in include/net/ip_tunnels.h clears both). A packet in that state
/// that is later forwarded to a device which must segment it in software, or which offloads
/// checksums by inner headers, can be dropped or corrupted. Such packets go to the kernel's
/// `flannel.<VNI>` instead, which GRO already made cheap per byte.
pub const CFG_F_DECAP_GSO: u32 = 1 << 0;
/// [`DatapathConfig::flags`] bit: the kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (bpf-next,
/// 2026; not in 6.18), which makes decapsulation clear the UDP-tunnel GSO state as the vxlan
/// driver does. The agent sets it, with [`CFG_F_DECAP_GSO`], when the probe finds the flag.
pub const CFG_F_DECAP_L4_UDP: u32 = 1 << 1;

/// [`DatapathConfig::flags`] bit: the pod fast path is on (vxlan option `PodFastPath`).
/// `flannel_pod_egress` does nothing without it, and `flannel_decap` then ignores
/// [`MAP_LOCAL_PODS`].
pub const CFG_F_POD_FAST_PATH: u32 = 1 << 2;

/// [`DatapathConfig::flags`] bit: `flannel_xdp_decap` runs on the underlay device (vxlan
/// option `DecapMode: "xdp"`), so `flannel_decap` accepts frames it marked. Without the bit
/// `flannel_decap` ignores XDP metadata altogether.
pub const CFG_F_XDP_DECAP: u32 = 1 << 3;

/// [`XdpMeta::magic`]: "FLXD".
pub const XDP_META_MAGIC: u32 = 0x464c_5844;

/// The XDP metadata `flannel_xdp_decap` puts in front of a frame it decapsulated, which
/// `flannel_decap` reads from `__sk_buff::data_meta`. Only XDP programs write metadata, so a
/// frame carrying it was stripped on this host.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct XdpMeta {
    /// [`XDP_META_MAGIC`], native byte order.
    pub magic: u32,
    /// The outer source address of the VXLAN packet (the peer's VTEP), for the per-peer
    /// counters.
    pub vtep_ip: [u8; 4],
}

// XDP metadata lengths must be multiples of 4.
const _: () = assert!(size_of::<XdpMeta>() == 8);

/// Index of a counter in [`MAP_XDP_STATS`]; each slot is a per-CPU `u64`. Every frame
/// `flannel_xdp_decap` sees is counted in exactly one of the packet counters.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum XdpStat {
    /// Frames whose outer headers were stripped and which were marked and passed on.
    StripPackets = 0,
    /// Bytes of those, as passed on (inner frame).
    StripBytes = 1,
    /// Passed unchanged: not VXLAN for this VTEP and VNI.
    PassNotVxlan = 2,
    /// Passed unchanged: VXLAN for us that `flannel_decap` or the kernel handles (the cases of
    /// [`Stat::DecapPassKernel`], or metadata unsupported by the driver).
    PassKernel = 3,
    /// Dropped: the outer source is not a known VTEP (as [`Stat::DecapDropUnknownVtep`]).
    DropUnknownVtep = 4,
}

impl XdpStat {
    /// Every counter, in index order.
    pub const ALL: [Self; 5] = [
        Self::StripPackets,
        Self::StripBytes,
        Self::PassNotVxlan,
        Self::PassKernel,
        Self::DropUnknownVtep,
    ];
    /// Number of slots in [`MAP_XDP_STATS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The slot of this counter in [`MAP_XDP_STATS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name for metrics, logs and `flannelctl`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::StripPackets => "xdp_strip_packets",
            Self::StripBytes => "xdp_strip_bytes",
            Self::PassNotVxlan => "xdp_pass_not_vxlan",
            Self::PassKernel => "xdp_pass_kernel",
            Self::DropUnknownVtep => "xdp_drop_unknown_vtep",
        }
    }
}

// `ALL` must list every variant in index order, or `COUNT` under-sizes the map.
const _: () = {
    let mut i = 0;
    while i < XdpStat::ALL.len() {
        assert!(XdpStat::ALL[i].index() as usize == i);
        i += 1;
    }
};

/// Value of [`MAP_LOCAL_PODS`]: how to deliver a decapsulated packet straight into a local
/// pod with `bpf_redirect_peer`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LocalPod {
    /// Interface index of the pod's host-side veth (a port of the pod bridge); the packet
    /// enters the pod through its peer, the pod's `eth0`.
    pub ifindex: u32,
    /// MAC address of the pod's `eth0`: the inner destination MAC written on delivery.
    pub pod_mac: [u8; 6],
    /// MAC address of the pod bridge (the pod's gateway): the inner source MAC, as if the
    /// host had routed the packet through the bridge.
    pub gw_mac: [u8; 6],
}

const _: () = assert!(size_of::<LocalPod>() == 16);

/// Key of [`MAP_KERNEL_FLOWS`]: a flow in canonical order, the same for both directions. The
/// endpoint with the lower (address, port) is `a`. Ports are those of TCP and UDP; an ICMP
/// echo request and its reply use the echo identifier as both ports. Addresses and ports are
/// in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// The lower endpoint's IPv4 address.
    pub addr_a: [u8; 4],
    /// The higher endpoint's IPv4 address.
    pub addr_b: [u8; 4],
    /// The lower endpoint's port.
    pub port_a: [u8; 2],
    /// The higher endpoint's port.
    pub port_b: [u8; 2],
    /// IP protocol number (1, 6 or 17).
    pub protocol: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<FlowKey>() == 16);

impl FlowKey {
    /// The key of the flow a packet from `saddr:sport` to `daddr:dport` belongs to.
    pub fn new(protocol: u8, saddr: [u8; 4], sport: [u8; 2], daddr: [u8; 4], dport: [u8; 2]) -> Self {
        // Integers, not arrays: an array comparison becomes a memcmp call, which BPF lacks.
        let s = (u32::from_be_bytes(saddr), u16::from_be_bytes(sport));
        let d = (u32::from_be_bytes(daddr), u16::from_be_bytes(dport));
        let (a, b) = if s <= d {
            ((saddr, sport), (daddr, dport))
        } else {
            ((daddr, dport), (saddr, sport))
        };
        Self {
            addr_a: a.0,
            addr_b: b.0,
            port_a: a.1,
            port_b: b.1,
            protocol,
            _pad: [0; 3],
        }
    }
}

/// Value of [`MAP_KERNEL_FLOWS`].
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KernelFlow {
    /// `bpf_ktime_get_ns()` when the flow was first seen on the host's path.
    pub first_seen_ns: u64,
}

const _: () = assert!(size_of::<KernelFlow>() == 8);

/// Value of [`MAP_PEER_STATS`]: what this node exchanged with one remote VTEP, per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PeerStats {
    /// Packets encapsulated to the VTEP (by `flannel_encap` or `flannel_pod_egress`); a GSO
    /// packet counts once.
    pub encap_packets: u64,
    /// Bytes of those, outer headers included.
    pub encap_bytes: u64,
    /// Packets from the VTEP decapsulated by `flannel_decap`.
    pub decap_packets: u64,
    /// Bytes of those, as delivered (inner Ethernet frame).
    pub decap_bytes: u64,
}

const _: () = assert!(size_of::<PeerStats>() == 32);

/// Index of a counter in [`MAP_POD_STATS`] (the pod fast path); each slot is a per-CPU `u64`.
///
/// Every packet `flannel_pod_egress` sees is counted in exactly one of the `Egress*` packet
/// counters. `DecapToPod*` count the part of `flannel_decap`'s [`Stat::DecapPackets`] that
/// went straight into a pod.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PodStat {
    /// Packets from a pod encapsulated and redirected to the underlay.
    EgressEncapPackets = 0,
    /// Bytes of those, as sent (outer headers included).
    EgressEncapBytes = 1,
    /// Passed to the bridge: not IPv4, or not to a remote pod subnet (local pods, services,
    /// the host, the outside world), or the fast path is off.
    EgressPassNotRemote = 2,
    /// Passed to the bridge: to a remote subnet but not for the fast path (DirectRouting
    /// peer, TTL about to expire, a broadcast or multicast frame, or one of the encap
    /// program's own reasons: too big, no underlay route, unsupported GSO), or a flow the
    /// host's path carries already ([`MAP_KERNEL_FLOWS`]), or a packet that cannot be told
    /// apart by flow (a fragment, IP options, a protocol other than TCP, UDP and ICMP echo).
    EgressPassKernel = 3,
    /// Dropped: writing the headers failed after the room was made.
    EgressDropWriteFailed = 4,
    /// Decapsulated packets delivered straight into a local pod (`bpf_redirect_peer`).
    DecapToPodPackets = 5,
    /// Bytes of those (inner frame).
    DecapToPodBytes = 6,
}

impl PodStat {
    /// Every counter, in index order.
    pub const ALL: [Self; 7] = [
        Self::EgressEncapPackets,
        Self::EgressEncapBytes,
        Self::EgressPassNotRemote,
        Self::EgressPassKernel,
        Self::EgressDropWriteFailed,
        Self::DecapToPodPackets,
        Self::DecapToPodBytes,
    ];
    /// Number of slots in [`MAP_POD_STATS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The slot of this counter in [`MAP_POD_STATS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name for metrics, logs and `flannelctl`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EgressEncapPackets => "pod_egress_encap_packets",
            Self::EgressEncapBytes => "pod_egress_encap_bytes",
            Self::EgressPassNotRemote => "pod_egress_pass_not_remote",
            Self::EgressPassKernel => "pod_egress_pass_kernel",
            Self::EgressDropWriteFailed => "pod_egress_drop_write_failed",
            Self::DecapToPodPackets => "decap_to_pod_packets",
            Self::DecapToPodBytes => "decap_to_pod_bytes",
        }
    }
}

// `ALL` must list every variant in index order, or `COUNT` under-sizes the map.
const _: () = {
    let mut i = 0;
    while i < PodStat::ALL.len() {
        assert!(PodStat::ALL[i].index() as usize == i);
        i += 1;
    }
};

/// Load-time configuration of the programs: the global [`GLOBAL_CONFIG`].
///
/// A global rather than a config map: the agent sets it with `EbpfLoader::override_global`,
/// aya freezes the `.rodata` map that holds it, and the verifier then treats every field as a
/// known constant (it prunes branches on `flags`, and each packet pays no map lookup). The
/// values only change when `flannel.<VNI>` or the underlay device changes, and then the agent
/// loads the programs again and swaps them in atomically; the maps, which do change at run
/// time, are pinned and carry over.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DatapathConfig {
    /// This node's VTEP address (flannel's `PublicIP`, the `local` of `flannel.<VNI>`): the
    /// outer source of encapsulated packets and the outer destination `flannel_decap` accepts.
    /// Network byte order.
    pub vtep_ip: [u8; 4],
    /// The VXLAN network identifier (flannel's `VNI`), host byte order, below 2^24.
    pub vni: u32,
    /// Interface index of `flannel.<VNI>`, where decapsulated frames are delivered.
    pub vxlan_ifindex: u32,
    /// Interface index of the underlay device (flannel's external interface). The encap
    /// program's FIB lookup starts from it, as if the outer packet was forwarded there.
    pub uplink_ifindex: u32,
    /// `CFG_F_*` bits.
    pub flags: u32,
    /// MAC address of `flannel.<VNI>`: the inner source MAC of encapsulated frames, and the
    /// inner destination MAC `flannel_decap` accepts.
    pub vtep_mac: [u8; 6],
    /// UDP destination port (flannel's `Port`, 8472 by default), host byte order.
    pub port: u16,
    /// Lowest outer UDP source port, host byte order. The kernel's vxlan device uses
    /// `net.ipv4.ip_local_port_range` when its `srcport` range is unset (as flannel creates
    /// it), so the agent copies that range here.
    pub src_port_min: u16,
    /// Upper end (exclusive, as in the kernel's `udp_flow_src_port`) of the source ports.
    pub src_port_max: u16,
    /// Outer TTL. The vxlan device is `ttl auto`, i.e. the route's hop limit, which is
    /// `net.ipv4.ip_default_ttl` unless a route sets one; the agent copies the sysctl.
    pub ttl: u8,
    /// Explicit padding (zero).
    pub _pad: [u8; 3],
}

const _: () = assert!(size_of::<DatapathConfig>() == 36);
const _: () = assert!(
    size_of::<DatapathConfig>() == 4 * 5 + 6 + 2 * 3 + 1 + 3,
    "DatapathConfig has implicit padding"
);

impl DatapathConfig {
    /// All zero: the value the object is built with. A zero `vxlan_ifindex` makes both programs
    /// pass every packet, so an object loaded without a configuration does nothing.
    pub const ZERO: Self = Self {
        vtep_ip: [0; 4],
        vni: 0,
        vxlan_ifindex: 0,
        uplink_ifindex: 0,
        flags: 0,
        vtep_mac: [0; 6],
        port: 0,
        src_port_min: 0,
        src_port_max: 0,
        ttl: 0,
        _pad: [0; 3],
    };
}

/// Index of a counter in [`MAP_STATS`]; each slot is a per-CPU `u64`.
///
/// Every packet a program sees is counted in exactly one of its outcome counters (those that
/// are not `*Bytes`), so they add up to the packets seen. `Pass` means the packet continues
/// unchanged (`TC_ACT_OK`) to the kernel's own path, which handles it as upstream flannel's
/// datapath would; `Drop` means `TC_ACT_SHOT`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stat {
    /// Packets encapsulated and redirected to the underlay.
    EncapPackets = 0,
    /// Bytes of those, as sent (outer headers included; a GSO packet counts once, whole).
    EncapBytes = 1,
    /// Passed: not IPv4 (ARP, IPv6), or too short to hold an IPv4 header.
    EncapPassNotIpv4 = 2,
    /// Passed: the destination is in no remote subnet of [`MAP_VTEPS`] (or the object was
    /// loaded without a configuration, see [`DatapathConfig::ZERO`]).
    EncapPassNoVtep = 3,
    /// Passed: the subnet's VTEP is marked [`VTEP_F_DIRECT_ROUTING`].
    EncapPassDirectRouting = 4,
    /// Passed: the packet (or a GSO segment) would exceed the underlay route's MTU once
    /// encapsulated; the vxlan driver does the PMTU handling (ICMP "fragmentation needed").
    EncapPassTooBig = 5,
    /// Passed: the underlay FIB lookup for the remote VTEP failed (no route, unreachable,
    /// local address, forwarding disabled on the underlay device).
    EncapPassNoUnderlayRoute = 6,
    /// Passed: the kernel refused `bpf_skb_adjust_room` (e.g. an already encapsulated skb), or a
    /// GSO packet whose segment size the program cannot compute (neither TCP nor UDP).
    EncapPassUnsupported = 7,
    /// Dropped: writing the headers failed after the room was made (should not happen).
    EncapDropWriteFailed = 8,
    /// VXLAN packets decapsulated and redirected into `flannel.<VNI>`.
    DecapPackets = 9,
    /// Bytes of those, as delivered (inner Ethernet frame).
    DecapBytes = 10,
    /// Passed: not a VXLAN packet for this VTEP and VNI (other traffic of the underlay device,
    /// an outer IPv4 header with options or a fragment, which the kernel reassembles first, or
    /// no configuration).
    DecapPassNotVxlan = 11,
    /// Passed to `flannel.<VNI>`: VXLAN for this VTEP and VNI that the kernel handles (GSO
    /// without [`CFG_F_DECAP_GSO`], other VXLAN flags, bad outer IPv4 checksum or lengths, a
    /// UDP checksum, ECN CE outside, inner frame not IPv4 or not addressed to this VTEP).
    DecapPassKernel = 12,
    /// Dropped: the outer source is not a known VTEP ([`MAP_VTEP_ADDRS`]). Upstream accepts
    /// VXLAN from anyone; this datapath does not.
    DecapDropUnknownVtep = 13,
    /// Dropped: UDP to the VXLAN port and this VTEP, but too short to hold VXLAN, inner
    /// Ethernet and inner IPv4 headers.
    DecapDropMalformed = 14,
    /// Dropped: writing the inner Ethernet header failed after the outer headers were removed
    /// (should not happen).
    DecapDropWriteFailed = 15,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Self; 16] = [
        Self::EncapPackets,
        Self::EncapBytes,
        Self::EncapPassNotIpv4,
        Self::EncapPassNoVtep,
        Self::EncapPassDirectRouting,
        Self::EncapPassTooBig,
        Self::EncapPassNoUnderlayRoute,
        Self::EncapPassUnsupported,
        Self::EncapDropWriteFailed,
        Self::DecapPackets,
        Self::DecapBytes,
        Self::DecapPassNotVxlan,
        Self::DecapPassKernel,
        Self::DecapDropUnknownVtep,
        Self::DecapDropMalformed,
        Self::DecapDropWriteFailed,
    ];
    /// Number of slots in [`MAP_STATS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The slot of this counter in [`MAP_STATS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// Whether a packet counted here was dropped (`TC_ACT_SHOT`) rather than passed on or
    /// redirected.
    pub const fn is_drop(self) -> bool {
        matches!(
            self,
            Self::EncapDropWriteFailed
                | Self::DecapDropUnknownVtep
                | Self::DecapDropMalformed
                | Self::DecapDropWriteFailed
        )
    }

    /// Whether this counts bytes rather than packets.
    pub const fn is_bytes(self) -> bool {
        matches!(self, Self::EncapBytes | Self::DecapBytes)
    }

    /// A stable snake_case name for metrics, logs and `flannelctl`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EncapPackets => "encap_packets",
            Self::EncapBytes => "encap_bytes",
            Self::EncapPassNotIpv4 => "encap_pass_not_ipv4",
            Self::EncapPassNoVtep => "encap_pass_no_vtep",
            Self::EncapPassDirectRouting => "encap_pass_direct_routing",
            Self::EncapPassTooBig => "encap_pass_too_big",
            Self::EncapPassNoUnderlayRoute => "encap_pass_no_underlay_route",
            Self::EncapPassUnsupported => "encap_pass_unsupported",
            Self::EncapDropWriteFailed => "encap_drop_write_failed",
            Self::DecapPackets => "decap_packets",
            Self::DecapBytes => "decap_bytes",
            Self::DecapPassNotVxlan => "decap_pass_not_vxlan",
            Self::DecapPassKernel => "decap_pass_kernel",
            Self::DecapDropUnknownVtep => "decap_drop_unknown_vtep",
            Self::DecapDropMalformed => "decap_drop_malformed",
            Self::DecapDropWriteFailed => "decap_drop_write_failed",
        }
    }
}

// `ALL` must list every variant in index order, or `COUNT` under-sizes the map.
const _: () = {
    let mut i = 0;
    while i < Stat::ALL.len() {
        assert!(Stat::ALL[i].index() as usize == i);
        i += 1;
    }
};

// SAFETY (all of them): `#[repr(C)]`, made only of integers and byte arrays (every bit pattern
// is valid), `Copy`, and without padding (the size asserts above; `DatapathConfig` names its
// padding as a field).
#[cfg(feature = "user")]
unsafe impl aya::Pod for VtepKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for RemoteVtep {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for DatapathConfig {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for LocalPod {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for PeerStats {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for FlowKey {}
#[cfg(feature = "user")]
unsafe impl aya::Pod for KernelFlow {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flow_key_is_the_same_both_ways() {
        let a = [10, 244, 1, 5];
        let b = [10, 244, 2, 7];
        let fwd = FlowKey::new(6, a, [0x9c, 0x40], b, [0, 80]);
        assert_eq!(fwd, FlowKey::new(6, b, [0, 80], a, [0x9c, 0x40]));
        assert_eq!(
            (fwd.addr_a, fwd.port_a, fwd.addr_b, fwd.port_b),
            (a, [0x9c, 0x40], b, [0, 80])
        );
        // Same address: the port decides; another protocol is another flow.
        let same = FlowKey::new(17, a, [0, 9], a, [0, 8]);
        assert_eq!((same.port_a, same.port_b), ([0, 8], [0, 9]));
        assert_ne!(fwd, FlowKey::new(17, a, [0x9c, 0x40], b, [0, 80]));
    }

    #[test]
    fn vtep_key_holds_the_octets_in_wire_order() {
        let key = VtepKey::new(Ipv4Addr::new(10, 244, 1, 0), 24);
        assert_eq!(key.addr, [10, 244, 1, 0]);
        assert_eq!(key.ipv4(), Ipv4Addr::new(10, 244, 1, 0));
    }

    #[test]
    fn remote_vtep_round_trips_the_address() {
        let vtep = RemoteVtep::new(Ipv4Addr::new(192, 0, 2, 7), [2, 0, 0, 0, 0, 1], VTEP_F_DIRECT_ROUTING);
        assert_eq!(vtep.ipv4(), Ipv4Addr::new(192, 0, 2, 7));
        assert_eq!(vtep.vtep_ip, [192, 0, 2, 7]);
    }

    #[test]
    fn stat_names_are_unique() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}

/// Wire-format arithmetic that must match the kernel's vxlan driver bit for bit; shared by
/// the eBPF programs and the agent's tests.
pub mod wire {
    /// ECN field of the IPv4 TOS byte (RFC 3168).
    pub const ECN_MASK: u8 = 0x03;
    /// ECN "Congestion Experienced".
    pub const ECN_CE: u8 = 0x03;
    /// ECN "ECN-Capable Transport (0)".
    pub const ECN_ECT0: u8 = 0x02;

    /// The Internet checksum (RFC 1071) of a 20-byte IPv4 header: the value for the checksum
    /// field when that field is zero, and zero when the header, checksum included, is intact.
    #[inline(always)]
    pub fn ipv4_checksum(header: &[u8; 20]) -> [u8; 2] {
        // SAFETY: `[u8; 20]` and `[[u8; 2]; 10]` have the same size and alignment 1.
        let words: &[[u8; 2]; 10] = unsafe { &*(header as *const [u8; 20]).cast() };
        let mut sum: u32 = 0;
        for word in words {
            sum += u32::from(u16::from_be_bytes(*word));
        }
        // Ten words sum to at most 0x9fff6: two folds bring every carry back into 16 bits.
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        (!(sum as u16)).to_be_bytes()
    }

    /// The outer TOS for an inner packet with TOS `inner_tos`, as the vxlan driver computes it
    /// for a device without a `tos` setting (flannel sets none): DSCP 0 and the inner ECN field,
    /// except that CE becomes ECT(0) (`ip_tunnel_ecn_encap` → `INET_ECN_encapsulate`,
    /// include/net/inet_ecn.h).
    #[inline(always)]
    pub const fn outer_tos(inner_tos: u8) -> u8 {
        match inner_tos & ECN_MASK {
            ECN_CE => ECN_ECT0,
            ecn => ecn,
        }
    }

    /// The UDP source port for a flow hash, as the kernel's `udp_flow_src_port`
    /// (include/net/udp.h) maps it into `[min, max)`: the hash is folded so its low bits
    /// reach the upper half, then scaled into the range. `max <= min` yields `min`.
    #[inline(always)]
    pub const fn flow_src_port(hash: u32, min: u16, max: u16) -> u16 {
        let hash = hash ^ (hash << 16);
        let range = max.saturating_sub(min) as u64;
        (((hash as u64 * range) >> 32) as u16).wrapping_add(min)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn checksum_of_a_known_header() {
            // A UDP packet 192.168.0.1 -> 192.168.0.199 (checksum computed independently).
            let mut h = [
                0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8, 0x00, 0x01, 0xc0,
                0xa8, 0x00, 0xc7,
            ];
            assert_eq!(ipv4_checksum(&h), [0xb8, 0x61]);
            h[10] = 0xb8;
            h[11] = 0x61;
            assert_eq!(ipv4_checksum(&h), [0, 0], "an intact header sums to zero");
        }

        #[test]
        fn outer_tos_keeps_only_ecn_and_maps_ce_to_ect0() {
            assert_eq!(outer_tos(0xb8), 0); // DSCP EF, not ECT
            assert_eq!(outer_tos(0xb9), 1); // ECT(1)
            assert_eq!(outer_tos(0x02), 2); // ECT(0)
            assert_eq!(outer_tos(0x03), ECN_ECT0); // CE
        }

        #[test]
        fn src_port_stays_in_the_half_open_range() {
            let (min, max) = (32768, 60999);
            for hash in [0u32, 1, 0xffff, 0x1_0000, 0xdead_beef, u32::MAX] {
                let port = flow_src_port(hash, min, max);
                assert!((min..max).contains(&port), "{hash:#x} -> {port}");
            }
            // Worked example: h = 0x12345678 ^ 0x56780000 = 0x444c5678;
            // 0x444c5678 * 28231 >> 32 = 7531; + 32768.
            assert_eq!(flow_src_port(0x1234_5678, min, max), 32768 + 7531);
            assert_eq!(flow_src_port(7, 100, 100), 100);
        }
    }
}
