//! Helpers for privileged tests: a throw-away network namespace and the rule that such
//! tests skip loudly outside CI and fail inside it.

use std::future::Future;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Whether this process may create network namespaces. When it may not, prints a
/// SKIP line and returns false, unless `CI` is set: then a skipped test would hide a
/// broken runner, so it panics.
pub(crate) fn privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var_os("CI").is_some() {
        panic!("{test}: privileged test cannot run without root, and CI is set");
    }
    // Straight to the stderr handle: libtest captures eprintln!, which would hide it.
    let _ = writeln!(
        std::io::stderr(),
        "##### SKIP {test}: needs root (CAP_SYS_ADMIN + CAP_NET_ADMIN); run the tests as root #####"
    );
    false
}

/// A network namespace named `<prefix>-<pid>-<n>`, deleted on drop (also when the
/// test panics), so parallel tests and crashed runs never collide.
pub(crate) struct TestNetns {
    name: String,
}

impl TestNetns {
    /// Creates the namespace with `ip netns add`, which bind-mounts it at
    /// `/run/netns/<name>`.
    pub(crate) fn new(prefix: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run_ip(&["netns", "add", &name]);
        TestNetns { name }
    }

    /// Runs `ip -n <name> <args>` and panics with its stderr if it fails.
    pub(crate) fn ip(&self, args: &[&str]) {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        run_ip(&all);
    }

    /// Runs `f` inside the namespace: on a fresh thread (the network namespace is a
    /// per-thread attribute) that enters it with `setns(CLONE_NEWNET)` and drives the
    /// future on a current-thread tokio runtime, so every socket it opens lives in
    /// the namespace. A panic in `f` is re-raised here.
    pub(crate) fn run<F, Fut, T>(&self, f: F) -> T
    where
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
        T: Send + 'static,
    {
        let path = format!("/run/netns/{}", self.name);
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
            // SAFETY: `ns` is an open namespace file descriptor for the whole call;
            // setns only changes this thread's namespace, which it owns until it exits.
            let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns({path}): {}", std::io::Error::last_os_error());
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime");
            runtime.block_on(f())
        });
        thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    }
}

impl Drop for TestNetns {
    fn drop(&mut self) {
        // Deleting the namespace also removes every interface created inside it.
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("warning: could not delete netns {}: {out:?}", self.name);
        }
    }
}

fn run_ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run ip {args:?}: {e}"));
    assert!(
        out.status.success(),
        "ip {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
}
