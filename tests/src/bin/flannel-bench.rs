//! `cargo xtask bench`: compares pod-to-pod datapaths (host-gw, kernel VXLAN, eBPF VXLAN,
//! eBPF VXLAN with the pod fast path, the udp backend's userspace proxy) on two-node clusters in network namespaces, with
//! rounds that interleave the variants, then times how fast an agent programs many remote
//! leases with each VXLAN datapath. Writes `target/bench/datapath.{json,md}` and prints the
//! table. See `flannel_tests::bench` for the method.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use flannel_tests::bench::report::{loadavg, Availability, Machine, Report, VariantResult};
use flannel_tests::bench::variant::{self, Observed, VARIANTS};
use flannel_tests::bench::{leases, start_bed, Bed, MEASUREMENTS};
use flannel_tests::testbed::flanneld_path;

/// Benchmarks the flannel-rs datapaths (needs root).
#[derive(Parser)]
struct Args {
    /// Rounds; each measures every metric on every variant once.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds per measurement.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    /// Variants, in table order (default: host-gw,kernel,ebpf,ebpf-fastpath).
    #[arg(long, value_delimiter = ',')]
    variants: Vec<String>,
    /// Quick check for CI: 1 round of 1 s, 1,000 leases.
    #[arg(long)]
    smoke: bool,
    /// Remote leases for the programming test (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    leases: usize,
    /// Only the lease programming test: no datapath variants.
    #[arg(long)]
    leases_only: bool,
    /// Give up on lease programming after this many seconds (and report that).
    #[arg(long, default_value_t = 120)]
    lease_timeout: u64,
    /// The flanneld for variants whose datapath is the agent itself (udp); `cargo xtask bench`
    /// passes a release build. Without it they run the default (debug) flanneld.
    #[arg(long)]
    release_agent: Option<PathBuf>,
    /// Output directory (default: the workspace's target/bench).
    #[arg(long)]
    out: Option<PathBuf>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("bench: cannot start a runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("bench failed: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(mut args: Args) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        bail!("the benchmark builds network namespaces: run it as root");
    }
    if args.smoke {
        (args.rounds, args.seconds, args.leases) = (1, 1, 1_000);
    }
    if args.rounds == 0 || args.seconds == 0 {
        bail!("--rounds and --seconds must be at least 1");
    }
    let variants = if args.leases_only {
        if args.leases == 0 {
            bail!("--leases-only needs --leases above 0");
        }
        Vec::new()
    } else if args.variants.is_empty() {
        VARIANTS.to_vec()
    } else {
        args.variants
            .iter()
            .map(|k| variant::variant(k.trim()))
            .collect::<anyhow::Result<_>>()?
    };
    let out_dir = args.out.clone().unwrap_or_else(|| {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .with_file_name("target")
            .join("bench")
    });
    let flanneld = flanneld_path()?;
    let started = Instant::now();
    let machine = Machine::read();
    println!(
        "bench: flanneld {}; load average {}",
        flanneld.display(),
        machine.loadavg_start
    );

    // All clusters up first, so that rounds interleave without setup in between.
    let mut beds: Vec<Option<Bed>> = Vec::new();
    let mut results = Vec::new();
    for v in &variants {
        let t = Instant::now();
        let (bed, availability) = start_bed(v, args.release_agent.as_deref()).await?;
        let what = match &availability {
            Availability::Measured { label, attachments } => format!("{label} {attachments:?}"),
            Availability::NotAvailable(why) => format!("not available: {why}"),
        };
        println!("bench: {:<14} up in {:.1} s: {what}", v.key, t.elapsed().as_secs_f64());
        beds.push(bed);
        results.push(VariantResult::new(*v, availability));
    }
    let live: Vec<usize> = (0..beds.len()).filter(|&i| beds[i].is_some()).collect();
    if live.is_empty() && !args.leases_only {
        bail!("no variant could be measured");
    }
    for round in 0..if live.is_empty() { 0 } else { args.rounds } {
        println!("bench: round {} of {}", round + 1, args.rounds);
        for what in MEASUREMENTS {
            // Rotate the order every round so no variant always runs first.
            for k in 0..live.len() {
                let i = live[(k + round as usize) % live.len()];
                let Some(bed) = &beds[i] else { continue };
                let line = bed.measure(what, args.seconds, &mut results[i]).await;
                println!("  {:<14} {:<9} {line}", variants[i].key, format!("{what:?}"));
            }
        }
    }
    for (bed, result) in beds.iter_mut().zip(&mut results) {
        if let Some(bed) = bed {
            match Observed::of_nodes(&mut bed.tb).await {
                Ok(seen) => result.counters = seen.counters,
                Err(e) => result.errors.push(format!("reading the datapath counters: {e:#}")),
            }
        }
    }
    // Tear the clusters down before timing lease programming, which wants a quiet machine.
    drop(beds);

    let mut lease_runs = Vec::new();
    if args.leases > 0 {
        for datapath in ["kernel", "ebpf"] {
            println!("bench: programming {} leases with Datapath {datapath}", args.leases);
            // As nodes run it: the release flanneld when there is one.
            let timeout = Duration::from_secs(args.lease_timeout);
            let run = leases::program_leases(datapath, args.leases, timeout, args.release_agent.as_deref())
                .await
                .with_context(|| format!("lease programming with Datapath {datapath}"))?;
            println!(
                "  ready {:?} s, routes {:?} s, map {:?} s: {}",
                run.ready_s, run.routes_s, run.map_s, run.outcome
            );
            lease_runs.push(run);
        }
    }

    let report = Report {
        machine,
        rounds: args.rounds,
        seconds: args.seconds,
        smoke: args.smoke,
        flanneld: flanneld.display().to_string(),
        variants: results,
        leases: lease_runs,
        elapsed_s: started.elapsed().as_secs_f64(),
        loadavg_end: loadavg(),
    };
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let json_path = out_dir.join("datapath.json");
    let md_path = out_dir.join("datapath.md");
    let json = serde_json::to_string_pretty(&report.to_json())?;
    std::fs::write(&json_path, json + "\n").with_context(|| format!("writing {}", json_path.display()))?;
    let markdown = report.to_markdown();
    std::fs::write(&md_path, &markdown).with_context(|| format!("writing {}", md_path.display()))?;
    println!("\n{markdown}");
    println!(
        "bench: wrote {} and {} in {:.0} s",
        json_path.display(),
        md_path.display(),
        report.elapsed_s
    );
    Ok(())
}
