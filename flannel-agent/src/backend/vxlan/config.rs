//! The vxlan backend's options (`Backend` in net-conf.json) and the data it
//! publishes in, and reads from, leases (`BackendData`: `{"VNI":1,"VtepMAC":".."}`).

use serde_json::{Map, Value};

use crate::backend::BackendError;
use crate::config::get_ci;
use crate::netlink::MacAddr;

/// The largest VNI: the VXLAN header carries 24 bits.
const MAX_VNI: u64 = (1 << 24) - 1;

/// What the VXLAN header and UDP/IP add to every packet over an IPv4 underlay
/// (14 inner Ethernet + 8 VXLAN + 8 UDP + 20 IPv4). Upstream uses it for IPv6
/// underlays too, where the real cost is 70; kept for drop-in compatibility.
pub const OVERHEAD: u32 = 50;

/// The vxlan backend's options. Keys match case-insensitively, as Go's JSON
/// decoder does; unknown keys (such as the Windows-only `MacPrefix`) are ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VxlanOptions {
    /// `VNI`: the VXLAN network identifier, also in the device name (default 1).
    pub vni: u32,
    /// `Port`: UDP destination port; 0 leaves the kernel default (8472).
    pub port: u16,
    /// `GBP`: VXLAN Group Based Policy.
    pub gbp: bool,
    /// `Learning`: kernel MAC learning (default off: FDB entries are programmed).
    pub learning: bool,
    /// `MTU`: the underlay MTU; 0 means the external interface's.
    pub mtu: u32,
    /// `DirectRouting`: route directly (no encapsulation) to peers on the same link.
    pub direct_routing: bool,
    /// `Datapath` (flannel-rs addition): who encapsulates, the eBPF programs or the kernel.
    pub datapath: DatapathMode,
    /// `PodFastPath` (flannel-rs addition, eBPF datapath only): pod traffic to and from
    /// remote pods skips the pod bridge and the host's routing and netfilter.
    pub pod_fast_path: bool,
    /// `DecapMode` (flannel-rs addition, eBPF datapath only): `"tc"` (default) or `"xdp"`
    /// (decapsulate in XDP on the underlay device, for NICs with native XDP).
    pub decap_xdp: bool,
}

/// The `Datapath` option: `"auto"` (default), `"ebpf"` or `"kernel"`, any case.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DatapathMode {
    /// eBPF where the kernel can run it (and GBP is off), else the kernel datapath.
    #[default]
    Auto,
    /// The eBPF datapath, or a start-up error saying why it cannot run.
    Ebpf,
    /// The kernel's vxlan driver only, as upstream.
    Kernel,
}

impl DatapathMode {
    /// The option's value as written in net-conf.json.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Ebpf => "ebpf",
            Self::Kernel => "kernel",
        }
    }
}

impl Default for VxlanOptions {
    fn default() -> Self {
        VxlanOptions {
            vni: 1,
            port: 0,
            gbp: false,
            learning: false,
            mtu: 0,
            direct_routing: false,
            datapath: DatapathMode::Auto,
            pod_fast_path: false,
            decap_xdp: false,
        }
    }
}

fn datapath(obj: &Map<String, Value>) -> Result<DatapathMode, BackendError> {
    const EXPECTED: &str = r#"expected "auto", "ebpf" or "kernel""#;
    match get_ci(obj, "Datapath") {
        None | Some(Value::Null) => Ok(DatapathMode::Auto),
        Some(v @ Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(DatapathMode::Auto),
            "ebpf" => Ok(DatapathMode::Ebpf),
            "kernel" => Ok(DatapathMode::Kernel),
            _ => Err(opt_err("Datapath", v, EXPECTED)),
        },
        Some(v) => Err(opt_err("Datapath", v, EXPECTED)),
    }
}

/// `DecapMode`: `"tc"` (default) or `"xdp"`, any case; true for XDP.
fn decap_mode(obj: &Map<String, Value>) -> Result<bool, BackendError> {
    const EXPECTED: &str = r#"expected "tc" or "xdp""#;
    match get_ci(obj, "DecapMode") {
        None | Some(Value::Null) => Ok(false),
        Some(v @ Value::String(s)) => match s.to_ascii_lowercase().as_str() {
            "tc" | "" => Ok(false),
            "xdp" => Ok(true),
            _ => Err(opt_err("DecapMode", v, EXPECTED)),
        },
        Some(v) => Err(opt_err("DecapMode", v, EXPECTED)),
    }
}

fn opt_err(option: &'static str, value: &Value, expected: &str) -> BackendError {
    BackendError::Option {
        option,
        value: value.to_string(),
        expected: expected.into(),
    }
}

fn uint(obj: &Map<String, Value>, option: &'static str, max: u64, default: u64) -> Result<u64, BackendError> {
    match get_ci(obj, option) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= max)
            .ok_or_else(|| opt_err(option, v, &format!("expected a whole number from 0 to {max}"))),
    }
}

fn flag(obj: &Map<String, Value>, option: &'static str) -> Result<bool, BackendError> {
    match get_ci(obj, option) {
        None | Some(Value::Null) => Ok(false),
        Some(Value::Bool(b)) => Ok(*b),
        Some(v) => Err(opt_err(option, v, "expected true or false")),
    }
}

