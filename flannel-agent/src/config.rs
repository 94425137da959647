//! The network configuration (`net-conf.json`, or `<prefix>/config` in etcd).
//!
//! Parsed the way upstream's Go `encoding/json` does it: keys match
//! case-insensitively, unknown keys are ignored, `EnableIPv4` defaults to true and
//! `Backend` is kept as raw JSON for the backend to read. [`NetworkConfig::check`]
//! then applies upstream's `CheckNetworkConfig` (etcd mode only) and fills in the
//! derived defaults: `SubnetLen`, `SubnetMin`, `SubnetMax` and their IPv6 twins.

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::{Ipv4Net, Ipv6Net};
use serde_json::{Map, Value};

/// A network config that could not be used. Each variant names the field, the
/// value found and what would have been accepted, so one line tells an operator
/// what to fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// The document is not a JSON object.
    #[error("network config is not valid JSON: {0}; expected an object such as {{\"Network\":\"10.244.0.0/16\",\"Backend\":{{\"Type\":\"vxlan\"}}}}")]
    Json(String),
    /// A field has the wrong JSON type or cannot be parsed.
    #[error("network config field {field} = {value}: {expected}")]
    Field {
        /// The field, in upstream's spelling.
        field: &'static str,
        /// The value as found in the document.
        value: String,
        /// What the field accepts.
        expected: String,
    },
    /// A rule of upstream's `CheckNetworkConfig` failed.
    #[error("network config field {field} = {value}: {rule}")]
    Rule {
        /// The field, in upstream's spelling.
        field: &'static str,
        /// The offending value.
        value: String,
        /// The rule it breaks, worded as upstream words it where upstream has words.
        rule: String,
    },
    /// Neither address family is enabled.
    #[error("network config enables neither IPv4 nor IPv6 (none defined stack): set EnableIPv4 or EnableIPv6 to true")]
    NoFamily,
}

fn field_err(field: &'static str, value: &Value, expected: &str) -> ConfigError {
    ConfigError::Field {
        field,
        value: value.to_string(),
        expected: expected.to_string(),
    }
}

fn rule_err(field: &'static str, value: impl ToString, rule: impl Into<String>) -> ConfigError {
    ConfigError::Rule {
        field,
        value: value.to_string(),
        rule: rule.into(),
    }
}

/// The validated network configuration shared by all nodes.
#[derive(Debug, Clone, PartialEq)]
pub struct NetworkConfig {
    /// Whether IPv4 pod networking is on (`EnableIPv4`, default true).
    pub enable_ipv4: bool,
    /// Whether IPv6 pod networking is on (`EnableIPv6`).
    pub enable_ipv6: bool,
    /// Use nftables rather than iptables for masquerade and forward rules.
    pub enable_nftables: bool,
    /// The IPv4 cluster network (`Network`), host bits masked.
    pub network: Option<Ipv4Net>,
    /// The per-node IPv4 prefix length (`SubnetLen`); 0 until [`Self::check`] derives it.
    pub subnet_len: u8,
    /// The lowest IPv4 subnet that may be leased (`SubnetMin`).
    pub subnet_min: Option<Ipv4Addr>,
    /// The highest IPv4 subnet that may be leased (`SubnetMax`).
    pub subnet_max: Option<Ipv4Addr>,
    /// The IPv6 cluster network (`IPv6Network`), host bits masked.
    pub ipv6_network: Option<Ipv6Net>,
    /// The per-node IPv6 prefix length (`IPv6SubnetLen`).
    pub ipv6_subnet_len: u8,
    /// The lowest IPv6 subnet that may be leased (`IPv6SubnetMin`).
    pub ipv6_subnet_min: Option<Ipv6Addr>,
    /// The highest IPv6 subnet that may be leased (`IPv6SubnetMax`).
    pub ipv6_subnet_max: Option<Ipv6Addr>,
    /// `Backend.Type`, lower-cased; `"udp"` when `Backend` is absent (upstream's default).
    pub backend_type: String,
    /// The raw `Backend` object, for the backend to read its own options.
    pub backend: Value,
}

