//! Lease values: the JSON upstream stores for each subnet (`lease.LeaseAttrs`).

use std::net::{Ipv4Addr, Ipv6Addr};
use std::time::SystemTime;

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

use super::SubnetKey;
use crate::config::get_ci;

/// The largest lease value accepted from the store. Upstream's own values are
/// about 150 bytes; anything near this is not a flannel lease.
pub const MAX_LEASE_VALUE: usize = 4096;

/// What a node publishes about itself with its subnet.
#[derive(Debug, Clone, PartialEq)]
pub struct LeaseAttrs {
    /// The node's IPv4 underlay address (`"0.0.0.0"` when it has none).
    pub public_ip: Ipv4Addr,
    /// The node's IPv6 underlay address.
    pub public_ipv6: Option<Ipv6Addr>,
    /// The backend that wrote the lease (`"vxlan"`, `"host-gw"`, or empty for udp).
    pub backend_type: String,
    /// Backend-specific data (for vxlan `{"VNI":1,"VtepMAC":"..."}`), kept as JSON.
    pub backend_data: Option<Value>,
    /// Backend-specific data for the IPv6 side.
    pub backend_v6_data: Option<Value>,
}

/// Why a lease value was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LeaseParseError {
    /// The value exceeds [`MAX_LEASE_VALUE`].
    #[error("lease value is {0} bytes, more than the {MAX_LEASE_VALUE} accepted")]
    TooLarge(usize),
    /// The value is not a JSON object.
    #[error("lease value is not a JSON object: {0}")]
    Json(String),
    /// A field has the wrong type or an unparsable address.
    #[error("lease field {field} is invalid: {value}")]
    Field {
        /// The field name, in upstream's spelling.
        field: &'static str,
        /// The value found, truncated.
        value: String,
    },
}

fn bad(field: &'static str, v: &Value) -> LeaseParseError {
    let mut value = v.to_string();
    value.truncate(64);
    LeaseParseError::Field { field, value }
}

impl LeaseAttrs {
    /// Serialises exactly as upstream's Go `json.Marshal` does: field order
    /// `PublicIP, PublicIPv6, BackendType, BackendData, BackendV6Data`, with the
    /// last three omitted when empty.
    pub fn to_json(&self) -> String {
        let mut m = Map::new();
        m.insert("PublicIP".into(), Value::String(self.public_ip.to_string()));
        m.insert(
            "PublicIPv6".into(),
            self.public_ipv6.map_or(Value::Null, |a| Value::String(a.to_string())),
        );
        if !self.backend_type.is_empty() {
            m.insert("BackendType".into(), Value::String(self.backend_type.clone()));
        }
        if let Some(d) = &self.backend_data {
            m.insert("BackendData".into(), d.clone());
        }
        if let Some(d) = &self.backend_v6_data {
            m.insert("BackendV6Data".into(), d.clone());
        }
        Value::Object(m).to_string()
    }

    /// Parses a value read from the store. Keys match case-insensitively, as in
    /// Go; the value is bounded in size and every address is checked.
    pub fn from_json(bytes: &[u8]) -> Result<Self, LeaseParseError> {
        if bytes.len() > MAX_LEASE_VALUE {
            return Err(LeaseParseError::TooLarge(bytes.len()));
        }
        let doc: Value = serde_json::from_slice(bytes).map_err(|e| LeaseParseError::Json(e.to_string()))?;
        let Value::Object(obj) = doc else {
            return Err(LeaseParseError::Json("not an object".into()));
        };
        let public_ip = match get_ci(&obj, "PublicIP") {
            None | Some(Value::Null) => Ipv4Addr::UNSPECIFIED,
            Some(v @ Value::String(s)) => s.parse().map_err(|_| bad("PublicIP", v))?,
            Some(v) => return Err(bad("PublicIP", v)),
        };
        let public_ipv6 = match get_ci(&obj, "PublicIPv6") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s.is_empty() => None,
            Some(v @ Value::String(s)) => Some(s.parse().map_err(|_| bad("PublicIPv6", v))?),
            Some(v) => return Err(bad("PublicIPv6", v)),
        };
        let backend_type = match get_ci(&obj, "BackendType") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) if s.len() <= 32 => s.clone(),
            Some(v) => return Err(bad("BackendType", v)),
        };
        let data = |name| match get_ci(&obj, name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v.clone()),
        };
        Ok(Self {
            public_ip,
            public_ipv6,
            backend_type,
            backend_data: data("BackendData"),
            backend_v6_data: data("BackendV6Data"),
        })
    }
}

