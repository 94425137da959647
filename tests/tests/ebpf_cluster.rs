//! Privileged tests of the eBPF vxlan datapath with the real flanneld on a testbed cluster:
//! full connectivity (ICMP, TCP bulk with GSO, UDP) with `Datapath: ebpf`; a mixed cluster of
//! an eBPF node, a kernel-datapath node and a node set up by hand as upstream would; the
//! pinned maps as bpftool shows them; counters that move with traffic; `auto` falling back
//! with its log line; `flannelctl status`, `peers` and `uninstall`; and a UDP flow that loses
//! no packet while the agents on both ends are killed with SIGKILL and restarted.
//!
//! They need root; outside CI they skip loudly without it. Build the binaries first
//! (`cargo build -p flannel-agent --bins`). `--nocapture` shows matrices and outputs.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use flannel_agent::dataplane::{pinned_counters, pinned_vteps};
use flannel_tests::testbed::netns::{self, in_netns};
use flannel_tests::testbed::probe::{self, http_get};
use flannel_tests::testbed::{flanneld_path, require_root, wait_for, Pod, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};
use ipnet::Ipv4Net;
use serde_json::Value;

/// Bound on an agent becoming ready.
const READY: Duration = Duration::from_secs(20);
/// Bound on a change reaching the datapath of other nodes.
const CONVERGE: Duration = Duration::from_secs(10);

const EBPF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf"}}"#;
const KERNEL: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"kernel"}}"#;
const AUTO: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"Auto"}}"#;

/// `flannelctl`, beside `flanneld`.
fn flannelctl_path() -> anyhow::Result<PathBuf> {
    let path = flanneld_path()?.with_file_name("flannelctl");
    ensure!(
        path.is_file(),
        "{} missing: cargo build -p flannel-agent --bins",
        path.display()
    );
    Ok(path)
}

/// Runs `flannelctl args...` inside node `number`'s namespace; returns the whole output.
async fn flannelctl(tb: &Testbed, number: usize, args: &[&str]) -> anyhow::Result<Output> {
    let ctl = flannelctl_path()?;
    let ctl = ctl.to_str().context("path")?;
    let mut full = vec!["netns", "exec", tb.node(number).netns.as_str(), ctl];
    full.extend_from_slice(args);
    netns::output("ip", &full, None, Duration::from_secs(10)).await
}

/// `flannelctl --json args...` on node `number`, parsed; fails unless it exits with `code`.
async fn flannelctl_json(tb: &Testbed, number: usize, args: &[&str], code: i32) -> anyhow::Result<Value> {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = flannelctl(tb, number, &full).await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(code),
        "flannelctl {args:?} exited {:?}, expected {code}:\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(&stdout).with_context(|| format!("flannelctl {args:?} printed no JSON: {stdout}"))
}

/// The eBPF counters of node `number`, from its pinned FLANNEL_STATS.
fn counters(tb: &mut Testbed, number: usize) -> anyhow::Result<(u64, u64, u64)> {
    let c = pinned_counters(&tb.bpf_pin_dir(number)?)?;
    let get = |name: &str| c.iter().find(|(stat, _)| stat.name() == name).map_or(0, |(_, v)| v);
    Ok((
        get("encap_packets"),
        get("encap_bytes"),
        get("decap_packets") + get("decap_pass_kernel"),
    ))
}

