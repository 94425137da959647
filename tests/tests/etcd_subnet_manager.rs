//! Integration tests of `flannel_agent::subnet::etcd::EtcdSubnetManager`, used as a library
//! against a real etcd 3.4 (see `flannel_tests::etcd`).
//!
//! Each test starts its own etcd. Keys and values are written the way upstream flanneld writes
//! them, so these tests also pin down interoperability with upstream nodes in the same cluster.
//! Waits poll with a deadline ([`wait_until`], [`wait_for_key`]); the only fixed waits are where
//! a test must let time pass to show that something does *not* happen.

use std::future::Future;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use etcd_client::{Permission, PutOptions};
use flannel_agent::config::{ConfigError, NetworkConfig};
use flannel_agent::metrics::{Metrics, Rejection};
use flannel_agent::subnet::etcd::{EtcdOptions as ManagerOptions, EtcdSubnetManager, DEFAULT_LEASE_TTL};
use flannel_agent::subnet::{Lease, LeaseAttrs, PeerSet, PreviousSubnets, SubnetError, SubnetManager};
use flannel_tests::etcd::{EtcdOptions, EtcdServer, DEFAULT_PREFIX, FLANNEL_PASSWORD, FLANNEL_ROLE, FLANNEL_USER};
use ipnet::Ipv4Net;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A /16 network with upstream's derived defaults: /24 subnets from 10.5.1.0 to 10.5.255.0.
const NETWORK_CONFIG: &str = r#"{"Network":"10.5.0.0/16","Backend":{"Type":"vxlan"}}"#;
/// How long a condition that should follow promptly may take on a loaded two-core machine.
const PROMPTLY: Duration = Duration::from_secs(10);
/// How often [`wait_until`] and [`wait_for_key`] look again.
const POLL: Duration = Duration::from_millis(50);
/// Bound on one admin request of the tests' own.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// `<prefix>/config`.
fn config_key() -> String {
    format!("{DEFAULT_PREFIX}config")
}

/// `<prefix>/subnets/<name>`.
fn subnet_key(name: &str) -> String {
    format!("{DEFAULT_PREFIX}subnets/{name}")
}

/// The key name upstream's `MakeSubnetKey` gives an IPv4 subnet: `10.5.34.0-24`.
fn key_name(sn: Ipv4Net) -> String {
    format!("{}-{}", sn.network(), sn.prefix_len())
}

/// A VTEP MAC derived from the address, so every test node has its own.
fn vtep_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("c6:d2:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

/// What a vxlan node publishes about itself.
fn vxlan_attrs(ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip,
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(serde_json::json!({"VNI": 1, "VtepMAC": vtep_mac(ip)})),
        backend_v6_data: None,
    }
}

/// The exact value upstream flanneld (Go `json.Marshal` of `lease.LeaseAttrs`) writes for a
/// vxlan node with this address. Spelled out by hand so that it does not share code with
/// `LeaseAttrs::to_json`.
fn upstream_value(ip: Ipv4Addr) -> String {
    let mac = vtep_mac(ip);
    format!(
        r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"{mac}"}}}}"#
    )
}

/// The `n`-th test address (`n` up to 250) in 198.18.0.0/15, the RFC 2544 benchmarking range,
/// spread over the whole range.
fn test_ip(n: u32) -> Ipv4Addr {
    assert!(n <= 250, "test_ip({n}) would leave 198.18.0.0/15");
    Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + 1 + n * 521)
}

/// Manager options for a plain etcd: the harness prefix, upstream's 24 h TTL, no periodic re-list
/// during a test.
fn manager_options(endpoint: String) -> ManagerOptions {
    ManagerOptions {
        endpoints: vec![endpoint],
        prefix: DEFAULT_PREFIX.to_owned(),
        keyfile: None,
        certfile: None,
        cafile: None,
        username: None,
        password: None,
        lease_ttl: DEFAULT_LEASE_TTL,
        renew_margin: Duration::from_secs(3600),
        resync_period: Duration::from_secs(600),
    }
}

/// Runs one request of the test's own with a deadline.
async fn timed<T>(what: &str, fut: impl Future<Output = Result<T, etcd_client::Error>>) -> anyhow::Result<T> {
    tokio::time::timeout(REQUEST_TIMEOUT, fut)
        .await
        .with_context(|| format!("{what}: no answer within {REQUEST_TIMEOUT:?}"))?
        .with_context(|| what.to_owned())
}

/// Writes `key` attached to a fresh etcd lease of an hour, as an upstream node does; returns
/// the lease id.
async fn put_leased(etcd: &EtcdServer, key: &str, value: &str) -> anyhow::Result<i64> {
    let client = etcd.client().await?;
    let lease = timed("lease grant", client.lease_client().grant(3600, None))
        .await?
        .id();
    let options = PutOptions::new().with_lease(lease);
    timed("put", client.kv_client().put(key, value, Some(options))).await?;
    Ok(lease)
}

/// A key as etcd holds it.
#[derive(Debug, Clone, PartialEq)]
struct Stored {
    /// The value, as text.
    value: String,
    /// The etcd lease id behind the key; 0 for none.
    lease: i64,
}

/// Reads `key` with the etcd lease behind it.
async fn stored(etcd: &EtcdServer, key: &str) -> anyhow::Result<Option<Stored>> {
    let client = etcd.client().await?;
    let resp = timed("get", client.kv_client().get(key, None)).await?;
    resp.kvs()
        .first()
        .map(|kv| {
            Ok(Stored {
                value: kv.value_str()?.to_owned(),
                lease: kv.lease(),
            })
        })
        .transpose()
}

