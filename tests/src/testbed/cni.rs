//! Pods through the real CNI code path: the `bridge` plugin with `host-local` IPAM from the
//! containernetworking-plugins package, configured from a node's `subnet.env` the way
//! flannel's CNI plugin renders its delegate (flannel-io/cni-plugin `flannel_linux.go`).
//!
//! The renderer is the fallback of the testbed's pods: they normally go through flannel-rs's
//! own CNI plugin (`flannel_cni.rs`), which renders the same config itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use ipnet::IpNet;
use serde_json::{json, Value};

use super::netns;

/// Name of the CNI network, as in flannel's manifest (`"name": "cbr0"`).
pub const CNI_NETWORK_NAME: &str = "cbr0";
/// Default directory of the CNI plugins (Debian's containernetworking-plugins).
pub const DEFAULT_CNI_PATH: &str = "/usr/lib/cni";
/// Bound on one plugin invocation; the bridge plugin takes tens of milliseconds.
const PLUGIN_TIMEOUT: Duration = Duration::from_secs(30);

/// The directory holding the CNI plugins: `$CNI_PATH` when set, else [`DEFAULT_CNI_PATH`].
pub fn cni_path() -> PathBuf {
    std::env::var_os("CNI_PATH").map_or_else(|| PathBuf::from(DEFAULT_CNI_PATH), PathBuf::from)
}

/// `subnet.env` as the flannel CNI plugin reads it: the agent library's one parser.
pub use flannel_agent::cni::SubnetEnv;

/// The delegate configuration flannel's CNI plugin would hand the `bridge` plugin for the
/// manifest's `{"hairpinMode": true, "isDefaultGateway": true}` delegate, given the text of a
/// node's `subnet.env` and the network `name`.
///
/// It has no `ipam.dataDir`, like flannel's: host-local then keeps its state in
/// `/var/lib/cni/networks`, so a caller that must not share that (the testbed) sets it.
pub fn cni_delegate_config(subnet_env_text: &str, name: &str) -> anyhow::Result<Value> {
    let env = SubnetEnv::parse(subnet_env_text)?;
    let ranges: Vec<Value> = [env.subnet, env.ipv6_subnet]
        .into_iter()
        .flatten()
        .map(|subnet| json!([{ "subnet": subnet.to_string() }]))
        .collect();
    let routes: Vec<Value> = env
        .networks
        .iter()
        .chain(&env.ipv6_networks)
        .map(|network| json!({ "dst": network.to_string() }))
        .collect();
    Ok(json!({
        "cniVersion": "0.3.1",
        "name": name,
        "type": "bridge",
        "bridge": "cni0",
        "isGateway": true,
        "isDefaultGateway": true,
        "hairpinMode": true,
        // If flanneld masquerades, the bridge plugin must not, and the other way round.
        "ipMasq": !env.ipmasq,
        "mtu": env.mtu,
        "ipam": {
            "type": "host-local",
            "ranges": ranges,
            "routes": routes,
        },
    }))
}

/// One CNI invocation: what the container runtime would pass in the environment.
#[derive(Debug, Clone)]
pub struct CniCall<'a> {
    /// The node namespace the plugin runs in (where `cni0` lives).
    pub node_netns: &'a str,
    /// `CNI_CONTAINERID`.
    pub container_id: &'a str,
    /// The pod's namespace, passed as `CNI_NETNS=/run/netns/<name>`.
    pub pod_netns: &'a str,
    /// `CNI_IFNAME`.
    pub ifname: &'a str,
}

/// Runs the plugin named by `config.type` with `CNI_COMMAND=ADD` inside the node namespace and
/// returns the addresses of the result.
pub async fn add(call: &CniCall<'_>, config: &Value) -> anyhow::Result<Vec<IpNet>> {
    add_in(&cni_path(), call, config).await
}

/// Runs the plugin with `CNI_COMMAND=DEL`, which releases the address and removes the veth.
pub async fn del(call: &CniCall<'_>, config: &Value) -> anyhow::Result<()> {
    del_in(&cni_path(), call, config).await
}

/// [`add`] with the plugins (and `CNI_PATH`) in `cni_path`.
pub async fn add_in(cni_path: &Path, call: &CniCall<'_>, config: &Value) -> anyhow::Result<Vec<IpNet>> {
    let stdout = invoke(cni_path, "ADD", call, config).await?;
    let result: Value = serde_json::from_str(&stdout)
        .with_context(|| format!("CNI ADD printed something that is not JSON: {stdout}"))?;
    result_addresses(&result)
}

/// [`del`] with the plugins (and `CNI_PATH`) in `cni_path`.
pub async fn del_in(cni_path: &Path, call: &CniCall<'_>, config: &Value) -> anyhow::Result<()> {
    invoke(cni_path, "DEL", call, config).await.map(drop)
}

