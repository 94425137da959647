//! Pods through flannel-rs's own CNI plugin (`target/debug/flannel`), as on a real node:
//! the runtime runs `flannel` with the manifest's conflist entry, and the plugin renders the
//! delegate config from `subnet.env` and runs `bridge` + `host-local` itself.
//!
//! The plugin and the Debian plugins must be in one `CNI_PATH` directory, so each testbed
//! gets `<state dir>/cni-bin` with symlinks to both. When the plugin cannot be had (no cargo
//! to build it, a build error) pods fall back to running `bridge` with the config the
//! testbed renders itself (`cni.rs`), so nothing that worked before breaks.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use super::cni::{cni_path, CNI_NETWORK_NAME};

/// Where the plugin binary is: `$FLANNEL_CNI_BIN` if set; else, when running under cargo
/// (tests, `cargo run`), the result of `cargo build -p flannel-agent --bin flannel`, which
/// `cargo test` does not build by itself since the binary is in another package; else
/// `flannel` beside the running binary or in the workspace's `target/debug`.
///
/// The answer is computed once per process; the error says why there is no plugin.
pub fn flannel_cni_path() -> Result<PathBuf, String> {
    static FOUND: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    FOUND
        .get_or_init(|| find_or_build().map_err(|e| format!("{e:#}")))
        .clone()
}

fn find_or_build() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("FLANNEL_CNI_BIN") {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!("FLANNEL_CNI_BIN={} does not exist", path.display());
        }
        return Ok(path);
    }
    if let Some(cargo) = std::env::var_os("CARGO") {
        return build(Path::new(&cargo));
    }
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        // A test binary is in target/<profile>/deps, a tool in target/<profile>.
        candidates.extend(exe.ancestors().skip(1).take(2).map(|dir| dir.join("flannel")));
    }
    candidates.push(workspace_dir().join("target/debug/flannel"));
    let looked: Vec<String> = candidates.iter().map(|p| p.display().to_string()).collect();
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "the flannel CNI plugin was not found (looked at {}): cargo build -p flannel-agent --bin flannel, or set FLANNEL_CNI_BIN",
            looked.join(", ")
        )
    })
}

fn workspace_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds the plugin (a no-op when it is fresh) and returns the executable cargo reports.
/// Cargo releases its build lock while tests run, so this does not deadlock `cargo test`.
fn build(cargo: &Path) -> anyhow::Result<PathBuf> {
    let out = Command::new(cargo)
        .current_dir(workspace_dir())
        .args(["build", "--quiet", "-p", "flannel-agent", "--bin", "flannel"])
        .arg("--message-format=json-render-diagnostics")
        .stdin(Stdio::null())
        .output()
        .context("running cargo build for the flannel CNI plugin")?;
    if !out.status.success() {
        bail!(
            "cargo build -p flannel-agent --bin flannel failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "flannel")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo built no flannel executable")
}

/// Makes `dir` a `CNI_PATH` with the flannel plugin and every plugin of [`cni_path`], as
/// symlinks, and returns it. Idempotent.
pub fn prepare_bin_dir(dir: &Path, plugin: &Path) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let source = cni_path();
    let entries = std::fs::read_dir(&source).with_context(|| {
        format!(
            "listing the CNI plugins in {}; install containernetworking-plugins",
            source.display()
        )
    })?;
    let mut links = vec![("flannel".into(), plugin.to_path_buf())];
    for entry in entries {
        let entry = entry?;
        links.push((entry.file_name(), entry.path()));
    }
    for (name, target) in links {
        let link = dir.join(&name);
        // The testbed's own plugin wins over a `flannel` in the system directory.
        if std::fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        std::os::unix::fs::symlink(&target, &link)
            .with_context(|| format!("linking {} to {}", link.display(), target.display()))?;
    }
    Ok(dir.to_path_buf())
}

/// The conflist entry of flannel's manifest for a testbed node: `subnet.env`, the saved
/// delegate configs and host-local's state all in the node's directory (never the host's
/// `/run/flannel` or `/var/lib/cni`).
pub fn flannel_netconf(node_dir: &Path, subnet_file: &Path) -> Value {
    json!({
        "cniVersion": "0.3.1",
        "name": CNI_NETWORK_NAME,
        "type": "flannel",
        "subnetFile": subnet_file,
        "dataDir": node_dir.join("cni-flannel"),
        "delegate": { "hairpinMode": true, "isDefaultGateway": true },
        // The plugin keeps the keys of this ipam and fills in ranges and routes.
        "ipam": { "dataDir": node_dir.join("cni-ipam") },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netconf_keeps_state_in_the_node_dir() {
        let conf = flannel_netconf(Path::new("/t/n1"), Path::new("/t/n1/subnet.env"));
        assert_eq!(conf["type"], "flannel");
        assert_eq!(conf["subnetFile"], "/t/n1/subnet.env");
        assert_eq!(conf["dataDir"], "/t/n1/cni-flannel");
        assert_eq!(conf["ipam"]["dataDir"], "/t/n1/cni-ipam");
    }

    #[test]
    fn bin_dir_links_the_plugin_and_the_system_plugins() {
        let tmp = tempfile::tempdir().unwrap();
        let plugin = tmp.path().join("flannel-build");
        std::fs::write(&plugin, "").unwrap();
        let dir = prepare_bin_dir(&tmp.path().join("bin"), &plugin);
        let Ok(dir) = dir else {
            // No containernetworking-plugins here: nothing else to check.
            return;
        };
        assert_eq!(std::fs::read_link(dir.join("flannel")).unwrap(), plugin);
        prepare_bin_dir(&dir, &plugin).expect("idempotent");
    }
}
