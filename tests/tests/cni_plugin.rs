//! The flannel CNI plugin binary (`target/debug/flannel`) as a runtime runs it.
//!
//! With root: ADD, CHECK and DEL against the real `bridge` and `host-local` plugins, from a
//! one-node testbed's node namespace into a pod namespace (both removed when the testbed
//! drops), and ADD racing flanneld's `subnet.env`. Without root (the binary only): malformed
//! configs, VERSION and STATUS. Privileged tests skip loudly without root, and fail in CI.

use std::io::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use flannel_tests::testbed::flannel_cni::{flannel_cni_path, prepare_bin_dir};
use flannel_tests::testbed::netns;
use flannel_tests::testbed::{require_root, Testbed, TestbedOptions};
use serde_json::{json, Value};

const SUBNET_ENV: &str =
    "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.3.1/24\nFLANNEL_MTU=1410\nFLANNEL_IPMASQ=true\n";
/// Bound on one plugin run; the slowest expected is an ADD that waits for subnet.env.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The plugin binary, built if needed. In CI its absence fails the test; elsewhere it is a
/// loud skip, as for root.
fn plugin(test: &str) -> Option<PathBuf> {
    match flannel_cni_path() {
        Ok(path) => Some(path),
        Err(why) if std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false") => {
            panic!("{test}: no flannel CNI plugin: {why}")
        }
        Err(why) => {
            let banner = "*".repeat(70);
            let _ = writeln!(
                std::io::stderr(),
                "\n{banner}\nSKIPPED (no plugin binary): {test}: {why}\n{banner}"
            );
            None
        }
    }
}

/// What one run of the plugin printed and how it exited.
#[derive(Debug)]
struct Run {
    success: bool,
    stdout: Option<Value>,
    stderr: String,
    took: Duration,
}

/// One CNI call of the plugin, in `node_netns` when given (as the runtime runs it on a node).
struct Call<'a> {
    plugin: &'a Path,
    node_netns: Option<&'a str>,
    command: &'a str,
    container_id: &'a str,
    pod_netns: &'a str,
    cni_path: &'a Path,
}

impl Call<'_> {
    async fn run(&self, stdin: &str) -> anyhow::Result<Run> {
        let netns_path = netns::netns_path(self.pod_netns);
        let mut cmd = match self.node_netns {
            Some(node) => {
                let mut cmd = tokio::process::Command::new("ip");
                cmd.args(["netns", "exec", node]).arg(self.plugin);
                cmd
            }
            None => tokio::process::Command::new(self.plugin),
        };
        cmd.env("CNI_COMMAND", self.command)
            .env("CNI_CONTAINERID", self.container_id)
            .env("CNI_NETNS", &netns_path)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", self.cni_path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let started = Instant::now();
        let mut child = cmd.spawn().context("starting the plugin")?;
        let mut pipe = child.stdin.take().context("no stdin")?;
        tokio::io::AsyncWriteExt::write_all(&mut pipe, stdin.as_bytes()).await?;
        drop(pipe);
        let out = tokio::time::timeout(PLUGIN_TIMEOUT, child.wait_with_output())
            .await
            .context("the plugin did not finish")??;
        let text = String::from_utf8_lossy(&out.stdout);
        let stdout = if text.trim().is_empty() {
            None
        } else {
            Some(serde_json::from_str(&text).with_context(|| format!("the plugin printed {text:?}"))?)
        };
        Ok(Run {
            success: out.status.success(),
            stdout,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            took: started.elapsed(),
        })
    }
}

/// The manifest's conflist entry, as the runtime hands it to the plugin, with the node's
/// state kept in `dir` (never the host's /run/flannel or /var/lib/cni).
fn netconf(version: &str, dir: &Path, subnet_file: &Path, wait_seconds: f64) -> String {
    json!({
        "cniVersion": version,
        "name": "cbr0",
        "type": "flannel",
        "subnetFile": subnet_file,
        "dataDir": dir.join("cni-flannel"),
        "subnetFileWaitSeconds": wait_seconds,
        "delegate": { "hairpinMode": true, "isDefaultGateway": true },
        "ipam": { "dataDir": dir.join("cni-ipam") },
    })
    .to_string()
}

/// A one-node testbed (no etcd) with a pod namespace, and the CNI_PATH of plugin + system
/// plugins.
async fn setup(plugin: &Path, pods: &[&str]) -> anyhow::Result<(Testbed, PathBuf)> {
    let tb = Testbed::start(TestbedOptions::new(1).without_etcd()).await?;
    for pod in pods {
        netns::add(&format!("{}-p-{pod}", tb.prefix())).await?;
    }
    let bin = prepare_bin_dir(&tb.state_dir().join("cni-bin"), plugin)?;
    Ok((tb, bin))
}

fn addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
        .collect()
}

