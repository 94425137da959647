//! Acquiring this node's lease (upstream's kube `AcquireLease`) and the two writes flannel
//! makes to its node: the annotations and the `NetworkUnavailable` condition. Both are
//! strategic-merge patches of `nodes/<name>/status`, the only write upstream's RBAC allows.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::Node;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::{debug, info, warn};

use super::annotations::{self, AnnotationNames};
use super::node::{Families, PodCidrs};
use super::KubeSubnetManager;
use crate::backoff::Backoff;
use crate::config::NetworkConfig;
use crate::subnet::{Lease, LeaseAttrs, SubnetError};

/// Upstream's lease lifetime in kube mode; nothing renews or checks it.
const LEASE_TTL: Duration = Duration::from_secs(24 * 3600);
/// The field manager of our patches, as it shows in the node's `managedFields`.
const FIELD_MANAGER: &str = "flanneld";

/// The node's pod CIDRs and annotations, once it has pod CIDRs.
struct NodeState {
    cidrs: PodCidrs,
    annotations: BTreeMap<String, String>,
}

impl KubeSubnetManager {
    /// Waits for the node and its pod CIDRs, checks them, writes the annotations.
    pub(super) async fn acquire(&self, config: &NetworkConfig, attrs: &LeaseAttrs) -> Result<Lease, SubnetError> {
        let name = self.node_name.as_str();
        let node = self.wait_for_pod_cidrs().await?;
        let Families { v4, v6 } = Families::of(config);
        let mut lease = Lease {
            subnet: None,
            ipv6_subnet: None,
            attrs: attrs.clone(),
            expiration: Some(SystemTime::now() + LEASE_TTL),
        };
        if v4 {
            let sn = node.cidrs.v4.ok_or_else(|| {
                SubnetError::Unsupported(format!(
                    "node {name:?} has no IPv4 pod CIDR but the flannel net config enables IPv4; \
                     allocate one (kube-controller-manager --cluster-cidr) or set \"EnableIPv4\": false"
                ))
            })?;
            if let Some(net) = config.network.filter(|n| !n.contains(&sn)) {
                return Err(SubnetError::Unsupported(format!(
                    "subnet \"{net}\" specified in the flannel net config doesn't contain \"{sn}\" PodCIDR of the \"{name}\" node"
                )));
            }
            lease.subnet = Some(sn);
        }
        if v6 {
            let sn = node.cidrs.v6.ok_or_else(|| {
                SubnetError::Unsupported(format!(
                    "node {name:?} has no IPv6 pod CIDR but the flannel net config enables IPv6; \
                     give the cluster an IPv6 --cluster-cidr or set \"EnableIPv6\": false"
                ))
            })?;
            if let Some(net) = config.ipv6_network.filter(|n| !n.contains(&sn)) {
                return Err(SubnetError::Unsupported(format!(
                    "subnet \"{net}\" specified in the flannel net config doesn't contain \"{sn}\" IPv6 PodCIDR of the \"{name}\" node"
                )));
            }
            lease.ipv6_subnet = Some(sn);
        }
        let want = annotations::wanted(&self.names, attrs, &node.annotations);
        log_overrides(&self.names, &node.annotations, &want);
        if want.is_empty() {
            debug!(node = name, "annotations are up to date");
        } else {
            self.write_annotations(&want).await?;
        }
        *self.published.lock().unwrap_or_else(|p| p.into_inner()) = Some(attrs.clone());
        Ok(lease)
    }

