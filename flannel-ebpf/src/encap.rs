//! `flannel_encap`: what the vxlan driver's transmit path (`vxlan_xmit_one`,
//! drivers/net/vxlan/vxlan_core.c) does for a `flannel.<VNI>` device as upstream creates it
//! (`nolearning noudpcsum`, no `tos`, `ttl auto`, `df unset`, `srcport 0 0`), minus the outer
//! packet's trip through the IP output path and netfilter.
//!
//! The program sits on the egress of `flannel.<VNI>`, i.e. after routing, netfilter and NAT of
//! the inner packet; the neighbour entry has already set the inner destination MAC.

use core::mem::size_of;

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, bpf_fib_lookup, BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH,
        BPF_FIB_LKUP_RET_SUCCESS, BPF_FIB_LOOKUP_SKIP_NEIGH, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
    },
    helpers::{bpf_fib_lookup, bpf_get_hash_recalc, bpf_get_prandom_u32, bpf_redirect_neigh},
    programs::TcContext,
};
use flannel_common::{
    wire::{flow_src_port, outer_tos},
    DatapathConfig, RemoteVtep, Stat, CFG_F_POD_FAST_PATH, VTEP_F_DIRECT_ROUTING,
};

use crate::{
    count, count_peer, decrement_ttl, flows,
    headers::{
        ipv4_checksum, EthHdr, Ipv4Hdr, UdpHdr, VxlanEncap, VxlanHdr, ADJUST_LEN, ETH_HLEN, ETH_P_IP, IPPROTO_TCP,
        IPPROTO_UDP, IPV4_HLEN, UDP_HLEN, VXLAN_ENCAP_LEN, VXLAN_FLAGS_I,
    },
    lookup_vtep,
};

/// `bpf_skb_adjust_room` mode: insert right after the Ethernet header.
pub const MODE: u32 = BPF_ADJ_ROOM_MAC;

/// `bpf_skb_adjust_room` flags for VXLAN over IPv4 (net/core/filter.c, `bpf_skb_net_grow`):
/// * `ENCAP_L3_IPV4 | ENCAP_L4_UDP` mark the skb as UDP-tunnelled (`skb->encapsulation`,
///   `SKB_GSO_UDP_TUNNEL`, inner header offsets), so a GSO packet is segmented correctly
///   later, by the NIC or by `skb_udp_tunnel_segment`;
/// * `ENCAP_L2(14)`: the inner MAC header is 14 bytes before the inner IP header (not 22: the
///   UDP tunnel segmentation code expects the VXLAN header between transport and inner MAC);
/// * `ENCAP_L2_ETH` sets `inner_protocol` to `ETH_P_TEB` as the vxlan driver does; NICs check
///   it before offering tunnel TSO;
/// * `FIXED_GSO` keeps `gso_size`: the inner MSS already fits `flannel.<VNI>`'s MTU (the
///   underlay's minus 50) and must not shrink again; UDP GSO needs it too.
pub const FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64
    | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
    | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
    | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
    | encap_l2(ETH_HLEN);

/// The kernel's `BPF_F_ADJ_ROOM_ENCAP_L2(len)` macro.
const fn encap_l2(len: u32) -> u64 {
    ((len as u64) & 0xff) << 56
}

/// `AF_INET`.
const AF_INET: u8 = 2;
/// Outer IPv4 `frag_off`: the vxlan device is `df unset`, so neither DF nor a fragment.
const OUTER_FRAG_OFF: [u8; 2] = [0, 0];
/// Largest IPv4 total length.
const IP_MAX_LEN: u32 = 0xffff;

/// Encapsulates the packet for its remote subnet and redirects it, or says why it is left to
/// the vxlan driver.
#[inline(always)]
pub fn encap(ctx: &TcContext, cfg: &DatapathConfig) -> Result<i32, Stat> {
    if cfg.vxlan_ifindex == 0 {
        // Loaded without a configuration (DatapathConfig::ZERO): do nothing.
        return Err(Stat::EncapPassNoVtep);
    }
    let (inner_eth, ip) = ipv4_headers(ctx).ok_or(Stat::EncapPassNotIpv4)?;
    let vtep = lookup_vtep(ip.daddr).ok_or(Stat::EncapPassNoVtep)?;
    if vtep.flags & VTEP_F_DIRECT_ROUTING != 0 {
        return Err(Stat::EncapPassDirectRouting);
    }
    if cfg.flags & CFG_F_POD_FAST_PATH != 0 {
        // This packet crossed the host's routing and netfilter: keep its flow off the pod
        // fast path (`flows`).
        flows::record(ctx, ETH_HLEN as usize, &ip);
    }
    let (action, len) = encap_to(ctx, cfg, &vtep, &inner_eth, &ip, false)?;
    count(Stat::EncapPackets, 1);
    count(Stat::EncapBytes, u64::from(len));
    Ok(action)
}

