//! Privileged tests of `--ip-masq` with the real flanneld: upstream's exact FLANNEL-POSTRTG
//! rules, their repair within one `--iptables-resync` period, and what the outside world
//! sees of pod traffic with and without masquerading.
//!
//! They need root; outside CI they skip loudly without it. Build flanneld first
//! (`cargo build -p flannel-agent`).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context};
use flannel_tests::testbed::cluster::OUTSIDE_IP;
use flannel_tests::testbed::{probe, require_root, wait_for, Testbed, TestbedOptions};
use ipnet::Ipv4Net;

/// Bound on an agent becoming ready.
const READY: Duration = Duration::from_secs(20);
/// The `--iptables-resync` period the repair test runs with.
const RESYNC: Duration = Duration::from_secs(1);
/// What a repair may take beyond one resync period: the check and an
/// `iptables-restore`, on a busy two-core machine.
const RESYNC_SLACK: Duration = Duration::from_secs(2);

const NET_CONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const NETWORK: &str = "10.244.0.0/16";

/// Whether this iptables supports `--random-fully` (1.6.2 and later), as upstream checks.
async fn iptables_has_random_fully(tb: &Testbed) -> anyhow::Result<bool> {
    let out = tb
        .exec(&tb.node(1).netns, "iptables", &["--version"], Duration::from_secs(10))
        .await?;
    // `iptables v1.8.9 (nf_tables)`
    let version = out
        .split_whitespace()
        .find_map(|w| w.strip_prefix('v'))
        .with_context(|| format!("iptables --version: {out}"))?;
    let parts: Vec<u32> = version.split('.').map(|p| p.parse().unwrap_or(0)).collect();
    Ok(parts.as_slice() >= [1, 6, 2].as_slice())
}

/// The lines upstream's e2e test expects from `iptables -t nat -S` (those mentioning
/// FLANNEL), for a node with subnet `sub`.
fn upstream_masq_lines(sub: Ipv4Net, random_fully: bool) -> Vec<String> {
    let c = r#"-m comment --comment "flanneld masq""#;
    let rf = if random_fully { " --random-fully" } else { "" };
    vec![
        "-N FLANNEL-POSTRTG".to_owned(),
        format!("-A POSTROUTING {c} -j FLANNEL-POSTRTG"),
        format!("-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {sub} -d {NETWORK} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {NETWORK} -d {sub} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG ! -s {NETWORK} -d {sub} {c} -j RETURN"),
        format!("-A FLANNEL-POSTRTG -s {NETWORK} ! -d 224.0.0.0/4 {c} -j MASQUERADE{rf}"),
        format!("-A FLANNEL-POSTRTG ! -s {NETWORK} -d {NETWORK} {c} -j MASQUERADE{rf}"),
    ]
}

/// The FLANNEL lines of `iptables -t nat -S` on node `number`.
async fn nat_flannel_lines(tb: &Testbed, number: usize) -> anyhow::Result<Vec<String>> {
    let out = tb
        .exec(
            &tb.node(number).netns,
            "iptables",
            &["-w", "-t", "nat", "-S"],
            Duration::from_secs(10),
        )
        .await?;
    Ok(out
        .lines()
        .filter(|l| l.contains("FLANNEL"))
        .map(str::to_owned)
        .collect())
}

