//! `DecapMode: "xdp"`: `flannel_xdp_decap` on the underlay veth strips VXLAN and marks the
//! frame, `flannel_decap` delivers it: into `flannel.1` on node 1, straight into the pod with
//! the pod fast path on node 2. The testbed's uplinks are veths, where native XDP turns TSO
//! off on the peer: this checks correctness (ICMP, TCP bulk both ways, UDP, counters), not
//! speed.

use std::time::Instant;

use anyhow::{ensure, Context};
use flannel_agent::dataplane::pinned_xdp_counters;
use flannel_tests::testbed::{require_root, Testbed, TestbedOptions};

use crate::fastpath::{pod_counters, wait_for_local_pod};
use crate::helpers::{counters, flannelctl_json, tcp_bulk, udp_echo};
use crate::{put_config, CONVERGE, READY};

const XDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf","DecapMode":"xdp"}}"#;
const XDP_FAST: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf","DecapMode":"xdp","PodFastPath":true}}"#;

/// Node `n`'s XDP strip counter.
fn stripped(tb: &mut Testbed, n: usize) -> anyhow::Result<u64> {
    let c = pinned_xdp_counters(&tb.bpf_pin_dir(n)?)?;
    let strip = c.iter().find(|(s, _)| s.name() == "xdp_strip_packets");
    Ok(strip.map_or(0, |(_, v)| v))
}

#[tokio::test]
async fn xdp_decap_delivers_to_flannel_1_and_into_pods() -> anyhow::Result<()> {
    if !require_root("xdp_decap_delivers_to_flannel_1_and_into_pods") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(XDP)).await?;
    tb.start_agents(&[1], &["--ip-masq"], READY).await?;
    put_config(&tb, XDP_FAST).await?;
    tb.start_agents(&[2], &["--ip-masq"], READY).await?;
    let pods = vec![tb.add_pod(1, "x1").await?, tb.add_pod(2, "x2").await?];
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("XDP decap, first round:\n{matrix}");
    matrix.assert_full();
    for n in 1..=2 {
        let status = flannelctl_json(&tb, n, &["status"], 0).await?;
        ensure!(
            status["datapath"]["ebpf"]["decap_mode"] == "xdp",
            "node {n}: {status:#}"
        );
        let net = tb
            .exec(&tb.node(n).netns, "bpftool", &["net", "show"], CONVERGE)
            .await?;
        // bpftool lists XDP by program id only; the pinned link says it is ours.
        let pin = tb.bpf_pin_dir(n)?.join("v1/link_flannel_xdp_decap");
        ensure!(
            net.lines().any(|l| l.starts_with("eth0") && l.contains("driver id")) && pin.exists(),
            "node {n}: no native XDP program on the uplink (pin {}):\n{net}",
            pin.display()
        );
    }
    wait_for_local_pod(&mut tb, 2, &pods[1]).await?;

    let strip_before = (stripped(&mut tb, 1)?, stripped(&mut tb, 2)?);
    let (dec1, pod2) = (counters(&mut tb, 1)?, pod_counters(&mut tb, 2)?);
    let matrix = tb.connectivity_matrix(&pods).await;
    matrix.assert_full();
    let to2 = tcp_bulk(&pods[0], &pods[1], 4 << 20).await?;
    let to1 = tcp_bulk(&pods[1], &pods[0], 4 << 20).await?;
    println!("4 MiB TCP n1 -> n2 in {to2:?}, n2 -> n1 in {to1:?}");
    udp_echo(&pods[0], &pods[1]).await?;
    let strip_after = (stripped(&mut tb, 1)?, stripped(&mut tb, 2)?);
    let (dec1_after, pod2_after) = (counters(&mut tb, 1)?, pod_counters(&mut tb, 2)?);
    println!("XDP stripped: {strip_before:?} -> {strip_after:?}; node 1 decap {dec1:?} -> {dec1_after:?}; node 2 to pod {pod2:?} -> {pod2_after:?}");
    ensure!(
        strip_after.0 - strip_before.0 >= 1000 && strip_after.1 - strip_before.1 >= 1000,
        "XDP did not strip the bulk transfers: {strip_before:?} -> {strip_after:?}"
    );
    ensure!(dec1_after.2 > dec1.2, "node 1's flannel_decap delivered nothing");
    ensure!(
        pod2_after.to_pod_bytes - pod2.to_pod_bytes >= 4 << 20,
        "node 2 did not deliver the XDP-stripped bulk into its pod"
    );
    println!("took {:?}", started.elapsed());
    tb.shutdown().await.context("shutdown")
}
