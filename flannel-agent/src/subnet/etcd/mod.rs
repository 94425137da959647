//! The etcd v3 subnet manager, sharing upstream's keys and values.
//!
//! Layout: `<prefix>/config` holds the network config, `<prefix>/subnets/<key>`
//! one lease each, attached to a 24 h etcd lease (a key without one is a
//! reservation). Where upstream differs, this does better on purpose:
//! - a subnet is created with `If(version(key) == 0)` and then checked against
//!   older overlapping keys, and a lost race is retried, never fatal;
//! - renewal refreshes the existing etcd lease (KeepAlive) instead of granting a
//!   new one each day and leaving the old one behind;
//! - a reservation is updated in place and never given a TTL;
//! - if our key disappears (deleted, expired during an outage, etcd data loss)
//!   it is written again instead of shutting the daemon down.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

mod peers;

use async_trait::async_trait;
use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, PutOptions, Txn, TxnOp};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::{alloc, Candidate, Lease, LeaseAttrs, PeerSet, PreviousSubnets, SubnetError, SubnetKey, SubnetManager};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::metrics::{Metrics, Rejection};

/// Upstream's lease TTL.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// How long one unary etcd call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts at acquiring a subnet before giving up (each lost race is one).
const ACQUIRE_ATTEMPTS: u32 = 20;

/// How to reach etcd, and the lease timing. `Debug` hides the password.
#[derive(Clone)]
pub struct EtcdOptions {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, `/coreos.com/network` by default.
    pub prefix: String,
    /// TLS client key; TLS is used only with both key and cert, as upstream.
    pub keyfile: Option<PathBuf>,
    /// TLS client certificate.
    pub certfile: Option<PathBuf>,
    /// CA bundle for the server certificate.
    pub cafile: Option<PathBuf>,
    /// User name for etcd auth.
    pub username: Option<String>,
    /// Password for etcd auth; never logged.
    pub password: Option<String>,
    /// TTL of the etcd lease behind our key.
    pub lease_ttl: Duration,
    /// Renew this long before the lease runs out.
    pub renew_margin: Duration,
    /// Full re-list period, a guard against missed watch events.
    pub resync_period: Duration,
}

impl std::fmt::Debug for EtcdOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdOptions")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .field("keyfile", &self.keyfile)
            .field("certfile", &self.certfile)
            .field("cafile", &self.cafile)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("lease_ttl", &self.lease_ttl)
            .field("renew_margin", &self.renew_margin)
            .field("resync_period", &self.resync_period)
            .finish()
    }
}

/// Our own lease as the store holds it.
#[derive(Debug, Clone)]
struct Own {
    key: SubnetKey,
    lease: Lease,
    /// The etcd lease id behind the key; 0 for a reservation.
    lease_id: i64,
}

/// The etcd subnet manager.
pub struct EtcdSubnetManager {
    client: Client,
    opts: EtcdOptions,
    metrics: Arc<Metrics>,
    own: Mutex<Option<Own>>,
}

fn store_err(op: &'static str, object: impl Into<String>, e: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store {
        op,
        object: object.into(),
        detail: e.to_string(),
    }
}

/// Runs one unary etcd call with a deadline, mapping its error.
async fn call<T>(
    op: &'static str,
    object: &str,
    fut: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SubnetError> {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_err(op, object, e)),
        Err(_) => Err(store_err(op, object, format!("no answer within {CALL_TIMEOUT:?}"))),
    }
}

