//! Privileged tests of the eBPF vxlan datapath with the real flanneld on a testbed cluster:
//! full connectivity (ICMP, TCP bulk with GSO, UDP) with `Datapath: ebpf`; a mixed cluster of
//! an eBPF node, a kernel-datapath node and a node set up by hand as upstream would; the
//! pinned maps as bpftool shows them; counters that move with traffic; `auto` falling back
//! with its log line; `flannelctl status`, `peers` and `uninstall`; a UDP flow that loses
//! no packet while the agents on both ends are killed with SIGKILL and restarted; and the same
//! with the pod fast path (`fastpath`); and XDP decapsulation (`xdp`).
//!
//! They need root; outside CI they skip loudly without it. Build the binaries first
//! (`cargo build -p flannel-agent --bins`). `--nocapture` shows matrices and outputs.

mod fastpath;
mod flows;
mod helpers;
mod xdp;

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use flannel_agent::dataplane::pinned_vteps;
use flannel_tests::testbed::netns;
use flannel_tests::testbed::probe::{self, http_get};
use flannel_tests::testbed::{flanneld_path, require_root, wait_for, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};
use helpers::{
    check_peers, counters, flannelctl, flannelctl_json, gaps, kill_and_restart, start_flow, tcp_bulk, udp_echo,
    vtep_count,
};
use ipnet::Ipv4Net;
use serde_json::Value;

/// Bound on an agent becoming ready.
const READY: Duration = Duration::from_secs(20);
/// Bound on a change reaching the datapath of other nodes.
const CONVERGE: Duration = Duration::from_secs(10);

/// With the pod fast path.
const EBPF_FAST: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf","PodFastPath":true}}"#;
const EBPF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf"}}"#;
const KERNEL: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"kernel"}}"#;
const AUTO_FAST: &str =
    r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"Auto","PodFastPath":true}}"#;

#[tokio::test]
async fn ebpf_three_nodes_full_matrix_counters_bpftool_and_flannelctl() -> anyhow::Result<()> {
    if !require_root("ebpf_three_nodes_full_matrix_counters_bpftool_and_flannelctl") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(EBPF)).await?;
    tb.start_agents(&[1, 2, 3], &["--ip-masq"], READY).await?;
    let mut pods = Vec::new();
    for node in 1..=3 {
        pods.push(tb.add_pod(node, &format!("e{node}")).await?);
    }
    pods.push(tb.add_pod(1, "e1b").await?);
    // Every agent has both peers in its map before traffic is measured.
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
    let before = counters(&mut tb, 1)?;
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("eBPF datapath, 3 nodes:\n{matrix}");
    matrix.assert_full();
    let took = tcp_bulk(&pods[0], &pods[1], 8 << 20).await?;
    println!("8 MiB TCP n1 -> n2 in {took:?}");
    udp_echo(&pods[0], &pods[2]).await?;
    let after = counters(&mut tb, 1)?;
    println!("node 1 counters (encap packets, encap bytes, decap): {before:?} -> {after:?}");
    ensure!(after.0 > before.0, "no packet was encapsulated in BPF on node 1");
    ensure!(
        after.1 - before.1 >= 8 << 20,
        "encap bytes grew by less than the bulk transfer"
    );
    ensure!(after.2 > before.2, "no VXLAN packet reached node 1's decap program");

    // bpftool pretty-prints the map with the field names of flannel-common's types.
    let pin = tb.bpf_pin_dir(1)?.join("v1/FLANNEL_VTEPS");
    let dump = netns::run(
        "bpftool",
        &["map", "dump", "pinned", pin.to_str().context("path")?, "-j"],
        CONVERGE,
    )
    .await?;
    println!("bpftool map dump pinned {}:\n{dump}", pin.display());
    let parsed: Value = serde_json::from_str(&dump)?;
    ensure!(
        parsed.as_array().is_some_and(|a| a.len() == 2),
        "two entries expected: {dump}"
    );
    for field in ["prefix_len", "vtep_ip", "vtep_mac", "flags"] {
        ensure!(
            dump.contains(&format!("\"{field}\"")),
            "bpftool shows no field {field}: {dump}"
        );
    }

    // flannelctl status and peers.
    let status = flannelctl_json(&tb, 1, &["status"], 0).await?;
    ensure!(status["datapath"]["datapath"] == "ebpf", "{status:#}");
    ensure!(status["datapath"]["requested"] == "ebpf", "{status:#}");
    let text = flannelctl(&tb, 1, &["status"]).await?;
    println!("flannelctl status:\n{}", String::from_utf8_lossy(&text.stdout));
    let peers = flannelctl_json(&tb, 1, &["peers"], 0).await?;
    check_peers(&peers, 2)?;
    ensure!(
        peers["counters"]["encap_packets"].as_u64() >= Some(after.0),
        "{peers:#}"
    );
    let text = flannelctl(&tb, 1, &["peers"]).await?;
    println!("flannelctl peers:\n{}", String::from_utf8_lossy(&text.stdout));

    // uninstall on node 3: no program left there, pins gone, traffic still flows (kernel).
    let dir = tb.bpf_pin_dir(3)?;
    let out = flannelctl(&tb, 3, &["uninstall", "--bpf-pin-dir", dir.to_str().context("path")?]).await?;
    println!("flannelctl uninstall:\n{}", String::from_utf8_lossy(&out.stdout));
    ensure!(
        out.status.success(),
        "uninstall failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(!dir.join("v1").exists(), "pins left under {}", dir.display());
    let net = tb
        .exec(&tb.node(3).netns, "bpftool", &["net", "show"], CONVERGE)
        .await?;
    ensure!(!net.contains("flannel_"), "programs still attached on node 3:\n{net}");
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("after uninstall on n3:\n{matrix}");
    matrix.assert_full();
    println!("took {:?}", started.elapsed());
    tb.shutdown().await
}

