//! `FLANNEL_KERNEL_FLOWS` through `BPF_PROG_TEST_RUN`: with the pod fast path on, a flow that
//! crossed the host's path stays there in both directions, other flows take the fast path, and
//! packets that cannot be keyed go to the host.

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{ensure, Result};
use flannel_common::{FlowKey, LocalPod, PROG_DECAP, PROG_ENCAP, PROG_POD_EGRESS};

use super::{
    load_node,
    net::{can_run_privileged, NetnsGuard, TestNet, POD_A, PORT, SUBNETS, UNDERLAY, VNI, VTEP_MACS},
    node_config,
    packet::{hex, is_udp_to, udp_frame, vxlan_frame},
    test_run,
};
use crate::dataplane::pinned_kernel_flows;

const TC_ACT_OK: u32 = 0;
const TC_ACT_REDIRECT: u32 = 7;

/// The pod's MAC and its gateway's (the bridge's), as the pod's frames carry them.
const POD_MAC: [u8; 6] = [0x02, 0x0b, 0, 0, 0, 0x02];
const GW_MAC: [u8; 6] = [0x02, 0x0b, 0, 0, 0, 0x01];

#[test]
fn the_fast_path_leaves_flows_the_host_carried_to_the_host() -> Result<()> {
    if !can_run_privileged("the_fast_path_leaves_flows_the_host_carried_to_the_host") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let mut config = node_config(0);
    config.pod_fast_path = true;
    let mut dp = load_node(&net, 0, config)?;
    let pods: BTreeMap<_, _> = [(
        POD_A,
        LocalPod {
            ifindex: 1,
            pod_mac: POD_MAC,
            gw_mac: GW_MAC,
        },
    )]
    .into_iter()
    .collect();
    dp.sync_local_pods(&pods)?;
    let _ns = NetnsGuard::enter(&net.nodes[0])?;

    let remote = Ipv4Addr::from(u32::from(SUBNETS[1]) + 5);
    let payload = [7u8; 32];
    // What the pod sends, and what flannel.1 transmits for it after the host routed it.
    let from_pod = |sport: u16| udp_frame(GW_MAC, POD_MAC, (POD_A, sport), (remote, 5555), &payload);
    let via_host = |sport: u16| udp_frame(VTEP_MACS[1], VTEP_MACS[0], (POD_A, sport), (remote, 5555), &payload);
    // A reply from node B, as VXLAN on node A's underlay.
    let reply = |dport: u16| {
        let inner = udp_frame(VTEP_MACS[0], VTEP_MACS[1], (remote, 5555), (POD_A, dport), &payload);
        let outer = vxlan_frame(
            (VTEP_MACS[0], VTEP_MACS[1]),
            (UNDERLAY[1], 40000),
            (UNDERLAY[0], PORT),
            VNI,
            &inner,
        );
        (inner, outer)
    };

    // A flow that starts on the pod's veth takes the fast path.
    let (verdict, out) = test_run(&dp, PROG_POD_EGRESS, &from_pod(41000))?;
    ensure!(
        verdict == TC_ACT_REDIRECT && is_udp_to(&out, PORT),
        "a new flow from the pod: verdict {verdict}, out\n{}",
        hex(&out)
    );

    // Another flow crosses the host's path (flannel_encap sees it): it is remembered, by a
    // key that is the same both ways.
    let (verdict, _) = test_run(&dp, PROG_ENCAP, &via_host(42000))?;
    ensure!(verdict == TC_ACT_REDIRECT, "flannel_encap verdict {verdict}");
    let key = FlowKey::new(
        17,
        POD_A.octets(),
        42000u16.to_be_bytes(),
        remote.octets(),
        5555u16.to_be_bytes(),
    );
    let flows = pinned_kernel_flows(net.pin_dir(0))?;
    ensure!(
        flows.iter().any(|(k, _)| *k == key) && flows.len() == 1,
        "FLANNEL_KERNEL_FLOWS holds {flows:?}"
    );

    // Its next packet from the pod goes to the host untouched; the first flow stays fast.
    let frame = from_pod(42000);
    let (verdict, out) = test_run(&dp, PROG_POD_EGRESS, &frame)?;
    ensure!(
        verdict == TC_ACT_OK && out == frame,
        "a host-path flow from the pod: verdict {verdict}"
    );
    ensure!(test_run(&dp, PROG_POD_EGRESS, &from_pod(41000))?.0 == TC_ACT_REDIRECT);

    // Replies: the host-path flow's goes to flannel.1 with its frame as sent (for conntrack
    // to see); the fast flow's goes into the pod, with the pod's MACs.
    let (inner, outer) = reply(42000);
    let (verdict, out) = test_run(&dp, PROG_DECAP, &outer)?;
    ensure!(
        verdict == TC_ACT_REDIRECT && out == inner,
        "the host-path flow's reply: verdict {verdict}, out\n{}",
        hex(&out)
    );
    let (_, outer) = reply(41000);
    let (verdict, out) = test_run(&dp, PROG_DECAP, &outer)?;
    ensure!(
        verdict == TC_ACT_REDIRECT && out[..6] == POD_MAC && out[6..12] == GW_MAC,
        "the fast flow's reply was not delivered into the pod: verdict {verdict}, out\n{}",
        hex(&out)
    );

    // A fragment cannot be told apart by flow: the host reassembles and tracks it.
    let mut fragment = from_pod(43000);
    fragment[14 + 6] = 0x20; // More Fragments
    fragment[14 + 10..14 + 12].copy_from_slice(&[0, 0]);
    let check = flannel_common::wire::ipv4_checksum(fragment[14..34].try_into()?);
    fragment[14 + 10..14 + 12].copy_from_slice(&check);
    let (verdict, out) = test_run(&dp, PROG_POD_EGRESS, &fragment)?;
    ensure!(verdict == TC_ACT_OK && out == fragment, "a fragment: verdict {verdict}");
    Ok(())
}
