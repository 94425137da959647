//! Subnet leases in the testbed's etcd, in upstream's exact format: reading what the agents
//! wrote, and writing leases of nodes that run no flannel-rs (a node set up by hand, a fake
//! remote node).
//!
//! Layout (see `reference/flannel-upstream.md` section 3): `<prefix>/subnets/<key>` with
//! `<key>` = `10.244.3.0-24` or, dual stack, `10.244.3.0-24&fd00:10:244:3::-64`, and the JSON
//! of `LeaseAttrs` as value, fields in upstream's order.

use std::io::Read;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use anyhow::{bail, Context};
use etcd_client::PutOptions;
use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::Value;

use super::cluster::Testbed;
use super::cni::SubnetEnv;

/// Bound on one etcd request made here.
const ETCD_TIMEOUT: Duration = Duration::from_secs(10);
/// The TTL upstream grants every lease (24 h).
pub const UPSTREAM_LEASE_TTL: i64 = 24 * 60 * 60;

/// A lease as stored in etcd, with the fields tests look at.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredLease {
    /// The full etcd key.
    pub key: String,
    /// The IPv4 subnet of the key.
    pub subnet: Ipv4Net,
    /// The IPv6 subnet of the key, if dual stack.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `PublicIP`.
    pub public_ip: Ipv4Addr,
    /// `PublicIPv6`.
    pub public_ipv6: Option<Ipv6Addr>,
    /// `BackendType`.
    pub backend_type: String,
    /// `BackendData.VtepMAC` (vxlan), lower case.
    pub vtep_mac: Option<String>,
    /// `BackendV6Data.VtepMAC` (vxlan over IPv6), lower case.
    pub vtep_mac_v6: Option<String>,
    /// The whole value.
    pub value: Value,
}

/// The key suffix of a lease: `10.244.3.0-24`, or `10.244.3.0-24&fd00:10:244:3::-64`.
pub fn subnet_key(subnet: Ipv4Net, ipv6_subnet: Option<Ipv6Net>) -> String {
    let v4 = format!("{}-{}", subnet.network(), subnet.prefix_len());
    match ipv6_subnet {
        Some(v6) => format!("{v4}&{}-{}", v6.network(), v6.prefix_len()),
        None => v4,
    }
}

/// Parses a key suffix made by [`subnet_key`].
pub fn parse_subnet_key(key: &str) -> anyhow::Result<(Ipv4Net, Option<Ipv6Net>)> {
    let (v4, v6) = match key.split_once('&') {
        Some((v4, v6)) => (v4, Some(v6)),
        None => (key, None),
    };
    let net = |text: &str| -> anyhow::Result<String> {
        let (addr, len) = text.rsplit_once('-').with_context(|| format!("subnet key {key:?}"))?;
        Ok(format!("{addr}/{len}"))
    };
    let subnet = net(v4)?.parse().with_context(|| format!("subnet key {key:?}"))?;
    let ipv6_subnet = v6
        .map(|v6| net(v6)?.parse().with_context(|| format!("subnet key {key:?}")))
        .transpose()?;
    Ok((subnet, ipv6_subnet))
}

/// The value upstream flanneld writes for an IPv4 vxlan node, byte for byte:
/// `{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"…"}}`.
pub fn upstream_vxlan_lease_value(public_ip: Ipv4Addr, vni: u32, vtep_mac: &str) -> String {
    format!(
        r#"{{"PublicIP":"{public_ip}","PublicIPv6":null,"BackendType":"vxlan","BackendData":{{"VNI":{vni},"VtepMAC":"{vtep_mac}"}}}}"#
    )
}

/// A random, locally administered unicast MAC, as upstream gives its VXLAN devices
/// (`b[0] = (b[0] & 0xfe) | 0x02`).
pub fn random_vtep_mac() -> String {
    let mut b = [0u8; 6];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b));
    if read.is_err() {
        // Unique enough for a test: the clock's nanoseconds.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        b.copy_from_slice(&nanos.to_le_bytes()[..6]);
    }
    b[0] = (b[0] & 0xfe) | 0x02;
    b.iter().map(|x| format!("{x:02x}")).collect::<Vec<_>>().join(":")
}

fn vtep_mac(value: &Value, field: &str) -> Option<String> {
    value.get(field)?.get("VtepMAC")?.as_str().map(str::to_ascii_lowercase)
}

