//! The flanneld binary against a real etcd, in the testbed's network namespaces, with
//! the `none` backend: the control plane alone, as upstream's functional tests run it.
//! Privileged: each test skips loudly without root, and fails in CI if it cannot run.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use flannel_tests::testbed::{probe, require_root, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};

const READY: Duration = Duration::from_secs(60);

fn none_conf(extra: &str) -> String {
    format!(r#"{{"Network":"10.50.0.0/16"{extra},"Backend":{{"Type":"none"}}}}"#)
}

/// `FLANNEL_SUBNET` of a node, as written by its agent.
fn subnet_of(tb: &Testbed, node: usize) -> anyhow::Result<String> {
    let env = tb.read_subnet_env(node)?;
    env.lines()
        .find_map(|l| l.strip_prefix("FLANNEL_SUBNET="))
        .map(str::to_owned)
        .with_context(|| format!("no FLANNEL_SUBNET in node {node}'s subnet.env:\n{env}"))
}

/// GET on node `n`'s healthz server, from inside the node.
async fn healthz(tb: &Testbed, n: usize, path: &str) -> anyhow::Result<(u16, String)> {
    let node = tb.node(n);
    probe::http_get(&node.netns, SocketAddr::new(node.ip.into(), AGENT_HEALTHZ_PORT), path).await
}

/// How many peers node `n`'s agent has programmed, from `/status`.
async fn peers_of(tb: &Testbed, n: usize) -> anyhow::Result<u64> {
    let (code, body) = healthz(tb, n, "/status").await?;
    ensure!(code == 200, "/status answered {code}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    v["peers"].as_u64().context("/status has no peers count")
}

/// CPU time (user + system) a process has used, from /proc/<pid>/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the parenthesised command name; utime and stime are the 14th and 15th.
    let rest = stat.rsplit_once(')').context("malformed stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Ok(f[11].parse::<u64>()? + f[12].parse::<u64>()?)
}

async fn wait_until<F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if f().await.unwrap_or(false) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// 50 agents start at once: 50 distinct subnets inside SubnetMin..SubnetMax, none exits;
/// a reservation goes to the node with its PublicIP and keeps no TTL; a restarted agent
/// (kill -9) gets its subnet back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_agents_acquire_at_once() -> anyhow::Result<()> {
    if !require_root("fifty_agents_acquire_at_once") {
        return Ok(());
    }
    const N: usize = 50;
    // 60 subnets for 50 nodes: contention without running out.
    let conf = none_conf(r#","SubnetMin":"10.50.10.0","SubnetMax":"10.50.69.0""#);
    let mut tb = Testbed::start(TestbedOptions::new(N).net_conf(&conf)).await?;
    let etcd = tb.etcd().context("etcd")?;
    // A reservation for node 50 (198.18.0.50): a key with no etcd lease.
    let reserved = "/coreos.com/network/subnets/10.50.42.0-24";
    etcd.put(reserved, r#"{"PublicIP":"198.18.0.50","PublicIPv6":null}"#)
        .await?;

    let started = Instant::now();
    for n in 1..=N {
        tb.start_agent(n, &[]).await?;
    }
    for n in 1..=N {
        tb.wait_ready(n, READY).await?;
    }
    println!("{N} agents ready in {:.2} s", started.elapsed().as_secs_f64());
    let rss = std::fs::read_to_string(format!("/proc/{}/status", tb.agent(1)?.id()))?;
    if let Some(line) = rss.lines().find(|l| l.starts_with("VmRSS")) {
        println!(
            "agent RSS with {} peers: {}",
            N - 1,
            line.trim_start_matches("VmRSS:").trim()
        );
    }

    let mut subnets = BTreeSet::new();
    for n in 1..=N {
        let sn: ipnet::Ipv4Net = subnet_of(&tb, n)?.parse()?;
        let third = sn.network().octets()[2];
        ensure!(
            sn.prefix_len() == 24 && (10..=69).contains(&third),
            "node {n} got {sn}, outside the range"
        );
        ensure!(subnets.insert(sn.trunc()), "node {n} got {sn}, which another node has");
        ensure!(
            tb.agent(n)?.is_running(),
            "agent {n} exited:\n{}",
            tb.agent(n)?.log_tail(20)
        );
    }
    ensure!(subnet_of(&tb, N)? == "10.50.42.1/24", "the reservation went elsewhere");

    let etcd = tb.etcd().context("etcd")?;
    let keys = etcd.get_prefix("/coreos.com/network/subnets/").await?;
    ensure!(keys.len() == N, "{} keys in etcd, expected {N}", keys.len());
    let mut client = etcd.client().await?;
    let kv = client.get(reserved, None).await?;
    ensure!(
        kv.kvs().first().map(|k| k.lease()) == Some(0),
        "the reservation got an etcd lease"
    );
    let node50: serde_json::Value = serde_json::from_str(kv.kvs()[0].value_str()?)?;
    ensure!(
        node50["BackendType"] == "none",
        "the reservation was not taken over: {node50}"
    );

    let before = subnet_of(&tb, 7)?;
    tb.kill_agent(7)?;
    tb.start_agent(7, &[]).await?;
    tb.wait_ready(7, READY).await?;
    ensure!(subnet_of(&tb, 7)? == before, "node 7 changed subnet across a restart");
    tb.shutdown().await
}

/// etcd away for 30 s: no agent exits, the lease stays, the agent uses almost no CPU,
/// and once etcd is back the watch resumes (a new peer shows up).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_outage_keeps_agents_running() -> anyhow::Result<()> {
    if !require_root("etcd_outage_keeps_agents_running") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(&none_conf(""))).await?;
    for n in 1..=2 {
        tb.start_agent(n, &[]).await?;
    }
    for n in 1..=2 {
        tb.wait_ready(n, READY).await?;
    }
    ensure!(peers_of(&tb, 1).await? == 1, "node 1 should see node 2");
    let pid = tb.agent(1)?.id();
    let own_key = format!(
        "/coreos.com/network/subnets/{}",
        subnet_of(&tb, 1)?.replace(".1/", ".0-")
    );

    tb.etcd_mut().context("etcd")?.stop().await?;
    let ticks0 = cpu_ticks(pid)?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    let ticks = cpu_ticks(pid)? - ticks0;
    for n in 1..=2 {
        ensure!(
            tb.agent(n)?.is_running(),
            "agent {n} exited during the outage:\n{}",
            tb.agent(n)?.log_tail(20)
        );
    }
    // 100 ticks a second: under 1 s of CPU over 30 s means it slept, not spun.
    ensure!(ticks < 100, "agent used {ticks} ticks of CPU while etcd was away");
    ensure!(
        healthz(&tb, 1, "/readyz").await?.0 == 200,
        "ready dropped while the datapath is intact"
    );
    ensure!(peers_of(&tb, 1).await? == 1, "the peer set changed during the outage");

    tb.etcd_mut().context("etcd")?.restart().await?;
    let etcd = tb.etcd().context("etcd")?;
    ensure!(
        etcd.get(&own_key).await?.is_some(),
        "own lease {own_key} is gone after the outage"
    );
    etcd.put(
        "/coreos.com/network/subnets/10.50.200.0-24",
        r#"{"PublicIP":"198.18.0.200","PublicIPv6":null,"BackendType":"none"}"#,
    )
    .await?;
    wait_until("the new peer on node 1", Duration::from_secs(20), || async {
        Ok(peers_of(&tb, 1).await? == 2)
    })
    .await?;
    ensure!(tb.agent(1)?.id() == pid, "the agent was restarted");
    println!("agent CPU during a 30 s etcd outage: {ticks} ticks");
    tb.shutdown().await
}

/// Healthz answers as upstream's; SIGTERM exits 0 and leaves the lease and subnet.env.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_sigterm_leave_state_in_place() -> anyhow::Result<()> {
    if !require_root("healthz_and_sigterm_leave_state_in_place") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(&none_conf(""))).await?;
    tb.start_agent(1, &[]).await?;
    tb.wait_ready(1, READY).await?;
    ensure!(healthz(&tb, 1, "/healthz").await? == (200, "flanneld is running".into()));
    ensure!(healthz(&tb, 1, "/readyz").await? == (200, "flanneld is ready".into()));
    let (code, metrics) = healthz(&tb, 1, "/metrics").await?;
    ensure!(
        code == 200 && metrics.contains("flannel_leases_rejected_total"),
        "{metrics}"
    );

    let subnet = subnet_of(&tb, 1)?;
    let status = tb.stop_agent(1).await?.context("no agent")?;
    ensure!(status.success(), "flanneld exited with {status} on SIGTERM");
    ensure!(tb.agent_logs(1)?.contains("exiting cleanly"), "no clean-exit line");
    ensure!(subnet_of(&tb, 1)? == subnet, "subnet.env changed on shutdown");
    let key = format!("/coreos.com/network/subnets/{}", subnet.replace(".1/", ".0-"));
    ensure!(
        tb.etcd().context("etcd")?.get(&key).await?.is_some(),
        "the lease was revoked on shutdown"
    );
    tb.shutdown().await
}

