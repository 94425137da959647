//! `run` of the Kubernetes subnet manager: the metadata-only node watch that feeds the
//! [`PeerTracker`], the pod CIDR lookups it asks for, the publishing of the peer set, and
//! this node's own writes (the `NetworkUnavailable` condition, re-asserted annotations).
//!
//! Every wait is a sleep with capped exponential backoff, so an unreachable API costs no CPU
//! (flannel-io/flannel#2171), and the last published set stays in place until a complete
//! fresh one replaces it.

use std::sync::atomic::Ordering;
use std::time::Instant;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Node;
use kube::api::ListParams;
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;
use tokio::sync::watch;
use tokio::time::Instant as TokioInstant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::acquire::cidrs_of;
use super::annotations;
use super::node::Families;
use super::peers::PeerTracker;
use super::KubeSubnetManager;
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::subnet::{Lease, LeaseValidator, PeerSet, SubnetError};

/// Above this many nodes to look up, one paged LIST of full nodes is cheaper than GETs
/// (at start-up every peer is new; that one list is what upstream's informer does anyway).
const BULK_FETCH: usize = 20;
/// Page size of that list, client-go's default.
const PAGE: u32 = 500;
/// How long changes are collected before the peer set is validated and published.
const PUBLISH_DELAY: std::time::Duration = std::time::Duration::from_millis(50);

/// A deferred piece of work: when it is due, and its backoff.
struct Retry {
    due: Option<TokioInstant>,
    backoff: Backoff,
}

impl Retry {
    fn new(mgr: &KubeSubnetManager) -> Self {
        let t = &mgr.opts.timing;
        Self {
            due: None,
            backoff: Backoff::new(t.retry_min, t.retry_max),
        }
    }

    fn now(&mut self) {
        self.due = Some(TokioInstant::now());
    }

    fn later(&mut self) -> std::time::Duration {
        let d = self.backoff.next_delay();
        self.due = Some(TokioInstant::now() + d);
        d
    }

    fn done(&mut self) {
        self.due = None;
        self.backoff.reset();
    }

    async fn wait(&self) {
        match self.due {
            Some(t) => tokio::time::sleep_until(t).await,
            None => std::future::pending().await,
        }
    }
}

