//! End-to-end traffic between two namespaced nodes, with the programs on both sides, on one
//! side (the other runs upstream's kernel datapath), across restarts and after detaching.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    process::{Command, Stdio},
    sync::atomic::{AtomicU16, Ordering},
    thread,
    time::Duration,
};

use anyhow::{ensure, Context as _, Result};
use flannel_common::Stat;

use super::{
    load_node,
    net::{can_run_privileged, ip, spawn_in, TestNet, PORT, STRANGER, SUBNETS, UNDERLAY, VNI, VTEP_MACS},
    node_config,
    packet::{udp_frame, vxlan_frame},
};
use crate::dataplane::{AttachMode, GsoDecap};

/// Bytes of each bulk TCP transfer: enough for many GSO packets.
const BULK: usize = 10 << 20;

/// A TCP port no other test of this process uses.
fn next_port() -> u16 {
    static NEXT: AtomicU16 = AtomicU16::new(15000);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// The byte at position `i` of a transfer: not periodic at any power of two, so a dropped,
/// duplicated or reordered segment changes the digest.
fn pattern(i: usize) -> u8 {
    (i % 251) as u8
}

/// Sends [`BULK`] bytes over TCP from node `from` to node `to`'s flannel.1 address and checks
/// that every byte arrived intact.
fn tcp_bulk(net: &TestNet, from: usize, to: usize) -> Result<()> {
    let port = next_port();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = spawn_in(&net.nodes[to], move || {
        let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        ready_tx.send(()).ok();
        let (mut stream, _) = listener.accept()?;
        stream.set_read_timeout(Some(Duration::from_secs(20)))?;
        let mut buf = vec![0u8; 1 << 16];
        let (mut total, mut bad) = (0usize, 0usize);
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                break;
            }
            bad += buf[..n]
                .iter()
                .enumerate()
                .filter(|(i, b)| **b != pattern(total + i))
                .count();
            total += n;
        }
        Ok((total, bad))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the server did not start")?;
    let dst = SocketAddrV4::new(SUBNETS[to], port);
    let client = spawn_in(&net.nodes[from], move || {
        let mut stream = TcpStream::connect_timeout(&dst.into(), Duration::from_secs(5))?;
        stream.set_write_timeout(Some(Duration::from_secs(20)))?;
        let data: Vec<u8> = (0..BULK).map(pattern).collect();
        stream.write_all(&data)?;
        stream.shutdown(std::net::Shutdown::Write)?;
        Ok(())
    });
    client
        .join()
        .expect("no panic")
        .with_context(|| format!("TCP client on node {from}"))?;
    let (total, bad) = server
        .join()
        .expect("no panic")
        .with_context(|| format!("TCP server on node {to}"))?;
    ensure!(
        total == BULK && bad == 0,
        "node {to} received {total} bytes, {bad} wrong, of {BULK}"
    );
    Ok(())
}

/// Pings and bulk TCP in both directions between the two nodes.
pub fn both_ways(net: &TestNet) -> Result<()> {
    TestNet::ping(&net.nodes[0], SUBNETS[1], 3)?;
    TestNet::ping(&net.nodes[1], SUBNETS[0], 3)?;
    tcp_bulk(net, 0, 1)?;
    tcp_bulk(net, 1, 0)
}

#[test]
fn ebpf_on_both_nodes_carries_ping_and_bulk_tcp_both_ways() -> Result<()> {
    if !can_run_privileged("ebpf_on_both_nodes_carries_ping_and_bulk_tcp_both_ways") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let dps = [load_node(&net, 0, node_config(0))?, load_node(&net, 1, node_config(1))?];
    both_ways(&net)?;
    for (n, dp) in dps.iter().enumerate() {
        let c = dp.counters()?;
        // Shown with --nocapture: how much went through the programs and what was left to the
        // kernel (GRO/GSO aggregates, without GSO decapsulation).
        println!("node {n}: {:?}", c.iter().filter(|(_, v)| *v > 0).collect::<Vec<_>>());
        ensure!(c.get(Stat::EncapPackets) > 0, "node {n} encapsulated nothing: {c:?}");
        ensure!(
            c.get(Stat::EncapBytes) > BULK as u64,
            "node {n} encapsulated too few bytes: {c:?}"
        );
        ensure!(c.get(Stat::DecapPackets) > 0, "node {n} decapsulated nothing: {c:?}");
        ensure!(
            c.get(Stat::EncapDropWriteFailed) + c.get(Stat::DecapDropWriteFailed) == 0,
            "{c:?}"
        );
    }
    Ok(())
}

#[test]
fn forced_gso_decap_carries_bulk_tcp_both_ways() -> Result<()> {
    if !can_run_privileged("forced_gso_decap_carries_bulk_tcp_both_ways") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let config = |n| DatapathConfigExt::with_gso(node_config(n), GsoDecap::Force);
    let dps = [load_node(&net, 0, config(0))?, load_node(&net, 1, config(1))?];
    both_ways(&net)?;
    for (n, dp) in dps.iter().enumerate() {
        let c = dp.counters()?;
        ensure!(dp.gso_decap(), "GSO decapsulation is off on node {n}");
        // Every byte of the other node's transfer came through flannel_decap.
        ensure!(
            c.get(Stat::DecapBytes) > BULK as u64,
            "node {n} decapsulated too few bytes: {c:?}"
        );
    }
    Ok(())
}

/// Builder-style helpers on the datapath configuration, for the tests.
pub trait DatapathConfigExt {
    /// Sets `gso_decap`.
    fn with_gso(self, gso: GsoDecap) -> Self;
    /// Sets `attach`.
    fn with_attach(self, mode: AttachMode) -> Self;
}

impl DatapathConfigExt for crate::dataplane::DatapathConfig {
    fn with_gso(mut self, gso: GsoDecap) -> Self {
        self.gso_decap = gso;
        self
    }

    fn with_attach(mut self, mode: AttachMode) -> Self {
        self.attach = mode;
        self
    }
}

#[test]
fn ebpf_node_and_kernel_node_interoperate() -> Result<()> {
    if !can_run_privileged("ebpf_node_and_kernel_node_interoperate") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let dp = load_node(&net, 0, node_config(0))?;
    both_ways(&net)?;
    let c = dp.counters()?;
    ensure!(c.get(Stat::EncapPackets) > 0 && c.get(Stat::DecapPackets) > 0, "{c:?}");
    Ok(())
}

/// A VXLAN datagram for node A's flannel.1 carrying UDP to 10.244.1.0:`port`.
fn vxlan_payload_for_a(port: u16) -> Vec<u8> {
    let inner = udp_frame(
        VTEP_MACS[0],
        VTEP_MACS[1],
        (Ipv4Addr::new(10, 244, 2, 9), 9999),
        (SUBNETS[0], port),
        b"hello",
    );
    // Only the UDP payload of vxlan_frame: the sockets below add the outer headers.
    let frame = vxlan_frame(([0; 6], [0; 6]), (UNDERLAY[1], 0), (UNDERLAY[0], PORT), VNI, &inner);
    frame[42..].to_vec()
}

/// Sends a VXLAN datagram from `source` on node B to node A and says whether node A's stack
/// delivered the inner datagram.
fn vxlan_reaches_a(net: &TestNet, source: Ipv4Addr) -> Result<bool> {
    let port = next_port();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = spawn_in(&net.nodes[0], move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, port))?;
        socket.set_read_timeout(Some(Duration::from_millis(1500)))?;
        ready_tx.send(()).ok();
        let mut buf = [0u8; 64];
        Ok(matches!(socket.recv(&mut buf), Ok(5)))
    });
    ready_rx
        .recv_timeout(Duration::from_secs(5))
        .context("the receiver did not start")?;
    let payload = vxlan_payload_for_a(port);
    spawn_in(&net.nodes[1], move || {
        let socket = UdpSocket::bind(SocketAddrV4::new(source, 0))?;
        socket.send_to(&payload, SocketAddrV4::new(UNDERLAY[0], PORT))?;
        Ok(())
    })
    .join()
    .expect("no panic")?;
    receiver.join().expect("no panic")
}

