//! The VXLAN device of one address family (`flannel.N` or `flannel-v6.N`): created
//! or adopted once, then checked on every reconcile.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::backend::BackendError;
use crate::netlink::{disable_accept_ra, LinkDetails, MacAddr, Netlink, NetlinkError, VxlanParams};

fn kernel(op: &'static str, object: &str, e: NetlinkError) -> BackendError {
    BackendError::Kernel {
        op,
        object: object.to_string(),
        detail: e.to_string(),
    }
}

/// Whether [`accept_ra_not_set`] has warned: a re-created device would repeat the same
/// warning, which says nothing new.
static ACCEPT_RA_WARNED: AtomicBool = AtomicBool::new(false);

/// `accept_ra=0` could not be written. Never fatal: in an unprivileged pod `/proc/sys` is
/// read-only, and the overlay works without it. Without IPv6 there is no such sysctl and
/// nothing to say; any other failure is one warning per process.
fn accept_ra_not_set(dev: &str, e: &std::io::Error) {
    if e.kind() == std::io::ErrorKind::NotFound {
        debug!(dev, error = %e, "no accept_ra sysctl (IPv6 disabled?): nothing to set");
    } else if !ACCEPT_RA_WARNED.swap(true, Ordering::Relaxed) {
        warn!(
            dev, error = %e,
            "cannot set net.ipv6.conf.{dev}.accept_ra=0 (is /proc/sys read-only, as in an unprivileged \
             container?); carrying on, but IPv6 router advertisements arriving over the overlay are not ignored"
        );
    }
}

/// One VXLAN device and what flannel keeps about it across reconciles.
#[derive(Clone, Debug)]
pub struct Vtep {
    /// `flannel.<VNI>` or `flannel-v6.<VNI>`.
    pub name: String,
    /// The parameters it must have.
    pub params: VxlanParams,
    /// Its MAC: the one published in our lease, so kept even if the device is
    /// deleted and made again (peers have it in their FDB).
    pub mac: MacAddr,
    /// The MTU a new device gets.
    pub mtu: u32,
    /// Its interface index when last seen.
    pub index: u32,
    /// Its address (`<subnet address>/32` or `/128`), once our lease is known.
    pub addr: Option<(IpAddr, u8)>,
    /// The underlay interface's name, to find its index again if it was re-created.
    pub ext_name: String,
}

/// Why an existing device cannot be used as is, worded as upstream's
/// `vxlanLinksIncompat`; `None` when it is compatible. Fields upstream leaves
/// unset on one side (index, local, group, port) are compared only when both are.
pub fn incompatible(have: &LinkDetails, want: &VxlanParams) -> Option<String> {
    let Some(h) = have.vxlan.as_ref() else {
        let kind = if have.kind.is_empty() {
            "device"
        } else {
            have.kind.as_str()
        };
        return Some(format!("link type: {kind} vs vxlan"));
    };
    if h.vni != want.vni {
        return Some(format!("vni: {} vs {}", h.vni, want.vni));
    }
    if h.dev_index > 0 && want.dev_index > 0 && h.dev_index != want.dev_index {
        return Some(format!(
            "vtep (external) interface: {} vs {}",
            h.dev_index, want.dev_index
        ));
    }
    if let (Some(a), Some(b)) = (h.local, want.local) {
        if a != b {
            return Some(format!("vtep (external) IP: {a} vs {b}"));
        }
    }
    if let (Some(a), Some(b)) = (h.group, want.group) {
        if a != b {
            return Some(format!("group address: {a} vs {b}"));
        }
    }
    if h.l2miss != want.l2miss {
        return Some(format!("l2miss: {} vs {}", h.l2miss, want.l2miss));
    }
    if h.port > 0 && want.port > 0 && h.port != want.port {
        return Some(format!("port: {} vs {}", h.port, want.port));
    }
    if h.gbp != want.gbp {
        return Some(format!("gbp: {} vs {}", h.gbp, want.gbp));
    }
    None
}

/// The address changes that leave exactly `want` as flannel's address on the
/// device, as upstream does: an IPv4 device loses its other addresses inside the
/// cluster `network`; an IPv6 device loses every other non-link-local address.
pub fn address_changes(
    current: &[(IpAddr, u8)],
    want: (IpAddr, u8),
    network: Option<IpNet>,
) -> (bool, Vec<(IpAddr, u8)>) {
    let add = !current.contains(&want);
    let remove = current
        .iter()
        .filter(|a| **a != want)
        .filter(|(ip, _)| match (ip, want.0) {
            (IpAddr::V4(_), IpAddr::V4(_)) => network.is_some_and(|n| n.contains(ip)),
            (IpAddr::V6(v6), IpAddr::V6(_)) => v6.segments()[0] & 0xffc0 != 0xfe80,
            _ => false,
        })
        .copied()
        .collect();
    (add, remove)
}

