//! [`Testbed`]: the namespaces, the underlay, etcd, and the generic helpers. Agents are in
//! `agent.rs`, pods in `pods.rs`.
//!
//! Topology (all names start with the testbed's prefix, see `cleanup.rs`):
//!
//! ```text
//!   <p>-outside  eth0 198.19.0.1/16, fd00:19::1/64         ("the internet", for SNAT tests)
//!        |
//!   <p>-fabric   outside 198.19.0.254 | br0 198.18.0.254/16, fd00:18::fe/64   (router + switch,
//!        |                                                                etcd on :2379)
//!        +-- n1 ---- <p>-n1  eth0 198.18.0.1/16, fd00:18::1/64, default via 198.18.0.254
//!        +-- n2 ---- <p>-n2  eth0 198.18.0.2/16 ...              cni0 -- pods <p>-p-<name>
//! ```
//!
//! Nodes share one L2 segment (the fabric bridge), as in a typical cluster; the fabric routes
//! between that segment and the outside one, so pod traffic to the outside leaves a node by
//! its default route, and the outside namespace has no route to pod networks: only
//! masqueraded traffic gets an answer.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use serde_json::Value;

use super::cleanup;
use super::netns;
use super::probe::Endpoint;
use crate::etcd::{EtcdOptions, EtcdServer};
use crate::process::ChildGuard;

/// Prefix length of both underlay segments.
pub const UNDERLAY_PREFIX_LEN: u8 = 16;
/// The fabric's address on the node segment: the nodes' default gateway and etcd's address.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 254);
/// The fabric's IPv6 address on the node segment.
pub const FABRIC_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, 0xfe);
/// The fabric's address on the outside segment.
pub const FABRIC_OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 254);
/// The fabric's IPv6 address on the outside segment.
pub const FABRIC_OUTSIDE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 0xfe);
/// The outside namespace's address.
pub const OUTSIDE_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 1);
/// The outside namespace's IPv6 address.
pub const OUTSIDE_IPV6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x19, 0, 0, 0, 0, 0, 1);
/// etcd's client port on [`FABRIC_IP`].
pub const ETCD_PORT: u16 = 2379;
/// Node numbers run from 1 to this (the last octet of the node address; .254 is the fabric).
pub const MAX_NODES: usize = 253;
/// flannel's default etcd prefix.
pub const DEFAULT_ETCD_PREFIX: &str = "/coreos.com/network";

/// The underlay address of node `number` (1-based): `198.18.0.<number>`.
pub fn node_ip(number: usize) -> Ipv4Addr {
    let last = u8::try_from(number).expect("node numbers fit in an octet");
    Ipv4Addr::new(198, 18, 0, last)
}

/// The underlay IPv6 address of node `number`: `fd00:18::<number>`.
pub fn node_ipv6(number: usize) -> Ipv6Addr {
    let last = u16::try_from(number).expect("node numbers fit in 16 bits");
    Ipv6Addr::new(0xfd00, 0x18, 0, 0, 0, 0, 0, last)
}

/// What [`Testbed::start`] builds. Start from `TestbedOptions::new(nodes)`.
#[derive(Debug, Clone)]
pub struct TestbedOptions {
    /// Number of node namespaces, 1..=[`MAX_NODES`].
    pub nodes: usize,
    /// MTU of every node's `eth0` and its fabric port.
    pub underlay_mtu: u32,
    /// Start etcd in the fabric namespace.
    pub etcd: bool,
    /// Serve etcd over TLS with client certificates; agents get the certificate flags.
    pub etcd_tls: bool,
    /// The etcd prefix (`--etcd-prefix`); the config goes to `<prefix>/config`.
    pub etcd_prefix: String,
    /// net-conf.json to write to `<prefix>/config` once etcd runs.
    pub net_conf: Option<String>,
    /// Wire pods through flannel-rs's CNI plugin when it can be had (the default); when
    /// false, or when it cannot, run the `bridge` plugin with the testbed's own rendering.
    pub flannel_cni: bool,
    /// Kube mode: the Kubernetes API emulator is the store instead of etcd (see `kube.rs`).
    pub kube: bool,
    /// The flanneld binary agents run; `None`: [`crate::testbed::flanneld_path`].
    pub flanneld: Option<PathBuf>,
}