/// Sends `bytes` over one TCP connection from `from` to `to` and checks they all arrive
/// intact (big writes, so the stack hands GSO super-packets to flannel.1).
async fn tcp_bulk(from: &Pod, to: &Pod, bytes: usize) -> anyhow::Result<Duration> {
    let dst = to.ip();
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = in_netns(&to.netns, Duration::from_secs(20), move || {
        let listener = TcpListener::bind((dst, 0))?;
        let _ = port_tx.send(listener.local_addr()?.port());
        let (mut conn, _) = listener.accept()?;
        conn.set_read_timeout(Some(Duration::from_secs(5)))?;
        let (mut total, mut sum, mut buf) = (0usize, 0u64, vec![0u8; 256 * 1024]);
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok((total, sum));
            }
            sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
            total += n;
        }
    });
    let client = async {
        let port = port_rx.await.context("no listener")?;
        in_netns(&from.netns, Duration::from_secs(20), move || {
            let started = Instant::now();
            let mut conn = TcpStream::connect_timeout(&SocketAddr::new(dst, port), Duration::from_secs(3))?;
            conn.set_write_timeout(Some(Duration::from_secs(5)))?;
            let chunk: Vec<u8> = (0..256 * 1024).map(|i| (i % 251) as u8).collect();
            let (mut sent, mut sum) = (0usize, 0u64);
            while sent < bytes {
                let n = chunk.len().min(bytes - sent);
                conn.write_all(&chunk[..n])?;
                sum = chunk[..n].iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
                sent += n;
            }
            drop(conn);
            Ok((sum, started.elapsed()))
        })
        .await
    };
    let (client, server) = tokio::join!(client, server);
    let ((sent_sum, took), (got, got_sum)) = (client?, server?);
    ensure!(
        got == bytes && got_sum == sent_sum,
        "TCP bulk: {got} of {bytes} bytes arrived (checksums {got_sum} vs {sent_sum})"
    );
    Ok(took)
}

/// 50 UDP datagrams from `from` to an echo in `to`, every one must come back.
async fn udp_echo(from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let dst = to.ip();
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = in_netns(&to.netns, Duration::from_secs(10), move || {
        let sock = UdpSocket::bind((dst, 0))?;
        let _ = port_tx.send(sock.local_addr()?.port());
        sock.set_read_timeout(Some(Duration::from_secs(3)))?;
        let mut buf = [0u8; 2048];
        for _ in 0..50 {
            let (n, peer) = sock.recv_from(&mut buf)?;
            sock.send_to(&buf[..n], peer)?;
        }
        Ok(())
    });
    let client = async {
        let port = port_rx.await.context("no UDP echo")?;
        in_netns(&from.netns, Duration::from_secs(10), move || {
            let sock = UdpSocket::bind(("0.0.0.0", 0))?;
            sock.connect((dst, port))?;
            sock.set_read_timeout(Some(Duration::from_secs(3)))?;
            let mut buf = [0u8; 2048];
            for i in 0..50u32 {
                let msg = [i.to_be_bytes().as_slice(), &[7u8; 1000]].concat();
                sock.send(&msg)?;
                let n = sock.recv(&mut buf)?;
                ensure!(buf[..n] == msg[..], "datagram {i} came back different");
            }
            Ok(())
        })
        .await
    };
    let (c, s) = tokio::join!(client, server);
    c.and(s)
}

/// The flannelctl peers rows, checked to be in sync with `expected` leases.
fn check_peers(value: &Value, expected: usize) -> anyhow::Result<()> {
    let rows = value["peers"].as_array().context("no peers")?;
    ensure!(value["drift"] == 0, "drift: {value:#}");
    ensure!(
        rows.len() == expected,
        "{} rows, expected {expected}: {value:#}",
        rows.len()
    );
    ensure!(rows.iter().all(|r| r["state"] == "ok"), "not all ok: {value:#}");
    Ok(())
}

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
async fn put_config(tb: &Testbed, conf: &str) -> anyhow::Result<()> {
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
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(AUTO)).await?;
    println!("testbed up after {:?}", started.elapsed());
    tb.start_agents(&[2], &[], READY).await?;
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

/// A paced UDP flow with sequence numbers: how many were sent and which arrived.
struct Flow {
    stop: Arc<AtomicBool>,
    sender: tokio::task::JoinHandle<anyhow::Result<u64>>,
    receiver: tokio::task::JoinHandle<anyhow::Result<Vec<bool>>>,
}

const FLOW_PPS: u64 = 1000;
const FLOW_MAX: usize = 60_000;

