//! flannel-rs eBPF datapath: TC classifiers attached to the VXLAN and uplink devices.
//!
//! This is the minimal program set the agent embeds today: `flannel_encap` looks up the
//! destination of each IPv4 packet in `FLANNEL_VTEPS` and counts what it finds, and
//! `flannel_decap` counts. Both always pass the packet on (TC_ACT_OK), so the kernel's own
//! `flannel.<VNI>` device still does the encapsulation. Names, keys and values come from
//! `flannel-common`; the agent checks the built object against those names.
#![no_std]
#![no_main]

use core::mem::{offset_of, size_of};

use aya_ebpf::{
    bindings::TC_ACT_OK,
    btf_maps::{lpm_trie::Key, LpmTrie, PerCpuArray},
    macros::{btf_map, classifier},
    programs::TcContext,
};
use aya_log_ebpf::error;
use flannel_common::{Stat, VtepInfo, VtepKey, VTEPS_MAX_ENTRIES};

/// Remote pod subnet -> VTEP, longest prefix wins. Filled by the agent from the leases.
///
/// A BTF map (`#[btf_map]`, `.maps` section) so the kernel knows its key and value types and
/// `bpftool map dump` prints field names. aya-ebpf's BTF `LpmTrie` fixes the key type to its
/// own `lpm_trie::Key<K>`; the asserts below keep that byte-identical to `VtepKey`.
#[btf_map]
static FLANNEL_VTEPS: LpmTrie<u32, VtepInfo, { VTEPS_MAX_ENTRIES as usize }> = LpmTrie::new();

/// Datapath counters, one `u64` per CPU per [`Stat`], summed by the agent.
#[btf_map]
static FLANNEL_STATS: PerCpuArray<u64, { Stat::COUNT as usize }> = PerCpuArray::new();

const _: () = assert!(size_of::<Key<u32>>() == size_of::<VtepKey>());
const _: () = assert!(offset_of!(Key<u32>, prefix_len) == offset_of!(VtepKey, prefix_len));
const _: () = assert!(offset_of!(Key<u32>, data) == offset_of!(VtepKey, addr));

/// Ethernet header length; TC programs see the frame from the MAC header on.
const ETH_HLEN: usize = 14;
/// Offset of the EtherType in the Ethernet header.
const ETH_TYPE_OFFSET: usize = 12;
/// EtherType of IPv4.
const ETH_P_IP: u16 = 0x0800;
/// Offset of the IPv4 destination address in the frame (fixed part of the IPv4 header).
const IPV4_DADDR_OFFSET: usize = ETH_HLEN + 16;

/// TC egress on the pod-facing side: finds the remote VTEP for the packet's destination.
#[classifier]
pub fn flannel_encap(ctx: TcContext) -> i32 {
    match try_flannel_encap(&ctx) {
        Ok(action) => action,
        Err(reason) => pass(&ctx, reason),
    }
}

/// TC ingress on the uplink: packets from remote VTEPs. Counts them for now.
#[classifier]
pub fn flannel_decap(ctx: TcContext) -> i32 {
    match try_flannel_decap(&ctx) {
        Ok(action) => action,
        Err(reason) => pass(&ctx, reason),
    }
}

/// `Err` carries the counter that says why the packet is passed on untouched.
fn try_flannel_encap(ctx: &TcContext) -> Result<i32, Stat> {
    count(ctx, Stat::EncapPackets);
    let daddr = ipv4_daddr(ctx).ok_or(Stat::EncapNotIpv4)?;
    let key = VtepKey::host(daddr);
    let _vtep = FLANNEL_VTEPS
        .get(&Key::new(key.prefix_len, key.addr))
        .ok_or(Stat::EncapVtepMiss)?;
    count(ctx, Stat::EncapVtepHit);
    // Setting the tunnel key and redirecting to the VXLAN device is the full datapath's
    // job; until it lands the kernel's flannel.<VNI> route encapsulates the packet.
    Ok(TC_ACT_OK)
}

fn try_flannel_decap(ctx: &TcContext) -> Result<i32, Stat> {
    count(ctx, Stat::DecapPackets);
    Ok(TC_ACT_OK)
}

/// Counts `reason` and lets the packet continue through the stack.
#[inline(always)]
fn pass(ctx: &TcContext, reason: Stat) -> i32 {
    count(ctx, reason);
    TC_ACT_OK
}

/// The IPv4 destination address of the frame, in network byte order, or `None` if the frame
/// is not IPv4 or too short to hold an IPv4 header.
#[inline(always)]
fn ipv4_daddr(ctx: &TcContext) -> Option<u32> {
    let ethertype = u16::from_be(ctx.load::<u16>(ETH_TYPE_OFFSET).ok()?);
    if ethertype != ETH_P_IP {
        return None;
    }
    // bpf_skb_load_bytes copies the bytes as they are on the wire, which is the byte order
    // the LPM trie compares in.
    ctx.load::<u32>(IPV4_DADDR_OFFSET).ok()
}

/// Adds one to this CPU's slot of `stat`.
#[inline(always)]
fn count(ctx: &TcContext, stat: Stat) {
    match FLANNEL_STATS.get_ptr_mut(stat.index()) {
        // SAFETY: the pointer is this CPU's slot of a per-CPU array, and a BPF program runs
        // with migration disabled, so no other CPU writes it; a program nested on the same
        // CPU could at worst lose one count, which is fine for statistics.
        Some(slot) => unsafe { *slot += 1 },
        // Unreachable while Stat::COUNT sizes the map; logged because it means the object
        // and flannel-common disagree.
        None => error!(ctx, "FLANNEL_STATS has no slot {}", stat.index()),
    }
}

// BPF has no unwinding and the verifier rejects programs with a reachable panic path, so
// this handler only exists to satisfy `no_std`.
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// GPL-compatible, so the kernel lets the programs call GPL-only helpers (aya-log's output).
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
