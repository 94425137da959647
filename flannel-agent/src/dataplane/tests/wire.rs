//! Byte-for-byte comparisons with the kernel's vxlan device.

use std::time::Duration;

use anyhow::{ensure, Context as _, Result};
use flannel_common::{Stat, PROG_DECAP, PROG_ENCAP};

use super::{
    load_node,
    net::{can_run_privileged, spawn_in, NetnsGuard, TestNet, PORT, STRANGER, SUBNETS, UNDERLAY, VNI, VTEP_MACS},
    node_config,
    packet::{hex, is_udp_to, masked, off, udp_frame, vxlan_frame, PacketSocket},
    test_run,
};

/// `TC_ACT_REDIRECT`, what a program returns after `bpf_redirect*`.
const TC_ACT_REDIRECT: u32 = 7;
/// `TC_ACT_OK`.
const TC_ACT_OK: u32 = 0;
/// `TC_ACT_SHOT`.
const TC_ACT_SHOT: u32 = 2;

/// The inner frame node A sends to a pod address behind node B: what `flannel.1` would
/// transmit after routing (destination MAC = B's VtepMAC from the neighbour entry).
fn inner_frame() -> Vec<u8> {
    let payload: Vec<u8> = (0..64u8).collect();
    udp_frame(
        VTEP_MACS[1],
        VTEP_MACS[0],
        (SUBNETS[0], 40000),
        (std::net::Ipv4Addr::new(10, 244, 2, 5), 5555),
        &payload,
    )
}

/// Sends `frame` out of node A's `flannel.1` and returns the first VXLAN frame node B's
/// underlay receives.
fn send_and_capture(net: &TestNet, frame: &[u8]) -> Result<Vec<u8>> {
    let capture = spawn_in(&net.nodes[1], || PacketSocket::open("eth0"))
        .join()
        .expect("no panic")?;
    let frame = frame.to_vec();
    spawn_in(&net.nodes[0], move || PacketSocket::open("flannel.1")?.send(&frame))
        .join()
        .expect("no panic")?;
    capture
        .recv_matching(Duration::from_secs(3), false, |f| is_udp_to(f, PORT))?
        .context("node B saw no VXLAN frame")
}

#[test]
fn encap_output_is_byte_for_byte_the_kernel_vxlan_output() -> Result<()> {
    if !can_run_privileged("encap_output_is_byte_for_byte_the_kernel_vxlan_output") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let inner = inner_frame();

    // The kernel's flannel.1 encapsulates (no programs yet).
    let kernel = send_and_capture(&net, &inner)?;
    // The same frame through flannel_encap.
    let dp = load_node(&net, 0, node_config(0))?;
    let ebpf = send_and_capture(&net, &inner)?;
    let counters = dp.counters()?;
    ensure!(
        counters.get(Stat::EncapPackets) == 1,
        "the second frame did not go through flannel_encap: {counters:?}"
    );

    // Only the IP ID (and so the header checksum) may differ: the driver draws it with
    // ip_select_ident, we with bpf_get_prandom_u32 (the outer header has no DF, the ID only
    // needs to spread). The UDP source port must match: both hash the same skb.
    let ignore = [off::IP_ID..off::IP_ID + 2, off::IP_CHECK..off::IP_CHECK + 2];
    ensure!(
        masked(&kernel, &ignore) == masked(&ebpf, &ignore),
        "flannel_encap differs from the kernel (IP ID and checksum masked)\nkernel:\n{}\nflannel_encap:\n{}",
        hex(&kernel),
        hex(&ebpf)
    );
    let mut header = [0u8; 20];
    header.copy_from_slice(&ebpf[14..34]);
    ensure!(
        flannel_common::wire::ipv4_checksum(&header) == [0, 0],
        "bad outer IPv4 checksum"
    );
    ensure!(
        kernel.len() == inner.len() + 50,
        "the kernel frame is not the inner frame + 50 bytes"
    );

    // BPF_PROG_TEST_RUN on the same frame: the verdict is the redirect; the outer Ethernet
    // header is the placeholder that bpf_redirect_neigh replaces with the neighbour's.
    let _ns = NetnsGuard::enter(&net.nodes[0])?;
    let (verdict, out) = test_run(&dp, PROG_ENCAP, &inner)?;
    ensure!(verdict == TC_ACT_REDIRECT, "test run verdict {verdict}");
    let ignore_l2 = [0..12, off::IP_ID..off::IP_ID + 2, off::IP_CHECK..off::IP_CHECK + 2];
    ensure!(
        masked(&kernel, &ignore_l2) == masked(&out, &ignore_l2),
        "test run output differs from the kernel (MACs, IP ID and checksum masked)\nkernel:\n{}\ntest run:\n{}",
        hex(&kernel),
        hex(&out)
    );
    Ok(())
}

