//! flannel-rs eBPF datapath: VXLAN encapsulation and decapsulation as TC classifiers.
//!
//! * `flannel_encap` (egress of `flannel.<VNI>`) encapsulates IPv4 packets whose destination
//!   is in a remote node's subnet and redirects them to the underlay device, replacing the
//!   vxlan driver's transmit path with a byte-identical result.
//! * `flannel_decap` (ingress of the underlay device) strips VXLAN from known VTEPs and hands
//!   the inner frame to `flannel.<VNI>`, as the vxlan driver's receive path would.
//! * `flannel_probe` is never attached: the agent runs it once with `BPF_PROG_TEST_RUN` to see
//!   which `bpf_skb_adjust_room` flags the kernel accepts.
//!
//! Whatever the programs do not handle goes on unchanged (`TC_ACT_OK`) to the kernel's own
//! vxlan device, which upstream flannel programs and flannel-rs keeps: detaching the programs,
//! or a map miss, falls back to exactly upstream's datapath. Names, map types and the
//! configuration come from `flannel-common`.
#![no_std]
#![no_main]

mod decap;
mod encap;
mod flows;
mod headers;
mod pod;
mod xdp;

use core::mem::{offset_of, size_of};

use aya_ebpf::{
    bindings::{
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_F_NO_PREALLOC, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT,
    },
    btf_maps::{lpm_trie::Key, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap},
    macros::{btf_map, classifier, xdp},
    programs::{TcContext, XdpContext},
    Global,
};
use flannel_common::{
    DatapathConfig, FlowKey, KernelFlow, LocalPod, PeerStats, PodStat, RemoteVtep, Stat, VtepKey, XdpStat,
    KERNEL_FLOWS_MAX_ENTRIES, LOCAL_PODS_MAX_ENTRIES, PEER_STATS_MAX_ENTRIES, PROBE_OK_DECAP, PROBE_OK_DECAP_L4_UDP,
    PROBE_OK_ENCAP, PROBE_RESULT_BASE, VTEPS_MAX_ENTRIES, VTEP_ADDRS_MAX_ENTRIES,
};
use headers::Ipv4Hdr;

/// Remote pod subnet -> VTEP, longest prefix wins. Filled by the agent from the leases.
///
/// A BTF map (`#[btf_map]`, `.maps` section) so the kernel knows its key and value types and
/// `bpftool map dump` prints field names. aya-ebpf's BTF `LpmTrie` fixes the key type to its
/// own `lpm_trie::Key<K>`; the asserts below keep that byte-identical to `VtepKey`.
#[btf_map]
static FLANNEL_VTEPS: LpmTrie<[u8; 4], RemoteVtep, { VTEPS_MAX_ENTRIES as usize }> = LpmTrie::new();

/// Known VTEP addresses (outer sources `flannel_decap` accepts) -> number of `FLANNEL_VTEPS`
/// entries that name them. Maintained by the agent together with `FLANNEL_VTEPS`.
#[btf_map]
static FLANNEL_VTEP_ADDRS: HashMap<[u8; 4], u32, { VTEP_ADDRS_MAX_ENTRIES as usize }> = HashMap::new();

/// Datapath counters, one `u64` per CPU per [`Stat`], summed by the agent.
#[btf_map]
static FLANNEL_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

/// Per-peer counters: VTEP address -> what was encapsulated to and decapsulated from it, per
/// CPU. The programs create an entry on a known VTEP's first packet (see `count_peer`); the
/// agent removes it when the address leaves `FLANNEL_VTEP_ADDRS`.
#[btf_map]
static FLANNEL_PEER_STATS: PerCpuHashMap<
    [u8; 4],
    PeerStats,
    { PEER_STATS_MAX_ENTRIES as usize },
    { BPF_F_NO_PREALLOC as usize },
> = PerCpuHashMap::new();

/// The pod fast path's local pods: pod IPv4 address -> host-side veth and MACs. Filled by the
/// agent; a pod without an entry takes the kernel's path.
#[btf_map]
static FLANNEL_LOCAL_PODS: HashMap<[u8; 4], LocalPod, { LOCAL_PODS_MAX_ENTRIES as usize }> = HashMap::new();

/// The flows the host's path carries, which the pod fast path leaves to it (see `flows`).
/// Written by `flannel_encap` and `flannel_decap` while the pod fast path is on.
#[btf_map]
static FLANNEL_KERNEL_FLOWS: LruHashMap<FlowKey, KernelFlow, { KERNEL_FLOWS_MAX_ENTRIES as usize }> = LruHashMap::new();

