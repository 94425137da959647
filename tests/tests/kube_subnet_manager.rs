//! Integration tests of `flannel_agent::subnet::kube::KubeSubnetManager` against the
//! Kubernetes API emulator (`flannel_tests::kube_api`), through the real `kube` client and a
//! kubeconfig, as flanneld runs it.
//!
//! Peer nodes are annotated byte for byte as upstream flanneld annotates them, so these tests
//! also pin down interoperability with upstream nodes in the same cluster. Waits poll with a
//! deadline; the only fixed waits are where time must pass to show that something does *not*
//! happen (the outage).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flannel_agent::config::NetworkConfig;
use flannel_agent::metrics::{Metrics, Rejection};
use flannel_agent::subnet::kube::{KubeOptions, KubeSubnetManager, NodeIdentity, Timing};
use flannel_agent::subnet::{Lease, LeaseAttrs, PeerSet, PreviousSubnets, SubnetError, SubnetManager};
use flannel_tests::kube_api::KubeApi;
use futures::StreamExt;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const NETCONF: &str = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
const PREFIX: &str = "flannel.alpha.coreos.com/";
/// How long a condition that should follow promptly may take on a loaded two-core machine.
const PROMPTLY: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

fn vtep_mac(ip: Ipv4Addr) -> String {
    let [a, b, c, d] = ip.octets();
    format!("c6:d2:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
}

fn test_ip(n: u8) -> Ipv4Addr {
    Ipv4Addr::new(192, 0, 2, n)
}

/// The annotations upstream flanneld writes for a vxlan node, spelled out by hand so they
/// share no code with the manager.
fn upstream_annotations(ip: Ipv4Addr) -> Vec<(String, String)> {
    vec![
        (
            key("backend-data"),
            format!(r#"{{"VNI":1,"VtepMAC":"{}"}}"#, vtep_mac(ip)),
        ),
        (key("backend-type"), "vxlan".into()),
        (key("kube-subnet-manager"), "true".into()),
        (key("public-ip"), ip.to_string()),
    ]
}

/// Adds a node annotated as upstream flanneld annotates it.
fn add_upstream_node(api: &KubeApi, name: &str, cidr: &str, ip: Ipv4Addr) {
    add_node_with(api, name, &[cidr], upstream_annotations(ip));
}

fn add_node_with(api: &KubeApi, name: &str, cidrs: &[&str], ann: Vec<(String, String)>) {
    let ann: Vec<(&str, &str)> = ann.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    api.add_node(name, cidrs, &ann);
}

fn annotations_of(api: &KubeApi, node: &str) -> BTreeMap<String, String> {
    let n = api.node(node).expect("the node exists");
    serde_json::from_value(n["metadata"]["annotations"].clone()).unwrap_or_default()
}

fn vxlan_attrs(ip: Ipv4Addr) -> LeaseAttrs {
    LeaseAttrs {
        public_ip: ip,
        public_ipv6: None,
        backend_type: "vxlan".into(),
        backend_data: Some(json!({"VNI": 1, "VtepMAC": vtep_mac(ip)})),
        backend_v6_data: None,
    }
}

fn fast_timing() -> Timing {
    Timing {
        node_poll: Duration::from_millis(100),
        node_wait: Duration::from_secs(5),
        call_timeout: Duration::from_secs(5),
        retry_min: Duration::from_millis(100),
        retry_max: Duration::from_secs(2),
    }
}

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

/// One flanneld's subnet manager on node `node`.
struct Agent {
    mgr: Arc<KubeSubnetManager>,
    metrics: Arc<Metrics>,
    config: NetworkConfig,
    attrs: LeaseAttrs,
    _dir: TempDir,
}

fn options(kubeconfig: &Path, node: NodeIdentity, net_conf: &Path) -> KubeOptions {
    KubeOptions {
        api_url: None,
        kubeconfig: Some(kubeconfig.to_path_buf()),
        annotation_prefix: "flannel.alpha.coreos.com".into(),
        net_config_path: net_conf.to_path_buf(),
        node,
        set_node_network_unavailable: true,
        timing: fast_timing(),
    }
}

impl Agent {
    async fn start(kubeconfig: &Path, node: &str, ip: Ipv4Addr) -> anyhow::Result<Self> {
        Self::start_with(kubeconfig, node, ip, NETCONF).await
    }

    async fn start_with(kubeconfig: &Path, node: &str, ip: Ipv4Addr, netconf: &str) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("net-conf.json");
        std::fs::write(&path, netconf)?;
        let metrics = Arc::new(Metrics::default());
        let opts = options(kubeconfig, NodeIdentity::Name(node.into()), &path);
        let mgr = KubeSubnetManager::new(opts, metrics.clone()).await?;
        let config = mgr.network_config().await?;
        Ok(Self {
            mgr: Arc::new(mgr),
            metrics,
            config,
            attrs: vxlan_attrs(ip),
            _dir: dir,
        })
    }

    async fn acquire(&self) -> Result<Lease, SubnetError> {
        self.mgr
            .acquire_lease(&self.config, &self.attrs, PreviousSubnets::default())
            .await
    }

    fn run(&self, lease: Lease) -> Running {
        let (tx, peers) = watch::channel(PeerSet::default());
        let shutdown = CancellationToken::new();
        let (mgr, config, token) = (self.mgr.clone(), self.config.clone(), shutdown.clone());
        let task = tokio::spawn(async move { mgr.run(config, lease, tx, token).await });
        Running { peers, shutdown, task }
    }
}

struct Running {
    peers: watch::Receiver<PeerSet>,
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), SubnetError>>,
}

