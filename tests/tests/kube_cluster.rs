//! Privileged tests of a 3-node cluster in kube mode: the Kubernetes API emulator is the store
//! (Node objects with pod CIDRs, as kube-controller-manager assigns them), real flanneld with
//! `--kube-subnet-mgr` on every node, pods wired by the flannel CNI plugin. With the vxlan
//! backend on the eBPF and on the kernel datapath: every node publishes its lease as
//! annotations and sets NetworkUnavailable=False; the pod matrix is full over ICMP, TCP and
//! UDP; deleting a Node object takes its routes (and FDB entry or eBPF map entry) away on the
//! others, while the remaining pods still reach each other. And the agent keeps the CNI plugin
//! and the conflist installed, as the manifest asks it to.
//!
//! They need root; outside CI they skip loudly without it. Build the binaries first
//! (`cargo build -p flannel-agent --bins`). `--nocapture` shows the matrices.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use flannel_agent::dataplane::pinned_vteps;
use flannel_tests::testbed::kube::{pod_cidr, ANNOTATION_PREFIX};
use flannel_tests::testbed::probe::{http_get, ping_attempts, udp_check};
use flannel_tests::testbed::{require_root, wait_for, Pod, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};
use ipnet::IpNet;
use serde_json::Value;

/// Bound on an agent becoming ready.
const READY: Duration = Duration::from_secs(30);
/// Bound on a change in the API reaching the datapath of other nodes, and on the agent
/// noticing a change on the host (its reconcile period is 10 s).
const CONVERGE: Duration = Duration::from_secs(15);
/// UDP datagrams per pod pair.
const DATAGRAMS: u32 = 10;

const EBPF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"ebpf"}}"#;
const KERNEL: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan","Datapath":"kernel"}}"#;

/// The annotations every agent must have written, and the NetworkUnavailable condition.
fn check_node_object(tb: &Testbed, number: usize) -> anyhow::Result<()> {
    let api = tb.kube_api().context("kube mode")?;
    let name = tb.kube_node_name(number);
    let node = api.node(&name).with_context(|| format!("Node {name}"))?;
    let ann = &node["metadata"]["annotations"];
    let get = |k: &str| ann[format!("{ANNOTATION_PREFIX}{k}")].as_str().map(str::to_owned);
    ensure!(get("kube-subnet-manager").as_deref() == Some("true"), "{name}: {ann:#}");
    ensure!(get("backend-type").as_deref() == Some("vxlan"), "{name}: {ann:#}");
    let public_ip = tb.node(number).ip.to_string();
    ensure!(get("public-ip") == Some(public_ip), "{name}: {ann:#}");
    let data: Value = serde_json::from_str(&get("backend-data").context("no backend-data")?)?;
    ensure!(data["VNI"] == 1 && data["VtepMAC"].is_string(), "{name}: {data}");
    let conds = node["status"]["conditions"].as_array().context("no conditions")?;
    let nu = conds
        .iter()
        .find(|c| c["type"] == "NetworkUnavailable")
        .with_context(|| format!("{name} has no NetworkUnavailable condition"))?;
    ensure!(nu["status"] == "False" && nu["reason"] == "FlannelIsUp", "{name}: {nu}");
    Ok(())
}

/// Every ordered pair of `pods` exchanges UDP datagrams.
async fn udp_matrix(pods: &[Pod]) -> anyhow::Result<()> {
    for from in pods {
        for to in pods.iter().filter(|p| p.name != from.name) {
            udp_check(&from.netns, &to.netns, to.ip(), DATAGRAMS)
                .await
                .with_context(|| format!("UDP {} -> {} ({})", from.name, to.name, to.ip()))?;
        }
    }
    Ok(())
}

