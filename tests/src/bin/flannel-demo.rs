//! `cargo xtask demo`: a 3-node flannel-rs cluster in network namespaces, with a
//! real etcd, real flanneld processes and pods wired by the real CNI plugins. For
//! each backend it prints the leases, each node's flannel routes, `subnet.env`,
//! a pod-to-pod connectivity matrix (ICMP and TCP), and how long a new lease
//! takes to become a route on the other nodes; then it removes everything.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
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
        if !demo_backend(backend, args.nodes, args.pods).await? {
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

async fn demo_backend(backend: &str, nodes: usize, pods: usize) -> anyhow::Result<bool> {
    banner(&format!("backend {backend}: {nodes} nodes, {pods} pods per node"));
    let net_conf = format!(r#"{{"Network":"10.244.0.0/16","Backend":{{"Type":"{backend}"}}}}"#);
    println!("net-conf.json: {net_conf}");
    let mut tb = Testbed::start(TestbedOptions::new(nodes).net_conf(&net_conf)).await?;
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

    let etcd = tb.etcd().context("the testbed has no etcd")?;
    let prefix = format!("{}/subnets/", tb.options().etcd_prefix.trim_end_matches('/'));
    println!("\nleases in etcd ({prefix}):");
    for (key, value) in etcd.get_prefix(&prefix).await? {
        println!("  {key}\n    {value}");
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
    let key = format!("{prefix}10.244.250.0-24");
    let value = match backend {
        "vxlan" => r#"{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"0a:58:c6:12:00:fa"}}"#.to_owned(),
        other => format!(r#"{{"PublicIP":"198.18.0.250","PublicIPv6":null,"BackendType":"{other}"}}"#),
    };
    let netns = tb.node(1).netns.clone();
    let t0 = Instant::now();
    tb.etcd().context("no etcd")?.put(&key, &value).await?;
    let mut seen = None;
    while t0.elapsed() < Duration::from_secs(10) {
        let routes = tb.ip(&netns, &["route", "show", "10.244.250.0/24"]).await?;
        if !routes.trim().is_empty() {
            seen = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    match seen {
        Some(d) => println!(
            "\nnew lease in etcd -> route on node 1: {:.1} ms",
            d.as_secs_f64() * 1000.0
        ),
        None => println!("\nnew lease in etcd -> route on node 1: not seen within 10 s"),
    }
    tb.etcd().context("no etcd")?.delete(&key).await?;
    tb.shutdown().await?;
    Ok(full && seen.is_some())
}