impl Running {
    fn peer_names(&self) -> Vec<String> {
        self.peers.borrow().leases.keys().cloned().collect()
    }

    async fn wait_for_peers(&self, names: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        let mut want: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        want.sort();
        wait_until(&format!("the peers are {want:?}"), timeout, || {
            self.ensure_running();
            let set = self.peers.borrow();
            set.complete && set.leases.keys().cloned().collect::<Vec<_>>() == want
        })
        .await
        .with_context(|| format!("published peers: {:?}", self.peer_names()))
    }

    fn ensure_running(&self) {
        assert!(!self.task.is_finished(), "run() returned while it should keep going");
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .context("run() did not return within 5 s of shutdown")??
            .context("run() failed")
    }
}

/// CPU time (user + system) of the calling thread: with `#[tokio::test]`'s single-threaded
/// runtime, that is the manager, the client and the emulator of this test together.
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

fn count(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_start_writes_the_annotations_and_the_condition() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let lease = a.acquire().await?;
    assert_eq!(lease.subnet, Some("10.244.1.0/24".parse()?));
    assert_eq!(lease.ipv6_subnet, None);

    let ann = annotations_of(&api, "node-a");
    let flannel: BTreeMap<_, _> = ann.iter().filter(|(k, _)| k.starts_with(PREFIX)).collect();
    let want: BTreeMap<String, String> = upstream_annotations(test_ip(1)).into_iter().collect();
    assert_eq!(flannel, want.iter().collect(), "exactly upstream's keys and values");
    assert_eq!(ann["node.alpha.kubernetes.io/ttl"], "0", "other annotations are kept");
    let patches: Vec<_> = api.requests().into_iter().filter(|r| r.method == "PATCH").collect();
    assert_eq!(patches.len(), 1);
    assert_eq!(patches[0].path, "/api/v1/nodes/node-a/status");

    // Again, as after a restart: nothing differs, so nothing is written.
    let rv = api.resource_version();
    a.acquire().await?;
    assert_eq!(api.resource_version(), rv);

    let running = a.run(lease);
    let cond = || -> Option<Value> {
        let n = api.node("node-a")?;
        let conds = n["status"]["conditions"].as_array()?.clone();
        conds.into_iter().find(|c| c["type"] == "NetworkUnavailable")
    };
    wait_until("NetworkUnavailable is set", PROMPTLY, || cond().is_some()).await?;
    let c = cond().expect("present");
    assert_eq!(c["status"], "False");
    assert_eq!(c["reason"], "FlannelIsUp");
    assert_eq!(c["message"], "Flannel is running on this node");
    assert!(c["lastHeartbeatTime"].as_str().is_some_and(|t| t.ends_with('Z')));
    assert!(c["lastTransitionTime"].as_str().is_some());
    let n = api.node("node-a").expect("node");
    assert_eq!(
        n["status"]["conditions"].as_array().map(Vec::len),
        Some(5),
        "merged, not replaced"
    );
    running.wait_for_peers(&[], PROMPTLY).await?;
    running.stop().await
}