#[tokio::test]
async fn add_check_del_through_bridge_and_host_local() -> anyhow::Result<()> {
    if !require_root("add_check_del_through_bridge_and_host_local") {
        return Ok(());
    }
    let Some(plugin) = plugin("add_check_del_through_bridge_and_host_local") else {
        return Ok(());
    };
    let (tb, bin) = setup(&plugin, &["a"]).await?;
    let node = tb.node(1).clone();
    tb.write_subnet_env(1, SUBNET_ENV)?;
    let pod_netns = format!("{}-p-a", tb.prefix());
    let container_id = format!("{}-a", tb.prefix());
    let call = |command| Call {
        plugin: &plugin,
        node_netns: Some(&node.netns),
        command,
        container_id: &container_id,
        pod_netns: &pod_netns,
        cni_path: &bin,
    };
    let conf = netconf("1.0.0", &node.dir, &node.subnet_file(), 5.0);

    let add = call("ADD").run(&conf).await?;
    assert!(add.success, "ADD failed: {add:?}");
    let result = add.stdout.context("ADD printed no result")?;
    assert_eq!(result["cniVersion"], "1.0.0");
    assert_eq!(addresses(&result), ["10.244.3.2/24"], "{result}");
    assert_eq!(result["ips"][0]["gateway"], "10.244.3.1");
    eprintln!("ADD took {:?}", add.took);

    // The pod got the address, flannel's MTU and a route to the cluster network.
    let pod_addr = netns::ip(&pod_netns, &["-o", "addr", "show", "dev", "eth0"]).await?;
    assert!(pod_addr.contains("10.244.3.2/24"), "{pod_addr}");
    let pod_link = netns::ip(&pod_netns, &["link", "show", "dev", "eth0"]).await?;
    assert!(pod_link.contains("mtu 1410"), "{pod_link}");
    let routes = netns::ip(&pod_netns, &["route", "show", "10.244.0.0/16"]).await?;
    assert!(routes.contains("via 10.244.3.1"), "{routes}");
    let bridge = netns::ip(&node.netns, &["-o", "addr", "show", "dev", "cni0"]).await?;
    assert!(bridge.contains("10.244.3.1/24"), "{bridge}");

    // The rendered delegate is saved, private, for DEL.
    let saved_path = node.dir.join("cni-flannel").join(&container_id);
    let mode = std::fs::metadata(&saved_path)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let saved: Value = serde_json::from_slice(&std::fs::read(&saved_path)?)?;
    assert_eq!(saved["type"], "bridge");
    assert_eq!(saved["ipMasq"], false, "flanneld masquerades, so the bridge must not");
    assert_eq!(saved["ipam"]["ranges"], json!([[{"subnet": "10.244.3.0/24"}]]));

    let check_conf = {
        let mut c: Value = serde_json::from_str(&conf)?;
        c["prevResult"] = result.clone();
        c.to_string()
    };
    let check = call("CHECK").run(&check_conf).await?;
    assert!(check.success, "CHECK failed: {check:?}");

    // DEL works from the saved config, even after subnet.env is gone, and twice.
    std::fs::remove_file(node.subnet_file())?;
    let del = call("DEL").run(&conf).await?;
    assert!(del.success, "DEL failed: {del:?}");
    assert!(!saved_path.exists(), "DEL removes the saved config");
    assert!(
        netns::ip(&pod_netns, &["link", "show", "dev", "eth0"]).await.is_err(),
        "eth0 is gone"
    );
    let leases = std::fs::read_dir(node.dir.join("cni-ipam/cbr0"))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("10.244."))
        .count();
    assert_eq!(leases, 0, "host-local released the address");
    let again = call("DEL").run(&conf).await?;
    assert!(again.success, "a second DEL failed: {again:?}");
    tb.shutdown().await
}

#[tokio::test]
async fn add_waits_for_subnet_env_then_gives_up_clearly() -> anyhow::Result<()> {
    if !require_root("add_waits_for_subnet_env_then_gives_up_clearly") {
        return Ok(());
    }
    let Some(plugin) = plugin("add_waits_for_subnet_env_then_gives_up_clearly") else {
        return Ok(());
    };
    let (tb, bin) = setup(&plugin, &["late", "never"]).await?;
    let node = tb.node(1).clone();
    let names = |pod: &str| (format!("{}-p-{pod}", tb.prefix()), format!("{}-{pod}", tb.prefix()));

    // flanneld writes subnet.env 1.5 s after the ADD starts: the ADD waits and succeeds.
    let (pod_netns, container_id) = names("late");
    let conf = netconf("0.3.1", &node.dir, &node.subnet_file(), 20.0);
    let add = Call {
        plugin: &plugin,
        node_netns: Some(&node.netns),
        command: "ADD",
        container_id: &container_id,
        pod_netns: &pod_netns,
        cni_path: &bin,
    };
    let writer = async {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        tb.write_subnet_env(1, SUBNET_ENV)
    };
    let (run, written) = tokio::join!(add.run(&conf), writer);
    written?;
    let run = run?;
    assert!(run.success, "ADD failed: {run:?}");
    assert!(
        run.took >= Duration::from_millis(1500),
        "ADD returned before subnet.env existed"
    );
    assert_eq!(addresses(&run.stdout.context("no result")?), ["10.244.3.2/24"]);
    eprintln!("ADD that waited for subnet.env took {:?}", run.took);
    let del = Call { command: "DEL", ..add };
    assert!(del.run(&conf).await?.success);

    // A subnet.env that never comes: a clear error after the wait, and nothing left behind.
    let (pod_netns, container_id) = names("never");
    let missing = node.dir.join("absent/subnet.env");
    let conf = netconf("0.3.1", &node.dir, &missing, 1.0);
    let add = Call {
        plugin: &plugin,
        node_netns: Some(&node.netns),
        command: "ADD",
        container_id: &container_id,
        pod_netns: &pod_netns,
        cni_path: &bin,
    };
    let run = add.run(&conf).await?;
    assert!(!run.success);
    assert!(run.took >= Duration::from_secs(1), "gave up after {:?}", run.took);
    let error = run.stdout.context("no error object")?;
    assert_eq!(error["code"], 11, "{error}");
    assert_eq!(error["cniVersion"], "0.3.1");
    let msg = error["msg"].as_str().unwrap_or_default();
    assert!(
        msg.starts_with(&format!(
            "failed to load flannel 'subnet.env' file {}: ",
            missing.display()
        )),
        "{msg}"
    );
    assert!(msg.ends_with("Check that flanneld is running on this node"), "{msg}");
    assert!(
        error["details"].as_str().unwrap_or_default().contains("waited"),
        "{error}"
    );
    assert!(!node.dir.join("cni-flannel").join(&container_id).exists());
    assert!(netns::ip(&pod_netns, &["link", "show", "dev", "eth0"]).await.is_err());
    // The runtime's DEL after the failed ADD has nothing to undo.
    let del = Call { command: "DEL", ..add };
    let run = del.run(&conf).await?;
    assert!(run.success, "{run:?}");
    tb.shutdown().await
}