fn start_flow(from: &Pod, to: &Pod) -> Flow {
    let stop = Arc::new(AtomicBool::new(false));
    let dst = to.ipv4().expect("IPv4 pod");
    let port = 40_000;
    let (rstop, sstop) = (stop.clone(), stop.clone());
    let (to_ns, from_ns) = (to.netns.clone(), from.netns.clone());
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let receiver = tokio::spawn(async move {
        in_netns(&to_ns, Duration::from_secs(60), move || {
            let sock = UdpSocket::bind((dst, port))?;
            let _ = ready_tx.send(());
            sock.set_read_timeout(Some(Duration::from_millis(200)))?;
            let mut seen = vec![false; FLOW_MAX];
            let mut buf = [0u8; 256];
            let mut idle_after_stop = 0;
            loop {
                match sock.recv(&mut buf) {
                    Ok(n) if n >= 8 => {
                        let seq = u64::from_be_bytes(buf[..8].try_into()?) as usize;
                        if seq < FLOW_MAX {
                            seen[seq] = true;
                        }
                    }
                    Ok(_) => {}
                    Err(_) if rstop.load(Ordering::Relaxed) => {
                        idle_after_stop += 1;
                        if idle_after_stop >= 3 {
                            return Ok(seen);
                        }
                    }
                    Err(_) => {}
                }
            }
        })
        .await
    });
    let sender = tokio::spawn(async move {
        let _ = tokio::task::spawn_blocking(move || ready_rx.recv_timeout(Duration::from_secs(5))).await;
        in_netns(&from_ns, Duration::from_secs(60), move || {
            let sock = UdpSocket::bind(("0.0.0.0", 0))?;
            sock.connect(SocketAddr::new(IpAddr::V4(dst), port))?;
            let start = Instant::now();
            let mut seq = 0u64;
            while !sstop.load(Ordering::Relaxed) && (seq as usize) < FLOW_MAX {
                let due = start + Duration::from_micros(seq * 1_000_000 / FLOW_PPS);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                let mut msg = [0u8; 64];
                msg[..8].copy_from_slice(&seq.to_be_bytes());
                sock.send(&msg)?;
                seq += 1;
            }
            Ok(seq)
        })
        .await
    });
    Flow { stop, sender, receiver }
}

/// The sequence numbers below `sent` that never arrived, as ranges.
fn gaps(seen: &[bool], sent: u64) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = Vec::new();
    for (i, ok) in seen.iter().take(sent as usize).enumerate() {
        if !ok {
            match out.last_mut() {
                Some(last) if last.1 + 1 == i => last.1 = i,
                _ => out.push((i, i)),
            }
        }
    }
    out
}

async fn kill_and_restart(tb: &mut Testbed, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    tb.kill_agent(n)?;
    tb.restart_agent(n).await?;
    tb.wait_ready(n, READY).await?;
    Ok(t.elapsed())
}

fn vtep_count(dir: &Path) -> usize {
    pinned_vteps(dir).map(|v| v.len()).unwrap_or(0)
}

#[tokio::test]
async fn kill_9_and_restart_loses_no_packet() -> anyhow::Result<()> {
    if !require_root("kill_9_and_restart_loses_no_packet") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(EBPF)).await?;
    tb.start_agents(&[1, 2], &[], READY).await?;
    let a = tb.add_pod(1, "sender").await?;
    let b = tb.add_pod(2, "receiver").await?;
    ensure!(probe::ping(&a.netns, b.ip()).await, "no path before the flow");
    for n in 1..=2 {
        let dir = tb.bpf_pin_dir(n)?;
        ensure!(vtep_count(&dir) == 1, "node {n} has no VTEP in its map");
    }
    let (before1, before2) = (counters(&mut tb, 1)?, counters(&mut tb, 2)?);
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
    ensure!(
        after1.0 - before1.0 >= sent,
        "the flow was not encapsulated in BPF on node 1: {before1:?} -> {after1:?}"
    );
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
