//! The pod fast path (`PodFastPath: true`) on a three-node cluster: full connectivity (ICMP,
//! TCP bulk in both directions, which carries GSO packets through both fast-path hooks, and
//! UDP); pod traffic leaves through `flannel_pod_egress` and enters the pods through
//! `bpf_redirect_peer`; the per-peer counters move with it, in the maps and in `flannelctl
//! peers`; bpftool shows the new maps with field names; uninstall removes the pod programs too.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Instant;

use anyhow::{ensure, Context};
use flannel_agent::dataplane::{pinned_local_pods, pinned_pod_counters, pinned_vteps};
use flannel_tests::testbed::{netns, require_root, wait_for, Pod, Testbed, TestbedOptions};

use crate::helpers::{check_peers, counters, flannelctl, flannelctl_json, tcp_bulk, udp_echo};
use crate::{CONVERGE, EBPF_FAST, READY};

/// The fast path's counters of one node that the tests look at.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PodCounts {
    /// Packets `flannel_pod_egress` encapsulated.
    pub(crate) egress: u64,
    /// Their bytes.
    pub(crate) egress_bytes: u64,
    /// Packets `flannel_decap` delivered straight into a pod.
    pub(crate) to_pod: u64,
    /// Their bytes.
    pub(crate) to_pod_bytes: u64,
}

/// Node `n`'s fast-path counters, from its pinned `FLANNEL_POD_STATS`.
pub(crate) fn pod_counters(tb: &mut Testbed, n: usize) -> anyhow::Result<PodCounts> {
    let c = pinned_pod_counters(&tb.bpf_pin_dir(n)?)?;
    let get = |name: &str| c.iter().find(|(stat, _)| stat.name() == name).map_or(0, |(_, v)| v);
    Ok(PodCounts {
        egress: get("pod_egress_encap_packets"),
        egress_bytes: get("pod_egress_encap_bytes"),
        to_pod: get("decap_to_pod_packets"),
        to_pod_bytes: get("decap_to_pod_bytes"),
    })
}

/// Waits until node `n`'s `FLANNEL_LOCAL_PODS` has `pod`.
pub(crate) async fn wait_for_local_pod(tb: &mut Testbed, n: usize, pod: &Pod) -> anyhow::Result<()> {
    let dir = tb.bpf_pin_dir(n)?;
    let ip = pod.ipv4().context("an IPv4 pod")?;
    wait_for("the pod in FLANNEL_LOCAL_PODS", CONVERGE, || {
        let dir = dir.clone();
        async move {
            let pods = pinned_local_pods(&dir)?;
            ensure!(pods.contains_key(&ip), "node {n}: {ip} not in {pods:?}");
            Ok(())
        }
    })
    .await
    .map(drop)
}

/// The number of `flannel_pod_egress` links pinned in `dir` (one per pod veth).
fn pod_links(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("v1")).map_or(0, |entries| {
        entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("link_flannel_pod_egress_"))
            .count()
    })
}

/// Waits until `flannel_pod_egress` is attached to (at least) `count` veths of node `n`.
pub(crate) async fn wait_for_pod_egress(tb: &mut Testbed, n: usize, count: usize) -> anyhow::Result<()> {
    let dir = tb.bpf_pin_dir(n)?;
    wait_for("flannel_pod_egress on the pod veths", CONVERGE, || {
        let dir = dir.clone();
        async move {
            let links = pod_links(&dir);
            ensure!(links >= count, "node {n}: {links} pod links, expected {count}");
            Ok(())
        }
    })
    .await
    .map(drop)
}

/// The per-peer counters `flannelctl peers --json` shows on node `n`, by the peer's VTEP.
async fn peer_rows(tb: &Testbed, n: usize) -> anyhow::Result<Vec<(Ipv4Addr, [u64; 4])>> {
    let peers = flannelctl_json(tb, n, &["peers"], 0).await?;
    check_peers(&peers, 2)?;
    let mut out = Vec::new();
    for row in peers["peers"].as_array().context("rows")? {
        let ip: Ipv4Addr = row["map"]["vtep_ip"].as_str().context("vtep_ip")?.parse()?;
        let c = &row["counters"];
        let get = |k: &str| c[k].as_u64().with_context(|| format!("no {k} in {row}"));
        out.push((
            ip,
            [
                get("encap_packets")?,
                get("encap_bytes")?,
                get("decap_packets")?,
                get("decap_bytes")?,
            ],
        ));
    }
    Ok(out)
}

