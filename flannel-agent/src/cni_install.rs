//! Keeps the CNI plugin binary and the conflist in place on the host (field problem B2).
//!
//! Upstream's DaemonSet copies both once, from init containers, and flanneld never looks
//! again: when a package upgrade re-creates `/opt/cni/bin` or someone cleans `/etc/cni/net.d`,
//! every new pod fails ("failed to find plugin flannel") until the flannel pod is deleted
//! (flannel-io/flannel#1721). With `--cni-plugin-source`/`--cni-plugin-dest` and
//! `--cni-conf-source`/`--cni-conf-dest`, the agent installs each file at start and then
//! checks it every [`CHECK_PERIOD`]: a missing file, or one whose content differs from the
//! source, is written again, atomically (temporary file, then rename, so the runtime never
//! runs half a binary and never gets "text file busy"). While a file cannot be installed the
//! agent is not ready.
//!
//! A check costs one `stat` per file: the content is compared only when the destination's
//! size, modification time or inode differ from what the agent itself wrote.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::metrics::Metrics;

/// How often the installed files are checked. Cheap (a `stat` each), and short enough that
/// a pod created just after a package upgrade finds its plugin again.
pub const CHECK_PERIOD: Duration = Duration::from_secs(2);

/// Installing one file failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// The file to install cannot be read (a bad `--cni-*-source`).
    #[error("cannot read {path} (the CNI file to install): {source}")]
    Source {
        /// The source path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The destination cannot be written.
    #[error("cannot install {path}: {source}; check that its host directory is mounted writable")]
    Dest {
        /// The destination path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
}

/// One file the agent keeps installed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallFile {
    /// What to install (in the agent's image).
    pub source: PathBuf,
    /// Where (on a host path).
    pub dest: PathBuf,
    /// Its permission bits (0755 for the plugin, 0644 for the conflist).
    pub mode: u32,
}

/// What a destination looked like right after the agent wrote or checked it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stamp {
    len: u64,
    mtime: (i64, i64),
    ino: u64,
}

fn stamp(path: &Path) -> Option<Stamp> {
    let m = std::fs::metadata(path).ok()?;
    Some(Stamp {
        len: m.len(),
        mtime: (m.mtime(), m.mtime_nsec()),
        ino: m.ino(),
    })
}

impl InstallFile {
    /// Makes `dest` a copy of `source` (content and mode) unless it already is. Returns
    /// whether it wrote the file.
    pub fn ensure(&self) -> Result<bool, InstallError> {
        let want = std::fs::read(&self.source).map_err(|source| InstallError::Source {
            path: self.source.clone(),
            source,
        })?;
        let same = std::fs::read(&self.dest).is_ok_and(|have| have == want)
            && std::fs::metadata(&self.dest).is_ok_and(|m| m.permissions().mode() & 0o7777 == self.mode);
        if same {
            return Ok(false);
        }
        self.write(&want).map_err(|source| InstallError::Dest {
            path: self.dest.clone(),
            source,
        })?;
        Ok(true)
    }

    fn write(&self, content: &[u8]) -> std::io::Result<()> {
        let dir = self
            .dest
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        // Not created: a missing directory means the host path is not mounted, and a file
        // written into the container's own filesystem would help nobody.
        let mut tmp = tempfile::Builder::new().prefix(".flannel-install").tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, content)?;
        tmp.as_file().sync_all()?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(self.mode))?;
        tmp.persist(&self.dest).map_err(|e| e.error)?;
        Ok(())
    }
}

/// The files to keep installed and whether the last check found them all in place.
#[derive(Debug)]
pub struct Installer {
    files: Vec<InstallFile>,
    ok: AtomicBool,
    period: Duration,
    /// Signalled when `ok` flips, so that readiness follows at once.
    flipped: tokio::sync::Notify,
}

impl Installer {
    /// An installer for `files` (none: it does nothing and is always ok).
    pub fn new(files: Vec<InstallFile>) -> Self {
        Self {
            files,
            ok: AtomicBool::new(true),
            period: CHECK_PERIOD,
            flipped: tokio::sync::Notify::new(),
        }
    }

    /// Checks every `period` instead of [`CHECK_PERIOD`] (tests).
    pub fn with_period(mut self, period: Duration) -> Self {
        self.period = period;
        self
    }

    /// Whether every file was in place at the last check.
    pub fn ok(&self) -> bool {
        self.ok.load(Ordering::Relaxed)
    }