/// Looks a key up the way Go's `encoding/json` does: an exact match first, then
/// any case-insensitive match; the last matching key in the document wins.
pub fn get_ci<'a>(obj: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    if let Some(v) = obj.get(name) {
        return Some(v);
    }
    obj.iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
        .next_back()
}

fn get_bool(obj: &Map<String, Value>, name: &'static str, default: bool) -> Result<bool, ConfigError> {
    match get_ci(obj, name) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(field_err(name, v, "expected true or false")),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, name: &'static str) -> Result<Option<&'a str>, ConfigError> {
    match get_ci(obj, name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if s.is_empty() => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(field_err(name, v, "expected a string")),
    }
}

fn get_len(obj: &Map<String, Value>, name: &'static str, max: u8) -> Result<u8, ConfigError> {
    match get_ci(obj, name) {
        None | Some(Value::Null) => Ok(0),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= u64::from(max))
            .map(|n| n as u8)
            .ok_or_else(|| field_err(name, v, &format!("expected a whole number from 0 to {max}"))),
    }
}

impl NetworkConfig {
    /// Parses a config document without applying `CheckNetworkConfig`; this is
    /// all the kube subnet manager does upstream.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let doc: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let Value::Object(obj) = doc else {
            return Err(ConfigError::Json(format!("found {}", type_name(&doc))));
        };

        let network = match get_str(&obj, "Network")? {
            None => None,
            Some(s) => Some(
                s.parse::<Ipv4Net>()
                    .map_err(|_| rule_err("Network", s, "invalid IPv4 CIDR format; expected e.g. 10.244.0.0/16"))?
                    .trunc(),
            ),
        };
        let ipv6_network = match get_str(&obj, "IPv6Network")? {
            None => None,
            Some(s) => Some(
                s.parse::<Ipv6Net>()
                    .map_err(|_| {
                        rule_err(
                            "IPv6Network",
                            s,
                            "invalid IPv6 CIDR format; expected e.g. fd00:10:244::/56",
                        )
                    })?
                    .trunc(),
            ),
        };
        let v4_addr = |name: &'static str| -> Result<Option<Ipv4Addr>, ConfigError> {
            get_str(&obj, name)?
                .map(|s| s.parse().map_err(|_| rule_err(name, s, "invalid IPv4 address format")))
                .transpose()
        };
        let v6_addr = |name: &'static str| -> Result<Option<Ipv6Addr>, ConfigError> {
            get_str(&obj, name)?
                .map(|s| s.parse().map_err(|_| rule_err(name, s, "invalid IPv6 address format")))
                .transpose()
        };

        let (backend_type, backend) = match get_ci(&obj, "Backend") {
            None | Some(Value::Null) => ("udp".to_string(), Value::Object(Map::new())),
            Some(Value::Object(b)) if b.is_empty() => ("udp".to_string(), Value::Object(Map::new())),
            Some(Value::Object(b)) => {
                let ty = match get_ci(b, "Type") {
                    None | Some(Value::Null) => String::new(),
                    Some(Value::String(s)) => s.to_ascii_lowercase(),
                    Some(v) => return Err(field_err("Backend.Type", v, "expected a string such as \"vxlan\"")),
                };
                (ty, Value::Object(b.clone()))
            }
            Some(v) => {
                return Err(field_err(
                    "Backend",
                    v,
                    "error decoding Backend property of config: expected an object",
                ))
            }
        };

        Ok(Self {
            enable_ipv4: get_bool(&obj, "EnableIPv4", true)?,
            enable_ipv6: get_bool(&obj, "EnableIPv6", false)?,
            enable_nftables: get_bool(&obj, "EnableNFTables", false)?,
            // 0.0.0.0/0 counts as "no network", as in upstream.
            network: network.filter(|n| n.prefix_len() != 0 || !n.addr().is_unspecified()),
            subnet_len: get_len(&obj, "SubnetLen", 32)?,
            subnet_min: v4_addr("SubnetMin")?.filter(|a| !a.is_unspecified()),
            subnet_max: v4_addr("SubnetMax")?.filter(|a| !a.is_unspecified()),
            ipv6_network: ipv6_network.filter(|n| n.prefix_len() != 0 || !n.addr().is_unspecified()),
            ipv6_subnet_len: get_len(&obj, "IPv6SubnetLen", 128)?,
            ipv6_subnet_min: v6_addr("IPv6SubnetMin")?.filter(|a| !a.is_unspecified()),
            ipv6_subnet_max: v6_addr("IPv6SubnetMax")?.filter(|a| !a.is_unspecified()),
            backend_type,
            backend,
        })
    }

    /// Parses and checks a config as etcd mode does (`CheckNetworkConfig`).
    pub fn parse_and_check(text: &str) -> Result<Self, ConfigError> {
        let mut cfg = Self::parse(text)?;
        cfg.check()?;
        Ok(cfg)
    }

    /// Applies upstream's `CheckNetworkConfig`: validates the subnet range and
    /// derives `SubnetLen`, `SubnetMin` and `SubnetMax` (and the IPv6 twins).
    pub fn check(&mut self) -> Result<(), ConfigError> {
        if !self.enable_ipv4 && !self.enable_ipv6 {
            return Err(ConfigError::NoFamily);
        }
        if self.backend_type.is_empty() {
            return Err(rule_err(
                "Backend.Type",
                "\"\"",
                "unknown backend type: the Backend object needs a Type such as \"vxlan\", \"host-gw\" or \"udp\"",
            ));
        }
        if self.enable_ipv4 {
            self.check_v4()?;
        }
        if self.enable_ipv6 {
            self.check_v6()?;
        }
        Ok(())
    }

    fn check_v4(&mut self) -> Result<(), ConfigError> {
        let net = self.network.ok_or_else(|| {
            rule_err(
                "Network",
                "\"\"",
                "please define a correct Network parameter in the flannel config (an IPv4 CIDR)",
            )
        })?;
        let plen = net.prefix_len();
        if self.subnet_len > 0 {
            if self.subnet_len > 30 {
                return Err(rule_err(
                    "SubnetLen",
                    self.subnet_len,
                    "SubnetLen must be less than /31",
                ));
            }
            if self.subnet_len < plen + 2 {
                return Err(rule_err(
                    "SubnetLen",
                    self.subnet_len,
                    format!(
                        "network must be able to accommodate at least four subnets: use {} or more for Network {net}",
                        plen + 2
                    ),
                ));
            }
        } else if plen > 28 {
            return Err(rule_err(
                "Network",
                net,
                "network is too small. Minimum useful network prefix is /28",
            ));
        } else if plen <= 22 {
            self.subnet_len = 24;
        } else {
            self.subnet_len = plen + 2;
        }
        let size = 1u64 << (32 - self.subnet_len);
        let first = u32::from(net.network());
        let last = u32::from(net.broadcast());
        let min = match self.subnet_min {
            None => Ipv4Addr::from((u64::from(first) + size) as u32),
            Some(m) if !net.contains(&m) => {
                return Err(rule_err(
                    "SubnetMin",
                    m,
                    format!("SubnetMin is not in the range of the Network {net}"),
                ))
            }
            Some(m) => m,
        };
        let max = match self.subnet_max {
            None => Ipv4Addr::from(((u64::from(last) + 1) - size) as u32),
            Some(m) if !net.contains(&m) => {
                return Err(rule_err(
                    "SubnetMax",
                    m,
                    format!("SubnetMax is not in the range of the Network {net}"),
                ))
            }
            Some(m) => m,
        };
        let mask = !((size - 1) as u32);
        if u32::from(min) & mask != u32::from(min) {
            return Err(rule_err(
                "SubnetMin",
                min,
                format!("SubnetMin is not on a SubnetLen boundary: /{}", self.subnet_len),
            ));
        }
        if u32::from(max) & mask != u32::from(max) {
            return Err(rule_err(
                "SubnetMax",
                max,
                format!("SubnetMax is not on a SubnetLen boundary: /{}", self.subnet_len),
            ));
        }
        // Upstream does not check this; an inverted range only ever gives "out of
        // subnets" at allocation time, which is a worse place to find out.
        if u32::from(min) > u32::from(max) {
            return Err(rule_err(
                "SubnetMin",
                min,
                format!("SubnetMin must not be above SubnetMax ({max})"),
            ));
        }
        self.subnet_min = Some(min);
        self.subnet_max = Some(max);
        Ok(())
    }

    fn check_v6(&mut self) -> Result<(), ConfigError> {
        let net = self.ipv6_network.ok_or_else(|| {
            rule_err(
                "IPv6Network",
                "\"\"",
                "please define a correct IPv6Network parameter in the flannel config (an IPv6 CIDR)",
            )
        })?;
        let plen = net.prefix_len();
        if self.ipv6_subnet_len > 0 {
            if self.ipv6_subnet_len > 126 {
                return Err(rule_err(
                    "IPv6SubnetLen",
                    self.ipv6_subnet_len,
                    "SubnetLen must be less than /127",
                ));
            }
            if self.ipv6_subnet_len < plen + 2 {
                return Err(rule_err(
                    "IPv6SubnetLen",
                    self.ipv6_subnet_len,
                    format!("network must be able to accommodate at least four subnets: use {} or more for IPv6Network {net}", plen + 2),
                ));
            }
        } else if plen > 124 {
            return Err(rule_err(
                "IPv6Network",
                net,
                "IPv6Network is too small. Minimum useful network prefix is /124",
            ));
        } else if plen <= 62 {
            self.ipv6_subnet_len = 64;
        } else {
            self.ipv6_subnet_len = plen + 2;
        }
        let size = 1u128 << (128 - self.ipv6_subnet_len);
        let first = u128::from(net.network());
        let last = u128::from(net.broadcast());
        let min = match self.ipv6_subnet_min {
            None => Ipv6Addr::from(first + size),
            Some(m) if !net.contains(&m) => {
                return Err(rule_err(
                    "IPv6SubnetMin",
                    m,
                    format!("IPv6SubnetMin is not in the range of the IPv6Network {net}"),
                ))
            }
            Some(m) => m,
        };
        let max = match self.ipv6_subnet_max {
            None => Ipv6Addr::from(last - (size - 1)),
            Some(m) if !net.contains(&m) => {
                return Err(rule_err(
                    "IPv6SubnetMax",
                    m,
                    format!("IPv6SubnetMax is not in the range of the IPv6Network {net}"),
                ))
            }
            Some(m) => m,
        };
        let mask = !(size - 1);
        if u128::from(min) & mask != u128::from(min) {
            return Err(rule_err(
                "IPv6SubnetMin",
                min,
                format!(
                    "IPv6SubnetMin is not on a SubnetLen boundary: /{}",
                    self.ipv6_subnet_len
                ),
            ));
        }
        if u128::from(max) & mask != u128::from(max) {
            return Err(rule_err(
                "IPv6SubnetMax",
                max,
                format!(
                    "IPv6SubnetMax is not on a SubnetLen boundary: /{}",
                    self.ipv6_subnet_len
                ),
            ));
        }
        if u128::from(min) > u128::from(max) {
            return Err(rule_err(
                "IPv6SubnetMin",
                min,
                format!("IPv6SubnetMin must not be above IPv6SubnetMax ({max})"),
            ));
        }
        self.ipv6_subnet_min = Some(min);
        self.ipv6_subnet_max = Some(max);
        Ok(())
    }

    /// Whether `sn` is a subnet this config would hand out: inside
    /// `SubnetMin..=SubnetMax` with exactly `SubnetLen` (upstream's
    /// `isSubnetConfigCompat`). Only meaningful after [`Self::check`].
    pub fn v4_compatible(&self, sn: &Ipv4Net) -> bool {
        match (self.subnet_min, self.subnet_max) {
            (Some(min), Some(max)) => sn.prefix_len() == self.subnet_len && sn.network() >= min && sn.network() <= max,
            _ => false,
        }
    }

    /// The IPv6 twin of [`Self::v4_compatible`].
    pub fn v6_compatible(&self, sn: &Ipv6Net) -> bool {
        match (self.ipv6_subnet_min, self.ipv6_subnet_max) {
            (Some(min), Some(max)) => {
                sn.prefix_len() == self.ipv6_subnet_len && sn.network() >= min && sn.network() <= max
            }
            _ => false,
        }
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<NetworkConfig, ConfigError> {
        NetworkConfig::parse_and_check(text)
    }

    fn rule_field(e: ConfigError) -> &'static str {
        match e {
            ConfigError::Rule { field, .. } | ConfigError::Field { field, .. } => field,
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn derives_defaults_for_a_slash_16() {
        let c = check(r#"{"Network":"10.3.0.0/16","Backend":{"Type":"vxlan"}}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        assert_eq!(c.subnet_min, Some("10.3.1.0".parse().unwrap()));
        assert_eq!(c.subnet_max, Some("10.3.255.0".parse().unwrap()));
        assert_eq!(c.backend_type, "vxlan");
        assert!(c.enable_ipv4 && !c.enable_ipv6 && !c.enable_nftables);
    }

    #[test]
    fn keys_are_case_insensitive_and_unknown_keys_ignored() {
        let c =
            check(r#"{"network":"10.3.0.0/16","SUBNETLEN":20,"whatever":[1,2],"backend":{"type":"VXLAN","vni":2}}"#)
                .unwrap();
        assert_eq!(c.network, Some("10.3.0.0/16".parse().unwrap()));
        assert_eq!(c.subnet_len, 20);
        assert_eq!(c.subnet_min, Some("10.3.16.0".parse().unwrap()));
        assert_eq!(c.subnet_max, Some("10.3.240.0".parse().unwrap()));
        assert_eq!(c.backend_type, "vxlan");
        assert_eq!(c.backend["vni"], 2);
    }

    #[test]
    fn host_bits_are_masked() {
        let c = check(r#"{"Network":"10.3.7.9/16"}"#).unwrap();
        assert_eq!(c.network, Some("10.3.0.0/16".parse().unwrap()));
    }

    #[test]
    fn backend_absent_means_udp_and_type_missing_is_an_error() {
        assert_eq!(check(r#"{"Network":"10.3.0.0/16"}"#).unwrap().backend_type, "udp");
        assert_eq!(
            check(r#"{"Network":"10.3.0.0/16","Backend":{}}"#).unwrap().backend_type,
            "udp"
        );
        let e = check(r#"{"Network":"10.3.0.0/16","Backend":{"Port":1}}"#).unwrap_err();
        assert_eq!(rule_field(e), "Backend.Type");
        let e = check(r#"{"Network":"10.3.0.0/16","Backend":"vxlan"}"#).unwrap_err();
        assert_eq!(rule_field(e), "Backend");
    }

    #[test]
    fn small_networks_derive_plus_two() {
        let c = check(r#"{"Network":"10.3.0.0/26"}"#).unwrap();
        assert_eq!(c.subnet_len, 28);
        assert_eq!(c.subnet_min, Some("10.3.0.16".parse().unwrap()));
        assert_eq!(c.subnet_max, Some("10.3.0.48".parse().unwrap()));
        let c = check(r#"{"Network":"10.3.0.0/22"}"#).unwrap();
        assert_eq!(c.subnet_len, 24);
        let c = check(r#"{"Network":"10.3.0.0/23"}"#).unwrap();
        assert_eq!(c.subnet_len, 25);
    }

    #[test]
    fn every_v4_rule() {
        let cases: &[(&str, &str, &str)] = &[
            (r#"{}"#, "Network", "please define a correct Network"),
            (r#"{"Network":"0.0.0.0/0"}"#, "Network", "please define"),
            (r#"{"Network":"fd00::/48"}"#, "Network", "invalid IPv4 CIDR"),
            (
                r#"{"Network":"10.0.0.0/29"}"#,
                "Network",
                "Minimum useful network prefix is /28",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":31}"#,
                "SubnetLen",
                "less than /31",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":17}"#,
                "SubnetLen",
                "at least four subnets",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetLen":"24"}"#,
                "SubnetLen",
                "whole number",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.1.0.0"}"#,
                "SubnetMin",
                "not in the range",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMax":"11.0.0.0"}"#,
                "SubnetMax",
                "not in the range",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.1.1"}"#,
                "SubnetMin",
                "SubnetLen boundary",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMax":"10.0.9.128"}"#,
                "SubnetMax",
                "SubnetLen boundary",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"bogus"}"#,
                "SubnetMin",
                "invalid IPv4 address",
            ),
            (
                r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.9.0","SubnetMax":"10.0.3.0"}"#,
                "SubnetMin",
                "above",
            ),
            (
                r#"{"Network":"10.0.0.0/16","EnableIPv4":"yes"}"#,
                "EnableIPv4",
                "true or false",
            ),
        ];
        for (text, field, words) in cases {
            let e = check(text).unwrap_err();
            let line = e.to_string();
            assert!(line.contains(words), "{text}: {line}");
            assert!(line.contains(field), "{text}: {line}");
            assert!(!line.contains('\n'));
            assert_eq!(rule_field(e), *field, "{text}");
        }
    }

    #[test]
    fn no_family_is_an_error() {
        let e = check(r#"{"Network":"10.0.0.0/16","EnableIPv4":false}"#).unwrap_err();
        assert_eq!(e, ConfigError::NoFamily);
    }

    #[test]
    fn ipv6_defaults_and_rules() {
        let c = check(r#"{"EnableIPv6":true,"IPv6Network":"fc00::/48","Network":"10.0.0.0/16"}"#).unwrap();
        assert_eq!(c.ipv6_subnet_len, 64);
        assert_eq!(c.ipv6_subnet_min, Some("fc00:0:0:1::".parse().unwrap()));
        assert_eq!(c.ipv6_subnet_max, Some("fc00:0:0:ffff::".parse().unwrap()));
        let c = check(r#"{"enableIPv4":false,"enableIPv6":true,"ipv6Network":"fc00::/120"}"#).unwrap();
        assert_eq!(c.ipv6_subnet_len, 122);
        let cases: &[(&str, &str, &str)] = &[
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true}"#,
                "IPv6Network",
                "please define",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/125"}"#,
                "IPv6Network",
                "/124",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":127}"#,
                "IPv6SubnetLen",
                "/127",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetLen":49}"#,
                "IPv6SubnetLen",
                "four subnets",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc01::"}"#,
                "IPv6SubnetMin",
                "not in the range",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMax":"fc01::"}"#,
                "IPv6SubnetMax",
                "not in the range",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMin":"fc00::1"}"#,
                "IPv6SubnetMin",
                "boundary",
            ),
            (
                r#"{"EnableIPv4":false,"EnableIPv6":true,"IPv6Network":"fc00::/48","IPv6SubnetMax":"fc00:0:0:5::1"}"#,
                "IPv6SubnetMax",
                "boundary",
            ),
        ];
        for (text, field, words) in cases {
            let e = check(text).unwrap_err();
            assert!(e.to_string().contains(words), "{text}: {e}");
            assert_eq!(rule_field(e), *field, "{text}");
        }
    }

    #[test]
    fn compatibility_follows_the_range() {
        let c = check(r#"{"Network":"10.0.0.0/16","SubnetMin":"10.0.10.0","SubnetMax":"10.0.20.0"}"#).unwrap();
        assert!(c.v4_compatible(&"10.0.10.0/24".parse().unwrap()));
        assert!(c.v4_compatible(&"10.0.20.0/24".parse().unwrap()));
        assert!(!c.v4_compatible(&"10.0.21.0/24".parse().unwrap()));
        assert!(!c.v4_compatible(&"10.0.12.0/25".parse().unwrap()));
    }

    #[test]
    fn garbage_is_a_json_error() {
        assert!(matches!(check("not json"), Err(ConfigError::Json(_))));
        assert!(matches!(check("[1]"), Err(ConfigError::Json(_))));
    }
}