impl VxlanOptions {
    /// Reads the options from the raw `Backend` object.
    pub fn parse(backend: &Value) -> Result<Self, BackendError> {
        let empty = Map::new();
        let obj = match backend {
            Value::Object(o) => o,
            Value::Null => &empty,
            v => return Err(opt_err("Backend", v, "expected an object")),
        };
        let vni = uint(obj, "VNI", MAX_VNI, 1)? as u32;
        let mtu = uint(obj, "MTU", 65535, 0)? as u32;
        if mtu != 0 && mtu < 68 + OVERHEAD {
            return Err(opt_err(
                "MTU",
                &Value::from(mtu),
                &format!("the underlay MTU must leave at least 68 bytes after the {OVERHEAD}-byte VXLAN overhead"),
            ));
        }
        let datapath = datapath(obj)?;
        let pod_fast_path = flag(obj, "PodFastPath")?;
        if pod_fast_path && datapath == DatapathMode::Kernel {
            return Err(opt_err(
                "PodFastPath",
                &Value::Bool(true),
                "the pod fast path needs the eBPF datapath; set Datapath to \"ebpf\" or \"auto\", or PodFastPath to false",
            ));
        }
        let decap_xdp = decap_mode(obj)?;
        if decap_xdp && datapath == DatapathMode::Kernel {
            return Err(opt_err(
                "DecapMode",
                &Value::from("xdp"),
                "XDP decapsulation needs the eBPF datapath; set Datapath to \"ebpf\" or \"auto\", or DecapMode to \"tc\"",
            ));
        }
        Ok(VxlanOptions {
            vni,
            port: uint(obj, "Port", 65535, 0)? as u16,
            gbp: flag(obj, "GBP")?,
            learning: flag(obj, "Learning")?,
            mtu,
            direct_routing: flag(obj, "DirectRouting")?,
            datapath,
            pod_fast_path,
            decap_xdp,
        })
    }

    /// The IPv4 device name, `flannel.<VNI>`.
    pub fn v4_name(&self) -> String {
        format!("flannel.{}", self.vni)
    }

    /// The IPv6 device name, `flannel-v6.<VNI>`.
    pub fn v6_name(&self) -> String {
        format!("flannel-v6.{}", self.vni)
    }
}

/// `BackendData` (or `BackendV6Data`) of a vxlan lease, exactly as upstream
/// writes it: `{"VNI":<vni>,"VtepMAC":"<mac>"}`, keys in that order.
pub fn backend_data(vni: u32, mac: MacAddr) -> Value {
    let mut m = Map::new();
    m.insert("VNI".into(), Value::from(vni));
    m.insert("VtepMAC".into(), Value::String(mac.to_string()));
    Value::Object(m)
}

