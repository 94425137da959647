//! The traffic tools a benchmark round runs between two pods, and the parsers of their output:
//! iperf3 (TCP throughput with per-process CPU, 64-byte UDP packet rate) and sockperf (TCP
//! ping-pong latency), plus the machine-wide CPU use from `/proc/stat`.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use crate::testbed::{Pod, Testbed};

/// The iperf3 server's port in the server pod.
pub const IPERF_PORT: u16 = 5201;
/// The sockperf server's port in the server pod.
pub const SOCKPERF_PORT: u16 = 11111;
/// UDP payload size of the packet-rate test (as `iperf3 -u -l 64`).
pub const UDP_PAYLOAD: u32 = 64;
/// TCP message size of the ping-pong test (as `sockperf pp -m 64`).
pub const PING_PONG_MESSAGE: u32 = 64;
/// Slack on top of a run's duration before the client is killed: connection setup, sockperf's
/// warm-up and iperf3's result exchange take well under a second.
const RUN_SLACK: Duration = Duration::from_secs(20);
/// How often a client retries while the iperf3 server still winds down the previous test.
const BUSY_RETRIES: u32 = 3;

/// One single-stream TCP run.
#[derive(Debug, Clone, Copy)]
pub struct TcpSample {
    /// Goodput at the receiver, Gbit/s.
    pub gbps: f64,
    /// CPU of the sending iperf3 process (user + system, including softirq work charged to
    /// it), percent of one core.
    pub sender_cpu: f64,
    /// CPU of the receiving iperf3 process, percent of one core.
    pub receiver_cpu: f64,
    /// Busy time of the whole machine during the run, percent of one core (so up to
    /// 100 × CPUs): includes softirq work in ksoftirqd that no iperf3 process is charged for.
    pub machine_cpu: f64,
}

/// One TCP ping-pong run.
#[derive(Debug, Clone, Copy)]
pub struct LatencySample {
    /// sockperf's average one-way latency (half the round trip), µs.
    pub avg_us: f64,
    /// Its 99th percentile, µs.
    pub p99_us: f64,
}

/// One 64-byte UDP flood.
#[derive(Debug, Clone, Copy)]
pub struct UdpSample {
    /// Datagrams received by the server pod, thousands per second.
    pub received_kpps: f64,
    /// Datagrams the client managed to send, thousands per second.
    pub sent_kpps: f64,
}

/// The long-running servers in the server pod, killed when dropped.
#[derive(Debug)]
pub struct Servers {
    /// `iperf3 -s` and `sockperf sr`.
    _guards: Vec<crate::process::ChildGuard>,
}

/// Starts the iperf3 and sockperf servers in `server` and waits until both listen.
pub async fn start_servers(tb: &Testbed, server: &Pod) -> anyhow::Result<Servers> {
    let ip = server.ip().to_string();
    let iperf_port = IPERF_PORT.to_string();
    let sockperf_port = SOCKPERF_PORT.to_string();
    let guards = vec![
        tb.spawn(
            &server.netns,
            "iperf3-server",
            "iperf3",
            &["-s", "-B", &ip, "-p", &iperf_port],
        )?,
        tb.spawn(
            &server.netns,
            "sockperf-server",
            "sockperf",
            &["sr", "--tcp", "-i", &ip, "-p", &sockperf_port],
        )?,
    ];
    let wanted = &[format!(":{IPERF_PORT}"), format!(":{SOCKPERF_PORT}")];
    let netns = server.netns.as_str();
    crate::testbed::wait_for(
        "iperf3 and sockperf servers listening",
        Duration::from_secs(10),
        move || async move {
            let listening = tb.exec(netns, "ss", &["-Hltn"], Duration::from_secs(5)).await?;
            match wanted.iter().find(|port| !listening.contains(port.as_str())) {
                None => Ok(()),
                Some(port) => bail!("nothing listens on {port} yet: {listening}"),
            }
        },
    )
    .await?;
    Ok(Servers { _guards: guards })
}

