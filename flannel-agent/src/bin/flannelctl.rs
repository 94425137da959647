//! `flannelctl`: status, peers and uninstall for a flannel-rs node; see `flannel_agent::ctl`.

use std::process::ExitCode;

use clap::Parser;
use flannel_agent::ctl::{run, Cli};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("flannelctl: {e:#}");
            ExitCode::from(2)
        }
    }
}
