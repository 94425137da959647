//! `cargo xtask build-ebpf`: builds flannel-ebpf for the BPF target and prints the object path.

use anyhow::Result;

use crate::ebpf::{self, EbpfBuild, Tools};

/// Options of `build-ebpf`.
#[derive(clap::Args)]
pub struct Args {
    /// Build with the release profile (what the agent embeds).
    #[arg(long)]
    pub release: bool,
}

/// Builds the object and prints where it is.
pub fn run(args: &Args) -> Result<()> {
    let tools = Tools::find()?;
    let build = EbpfBuild::new(crate::ebpf_crate_dir(), args.release);
    let cmd = build.command("build", &tools);
    eprintln!("build-ebpf: {}", ebpf::describe(&cmd));
    ebpf::run(cmd, "building the eBPF object")?;
    println!("{}", build.object_path().display());
    Ok(())
}
