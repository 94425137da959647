//! Builds the eBPF datapath (flannel-ebpf) and copies the object into OUT_DIR, where
//! `dataplane` embeds it with `aya::include_bytes_aligned!`.
//!
//! There is deliberately no fallback: without bpf-linker or the nightly toolchain the build
//! fails with one line saying to run `cargo xtask setup`, rather than embedding a stub that
//! would only fail once the agent runs.
//!
//! We run cargo ourselves instead of using aya-build: aya-build expects the eBPF crate to be
//! a member of this workspace (it builds `--package <name>` from here), while flannel-ebpf
//! is a workspace of its own so host builds never try to compile it.

#[path = "../xtask/src/ebpf.rs"]
mod ebpf;

use std::{
    env, fs, io,
    path::PathBuf,
    process::{ExitCode, Stdio},
};

use anyhow::Context as _;

/// File name of the object in OUT_DIR; `dataplane` includes `OUT_DIR/flannel-ebpf.o`.
const OBJECT_FILE: &str = "flannel-ebpf.o";

fn main() -> ExitCode {
    // `cargo::error` makes cargo print the line as an error and fail the build. For a missing
    // tool we exit 0 so that line is all a developer sees; when the eBPF build itself fails
    // we exit 1 so cargo also shows our stderr, i.e. the nested cargo's compiler errors.
    let (err, exit) = match build() {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::MissingTool(err)) => (err, ExitCode::SUCCESS),
        Err(Failure::Build(err)) => (err, ExitCode::FAILURE),
    };
    println!("cargo::error={}", format!("{err:#}").replace('\n', " "));
    exit
}

/// Why the build script failed, which decides how loudly (see `main`).
enum Failure {
    /// bpf-linker, the nightly toolchain or rust-src is missing: run `cargo xtask setup`.
    MissingTool(anyhow::Error),
    /// Anything else, compiling the eBPF crate included.
    Build(anyhow::Error),
}

impl From<anyhow::Error> for Failure {
    fn from(err: anyhow::Error) -> Self {
        Self::Build(err)
    }
}

fn build() -> Result<(), Failure> {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR not set")?);
    let root = manifest_dir.parent().context("flannel-agent has no parent directory")?;
    let ebpf_dir = root.join("flannel-ebpf");
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);

    // Directories are scanned recursively by cargo. Listing anything here also turns off
    // the default "rerun when any file of this package changes".
    for path in [
        ebpf_dir.join("src"),
        ebpf_dir.join("Cargo.toml"),
        ebpf_dir.join("Cargo.lock"),
        ebpf_dir.join(".cargo"),
        ebpf_dir.join("rust-toolchain.toml"),
        root.join("flannel-common/src"),
        root.join("flannel-common/Cargo.toml"),
    ] {
        println!("cargo:rerun-if-changed={}", path.display());
    }

    let tools = ebpf::Tools::find().map_err(Failure::MissingTool)?;
    // A reinstalled bpf-linker (e.g. after a nightly update) should relink the object.
    println!("cargo:rerun-if-changed={}", tools.bpf_linker.display());

    let build = ebpf::EbpfBuild::new(ebpf_dir, true);
    let mut cmd = build.command("build", &tools);
    // Our stdout is read by cargo as build-script directives; the nested cargo's output is
    // diagnostics, so send it to stderr (shown when this script fails, or with -vv).
    cmd.stdout(Stdio::from(io::stderr()));
    ebpf::run(cmd, "building the eBPF object (flannel-ebpf)")?;

    let object = build.object_path();
    let dest = out_dir.join(OBJECT_FILE);
    fs::copy(&object, &dest).with_context(|| format!("copying {} to {}", object.display(), dest.display()))?;
    Ok(())
}
