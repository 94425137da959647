//! IPv4 peers' routes through nexthop objects: `ip nexthop add id <id> via <gw> dev
//! flannel.<VNI> onlink proto 102` and `ip route replace <subnet> nhid <id> proto 102`.
//!
//! Why: plain per-peer gateway routes through one device cost the kernel O(n²) to insert
//! (see `netlink::nexthop`); 10,000 took ≈ 3 s of route inserts alone, against ≈ 0.4 s
//! for the same through nexthop objects.
//!
//! Ids are derived from the gateway (the peer subnet's network address as a 32-bit
//! number), so an agent that restarts finds and adopts its objects without keeping state,
//! and two peers never share one. Ownership mirrors the routes' rule: an object is
//! flannel's when it is marked `proto 102` and its gateway lies inside the cluster network.
//! An object at one of our ids that is not ours (someone else's numbering happened to hit
//! it) is never touched: that peer keeps a plain route, and it is logged once.
//!
//! Falls back to plain routes for the whole process, with one log line, on a kernel
//! without nexthop objects (probed once in `prepare`) or when writing one fails for any
//! reason other than its id being taken. Our objects left from before are then garbage
//! collected like everything else, after the routes moved off them.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};

use ipnet::IpNet;
use tracing::{info, warn};

use super::sync::Tally;
use crate::backend::routes::{RoutePlan, LOG_EACH, RTPROT_FLANNEL};
use crate::netlink::{pipelined, Netlink, NetlinkError, NexthopEntry, NexthopSpec, RouteEntry, RouteSpec};

/// The nexthop id flannel uses for a peer whose route goes via `gateway`: the address
/// as a number. `None` for `0.0.0.0` (0 is not a valid id; no lease has it).
pub fn nexthop_id(gateway: Ipv4Addr) -> Option<u32> {
    Some(u32::from(gateway)).filter(|&id| id != 0)
}

/// Whether the backend routes IPv4 peers through nexthop objects, and what it has said.
#[derive(Debug, Default)]
pub(super) struct NexthopState {
    /// The kernel has nexthop objects (a dump works): ours are read and collected.
    pub supported: bool,
    /// Routes use them: supported, and no write has failed for a reason other than a
    /// taken id.
    pub enabled: bool,
    /// Why not, when not: for the status and the one log line.
    pub reason: Option<String>,
    /// Ids held by someone else's object, already warned about.
    warned: HashSet<u32>,
}

impl NexthopState {
    /// Probes the kernel once with a dump (`pretend_missing`: the test hook that makes the
    /// probe fail); logs the outcome when it means plain routes.
    pub async fn probe(nl: &Netlink, pretend_missing: bool) -> Self {
        let result = if pretend_missing {
            Err("the test hook FLANNEL_PRETEND_NO_NEXTHOPS is set".to_owned())
        } else {
            nl.nexthops().await.map(|_| ()).map_err(|e| e.to_string())
        };
        match result {
            Ok(()) => NexthopState {
                supported: true,
                enabled: true,
                ..Self::default()
            },
            Err(why) => {
                let reason = format!("the kernel has no nexthop objects (Linux 5.3 or later): {why}");
                warn!(reason = %reason, "vxlan: IPv4 peer routes are plain gateway routes (slower to program with thousands of peers)");
                NexthopState {
                    reason: Some(reason),
                    ..Self::default()
                }
            }
        }
    }

    /// `"nexthop"` or `"plain"`, and why, for `/status/datapath`.
    pub fn status(&self) -> serde_json::Value {
        serde_json::json!({
            "routes": if self.enabled { "nexthop" } else { "plain" },
            "reason": self.reason,
            "foreign_ids": self.warned.iter().collect::<std::collections::BTreeSet<_>>(),
        })
    }

    /// Turns nexthop objects off for good after a failed write, with the one log line.
    fn disable(&mut self, e: &NetlinkError) {
        if self.enabled {
            let reason = format!("writing a nexthop object failed: {e}");
            warn!(reason = %reason, "vxlan: IPv4 peer routes fall back to plain gateway routes");
            self.enabled = false;
            self.reason = Some(reason);
        }
    }
}

/// What one reconcile changes among the nexthop objects.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NexthopPlan {
    /// Objects to write; `true`: replace ours in place, `false`: create (fails if taken).
    pub write: Vec<(NexthopSpec, bool)>,
    /// Our objects no route wants any more.
    pub delete: Vec<u32>,
    /// Ids someone else's object holds, with that object: those peers stay on plain routes.
    pub foreign: Vec<NexthopEntry>,
}