impl Vtep {
    /// Adopts a compatible device called `name` as is (MAC and MTU kept, so a
    /// restart keeps the VTEP MAC peers know), or (re)creates it with `mac` (the
    /// one this node published before, e.g. after a reboot) or a random MAC.
    pub async fn prepare(
        nl: &Netlink,
        name: String,
        params: VxlanParams,
        mtu: u32,
        ext_name: String,
        mac: Option<MacAddr>,
    ) -> Result<Self, BackendError> {
        let mut v = Vtep {
            name,
            params,
            mac: mac.unwrap_or_else(MacAddr::random_local),
            mtu,
            index: 0,
            addr: None,
            ext_name,
        };
        match nl
            .link_by_name(&v.name)
            .await
            .map_err(|e| kernel("get link", &v.name, e))?
        {
            Some(l) if incompatible(&l, &v.params).is_none() => {
                v.mac = l.mac.unwrap_or(v.mac);
                v.mtu = l.mtu;
                v.index = l.index;
                info!(dev = %v.name, mac = %v.mac, mtu = v.mtu, "adopting the existing VXLAN device");
            }
            Some(l) => v.recreate(nl, &l).await?,
            None => v.create(nl).await?,
        }
        Ok(v)
    }

    async fn create(&mut self, nl: &Netlink) -> Result<(), BackendError> {
        self.index = nl
            .create_vxlan(&self.name, &self.params, self.mac, self.mtu)
            .await
            .map_err(|e| kernel("create link", &self.name, e))?;
        info!(
            dev = %self.name, vni = self.params.vni, mac = %self.mac, mtu = self.mtu,
            local = ?self.params.local, underlay = %self.ext_name, "created the VXLAN device"
        );
        if let Err(e) = disable_accept_ra(&self.name) {
            accept_ra_not_set(&self.name, &e);
        }
        Ok(())
    }

    async fn recreate(&mut self, nl: &Netlink, old: &LinkDetails) -> Result<(), BackendError> {
        let why = incompatible(old, &self.params).unwrap_or_default();
        warn!(dev = %self.name, "{:?} already exists with incompatible configuration: {why}; recreating device", self.name);
        nl.delete_link(old.index)
            .await
            .map_err(|e| kernel("delete link", &self.name, e))?;
        self.create(nl).await
    }

    /// Makes the device right again: present (re-created with the same MAC if
    /// someone deleted it), compatible, with our MAC, our address, and up. Returns
    /// whether it was re-created, so the caller knows every entry on it is gone.
    pub async fn ensure(&mut self, nl: &Netlink, network: Option<IpNet>) -> Result<bool, BackendError> {
        let mut recreated = false;
        let found = nl
            .link_by_name(&self.name)
            .await
            .map_err(|e| kernel("get link", &self.name, e))?;
        let link = match found {
            Some(l) if incompatible(&l, &self.params).is_none() => l,
            other => {
                // The underlay may have been re-created too (deleting it deletes the
                // VXLAN device), so look its index up again.
                if let Some(ext) = nl
                    .link_by_name(&self.ext_name)
                    .await
                    .map_err(|e| kernel("get link", &self.ext_name, e))?
                {
                    self.params.dev_index = ext.index;
                }
                match other {
                    Some(l) => self.recreate(nl, &l).await?,
                    None => {
                        warn!(dev = %self.name, mac = %self.mac, "the VXLAN device is missing; re-creating it with the same MAC");
                        self.create(nl).await?;
                    }
                }
                recreated = true;
                nl.link_by_name(&self.name)
                    .await
                    .map_err(|e| kernel("get link", &self.name, e))?
                    .ok_or_else(|| BackendError::Kernel {
                        op: "get link",
                        object: self.name.clone(),
                        detail: "deleted right after it was created".into(),
                    })?
            }
        };
        self.index = link.index;
        let mut check_mac = recreated;
        if link.mac != Some(self.mac) {
            // Something (udev's MACAddressPolicy, an operator) changed it; peers still
            // send to the MAC in our lease.
            warn!(dev = %self.name, found = ?link.mac.map(|m| m.to_string()), want = %self.mac, "restoring the VXLAN device's MAC");
            nl.set_link_mac(link.index, self.mac)
                .await
                .map_err(|e| kernel("set link address", &self.name, e))?;
            check_mac = true;
        }
        if let Some(want) = self.addr {
            self.ensure_address(nl, want, network).await?;
        }
        if !link.up {
            nl.set_link_up(link.index)
                .await
                .map_err(|e| kernel("set link up", &self.name, e))?;
            check_mac = true;
        }
        if check_mac {
            self.verify_mac(nl).await?;
        }
        Ok(recreated)
    }

