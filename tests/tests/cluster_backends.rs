//! Privileged tests of the real flanneld on a testbed cluster: full pod-to-pod connectivity
//! (ICMP and TCP) with each backend, IPv4 and dual stack; a mixed cluster with a node set up
//! by hand exactly as upstream flanneld would; and how long a new lease takes to become a
//! route on another node.
//!
//! They need root; outside CI they skip loudly without it. Build flanneld first
//! (`cargo build -p flannel-agent`). `--nocapture` shows the matrices and timings.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use flannel_tests::testbed::inspect::Route;
use flannel_tests::testbed::leases::{random_vtep_mac, upstream_vxlan_lease_value};
use flannel_tests::testbed::timing::write_metric;
use flannel_tests::testbed::upstream::UPSTREAM_VXLAN_DEV;
use flannel_tests::testbed::{poll_until, probe, require_root, wait_for, Pod, Testbed, TestbedOptions};
use ipnet::{IpNet, Ipv4Net};

/// Bound on an agent becoming ready (it takes well under a second here).
const READY: Duration = Duration::from_secs(20);
/// Bound on a change reaching the datapath of other nodes.
const CONVERGE: Duration = Duration::from_secs(10);

const VXLAN: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const HOST_GW: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"host-gw"}}"#;
const VXLAN_DUAL: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
const HOST_GW_DUAL: &str =
    r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"host-gw"}}"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Vxlan,
    HostGw,
}

/// The route node `on` must have to node `peer`'s subnet in one family.
fn check_route(tb: &Testbed, kind: Kind, peer: usize, subnet: IpNet, route: Option<&Route>) -> anyhow::Result<()> {
    let route = route.with_context(|| format!("no route to {subnet}"))?;
    ensure!(route.is_flannel(), "route to {subnet} is not proto 102: {route:?}");
    let v6 = matches!(subnet, IpNet::V6(_));
    match kind {
        Kind::Vxlan => {
            let dev = if v6 { "flannel-v6.1" } else { "flannel.1" };
            ensure!(
                route.dev.as_deref() == Some(dev) && route.onlink && route.gateway == Some(subnet.network()),
                "vxlan route to {subnet} should be via {} dev {dev} onlink: {route:?}",
                subnet.network()
            );
            // IPv4 peers go through a nexthop object whose id is the gateway address;
            // IPv6 peers keep plain routes.
            let want_nhid = match subnet {
                IpNet::V4(s) => Some(u32::from(s.network())),
                IpNet::V6(_) => None,
            };
            ensure!(
                route.nhid == want_nhid,
                "vxlan route to {subnet} should use nexthop object {want_nhid:?}: {route:?}"
            );
        }
        Kind::HostGw => {
            let node = tb.node(peer);
            let gw: IpAddr = if v6 { node.ipv6.into() } else { node.ip.into() };
            ensure!(
                route.dev.as_deref() == Some("eth0") && route.gateway == Some(gw),
                "host-gw route to {subnet} should be via {gw} dev eth0: {route:?}"
            );
        }
    }
    Ok(())
}

/// Every node has exactly one flannel route per other node and family, of the backend's
/// shape.
async fn check_routes(tb: &Testbed, kind: Kind, dual_stack: bool) -> anyhow::Result<()> {
    let n = tb.nodes().len();
    for on in 1..=n {
        for v6 in [false, true] {
            if v6 && !dual_stack {
                continue;
            }
            let routes = tb.flannel_routes(on, v6).await?;
            ensure!(
                routes.len() == n - 1,
                "node {on} has {} flannel routes (IPv6: {v6}), expected {}: {routes:#?}",
                routes.len(),
                n - 1
            );
            for peer in (1..=n).filter(|&p| p != on) {
                let (sn4, sn6) = tb.node_subnets(peer)?;
                let subnet: IpNet = if v6 {
                    sn6.context("no IPv6 subnet")?.into()
                } else {
                    sn4.context("no IPv4 subnet")?.into()
                };
                let route = routes.iter().find(|r| r.dst == subnet);
                check_route(tb, kind, peer, subnet, route).with_context(|| format!("on node {on}"))?;
            }
        }
    }
    Ok(())
}