/// Whether node `number` has a route to `dst`, and, with the eBPF datapath, how many VTEPs
/// its pinned map holds.
async fn routes_to(tb: &mut Testbed, number: usize, dst: IpNet, ebpf: bool) -> anyhow::Result<(bool, Option<usize>)> {
    let route = tb.route_to(number, dst).await?.is_some();
    let vteps = if ebpf {
        Some(pinned_vteps(&tb.bpf_pin_dir(number)?)?.len())
    } else {
        None
    };
    Ok((route, vteps))
}

async fn kube_cluster(net_conf: &str, ebpf: bool) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut tb = Testbed::start(TestbedOptions::new(3).net_conf(net_conf).kube()).await?;
    tb.start_agents(&[1, 2, 3], &["--ip-masq"], READY).await?;
    for n in 1..=3 {
        check_node_object(&tb, n)?;
        let (subnet, _) = tb.node_subnets(n)?;
        let want = pod_cidr(net_conf, n)?;
        ensure!(
            subnet == Some(want),
            "node {n}: subnet.env has {subnet:?}, Node has {want}"
        );
    }
    let mut pods = Vec::new();
    for n in 1..=3 {
        pods.push(tb.add_pod(n, &format!("k{n}")).await?);
    }
    let matrix = tb.connectivity_matrix(&pods).await;
    println!("kube mode, vxlan, ebpf={ebpf}:\n{matrix}");
    matrix.assert_full();
    udp_matrix(&pods).await?;

    // The Node object of node 3 goes (kubectl delete node): the others drop its route.
    let gone = IpNet::V4(pod_cidr(net_conf, 3)?);
    let kept = IpNet::V4(pod_cidr(net_conf, 2)?);
    for n in [1, 2] {
        let (route, vteps) = routes_to(&mut tb, n, gone, ebpf).await?;
        ensure!(route, "node {n} has no route to {gone} before the deletion");
        ensure!(vteps.is_none_or(|v| v == 2), "node {n}: {vteps:?} VTEPs in the map");
    }
    let api = tb.kube_api().context("kube mode")?;
    ensure!(api.delete_node(&tb.kube_node_name(3)), "Node n3 was there");
    let t0 = Instant::now();
    for n in [1, 2] {
        wait_for(&format!("node {n} drops its route to {gone}"), CONVERGE, || {
            let tb = &tb;
            async move {
                let route = tb.route_to(n, gone).await?;
                ensure!(route.is_none(), "still there: {route:?}");
                Ok(())
            }
        })
        .await?;
        if ebpf {
            let vteps = pinned_vteps(&tb.bpf_pin_dir(n)?)?;
            ensure!(vteps.len() == 1, "node {n} still has {vteps:?}");
        }
    }
    println!("Node n3 deleted -> routes gone on n1 and n2 in {:?}", t0.elapsed());
    let (route, _) = routes_to(&mut tb, 1, kept, ebpf).await?;
    ensure!(route, "node 1 lost its route to node 2's {kept}");
    let (a, b) = (&pods[0], &pods[1]);
    tb.tcp_check(a, b).await.context("n1 -> n2 after the deletion")?;
    ensure!(tb.ping(b, a.ip()).await, "n2 -> n1 after the deletion");
    udp_check(&a.netns, &b.netns, b.ip(), DATAGRAMS).await?;
    // One attempt: the path was shown to work, so a lost echo means no route.
    ensure!(
        !ping_attempts(&a.netns, pods[2].ip(), 1).await,
        "{} still reaches the pod of the deleted node",
        a.name
    );
    println!("kube cluster test took {:?}", started.elapsed());
    tb.shutdown().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_vxlan_ebpf_matrix_and_node_deletion() -> anyhow::Result<()> {
    if !require_root("kube_mode_vxlan_ebpf_matrix_and_node_deletion") {
        return Ok(());
    }
    kube_cluster(EBPF, true).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kube_mode_vxlan_kernel_matrix_and_node_deletion() -> anyhow::Result<()> {
    if !require_root("kube_mode_vxlan_kernel_matrix_and_node_deletion") {
        return Ok(());
    }
    kube_cluster(KERNEL, false).await
}

/// Field problem B2: the agent keeps the CNI plugin and the conflist installed. Deleted (a
/// package upgrade re-creating /opt/cni/bin), they come back within seconds and are counted;
/// while they cannot be installed, the agent is not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_keeps_the_cni_plugin_and_conflist_installed() -> anyhow::Result<()> {
    if !require_root("the_agent_keeps_the_cni_plugin_and_conflist_installed") {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(KERNEL).kube()).await?;
    let dir = tb.node(1).dir.clone();
    let (bin_dir, conf_dir) = (dir.join("opt-cni-bin"), dir.join("etc-cni-net.d"));
    std::fs::create_dir_all(&bin_dir)?;
    std::fs::create_dir_all(&conf_dir)?;
    let conf_source = dir.join("cni-conf.json");
    std::fs::write(
        &conf_source,
        r#"{"name":"cbr0","cniVersion":"0.3.1","plugins":[{"type":"flannel"}]}"#,
    )?;
    // A stand-in for the plugin binary: the agent copies bytes, and the real debug build
    // is ~200 MB, which would make every copy and comparison slow on a loaded machine.
    let plugin_source = dir.join("flannel-plugin");
    std::fs::write(&plugin_source, b"\x7fELF stand-in for the flannel CNI plugin")?;
    let (plugin, conflist) = (bin_dir.join("flannel"), conf_dir.join("10-flannel.conflist"));
    let arg = |flag: &str, path: &std::path::Path| format!("--{flag}={}", path.display());
    let args = [
        arg("cni-plugin-source", &plugin_source),
        arg("cni-plugin-dest", &plugin),
        arg("cni-conf-source", &conf_source),
        arg("cni-conf-dest", &conflist),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    tb.start_agents(&[1], &args, READY).await?;
    ensure!(
        std::fs::read(&plugin)? == std::fs::read(&plugin_source)?,
        "plugin not installed"
    );
    ensure!(
        std::fs::read(&conflist)? == std::fs::read(&conf_source)?,
        "conflist not installed"
    );

    std::fs::remove_file(&plugin)?;
    std::fs::write(&conflist, "{}")?;
    let t0 = Instant::now();
    wait_for("the plugin and the conflist are back", CONVERGE, || {
        let (plugin, conflist, plugin_source, conf_source) = (&plugin, &conflist, &plugin_source, &conf_source);
        async move {
            ensure!(plugin.exists(), "no plugin");
            ensure!(
                std::fs::read(conflist)? == std::fs::read(conf_source)?,
                "conflist differs"
            );
            ensure!(
                std::fs::read(plugin)? == std::fs::read(plugin_source)?,
                "plugin differs"
            );
            Ok(())
        }
    })
    .await?;
    println!(
        "deleted plugin and changed conflist installed again in {:?}",
        t0.elapsed()
    );
    let node = tb.node(1).clone();
    let metrics = SocketAddr::new(node.ip.into(), AGENT_HEALTHZ_PORT);
    let (_, text) = http_get(&node.netns, metrics, "/metrics").await?;
    ensure!(text.contains("flannel_cni_reinstalls_total 2"), "{text}");

    // The host directory is gone (not mounted): not ready, until it is back. Readiness
    // follows the installer's next check (every 2 s), not the next 10 s reconcile.
    std::fs::remove_dir_all(&bin_dir)?;
    let t0 = Instant::now();
    wait_for("the agent is not ready", Duration::from_secs(6), || async {
        let (code, body) = http_get(&node.netns, metrics, "/readyz").await?;
        ensure!(code != 200, "{code} {body}");
        Ok(())
    })
    .await?;
    println!("not ready {:?} after the CNI directory went", t0.elapsed());
    std::fs::create_dir_all(&bin_dir)?;
    let t0 = Instant::now();
    tb.wait_ready(1, Duration::from_secs(6)).await?;
    println!("ready again {:?} after it came back", t0.elapsed());
    ensure!(plugin.exists(), "plugin not installed again");
    tb.shutdown().await
}