/// The Ethernet and IPv4 headers of an IPv4 frame; `None` for anything else.
#[inline(always)]
pub fn ipv4_headers(ctx: &TcContext) -> Option<(EthHdr, Ipv4Hdr)> {
    let inner_eth: EthHdr = ctx.load(0).ok()?;
    if inner_eth.proto != ETH_P_IP {
        return None;
    }
    let ip: Ipv4Hdr = ctx.load(ETH_HLEN as usize).ok()?;
    if ip.version_ihl >> 4 != 4 {
        return None;
    }
    Some((inner_eth, ip))
}

/// Encapsulates the IPv4 frame (headers `inner_eth` and `ip`) for `vtep` and redirects it to
/// the underlay: the part both `flannel_encap` and `flannel_pod_egress` share. Returns the
/// verdict and the length sent, having counted the peer; the caller counts its own
/// outcome. `Err` is why the packet is passed on unchanged, or dropped
/// ([`Stat::EncapDropWriteFailed`]).
#[inline(always)]
pub fn encap_to(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    vtep: &RemoteVtep,
    inner_eth: &EthHdr,
    ip: &Ipv4Hdr,
    forward: bool,
) -> Result<(i32, u32), Stat> {
    let frame_len = ctx.len();
    // The outer IPv4 total length of the packet as it is, and of each segment the GSO engine
    // will cut it into; the second is what has to fit the underlay MTU.
    let outer_len = frame_len - ETH_HLEN + VXLAN_ENCAP_LEN;
    let segment_outer_len = segment_l3_len(ctx, ip, frame_len)? + VXLAN_ENCAP_LEN;
    if outer_len > IP_MAX_LEN {
        return Err(Stat::EncapPassTooBig);
    }

    // The kernel hashes the flow the same way for its own encapsulation (skb_get_hash), on this
    // very skb, so both datapaths pick the same source port for a flow.
    // SAFETY: the helper only reads the skb the context points to.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let src_port = flow_src_port(hash, cfg.src_port_min, cfg.src_port_max);
    let egress = route(ctx, cfg, vtep, src_port, segment_outer_len)?;

    let headers = build_headers(cfg, vtep, inner_eth, ip, src_port, outer_len);
    ctx.adjust_room(ADJUST_LEN as i32, MODE, FLAGS)
        .map_err(|_| Stat::EncapPassUnsupported)?;
    if ctx.store(0, &headers, 0).is_err() {
        // The room is made but the headers are not written: the packet cannot go anywhere.
        return Err(Stat::EncapDropWriteFailed);
    }
    // A packet taken straight from a pod was not routed by the host, which would have
    // decremented its TTL; do it here, once the packet can no longer go back to the kernel.
    if forward && decrement_ttl(ctx, (ETH_HLEN + VXLAN_ENCAP_LEN) as usize, ip).is_err() {
        return Err(Stat::EncapDropWriteFailed);
    }
    let len = ctx.len();
    count_peer(vtep.vtep_ip, |stats| {
        stats.encap_packets += 1;
        stats.encap_bytes += u64::from(len);
    });
    Ok((redirect(egress), len))
}

/// The inner IPv4 length of one segment: the whole packet, or for a GSO packet one
/// `gso_size` payload behind the IPv4 and TCP/UDP headers (`skb_gso_network_seglen`).
#[inline(always)]
fn segment_l3_len(ctx: &TcContext, ip: &Ipv4Hdr, frame_len: u32) -> Result<u32, Stat> {
    // SAFETY: reading a field of the context the kernel passed in; the verifier allows reading
    // `gso_size` from TC programs.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    if gso_size == 0 {
        return Ok(frame_len - ETH_HLEN);
    }
    let ihl = u32::from(ip.version_ihl & 0x0f) * 4;
    let l4_len = match ip.protocol {
        IPPROTO_TCP => {
            let doff: u8 = ctx
                .load((ETH_HLEN + ihl + 12) as usize)
                .map_err(|_| Stat::EncapPassUnsupported)?;
            u32::from(doff >> 4) * 4
        }
        IPPROTO_UDP => UDP_HLEN,
        _ => return Err(Stat::EncapPassUnsupported),
    };
    Ok(ihl + l4_len + gso_size)
}