impl TestbedOptions {
    /// `nodes` nodes, MTU 1500, plain-HTTP etcd under flannel's default prefix, no config.
    pub fn new(nodes: usize) -> Self {
        Self {
            nodes,
            underlay_mtu: 1500,
            etcd: true,
            etcd_tls: false,
            etcd_prefix: DEFAULT_ETCD_PREFIX.to_owned(),
            net_conf: None,
            flannel_cni: true,
            kube: false,
            flanneld: None,
        }
    }

    /// Kube mode: no etcd; the Kubernetes API emulator in the fabric, one Node object per
    /// node with a pod CIDR, and agents with `--kube-subnet-mgr` (see `kube.rs`). Needs
    /// [`Self::net_conf`], which agents read from a file.
    pub fn kube(mut self) -> Self {
        self.kube = true;
        self.etcd = false;
        self
    }

    /// Whether pods go through the flannel CNI plugin when it can be had (default true).
    pub fn flannel_cni(mut self, on: bool) -> Self {
        self.flannel_cni = on;
        self
    }

    /// Runs agents from this flanneld binary (e.g. a release build, where the agent is the
    /// datapath).
    pub fn flanneld(mut self, path: PathBuf) -> Self {
        self.flanneld = Some(path);
        self
    }

    /// Sets the underlay MTU.
    pub fn underlay_mtu(mut self, mtu: u32) -> Self {
        self.underlay_mtu = mtu;
        self
    }

    /// Writes this net-conf.json to etcd at start.
    pub fn net_conf(mut self, json: &str) -> Self {
        self.net_conf = Some(json.to_owned());
        self
    }

    /// Serves etcd over TLS with client certificates.
    pub fn etcd_tls(mut self) -> Self {
        self.etcd_tls = true;
        self
    }

    /// Does not start etcd (for tests that need only namespaces and pods).
    pub fn without_etcd(mut self) -> Self {
        self.etcd = false;
        self
    }
}

/// One node of a testbed: a namespace with `eth0` on the fabric. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based number; also the last octet of its address.
    pub number: usize,
    /// Short name, `n<number>`; also the name of its port on the fabric bridge.
    pub name: String,
    /// Its network namespace.
    pub netns: String,
    /// Its `eth0` address.
    pub ip: Ipv4Addr,
    /// Its `eth0` IPv6 address.
    pub ipv6: Ipv6Addr,
    /// Its private directory: `subnet.env`, agent logs, IPAM state.
    pub dir: PathBuf,
}

impl Node {
    /// Where its agent writes (and the CNI code path reads) `subnet.env`.
    pub fn subnet_file(&self) -> PathBuf {
        self.dir.join("subnet.env")
    }

    /// The node itself (its host network) as a probe endpoint.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            name: self.name.clone(),
            netns: self.netns.clone(),
            ip: self.ip.into(),
        }
    }
}

/// The agent slot of one node.
#[derive(Debug, Default)]
pub(super) struct AgentSlot {
    /// The current or last agent process.
    pub(super) process: Option<ChildGuard>,
    /// The extra arguments of the last start, reused by restarts.
    pub(super) extra_args: Vec<String>,
    /// How many times an agent was started here, to name each start's log files.
    pub(super) starts: u32,
}

/// A pod and what is needed to remove it.
#[derive(Debug)]
pub(super) struct PodState {
    pub(super) pod: super::Pod,
    /// The exact config of the ADD, reused for DEL as flannel's plugin does.
    pub(super) config: Value,
    /// The `CNI_PATH` of the ADD: the plugins that DEL runs too.
    pub(super) cni_path: std::path::PathBuf,
}

/// An N-node cluster in network namespaces on this machine. See the module docs for the
/// topology and [`crate::testbed`] for an example.
///
/// Dropping it (also during a panic) kills every process in it and removes every namespace,
/// mount and file it made; Ctrl-C does the same through the signal handler.
/// [`Testbed::shutdown`] is the graceful variant.
#[derive(Debug)]
pub struct Testbed {
    /// Prefix of every name (see `cleanup.rs`).
    pub(super) prefix: String,
    /// What was asked for.
    pub(super) options: TestbedOptions,
    /// Nodes by number - 1.
    pub(super) nodes: Vec<Node>,
    /// Agent slots by node number - 1.
    pub(super) agents: Vec<AgentSlot>,
    /// Pods in creation order.
    pub(super) pods: Vec<PodState>,
    /// etcd in the fabric namespace, if started.
    pub(super) etcd: Option<EtcdServer>,
    /// The Kubernetes API emulator in the fabric namespace, in kube mode.
    pub(super) kube: Option<super::kube::KubeStore>,
    /// `<tmp>/flannel-rs-testbed/<prefix>`.
    pub(super) state_dir: PathBuf,
    /// Whether the bpffs under the state directory is mounted (done at the first agent start).
    pub(super) bpffs_mounted: bool,
}