#[test]
fn decap_delivers_the_inner_frame_exactly_as_the_kernel_does() -> Result<()> {
    if !can_run_privileged("decap_delivers_the_inner_frame_exactly_as_the_kernel_does") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let inner = inner_frame();
    let delivered = |net: &TestNet| -> Result<Vec<u8>> {
        let capture = spawn_in(&net.nodes[1], || PacketSocket::open("flannel.1"))
            .join()
            .expect("no panic")?;
        let frame = inner.clone();
        spawn_in(&net.nodes[0], move || PacketSocket::open("flannel.1")?.send(&frame))
            .join()
            .expect("no panic")?;
        capture
            .recv_matching(Duration::from_secs(3), false, |f| is_udp_to(f, 5555))?
            .context("node B's flannel.1 delivered nothing")
    };

    let kernel = delivered(&net)?;
    let dp = load_node(&net, 1, node_config(1))?;
    let ebpf = delivered(&net)?;
    ensure!(
        dp.counters()?.get(Stat::DecapPackets) == 1,
        "the frame did not go through flannel_decap: {:?}",
        dp.counters()?
    );
    ensure!(
        kernel == inner,
        "the kernel delivered something else:\n{}",
        hex(&kernel)
    );
    ensure!(
        ebpf == kernel,
        "flannel_decap delivered\n{}\nthe kernel delivered\n{}",
        hex(&ebpf),
        hex(&kernel)
    );

    // BPF_PROG_TEST_RUN: the VXLAN frame in, the inner frame out, redirected.
    let _ns = NetnsGuard::enter(&net.nodes[1])?;
    let outer_macs = (VTEP_MACS[1], VTEP_MACS[0]);
    let vxlan = vxlan_frame(outer_macs, (UNDERLAY[0], 33333), (UNDERLAY[1], PORT), VNI, &inner);
    let (verdict, out) = test_run(&dp, PROG_DECAP, &vxlan)?;
    ensure!(verdict == TC_ACT_REDIRECT, "test run verdict {verdict}");
    ensure!(
        out == inner,
        "test run output\n{}\ninstead of\n{}",
        hex(&out),
        hex(&inner)
    );

    // The same from an address that is no VTEP: dropped and counted.
    let before = dp.counters()?.get(Stat::DecapDropUnknownVtep);
    let stranger = vxlan_frame(outer_macs, (STRANGER, 33333), (UNDERLAY[1], PORT), VNI, &inner);
    let (verdict, _) = test_run(&dp, PROG_DECAP, &stranger)?;
    ensure!(verdict == TC_ACT_SHOT, "a stranger's VXLAN got verdict {verdict}");
    ensure!(dp.counters()?.get(Stat::DecapDropUnknownVtep) == before + 1);

    // Another VNI, another port, or too short: not ours / malformed.
    let other_vni = vxlan_frame(outer_macs, (UNDERLAY[0], 33333), (UNDERLAY[1], PORT), VNI + 1, &inner);
    ensure!(test_run(&dp, PROG_DECAP, &other_vni)?.0 == TC_ACT_OK);
    let other_port = vxlan_frame(outer_macs, (UNDERLAY[0], 33333), (UNDERLAY[1], 4789), VNI, &inner);
    ensure!(test_run(&dp, PROG_DECAP, &other_port)?.0 == TC_ACT_OK);
    let short = vxlan_frame(outer_macs, (UNDERLAY[0], 33333), (UNDERLAY[1], PORT), VNI, &inner[..20]);
    ensure!(test_run(&dp, PROG_DECAP, &short)?.0 == TC_ACT_SHOT);
    ensure!(dp.counters()?.get(Stat::DecapDropMalformed) == 1);
    Ok(())
}
