//! Pods on the nodes of a [`Testbed`]: a namespace each, wired to the node's `cni0` by the
//! real CNI plugins, and the probes between them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde_json::Value;

use super::cluster::{Node, PodState, Testbed};
use super::cni::{self, CniCall, CNI_NETWORK_NAME};
use super::flannel_cni;
use super::netns;
use super::probe::{self, Endpoint, Matrix};

/// A pod: a network namespace whose `eth0` the CNI plugin attached to its node. Cheap to clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pod {
    /// The name given to [`Testbed::add_pod`].
    pub name: String,
    /// Number of the node it runs on.
    pub node: usize,
    /// Its network namespace, `<prefix>-p-<name>`.
    pub netns: String,
    /// `CNI_CONTAINERID`.
    pub container_id: String,
    /// The addresses of the CNI result, with their prefix lengths.
    pub addresses: Vec<IpNet>,
}

impl Pod {
    /// Its IPv4 address, if it has one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.addresses.iter().find_map(|a| match a.addr() {
            IpAddr::V4(ip) => Some(ip),
            IpAddr::V6(_) => None,
        })
    }

    /// Its IPv6 address, if it has one.
    pub fn ipv6(&self) -> Option<Ipv6Addr> {
        self.addresses.iter().find_map(|a| match a.addr() {
            IpAddr::V6(ip) => Some(ip),
            IpAddr::V4(_) => None,
        })
    }

    /// Its main address: IPv4 if it has one, else IPv6.
    pub fn ip(&self) -> IpAddr {
        self.ipv4()
            .map(IpAddr::V4)
            .or_else(|| self.ipv6().map(IpAddr::V6))
            .expect("a pod always has an address")
    }

    /// The pod as a probe endpoint at [`Self::ip`].
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.name.clone(),
            netns: self.netns.clone(),
            ip: self.ip(),
        }
    }

    /// The pod as a probe endpoint at its IPv6 address, if it has one.
    pub fn endpoint_v6(&self) -> Option<Endpoint> {
        self.ipv6().map(|ip| Endpoint {
            name: format!("{}/v6", self.name),
            netns: self.netns.clone(),
            ip: ip.into(),
        })
    }
}

/// Says once per process that pods run `bridge` directly, and why.
fn warn_fallback_once(why: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| eprintln!("testbed: pods use the bridge plugin directly: {why}"));
}

