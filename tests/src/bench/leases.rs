//! How long an agent takes to program many remote leases: N fake vxlan leases (distinct /24s
//! of `10.0.0.0/8`, distinct public IPs and VTEP MACs) are written to etcd before the agent
//! starts, and the clock runs from the agent's start until its datapath holds all N: N routes
//! (`proto 102`, the last of neighbour, FDB entry and route the kernel datapath programs per
//! peer) and, with the eBPF datapath, N entries in the pinned `FLANNEL_VTEPS` map (which it
//! fills after the kernel entries).
//!
//! Two more figures come from the agent itself (`/metrics`): how long its reconcile that
//! programmed the peers took, which runs from the complete peer set arriving to everything
//! programmed (`flannel_reconcile_max_duration_seconds`), and, after [`STEADY_RECONCILES`]
//! periodic reconciles with nothing changed, how long the last one took, the CPU time the
//! agent used per reconcile over that window, and how many of them wrote anything (should be
//! none: the agent logs `vxlan datapath reconciled` only when it changed something).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
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
/// Periodic reconciles (every 10 s) watched after programming for the steady state.
const STEADY_RECONCILES: u64 = 2;
/// The agent's log line for a reconcile that changed something.
const CHANGED_LINE: &str = "vxlan datapath reconciled";

/// The outcome of one programming run.
#[derive(Debug, Clone)]
pub struct LeaseRun {
    /// The `Datapath` asked for (`kernel` or `ebpf`).
    pub datapath: &'static str,
    /// Remote leases written.
    pub leases: usize,
    /// The flanneld binary that programmed them.
    pub flanneld: String,
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
    /// The agent's longest reconcile: the one that programmed the peers, from the complete
    /// peer set to everything programmed.
    pub program_reconcile_s: Option<f64>,
    /// Where that reconcile's time went, as the agent logs it (`phase_ms` of the `vxlan
    /// datapath reconciled` line with the most changes: dump, plan, neigh_fdb, routes,
    /// deletes, map).
    pub phases: Option<String>,
    /// The steady state, once everything was programmed.
    pub steady: Option<Steady>,
    /// What the run shows, in words (the headline or why there is none).
    pub outcome: String,
}