/// `iptables -t nat -S` shows upstream's exact rules; a rule deleted by hand, and then the
/// jump into the chain, are each back within one resync period, in their place.
#[tokio::test]
async fn masquerade_rules_match_upstream_and_are_restored_within_one_resync() -> anyhow::Result<()> {
    if !require_root("masquerade_rules_match_upstream_and_are_restored_within_one_resync") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(NET_CONF)).await?;
    let resync = format!("--iptables-resync={}", RESYNC.as_secs());
    tb.start_agents(&[1], &["--ip-masq", &resync], READY).await?;
    let sub = tb.node_subnets(1)?.0.context("node 1's subnet")?;
    let want = upstream_masq_lines(sub, iptables_has_random_fully(&tb).await?);
    let have = nat_flannel_lines(&tb, 1).await?;
    assert_eq!(have, want, "iptables -t nat -S differs from upstream's");
    println!("iptables -t nat -S (FLANNEL lines):\n{}", have.join("\n"));

    // The MASQUERADE rule, then the jump into the chain.
    for line in [&want[6], &want[1]] {
        let spec = line.strip_prefix("-A ").context("a rule line")?;
        // The comment is quoted for reading; iptables gets it as one argument.
        // -w: wait for the xtables lock, which the agent's own resync may be holding.
        let mut args = vec!["-w", "-t", "nat", "-D"];
        let (head, tail) = spec.split_once(r#""flanneld masq""#).context("the comment")?;
        args.extend(head.split_whitespace());
        args.push("flanneld masq");
        args.extend(tail.split_whitespace());
        // A successful -D is the proof of deletion: listing afterwards could race with a
        // repair that is already done.
        tb.exec(&tb.node(1).netns, "iptables", &args, Duration::from_secs(10))
            .await?;
        let ((), took) = wait_for("the masquerade rules to be restored", RESYNC + RESYNC_SLACK, || async {
            let now = nat_flannel_lines(&tb, 1).await?;
            ensure!(now == want, "the rules are {now:#?}");
            Ok(())
        })
        .await?;
        println!("deleted `{line}`: restored after {took:?} (resync period {RESYNC:?})");
    }
    tb.shutdown().await
}

/// With `--ip-masq` a pod reaches the outside (which has no route to pods) and the outside
/// sees the node's address; pod-to-pod traffic keeps the pod's address. Without it (node 2)
/// a pod's traffic leaves with its own address and gets no answer.
///
/// Node 2's `subnet.env` is edited to `FLANNEL_IPMASQ=true` before its pod is added: with
/// `false` (what its agent writes without `--ip-masq`) the CNI bridge plugin masquerades
/// instead of flanneld, which is right in production but would hide what this test checks.
#[tokio::test]
async fn masquerading_pods_reach_the_outside_as_their_node() -> anyhow::Result<()> {
    if !require_root("masquerading_pods_reach_the_outside_as_their_node") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(NET_CONF)).await?;
    tb.start_agent(1, &["--ip-masq"]).await?;
    tb.start_agent(2, &[]).await?;
    tb.wait_ready(1, READY).await?;
    tb.wait_ready(2, READY).await?;
    let env2 = tb.read_subnet_env(2)?;
    ensure!(env2.contains("FLANNEL_IPMASQ=false"), "{env2}");
    tb.write_subnet_env(2, &env2.replace("FLANNEL_IPMASQ=false", "FLANNEL_IPMASQ=true"))?;
    let a = tb.add_pod(1, "a").await?;
    let b = tb.add_pod(2, "b").await?;
    let outside = tb.outside();

    // Masqueraded: the outside answers, and sees node 1.
    assert!(tb.ping(&a, OUTSIDE_IP.into()).await, "pod a cannot ping the outside");
    let seen = probe::tcp_source_seen(&a.netns, &outside.netns, outside.ip).await?;
    println!("the outside sees pod a ({}) as {seen}", a.ip());
    assert_eq!(
        seen.ip(),
        IpAddr::from(tb.node(1).ip),
        "not masqueraded to node 1's address"
    );
    // Inside the cluster network nothing is masqueraded.
    let seen = probe::tcp_source_seen(&a.netns, &b.netns, b.ip()).await?;
    assert_eq!(seen.ip(), a.ip(), "pod-to-pod traffic was masqueraded");

    // Not masqueraded: the request reaches the outside with the pod's address, and the
    // outside has no route back.
    let mut capture = tb.spawn(
        &outside.netns,
        "tcpdump-outside",
        "tcpdump",
        &["-n", "-l", "-c", "1", "-i", "eth0", "icmp and src net 10.244.0.0/16"],
    )?;
    capture
        .wait_for_log_line("listening on", Duration::from_secs(10))
        .await?;
    assert!(
        !probe::ping_attempts(&b.netns, OUTSIDE_IP.into(), 1).await,
        "pod b got an answer from the outside without masquerading"
    );
    let line = capture
        .wait_for_log_line("ICMP echo request", Duration::from_secs(5))
        .await?;
    println!("without --ip-masq the outside sees: {line}");
    assert!(line.contains(&format!("IP {} > {OUTSIDE_IP}", b.ip())), "{line}");
    drop(capture);
    tb.shutdown().await
}
