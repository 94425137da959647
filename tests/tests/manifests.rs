//! manifests/kube-flannel.yml against the types of the Kubernetes API and against the agent:
//! every object parses as its k8s-openapi type, the flanneld arguments parse with flanneld's
//! own flag parser, net-conf.json with the agent's config parser, the conflist is one the
//! flannel CNI plugin accepts, and the RBAC rules are exactly the calls the agent makes.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use anyhow::{bail, Context};
use flannel_agent::cni::NetConf;
use flannel_agent::config::NetworkConfig;
use flannel_agent::flags::{self, Invocation};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Container, Namespace, Probe, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
// Through k8s-openapi, so that this crate needs no serde of its own.
use k8s_openapi::serde::{de::DeserializeOwned, Deserialize as _};
use serde_json::Value;

/// The objects of the manifest, each parsed into its type.
struct Manifest {
    namespace: Namespace,
    service_account: ServiceAccount,
    cluster_role: ClusterRole,
    binding: ClusterRoleBinding,
    config_map: ConfigMap,
    daemon_set: DaemonSet,
}

fn typed<T: DeserializeOwned>(doc: serde_norway::Value, kind: &str) -> anyhow::Result<T> {
    serde_norway::from_value(doc).with_context(|| format!("the {kind} does not parse as a {kind}"))
}

fn load() -> anyhow::Result<Manifest> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../manifests/kube-flannel.yml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let mut kinds: BTreeMap<String, serde_norway::Value> = BTreeMap::new();
    for document in serde_norway::Deserializer::from_str(&text) {
        let doc = serde_norway::Value::deserialize(document).context("a YAML document does not parse")?;
        if doc.is_null() {
            continue;
        }
        let kind = doc["kind"].as_str().context("an object without kind")?.to_owned();
        if kinds.insert(kind.clone(), doc).is_some() {
            bail!("two objects of kind {kind}");
        }
    }
    let mut take = |kind: &str| kinds.remove(kind).with_context(|| format!("no {kind} in the manifest"));
    let manifest = Manifest {
        namespace: typed(take("Namespace")?, "Namespace")?,
        service_account: typed(take("ServiceAccount")?, "ServiceAccount")?,
        cluster_role: typed(take("ClusterRole")?, "ClusterRole")?,
        binding: typed(take("ClusterRoleBinding")?, "ClusterRoleBinding")?,
        config_map: typed(take("ConfigMap")?, "ConfigMap")?,
        daemon_set: typed(take("DaemonSet")?, "DaemonSet")?,
    };
    if !kinds.is_empty() {
        bail!("unexpected objects: {:?}", kinds.keys().collect::<Vec<_>>());
    }
    Ok(manifest)
}

const NAMESPACE: &str = "kube-flannel";

fn containers(ds: &DaemonSet) -> (Vec<Container>, Container) {
    let pod = ds.spec.template.spec.clone().unwrap();
    let init = pod.init_containers.unwrap_or_default();
    let main = pod
        .containers
        .into_iter()
        .find(|c| c.name == "kube-flannel")
        .expect("kube-flannel container");
    (init, main)
}

#[test]
fn objects_parse_and_reference_each_other() -> anyhow::Result<()> {
    let m = load()?;
    assert_eq!(m.namespace.metadata.name.as_deref(), Some(NAMESPACE));
    assert_eq!(m.service_account.metadata.name.as_deref(), Some("flannel"));
    assert_eq!(m.service_account.metadata.namespace.as_deref(), Some(NAMESPACE));
    for ns in [&m.config_map.metadata.namespace, &m.daemon_set.metadata.namespace] {
        assert_eq!(ns.as_deref(), Some(NAMESPACE));
    }
    // The binding gives the role to the agent's service account.
    assert_eq!(m.binding.role_ref.kind, "ClusterRole");
    assert_eq!(
        m.binding.role_ref.api_group.as_deref(),
        Some("rbac.authorization.k8s.io")
    );
    assert_eq!(Some(&m.binding.role_ref.name), m.cluster_role.metadata.name.as_ref());
    let subjects = m.binding.subjects.clone().unwrap_or_default();
    assert_eq!(subjects.len(), 1);
    assert_eq!(subjects[0].kind, "ServiceAccount");
    assert_eq!(Some(&subjects[0].name), m.service_account.metadata.name.as_ref());
    assert_eq!(subjects[0].namespace.as_deref(), Some(NAMESPACE));
    let pod = m.daemon_set.spec.template.spec.as_ref().unwrap();
    assert_eq!(
        pod.service_account_name.as_ref(),
        m.service_account.metadata.name.as_ref()
    );
    // The selector selects the template.
    let spec = &m.daemon_set.spec;
    let labels = spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    for (k, v) in spec.selector.match_labels.clone().unwrap_or_default() {
        assert_eq!(labels.get(&k), Some(&v), "selector {k}={v} does not match the template");
    }
    Ok(())
}

