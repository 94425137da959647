//! [`ChildGuard`]: a child process owned by a test, with its output captured to files and a
//! guarantee that it does not outlive the test.
//!
//! Two mechanisms make sure of that. Dropping the guard (also while a test panics) kills and
//! reaps the child. And the child is started with `PR_SET_PDEATHSIG(SIGKILL)`, so even when the
//! test binary itself dies (aborted, killed by a timeout) the kernel kills the child. The kernel
//! ties that signal to the *thread* that forked, not the process, so every child is spawned
//! from a dedicated keeper thread that lives exactly as long as the guard: a child spawned from
//! a tokio blocking-pool thread would otherwise be killed as soon as that thread idled out.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use regex::Regex;
use tempfile::TempDir;

/// How often the async waits below look at the child and its logs again.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// How many lines of each stream error messages and panic reports show.
const TAIL_LINES: usize = 30;

/// A running child process whose stdout and stderr go to files, killed when dropped.
///
/// Methods that wait are async (they poll with tokio timers) so that a test's own tasks keep
/// running; `kill` and `Drop` are synchronous because SIGKILL takes effect at once.
pub struct ChildGuard {
    /// Short name used in file names and error messages, e.g. `flanneld` or `etcd.2`.
    name: String,
    /// The child itself; reaped by `kill`, `terminate` or `Drop`.
    child: Child,
    /// Exit status once the child has been reaped, so it is never waited for twice.
    status: Option<ExitStatus>,
    /// Where the child's stdout goes.
    stdout_path: PathBuf,
    /// Where the child's stderr goes.
    stderr_path: PathBuf,
    /// The keeper thread that spawned the child; see the module docs.
    keeper: Option<Keeper>,
    /// The log directory when the guard made its own; declared last so it is removed only
    /// after the child is dead.
    _log_dir: Option<TempDir>,
}

/// The thread that forked a child, parked until the guard lets it go.
struct Keeper {
    /// Dropping this sender wakes the thread up and lets it exit.
    release: mpsc::Sender<()>,
    /// Joined on drop so no thread is left behind.
    thread: JoinHandle<()>,
}

