//! `flannelctl`: looks at a running flannel-rs node.
//!
//! - `status`: the agent's lease, backend, and the datapath in use with the reason for it,
//!   from the agent's healthz server (`/status` and `/status/datapath`; `--healthz`); with
//!   the udp backend also its device and its packet, byte and drop counters;
//! - `peers`: every lease the agent programs beside the eBPF map entry for it, read from the
//!   pinned maps directly (so it shows what the kernel really uses), with drift flagged;
//! - `uninstall`: detaches every flannel-rs eBPF program and removes the pins, leaving the
//!   kernel's `flannel.<VNI>` to carry the traffic.
//!
//! Tables for people by default, `--json` for scripts. Run it in the node's network namespace
//! (on a node, that is the host's).

mod http;
pub mod peers;

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Parser, Subcommand};
use serde_json::{json, Value};

use crate::backend::vxlan::PeerView;
use crate::dataplane;

/// The command line of `flannelctl`.
#[derive(Debug, Parser)]
#[command(name = "flannelctl", version, about = "Inspect and clean up a flannel-rs node")]
pub struct Cli {
    /// The agent's healthz address (flanneld's --healthz-ip/--healthz-port).
    #[arg(long, global = true, env = "FLANNELCTL_HEALTHZ", default_value = "127.0.0.1:9253")]
    pub healthz: String,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The lease, backend, and which datapath runs and why.
    Status,
    /// Each lease beside the eBPF map entry programmed for it; exits 1 on drift.
    Peers {
        /// The agent's --bpf-pin-dir; by default the one the agent reports.
        #[arg(long)]
        bpf_pin_dir: Option<PathBuf>,
    },
    /// Detaches every flannel-rs eBPF program and removes its pins (traffic continues through
    /// the kernel's flannel.<VNI>).
    Uninstall {
        /// The agent's --bpf-pin-dir.
        #[arg(long, default_value = "/sys/fs/bpf/flannel")]
        bpf_pin_dir: PathBuf,
    },
}

/// Runs a parsed command, printing to stdout; returns the process exit code.
pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    match &cli.command {
        Command::Status => status(cli),
        Command::Peers { bpf_pin_dir } => peers_cmd(cli, bpf_pin_dir.clone()),
        Command::Uninstall { bpf_pin_dir } => {
            dataplane::detach_all(bpf_pin_dir)
                .with_context(|| format!("uninstalling the eBPF datapath pinned under {}", bpf_pin_dir.display()))?;
            let text = format!(
                "detached every flannel-rs eBPF program and removed the pins under {}; traffic now goes \
                 through the kernel's vxlan device. A flanneld with Datapath auto or ebpf attaches them \
                 again when it next starts.",
                bpf_pin_dir.display()
            );
            print(cli, json!({"uninstalled": true, "bpf_pin_dir": bpf_pin_dir}), &text);
            Ok(0)
        }
    }
}

fn print(cli: &Cli, value: Value, text: &str) {
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
    } else {
        println!("{}", text.trim_end());
    }
}

fn status(cli: &Cli) -> anyhow::Result<u8> {
    let agent = http::get_json(&cli.healthz, "/status")?;
    let mut datapath = http::get_json(&cli.healthz, "/status/datapath")?;
    // The agent's report is as of its last reconcile (up to 10 s old); the eBPF counters are
    // read live from the pinned maps when they can be (flannelctl runs on the node).
    let live = datapath
        .pointer("/ebpf/pin_dir")
        .and_then(Value::as_str)
        .and_then(|dir| pinned_counters(Path::new(dir)).ok());
    if let (Some(live), Some(ebpf)) = (live, datapath.get_mut("ebpf").and_then(Value::as_object_mut)) {
        ebpf.insert("counters".into(), Value::Object(live));
        ebpf.insert("counters_from".into(), "pinned maps".into());
    }
    let s = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).unwrap_or("-").to_owned();
    let mut text = format!(
        "lease:      {} (public IP {})\nbackend:    {} ({} subnet manager)\nready:      {}\npeers:      {}\n",
        s(&agent, "subnet"),
        s(&agent, "public_ip"),
        s(&agent, "backend"),
        s(&agent, "subnet_manager"),
        match agent.get("ready").and_then(Value::as_bool) {
            Some(true) => "yes".to_owned(),
            _ => format!("no, waiting for {}", s(&agent, "waiting_for")),
        },
        agent.get("peers").and_then(Value::as_u64).unwrap_or(0),
    );
    if !datapath.is_null() {
        text.push_str(&format!(
            "datapath:   {} (requested {}: {})\n",
            s(&datapath, "datapath"),
            s(&datapath, "requested"),
            s(&datapath, "reason")
        ));
    }
    if let Some(e) = datapath.get("ebpf") {
        text.push_str(&format!(
            "eBPF:       maps in {}, attached with {}, decap {}, {} VTEPs\n",
            s(e, "maps_dir"),
            s(e, "attach_mode"),
            if e.get("decap_attached").and_then(Value::as_bool) == Some(true) {
                "attached"
            } else {
                "not attached"
            },
            e.get("vteps").and_then(Value::as_u64).unwrap_or(0),
        ));
        if let Some(c) = e.get("counters").and_then(Value::as_object) {
            text.push_str("eBPF counters (those above 0):\n");
            for (name, v) in c.iter().filter(|(_, v)| v.as_u64() != Some(0)) {
                text.push_str(&format!("  {name:<30} {v}\n"));
            }
        }
    }
    if let Some(u) = datapath.get("udp") {
        text.push_str(&format!(
            "udp:        device {}, MTU {}, port {}, {} routes\n",
            s(u, "device"),
            u.get("mtu").and_then(Value::as_u64).unwrap_or(0),
            u.get("port").and_then(Value::as_u64).unwrap_or(0),
            u.get("routes").and_then(Value::as_array).map_or(0, Vec::len),
        ));
    }
    if let Some(c) = datapath.get("counters").and_then(Value::as_object) {
        text.push_str("counters:\n");
        for (name, v) in c.iter().filter(|(_, v)| !v.is_object()) {
            text.push_str(&format!("  {name:<30} {v}\n"));
        }
        if let Some(drops) = c.get("drops").and_then(Value::as_object) {
            text.push_str("drops:\n");
            for (name, v) in drops {
                text.push_str(&format!("  {name:<30} {v}\n"));
            }
        }
    }
    print(cli, json!({"agent": agent, "datapath": datapath}), &text);
    Ok(0)
}

