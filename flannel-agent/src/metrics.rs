//! Process-wide counters, exported in Prometheus text format on the healthz
//! server (`/metrics`) and read by `flannelctl`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a lease read from the store was not used. Each reason is a counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rejection {
    /// The key (or node) does not name a subnet.
    BadKey,
    /// The value is not a lease: bad JSON, bad address, too large.
    BadValue,
    /// The subnet lies outside the cluster network.
    OutsideNetwork,
    /// The subnet overlaps this node's own subnet.
    OverlapsOwn,
    /// The subnet overlaps an older lease of another node.
    OverlapsPeer,
    /// The PublicIP cannot be an underlay address (unspecified, loopback,
    /// multicast, broadcast, or this node's own).
    BadPublicIp,
}

impl Rejection {
    /// Every reason, in the order of [`Metrics::leases_rejected`].
    pub const ALL: [Rejection; 6] = [
        Rejection::BadKey,
        Rejection::BadValue,
        Rejection::OutsideNetwork,
        Rejection::OverlapsOwn,
        Rejection::OverlapsPeer,
        Rejection::BadPublicIp,
    ];

    /// The label used in metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::BadKey => "bad_key",
            Rejection::BadValue => "bad_value",
            Rejection::OutsideNetwork => "outside_network",
            Rejection::OverlapsOwn => "overlaps_own_subnet",
            Rejection::OverlapsPeer => "overlaps_peer",
            Rejection::BadPublicIp => "bad_public_ip",
        }
    }
}

/// Counters of the agent's control plane.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Leases ignored, by [`Rejection`] (index = position in [`Rejection::ALL`]).
    pub leases_rejected: [AtomicU64; 6],
    /// Full re-lists of the store (start, compaction, periodic).
    pub store_resyncs: AtomicU64,
    /// Errors talking to the store (each retried with backoff).
    pub store_errors: AtomicU64,
    /// Successful lease renewals.
    pub lease_renewals: AtomicU64,
    /// Times the own lease was found missing and written again.
    pub lease_reasserts: AtomicU64,
    /// Completed datapath reconciliations.
    pub reconciles: AtomicU64,
    /// Datapath reconciliations that failed (retried).
    pub reconcile_errors: AtomicU64,
    /// How long the last successful reconciliation took, in microseconds.
    pub reconcile_last_us: AtomicU64,
    /// The longest successful reconciliation so far, in microseconds: usually the first,
    /// which programs every peer.
    pub reconcile_max_us: AtomicU64,
    /// CNI files (plugin, conflist) found missing or changed on the host and installed again.
    pub cni_reinstalls: AtomicU64,
}

impl Metrics {
    /// Records the duration of one successful reconciliation.
    pub fn reconciled(&self, took: std::time::Duration) {
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        self.reconciles.fetch_add(1, Ordering::Relaxed);
        self.reconcile_last_us.store(us, Ordering::Relaxed);
        self.reconcile_max_us.fetch_max(us, Ordering::Relaxed);
    }

    /// Counts one rejected lease.
    pub fn reject(&self, why: Rejection) {
        let i = Rejection::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.leases_rejected[i].fetch_add(1, Ordering::Relaxed);
    }

    /// The count of rejections for one reason.
    pub fn rejected(&self, why: Rejection) -> u64 {
        let i = Rejection::ALL.iter().position(|r| *r == why).unwrap_or(0);
        self.leases_rejected[i].load(Ordering::Relaxed)
    }

    /// Renders the counters in Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE flannel_leases_rejected_total counter");
        for (i, r) in Rejection::ALL.iter().enumerate() {
            let v = self.leases_rejected[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "flannel_leases_rejected_total{{reason=\"{}\"}} {v}", r.as_str());
        }
        for (name, c) in [
            ("flannel_store_resyncs_total", &self.store_resyncs),
            ("flannel_store_errors_total", &self.store_errors),
            ("flannel_lease_renewals_total", &self.lease_renewals),
            ("flannel_lease_reasserts_total", &self.lease_reasserts),
            ("flannel_reconciles_total", &self.reconciles),
            ("flannel_reconcile_errors_total", &self.reconcile_errors),
            ("flannel_cni_reinstalls_total", &self.cni_reinstalls),
        ] {
            let _ = writeln!(out, "# TYPE {name} counter\n{name} {}", c.load(Ordering::Relaxed));
        }
        for (name, us) in [
            ("flannel_reconcile_last_duration_seconds", &self.reconcile_last_us),
            ("flannel_reconcile_max_duration_seconds", &self.reconcile_max_us),
        ] {
            let secs = us.load(Ordering::Relaxed) as f64 / 1e6;
            let _ = writeln!(out, "# TYPE {name} gauge\n{name} {secs:.6}");
        }
        out
    }
}