/// A config that is there but invalid stops the agent with one line naming the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_config_exits_naming_the_field() -> anyhow::Result<()> {
    if !require_root("invalid_config_exits_naming_the_field") {
        return Ok(());
    }
    let conf = r#"{"Network":"10.50.0.0/16","SubnetLen":31,"Backend":{"Type":"none"}}"#;
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(conf)).await?;
    tb.start_agent(1, &[]).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = tb.agent(1)?.try_wait()? {
            break s;
        }
        ensure!(
            Instant::now() < deadline,
            "flanneld kept running with an invalid config"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    ensure!(!status.success(), "flanneld exited 0 with an invalid config");
    let logs = tb.agent_logs(1)?;
    let line = logs
        .lines()
        .find(|l| l.contains("SubnetLen"))
        .context("no line names SubnetLen")?;
    ensure!(
        line.contains("31") && line.contains("/31"),
        "the line should give the value and the rule: {line}"
    );
    tb.shutdown().await
}

/// Hostile store data changes nothing and crashes nothing; it is counted; a good peer
/// written after it is still used. Over etcd with TLS client certificates.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_leases_over_tls_are_ignored_and_counted() -> anyhow::Result<()> {
    if !require_root("hostile_leases_over_tls_are_ignored_and_counted") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(&none_conf("")).etcd_tls()).await?;
    tb.start_agent(1, &[]).await?;
    tb.wait_ready(1, READY).await?;
    let own = subnet_of(&tb, 1)?;
    let own_key = own.replace(".1/", ".0-");
    let p = "/coreos.com/network/subnets/";
    let big = format!(
        r#"{{"PublicIP":"198.18.0.77","BackendData":"{}"}}"#,
        "x".repeat(1 << 20)
    );
    let bad: Vec<(String, String)> = vec![
        (format!("{p}10.50.101.0-24"), "{not json".into()),
        (format!("{p}10.50.102.0-24"), big),
        (format!("{p}10.50.103.0-24"), r#"{"PublicIP":"$(reboot)"}"#.into()),
        (
            format!("{p}$(touch /tmp/pwned)-24"),
            r#"{"PublicIP":"198.18.0.78"}"#.into(),
        ),
        (format!("{p}10.99.0.0-24"), r#"{"PublicIP":"198.18.0.79"}"#.into()),
        (format!("{p}10.50.104.0-24"), r#"{"PublicIP":"127.0.0.1"}"#.into()),
        (format!("{p}10.50.105.0-24"), r#"{"PublicIP":"0.0.0.0"}"#.into()),
        (format!("{p}10.50.106.0-24"), r#"{"PublicIP":"198.18.0.1"}"#.into()),
        (
            format!("{p}{own_key}&fd00::-64"),
            r#"{"PublicIP":"198.18.0.80"}"#.into(),
        ),
    ];
    let etcd = tb.etcd().context("etcd")?;
    for (k, v) in &bad {
        etcd.put(k, v).await?;
    }
    etcd.put(
        &format!("{p}10.50.110.0-24"),
        r#"{"PublicIP":"198.18.0.81","PublicIPv6":null,"BackendType":"none"}"#,
    )
    .await?;
    wait_until("the good peer", Duration::from_secs(15), || async {
        Ok(peers_of(&tb, 1).await? == 1)
    })
    .await?;
    ensure!(
        tb.agent(1)?.is_running(),
        "the agent exited:\n{}",
        tb.agent(1)?.log_tail(20)
    );
    ensure!(
        !std::path::Path::new("/tmp/pwned").exists(),
        "store data reached a shell"
    );
    let (_, metrics) = healthz(&tb, 1, "/metrics").await?;
    let rejected: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("flannel_leases_rejected_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    ensure!(
        rejected as usize >= bad.len() - 1,
        "only {rejected} rejections counted:\n{metrics}"
    );
    ensure!(subnet_of(&tb, 1)? == own, "own subnet changed");
    tb.shutdown().await
}
