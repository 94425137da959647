//! The datapaths a benchmark compares. Each is nothing but a net-conf `Backend` object, so a
//! new option is a new line here; which datapath actually ran is read back from the nodes
//! (the eBPF datapath's packet counters after some pod traffic, and the BPF programs
//! attached), never assumed from what was asked.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

use crate::testbed::Testbed;

/// One datapath to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    /// Short name used on the command line and in the JSON (`host-gw`, `kernel`, ...).
    pub key: &'static str,
    /// What a reader sees in the table.
    pub title: &'static str,
    /// The net-conf `Backend` object.
    pub backend: &'static str,
    /// What has to be seen on the node for the row to measure what its title says.
    pub expects: Expect,
}

/// The datapath a variant asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Plain routes, no tunnel.
    HostGw,
    /// The kernel's `flannel.1`, no BPF program.
    KernelVxlan,
    /// `flannel_encap`/`flannel_decap` attached.
    EbpfVxlan,
    /// The eBPF datapath plus a flannel program on a pod-facing device.
    EbpfFastPath,
    /// The udp backend: TUN `flannel0` and the agent's userspace proxy.
    Udp,
}

/// The variants in table order; the first is the ceiling every ratio is taken against, the
/// second the baseline (upstream's datapath).
pub const VARIANTS: [Variant; 5] = [
    Variant {
        key: "host-gw",
        title: "host-gw (plain routing, the ceiling)",
        backend: r#"{"Type":"host-gw"}"#,
        expects: Expect::HostGw,
    },
    Variant {
        key: "kernel",
        title: "vxlan, kernel datapath (upstream's)",
        backend: r#"{"Type":"vxlan","Datapath":"kernel"}"#,
        expects: Expect::KernelVxlan,
    },
    Variant {
        key: "ebpf",
        title: "vxlan, eBPF datapath",
        backend: r#"{"Type":"vxlan","Datapath":"ebpf"}"#,
        expects: Expect::EbpfVxlan,
    },
    Variant {
        key: "ebpf-fastpath",
        title: "vxlan, eBPF datapath + PodFastPath",
        backend: r#"{"Type":"vxlan","Datapath":"ebpf","PodFastPath":true}"#,
        expects: Expect::EbpfFastPath,
    },
    Variant {
        key: "udp",
        title: "udp, userspace proxy over TUN",
        backend: r#"{"Type":"udp"}"#,
        expects: Expect::Udp,
    },
];

/// The key of the ceiling variant.
pub const CEILING: &str = "host-gw";
/// The key of the baseline variant.
pub const BASELINE: &str = "kernel";

/// The variant named `key`.
pub fn variant(key: &str) -> anyhow::Result<Variant> {
    VARIANTS.iter().copied().find(|v| v.key == key).with_context(|| {
        let keys: Vec<&str> = VARIANTS.iter().map(|v| v.key).collect();
        format!("unknown variant {key:?}; known: {}", keys.join(", "))
    })
}

