//! Names and cleanup: every testbed leaves nothing behind, whether it is dropped, dropped
//! while a test panics, interrupted by Ctrl-C, or killed outright.
//!
//! Everything a testbed creates is named from one prefix, `fl<pid>-<n>` (decimal, so that
//! names like `flannel-1` can never be taken for ours): its namespaces are `<prefix>-<role>` in `/run/netns`, and its files (logs,
//! subnet.env, IPAM state, the bpffs mount) live in `<tmp>/flannel-rs-testbed/<prefix>`.
//! Veths, bridges and routes live inside the namespaces and go with them; processes are
//! killed before their namespace is deleted. So cleaning up a testbed means removing
//! everything carrying its prefix, which is the same whether a destructor, the signal
//! handler, or [`cleanup_stale`] in a later run does it, and the pid in the name tells a
//! later run which prefixes belong to dead processes.

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, Ordering};
use std::sync::{Mutex, Once};
use std::time::Duration;

use super::netns;

/// First letters of every testbed name: short, because names show up in `ip netns` listings
/// and in error messages.
pub const NAME_PREFIX: &str = "fl";

/// Bound on each teardown command.
const TEARDOWN_TIMEOUT: Duration = Duration::from_secs(10);

/// Counts the testbeds of this process.
static NEXT_TESTBED: AtomicU32 = AtomicU32::new(0);

/// Prefixes of the live testbeds of this process, for the signal handler.
static LIVE: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// A new prefix, unique among the testbeds of all processes alive on this machine.
pub(crate) fn new_prefix() -> String {
    let n = NEXT_TESTBED.fetch_add(1, Ordering::Relaxed);
    format!("{NAME_PREFIX}{}-{n}", std::process::id())
}

/// The pid encoded in a name made from a prefix of `family` (`<family><pid>-<n>[-<role>]`),
/// or `None` when the name is not one of ours.
fn owner_pid(name: &str, family: &str) -> Option<u32> {
    let rest = name.strip_prefix(family)?;
    let mut parts = rest.splitn(3, '-');
    let pid = parts.next()?;
    let counter = parts.next()?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(pid) || !digits(counter) {
        return None;
    }
    pid.parse().ok()
}

/// The prefix part (`<family><pid>-<n>`) of a name.
fn prefix_of(name: &str) -> String {
    name.splitn(3, '-').take(2).collect::<Vec<_>>().join("-")
}

fn pid_alive(pid: u32) -> bool {
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: signal 0 only checks for existence and permission.
    if unsafe { libc::kill(pid, 0) } == 0 {
        return true;
    }
    // EPERM: it exists but is not ours to signal; still alive.
    std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
}

/// Directory holding the state directories of all testbeds of this machine.
pub(crate) fn state_root() -> PathBuf {
    std::env::temp_dir().join("flannel-rs-testbed")
}

/// Records a live testbed so that SIGINT/SIGTERM clean it up; installs the signal handler
/// the first time.
pub(crate) fn register(prefix: &str) {
    install_signal_handler();
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).insert(prefix.to_owned());
}

/// Forgets a testbed that was cleaned up.
pub(crate) fn unregister(prefix: &str) {
    LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(prefix);
}

/// Removes everything named with `prefix`: processes in its namespaces, the namespaces,
/// mounts under its state directory, and the directory. Best effort: returns what failed.
pub(crate) fn remove_leftovers(prefix: &str) -> Vec<String> {
    let mut errors = Vec::new();
    let own = format!("{prefix}-");
    for ns in netns::list().into_iter().filter(|n| n.starts_with(&own)) {
        if let Err(e) = remove_netns(&ns) {
            errors.push(format!("{e:#}"));
        }
    }
    let dir = state_root().join(prefix);
    if dir.exists() {
        for mount in mounts_under(&dir) {
            if let Err(e) = unmount(&mount) {
                errors.push(e);
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    errors
}

/// Kills whatever still runs in the namespace (an agent, an iperf3 server) and deletes it.
/// The veths inside go with it.
fn remove_netns(ns: &str) -> anyhow::Result<()> {
    let pids = netns::run_blocking("ip", &["netns", "pids", ns], TEARDOWN_TIMEOUT).unwrap_or_default();
    let me = std::process::id();
    for pid in pids.split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
        // Our own main thread never enters a testbed namespace, but never shoot ourselves.
        if pid == me {
            continue;
        }
        if let Ok(pid) = libc::pid_t::try_from(pid) {
            // SAFETY: kill(2) has no memory-safety preconditions. These are processes that a
            // testbed started inside its own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    netns::run_blocking("ip", &["netns", "delete", ns], TEARDOWN_TIMEOUT).map(drop)
}

/// Mount points at or below `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = text
        .lines()
        // Field 5 is the mount point, with spaces and the like escaped as octal; our paths
        // have none.
        .filter_map(|line| line.split(' ').nth(4))
        .map(PathBuf::from)
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

fn unmount(path: &Path) -> Result<(), String> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call. MNT_DETACH never leaves a
    // mount half-removed; pins in a bpffs are freed when its last user goes.
    if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "unmounting {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Removes the leftovers of testbeds whose process is gone (killed test runs): namespaces and
/// state directories named `<family><pid>-<n>...` whose pid is not alive. Returns the
/// prefixes it cleaned. Testbeds of live processes, including this one, are never touched.
///
/// `family` is normally [`NAME_PREFIX`]. [`super::Testbed::start`] calls this once per process.
pub fn cleanup_stale(family: &str) -> Vec<String> {
    let mut candidates: Vec<String> = netns::list();
    if let Ok(dir) = std::fs::read_dir(state_root()) {
        candidates.extend(
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok()),
        );
    }
    let stale: BTreeSet<String> = candidates
        .iter()
        .filter(|name| owner_pid(name, family).is_some_and(|pid| !pid_alive(pid)))
        .map(|name| prefix_of(name))
        .collect();
    for prefix in &stale {
        for error in remove_leftovers(prefix) {
            eprintln!("testbed: cleaning up stale {prefix}: {error}");
        }
    }
    stale.into_iter().collect()
}

/// Runs [`cleanup_stale`] for [`NAME_PREFIX`] the first time it is called in this process.
pub(crate) fn cleanup_stale_once() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let cleaned = cleanup_stale(NAME_PREFIX);
        if !cleaned.is_empty() {
            eprintln!("testbed: removed leftovers of dead test runs: {}", cleaned.join(", "));
        }
    });
}

