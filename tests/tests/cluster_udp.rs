//! Privileged tests of the `udp` backend on a testbed cluster:
//! - three flannel-rs nodes: ICMP, TCP (echo and a bulk transfer) and UDP between every pod;
//! - interop with a scripted peer speaking upstream's wire format (the raw inner IPv4
//!   packet as the UDP payload, port 8285, a lease with no BackendType), both directions;
//! - spoofed datagrams (from a non-peer, from a peer's address with another port, and from a
//!   peer with an inner source outside its subnet) are dropped and counted;
//! - random datagrams from a peer and a non-peer: the agent survives, counts them, keeps its
//!   memory and fds, and still forwards.
//!
//! They need root; outside CI they skip loudly without it. Build flanneld first.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use flannel_tests::testbed::netns::{in_netns, in_netns_blocking};
use flannel_tests::testbed::probe::{http_get, ping};
use flannel_tests::testbed::{require_root, wait_for, Pod, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};
use ipnet::Ipv4Net;
use rand::{Rng, RngCore};
use serde_json::Value;

const READY: Duration = Duration::from_secs(20);
const CONVERGE: Duration = Duration::from_secs(10);
const UDP: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"udp"}}"#;
/// Keeps the agents' subnets away from the scripted peer's.
const UDP_FAKE: &str = r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.100.0","Backend":{"Type":"udp"}}"#;
const PORT: u16 = 8285;
/// The scripted peer's subnet and the address it answers for.
const FAKE_SUBNET: &str = "10.244.200.0/24";
const FAKE_HOST: Ipv4Addr = Ipv4Addr::new(10, 244, 200, 5);

/// GET `path` on node `n`'s healthz server, parsed as JSON.
async fn healthz_json(tb: &Testbed, n: usize, path: &str) -> anyhow::Result<Value> {
    let node = tb.node(n);
    let (code, body) = http_get(&node.netns, SocketAddr::new(node.ip.into(), AGENT_HEALTHZ_PORT), path).await?;
    ensure!(code == 200, "{path} on node {n}: HTTP {code}: {body}");
    serde_json::from_str(&body).with_context(|| format!("{path}: {body}"))
}

/// Node `n`'s udp counters from `/status/datapath`.
async fn counters(tb: &Testbed, n: usize) -> anyhow::Result<Value> {
    let v = healthz_json(tb, n, "/status/datapath").await?;
    v.get("counters").cloned().with_context(|| format!("no counters: {v}"))
}

fn count(c: &Value, path: &str) -> u64 {
    c.pointer(path).and_then(Value::as_u64).unwrap_or(0)
}

/// The Internet checksum.
fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An IPv4 packet with a valid header checksum.
fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, ttl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut p = vec![0u8; 20];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    p[8] = ttl;
    p[9] = proto;
    p[12..16].copy_from_slice(&src.octets());
    p[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&p);
    p[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(payload);
    p
}

/// An ICMP echo (request: type 8, reply: type 0) with its checksum.
fn icmp_echo(kind: u8, id: u16, seq: u16, data: &[u8]) -> Vec<u8> {
    let mut m = vec![kind, 0, 0, 0];
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(&seq.to_be_bytes());
    m.extend_from_slice(data);
    let c = checksum(&m);
    m[2..4].copy_from_slice(&c.to_be_bytes());
    m
}

/// What the scripted peer saw: every inner packet, with its TTL as received.
type Seen = Arc<Mutex<Vec<Vec<u8>>>>;

/// A UDP socket bound to `addr` inside `netns` (a socket stays in the namespace it was
/// made in, whichever thread uses it).
fn bind_in(netns: &str, addr: SocketAddrV4) -> anyhow::Result<UdpSocket> {
    in_netns_blocking(netns, move || Ok(UdpSocket::bind(addr)?))
}