#[test]
fn vxlan_from_an_address_that_is_no_vtep_is_dropped_and_counted() -> Result<()> {
    if !can_run_privileged("vxlan_from_an_address_that_is_no_vtep_is_dropped_and_counted") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    ip(&[
        "-n",
        &net.nodes[1],
        "addr",
        "add",
        &format!("{STRANGER}/24"),
        "dev",
        "eth0",
    ])?;
    // Upstream's datapath accepts VXLAN from anyone.
    ensure!(
        vxlan_reaches_a(&net, STRANGER)?,
        "the kernel path dropped the stranger's VXLAN"
    );
    let dp = load_node(&net, 0, node_config(0))?;
    ensure!(
        !vxlan_reaches_a(&net, STRANGER)?,
        "flannel_decap let the stranger's VXLAN through"
    );
    ensure!(
        dp.counters()?.get(Stat::DecapDropUnknownVtep) >= 1,
        "{:?}",
        dp.counters()?
    );
    ensure!(
        vxlan_reaches_a(&net, UNDERLAY[1])?,
        "flannel_decap dropped VXLAN from a known VTEP"
    );
    Ok(())
}

/// Pings node B's flannel.1 from the pod behind node A with DF and an IPv4 packet of `size`
/// bytes, `count` times; returns ping's output (it fails when replies are missing).
fn pod_ping_df(net: &TestNet, size: u32, count: u32) -> String {
    let pod = net.pod.as_deref().expect("a pod");
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            pod,
            "ping",
            "-M",
            "do",
            "-c",
            &count.to_string(),
            "-i",
            "0.2",
            "-W",
            "1",
        ])
        .args(["-s", &(size - 28).to_string(), &SUBNETS[1].to_string()])
        .output()
        .expect("ping runs");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn a_df_packet_one_byte_over_the_mtu_gets_frag_needed_back() -> Result<()> {
    if !can_run_privileged("a_df_packet_one_byte_over_the_mtu_gets_frag_needed_back") {
        return Ok(());
    }
    let net = TestNet::new(true)?;
    let dp = load_node(&net, 0, node_config(0))?;
    load_node(&net, 1, node_config(1)).map(drop)?;
    let pod = net.pod.clone().expect("a pod");
    // A pod link bigger than flannel.1 (a pod on a host-network-sized MTU), so the pod sends
    // what flannel.1 cannot take and node A has to answer.
    ip(&["-n", &net.nodes[0], "link", "set", "vp", "mtu", "1500"])?;
    ip(&["-n", &pod, "link", "set", "eth0", "mtu", "1500"])?;
    // flannel.1 has MTU 1450 (underlay - 50): 1450 bytes pass, 1451 are answered by node A's
    // forwarding path before they reach flannel.1.
    let fits = pod_ping_df(&net, 1450, 2);
    ensure!(
        fits.contains(" 0% packet loss"),
        "1450 bytes with DF did not pass:\n{fits}"
    );
    let over = pod_ping_df(&net, 1451, 2);
    ensure!(over.contains("mtu = 1450"), "no frag-needed for 1451 bytes:\n{over}");

    // An underlay route with a smaller, locked MTU than the device (a path MTU flannel did not
    // see): packets that fit flannel.1 now reach flannel_encap but do not fit once
    // encapsulated. It leaves them to the vxlan driver, which lowers the PMTU of the inner
    // route to 1450 - 50 (skb_tunnel_check_pmtu) and sends this one packet with its outer
    // header fragmented (the device is `df unset`). (An unlocked route MTU is not seen by
    // bpf_fib_lookup, which applies the forwarding rule of ip_mtu_from_fib_result.)
    let src = UNDERLAY[0].to_string();
    let route = [
        "route",
        "replace",
        "192.168.50.0/24",
        "dev",
        "eth0",
        "src",
        &src,
        "mtu",
        "lock",
        "1450",
    ];
    ip(&[&["-n", net.nodes[0].as_str()][..], &route[..]].concat())?;
    // Locally sent packets then meet the lowered PMTU: the sender gets EMSGSIZE / mtu=1400.
    let too_big = || dp.counters().map(|c| c.get(Stat::EncapPassTooBig));
    let before = too_big()?;
    let out = TestNet::exec(
        &net.nodes[0],
        &["sh", "-c", "ping -M do -c 3 -i 0.2 -W 1 -s 1373 10.244.2.0 2>&1; true"],
    )?;
    let local = String::from_utf8_lossy(&out.stdout);
    ensure!(local.contains("mtu=1400"), "node A did not learn the PMTU:\n{local}");
    ensure!(too_big()? > before, "flannel_encap did not count the too-big packet");
    // Forwarded packets do not use learned PMTUs (net.ipv4.ip_forward_use_pmtu = 0): the
    // driver fragments the outer packet each time, and the pod's packets arrive, exactly as
    // without flannel_encap.
    ip(&["-n", &net.nodes[0], "route", "flush", "cache"])?;
    let before = too_big()?;
    let forwarded = pod_ping_df(&net, 1401, 2);
    ensure!(
        forwarded.contains(" 0% packet loss"),
        "the pod's 1401 bytes did not arrive:\n{forwarded}"
    );
    ensure!(
        too_big()? >= before + 2,
        "flannel_encap did not pass the pod's packets on as too big"
    );
    Ok(())
}

