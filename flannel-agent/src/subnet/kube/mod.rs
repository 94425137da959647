//! The Kubernetes subnet manager (`--kube-subnet-mgr`): leases are the nodes' pod CIDRs,
//! published with node annotations, compatible with upstream flanneld in both directions.
//!
//! - The network config is read from `--net-config-path` (no `CheckNetworkConfig`, as
//!   upstream).
//! - Acquiring the lease waits for this node's `spec.podCIDR(s)`, checks them against the
//!   network, writes the flannel annotations (a strategic-merge patch of `nodes/status`, only
//!   if they differ) and returns the pod CIDRs as the lease.
//! - `run` sets `NetworkUnavailable=False` on this node, then publishes the nodes annotated
//!   `kube-subnet-manager: "true"` as peers, validated like every lease from a store.
//!
//! Where this differs from upstream, on purpose: peers come from a metadata-only watch of
//! nodes plus one GET per new node for its pod CIDRs (upstream watches whole Node objects,
//! about 100 KB/s per node in big clusters, flannel-io/flannel#2215); nothing blocks the
//! watch (flannel-io/flannel#2252); the peer set is published whole, so a missed event cannot
//! leave a stale route; this node's annotations are written again if they disappear.

mod acquire;
pub mod annotations;
pub mod node;
pub mod peers;
mod watch;

use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::annotations::AnnotationNames;
use super::{Lease, LeaseAttrs, PeerSet, PreviousSubnets, StoredNode, SubnetError, SubnetManager};
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::flags::Flags;
use crate::metrics::Metrics;

/// A failure to set the Kubernetes subnet manager up. The texts are upstream's.
#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    /// No usable client config (kubeconfig, API URL, or in-cluster service account).
    #[error("fail to create kubernetes config: {0}")]
    Config(String),
    /// `--kube-annotation-prefix` is malformed.
    #[error("{0}")]
    Prefix(&'static str),
    /// Neither `NODE_NAME` nor `POD_NAME` + `POD_NAMESPACE` is set.
    #[error("env variables POD_NAME and POD_NAMESPACE must be set")]
    NoNodeName,
    /// Reading our own pod (to find the node name) failed.
    #[error("error retrieving pod spec for '{namespace}/{name}': {detail}")]
    PodSpec {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        name: String,
        /// The API's error.
        detail: String,
    },
    /// Our pod is not scheduled to a node.
    #[error("node name not present in pod spec '{namespace}/{name}'")]
    NoNodeInPod {
        /// `POD_NAMESPACE`.
        namespace: String,
        /// `POD_NAME`.
        name: String,
    },
}

/// How this node is named: directly, or through the pod flanneld runs in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeIdentity {
    /// `NODE_NAME`.
    Name(String),
    /// `POD_NAMESPACE`/`POD_NAME`; the node is the pod's `spec.nodeName`.
    Pod {
        /// The pod's namespace.
        namespace: String,
        /// The pod's name.
        name: String,
    },
}

/// Everything the Kubernetes subnet manager is configured with.
#[derive(Debug, Clone)]
pub struct KubeOptions {
    /// `--kube-api-url`: overrides the kubeconfig's server, or is used alone.
    pub api_url: Option<String>,
    /// `--kubeconfig-file`; with neither this nor `api_url`, the in-cluster config is used.
    pub kubeconfig: Option<PathBuf>,
    /// `--kube-annotation-prefix`.
    pub annotation_prefix: String,
    /// `--net-config-path`.
    pub net_config_path: PathBuf,
    /// Which node this is.
    pub node: NodeIdentity,
    /// `--set-node-network-unavailable`: patch `NetworkUnavailable=False` once running.
    pub set_node_network_unavailable: bool,
    /// Waits and retries (upstream's values by default; tests shorten them).
    pub timing: Timing,
}

