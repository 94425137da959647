//! Step (b) of a vxlan reconcile for one address family: dump the device's
//! neighbour and FDB tables and the main routing table, compare them with the
//! peers' entries, and apply the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{debug, info};

use super::device::Vtep;
use super::plan::{self, L2Plan};
use crate::backend::routes::{self, RTPROT_FLANNEL};
use crate::backend::BackendError;
use crate::netlink::{Netlink, NetlinkError, RouteEntry, RTPROT_KERNEL};
use crate::subnet::Lease;

/// With DirectRouting: the peers' public IPs that `ip route get` reaches with no
/// gateway, and the interface it uses; decided on every reconcile, as upstream
/// decides on every event, so a routing change is followed.
pub(super) async fn on_link_peers(nl: &Netlink, leases: &BTreeMap<&String, &Lease>, v6: bool) -> HashMap<IpAddr, u32> {
    let mut out = HashMap::new();
    for l in leases.values() {
        let Some((_, ip)) = routes::family_of(l, v6) else {
            continue;
        };
        match nl.next_hop(ip).await {
            Ok(hop) if hop.gateway.is_none() => {
                if let Some(oif) = hop.oif {
                    out.insert(ip, oif);
                }
            }
            Ok(_) => {}
            Err(e) => debug!(public_ip = %ip, error = %e, "route lookup failed; using the VXLAN device"),
        }
    }
    out
}

/// Per-reconcile counts and failures across both families.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) changes: usize,
    failed: Vec<(String, NetlinkError)>,
    /// Peers not fully programmed (a write failed, or their data is unusable).
    pub(super) failed_peers: HashSet<String>,
}

impl Tally {
    fn fail(&mut self, what: String, e: NetlinkError, peers: impl IntoIterator<Item = String>) {
        self.failed_peers.extend(peers);
        self.failed.push((what, e));
    }

    pub(super) fn finish(self, total: usize) -> Result<usize, BackendError> {
        if let Some((what, e)) = self.failed.first() {
            return Err(BackendError::Kernel {
                op: "reconcile",
                object: format!("{} of the vxlan entries (first: {what})", self.failed.len()),
                detail: e.to_string(),
            });
        }
        if self.changes > 0 {
            info!(vxlan_peers = total, changes = self.changes, "vxlan datapath reconciled");
        } else {
            debug!(vxlan_peers = total, "vxlan datapath in sync");
        }
        Ok(total - self.failed_peers.len().min(total))
    }
}

/// Step (b) for one family: dump, compare, and apply in the order that never
/// lets the kernel ARP for a peer: neighbours, FDB, routes; deletions in reverse.
pub(super) async fn sync_family(
    nl: &Netlink,
    vtep: &Vtep,
    v6: bool,
    network: Option<IpNet>,
    d: &plan::Desired,
    complete: bool,
    tally: &mut Tally,
) -> Result<(), BackendError> {
    let dump_err = |what: &'static str| {
        move |e: NetlinkError| BackendError::Kernel {
            op: what,
            object: vtep.name.clone(),
            detail: e.to_string(),
        }
    };
    let neigh = nl
        .neighbours(vtep.index, v6)
        .await
        .map_err(dump_err("list neighbours"))?;
    let fdb = nl.fdb_entries(vtep.index).await.map_err(dump_err("list FDB entries"))?;
    let table = nl.main_routes(v6).await.map_err(dump_err("list routes"))?;
    let l2 = plan::plan_l2(&d.neigh, &d.fdb, &neigh, &fdb, complete);
    let owns = |e: &RouteEntry| {
        (e.oif == Some(vtep.index) && e.protocol != RTPROT_KERNEL)
            || (e.protocol == RTPROT_FLANNEL && network.is_some_and(|n| n.contains(&e.dst)))
    };
    let rp = routes::plan_routes(&d.routes, &table, owns, complete);
    tally.changes += l2.neigh_replace.len() + l2.fdb_replace.len() + l2.fdb_delete.len() + l2.neigh_delete.len();
    tally.changes += rp.replace.len() + rp.delete.len();
    let peers_of = |f: &dyn Fn(&plan::PeerEntries) -> bool| {
        d.peers
            .iter()
            .filter(|p| f(p))
            .map(|p| p.name.clone())
            .collect::<Vec<_>>()
    };
    let dev = |i: u32| {
        if i == vtep.index {
            vtep.name.clone()
        } else {
            format!("ifindex {i}")
        }
    };

    let l2_failed = apply_l2_adds(nl, vtep, &l2, d, tally).await;
    // A peer whose neighbour or FDB entry could not be written gets no route this
    // time: the route would make the kernel ARP into the overlay for its gateway.
    let mut rp = rp;
    rp.replace.retain(|(spec, _)| {
        !d.peers
            .iter()
            .any(|p| p.subnet == spec.dst && l2_failed.contains(&p.name))
    });
    for (dst, e) in routes::apply_replaces(nl, &rp, dev).await {
        tally.fail(format!("route {dst}"), e, peers_of(&|p| p.subnet == dst));
    }
    for (dst, e) in routes::apply_deletes(nl, &rp, dev).await {
        tally.fail(format!("delete route {dst}"), e, []);
    }
    apply_l2_deletes(nl, vtep, &l2, tally).await;
    Ok(())
}

/// Writes the neighbour and FDB entries; returns the peers one of them failed for.
async fn apply_l2_adds(
    nl: &Netlink,
    vtep: &Vtep,
    l2: &L2Plan,
    d: &plan::Desired,
    tally: &mut Tally,
) -> HashSet<String> {
    let dev = vtep.name.as_str();
    let mut failed = HashSet::new();
    for &(ip, mac) in &l2.neigh_replace {
        match nl.replace_neighbour(vtep.index, ip, mac).await {
            Ok(()) => info!(dev, %ip, %mac, "neighbour set"),
            Err(e) => {
                let who = d
                    .peers
                    .iter()
                    .filter(|p| p.vtep.is_some_and(|v| v.0 == ip))
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>();
                failed.extend(who.iter().cloned());
                tally.fail(format!("neighbour {ip}"), e, who);
            }
        }
    }
    for &(mac, dst) in &l2.fdb_replace {
        match nl.replace_fdb(vtep.index, mac, dst).await {
            Ok(()) => info!(dev, %mac, %dst, "FDB entry set"),
            Err(e) => {
                let who = d
                    .peers
                    .iter()
                    .filter(|p| p.vtep.is_some_and(|v| v.1 == mac))
                    .map(|p| p.name.clone())
                    .collect::<Vec<_>>();
                failed.extend(who.iter().cloned());
                tally.fail(format!("FDB entry {mac}"), e, who);
            }
        }
    }
    failed
}

async fn apply_l2_deletes(nl: &Netlink, vtep: &Vtep, l2: &L2Plan, tally: &mut Tally) {
    let dev = vtep.name.as_str();
    for f in &l2.fdb_delete {
        match nl.delete_fdb(vtep.index, f.mac, f.dst).await {
            Ok(()) => info!(dev, mac = %f.mac, dst = ?f.dst, "FDB entry removed"),
            Err(e) => tally.fail(format!("delete FDB entry {}", f.mac), e, []),
        }
    }
    for &ip in &l2.neigh_delete {
        match nl.delete_neighbour(vtep.index, ip).await {
            Ok(()) => info!(dev, %ip, "neighbour removed"),
            Err(e) => tally.fail(format!("delete neighbour {ip}"), e, []),
        }
    }
}