/// A subnet lease: the subnet(s) of one node and what it published with them.
#[derive(Debug, Clone, PartialEq)]
pub struct Lease {
    /// The node's IPv4 subnet.
    pub subnet: Option<Ipv4Net>,
    /// The node's IPv6 subnet.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// The published attributes.
    pub attrs: LeaseAttrs,
    /// When the lease runs out; `None` for a reservation, which never does.
    pub expiration: Option<SystemTime>,
}

impl Lease {
    /// The store key of this lease, when it has an IPv4 subnet.
    pub fn key(&self) -> Option<SubnetKey> {
        self.subnet.map(|v4| SubnetKey {
            v4,
            v6: self.ipv6_subnet,
        })
    }

    /// A human-readable name for logs: the subnets.
    pub fn describe(&self) -> String {
        match (self.subnet, self.ipv6_subnet) {
            (Some(a), Some(b)) => format!("{a}+{b}"),
            (Some(a), None) => a.to_string(),
            (None, Some(b)) => b.to_string(),
            (None, None) => "-".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_test_vector() {
        let a = LeaseAttrs {
            public_ip: "1.2.3.4".parse().unwrap(),
            public_ipv6: None,
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
        };
        assert_eq!(a.to_json(), r#"{"PublicIP":"1.2.3.4","PublicIPv6":null}"#);
    }

    #[test]
    fn upstream_vxlan_lease_round_trips_byte_for_byte() {
        let s = r#"{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}"#;
        let a = LeaseAttrs::from_json(s.as_bytes()).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(192, 168, 64, 3));
        assert_eq!(a.backend_type, "vxlan");
        assert_eq!(a.backend_data.as_ref().unwrap()["VtepMAC"], "c6:d2:32:6f:8f:44");
        assert_eq!(a.to_json(), s);
        let d = r#"{"PublicIP":"10.0.0.1","PublicIPv6":"fd00::1","BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:ff"},"BackendV6Data":{"VNI":1,"VtepMAC":"aa:bb:cc:dd:ee:00"}}"#;
        assert_eq!(LeaseAttrs::from_json(d.as_bytes()).unwrap().to_json(), d);
    }

    #[test]
    fn keys_are_case_insensitive() {
        let a = LeaseAttrs::from_json(br#"{"publicip":"10.1.1.1","backendtype":"host-gw"}"#).unwrap();
        assert_eq!(a.public_ip, Ipv4Addr::new(10, 1, 1, 1));
        assert_eq!(a.backend_type, "host-gw");
    }

    #[test]
    fn hostile_values_are_errors_not_panics() {
        let big = format!(r#"{{"PublicIP":"10.1.1.1","BackendData":"{}"}}"#, "x".repeat(1 << 20));
        assert!(matches!(
            LeaseAttrs::from_json(big.as_bytes()),
            Err(LeaseParseError::TooLarge(_))
        ));
        for v in [
            &b"not json"[..],
            b"[]",
            b"null",
            br#"{"PublicIP":"$(reboot)"}"#,
            br#"{"PublicIP":7}"#,
            br#"{"PublicIP":"1.2.3.4","PublicIPv6":"nope"}"#,
            br#"{"PublicIP":"1.2.3.4","BackendType":{"a":1}}"#,
            b"\xff\xfe",
        ] {
            assert!(LeaseAttrs::from_json(v).is_err(), "{v:?}");
        }
    }
}
