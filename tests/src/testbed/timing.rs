//! Bounded waits for a condition on the cluster, starting several agents at once, and
//! recording measured times where the lead can quote them (`target/test-metrics/`).

use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::cluster::Testbed;

/// How often [`wait_for`] checks again: often enough to see sub-second repairs, rarely
/// enough that a few `ip` invocations per check do not load two cores.
pub const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Polls `check` every `interval` until it returns `Ok`, and returns its value and how long
/// that took. `Err` means "not yet" and should say what was seen; after `timeout` the last
/// one is returned, with `what` and the time waited.
pub async fn poll_until<T, F, Fut>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut check: F,
) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    let started = Instant::now();
    loop {
        let last = match check().await {
            Ok(value) => return Ok((value, started.elapsed())),
            Err(e) => e,
        };
        if started.elapsed() >= timeout {
            return Err(last.context(format!("{what}: not within {timeout:?}")));
        }
        tokio::time::sleep(interval).await;
    }
}

/// [`poll_until`] at [`POLL_INTERVAL`].
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, check: F) -> anyhow::Result<(T, Duration)>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<T>>,
{
    poll_until(what, timeout, POLL_INTERVAL, check).await
}

/// Where tests write measurements: `$CARGO_TARGET_DIR/test-metrics`, else the
/// `test-metrics` directory of the target directory the test binary runs from
/// (`target/<profile>/deps/<test>`), else the workspace's `target/test-metrics`.
pub fn metrics_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(dir).join("test-metrics");
    }
    let from_exe = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.ancestors().nth(3).map(PathBuf::from))
        .filter(|dir| dir.file_name().is_some_and(|n| n == "target"));
    from_exe
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("test-metrics")
}

/// Writes `text` to `<metrics_dir>/<file>` (replacing it) and returns the path.
pub fn write_metric(file: &str, text: &str) -> anyhow::Result<PathBuf> {
    let dir = metrics_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = dir.join(file);
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    Ok(path)
}

impl Testbed {
    /// Starts an agent with `extra_args` on each of `nodes`, then waits until each is ready
    /// (all start before the first wait, so they come up in parallel).
    pub async fn start_agents(
        &mut self,
        nodes: &[usize],
        extra_args: &[&str],
        timeout: Duration,
    ) -> anyhow::Result<()> {
        for &n in nodes {
            self.start_agent(n, extra_args).await?;
        }
        for &n in nodes {
            self.wait_ready(n, timeout).await?;
        }
        Ok(())
    }
}