#[tokio::test]
async fn an_upstream_annotated_node_is_a_peer_and_leaves_when_deleted() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    add_upstream_node(&api, "node-b", "10.244.2.0/24", test_ip(2));
    // Not managed by flannel: never a peer.
    api.add_node("plain", &["10.244.9.0/24"], &[]);
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let running = a.run(a.acquire().await?);
    running.wait_for_peers(&["node-b"], PROMPTLY).await?;
    let b = running.peers.borrow().leases["node-b"].clone();
    assert_eq!(b.subnet, Some("10.244.2.0/24".parse()?));
    assert_eq!(b.attrs.public_ip, test_ip(2));
    assert_eq!(b.attrs.backend_type, "vxlan");
    assert_eq!(
        b.attrs.backend_data,
        Some(json!({"VNI": 1, "VtepMAC": vtep_mac(test_ip(2))}))
    );

    add_upstream_node(&api, "node-c", "10.244.3.0/24", test_ip(3));
    running.wait_for_peers(&["node-b", "node-c"], PROMPTLY).await?;
    // A changed VTEP MAC (a peer restarted) is picked up.
    let mac = r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#;
    api.set_annotations("node-c", &[(&key("backend-data"), Some(mac))])?;
    wait_until("node-c's new MAC is published", PROMPTLY, || {
        running
            .peers
            .borrow()
            .leases
            .get("node-c")
            .and_then(|l| l.attrs.backend_data.clone())
            == Some(json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"}))
    })
    .await?;
    assert!(api.delete_node("node-b"));
    running.wait_for_peers(&["node-c"], PROMPTLY).await?;
    // Unmanaging a node takes it out too.
    api.set_annotations("node-c", &[(&key("kube-subnet-manager"), None)])?;
    running.wait_for_peers(&[], PROMPTLY).await?;
    running.stop().await
}

#[tokio::test]
async fn dual_stack_nodes_publish_and_read_both_families() -> anyhow::Result<()> {
    const DUAL: &str =
        r#"{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{"Type":"vxlan"}}"#;
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24", "fd00:10:244:1::/64"], &[]);
    let mut b = upstream_annotations(test_ip(2));
    b.push((
        key("backend-v6-data"),
        r#"{"VNI":1,"VtepMAC":"c6:d2:00:00:00:02"}"#.into(),
    ));
    b.push((key("public-ipv6"), "2001:db8::2".into()));
    add_node_with(&api, "node-b", &["10.244.2.0/24", "fd00:10:244:2::/64"], b);
    // IPv4 only: upstream skips such a node in a dual-stack cluster, and so do we.
    add_upstream_node(&api, "v4-only", "10.244.3.0/24", test_ip(3));

    let mut a = Agent::start_with(&kubeconfig, "node-a", test_ip(1), DUAL).await?;
    a.attrs.public_ipv6 = Some("2001:db8::1".parse()?);
    a.attrs.backend_v6_data = Some(json!({"VNI": 1, "VtepMAC": "c6:d2:00:00:00:01"}));
    let lease = a.acquire().await?;
    assert_eq!(lease.subnet, Some("10.244.1.0/24".parse()?));
    assert_eq!(lease.ipv6_subnet, Some("fd00:10:244:1::/64".parse()?));
    let ann = annotations_of(&api, "node-a");
    assert_eq!(ann[&key("public-ipv6")], "2001:db8::1");
    assert_eq!(
        ann[&key("backend-v6-data")],
        r#"{"VNI":1,"VtepMAC":"c6:d2:00:00:00:01"}"#
    );
    assert_eq!(ann[&key("public-ip")], "192.0.2.1");

    let running = a.run(lease);
    running.wait_for_peers(&["node-b"], PROMPTLY).await?;
    let peer = running.peers.borrow().leases["node-b"].clone();
    assert_eq!(peer.ipv6_subnet, Some("fd00:10:244:2::/64".parse()?));
    assert_eq!(peer.attrs.public_ipv6, Some("2001:db8::2".parse()?));
    assert_eq!(
        peer.attrs.backend_v6_data,
        Some(json!({"VNI": 1, "VtepMAC": "c6:d2:00:00:00:02"}))
    );
    assert_eq!(a.metrics.rejected(Rejection::BadValue), 1, "the IPv4-only node");
    running.stop().await
}