impl Variant {
    /// The whole net-conf.json for a benchmark cluster (`10.244.0.0/16`, /24 per node).
    pub fn net_conf(&self) -> String {
        format!(r#"{{"Network":"10.244.0.0/16","Backend":{}}}"#, self.backend)
    }

    /// Whether the agent itself forwards the packets (so its build profile matters).
    pub fn agent_is_datapath(&self) -> bool {
        self.expects == Expect::Udp
    }

    /// Whether a failure to start this variant's agents means the option is not there yet
    /// (the row is "not available") rather than a broken benchmark.
    pub fn optional(&self) -> bool {
        matches!(self.expects, Expect::EbpfVxlan | Expect::EbpfFastPath)
    }

    /// Names what ran, given what was seen on the nodes: `Ok(label)` when the row can be
    /// measured (the label says which datapath it is), `Err(reason)` when the variant is not
    /// available because the agent ignored what it asks for.
    pub fn judge(&self, seen: &Observed) -> Result<String, String> {
        let ebpf = match (seen.encap_ran(), seen.decap_ran()) {
            (true, true) => Some("eBPF VXLAN (encap + decap)"),
            (true, false) => Some("eBPF VXLAN (encap only)"),
            (false, true) => Some("eBPF VXLAN (decap only)"),
            (false, false) => None,
        };
        let kernel = if seen.attached() {
            "kernel VXLAN (eBPF attached but handled no packet)"
        } else {
            "kernel VXLAN"
        };
        match (self.expects, ebpf) {
            (Expect::HostGw, _) => Ok("host-gw".into()),
            (Expect::Udp, _) if seen.tun => Ok("udp (TUN flannel0, userspace proxy)".into()),
            (Expect::Udp, _) => Err("no flannel0 TUN device on the node".into()),
            (Expect::KernelVxlan, Some(ebpf)) => Ok(format!("{ebpf}: Datapath \"kernel\" ignored!")),
            (Expect::KernelVxlan, None) => Ok(kernel.into()),
            (Expect::EbpfVxlan, Some(ebpf)) => Ok(ebpf.into()),
            (Expect::EbpfVxlan, None) => Ok(format!("{kernel}: Datapath \"ebpf\" not in effect")),
            (Expect::EbpfFastPath, None) => Err("the eBPF datapath is not in effect".into()),
            (Expect::EbpfFastPath, Some(ebpf)) => match seen.pod_side() {
                hooks if hooks.is_empty() => {
                    Err("the agent ignores PodFastPath: no flannel program on a pod-facing device".into())
                }
                _ if seen.fast_path_ran() => Ok(format!("{ebpf} + pod fast path (both ways)")),
                hooks => Ok(format!(
                    "{ebpf}; pod fast path attached ({}) but not used both ways",
                    hooks.join(", ")
                )),
            },
        }
    }
}

/// What a node pair shows about its datapath after some pod-to-pod traffic.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Observed {
    /// BPF programs attached in the client node's namespace, as `<device>/<hook>/<program>`
    /// (`bpftool net show`: netlink `cls_bpf` and XDP; bpftool 7.1 does not list TCX), and
    /// the TCX links the agents pinned, as `pin:<node>/<file>`.
    pub attachments: Vec<String>,
    /// The eBPF datapath's counters (`FLANNEL_STATS`), summed over both nodes; empty when no
    /// agent pinned them.
    pub counters: BTreeMap<String, u64>,
    /// Node 1 has the udp backend's TUN device `flannel0`.
    pub tun: bool,
}

impl Observed {
    /// Reads what nodes 1 and 2 show: attachments, link pins and counters.
    pub async fn of_nodes(tb: &mut Testbed) -> anyhow::Result<Self> {
        let mut seen = Self::default();
        for n in 1..=2 {
            let netns = tb.node(n).netns.clone();
            let out = tb
                .exec(&netns, "bpftool", &["-j", "net", "show"], Duration::from_secs(10))
                .await
                .context("listing BPF attachments (is bpftool installed?)")?;
            if n == 1 {
                seen.attachments = parse_bpftool_net(&out)?;
                seen.tun = tb.ip(&netns, &["link", "show", "flannel0"]).await.is_ok();
            }
            let pin_dir = tb.bpf_pin_dir(n)?;
            seen.attachments.extend(link_pins(&pin_dir, &tb.node(n).name));
            seen.add_counters(&pin_dir);
        }
        Ok(seen)
    }

    /// Adds the counters pinned under `pin_dir`, if any.
    fn add_counters(&mut self, pin_dir: &Path) {
        if let Ok(counters) = flannel_agent::dataplane::pinned_counters(pin_dir) {
            for (stat, value) in counters.iter() {
                *self.counters.entry(stat.name().to_owned()).or_default() += value;
            }
        }
        if let Ok(counters) = flannel_agent::dataplane::pinned_pod_counters(pin_dir) {
            for (stat, value) in counters.iter() {
                *self.counters.entry(stat.name().to_owned()).or_default() += value;
            }
        }
    }

    fn counter(&self, name: &str) -> u64 {
        self.counters.get(name).copied().unwrap_or(0)
    }

    /// `flannel_encap` (or the pod fast path's `flannel_pod_egress`) encapsulated packets.
    pub fn encap_ran(&self) -> bool {
        self.counter("encap_packets") + self.counter("pod_egress_encap_packets") > 0
    }

    /// The pod fast path carried packets both ways: out of a pod, and into one.
    pub fn fast_path_ran(&self) -> bool {
        self.counter("pod_egress_encap_packets") > 0 && self.counter("decap_to_pod_packets") > 0
    }

    /// `flannel_decap` decapsulated packets.
    pub fn decap_ran(&self) -> bool {
        self.counter("decap_packets") > 0
    }