impl Testbed {
    /// Builds the namespaces and the underlay, starts etcd (or, in kube mode, the API
    /// emulator with the Node objects) and writes the network config.
    /// Needs root. A failure part-way removes whatever was built.
    pub async fn start(options: TestbedOptions) -> anyhow::Result<Self> {
        if options.nodes == 0 || options.nodes > MAX_NODES {
            bail!("a testbed has 1 to {MAX_NODES} nodes, not {}", options.nodes);
        }
        cleanup::cleanup_stale_once();
        let prefix = cleanup::new_prefix();
        // Registered before anything exists, so Ctrl-C during the build cleans up too.
        cleanup::register(&prefix);
        let state_dir = cleanup::state_root().join(&prefix);
        let mut testbed = Self {
            prefix,
            options,
            nodes: Vec::new(),
            agents: Vec::new(),
            pods: Vec::new(),
            etcd: None,
            kube: None,
            state_dir,
            bpffs_mounted: false,
        };
        // From here on an early return drops `testbed`, which removes what was built.
        std::fs::create_dir_all(&testbed.state_dir)
            .with_context(|| format!("creating {}", testbed.state_dir.display()))?;
        testbed.build_fabric().await.context("building the fabric")?;
        for number in 1..=testbed.options.nodes {
            testbed
                .build_node(number)
                .await
                .with_context(|| format!("building node {number}"))?;
        }
        if testbed.options.kube {
            testbed.start_kube().await?;
        } else if testbed.options.etcd {
            testbed.start_etcd().await?;
        }
        Ok(testbed)
    }

    async fn build_fabric(&mut self) -> anyhow::Result<()> {
        let (fabric, outside) = (self.fabric_netns(), self.outside_netns());
        netns::add(&fabric).await?;
        netns::add(&outside).await?;
        self.skip_dad(&fabric).await?;
        self.skip_dad(&outside).await?;
        let v4 = |ip: Ipv4Addr| format!("{ip}/{UNDERLAY_PREFIX_LEN}");
        let v6 = |ip: Ipv6Addr| format!("{ip}/64");
        netns::ip(&fabric, &["link", "set", "lo", "up"]).await?;
        netns::ip(&fabric, &["link", "add", "br0", "type", "bridge"]).await?;
        netns::ip(&fabric, &["addr", "add", &v4(FABRIC_IP), "dev", "br0"]).await?;
        // nodad: a tentative address cannot be used for a second or two, and nothing else
        // on these segments could hold it.
        netns::ip(&fabric, &["addr", "add", &v6(FABRIC_IPV6), "dev", "br0", "nodad"]).await?;
        netns::ip(&fabric, &["link", "set", "br0", "up"]).await?;
        self.sysctl(&fabric, "net.ipv4.ip_forward", "1").await?;
        self.sysctl(&fabric, "net.ipv6.conf.all.forwarding", "1").await?;

        netns::ip(
            &fabric,
            &[
                "link", "add", "outside", "type", "veth", "peer", "name", "eth0", "netns", &outside,
            ],
        )
        .await?;
        netns::ip(&fabric, &["addr", "add", &v4(FABRIC_OUTSIDE_IP), "dev", "outside"]).await?;
        netns::ip(
            &fabric,
            &["addr", "add", &v6(FABRIC_OUTSIDE_IPV6), "dev", "outside", "nodad"],
        )
        .await?;
        netns::ip(&fabric, &["link", "set", "outside", "up"]).await?;
        netns::ip(&outside, &["link", "set", "lo", "up"]).await?;
        netns::ip(&outside, &["addr", "add", &v4(OUTSIDE_IP), "dev", "eth0"]).await?;
        netns::ip(&outside, &["addr", "add", &v6(OUTSIDE_IPV6), "dev", "eth0", "nodad"]).await?;
        netns::ip(&outside, &["link", "set", "eth0", "up"]).await?;
        netns::ip(
            &outside,
            &["route", "add", "default", "via", &FABRIC_OUTSIDE_IP.to_string()],
        )
        .await?;
        netns::ip(
            &outside,
            &["-6", "route", "add", "default", "via", &FABRIC_OUTSIDE_IPV6.to_string()],
        )
        .await?;
        Ok(())
    }

