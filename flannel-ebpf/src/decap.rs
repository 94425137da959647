//! `flannel_decap`: what the IPv4 and UDP receive paths plus the vxlan driver's receive path
//! (`vxlan_rcv`, drivers/net/vxlan/vxlan_core.c) do for VXLAN addressed to this node's
//! `flannel.<VNI>`: strip the outer headers and deliver the inner frame on the device.
//!
//! Delivery is `bpf_redirect(flannel.<VNI>, BPF_F_INGRESS)`, so the inner packet enters the
//! stack on `flannel.<VNI>` as before: netfilter sees `-i flannel.<VNI>`, and reverse-path
//! filtering finds the route back through the same device. The inner Ethernet header is the
//! one the peer sent, so `eth_type_trans` classifies it as the driver's receive path would.
//!
//! The rule for everything unusual is: if the kernel might treat it differently from the
//! common case, leave it to the kernel (`TC_ACT_OK`), which then behaves exactly as upstream.
//! The one deliberate difference is that VXLAN from an address that is no known VTEP is
//! dropped.
//!
//! With the pod fast path on, a packet for a local pod goes straight into the pod unless its
//! flow is one the host's path carries (`flows`); every packet this program hands to the
//! host's path has its flow remembered there.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_FIXED_GSO, BPF_F_INGRESS,
    },
    helpers::{bpf_redirect, bpf_redirect_peer},
    programs::TcContext,
};
use core::mem::size_of;

use flannel_common::{
    wire::ECN_CE, DatapathConfig, FlowKey, LocalPod, PodStat, Stat, XdpMeta, CFG_F_DECAP_GSO, CFG_F_DECAP_L4_UDP,
    CFG_F_POD_FAST_PATH, CFG_F_XDP_DECAP, XDP_META_MAGIC,
};

use crate::{
    count, count_peer, count_pod, decrement_ttl, flows,
    headers::{
        ipv4_checksum, EthHdr, Ipv4Hdr, OuterHdrs, VxlanPayloadHdrs, ADJUST_LEN, ETH_HLEN, ETH_P_IP, IPPROTO_UDP,
        IPV4_HLEN, IP_FRAG_MASK, UDP_HLEN, VXLAN_FLAGS_I, VXLAN_HLEN,
    },
    is_known_vtep, lookup_local_pod,
};

/// `bpf_skb_adjust_room` mode: remove the bytes right after the (outer) Ethernet header.
pub const MODE: u32 = BPF_ADJ_ROOM_MAC;
/// `bpf_skb_adjust_room` flags for the decapsulation (net/core/filter.c,
/// `bpf_skb_net_shrink`): `FIXED_GSO` keeps `gso_size`, which for a GRO aggregate is the
/// inner MSS already (without it the kernel would grow it by 50 and `tcp_gso_segment` would
/// then drop the packet); `DECAP_L3_IPV4` states the inner L3 protocol (IPv4 in IPv4: it
/// changes nothing but documents the intent and is checked by the kernel).
pub const FLAGS: u64 = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64;
/// `BPF_F_ADJ_ROOM_DECAP_L4_UDP` (bpf-next, 2026; not in our bindings nor in 6.18): also clear
/// `skb->encapsulation` and the UDP-tunnel GSO bits, as `iptunnel_pull_offloads` does.
pub const F_DECAP_L4_UDP: u64 = 1 << 10;

/// Offset of the inner IPv4 header in a VXLAN frame (before decapsulation).
const INNER_IP_OFFSET: usize = (ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN) as usize;

/// Smallest frame `flannel_decap` can decapsulate: outer Ethernet, IPv4, UDP, VXLAN, inner
/// Ethernet and inner IPv4 headers.
pub const MIN_VXLAN_FRAME: u32 = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN + IPV4_HLEN;