    async fn ensure_address(
        &self,
        nl: &Netlink,
        want: (IpAddr, u8),
        network: Option<IpNet>,
    ) -> Result<(), BackendError> {
        let current = nl
            .link_addresses(self.index)
            .await
            .map_err(|e| kernel("list addresses", &self.name, e))?;
        let (add, remove) = address_changes(&current, want, network);
        for (ip, len) in remove {
            nl.delete_address(self.index, ip, len)
                .await
                .map_err(|e| kernel("delete address", &self.name, e))?;
            info!(dev = %self.name, addr = %ip, prefix_len = len, "removed a stale address from the VXLAN device");
        }
        if add {
            nl.add_address(self.index, want.0, want.1)
                .await
                .map_err(|e| kernel("add address", &self.name, e))?;
            info!(dev = %self.name, addr = %want.0, prefix_len = want.1, "address set on the VXLAN device");
        }
        Ok(())
    }

    /// Upstream's check after bringing the link up (flannel-io/flannel#1795: udev
    /// rewrote the MAC of a new device behind flannel's back).
    async fn verify_mac(&self, nl: &Netlink) -> Result<(), BackendError> {
        let got = nl
            .link_by_name(&self.name)
            .await
            .map_err(|e| kernel("get link", &self.name, e))?
            .and_then(|l| l.mac);
        if got != Some(self.mac) {
            return Err(BackendError::Unsupported(format!(
                "{}'s mac address wanted: {}, but got: {}",
                self.name,
                self.mac,
                got.map_or_else(|| "none".to_string(), |m| m.to_string())
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vx(p: VxlanParams) -> LinkDetails {
        LinkDetails {
            index: 5,
            name: "flannel.1".into(),
            kind: "vxlan".into(),
            mac: None,
            mtu: 1450,
            up: true,
            vxlan: Some(p),
        }
    }

    #[test]
    fn compatibility_follows_upstream() {
        let want = VxlanParams {
            vni: 1,
            dev_index: 2,
            local: Some("192.168.0.1".parse().unwrap()),
            ..Default::default()
        };
        // The kernel reports the default port and unset fields; those do not count.
        let have = VxlanParams {
            port: 8472,
            dev_index: 0,
            ..want.clone()
        };
        assert_eq!(incompatible(&vx(have.clone()), &want), None);
        // Learning is not compared by upstream either.
        assert_eq!(
            incompatible(
                &vx(VxlanParams {
                    learning: true,
                    ..have.clone()
                }),
                &want
            ),
            None
        );
        let cases = [
            (VxlanParams { vni: 2, ..have.clone() }, "vni: 2 vs 1"),
            (
                VxlanParams {
                    dev_index: 3,
                    ..have.clone()
                },
                "vtep (external) interface: 3 vs 2",
            ),
            (
                VxlanParams {
                    local: Some("192.168.0.9".parse().unwrap()),
                    ..have.clone()
                },
                "vtep (external) IP: 192.168.0.9 vs 192.168.0.1",
            ),
            (
                VxlanParams {
                    l2miss: true,
                    ..have.clone()
                },
                "l2miss: true vs false",
            ),
            (
                VxlanParams {
                    gbp: true,
                    ..have.clone()
                },
                "gbp: true vs false",
            ),
        ];
        for (h, why) in cases {
            assert_eq!(incompatible(&vx(h), &want).as_deref(), Some(why));
        }
        assert_eq!(
            incompatible(
                &vx(have.clone()),
                &VxlanParams {
                    port: 4789,
                    ..want.clone()
                }
            )
            .as_deref(),
            Some("port: 8472 vs 4789")
        );
        let veth = LinkDetails {
            kind: "veth".into(),
            vxlan: None,
            ..vx(have)
        };
        assert_eq!(incompatible(&veth, &want).as_deref(), Some("link type: veth vs vxlan"));
    }

    #[test]
    fn address_rules() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let net = Some("10.244.0.0/16".parse().unwrap());
        let want = (ip("10.244.1.0"), 32);
        let cur = [(ip("10.244.7.0"), 32), (ip("192.168.5.1"), 24), want];
        assert_eq!(address_changes(&cur, want, net), (false, vec![(ip("10.244.7.0"), 32)]));
        assert_eq!(address_changes(&[], want, net), (true, vec![]));

        let want6 = (ip("fd00:1::"), 128);
        let cur6 = [(ip("fe80::1"), 64), (ip("fd00:7::"), 128), (ip("10.244.7.0"), 32)];
        assert_eq!(address_changes(&cur6, want6, None), (true, vec![(ip("fd00:7::"), 128)]));
    }
}