impl EtcdSubnetManager {
    /// Connects to etcd. The connection itself is lazy; with auth, the token
    /// request needs etcd to answer, so this can fail and should be retried.
    pub async fn connect(opts: EtcdOptions, metrics: Arc<Metrics>) -> Result<Self, SubnetError> {
        let endpoints = opts.endpoints.join(",");
        let mut co = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(5))
            // HTTP/2 pings notice a dead connection under a quiet watch.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let (Some(key), Some(cert)) = (&opts.keyfile, &opts.certfile) {
            let read =
                |p: &PathBuf| std::fs::read(p).map_err(|e| store_err("read TLS file", p.display().to_string(), e));
            let mut tls =
                etcd_client::TlsOptions::new().identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
            if let Some(ca) = &opts.cafile {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
            }
            co = co.with_tls(tls);
        } else {
            warn!("no certificate provided: connecting to etcd with http. This is insecure");
        }
        if let Some(user) = &opts.username {
            // etcd's simple tokens do not survive an etcd restart; refresh them.
            co = co
                .with_user(user.clone(), opts.password.clone().unwrap_or_default())
                .with_auto_token_refresh(true);
        }
        let client = call("connect", &endpoints, Client::connect(&opts.endpoints, Some(co))).await?;
        Ok(Self {
            client,
            opts,
            metrics,
            own: Mutex::new(None),
        })
    }

    fn prefix(&self) -> &str {
        self.opts.prefix.trim_end_matches('/')
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix())
    }

    fn key_path(&self, key: &SubnetKey) -> String {
        format!("{}{key}", self.subnets_prefix())
    }

    /// Lists every lease entry, with the revision the list was taken at.
    async fn list(&self) -> Result<(BTreeMap<String, Entry>, i64), SubnetError> {
        let prefix = self.subnets_prefix();
        let mut kv = self.client.kv_client();
        let resp = call(
            "list",
            &prefix,
            kv.get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        let rev = resp.header().map_or(0, |h| h.revision());
        let entries = resp
            .kvs()
            .iter()
            .filter_map(|kv| Entry::from_kv(&prefix, kv))
            .map(|e| (e.name.clone(), e));
        Ok((entries.collect(), rev))
    }

    /// Grants a fresh etcd lease of `lease_ttl` for `path`; returns its id and TTL.
    async fn grant(&self, path: &str) -> Result<(i64, Duration), SubnetError> {
        let ttl = self.opts.lease_ttl.as_secs().max(1) as i64;
        let g = call("lease grant", path, self.client.lease_client().grant(ttl, None)).await?;
        Ok((g.id(), Duration::from_secs(g.ttl().max(0) as u64)))
    }

    /// Revokes a lease we granted but could not use, so it does not linger for
    /// a day; best effort, as it expires anyway.
    async fn revoke_unused(&self, path: &str, id: i64) {
        if let Err(e) = call("lease revoke", path, self.client.lease_client().revoke(id)).await {
            debug!(key = %path, error = %e, "could not revoke an unused etcd lease; it will expire");
        }
    }

    /// Writes our value under `key`, creating it only if absent. `live` is an
    /// etcd lease of ours that is still alive (id, TTL) to carry the key; without
    /// one a new lease is granted, and revoked again if the key cannot be written.
    async fn create(
        &self,
        key: SubnetKey,
        attrs: &LeaseAttrs,
        live: Option<(i64, Duration)>,
    ) -> Result<Option<Own>, SubnetError> {
        let path = self.key_path(&key);
        let (lease_id, ttl, granted) = match live {
            Some((id, ttl)) => (id, ttl, false),
            None => {
                let (id, ttl) = self.grant(&path).await?;
                (id, ttl, true)
            }
        };
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(
                path.clone(),
                attrs.to_json(),
                Some(PutOptions::new().with_lease(lease_id)),
            )]);
        let resp = call("create", &path, self.client.kv_client().txn(txn)).await;
        if !resp.as_ref().is_ok_and(|r| r.succeeded()) {
            // On an error the put may or may not have happened; revoking covers
            // both (an orphan lease, or a key we are about to report as failed).
            if granted {
                self.revoke_unused(&path, lease_id).await;
            }
            return resp.map(|_| None);
        }
        Ok(Some(Own {
            key,
            lease: lease_for(key, attrs, Some(SystemTime::now() + ttl)),
            lease_id,
        }))
    }

    /// Replaces the value of an existing entry with ours, keeping a reservation
    /// a reservation and refreshing a live etcd lease.
    async fn reuse(&self, e: &Entry, key: SubnetKey, attrs: &LeaseAttrs) -> Result<Option<Own>, SubnetError> {
        let path = self.key_path(&key);
        let (lease_id, expiration) = if e.lease_id == 0 {
            (0, None)
        } else {
            match self.keep_alive(e.lease_id).await? {
                Some(ttl) => (e.lease_id, Some(SystemTime::now() + ttl)),
                None => {
                    let (id, ttl) = self.grant(&path).await?;
                    (id, Some(SystemTime::now() + ttl))
                }
            }
        };
        let granted = lease_id != 0 && lease_id != e.lease_id;
        let put = if lease_id == 0 {
            PutOptions::new()
        } else {
            PutOptions::new().with_lease(lease_id)
        };
        let txn = Txn::new()
            .when([Compare::mod_revision(path.clone(), CompareOp::Equal, e.mod_revision)])
            .and_then([TxnOp::put(path.clone(), attrs.to_json(), Some(put))]);
        let resp = call("update", &path, self.client.kv_client().txn(txn)).await;
        if !resp.as_ref().is_ok_and(|r| r.succeeded()) {
            if granted {
                self.revoke_unused(&path, lease_id).await;
            }
            return resp.map(|_| None);
        }
        Ok(Some(Own {
            key,
            lease: lease_for(key, attrs, expiration),
            lease_id,
        }))
    }

    /// Refreshes an etcd lease; `None` if it no longer exists.
    async fn keep_alive(&self, id: i64) -> Result<Option<Duration>, SubnetError> {
        let object = format!("lease {id:x}");
        let mut lc = self.client.lease_client();
        let fut = async {
            let (mut keeper, mut stream) = match lc.keep_alive(id).await {
                Ok(s) => s,
                // etcd answers a keep-alive of an unknown lease with TTL 0, which
                // the client reports as this error rather than as a response.
                Err(etcd_client::Error::LeaseKeepAliveError(m)) if m == "lease not found" => return Ok(None),
                Err(e) => return Err(e),
            };
            keeper.keep_alive().await?;
            stream.message().await
        };
        let resp = call("lease keep-alive", &object, fut).await?;
        Ok(resp
            .filter(|r| r.ttl() > 0)
            .map(|r| Duration::from_secs(r.ttl() as u64)))
    }

    /// Deletes `path` if it is still at `mod_revision`.
    async fn delete_if_unchanged(&self, path: &str, mod_revision: i64) -> Result<(), SubnetError> {
        let txn = Txn::new()
            .when([Compare::mod_revision(path, CompareOp::Equal, mod_revision)])
            .and_then([TxnOp::delete(path, None)]);
        call("delete", path, self.client.kv_client().txn(txn)).await.map(|_| ())
    }

    /// After creating `own`, checks that no older key overlaps it; if one does,
    /// we lost a race with a key of another shape and give ours back.
    async fn lost_race(&self, own: &Own) -> Result<bool, SubnetError> {
        let (entries, _) = self.list().await?;
        let path = self.key_path(&own.key);
        let Some(mine) = entries.get(&own.key.to_string()) else {
            return Ok(true);
        };
        let older = entries.values().any(|e| {
            e.name != mine.name
                && e.create_revision < mine.create_revision
                && e.key.is_some_and(|k| overlaps(&k, &own.key))
        });
        if older {
            self.delete_if_unchanged(&path, mine.mod_revision).await?;
            self.revoke_unused(&path, own.lease_id).await;
        }
        Ok(older)
    }

    async fn try_acquire(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: PreviousSubnets,
    ) -> Result<Option<Own>, SubnetError> {
        let (entries, _) = self.list().await?;
        let ours = entries
            .values()
            .find(|e| e.key.is_some() && e.attrs.as_ref().is_some_and(|a| a.public_ip == attrs.public_ip));
        if let (Some(e), Some(key)) = (ours, ours.and_then(|e| e.key)) {
            if compatible(config, &key) {
                info!(subnet = %key.v4, ipv6_subnet = ?key.v6, public_ip = %attrs.public_ip, "found lease for current IP, reusing");
                return self.reuse(e, key, attrs).await;
            }
            let path = self.key_path(&key);
            if e.lease_id == 0 {
                warn!(key = %path, "reservation for current IP is not compatible with the current config; leaving it and allocating another subnet");
            } else {
                warn!(key = %path, "found lease for current IP, but not compatible with current config, deleting");
                self.delete_if_unchanged(&path, e.mod_revision).await?;
                return Ok(None);
            }
        }

        let taken_v4: Vec<_> = entries.values().filter_map(|e| e.key.map(|k| k.v4)).collect();
        let taken_v6: Vec<_> = entries.values().filter_map(|e| e.key.and_then(|k| k.v6)).collect();
        let free4 = |sn: &ipnet::Ipv4Net| {
            !taken_v4
                .iter()
                .any(|t| t.contains(&sn.network()) || sn.contains(&t.network()))
        };
        let free6 = |sn: &ipnet::Ipv6Net| {
            !taken_v6
                .iter()
                .any(|t| t.contains(&sn.network()) || sn.contains(&t.network()))
        };

        let v4 = match previous.v4.filter(|p| config.v4_compatible(p) && free4(p)) {
            Some(p) => {
                info!(subnet = %p, "found previously leased subnet, reusing");
                p
            }
            None => {
                if let Some(p) = previous.v4 {
                    warn!(subnet = %p, "previously leased subnet is taken or not compatible with the config; allocating another");
                }
                alloc::free_v4(config, &taken_v4).ok_or_else(|| SubnetError::OutOfSubnets {
                    len: config.subnet_len,
                    min: config.subnet_min.map(|a| a.to_string()).unwrap_or_default(),
                    max: config.subnet_max.map(|a| a.to_string()).unwrap_or_default(),
                })?
            }
        };
        let v6 = if config.enable_ipv6 {
            let p = previous.v6.filter(|p| config.v6_compatible(p) && free6(p));
            Some(
                p.or_else(|| alloc::free_v6(config, &taken_v6))
                    .ok_or_else(|| SubnetError::OutOfSubnets {
                        len: config.ipv6_subnet_len,
                        min: config.ipv6_subnet_min.map(|a| a.to_string()).unwrap_or_default(),
                        max: config.ipv6_subnet_max.map(|a| a.to_string()).unwrap_or_default(),
                    })?,
            )
        } else {
            None
        };
        let key = SubnetKey { v4, v6 };
        let Some(own) = self.create(key, attrs, None).await? else {
            debug!(key = %key, "subnet taken by another node meanwhile; retrying");
            return Ok(None);
        };
        if self.lost_race(&own).await? {
            debug!(key = %key, "an older overlapping lease exists; retrying");
            return Ok(None);
        }
        info!(subnet = %v4, ipv6_subnet = ?v6, public_ip = %attrs.public_ip, "allocated lease to current node");
        Ok(Some(own))
    }

    /// Makes sure our key exists with our value; called when it disappeared.
    async fn reassert(&self, own: &Own) -> Result<Own, SubnetError> {
        let (entries, _) = self.list().await?;
        if let Some(e) = entries.get(&own.key.to_string()) {
            if e.attrs.as_ref() == Some(&own.lease.attrs) {
                return Ok(Own {
                    lease_id: e.lease_id,
                    ..own.clone()
                });
            }
        }
        // The key may have been deleted while its etcd lease lives on: carry the
        // key on that lease again rather than leave it orphaned for a day.
        let live = match own.lease_id {
            0 => None,
            id => self.keep_alive(id).await?.map(|ttl| (id, ttl)),
        };
        match self.create(own.key, &own.lease.attrs, live).await? {
            Some(n) => {
                self.metrics.lease_reasserts.fetch_add(1, Ordering::Relaxed);
                warn!(key = %self.key_path(&own.key), "own lease was missing from etcd; wrote it again");
                Ok(n)
            }
            None => Err(SubnetError::Unsupported(format!(
                "own lease key {} now holds another node's lease; keeping the datapath as is. Restart flanneld to acquire a new subnet",
                self.key_path(&own.key)
            ))),
        }
    }

    /// Renews our etcd lease; re-creates the key if the lease is gone.
    async fn renew(&self, own: &Own) -> Result<Own, SubnetError> {
        match self.keep_alive(own.lease_id).await? {
            Some(ttl) => {
                let mut n = own.clone();
                n.lease.expiration = Some(SystemTime::now() + ttl);
                self.metrics.lease_renewals.fetch_add(1, Ordering::Relaxed);
                info!(subnet = %own.key, ttl_secs = ttl.as_secs(), "lease renewed");
                Ok(n)
            }
            None => self.reassert(own).await,
        }
    }

    /// Writes our key again after it went missing. Returns how long to wait
    /// before trying again (after a re-list) when that failed for a reason that
    /// may pass; a key now held by another node is left to the periodic re-list.
    async fn restore_own(
        &self,
        own: &mut Own,
        renew_at: &mut Option<tokio::time::Instant>,
        backoff: &mut Backoff,
    ) -> Option<Duration> {
        match self.reassert(own).await {
            Ok(n) => {
                *own = n;
                *renew_at = self.renew_at(own);
                backoff.reset();
                None
            }
            Err(e) => {
                let retry = matches!(e, SubnetError::Store { .. }).then(|| {
                    self.metrics.store_errors.fetch_add(1, Ordering::Relaxed);
                    backoff.next_delay()
                });
                error!(error = %e, retry_in = ?retry, "could not restore own lease");
                retry
            }
        }
    }

    fn renew_at(&self, own: &Own) -> Option<tokio::time::Instant> {
        let exp = own.lease.expiration?;
        let left = exp.duration_since(SystemTime::now()).unwrap_or_default();
        Some(tokio::time::Instant::now() + left.saturating_sub(self.opts.renew_margin))
    }
}