/// Every etcd lease that exists, sorted.
async fn lease_ids(etcd: &EtcdServer) -> anyhow::Result<Vec<i64>> {
    let client = etcd.client().await?;
    let resp = timed("lease list", client.lease_client().leases()).await?;
    let mut ids: Vec<i64> = resp.leases().iter().map(|l| l.id()).collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Polls `cond` until it holds; fails naming `what` after `timeout`. Returns how long it took.
async fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) -> anyhow::Result<Duration> {
    let start = Instant::now();
    loop {
        if cond() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting until {what}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Polls `key` in etcd until `cond` holds for it; returns what was read then and how long it took.
async fn wait_for_key(
    etcd: &EtcdServer,
    key: &str,
    timeout: Duration,
    cond: impl Fn(Option<&Stored>) -> bool,
) -> anyhow::Result<(Option<Stored>, Duration)> {
    let start = Instant::now();
    loop {
        let now = stored(etcd, key).await?;
        if cond(now.as_ref()) {
            return Ok((now, start.elapsed()));
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {key}; last read {now:?}");
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Reads a counter.
fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

/// One flannel node: a manager of its own, with its metrics and address.
struct Node {
    mgr: Arc<EtcdSubnetManager>,
    metrics: Arc<Metrics>,
    config: NetworkConfig,
    attrs: LeaseAttrs,
}

impl Node {
    /// Connects and reads the network config, as flanneld does at startup.
    async fn start(options: ManagerOptions, ip: Ipv4Addr) -> anyhow::Result<Self> {
        let metrics = Arc::new(Metrics::default());
        let mgr = EtcdSubnetManager::connect(options, metrics.clone()).await?;
        let config = mgr.network_config().await?;
        Ok(Self {
            mgr: Arc::new(mgr),
            metrics,
            config,
            attrs: vxlan_attrs(ip),
        })
    }

    async fn acquire(&self, previous: PreviousSubnets) -> Result<Lease, SubnetError> {
        self.mgr.acquire_lease(&self.config, &self.attrs, previous).await
    }

    /// Starts `run()` in a task.
    fn run(&self, lease: Lease) -> Running {
        let (tx, peers) = watch::channel(PeerSet::default());
        let shutdown = CancellationToken::new();
        let mgr = self.mgr.clone();
        let (config, own, token) = (self.config.clone(), lease.clone(), shutdown.clone());
        let task = tokio::spawn(async move { mgr.run(config, own, tx, token).await });
        Running {
            metrics: self.metrics.clone(),
            lease,
            peers,
            shutdown,
            task,
        }
    }
}

/// A node whose `run()` is going.
struct Running {
    metrics: Arc<Metrics>,
    lease: Lease,
    peers: watch::Receiver<PeerSet>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SubnetError>>,
}

impl Running {
    /// The etcd key of our own lease.
    fn own_key(&self) -> String {
        subnet_key(&self.lease.key().expect("etcd leases have an IPv4 subnet").to_string())
    }

    /// The names of the published peers, sorted.
    fn peer_names(&self) -> Vec<String> {
        self.peers.borrow().leases.keys().cloned().collect()
    }

    /// Waits until the published peers are exactly `names`.
    async fn wait_for_peers(&self, names: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_until(&format!("the peers are {want:?}"), timeout, || {
            self.ensure_running();
            self.peer_names() == want
        })
        .await
        .with_context(|| format!("published peers: {:?}", self.peer_names()))
    }

    /// Panics if `run()` has returned: it must keep going whatever the store does.
    fn ensure_running(&self) {
        assert!(!self.task.is_finished(), "run() returned while it should keep going");
    }

    /// Cancels `run()` and checks that it returns `Ok` promptly.
    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .context("run() did not return within 5 s of shutdown")??
            .context("run() failed")
    }
}

/// Starts a plain etcd with [`NETWORK_CONFIG`].
async fn etcd_with_config() -> anyhow::Result<EtcdServer> {
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.put(&config_key(), NETWORK_CONFIG).await?;
    Ok(etcd)
}

/// A node on a plain etcd that acquired its lease (with `previous`) and runs.
async fn running_node(etcd: &EtcdServer, ip: Ipv4Addr, previous: PreviousSubnets) -> anyhow::Result<(Node, Running)> {
    let node = Node::start(manager_options(etcd.endpoint()), ip).await?;
    let lease = node.acquire(previous).await?;
    let running = node.run(lease);
    Ok((node, running))
}

/// Previous subnets with only an IPv4 one.
fn previous_v4(sn: &str) -> PreviousSubnets {
    PreviousSubnets {
        v4: Some(sn.parse().expect("a CIDR")),
        v6: None,
    }
}

/// CPU time (user + system) the calling thread has used.
fn thread_cpu_time() -> Duration {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage only writes into the struct we pass, which is large enough.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_THREAD, usage.as_mut_ptr()) };
    assert_eq!(rc, 0, "getrusage: {}", std::io::Error::last_os_error());
    // SAFETY: getrusage succeeded, so it filled the struct in (and it was zeroed before).
    let usage = unsafe { usage.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// A TCP forwarder between a manager and etcd that the test can cut: cutting drops every
/// forwarded connection and refuses new ones, so the manager loses etcd while the test keeps
/// writing to it directly.
struct CuttableProxy {
    addr: SocketAddr,
    open: watch::Sender<bool>,
    accept: JoinHandle<()>,
}

impl CuttableProxy {
    /// Forwards a fresh loopback port to `target`.
    async fn start(target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let (open, gate) = watch::channel(true);
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*gate.borrow() {
                    // Dropping the connection refuses it.
                    continue;
                }
                let mut gate = gate.clone();
                tokio::spawn(async move {
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = gate.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Ok(Self { addr, open, accept })
    }

    /// The URL a manager connects to.
    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Cuts (`false`) or restores (`true`) the connection to etcd.
    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }
}

impl Drop for CuttableProxy {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

/// The field a config error names.
fn config_error_field(e: &SubnetError) -> Option<&'static str> {
    match e {
        SubnetError::Config {
            error: ConfigError::Field { field, .. } | ConfigError::Rule { field, .. },
            ..
        } => Some(field),
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// `<prefix>/config`: missing, invalid (the error names the field), valid (checked, with
/// upstream's derived defaults filled in).
#[tokio::test]
async fn network_config_missing_invalid_and_valid() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    let mgr = EtcdSubnetManager::connect(manager_options(etcd.endpoint()), Arc::default()).await?;

    match mgr.network_config().await {
        Err(SubnetError::ConfigMissing { key }) => assert_eq!(key, config_key()),
        other => bail!("expected ConfigMissing, got {other:?}"),
    }

    for (text, field) in [
        (
            r#"{"Network":"10.5.0.0/16","SubnetLen":31,"Backend":{"Type":"vxlan"}}"#,
            "SubnetLen",
        ),
        (
            r#"{"Network":"10.5.0.0/16","SubnetMin":"10.6.0.0","Backend":{"Type":"vxlan"}}"#,
            "SubnetMin",
        ),
        (r#"{"Network":"fd00::/64","Backend":{"Type":"vxlan"}}"#, "Network"),
    ] {
        etcd.put(&config_key(), text).await?;
        let err = mgr.network_config().await.expect_err(text);
        assert_eq!(config_error_field(&err), Some(field), "{text}: {err:?}");
        let shown = err.to_string();
        assert!(
            shown.contains(field) && shown.contains(&config_key()),
            "{text}: the message should name {field} and the key: {shown}"
        );
    }
    etcd.put(&config_key(), "not json").await?;
    assert!(matches!(
        mgr.network_config().await,
        Err(SubnetError::Config {
            error: ConfigError::Json(_),
            ..
        })
    ));

    etcd.put(
        &config_key(),
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.20.0","Backend":{"Type":"VXLAN","VNI":4}}"#,
    )
    .await?;
    let cfg = mgr.network_config().await?;
    assert_eq!(cfg.network, Some("10.5.0.0/16".parse()?));
    assert_eq!(cfg.subnet_len, 24);
    assert_eq!(cfg.subnet_min, Some(Ipv4Addr::new(10, 5, 10, 0)));
    assert_eq!(cfg.subnet_max, Some(Ipv4Addr::new(10, 5, 20, 0)));
    assert_eq!(cfg.backend_type, "vxlan");
    assert_eq!(cfg.backend["VNI"], 4);

    // Upstream's derived defaults: the first subnet is skipped, the last one is used.
    etcd.put(&config_key(), NETWORK_CONFIG).await?;
    let cfg = mgr.network_config().await?;
    assert_eq!(cfg.subnet_min, Some(Ipv4Addr::new(10, 5, 1, 0)));
    assert_eq!(cfg.subnet_max, Some(Ipv4Addr::new(10, 5, 255, 0)));
    Ok(())
}

/// 50 nodes start at once on a range of exactly 60 subnets: each gets its own, inside the range,
/// without an error, and etcd holds exactly their 50 keys with upstream's values and no leftover
/// etcd leases from lost races. The remaining 10 subnets can be taken, then the range is full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_acquire_at_once() -> anyhow::Result<()> {
    const NODES: u32 = 50;
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.put(
        &config_key(),
        r#"{"Network":"10.5.0.0/16","SubnetMin":"10.5.10.0","SubnetMax":"10.5.69.0","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;

    let mut nodes = Vec::new();
    for n in 0..NODES {
        nodes.push(Arc::new(
            Node::start(manager_options(etcd.endpoint()), test_ip(n)).await?,
        ));
    }
    let started = Instant::now();
    let mut set = JoinSet::new();
    for node in &nodes {
        let node = node.clone();
        set.spawn(async move {
            let lease = node.acquire(PreviousSubnets::default()).await;
            (node.attrs.public_ip, lease)
        });
    }
    let mut leases = Vec::new();
    while let Some(joined) = set.join_next().await {
        let (ip, lease) = joined?;
        leases.push((ip, lease.with_context(|| format!("node {ip} failed to acquire"))?));
    }
    eprintln!("{NODES} concurrent acquisitions took {:?}", started.elapsed());

    let config = &nodes[0].config;
    let mut subnets: Vec<Ipv4Net> = leases.iter().map(|(_, l)| l.subnet.expect("IPv4 subnet")).collect();
    assert!(subnets.iter().all(|sn| config.v4_compatible(sn)), "{subnets:?}");
    subnets.sort();
    subnets.dedup();
    assert_eq!(subnets.len(), NODES as usize, "every node must get a subnet of its own");

    let stored_keys = etcd.get_prefix(&subnet_key("")).await?;
    assert_eq!(stored_keys.len(), NODES as usize);
    for (ip, lease) in &leases {
        let key = subnet_key(&key_name(lease.subnet.expect("IPv4 subnet")));
        let found = stored_keys.iter().find(|(k, _)| *k == key);
        assert_eq!(found.map(|(_, v)| v.clone()), Some(upstream_value(*ip)), "{key}");
        assert!(lease.expiration.is_some(), "a new lease expires");
    }
    assert_eq!(
        lease_ids(&etcd).await?.len(),
        NODES as usize,
        "one etcd lease per key: lost races must revoke what they granted"
    );

    // The remaining ten, then nothing.
    for n in NODES..NODES + 10 {
        Node::start(manager_options(etcd.endpoint()), test_ip(n))
            .await?
            .acquire(PreviousSubnets::default())
            .await?;
    }
    let last = Node::start(manager_options(etcd.endpoint()), test_ip(99)).await?;
    match last.acquire(PreviousSubnets::default()).await {
        Err(SubnetError::OutOfSubnets { len, min, max }) => {
            assert_eq!((len, min.as_str(), max.as_str()), (24, "10.5.10.0", "10.5.69.0"));
        }
        other => bail!("expected OutOfSubnets, got {other:?}"),
    }
    Ok(())
}

/// A node that restarts with the same PublicIP gets the same subnet, its key's value is brought
/// up to date, and the key stays on the same etcd lease: no second lease is granted and left
/// behind.
#[tokio::test]
async fn restart_keeps_subnet_and_etcd_lease() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let ip = test_ip(1);

    let (first, running) = running_node(&etcd, ip, PreviousSubnets::default()).await?;
    let key = running.own_key();
    let before = stored(&etcd, &key).await?.context("own key written")?;
    assert_ne!(before.lease, 0);
    assert_eq!(lease_ids(&etcd).await?, [before.lease]);
    let subnet = running.lease.subnet;
    running.stop().await?;
    drop(first);
    assert_eq!(
        stored(&etcd, &key).await?,
        Some(before.clone()),
        "shutdown leaves the lease"
    );

    // What the node published before its restart is outdated (a new VTEP MAC, say).
    let stale = upstream_value(ip).replace(&vtep_mac(ip), "c6:d2:00:00:00:01");
    let client = etcd.client().await?;
    let on_same_lease = PutOptions::new().with_lease(before.lease);
    timed("put", client.kv_client().put(key.as_str(), stale, Some(on_same_lease))).await?;

    let second = Node::start(manager_options(etcd.endpoint()), ip).await?;
    let again = second.acquire(PreviousSubnets::default()).await?;
    assert_eq!(again.subnet, subnet);
    let after = stored(&etcd, &key).await?.context("own key still there")?;
    assert_eq!(after.lease, before.lease, "the key must stay on its etcd lease");
    assert_eq!(after.value, upstream_value(ip), "the value is brought up to date");
    assert_eq!(lease_ids(&etcd).await?, [before.lease], "no extra etcd lease");
    assert!(again.expiration.is_some());
    Ok(())
}

/// The subnet from subnet.env is reused when free, but not when another node holds it (nor
/// when it lies outside the configured range).
#[tokio::test]
async fn previous_subnet_reused_only_when_free() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;

    let a = Node::start(manager_options(etcd.endpoint()), test_ip(1)).await?;
    let lease = a.acquire(previous_v4("10.5.42.0/24")).await?;
    assert_eq!(lease.subnet, Some("10.5.42.0/24".parse()?));

    // Another (upstream) node holds 10.5.43.0/24.
    put_leased(&etcd, &subnet_key("10.5.43.0-24"), &upstream_value(test_ip(2))).await?;
    let b = Node::start(manager_options(etcd.endpoint()), test_ip(3)).await?;
    let lease = b.acquire(previous_v4("10.5.43.0/24")).await?;
    let got = lease.subnet.expect("IPv4 subnet");
    assert!(
        !["10.5.42.0/24", "10.5.43.0/24"].contains(&got.to_string().as_str()),
        "took a subnet in use: {got}"
    );
    assert_eq!(
        stored(&etcd, &subnet_key("10.5.43.0-24")).await?.map(|s| s.value),
        Some(upstream_value(test_ip(2))),
        "the other node's lease is untouched"
    );

    // Outside SubnetMin..SubnetMax (10.5.0.0 is skipped by upstream's defaults).
    let c = Node::start(manager_options(etcd.endpoint()), test_ip(4)).await?;
    let lease = c.acquire(previous_v4("10.5.0.0/24")).await?;
    assert_ne!(lease.subnet, Some("10.5.0.0/24".parse()?));
    Ok(())
}

/// A reservation (a key with our PublicIP but no etcd lease) is reused and stays TTL-less after
/// the acquisition and past the point where a lease would have been renewed (upstream attaches
/// a 24 h lease to it, turning the reservation into an ordinary lease).
#[tokio::test]
async fn reservation_is_reused_and_stays_without_ttl() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let ip = test_ip(7);
    let key = subnet_key("10.5.77.0-24");
    // As an operator writes it: `etcdctl put` with no `--lease`, only the PublicIP.
    etcd.put(&key, &format!(r#"{{"PublicIP":"{ip}"}}"#)).await?;

    let mut options = manager_options(etcd.endpoint());
    options.lease_ttl = Duration::from_secs(2);
    options.renew_margin = Duration::from_secs(1);
    let node = Node::start(options, ip).await?;
    let lease = node.acquire(PreviousSubnets::default()).await?;
    assert_eq!(lease.subnet, Some("10.5.77.0/24".parse()?));
    assert_eq!(lease.expiration, None, "a reservation does not expire");
    let after_acquire = stored(&etcd, &key).await?.context("reservation kept")?;
    assert_eq!(
        after_acquire,
        Stored {
            value: upstream_value(ip),
            lease: 0
        }
    );
    assert!(lease_ids(&etcd).await?.is_empty(), "no etcd lease granted");

    // Twice the TTL: a renewal, had there been one to do, would have happened by now.
    let running = node.run(lease);
    tokio::time::sleep(Duration::from_secs(4)).await;
    running.ensure_running();
    assert_eq!(stored(&etcd, &key).await?, Some(after_acquire));
    assert!(lease_ids(&etcd).await?.is_empty());
    assert_eq!(count(&running.metrics.lease_reasserts), 0);
    running.stop().await?;

    // A restart reuses it again, still without a TTL.
    let again = Node::start(manager_options(etcd.endpoint()), ip).await?;
    assert_eq!(
        again.acquire(PreviousSubnets::default()).await?.subnet,
        Some("10.5.77.0/24".parse()?)
    );
    assert_eq!(stored(&etcd, &key).await?.map(|s| s.lease), Some(0));
    Ok(())
}

/// A lease written by an upstream node, in upstream's exact format and with an etcd lease,
/// shows up in the PeerSet with everything it says; deleting it removes it again. A dual-stack
/// key is parsed too.
#[tokio::test]
async fn upstream_lease_appears_and_disappears() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let (_node, running) = running_node(&etcd, test_ip(1), previous_v4("10.5.1.0/24")).await?;
    running.wait_for_peers(&[], PROMPTLY).await?;

    let value = r#"{"PublicIP":"198.18.0.9","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
    put_leased(&etcd, &subnet_key("10.5.9.0-24"), value).await?;
    running.wait_for_peers(&["10.5.9.0-24"], PROMPTLY).await?;
    let peer = running.peers.borrow().leases["10.5.9.0-24"].clone();
    assert_eq!(peer.subnet, Some("10.5.9.0/24".parse()?));
    assert_eq!(peer.ipv6_subnet, None);
    assert_eq!(peer.attrs.public_ip, Ipv4Addr::new(198, 18, 0, 9));
    assert_eq!(peer.attrs.backend_type, "vxlan");
    assert_eq!(
        peer.attrs.backend_data,
        Some(serde_json::json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f:44"}))
    );
    assert_eq!(peer.attrs.to_json(), value, "round-trips byte for byte");
    assert!(running.peers.borrow().complete);

    let dual = "10.5.12.0-24&fd00:5:0:c::-64";
    put_leased(
        &etcd,
        &subnet_key(dual),
        r#"{"PublicIP":"198.18.0.12","PublicIPv6":"fd00:18::12","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:12"},"BackendV6Data":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:13"}}"#,
    )
    .await?;
    running.wait_for_peers(&["10.5.9.0-24", dual], PROMPTLY).await?;
    let peer = running.peers.borrow().leases[dual].clone();
    assert_eq!(peer.subnet, Some("10.5.12.0/24".parse()?));
    assert_eq!(peer.ipv6_subnet, Some("fd00:5:0:c::/64".parse()?));
    assert_eq!(peer.attrs.public_ipv6, Some("fd00:18::12".parse()?));

    assert_eq!(etcd.delete(&subnet_key("10.5.9.0-24")).await?, 1);
    running.wait_for_peers(&[dual], PROMPTLY).await?;
    assert!(Rejection::ALL.iter().all(|r| running.metrics.rejected(*r) == 0));
    running.stop().await
}

/// In a dual-stack network our own key has upstream's dual form, `a.b.c.d-24&v6-64`, and a
/// dual-stack peer is published with both subnets.
#[tokio::test]
async fn dual_stack_keys() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.put(
        &config_key(),
        r#"{"Network":"10.6.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:6::/48","Backend":{"Type":"vxlan"}}"#,
    )
    .await?;
    let mut node = Node::start(manager_options(etcd.endpoint()), test_ip(1)).await?;
    node.attrs.public_ipv6 = Some("fd00:18::1".parse()?);
    let lease = node
        .acquire(PreviousSubnets {
            v4: Some("10.6.3.0/24".parse()?),
            v6: Some("fd00:6:0:3::/64".parse()?),
        })
        .await?;
    let own = "10.6.3.0-24&fd00:6:0:3::-64";
    assert_eq!(lease.key().map(|k| k.to_string()).as_deref(), Some(own));
    let value = stored(&etcd, &subnet_key(own))
        .await?
        .context("dual key written")?
        .value;
    let ip = node.attrs.public_ip;
    assert!(
        value.starts_with(&format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":"fd00:18::1","BackendType":"vxlan""#
        )),
        "{value}"
    );

    let running = node.run(lease);
    let peer = "10.6.4.0-24&fd00:6:0:4::-64";
    put_leased(
        &etcd,
        &subnet_key(peer),
        r#"{"PublicIP":"198.18.0.4","PublicIPv6":"fd00:18::4","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:04"}}"#,
    )
    .await?;
    running.wait_for_peers(&[peer], PROMPTLY).await?;
    let got = running.peers.borrow().leases[peer].clone();
    assert_eq!(got.subnet, Some("10.6.4.0/24".parse()?));
    assert_eq!(got.ipv6_subnet, Some("fd00:6:0:4::/64".parse()?));
    running.stop().await
}

/// With a 4 s TTL renewed 2 s before it runs out, the key outlives the TTL several times over,
/// on the same etcd lease (KeepAlive, not a new grant per renewal).
#[tokio::test]
async fn renewal_keeps_the_key_alive() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let mut options = manager_options(etcd.endpoint());
    options.lease_ttl = Duration::from_secs(4);
    options.renew_margin = Duration::from_secs(2);
    let node = Node::start(options, test_ip(1)).await?;
    let lease = node.acquire(PreviousSubnets::default()).await?;
    let running = node.run(lease);
    let key = running.own_key();
    let first = stored(&etcd, &key).await?.context("own key written")?;

    let end = Instant::now() + Duration::from_secs(10);
    while Instant::now() < end {
        running.ensure_running();
        let now = stored(&etcd, &key).await?;
        assert_eq!(now.as_ref(), Some(&first), "the key must survive on its lease");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let renewals = count(&running.metrics.lease_renewals);
    assert!(renewals >= 3, "expected a renewal every ~2 s, got {renewals} in 10 s");
    assert_eq!(count(&running.metrics.lease_reasserts), 0);
    assert_eq!(lease_ids(&etcd).await?, [first.lease]);
    running.stop().await
}

/// Our key deleted by hand is written again at once, on the same etcd lease; our etcd lease
/// revoked by hand (which deletes the key) is replaced by a new one.
#[tokio::test]
async fn deleted_own_key_is_reasserted() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let (_node, running) = running_node(&etcd, test_ip(1), PreviousSubnets::default()).await?;
    let key = running.own_key();
    let original = stored(&etcd, &key).await?.context("own key written")?;
    running.wait_for_peers(&[], PROMPTLY).await?;

    assert_eq!(etcd.delete(&key).await?, 1);
    let (back, took) = wait_for_key(&etcd, &key, PROMPTLY, |s| s.is_some()).await?;
    eprintln!("deleted own key was back after {took:?}");
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert_eq!(back, Some(original.clone()), "same value, same etcd lease");
    assert_eq!(count(&running.metrics.lease_reasserts), 1);
    assert_eq!(lease_ids(&etcd).await?, [original.lease], "no second lease");

    let client = etcd.client().await?;
    timed("lease revoke", client.lease_client().revoke(original.lease)).await?;
    let (back, took) = wait_for_key(&etcd, &key, PROMPTLY, |s| s.is_some()).await?;
    eprintln!("key of a revoked lease was back after {took:?}");
    let back = back.context("key back")?;
    assert_eq!(back.value, original.value);
    assert_ne!(back.lease, original.lease);
    assert_eq!(lease_ids(&etcd).await?, [back.lease]);
    wait_until("the second reassert is counted", PROMPTLY, || {
        count(&running.metrics.lease_reasserts) == 2
    })
    .await?;
    running.ensure_running();
    assert!(running.peer_names().is_empty(), "our own key is never a peer");
    running.stop().await
}

/// Our key is deleted while etcd refuses our writes (the flannel role made read-only for a
/// while): restoring it fails, is retried with backoff rather than left to the periodic
/// re-list, and succeeds once writes are allowed again.
#[tokio::test]
async fn own_key_restored_after_writes_were_refused() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default().with_auth(DEFAULT_PREFIX)).await?;
    etcd.put(&config_key(), NETWORK_CONFIG).await?;
    let options = ManagerOptions {
        username: Some(FLANNEL_USER.to_owned()),
        password: Some(FLANNEL_PASSWORD.to_owned()),
        ..manager_options(etcd.endpoint())
    };
    let node = Node::start(options, test_ip(1)).await?;
    let running = node.run(node.acquire(PreviousSubnets::default()).await?);
    running.wait_for_peers(&[], PROMPTLY).await?;
    let key = running.own_key();
    let original = stored(&etcd, &key).await?.context("own key written")?;

    // Granting a permission on the same range replaces the one there.
    let mut admin = etcd.client().await?;
    let read_only = Permission::read(DEFAULT_PREFIX).with_prefix();
    timed("role grant", admin.role_grant_permission(FLANNEL_ROLE, read_only)).await?;
    let errors = count(&running.metrics.store_errors);
    assert_eq!(etcd.delete(&key).await?, 1);
    wait_until("restoring the key was refused and retried", PROMPTLY, || {
        count(&running.metrics.store_errors) >= errors + 2
    })
    .await?;
    assert_eq!(stored(&etcd, &key).await?, None);
    assert_eq!(count(&running.metrics.lease_reasserts), 0);

    let read_write = Permission::read_write(DEFAULT_PREFIX).with_prefix();
    timed("role grant", admin.role_grant_permission(FLANNEL_ROLE, read_write)).await?;
    let (back, took) = wait_for_key(&etcd, &key, PROMPTLY, |s| s.is_some()).await?;
    eprintln!("own key restored {took:?} after writes were allowed again");
    assert_eq!(back, Some(original), "same value, same etcd lease");
    assert_eq!(count(&running.metrics.lease_reasserts), 1);
    running.ensure_running();
    running.stop().await
}

/// etcd goes away for 30 s and comes back: run() keeps going, the last PeerSet stays published
/// throughout, retries back off (little CPU, few attempts), and afterwards the watch resumes
/// and our lease is still there.
///
/// The runtime is single-threaded, so everything the manager does runs on this thread and the
/// thread's CPU time measures it alone, whatever other tests run in parallel in this process.
#[tokio::test(flavor = "current_thread")]
async fn survives_etcd_outage_with_backoff() -> anyhow::Result<()> {
    const OUTAGE: Duration = Duration::from_secs(30);
    let mut etcd = etcd_with_config().await?;
    let (_node, mut running) = running_node(&etcd, test_ip(1), PreviousSubnets::default()).await?;
    let key = running.own_key();
    let own = stored(&etcd, &key).await?.context("own key written")?;
    put_leased(&etcd, &subnet_key("10.5.200.0-24"), &upstream_value(test_ip(200))).await?;
    running.wait_for_peers(&["10.5.200.0-24"], PROMPTLY).await?;
    // Marked as seen, so that any publication during the outage shows in `has_changed`.
    let published = running.peers.borrow_and_update().clone();

    etcd.stop().await?;
    let errors_before = count(&running.metrics.store_errors);
    let cpu_before = thread_cpu_time();
    let end = Instant::now() + OUTAGE;
    while Instant::now() < end {
        running.ensure_running();
        assert_eq!(
            *running.peers.borrow(),
            published,
            "the last PeerSet must stay published"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let cpu = thread_cpu_time() - cpu_before;
    let attempts = count(&running.metrics.store_errors) - errors_before;
    eprintln!("during a {OUTAGE:?} outage: {cpu:?} CPU, {attempts} failed store calls");
    assert!(
        cpu < Duration::from_secs(1),
        "{cpu:?} of CPU in {OUTAGE:?}: retries must back off"
    );
    assert!(
        (1..=30).contains(&attempts),
        "{attempts} failed attempts in {OUTAGE:?}: expected backoff capped at a few seconds"
    );
    assert!(!running.peers.has_changed()?, "nothing published during the outage");

    etcd.restart().await?;
    assert_eq!(stored(&etcd, &key).await?, Some(own), "own lease survives the outage");
    put_leased(&etcd, &subnet_key("10.5.201.0-24"), &upstream_value(test_ip(201))).await?;
    let took = running
        .wait_for_peers(&["10.5.200.0-24", "10.5.201.0-24"], Duration::from_secs(20))
        .await?;
    eprintln!("a peer added after the restart was published after {took:?}");
    running.stop().await
}

/// The watch falls behind a compaction (the manager is cut off from etcd while keys change and
/// history is compacted). On reconnecting it re-lists, and the PeerSet converges to what etcd
/// holds.
#[tokio::test]
async fn compaction_past_the_watch_revision_relists() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let port = etcd
        .endpoint()
        .rsplit(':')
        .next()
        .context("endpoint port")?
        .parse::<u16>()?;
    let proxy = CuttableProxy::start(SocketAddr::from((Ipv4Addr::LOCALHOST, port))).await?;
    let node = Node::start(manager_options(proxy.endpoint()), test_ip(1)).await?;
    let running = node.run(node.acquire(previous_v4("10.5.1.0/24")).await?);

    for (name, n) in [("10.5.2.0-24", 2), ("10.5.3.0-24", 3)] {
        put_leased(&etcd, &subnet_key(name), &upstream_value(test_ip(n))).await?;
    }
    running
        .wait_for_peers(&["10.5.2.0-24", "10.5.3.0-24"], PROMPTLY)
        .await?;
    let resyncs = count(&running.metrics.store_resyncs);
    let errors = count(&running.metrics.store_errors);

    proxy.set_open(false);
    wait_until("the manager notices it lost etcd", PROMPTLY, || {
        count(&running.metrics.store_errors) > errors
    })
    .await?;
    etcd.delete(&subnet_key("10.5.2.0-24")).await?;
    put_leased(&etcd, &subnet_key("10.5.4.0-24"), &upstream_value(test_ip(4))).await?;
    for i in 10..30 {
        let name = subnet_key(&format!("10.5.{i}.0-24"));
        put_leased(&etcd, &name, &upstream_value(test_ip(i))).await?;
        etcd.delete(&name).await?;
    }
    etcd.compact(etcd.revision().await?).await?;
    assert_eq!(
        count(&running.metrics.store_resyncs),
        resyncs,
        "nothing re-listed while cut off"
    );
    proxy.set_open(true);

    running
        .wait_for_peers(&["10.5.3.0-24", "10.5.4.0-24"], PROMPTLY)
        .await?;
    assert!(
        count(&running.metrics.store_resyncs) > resyncs,
        "the compacted watch must be answered by a re-list"
    );
    assert!(stored(&etcd, &running.own_key()).await?.is_some());

    // The watch works again after the re-list.
    put_leased(&etcd, &subnet_key("10.5.5.0-24"), &upstream_value(test_ip(5))).await?;
    running
        .wait_for_peers(&["10.5.3.0-24", "10.5.4.0-24", "10.5.5.0-24"], PROMPTLY)
        .await?;
    running.stop().await
}

/// TLS with a client certificate plus user/password auth: the config is read, a lease
/// acquired and peers watched. A wrong password fails with a Store error that says why, and
/// the password shows up in no error and not in the options' Debug.
#[tokio::test]
async fn tls_and_auth() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default().with_tls().with_auth(DEFAULT_PREFIX)).await?;
    etcd.put(&config_key(), NETWORK_CONFIG).await?;
    let tls = etcd.tls().context("started with TLS")?;
    let secure = |password: &str| ManagerOptions {
        keyfile: Some(tls.client_key.clone()),
        certfile: Some(tls.client_cert.clone()),
        cafile: Some(tls.ca.clone()),
        username: Some(FLANNEL_USER.to_owned()),
        password: Some(password.to_owned()),
        ..manager_options(etcd.endpoint())
    };
    assert!(etcd.endpoint().starts_with("https://"));

    let node = Node::start(secure(FLANNEL_PASSWORD), test_ip(1)).await?;
    let lease = node.acquire(PreviousSubnets::default()).await?;
    let running = node.run(lease);
    assert_eq!(
        stored(&etcd, &running.own_key()).await?.map(|s| s.value),
        Some(upstream_value(test_ip(1)))
    );
    put_leased(&etcd, &subnet_key("10.5.250.0-24"), &upstream_value(test_ip(250))).await?;
    running.wait_for_peers(&["10.5.250.0-24"], PROMPTLY).await?;
    running.stop().await?;

    let wrong = "wrong-Pa55word-xyzzy";
    let options = secure(wrong);
    let debug = format!("{options:?}");
    assert!(!debug.contains(wrong), "password in EtcdOptions' Debug: {debug}");
    assert!(debug.contains("redacted"), "{debug}");
    let err = match EtcdSubnetManager::connect(options, Arc::default()).await {
        Err(e) => e,
        // A lazy client would only fail on its first request.
        Ok(mgr) => mgr.network_config().await.expect_err("a wrong password must fail"),
    };
    let (shown, debug) = (err.to_string(), format!("{err:?}"));
    eprintln!("wrong password: {shown}");
    assert!(matches!(err, SubnetError::Store { .. }), "{debug}");
    assert!(shown.contains("authentication failed"), "should say why: {shown}");
    assert!(
        !shown.contains(wrong) && !debug.contains(wrong),
        "password leaked: {debug}"
    );
    assert!(!FLANNEL_PASSWORD.contains(wrong));

    // Without a client certificate etcd refuses the TLS connection.
    let no_cert = ManagerOptions {
        keyfile: None,
        certfile: None,
        ..secure(FLANNEL_PASSWORD)
    };
    let refused = tokio::time::timeout(Duration::from_secs(30), async {
        match EtcdSubnetManager::connect(no_cert, Arc::default()).await {
            Err(e) => e,
            Ok(mgr) => mgr.network_config().await.expect_err("no client certificate"),
        }
    })
    .await
    .context("a refused connection must fail, not hang")?;
    assert!(matches!(refused, SubnetError::Store { .. }), "{refused:?}");
    Ok(())
}

