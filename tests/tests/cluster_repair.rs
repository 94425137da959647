//! Privileged tests of flanneld's reconcile loop against a real cluster: leases that go away
//! (while agents run, and while one is down), a deleted VXLAN device, a deleted host-gw
//! route, and routes flannel does not own, which it must leave alone.
//!
//! They need root; outside CI they skip loudly without it. Build flanneld first
//! (`cargo build -p flannel-agent`). `--nocapture` shows how long each repair took.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use flannel_tests::testbed::leases::{random_vtep_mac, upstream_vxlan_lease_value, StoredLease};
use flannel_tests::testbed::{require_root, wait_for, Testbed, TestbedOptions};
use ipnet::{IpNet, Ipv4Net};

/// Bound on an agent becoming ready.
const READY: Duration = Duration::from_secs(20);
/// Bound on a change reaching the datapath: event-driven repairs take milliseconds.
const CONVERGE: Duration = Duration::from_secs(10);
/// Bound on a repair that only the periodic reconcile (every 10 s) makes.
const PERIODIC: Duration = Duration::from_secs(15);

/// `SubnetMax` keeps the agents' leases below 10.244.200.0, so the tests can use the subnets
/// above for fake peers and foreign routes.
const VXLAN: &str = r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const VXLAN_DEV: &str = "flannel.1";

/// Which of a vxlan peer's three entries node `on` has: the route (proto 102), the
/// permanent neighbour of its VTEP address, the permanent FDB entry of its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entries {
    route: bool,
    neigh: bool,
    fdb: bool,
}

const ALL: Entries = Entries {
    route: true,
    neigh: true,
    fdb: true,
};
const NONE: Entries = Entries {
    route: false,
    neigh: false,
    fdb: false,
};

async fn entries(tb: &Testbed, on: usize, peer: &StoredLease) -> anyhow::Result<Entries> {
    let mac = peer.vtep_mac.as_deref().context("peer lease without VtepMAC")?;
    let route = tb
        .route_to(on, peer.subnet.into())
        .await?
        .is_some_and(|r| r.is_flannel());
    let neigh = tb
        .neighbours(on, VXLAN_DEV, false)
        .await?
        .iter()
        .any(|n| n.ip == IpAddr::V4(peer.subnet.network()) && n.mac.as_deref() == Some(mac) && n.permanent);
    let fdb = tb
        .fdb(on, VXLAN_DEV)
        .await?
        .iter()
        .any(|f| f.mac == mac && f.dst == Some(IpAddr::V4(peer.public_ip)) && f.permanent);
    Ok(Entries { route, neigh, fdb })
}

/// Waits until node `on` has exactly `want` of `peer`'s entries; returns how long it took.
async fn wait_entries(
    tb: &Testbed,
    on: usize,
    peer: &StoredLease,
    want: Entries,
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let what = format!("node {on}: entries of {} to be {want:?}", peer.key);
    let ((), took) = wait_for(&what, timeout, || async {
        let have = entries(tb, on, peer).await?;
        ensure!(have == want, "they are {have:?}");
        Ok(())
    })
    .await?;
    Ok(took)
}

async fn vxlan_cluster(nodes: usize) -> anyhow::Result<(Testbed, Vec<StoredLease>)> {
    let mut tb = Testbed::start(TestbedOptions::new(nodes).net_conf(VXLAN)).await?;
    let all: Vec<usize> = (1..=nodes).collect();
    tb.start_agents(&all, &[], READY).await?;
    let mut leases = Vec::new();
    for n in 1..=nodes {
        leases.push(tb.node_lease(n).await?);
    }
    for on in 1..=nodes {
        for (i, peer) in leases.iter().enumerate() {
            if i + 1 != on {
                wait_entries(&tb, on, peer, ALL, CONVERGE).await?;
            }
        }
    }
    Ok((tb, leases))
}