/// Puts a net-conf for agents started from now on.
pub(crate) async fn put_config(tb: &Testbed, conf: &str) -> anyhow::Result<()> {
    tb.etcd().context("etcd")?.put(&tb.config_key(), conf).await.map(drop)
}

#[tokio::test]
async fn ebpf_kernel_and_upstream_nodes_interoperate() -> anyhow::Result<()> {
    if !require_root("ebpf_kernel_and_upstream_nodes_interoperate") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(EBPF)).await?;
    tb.start_agents(&[1], &["--ip-masq"], READY).await?;
    // The config is read at start: node 2 starts after it changes to the kernel datapath.
    put_config(&tb, KERNEL).await?;
    tb.start_agents(&[2], &["--ip-masq"], READY).await?;
    let network: Ipv4Net = "10.244.0.0/16".parse()?;
    let upstream = tb
        .setup_upstream_vxlan_node(3, network, "10.244.200.0/24".parse()?, true)
        .await?;
    ensure!(
        upstream.add_peers(&tb).await? == 2,
        "the upstream node should program both agents"
    );

    let s1 = flannelctl_json(&tb, 1, &["status"], 0).await?;
    let s2 = flannelctl_json(&tb, 2, &["status"], 0).await?;
    ensure!(s1["datapath"]["datapath"] == "ebpf", "{s1:#}");
    ensure!(s2["datapath"]["datapath"] == "kernel", "{s2:#}");
    let mut pods = Vec::new();
    for node in 1..=3 {
        pods.push(tb.add_pod(node, &format!("m{node}")).await?);
    }
    wait_for("node 1's map has both peers", CONVERGE, || async {
        check_peers(&flannelctl_json(&tb, 1, &["peers"], 0).await?, 2)
    })
    .await?;
    let before = counters(&mut tb, 1)?;
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("mixed (n1 eBPF, n2 kernel, n3 upstream by hand):\n{matrix}");
    matrix.assert_full();
    tcp_bulk(&pods[0], &pods[2], 4 << 20).await?;
    tcp_bulk(&pods[2], &pods[0], 4 << 20).await?;
    tcp_bulk(&pods[1], &pods[0], 4 << 20).await?;
    udp_echo(&pods[0], &pods[1]).await?;
    let after = counters(&mut tb, 1)?;
    ensure!(
        after.0 > before.0 && after.2 > before.2,
        "node 1's programs saw no traffic: {before:?} -> {after:?}"
    );
    let peers = flannelctl_json(&tb, 2, &["peers"], 0).await?;
    ensure!(
        peers["peers"]
            .as_array()
            .is_some_and(|r| r.len() == 2 && r.iter().all(|r| r["state"] == "kernel")),
        "{peers:#}"
    );
    println!("took {:?}", started.elapsed());
    tb.shutdown().await
}