/// Rewrites the desired encapsulated IPv4 routes (through `dev`, `onlink`) to go through
/// nexthop objects when `enabled`, and plans the objects: create what is missing, replace
/// ours that differ, and (only when `complete`) delete ours no route wants. Linear: the
/// dump is indexed by id once.
pub fn plan_nexthops(
    routes: &mut BTreeMap<IpNet, RouteSpec>,
    actual: &[NexthopEntry],
    dev: u32,
    network: Option<IpNet>,
    enabled: bool,
    complete: bool,
) -> NexthopPlan {
    let owns = |e: &NexthopEntry| {
        e.protocol == RTPROT_FLANNEL && !e.special && e.gateway.is_some_and(|g| network.is_some_and(|n| n.contains(&g)))
    };
    let by_id: HashMap<u32, &NexthopEntry> = actual.iter().map(|e| (e.id, e)).collect();
    let mut plan = NexthopPlan::default();
    let mut wanted = HashSet::new();
    for route in routes.values_mut().filter(|r| enabled && r.oif == dev && r.onlink) {
        let (IpNet::V4(_), IpAddr::V4(gateway)) = (route.dst, route.gateway) else {
            continue;
        };
        let Some(id) = nexthop_id(gateway) else { continue };
        let spec = NexthopSpec {
            id,
            gateway,
            oif: dev,
            protocol: RTPROT_FLANNEL,
        };
        match by_id.get(&id) {
            Some(e) if !owns(e) => {
                if !plan.foreign.contains(e) {
                    plan.foreign.push(**e);
                }
                continue;
            }
            Some(e) if e.is(&spec) => {}
            found => {
                // Two subnets with one network address (overlapping leases) share the object.
                if !wanted.contains(&id) {
                    plan.write.push((spec, found.is_some()));
                }
            }
        }
        wanted.insert(id);
        route.nhid = Some(id);
    }
    if complete {
        plan.delete.extend(
            actual
                .iter()
                .filter(|e| owns(e) && !wanted.contains(&e.id))
                .map(|e| e.id),
        );
    }
    plan
}

/// Warns once per id about objects that hold one of our ids.
pub(super) fn warn_foreign(state: &mut NexthopState, plan: &NexthopPlan) {
    for e in &plan.foreign {
        if state.warned.insert(e.id) {
            warn!(
                id = e.id, protocol = e.protocol, gateway = ?e.gateway, dev = ?e.oif,
                "nexthop id flannel derives for a peer is taken by an object flannel does not own; \
                 the peer keeps a plain route and the object is left alone"
            );
        }
    }
    let ids: HashSet<u32> = plan.foreign.iter().map(|e| e.id).collect();
    state.warned.retain(|id| ids.contains(id));
}

/// Writes the planned objects, pipelined. A route whose object could not be written goes
/// out as a plain route instead (in `routes`): an id taken since the dump (`EEXIST`) only
/// for that peer, any other failure for every peer from the next reconcile on (see
/// [`NexthopState::disable`]).
pub(super) async fn apply_writes(nl: &Netlink, plan: &NexthopPlan, routes: &mut RoutePlan, state: &mut NexthopState) {
    let failed = pipelined(plan.write.clone(), |(s, replace)| {
        let nl = nl.clone();
        async move { nl.write_nexthop(&s, replace).await }
    })
    .await;
    let mut bad = HashSet::new();
    for ((s, _), e) in failed {
        bad.insert(s.id);
        if e.raw_os_error() == Some(libc::EEXIST) {
            warn!(id = s.id, gateway = %s.gateway, "nexthop id was taken since the last dump; the peer gets a plain route");
        } else {
            state.disable(&e);
        }
    }
    for (spec, _) in &mut routes.replace {
        if spec.nhid.is_some_and(|id| bad.contains(&id)) {
            spec.nhid = None;
        }
    }
    let done = plan.write.len() - bad.len();
    let log_each = plan.write.len() <= LOG_EACH;
    for (s, replace) in plan.write.iter().filter(|(s, _)| !bad.contains(&s.id)) {
        if log_each {
            info!(id = s.id, gateway = %s.gateway, replaced = replace, "nexthop object set");
        }
    }
    if !log_each && done > 0 {
        info!(nexthops = done, failed = bad.len(), "nexthop objects set");
    }
}

