//! `cargo xtask bench`: the datapath benchmark. Installs what is missing (`setup`, which
//! brings iperf3, sockperf and bpftool), builds flanneld and the driver
//! (tests/src/bin/flannel-bench.rs), and runs the driver as root. It writes
//! `target/bench/datapath.json` and `target/bench/datapath.md` and prints the table.
//!
//! flanneld is built in the debug profile on purpose: it is control plane only. Packets go
//! through the kernel or the eBPF programs, which are built optimised either way, so the
//! agent's profile changes no throughput or latency figure; it can only change how fast
//! leases are programmed, which the table labels as a debug build. The exception is the
//! udp backend, whose datapath is the agent: its row runs a release flanneld, built here too.

use std::process::Command;

use anyhow::{bail, Context as _, Result};

/// Arguments passed through to the benchmark driver.
#[derive(clap::Args)]
pub struct Args {
    /// Rounds; each measures every metric on every variant once, variants interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Variants (comma-separated): host-gw, kernel, ebpf, ebpf-fastpath, udp. Default: all.
    #[arg(long)]
    variants: Option<String>,
    /// Quick check (CI): 1 round of 1 s per metric and a 1,000-lease programming test.
    #[arg(long)]
    smoke: bool,
    /// Remote leases for the programming test (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// Only the lease programming test (no datapath variants).
    #[arg(long)]
    leases_only: bool,
}

/// Runs the benchmark.
pub fn run(args: &Args) -> Result<()> {
    crate::setup::run().context("step `setup` failed")?;
    let root = crate::workspace_root();
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    // Every agent binary: flanneld, and the CNI plugin the testbed's pods are added with
    // (built here, so the testbed does not build it in the middle of the run).
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "flannel-agent", "--bins"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building flanneld failed");
    }
    // The udp backend forwards in the agent: its row needs an optimised flanneld.
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "flannel-agent",
            "--bin",
            "flanneld",
        ])
        .status()
        .context("running cargo build --release")?;
    if !status.success() {
        bail!("building the release flanneld failed");
    }
    let status = Command::new(&cargo)
        .current_dir(&root)
        .args(["build", "--quiet", "-p", "flannel-tests", "--bin", "flannel-bench"])
        .status()
        .context("running cargo build")?;
    if !status.success() {
        bail!("building the benchmark driver failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or_else(|| root.join("target"), Into::into);
    let driver = target.join("debug/flannel-bench");
    // Root for the namespaces: directly when we are root, else through sudo (the build above
    // stays unprivileged).
    let mut cmd = if is_root() {
        Command::new(&driver)
    } else {
        let mut sudo = Command::new("sudo");
        sudo.arg(&driver);
        sudo
    };
    cmd.current_dir(&root)
        .args(["--rounds", &args.rounds.to_string()])
        .args(["--seconds", &args.seconds.to_string()])
        .args(["--leases", &args.leases.to_string()])
        .arg("--release-agent")
        .arg(target.join("release/flanneld"));
    if let Some(v) = &args.variants {
        cmd.args(["--variants", v]);
    }
    if args.smoke {
        cmd.arg("--smoke");
    }
    if args.leases_only {
        cmd.arg("--leases-only");
    }
    let status = cmd.status().context("running the benchmark driver")?;
    if !status.success() {
        bail!("the benchmark failed (see above)");
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}