/// A scripted upstream udp node on `sock` (bound to its `PublicIP:8285`): records every
/// datagram and answers ICMP echo requests to [`FAKE_HOST`] with echo replies, as a host
/// behind an upstream node would. Stops when `stop` is set.
fn spawn_scripted_peer(sock: UdpSocket, stop: Arc<AtomicBool>, seen: Seen) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let _ = sock.set_read_timeout(Some(Duration::from_millis(50)));
        let mut buf = [0u8; 65536];
        while !stop.load(Ordering::Relaxed) {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                continue;
            };
            let pkt = &buf[..n];
            seen.lock().unwrap().push(pkt.to_vec());
            if n >= 28 && pkt[0] == 0x45 && pkt[9] == 1 && pkt[20] == 8 && pkt[16..20] == FAKE_HOST.octets() {
                let src = Ipv4Addr::new(pkt[12], pkt[13], pkt[14], pkt[15]);
                let id = u16::from_be_bytes([pkt[24], pkt[25]]);
                let seq = u16::from_be_bytes([pkt[26], pkt[27]]);
                let reply = ipv4(FAKE_HOST, src, 64, 1, &icmp_echo(0, id, seq, &pkt[28..]));
                let _ = sock.send_to(&reply, from);
            }
        }
    })
}

/// Sends `datagrams` from `from:src_port` (inside `netns`) to `to:8285`.
async fn send_from(
    netns: &str,
    from: Ipv4Addr,
    src_port: u16,
    to: Ipv4Addr,
    datagrams: Vec<Vec<u8>>,
) -> anyhow::Result<()> {
    in_netns(netns, Duration::from_secs(30), move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(from, src_port))?;
        for d in &datagrams {
            sock.send_to(d, SocketAddrV4::new(to, PORT))?;
        }
        Ok(())
    })
    .await
}

/// A UDP echo from `from` to `to` (a few tries: UDP has no retransmission).
async fn udp_echo(from: &Pod, to: &Pod) -> anyhow::Result<()> {
    let dst = to.ipv4().context("no IPv4")?;
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = in_netns(&to.netns, Duration::from_secs(10), move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(dst, 0))?;
        let _ = port_tx.send(sock.local_addr()?.port());
        sock.set_read_timeout(Some(Duration::from_secs(5)))?;
        let mut buf = [0u8; 2048];
        let (n, peer) = sock.recv_from(&mut buf).context("no datagram arrived")?;
        sock.send_to(&buf[..n], peer)?;
        Ok(())
    });
    let client = async {
        let port = port_rx.await.context("server not set up")?;
        in_netns(&from.netns, Duration::from_secs(10), move || {
            let sock = UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_millis(500)))?;
            let msg = [0x5au8; 1200];
            let mut buf = [0u8; 2048];
            for _ in 0..8 {
                sock.send_to(&msg, SocketAddrV4::new(dst, port))?;
                if let Ok((n, _)) = sock.recv_from(&mut buf) {
                    ensure!(buf[..n] == msg[..], "echo differs");
                    return Ok(());
                }
            }
            anyhow::bail!("no echo from {dst}:{port}")
        })
        .await
    };
    let (c, s) = tokio::join!(client, server);
    c.and(s).with_context(|| format!("UDP {} -> {}", from.name, to.name))
}

/// Sends `bytes` over one TCP connection from `from` to `to` and checks they all arrive.
async fn tcp_bulk(from: &Pod, to: &Pod, bytes: usize) -> anyhow::Result<Duration> {
    let dst = to.ipv4().context("no IPv4")?;
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = in_netns(&to.netns, Duration::from_secs(60), move || {
        let l = TcpListener::bind(SocketAddrV4::new(dst, 0))?;
        let _ = port_tx.send(l.local_addr()?.port());
        let (mut c, _) = l.accept()?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut got = 0usize;
        let mut sum = 0u64;
        let mut buf = vec![0u8; 65536];
        loop {
            let n = c.read(&mut buf)?;
            if n == 0 {
                break;
            }
            sum = buf[..n].iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
            got += n;
        }
        Ok((got, sum))
    });
    let client = async {
        let port = port_rx.await.context("server not set up")?;
        in_netns(&from.netns, Duration::from_secs(60), move || {
            let t0 = Instant::now();
            let mut c = TcpStream::connect_timeout(&SocketAddr::new(dst.into(), port), Duration::from_secs(5))?;
            let chunk: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
            let mut sent = 0usize;
            let mut sum = 0u64;
            while sent < bytes {
                let n = chunk.len().min(bytes - sent);
                c.write_all(&chunk[..n])?;
                sum = chunk[..n].iter().fold(sum, |s, b| s.wrapping_add(u64::from(*b)));
                sent += n;
            }
            c.shutdown(std::net::Shutdown::Write)?;
            Ok((sum, t0))
        })
        .await
    };
    let (c, s) = tokio::join!(client, server);
    let ((sent_sum, t0), (got, got_sum)) = (c?, s?);
    ensure!(
        got == bytes && got_sum == sent_sum,
        "received {got} of {bytes} bytes (checksum match: {})",
        got_sum == sent_sum
    );
    Ok(t0.elapsed())
}