async fn invoke(cni_path: &Path, command: &str, call: &CniCall<'_>, config: &Value) -> anyhow::Result<String> {
    let plugin_type = config["type"].as_str().context("CNI config without a type")?;
    let plugin = cni_path.join(plugin_type);
    if !plugin.exists() {
        bail!(
            "CNI plugin {} not found; install containernetworking-plugins or set CNI_PATH",
            plugin.display()
        );
    }
    let netns_path = netns::netns_path(call.pod_netns);
    let (plugin, cni_path, netns_path) = (path_str(&plugin)?, path_str(cni_path)?, path_str(&netns_path)?);
    let env = [
        ("CNI_COMMAND", command),
        ("CNI_CONTAINERID", call.container_id),
        ("CNI_NETNS", netns_path),
        ("CNI_IFNAME", call.ifname),
        ("CNI_PATH", cni_path),
    ];
    let input = serde_json::to_vec(config)?;
    let out = netns::output_with_env(
        "ip",
        &["netns", "exec", call.node_netns, plugin],
        &env,
        Some(&input),
        PLUGIN_TIMEOUT,
    )
    .await?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        // Plugins report errors as JSON on stdout ({"code", "msg", "details"}).
        bail!(
            "CNI {command} of {} in {} failed ({}): {} {}",
            call.container_id,
            call.node_netns,
            out.status,
            stdout.trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(stdout)
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))
}

/// The `ips[].address` values of a CNI result (0.3.x and 1.0 results look alike there).
pub fn result_addresses(result: &Value) -> anyhow::Result<Vec<IpNet>> {
    let ips = result["ips"]
        .as_array()
        .with_context(|| format!("CNI result without ips: {result}"))?;
    ips.iter()
        .map(|ip| {
            let address = ip["address"]
                .as_str()
                .with_context(|| format!("CNI ip without address: {ip}"))?;
            address.parse().with_context(|| format!("CNI address {address:?}"))
        })
        .collect()
}

/// The addresses of `nets` without their prefix lengths.
pub fn addrs(nets: &[IpNet]) -> Vec<IpAddr> {
    nets.iter().map(IpNet::addr).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn renders_the_flannel_delegate() {
        let config = cni_delegate_config(V4, "cbr0").unwrap();
        assert_eq!(
            config,
            json!({
                "cniVersion": "0.3.1", "name": "cbr0", "type": "bridge", "bridge": "cni0",
                "isGateway": true, "isDefaultGateway": true, "hairpinMode": true,
                "ipMasq": false, "mtu": 1450,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": "10.244.1.0/24"}]],
                    "routes": [{"dst": "10.244.0.0/16"}],
                },
            })
        );
    }

    #[test]
    fn dual_stack_adds_the_ipv6_range_and_route() {
        let text = format!("{V4}FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n");
        let text = text.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=false");
        let config = cni_delegate_config(&text, "n").unwrap();
        assert_eq!(config["ipMasq"], json!(true));
        assert_eq!(
            config["ipam"]["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]])
        );
        assert_eq!(
            config["ipam"]["routes"],
            json!([{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"}])
        );
    }

    #[test]
    fn ipv6_only_has_no_ipv4_range() {
        let text = "FLANNEL_IPV6_NETWORK=fd00::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\nFLANNEL_MTU=1430\nFLANNEL_IPMASQ=false\n";
        let config = cni_delegate_config(text, "n").unwrap();
        assert_eq!(config["ipam"]["ranges"], json!([[{"subnet": "fd00:0:0:5::/64"}]]));
    }

    #[test]
    fn missing_keys_are_named() {
        let err = cni_delegate_config("FLANNEL_NETWORK=10.0.0.0/8\n", "n").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("FLANNEL_SUBNET") && msg.contains("FLANNEL_MTU") && msg.contains("FLANNEL_IPMASQ"),
            "{msg}"
        );
        assert!(cni_delegate_config("FLANNEL_SUBNET=nonsense\n", "n").is_err());
    }

    #[test]
    fn ipmasq_is_true_only_when_exactly_true() {
        let text = V4.replace("FLANNEL_IPMASQ=true", "FLANNEL_IPMASQ=True");
        assert!(!SubnetEnv::parse(&text).unwrap().ipmasq);
    }

    #[test]
    fn reads_result_addresses() {
        let result = json!({
            "cniVersion": "0.3.1",
            "ips": [
                {"version": "4", "interface": 2, "address": "10.244.1.2/24", "gateway": "10.244.1.1"},
                {"version": "6", "interface": 2, "address": "fd00::2/64"},
            ],
        });
        let nets = result_addresses(&result).unwrap();
        assert_eq!(
            addrs(&nets),
            vec!["10.244.1.2".parse::<IpAddr>().unwrap(), "fd00::2".parse().unwrap()]
        );
        assert!(result_addresses(&json!({"code": 7})).is_err());
    }
}