/// Deletes our stale objects, pipelined, after the routes moved off them. An object a
/// route still uses because that route's update failed (`kept`: the current routes at the
/// failed destinations) is kept this time: deleting it would delete the route with it.
pub(super) async fn apply_deletes(nl: &Netlink, plan: &NexthopPlan, kept: &[&RouteEntry], tally: &mut Tally) {
    let busy: HashSet<u32> = kept.iter().filter_map(|e| e.nhid).collect();
    let ids: Vec<u32> = plan.delete.iter().copied().filter(|id| !busy.contains(id)).collect();
    let failed = pipelined(ids.clone(), |id| {
        let nl = nl.clone();
        async move { nl.delete_nexthop(id).await }
    })
    .await;
    let done = ids.len() - failed.len();
    for (id, e) in failed {
        tally.fail(format!("delete nexthop id {id}"), e, []);
    }
    if done > 0 {
        info!(nexthops = done, "stale nexthop objects removed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEV: u32 = 9;

    fn route(dst: &str, oif: u32, onlink: bool) -> RouteSpec {
        let dst: IpNet = dst.parse().unwrap();
        RouteSpec {
            dst,
            gateway: dst.network(),
            oif,
            onlink,
            protocol: RTPROT_FLANNEL,
            nhid: None,
        }
    }

    fn object(gw: &str, oif: u32, protocol: u8) -> NexthopEntry {
        let gw: Ipv4Addr = gw.parse().unwrap();
        NexthopEntry {
            id: nexthop_id(gw).unwrap(),
            gateway: Some(gw.into()),
            oif: Some(oif),
            onlink: true,
            protocol,
            special: false,
        }
    }

    fn network() -> Option<IpNet> {
        "10.244.0.0/16".parse().ok()
    }

    #[test]
    fn ids_are_the_gateway_address() {
        assert_eq!(nexthop_id(Ipv4Addr::new(10, 244, 5, 0)), Some(0x0af4_0500));
        assert_eq!(nexthop_id(Ipv4Addr::UNSPECIFIED), None);
    }

    #[test]
    fn creates_adopts_replaces_and_collects() {
        let mut routes: BTreeMap<IpNet, RouteSpec> = [
            route("10.244.2.0/24", DEV, true),
            route("10.244.3.0/24", DEV, true),
            route("10.244.4.0/24", DEV, true),
            // DirectRouting: through the underlay, stays plain.
            RouteSpec {
                gateway: "192.168.0.5".parse().unwrap(),
                ..route("10.244.5.0/24", 2, false)
            },
        ]
        .into_iter()
        .map(|r| (r.dst, r))
        .collect();
        let in_sync = object("10.244.3.0", DEV, RTPROT_FLANNEL);
        let old_dev = object("10.244.4.0", 7, RTPROT_FLANNEL);
        let stale = object("10.244.9.0", DEV, RTPROT_FLANNEL);
        let outside = object("10.99.0.0", DEV, RTPROT_FLANNEL);
        let actual = [in_sync, old_dev, stale, outside];
        let p = plan_nexthops(&mut routes.clone(), &actual, DEV, network(), true, false);
        assert!(p.delete.is_empty(), "incomplete sets delete nothing");
        let p = plan_nexthops(&mut routes, &actual, DEV, network(), true, true);
        let id = |gw: &str| nexthop_id(gw.parse().unwrap()).unwrap();
        assert_eq!(
            p.write.iter().map(|(s, r)| (s.id, s.oif, *r)).collect::<Vec<_>>(),
            [(id("10.244.2.0"), DEV, false), (id("10.244.4.0"), DEV, true)]
        );
        assert_eq!(p.delete, [stale.id]);
        assert!(p.foreign.is_empty());
        let nhids: Vec<Option<u32>> = routes.values().map(|r| r.nhid).collect();
        assert_eq!(
            nhids,
            [
                Some(id("10.244.2.0")),
                Some(id("10.244.3.0")),
                Some(id("10.244.4.0")),
                None
            ]
        );
    }

    #[test]
    fn a_foreign_object_at_our_id_is_left_alone_and_its_peer_stays_plain() {
        let mut routes: BTreeMap<IpNet, RouteSpec> =
            [(route("10.244.2.0/24", DEV, true).dst, route("10.244.2.0/24", DEV, true))].into();
        let foreign = object("10.244.2.0", DEV, 4);
        let group = NexthopEntry {
            special: true,
            protocol: RTPROT_FLANNEL,
            id: 77,
            ..foreign
        };
        let p = plan_nexthops(&mut routes, &[foreign, group], DEV, network(), true, true);
        assert_eq!(p.foreign, [foreign]);
        assert!(p.write.is_empty() && p.delete.is_empty(), "{p:?}");
        assert_eq!(routes.values().next().unwrap().nhid, None);
    }

    #[test]
    fn disabled_means_plain_routes_and_our_objects_collected() {
        let mut routes: BTreeMap<IpNet, RouteSpec> =
            [(route("10.244.2.0/24", DEV, true).dst, route("10.244.2.0/24", DEV, true))].into();
        let ours = object("10.244.2.0", DEV, RTPROT_FLANNEL);
        let p = plan_nexthops(&mut routes, &[ours], DEV, network(), false, true);
        assert!(p.write.is_empty());
        assert_eq!(p.delete, [ours.id]);
        assert_eq!(routes.values().next().unwrap().nhid, None);
    }
}