#[test]
fn rbac_is_exactly_what_the_agent_calls() -> anyhow::Result<()> {
    let m = load()?;
    let mut granted: BTreeSet<(String, String)> = BTreeSet::new();
    for rule in m.cluster_role.rules.clone().unwrap_or_default() {
        assert_eq!(
            rule.api_groups.as_deref(),
            Some(&[String::new()][..]),
            "core API group only"
        );
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for resource in rule.resources.unwrap_or_default() {
            for verb in &rule.verbs {
                granted.insert((resource.clone(), verb.clone()));
            }
        }
    }
    // flannel-agent/src/subnet/kube: GET of its pod (node name), GET of nodes (its own, and
    // peers' pod CIDRs), LIST and WATCH of nodes, PATCH of nodes/status.
    let wanted: BTreeSet<(String, String)> = [
        ("pods", "get"),
        ("nodes", "get"),
        ("nodes", "list"),
        ("nodes", "watch"),
        ("nodes/status", "patch"),
    ]
    .into_iter()
    .map(|(r, v)| (r.to_owned(), v.to_owned()))
    .collect();
    assert_eq!(granted, wanted);
    Ok(())
}

#[test]
fn daemonset_runs_flanneld_with_valid_flags_and_probes() -> anyhow::Result<()> {
    let m = load()?;
    let pod = m.daemon_set.spec.template.spec.clone().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.priority_class_name.as_deref(), Some("system-node-critical"));
    let (_, main) = containers(&m.daemon_set);
    assert_eq!(main.command.as_deref(), Some(&["/opt/bin/flanneld".to_owned()][..]));
    let args = main.args.clone().unwrap_or_default();
    // The container's env could set FLANNELD_* too; it sets none, so the map is its env.
    let env: HashMap<String, String> = main
        .env
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect();
    assert!(env.keys().all(|k| !k.starts_with("FLANNELD_")));
    let parsed = flags::parse_from(std::iter::once("flanneld".to_owned()).chain(args.clone()), &env)
        .map_err(|e| anyhow::anyhow!("flanneld rejects {args:?}: {e}"))?;
    let Invocation::Run(flags) = parsed else {
        bail!("{args:?} is not a run of the daemon");
    };
    assert!(flags.kube_subnet_mgr && flags.ip_masq);
    assert_ne!(flags.healthz_port, 0, "the probes need the healthz server");
    assert_eq!(flags.net_config_path, PathBuf::from("/etc/kube-flannel/net-conf.json"));
    // The agent keeps installed what the init containers install (field problem B2).
    assert_eq!(flags.cni_plugin_source, PathBuf::from("/opt/bin/flannel"));
    assert_eq!(flags.cni_plugin_dest, PathBuf::from("/opt/cni/bin/flannel"));
    assert_eq!(flags.cni_conf_source, PathBuf::from("/etc/kube-flannel/cni-conf.json"));
    assert_eq!(flags.cni_conf_dest, PathBuf::from("/etc/cni/net.d/10-flannel.conflist"));

    // Both probes reach the healthz server, through the port number or the port's name.
    let port_of = |probe: &Option<Probe>, path: &str| -> i32 {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.clone())
            .expect("an httpGet probe");
        assert_eq!(get.path.as_deref(), Some(path));
        match get.port {
            IntOrString::Int(n) => n,
            IntOrString::String(name) => main
                .ports
                .iter()
                .flatten()
                .find(|p| p.name.as_deref() == Some(name.as_str()))
                .map(|p| p.container_port)
                .unwrap_or_else(|| panic!("no container port named {name}")),
        }
    };
    let healthz = i32::from(flags.healthz_port);
    assert_eq!(port_of(&main.liveness_probe, "/healthz"), healthz);
    assert_eq!(port_of(&main.readiness_probe, "/readyz"), healthz);

    // The node is found through the pod (needs POD_NAME and POD_NAMESPACE from the API).
    let field = |name: &str| {
        main.env
            .iter()
            .flatten()
            .find(|e| e.name == name)
            .and_then(|e| e.value_from.clone()?.field_ref)
            .map(|f| f.field_path)
    };
    assert_eq!(field("POD_NAME").as_deref(), Some("metadata.name"));
    assert_eq!(field("POD_NAMESPACE").as_deref(), Some("metadata.namespace"));
    assert!(env.contains_key("EVENT_QUEUE_DEPTH"));

    let security = main.security_context.clone().unwrap_or_default();
    assert_eq!(security.privileged, Some(false));
    let caps: BTreeSet<String> = security
        .capabilities
        .and_then(|c| c.add)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let want: BTreeSet<String> = ["NET_ADMIN", "NET_RAW", "BPF", "PERFMON", "SYS_ADMIN"]
        .map(String::from)
        .into();
    assert_eq!(caps, want);
    Ok(())
}

