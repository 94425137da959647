//! The datapath's configuration, and what it reads from the node to complete it.

use std::{ffi::CString, fs, io, net::Ipv4Addr, path::PathBuf};

use super::{AttachMode, DataplaneError};

/// Whether GRO aggregates are decapsulated in BPF or left to `flannel.<VNI>`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GsoDecap {
    /// Only where the kernel can clear the tunnel GSO state on decapsulation
    /// (`BPF_F_ADJ_ROOM_DECAP_L4_UDP`); see [`flannel_common::CFG_F_DECAP_GSO`].
    #[default]
    Auto,
    /// Always. On kernels without `DECAP_L4_UDP` the decapsulated packets keep
    /// `skb->encapsulation` and `SKB_GSO_UDP_TUNNEL`, which is fine for delivery to local pods
    /// over veth but can break when they are forwarded to a device that segments in software.
    /// For measurements.
    Force,
    /// Never.
    Off,
}

/// What the datapath needs to know about this node. The vxlan backend has all of it once
/// `flannel.<VNI>` is prepared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DatapathConfig {
    /// `flannel.<VNI>`: encap runs on its egress, decapsulated frames enter through it.
    pub vxlan_dev: String,
    /// The underlay device (flannel's external interface): decap runs on its ingress.
    pub uplink_dev: String,
    /// This node's VTEP address (`PublicIP`, the `local` address of `flannel.<VNI>`).
    pub vtep_ip: Ipv4Addr,
    /// The MAC address of `flannel.<VNI>` (our lease's `VtepMAC`).
    pub vtep_mac: [u8; 6],
    /// The VNI.
    pub vni: u32,
    /// The VXLAN UDP port.
    pub port: u16,
    /// Attach `flannel_decap` (else only encapsulation runs in BPF).
    pub decap: bool,
    /// GRO aggregates on decapsulation.
    pub gso_decap: GsoDecap,
    /// How to attach.
    pub attach: AttachMode,
    /// The pod fast path (vxlan option `PodFastPath`): `flannel_pod_egress` on pod veths and
    /// delivery of decapsulated packets straight into local pods.
    pub pod_fast_path: bool,
    /// Decapsulate in XDP on the underlay device too (vxlan option `DecapMode: "xdp"`):
    /// `flannel_xdp_decap` strips, `flannel_decap` delivers. Needs `decap`.
    pub decap_xdp: bool,
    /// The outer UDP source port range `[min, max)`; `None` copies
    /// `net.ipv4.ip_local_port_range`, which is what a vxlan device with `srcport 0 0` (as
    /// flannel creates it) uses.
    pub src_port_range: Option<(u16, u16)>,
}

impl DatapathConfig {
    /// The configuration for a device made as upstream flannel makes it: decap on, GSO
    /// decapsulation and attach mode automatic, the netns's source port range.
    pub fn new(vxlan_dev: &str, uplink_dev: &str, vtep_ip: Ipv4Addr, vtep_mac: [u8; 6], vni: u32, port: u16) -> Self {
        Self {
            vxlan_dev: vxlan_dev.to_owned(),
            uplink_dev: uplink_dev.to_owned(),
            vtep_ip,
            vtep_mac,
            vni,
            port,
            decap: true,
            gso_decap: GsoDecap::Auto,
            attach: AttachMode::Auto,
            pod_fast_path: false,
            decap_xdp: false,
            src_port_range: None,
        }
    }

    pub(super) fn validate(&self) -> Result<(), DataplaneError> {
        let invalid = |field, detail: &str| {
            Err(DataplaneError::Config {
                field,
                detail: detail.to_owned(),
            })
        };
        if self.vni >= 1 << 24 {
            return invalid("vni", "must be below 2^24");
        }
        if self.port == 0 {
            return invalid("port", "must not be 0");
        }
        if self.vtep_ip.is_unspecified() || self.vtep_ip.is_multicast() || self.vtep_ip.is_broadcast() {
            return invalid("vtep_ip", "must be a unicast address");
        }
        if self.vtep_mac == [0; 6] || self.vtep_mac[0] & 1 != 0 {
            return invalid("vtep_mac", "must be a unicast MAC address");
        }
        if self.decap_xdp && !self.decap {
            return invalid("decap_xdp", "needs decap (flannel_decap delivers what XDP strips)");
        }
        if let Some((min, max)) = self.src_port_range {
            if min >= max {
                return invalid("src_port_range", "must be a non-empty range");
            }
        }
        Ok(())
    }
}

/// The index of a device in the calling thread's network namespace.
pub fn ifindex(name: &str) -> Result<u32, DataplaneError> {
    let error = |source| DataplaneError::Interface {
        name: name.to_owned(),
        source,
    };
    let c_name = CString::new(name).map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call.
    match unsafe { libc::if_nametoindex(c_name.as_ptr()) } {
        0 => Err(error(io::Error::last_os_error())),
        index => Ok(index),
    }
}

/// Reads a sysctl of the calling thread's network namespace.
fn read_sysctl(path: &str) -> Result<String, DataplaneError> {
    fs::read_to_string(path).map_err(|source| DataplaneError::Io {
        op: "read",
        path: PathBuf::from(path),
        source,
    })
}

/// `net.ipv4.ip_local_port_range`, as `[min, max)` for the source port formula.
pub fn local_port_range() -> Result<(u16, u16), DataplaneError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_local_port_range";
    let text = read_sysctl(PATH)?;
    parse_port_range(&text).ok_or_else(|| DataplaneError::Config {
        field: "src_port_range",
        detail: format!("{PATH} holds {text:?}, not two ports"),
    })
}

/// Parses "32768\t60999".
pub fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut ports = text.split_whitespace().map(str::parse::<u16>);
    let (min, max) = (ports.next()?.ok()?, ports.next()?.ok()?);
    (min < max).then_some((min, max))
}

/// `net.ipv4.ip_default_ttl`: the outer TTL of a `ttl auto` vxlan device on a route without a
/// hop limit.
pub fn default_ttl() -> Result<u8, DataplaneError> {
    const PATH: &str = "/proc/sys/net/ipv4/ip_default_ttl";
    let text = read_sysctl(PATH)?;
    text.trim().parse().map_err(|_| DataplaneError::Config {
        field: "ttl",
        detail: format!("{PATH} holds {text:?}"),
    })
}