#[tokio::test]
async fn udp_three_nodes_full_matrix_icmp_tcp_udp() -> anyhow::Result<()> {
    if !require_root("udp_three_nodes_full_matrix_icmp_tcp_udp") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(UDP)).await?;
    tb.start_agents(&[1, 2, 3], &["--ip-masq"], READY).await?;
    // Upstream's udp lease: no BackendType, no BackendData.
    for n in 1..=3 {
        let lease = tb.node_lease(n).await?;
        let raw = tb.etcd().context("etcd")?.get(&lease.key).await?;
        assert_eq!(
            raw.as_deref(),
            Some(format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, tb.node(n).ip).as_str())
        );
        let link = tb.link_details(n, "flannel0").await?;
        assert_eq!(link["mtu"], 1500 - 28, "node {n}: {link}");
        assert_eq!(link["txqlen"], 10_000, "node {n}: {link}");
        let routes = tb.flannel_routes(n, false).await?;
        ensure!(
            routes.len() == 1
                && routes[0].dst.to_string() == "10.244.0.0/16"
                && routes[0].dev.as_deref() == Some("flannel0"),
            "node {n}: expected one route 10.244.0.0/16 dev flannel0: {routes:?}"
        );
        let env = tb.read_subnet_env(n)?;
        ensure!(env.contains("FLANNEL_MTU=1472"), "node {n}: {env}");
    }
    let mut pods = Vec::new();
    for node in 1..=3 {
        for i in 1..=2 {
            pods.push(tb.add_pod(node, &format!("u{node}-{i}")).await?);
        }
    }
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("udp backend, ICMP and TCP:\n{matrix}");
    matrix.assert_full();
    for a in &pods {
        for b in pods.iter().filter(|b| b.node != a.node) {
            udp_echo(a, b).await?;
        }
    }
    let bulk = 32 << 20;
    let took = tcp_bulk(&pods[0], &pods[2], bulk).await?;
    println!(
        "udp backend: TCP bulk {} MiB node 1 -> node 2 in {took:?} ({:.0} Mbit/s, debug build, not a benchmark)",
        bulk >> 20,
        bulk as f64 * 8.0 / took.as_secs_f64() / 1e6
    );
    let c = counters(&tb, 1).await?;
    println!("node 1 counters: {c}");
    ensure!(
        count(&c, "/encap_packets") > 1000 && count(&c, "/decap_packets") > 100,
        "{c}"
    );
    for reason in ["not_a_peer", "foreign_source", "malformed", "ttl_expired"] {
        assert_eq!(count(&c, &format!("/drops/{reason}")), 0, "{reason}: {c}");
    }
    // The same counters are on /metrics.
    let node = tb.node(1);
    let (_, metrics) = http_get(
        &node.netns,
        SocketAddr::new(node.ip.into(), AGENT_HEALTHZ_PORT),
        "/metrics",
    )
    .await?;
    ensure!(
        metrics.contains("flannel_udp_packets_total{direction=\"encap\"}"),
        "{metrics}"
    );
    tb.shutdown().await
}

