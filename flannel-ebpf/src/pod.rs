//! `flannel_pod_egress`: the pod fast path's egress, on the ingress of a local pod's host-side
//! veth. A packet from the pod to a remote pod subnet is encapsulated exactly as
//! `flannel_encap` would (same headers, same source port) and sent to the underlay right
//! away, instead of crossing the pod bridge, the host's routing and netfilter, and
//! `flannel.<VNI>`. Everything else goes on to the bridge untouched.
//!
//! Because the host does not route the packet, the program does what routing would have done
//! to it: it decrements the TTL (and leaves a packet whose TTL expires to the kernel, which
//! answers with ICMP "time exceeded").
//!
//! A flow the host's path already carries (it started before the program was attached to
//! the pod's veth, or it is a service connection conntrack translates) stays there: see
//! `flows`.

use aya_ebpf::programs::TcContext;
use flannel_common::{DatapathConfig, PodStat, Stat, CFG_F_POD_FAST_PATH, VTEP_F_DIRECT_ROUTING};

use crate::{count_pod, encap, flows, headers::ETH_HLEN, lookup_vtep};

/// Encapsulates a pod's packet for a remote pod subnet and redirects it to the underlay, or
/// says why it goes on to the bridge.
#[inline(always)]
pub fn pod_egress(ctx: &TcContext, cfg: &DatapathConfig) -> Result<i32, PodStat> {
    if cfg.flags & CFG_F_POD_FAST_PATH == 0 || cfg.vxlan_ifindex == 0 {
        return Err(PodStat::EgressPassNotRemote);
    }
    let (eth, ip) = encap::ipv4_headers(ctx).ok_or(PodStat::EgressPassNotRemote)?;
    let vtep = lookup_vtep(ip.daddr).ok_or(PodStat::EgressPassNotRemote)?;
    // DirectRouting peers are routed without encapsulation by the kernel; a broadcast or
    // multicast frame is not for the gateway; a TTL of 1 needs an ICMP answer.
    if vtep.flags & VTEP_F_DIRECT_ROUTING != 0 || eth.dst[0] & 1 != 0 || ip.ttl <= 1 {
        return Err(PodStat::EgressPassKernel);
    }
    if !flows::fast_path_may_take(ctx, ETH_HLEN as usize, &ip) {
        return Err(PodStat::EgressPassKernel);
    }
    match encap::encap_to(ctx, cfg, &vtep, &eth, &ip, true) {
        Ok((action, len)) => {
            count_pod(PodStat::EgressEncapPackets, 1);
            count_pod(PodStat::EgressEncapBytes, u64::from(len));
            Ok(action)
        }
        Err(Stat::EncapDropWriteFailed) => Err(PodStat::EgressDropWriteFailed),
        Err(_) => Err(PodStat::EgressPassKernel),
    }
}