impl ChildGuard {
    /// Spawns `cmd` with its output captured in a new temporary directory, removed on drop.
    ///
    /// The command's stdin is set to null; its stdout and stderr are replaced.
    pub fn spawn(name: &str, cmd: Command) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("flannel-test-{name}-"))
            .tempdir()
            .context("creating a temporary directory for child process logs")?;
        let mut guard = Self::spawn_in(name, cmd, dir.path())?;
        guard._log_dir = Some(dir);
        Ok(guard)
    }

    /// Spawns `cmd` with its output captured in `log_dir/NAME.stdout` and `log_dir/NAME.stderr`
    /// (truncated first). The directory must outlive the guard.
    pub fn spawn_in(name: &str, mut cmd: Command, log_dir: &Path) -> anyhow::Result<Self> {
        let stdout_path = log_dir.join(format!("{name}.stdout"));
        let stderr_path = log_dir.join(format!("{name}.stderr"));
        let stdout = File::create(&stdout_path).with_context(|| format!("creating {}", stdout_path.display()))?;
        let stderr = File::create(&stderr_path).with_context(|| format!("creating {}", stderr_path.display()))?;
        cmd.stdin(Stdio::null()).stdout(stdout).stderr(stderr);
        die_with_parent(&mut cmd);

        let program = cmd.get_program().to_string_lossy().into_owned();
        let (child, keeper) = spawn_from_keeper(cmd).with_context(|| format!("spawning {name} ({program})"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            status: None,
            stdout_path,
            stderr_path,
            keeper: Some(keeper),
            _log_dir: None,
        })
    }

    /// The name given at spawn time.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The child's process id.
    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Path of the file that receives the child's stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// Path of the file that receives the child's stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// Everything the child wrote to stdout so far (invalid UTF-8 replaced).
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the child wrote to stderr so far (invalid UTF-8 replaced).
    pub fn stderr(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The last `lines` lines of stdout and of stderr, labelled, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        format!(
            "--- {name} stdout (last {lines} lines) ---\n{}\n--- {name} stderr (last {lines} lines) ---\n{}",
            tail(&self.stdout(), lines),
            tail(&self.stderr(), lines),
            name = self.name,
        )
    }

    /// Returns the exit status if the child has exited, without blocking.
    pub fn try_wait(&mut self) -> anyhow::Result<Option<ExitStatus>> {
        if self.status.is_none() {
            self.status = self
                .child
                .try_wait()
                .with_context(|| format!("checking whether {} exited", self.name))?;
        }
        Ok(self.status)
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Waits until a line of stdout or stderr matches the regular expression `pattern`, and
    /// returns that line.
    ///
    /// The whole output so far is searched, so a line written before the call counts. Fails
    /// early, with the log tail, if the child exits first; fails with the log tail on timeout.
    pub async fn wait_for_log_line(&mut self, pattern: &str, timeout: Duration) -> anyhow::Result<String> {
        let re = Regex::new(pattern).with_context(|| format!("invalid log pattern {pattern:?}"))?;
        let deadline = Instant::now() + timeout;
        loop {
            // Read the exit status before the logs: output written just before exiting is then
            // already in the files when we look, so a last line is never missed.
            let exited = self.try_wait()?;
            if let Some(line) = self.find_line(&re, exited.is_some()) {
                return Ok(line);
            }
            if let Some(status) = exited {
                bail!(
                    "{} exited ({status}) without logging a line matching {pattern:?}\n{}",
                    self.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "{} logged no line matching {pattern:?} within {timeout:?}\n{}",
                    self.name,
                    self.log_tail(TAIL_LINES)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// The first matching line of stdout, then stderr. While the child runs, a last line
    /// without its newline may still be half written, so it is only considered after exit.
    fn find_line(&self, re: &Regex, exited: bool) -> Option<String> {
        [self.stdout(), self.stderr()].into_iter().find_map(|text| {
            let complete = if exited {
                text.as_str()
            } else {
                text.rfind('\n').map_or("", |end| &text[..end])
            };
            complete.lines().find(|line| re.is_match(line)).map(str::to_owned)
        })
    }

    /// Sends `signal` (e.g. `libc::SIGHUP`) to the child. Fails if it was already reaped.
    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        if self.try_wait()?.is_some() {
            bail!("{} has already exited; not sending signal {signal}", self.name);
        }
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill(2) has no memory-safety preconditions. The pid cannot have been reused
        // by another process: the child is not reaped yet (checked above), so it stays ours.
        if unsafe { libc::kill(pid, signal) } != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("sending signal {signal} to {}", self.name));
        }
        Ok(())
    }

    /// Sends SIGTERM and waits up to `grace` for the child to exit, then SIGKILLs it.
    /// Returns the exit status; a child that had already exited is not an error.
    pub async fn terminate(&mut self, grace: Duration) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        if let Err(e) = self.signal(libc::SIGTERM) {
            // It may have exited between the two checks; that is what we wanted anyway.
            return self.try_wait()?.ok_or(e);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Some(status) = self.try_wait()? {
                return Ok(status);
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
        self.kill()
    }

    /// Kills the child with SIGKILL and reaps it. A child that had already exited is not an
    /// error.
    pub fn kill(&mut self) -> anyhow::Result<ExitStatus> {
        if let Some(status) = self.try_wait()? {
            return Ok(status);
        }
        // Child::kill only fails if the child was already reaped, which try_wait rules out.
        self.child.kill().with_context(|| format!("killing {}", self.name))?;
        let status = self.child.wait().with_context(|| format!("reaping {}", self.name))?;
        self.status = Some(status);
        Ok(status)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let was_running = matches!(self.child.try_wait(), Ok(None)) && self.status.is_none();
        if let Err(e) = self.kill() {
            eprintln!("warning: could not kill {} (pid {}): {e:#}", self.name, self.child.id());
        }
        // The test harness shows a failed test's stderr, so this is where the child's last words
        // end up when an assertion fails while it runs.
        if was_running && std::thread::panicking() {
            eprintln!("{}", self.log_tail(TAIL_LINES));
        }
        if let Some(keeper) = self.keeper.take() {
            drop(keeper.release);
            let _ = keeper.thread.join();
        }
    }
}

impl std::fmt::Debug for ChildGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildGuard")
            .field("name", &self.name)
            .field("pid", &self.child.id())
            .field("status", &self.status)
            .field("stdout_path", &self.stdout_path)
            .field("stderr_path", &self.stderr_path)
            .finish()
    }
}

