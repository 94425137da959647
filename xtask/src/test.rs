//! `cargo xtask test`: what CI runs (`.ci/run`), in order, stopping at the first failure.
//!
//! setup, rustfmt, clippy on the host workspace, clippy on the eBPF crate, then every test
//! of the workspace. Privileged tests run too: CI is root, and with CI set they fail rather
//! than skip when they cannot run.

use std::{env, process::Command, time::Instant};

use anyhow::{bail, Context as _, Result};

use crate::ebpf::{self, EbpfBuild, Tools};

/// Test threads: the machines have 2 cores, and the privileged tests each build network
/// namespaces, so more threads only add contention.
const TEST_THREADS: &str = "2";

/// One named step: a command that must exit 0.
struct Step {
    name: &'static str,
    cmd: Command,
}

/// Runs every step; the error names the step that failed.
pub fn run() -> Result<()> {
    let started = Instant::now();
    crate::setup::run().context("step `setup` failed")?;

    let root = crate::workspace_root();
    let cargo = || {
        let mut cmd = Command::new(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(&root);
        if env::var_os("CI").is_some() {
            // A CI run builds once from a fresh clone: incremental state is only overhead.
            cmd.env("CARGO_INCREMENTAL", "0");
        }
        cmd.env("RUST_BACKTRACE", "1");
        cmd
    };
    // The testbed would otherwise build the CNI plugin itself (a nested cargo) on first use.
    let with_env = |key: &str, value: std::path::PathBuf, mut cmd: Command| {
        cmd.env(key, value);
        cmd
    };
    let with_args = |mut cmd: Command, args: &[&str]| {
        cmd.args(args);
        cmd
    };

    let tools = Tools::find()?;
    let mut ebpf_clippy = EbpfBuild::new(crate::ebpf_crate_dir(), true).command("clippy", &tools);
    ebpf_clippy.args(["--", "-D", "warnings"]);
    let ebpf_manifest = crate::ebpf_crate_dir().join("Cargo.toml");
    let mut ebpf_fmt = cargo();
    ebpf_fmt
        .args(["fmt", "--manifest-path"])
        .arg(&ebpf_manifest)
        .args(["--", "--check"]);

    let steps = [
        Step {
            name: "fmt",
            cmd: with_args(cargo(), &["fmt", "--all", "--", "--check"]),
        },
        // flannel-ebpf is outside the workspace, so `--all` does not reach it.
        Step {
            name: "fmt (eBPF crate)",
            cmd: ebpf_fmt,
        },
        Step {
            name: "clippy",
            cmd: with_args(
                cargo(),
                &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"],
            ),
        },
        Step {
            name: "clippy (eBPF crate)",
            cmd: ebpf_clippy,
        },
        // `cargo test` builds only the binaries of the package under test; the
        // privileged tests run flanneld and the flannel CNI plugin from target/debug.
        Step {
            name: "build binaries",
            cmd: with_args(cargo(), &["build", "-p", "flannel-agent", "--bins"]),
        },
        Step {
            name: "test",
            cmd: with_env(
                "FLANNEL_CNI_BIN",
                root.join("target/debug/flannel"),
                with_args(
                    cargo(),
                    &[
                        "test",
                        "--workspace",
                        "--no-fail-fast",
                        "--",
                        "--test-threads",
                        TEST_THREADS,
                    ],
                ),
            ),
        },
    ];

    let count = steps.len();
    for Step { name, mut cmd } in steps {
        let step_started = Instant::now();
        let line = ebpf::describe(&cmd);
        println!("==> xtask test: {name}: {line}");
        let status = cmd
            .status()
            .with_context(|| format!("step `{name}`: could not start `{line}`"))?;
        if !status.success() {
            bail!("step `{name}` failed ({status}): `{line}`");
        }
        println!(
            "==> xtask test: {name} passed ({:.0}s)",
            step_started.elapsed().as_secs_f64()
        );
    }
    println!(
        "==> xtask test: setup and all {count} steps passed ({:.0}s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
