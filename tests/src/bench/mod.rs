//! The datapath benchmark behind `cargo xtask bench` (driver: `src/bin/flannel-bench.rs`).
//!
//! Every variant gets its own two-node [`Testbed`] with one pod per node, and all of them stay
//! up for the whole run, so rounds can interleave variants (A B C D, B C D A, ...) with one
//! variant's traffic at a time: on a noisy two-core machine a slow minute then hits every
//! variant alike, and medians over rounds absorb the rest.
//!
//! - `variant.rs`: the variants (net-conf strings) and how the datapath that ran is detected;
//! - `tools.rs`: iperf3, sockperf and `/proc/stat`, with their parsers;
//! - `leases.rs`: the time to program N remote leases;
//! - `report.rs`: statistics, ratios, JSON and markdown.

pub mod leases;
pub mod report;
pub mod tools;
pub mod variant;

use std::path::Path;
use std::time::Duration;

use anyhow::Context;

use self::report::{Availability, VariantResult};
use self::tools::Servers;
use self::variant::{Expect, Observed, Variant};
use crate::testbed::{Pod, Testbed, TestbedOptions};

/// The underlay MTU of every benchmark cluster.
pub const UNDERLAY_MTU: u32 = 1500;
/// Bound on an agent becoming ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on both pods getting onto the pod fast path (their nodes' next reconcile).
const FAST_PATH_TIMEOUT: Duration = Duration::from_secs(15);

/// One variant's cluster, ready for traffic.
#[derive(Debug)]
pub struct Bed {
    /// The servers go first: fields drop in order, and they live in the testbed's namespaces.
    _servers: Servers,
    /// The client pod, on node 1.
    pub client: Pod,
    /// The server pod, on node 2.
    pub server: Pod,
    /// The cluster; dropping it removes everything.
    pub tb: Testbed,
}

/// The three measurements of a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Measurement {
    /// iperf3 TCP, one stream, with CPU.
    Tcp,
    /// sockperf TCP ping-pong.
    PingPong,
    /// iperf3 64-byte UDP.
    Udp,
}

/// The measurements in round order.
pub const MEASUREMENTS: [Measurement; 3] = [Measurement::Tcp, Measurement::PingPong, Measurement::Udp];

/// Builds `variant`'s cluster: testbed, agents, pods, servers, and reads back which datapath
/// runs. No bed and [`Availability::NotAvailable`] when the variant is not available (an
/// optional variant whose agents did not come up, or whose option the agent ignored).
/// `release_agent`: the flanneld used where the agent is the datapath (udp); without it that
/// row runs the default (debug) flanneld and says so.
pub async fn start_bed(variant: &Variant, release_agent: Option<&Path>) -> anyhow::Result<(Option<Bed>, Availability)> {
    let mut options = TestbedOptions::new(2)
        .net_conf(&variant.net_conf())
        .underlay_mtu(UNDERLAY_MTU);
    let mut profile = "";
    if variant.agent_is_datapath() {
        match release_agent {
            Some(path) => {
                options = options.flanneld(path.to_path_buf());
                profile = ", release flanneld";
            }
            None => profile = ", DEBUG flanneld: not representative",
        }
    }
    let mut tb = Testbed::start(options).await?;
    // As the manifest runs flanneld, for every variant: with --ip-masq the CNI plugin does not
    // masquerade pod-to-pod traffic (and PodFastPath needs it).
    for n in 1..=2 {
        tb.start_agent(n, &["--ip-masq"]).await?;
    }
    for n in 1..=2 {
        if let Err(e) = tb.wait_ready(n, READY_TIMEOUT).await {
            if variant.optional() {
                let first = format!("{e:#}").lines().take(6).collect::<Vec<_>>().join(" ");
                return Ok((
                    None,
                    Availability::NotAvailable(format!("the agent did not start: {first}")),
                ));
            }
            return Err(e).with_context(|| format!("variant {}: node {n}", variant.key));
        }
    }
    let client = tb.add_pod(1, "client").await?;
    let server = tb.add_pod(2, "server").await?;
    // The first packets resolve neighbours and, with the eBPF datapath, let it attach its
    // decap hook; a failure here is a broken cluster, not a slow one.
    tb.tcp_check(&client, &server)
        .await
        .with_context(|| format!("variant {}: pod to pod TCP", variant.key))?;
    let mut seen = Observed::of_nodes(&mut tb).await?;
    if variant.expects == Expect::EbpfFastPath {
        // Each node puts its pod on the fast path at its next reconcile, and a connection that
        // began on the host's path stays there: measure once new connections take it.
        let deadline = tokio::time::Instant::now() + FAST_PATH_TIMEOUT;
        while !seen.fast_path_ran() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(500)).await;
            tb.tcp_check(&client, &server)
                .await
                .with_context(|| format!("variant {}: pod to pod TCP", variant.key))?;
            seen = Observed::of_nodes(&mut tb).await?;
        }
    }
    let label = match variant.judge(&seen) {
        Ok(label) => label + profile,
        Err(reason) => return Ok((None, Availability::NotAvailable(reason))),
    };
    let servers = tools::start_servers(&tb, &server).await?;
    let bed = Bed {
        _servers: servers,
        client,
        server,
        tb,
    };
    Ok((
        Some(bed),
        Availability::Measured {
            label,
            attachments: seen.attachments,
        },
    ))
}

impl Bed {
    /// Runs one measurement of `seconds` from the client pod to the server pod and records
    /// its samples (or its error) in `result`. Returns a one-line summary.
    pub async fn measure(&self, what: Measurement, seconds: u32, result: &mut VariantResult) -> String {
        let (tb, client, to) = (&self.tb, &self.client, self.server.ip());
        let outcome = match what {
            Measurement::Tcp => tools::tcp_throughput(client, to, seconds).await.map(|s| {
                result.push("tcp_gbps", s.gbps);
                result.push("tcp_sender_cpu", s.sender_cpu);
                result.push("tcp_receiver_cpu", s.receiver_cpu);
                result.push("tcp_machine_cpu", s.machine_cpu);
                format!(
                    "{:.2} Gbit/s, CPU {:.0}/{:.0}/{:.0} %",
                    s.gbps, s.sender_cpu, s.receiver_cpu, s.machine_cpu
                )
            }),
            Measurement::PingPong => tools::ping_pong(tb, client, to, seconds).await.map(|s| {
                result.push("rr_avg_us", s.avg_us);
                result.push("rr_p99_us", s.p99_us);
                format!("{:.1} µs avg, {:.1} µs p99", s.avg_us, s.p99_us)
            }),
            Measurement::Udp => tools::udp_rate(client, to, seconds).await.map(|s| {
                result.push("udp_rx_kpps", s.received_kpps);
                result.push("udp_tx_kpps", s.sent_kpps);
                format!("{:.0} kpps received ({:.0} sent)", s.received_kpps, s.sent_kpps)
            }),
        };
        outcome.unwrap_or_else(|e| {
            let text = format!("{what:?}: {e:#}");
            result.errors.push(text.clone());
            format!("FAILED {text}")
        })
    }
}