impl Testbed {
    /// `<prefix>/subnets/`.
    pub fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.options().etcd_prefix.trim_end_matches('/'))
    }

    /// The full etcd key of a lease.
    pub fn lease_key(&self, subnet: Ipv4Net, ipv6_subnet: Option<Ipv6Net>) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet, ipv6_subnet))
    }

    /// Every lease in etcd, by key.
    pub async fn leases(&self) -> anyhow::Result<Vec<StoredLease>> {
        let etcd = self.etcd().context("this testbed has no etcd")?;
        let prefix = self.subnets_prefix();
        let mut out = Vec::new();
        for (key, text) in etcd.get_prefix(&prefix).await? {
            let suffix = key.strip_prefix(&prefix).unwrap_or(&key);
            let (subnet, ipv6_subnet) = parse_subnet_key(suffix)?;
            let value: Value = serde_json::from_str(&text).with_context(|| format!("lease {key}: {text}"))?;
            let public_ip = value["PublicIP"]
                .as_str()
                .with_context(|| format!("lease {key} without PublicIP: {text}"))?
                .parse()?;
            let public_ipv6 = value["PublicIPv6"].as_str().map(str::parse).transpose()?;
            out.push(StoredLease {
                key,
                subnet,
                ipv6_subnet,
                public_ip,
                public_ipv6,
                backend_type: value["BackendType"].as_str().unwrap_or_default().to_owned(),
                vtep_mac: vtep_mac(&value, "BackendData"),
                vtep_mac_v6: vtep_mac(&value, "BackendV6Data"),
                value,
            });
        }
        Ok(out)
    }

    /// The lease of node `number`: the one whose `PublicIP` is the node's address.
    pub async fn node_lease(&self, number: usize) -> anyhow::Result<StoredLease> {
        let ip = self.node(number).ip;
        let leases = self.leases().await?;
        let mut mine = leases.iter().filter(|l| l.public_ip == ip);
        match (mine.next(), mine.next()) {
            (Some(l), None) => Ok(l.clone()),
            (None, _) => bail!("no lease with PublicIP {ip} in etcd: {leases:#?}"),
            (Some(_), Some(_)) => bail!("more than one lease with PublicIP {ip} in etcd: {leases:#?}"),
        }
    }

    /// The subnets node `number` has in its `subnet.env` (written by its agent).
    pub fn node_subnets(&self, number: usize) -> anyhow::Result<(Option<Ipv4Net>, Option<Ipv6Net>)> {
        let env = SubnetEnv::parse(&self.read_subnet_env(number)?)?;
        let v4 = env.subnet.map(|n| match n {
            ipnet::IpNet::V4(n) => Ok(n),
            ipnet::IpNet::V6(n) => Err(anyhow::anyhow!("FLANNEL_SUBNET={n} is not IPv4")),
        });
        let v6 = env.ipv6_subnet.map(|n| match n {
            ipnet::IpNet::V6(n) => Ok(n),
            ipnet::IpNet::V4(n) => Err(anyhow::anyhow!("FLANNEL_IPV6_SUBNET={n} is not IPv6")),
        });
        Ok((v4.transpose()?, v6.transpose()?))
    }

    /// Writes a lease `value` under `subnet` (and `ipv6_subnet`) as upstream does: attached
    /// to a fresh etcd lease of `ttl` seconds, or, with `None`, without one (a reservation,
    /// `etcdctl put` with no `--lease`). Returns the full key.
    pub async fn put_lease(
        &self,
        subnet: Ipv4Net,
        ipv6_subnet: Option<Ipv6Net>,
        value: &str,
        ttl: Option<i64>,
    ) -> anyhow::Result<String> {
        let etcd = self.etcd().context("this testbed has no etcd")?;
        let key = self.lease_key(subnet, ipv6_subnet);
        let Some(ttl) = ttl else {
            etcd.put(&key, value).await?;
            return Ok(key);
        };
        let mut client = etcd.client().await?;
        let grant = tokio::time::timeout(ETCD_TIMEOUT, client.lease_grant(ttl, None))
            .await
            .context("etcd lease grant timed out")??;
        let options = PutOptions::new().with_lease(grant.id());
        tokio::time::timeout(ETCD_TIMEOUT, client.put(key.as_str(), value, Some(options)))
            .await
            .context("etcd put timed out")??;
        Ok(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_round_trip() {
        let v4: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let v6: Ipv6Net = "fd00:10:244:3::/64".parse().unwrap();
        assert_eq!(subnet_key(v4, None), "10.244.3.0-24");
        assert_eq!(subnet_key(v4, Some(v6)), "10.244.3.0-24&fd00:10:244:3::-64");
        assert_eq!(
            parse_subnet_key("10.244.3.0-24&fd00:10:244:3::-64").unwrap(),
            (v4, Some(v6))
        );
        assert_eq!(parse_subnet_key("10.244.3.0-24").unwrap(), (v4, None));
        assert!(parse_subnet_key("10.244.3.0").is_err());
    }

    #[test]
    fn upstream_value_and_mac() {
        assert_eq!(
            upstream_vxlan_lease_value(Ipv4Addr::new(198, 18, 0, 3), 1, "c6:d2:32:6f:8f:44"),
            r#"{"PublicIP":"198.18.0.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#
        );
        let mac = random_vtep_mac();
        let first = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!((first & 0x01, first & 0x02), (0, 0x02), "{mac}");
        assert_eq!(mac.len(), 17);
    }
}