impl KubeSubnetManager {
    pub(super) async fn watch_peers(
        &self,
        config: NetworkConfig,
        own: Lease,
        peers: watch::Sender<PeerSet>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let families = Families::of(&config);
        let mut tracker = PeerTracker::new(self.names.clone(), self.node_name.clone(), families);
        let mut validator = LeaseValidator::new(&config, Some(own), self.metrics.clone());
        // Metadata only: annotations without the node's status, which is most of its bytes
        // and changes at every kubelet update. Re-lists may be served from the API server's
        // cache (resourceVersion=0), which is what client-go's informers do too.
        let api: Api<PartialObjectMeta<Node>> = Api::all(self.client.clone());
        let mut events = watcher(api, watcher::Config::default().any_semantic().page_size(PAGE)).boxed();
        let mut condition = Retry::new(self);
        if self.opts.set_node_network_unavailable {
            condition.now();
        }
        let mut reassert = Retry::new(self);
        let mut fetch = Retry::new(self);
        let t = &self.opts.timing;
        let mut watch_backoff = Backoff::new(t.retry_min, t.retry_max);
        let mut last_error: Option<Instant> = None;
        let mut publish: Option<TokioInstant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = condition.wait() => match self.set_network_available().await {
                    Ok(()) => {
                        info!(node = %self.node_name, "set NetworkUnavailable=False on the node");
                        condition.done();
                    }
                    Err(e) => {
                        let d = condition.later();
                        warn!(error = %e, retry_in = ?d, "CompleteLease execute error: cannot set NetworkUnavailable=False");
                    }
                },
                _ = reassert.wait() => self.reassert_own(&tracker, &mut reassert).await,
                _ = fetch.wait() => {
                    if self.fetch_cidrs(&mut tracker, &mut fetch).await && publish.is_none() {
                        publish = Some(TokioInstant::now());
                    }
                }
                ev = events.next() => {
                    let Some(ev) = ev else {
                        // The watcher never ends by itself; start over if it ever does.
                        events = watcher(
                            Api::all(self.client.clone()),
                            watcher::Config::default().any_semantic().page_size(PAGE),
                        ).boxed();
                        continue;
                    };
                    let ev = match ev {
                        Ok(ev) => ev,
                        Err(e) => {
                            // Errors close together mean the API is still in trouble: only a
                            // quiet minute resets the backoff, however many events came between.
                            if last_error.is_some_and(|l| l.elapsed().as_secs() >= 60) {
                                watch_backoff.reset();
                            }
                            last_error = Some(Instant::now());
                            let d = watch_backoff.next_delay();
                            match &e {
                                watcher::Error::WatchError(s) if s.code == 410 => {
                                    info!(retry_in = ?d, "node watch expired (410 Gone); re-listing nodes");
                                }
                                _ => {
                                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                                    warn!(error = %e, retry_in = ?d, "watching nodes failed; keeping the current peers and retrying");
                                }
                            }
                            tokio::select! {
                                _ = shutdown.cancelled() => break,
                                _ = tokio::time::sleep(d) => continue,
                            }
                        }
                    };
                    let (changed, own_seen, maybe_fetch) = self.apply_event(&mut tracker, ev);
                    if own_seen && self.own_needs_annotations(&tracker) && reassert.due.is_none() {
                        // After the backoff, which is never reset: if something keeps undoing
                        // our write, we must not fight it at full speed.
                        reassert.later();
                    }
                    // Looked up at once, before publishing: a complete set must not miss a
                    // peer only because its pod CIDRs are still unknown.
                    let fetched = maybe_fetch
                        && fetch.due.is_none()
                        && !tracker.to_fetch(Instant::now()).is_empty()
                        && self.fetch_cidrs(&mut tracker, &mut fetch).await;
                    if (changed || fetched) && publish.is_none() {
                        // Coalesces a burst of events (a DaemonSet rollout, a re-list) into
                        // one validation of the whole set.
                        publish = Some(TokioInstant::now() + PUBLISH_DELAY);
                    }
                }
                _ = async {
                    match publish {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                } => {
                    publish = None;
                    self.publish(&tracker, &mut validator, &peers);
                }
            }
        }
        info!("stopped watching nodes; the annotations stay on the node");
        Ok(())
    }

    /// Feeds one watcher event to the tracker; returns whether the peers may have changed,
    /// whether this node itself was (re)seen, and whether pod CIDRs may need looking up.
    fn apply_event(&self, tracker: &mut PeerTracker, ev: Event<PartialObjectMeta<Node>>) -> (bool, bool, bool) {
        let is_own = |m: &PartialObjectMeta<Node>| m.metadata.name.as_deref() == Some(self.node_name.as_str());
        match ev {
            Event::Init => {
                debug!("listing nodes");
                tracker.init();
                (false, false, false)
            }
            Event::InitApply(m) => {
                tracker.init_apply(&m.metadata);
                (false, false, false)
            }
            Event::InitDone => {
                tracker.init_done();
                self.metrics.store_resyncs.fetch_add(1, Ordering::Relaxed);
                let (nodes, managed) = tracker.counts();
                info!(
                    nodes,
                    peers = managed,
                    generation = tracker.generation(),
                    "node list synced"
                );
                (true, true, true)
            }
            Event::Apply(m) => {
                let changed = tracker.apply(&m.metadata);
                let name = m.metadata.name.as_deref().unwrap_or_default();
                (changed, is_own(&m), tracker.wants_fetch(name, Instant::now()))
            }
            Event::Delete(m) => {
                let own = is_own(&m);
                if own {
                    warn!(node = %self.node_name, "this node was deleted from the API");
                }
                (tracker.delete(&m.metadata), own, false)
            }
        }
    }

    /// Publishes the validated peers, once the tracker can give a complete set.
    fn publish(&self, tracker: &PeerTracker, validator: &mut LeaseValidator, peers: &watch::Sender<PeerSet>) {
        if !tracker.ready() {
            return;
        }
        let candidates = tracker.candidates();
        let set = PeerSet {
            leases: validator.validate(&candidates),
            complete: true,
            generation: tracker.generation(),
        };
        peers.send_if_modified(|cur| {
            if *cur == set {
                return false;
            }
            debug!(
                peers = set.leases.len(),
                generation = set.generation,
                "publishing peers"
            );
            *cur = set;
            true
        });
    }

    /// Looks up the pod CIDRs the tracker lacks; returns whether it looked any up (so the
    /// set may have changed). On failure the lookup is retried with backoff.
    async fn fetch_cidrs(&self, tracker: &mut PeerTracker, retry: &mut Retry) -> bool {
        let wanted = tracker.to_fetch(Instant::now());
        if wanted.is_empty() {
            retry.done();
            return false;
        }
        let result = if wanted.len() > BULK_FETCH {
            self.fetch_by_list(tracker).await
        } else {
            self.fetch_each(tracker, &wanted).await
        };
        match result {
            Ok(()) => retry.done(),
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                let d = retry.later();
                warn!(error = %e, nodes = wanted.len(), retry_in = ?d, "cannot read the pod CIDRs of new nodes; retrying");
            }
        }
        true
    }

    async fn fetch_each(&self, tracker: &mut PeerTracker, wanted: &[(String, String)]) -> Result<(), SubnetError> {
        for (name, uid) in wanted {
            let object = format!("nodes/{name}");
            match self.call("get", &object, self.nodes.get_opt(name)).await? {
                Some(node) => record(tracker, &node),
                // Gone already: its delete event is on its way and takes it out of the set.
                None => debug!(node = %name, uid = %uid, "node vanished before its pod CIDRs were read"),
            }
        }
        Ok(())
    }

    async fn fetch_by_list(&self, tracker: &mut PeerTracker) -> Result<(), SubnetError> {
        let mut lp = ListParams::default().limit(PAGE);
        loop {
            let page = self.call("list", "nodes", self.nodes.list(&lp)).await?;
            for node in &page.items {
                record(tracker, node);
            }
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(c) => lp = lp.continue_token(&c),
                None => return Ok(()),
            }
        }
    }

    /// Whether this node's flannel annotations differ from what it published.
    fn own_needs_annotations(&self, tracker: &PeerTracker) -> bool {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match (published, tracker.own()) {
            (Some(attrs), Some(own)) => !annotations::wanted(&self.names, &attrs, &own.annotations).is_empty(),
            _ => false,
        }
    }

    /// Writes this node's annotations again when someone removed or changed them, so peers
    /// keep reaching it (upstream only writes them at start-up).
    async fn reassert_own(&self, tracker: &PeerTracker, retry: &mut Retry) {
        let published = self.published.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (Some(attrs), Some(own)) = (published, tracker.own()) else {
            retry.done();
            return;
        };
        let want = annotations::wanted(&self.names, &attrs, &own.annotations);
        if want.is_empty() {
            retry.done();
            return;
        }
        warn!(node = %self.node_name, keys = ?want.keys().collect::<Vec<_>>(), "this node's flannel annotations changed; writing them again");
        match self.write_annotations(&want).await {
            Ok(()) => {
                self.metrics.lease_reasserts.fetch_add(1, Ordering::Relaxed);
                retry.due = None;
            }
            Err(e) => {
                let d = retry.later();
                warn!(error = %e, retry_in = ?d, "cannot write this node's annotations; retrying");
            }
        }
    }
}

/// Caches the pod CIDRs of a full node object in the tracker.
fn record(tracker: &mut PeerTracker, node: &Node) {
    let (Some(uid), rv) = (node.metadata.uid.as_deref(), node.metadata.resource_version.as_deref()) else {
        return;
    };
    tracker.set_cidrs(uid, rv.unwrap_or(""), cidrs_of(node), Instant::now());
}