/// Reads a peer's VTEP MAC from its `BackendData`, refusing anything that would
/// program a wrong or dangerous FDB entry: a VNI other than ours (upstream does not
/// check, and its traffic would be dropped by the peer), or a MAC that is not
/// unicast (an all-zero MAC would become the default destination of the device).
pub fn peer_vtep_mac(data: Option<&Value>, our_vni: u32) -> Result<MacAddr, String> {
    let obj = match data {
        Some(Value::Object(o)) => o,
        None | Some(Value::Null) => return Err("no backend data".into()),
        Some(_) => return Err("backend data is not a JSON object".into()),
    };
    // Upstream always writes the VNI; a lease without one was not written by flannel.
    let vni = match get_ci(obj, "VNI") {
        None | Some(Value::Null) => return Err("no VNI".into()),
        Some(v) => v
            .as_u64()
            .filter(|n| *n <= MAX_VNI)
            .ok_or_else(|| format!("VNI {v} is not a valid VNI"))?,
    };
    if vni != u64::from(our_vni) {
        return Err(format!("VNI {vni} differs from this node's VNI {our_vni}"));
    }
    let mac: MacAddr = match get_ci(obj, "VtepMAC") {
        Some(Value::String(s)) => s.parse().map_err(|e: crate::netlink::MacParseError| e.to_string())?,
        Some(v) => return Err(format!("VtepMAC {v} is not a string")),
        None => return Err("no VtepMAC".into()),
    };
    if !mac.is_unicast() {
        return Err(format!("VtepMAC {mac} is not a unicast address"));
    }
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn defaults() {
        let o = VxlanOptions::parse(&json!({"Type": "vxlan"})).unwrap();
        assert_eq!(o, VxlanOptions::default());
        assert_eq!(
            (o.v4_name(), o.v6_name()),
            ("flannel.1".to_string(), "flannel-v6.1".to_string())
        );
    }

    #[test]
    fn options_are_case_insensitive() {
        let o = VxlanOptions::parse(&json!({
            "type": "vxlan", "vni": 42, "PORT": 4789, "gbp": true, "learning": true,
            "Mtu": 9000, "directrouting": true, "MacPrefix": "0E-2A"
        }))
        .unwrap();
        assert_eq!(
            o,
            VxlanOptions {
                vni: 42,
                port: 4789,
                gbp: true,
                learning: true,
                mtu: 9000,
                direct_routing: true,
                datapath: DatapathMode::Auto,
                pod_fast_path: false,
                decap_xdp: false,
            }
        );
        assert_eq!(o.v4_name(), "flannel.42");
        // An exact-case key wins over a differently cased one, as in Go.
        assert_eq!(VxlanOptions::parse(&json!({"vni": 3, "VNI": 4})).unwrap().vni, 4);
    }

    #[test]
    fn datapath_is_case_insensitive() {
        for (value, mode) in [
            ("auto", DatapathMode::Auto),
            ("EBPF", DatapathMode::Ebpf),
            ("eBPF", DatapathMode::Ebpf),
            ("Kernel", DatapathMode::Kernel),
        ] {
            let o = VxlanOptions::parse(&json!({"datapath": value})).unwrap();
            assert_eq!(o.datapath, mode, "{value}");
        }
    }

    #[test]
    fn pod_fast_path_is_opt_in() {
        assert!(!VxlanOptions::parse(&json!({})).unwrap().pod_fast_path);
        let o = VxlanOptions::parse(&json!({"podfastpath": true, "Datapath": "ebpf"})).unwrap();
        assert!(o.pod_fast_path);
        assert!(VxlanOptions::parse(&json!({"DecapMode": "XDP"})).unwrap().decap_xdp);
        assert!(!VxlanOptions::parse(&json!({"DecapMode": "tc"})).unwrap().decap_xdp);
    }

    #[test]
    fn bad_options_name_the_option() {
        for (doc, option) in [
            (json!({"VNI": "1"}), "VNI"),
            (json!({"VNI": 16777216}), "VNI"),
            (json!({"VNI": -1}), "VNI"),
            (json!({"VNI": 1.5}), "VNI"),
            (json!({"Port": 65536}), "Port"),
            (json!({"GBP": "true"}), "GBP"),
            (json!({"Learning": 1}), "Learning"),
            (json!({"DirectRouting": "yes"}), "DirectRouting"),
            (json!({"Datapath": "xdp"}), "Datapath"),
            (json!({"Datapath": true}), "Datapath"),
            (json!({"PodFastPath": "yes"}), "PodFastPath"),
            (json!({"DecapMode": "nic"}), "DecapMode"),
            (json!({"DecapMode": "xdp", "Datapath": "kernel"}), "DecapMode"),
            (json!({"PodFastPath": true, "Datapath": "kernel"}), "PodFastPath"),
            (json!({"MTU": 100}), "MTU"),
            (json!("vxlan"), "Backend"),
        ] {
            match VxlanOptions::parse(&doc) {
                Err(BackendError::Option { option: o, .. }) => assert_eq!(o, option, "{doc}"),
                other => panic!("{doc}: {other:?}"),
            }
        }
        // As upstream: an explicit 0 is VNI 0 (device flannel.0), not the default.
        assert_eq!(VxlanOptions::parse(&json!({"VNI": 0})).unwrap().vni, 0);
        assert_eq!(VxlanOptions::parse(&json!({"VNI": 16777215})).unwrap().vni, 16777215);
    }

    #[test]
    fn backend_data_is_byte_for_byte_upstream() {
        let mac: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(
            backend_data(1, mac).to_string(),
            r#"{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}"#
        );
        assert_eq!(peer_vtep_mac(Some(&backend_data(7, mac)), 7), Ok(mac));
    }

    #[test]
    fn peer_backend_data_is_parsed_strictly() {
        let mac: MacAddr = "c6:d2:32:6f:8f:44".parse().unwrap();
        assert_eq!(
            peer_vtep_mac(Some(&json!({"vni": 1, "vtepmac": "C6:D2:32:6F:8F:44"})), 1),
            Ok(mac)
        );
        for (data, why) in [
            (None, "no backend data"),
            (Some(json!(null)), "no backend data"),
            (Some(json!("x")), "not a JSON object"),
            (Some(json!({"VNI": 2, "VtepMAC": "c6:d2:32:6f:8f:44"})), "differs"),
            (
                Some(json!({"VNI": "1", "VtepMAC": "c6:d2:32:6f:8f:44"})),
                "not a valid VNI",
            ),
            (Some(json!({"VNI": 1})), "no VtepMAC"),
            (Some(json!({"VtepMAC": "c6:d2:32:6f:8f:44"})), "no VNI"),
            (Some(json!({"VNI": 1, "VtepMAC": 7})), "not a string"),
            (Some(json!({"VNI": 1, "VtepMAC": "c6:d2:32:6f:8f"})), "invalid MAC"),
            (Some(json!({"VNI": 1, "VtepMAC": "00:00:00:00:00:00"})), "not a unicast"),
            (Some(json!({"VNI": 1, "VtepMAC": "ff:ff:ff:ff:ff:ff"})), "not a unicast"),
            (Some(json!({"VNI": 1, "VtepMAC": "$(reboot)"})), "invalid MAC"),
        ] {
            let e = peer_vtep_mac(data.as_ref(), 1).unwrap_err();
            assert!(e.contains(why), "{data:?}: {e}");
        }
    }
}
