//! A node set up by hand exactly as upstream flanneld sets up a vxlan node (no agent runs
//! on it), for mixed clusters: flannel-rs must interoperate with upstream nodes during a
//! rolling migration. What upstream does is in `reference/flannel-upstream.md` section 5.1
//! (`pkg/backend/vxlan`); the commands below are its netlink calls in iproute2 spelling.

use std::time::Duration;

use anyhow::Context;
use ipnet::Ipv4Net;

use super::cluster::{Node, Testbed};
use super::leases::{random_vtep_mac, upstream_vxlan_lease_value, UPSTREAM_LEASE_TTL};
use super::netns;

/// Upstream's default VNI, and so its device name `flannel.1`.
const VNI: u32 = 1;
/// Upstream's device name for [`VNI`].
pub const UPSTREAM_VXLAN_DEV: &str = "flannel.1";
/// The kernel's default VXLAN port, which upstream relies on (it sends no port).
const VXLAN_PORT: u16 = 8472;
/// VXLAN overhead upstream subtracts from the underlay MTU.
const OVERHEAD: u32 = 50;

/// A node that upstream flanneld (vxlan, IPv4) would have set up; see
/// [`Testbed::setup_upstream_vxlan_node`].
#[derive(Debug, Clone)]
pub struct UpstreamVxlanNode {
    /// The node.
    pub node: Node,
    /// Its lease's subnet.
    pub subnet: Ipv4Net,
    /// The MAC of its `flannel.1`, published in its lease.
    pub vtep_mac: String,
    /// Its lease's etcd key.
    pub key: String,
}

impl Testbed {
    /// Sets node `number` up as upstream flanneld does on start-up with a vxlan config and
    /// the lease `subnet` of `network`:
    ///
    /// 1. `flannel.1`: `ip link add flannel.1 address <random local MAC> mtu <eth0 MTU - 50>
    ///    type vxlan id 1 dev eth0 local <node IP> dstport 8472 nolearning`. Upstream sends
    ///    no UDP checksum, port, proxy or miss attributes beyond these, so the kernel's
    ///    defaults apply (checksums on, port 8472, no proxy, no l2miss/l3miss);
    /// 2. `accept_ra=0` on it, `<subnet address>/32` on it, link up;
    /// 3. its lease in etcd, upstream's exact JSON, attached to a 24 h etcd lease;
    /// 4. a `subnet.env` as upstream writes it, so pods can be added with `add_pod`.
    ///
    /// The peers' entries come with [`UpstreamVxlanNode::add_peers`].
    pub async fn setup_upstream_vxlan_node(
        &self,
        number: usize,
        network: Ipv4Net,
        subnet: Ipv4Net,
        ip_masq: bool,
    ) -> anyhow::Result<UpstreamVxlanNode> {
        let node = self.node(number).clone();
        let ns = node.netns.as_str();
        let mac = random_vtep_mac();
        let mtu = self.options().underlay_mtu - OVERHEAD;
        let (local, mtu_text, vni, port) = (
            node.ip.to_string(),
            mtu.to_string(),
            VNI.to_string(),
            VXLAN_PORT.to_string(),
        );
        netns::ip(
            ns,
            &[
                "link",
                "add",
                UPSTREAM_VXLAN_DEV,
                "address",
                &mac,
                "mtu",
                &mtu_text,
                "type",
                "vxlan",
                "id",
                &vni,
                "dev",
                "eth0",
                "local",
                &local,
                "dstport",
                &port,
                "nolearning",
            ],
        )
        .await
        .context("creating the upstream-style flannel.1")?;
        // sysctl spells the dot of a device name as a slash.
        self.sysctl(
            ns,
            &format!("net.ipv6.conf.{}.accept_ra", UPSTREAM_VXLAN_DEV.replace('.', "/")),
            "0",
        )
        .await?;
        let addr = format!("{}/32", subnet.network());
        netns::ip(ns, &["addr", "add", &addr, "dev", UPSTREAM_VXLAN_DEV]).await?;
        netns::ip(ns, &["link", "set", UPSTREAM_VXLAN_DEV, "up"]).await?;

        let value = upstream_vxlan_lease_value(node.ip, VNI, &mac);
        let key = self.put_lease(subnet, None, &value, Some(UPSTREAM_LEASE_TTL)).await?;
        let first_host = subnet.hosts().next().context("the subnet has no hosts")?;
        self.write_subnet_env(
            number,
            &format!(
                "FLANNEL_NETWORK={network}\nFLANNEL_SUBNET={first_host}/{}\nFLANNEL_MTU={mtu}\nFLANNEL_IPMASQ={ip_masq}\n",
                subnet.prefix_len()
            ),
        )?;
        Ok(UpstreamVxlanNode {
            node,
            subnet,
            vtep_mac: mac,
            key,
        })
    }
}

impl UpstreamVxlanNode {
    /// For every other vxlan lease in etcd, adds what upstream's `handleSubnetEvents` adds on
    /// `EventAdded`, in its order (the route last, so the kernel never ARPs for the gateway):
    ///
    /// ```text
    /// ip neigh replace <peer subnet address> lladdr <VtepMAC> dev flannel.1 nud permanent
    /// bridge fdb replace <VtepMAC> dev flannel.1 dst <PublicIP> self permanent
    /// ip route replace <peer subnet> via <peer subnet address> dev flannel.1 onlink
    /// ```
    ///
    /// Returns how many peers it programmed.
    pub async fn add_peers(&self, tb: &Testbed) -> anyhow::Result<usize> {
        let ns = self.node.netns.as_str();
        let mut count = 0;
        for lease in tb.leases().await? {
            if lease.key == self.key || lease.backend_type != "vxlan" {
                continue;
            }
            let mac = lease
                .vtep_mac
                .clone()
                .with_context(|| format!("vxlan lease {} without VtepMAC", lease.key))?;
            let gw = lease.subnet.network().to_string();
            let (dst, public_ip) = (lease.subnet.to_string(), lease.public_ip.to_string());
            netns::ip(
                ns,
                &[
                    "neigh",
                    "replace",
                    &gw,
                    "lladdr",
                    &mac,
                    "dev",
                    UPSTREAM_VXLAN_DEV,
                    "nud",
                    "permanent",
                ],
            )
            .await?;
            netns::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns,
                    "bridge",
                    "fdb",
                    "replace",
                    &mac,
                    "dev",
                    UPSTREAM_VXLAN_DEV,
                    "dst",
                    &public_ip,
                    "self",
                    "permanent",
                ],
                Duration::from_secs(10),
            )
            .await?;
            netns::ip(
                ns,
                &[
                    "route",
                    "replace",
                    &dst,
                    "via",
                    &gw,
                    "dev",
                    UPSTREAM_VXLAN_DEV,
                    "onlink",
                ],
            )
            .await?;
            count += 1;
        }
        Ok(count)
    }
}
