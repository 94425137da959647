//! The pod fast path and the host's conntrack: a flow stays on one path for its lifetime.
//!
//! * A connection to a service (DNAT on the client's node, as kube-proxy does) works with the
//!   fast path on: its replies are left to conntrack, which translates them back.
//! * The first connections between freshly made pods work while their nodes move the pods
//!   onto the fast path, with kube-proxy's `--ctstate INVALID` drop in place; and new
//!   connections then take the fast path.
//! * Without `--ip-masq` (the CNI plugin masquerades pod traffic) the fast path stays off,
//!   with a log line, and pods reach each other masqueraded, as upstream.

use std::net::{Ipv4Addr, SocketAddr};

use anyhow::{ensure, Context};
use flannel_agent::dataplane::pinned_kernel_flows;
use flannel_tests::testbed::probe::{tcp_check_nat, tcp_source_seen};
use flannel_tests::testbed::{netns, require_root, Pod, Testbed, TestbedOptions};

use crate::fastpath::{pod_counters, wait_for_local_pod, wait_for_pod_egress};
use crate::helpers::flannelctl_json;
use crate::{CONVERGE, EBPF_FAST, READY};

/// A service address: what kube-proxy would DNAT on the client's node.
const SERVICE: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 80);
/// The port the service's backend listens on.
const BACKEND_PORT: u16 = 8080;

/// Runs `iptables` in node `n`'s namespace.
async fn iptables(tb: &Testbed, n: usize, args: &[&str]) -> anyhow::Result<()> {
    let args: Vec<&str> = ["-w"].iter().chain(args).copied().collect();
    tb.exec(&tb.node(n).netns, "iptables", &args, CONVERGE)
        .await
        .with_context(|| format!("node {n}: iptables {}", args.join(" ")))
        .map(drop)
}

/// What kube-proxy installs on every node and that matters here: conntrack-invalid packets
/// are dropped in the forward path (`KUBE-FORWARD`).
async fn drop_invalid_like_kube_proxy(tb: &Testbed, n: usize) -> anyhow::Result<()> {
    iptables(
        tb,
        n,
        &["-I", "FORWARD", "-m", "conntrack", "--ctstate", "INVALID", "-j", "DROP"],
    )
    .await
}

/// Waits until both pods are on their nodes' fast path (egress program and local pod entry).
async fn wait_for_fast_path(tb: &mut Testbed, pods: &[&Pod]) -> anyhow::Result<()> {
    for pod in pods {
        wait_for_pod_egress(tb, pod.node, 1).await?;
        wait_for_local_pod(tb, pod.node, pod).await?;
    }
    Ok(())
}

#[tokio::test]
async fn pod_fast_path_leaves_service_connections_to_conntrack() -> anyhow::Result<()> {
    if !require_root("pod_fast_path_leaves_service_connections_to_conntrack") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(EBPF_FAST)).await?;
    tb.start_agents(&[1, 2], &["--ip-masq"], READY).await?;
    let client = tb.add_pod(1, "svc-c").await?;
    let server = tb.add_pod(2, "svc-s").await?;
    // Traffic both ways puts both pods on the fast path.
    tb.tcp_check(&client, &server).await?;
    tb.tcp_check(&server, &client).await?;
    wait_for_fast_path(&mut tb, &[&client, &server]).await?;
    for n in 1..=2 {
        drop_invalid_like_kube_proxy(&tb, n).await?;
    }

    // Pod to pod: the fast path both ways.
    let before = pod_counters(&mut tb, 1)?;
    tb.tcp_check(&client, &server).await?;
    let after = pod_counters(&mut tb, 1)?;
    ensure!(
        after.egress > before.egress && after.to_pod > before.to_pod,
        "pod-to-pod traffic did not take the fast path on node 1: {before:?} -> {after:?}"
    );

    // kube-proxy's DNAT on the client's node. The client's packets to the service take the
    // host's path; the replies come back from the backend's own address and must be
    // translated back by conntrack, so they must not go straight into the client pod.
    let server_ip = server.ipv4().context("IPv4 server")?;
    let backend = SocketAddr::new(server_ip.into(), BACKEND_PORT);
    let to = backend.to_string();
    let (dst, dport) = (SERVICE.ip().to_string(), SERVICE.port().to_string());
    let dnat = [
        "-t",
        "nat",
        "-A",
        "PREROUTING",
        "-d",
        &dst,
        "-p",
        "tcp",
        "--dport",
        &dport,
        "-j",
        "DNAT",
        "--to-destination",
        &to,
    ];
    iptables(&tb, 1, &dnat).await?;
    for i in 0..3 {
        tcp_check_nat(&client.netns, &server.netns, backend, SERVICE)
            .await
            .with_context(|| format!("connection {i} to the service {SERVICE} (backend {backend})"))?;
    }

    // Node 1 remembers those flows (with the backend's address: FLANNEL_KERNEL_FLOWS sees the
    // packets after DNAT), and bpftool shows them with field names.
    let client_ip = client.ipv4().context("IPv4 client")?;
    let dir = tb.bpf_pin_dir(1)?;
    let flows = pinned_kernel_flows(&dir)?;
    let service_flows = flows
        .iter()
        .filter(|(k, _)| {
            let addrs = [Ipv4Addr::from(k.addr_a), Ipv4Addr::from(k.addr_b)];
            let ports = [u16::from_be_bytes(k.port_a), u16::from_be_bytes(k.port_b)];
            k.protocol == 6 && addrs.contains(&client_ip) && addrs.contains(&server_ip) && ports.contains(&BACKEND_PORT)
        })
        .count();
    ensure!(
        service_flows == 3,
        "node 1 remembers {service_flows} service flows, expected 3: {flows:?}"
    );
    let pin = dir.join("v1/FLANNEL_KERNEL_FLOWS");
    let dump = netns::run(
        "bpftool",
        &["map", "dump", "pinned", pin.to_str().context("path")?, "-j"],
        CONVERGE,
    )
    .await?;
    for field in ["addr_a", "port_b", "protocol", "first_seen_ns"] {
        ensure!(
            dump.contains(&format!("\"{field}\"")),
            "bpftool shows no {field}: {dump}"
        );
    }
    tb.shutdown().await
}