/// Arranges for the child to get SIGKILL when the thread that forks it exits.
fn die_with_parent(cmd: &mut Command) {
    let parent = libc::pid_t::try_from(std::process::id()).expect("pid fits in pid_t");
    // SAFETY: the closure runs between fork and exec, where only async-signal-safe functions
    // may be called; prctl(2) and getppid(2) are plain system calls and nothing allocates
    // (io::Error's OS variant is just an integer).
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If the parent died before prctl took effect, no signal will ever come.
            if libc::getppid() != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
}

/// Spawns `cmd` from a new thread that then parks until the returned keeper is released.
fn spawn_from_keeper(mut cmd: Command) -> io::Result<(Child, Keeper)> {
    let (child_tx, child_rx) = mpsc::channel();
    let (release, released) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new().name("child-keeper".into()).spawn(move || {
        let spawned = cmd.spawn();
        let ok = spawned.is_ok();
        if child_tx.send(spawned).is_ok() && ok {
            // Returns when the guard drops the sender: the only message this channel carries.
            let _ = released.recv();
        }
    })?;
    let child = child_rx
        .recv()
        .map_err(|_| io::Error::other("child keeper thread exited without spawning"))??;
    Ok((child, Keeper { release, thread }))
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of `text`.
fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn captures_output_and_waits_for_a_line() -> anyhow::Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo starting; echo oops >&2; sleep 0.2; echo ready on port 42; sleep 30",
        ]);
        let mut child = ChildGuard::spawn("sh", cmd)?;
        let line = child
            .wait_for_log_line(r"ready on port \d+", Duration::from_secs(5))
            .await?;
        assert_eq!(line, "ready on port 42");
        assert!(child.stderr().contains("oops"));
        assert!(child.is_running());
        let status = child.terminate(Duration::from_secs(5)).await?;
        assert!(!status.success());
        assert!(!child.is_running());
        Ok(())
    }

    #[tokio::test]
    async fn wait_fails_early_when_the_child_exits() -> anyhow::Result<()> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "echo fatal: no config >&2; exit 3"]);
        let mut child = ChildGuard::spawn("sh", cmd)?;
        let started = Instant::now();
        let err = child
            .wait_for_log_line("never", Duration::from_secs(10))
            .await
            .unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(5));
        let msg = format!("{err:#}");
        assert!(msg.contains("exited") && msg.contains("fatal: no config"), "{msg}");
        Ok(())
    }

    #[test]
    fn drop_kills_the_child() -> anyhow::Result<()> {
        let mut cmd = Command::new("sleep");
        cmd.arg("30");
        let child = ChildGuard::spawn("sleep", cmd)?;
        let pid = libc::pid_t::try_from(child.id())?;
        drop(child);
        // SAFETY: signal 0 only checks for existence. The pid was reaped by drop, so at worst
        // it names an unrelated new process, which would make the test fail, not misbehave.
        let alive = unsafe { libc::kill(pid, 0) } == 0;
        assert!(!alive, "child {pid} survived its guard");
        Ok(())
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc\n", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
