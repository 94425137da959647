//! Errors of the CNI plugin and the error object the CNI spec wants on stdout.
//!
//! Every variant maps to one of the spec's well-known codes
//! (<https://github.com/containernetworking/cni/blob/main/SPEC.md#error>), so a runtime can
//! tell "fix your config" (7) from "try again later" (11) without parsing messages. The
//! `Display` text is the `msg` and names what failed on what object; [`PluginError::details`]
//! is the `details`, which says what an operator should do.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};

use super::subnet_env::SubnetEnvError;

/// Spec code 1: the config's `cniVersion` is not one this plugin supports.
pub const CODE_INCOMPATIBLE_VERSION: u32 = 1;
/// Spec code 3: the container is unknown (CHECK before ADD).
pub const CODE_UNKNOWN_CONTAINER: u32 = 3;
/// Spec code 4: a `CNI_*` environment variable is missing or invalid.
pub const CODE_INVALID_ENV: u32 = 4;
/// Spec code 5: an I/O failure (reading stdin, the saved delegate config).
pub const CODE_IO: u32 = 5;
/// Spec code 7: the network configuration is invalid.
pub const CODE_INVALID_CONFIG: u32 = 7;
/// Spec code 11: try again later; the runtime retries the ADD.
pub const CODE_TRY_AGAIN_LATER: u32 = 11;
/// Spec code 50: STATUS says the plugin cannot serve ADDs now.
pub const CODE_PLUGIN_NOT_AVAILABLE: u32 = 50;
/// The code libcni's skel uses for errors without a better one.
pub const CODE_INTERNAL: u32 = 999;

/// What can go wrong in one plugin invocation.
#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    /// stdin is not a usable flannel network config.
    #[error("invalid network config: {0}")]
    InvalidConfig(String),

    /// The config asks for a CNI version this plugin does not speak.
    #[error("incompatible CNI version {version:?}: this plugin supports {supported}")]
    IncompatibleVersion {
        /// The `cniVersion` asked for.
        version: String,
        /// The supported versions, comma-separated.
        supported: String,
    },

    /// The runtime did not set a `CNI_*` variable the command needs, or set it badly.
    #[error("invalid environment: {0}")]
    InvalidEnv(String),

    /// `subnet.env` did not appear (or stayed incomplete) within the wait.
    #[error("failed to load flannel 'subnet.env' file {path}: {error}. Check that flanneld is running on this node")]
    SubnetEnv {
        /// The file read.
        path: PathBuf,
        /// How long the plugin waited for it.
        waited: Duration,
        /// Why the last attempt failed.
        error: SubnetEnvError,
    },

    /// STATUS: flannel cannot serve ADDs because `subnet.env` is unusable.
    #[error("plugin not available: {path}: {error}. Check that flanneld is running on this node")]
    NotAvailable {
        /// The file read.
        path: PathBuf,
        /// Why it is unusable.
        error: SubnetEnvError,
    },

    /// Reading stdin or the delegate config saved at ADD failed.
    #[error("{what} {path}: {error}")]
    Io {
        /// The operation, e.g. "saving the delegate config to".
        what: &'static str,
        /// The file (or `-` for stdin).
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },

    /// CHECK for a container that ADD never saw (no saved delegate config).
    #[error("no saved delegate config for container {container_id} in {dir}; was it added by this plugin?")]
    UnknownContainer {
        /// `CNI_CONTAINERID`.
        container_id: String,
        /// The plugin's data directory.
        dir: PathBuf,
    },

    /// The delegate plugin is not on `CNI_PATH`.
    #[error("failed to find plugin {plugin:?} in path {path:?}")]
    DelegateNotFound {
        /// The delegate's `type`.
        plugin: String,
        /// `CNI_PATH`, as given.
        path: String,
    },

    /// The delegate plugin could not be run, or printed something that is not CNI output.
    #[error("failed to delegate {command} to {plugin}: {reason}")]
    Delegate {
        /// `ADD`, `DEL` or `CHECK`.
        command: String,
        /// The delegate's path.
        plugin: PathBuf,
        /// What went wrong.
        reason: String,
    },

    /// The delegate plugin reported a CNI error; its code and details are passed on.
    #[error("failed to delegate {command} to {plugin}: {msg}")]
    DelegateFailed {
        /// `ADD`, `DEL` or `CHECK`.
        command: String,
        /// The delegate's type.
        plugin: String,
        /// The delegate's error code.
        code: u32,
        /// The delegate's message.
        msg: String,
        /// The delegate's details.
        details: String,
    },
}