/// Node 1 runs flannel-rs (udp); node 2 is a scripted upstream udp node (its lease written
/// as upstream writes it); node 3 runs nothing and is no peer.
struct ScriptedCluster {
    tb: Testbed,
    /// A pod on node 1.
    pod: Pod,
    /// The scripted peer's socket (`198.18.0.2:8285`), for sending as the peer.
    sock: UdpSocket,
    stop: Arc<AtomicBool>,
    seen: Seen,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ScriptedCluster {
    async fn start() -> anyhow::Result<Self> {
        let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(UDP_FAKE)).await?;
        let fake: Ipv4Net = FAKE_SUBNET.parse()?;
        let value = format!(r#"{{"PublicIP":"{}","PublicIPv6":null}}"#, tb.node(2).ip);
        tb.put_lease(fake, None, &value, Some(3600)).await?;
        let sock = bind_in(&tb.node(2).netns, SocketAddrV4::new(tb.node(2).ip, PORT))?;
        let stop = Arc::new(AtomicBool::new(false));
        let seen: Seen = Arc::default();
        let thread = spawn_scripted_peer(sock.try_clone()?, stop.clone(), seen.clone());
        tb.start_agents(&[1], &["--ip-masq"], READY).await?;
        let pod = tb.add_pod(1, "a").await?;
        Ok(ScriptedCluster {
            tb,
            pod,
            sock,
            stop,
            seen,
            thread: Some(thread),
        })
    }

    fn pod_ip(&self) -> Ipv4Addr {
        self.pod.ipv4().unwrap_or(Ipv4Addr::UNSPECIFIED)
    }

    /// Sends datagrams as the scripted peer, from `198.18.0.2:8285`.
    fn send_as_peer(&self, datagrams: &[Vec<u8>]) -> anyhow::Result<()> {
        let to = SocketAddrV4::new(self.tb.node(1).ip, PORT);
        for d in datagrams {
            self.sock.send_to(d, to)?;
        }
        Ok(())
    }

    /// Waits until the scripted peer saw a packet matching `f`.
    async fn wait_seen(&self, what: &str, f: impl Fn(&[u8]) -> bool) -> anyhow::Result<Vec<u8>> {
        let deadline = Instant::now() + CONVERGE;
        loop {
            if let Some(p) = self.seen.lock().unwrap().iter().find(|p| f(p)) {
                return Ok(p.clone());
            }
            ensure!(Instant::now() < deadline, "the scripted peer never saw {what}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Pings through both directions: the pod to the host behind the peer, and the peer's
    /// host to the pod (the reply must come back).
    async fn check_both_ways(&self, seq: u16) -> anyhow::Result<()> {
        ensure!(
            ping(&self.pod.netns, FAKE_HOST.into()).await,
            "pod on node 1 cannot ping {FAKE_HOST} behind the upstream peer"
        );
        let pod_ip = self.pod_ip();
        let request = ipv4(FAKE_HOST, pod_ip, 64, 1, &icmp_echo(8, 0x4242, seq, b"from upstream"));
        self.send_as_peer(&[request])?;
        self.wait_seen("the pod's echo reply", |p| {
            p.len() >= 28
                && p[9] == 1
                && p[20] == 0
                && p[12..16] == pod_ip.octets()
                && p[16..20] == FAKE_HOST.octets()
                && u16::from_be_bytes([p[26], p[27]]) == seq
        })
        .await
        .map(|_| ())
    }

    async fn shutdown(mut self) -> anyhow::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.tb.shutdown().await
    }
}

#[tokio::test]
async fn udp_interop_with_upstream_wire_format_both_ways() -> anyhow::Result<()> {
    if !require_root("udp_interop_with_upstream_wire_format_both_ways") {
        return Ok(());
    }
    let c = ScriptedCluster::start().await?;
    c.check_both_ways(1).await?;
    let pod_ip = c.pod_ip();
    // What flannel-rs sent: the raw inner IPv4 packet as the whole payload, TTL 64 less the
    // node's forwarding and the proxy's decrement, the header checksum still valid.
    let req = c
        .wait_seen("the pod's echo request", |p| {
            p.len() >= 28 && p[9] == 1 && p[20] == 8 && p[12..16] == pod_ip.octets()
        })
        .await?;
    assert_eq!(req[0], 0x45);
    assert_eq!(usize::from(u16::from_be_bytes([req[2], req[3]])), req.len());
    assert_eq!(req[8], 62, "inner TTL");
    assert_eq!(checksum(&req[..20]), 0, "inner header checksum");
    // The reply to the peer's request: the pod's 64, less the node's forwarding and the proxy.
    let reply = c
        .wait_seen("the pod's echo reply", |p| {
            p.len() >= 28 && p[20] == 0 && p[12..16] == pod_ip.octets()
        })
        .await?;
    assert_eq!(reply[8], 62, "reply TTL");
    // A host behind the peer that no lease holds gets ICMP net unreachable.
    let counters_before = counters(&c.tb, 1).await?;
    ensure!(
        !flannel_tests::testbed::probe::ping_attempts(&c.pod.netns, IpAddr::V4(Ipv4Addr::new(10, 244, 201, 1)), 1)
            .await,
        "10.244.201.1 has no peer and must not answer"
    );
    let after = counters(&c.tb, 1).await?;
    ensure!(
        count(&after, "/drops/no_route") > count(&counters_before, "/drops/no_route"),
        "{after}"
    );
    c.shutdown().await
}

/// A burst of same-sized packets leaves as segmented sends (`UDP_SEGMENT`): the upstream peer
/// must still get one datagram per inner packet, each exactly that packet.
#[tokio::test]
async fn udp_burst_reaches_upstream_peer_one_packet_per_datagram() -> anyhow::Result<()> {
    if !require_root("udp_burst_reaches_upstream_peer_one_packet_per_datagram") {
        return Ok(());
    }
    const BURST: usize = 64;
    const PAYLOAD: usize = 1000;
    let c = ScriptedCluster::start().await?;
    c.check_both_ways(1).await?;
    let pod_ip = c.pod_ip();
    in_netns(&c.pod.netns, CONVERGE, move || {
        let sock = UdpSocket::bind(SocketAddrV4::new(pod_ip, 0))?;
        for i in 0..BURST {
            let mut d = vec![0xa5u8; PAYLOAD];
            d[..2].copy_from_slice(&(i as u16).to_be_bytes());
            sock.send_to(&d, SocketAddrV4::new(FAKE_HOST, 9))?;
        }
        Ok(())
    })
    .await?;
    let ours =
        |p: &Vec<u8>| p.len() >= 28 && p[9] == 17 && p[12..16] == pod_ip.octets() && p[16..20] == FAKE_HOST.octets();
    wait_for("the whole burst at the upstream peer", CONVERGE, || async {
        let n = c.seen.lock().unwrap().iter().filter(|p| ours(p)).count();
        ensure!(n >= BURST, "{n} of {BURST} datagrams so far");
        Ok(())
    })
    .await?;
    let seen: Vec<Vec<u8>> = c.seen.lock().unwrap().iter().filter(|p| ours(p)).cloned().collect();
    let mut numbers: Vec<u16> = Vec::new();
    for p in &seen {
        assert_eq!(p.len(), 20 + 8 + PAYLOAD, "one inner packet per datagram");
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), p.len());
        assert_eq!(checksum(&p[..20]), 0, "inner header checksum");
        assert!(p[30..].iter().all(|&b| b == 0xa5));
        numbers.push(u16::from_be_bytes([p[28], p[29]]));
    }
    numbers.sort_unstable();
    assert_eq!(numbers, (0..BURST as u16).collect::<Vec<_>>());
    c.shutdown().await
}

#[tokio::test]
async fn udp_spoofed_datagrams_are_dropped_and_counted() -> anyhow::Result<()> {
    if !require_root("udp_spoofed_datagrams_are_dropped_and_counted") {
        return Ok(());
    }
    let c = ScriptedCluster::start().await?;
    c.check_both_ways(1).await?;
    let pod_ip = c.pod_ip();
    let before = counters(&c.tb, 1).await?;
    // A valid echo request for the pod, from the peer's subnet, sent by node 3 (no peer).
    let good = ipv4(FAKE_HOST, pod_ip, 64, 1, &icmp_echo(8, 0x5151, 7, b"spoof"));
    let n3 = c.tb.node(3).clone();
    send_from(&n3.netns, n3.ip, PORT, c.tb.node(1).ip, vec![good.clone(); 5]).await?;
    // The same from the peer's address but another port.
    let n2 = c.tb.node(2).clone();
    send_from(&n2.netns, n2.ip, 40000, c.tb.node(1).ip, vec![good.clone(); 3]).await?;
    // From the peer, with an inner source outside its subnet.
    let foreign = ipv4(
        Ipv4Addr::new(10, 244, 77, 7),
        pod_ip,
        64,
        1,
        &icmp_echo(8, 0x5151, 8, b"spoof"),
    );
    c.send_as_peer(&vec![foreign; 4])?;
    wait_for("the drops to be counted", CONVERGE, || async {
        let after = counters(&c.tb, 1).await?;
        ensure!(
            count(&after, "/drops/not_a_peer") - count(&before, "/drops/not_a_peer") == 8
                && count(&after, "/drops/foreign_source") - count(&before, "/drops/foreign_source") == 4,
            "{after}"
        );
        Ok(())
    })
    .await?;
    let after = counters(&c.tb, 1).await?;
    assert_eq!(
        count(&after, "/decap_packets"),
        count(&before, "/decap_packets"),
        "{after}"
    );
    // None of them reached the pod: it would have answered the echo requests.
    tokio::time::sleep(Duration::from_millis(300)).await;
    ensure!(
        !c.seen
            .lock()
            .unwrap()
            .iter()
            .any(|p| p.len() >= 28 && p[20] == 0 && p[24..26] == [0x51, 0x51]),
        "a spoofed echo request was answered"
    );
    let text = flannelctl_status(&c.tb, 1).await?;
    ensure!(text.contains("not_a_peer") && text.contains("foreign_source"), "{text}");
    c.shutdown().await
}

/// `flannelctl status` run in node `n`.
async fn flannelctl_status(tb: &Testbed, n: usize) -> anyhow::Result<String> {
    let bin = flannel_tests::testbed::flanneld_path()?.with_file_name("flannelctl");
    let node = tb.node(n);
    let healthz = format!("--healthz={}:{AGENT_HEALTHZ_PORT}", node.ip);
    tb.exec(
        &node.netns,
        &bin.display().to_string(),
        &["status", &healthz],
        Duration::from_secs(10),
    )
    .await
}

/// The agent's resident memory (kB) and open fds.
fn rss_and_fds(pid: u32) -> anyhow::Result<(u64, usize)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .context("no VmRSS")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    Ok((rss, fds))
}