#[tokio::test]
async fn a_restart_gets_back_the_stored_mac() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node(
        "node-a",
        &["10.244.1.0/24"],
        &[("flannel.alpha.coreos.com/node-public-ip", "198.51.100.7")],
    );
    let first = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let nothing = first.mgr.stored_node().await;
    assert_eq!(nothing.vtep_mac(), None);
    assert_eq!(
        nothing.public_ip,
        Some("198.51.100.7".parse()?),
        "node-public-ip is read"
    );
    first.acquire().await?;
    drop(first);

    let second = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let stored = second.mgr.stored_node().await;
    assert_eq!(stored.vtep_mac(), Some(vtep_mac(test_ip(1)).as_str()));
    assert_eq!(
        stored.backend_data,
        Some(json!({"VNI": 1, "VtepMAC": vtep_mac(test_ip(1))}))
    );
    let rv = api.resource_version();
    second.acquire().await?;
    assert_eq!(api.resource_version(), rv, "same MAC, same annotations: no write");

    // The API away at start-up: no stored data, and no error either.
    api.set_unavailable(true).await?;
    assert_eq!(second.mgr.stored_node().await, Default::default());
    Ok(())
}

#[tokio::test]
async fn public_ip_overwrite_is_published() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node(
        "node-a",
        &["10.244.1.0/24"],
        &[("flannel.alpha.coreos.com/public-ip-overwrite", "203.0.113.9")],
    );
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    a.acquire().await?;
    assert_eq!(annotations_of(&api, "node-a")[&key("public-ip")], "203.0.113.9");
    let rv = api.resource_version();
    a.acquire().await?;
    assert_eq!(api.resource_version(), rv, "already overridden: no write");
    Ok(())
}

#[tokio::test]
async fn acquire_waits_for_the_pod_cidr_and_checks_it() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &[], &[]);
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let waiting = tokio::spawn(async move { a.acquire().await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!waiting.is_finished());
    api.update_node("node-a", |n| {
        n["spec"]["podCIDR"] = json!("10.244.5.0/24");
        n["spec"]["podCIDRs"] = json!(["10.244.5.0/24"]);
    })?;
    let lease = waiting.await??;
    assert_eq!(lease.subnet, Some("10.244.5.0/24".parse()?));

    // Never assigned: a retryable error that says what to fix.
    api.add_node("node-b", &[], &[]);
    let b = Agent::start(&kubeconfig, "node-b", test_ip(2)).await?;
    let e = b.acquire().await.expect_err("no pod CIDR");
    assert!(matches!(e, SubnetError::Store { .. }), "{e}");
    assert!(e.to_string().contains("pod cidr not assigned"), "{e}");

    // Outside the network: fatal, with upstream's words.
    api.add_node("node-c", &["10.9.0.0/24"], &[]);
    let c = Agent::start(&kubeconfig, "node-c", test_ip(3)).await?;
    let e = c.acquire().await.expect_err("outside Network");
    assert_eq!(
        e.to_string(),
        r#"subnet "10.244.0.0/16" specified in the flannel net config doesn't contain "10.9.0.0/24" PodCIDR of the "node-c" node"#
    );
    assert!(
        annotations_of(&api, "node-c").keys().all(|k| !k.starts_with(PREFIX)),
        "nothing written"
    );
    Ok(())
}

