//! Helpers of the eBPF cluster tests: flannelctl, the pinned counters, and traffic (TCP bulk,
//! UDP echo, a paced UDP flow with sequence numbers).

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use flannel_agent::dataplane::{pinned_counters, pinned_vteps};
use flannel_tests::testbed::netns::{self, in_netns};
use flannel_tests::testbed::probe;
use flannel_tests::testbed::{flanneld_path, Pod, Testbed};
use serde_json::Value;

use crate::READY;

/// `flannelctl`, beside `flanneld`.
pub(crate) fn flannelctl_path() -> anyhow::Result<PathBuf> {
    let path = flanneld_path()?.with_file_name("flannelctl");
    ensure!(
        path.is_file(),
        "{} missing: cargo build -p flannel-agent --bins",
        path.display()
    );
    Ok(path)
}

/// Runs `flannelctl args...` inside node `number`'s namespace; returns the whole output.
pub(crate) async fn flannelctl(tb: &Testbed, number: usize, args: &[&str]) -> anyhow::Result<Output> {
    let ctl = flannelctl_path()?;
    let ctl = ctl.to_str().context("path")?;
    let mut full = vec!["netns", "exec", tb.node(number).netns.as_str(), ctl];
    full.extend_from_slice(args);
    netns::output("ip", &full, None, Duration::from_secs(10)).await
}

/// `flannelctl --json args...` on node `number`, parsed; fails unless it exits with `code`.
pub(crate) async fn flannelctl_json(tb: &Testbed, number: usize, args: &[&str], code: i32) -> anyhow::Result<Value> {
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
pub(crate) fn counters(tb: &mut Testbed, number: usize) -> anyhow::Result<(u64, u64, u64)> {
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
pub(crate) async fn tcp_bulk(from: &Pod, to: &Pod, bytes: usize) -> anyhow::Result<Duration> {
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
pub(crate) async fn udp_echo(from: &Pod, to: &Pod) -> anyhow::Result<()> {
    probe::udp_check(&from.netns, &to.netns, to.ip(), 50).await
}

/// The flannelctl peers rows, checked to be in sync with `expected` leases.
pub(crate) fn check_peers(value: &Value, expected: usize) -> anyhow::Result<()> {
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

/// A paced UDP flow with sequence numbers: how many were sent and which arrived.
pub(crate) struct Flow {
    /// Set to stop the sender (the receiver stops once idle after it).
    pub(crate) stop: Arc<AtomicBool>,
    /// Returns how many datagrams were sent.
    pub(crate) sender: tokio::task::JoinHandle<anyhow::Result<u64>>,
    /// Returns which sequence numbers arrived.
    pub(crate) receiver: tokio::task::JoinHandle<anyhow::Result<Vec<bool>>>,
}

pub(crate) const FLOW_PPS: u64 = 1000;
pub(crate) const FLOW_MAX: usize = 60_000;

pub(crate) fn start_flow(from: &Pod, to: &Pod) -> Flow {
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
pub(crate) fn gaps(seen: &[bool], sent: u64) -> Vec<(usize, usize)> {
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

pub(crate) async fn kill_and_restart(tb: &mut Testbed, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    tb.kill_agent(n)?;
    tb.restart_agent(n).await?;
    tb.wait_ready(n, READY).await?;
    Ok(t.elapsed())
}

pub(crate) fn vtep_count(dir: &Path) -> usize {
    pinned_vteps(dir).map(|v| v.len()).unwrap_or(0)
}