/// (a) A node's lease is removed from etcd (its agent stopped first): every other node drops
/// its route, neighbour and FDB entries, and keeps the others'.
#[tokio::test]
async fn a_removed_lease_is_dropped_by_every_node() -> anyhow::Result<()> {
    if !require_root("a_removed_lease_is_dropped_by_every_node") {
        return Ok(());
    }
    let (mut tb, leases) = vxlan_cluster(3).await?;
    tb.stop_agent(3).await?;
    // Stopping leaves lease and datapath in place, as upstream.
    assert_eq!(entries(&tb, 1, &leases[2]).await?, ALL);
    tb.etcd().context("etcd")?.delete(&leases[2].key).await?;
    for on in [1, 2] {
        let took = wait_entries(&tb, on, &leases[2], NONE, CONVERGE).await?;
        println!("node {on} dropped the removed lease's entries after {took:?}");
    }
    assert_eq!(entries(&tb, 1, &leases[1]).await?, ALL);
    assert_eq!(entries(&tb, 2, &leases[0]).await?, ALL);
    tb.shutdown().await
}

/// (b) A peer leaves while an agent is down: when that agent is ready again, the stale
/// entries are gone (readiness comes after the first complete reconcile).
#[tokio::test]
async fn a_peer_that_left_while_the_agent_was_down_is_removed_on_restart() -> anyhow::Result<()> {
    if !require_root("a_peer_that_left_while_the_agent_was_down_is_removed_on_restart") {
        return Ok(());
    }
    let (mut tb, leases) = vxlan_cluster(3).await?;
    tb.stop_agent(1).await?;
    tb.stop_agent(3).await?;
    tb.etcd().context("etcd")?.delete(&leases[2].key).await?;
    // Node 2's agent runs, so node 3 is gone there; node 1 missed the removal.
    wait_entries(&tb, 2, &leases[2], NONE, CONVERGE).await?;
    assert_eq!(
        entries(&tb, 1, &leases[2]).await?,
        ALL,
        "node 1 had no agent to remove them"
    );

    let restarted = Instant::now();
    tb.restart_agent(1).await?;
    tb.wait_ready(1, READY).await?;
    println!("node 1 ready again after {:?}", restarted.elapsed());
    assert_eq!(
        entries(&tb, 1, &leases[2]).await?,
        NONE,
        "stale entries of the departed peer are still there when the agent reports ready"
    );
    assert_eq!(entries(&tb, 1, &leases[1]).await?, ALL);
    tb.shutdown().await
}

/// (c) `ip link del flannel.1`: the agent re-creates it with the same MAC (peers have it in
/// their FDB), its address, and every peer's entries; traffic flows again.
#[tokio::test]
async fn a_deleted_vxlan_device_is_restored_with_its_mac_and_entries() -> anyhow::Result<()> {
    if !require_root("a_deleted_vxlan_device_is_restored_with_its_mac_and_entries") {
        return Ok(());
    }
    let (mut tb, leases) = vxlan_cluster(3).await?;
    let a = tb.add_pod(1, "a").await?;
    let b = tb.add_pod(2, "b").await?;
    tb.tcp_check(&a, &b).await?;
    let mac = tb.link_mac(1, VXLAN_DEV).await?.context("flannel.1 on node 1")?;
    assert_eq!(leases[0].vtep_mac.as_deref(), Some(mac.as_str()));
    let own_addr = format!("{}/32", leases[0].subnet.network());

    let deleted = Instant::now();
    tb.ip(&tb.node(1).netns, &["link", "del", VXLAN_DEV]).await?;
    let ((), took) = wait_for("flannel.1 back with its MAC, address and entries", CONVERGE, || async {
        let now = tb.link_mac(1, VXLAN_DEV).await?;
        ensure!(
            now.as_deref() == Some(mac.as_str()),
            "flannel.1 MAC is {now:?}, want {mac}"
        );
        let addrs = tb
            .ip(&tb.node(1).netns, &["-4", "addr", "show", "dev", VXLAN_DEV])
            .await?;
        ensure!(addrs.contains(&own_addr), "flannel.1 lacks {own_addr}: {addrs}");
        for peer in &leases[1..] {
            let have = entries(&tb, 1, peer).await?;
            ensure!(have == ALL, "entries of {}: {have:?}", peer.key);
        }
        Ok(())
    })
    .await?;
    println!("flannel.1 restored with MAC {mac} and all entries after {took:?}");
    // Traffic both ways, through the re-created device.
    tb.tcp_check(&a, &b).await?;
    tb.tcp_check(&b, &a).await?;
    assert!(tb.ping(&a, b.ip()).await && tb.ping(&b, a.ip()).await);
    println!("traffic flows again {:?} after the delete", deleted.elapsed());
    tb.shutdown().await
}