#[tokio::test]
async fn the_node_name_comes_from_the_pod() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_pod("kube-flannel", "kube-flannel-ds-abc", Some("node-a"));
    api.add_pod("kube-flannel", "unscheduled", None);
    let dir = tempfile::tempdir()?;
    let conf = dir.path().join("net-conf.json");
    let pod = |name: &str| NodeIdentity::Pod {
        namespace: "kube-flannel".into(),
        name: name.into(),
    };
    let metrics = Arc::new(Metrics::default());
    let m = KubeSubnetManager::new(options(&kubeconfig, pod("kube-flannel-ds-abc"), &conf), metrics.clone()).await?;
    assert_eq!(m.node_name(), "node-a");
    let e = KubeSubnetManager::new(options(&kubeconfig, pod("unscheduled"), &conf), metrics.clone())
        .await
        .err()
        .expect("no nodeName");
    assert_eq!(
        e.to_string(),
        "node name not present in pod spec 'kube-flannel/unscheduled'"
    );
    let e = KubeSubnetManager::new(options(&kubeconfig, pod("missing"), &conf), metrics)
        .await
        .err()
        .expect("no pod");
    assert!(
        e.to_string()
            .starts_with("error retrieving pod spec for 'kube-flannel/missing': "),
        "{e}"
    );
    Ok(())
}

#[tokio::test]
async fn hostile_annotations_are_ignored_and_counted() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    add_upstream_node(&api, "good", "10.244.2.0/24", test_ip(2));
    let with = |ip: u8, k: &str, v: &str| {
        let mut a = upstream_annotations(test_ip(ip));
        a.retain(|(key, _)| !key.ends_with(k));
        a.push((key(k), v.to_string()));
        a
    };
    add_node_with(
        &api,
        "bad-json",
        &["10.244.3.0/24"],
        with(3, "backend-data", "{not json"),
    );
    add_node_with(&api, "bad-ip", &["10.244.4.0/24"], with(4, "public-ip", "$(reboot)"));
    add_upstream_node(&api, "outside", "10.9.0.0/24", test_ip(5));
    // The older node wins an overlap; creationTimestamp has whole seconds (a tie would go
    // to the name that sorts first, the same on every agent).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    add_upstream_node(&api, "dup", "10.244.2.0/24", test_ip(6));
    add_upstream_node(&api, "hijack", "10.244.1.0/25", test_ip(7));
    add_node_with(&api, "no-cidr", &[], upstream_annotations(test_ip(8)));
    add_node_with(
        &api,
        "huge",
        &["10.244.10.0/24"],
        with(9, "backend-data", &"7".repeat(100_000)),
    );
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let running = a.run(a.acquire().await?);
    running.wait_for_peers(&["good"], PROMPTLY).await?;
    let m = &a.metrics;
    assert_eq!(m.rejected(Rejection::BadValue), 3, "bad JSON, bad IP, oversized");
    assert_eq!(m.rejected(Rejection::OutsideNetwork), 1);
    assert_eq!(m.rejected(Rejection::OverlapsPeer), 1);
    assert_eq!(m.rejected(Rejection::OverlapsOwn), 1);
    assert_eq!(m.rejected(Rejection::BadKey), 1, "no pod CIDR");
    // Kubelet updates of the bad nodes are not new rejections.
    for n in ["bad-json", "bad-ip", "outside", "dup", "hijack", "no-cidr", "huge"] {
        api.heartbeat(n)?;
    }
    add_upstream_node(&api, "later", "10.244.11.0/24", test_ip(10));
    running.wait_for_peers(&["good", "later"], PROMPTLY).await?;
    assert_eq!(m.rejected(Rejection::BadValue), 3);
    assert_eq!(m.rejected(Rejection::OverlapsPeer), 1);
    // Fixed, a node becomes a peer.
    api.set_annotations("bad-ip", &[(&key("public-ip"), Some("192.0.2.4"))])?;
    running.wait_for_peers(&["bad-ip", "good", "later"], PROMPTLY).await?;
    running.stop().await
}

