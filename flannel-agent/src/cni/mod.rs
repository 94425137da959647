//! The `flannel` CNI plugin: the library behind `src/bin/flannel.rs`.
//!
//! A drop-in for flannel-io/cni-plugin. A conflist entry `{"type": "flannel", "delegate":
//! {...}}` is turned into a config for the real plugin (bridge + host-local by default) from
//! the node's `subnet.env`, which flanneld writes; ADD saves that config so DEL undoes the
//! same thing later, whatever happened to `subnet.env` meanwhile.
//!
//! - `args`: the `CNI_*` environment; `netconf`: stdin; `subnet_env`: reading (and waiting
//!   for) `subnet.env`;
//! - `delegate`: rendering the delegate's config, as upstream does;
//! - `store`: the saved configs; `exec`: running the delegate; `result`: version conversion;
//! - `plugin`: the commands (ADD, DEL, CHECK, VERSION, STATUS, GC);
//! - `error`: the error enum and the spec's error object.
//!
//! Unlike upstream, ADD waits (10 s by default, `subnetFileWaitSeconds` in the config) for
//! `subnet.env` instead of failing at once on a node whose flanneld is still starting.

pub mod args;
pub mod delegate;
pub mod error;
pub mod exec;
pub mod netconf;
pub mod plugin;
pub mod result;
pub mod store;
pub mod subnet_env;

use std::time::Duration;

pub use self::error::PluginError;
pub use self::netconf::NetConf;
pub use self::plugin::{handle, Reply};
pub use self::subnet_env::SubnetEnv;

/// The CNI spec versions this plugin speaks, oldest first.
pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"];
/// The newest version, used for VERSION and for errors when the request's is unknown.
pub const LATEST_VERSION: &str = "1.1.0";
/// Where flanneld writes `subnet.env` (upstream's default).
pub const DEFAULT_SUBNET_FILE: &str = "/run/flannel/subnet.env";
/// Where the rendered delegate configs are kept (upstream's default).
pub const DEFAULT_DATA_DIR: &str = "/var/lib/cni/flannel";
/// How long ADD waits for `subnet.env` unless the config says otherwise. Short enough to
/// stay well inside a runtime's CNI timeout, long enough to cover flanneld's start.
pub const DEFAULT_SUBNET_FILE_WAIT: Duration = Duration::from_secs(10);
