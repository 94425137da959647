//! `flannel_xdp_decap` (vxlan option `DecapMode: "xdp"`, for NICs with native XDP): strips
//! the outer Ethernet, IPv4, UDP and VXLAN headers of VXLAN from known VTEPs before the
//! kernel builds an skb, leaves an [`XdpMeta`] mark in front of the inner frame, and passes
//! it on. GRO then aggregates the inner flow, and `flannel_decap` on TC ingress, seeing the
//! mark, only delivers the frame: into `flannel.<VNI>` (so rp_filter and netfilter see it
//! arrive there) or, with the pod fast path, into the pod.
//!
//! It accepts exactly what `flannel_decap` accepts (the same header checks); anything else
//! passes unchanged to `flannel_decap` and the kernel, which then behave as without XDP.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS},
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_meta},
    programs::XdpContext,
};
use flannel_common::{DatapathConfig, XdpMeta, XdpStat, XDP_META_MAGIC};

use crate::{
    decap::{is_common_vxlan, is_vxlan_for_us, MIN_VXLAN_FRAME},
    headers::{OuterHdrs, VxlanPayloadHdrs, ETH_HLEN, IPV4_HLEN, UDP_HLEN, VXLAN_ENCAP_LEN},
    is_known_vtep,
};

/// Copies a header out of the frame at `offset`, if the frame is long enough.
#[inline(always)]
fn read<T: Copy>(ctx: &XdpContext, offset: usize) -> Option<T> {
    let start = ctx.data() + offset;
    if start + size_of::<T>() > ctx.data_end() {
        return None;
    }
    // SAFETY: in bounds of the frame (checked above, in the form the verifier tracks); the
    // headers are byte arrays, read unaligned.
    Some(unsafe { core::ptr::read_unaligned(start as *const T) })
}

/// Strips and marks a VXLAN frame for us, or says why it passes unchanged or is dropped.
/// `Ok` is the XDP action after stripping.
#[inline(always)]
pub fn xdp_decap(ctx: &XdpContext, cfg: &DatapathConfig) -> Result<u32, XdpStat> {
    if cfg.vxlan_ifindex == 0 {
        return Err(XdpStat::PassNotVxlan);
    }
    let outer: OuterHdrs = read(ctx, 0).ok_or(XdpStat::PassNotVxlan)?;
    if !is_vxlan_for_us(&outer, cfg) {
        return Err(XdpStat::PassNotVxlan);
    }
    let inner: VxlanPayloadHdrs = read(ctx, (ETH_HLEN + IPV4_HLEN + UDP_HLEN) as usize).ok_or(XdpStat::PassKernel)?;
    let vni = cfg.vni.to_be_bytes();
    if inner.vxlan.vni != [vni[1], vni[2], vni[3], 0] {
        return Err(XdpStat::PassNotVxlan);
    }
    if !is_known_vtep(outer.ip.saddr) {
        return Err(XdpStat::DropUnknownVtep);
    }
    let frame_len = (ctx.data_end() - ctx.data()) as u32;
    if frame_len < MIN_VXLAN_FRAME || !is_common_vxlan(cfg, &outer, &inner, frame_len) {
        return Err(XdpStat::PassKernel);
    }
    let strip = VXLAN_ENCAP_LEN as i32;
    // SAFETY: the helpers take the context the kernel passed in.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, strip) } != 0 {
        return Err(XdpStat::PassKernel);
    }
    // SAFETY: as above.
    if unsafe { bpf_xdp_adjust_meta(ctx.ctx, -(size_of::<XdpMeta>() as i32)) } != 0 {
        // The driver keeps no metadata: put the outer headers back (adjust_head only moved
        // the start; the bytes are still there) and let TC decapsulate.
        // SAFETY: as above.
        unsafe { bpf_xdp_adjust_head(ctx.ctx, -strip) };
        return Err(XdpStat::PassKernel);
    }
    let meta = ctx.metadata();
    if meta + size_of::<XdpMeta>() > ctx.data() {
        // Cannot happen after a successful adjust_meta; the verifier needs the check.
        return Ok(XDP_DROP);
    }
    let mark = XdpMeta {
        magic: XDP_META_MAGIC,
        vtep_ip: outer.ip.saddr,
    };
    // SAFETY: in bounds of the metadata area (checked above).
    unsafe { core::ptr::write_unaligned(meta as *mut XdpMeta, mark) };
    crate::count_xdp(XdpStat::StripPackets, 1);
    crate::count_xdp(XdpStat::StripBytes, u64::from(frame_len - VXLAN_ENCAP_LEN));
    Ok(XDP_PASS)
}