    /// Turns IPv6 duplicate address detection off for every link created in `netns` from now
    /// on (eth0, cni0, flannel.1), before any exists. Nothing else can own these addresses,
    /// and while a link-local address is tentative the kernel holds back neighbour
    /// solicitations for forwarded packets: the first IPv6 packet from a pod to another node
    /// took 2 s, and the pods' gateway on cni0 was unusable for as long.
    async fn skip_dad(&self, netns: &str) -> anyhow::Result<()> {
        self.sysctl(netns, "net.ipv6.conf.all.accept_dad", "0").await?;
        self.sysctl(netns, "net.ipv6.conf.default.accept_dad", "0").await
    }

    async fn build_node(&mut self, number: usize) -> anyhow::Result<()> {
        let node = Node {
            number,
            name: format!("n{number}"),
            netns: format!("{}-n{number}", self.prefix),
            ip: node_ip(number),
            ipv6: node_ipv6(number),
            dir: self.state_dir.join(format!("n{number}")),
        };
        std::fs::create_dir_all(&node.dir).with_context(|| format!("creating {}", node.dir.display()))?;
        netns::add(&node.netns).await?;
        // Pushed before configuring, so that a failure below still finds it for cleanup.
        self.nodes.push(node.clone());
        self.agents.push(AgentSlot::default());
        self.skip_dad(&node.netns).await?;

        let (fabric, ns) = (self.fabric_netns(), node.netns.as_str());
        let mtu = self.options.underlay_mtu.to_string();
        netns::ip(
            &fabric,
            &[
                "link", "add", &node.name, "mtu", &mtu, "type", "veth", "peer", "name", "eth0", "mtu", &mtu, "netns",
                ns,
            ],
        )
        .await?;
        netns::ip(&fabric, &["link", "set", &node.name, "master", "br0", "up"]).await?;
        netns::ip(ns, &["link", "set", "lo", "up"]).await?;
        let v4 = format!("{}/{UNDERLAY_PREFIX_LEN}", node.ip);
        let v6 = format!("{}/64", node.ipv6);
        netns::ip(ns, &["addr", "add", &v4, "dev", "eth0"]).await?;
        netns::ip(ns, &["addr", "add", &v6, "dev", "eth0", "nodad"]).await?;
        netns::ip(ns, &["link", "set", "eth0", "up"]).await?;
        netns::ip(ns, &["route", "add", "default", "via", &FABRIC_IP.to_string()]).await?;
        netns::ip(ns, &["-6", "route", "add", "default", "via", &FABRIC_IPV6.to_string()]).await?;
        Ok(())
    }

    async fn start_etcd(&mut self) -> anyhow::Result<()> {
        let mut options = EtcdOptions::default().in_netns(&self.fabric_netns(), IpAddr::V4(FABRIC_IP));
        if self.options.etcd_tls {
            options = options.with_tls();
        }
        let etcd = EtcdServer::start(options)
            .await
            .context("starting etcd in the fabric namespace")?;
        if let Some(conf) = &self.options.net_conf {
            etcd.put(&self.config_key(), conf)
                .await
                .context("writing the network config")?;
        }
        self.etcd = Some(etcd);
        Ok(())
    }

    /// The prefix of every name this testbed made.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The options it was built with.
    pub fn options(&self) -> &TestbedOptions {
        &self.options
    }

    /// All nodes, numbered from 1.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `number` (1-based). Panics on a number that does not exist: that is a bug in
    /// the test.
    #[track_caller]
    pub fn node(&self, number: usize) -> &Node {
        match number.checked_sub(1).and_then(|i| self.nodes.get(i)) {
            Some(node) => node,
            None => panic!("no node {number}: this testbed has nodes 1..={}", self.nodes.len()),
        }
    }

    /// The fabric namespace (bridge, router, etcd).
    pub fn fabric_netns(&self) -> String {
        format!("{}-fabric", self.prefix)
    }

    /// The outside namespace ("the internet").
    pub fn outside_netns(&self) -> String {
        format!("{}-outside", self.prefix)
    }

    /// The outside namespace as a probe endpoint.
    pub fn outside(&self) -> Endpoint {
        Endpoint {
            name: "outside".into(),
            netns: self.outside_netns(),
            ip: OUTSIDE_IP.into(),
        }
    }

