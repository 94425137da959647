//! `FLANNEL_KERNEL_FLOWS`: keeping each flow on one path.
//!
//! The pod fast path skips the host's netfilter, so conntrack never sees its packets. That is
//! harmless for a flow that takes the fast path from its first packet to its last, and
//! harmful for one that conntrack has seen: a connection to a service, DNAT'ed on the way
//! out, needs its replies translated back on the way in; and a connection whose packets
//! conntrack sees only in part looks invalid to it (kube-proxy drops `--ctstate INVALID`).
//!
//! So the programs that hand a packet to the host's path or take one from it (`flannel_encap`
//! on `flannel.<VNI>`, `flannel_decap` delivering to `flannel.<VNI>`) remember its flow here,
//! and the fast path (`flannel_pod_egress`, delivery into a pod) leaves remembered flows, and
//! packets it cannot key, to the host. The map is an LRU: flows that end are forgotten when
//! the space is needed.

use aya_ebpf::{bindings::BPF_NOEXIST, helpers::bpf_ktime_get_ns, programs::TcContext};
use flannel_common::{FlowKey, KernelFlow};

use crate::{
    headers::{Ipv4Hdr, IPPROTO_TCP, IPPROTO_UDP, IPV4_HLEN, IP_FRAG_MASK},
    FLANNEL_KERNEL_FLOWS,
};

/// IP protocol number of ICMP.
const IPPROTO_ICMP: u8 = 1;
/// ICMP echo reply and echo request types.
const ICMP_ECHO_REPLY: u8 = 0;
const ICMP_ECHO_REQUEST: u8 = 8;

/// The flow of the IPv4 packet whose header `ip` sits at `ip_offset`: TCP and UDP by ports,
/// ICMP echo by identifier. `None` for what cannot be keyed that way (fragments, IP options,
/// ICMP errors, other protocols); such packets stay on the host's path, where conntrack
/// relates them to their flow.
#[inline(always)]
pub fn flow_key(ctx: &TcContext, ip_offset: usize, ip: &Ipv4Hdr) -> Option<FlowKey> {
    if ip.version_ihl != 0x45 || u16::from_be_bytes(ip.frag_off) & IP_FRAG_MASK != 0 {
        return None;
    }
    let l4 = ip_offset + IPV4_HLEN as usize;
    let (sport, dport) = match ip.protocol {
        IPPROTO_TCP | IPPROTO_UDP => {
            let ports: [u8; 4] = ctx.load(l4).ok()?;
            ([ports[0], ports[1]], [ports[2], ports[3]])
        }
        IPPROTO_ICMP => {
            // type, code, checksum, identifier
            let icmp: [u8; 6] = ctx.load(l4).ok()?;
            if icmp[0] != ICMP_ECHO_REQUEST && icmp[0] != ICMP_ECHO_REPLY {
                return None;
            }
            ([icmp[4], icmp[5]], [icmp[4], icmp[5]])
        }
        _ => return None,
    };
    Some(FlowKey::new(ip.protocol, ip.saddr, sport, ip.daddr, dport))
}

/// Whether the host's path carries the flow `key` (the lookup also marks it recently used).
#[inline(always)]
pub fn on_kernel_path(key: &FlowKey) -> bool {
    FLANNEL_KERNEL_FLOWS.get_ptr(key).is_some()
}

/// Whether the fast path may carry this packet: it can be keyed, and its flow is not one the
/// host's path carries.
#[inline(always)]
pub fn fast_path_may_take(ctx: &TcContext, ip_offset: usize, ip: &Ipv4Hdr) -> bool {
    matches!(flow_key(ctx, ip_offset, ip), Some(key) if !on_kernel_path(&key))
}

/// Remembers that the host's path carries the flow of this packet.
#[inline(always)]
pub fn record(ctx: &TcContext, ip_offset: usize, ip: &Ipv4Hdr) {
    if let Some(key) = flow_key(ctx, ip_offset, ip) {
        remember(&key);
    }
}

/// Remembers that the host's path carries the flow `key`.
#[inline(always)]
pub fn remember(key: &FlowKey) {
    if on_kernel_path(key) {
        return;
    }
    let flow = KernelFlow {
        // SAFETY: the helper takes no arguments.
        first_seen_ns: unsafe { bpf_ktime_get_ns() },
    };
    // NOEXIST: another CPU may have added it meanwhile, and its timestamp is the older one.
    // A failure leaves the flow unremembered, which only matters to the fast path.
    let _ = FLANNEL_KERNEL_FLOWS.insert(key, flow, u64::from(BPF_NOEXIST));
}