/// One key under `<prefix>/subnets/`, as read.
#[derive(Debug, Clone)]
struct Entry {
    name: String,
    key: Option<SubnetKey>,
    attrs: Option<LeaseAttrs>,
    mod_revision: i64,
    create_revision: i64,
    lease_id: i64,
    candidate: Candidate,
}

impl Entry {
    fn from_kv(prefix: &str, kv: &KeyValue) -> Option<Self> {
        let full = String::from_utf8_lossy(kv.key());
        let name = full.strip_prefix(prefix)?.to_string();
        let key = SubnetKey::parse(&name);
        let attrs = LeaseAttrs::from_json(kv.value());
        let lease = match (key, &attrs) {
            (None, _) => Err((Rejection::BadKey, format!("{name:.64} is not a subnet key"))),
            (Some(_), Err(e)) => Err((Rejection::BadValue, e.to_string())),
            (Some(k), Ok(a)) => Ok(lease_for(k, a, None)),
        };
        Some(Self {
            candidate: Candidate {
                name: name.clone(),
                version: kv.mod_revision(),
                age: kv.create_revision(),
                lease,
            },
            name,
            key,
            attrs: attrs.ok(),
            mod_revision: kv.mod_revision(),
            create_revision: kv.create_revision(),
            lease_id: kv.lease(),
        })
    }
}

