//! One invocation of the plugin: the commands, from a validated environment and stdin to
//! what is printed and the exit status.

use std::collections::HashMap;

use serde_json::{json, Value};

use super::args::{CniArgs, Command};
use super::delegate;
use super::error::PluginError;
use super::exec::run_delegate;
use super::netconf::NetConf;
use super::result;
use super::store::Store;
use super::subnet_env::SubnetEnv;
use super::{LATEST_VERSION, SUPPORTED_VERSIONS};

/// What the binary prints on stdout and whether it exits 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Reply {
    /// A result, the version info, an error object, or nothing.
    pub stdout: Option<Value>,
    /// Exit 0 when true, 1 otherwise.
    pub success: bool,
}

/// Runs one invocation: `env` is the process environment, `stdin` the network config.
/// Never panics on bad input: every failure becomes a CNI error object.
pub fn handle(env: &HashMap<String, String>, stdin: &[u8]) -> Reply {
    match CniArgs::from_env(env).and_then(|args| dispatch(&args, stdin)) {
        Ok(stdout) => Reply { stdout, success: true },
        Err(error) => Reply {
            stdout: Some(error.to_json(&error_version(stdin))),
            success: false,
        },
    }
}

/// The version to report an error in: the request's if this plugin speaks it, else the
/// latest (libcni's skel does the same).
fn error_version(stdin: &[u8]) -> String {
    serde_json::from_slice::<Value>(stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
        .unwrap_or_else(|| LATEST_VERSION.to_owned())
}

fn dispatch(args: &CniArgs, stdin: &[u8]) -> Result<Option<Value>, PluginError> {
    // VERSION may come with an empty stdin; every other command needs the config.
    let conf = || NetConf::parse(stdin);
    match args.command {
        Command::Version => Ok(Some(
            json!({"cniVersion": LATEST_VERSION, "supportedVersions": SUPPORTED_VERSIONS}),
        )),
        Command::Add => add(args, &conf()?).map(Some),
        Command::Del => del(args, &conf()?).map(|()| None),
        Command::Check => {
            let conf = conf()?;
            require(&conf, "0.4.0", "CHECK")?;
            check(args, &conf).map(|()| None)
        }
        Command::Status => {
            let conf = conf()?;
            require(&conf, "1.1.0", "STATUS")?;
            SubnetEnv::load(&conf.subnet_file).map_err(|error| PluginError::NotAvailable {
                path: conf.subnet_file.clone(),
                error,
            })?;
            Ok(None)
        }
        // The saved configs are removed by DEL; a GC that removed them by itself would
        // leak the delegate's state (addresses, veths), which only a DEL releases.
        Command::Gc => require(&conf()?, "1.1.0", "GC").map(|()| None),
    }
}

/// Fails unless the config's version is at least `min` (the version that introduced
/// `command`), as libcni's skel does.
fn require(conf: &NetConf, min: &str, command: &str) -> Result<(), PluginError> {
    let rank = |v: &str| SUPPORTED_VERSIONS.iter().position(|s| *s == v);
    if rank(&conf.cni_version) >= rank(min) {
        return Ok(());
    }
    Err(PluginError::IncompatibleVersion {
        version: conf.cni_version.clone(),
        supported: format!("{min} and later for {command}"),
    })
}

fn add(args: &CniArgs, conf: &NetConf) -> Result<Value, PluginError> {
    let env = SubnetEnv::load_waiting(&conf.subnet_file, conf.subnet_file_wait()?)?;
    let config = delegate::render(conf, &env);
    let bytes = serde_json::to_vec(&config).expect("a JSON value serializes");
    // Saved before the delegate runs: a failed ADD is followed by a DEL, which needs the
    // config to undo whatever the delegate did before it failed.
    Store::new(&conf.data_dir).save(&args.container_id, &bytes)?;
    let plugin = config["type"].as_str().unwrap_or("bridge");
    let Some(outcome) = run_delegate(plugin, Command::Add, args, &bytes)? else {
        return Err(PluginError::Delegate {
            command: "ADD".into(),
            plugin: plugin.into(),
            reason: "it printed no result".into(),
        });
    };
    result::convert(outcome, &conf.cni_version)
}

fn del(args: &CniArgs, conf: &NetConf) -> Result<(), PluginError> {
    let store = Store::new(&conf.data_dir);
    // Nothing saved: never added, or a repeated DEL. Both succeed.
    let Some(bytes) = store.load(&args.container_id)? else {
        return Ok(());
    };
    let Some(plugin) = saved_type(&bytes) else {
        // Upstream's choice too: a DEL that can never succeed would block the pod's
        // removal forever; the interface, if any, goes with the namespace.
        eprintln!(
            "flannel: ignoring unreadable delegate config {}",
            store.path(&args.container_id).display()
        );
        return store.remove(&args.container_id);
    };
    run_delegate(&plugin, Command::Del, args, &bytes)?;
    // Only after a successful DEL: a failed one is retried and needs the file again.
    store.remove(&args.container_id)
}

fn check(args: &CniArgs, conf: &NetConf) -> Result<(), PluginError> {
    let store = Store::new(&conf.data_dir);
    let unknown = || PluginError::UnknownContainer {
        container_id: args.container_id.clone(),
        dir: conf.data_dir.clone(),
    };
    let bytes = store.load(&args.container_id)?.ok_or_else(unknown)?;
    let mut config: Value = serde_json::from_slice(&bytes).map_err(|_| unknown())?;
    let plugin = config["type"].as_str().ok_or_else(unknown)?.to_owned();
    if let Some(prev) = &conf.prev_result {
        // The delegate reads prevResult in its own config's version.
        let version = config["cniVersion"].as_str().unwrap_or(&conf.cni_version).to_owned();
        config["prevResult"] = result::with_route_gateways(result::convert(prev.clone(), &version)?);
    }
    let bytes = serde_json::to_vec(&config).expect("a JSON value serializes");
    run_delegate(&plugin, Command::Check, args, &bytes).map(drop)
}

/// The `type` of a saved delegate config, if it is readable.
fn saved_type(bytes: &[u8]) -> Option<String> {
    let config: Value = serde_json::from_slice(bytes).ok()?;
    config["type"].as_str().map(str::to_owned)
}

#[cfg(test)]
#[path = "plugin_tests.rs"]
mod tests;
