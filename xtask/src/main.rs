//! flannel-rs developer tasks, run as `cargo xtask <command>` (an alias in .cargo/config.toml).
//!
//! One module per subcommand; `ebpf` holds the eBPF build shared with the agent's build script.

mod bench;
mod build_ebpf;
mod demo;
mod ebpf;
mod setup;
mod test;

use std::{
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Parser, Subcommand};

/// flannel-rs developer tasks.
#[derive(Parser)]
#[command(name = "cargo xtask", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what building and testing needs (Debian packages, nightly rust-src, bpf-linker).
    /// Idempotent: returns in seconds when everything is there.
    Setup,
    /// Build the eBPF object (flannel-ebpf) and print its path.
    BuildEbpf(build_ebpf::Args),
    /// What CI runs: setup, rustfmt, clippy (host and eBPF), then the whole test suite.
    Test,
    /// The main job: a 3-node cluster in network namespaces, showing leases, routes and
    /// pod-to-pod connectivity for each backend, then torn down (needs root).
    Demo(demo::Args),
    /// The datapath benchmark: host-gw, kernel and eBPF VXLAN, pod to pod, interleaved
    /// rounds; writes target/bench/datapath.{json,md} (needs root).
    Bench(bench::Args),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Setup => setup::run(),
        Command::BuildEbpf(args) => build_ebpf::run(&args),
        Command::Test => test::run(),
        Command::Demo(args) => demo::run(&args),
        Command::Bench(args) => bench::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// The root of the cargo workspace (xtask lives one level below it).
fn workspace_root() -> PathBuf {
    let manifest_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest_dir.parent().unwrap_or(manifest_dir).to_path_buf()
}

/// The eBPF crate's directory.
fn ebpf_crate_dir() -> PathBuf {
    workspace_root().join("flannel-ebpf")
}
