//! Step (b) of a vxlan reconcile for one address family: dump the device's
//! neighbour and FDB tables and the main routing table, compare them with the
//! peers' entries, and apply the difference.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::IpAddr;
use std::time::{Duration, Instant};

use futures::stream::FuturesUnordered;
use futures::StreamExt;
use ipnet::IpNet;
use tracing::{debug, info, warn};

use super::device::Vtep;
use super::nexthops::{self, NexthopState};
use super::plan::{self, L2Plan};
use crate::backend::routes::{self, RTPROT_FLANNEL};
use crate::backend::BackendError;
use crate::netlink::{pipelined, FdbEntry, MacAddr, Netlink, NetlinkError, RouteEntry, RTPROT_KERNEL, WINDOW};
use crate::subnet::Lease;

/// With DirectRouting: the peers' public IPs that `ip route get` reaches with no
/// gateway, and the interface it uses; decided on every reconcile, as upstream
/// decides on every event, so a routing change is followed.
pub(super) async fn on_link_peers(nl: &Netlink, leases: &BTreeMap<&String, &Lease>, v6: bool) -> HashMap<IpAddr, u32> {
    let ips: HashSet<IpAddr> = leases
        .values()
        .filter_map(|l| routes::family_of(l, v6).map(|(_, ip)| ip))
        .collect();
    // Lookups are independent: many in flight, as for the writes.
    let mut pending = ips.into_iter();
    let mut running = FuturesUnordered::new();
    let mut out = HashMap::new();
    loop {
        while running.len() < WINDOW {
            let Some(ip) = pending.next() else { break };
            let nl = nl.clone();
            running.push(async move { (ip, nl.next_hop(ip).await) });
        }
        match running.next().await {
            None => return out,
            Some((ip, Ok(hop))) => {
                if let (None, Some(oif)) = (hop.gateway, hop.oif) {
                    out.insert(ip, oif);
                }
            }
            Some((ip, Err(e))) => debug!(public_ip = %ip, error = %e, "route lookup failed; using the VXLAN device"),
        }
    }
}

/// Per-reconcile counts, failures and timings across both families.
#[derive(Default)]
pub(super) struct Tally {
    pub(super) changes: usize,
    failed: Vec<(String, NetlinkError)>,
    /// Peers not fully programmed (a write failed, or their data is unusable).
    pub(super) failed_peers: HashSet<String>,
    /// Time spent per phase (`dump`, `plan`, `neigh_fdb`, `routes`, `deletes`, `map`), summed
    /// over the families: logged with the result, so a slow reconcile says where it went.
    phases: Vec<(&'static str, Duration)>,
}

impl Tally {
    /// Records one failed write and the peers it leaves unprogrammed. Each failure is
    /// logged with its object and peers, up to [`routes::LOG_EACH`] per reconcile; the
    /// rest are counted in the reconcile's error.
    pub(super) fn fail(&mut self, what: String, e: NetlinkError, peers: impl IntoIterator<Item = String>) {
        let peers: Vec<String> = peers.into_iter().collect();
        if self.failed.len() < routes::LOG_EACH {
            warn!(entry = %what, peers = ?peers, error = %e, "vxlan entry not programmed; the next reconcile retries it");
        }
        self.failed_peers.extend(peers);
        self.failed.push((what, e));
    }

    /// Adds `since.elapsed()` to phase `name`.
    pub(super) fn time(&mut self, name: &'static str, since: Instant) {
        let d = since.elapsed();
        match self.phases.iter_mut().find(|(n, _)| *n == name) {
            Some((_, t)) => *t += d,
            None => self.phases.push((name, d)),
        }
    }

    fn phase_ms(&self) -> String {
        let parts: Vec<String> = self
            .phases
            .iter()
            .map(|(n, d)| format!("{n}={:.1}", d.as_secs_f64() * 1e3))
            .collect();
        parts.join(" ")
    }