/// (e) Routes flannel does not own stay across reconciles: one outside the cluster network,
/// and one inside it (`proto static`, to a subnet no node has). Reconciles are forced by a
/// fake peer coming and going (its removal is a complete reconcile that deletes) and by a
/// pod's veth appearing (a link event).
#[tokio::test]
async fn routes_flannel_does_not_own_are_left_alone() -> anyhow::Result<()> {
    if !require_root("routes_flannel_does_not_own_are_left_alone") {
        return Ok(());
    }
    let (mut tb, _) = vxlan_cluster(2).await?;
    let ns = tb.node(1).netns.clone();
    let outside: IpNet = "10.99.0.0/24".parse()?;
    let inside: IpNet = "10.244.250.0/24".parse()?;
    tb.ip(&ns, &["route", "add", &outside.to_string(), "via", "198.18.0.254"])
        .await?;
    tb.ip(
        &ns,
        &[
            "route",
            "add",
            &inside.to_string(),
            "via",
            "198.18.0.254",
            "proto",
            "static",
        ],
    )
    .await?;
    let before = (
        tb.route_to(1, outside).await?.context("10.99.0.0/24")?,
        tb.route_to(1, inside).await?.context("10.244.250.0/24")?,
    );
    assert_eq!(before.1.protocol, "static");

    let fake: Ipv4Net = "10.244.241.0/24".parse()?;
    let value = upstream_vxlan_lease_value("198.18.1.41".parse()?, 1, &random_vtep_mac());
    let key = tb.put_lease(fake, None, &value, Some(3600)).await?;
    let route_is = |want: bool| {
        let tb = &tb;
        move || async move {
            let r = tb.route_to(1, fake.into()).await?;
            match (want, r) {
                (true, Some(r)) if r.is_flannel() => Ok(()),
                (false, None) => Ok(()),
                (_, r) => bail!("route to the fake peer: {r:?}"),
            }
        }
    };
    wait_for("the fake peer's route", CONVERGE, route_is(true)).await?;
    tb.etcd().context("etcd")?.delete(&key).await?;
    wait_for("the fake peer's route to go", CONVERGE, route_is(false)).await?;
    tb.add_pod(1, "nudge").await?;
    // Give the link event's reconcile time to run (it waits 100 ms for a burst to settle).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let after = (tb.route_to(1, outside).await?, tb.route_to(1, inside).await?);
    assert_eq!(
        after.0.as_ref(),
        Some(&before.0),
        "the route outside the network changed"
    );
    assert_eq!(
        after.1.as_ref(),
        Some(&before.1),
        "the proto static route inside the network changed"
    );
    tb.shutdown().await
}

/// (f) host-gw: a peer's route deleted by hand comes back (by the periodic reconcile, as
/// upstream's 10 s route check), and traffic flows again.
#[tokio::test]
async fn host_gw_restores_a_deleted_route() -> anyhow::Result<()> {
    if !require_root("host_gw_restores_a_deleted_route") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(HOST_GW)).await?;
    tb.start_agents(&[1, 2], &[], READY).await?;
    let a = tb.add_pod(1, "a").await?;
    let b = tb.add_pod(2, "b").await?;
    let peer: IpNet = tb.node_subnets(2)?.0.context("node 2's subnet")?.into();
    let route = tb.route_to(1, peer).await?.context("node 1's route to node 2")?;
    assert!(
        route.is_flannel() && route.gateway == Some(tb.node(2).ip.into()),
        "{route:?}"
    );
    tb.tcp_check(&a, &b).await?;

    tb.ip(&tb.node(1).netns, &["route", "del", &peer.to_string()]).await?;
    // No check that traffic stops in between: a reconcile already pending (pods'
    // veths are link events) may put the route back before a probe could run.
    let ((), took) = wait_for("the deleted host-gw route to come back", PERIODIC, || async {
        let now = tb.route_to(1, peer).await?;
        ensure!(now.as_ref() == Some(&route), "route to {peer}: {now:?}");
        Ok(())
    })
    .await?;
    println!("host-gw route to {peer} restored after {took:?}");
    tb.tcp_check(&a, &b).await?;
    assert!(tb.ping(&a, b.ip()).await);
    tb.shutdown().await
}