/// Decapsulates a VXLAN packet for this VTEP into `flannel.<VNI>`, or says why it is passed
/// on or dropped.
#[inline(always)]
pub fn decap(ctx: &TcContext, cfg: &DatapathConfig) -> Result<i32, Stat> {
    if cfg.vxlan_ifindex == 0 {
        // Loaded without a configuration (DatapathConfig::ZERO): do nothing.
        return Err(Stat::DecapPassNotVxlan);
    }
    if cfg.flags & CFG_F_XDP_DECAP != 0 {
        if let Some(vtep_ip) = xdp_marked(ctx) {
            return deliver_stripped(ctx, cfg, vtep_ip);
        }
    }
    let outer: OuterHdrs = ctx.load(0).map_err(|_| Stat::DecapPassNotVxlan)?;
    if !is_vxlan_for_us(&outer, cfg) {
        return Err(Stat::DecapPassNotVxlan);
    }
    let frame_len = ctx.len();
    if frame_len < MIN_VXLAN_FRAME {
        // The driver would drop it too (vxlan_rcv cannot pull its headers).
        return Err(Stat::DecapDropMalformed);
    }
    let inner: VxlanPayloadHdrs = ctx
        .load((ETH_HLEN + IPV4_HLEN + UDP_HLEN) as usize)
        .map_err(|_| Stat::DecapDropMalformed)?;
    let vni = cfg.vni.to_be_bytes();
    if inner.vxlan.vni != [vni[1], vni[2], vni[3], 0] {
        // Another VNI on the same port: a vxlan device other than ours shares the socket.
        return Err(Stat::DecapPassNotVxlan);
    }
    if !is_known_vtep(outer.ip.saddr) {
        return Err(Stat::DecapDropUnknownVtep);
    }
    let inner_ip: Option<Ipv4Hdr> = if cfg.flags & CFG_F_POD_FAST_PATH != 0 {
        ctx.load(INNER_IP_OFFSET).ok()
    } else {
        None
    };
    // Keyed once: the fast path's check and the host path's record both need it.
    let key = inner_ip
        .as_ref()
        .and_then(|ip| flows::flow_key(ctx, INNER_IP_OFFSET, ip));
    let pod = inner_ip.and_then(|ip| local_pod(ip, key.as_ref()));
    let common = is_common_case(ctx, cfg, &outer, &inner, frame_len, pod.is_some());
    if let Some(key) = &key {
        if pod.is_none() || !common {
            // The host's path takes this packet: keep its flow there (`flows`).
            flows::remember(key);
        }
    }
    if !common {
        return Err(Stat::DecapPassKernel);
    }

    let flags = if cfg.flags & CFG_F_DECAP_L4_UDP != 0 {
        FLAGS | F_DECAP_L4_UDP
    } else {
        FLAGS
    };
    if ctx.adjust_room(-(ADJUST_LEN as i32), MODE, flags).is_err() {
        // Unchanged, the packet goes to the kernel's vxlan driver after all.
        if let (Some(key), Some(_)) = (&key, &pod) {
            flows::remember(key);
        }
        return Err(Stat::DecapPassKernel);
    }
    // MAC mode removed the 50 bytes after the outer Ethernet header, i.e. the outer IPv4, UDP
    // and VXLAN headers and the inner Ethernet header: put the inner one where the outer was.
    let eth = match &pod {
        // Into the pod as the host's bridge would hand it over: from the gateway's MAC to
        // the pod's.
        Some((pod, _)) => EthHdr {
            dst: pod.pod_mac,
            src: pod.gw_mac,
            proto: ETH_P_IP,
        },
        None => inner.inner_eth,
    };
    if ctx.store(0, &eth, 0).is_err() {
        return Err(Stat::DecapDropWriteFailed);
    }
    if let Some((_, ip)) = &pod {
        // The host would have routed the packet (decrementing the TTL) on its way to the pod.
        if decrement_ttl(ctx, ETH_HLEN as usize, ip).is_err() {
            return Err(Stat::DecapDropWriteFailed);
        }
    }
    Ok(deliver(ctx, cfg, outer.ip.saddr, pod))
}

