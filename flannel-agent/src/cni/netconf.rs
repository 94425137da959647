//! The plugin's network config, read from stdin.
//!
//! Field names and defaults are upstream's (flannel-io/cni-plugin `flannel.go`), so a
//! conflist written for upstream works unchanged. Keys the plugin does not know are
//! ignored, as Go's `json.Unmarshal` ignores them; that also keeps our own extra key
//! (`subnetFileWaitSeconds`) harmless to upstream's plugin.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::PluginError;
use super::{DEFAULT_DATA_DIR, DEFAULT_SUBNET_FILE, DEFAULT_SUBNET_FILE_WAIT, SUPPORTED_VERSIONS};

/// A flannel network config: one plugin entry of a conflist, with what the runtime adds
/// (`runtimeConfig`, `prevResult`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetConf {
    /// `cniVersion`: the version of the request and of the result printed.
    #[serde(default)]
    pub cni_version: String,
    /// The network name (`cbr0` in flannel's manifest); the delegate gets it as its name.
    #[serde(default)]
    pub name: String,
    /// The plugin type, `flannel`.
    #[serde(rename = "type", default)]
    pub plugin_type: String,
    /// Where flanneld writes `subnet.env`; default `/run/flannel/subnet.env`.
    #[serde(default = "default_subnet_file")]
    pub subnet_file: PathBuf,
    /// Where the rendered delegate configs are kept for DEL; default `/var/lib/cni/flannel`.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// The delegate's settings (`hairpinMode`, `isDefaultGateway`, a `type` other than
    /// bridge...); flannel fills in the rest.
    #[serde(default)]
    pub delegate: Option<Map<String, Value>>,
    /// A base for the delegate's `ipam`: its `type`, `routes`, `dataDir`... are kept,
    /// `ranges` and the flannel routes are filled in.
    #[serde(default)]
    pub ipam: Option<Map<String, Value>>,
    /// Runtime-supplied capabilities (`portMappings`...), passed on to the delegate.
    #[serde(default)]
    pub runtime_config: Option<Value>,
    /// The result of the previous plugin (CHECK and DEL), passed on to the delegate.
    #[serde(default)]
    pub prev_result: Option<Value>,
    /// flannel-rs only: how long ADD waits for `subnet.env` to appear, in seconds.
    #[serde(default)]
    pub subnet_file_wait_seconds: Option<f64>,
}

fn default_subnet_file() -> PathBuf {
    PathBuf::from(DEFAULT_SUBNET_FILE)
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(DEFAULT_DATA_DIR)
}

impl NetConf {
    /// Parses and validates stdin: well-formed JSON of the right shape, a supported
    /// `cniVersion`, a delegate without `name`/`ipam` and with a string `type`.
    pub fn parse(stdin: &[u8]) -> Result<Self, PluginError> {
        let value: Value = serde_json::from_slice(stdin).map_err(|e| PluginError::InvalidConfig(e.to_string()))?;
        // serde would also fill the struct from an array, field by field.
        if !value.is_object() {
            return Err(invalid("the network config must be a JSON object"));
        }
        let conf: Self = serde_json::from_value(value).map_err(|e| PluginError::InvalidConfig(e.to_string()))?;
        check_version(&conf.cni_version)?;
        if let Some(delegate) = &conf.delegate {
            // Upstream's checks and wording: flannel owns these keys.
            if delegate.get("type").is_some_and(|t| !t.is_string()) {
                return Err(invalid(
                    "'delegate' dictionary, if present, must have (string) 'type' field",
                ));
            }
            if delegate.contains_key("name") {
                return Err(invalid(
                    "'delegate' dictionary must not have 'name' field, it'll be set by flannel",
                ));
            }
            if delegate.contains_key("ipam") {
                return Err(invalid(
                    "'delegate' dictionary must not have 'ipam' field, it'll be set by flannel",
                ));
            }
        }
        if let Some(routes) = conf.ipam.as_ref().and_then(|i| i.get("routes")) {
            if !routes
                .as_array()
                .is_some_and(|r| r.iter().all(|r| r["dst"].is_string()))
            {
                return Err(invalid("'ipam.routes' must be a list of objects with a 'dst'"));
            }
        }
        conf.subnet_file_wait()?;
        Ok(conf)
    }

    /// How long ADD waits for `subnet.env`.
    pub fn subnet_file_wait(&self) -> Result<Duration, PluginError> {
        match self.subnet_file_wait_seconds {
            None => Ok(DEFAULT_SUBNET_FILE_WAIT),
            Some(s) => Duration::try_from_secs_f64(s)
                .map_err(|_| invalid(&format!("'subnetFileWaitSeconds' {s} is not a duration in seconds"))),
        }
    }
}

fn invalid(msg: &str) -> PluginError {
    PluginError::InvalidConfig(msg.to_owned())
}

/// Fails unless `version` is one this plugin speaks. The spec requires `cniVersion`;
/// without it libcni assumes 0.1.0, which this plugin does not support either.
pub fn check_version(version: &str) -> Result<(), PluginError> {
    if SUPPORTED_VERSIONS.contains(&version) {
        return Ok(());
    }
    Err(PluginError::IncompatibleVersion {
        version: version.to_owned(),
        supported: SUPPORTED_VERSIONS.join(", "),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(stdin: &str) -> u32 {
        NetConf::parse(stdin.as_bytes()).unwrap_err().code()
    }

    #[test]
    fn parses_the_manifest_entry_with_upstreams_defaults() {
        let conf = NetConf::parse(
            br#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
                "delegate":{"hairpinMode":true,"isDefaultGateway":true},"unknownKey":1}"#,
        )
        .unwrap();
        assert_eq!(conf.name, "cbr0");
        assert_eq!(conf.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
        assert_eq!(conf.data_dir, PathBuf::from("/var/lib/cni/flannel"));
        assert_eq!(conf.delegate.unwrap()["hairpinMode"], true);
        assert_eq!(conf.subnet_file_wait_seconds, None);
    }

    #[test]
    fn malformed_input_is_an_invalid_config() {
        assert_eq!(code("not json"), 7);
        assert_eq!(code(""), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","delegate":[1]}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","subnetFile":3}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","subnetFileWaitSeconds":-1}"#), 7);
        assert_eq!(
            code(r#"{"cniVersion":"1.0.0","ipam":{"routes":[{"gw":"1.2.3.4"}]}}"#),
            7
        );
    }

    #[test]
    fn rejects_what_flannel_owns_in_the_delegate() {
        let msg = |d: &str| {
            let stdin = format!(r#"{{"cniVersion":"1.0.0","name":"n","type":"flannel","delegate":{d}}}"#);
            NetConf::parse(stdin.as_bytes()).unwrap_err().to_string()
        };
        assert!(msg(r#"{"name":"x"}"#).contains("must not have 'name' field"));
        assert!(msg(r#"{"ipam":{}}"#).contains("must not have 'ipam' field"));
        assert!(msg(r#"{"type":5}"#).contains("(string) 'type' field"));
    }

    #[test]
    fn versions() {
        for v in SUPPORTED_VERSIONS {
            assert!(check_version(v).is_ok());
        }
        assert_eq!(code(r#"{"cniVersion":"0.2.0"}"#), 1);
        assert_eq!(code(r#"{"name":"no version"}"#), 1);
    }
}