    pub(super) fn finish(self, total: usize) -> Result<usize, BackendError> {
        if let Some((what, e)) = self.failed.first() {
            return Err(BackendError::Kernel {
                op: "reconcile",
                object: format!(
                    "{} of the vxlan entries, for {} peers (first: {what})",
                    self.failed.len(),
                    self.failed_peers.len()
                ),
                detail: e.to_string(),
            });
        }
        if self.changes > 0 {
            info!(vxlan_peers = total, changes = self.changes, phase_ms = ?self.phase_ms(), "vxlan datapath reconciled");
        } else {
            debug!(vxlan_peers = total, phase_ms = ?self.phase_ms(), "vxlan datapath in sync");
        }
        Ok(total - self.failed_peers.len().min(total))
    }
}

/// Step (b) for one family: dump, compare, and apply in the order that never
/// lets the kernel ARP for a peer: neighbours, FDB, nexthop objects, routes; deletions in
/// reverse (a nexthop object goes last: deleting it deletes the routes still using it).
/// `nh` is the IPv4 family's nexthop state (`None` for IPv6, which stays on plain routes).
#[expect(clippy::too_many_arguments, reason = "one family's reconcile inputs, all distinct")]
pub(super) async fn sync_family(
    nl: &Netlink,
    vtep: &Vtep,
    v6: bool,
    network: Option<IpNet>,
    d: &plan::Desired,
    complete: bool,
    mut nh: Option<&mut NexthopState>,
    tally: &mut Tally,
) -> Result<(), BackendError> {
    let dump_err = |what: &'static str| {
        move |e: NetlinkError| BackendError::Kernel {
            op: what,
            object: vtep.name.clone(),
            detail: e.to_string(),
        }
    };
    let t = Instant::now();
    let neigh = nl
        .neighbours(vtep.index, v6)
        .await
        .map_err(dump_err("list neighbours"))?;
    let fdb = nl.fdb_entries(vtep.index).await.map_err(dump_err("list FDB entries"))?;
    let table = nl.main_routes(v6).await.map_err(dump_err("list routes"))?;
    let objects = match nh.as_deref() {
        Some(s) if s.supported => nl.nexthops().await.map_err(dump_err("list nexthop objects"))?,
        _ => Vec::new(),
    };
    tally.time("dump", t);
    let t = Instant::now();
    let l2 = plan::plan_l2(&d.neigh, &d.fdb, &neigh, &fdb, complete);
    let owns = |e: &RouteEntry| {
        (e.oif == Some(vtep.index) && e.protocol != RTPROT_KERNEL)
            || (e.protocol == RTPROT_FLANNEL && network.is_some_and(|n| n.contains(&e.dst)))
    };
    let mut want = d.routes.clone();
    let enabled = nh.as_deref().is_some_and(|s| s.enabled);
    let np = nexthops::plan_nexthops(&mut want, &objects, vtep.index, network, enabled, complete);
    if let Some(s) = nh.as_deref_mut() {
        nexthops::warn_foreign(s, &np);
    }
    let rp = routes::plan_routes(&want, &table, owns, complete);
    tally.changes += l2.neigh_replace.len() + l2.fdb_replace.len() + l2.fdb_delete.len() + l2.neigh_delete.len();
    tally.changes += np.write.len() + np.delete.len() + rp.replace.len() + rp.delete.len();
    let dev = |i: u32| {
        if i == vtep.index {
            vtep.name.clone()
        } else {
            format!("ifindex {i}")
        }
    };

    tally.time("plan", t);
    let t = Instant::now();
    let l2_failed = apply_l2_adds(nl, vtep, &l2, d, tally).await;
    tally.time("neigh_fdb", t);
    let t = Instant::now();
    // A peer whose neighbour or FDB entry could not be written gets no route this
    // time: the route would make the kernel ARP into the overlay for its gateway.
    let mut rp = rp;
    if !l2_failed.is_empty() {
        let held: HashSet<IpNet> = d
            .peers
            .iter()
            .filter(|p| l2_failed.contains(&p.name))
            .map(|p| p.subnet)
            .collect();
        rp.replace.retain(|(spec, _)| !held.contains(&spec.dst));
    }
    if let Some(s) = nh {
        nexthops::apply_writes(nl, &np, &mut rp, s).await;
    }
    let failed = routes::apply_replaces(nl, &rp, dev).await;
    // The routes still at the failed destinations keep their nexthop objects this time.
    let kept: Vec<&RouteEntry> = table.iter().filter(|e| failed.contains_key(&e.dst)).collect();
    if !failed.is_empty() {
        let by_subnet: HashMap<IpNet, &str> = d.peers.iter().map(|p| (p.subnet, p.name.as_str())).collect();
        for (dst, e) in failed {
            tally.fail(format!("route {dst}"), e, by_subnet.get(&dst).map(|n| (*n).to_owned()));
        }
    }
    tally.time("routes", t);
    let t = Instant::now();
    for (dst, e) in routes::apply_deletes(nl, &rp, dev).await {
        tally.fail(format!("delete route {dst}"), e, []);
    }
    nexthops::apply_deletes(nl, &np, &kept, tally).await;
    apply_l2_deletes(nl, vtep, &l2, tally).await;
    tally.time("deletes", t);
    Ok(())
}

/// Logs one change of a neighbour or FDB entry: one by one at `info` for a small batch,
/// at `debug` for a large one (see [`routes::LOG_EACH`]).
macro_rules! entry_log {
    ($each:expr, $($arg:tt)+) => {
        if $each {
            info!($($arg)+)
        } else {
            debug!($($arg)+)
        }
    };
}

