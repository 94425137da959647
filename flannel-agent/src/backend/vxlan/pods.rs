//! The pod fast path's view of the local pods: which veth of the pod bridge each pod's
//! address is behind, and with which MAC, for `FLANNEL_LOCAL_PODS`.
//!
//! Source of truth, chosen to need nothing from the CNI plugin (pods made by upstream's
//! plugin work too) and to fail towards the kernel path:
//! * the bridge's IPv4 neighbour table (`ip neigh show dev cni0`): pod address -> pod MAC.
//!   An entry appears as soon as the pod ARPs for its gateway (its first packet off its
//!   subnet) or the host sends it a packet; entries without a link-layer address (incomplete,
//!   failed) are ignored;
//! * the bridge's learned FDB entries (`bridge fdb show br cni0`): pod MAC -> veth. The bridge
//!   learns them from the pod's first frame. Because fast-path traffic no longer crosses the
//!   bridge, an entry may later age out; the agent therefore remembers each MAC's veth for as
//!   long as that veth exists (and follows the FDB if the MAC shows up on another veth);
//! * only veths enslaved to the bridge, and only addresses inside this node's lease.
//!
//! A pod with no entry (not yet seen, or its veth gone) takes the kernel path, which itself
//! makes the neighbour and FDB entries that bring it onto the fast path at the next reconcile.

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr};

use flannel_common::LocalPod;
use ipnet::Ipv4Net;

use crate::netlink::{MacAddr, Neighbour};

/// The bridge the CNI plugin (flannel's, delegating to `bridge`) enslaves pod veths to.
pub const POD_BRIDGE: &str = "cni0";

/// The MAC -> veth knowledge that outlives FDB ageing.
#[derive(Debug, Default)]
pub struct PodPorts {
    /// Each pod MAC's veth index.
    mac_ports: HashMap<MacAddr, u32>,
}

impl PodPorts {
    /// Learns from the bridge's current FDB (`learned`: MAC, port) and forgets MACs whose
    /// veth is not among `ports` any more.
    pub fn update(&mut self, ports: &BTreeMap<u32, String>, learned: &[(MacAddr, u32)]) {
        self.mac_ports.retain(|_, port| ports.contains_key(port));
        for (mac, port) in learned {
            if ports.contains_key(port) {
                self.mac_ports.insert(*mac, *port);
            }
        }
    }

    /// The fast-path entries for the bridge's `neighbours`: pods inside `subnet` whose MAC
    /// is known on a veth. `gw_mac` is the bridge's MAC.
    pub fn local_pods(
        &self,
        subnet: Ipv4Net,
        neighbours: &[Neighbour],
        gw_mac: MacAddr,
    ) -> BTreeMap<Ipv4Addr, LocalPod> {
        neighbours
            .iter()
            .filter_map(|n| {
                let IpAddr::V4(ip) = n.ip else { return None };
                let mac = n.mac?;
                if !subnet.contains(&ip) || ip == subnet.network() || ip == subnet.broadcast() || !mac.is_unicast() {
                    return None;
                }
                let ifindex = *self.mac_ports.get(&mac)?;
                Some((
                    ip,
                    LocalPod {
                        ifindex,
                        pod_mac: mac.0,
                        gw_mac: gw_mac.0,
                    },
                ))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(last: u8) -> MacAddr {
        MacAddr([0x0a, 0x58, 0x0a, 0xf4, 0x01, last])
    }

    fn neigh(ip: [u8; 4], m: Option<MacAddr>) -> Neighbour {
        Neighbour {
            ip: IpAddr::from(ip),
            mac: m,
            permanent: false,
        }
    }

    #[test]
    fn pods_need_an_address_in_the_lease_a_mac_and_a_live_veth() {
        let subnet: Ipv4Net = "10.244.1.0/24".parse().unwrap();
        let gw = mac(1);
        let mut ports = PodPorts::default();
        let veths = BTreeMap::from([(7, "veth7".to_owned()), (8, "veth8".to_owned())]);
        ports.update(&veths, &[(mac(2), 7), (mac(3), 8), (mac(9), 99)]);
        let neighbours = [
            neigh([10, 244, 1, 2], Some(mac(2))),
            neigh([10, 244, 1, 3], Some(mac(3))),
            neigh([10, 244, 1, 4], None),           // incomplete
            neigh([10, 244, 1, 9], Some(mac(9))),   // MAC on no veth of ours
            neigh([10, 244, 2, 2], Some(mac(2))),   // outside the lease
            neigh([10, 244, 1, 255], Some(mac(3))), // broadcast
        ];
        let pods = ports.local_pods(subnet, &neighbours, gw);
        assert_eq!(pods.len(), 2, "{pods:?}");
        let p = pods[&Ipv4Addr::new(10, 244, 1, 2)];
        assert_eq!((p.ifindex, p.pod_mac, p.gw_mac), (7, mac(2).0, gw.0));

        // The FDB entry of mac(2) ages out: the veth is still there, so it is remembered.
        ports.update(&veths, &[(mac(3), 8)]);
        assert_eq!(ports.local_pods(subnet, &neighbours, gw).len(), 2);
        // veth 7 goes away: its pod leaves the fast path.
        let veths = BTreeMap::from([(8, "veth8".to_owned())]);
        ports.update(&veths, &[]);
        let pods = ports.local_pods(subnet, &neighbours, gw);
        assert_eq!(pods.keys().copied().collect::<Vec<_>>(), [Ipv4Addr::new(10, 244, 1, 3)]);
        // The MAC moves to another veth.
        let veths = BTreeMap::from([(8, "veth8".to_owned()), (9, "veth9".to_owned())]);
        ports.update(&veths, &[(mac(3), 9)]);
        assert_eq!(
            ports.local_pods(subnet, &neighbours, gw)[&Ipv4Addr::new(10, 244, 1, 3)].ifindex,
            9
        );
    }
}