/// 3 nodes with agents, 2 pods each, every pod to every pod with ICMP and TCP.
async fn full_matrix(test: &str, net_conf: &str, kind: Kind, dual_stack: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(net_conf)).await?;
    tb.start_agents(&[1, 2, 3], &["--ip-masq"], READY).await?;
    let ready = started.elapsed();
    let mut pods: Vec<Pod> = Vec::new();
    for node in 1..=3 {
        for i in 1..=2 {
            pods.push(tb.add_pod(node, &format!("p{node}-{i}")).await?);
        }
    }
    if dual_stack {
        ensure!(pods.iter().all(|p| p.ipv6().is_some()), "pods without IPv6: {pods:#?}");
    }
    // The routes are installed before readiness; by now they must all be there.
    wait_for("every node's flannel routes", CONVERGE, || {
        check_routes(&tb, kind, dual_stack)
    })
    .await?;

    let v4 = tb.connectivity_matrix(&pods).await;
    println!("{test}: IPv4\n{v4}");
    v4.assert_full();
    if dual_stack {
        let endpoints: Vec<_> = pods.iter().filter_map(Pod::endpoint_v6).collect();
        let v6 = probe::Matrix::probe(&endpoints).await;
        println!("{test}: IPv6\n{v6}");
        v6.assert_full();
    }
    println!(
        "{test}: agents ready after {ready:?}, matrix done after {:?}",
        started.elapsed()
    );
    tb.shutdown().await
}

#[tokio::test]
async fn vxlan_ipv4_full_matrix() -> anyhow::Result<()> {
    if !require_root("vxlan_ipv4_full_matrix") {
        return Ok(());
    }
    full_matrix("vxlan_ipv4_full_matrix", VXLAN, Kind::Vxlan, false).await
}

#[tokio::test]
async fn host_gw_ipv4_full_matrix() -> anyhow::Result<()> {
    if !require_root("host_gw_ipv4_full_matrix") {
        return Ok(());
    }
    full_matrix("host_gw_ipv4_full_matrix", HOST_GW, Kind::HostGw, false).await
}

#[tokio::test]
async fn vxlan_dual_stack_full_matrix() -> anyhow::Result<()> {
    if !require_root("vxlan_dual_stack_full_matrix") {
        return Ok(());
    }
    full_matrix("vxlan_dual_stack_full_matrix", VXLAN_DUAL, Kind::Vxlan, true).await
}

#[tokio::test]
async fn host_gw_dual_stack_full_matrix() -> anyhow::Result<()> {
    if !require_root("host_gw_dual_stack_full_matrix") {
        return Ok(());
    }
    full_matrix("host_gw_dual_stack_full_matrix", HOST_GW_DUAL, Kind::HostGw, true).await
}

/// A rolling migration's midpoint: nodes 1 and 2 run flannel-rs (vxlan), node 3 is set up by
/// hand exactly as upstream flanneld sets up a vxlan node (its device, its lease JSON in etcd,
/// its neighbour/FDB/route entries for the flannel-rs peers, its subnet.env). Every pod
/// reaches every pod.
#[tokio::test]
async fn mixed_cluster_with_an_upstream_node_has_full_connectivity() -> anyhow::Result<()> {
    if !require_root("mixed_cluster_with_an_upstream_node_has_full_connectivity") {
        return Ok(());
    }
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(VXLAN)).await?;
    let network: Ipv4Net = "10.244.0.0/16".parse()?;
    let upstream_subnet: Ipv4Net = "10.244.200.0/24".parse()?;
    // Written before the agents start: they see it in their first listing, as they would
    // see the leases of an existing upstream cluster.
    let upstream = tb.setup_upstream_vxlan_node(3, network, upstream_subnet, true).await?;
    let stored = tb.etcd().context("etcd")?.get(&upstream.key).await?;
    assert_eq!(
        stored.as_deref(),
        Some(upstream_vxlan_lease_value(tb.node(3).ip, 1, &upstream.vtep_mac).as_str())
    );
    tb.start_agents(&[1, 2], &["--ip-masq"], READY).await?;
    let peers = upstream.add_peers(&tb).await?;
    assert_eq!(peers, 2, "the upstream node should program both flannel-rs nodes");

    // The flannel-rs nodes program the upstream node like any peer.
    for on in [1, 2] {
        wait_for("the route to the upstream node", CONVERGE, || async {
            let route = tb.route_to(on, upstream_subnet.into()).await?;
            check_route(&tb, Kind::Vxlan, 3, upstream_subnet.into(), route.as_ref())?;
            let neigh = tb.neighbours(on, "flannel.1", false).await?;
            ensure!(
                neigh.iter().any(|n| n.ip == IpAddr::V4(upstream_subnet.network())
                    && n.mac.as_deref() == Some(upstream.vtep_mac.as_str())
                    && n.permanent),
                "node {on}: no permanent neighbour for the upstream VTEP: {neigh:?}"
            );
            let fdb = tb.fdb(on, "flannel.1").await?;
            ensure!(
                fdb.iter()
                    .any(|f| f.mac == upstream.vtep_mac && f.dst == Some(IpAddr::V4(tb.node(3).ip)) && f.permanent),
                "node {on}: no FDB entry for the upstream VTEP: {fdb:?}"
            );
            Ok(())
        })
        .await?;
    }

    let mut pods = Vec::new();
    for node in 1..=3 {
        for i in 1..=2 {
            pods.push(tb.add_pod(node, &format!("m{node}-{i}")).await?);
        }
    }
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("mixed cluster (n3 = upstream by hand):\n{matrix}");
    matrix.assert_full();
    // flannel-rs did not disturb the hand-made node's device.
    assert_eq!(
        tb.link_mac(3, UPSTREAM_VXLAN_DEV).await?.as_deref(),
        Some(upstream.vtep_mac.as_str())
    );
    println!("mixed cluster done after {:?}", started.elapsed());
    tb.shutdown().await
}