    /// Whether there is anything to install.
    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }

    /// Installs every file whose destination changed since `stamps` (all, the first time);
    /// updates `stamps` and the ok flag. Logs each re-install and each failure.
    fn check(&self, stamps: &mut [Option<Stamp>], first: bool, metrics: &Metrics) {
        let mut ok = true;
        for (file, last) in self.files.iter().zip(stamps.iter_mut()) {
            let now = stamp(&file.dest);
            if !first && now.is_some() && now == *last {
                continue;
            }
            match file.ensure() {
                Ok(true) if first => info!(path = %file.dest.display(), "installed the CNI file"),
                Ok(true) => {
                    metrics.cni_reinstalls.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        path = %file.dest.display(), source = %file.source.display(),
                        "the CNI file was missing or changed on the host; installed it again"
                    );
                }
                Ok(false) => {}
                Err(e) => {
                    // Once per failure, not per check: a stamp of `None` (still missing)
                    // equals the last one and is retried without a new line.
                    if self.ok() || first {
                        error!(error = %e, "flanneld will not report ready until the CNI file is installed");
                    }
                    ok = false;
                }
            }
            *last = stamp(&file.dest);
        }
        if self.ok.swap(ok, Ordering::Relaxed) != ok {
            // One stored permit is enough: the waiter re-reads `ok`.
            self.flipped.notify_one();
        }
    }

    /// Resolves when the ok flag has flipped since the last call.
    pub async fn flipped(&self) {
        self.flipped.notified().await
    }

    /// Installs the files once, now (before the agent reports ready).
    pub fn install(&self, metrics: &Metrics) -> Vec<Option<Stamp>> {
        let mut stamps = vec![None; self.files.len()];
        self.check(&mut stamps, true, metrics);
        stamps
    }

    /// Checks the files every period ([`CHECK_PERIOD`]) until `shutdown`, starting from `stamps`
    /// (what [`Self::install`] returned).
    pub async fn run(
        self: Arc<Self>,
        mut stamps: Vec<Option<Stamp>>,
        metrics: Arc<Metrics>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(self.period) => {}
            }
            let failing = !self.ok();
            // A failing file is retried on every check, whatever its stamp.
            if failing {
                stamps.iter_mut().for_each(|s| *s = None);
            }
            self.check(&mut stamps, false, &metrics);
            if failing && self.ok() {
                info!("the CNI files are installed again");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(mode: u32) -> (tempfile::TempDir, InstallFile) {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src");
        std::fs::write(&source, b"plugin v1").unwrap();
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        let file = InstallFile {
            source,
            dest: dir.path().join("bin/flannel"),
            mode,
        };
        (dir, file)
    }

    #[test]
    fn installs_a_missing_or_changed_file_and_leaves_a_correct_one() {
        let (dir, file) = setup(0o755);
        assert!(file.ensure().unwrap(), "missing: installed");
        assert_eq!(std::fs::read(&file.dest).unwrap(), b"plugin v1");
        let mode = std::fs::metadata(&file.dest).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755);
        assert!(!file.ensure().unwrap(), "in place: not written");

        std::fs::write(&file.dest, b"something else").unwrap();
        assert!(file.ensure().unwrap(), "changed: installed again");
        assert_eq!(std::fs::read(&file.dest).unwrap(), b"plugin v1");

        std::fs::set_permissions(&file.dest, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(file.ensure().unwrap(), "not executable: installed again");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("bin"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["flannel"], "no temporary file is left behind");
    }

    #[test]
    fn failures_say_which_side_is_wrong() {
        let (dir, mut file) = setup(0o644);
        file.dest = dir.path().join("not-mounted/10-flannel.conflist");
        let e = file.ensure().unwrap_err();
        assert!(matches!(e, InstallError::Dest { .. }), "{e}");
        assert!(e.to_string().contains("mounted writable"), "{e}");
        file.source = dir.path().join("absent");
        assert!(matches!(file.ensure().unwrap_err(), InstallError::Source { .. }));
    }

    /// Polls `cond` every 10 ms for up to 5 s.
    async fn eventually(what: &str, cond: impl Fn() -> bool) {
        for _ in 0..500 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("not within 5 s: {what}");
    }

    #[tokio::test]
    async fn a_deleted_file_comes_back_and_readiness_follows() {
        let (dir, file) = setup(0o755);
        let dest = file.dest.clone();
        let metrics = Arc::new(Metrics::default());
        let installer = Arc::new(Installer::new(vec![file]).with_period(Duration::from_millis(20)));
        let stamps = installer.install(&metrics);
        assert!(installer.ok() && dest.exists());
        assert_eq!(
            metrics.cni_reinstalls.load(Ordering::Relaxed),
            0,
            "the first install is no re-install"
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(installer.clone().run(stamps, metrics.clone(), shutdown.clone()));

        std::fs::remove_file(&dest).unwrap();
        eventually("installed again", || dest.exists()).await;
        eventually("counted", || metrics.cni_reinstalls.load(Ordering::Relaxed) == 1).await;

        // The host directory goes away: not ok; back: installed and ok again.
        std::fs::remove_dir_all(dir.path().join("bin")).unwrap();
        eventually("not ok", || !installer.ok()).await;
        std::fs::create_dir(dir.path().join("bin")).unwrap();
        eventually("ok again", || installer.ok() && dest.exists()).await;
        assert_eq!(metrics.cni_reinstalls.load(Ordering::Relaxed), 2);
        shutdown.cancel();
        task.await.unwrap();
    }
}
