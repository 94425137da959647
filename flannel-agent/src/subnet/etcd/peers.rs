//! The etcd manager's long-running part: keeps our lease alive and publishes the
//! validated peers.
//!
//! One loop, so the order of events is simple to reason about: list, then watch
//! from the listed revision; renew at expiry minus the margin; re-list after a
//! compaction and every resync period; rewrite our key when it disappears. Every
//! failure is retried with backoff, and the last published peer set stays in
//! place meanwhile.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use etcd_client::{EventType, KeyValue, WatchOptions};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{Entry, EtcdSubnetManager, Own, CALL_TIMEOUT};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::subnet::{Lease, LeaseValidator, PeerSet, SubnetError, SubnetKey};

/// Runs until `shutdown`: see the module docs.
pub(super) async fn run(
    mgr: &EtcdSubnetManager,
    config: NetworkConfig,
    own_lease: Lease,
    peers: watch::Sender<PeerSet>,
    shutdown: CancellationToken,
) -> Result<(), SubnetError> {
    let mut own = mgr
        .own
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .unwrap_or_else(|| Own {
            key: own_lease.key().unwrap_or(SubnetKey {
                v4: Default::default(),
                v6: None,
            }),
            lease: own_lease.clone(),
            lease_id: 0,
        });
    let mut watcher = PeerWatcher {
        mgr,
        validator: LeaseValidator::new(&config, Some(own_lease), mgr.metrics.clone()),
        entries: BTreeMap::new(),
        generation: 0,
    };
    let mut renew_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut renew_at = mgr.renew_at(&own);
    let mut watch_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    let mut reassert_backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(60));
    let mut need_list = true;
    let mut since = 0;
    'outer: loop {
        if need_list {
            match watcher.relist(&peers).await {
                Ok(rev) => {
                    // The backoff is reset by the watch, not here: a watch that
                    // etcd keeps refusing must not turn into a re-list loop.
                    since = rev + 1;
                    need_list = false;
                }
                Err(e) => {
                    mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    warn!(error = %e, "listing leases failed; keeping the current datapath and retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(watch_backoff.next_delay()) => continue 'outer,
                    }
                }
            }
            // Our key may have vanished while we were away.
            if !watcher.entries.contains_key(&own.key.to_string()) {
                if let Some(d) = mgr.restore_own(&mut own, &mut renew_at, &mut reassert_backoff).await {
                    need_list = true;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'outer,
                        _ = tokio::time::sleep(d) => continue 'outer,
                    }
                }
            }
        }
        let prefix = mgr.subnets_prefix();
        let opts = WatchOptions::new().with_prefix().with_start_revision(since);
        let mut stream = match tokio::time::timeout(
            CALL_TIMEOUT,
            mgr.client.watch_client().watch(prefix.clone(), Some(opts)),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                warn!(prefix = %prefix, error = %e, "watching leases failed; keeping the current datapath and retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(watch_backoff.next_delay()) => continue 'outer,
                }
            }
            Err(_) => {
                mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                warn!(prefix = %prefix, "watching leases timed out; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'outer,
                    _ = tokio::time::sleep(watch_backoff.next_delay()) => continue 'outer,
                }
            }
        };
        let resync = tokio::time::sleep(mgr.opts.resync_period);
        tokio::pin!(resync);
        loop {
            let renew_sleep = async {
                match renew_at {
                    Some(t) => tokio::time::sleep_until(t).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => break 'outer,
                _ = &mut resync => {
                    debug!("periodic re-list of leases");
                    need_list = true;
                    continue 'outer;
                }
                _ = renew_sleep => {
                    match mgr.renew(&own).await {
                        Ok(n) => {
                            own = n;
                            renew_backoff.reset();
                            renew_at = mgr.renew_at(&own);
                        }
                        Err(e) => {
                            mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                            let d = renew_backoff.next_delay();
                            error!(error = %e, retry_in = ?d, "error renewing lease");
                            renew_at = Some(tokio::time::Instant::now() + d);
                        }
                    }
                }
                msg = stream.message() => {
                    let resp = match msg {
                        Ok(Some(r)) => r,
                        Ok(None) | Err(_) => {
                            mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                            let d = watch_backoff.next_delay();
                            warn!(error = ?msg.err().map(|e| e.to_string()), retry_in = ?d, "lease watch ended; keeping the current datapath and reconnecting");
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'outer,
                                _ = tokio::time::sleep(d) => continue 'outer,
                            }
                        }
                    };
                    if resp.compact_revision() != 0 {
                        warn!(prefix = %prefix, compact_revision = resp.compact_revision(), "etcd watch fell behind compaction horizon, re-listing and resuming");
                        need_list = true;
                        continue 'outer;
                    }
                    if resp.canceled() {
                        // Not compaction (permissions, for one): the same watch
                        // would be refused again at once, so back off first.
                        mgr.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                        let d = watch_backoff.next_delay();
                        warn!(prefix = %prefix, reason = resp.cancel_reason(), retry_in = ?d, "etcd cancelled the lease watch; re-listing");
                        need_list = true;
                        tokio::select! {
                            _ = shutdown.cancelled() => break 'outer,
                            _ = tokio::time::sleep(d) => continue 'outer,
                        }
                    }
                    // Only a response past the creation shows the watch works.
                    if !resp.created() {
                        watch_backoff.reset();
                    }
                    // Resume after the last event received. The header revision
                    // is no guide while etcd is still catching the watch up (it
                    // sends history in batches, each with the current revision),
                    // so it is used only on event-less progress responses, which
                    // etcd sends to caught-up watches alone.
                    match resp.events().iter().filter_map(|ev| ev.kv()).map(KeyValue::mod_revision).max() {
                        Some(rev) => since = since.max(rev + 1),
                        None if !resp.created() => {
                            if let Some(h) = resp.header() {
                                since = since.max(h.revision() + 1);
                            }
                        }
                        None => {}
                    }
                    let own_name = own.key.to_string();
                    let mut own_gone = false;
                    for ev in resp.events() {
                        let Some(kv) = ev.kv() else { continue };
                        let name = String::from_utf8_lossy(kv.key()).strip_prefix(&prefix).map(str::to_string);
                        let Some(name) = name else { continue };
                        match ev.event_type() {
                            EventType::Delete => {
                                own_gone |= name == own_name;
                                watcher.entries.remove(&name);
                            }
                            EventType::Put => {
                                if let Some(e) = Entry::from_kv(&prefix, kv) {
                                    watcher.entries.insert(name, e);
                                }
                            }
                        }
                    }
                    watcher.publish(&peers);
                    if own_gone {
                        if let Some(d) = mgr.restore_own(&mut own, &mut renew_at, &mut reassert_backoff).await {
                            // The re-list after the pause finds the key missing and tries again.
                            need_list = true;
                            tokio::select! {
                                _ = shutdown.cancelled() => break 'outer,
                                _ = tokio::time::sleep(d) => continue 'outer,
                            }
                        }
                    }
                }
            }
        }
    }
    info!("stopped watching leases; the lease stays in etcd");
    Ok(())
}

/// The raw entries under `<prefix>/subnets/` and their validation.
struct PeerWatcher<'a> {
    mgr: &'a EtcdSubnetManager,
    validator: LeaseValidator,
    entries: BTreeMap<String, Entry>,
    generation: u64,
}

impl PeerWatcher<'_> {
    async fn relist(&mut self, peers: &watch::Sender<PeerSet>) -> Result<i64, SubnetError> {
        let (entries, rev) = self.mgr.list().await?;
        self.entries = entries;
        self.generation += 1;
        self.mgr.metrics.store_resyncs.fetch_add(1, Ordering::Relaxed);
        self.publish(peers);
        Ok(rev)
    }

    fn publish(&mut self, peers: &watch::Sender<PeerSet>) {
        let leases = self.validator.validate(self.entries.values().map(|e| &e.candidate));
        let set = PeerSet {
            leases,
            complete: true,
            generation: self.generation,
        };
        peers.send_if_modified(|cur| {
            if *cur == set {
                return false;
            }
            *cur = set;
            true
        });
    }
}
