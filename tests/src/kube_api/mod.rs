//! [`KubeApi`]: an in-process emulator of the Kubernetes API server, for the kube subnet
//! manager's tests (there is no kube-apiserver to install here).
//!
//! It serves what flanneld and the `kube` client use, over plain HTTP on loopback:
//! - nodes: list (paged with `limit`/`continue`, from a `resourceVersion`), watch (JSON lines
//!   from a `resourceVersion`, optional bookmarks, 410 Gone once the history is compacted),
//!   get, create, delete, and `PATCH` of the node and of `nodes/{name}/status` with merge and
//!   strategic-merge patches;
//! - `GET` of pods (flanneld reads `spec.nodeName` of its own pod);
//! - metadata-only answers when the client asks for `PartialObjectMetadata(List)`;
//! - `/version` and API discovery.
//!
//! With [`KubeApi::start_in_netns`] it listens on an address inside a network namespace (the
//! testbed's fabric), where flanneld in the node namespaces reaches it; the test process keeps
//! using the handle's helpers, which work on the store directly.
//!
//! Every write takes the next resourceVersion; a write that changes nothing is not a write.
//! The emulator counts the bytes it sends (in total, on watches, and per request), can be made
//! unavailable (connections refused, open watches cut) or to fail every request with a status,
//! and can compact its history to force 410s.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use flannel_tests::kube_api::KubeApi;
//!
//! let (api, kubeconfig) = KubeApi::start().await?;
//! api.add_node("node-a", &["10.244.1.0/24"], &[]);
//! // hand `kubeconfig` to the code under test, then:
//! api.set_unavailable(true).await?; // the API server is away...
//! api.set_unavailable(false).await?; // ...and back, same port, same objects
//! # Ok(())
//! # }
//! ```

mod counters;
pub mod fixtures;
mod http;
mod patch;
#[cfg(test)]
mod selftest;
mod store;
mod watch;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use self::counters::RequestSummary;
use self::http::Shared;
pub use self::patch::{apply as apply_patch, PatchType};
pub use self::store::ApiError;

/// A running emulator. Dropping it stops the server.
#[derive(Debug)]
pub struct KubeApi {
    shared: Arc<Shared>,
    addr: SocketAddr,
    /// The namespace the listener is in; `None`: the test process's own.
    netns: Option<String>,
    kubeconfig: PathBuf,
    /// Cancels the current listener and its connections; `None` while unavailable.
    serving: Mutex<Option<CancellationToken>>,
    _dir: TempDir,
}

impl KubeApi {
    /// Starts an emulator on a free loopback port and writes a kubeconfig for it, which the
    /// real `kube` client (and kubectl) use unmodified. Returns the handle and that path.
    pub async fn start() -> anyhow::Result<(Self, PathBuf)> {
        Self::start_at(None, SocketAddr::from(([127, 0, 0, 1], 0))).await
    }

    /// Starts an emulator listening on `addr` inside network namespace `netns` (a testbed's
    /// fabric), so that processes in namespaces routed to it reach it; the kubeconfig names
    /// that address. The test process cannot connect there itself: [`Self::client`] works
    /// only for [`Self::start`]'s emulator, every other helper works for both.
    pub async fn start_in_netns(netns: &str, addr: SocketAddr) -> anyhow::Result<(Self, PathBuf)> {
        Self::start_at(Some(netns.to_owned()), addr).await
    }

    async fn start_at(netns: Option<String>, addr: SocketAddr) -> anyhow::Result<(Self, PathBuf)> {
        let listener = bind(netns.as_deref(), addr)
            .await
            .context("binding the emulator's port")?;
        let addr = listener.local_addr()?;
        let dir = tempfile::Builder::new().prefix("kube-api-").tempdir()?;
        let kubeconfig = dir.path().join("kubeconfig");
        std::fs::write(&kubeconfig, kubeconfig_yaml(addr)).context("writing the kubeconfig")?;
        let shared = Arc::new(Shared::default());
        *shared.bookmark_period.lock().unwrap_or_else(|p| p.into_inner()) = Some(Duration::from_secs(60));
        let cancel = CancellationToken::new();
        tokio::spawn(http::serve(listener, shared.clone(), cancel.clone()));
        let api = Self {
            shared,
            addr,
            netns,
            kubeconfig: kubeconfig.clone(),
            serving: Mutex::new(Some(cancel)),
            _dir: dir,
        };
        Ok((api, kubeconfig))
    }