#[tokio::test]
async fn own_annotations_are_written_again_when_removed() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let running = a.run(a.acquire().await?);
    running.wait_for_peers(&[], PROMPTLY).await?;
    api.set_annotations(
        "node-a",
        &[
            (&key("kube-subnet-manager"), None),
            (&key("public-ip"), Some("1.1.1.1")),
        ],
    )?;
    wait_until("the annotations are back", PROMPTLY, || {
        let ann = annotations_of(&api, "node-a");
        ann.get(&key("kube-subnet-manager")).map(String::as_str) == Some("true")
            && ann.get(&key("public-ip")).map(String::as_str) == Some("192.0.2.1")
            // The agent counts the rewrite after its patch returns, which can be
            // just after the emulator shows the patched annotations.
            && count(&a.metrics.lease_reasserts) >= 1
    })
    .await?;
    assert_eq!(count(&a.metrics.lease_reasserts), 1);
    running.stop().await
}

#[tokio::test]
async fn an_api_outage_keeps_the_peers_and_catches_up_after() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    add_upstream_node(&api, "node-b", "10.244.2.0/24", test_ip(2));
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let running = a.run(a.acquire().await?);
    running.wait_for_peers(&["node-b"], PROMPTLY).await?;
    let before = running.peers.borrow().clone();

    let cpu0 = thread_cpu_time();
    api.set_unavailable(true).await?;
    add_upstream_node(&api, "node-c", "10.244.3.0/24", test_ip(3));
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        running.ensure_running();
        assert_eq!(
            *running.peers.borrow(),
            before,
            "the peer set is kept while the API is away"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let cpu = thread_cpu_time() - cpu0;
    let errors = count(&a.metrics.store_errors);
    println!("30 s API outage: {cpu:?} CPU, {errors} retried errors");
    assert!(cpu < Duration::from_secs(1), "no busy retrying: {cpu:?} of CPU in 30 s");
    assert!((2..=60).contains(&errors), "retried with backoff: {errors} errors");

    api.set_unavailable(false).await?;
    let took = running.wait_for_peers(&["node-b", "node-c"], PROMPTLY).await?;
    println!("caught up {took:?} after the API came back");
    running.stop().await
}

#[tokio::test]
async fn a_410_on_the_watch_is_answered_with_a_relist() -> anyhow::Result<()> {
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    add_upstream_node(&api, "node-b", "10.244.2.0/24", test_ip(2));
    add_upstream_node(&api, "node-c", "10.244.3.0/24", test_ip(3));
    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let running = a.run(a.acquire().await?);
    running.wait_for_peers(&["node-b", "node-c"], PROMPTLY).await?;
    let generation = running.peers.borrow().generation;
    assert_eq!(count(&a.metrics.store_resyncs), 1);

    // Connections cut, node-b deleted and node-d added meanwhile, history compacted: the
    // watch cannot resume from its resourceVersion and gets 410 Gone.
    api.set_unavailable(true).await?;
    api.delete_node("node-b");
    add_upstream_node(&api, "node-d", "10.244.4.0/24", test_ip(4));
    api.compact();
    api.set_unavailable(false).await?;
    running.wait_for_peers(&["node-c", "node-d"], PROMPTLY).await?;
    assert_eq!(count(&a.metrics.store_resyncs), 2, "one re-list");
    assert_eq!(running.peers.borrow().generation, generation + 1);
    let lists = api
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path == "/api/v1/nodes" && !r.watch && r.metadata_only)
        .count();
    assert_eq!(lists, 2);
    running.stop().await
}

