//! From a node to a lease, as upstream's `nodeToLease`: the subnets are the node's pod CIDRs,
//! everything else comes from its flannel annotations. Annotations are written by whoever
//! may patch nodes, so every value is bounded and parsed, never trusted.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use serde_json::Value;

use super::annotations::AnnotationNames;
use crate::config::NetworkConfig;
use crate::metrics::Rejection;
use crate::subnet::lease::MAX_LEASE_VALUE;
use crate::subnet::{Lease, LeaseAttrs};

/// A node's pod CIDRs, one per family at most.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PodCidrs {
    /// The IPv4 pod CIDR.
    pub v4: Option<Ipv4Net>,
    /// The IPv6 pod CIDR.
    pub v6: Option<Ipv6Net>,
}

impl PodCidrs {
    /// Parses `spec.podCIDRs`, or `spec.podCIDR` when the list is empty, as upstream: one or
    /// two entries, classified by family; host bits are cleared as Go's `ParseCIDR` does.
    pub fn parse(pod_cidr: Option<&str>, pod_cidrs: &[String]) -> Result<Self, String> {
        let list: Vec<&str> = if pod_cidrs.is_empty() {
            pod_cidr.filter(|s| !s.is_empty()).into_iter().collect()
        } else {
            pod_cidrs.iter().map(String::as_str).collect()
        };
        if list.len() > 2 {
            return Err("pod cidrs should be IPv4/IPv6 only or dualstack".into());
        }
        let mut out = Self::default();
        for s in list {
            match s.parse::<IpNet>() {
                Ok(IpNet::V4(n)) if out.v4.is_none() => out.v4 = Some(n.trunc()),
                Ok(IpNet::V6(n)) if out.v6.is_none() => out.v6 = Some(n.trunc()),
                Ok(_) => return Err("pod cidrs should be IPv4/IPv6 only or dualstack".into()),
                Err(_) => return Err(format!("invalid pod CIDR {:.64?}", s)),
            }
        }
        Ok(out)
    }

    /// Whether the node has no pod CIDR at all (not assigned yet).
    pub fn is_empty(&self) -> bool {
        self.v4.is_none() && self.v6.is_none()
    }
}

/// Which address families the network uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Families {
    /// `EnableIPv4`.
    pub v4: bool,
    /// `EnableIPv6`.
    pub v6: bool,
}

impl Families {
    /// The families of the network's leases. As upstream, only vxlan, host-gw and
    /// wireguard do IPv6; any other backend gets IPv4 leases whatever the config says.
    pub fn of(config: &NetworkConfig) -> Self {
        if matches!(config.backend_type.as_str(), "vxlan" | "host-gw" | "wireguard") {
            Self {
                v4: config.enable_ipv4,
                v6: config.enable_ipv6,
            }
        } else {
            Self { v4: true, v6: false }
        }
    }
}

fn bad(why: Rejection, detail: String) -> (Rejection, String) {
    (why, detail)
}

/// The value of an annotation, bounded in size.
fn value<'a>(annotations: &'a BTreeMap<String, String>, key: &str) -> Result<Option<&'a str>, (Rejection, String)> {
    match annotations.get(key) {
        Some(v) if v.len() > MAX_LEASE_VALUE => Err(bad(
            Rejection::BadValue,
            format!("annotation {key} is {} bytes, more than {MAX_LEASE_VALUE}", v.len()),
        )),
        v => Ok(v.map(String::as_str)),
    }
}

/// Backend data: raw JSON, `null` or absent meaning none.
fn data(annotations: &BTreeMap<String, String>, key: &str) -> Result<Option<Value>, (Rejection, String)> {
    match value(annotations, key)? {
        None | Some("") => Ok(None),
        Some(raw) => match serde_json::from_str::<Value>(raw) {
            Ok(Value::Null) => Ok(None),
            Ok(v) => Ok(Some(v)),
            Err(e) => Err(bad(Rejection::BadValue, format!("annotation {key} is not JSON: {e}"))),
        },
    }
}

