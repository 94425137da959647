//! Converting a delegate's ADD result to the version the runtime asked for.
//!
//! The delegate normally answers in the request's version (it gets the same
//! `cniVersion`), and then its output is passed on untouched. A delegate config saved by
//! an older plugin, or a delegate that pins its own version, can answer in another one.
//! Between the versions this plugin speaks the only difference in a result is the
//! `ips[].version` field: present ("4"/"6") up to 0.4.0, gone from 1.0.0 on.

use serde_json::Value;

use super::error::PluginError;

/// Whether results of `version` carry `ips[].version` (the 0.3/0.4 format).
fn has_ip_versions(version: &str) -> bool {
    version.starts_with("0.3.") || version == "0.4.0"
}

/// `result` in `to`'s format, with `cniVersion` set to `to`.
pub fn convert(mut result: Value, to: &str) -> Result<Value, PluginError> {
    let from = result["cniVersion"].as_str().unwrap_or_default().to_owned();
    if from == to {
        return Ok(result);
    }
    if !(has_ip_versions(&from) || from.starts_with("1.")) {
        return Err(PluginError::IncompatibleVersion {
            version: from,
            supported: "results of 0.3.0 and later".into(),
        });
    }
    let Some(object) = result.as_object_mut() else {
        return Err(PluginError::InvalidConfig(
            "the delegate's result is not an object".into(),
        ));
    };
    object.insert("cniVersion".into(), to.into());
    if let Some(ips) = object.get_mut("ips").and_then(Value::as_array_mut) {
        for ip in ips.iter_mut().filter_map(Value::as_object_mut) {
            if has_ip_versions(to) {
                let v6 = ip
                    .get("address")
                    .and_then(Value::as_str)
                    .is_some_and(|a| a.contains(':'));
                ip.insert("version".into(), if v6 { "6" } else { "4" }.into());
            } else {
                ip.remove("version");
            }
        }
    }
    Ok(result)
}

/// `result` with every route that has no `gw` given the gateway of the first address of
/// its family: the gateway ADD installed it with (libcni's `ipam.ConfigureIface` does
/// that). host-local returns flannel's routes without one, and the bridge plugin's CHECK
/// looks routes up by destination *and* gateway, so without this every CHECK of a flannel
/// pod would fail with "Expected Route ... not found in routing table".
pub fn with_route_gateways(mut result: Value) -> Value {
    let gateway = |v6: bool| {
        result["ips"].as_array().and_then(|ips| {
            ips.iter()
                .filter(|ip| ip["address"].as_str().is_some_and(|a| a.contains(':') == v6))
                .find_map(|ip| ip["gateway"].as_str().map(str::to_owned))
        })
    };
    let (v4, v6) = (gateway(false), gateway(true));
    if let Some(routes) = result.get_mut("routes").and_then(Value::as_array_mut) {
        for route in routes.iter_mut().filter_map(Value::as_object_mut) {
            let Some(dst) = route.get("dst").and_then(Value::as_str) else {
                continue;
            };
            let gw = if dst.contains(':') { &v6 } else { &v4 };
            if let (None, Some(gw)) = (route.get("gw"), gw) {
                route.insert("gw".into(), gw.clone().into());
            }
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn same_version_is_untouched() {
        let r = json!({"cniVersion": "0.3.1", "ips": [{"version": "4", "address": "10.0.0.2/24"}], "x": 1});
        assert_eq!(convert(r.clone(), "0.3.1").unwrap(), r);
    }

    #[test]
    fn up_and_down() {
        let old = json!({"cniVersion": "0.4.0", "interfaces": [{"name": "eth0"}],
            "ips": [{"version": "4", "address": "10.0.0.2/24"}, {"version": "6", "address": "fd00::2/64"}]});
        let new = convert(old.clone(), "1.1.0").unwrap();
        assert_eq!(new["cniVersion"], "1.1.0");
        assert_eq!(
            new["ips"],
            json!([{"address": "10.0.0.2/24"}, {"address": "fd00::2/64"}])
        );
        assert_eq!(new["interfaces"], old["interfaces"]);
        let back = convert(new, "0.4.0").unwrap();
        assert_eq!(back, old);
    }

    #[test]
    fn routes_get_their_familys_gateway() {
        let r = json!({"cniVersion": "1.0.0",
            "ips": [{"address": "10.0.0.2/24", "gateway": "10.0.0.1"}, {"address": "fd00::2/64", "gateway": "fd00::1"}],
            "routes": [{"dst": "10.0.0.0/8"}, {"dst": "fd00::/48"}, {"dst": "0.0.0.0/0", "gw": "10.0.0.254"}]});
        assert_eq!(
            with_route_gateways(r)["routes"],
            json!([{"dst": "10.0.0.0/8", "gw": "10.0.0.1"}, {"dst": "fd00::/48", "gw": "fd00::1"},
                   {"dst": "0.0.0.0/0", "gw": "10.0.0.254"}])
        );
        let no_gateway = json!({"ips": [{"address": "10.0.0.2/24"}], "routes": [{"dst": "10.0.0.0/8"}]});
        assert_eq!(with_route_gateways(no_gateway.clone()), no_gateway);
    }

    #[test]
    fn refuses_pre_0_3_results() {
        assert!(convert(json!({"cniVersion": "0.2.0", "ip4": {}}), "1.0.0").is_err());
    }
}