#[tokio::test]
async fn auto_falls_back_to_the_kernel_datapath_with_one_log_line() -> anyhow::Result<()> {
    if !require_root("auto_falls_back_to_the_kernel_datapath_with_one_log_line") {
        return Ok(());
    }
    let started = Instant::now();
    // `auto` chooses eBPF only with PodFastPath on this kernel (without it, eBPF is slower on
    // single-stream TCP), and PodFastPath needs --ip-masq.
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(AUTO_FAST)).await?;
    println!("testbed up after {:?}", started.elapsed());
    tb.start_agents(&[2], &["--ip-masq"], READY).await?;
    println!("node 2 ready after {:?}", started.elapsed());
    // Node 1's agent by hand, so that only it gets the test hook in its environment.
    let node = tb.node(1).clone();
    let pin_dir = tb.bpf_pin_dir(1)?;
    let args = [
        "FLANNEL_EBPF_PRETEND_MISSING=adjust-room-encap".to_owned(),
        flanneld_path()?.display().to_string(),
        format!("--etcd-endpoints={}", tb.etcd_endpoint()?),
        "--iface=eth0".to_owned(),
        format!("--subnet-file={}", node.subnet_file().display()),
        format!("--bpf-pin-dir={}", pin_dir.display()),
        format!("--healthz-port={AGENT_HEALTHZ_PORT}"),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut agent = tb.spawn(&node.netns, "flanneld-fallback", "env", &args)?;
    let line = agent
        .wait_for_log_line(
            "eBPF datapath unavailable, falling back to the kernel vxlan datapath",
            READY,
        )
        .await?;
    println!("fallback log line after {:?}: {line}", started.elapsed());
    ensure!(
        line.contains("bpf_skb_adjust_room"),
        "the line should say what is missing: {line}"
    );
    let addr = SocketAddr::new(IpAddr::V4(node.ip), AGENT_HEALTHZ_PORT);
    wait_for("node 1 ready", READY, || async {
        match http_get(&node.netns, addr, "/readyz").await? {
            (200, _) => Ok(()),
            other => bail!("{other:?}"),
        }
    })
    .await?;
    let logs = format!("{}{}", agent.stdout(), agent.stderr());
    ensure!(
        logs.matches("falling back to the kernel vxlan datapath").count() == 1,
        "one line only:\n{logs}"
    );
    let status = flannelctl_json(&tb, 1, &["status"], 0).await?;
    ensure!(
        status["datapath"]["datapath"] == "kernel" && status["datapath"]["requested"] == "auto",
        "{status:#}"
    );
    ensure!(
        status["datapath"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("adjust_room")),
        "{status:#}"
    );
    let text = flannelctl(&tb, 1, &["status"]).await?;
    println!(
        "flannelctl status (fallback):\n{}",
        String::from_utf8_lossy(&text.stdout)
    );
    ensure!(!pin_dir.join("v1").exists(), "the kernel datapath pinned nothing");
    // The other node did choose eBPF, and the two interoperate.
    let s2 = flannelctl_json(&tb, 2, &["status"], 0).await?;
    ensure!(s2["datapath"]["datapath"] == "ebpf", "{s2:#}");
    let pods = vec![tb.add_pod(1, "f1").await?, tb.add_pod(2, "f2").await?];
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("fallback node + eBPF node:\n{matrix}");
    matrix.assert_full();
    drop(agent);
    println!("took {:?}", started.elapsed());
    Ok(())
}