/// The pod fast path's counters, one `u64` per CPU per [`PodStat`].
#[btf_map]
static FLANNEL_POD_STATS: PerCpuArray<u64, { PodStat::COUNT as usize }> = PerCpuArray::new();

/// `flannel_xdp_decap`'s counters, one `u64` per CPU per [`XdpStat`].
#[btf_map]
static FLANNEL_XDP_STATS: PerCpuArray<u64, { XdpStat::COUNT as usize }> = PerCpuArray::new();

/// The node's configuration, set by the agent at load time (`EbpfLoader::override_global`).
/// It lives in `.rodata`, which aya freezes, so the verifier sees constants.
#[unsafe(no_mangle)]
static FLANNEL_CONFIG: Global<DatapathConfig> = Global::new(DatapathConfig::ZERO);

const _: () = assert!(size_of::<Key<[u8; 4]>>() == size_of::<VtepKey>());
const _: () = assert!(offset_of!(Key<[u8; 4]>, prefix_len) == offset_of!(VtepKey, prefix_len));
const _: () = assert!(offset_of!(Key<[u8; 4]>, data) == offset_of!(VtepKey, addr));

/// TC egress of `flannel.<VNI>`: VXLAN-encapsulates packets for remote subnets.
#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    verdict(encap::encap(&ctx, &FLANNEL_CONFIG.load()))
}

/// TC ingress of the underlay device: decapsulates VXLAN from known VTEPs into
/// `flannel.<VNI>`.
#[classifier]
pub fn flannel_decap(ctx: TcContext) -> i32 {
    verdict(decap::decap(&ctx, &FLANNEL_CONFIG.load()))
}

/// TC ingress of a local pod's host-side veth (the pod fast path): encapsulates packets for
/// remote pod subnets and sends them straight to the underlay.
#[classifier]
pub fn flannel_pod_egress(ctx: TcContext) -> i32 {
    match pod::pod_egress(&ctx, &FLANNEL_CONFIG.load()) {
        Ok(action) => action,
        Err(stat) => {
            count_pod(stat, 1);
            if matches!(stat, PodStat::EgressDropWriteFailed) {
                TC_ACT_SHOT
            } else {
                TC_ACT_OK
            }
        }
    }
}

/// XDP on the underlay device (`DecapMode: "xdp"`): strips VXLAN from known VTEPs and marks
/// the inner frame for `flannel_decap`.
#[xdp]
pub fn flannel_xdp_decap(ctx: XdpContext) -> u32 {
    match xdp::xdp_decap(&ctx, &FLANNEL_CONFIG.load()) {
        Ok(action) => action,
        Err(stat) => {
            count_xdp(stat, 1);
            if matches!(stat, XdpStat::DropUnknownVtep) {
                XDP_DROP
            } else {
                XDP_PASS
            }
        }
    }
}

/// Never attached. Run with `BPF_PROG_TEST_RUN` on an Ethernet/IPv4 frame of at least 150
/// bytes; returns [`PROBE_RESULT_BASE`] | the `PROBE_OK_*` bits of the `bpf_skb_adjust_room`
/// calls the kernel accepted. Decapsulation is tried first: a successful encapsulation sets
/// `skb->encapsulation`, after which the kernel refuses another one.
#[classifier]
pub fn flannel_probe(ctx: TcContext) -> i32 {
    let mut ok = 0;
    if ctx
        .adjust_room(
            -(headers::ADJUST_LEN as i32),
            decap::MODE,
            decap::FLAGS | decap::F_DECAP_L4_UDP,
        )
        .is_ok()
    {
        ok |= PROBE_OK_DECAP_L4_UDP;
    }
    if ctx
        .adjust_room(-(headers::ADJUST_LEN as i32), decap::MODE, decap::FLAGS)
        .is_ok()
    {
        ok |= PROBE_OK_DECAP;
    }
    if ctx
        .adjust_room(headers::ADJUST_LEN as i32, encap::MODE, encap::FLAGS)
        .is_ok()
    {
        ok |= PROBE_OK_ENCAP;
    }
    (PROBE_RESULT_BASE | ok) as i32
}

/// Turns a program's outcome into its TC verdict, counting it: `Ok` is a verdict whose
/// counters the program already updated; `Err` says why the packet is passed or dropped.
#[inline(always)]
fn verdict(outcome: Result<i32, Stat>) -> i32 {
    match outcome {
        Ok(action) => action,
        Err(stat) => {
            count(stat, 1);
            if stat.is_drop() {
                TC_ACT_SHOT
            } else {
                TC_ACT_OK
            }
        }
    }
}