/// The device the underlay route to the remote VTEP leaves through, found as the vxlan
/// driver's `udp_tunnel_dst_lookup` finds the route: any output device, source = our VTEP
/// address, the tunnel's ports. `tot_len` makes the kernel check the route MTU, like the
/// driver's `skb_tunnel_check_pmtu`; on "too big" the packet goes to the driver, which
/// updates the PMTU and so lets the sender learn it.
///
/// The neighbour is resolved by `bpf_redirect_neigh`, not here: the neighbour subsystem then
/// keeps confirming and refreshing the entry as for any other packet, which a MAC copied out
/// of a FIB lookup result would bypass.
#[inline(always)]
fn route(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    vtep: &RemoteVtep,
    src_port: u16,
    segment_outer_len: u32,
) -> Result<u32, Stat> {
    // SAFETY: all-zero is a valid `bpf_fib_lookup` (integers and unions of integers).
    let mut params: bpf_fib_lookup = unsafe { core::mem::zeroed() };
    params.family = AF_INET;
    params.l4_protocol = IPPROTO_UDP;
    params.sport = src_port.to_be();
    params.dport = cfg.port.to_be();
    params.__bindgen_anon_1.tot_len = segment_outer_len as u16;
    // An input lookup "from" the underlay device (no output interface constraint, which the
    // OUTPUT flag would impose): like the driver's lookup, which has no `oif`. TOS 0, as the
    // driver routes with the configured TOS, not the ECN bits.
    params.ifindex = cfg.uplink_ifindex;
    params.__bindgen_anon_3.ipv4_src = u32::from_ne_bytes(cfg.vtep_ip);
    params.__bindgen_anon_4.ipv4_dst = u32::from_ne_bytes(vtep.vtep_ip);
    // SAFETY: `params` is a live, correctly sized `bpf_fib_lookup`; the helper writes into it.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.skb.skb.cast(),
            &mut params,
            size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SKIP_NEIGH,
        )
    };
    // With SKIP_NEIGH a route is reported as SUCCESS (or NO_NEIGH on older kernels), with the
    // egress ifindex filled in.
    match rc {
        rc if rc == i64::from(BPF_FIB_LKUP_RET_SUCCESS) || rc == i64::from(BPF_FIB_LKUP_RET_NO_NEIGH) => {
            Ok(params.ifindex)
        }
        rc if rc == i64::from(BPF_FIB_LKUP_RET_FRAG_NEEDED) => Err(Stat::EncapPassTooBig),
        _ => Err(Stat::EncapPassNoUnderlayRoute),
    }
}

/// Outer Ethernet (placeholder), IPv4, UDP, VXLAN and inner Ethernet headers.
#[inline(always)]
fn build_headers(
    cfg: &DatapathConfig,
    vtep: &RemoteVtep,
    inner_eth: &EthHdr,
    inner_ip: &Ipv4Hdr,
    src_port: u16,
    outer_len: u32,
) -> VxlanEncap {
    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: outer_tos(inner_ip.tos),
        tot_len: (outer_len as u16).to_be_bytes(),
        // The driver picks the ID with ip_select_ident (the outer header has no DF, so IDs
        // matter for reassembly); any well-spread value does.
        // SAFETY: the helper has no arguments and no preconditions.
        id: (unsafe { bpf_get_prandom_u32() } as u16).to_be_bytes(),
        frag_off: OUTER_FRAG_OFF,
        ttl: cfg.ttl,
        protocol: IPPROTO_UDP,
        check: [0; 2],
        saddr: cfg.vtep_ip,
        daddr: vtep.vtep_ip,
    };
    ip.check = ipv4_checksum(&ip);
    let vni = cfg.vni.to_be_bytes();
    VxlanEncap {
        // bpf_redirect_neigh strips this header and the neighbour output writes the real one;
        // its destination only must not be multicast (__bpf_redirect_neigh drops those).
        eth: EthHdr {
            dst: [0; 6],
            src: [0; 6],
            proto: ETH_P_IP,
        },
        ip,
        udp: UdpHdr {
            source: src_port.to_be_bytes(),
            dest: cfg.port.to_be_bytes(),
            len: ((outer_len - IPV4_HLEN) as u16).to_be_bytes(),
            // flannel.<VNI> is `noudpcsum`: no outer UDP checksum.
            check: [0; 2],
        },
        vxlan: VxlanHdr {
            flags: VXLAN_FLAGS_I,
            vni: [vni[1], vni[2], vni[3], 0],
        },
        // The neighbour entry already made these the peer's VtepMAC and our device MAC; they
        // are written from the map and the configuration so that the frame is right even
        // where no neighbour entry made it (the pod fast path).
        inner_eth: EthHdr {
            dst: vtep.vtep_mac,
            src: cfg.vtep_mac,
            proto: inner_eth.proto,
        },
    }
}

/// Hands the packet to the underlay device `ifindex` through the neighbour subsystem.
///
/// Without next-hop parameters the kernel routes the outer packet itself
/// (`__bpf_redirect_neigh_v4`, net/core/filter.c) and attaches that route to the skb. With
/// parameters it would keep the skb's route, which on the egress of `flannel.<VNI>` is the
/// inner packet's route through `flannel.<VNI>`; a packet queued while the neighbour is being
/// resolved is later sent through the neighbour of that route (`neigh_update` re-looks it up
/// from the skb's route), i.e. with the inner MACs, and is lost.
#[inline(always)]
fn redirect(ifindex: u32) -> i32 {
    // SAFETY: a null `params` with length 0 is the documented "look the next hop up" form.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