#[tokio::test]
async fn kill_9_and_restart_loses_no_packet() -> anyhow::Result<()> {
    if !require_root("kill_9_and_restart_loses_no_packet") {
        return Ok(());
    }
    restart_loses_no_packet(EBPF).await
}

#[tokio::test]
async fn kill_9_and_restart_loses_no_packet_with_pod_fast_path() -> anyhow::Result<()> {
    if !require_root("kill_9_and_restart_loses_no_packet_with_pod_fast_path") {
        return Ok(());
    }
    restart_loses_no_packet(EBPF_FAST).await
}

/// A 1,000 packets/s UDP flow between pods on two nodes loses nothing while the agents on
/// both ends are killed with SIGKILL and restarted, one after the other.
async fn restart_loses_no_packet(conf: &str) -> anyhow::Result<()> {
    let fast = conf == EBPF_FAST;
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(conf)).await?;
    // --ip-masq: without it the CNI plugin masquerades pod traffic and the fast path stays off.
    tb.start_agents(&[1, 2], &["--ip-masq"], READY).await?;
    let a = tb.add_pod(1, "sender").await?;
    let b = tb.add_pod(2, "receiver").await?;
    ensure!(probe::ping(&a.netns, b.ip()).await, "no path before the flow");
    for n in 1..=2 {
        let dir = tb.bpf_pin_dir(n)?;
        ensure!(vtep_count(&dir) == 1, "node {n} has no VTEP in its map");
    }
    if fast {
        // The flow must start on the fast path at both ends, so that the restarts replace
        // live fast-path programs.
        fastpath::wait_for_local_pod(&mut tb, 2, &b).await?;
        fastpath::wait_for_pod_egress(&mut tb, 1, 1).await?;
    }
    let (before1, before2) = (counters(&mut tb, 1)?, counters(&mut tb, 2)?);
    let pod_before = (fastpath::pod_counters(&mut tb, 1)?, fastpath::pod_counters(&mut tb, 2)?);
    let flow = start_flow(&a, &b);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = kill_and_restart(&mut tb, 2).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = kill_and_restart(&mut tb, 1).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    flow.stop.store(true, Ordering::Relaxed);
    let sent = flow.sender.await??;
    let seen = flow.receiver.await??;
    let received = seen.iter().take(sent as usize).filter(|s| **s).count();
    let gaps = gaps(&seen, sent);
    println!(
        "UDP flow: {sent} sent, {received} received; receiver's agent back in {r:?}, sender's in {s:?}; gaps {gaps:?}"
    );
    ensure!(sent >= 2500, "the flow ran too briefly: {sent} packets");
    ensure!(gaps.is_empty(), "lost packets (sequence gaps): {gaps:?}");
    let (after1, after2) = (counters(&mut tb, 1)?, counters(&mut tb, 2)?);
    let pod_after = (fastpath::pod_counters(&mut tb, 1)?, fastpath::pod_counters(&mut tb, 2)?);
    if fast {
        let (egress, to_pod) = (
            pod_after.0.egress - pod_before.0.egress,
            pod_after.1.to_pod - pod_before.1.to_pod,
        );
        println!("fast path: {egress} packets encapsulated from the pod on node 1, {to_pod} delivered into the pod on node 2");
        ensure!(
            egress >= sent,
            "the flow did not take the fast path out of node 1: {egress} of {sent}"
        );
        ensure!(
            to_pod >= sent,
            "the flow did not take the fast path into the pod on node 2: {to_pod} of {sent}"
        );
    } else {
        ensure!(
            after1.0 - before1.0 >= sent,
            "the flow was not encapsulated in BPF on node 1: {before1:?} -> {after1:?}"
        );
    }
    ensure!(
        after2.2 > before2.2,
        "node 2's decap saw nothing: {before2:?} -> {after2:?}"
    );
    for n in 1..=2 {
        let logs = tb.agent_logs(n)?;
        ensure!(
            logs.contains("using the eBPF vxlan datapath"),
            "node {n} restarted without eBPF:\n{logs}"
        );
        check_peers(&flannelctl_json(&tb, n, &["peers"], 0).await?, 1)?;
    }
    println!("took {:?}", started.elapsed());
    tb.shutdown().await
}