/// The node counters as they are now, from the maps pinned under `dir`.
fn pinned_counters(dir: &Path) -> anyhow::Result<serde_json::Map<String, Value>> {
    let mut counters: serde_json::Map<String, Value> = dataplane::pinned_counters(dir)
        .with_context(|| format!("reading the pinned FLANNEL_STATS under {}", dir.display()))?
        .iter()
        .map(|(stat, v)| (stat.name().to_owned(), Value::from(v)))
        .collect();
    // Pins of an agent from before the pod fast path have no FLANNEL_POD_STATS (nor XDP).
    if let Ok(pod) = dataplane::pinned_pod_counters(dir) {
        counters.extend(pod.iter().map(|(stat, v)| (stat.name().to_owned(), Value::from(v))));
    }
    if let Ok(xdp) = dataplane::pinned_xdp_counters(dir) {
        counters.extend(xdp.iter().map(|(stat, v)| (stat.name().to_owned(), Value::from(v))));
    }
    Ok(counters)
}

fn peers_cmd(cli: &Cli, pin_dir: Option<PathBuf>) -> anyhow::Result<u8> {
    let report = http::get_json(&cli.healthz, "/status/datapath")?;
    let leases: Vec<PeerView> = report
        .get("peers")
        .cloned()
        .map(serde_json::from_value)
        .transpose()
        .context("reading the agent's peer list")?
        .unwrap_or_default();
    let ebpf = report.get("datapath").and_then(Value::as_str) == Some("ebpf");
    let pin_dir = pin_dir.or_else(|| {
        report
            .pointer("/ebpf/pin_dir")
            .and_then(Value::as_str)
            .map(PathBuf::from)
    });
    let (map, counters, peer_stats) = match (&pin_dir, ebpf) {
        (Some(dir), true) => {
            let vteps = dataplane::pinned_vteps(dir)
                .with_context(|| format!("reading the pinned FLANNEL_VTEPS under {}", dir.display()))?;
            let counters = pinned_counters(dir)?;
            let peer_stats = dataplane::pinned_peer_counters(dir)
                .with_context(|| format!("reading the pinned FLANNEL_PEER_STATS under {}", dir.display()))?;
            (Some(vteps), counters, peer_stats)
        }
        _ => (None, serde_json::Map::new(), Default::default()),
    };
    let mut rows = peers::compare(&leases, map.as_deref());
    peers::add_counters(&mut rows, &peer_stats);
    let drift = peers::drift(&rows);
    let mut text = peers::table(&rows);
    if !counters.is_empty() {
        text.push_str("\nnode counters (all peers):\n");
        for (name, v) in counters.iter().filter(|(_, v)| v.as_u64() != Some(0)) {
            text.push_str(&format!("  {name:<30} {v}\n"));
        }
    }
    if drift > 0 {
        text.push_str(&format!("\n{drift} entries drifted from the leases\n"));
    }
    let value = json!({
        "datapath": report.get("datapath"),
        "bpf_pin_dir": pin_dir,
        "peers": rows,
        "drift": drift,
        "counters": counters,
    });
    print(cli, value, &text);
    Ok(if drift > 0 { 1 } else { 0 })
}