fn lease_for(key: SubnetKey, attrs: &LeaseAttrs, expiration: Option<SystemTime>) -> Lease {
    Lease {
        subnet: Some(key.v4),
        ipv6_subnet: key.v6,
        attrs: attrs.clone(),
        expiration,
    }
}

fn compatible(config: &NetworkConfig, key: &SubnetKey) -> bool {
    config.v4_compatible(&key.v4)
        && match key.v6 {
            Some(v6) => config.enable_ipv6 && config.v6_compatible(&v6),
            None => !config.enable_ipv6,
        }
}

fn overlaps(a: &SubnetKey, b: &SubnetKey) -> bool {
    let v4 = a.v4.contains(&b.v4.network()) || b.v4.contains(&a.v4.network());
    let v6 = match (a.v6, b.v6) {
        (Some(x), Some(y)) => x.contains(&y.network()) || y.contains(&x.network()),
        _ => false,
    };
    v4 || v6
}

#[async_trait]
impl SubnetManager for EtcdSubnetManager {
    fn name(&self) -> &'static str {
        "etcd"
    }

    async fn network_config(&self) -> Result<NetworkConfig, SubnetError> {
        let key = format!("{}/config", self.prefix());
        let resp = call("get", &key, self.client.kv_client().get(key.clone(), None)).await?;
        let kv = resp
            .kvs()
            .first()
            .ok_or_else(|| SubnetError::ConfigMissing { key: key.clone() })?;
        let text = String::from_utf8_lossy(kv.value());
        NetworkConfig::parse_and_check(&text).map_err(|error| SubnetError::Config { location: key, error })
    }

    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: PreviousSubnets,
    ) -> Result<Lease, SubnetError> {
        if !config.enable_ipv4 {
            return Err(SubnetError::Unsupported(
                "the etcd subnet manager needs EnableIPv4 (as upstream, IPv6-only works only with --kube-subnet-mgr)"
                    .into(),
            ));
        }
        let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_secs(1));
        for _ in 0..ACQUIRE_ATTEMPTS {
            if let Some(own) = self.try_acquire(config, attrs, previous).await? {
                let lease = own.lease.clone();
                *self.own.lock().unwrap_or_else(|p| p.into_inner()) = Some(own);
                return Ok(lease);
            }
            tokio::time::sleep(backoff.next_delay()).await;
        }
        Err(SubnetError::Contended(ACQUIRE_ATTEMPTS))
    }

    async fn run(
        &self,
        config: NetworkConfig,
        own_lease: Lease,
        peers: watch::Sender<PeerSet>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        peers::run(self, config, own_lease, peers, shutdown).await
    }
}
