//! `cargo xtask demo`: the main job a newcomer runs. Installs what is missing
//! (`setup`), builds flanneld and the demo driver, then runs the demo cluster
//! (tests/src/bin/flannel-demo.rs) as root and lets it tear everything down.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Arguments passed through to the demo driver.
#[derive(clap::Args)]
pub struct Args {
    /// Backends to show (comma-separated): vxlan, host-gw. Default: all.
    #[arg(long)]
    backend: Option<String>,
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

/// Runs the demo.
pub fn run(args: &Args) -> Result<()> {
    crate::setup::run().context("step `setup` failed")?;
    let root = crate::workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // The agent's binaries first: the testbed runs target/debug/flanneld and the flannel CNI plugin.
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "flannel-agent", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building flanneld failed");
    }
    let mut cmd = Command::new(&cargo);
    // Pods go through the CNI plugin just built (flanneld's sibling binary).
    cmd.env("FLANNEL_CNI_BIN", root.join("target/debug/flannel"));
    cmd.current_dir(&root)
        .args(["run", "--quiet", "-p", "flannel-tests", "--bin", "flannel-demo", "--"])
        .args(["--nodes", &args.nodes.to_string(), "--pods", &args.pods.to_string()]);
    if args.kube {
        cmd.arg("--kube");
    }
    if let Some(b) = &args.backend {
        cmd.args(["--backend", b]);
    }
    let status = cmd.status().context("running the demo")?;
    if !status.success() {
        bail!("the demo failed (see above)");
    }
    Ok(())
}
