//! Rendering the delegate's config from the network config and `subnet.env`, exactly as
//! upstream's plugin does (flannel-io/cni-plugin `flannel_linux.go`, `doCmdAdd` and
//! `getDelegateIPAM`): only missing keys get defaults, `ipam` is always flannel's.
//!
//! Go marshals maps with sorted keys, so the rendered config is sorted too: the bytes saved
//! for DEL are then the same as upstream's, and an upstream DEL can use a file this plugin
//! saved (and the other way round) across an upgrade.

use serde_json::{json, Map, Value};

use super::netconf::NetConf;
use super::subnet_env::SubnetEnv;

/// The delegate config for an ADD: `conf.delegate` with the network name, defaults for
/// `type` (bridge), `ipMasq` (the opposite of flanneld's), `mtu`, `isGateway` (bridge
/// only), the request's `cniVersion` and `runtimeConfig`, and an `ipam` with host-local
/// ranges from the node's subnets and routes to the cluster networks.
pub fn render(conf: &NetConf, env: &SubnetEnv) -> Value {
    let mut delegate = conf.delegate.clone().unwrap_or_default();
    delegate.insert("name".into(), conf.name.clone().into());
    delegate.entry("type").or_insert_with(|| "bridge".into());
    // If flanneld masquerades, the delegate must not, and the other way round.
    delegate.entry("ipMasq").or_insert_with(|| (!env.ipmasq).into());
    delegate.entry("mtu").or_insert_with(|| env.mtu.into());
    if delegate["type"] == "bridge" {
        // Pods route through the bridge's address, which lives in the node's subnet.
        delegate.entry("isGateway").or_insert(Value::Bool(true));
    }
    if !conf.cni_version.is_empty() {
        delegate.insert("cniVersion".into(), conf.cni_version.clone().into());
    }
    if let Some(runtime_config) = &conf.runtime_config {
        delegate.insert("runtimeConfig".into(), runtime_config.clone());
    }
    delegate.insert("ipam".into(), Value::Object(ipam(conf, env)));
    sorted(Value::Object(delegate))
}

fn ipam(conf: &NetConf, env: &SubnetEnv) -> Map<String, Value> {
    let mut ipam = conf.ipam.clone().unwrap_or_default();
    ipam.entry("type").or_insert_with(|| "host-local".into());
    let ranges: Vec<Value> = [
        env.subnet.filter(|s| s.addr().is_ipv4()),
        env.ipv6_subnet.filter(|s| s.addr().is_ipv6()),
    ]
    .into_iter()
    .flatten()
    .map(|subnet| json!([{ "subnet": subnet.to_string() }]))
    .collect();
    ipam.insert("ranges".into(), ranges.into());
    // The user's routes first, then one to each cluster network; NetConf::parse checked
    // that `routes` is a list.
    let mut routes = ipam
        .get("routes")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    routes.extend(
        env.networks
            .iter()
            .chain(&env.ipv6_networks)
            .map(|network| json!({ "dst": network.to_string() })),
    );
    ipam.insert("routes".into(), routes.into());
    ipam
}

/// `value` with the keys of every object in sorted order, as Go's `json.Marshal` of a map.
fn sorted(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(String, Value)> = map.into_iter().collect();
            entries.sort_by(|a, b| a.0.cmp(&b.0));
            Value::Object(entries.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    fn conf(json: &str) -> NetConf {
        NetConf::parse(json.as_bytes()).unwrap()
    }

    const MANIFEST: &str = r#"{"cniVersion":"0.3.1","name":"cbr0","type":"flannel",
        "delegate":{"hairpinMode":true,"isDefaultGateway":true}}"#;

    #[test]
    fn renders_the_manifest_delegate_byte_for_byte() {
        let rendered = render(&conf(MANIFEST), &SubnetEnv::parse(V4).unwrap());
        assert_eq!(
            serde_json::to_string(&rendered).unwrap(),
            r#"{"cniVersion":"0.3.1","hairpinMode":true,"ipMasq":false,"ipam":{"ranges":[[{"subnet":"10.244.1.0/24"}]],"routes":[{"dst":"10.244.0.0/16"}],"type":"host-local"},"isDefaultGateway":true,"isGateway":true,"mtu":1450,"name":"cbr0","type":"bridge"}"#
        );
    }

    #[test]
    fn dual_stack_gets_both_ranges_and_routes() {
        let text = format!("{V4}FLANNEL_IPV6_NETWORK=fd00:10:244::/56\nFLANNEL_IPV6_SUBNET=fd00:10:244:1::1/64\n")
            .replace("IPMASQ=true", "IPMASQ=false");
        let rendered = render(&conf(MANIFEST), &SubnetEnv::parse(&text).unwrap());
        assert_eq!(rendered["ipMasq"], true);
        assert_eq!(
            rendered["ipam"]["ranges"],
            json!([[{"subnet": "10.244.1.0/24"}], [{"subnet": "fd00:10:244:1::/64"}]])
        );
        assert_eq!(
            rendered["ipam"]["routes"],
            json!([{"dst": "10.244.0.0/16"}, {"dst": "fd00:10:244::/56"}])
        );
    }

    #[test]
    fn keeps_what_the_user_set() {
        let c = conf(
            r#"{"cniVersion":"1.0.0","name":"n","type":"flannel",
                "delegate":{"type":"ipvlan","ipMasq":true,"mtu":1400,"master":"eth0"},
                "ipam":{"type":"whereabouts","dataDir":"/x","routes":[{"dst":"192.168.0.0/16","gw":"10.244.1.1"}]},
                "runtimeConfig":{"portMappings":[]}}"#,
        );
        let rendered = render(&c, &SubnetEnv::parse(V4).unwrap());
        assert_eq!(rendered["type"], "ipvlan");
        assert_eq!(rendered["ipMasq"], true);
        assert_eq!(rendered["mtu"], 1400);
        assert_eq!(rendered.get("isGateway"), None, "isGateway is a bridge default only");
        assert_eq!(rendered["cniVersion"], "1.0.0");
        assert_eq!(rendered["runtimeConfig"], json!({"portMappings": []}));
        assert_eq!(rendered["ipam"]["type"], "whereabouts");
        assert_eq!(rendered["ipam"]["dataDir"], "/x");
        assert_eq!(
            rendered["ipam"]["routes"],
            json!([{"dst": "192.168.0.0/16", "gw": "10.244.1.1"}, {"dst": "10.244.0.0/16"}])
        );
    }

    #[test]
    fn no_delegate_means_a_plain_bridge() {
        let c = conf(r#"{"cniVersion":"0.4.0","name":"n","type":"flannel"}"#);
        let rendered = render(&c, &SubnetEnv::parse(V4).unwrap());
        assert_eq!(rendered["type"], "bridge");
        assert_eq!(rendered["isGateway"], true);
        assert_eq!(rendered["name"], "n");
    }
}