/// The VTEP for an IPv4 destination (network byte order), by longest prefix.
#[inline(always)]
fn lookup_vtep(daddr: [u8; 4]) -> Option<RemoteVtep> {
    FLANNEL_VTEPS.get(&Key::new(32, daddr)).copied()
}

/// Whether `addr` is the VTEP address of a node with a lease.
#[inline(always)]
fn is_known_vtep(addr: [u8; 4]) -> bool {
    FLANNEL_VTEP_ADDRS.get_ptr(addr).is_some()
}

/// The fast-path entry of a local pod.
#[inline(always)]
fn lookup_local_pod(addr: [u8; 4]) -> Option<LocalPod> {
    // SAFETY: the value is copied out at once; the agent replaces entries whole.
    unsafe { FLANNEL_LOCAL_PODS.get(addr) }.copied()
}

/// Updates this CPU's counters of the peer at `vtep_ip` (a known VTEP: callers found it in
/// `FLANNEL_VTEPS` or `FLANNEL_VTEP_ADDRS`), creating its entry on the first packet.
///
/// The programs create the entries, not the agent: an insert into a per-CPU hash without
/// preallocation costs the agent about 6.5 µs of per-CPU allocation, which was half of
/// programming a peer's map entries (10,000 peers at start). The agent deletes the entry
/// when the address goes; a packet racing that delete may re-create it, and the agent's next
/// sync sweeps such strays.
#[inline(always)]
fn count_peer(vtep_ip: [u8; 4], update: impl FnOnce(&mut PeerStats)) {
    let stats = match FLANNEL_PEER_STATS.get_ptr_mut(vtep_ip) {
        Some(stats) => stats,
        None => {
            // A concurrent first packet on another CPU may win (EEXIST): either way the
            // entry is there for the lookup below. Inserted from a program, a per-CPU value
            // is this CPU's copy, the others zeroed.
            let _ = FLANNEL_PEER_STATS.insert(vtep_ip, PeerStats::default(), u64::from(BPF_NOEXIST));
            match FLANNEL_PEER_STATS.get_ptr_mut(vtep_ip) {
                Some(stats) => stats,
                // The map is full (more addresses than VTEPs, which the agent prevents).
                None => return,
            }
        }
    };
    // SAFETY: this CPU's value of a per-CPU hash; see `count` for why nothing else writes
    // it. A deleted entry's memory stays valid until the program ends (RCU).
    update(unsafe { &mut *stats })
}

/// Adds `n` to this CPU's slot of the XDP counter `stat`.
#[inline(always)]
fn count_xdp(stat: XdpStat, n: u64) {
    if let Some(slot) = FLANNEL_XDP_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: as in `count`.
        unsafe { *slot += n }
    }
}

/// Adds `n` to this CPU's slot of the pod fast path counter `stat`.
#[inline(always)]
fn count_pod(stat: PodStat, n: u64) {
    if let Some(slot) = FLANNEL_POD_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: as in `count`.
        unsafe { *slot += n }
    }
}

/// Decrements the TTL of the IPv4 header `ip` that sits at `offset` in the packet, fixing its
/// checksum, as a router forwarding it would. The caller has checked that the TTL is above 1.
#[inline(always)]
fn decrement_ttl(ctx: &TcContext, offset: usize, ip: &Ipv4Hdr) -> Result<(), i64> {
    // TTL and protocol form one 16-bit word of the checksum; the helper takes the old and new
    // word as they are in memory.
    let old = u16::from_ne_bytes([ip.ttl, ip.protocol]);
    let new = u16::from_ne_bytes([ip.ttl - 1, ip.protocol]);
    ctx.store(offset + 8, &(ip.ttl - 1), 0)?;
    ctx.l3_csum_replace(offset + 10, u64::from(old), u64::from(new), 2)
}

/// Adds `n` to this CPU's slot of `stat`.
#[inline(always)]
fn count(stat: Stat, n: u64) {
    if let Some(slot) = FLANNEL_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, and a BPF program runs
        // with migration disabled, so no other CPU writes it; a program nested on the same
        // CPU could at worst lose one count, which is fine for statistics. The lookup cannot
        // miss while Stat::COUNT sizes the map.
        unsafe { *slot += n }
    }
}

// BPF has no unwinding and the verifier rejects programs with a reachable panic path, so
// this handler only exists to satisfy `no_std`.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, so the kernel lets the programs call GPL-only helpers (`bpf_fib_lookup`).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