/// Hostile store contents: bad keys, bad JSON, a 1 MB value, shell metacharacters, subnets
/// outside the network or overlapping a peer or us, unusable PublicIPs. run() keeps going,
/// none of them is published, each is counted once under its reason, and a good peer written
/// afterwards still shows up.
#[tokio::test]
async fn hostile_store_data_is_contained() -> anyhow::Result<()> {
    let etcd = etcd_with_config().await?;
    let own_ip = test_ip(1);
    let (_node, running) = running_node(&etcd, own_ip, previous_v4("10.5.1.0/24")).await?;
    let good_old = "10.5.2.0-24";
    put_leased(&etcd, &subnet_key(good_old), &upstream_value(test_ip(2))).await?;
    running.wait_for_peers(&[good_old], PROMPTLY).await?;

    let valid = |ip: &str| {
        format!(
            r#"{{"PublicIP":"{ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}}}"#
        )
    };
    let huge = format!(r#"{{"PublicIP":"198.18.0.5","BackendData":"{}"}}"#, "x".repeat(1 << 20));
    let hostile: Vec<(&str, String, Rejection)> = vec![
        ("10.5.3.0-24", "{not json".into(), Rejection::BadValue),
        ("10.5.4.0-24", huge, Rejection::BadValue),
        (
            "10.5.5.0-24",
            r#"{"PublicIP":"$(reboot)","BackendType":"vxlan"}"#.into(),
            Rejection::BadValue,
        ),
        ("$(touch /tmp/flannel-pwned)", valid("198.18.0.6"), Rejection::BadKey),
        ("10.5.6.0-24;rm -rf /", valid("198.18.0.6"), Rejection::BadKey),
        ("10.9.0.0-24", valid("198.18.0.90"), Rejection::OutsideNetwork),
        ("10.5.2.0-25", valid("198.18.0.91"), Rejection::OverlapsPeer),
        ("10.5.1.128-25", valid("198.18.0.92"), Rejection::OverlapsOwn),
        ("10.5.7.0-24", valid("127.0.0.1"), Rejection::BadPublicIp),
        ("10.5.8.0-24", valid("0.0.0.0"), Rejection::BadPublicIp),
        ("10.5.9.0-24", valid(&own_ip.to_string()), Rejection::BadPublicIp),
    ];
    for (name, value, _) in &hostile {
        etcd.put(&subnet_key(name), value).await?;
    }

    let good_new = "10.5.10.0-24";
    put_leased(&etcd, &subnet_key(good_new), &upstream_value(test_ip(10))).await?;
    running.wait_for_peers(&[good_old, good_new], PROMPTLY).await?;

    let check_counts = || {
        for why in Rejection::ALL {
            let want = hostile.iter().filter(|(_, _, r)| *r == why).count() as u64;
            assert_eq!(running.metrics.rejected(why), want, "{}", why.as_str());
        }
    };
    check_counts();

    // More events, and a full re-list, re-validate everything but count nothing again.
    put_leased(&etcd, &subnet_key("10.5.11.0-24"), &upstream_value(test_ip(11))).await?;
    running
        .wait_for_peers(&[good_old, good_new, "10.5.11.0-24"], PROMPTLY)
        .await?;
    check_counts();
    running.ensure_running();
    assert!(stored(&etcd, &running.own_key()).await?.is_some());
    running.stop().await
}