/// Single-stream TCP throughput (iperf3, node A to node B's flannel.1 address) for the
/// kernel datapath and the eBPF one with and without GSO decapsulation; interleaved rounds,
/// medians printed. Not a pass/fail test: `cargo test -p flannel-agent --lib -- --ignored
/// --nocapture datapath_throughput`.
#[test]
#[ignore = "a measurement, ~1 min"]
fn datapath_throughput() -> Result<()> {
    if !can_run_privileged("datapath_throughput") {
        return Ok(());
    }
    let modes = ["kernel", "ebpf (gso decap auto)", "ebpf (gso decap forced)"];
    let nets = [TestNet::new(false)?, TestNet::new(false)?, TestNet::new(false)?];
    let mut dps = Vec::new();
    for n in 0..2 {
        dps.push(load_node(&nets[1], n, node_config(n))?);
        dps.push(load_node(&nets[2], n, node_config(n).with_gso(GsoDecap::Force))?);
    }
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for _round in 0..5 {
        for (i, net) in nets.iter().enumerate() {
            // A one-shot server per run (`-1`), given a second to listen.
            let mut server = Command::new("ip")
                .args(["netns", "exec", &net.nodes[1], "iperf3", "-s", "-1"])
                .stdout(Stdio::null())
                .spawn()?;
            thread::sleep(Duration::from_secs(1));
            let dst = SUBNETS[1].to_string();
            let out = TestNet::exec(&net.nodes[0], &["iperf3", "-c", &dst, "-t", "4", "-J"]);
            server.kill().ok();
            server.wait()?;
            let out = out?;
            let json: serde_json::Value = serde_json::from_slice(&out.stdout)?;
            let bps = json["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .with_context(|| format!("no iperf3 result: {json}"))?;
            results[i].push(bps / 1e9);
        }
    }
    for (mode, mut values) in modes.iter().zip(results) {
        values.sort_by(f64::total_cmp);
        println!("{mode}: median {:.2} Gbit/s ({values:.2?})", values[values.len() / 2]);
    }
    Ok(())
}