#[test]
fn every_mount_names_a_volume_and_the_paths_are_flannels() -> anyhow::Result<()> {
    let m = load()?;
    let pod = m.daemon_set.spec.template.spec.clone().unwrap();
    let volumes: HashMap<String, _> = pod
        .volumes
        .unwrap_or_default()
        .into_iter()
        .map(|v| (v.name.clone(), v))
        .collect();
    let (init, main) = containers(&m.daemon_set);
    let mut used = BTreeSet::new();
    let mut mounts = BTreeMap::new();
    for container in init.iter().chain([&main]) {
        for mount in container.volume_mounts.iter().flatten() {
            assert!(
                volumes.contains_key(&mount.name),
                "{} mounts {}, which is not a volume",
                container.name,
                mount.name
            );
            // Bidirectional propagation is refused for unprivileged containers.
            assert_ne!(mount.mount_propagation.as_deref(), Some("Bidirectional"));
            used.insert(mount.name.clone());
            mounts.insert((container.name.clone(), mount.name.clone()), mount.mount_path.clone());
        }
    }
    let unused: Vec<_> = volumes.keys().filter(|v| !used.contains(*v)).collect();
    assert!(unused.is_empty(), "volumes nobody mounts: {unused:?}");
    let host = |name: &str| volumes[name].host_path.clone().map(|h| (h.path, h.type_));
    assert_eq!(host("run"), Some(("/run/flannel".into(), None)));
    assert_eq!(host("cni-plugin"), Some(("/opt/cni/bin".into(), None)));
    assert_eq!(host("cni"), Some(("/etc/cni/net.d".into(), None)));
    assert_eq!(
        host("xtables-lock"),
        Some(("/run/xtables.lock".into(), Some("FileOrCreate".into())))
    );
    assert_eq!(host("bpffs").map(|h| h.0), Some("/sys/fs/bpf".into()));
    assert_eq!(
        volumes["flannel-cfg"].config_map.as_ref().map(|c| c.name.as_str()),
        m.config_map.metadata.name.as_deref()
    );
    // The agent's flags read /etc/kube-flannel/net-conf.json and write /run/flannel/subnet.env.
    assert_eq!(
        mounts[&("kube-flannel".into(), "flannel-cfg".into())].trim_end_matches('/'),
        "/etc/kube-flannel"
    );
    assert_eq!(mounts[&("kube-flannel".into(), "run".into())], "/run/flannel");
    assert_eq!(mounts[&("kube-flannel".into(), "bpffs".into())], "/sys/fs/bpf");
    // The host directories the agent keeps the plugin and the conflist in.
    assert_eq!(mounts[&("kube-flannel".into(), "cni-plugin".into())], "/opt/cni/bin");
    assert_eq!(mounts[&("kube-flannel".into(), "cni".into())], "/etc/cni/net.d");

    // The init containers put the plugin and the conflist where the runtime looks.
    let script = |name: &str| -> String {
        let c = init
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no init container {name}"));
        c.command
            .iter()
            .flatten()
            .chain(c.args.iter().flatten())
            .cloned()
            .collect::<Vec<_>>()
            .join(" ")
    };
    assert!(script("install-cni-plugin").contains("/opt/cni/bin/flannel"));
    assert!(script("install-cni").contains("/etc/cni/net.d/10-flannel.conflist"));
    Ok(())
}

#[test]
fn config_map_holds_a_valid_net_conf_and_conflist() -> anyhow::Result<()> {
    let m = load()?;
    let data = m.config_map.data.clone().context("the ConfigMap has no data")?;
    let net_conf = data.get("net-conf.json").context("no net-conf.json")?;
    // Kube mode does not run CheckNetworkConfig, but a config that fails it is still wrong.
    let cfg = NetworkConfig::parse_and_check(net_conf).map_err(|e| anyhow::anyhow!("net-conf.json: {e}"))?;
    assert_eq!(cfg.network, Some("10.244.0.0/16".parse()?));
    assert_eq!(cfg.backend_type, "vxlan");
    assert!(!cfg.enable_nftables);

    let conflist: Value = serde_json::from_str(data.get("cni-conf.json").context("no cni-conf.json")?)?;
    assert_eq!(conflist["name"], "cbr0");
    let version = conflist["cniVersion"].as_str().context("no cniVersion")?;
    let plugins = conflist["plugins"].as_array().context("no plugins")?;
    assert_eq!(plugins[0]["type"], "flannel");
    assert_eq!(plugins.get(1).map(|p| &p["type"]), Some(&Value::from("portmap")));
    assert_eq!(plugins[1]["capabilities"]["portMappings"], true);
    // What the runtime hands the plugin: the entry with the list's name and version.
    let mut entry = plugins[0].clone();
    entry["name"] = conflist["name"].clone();
    entry["cniVersion"] = version.into();
    let conf = NetConf::parse(&serde_json::to_vec(&entry)?).map_err(|e| anyhow::anyhow!("flannel entry: {e}"))?;
    assert_eq!(conf.subnet_file, PathBuf::from("/run/flannel/subnet.env"));
    let delegate = conf.delegate.context("no delegate")?;
    assert_eq!(delegate["hairpinMode"], true);
    assert_eq!(delegate["isDefaultGateway"], true);
    Ok(())
}