/// Counts a decapsulated frame (inner Ethernet header in place) and hands it to the pod or
/// to `flannel.<VNI>`.
#[inline(always)]
fn deliver(ctx: &TcContext, cfg: &DatapathConfig, vtep_ip: [u8; 4], pod: Option<(LocalPod, Ipv4Hdr)>) -> i32 {
    let len = u64::from(ctx.len());
    count(Stat::DecapPackets, 1);
    count(Stat::DecapBytes, len);
    count_peer(vtep_ip, |stats| {
        stats.decap_packets += 1;
        stats.decap_bytes += len;
    });
    match pod {
        Some((pod, _)) => {
            count_pod(PodStat::DecapToPodPackets, 1);
            count_pod(PodStat::DecapToPodBytes, len);
            // Straight into the pod's namespace: the packet appears on the ingress of the
            // veth's peer (the pod's eth0) without a trip through the host's stack, the bridge
            // or the veth's transmit path. On 6.15+ the kernel scrubs the skb and sets
            // PACKET_HOST on the way (commit c4327229948879814229b46aa26a750718888503).
            // SAFETY: the helper has no memory arguments.
            unsafe { bpf_redirect_peer(pod.ifindex, 0) as i32 }
        }
        // SAFETY: the helper has no memory arguments.
        None => unsafe { bpf_redirect(cfg.vxlan_ifindex, u64::from(BPF_F_INGRESS)) as i32 },
    }
}

/// The VTEP a frame came from, if `flannel_xdp_decap` already stripped its outer headers
/// (it left an [`XdpMeta`] in front of the frame).
#[inline(always)]
fn xdp_marked(ctx: &TcContext) -> Option<[u8; 4]> {
    // SAFETY: reading fields of the context the kernel passed in; TC programs may read the
    // metadata pointers, and the bounds check below is the one the verifier wants.
    let (meta, data) = unsafe { ((*ctx.skb.skb).data_meta as usize, (*ctx.skb.skb).data as usize) };
    if meta + size_of::<XdpMeta>() > data {
        return None;
    }
    // SAFETY: in bounds (checked above); `XdpMeta` is plain integers, read unaligned.
    let m = unsafe { core::ptr::read_unaligned(meta as *const XdpMeta) };
    (m.magic == XDP_META_MAGIC).then_some(m.vtep_ip)
}

/// Delivers a frame `flannel_xdp_decap` stripped: it checked everything `flannel_decap`
/// checks, so only the pod fast path's choice is left. GRO has run on the inner flow, so an
/// aggregate here is an ordinary TCP/UDP GSO packet without tunnel state.
#[inline(always)]
fn deliver_stripped(ctx: &TcContext, cfg: &DatapathConfig, vtep_ip: [u8; 4]) -> Result<i32, Stat> {
    let mut pod = None;
    if cfg.flags & CFG_F_POD_FAST_PATH != 0 {
        if let Ok(ip) = ctx.load::<Ipv4Hdr>(ETH_HLEN as usize) {
            let key = flows::flow_key(ctx, ETH_HLEN as usize, &ip);
            pod = local_pod(ip, key.as_ref());
            if let (None, Some(key)) = (&pod, &key) {
                flows::remember(key);
            }
        }
    }
    if let Some((p, ip)) = &pod {
        let eth = EthHdr {
            dst: p.pod_mac,
            src: p.gw_mac,
            proto: ETH_P_IP,
        };
        if ctx.store(0, &eth, 0).is_err() || decrement_ttl(ctx, ETH_HLEN as usize, ip).is_err() {
            return Err(Stat::DecapDropWriteFailed);
        }
    }
    Ok(deliver(ctx, cfg, vtep_ip, pod))
}