/// A peer's lease from its annotations and pod CIDRs. Each enabled family needs its public
/// address and its pod CIDR, as upstream requires.
pub fn peer_lease(
    names: &AnnotationNames,
    families: Families,
    annotations: &BTreeMap<String, String>,
    cidrs: &PodCidrs,
) -> Result<Lease, (Rejection, String)> {
    let mut lease = Lease {
        subnet: None,
        ipv6_subnet: None,
        attrs: LeaseAttrs {
            public_ip: Ipv4Addr::UNSPECIFIED,
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        },
        expiration: None,
    };
    if families.v4 {
        let raw = value(annotations, &names.public_ip)?.unwrap_or("");
        lease.attrs.public_ip = raw.parse().map_err(|_| {
            bad(
                Rejection::BadValue,
                format!("annotation {} = {raw:.64?} is not an IPv4 address", names.public_ip),
            )
        })?;
        lease.attrs.backend_data = data(annotations, &names.backend_data)?;
        lease.subnet = Some(
            cidrs
                .v4
                .ok_or_else(|| bad(Rejection::BadKey, "missing IPv4 address on n.Spec.PodCIDRs".into()))?,
        );
    }
    if families.v6 {
        let raw = value(annotations, &names.public_ipv6)?.unwrap_or("");
        let ip: Ipv6Addr = raw.parse().map_err(|_| {
            bad(
                Rejection::BadValue,
                format!("annotation {} = {raw:.64?} is not an IPv6 address", names.public_ipv6),
            )
        })?;
        lease.attrs.public_ipv6 = Some(ip);
        lease.attrs.backend_v6_data = data(annotations, &names.backend_v6_data)?;
        lease.ipv6_subnet = Some(
            cidrs
                .v6
                .ok_or_else(|| bad(Rejection::BadKey, "missing IPv6 address on n.Spec.PodCIDRs".into()))?,
        );
    }
    let ty = value(annotations, &names.backend_type)?.unwrap_or("");
    if ty.len() > 32 {
        return Err(bad(
            Rejection::BadValue,
            format!("annotation {} is too long", names.backend_type),
        ));
    }
    lease.attrs.backend_type = ty.to_string();
    Ok(lease)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> AnnotationNames {
        AnnotationNames::new("flannel.alpha.coreos.com").unwrap()
    }

    fn ann(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (format!("flannel.alpha.coreos.com/{k}"), v.to_string()))
            .collect()
    }

    const V4: Families = Families { v4: true, v6: false };

    #[test]
    fn only_dual_stack_backends_get_ipv6() {
        let cfg = |ty: &str| {
            let text = format!(
                r#"{{"Network":"10.244.0.0/16","EnableIPv6":true,"IPv6Network":"fd00:10:244::/56","Backend":{{"Type":"{ty}"}}}}"#
            );
            NetworkConfig::parse(&text).unwrap()
        };
        assert_eq!(Families::of(&cfg("vxlan")), Families { v4: true, v6: true });
        assert_eq!(Families::of(&cfg("host-gw")), Families { v4: true, v6: true });
        assert_eq!(Families::of(&cfg("udp")), V4);
    }

    #[test]
    fn pod_cidrs_parse_as_upstream() {
        let c = PodCidrs::parse(Some("10.244.1.5/24"), &[]).unwrap();
        assert_eq!(c.v4, Some("10.244.1.0/24".parse().unwrap()));
        let two = ["fd00:10:244:1::/64".to_string(), "10.244.1.0/24".to_string()];
        let c = PodCidrs::parse(Some("fd00:10:244:1::/64"), &two).unwrap();
        assert!(c.v4.is_some() && c.v6.is_some());
        let three = [
            "10.0.0.0/24".to_string(),
            "10.0.1.0/24".to_string(),
            "fd00::/64".to_string(),
        ];
        assert!(PodCidrs::parse(None, &three).is_err());
        let same = ["10.0.0.0/24".to_string(), "10.0.1.0/24".to_string()];
        assert!(PodCidrs::parse(None, &same).is_err());
        assert!(PodCidrs::parse(Some("bogus"), &[]).is_err());
        assert!(PodCidrs::parse(Some(""), &[]).unwrap().is_empty());
    }

    #[test]
    fn upstream_vxlan_node_becomes_a_lease() {
        let a = ann(&[
            ("kube-subnet-manager", "true"),
            ("backend-type", "vxlan"),
            ("backend-data", r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#),
            ("public-ip", "192.0.2.21"),
        ]);
        let cidrs = PodCidrs::parse(Some("10.244.3.0/24"), &[]).unwrap();
        let l = peer_lease(&names(), V4, &a, &cidrs).unwrap();
        assert_eq!(l.subnet, Some("10.244.3.0/24".parse().unwrap()));
        assert_eq!(l.attrs.public_ip, Ipv4Addr::new(192, 0, 2, 21));
        assert_eq!(l.attrs.backend_type, "vxlan");
        assert_eq!(l.attrs.backend_data.unwrap()["VtepMAC"], "12:c6:65:89:b4:e3");
        // host-gw writes "null" data.
        let a = ann(&[
            ("backend-type", "host-gw"),
            ("backend-data", "null"),
            ("public-ip", "192.0.2.22"),
        ]);
        assert_eq!(peer_lease(&names(), V4, &a, &cidrs).unwrap().attrs.backend_data, None);
    }

    #[test]
    fn hostile_annotations_are_rejections() {
        let cidrs = PodCidrs::parse(Some("10.244.3.0/24"), &[]).unwrap();
        let cases = [
            (
                ann(&[("backend-data", "{bad json"), ("public-ip", "192.0.2.21")]),
                Rejection::BadValue,
            ),
            (ann(&[("public-ip", "$(reboot)")]), Rejection::BadValue),
            (ann(&[]), Rejection::BadValue),
            (
                ann(&[("public-ip", "192.0.2.21"), ("backend-type", &"x".repeat(40))]),
                Rejection::BadValue,
            ),
            (
                ann(&[
                    ("public-ip", "192.0.2.21"),
                    ("backend-data", &"1".repeat(MAX_LEASE_VALUE + 1)),
                ]),
                Rejection::BadValue,
            ),
        ];
        for (a, why) in cases {
            assert_eq!(peer_lease(&names(), V4, &a, &cidrs).unwrap_err().0, why, "{a:?}");
        }
        let ok = ann(&[("public-ip", "192.0.2.21")]);
        let v6 = Families { v4: true, v6: true };
        assert_eq!(
            peer_lease(&names(), v6, &ok, &cidrs).unwrap_err().0,
            Rejection::BadValue
        );
        assert_eq!(
            peer_lease(&names(), V4, &ok, &PodCidrs::default()).unwrap_err().0,
            Rejection::BadKey
        );
    }
}