    /// The server's URL (`http://127.0.0.1:<port>`, or the address in the namespace).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The kubeconfig written by [`Self::start`].
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// A `kube` client for this emulator, built from the kubeconfig as a program would.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig)?;
        let cfg = kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?;
        Ok(kube::Client::try_from(cfg)?)
    }

    /// Adds a node shaped like a real one ([`fixtures::node`]) with these pod CIDRs and
    /// annotations. Panics if the name is taken: that is a bug in the test.
    pub fn add_node(&self, name: &str, pod_cidrs: &[&str], annotations: &[(&str, &str)]) -> Value {
        self.create_node(fixtures::node(name, pod_cidrs, annotations))
            .unwrap_or_else(|e| panic!("adding node {name}: {}", e.message))
    }

    /// Creates a node from any JSON (the server fills in uid, resourceVersion, timestamps).
    pub fn create_node(&self, obj: Value) -> Result<Value, ApiError> {
        self.shared.store().create_node(obj)
    }

    /// The node as stored, if it exists.
    pub fn node(&self, name: &str) -> Option<Value> {
        self.shared.store().node(name).cloned()
    }

    /// The names of all nodes.
    pub fn node_names(&self) -> Vec<String> {
        let store = self.shared.store();
        store.nodes().map(|n| http::name_of(n).to_string()).collect()
    }

    /// Deletes a node; false if there was none.
    pub fn delete_node(&self, name: &str) -> bool {
        self.shared.store().delete_node(name).is_ok()
    }

    /// Changes a node as a controller would (one write, if anything changed).
    pub fn update_node(&self, name: &str, f: impl FnOnce(&mut Value)) -> Result<Value, ApiError> {
        self.shared.store().update_node(name, |n| {
            f(n);
            Ok(())
        })
    }

    /// Sets (`Some`) or removes (`None`) annotations of a node, in one write.
    pub fn set_annotations(&self, name: &str, annotations: &[(&str, Option<&str>)]) -> Result<Value, ApiError> {
        let patch: serde_json::Map<String, Value> = annotations
            .iter()
            .map(|(k, v)| ((*k).to_string(), v.map_or(Value::Null, |v| json!(v))))
            .collect();
        let patch = json!({"metadata": {"annotations": patch}});
        self.shared
            .store()
            .update_node(name, |n| patch::apply(n, &patch, PatchType::Merge))
    }

    /// A kubelet status update of the node: heartbeat times change, nothing flannel reads.
    pub fn heartbeat(&self, name: &str) -> Result<Value, ApiError> {
        self.update_node(name, fixtures::heartbeat)
    }

    /// Adds (or replaces) a pod bound to `node_name`.
    pub fn add_pod(&self, namespace: &str, name: &str, node_name: Option<&str>) -> Value {
        let mut pod = json!({"metadata": {"name": name}, "spec": {"containers": [{"name": "kube-flannel"}]}});
        if let Some(n) = node_name {
            pod["spec"]["nodeName"] = json!(n);
        }
        self.shared
            .store()
            .put_pod(namespace, pod)
            .unwrap_or_else(|e| panic!("adding pod {namespace}/{name}: {}", e.message))
    }

    /// The resourceVersion of the last write.
    pub fn resource_version(&self) -> u64 {
        self.shared.store().resource_version()
    }

    /// Forgets the event history: every watch or list from an older resourceVersion gets
    /// 410 Gone, as after etcd compaction or a watch-cache restart.
    pub fn compact(&self) {
        self.shared.store().compact();
    }

    /// Makes the server unavailable (the port refuses connections and every open connection,
    /// watches included, is cut) or available again on the same port with the same objects.
    pub async fn set_unavailable(&self, unavailable: bool) -> anyhow::Result<()> {
        if unavailable {
            if let Some(c) = self.serving.lock().unwrap_or_else(|p| p.into_inner()).take() {
                c.cancel();
            }
            return Ok(());
        }
        if self.serving.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            return Ok(());
        }
        // The old listener is closing; the port may take a moment to be free again.
        let mut last = None;
        for _ in 0..50 {
            match bind(self.netns.as_deref(), self.addr).await {
                Ok(listener) => {
                    let cancel = CancellationToken::new();
                    tokio::spawn(http::serve(listener, self.shared.clone(), cancel.clone()));
                    *self.serving.lock().unwrap_or_else(|p| p.into_inner()) = Some(cancel);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(anyhow::anyhow!("cannot bind {} again: {last:?}", self.addr))
    }

    /// Answers every request with this HTTP status (e.g. 503), or normally again with `None`.
    pub fn set_failing(&self, status: Option<u16>) {
        *self.shared.failing.lock().unwrap_or_else(|p| p.into_inner()) = status;
    }

    /// How often watches that allow bookmarks get one (`None`: never). Default 60 s.
    pub fn set_bookmark_period(&self, period: Option<Duration>) {
        *self.shared.bookmark_period.lock().unwrap_or_else(|p| p.into_inner()) = period;
    }

    /// Response body bytes sent so far, all requests.
    pub fn bytes_sent(&self) -> u64 {
        self.shared.counters.total()
    }

    /// Response body bytes sent so far on watch streams.
    pub fn watch_bytes_sent(&self) -> u64 {
        self.shared.counters.watch()
    }

    /// Every request so far with the bytes sent for it.
    pub fn requests(&self) -> Vec<RequestSummary> {
        self.shared.counters.requests()
    }
}

impl Drop for KubeApi {
    fn drop(&mut self) {
        if let Some(c) = self.serving.lock().unwrap_or_else(|p| p.into_inner()).take() {
            c.cancel();
        }
    }
}

/// A listener on `addr`, inside `netns` when given: a socket stays in the namespace it was
/// made in, so a thread that entered the namespace makes it and the runtime serves it.
async fn bind(netns: Option<&str>, addr: SocketAddr) -> anyhow::Result<TcpListener> {
    let Some(netns) = netns else {
        return Ok(TcpListener::bind(addr).await?);
    };
    let std_listener = crate::testbed::netns::in_netns(netns, Duration::from_secs(10), move || {
        let l = std::net::TcpListener::bind(addr).with_context(|| format!("binding {addr}"))?;
        l.set_nonblocking(true)?;
        Ok(l)
    })
    .await?;
    Ok(TcpListener::from_std(std_listener)?)
}

fn kubeconfig_yaml(addr: SocketAddr) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: emulator\n  cluster:\n    server: http://{addr}\n\
         users:\n- name: flanneld\n  user: {{}}\ncontexts:\n- name: emulator\n  context:\n    cluster: emulator\n    \
         user: flanneld\ncurrent-context: emulator\n"
    )
}
