//! The node annotations flannel reads and writes, named from `--kube-annotation-prefix`
//! exactly as upstream's `newAnnotations` names them, and the rules for which of them this
//! node writes (upstream's `AcquireLease`), so nodes annotated by upstream flanneld and by
//! flannel-rs read each other.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, Ipv6Addr};

use regex::Regex;
use serde_json::Value;

use super::KubeError;
use crate::subnet::LeaseAttrs;

/// The value of the managed annotation on nodes whose lease flannel manages.
pub const MANAGED: &str = "true";

/// The full annotation keys for one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnnotationNames {
    /// The normalised prefix (`flannel.alpha.coreos.com/`); every key starts with it.
    pub prefix: String,
    /// `kube-subnet-manager`: `"true"` on nodes that are peers.
    pub subnet_kube_managed: String,
    /// `backend-type`: the lease's backend type.
    pub backend_type: String,
    /// `backend-data`: the IPv4 backend data, raw JSON.
    pub backend_data: String,
    /// `backend-v6-data`: the IPv6 backend data, raw JSON.
    pub backend_v6_data: String,
    /// `public-ip`: the node's IPv4 underlay address, as peers use it.
    pub public_ip: String,
    /// `public-ipv6`: the node's IPv6 underlay address.
    pub public_ipv6: String,
    /// `public-ip-overwrite`: set by an operator, replaces what `public-ip` says.
    pub public_ip_overwrite: String,
    /// `public-ipv6-overwrite`: the IPv6 twin.
    pub public_ipv6_overwrite: String,
    /// `node-public-ip`: set by an operator, replaces `--public-ip` at start-up.
    pub node_public_ip: String,
    /// `node-public-ipv6`: the IPv6 twin.
    pub node_public_ipv6: String,
}