/// Runs `iperf3 -c <to> -J <args>` in `client`, retrying while the server is busy with the
/// previous test, and returns the parsed JSON.
async fn iperf3(client: &Pod, to: IpAddr, seconds: u32, extra: &[&str]) -> anyhow::Result<Value> {
    let (to, port, secs) = (to.to_string(), IPERF_PORT.to_string(), seconds.to_string());
    let mut args = vec!["-c", &to, "-p", &port, "-t", &secs, "-J", "--connect-timeout", "3000"];
    args.extend_from_slice(extra);
    let timeout = Duration::from_secs(seconds.into()) + RUN_SLACK;
    let mut attempt = 0;
    loop {
        attempt += 1;
        // iperf3 -J exits non-zero on an error but still prints JSON with an "error" field.
        let mut full = vec!["netns", "exec", &client.netns, "iperf3"];
        full.extend_from_slice(&args);
        let out = crate::testbed::netns::output("ip", &full, None, timeout).await?;
        let text = String::from_utf8_lossy(&out.stdout);
        let json: Value = serde_json::from_str(&text).with_context(|| {
            format!(
                "iperf3 printed no JSON ({}): {}{}",
                out.status,
                text.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
        match json.get("error").and_then(Value::as_str) {
            None => return Ok(json),
            Some(e) if e.contains("busy") && attempt <= BUSY_RETRIES => {
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Some(e) => bail!("iperf3 {}: {e}", args.join(" ")),
        }
    }
}

fn number(json: &Value, pointer: &str) -> anyhow::Result<f64> {
    json.pointer(pointer)
        .and_then(Value::as_f64)
        .with_context(|| format!("iperf3 JSON without {pointer}"))
}

/// Parses a TCP run of `iperf3 -J`: receiver goodput and both processes' CPU.
pub fn parse_iperf3_tcp(json: &Value) -> anyhow::Result<(f64, f64, f64)> {
    let bps = number(json, "/end/sum_received/bits_per_second")?;
    let sender = number(json, "/end/cpu_utilization_percent/host_total")?;
    let receiver = number(json, "/end/cpu_utilization_percent/remote_total")?;
    Ok((bps / 1e9, sender, receiver))
}

/// Parses a UDP run of `iperf3 -u -l <payload> -J`: (received, sent) datagrams per second.
/// Bytes over payload size rather than `packets`: the receiver's `packets` counts the lost ones.
pub fn parse_iperf3_udp(json: &Value, payload: u32) -> anyhow::Result<(f64, f64)> {
    let rate = |side: &str| -> anyhow::Result<f64> {
        let bytes = number(json, &format!("/end/{side}/bytes"))?;
        let seconds = number(json, &format!("/end/{side}/seconds"))?;
        if seconds <= 0.0 {
            bail!("iperf3 reports a {side} of {seconds} s");
        }
        Ok(bytes / f64::from(payload) / seconds)
    };
    Ok((rate("sum_received")?, rate("sum_sent")?))
}

/// Single-stream TCP from `client` to the iperf3 server at `to` for `seconds`.
pub async fn tcp_throughput(client: &Pod, to: IpAddr, seconds: u32) -> anyhow::Result<TcpSample> {
    let before = CpuTimes::read()?;
    let json = iperf3(client, to, seconds, &[]).await?;
    let machine_cpu = CpuTimes::read()?.busy_percent_since(&before);
    let (gbps, sender_cpu, receiver_cpu) = parse_iperf3_tcp(&json)?;
    Ok(TcpSample {
        gbps,
        sender_cpu,
        receiver_cpu,
        machine_cpu,
    })
}

/// 64-byte UDP datagrams as fast as one iperf3 client sends them (`-b 0`), for `seconds`.
pub async fn udp_rate(client: &Pod, to: IpAddr, seconds: u32) -> anyhow::Result<UdpSample> {
    let payload = UDP_PAYLOAD.to_string();
    let json = iperf3(client, to, seconds, &["-u", "-l", &payload, "-b", "0"]).await?;
    let (received, sent) = parse_iperf3_udp(&json, UDP_PAYLOAD)?;
    Ok(UdpSample {
        received_kpps: received / 1e3,
        sent_kpps: sent / 1e3,
    })
}

/// TCP ping-pong with 64-byte messages from `client` to the sockperf server at `to`.
pub async fn ping_pong(tb: &Testbed, client: &Pod, to: IpAddr, seconds: u32) -> anyhow::Result<LatencySample> {
    let (to, port, secs, size) = (
        to.to_string(),
        SOCKPERF_PORT.to_string(),
        seconds.to_string(),
        PING_PONG_MESSAGE.to_string(),
    );
    let timeout = Duration::from_secs(seconds.into()) + RUN_SLACK;
    let args = ["pp", "--tcp", "-i", &to, "-p", &port, "-t", &secs, "-m", &size];
    let out = tb.exec(&client.netns, "sockperf", &args, timeout).await?;
    parse_sockperf(&out)
}

/// Parses `sockperf ping-pong` output: `avg-latency=20.932 (std-dev=…)` and
/// `---> percentile 99.000 =  104.820` (it colours the first with ANSI escapes).
pub fn parse_sockperf(text: &str) -> anyhow::Result<LatencySample> {
    let avg = text
        .split("avg-latency=")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !(c.is_ascii_digit() || c == '.')).next())
        .and_then(|n| n.parse().ok());
    let p99 = text
        .lines()
        .find_map(|line| line.split("percentile 99.000 =").nth(1))
        .and_then(|n| n.trim().parse().ok());
    match (avg, p99) {
        (Some(avg_us), Some(p99_us)) => Ok(LatencySample { avg_us, p99_us }),
        _ => bail!("no avg-latency and 99th percentile in sockperf's output: {text}"),
    }
}

/// The aggregate `cpu` line of `/proc/stat`, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
    /// Number of `cpuN` lines.
    pub cpus: u32,
}

impl CpuTimes {
    /// Reads `/proc/stat`.
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        Self::parse(&text)
    }

    /// Parses the text of `/proc/stat`.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat without a cpu line")?;
        let f: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(str::parse)
            .collect::<Result<_, _>>()
            .with_context(|| format!("/proc/stat: {line}"))?;
        if f.len() < 8 {
            bail!("/proc/stat: too few fields in {line}");
        }
        // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
        let busy = f[0] + f[1] + f[2] + f[5] + f[6] + f[7];
        let cpus = text
            .lines()
            .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
            .count();
        Ok(Self {
            busy,
            total: busy + f[3] + f[4],
            cpus: u32::try_from(cpus.max(1)).unwrap_or(1),
        })
    }

    /// Busy share of the machine since `before`, in percent of one core.
    pub fn busy_percent_since(&self, before: &Self) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        let busy = self.busy.saturating_sub(before.busy);
        busy as f64 / total as f64 * 100.0 * f64::from(self.cpus)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sockperf() {
        let text = "sockperf: \u{1b}[2;35m====> avg-latency=20.932 (std-dev=35.792)\u{1b}[0m\n\
                    sockperf: ---> percentile 99.900 =  239.431\n\
                    sockperf: ---> percentile 99.000 =  104.820\n";
        let s = parse_sockperf(text).unwrap();
        assert!(
            (s.avg_us - 20.932).abs() < 1e-9 && (s.p99_us - 104.82).abs() < 1e-9,
            "{s:?}"
        );
        assert!(parse_sockperf("sockperf: ERROR").is_err());
    }

    #[test]
    fn parses_iperf3() {
        let udp: Value = serde_json::from_str(
            r#"{"end":{"sum_sent":{"seconds":1.0,"bytes":10389120},"sum_received":{"seconds":1.0,"bytes":9145344}}}"#,
        )
        .unwrap();
        let (received, sent) = parse_iperf3_udp(&udp, 64).unwrap();
        assert_eq!((received, sent), (142_896.0, 162_330.0));
        let tcp: Value = serde_json::from_str(
            r#"{"end":{"sum_received":{"bits_per_second":1.2e10},
                "cpu_utilization_percent":{"host_total":90.5,"remote_total":60.0}}}"#,
        )
        .unwrap();
        assert_eq!(parse_iperf3_tcp(&tcp).unwrap(), (12.0, 90.5, 60.0));
    }

    #[test]
    fn machine_cpu_from_proc_stat() {
        let before = CpuTimes::parse("cpu  100 0 100 800 0 0 0 0 0 0\ncpu0 1\ncpu1 1\n").unwrap();
        let after = CpuTimes::parse("cpu  200 0 200 900 0 0 100 0 0 0\ncpu0 1\ncpu1 1\n").unwrap();
        assert_eq!(before.cpus, 2);
        // 300 of 400 ticks busy on 2 CPUs: 150 % of one core.
        assert!((after.busy_percent_since(&before) - 150.0).abs() < 1e-9);
    }
}