/// Random datagrams: random lengths and bytes, half of them with a plausible IPv4 header
/// from the peer's subnet (so the deeper checks run too).
fn fuzz_datagrams(n: usize, pod_ip: Ipv4Addr) -> Vec<Vec<u8>> {
    let mut rng = rand::thread_rng();
    (0..n)
        .map(|i| {
            let len = match i % 4 {
                0 => rng.gen_range(0..20),
                1 => rng.gen_range(20..100),
                _ => rng.gen_range(100..2000),
            };
            let mut d = vec![0u8; len];
            rng.fill_bytes(&mut d);
            if i % 2 == 0 && len >= 20 {
                d[0] = 0x45;
                let total: u16 = if rng.gen_bool(0.5) { len as u16 } else { rng.gen() };
                d[2..4].copy_from_slice(&total.to_be_bytes());
                d[8] = rng.gen_range(0..3);
                d[12..16].copy_from_slice(&[10, 244, 200, rng.gen()]);
                d[16..20].copy_from_slice(&pod_ip.octets());
                if rng.gen_bool(0.5) {
                    d[10..12].fill(0);
                    let c = checksum(&d[..20]);
                    d[10..12].copy_from_slice(&c.to_be_bytes());
                }
            }
            d
        })
        .collect()
}

#[tokio::test]
async fn udp_fuzzed_datagrams_do_not_hurt_the_agent() -> anyhow::Result<()> {
    if !require_root("udp_fuzzed_datagrams_do_not_hurt_the_agent") {
        return Ok(());
    }
    let mut c = ScriptedCluster::start().await?;
    c.check_both_ways(1).await?;
    let pid = c.tb.agent(1)?.id();
    let pod_ip = c.pod_ip();
    // Warm up (buffers, allocator), then measure.
    c.send_as_peer(&fuzz_datagrams(2000, pod_ip))?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (rss0, fds0) = rss_and_fds(pid)?;
    let before = counters(&c.tb, 1).await?;
    const ROUNDS: usize = 5;
    const PER_ROUND: usize = 4000;
    let n3 = c.tb.node(3).clone();
    for _ in 0..ROUNDS {
        c.send_as_peer(&fuzz_datagrams(PER_ROUND, pod_ip))?;
        send_from(
            &n3.netns,
            n3.ip,
            PORT,
            c.tb.node(1).ip,
            fuzz_datagrams(PER_ROUND / 4, pod_ip),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    ensure!(
        c.tb.agent(1)?.is_running(),
        "the agent died: {}",
        c.tb.agent(1)?.log_tail(30)
    );
    let after = counters(&c.tb, 1).await?;
    println!("counters after the fuzz: {after}");
    let moved = |k: &str| count(&after, k) - count(&before, k);
    ensure!(moved("/drops/malformed") > 1000, "malformed: {after}");
    ensure!(moved("/drops/not_a_peer") > 1000, "not_a_peer: {after}");
    let (rss1, fds1) = rss_and_fds(pid)?;
    println!("agent RSS {rss0} kB -> {rss1} kB, fds {fds0} -> {fds1}");
    ensure!(fds1 <= fds0 + 2, "fd count grew from {fds0} to {fds1}");
    ensure!(rss1 < rss0 + 8 * 1024, "RSS grew from {rss0} kB to {rss1} kB");
    // Still forwarding, both ways.
    c.check_both_ways(2).await?;
    c.shutdown().await
}