    /// Some flannel program is attached (or its link pinned).
    pub fn attached(&self) -> bool {
        self.attachments.iter().any(|a| a.contains("flannel"))
    }

    /// Flannel hooks other than encap on the VXLAN device and decap on the underlay: the pod
    /// fast path's (on `cni0` or the pods' veths).
    pub fn pod_side(&self) -> Vec<String> {
        self.attachments
            .iter()
            .filter(|a| a.contains("flannel") && !a.ends_with("flannel_encap") && !a.ends_with("flannel_decap"))
            .cloned()
            .collect()
    }
}

/// The TCX link pins (`link_*`) in a node's pin directory, as `pin:<node>/<file>`.
fn link_pins(pin_dir: &Path, node: &str) -> Vec<String> {
    let Ok(dir) = std::fs::read_dir(pin_dir.join("v1")) else {
        return Vec::new();
    };
    let mut pins: Vec<String> = dir
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|name| name.starts_with("link_"))
        .map(|name| format!("pin:{node}/{name}"))
        .collect();
    pins.sort();
    pins
}

/// Parses `bpftool -j net show`: `[{"xdp":[{"devname":..,"name":..}],"tc":[{"devname":..,
/// "kind":"clsact/egress","name":..}],..}]` into `<device>/<hook>/<program>` strings.
pub fn parse_bpftool_net(json: &str) -> anyhow::Result<Vec<String>> {
    let value: Value = serde_json::from_str(json).with_context(|| format!("bpftool net show: {json}"))?;
    let mut out = Vec::new();
    for section in value.as_array().into_iter().flatten() {
        for (hook, entries) in section.as_object().into_iter().flatten() {
            for entry in entries.as_array().into_iter().flatten() {
                let field = |name: &str| entry.get(name).and_then(Value::as_str).unwrap_or("?").to_owned();
                let kind = entry.get("kind").and_then(Value::as_str).unwrap_or(hook);
                out.push(format!("{}/{kind}/{}", field("devname"), field("name")));
            }
        }
    }
    out.sort();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BPFTOOL: &str = r#"[{"xdp":[],"tc":[{"devname":"flannel.1","ifindex":4,"kind":"clsact/egress","name":"flannel_encap","prog_flags":[],"id":17},{"devname":"eth0","ifindex":2,"kind":"clsact/ingress","name":"flannel_decap","id":18}],"flow_dissector":[],"netfilter":[]}]"#;

    #[test]
    fn reads_attachments_and_judges() {
        let attachments = parse_bpftool_net(BPFTOOL).unwrap();
        assert_eq!(
            attachments,
            [
                "eth0/clsact/ingress/flannel_decap",
                "flannel.1/clsact/egress/flannel_encap"
            ]
        );
        let counters = [("encap_packets".to_owned(), 5), ("decap_packets".to_owned(), 4)].into();
        let seen = Observed {
            attachments,
            counters,
            tun: false,
        };
        assert!(seen.encap_ran() && seen.decap_ran() && seen.pod_side().is_empty());
        let none = Observed::default();
        assert_eq!(
            variant("ebpf").unwrap().judge(&seen).unwrap(),
            "eBPF VXLAN (encap + decap)"
        );
        assert!(variant("ebpf").unwrap().judge(&none).unwrap().contains("not in effect"));
        assert_eq!(variant("kernel").unwrap().judge(&none).unwrap(), "kernel VXLAN");
        assert!(variant("ebpf-fastpath").unwrap().judge(&seen).is_err());
        let mut fast = seen.clone();
        fast.attachments.push("pin:n1/link_flannel_pod_egress_7".into());
        let label = variant("ebpf-fastpath").unwrap().judge(&fast).unwrap();
        assert!(label.contains("not used"), "{label}");
        fast.counters.insert("pod_egress_encap_packets".into(), 3);
        fast.counters.insert("decap_to_pod_packets".into(), 3);
        let label = variant("ebpf-fastpath").unwrap().judge(&fast).unwrap();
        assert!(label.ends_with("+ pod fast path (both ways)"), "{label}");
        assert!(variant("udp").unwrap().judge(&seen).is_err());
        let udp = Observed {
            tun: true,
            ..Observed::default()
        };
        assert!(variant("udp").unwrap().judge(&udp).unwrap().starts_with("udp"));
        assert!(variant("nope").is_err());
    }
}
