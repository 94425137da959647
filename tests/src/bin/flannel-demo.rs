//! `cargo xtask demo`: a 3-node flannel-rs cluster in network namespaces, with a
//! real etcd, real flanneld processes and pods wired by the real CNI plugins. For
//! each backend it prints the leases, each node's flannel routes, `subnet.env`,
//! a pod-to-pod connectivity matrix (ICMP and TCP), and how long a new lease
//! takes to become a route on the other nodes; then it removes everything.
//!
//! With `--kube` the store is the Kubernetes API emulator instead of etcd: Node objects
//! with pod CIDRs, agents with `--kube-subnet-mgr`, leases as node annotations; the new
//! lease is a new Node object, which is then deleted again.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flannel_tests::testbed::kube::{pod_cidr, ANNOTATION_PREFIX};
use flannel_tests::testbed::{Testbed, TestbedOptions};

/// Runs the flannel-rs demo cluster (needs root).
#[derive(Parser)]
struct Args {
    /// Backends to show, in order: vxlan, host-gw (default: both).
    #[arg(long = "backend", value_delimiter = ',')]
    backends: Vec<String>,
    /// Nodes in the cluster.
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Pods per node.
    #[arg(long, default_value_t = 2)]
    pods: usize,
    /// Use the Kubernetes API emulator as the store (`--kube-subnet-mgr`) instead of etcd.
    #[arg(long)]
    kube: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("demo: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(args: Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the demo builds network namespaces: run it as root");
    }
    let backends = if args.backends.is_empty() {
        vec!["vxlan".to_owned(), "host-gw".to_owned()]
    } else {
        args.backends
    };
    let mut failed = Vec::new();
    for backend in &backends {
        if !demo_backend(backend, args.nodes, args.pods, args.kube).await? {
            failed.push(backend.clone());
        }
    }
    if !failed.is_empty() {
        bail!("connectivity was not complete for: {}", failed.join(", "));
    }
    println!("\nAll pods reached all pods with every backend shown. Everything the demo made is removed.");
    Ok(())
}

fn banner(text: &str) {
    println!("\n{}\n{text}\n{}", "=".repeat(78), "=".repeat(78));
}

async fn demo_backend(backend: &str, nodes: usize, pods: usize, kube: bool) -> anyhow::Result<bool> {
    let store = if kube {
        "Kubernetes API (emulator), --kube-subnet-mgr"
    } else {
        "etcd"
    };
    banner(&format!(
        "backend {backend}: {nodes} nodes, {pods} pods per node, store: {store}"
    ));
    let net_conf = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    println!("net-conf.json: {net_conf}");
    let mut options = TestbedOptions::new(nodes).net_conf(&net_conf);
    if kube {
        options = options.kube();
    }
    let mut tb = Testbed::start(options).await?;
    if kube {
        println!(
            "
Node objects, pod CIDRs assigned as kube-controller-manager would:"
        );
        for n in 1..=nodes {
            println!(
                "  {} ({}): spec.podCIDR {}",
                tb.kube_node_name(n),
                tb.node(n).ip,
                pod_cidr(&net_conf, n)?
            );
        }
    }
    let started = Instant::now();
    for n in 1..=nodes {
        tb.start_agent(n, &["--ip-masq"]).await?;
    }
    for n in 1..=nodes {
        if let Err(e) = tb.wait_ready(n, Duration::from_secs(60)).await {
            let logs = tb.agent_logs(n).unwrap_or_default();
            return Err(e).with_context(|| format!("node {n} did not become ready; its log:\n{logs}"));
        }
    }
    println!(
        "all {nodes} agents ready {:.2} s after start",
        started.elapsed().as_secs_f64()
    );

    if kube {
        print_node_annotations(&tb)?;
    } else {
        let etcd = tb.etcd().context("the testbed has no etcd")?;
        let prefix = tb.subnets_prefix();
        println!("\nleases in etcd ({prefix}):");
        for (key, value) in etcd.get_prefix(&prefix).await? {
            println!("  {key}\n    {value}");
        }
    }
    println!("\n{} of node 1:", tb.node(1).subnet_file().display());
    for line in tb.read_subnet_env(1)?.lines() {
        println!("  {line}");
    }
    for n in 1..=nodes {
        let netns = tb.node(n).netns.clone();
        let routes = tb.ip(&netns, &["route", "show", "proto", "102"]).await?;
        println!(
            "\nnode {n} ({}) routes programmed by flanneld (proto 102):",
            tb.node(n).ip
        );
        for line in routes.lines() {
            println!("  {line}");
        }
        if backend == "vxlan" {
            let fdb = tb
                .exec(
                    &netns,
                    "bridge",
                    &["fdb", "show", "dev", "flannel.1"],
                    Duration::from_secs(5),
                )
                .await?;
            let fdb: Vec<_> = fdb.lines().filter(|l| l.contains("dst")).collect();
            println!("  FDB on flannel.1: {}", fdb.join(" | "));
        }
    }

    let mut all = Vec::new();
    for n in 1..=nodes {
        for p in 1..=pods {
            all.push(tb.add_pod(n, &format!("n{n}p{p}")).await?);
        }
    }
    let matrix = tb.connectivity_matrix(&all).await;
    println!("\npod-to-pod connectivity ({} pods):\n{matrix}", all.len());
    for f in matrix.failures() {
        println!("  FAILED {f}");
    }
    let full = matrix.is_full();

    // A new node appears: how long until the others route to it?
    let seen = if kube {
        kube_node_comes_and_goes(&tb, backend).await?
    } else {
        etcd_lease_comes(&tb, backend).await?
    };
    tb.shutdown().await?;
    Ok(full && seen)
}