/// Write end of the self-pipe the signal handler writes to; -1 until installed.
static SIGNAL_PIPE: AtomicI32 = AtomicI32::new(-1);
/// Set by the first signal: a second one kills at once, even if cleanup hangs.
static SIGNALLED: AtomicBool = AtomicBool::new(false);

/// The handler itself does only async-signal-safe things: it hands the signal number to the
/// cleanup thread through a pipe, or, for a second signal, dies by it at once.
extern "C" fn on_signal(signal: libc::c_int) {
    if SIGNALLED.swap(true, Ordering::SeqCst) {
        // SAFETY: signal(2) and raise(3) are async-signal-safe.
        unsafe {
            libc::signal(signal, libc::SIG_DFL);
            libc::raise(signal);
        }
        return;
    }
    let byte = signal as u8;
    // SAFETY: write(2) is async-signal-safe; the pipe's write end stays open for the life of
    // the process, and `byte` outlives the call.
    unsafe { libc::write(SIGNAL_PIPE.load(Ordering::SeqCst), (&raw const byte).cast(), 1) };
}

/// Installs, once per process, SIGINT and SIGTERM handlers that remove every live testbed and
/// then let the signal kill the process as it would have (exit status 130 for Ctrl-C).
///
/// Child processes (agents, etcd) need nothing: they die with the process through
/// `PR_SET_PDEATHSIG` (see [`crate::process`]).
fn install_signal_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2(2) writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            eprintln!(
                "testbed: no cleanup on Ctrl-C (pipe2: {})",
                std::io::Error::last_os_error()
            );
            return;
        }
        SIGNAL_PIPE.store(fds[1], Ordering::SeqCst);
        // SAFETY: the read end was just created and is owned by nothing else.
        let mut reader = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let spawned = std::thread::Builder::new()
            .name("testbed-signals".into())
            .spawn(move || {
                let mut byte = [0u8; 1];
                if reader.read_exact(&mut byte).is_err() {
                    return;
                }
                let signal = libc::c_int::from(byte[0]);
                let live: Vec<String> = LIVE.lock().unwrap_or_else(|e| e.into_inner()).iter().cloned().collect();
                eprintln!("testbed: signal {signal}: removing testbeds {}", live.join(", "));
                for prefix in &live {
                    for error in remove_leftovers(prefix) {
                        eprintln!("testbed: cleaning up {prefix}: {error}");
                    }
                }
                // SAFETY: restoring the default action and raising the signal again is how a
                // process reports that it died of it; exit is the fallback if it does not kill.
                unsafe {
                    libc::signal(signal, libc::SIG_DFL);
                    libc::raise(signal);
                }
                std::process::exit(128 + signal);
            });
        if let Err(e) = spawned {
            eprintln!("testbed: no cleanup on Ctrl-C (thread: {e})");
            return;
        }
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: a zeroed sigaction is valid; we set the handler and an empty mask, and
            // the handler only calls async-signal-safe functions.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
                action.sa_flags = libc::SA_RESTART;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                    eprintln!(
                        "testbed: no cleanup on signal {signal}: {}",
                        std::io::Error::last_os_error()
                    );
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_pid() {
        let prefix = new_prefix();
        assert_eq!(owner_pid(&prefix, NAME_PREFIX), Some(std::process::id()));
        assert_eq!(
            owner_pid(&format!("{prefix}-n1"), NAME_PREFIX),
            Some(std::process::id())
        );
        assert_eq!(prefix_of(&format!("{prefix}-p-a-b")), prefix);
        assert_ne!(new_prefix(), prefix);
    }

    #[test]
    fn foreign_names_are_not_ours() {
        assert_eq!(owner_pid("flannel-1", NAME_PREFIX), None);
        assert_eq!(owner_pid("flX-1-n1", NAME_PREFIX), None);
        assert_eq!(owner_pid("cni-1234", NAME_PREFIX), None);
        assert_eq!(owner_pid("fl12-", NAME_PREFIX), None);
        assert_eq!(owner_pid("flab-0-n1", NAME_PREFIX), None);
        assert_eq!(owner_pid("fl100-0-fabric", NAME_PREFIX), Some(100));
    }
}