impl PluginError {
    /// The CNI error code of this error.
    pub fn code(&self) -> u32 {
        match self {
            Self::InvalidConfig(_) => CODE_INVALID_CONFIG,
            Self::IncompatibleVersion { .. } => CODE_INCOMPATIBLE_VERSION,
            Self::InvalidEnv(_) => CODE_INVALID_ENV,
            // flanneld may still be starting: the runtime should retry, not give up.
            Self::SubnetEnv { .. } => CODE_TRY_AGAIN_LATER,
            Self::NotAvailable { .. } => CODE_PLUGIN_NOT_AVAILABLE,
            Self::Io { .. } => CODE_IO,
            Self::UnknownContainer { .. } => CODE_UNKNOWN_CONTAINER,
            Self::DelegateNotFound { .. } | Self::Delegate { .. } => CODE_INTERNAL,
            Self::DelegateFailed { code, .. } => *code,
        }
    }

    /// The `details` of the error object: what to do about it.
    pub fn details(&self) -> String {
        match self {
            Self::SubnetEnv { path, waited, .. } => format!(
                "waited {:.1}s for {}; flanneld writes it once it holds a subnet lease for this node: \
                 check the flannel pod on this node (kubectl -n kube-flannel logs) and that the node has a podCIDR",
                waited.as_secs_f64(),
                path.display()
            ),
            Self::NotAvailable { path, .. } => format!(
                "{} is written by flanneld once it holds a subnet lease for this node",
                path.display()
            ),
            Self::DelegateNotFound { .. } => {
                "install the containernetworking plugins (bridge, host-local, portmap) in the CNI bin directory".into()
            }
            Self::DelegateFailed { details, .. } => details.clone(),
            _ => String::new(),
        }
    }

    /// The error object of the CNI spec, `{"cniVersion","code","msg","details"}`, for a
    /// request of `cni_version`.
    pub fn to_json(&self, cni_version: &str) -> Value {
        json!({
            "cniVersion": cni_version,
            "code": self.code(),
            "msg": self.to_string(),
            "details": self.details(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_objects_carry_spec_codes() {
        let e = PluginError::InvalidConfig("expected value at line 1 column 1".into());
        assert_eq!(
            e.to_json("1.0.0"),
            json!({
                "cniVersion": "1.0.0", "code": 7,
                "msg": "invalid network config: expected value at line 1 column 1", "details": "",
            })
        );
        let e = PluginError::SubnetEnv {
            path: "/run/flannel/subnet.env".into(),
            waited: Duration::from_secs(10),
            error: SubnetEnvError::Read(std::io::Error::from(std::io::ErrorKind::NotFound)),
        };
        let v = e.to_json("0.3.1");
        assert_eq!(v["code"], 11);
        let msg = v["msg"].as_str().unwrap();
        assert!(msg.starts_with("failed to load flannel 'subnet.env' file /run/flannel/subnet.env: "));
        assert!(msg.ends_with("Check that flanneld is running on this node"), "{msg}");
        assert!(v["details"].as_str().unwrap().contains("waited 10.0s"));
    }

    #[test]
    fn delegate_errors_keep_the_delegates_code() {
        let e = PluginError::DelegateFailed {
            command: "ADD".into(),
            plugin: "bridge".into(),
            code: 11,
            msg: "busy".into(),
            details: "d".into(),
        };
        assert_eq!(e.code(), 11);
        assert_eq!(e.to_json("1.1.0")["details"], "d");
        assert_eq!(e.to_string(), "failed to delegate ADD to bridge: busy");
    }
}
