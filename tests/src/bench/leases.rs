//! How long an agent takes to program many remote leases: N fake vxlan leases (distinct /24s
//! of `10.0.0.0/8`, distinct public IPs and VTEP MACs) are written to etcd before the agent
//! starts, and the clock runs from the agent's start until its datapath holds all N: N routes
//! (`proto 102`, the last of neighbour, FDB entry and route the kernel datapath programs per
//! peer) and, with the eBPF datapath, N entries in the pinned `FLANNEL_VTEPS` map (which it
//! fills after the kernel entries).

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{Txn, TxnOp};
use ipnet::Ipv4Net;
use serde_json::{json, Value};

use crate::testbed::leases::upstream_vxlan_lease_value;
use crate::testbed::{probe, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};

/// Puts per etcd transaction (etcd's default `--max-txn-ops` is 128).
const TXN_OPS: usize = 100;
/// How often the datapath is counted.
const POLL: Duration = Duration::from_millis(100);
/// How long to wait for the BPF map after the routes are complete before concluding that
/// the eBPF datapath is not active.
const MAP_GRACE: Duration = Duration::from_secs(10);

/// The outcome of one programming run.
#[derive(Debug, Clone)]
pub struct LeaseRun {
    /// The `Datapath` asked for (`kernel` or `ebpf`).
    pub datapath: &'static str,
    /// Remote leases written.
    pub leases: usize,
    /// Seconds to write them to etcd (before the agent starts; not part of the result).
    pub write_s: f64,
    /// Seconds from the agent's start until `/readyz` answered 200.
    pub ready_s: Option<f64>,
    /// Seconds from the agent's start until all routes were there.
    pub routes_s: Option<f64>,
    /// Routes seen at the end.
    pub routes_seen: usize,
    /// Seconds from the agent's start until `FLANNEL_VTEPS` held all leases.
    pub map_s: Option<f64>,
    /// Map entries seen at the end; `None` when no map was pinned.
    pub map_seen: Option<usize>,
    /// What the run shows, in words (the headline or why there is none).
    pub outcome: String,
}

impl LeaseRun {
    /// The headline figure: the map for the eBPF datapath, the routes otherwise.
    pub fn result_s(&self) -> Option<f64> {
        if self.datapath == "ebpf" {
            self.map_s
        } else {
            self.routes_s
        }
    }

    /// The run as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "datapath": self.datapath,
            "leases": self.leases,
            "etcd_write_s": self.write_s,
            "ready_s": self.ready_s,
            "routes_complete_s": self.routes_s,
            "routes_seen": self.routes_seen,
            "map_complete_s": self.map_s,
            "map_entries_seen": self.map_seen,
            "result_s": self.result_s(),
            "outcome": self.outcome,
        })
    }
}

/// The `i`-th fake lease: subnet, public IP and VTEP MAC, all distinct for `i` < 65,280.
pub fn fake_lease(i: usize) -> (Ipv4Net, Ipv4Addr, String) {
    let i = u32::try_from(i).expect("lease index fits in u32");
    let [_, _, hi, lo] = i.to_be_bytes();
    let subnet = Ipv4Net::new(Ipv4Addr::new(10, 1 + hi, lo, 0), 24).expect("/24 is a valid prefix");
    // 198.18.10.1 and up: the node segment, clear of the nodes (.0.x) and the fabric (.0.254).
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 10, 1)) + i);
    let [_, a, b, c] = i.to_be_bytes();
    (subnet, ip, format!("0a:58:bb:{a:02x}:{b:02x}:{c:02x}"))
}

/// Writes `count` fake leases to the testbed's etcd, without TTL, in transactions.
async fn write_leases(tb: &Testbed, count: usize) -> anyhow::Result<()> {
    let mut client = tb.etcd().context("the testbed has no etcd")?.client().await?;
    let indices: Vec<usize> = (0..count).collect();
    for chunk in indices.chunks(TXN_OPS) {
        let ops: Vec<TxnOp> = chunk
            .iter()
            .map(|&i| {
                let (subnet, ip, mac) = fake_lease(i);
                TxnOp::put(
                    tb.lease_key(subnet, None),
                    upstream_vxlan_lease_value(ip, 1, &mac),
                    None,
                )
            })
            .collect();
        tokio::time::timeout(Duration::from_secs(30), client.txn(Txn::new().and_then(ops)))
            .await
            .context("an etcd transaction timed out")?
            .context("writing leases")?;
    }
    Ok(())
}