/// How many fake leases the latency test writes.
const LATENCY_SAMPLES: u8 = 5;
/// How often it looks at the routing table.
const LATENCY_POLL: Duration = Duration::from_millis(5);

fn summary(samples: &[Duration]) -> String {
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let all: Vec<String> = ms.iter().map(|m| format!("{m:.1}")).collect();
    format!(
        "min {:.1} ms, median {:.1} ms, max {:.1} ms (samples: {})",
        ms[0],
        ms[ms.len() / 2],
        ms[ms.len() - 1],
        all.join(" ")
    )
}

/// Measures, for fake remote vxlan nodes, the time from writing the lease into etcd to its
/// route appearing on a node (`proto 102`), and from deleting it to the route going. Printed
/// and written to `target/test-metrics/lease-to-route.txt`; asserted only against a generous
/// bound.
#[tokio::test]
async fn lease_to_route_latency() -> anyhow::Result<()> {
    if !require_root("lease_to_route_latency") {
        return Ok(());
    }
    // SubnetMax keeps the agents out of the subnets the fake leases use.
    let conf = r#"{"Network":"10.244.0.0/16","SubnetMax":"10.244.200.0","Backend":{"Type":"vxlan"}}"#;
    let mut tb = Testbed::start(TestbedOptions::new(2).net_conf(conf)).await?;
    tb.start_agents(&[1, 2], &[], READY).await?;
    // Let the agents' own start-up reconciles settle.
    wait_for("node 1 to route to node 2", CONVERGE, || async {
        let routes = tb.flannel_routes(1, false).await?;
        ensure!(routes.len() == 1, "{routes:?}");
        Ok(())
    })
    .await?;

    let (mut added, mut removed) = (Vec::new(), Vec::new());
    for i in 0..LATENCY_SAMPLES {
        let subnet: Ipv4Net = format!("10.244.{}.0/24", 240 + i).parse()?;
        let public_ip = std::net::Ipv4Addr::new(198, 18, 1, 10 + i);
        let value = upstream_vxlan_lease_value(public_ip, 1, &random_vtep_mac());
        let dst: IpNet = subnet.into();
        let route_present = |want: bool| {
            let tb = &tb;
            move || async move {
                let route = tb.route_to(1, dst).await?;
                match (want, route) {
                    (true, Some(r)) if r.is_flannel() => Ok(()),
                    (false, None) => Ok(()),
                    (_, r) => bail!("route to {dst}: {r:?}"),
                }
            }
        };
        let t0 = Instant::now();
        let key = tb.put_lease(subnet, None, &value, Some(3600)).await?;
        poll_until("the fake node's route", CONVERGE, LATENCY_POLL, route_present(true)).await?;
        added.push(t0.elapsed());

        let t0 = Instant::now();
        tb.etcd().context("etcd")?.delete(&key).await?;
        poll_until(
            "the fake node's route to go",
            CONVERGE,
            LATENCY_POLL,
            route_present(false),
        )
        .await?;
        removed.push(t0.elapsed());
    }
    let report = format!(
        "lease-to-route: etcd put of a new vxlan lease -> its route (proto 102) visible on another node, \
         {LATENCY_SAMPLES} samples, polled every {LATENCY_POLL:?}: {}\n\
         lease-delete-to-route-gone: etcd delete -> the route gone: {}\n",
        summary(&added),
        summary(&removed)
    );
    print!("{report}");
    let path = write_metric("lease-to-route.txt", &report)?;
    println!("written to {}", path.display());
    for d in added.iter().chain(&removed) {
        assert!(*d < Duration::from_secs(10), "{report}");
    }
    tb.shutdown().await
}