/// The flannel annotations of every Node object: the leases of kube mode.
fn print_node_annotations(tb: &Testbed) -> anyhow::Result<()> {
    println!("\nleases = Node annotations written by flanneld (patch of nodes/<name>/status):");
    for (name, annotations) in tb.kube_leases()? {
        println!("  node {name}");
        for (key, value) in annotations {
            println!("    {key}: {value}");
        }
    }
    Ok(())
}

/// Polls node 1 until it has a route to `dst` (`present`) or none (`!present`); how long it
/// took, or `None` after 10 s.
async fn route_change(tb: &Testbed, dst: &str, present: bool) -> anyhow::Result<Option<Duration>> {
    let netns = tb.node(1).netns.clone();
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        let routes = tb.ip(&netns, &["route", "show", dst]).await?;
        if routes.trim().is_empty() != present {
            return Ok(Some(t0.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(None)
}

fn report(what: &str, took: Option<Duration>) {
    match took {
        Some(d) => println!("{what}: {:.1} ms", d.as_secs_f64() * 1000.0),
        None => println!("{what}: not seen within 10 s"),
    }
}

/// A lease written to etcd by hand appears as a route on node 1; then it is deleted.
async fn etcd_lease_comes(tb: &Testbed, backend: &str) -> anyhow::Result<bool> {
    let key = format!("{}10.244.250.0-24", tb.subnets_prefix());
    let value = match backend {
        "vxlan" => r#"{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:c6:12:00:fa"}}"#.to_owned(),
        other => format!(r#"{{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"{other}"}}"#),
    };
    let etcd = tb.etcd().context("no etcd")?;
    etcd.put(&key, &value).await?;
    let seen = route_change(tb, "10.244.250.0/24", true).await?;
    report("\nnew lease in etcd -> route on node 1", seen);
    etcd.delete(&key).await?;
    Ok(seen.is_some())
}

/// A Node object annotated as flanneld annotates it appears (a node joins) and becomes a
/// route on node 1; then it is deleted (`kubectl delete node`) and the route goes.
async fn kube_node_comes_and_goes(tb: &Testbed, backend: &str) -> anyhow::Result<bool> {
    let api = tb.kube_api().context("no API emulator")?;
    let key = |k: &str| format!("{ANNOTATION_PREFIX}{k}");
    let mut annotations = vec![
        (key("backend-type"), backend.to_owned()),
        (key("kube-subnet-manager"), "true".to_owned()),
        (key("public-ip"), "198.18.0.250".to_owned()),
    ];
    if backend == "vxlan" {
        annotations.push((
            key("backend-data"),
            r#"{"VNI":1,"VtepMAC":"0a:58:c6:12:00:fa"}"#.to_owned(),
        ));
    }
    let annotations: Vec<(&str, &str)> = annotations.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    api.add_node("joiner", &["10.244.250.0/24"], &annotations);
    let seen = route_change(tb, "10.244.250.0/24", true).await?;
    report("\nnew Node object -> route on node 1", seen);
    api.delete_node("joiner");
    let gone = route_change(tb, "10.244.250.0/24", false).await?;
    report("Node object deleted -> route gone on node 1", gone);
    Ok(seen.is_some() && gone.is_some())
}