/// Routes flanneld programmed on node 1 (`proto 102`) into `10.0.0.0/8`.
async fn count_routes(tb: &Testbed) -> anyhow::Result<usize> {
    let out = tb
        .ip(&tb.node(1).netns, &["-4", "route", "show", "proto", "102"])
        .await?;
    Ok(out.lines().filter(|l| l.starts_with("10.")).count())
}

/// Runs one programming measurement on a fresh one-node testbed with `Datapath: <datapath>`,
/// giving up after `timeout` (the result then says so).
pub async fn program_leases(datapath: &'static str, count: usize, timeout: Duration) -> anyhow::Result<LeaseRun> {
    let conf =
        format!(r#"{{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{{"Type":"vxlan","Datapath":"{datapath}"}}}}"#);
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(&conf)).await?;
    let started = Instant::now();
    write_leases(&tb, count).await?;
    let write_s = started.elapsed().as_secs_f64();
    let pin_dir = tb.bpf_pin_dir(1)?;
    let readyz = SocketAddr::new(tb.node(1).ip.into(), AGENT_HEALTHZ_PORT);
    let netns = tb.node(1).netns.clone();

    let t0 = Instant::now();
    tb.start_agent(1, &[]).await?;
    let mut run = LeaseRun {
        datapath,
        leases: count,
        write_s,
        ready_s: None,
        routes_s: None,
        routes_seen: 0,
        map_s: None,
        map_seen: None,
        outcome: String::new(),
    };
    let mut map_error = String::new();
    loop {
        let now = t0.elapsed();
        if let Some(status) = tb.agent(1)?.try_wait()? {
            let tail = tb.agent(1)?.log_tail(10);
            run.outcome = format!("flanneld exited ({status}) after {:.1} s: {tail}", now.as_secs_f64());
            break;
        }
        if run.ready_s.is_none() && matches!(probe::http_get(&netns, readyz, "/readyz").await, Ok((200, _))) {
            run.ready_s = Some(now.as_secs_f64());
        }
        run.routes_seen = count_routes(&tb).await?;
        if run.routes_seen >= count && run.routes_s.is_none() {
            run.routes_s = Some(t0.elapsed().as_secs_f64());
        }
        // An error is "no map pinned (yet)"; the last one is kept for the outcome.
        match flannel_agent::dataplane::pinned_vteps(&pin_dir) {
            Ok(entries) => {
                run.map_seen = Some(entries.len());
                if entries.len() >= count && run.map_s.is_none() {
                    run.map_s = Some(t0.elapsed().as_secs_f64());
                }
            }
            Err(e) => map_error = e.to_string(),
        }
        let wants_map = datapath == "ebpf";
        if let Some(routes_s) = run.routes_s {
            if !wants_map || run.map_s.is_some() {
                run.outcome = "complete".into();
                if run.ready_s.is_none() {
                    // Programming can finish before the first /readyz poll sees it.
                    let ready = tb.wait_ready(1, timeout.saturating_sub(t0.elapsed())).await;
                    run.ready_s = ready.is_ok().then(|| t0.elapsed().as_secs_f64());
                }
                break;
            }
            if run.map_seen.is_none() && t0.elapsed().as_secs_f64() > routes_s + MAP_GRACE.as_secs_f64() {
                run.outcome = format!(
                    "no FLANNEL_VTEPS map {} s after the routes were complete ({map_error}): \
                     the eBPF datapath is not active",
                    MAP_GRACE.as_secs()
                );
                break;
            }
        }
        if t0.elapsed() > timeout {
            run.outcome = format!(
                "not complete after {} s: {} of {count} routes, {} map entries",
                timeout.as_secs(),
                run.routes_seen,
                run.map_seen.map_or_else(|| "no".to_owned(), |n| n.to_string()),
            );
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    drop(tb);
    Ok(run)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fake_leases_are_distinct() {
        let all: Vec<_> = (0..10_000).map(fake_lease).collect();
        let subnets: std::collections::HashSet<_> = all.iter().map(|l| l.0).collect();
        let ips: std::collections::HashSet<_> = all.iter().map(|l| l.1).collect();
        let macs: std::collections::HashSet<_> = all.iter().map(|l| l.2.clone()).collect();
        assert_eq!((subnets.len(), ips.len(), macs.len()), (10_000, 10_000, 10_000));
        assert_eq!(fake_lease(0).0.to_string(), "10.1.0.0/24");
        assert_eq!(fake_lease(9_999).1, Ipv4Addr::new(198, 18, 49, 16));
        assert_eq!(fake_lease(257).2, "0a:58:bb:00:01:01");
    }
}
