//! Kube mode of a [`Testbed`] ([`TestbedOptions::kube`]): the Kubernetes API emulator
//! ([`KubeApi`]) is the store instead of etcd.
//!
//! The emulator listens in the fabric namespace on [`FABRIC_IP`]:[`KUBE_API_PORT`], where every
//! node reaches it as it reaches etcd in the default mode. At start the testbed does what the
//! kubelet and kube-controller-manager do on a real cluster: one Node object per node namespace,
//! named like the node (`n1`, `n2`, ...), with its `InternalIP` and a pod CIDR allocated from
//! `Network` in order (node 1 gets the first `SubnetLen` block). The net-conf.json goes to a
//! file, as the DaemonSet's ConfigMap does, and agents run with `--kube-subnet-mgr`,
//! `--kubeconfig-file`, `--net-config-path` and `NODE_NAME`.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use anyhow::{bail, Context};
use ipnet::Ipv4Net;
use serde_json::{json, Value};

use super::cluster::{Testbed, FABRIC_IP};
use crate::kube_api::{fixtures, KubeApi};

/// The emulator's port on [`FABRIC_IP`] (kube-apiserver's usual secure port).
pub const KUBE_API_PORT: u16 = 6443;
/// The annotation prefix flanneld uses by default.
pub const ANNOTATION_PREFIX: &str = "flannel.alpha.coreos.com/";

/// The emulator of a kube-mode testbed and what its agents are given.
#[derive(Debug)]
pub(super) struct KubeStore {
    pub(super) api: KubeApi,
    pub(super) kubeconfig: PathBuf,
    pub(super) net_conf_path: PathBuf,
}

/// What an agent of a kube-mode testbed is started with.
pub(super) struct KubeAgentDefaults {
    pub(super) flags: Vec<(&'static str, String)>,
    pub(super) node_name: String,
}

/// The pod CIDR of node `number` as kube-controller-manager's range allocator would hand them
/// out to nodes registering in order: the `number`-th `SubnetLen` block of `Network`.
pub fn pod_cidr(net_conf: &str, number: usize) -> anyhow::Result<Ipv4Net> {
    let conf: Value = serde_json::from_str(net_conf).context("net-conf.json is not JSON")?;
    let network: Ipv4Net = conf["Network"]
        .as_str()
        .context("net-conf.json has no Network")?
        .parse()
        .context("net-conf.json's Network")?;
    let len = conf["SubnetLen"].as_u64().unwrap_or(24);
    let len = u8::try_from(len)
        .ok()
        .filter(|l| *l >= network.prefix_len() && *l <= 30);
    let len = len.with_context(|| format!("SubnetLen {:?} does not fit {network}", conf["SubnetLen"]))?;
    network
        .subnets(len)?
        .nth(number - 1)
        .with_context(|| format!("{network} has no block /{len} for node {number}"))
}

/// `(key, value)` pairs of one Node object.
pub type Annotations = Vec<(String, String)>;

/// A node annotation that carries part of a flannel lease, shortened for printing.
fn is_flannel_annotation(key: &str) -> bool {
    key.starts_with(ANNOTATION_PREFIX)
}

impl Testbed {
    /// Starts the emulator in the fabric, writes net-conf.json and registers every node.
    pub(super) async fn start_kube(&mut self) -> anyhow::Result<()> {
        let Some(net_conf) = self.options.net_conf.clone() else {
            bail!("a kube-mode testbed needs a net-conf.json (TestbedOptions::net_conf)");
        };
        let addr = SocketAddr::new(IpAddr::V4(FABRIC_IP), KUBE_API_PORT);
        let (api, kubeconfig) = KubeApi::start_in_netns(&self.fabric_netns(), addr)
            .await
            .context("starting the Kubernetes API emulator in the fabric namespace")?;
        let net_conf_path = self.state_dir.join("net-conf.json");
        std::fs::write(&net_conf_path, &net_conf).with_context(|| format!("writing {}", net_conf_path.display()))?;
        for node in &self.nodes {
            let cidr = pod_cidr(&net_conf, node.number)?.to_string();
            let mut obj = fixtures::node(&node.name, &[&cidr], &[]);
            obj["status"]["addresses"] = json!([
                {"type": "InternalIP", "address": node.ip.to_string()},
                {"type": "Hostname", "address": node.name},
            ]);
            api.create_node(obj)
                .map_err(|e| anyhow::anyhow!("creating Node {}: {}", node.name, e.message))?;
        }
        self.kube = Some(KubeStore {
            api,
            kubeconfig,
            net_conf_path,
        });
        Ok(())
    }

    /// The API emulator of a kube-mode testbed: add, change and delete Node objects with it.
    pub fn kube_api(&self) -> Option<&KubeApi> {
        self.kube.as_ref().map(|k| &k.api)
    }

    /// The Node object name of node `number` (its short name, `n<number>`).
    pub fn kube_node_name(&self, number: usize) -> String {
        self.node(number).name.clone()
    }

    /// The flags (besides `--kube-subnet-mgr`) an agent gets in kube mode, and its
    /// `NODE_NAME`; `None` in etcd mode.
    pub(super) fn kube_agent_defaults(&self, number: usize) -> Option<KubeAgentDefaults> {
        let kube = self.kube.as_ref()?;
        Some(KubeAgentDefaults {
            flags: vec![
                ("kubeconfig-file", kube.kubeconfig.display().to_string()),
                ("net-config-path", kube.net_conf_path.display().to_string()),
            ],
            node_name: self.kube_node_name(number),
        })
    }

    /// The flannel annotations of every Node object (the leases of kube mode), by node name.
    /// `spec.podCIDRs` comes first, as the key `spec.podCIDRs`.
    pub fn kube_leases(&self) -> anyhow::Result<Vec<(String, Annotations)>> {
        let api = self.kube_api().context("this testbed is not in kube mode")?;
        let mut out = Vec::new();
        for name in api.node_names() {
            let Some(node) = api.node(&name) else { continue };
            let mut ann: Vec<(String, String)> = node["metadata"]["annotations"]
                .as_object()
                .into_iter()
                .flatten()
                .filter(|(k, _)| is_flannel_annotation(k))
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect();
            ann.sort();
            let cidrs = node["spec"]["podCIDRs"].as_array().cloned().unwrap_or_default();
            let cidrs: Vec<String> = cidrs.iter().filter_map(|c| c.as_str().map(str::to_owned)).collect();
            ann.insert(0, ("spec.podCIDRs".to_owned(), cidrs.join(",")));
            out.push((name, ann));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_cidrs_are_handed_out_in_order() {
        let conf = r#"{"Network":"10.244.0.0/16","Backend":{"Type":"vxlan"}}"#;
        assert_eq!(pod_cidr(conf, 1).unwrap().to_string(), "10.244.0.0/24");
        assert_eq!(pod_cidr(conf, 3).unwrap().to_string(), "10.244.2.0/24");
        let conf = r#"{"Network":"10.5.0.0/16","SubnetLen":20}"#;
        assert_eq!(pod_cidr(conf, 2).unwrap().to_string(), "10.5.16.0/20");
        assert!(pod_cidr(r#"{"Network":"10.5.0.0/30"}"#, 1).is_err());
        assert!(pod_cidr(r#"{"Network":"10.5.0.0/24","SubnetLen":26}"#, 5).is_err());
    }
}
