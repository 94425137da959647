//! The testbed: an N-node cluster in network namespaces on one machine, with a real etcd (or,
//! in kube mode, the Kubernetes API emulator), real flanneld processes, pods wired by the real
//! CNI plugins, and probes that send real traffic. Every privileged test, `cargo xtask demo` and `cargo xtask bench` build on it.
//!
//! - `cluster.rs`: [`Testbed`], the topology and addressing plan, etcd, generic helpers;
//! - `agent.rs`: flanneld per node (start, readiness, stop, kill, restart, pause);
//! - `pods.rs` and `cni.rs`: pods through CNI ADD/DEL, and the delegate config renderer;
//! - `flannel_cni.rs`: pods through flannel-rs's CNI plugin binary (the default);
//! - `probe.rs`: ping, TCP echo, HTTP GET and the connectivity [`Matrix`];
//! - `netns.rs`: namespace threads, commands and the etcd forwarder;
//! - `cleanup.rs`: names, cleanup on drop, on Ctrl-C and of dead runs;
//! - `inspect.rs`: a node's routes, neighbours, FDB and links, parsed from iproute2's JSON;
//! - `leases.rs`: subnet leases in etcd, in upstream's format;
//! - `kube.rs`: kube mode, the Kubernetes API emulator as the store (Node objects, pod CIDRs);
//! - `upstream.rs`: a node set up by hand as upstream flanneld would (mixed clusters);
//! - `timing.rs`: bounded polling, starting agents together, recording measurements.
//!
//! Methods that wait are async and need a tokio runtime with I/O and timers (any
//! `#[tokio::test]`); every wait is bounded. `Drop` is synchronous. Needs root, iproute2,
//! `etcd`, `ping` and the CNI plugins: see `tests/README.md`.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use std::time::Duration;
//! use flannel_tests::testbed::{require_root, Testbed, TestbedOptions};
//!
//! if !require_root("vxlan_baseline") {
//!     return Ok(());
//! }
//! let options = TestbedOptions::new(2).net_conf(r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#);
//! let mut tb = Testbed::start(options).await?;
//! for node in 1..=2 {
//!     tb.start_agent(node, &[]).await?;
//!     tb.wait_ready(node, Duration::from_secs(30)).await?;
//! }
//! let a = tb.add_pod(1, "a").await?;
//! let b = tb.add_pod(2, "b").await?;
//! let matrix = tb.connectivity_matrix(&[a, b]).await;
//! println!("{matrix}");
//! matrix.assert_full();
//! # Ok(())
//! # }
//! ```

mod agent;
mod cleanup;
pub mod cluster;
pub mod cni;
pub mod flannel_cni;
pub mod inspect;
pub mod kube;
pub mod leases;
pub mod netns;
mod pods;
pub mod probe;
pub mod timing;
pub mod upstream;

use std::io::Write;

pub use self::agent::{flanneld_path, AGENT_HEALTHZ_PORT};
pub use self::cleanup::{cleanup_stale, NAME_PREFIX};
pub use self::cluster::{Node, Testbed, TestbedOptions};
pub use self::cni::cni_delegate_config;
pub use self::pods::Pod;
pub use self::probe::{Endpoint, Matrix};
pub use self::timing::{poll_until, wait_for};

/// Whether a privileged test can run: true when we are root.
///
/// Otherwise it prints a loud `SKIPPED (needs root): <test>` to stderr and returns false, so
/// the test can return early, unless `CI` is set (to anything but empty, `0` or `false`): in
/// CI a privileged test that cannot run is a failure, never a silent pass, so this panics.
#[track_caller]
pub fn require_root(test: &str) -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    let in_ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
    if in_ci {
        panic!("privileged test cannot run in CI: {test} needs root");
    }
    // Straight to fd 2: libtest captures `eprintln!` of passing tests, which would make the
    // skip silent.
    let banner = "*".repeat(70);
    let _ = writeln!(std::io::stderr(), "\n{banner}\nSKIPPED (needs root): {test}\n{banner}");
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Demos and benchmarks run testbeds in spawned tasks, so the testbed and the futures of
    /// its methods must be `Send`.
    #[test]
    fn the_testbed_and_its_futures_are_send() {
        fn is_send<T: Send>(_: &T) {}
        fn futures(tb: &mut Testbed, pods: &[Pod]) {
            is_send(tb);
            is_send(&tb.add_pod(1, "p"));
            is_send(&tb.start_agent(1, &[]));
            is_send(&tb.wait_ready(1, std::time::Duration::ZERO));
            is_send(&tb.connectivity_matrix(pods));
            is_send(&Testbed::start(TestbedOptions::new(1)));
        }
        let _ = futures;
    }
}