/// The waits and retry delays of the manager.
#[derive(Debug, Clone)]
pub struct Timing {
    /// How often to look for this node and its pod CIDR while acquiring (upstream: 3 s).
    pub node_poll: Duration,
    /// How long to wait for them before reporting an error (upstream: 30 s); the daemon
    /// then retries.
    pub node_wait: Duration,
    /// The deadline of one API call other than a watch.
    pub call_timeout: Duration,
    /// First retry delay after an API error; doubles up to `retry_max`.
    pub retry_min: Duration,
    /// Longest retry delay.
    pub retry_max: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Self {
            node_poll: Duration::from_secs(3),
            node_wait: Duration::from_secs(30),
            call_timeout: Duration::from_secs(15),
            retry_min: Duration::from_secs(1),
            retry_max: Duration::from_secs(30),
        }
    }
}

impl KubeOptions {
    /// The options from the flags, and the node's identity from `NODE_NAME`, else
    /// `POD_NAME` + `POD_NAMESPACE` (read here, once, as upstream reads them).
    pub fn from_flags(flags: &Flags) -> Result<Self, KubeError> {
        let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        let node = match (env("NODE_NAME"), env("POD_NAME"), env("POD_NAMESPACE")) {
            (Some(n), _, _) => NodeIdentity::Name(n),
            (None, Some(name), Some(namespace)) => NodeIdentity::Pod { namespace, name },
            _ => return Err(KubeError::NoNodeName),
        };
        let kubeconfig = flags.kubeconfig_file.clone();
        Ok(Self {
            api_url: Some(flags.kube_api_url.clone()).filter(|s| !s.is_empty()),
            kubeconfig: (!kubeconfig.as_os_str().is_empty()).then_some(kubeconfig),
            annotation_prefix: flags.kube_annotation_prefix.clone(),
            net_config_path: flags.net_config_path.clone(),
            node,
            set_node_network_unavailable: flags.set_node_network_unavailable,
            timing: Timing::default(),
        })
    }
}

/// Builds the subnet manager for `main` from the flags.
pub async fn from_flags(flags: &Flags, metrics: Arc<Metrics>) -> Result<Arc<dyn SubnetManager>, KubeError> {
    let opts = KubeOptions::from_flags(flags)?;
    Ok(Arc::new(KubeSubnetManager::new(opts, metrics).await?))
}

/// The client config as client-go's `BuildConfigFromFlags(masterURL, kubeconfig)` builds it.
async fn client_config(opts: &KubeOptions) -> Result<kube::Config, KubeError> {
    let err = |e: &dyn std::fmt::Display| KubeError::Config(e.to_string());
    match (&opts.api_url, &opts.kubeconfig) {
        (None, None) => kube::Config::incluster().map_err(|e| err(&e)),
        (api_url, Some(path)) => {
            let kc = Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            let mut cfg = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?;
            if let Some(u) = api_url {
                cfg.cluster_url = u.parse().map_err(|e| err(&e))?;
            }
            Ok(cfg)
        }
        (Some(u), None) => Ok(kube::Config::new(u.parse().map_err(|e| err(&e))?)),
    }
}

/// Maps an API failure to the subnet manager's error.
fn store_err(op: &'static str, object: impl Into<String>, detail: impl std::fmt::Display) -> SubnetError {
    SubnetError::Store {
        op,
        object: object.into(),
        detail: detail.to_string(),
    }
}

/// The Kubernetes subnet manager.
pub struct KubeSubnetManager {
    client: Client,
    nodes: Api<Node>,
    node_name: String,
    names: AnnotationNames,
    opts: KubeOptions,
    metrics: Arc<Metrics>,
    /// What this node published, so `run` can write it again if it disappears.
    published: Mutex<Option<LeaseAttrs>>,
}

impl KubeSubnetManager {
    /// Connects (lazily: the client talks to the API on first use) and finds this node's
    /// name, through our pod if need be.
    pub async fn new(opts: KubeOptions, metrics: Arc<Metrics>) -> Result<Self, KubeError> {
        let names = AnnotationNames::new(&opts.annotation_prefix)?;
        let mut cfg = client_config(&opts).await?;
        // The client's own retry of 429/503/504 backs off up to 1000 s inside one call,
        // silently; our loops retry with their own logged, capped backoff instead.
        cfg.default_retry = false;
        let client = Client::try_from(cfg).map_err(|e| KubeError::Config(e.to_string()))?;
        let node_name = match &opts.node {
            NodeIdentity::Name(n) => n.clone(),
            NodeIdentity::Pod { namespace, name } => node_of_pod(&client, namespace, name, &opts.timing).await?,
        };
        info!(node = %node_name, prefix = %names.prefix, "using the Kubernetes API for subnet leases");
        Ok(Self {
            nodes: Api::all(client.clone()),
            client,
            node_name,
            names,
            opts,
            metrics,
            published: Mutex::new(None),
        })
    }