/// Writes the neighbour and FDB entries, all in flight together (neither depends on the
/// other; only the routes must wait for both); returns the peers one of them failed for.
async fn apply_l2_adds(
    nl: &Netlink,
    vtep: &Vtep,
    l2: &L2Plan,
    d: &plan::Desired,
    tally: &mut Tally,
) -> HashSet<String> {
    #[derive(Clone, Copy)]
    enum Add {
        Neigh(IpAddr, MacAddr),
        Fdb(MacAddr, IpAddr),
    }
    let (dev, index) = (vtep.name.as_str(), vtep.index);
    let adds: Vec<Add> = l2
        .neigh_replace
        .iter()
        .map(|&(ip, mac)| Add::Neigh(ip, mac))
        .chain(l2.fdb_replace.iter().map(|&(mac, dst)| Add::Fdb(mac, dst)))
        .collect();
    let errors = pipelined(adds, |a| {
        let nl = nl.clone();
        async move {
            match a {
                Add::Neigh(ip, mac) => nl.replace_neighbour(index, ip, mac).await,
                Add::Fdb(mac, dst) => nl.replace_fdb(index, mac, dst).await,
            }
        }
    })
    .await;
    let mut failed = HashSet::new();
    let (mut bad_neigh, mut bad_fdb) = (HashSet::new(), HashSet::new());
    if !errors.is_empty() {
        // Which peers an entry serves, indexed only when something failed.
        let (mut by_gw, mut by_mac) = (
            HashMap::<IpAddr, Vec<&str>>::new(),
            HashMap::<MacAddr, Vec<&str>>::new(),
        );
        for p in &d.peers {
            if let Some((gw, mac, _)) = p.vtep {
                by_gw.entry(gw).or_default().push(&p.name);
                by_mac.entry(mac).or_default().push(&p.name);
            }
        }
        for (a, e) in errors {
            let (what, who) = match a {
                Add::Neigh(ip, _) => {
                    bad_neigh.insert(ip);
                    (format!("neighbour {ip}"), by_gw.get(&ip))
                }
                Add::Fdb(mac, _) => {
                    bad_fdb.insert(mac);
                    (format!("FDB entry {mac}"), by_mac.get(&mac))
                }
            };
            let who: Vec<String> = who.into_iter().flatten().map(|n| (*n).to_owned()).collect();
            failed.extend(who.iter().cloned());
            tally.fail(what, e, who);
        }
    }
    let each = l2.neigh_replace.len() + l2.fdb_replace.len() <= routes::LOG_EACH;
    for &(ip, mac) in l2.neigh_replace.iter().filter(|(ip, _)| !bad_neigh.contains(ip)) {
        entry_log!(each, dev, %ip, %mac, "neighbour set");
    }
    for &(mac, dst) in l2.fdb_replace.iter().filter(|(mac, _)| !bad_fdb.contains(mac)) {
        entry_log!(each, dev, %mac, %dst, "FDB entry set");
    }
    let (neigh_set, fdb_set) = (
        l2.neigh_replace.len() - bad_neigh.len(),
        l2.fdb_replace.len() - bad_fdb.len(),
    );
    if !each {
        info!(
            dev,
            neighbours = neigh_set,
            fdb_entries = fdb_set,
            failed = failed.len(),
            "neighbour and FDB entries set"
        );
    }
    failed
}

/// Removes the stale FDB entries, then the stale neighbours (each batch pipelined).
async fn apply_l2_deletes(nl: &Netlink, vtep: &Vtep, l2: &L2Plan, tally: &mut Tally) {
    let (dev, index) = (vtep.name.as_str(), vtep.index);
    let each = l2.fdb_delete.len() + l2.neigh_delete.len() <= routes::LOG_EACH;
    let bad_fdb = pipelined(l2.fdb_delete.clone(), |f| {
        let nl = nl.clone();
        async move { nl.delete_fdb(index, f.mac, f.dst).await }
    })
    .await;
    let bad: HashSet<FdbEntry> = bad_fdb.iter().map(|(f, _)| *f).collect();
    for f in l2.fdb_delete.iter().filter(|f| !bad.contains(f)) {
        entry_log!(each, dev, mac = %f.mac, dst = ?f.dst, "FDB entry removed");
    }
    let fdb_removed = l2.fdb_delete.len() - bad.len();
    for (f, e) in bad_fdb {
        tally.fail(format!("delete FDB entry {}", f.mac), e, []);
    }
    let bad_neigh = pipelined(l2.neigh_delete.clone(), |ip| {
        let nl = nl.clone();
        async move { nl.delete_neighbour(index, ip).await }
    })
    .await;
    let bad: HashSet<IpAddr> = bad_neigh.iter().map(|(ip, _)| *ip).collect();
    for ip in l2.neigh_delete.iter().filter(|ip| !bad.contains(ip)) {
        entry_log!(each, dev, %ip, "neighbour removed");
    }
    let neigh_removed = l2.neigh_delete.len() - bad.len();
    for (ip, e) in bad_neigh {
        tally.fail(format!("delete neighbour {ip}"), e, []);
    }
    if !each {
        info!(
            dev,
            fdb_entries = fdb_removed,
            neighbours = neigh_removed,
            "stale neighbour and FDB entries removed"
        );
    }
}