/// VERSION, STATUS and malformed configs need no namespace and no root.
#[tokio::test]
async fn version_status_and_malformed_configs() -> anyhow::Result<()> {
    let Some(plugin) = plugin("version_status_and_malformed_configs") else {
        return Ok(());
    };
    let dir = tempfile::tempdir()?;
    let subnet_file = dir.path().join("subnet.env");
    let call = |command| Call {
        plugin: &plugin,
        node_netns: None,
        command,
        container_id: "c1",
        pod_netns: "none",
        cni_path: dir.path(),
    };

    let version = call("VERSION").run("").await?;
    assert!(version.success);
    assert_eq!(
        version.stdout,
        Some(json!({"cniVersion": "1.1.0", "supportedVersions": ["0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"]}))
    );

    let status_conf = netconf("1.1.0", dir.path(), &subnet_file, 0.0);
    let status = call("STATUS").run(&status_conf).await?;
    assert!(!status.success);
    let error = status.stdout.context("no error object")?;
    assert_eq!(error["code"], 50, "{error}");
    std::fs::write(&subnet_file, SUBNET_ENV)?;
    let status = call("STATUS").run(&status_conf).await?;
    assert!(status.success && status.stdout.is_none(), "{status:?}");

    for (stdin, code) in [
        ("", 7),
        ("{\"cniVersion\":", 7),
        ("[1,2]", 7),
        (
            r#"{"cniVersion":"1.0.0","name":"cbr0","type":"flannel","delegate":{"ipam":{}}}"#,
            7,
        ),
        (r#"{"cniVersion":"0.2.0","name":"cbr0","type":"flannel"}"#, 1),
    ] {
        for command in ["ADD", "DEL", "CHECK"] {
            let run = call(command).run(stdin).await?;
            assert!(!run.success, "{command} {stdin:?} succeeded");
            let error = run
                .stdout
                .with_context(|| format!("{command} {stdin:?}: no error object"))?;
            assert_eq!(error["code"], code, "{command} {stdin:?}: {error}");
            assert!(error["msg"].is_string());
            if run.stderr.contains("panicked") {
                bail!("{command} {stdin:?} panicked: {}", run.stderr);
            }
        }
    }
    // Missing CNI_* variables are a code 4, not a crash.
    let mut cmd = std::process::Command::new(&plugin);
    let out = cmd.env_remove("CNI_COMMAND").stdin(Stdio::null()).output()?;
    assert_eq!(out.status.code(), Some(1));
    let error: Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(error["code"], 4);
    Ok(())
}

/// The testbed's pods go through the plugin: ADD leaves the plugin's saved config, DEL
/// removes it.
#[tokio::test]
async fn testbed_pods_use_the_plugin() -> anyhow::Result<()> {
    if !require_root("testbed_pods_use_the_plugin") {
        return Ok(());
    }
    if plugin("testbed_pods_use_the_plugin").is_none() {
        return Ok(());
    }
    let mut tb = Testbed::start(TestbedOptions::new(1).without_etcd()).await?;
    tb.write_subnet_env(1, SUBNET_ENV)?;
    let pod = tb.add_pod(1, "p").await?;
    assert_eq!(pod.ipv4(), Some("10.244.3.2".parse()?));
    let saved = tb.node(1).dir.join("cni-flannel").join(&pod.container_id);
    assert!(saved.exists(), "ADD did not go through the flannel plugin");
    tb.remove_pod("p").await?;
    assert!(!saved.exists());
    tb.shutdown().await
}
