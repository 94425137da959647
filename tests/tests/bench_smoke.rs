//! The benchmark driver in smoke mode (`flannel-bench --smoke`: 1 round of 1 s, 1,000
//! leases): it must finish, and its JSON must hold every metric for every variant it could
//! measure. Privileged; outside CI it skips loudly without root.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use flannel_tests::bench::report::METRICS;
use flannel_tests::bench::variant::{BASELINE, CEILING, VARIANTS};
use flannel_tests::testbed::require_root;
use serde_json::Value;

/// Well above the < 2 min the smoke run takes, so only a hang trips it.
const SMOKE_TIMEOUT: Duration = Duration::from_secs(300);

#[test]
fn smoke_run_reports_every_metric_for_every_available_variant() -> anyhow::Result<()> {
    if !require_root("smoke_run_reports_every_metric_for_every_available_variant") {
        return Ok(());
    }
    let out = tempfile::tempdir()?;
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_flannel-bench"))
        .args(["--smoke", "--out"])
        .arg(out.path())
        .spawn()
        .context("starting flannel-bench")?;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > SMOKE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("flannel-bench --smoke did not finish within {SMOKE_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!(
        "flannel-bench --smoke: {status} in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    ensure!(status.success(), "flannel-bench --smoke failed: {status}");

    let path = out.path().join("datapath.json");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)?;
    for key in ["date", "kernel", "cpu_model", "rounds", "seconds"] {
        ensure!(!json[key].is_null(), "{key} missing from {}", path.display());
    }
    let variants = json["variants"].as_array().context("no variants")?;
    ensure!(
        variants.len() == VARIANTS.len(),
        "expected every default variant: {json:#}"
    );
    for v in variants {
        let key = v["key"].as_str().unwrap_or("?");
        if v["available"] != Value::Bool(true) {
            // Only the options still being built may be missing; the ceiling and the baseline
            // must always be there.
            ensure!(key != CEILING && key != BASELINE, "{key} was not measured: {v:#}");
            ensure!(v["not_available_because"].is_string(), "{key}: no reason given: {v:#}");
            continue;
        }
        for metric in METRICS {
            let samples = v["metrics"][metric.key]["samples"].as_array();
            ensure!(
                samples.is_some_and(|s| !s.is_empty()),
                "{key} has no {} sample: {v:#}",
                metric.key
            );
        }
        ensure!(v["datapath_seen"].is_string(), "{key}: no datapath label: {v:#}");
    }
    let runs = json["lease_programming"].as_array().context("no lease_programming")?;
    ensure!(runs.len() == 2, "expected a kernel and an eBPF lease run: {json:#}");
    for run in runs {
        ensure!(run["leases"] == 1_000, "{run:#}");
        ensure!(run["outcome"].is_string(), "{run:#}");
        // The kernel datapath must always get there; the eBPF one is reported as it is.
        if run["datapath"] == "kernel" {
            ensure!(
                run["routes_complete_s"].is_number(),
                "kernel lease programming incomplete: {run:#}"
            );
        }
    }
    ensure!(out.path().join("datapath.md").is_file(), "no datapath.md");
    Ok(())
}