    /// This node's name.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// The annotation keys in use.
    pub fn annotation_names(&self) -> &AnnotationNames {
        &self.names
    }

    /// Runs one API call with the call deadline, mapping its error.
    async fn call<T>(
        &self,
        op: &'static str,
        object: &str,
        fut: impl Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, SubnetError> {
        let limit = self.opts.timing.call_timeout;
        match tokio::time::timeout(limit, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(store_err(op, object, e)),
            Err(_) => Err(store_err(op, object, format!("no answer within {limit:?}"))),
        }
    }
}

/// Reads `spec.nodeName` of our pod. Errors the API may get over (unreachable, 5xx) are
/// retried for `node_wait`; a missing pod or a refusal is final.
async fn node_of_pod(client: &Client, namespace: &str, name: &str, timing: &Timing) -> Result<String, KubeError> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let deadline = tokio::time::Instant::now() + timing.node_wait;
    let mut backoff = Backoff::new(timing.retry_min, timing.retry_max);
    let pod_err = |detail: String| KubeError::PodSpec {
        namespace: namespace.into(),
        name: name.into(),
        detail,
    };
    let pod = loop {
        match tokio::time::timeout(timing.call_timeout, pods.get(name)).await {
            Ok(Ok(p)) => break p,
            Ok(Err(kube::Error::Api(s))) if s.code < 500 => return Err(pod_err(s.to_string())),
            r => {
                let detail = match r {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no answer within {:?}", timing.call_timeout),
                };
                let d = backoff.next_delay();
                if tokio::time::Instant::now() + d > deadline {
                    return Err(pod_err(detail));
                }
                warn!(pod = %format!("{namespace}/{name}"), error = %detail, retry_in = ?d, "cannot read our pod; retrying");
                tokio::time::sleep(d).await;
            }
        }
    };
    pod.spec
        .and_then(|s| s.node_name)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| KubeError::NoNodeInPod {
            namespace: namespace.into(),
            name: name.into(),
        })
}

#[async_trait]
impl SubnetManager for KubeSubnetManager {
    fn name(&self) -> &'static str {
        "kube"
    }

    async fn network_config(&self) -> Result<NetworkConfig, SubnetError> {
        let path = &self.opts.net_config_path;
        let location = path.display().to_string();
        let text = tokio::fs::read_to_string(path)
            .await
            .map_err(|e| store_err("read", location.clone(), e))?;
        NetworkConfig::parse(&text).map_err(|error| SubnetError::Config { location, error })
    }

    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        _previous: PreviousSubnets,
    ) -> Result<Lease, SubnetError> {
        // The node's pod CIDRs are its lease; there is nothing to choose.
        self.acquire(config, attrs).await
    }

    async fn stored_node(&self) -> StoredNode {
        let object = format!("nodes/{}", self.node_name);
        let node = match self.call("get", &object, self.nodes.get_opt(&self.node_name)).await {
            Ok(Some(n)) => n,
            Ok(None) => return StoredNode::default(),
            Err(e) => {
                warn!(error = %e, "Failed to get node for backend data; using defaults");
                return StoredNode::default();
            }
        };
        let ann = node.metadata.annotations.unwrap_or_default();
        let (stored, problems) = annotations::stored(&self.names, &ann);
        for p in problems {
            warn!(node = %self.node_name, problem = %p, "ignoring a stored annotation");
        }
        stored
    }

    async fn run(
        &self,
        config: NetworkConfig,
        own: Lease,
        peers: tokio::sync::watch::Sender<PeerSet>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        self.watch_peers(config, own, peers, shutdown).await
    }
}