    /// The testbed's own directory (logs, subnet files, IPAM state, bpffs).
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// etcd, when started: its helpers (`put`, `get`, `stop`, `restart`, ...) work from the
    /// test process through a forwarder.
    pub fn etcd(&self) -> Option<&EtcdServer> {
        self.etcd.as_ref()
    }

    /// etcd, mutably, for `stop`, `kill` and `restart`.
    pub fn etcd_mut(&mut self) -> Option<&mut EtcdServer> {
        self.etcd.as_mut()
    }

    /// The etcd URL as agents inside the testbed see it, e.g. `http://198.18.0.254:2379`.
    pub fn etcd_endpoint(&self) -> anyhow::Result<String> {
        self.etcd
            .as_ref()
            .and_then(EtcdServer::netns_endpoint)
            .context("this testbed has no etcd")
    }

    /// The key of the network config, `<prefix>/config`.
    pub fn config_key(&self) -> String {
        format!("{}/config", self.options.etcd_prefix.trim_end_matches('/'))
    }

    /// Runs `ip -n <netns> args...`.
    pub async fn ip(&self, netns: &str, args: &[&str]) -> anyhow::Result<String> {
        netns::ip(netns, args).await
    }

    /// Runs `program args...` inside `netns` (through `ip netns exec`) and returns its
    /// stdout; fails on a non-zero exit or after `timeout`.
    pub async fn exec(&self, netns: &str, program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
        let mut full = vec!["netns", "exec", netns, program];
        full.extend_from_slice(args);
        netns::run("ip", &full, timeout).await
    }

    /// Sets a sysctl inside `netns`, e.g. `("net.ipv4.ip_forward", "1")`.
    pub async fn sysctl(&self, netns: &str, key: &str, value: &str) -> anyhow::Result<()> {
        let setting = format!("{key}={value}");
        self.exec(netns, "sysctl", &["-q", "-w", &setting], Duration::from_secs(10))
            .await
            .map(drop)
    }

    /// Starts a long-running `program args...` inside `netns` (an iperf3 server, a traffic
    /// generator) with its output in the state directory, in `<name>.stdout` and
    /// `<name>.stderr` (so `name` should be unique in the testbed). It is killed when the
    /// guard drops or, at the latest, when the testbed goes.
    pub fn spawn(&self, netns: &str, name: &str, program: &str, args: &[&str]) -> anyhow::Result<ChildGuard> {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", netns, program]).args(args);
        ChildGuard::spawn_in(name, cmd, &self.state_dir)
    }

    /// Changes the MTU of node `number`'s underlay link (both ends of its veth).
    pub async fn set_underlay_mtu(&self, number: usize, mtu: u32) -> anyhow::Result<()> {
        let node = self.node(number);
        let mtu = mtu.to_string();
        netns::ip(&self.fabric_netns(), &["link", "set", &node.name, "mtu", &mtu]).await?;
        netns::ip(&node.netns, &["link", "set", "eth0", "mtu", &mtu])
            .await
            .map(drop)
    }

    /// Writes node `number`'s `subnet.env`, as an agent would (for tests without one).
    pub fn write_subnet_env(&self, number: usize, text: &str) -> anyhow::Result<()> {
        let path = self.node(number).subnet_file();
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
    }

    /// Reads node `number`'s `subnet.env`.
    pub fn read_subnet_env(&self, number: usize) -> anyhow::Result<String> {
        let path = self.node(number).subnet_file();
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
    }

    /// Graceful teardown: stops every agent with SIGTERM (so their shutdown path runs), runs
    /// CNI DEL for every pod (errors ignored), then removes everything as `Drop` does.
    pub async fn shutdown(mut self) -> anyhow::Result<()> {
        for number in 1..=self.nodes.len() {
            self.stop_agent(number).await?;
        }
        let names: Vec<String> = self.pods.iter().rev().map(|p| p.pod.name.clone()).collect();
        for name in names {
            if let Err(e) = self.remove_pod(&name).await {
                eprintln!("testbed {}: removing pod {name}: {e:#}", self.prefix);
            }
        }
        Ok(())
    }
}

impl Drop for Testbed {
    fn drop(&mut self) {
        // Processes first, so that nothing holds a namespace or writes to the directory
        // while it goes; etcd before the fabric it listens in.
        for slot in &mut self.agents {
            slot.process.take();
        }
        self.etcd.take();
        self.kube.take();
        for error in cleanup::remove_leftovers(&self.prefix) {
            eprintln!("testbed {}: cleanup: {error}", self.prefix);
        }
        cleanup::unregister(&self.prefix);
    }
}