/// Bound on pod names: they end up in namespace names and container ids.
const MAX_POD_NAME: usize = 40;
/// Bound on IPv6 duplicate address detection (about a second by default).
const DAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Waits until no IPv6 address on `dev` in `netns` is tentative.
///
/// The bridge plugin waits for DAD on the pod's address but not on the gateway address it
/// puts on the bridge, so with DAD on, a node's first IPv6 pod cannot reach its gateway for
/// a second or two (Kubernetes has the same gap). The testbed turns DAD off in node
/// namespaces, so this normally returns at once; it is the guard for a test that turns DAD
/// back on.
async fn wait_for_dad(netns: &str, dev: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + DAD_TIMEOUT;
    loop {
        let tentative = netns::ip(netns, &["-6", "addr", "show", "dev", dev, "tentative"]).await?;
        if tentative.trim().is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("IPv6 addresses on {dev} in {netns} still tentative after {DAD_TIMEOUT:?}: {tentative}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

impl Testbed {
    /// Creates pod `name` on node `number`: a namespace, then CNI ADD through flannel-rs's
    /// CNI plugin (or, as a fallback, `bridge` with the delegate config flannel's plugin
    /// would render) from the node's `subnet.env`, which must exist: written by an agent
    /// or by [`Self::write_subnet_env`].
    pub async fn add_pod(&mut self, number: usize, name: &str) -> anyhow::Result<Pod> {
        let valid = name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if name.is_empty() || name.len() > MAX_POD_NAME || !valid {
            bail!("pod name {name:?}: use 1 to {MAX_POD_NAME} of a-z, 0-9 and -");
        }
        if self.pods.iter().any(|p| p.pod.name == name) {
            bail!("there is already a pod named {name}");
        }
        let node = self.node(number).clone();
        let subnet_env = self
            .read_subnet_env(number)
            .context("a pod needs its node's subnet.env")?;
        let (config, cni_path) = self.pod_cni_config(&node, &subnet_env).await?;

        let pod_netns = format!("{}-p-{name}", self.prefix);
        let container_id = format!("{}-{name}", self.prefix);
        netns::add(&pod_netns).await?;
        let call = CniCall {
            node_netns: &node.netns,
            container_id: &container_id,
            pod_netns: &pod_netns,
            ifname: "eth0",
        };
        let added = async {
            // Runtimes bring lo up too (the loopback plugin); the bridge plugin does not.
            netns::ip(&pod_netns, &["link", "set", "lo", "up"]).await?;
            cni::add_in(&cni_path, &call, &config).await
        }
        .await;
        let addresses = match added {
            Ok(addresses) if !addresses.is_empty() => addresses,
            outcome => {
                // Undo, so that a failed ADD leaves nothing behind for the next attempt.
                let _ = cni::del_in(&cni_path, &call, &config).await;
                let _ = netns::run("ip", &["netns", "delete", &pod_netns], Duration::from_secs(10)).await;
                let why = match outcome {
                    Err(e) => e,
                    Ok(_) => anyhow::anyhow!("the CNI result has no address"),
                };
                return Err(why.context(format!("adding pod {name} on {}", node.name)));
            }
        };
        if addresses.iter().any(|a| matches!(a, IpNet::V6(_))) {
            wait_for_dad(&node.netns, "cni0").await?;
        }
        let pod = Pod {
            name: name.to_owned(),
            node: number,
            netns: pod_netns,
            container_id,
            addresses,
        };
        self.pods.push(PodState {
            pod: pod.clone(),
            config,
            cni_path,
        });
        Ok(pod)
    }

    /// Removes pod `name`: CNI DEL with the config of its ADD, then its namespace. The
    /// namespace goes even if DEL fails; the DEL error is returned.
    pub async fn remove_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let index = self
            .pods
            .iter()
            .position(|p| p.pod.name == name)
            .with_context(|| format!("no pod named {name}"))?;
        let state = self.pods.remove(index);
        let node = self.node(state.pod.node).clone();
        let call = CniCall {
            node_netns: &node.netns,
            container_id: &state.pod.container_id,
            pod_netns: &state.pod.netns,
            ifname: "eth0",
        };
        let deleted = cni::del_in(&state.cni_path, &call, &state.config).await;
        netns::run("ip", &["netns", "delete", &state.pod.netns], Duration::from_secs(10)).await?;
        deleted.with_context(|| format!("CNI DEL of pod {name}"))
    }

    /// The CNI config and `CNI_PATH` for a pod on `node`: flannel's conflist entry and the
    /// testbed's bin directory when the flannel plugin is on and can be had, else the
    /// delegate config rendered here and the system plugins.
    async fn pod_cni_config(&self, node: &Node, subnet_env: &str) -> anyhow::Result<(Value, PathBuf)> {
        if self.options.flannel_cni {
            // The first call may build the plugin: off the runtime's threads.
            let found = tokio::task::spawn_blocking(flannel_cni::flannel_cni_path)
                .await
                .unwrap_or_else(|e| Err(format!("looking for the plugin panicked: {e}")));
            match found {
                Ok(plugin) => {
                    // Fail at once on a bad file, as the fallback does, rather than after
                    // the plugin's wait for a complete one.
                    cni::SubnetEnv::parse(subnet_env)?;
                    let dir = flannel_cni::prepare_bin_dir(&self.state_dir.join("cni-bin"), &plugin)?;
                    return Ok((flannel_cni::flannel_netconf(&node.dir, &node.subnet_file()), dir));
                }
                Err(why) => warn_fallback_once(&why),
            }
        }
        let mut config = cni::cni_delegate_config(subnet_env, CNI_NETWORK_NAME)?;
        // Per node, so that nodes never share allocations (and the host's
        // /var/lib/cni/networks is left alone).
        config["ipam"]["dataDir"] = node.dir.join("cni-ipam").display().to_string().into();
        Ok((config, cni::cni_path()))
    }

    /// All pods, in creation order.
    pub fn pods(&self) -> Vec<Pod> {
        self.pods.iter().map(|p| p.pod.clone()).collect()
    }

    /// Pod `name`, if it exists.
    pub fn pod(&self, name: &str) -> Option<Pod> {
        self.pods.iter().find(|p| p.pod.name == name).map(|p| p.pod.clone())
    }

    /// Pings `to` from inside pod `from` (`ping -c 1 -W 1`, a few attempts).
    pub async fn ping(&self, from: &Pod, to: IpAddr) -> bool {
        probe::ping(&from.netns, to).await
    }

    /// Exchanges 16 KiB over TCP from pod `from` to a listener on pod `to`'s main address.
    pub async fn tcp_check(&self, from: &Pod, to: &Pod) -> anyhow::Result<()> {
        probe::tcp_check(&from.netns, &to.netns, to.ip()).await
    }

    /// ICMP and TCP between every ordered pair of `pods`.
    pub async fn connectivity_matrix(&self, pods: &[Pod]) -> Matrix {
        let endpoints: Vec<Endpoint> = pods.iter().map(Pod::endpoint).collect();
        Matrix::probe(&endpoints).await
    }
}