/// The local pod the inner packet (IPv4 header `ip`, flow `key`) is addressed to, with that
/// header, when the pod fast path can deliver it: a pod in `FLANNEL_LOCAL_PODS`, a TTL that
/// survives one more hop (else the kernel path sends the ICMP error), and a keyed flow the
/// host's path does not carry.
#[inline(always)]
fn local_pod(ip: Ipv4Hdr, key: Option<&FlowKey>) -> Option<(LocalPod, Ipv4Hdr)> {
    if ip.version_ihl >> 4 != 4 || ip.ttl <= 1 {
        return None;
    }
    let pod = lookup_local_pod(ip.daddr)?;
    key.is_some_and(|k| !flows::on_kernel_path(k)).then_some((pod, ip))
}

/// UDP over IPv4 without options, not a fragment, to our VTEP address and VXLAN port: what
/// the kernel would hand to the vxlan socket of `flannel.<VNI>`.
#[inline(always)]
pub fn is_vxlan_for_us(outer: &OuterHdrs, cfg: &DatapathConfig) -> bool {
    outer.eth.proto == ETH_P_IP
        && outer.ip.version_ihl == 0x45
        && outer.ip.protocol == IPPROTO_UDP
        && outer.ip.daddr == cfg.vtep_ip
        && u16::from_be_bytes(outer.ip.frag_off) & IP_FRAG_MASK == 0
        && outer.udp.dest == cfg.port.to_be_bytes()
}

/// The checks the kernel's receive path would make and the cases it treats specially; `false`
/// sends the packet to the kernel, which then accepts, handles or drops it as upstream does.
#[inline(always)]
fn is_common_case(
    ctx: &TcContext,
    cfg: &DatapathConfig,
    outer: &OuterHdrs,
    inner: &VxlanPayloadHdrs,
    frame_len: u32,
    to_pod: bool,
) -> bool {
    // SAFETY: reading a field of the context the kernel passed in; the verifier allows reading
    // `gso_size` from TC programs.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size };
    is_common_vxlan(cfg, outer, inner, frame_len)
        // GRO aggregates: see CFG_F_DECAP_GSO. Delivered straight into a pod, an aggregate
        // ends in the pod's own TCP/UDP receive and is never segmented again, so the tunnel
        // GSO state bpf_skb_adjust_room leaves on it is harmless there.
        && (gso_size == 0 || to_pod || cfg.flags & CFG_F_DECAP_GSO != 0)
}

/// The header checks of [`is_common_case`] (everything but GSO), shared with
/// `flannel_xdp_decap`.
#[inline(always)]
pub fn is_common_vxlan(cfg: &DatapathConfig, outer: &OuterHdrs, inner: &VxlanPayloadHdrs, frame_len: u32) -> bool {
    let ip_len = u32::from(u16::from_be_bytes(outer.ip.tot_len));
    let udp_len = u32::from(u16::from_be_bytes(outer.udp.len));
    // ip_rcv_core: the header checksum and the lengths (a longer frame is trimmed there, which
    // the kernel does better than we would).
    ipv4_checksum(&outer.ip) == [0, 0]
        && ip_len == frame_len - ETH_HLEN
        && udp_len == ip_len - IPV4_HLEN
        // A UDP checksum would have to be verified (flannel.<VNI> is `noudpcsum`, so upstream
        // peers send none).
        && outer.udp.check == [0, 0]
        // vxlan_rcv: only the I flag (no GBP, GPE, remote checksum offload, ...).
        && inner.vxlan.flags == VXLAN_FLAGS_I
        // ECN decapsulation (INET_ECN_decapsulate) may mark the inner packet CE, or drop it.
        && outer.ip.tos & ECN_CE != ECN_CE
        // An inner IPv4 frame for our device, not one that our own MAC sent (the driver drops
        // those as looped back).
        && inner.inner_eth.proto == ETH_P_IP
        && inner.inner_version_ihl >> 4 == 4
        && inner.inner_eth.dst == cfg.vtep_mac
        && inner.inner_eth.src != cfg.vtep_mac
}