    /// Polls the node every `node_poll` until it has pod CIDRs, for `node_wait` at most.
    async fn wait_for_pod_cidrs(&self) -> Result<NodeState, SubnetError> {
        let name = self.node_name.as_str();
        let object = format!("nodes/{name}");
        let t = &self.opts.timing;
        let deadline = tokio::time::Instant::now() + t.node_wait;
        loop {
            let why = match self.call("get", &object, self.nodes.get_opt(name)).await {
                Ok(Some(node)) => match cidrs_of(&node) {
                    Ok(cidrs) if !cidrs.is_empty() => {
                        let annotations = node.metadata.annotations.unwrap_or_default();
                        return Ok(NodeState { cidrs, annotations });
                    }
                    Ok(_) => store_wait(
                        name,
                        format!(
                            "node {name:?} pod cidr not assigned; the node controller assigns it when \
                             kube-controller-manager runs with --allocate-node-cidrs=true and --cluster-cidr"
                        ),
                    ),
                    Err(e) => return Err(SubnetError::Unsupported(format!("node {name:?} {e}"))),
                },
                Ok(None) => store_wait(
                    name,
                    format!("node {name:?} not found; check NODE_NAME (or the pod's spec.nodeName)"),
                ),
                Err(e) => e,
            };
            if tokio::time::Instant::now() + t.node_poll > deadline {
                return Err(why);
            }
            debug!(node = name, reason = %why, "waiting for the node");
            tokio::time::sleep(t.node_poll).await;
        }
    }

    /// Sets annotations on this node (a `null` value removes one); retried every
    /// `node_poll` for `node_wait`, as upstream.
    pub(super) async fn write_annotations(&self, values: &BTreeMap<String, String>) -> Result<(), SubnetError> {
        let name = self.node_name.as_str();
        info!(node = name, keys = ?values.keys().collect::<Vec<_>>(), "writing the node's flannel annotations");
        let patch = Patch::Strategic(json!({"metadata": {"annotations": values}}));
        self.patch_status_retrying(&patch).await
    }

    /// Sets `NetworkUnavailable=False` with upstream's reason and message.
    pub(super) async fn set_network_available(&self) -> Result<(), SubnetError> {
        let now = format!("{:.0}", Timestamp::now());
        let patch = Patch::Strategic(json!({"status": {"conditions": [{
            "type": "NetworkUnavailable",
            "status": "False",
            "lastHeartbeatTime": now,
            "lastTransitionTime": now,
            "reason": "FlannelIsUp",
            "message": "Flannel is running on this node",
        }]}}));
        let object = format!("nodes/{}/status", self.node_name);
        self.call(
            "patch",
            &object,
            self.nodes.patch_status(&self.node_name, &params(), &patch),
        )
        .await
        .map(|_| ())
    }

    async fn patch_status_retrying(&self, patch: &Patch<serde_json::Value>) -> Result<(), SubnetError> {
        let object = format!("nodes/{}/status", self.node_name);
        let pp = params();
        let t = &self.opts.timing;
        let deadline = tokio::time::Instant::now() + t.node_wait;
        let mut backoff = Backoff::new(t.retry_min.min(t.node_poll), t.node_poll);
        loop {
            match self
                .call("patch", &object, self.nodes.patch_status(&self.node_name, &pp, patch))
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) => {
                    let d = backoff.next_delay();
                    if tokio::time::Instant::now() + d > deadline {
                        return Err(e);
                    }
                    warn!(error = %e, retry_in = ?d, "patching the node failed; retrying");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

fn params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..PatchParams::default()
    }
}

fn store_wait(node: &str, detail: String) -> SubnetError {
    SubnetError::Store {
        op: "wait for",
        object: format!("nodes/{node}"),
        detail,
    }
}

/// The pod CIDRs of a full node object.
pub(super) fn cidrs_of(node: &Node) -> Result<PodCidrs, String> {
    let spec = node.spec.as_ref();
    let list = spec.and_then(|s| s.pod_cidrs.as_deref()).unwrap_or_default();
    PodCidrs::parse(spec.and_then(|s| s.pod_cidr.as_deref()), list)
}

/// Upstream logs when an operator's `public-ip(v6)-overwrite` replaces the address.
fn log_overrides(names: &AnnotationNames, current: &BTreeMap<String, String>, want: &BTreeMap<String, String>) {
    for (ip_key, over_key) in [
        (&names.public_ip, &names.public_ip_overwrite),
        (&names.public_ipv6, &names.public_ipv6_overwrite),
    ] {
        if let (Some(v), Some(o)) = (want.get(ip_key), current.get(over_key)) {
            if v == o {
                info!("Overriding public ip with '{v}' from node annotation '{over_key}'");
            }
        }
    }
}