#[tokio::test]
async fn pod_fast_path_first_connection_between_fresh_pods() -> anyhow::Result<()> {
    if !require_root("pod_fast_path_first_connection_between_fresh_pods") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(EBPF_FAST)).await?;
    tb.start_agents(&[1, 2], &["--ip-masq"], READY).await?;
    for n in 1..=2 {
        drop_invalid_like_kube_proxy(&tb, n).await?;
    }
    // TCP is the very first traffic between two new pods (as in the benchmark), so it starts
    // on the host's path and the nodes put the pods on the fast path while it runs.
    let mut pairs = Vec::new();
    for i in 0..3 {
        let client = tb.add_pod(1, &format!("c{i}")).await?;
        let server = tb.add_pod(2, &format!("s{i}")).await?;
        tb.tcp_check(&client, &server)
            .await
            .with_context(|| format!("first TCP connection c{i} -> s{i}"))?;
        pairs.push((client, server));
    }
    // Once the pods are on the fast path, new connections take it.
    let (client, server) = &pairs[0];
    wait_for_fast_path(&mut tb, &[client, server]).await?;
    let before = [pod_counters(&mut tb, 1)?, pod_counters(&mut tb, 2)?];
    tb.tcp_check(client, server).await?;
    let after = [pod_counters(&mut tb, 1)?, pod_counters(&mut tb, 2)?];
    for n in 0..2 {
        ensure!(
            after[n].egress > before[n].egress && after[n].to_pod > before[n].to_pod,
            "node {}: a new connection did not take the fast path: {:?} -> {:?}",
            n + 1,
            before[n],
            after[n]
        );
    }
    tb.shutdown().await
}

#[tokio::test]
async fn pod_fast_path_stays_off_without_ip_masq() -> anyhow::Result<()> {
    if !require_root("pod_fast_path_stays_off_without_ip_masq") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(EBPF_FAST)).await?;
    tb.start_agents(&[1, 2], &[], READY).await?;
    let client = tb.add_pod(1, "m1").await?;
    let server = tb.add_pod(2, "m2").await?;
    tb.tcp_check(&client, &server).await?;
    tb.tcp_check(&server, &client).await?;
    // The CNI plugin masquerades: the server sees node 1's flannel.1 address, as upstream.
    let seen = tcp_source_seen(&client.netns, &server.netns, server.ip()).await?;
    let (subnet, _) = tb.node_subnets(1)?;
    let flannel_ip = subnet.context("node 1 has an IPv4 lease")?.network();
    ensure!(
        seen.ip() == flannel_ip,
        "node 2's pod saw {seen}, expected node 1's flannel.1 address {flannel_ip}"
    );
    let logs = tb.agent_logs(1)?;
    ensure!(
        logs.matches("PodFastPath is off").count() == 1 && logs.contains("--ip-masq"),
        "no (single) log line about PodFastPath being off:\n{logs}"
    );
    let status = flannelctl_json(&tb, 1, &["status"], 0).await?;
    ensure!(
        status["datapath"]["ebpf"]["pod_fast_path"] == false,
        "flannelctl status: {status}"
    );
    let counters = pod_counters(&mut tb, 1)?;
    ensure!(
        counters.egress == 0 && counters.to_pod == 0,
        "fast path counters moved: {counters:?}"
    );
    tb.shutdown().await
}