/// Periodic reconciles with nothing to change.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    /// Reconciles watched.
    pub reconciles: u64,
    /// How long the last one took (agent-side).
    pub last_s: f64,
    /// The agent's CPU time (user + system) over the window, per reconcile: an upper bound,
    /// since the window also holds its idle work (etcd watch, lease renewal).
    pub cpu_per_reconcile_s: f64,
    /// Reconciles in the window that changed anything.
    pub writing: usize,
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
            "flanneld": self.flanneld,
            "etcd_write_s": self.write_s,
            "ready_s": self.ready_s,
            "routes_complete_s": self.routes_s,
            "routes_seen": self.routes_seen,
            "map_complete_s": self.map_s,
            "map_entries_seen": self.map_seen,
            "result_s": self.result_s(),
            "program_reconcile_s": self.program_reconcile_s,
            "program_reconcile_phases_ms": self.phases,
            "steady_reconciles": self.steady.map(|s| s.reconciles),
            "steady_reconcile_s": self.steady.map(|s| s.last_s),
            "steady_cpu_per_reconcile_s": self.steady.map(|s| s.cpu_per_reconcile_s),
            "steady_reconciles_writing": self.steady.map(|s| s.writing),
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
pub async fn write_leases(tb: &Testbed, count: usize) -> anyhow::Result<()> {
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
/// `agent` is the flanneld to run (a release build, as nodes run it); `None` runs the default
/// one of the testbed.
pub async fn program_leases(
    datapath: &'static str,
    count: usize,
    timeout: Duration,
    agent: Option<&Path>,
) -> anyhow::Result<LeaseRun> {
    let conf =
        format!(r#"{{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{{"Type":"vxlan","Datapath":"{datapath}"}}}}"#);
    let mut options = TestbedOptions::new(1).net_conf(&conf);
    if let Some(path) = agent {
        options = options.flanneld(path.to_path_buf());
    }
    let flanneld = match agent {
        Some(path) => path.display().to_string(),
        None => crate::testbed::flanneld_path()?.display().to_string(),
    };
    let mut tb = Testbed::start(options).await?;
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
        flanneld,
        write_s,
        ready_s: None,
        routes_s: None,
        routes_seen: 0,
        map_s: None,
        map_seen: None,
        program_reconcile_s: None,
        phases: None,
        steady: None,
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
    if run.outcome == "complete" {
        run.phases = tb.agent_logs(1).ok().and_then(|logs| phases(&logs));
        match steady_state(&mut tb, &netns, readyz, timeout).await {
            Ok((program, steady)) => {
                run.program_reconcile_s = Some(program);
                run.steady = Some(steady);
            }
            Err(e) => run.outcome = format!("complete; steady state not measured: {e:#}"),
        }
    }
    drop(tb);
    Ok(run)
}

/// The `phase_ms` field of the reconcile that changed the most, from the agent's log
/// (`phase_ms="dump=1.2 plan=0.3 ..."`; the agent logs it with `Debug`, hence the quotes).
fn phases(logs: &str) -> Option<String> {
    let changes = |l: &str| -> Option<u64> { l.split_once(" changes=")?.1.split_whitespace().next()?.parse().ok() };
    let line = logs
        .lines()
        .filter(|l| l.contains(CHANGED_LINE))
        .max_by_key(|l| changes(l).unwrap_or(0))?;
    let rest = line.split_once("phase_ms=")?.1;
    Some(rest.strip_prefix('"')?.split_once('"')?.0.to_owned())
}

/// One gauge or counter from the agent's `/metrics`.
fn metric(text: &str, name: &str) -> anyhow::Result<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

/// User plus system CPU seconds of process `pid` so far.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start at the state, field 3.
    let rest = stat.rsplit_once(')').context("malformed /proc/<pid>/stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<f64> { Ok(fields.get(i).context("short /proc/<pid>/stat")?.parse()?) };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after the state.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((ticks(11)? + ticks(12)?) / hz)
}

/// After programming: the agent's programming reconcile, then [`STEADY_RECONCILES`] periodic
/// ones with nothing to change.
async fn steady_state(
    tb: &mut Testbed,
    netns: &str,
    addr: SocketAddr,
    timeout: Duration,
) -> anyhow::Result<(f64, Steady)> {
    let metrics = || async {
        let (code, body) = probe::http_get(netns, addr, "/metrics").await?;
        anyhow::ensure!(code == 200, "/metrics answered {code}");
        anyhow::Ok(body)
    };
    let before = metrics().await?;
    let n0 = metric(&before, "flannel_reconciles_total")? as u64;
    let pid = tb.agent(1)?.id();
    let cpu0 = cpu_seconds(pid)?;
    let changed0 = tb.agent_logs(1)?.matches(CHANGED_LINE).count();
    let deadline = Instant::now() + timeout;
    let after = loop {
        let m = metrics().await?;
        if metric(&m, "flannel_reconciles_total")? as u64 >= n0 + STEADY_RECONCILES {
            break m;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "fewer than {STEADY_RECONCILES} reconciles in {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let cpu = cpu_seconds(pid)? - cpu0;
    let n = metric(&after, "flannel_reconciles_total")? as u64 - n0;
    let steady = Steady {
        reconciles: n,
        last_s: metric(&after, "flannel_reconcile_last_duration_seconds")?,
        cpu_per_reconcile_s: cpu / n as f64,
        writing: tb.agent_logs(1)?.matches(CHANGED_LINE).count() - changed0,
    };
    Ok((metric(&after, "flannel_reconcile_max_duration_seconds")?, steady))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_come_from_the_reconcile_that_changed_most() {
        let logs = "w INFO flanneld: vxlan datapath reconciled vxlan_peers=0 changes=1 phase_ms=\"dump=0.1\"\n\
                    x INFO flanneld: vxlan datapath reconciled vxlan_peers=3 changes=9 phase_ms=\"dump=1.0 plan=0.2\"\n\
                    y INFO flanneld: vxlan datapath reconciled vxlan_peers=3 changes=1 phase_ms=\"dump=9.0\"\n";
        assert_eq!(phases(logs).as_deref(), Some("dump=1.0 plan=0.2"));
        assert_eq!(phases("no such line"), None);
    }

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