#[tokio::test]
async fn bytes_per_node_event_metadata_watch_vs_full_watch() -> anyhow::Result<()> {
    const PEERS: usize = 30;
    const HEARTBEATS: usize = 60;
    let (api, kubeconfig) = KubeApi::start().await?;
    api.add_node("node-a", &["10.244.1.0/24"], &[]);
    for i in 0..PEERS {
        add_upstream_node(
            &api,
            &format!("peer-{i:02}"),
            &format!("10.244.{}.0/24", 10 + i),
            test_ip(10 + i as u8),
        );
    }
    let node_full = api.node("peer-00").map(|n| n.to_string().len()).unwrap_or(0);
    let node_meta = api
        .node("peer-00")
        .map(|n| n["metadata"].to_string().len())
        .unwrap_or(0);

    let a = Agent::start(&kubeconfig, "node-a", test_ip(1)).await?;
    let bytes0 = api.bytes_sent();
    let requests0 = api.requests().len();
    let running = a.run(a.acquire().await?);
    let names: Vec<String> = (0..PEERS).map(|i| format!("peer-{i:02}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    running.wait_for_peers(&refs, PROMPTLY).await?;
    let startup_bytes = api.bytes_sent() - bytes0;
    let startup_requests = api.requests().len() - requests0;

    // Upstream's way, for comparison: a watch of whole Node objects.
    let full: kube::Api<k8s_openapi::api::core::v1::Node> = kube::Api::all(api.client().await?);
    let full_events = Arc::new(AtomicU64::new(0));
    let counter = full_events.clone();
    let full_watch = tokio::spawn(async move {
        let mut w = kube::runtime::watcher(full, kube::runtime::watcher::Config::default()).boxed();
        while let Some(ev) = w.next().await {
            if let Ok(kube::runtime::watcher::Event::Apply(_)) = ev {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    wait_until("the full watch is running", PROMPTLY, || {
        api.requests().iter().any(|r| r.watch && !r.metadata_only)
    })
    .await?;

    let watch_bytes = |metadata_only: bool| -> u64 {
        api.requests()
            .iter()
            .filter(|r| r.watch && r.metadata_only == metadata_only)
            .map(|r| r.bytes)
            .sum()
    };
    let (meta0, full0, requests1) = (watch_bytes(true), watch_bytes(false), api.requests().len());
    for i in 0..HEARTBEATS {
        api.heartbeat(&names[i % PEERS])?;
    }
    wait_until("the full watch saw every heartbeat", PROMPTLY, || {
        count(&full_events) == HEARTBEATS as u64
    })
    .await?;
    // The metadata watch is as far along once its byte count stops moving.
    let mut last = 0;
    wait_until("the metadata watch is drained", PROMPTLY, || {
        let now = watch_bytes(true);
        let still = now == last && now > meta0;
        last = now;
        still
    })
    .await?;
    let meta_per_event = (watch_bytes(true) - meta0) / HEARTBEATS as u64;
    let full_per_event = (watch_bytes(false) - full0) / HEARTBEATS as u64;
    let extra_requests = api.requests().len() - requests1;
    println!(
        "node object: {node_full} B in full, {node_meta} B of metadata\n\
         start-up with {PEERS} peers: {startup_bytes} B in {startup_requests} requests\n\
         per kubelet status update of a node, on each agent: full-object watch (upstream) {full_per_event} B, \
         metadata-only watch (flannel-rs) {meta_per_event} B ({:.1}x less); requests caused: {extra_requests}",
        full_per_event as f64 / meta_per_event.max(1) as f64
    );
    assert!(
        meta_per_event * 3 < full_per_event,
        "{meta_per_event} B vs {full_per_event} B per event"
    );
    assert_eq!(extra_requests, 0, "a status update costs no GET");
    full_watch.abort();
    running.stop().await
}