impl AnnotationNames {
    /// Normalises `prefix` as upstream does: no slash gets one appended, a prefix with a path
    /// part not ending in `/` or `-` gets a `-`; the result must look like `fqdn/[name-]`.
    pub fn new(prefix: &str) -> Result<Self, KubeError> {
        let mut p = prefix.to_string();
        match p.matches('/').count() {
            0 => p.push('/'),
            1 => {}
            _ => {
                return Err(KubeError::Prefix(
                    "subnet/kube: prefix can contain at most single slash",
                ))
            }
        }
        if !p.ends_with('/') && !p.ends_with('-') {
            p.push('-');
        }
        // Unanchored at the start, like upstream's `regexp.MatchString`.
        let re = Regex::new(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$").expect("a valid regex");
        if !re.is_match(&p) {
            return Err(KubeError::Prefix(
                "subnet/kube: prefix must be in a format: fqdn/[0-9a-z-_]*",
            ));
        }
        let k = |s: &str| format!("{p}{s}");
        Ok(Self {
            subnet_kube_managed: k("kube-subnet-manager"),
            backend_type: k("backend-type"),
            backend_data: k("backend-data"),
            backend_v6_data: k("backend-v6-data"),
            public_ip: k("public-ip"),
            public_ipv6: k("public-ipv6"),
            public_ip_overwrite: k("public-ip-overwrite"),
            public_ipv6_overwrite: k("public-ipv6-overwrite"),
            node_public_ip: k("node-public-ip"),
            node_public_ipv6: k("node-public-ipv6"),
            prefix: p,
        })
    }

    /// Whether the node's annotations mark it as managed by flannel (a peer).
    pub fn is_managed(&self, annotations: &BTreeMap<String, String>) -> bool {
        annotations.get(&self.subnet_kube_managed).map(String::as_str) == Some(MANAGED)
    }
}

/// Backend data as upstream writes it: Go's `json.RawMessage.MarshalJSON`, so `null` when
/// there is none.
pub fn backend_data_json(data: Option<&Value>) -> String {
    data.map_or_else(|| "null".to_string(), Value::to_string)
}

/// The annotations this node must carry for its lease, given what it carries now; returns
/// only those whose value differs (empty: nothing to write). Follows upstream's rules:
/// - `backend-type` and `kube-subnet-manager: "true"` always;
/// - `backend-data` and `public-ip` for vxlan or wireguard with IPv4 data, and for every
///   other type (whose data may be `null`);
/// - `backend-v6-data` and `public-ipv6` for vxlan with IPv6 data, and for wireguard,
///   host-gw and extension when there is a public IPv6;
/// - a non-empty `public-ip(v6)-overwrite` annotation is what `public-ip(v6)` says.
pub fn wanted(
    names: &AnnotationNames,
    attrs: &LeaseAttrs,
    current: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let ty = attrs.backend_type.as_str();
    let bd = backend_data_json(attrs.backend_data.as_ref());
    let v6bd = backend_data_json(attrs.backend_v6_data.as_ref());
    let overwrite = |key: &str| current.get(key).filter(|v| !v.is_empty()).cloned();
    let mut want = BTreeMap::new();
    want.insert(names.backend_type.clone(), ty.to_string());
    // Upstream's condition, `(vxlan || wireguard) && data != null || type != vxlan`, comes
    // down to: everything but vxlan without IPv4 data (an IPv6-only vxlan node).
    let v4 = ty != "vxlan" || bd != "null";
    if v4 {
        want.insert(names.backend_data.clone(), bd);
        // Upstream writes Go's "<nil>" when there is no IPv4 address (IPv6-only host-gw);
        // nothing at all is the honest equivalent.
        let ip = overwrite(&names.public_ip_overwrite)
            .or_else(|| (!attrs.public_ip.is_unspecified()).then(|| attrs.public_ip.to_string()));
        if let Some(ip) = ip {
            want.insert(names.public_ip.clone(), ip);
        }
    }
    let has_v6 = attrs.public_ipv6.is_some();
    let v6 = match ty {
        "vxlan" => v6bd != "null",
        "wireguard" => v6bd != "null" && has_v6,
        "host-gw" | "extension" => has_v6,
        _ => false,
    };
    if v6 {
        want.insert(names.backend_v6_data.clone(), v6bd);
        let ip = overwrite(&names.public_ipv6_overwrite).or_else(|| attrs.public_ipv6.map(|a| a.to_string()));
        if let Some(ip) = ip {
            want.insert(names.public_ipv6.clone(), ip);
        }
    }
    want.insert(names.subnet_kube_managed.clone(), MANAGED.to_string());
    want.retain(|k, v| current.get(k) != Some(v));
    want
}

/// Reads what this node stored: its backend data (the VTEP MACs) and the operator's
/// `node-public-ip(v6)`. Unparsable values are ignored, with the reason.
pub fn stored(
    names: &AnnotationNames,
    annotations: &BTreeMap<String, String>,
) -> (crate::subnet::StoredNode, Vec<String>) {
    let mut problems = Vec::new();
    let mut data = |key: &str| {
        let raw = annotations.get(key)?;
        match serde_json::from_str::<Value>(raw) {
            Ok(Value::Null) => None,
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(format!("{key}: {e}"));
                None
            }
        }
    };
    let backend_data = data(&names.backend_data);
    let backend_v6_data = data(&names.backend_v6_data);
    let ip = |key: &str| -> Option<String> { annotations.get(key).filter(|v| !v.is_empty()).cloned() };
    let public_ip = ip(&names.node_public_ip);
    let public_ipv6 = ip(&names.node_public_ipv6);
    let public_ip = public_ip.and_then(|s| match s.parse::<Ipv4Addr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!("{}: {s:?} is not an IPv4 address", names.node_public_ip));
            None
        }
    });
    let public_ipv6 = public_ipv6.and_then(|s| match s.parse::<Ipv6Addr>() {
        Ok(a) => Some(a),
        Err(_) => {
            problems.push(format!("{}: {s:?} is not an IPv6 address", names.node_public_ipv6));
            None
        }
    });
    let node = crate::subnet::StoredNode {
        backend_data,
        backend_v6_data,
        public_ip,
        public_ipv6,
    };
    (node, problems)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn prefixes_normalise_as_upstream() {
        let ok = [
            ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
            (
                "flannel.alpha.coreos.com/prefix",
                "flannel.alpha.coreos.com/prefix-backend-type",
            ),
            ("org.com/9", "org.com/9-backend-type"),
            ("example.com/foo-", "example.com/foo-backend-type"),
        ];
        for (p, key) in ok {
            assert_eq!(AnnotationNames::new(p).unwrap().backend_type, key, "{p}");
        }
        for p in ["org", "org/", "org/prefix", "org.COM", "org.com/PREFIX", "a.b/c/d"] {
            assert!(AnnotationNames::new(p).is_err(), "{p}");
        }
    }

    fn attrs(ty: &str, data: Option<Value>, v6: Option<Value>) -> LeaseAttrs {
        LeaseAttrs {
            public_ip: "192.0.2.10".parse().unwrap(),
            public_ipv6: v6.as_ref().map(|_| "2001:db8::10".parse().unwrap()),
            backend_type: ty.into(),
            backend_data: data,
            backend_v6_data: v6,
        }
    }

    #[test]
    fn vxlan_writes_upstreams_keys_and_values_once() {
        let n = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        let a = attrs("vxlan", Some(json!({"VNI": 1, "VtepMAC": "12:c6:65:89:b4:e3"})), None);
        let w = wanted(&n, &a, &BTreeMap::new());
        let expect: BTreeMap<String, String> = [
            (
                "flannel.alpha.coreos.com/backend-data",
                r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#,
            ),
            ("flannel.alpha.coreos.com/backend-type", "vxlan"),
            ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
            ("flannel.alpha.coreos.com/public-ip", "192.0.2.10"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        assert_eq!(w, expect);
        // Written already: nothing to patch.
        assert!(wanted(&n, &a, &expect).is_empty());
    }

    #[test]
    fn host_gw_writes_null_data_and_overwrite_wins() {
        let n = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        let a = attrs("host-gw", None, None);
        let mut cur = BTreeMap::new();
        cur.insert(n.public_ip_overwrite.clone(), "203.0.113.7".to_string());
        let w = wanted(&n, &a, &cur);
        assert_eq!(w[&n.backend_data], "null");
        assert_eq!(w[&n.public_ip], "203.0.113.7");
        assert!(!w.contains_key(&n.backend_v6_data));
    }

    #[test]
    fn dual_stack_vxlan_writes_both_families() {
        let n = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        let d = json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"});
        let a = attrs("vxlan", Some(d.clone()), Some(d));
        let w = wanted(&n, &a, &BTreeMap::new());
        assert_eq!(w[&n.public_ipv6], "2001:db8::10");
        assert_eq!(w[&n.backend_v6_data], r#"{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"}"#);
        // IPv6-only vxlan: no IPv4 data, so neither backend-data nor public-ip.
        let a = attrs("vxlan", None, Some(json!({"VNI": 1, "VtepMAC": "aa:bb:cc:dd:ee:ff"})));
        let w = wanted(&n, &a, &BTreeMap::new());
        assert!(!w.contains_key(&n.backend_data) && !w.contains_key(&n.public_ip));
    }

    #[test]
    fn stored_macs_and_public_ips_are_read_and_junk_is_reported() {
        let n = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        let mut a = BTreeMap::new();
        a.insert(
            n.backend_data.clone(),
            r#"{"VNI":1,"VtepMAC":"12:c6:65:89:b4:e3"}"#.to_string(),
        );
        a.insert(n.backend_v6_data.clone(), "{not json".to_string());
        a.insert(n.node_public_ip.clone(), "198.51.100.4".to_string());
        a.insert(n.node_public_ipv6.clone(), "nope".to_string());
        let (s, problems) = stored(&n, &a);
        assert_eq!(s.vtep_mac(), Some("12:c6:65:89:b4:e3"));
        assert_eq!(s.vtep_v6_mac(), None);
        assert_eq!(s.public_ip, Some("198.51.100.4".parse().unwrap()));
        assert_eq!(s.public_ipv6, None);
        assert_eq!(problems.len(), 2);
    }
}