#[tokio::test]
async fn pod_fast_path_three_nodes_matrix_gso_peer_counters_and_uninstall() -> anyhow::Result<()> {
    if !require_root("pod_fast_path_three_nodes_matrix_gso_peer_counters_and_uninstall") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(EBPF_FAST)).await?;
    tb.start_agents(&[1, 2, 3], &["--ip-masq"], READY).await?;
    let mut pods = Vec::new();
    for node in 1..=3 {
        pods.push(tb.add_pod(node, &format!("f{node}")).await?);
    }
    pods.push(tb.add_pod(1, "f1b").await?);
    for n in 1..=3 {
        let dir = tb.bpf_pin_dir(n)?;
        wait_for("both peers in the eBPF map", CONVERGE, || {
            let dir = dir.clone();
            async move {
                let vteps = pinned_vteps(&dir)?;
                ensure!(vteps.len() == 2, "node {n}: {vteps:?}");
                Ok(())
            }
        })
        .await?;
    }
    // The first round goes partly through the kernel path, which makes the neighbour and
    // FDB entries that put each pod on the fast path.
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("pod fast path, 3 nodes, first round:\n{matrix}");
    matrix.assert_full();
    for pod in pods.clone() {
        wait_for_local_pod(&mut tb, pod.node, &pod).await?;
    }
    for (n, count) in [(1, 2), (2, 1), (3, 1)] {
        wait_for_pod_egress(&mut tb, n, count).await?;
    }

    let before: Vec<PodCounts> = (1..=3).map(|n| pod_counters(&mut tb, n)).collect::<Result<_, _>>()?;
    let peers_before = peer_rows(&tb, 1).await?;
    let flannel1_before = counters(&mut tb, 1)?;
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("pod fast path, 3 nodes:\n{matrix}");
    matrix.assert_full();
    const BULK: usize = 8 << 20;
    let took = tcp_bulk(&pods[0], &pods[1], BULK).await?;
    let back = tcp_bulk(&pods[1], &pods[0], BULK).await?;
    println!("8 MiB TCP n1 -> n2 in {took:?}, n2 -> n1 in {back:?}");
    udp_echo(&pods[0], &pods[2]).await?;
    let after: Vec<PodCounts> = (1..=3).map(|n| pod_counters(&mut tb, n)).collect::<Result<_, _>>()?;
    let flannel1_after = counters(&mut tb, 1)?;
    println!("fast path counters before {before:?}\nafter {after:?}");
    println!("node 1 flannel_encap (packets, bytes, decap): {flannel1_before:?} -> {flannel1_after:?}");
    let (n1, n2) = (after[0], after[1]);
    ensure!(
        n1.egress_bytes - before[0].egress_bytes >= BULK as u64,
        "node 1's pods did not send the bulk through flannel_pod_egress"
    );
    ensure!(
        n2.to_pod_bytes - before[1].to_pod_bytes >= BULK as u64,
        "node 2 did not deliver the bulk into its pod with bpf_redirect_peer"
    );
    ensure!(
        n2.egress_bytes - before[1].egress_bytes >= BULK as u64
            && n1.to_pod_bytes - before[0].to_pod_bytes >= BULK as u64,
        "the reverse bulk did not take the fast path at both ends"
    );
    ensure!(
        after[2].to_pod > before[2].to_pod && after[2].egress > before[2].egress,
        "node 3's pod did not use the fast path for the UDP echo"
    );
    // GRO aggregates were delivered whole: far fewer packets than 1,400-byte segments.
    let delivered = n2.to_pod - before[1].to_pod;
    println!("node 2 delivered {delivered} packets into its pod for {BULK} bytes");
    // Pod traffic no longer reaches flannel.1: its encap program saw at most a trickle
    // (host-originated packets), far less than the bulk's packets.
    let via_flannel1 = flannel1_after.1 - flannel1_before.1;
    ensure!(
        via_flannel1 < BULK as u64 / 4,
        "{via_flannel1} bytes still went through flannel.1 on node 1"
    );

    // Per-peer counters moved with the traffic, in flannelctl peers.
    let peers_after = peer_rows(&tb, 1).await?;
    println!("node 1 per-peer counters (encap pkts, bytes, decap pkts, bytes): {peers_before:?} -> {peers_after:?}");
    let node = |n: usize| tb.node(n).ip;
    for (ip, now) in &peers_after {
        let was = peers_before.iter().find(|(i, _)| i == ip).map_or([0; 4], |(_, c)| *c);
        let min = if *ip == node(2) { BULK as u64 } else { 50 * 1000 };
        ensure!(
            now[1] - was[1] >= min && now[3] - was[3] >= min,
            "peer {ip}: counters {was:?} -> {now:?}, expected >= {min} bytes each way"
        );
    }
    let text = flannelctl(&tb, 1, &["peers"]).await?;
    println!("flannelctl peers:\n{}", String::from_utf8_lossy(&text.stdout));

    // bpftool shows the new maps with field names.
    let v1 = tb.bpf_pin_dir(1)?.join("v1");
    for (map, fields) in [
        ("FLANNEL_LOCAL_PODS", &["ifindex", "pod_mac", "gw_mac"][..]),
        ("FLANNEL_PEER_STATS", &["encap_packets", "decap_bytes"][..]),
    ] {
        let pin = v1.join(map);
        let dump = netns::run(
            "bpftool",
            &["map", "dump", "pinned", pin.to_str().context("path")?, "-j"],
            CONVERGE,
        )
        .await?;
        for field in fields {
            ensure!(
                dump.contains(&format!("\"{field}\"")),
                "bpftool shows no field {field} in {map}: {dump}"
            );
        }
    }

    // Uninstall on node 3 removes the pod programs too; the kernel path carries on.
    let dir = tb.bpf_pin_dir(3)?;
    let out = flannelctl(&tb, 3, &["uninstall", "--bpf-pin-dir", dir.to_str().context("path")?]).await?;
    ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let net = tb
        .exec(&tb.node(3).netns, "bpftool", &["net", "show"], CONVERGE)
        .await?;
    ensure!(!net.contains("flannel_"), "programs still attached on node 3:\n{net}");
    tb.kill_agent(3)?;
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("after uninstall on n3:\n{matrix}");
    matrix.assert_full();
    println!("took {:?}", started.elapsed());
    tb.shutdown().await
}
