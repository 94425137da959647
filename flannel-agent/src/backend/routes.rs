//! Route reconciliation shared by the kernel-datapath backends: host-gw routes,
//! and the vxlan backend's routes through its device or, with DirectRouting,
//! straight to on-link peers.
//!
//! Ownership. A route is flannel's to change or delete when `owns` says so;
//! each backend documents its rule, and both build on [`RTPROT_FLANNEL`]: every
//! route flannel installs carries that `rtm_protocol`, so after a restart a route
//! still says who made it. Routes that are not flannel's are never deleted. One
//! is replaced only when it sits exactly where a desired route must go (same
//! destination, TOS 0, the default metric), since the kernel keeps one route per
//! such key and the peer would otherwise be unreachable; that is logged. A route
//! identical to a desired one but with another protocol (left by upstream
//! flanneld, or added by hand) is adopted: re-marked in place, which is atomic.
//!
//! Every change is a `replace` (`NLM_F_REPLACE`), so the datapath never has a
//! gap and repeating a reconcile changes nothing. The writes of a plan are independent
//! of each other and go out pipelined; each still gets its own result.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use tracing::{debug, info, warn};

use crate::netlink::{pipelined, Netlink, NetlinkError, RouteEntry, RouteSpec, RTN_UNICAST};
use crate::subnet::Lease;

/// The `rtm_protocol` of every route flannel-rs installs: 102 (0x66, ASCII `f`).
/// iproute2's `rt_protos` does not name it (it lists 0-18, 42, 99 and 186-192), nor
/// does any routing daemon we know of use it. `ip route show proto 102` lists
/// flannel's routes; `echo "102 flannel" > /etc/iproute2/rt_protos.d/flannel.conf`
/// makes iproute2 print the name.
pub const RTPROT_FLANNEL: u8 = 102;

/// A peer's subnet and public IP in one family (IPv6: `ipv6_subnet` and
/// `PublicIPv6`), if it has both.
pub fn family_of(lease: &Lease, v6: bool) -> Option<(IpNet, IpAddr)> {
    if v6 {
        Some((lease.ipv6_subnet?.into(), lease.attrs.public_ipv6?.into()))
    } else {
        let ip = lease.attrs.public_ip;
        (!ip.is_unspecified()).then_some((lease.subnet?.into(), ip.into()))
    }
}

/// The metric the kernel gives a route added without one: 0 for IPv4, 1024
/// (`IP6_RT_PRIO_USER`) for IPv6. Together with the destination (and TOS 0) it is
/// the key a `replace` overwrites.
fn default_metric(dst: &IpNet) -> u32 {
    match dst {
        IpNet::V4(_) => 0,
        IpNet::V6(_) => 1024,
    }
}

/// Whether `e` occupies the key a `replace` of a route to `dst` overwrites.
fn same_slot(e: &RouteEntry, dst: &IpNet) -> bool {
    e.dst == *dst && e.tos == 0 && e.metric == default_metric(dst)
}

/// Whether `e` is exactly `s`, protocol aside. A route through a nexthop object is
/// compared by the object's id (the object itself is reconciled on its own); a plain
/// route never equals one through an object, whatever the object's gateway.
fn same_route(e: &RouteEntry, s: &RouteSpec) -> bool {
    let hop = match s.nhid {
        Some(id) => e.nhid == Some(id),
        None => e.nhid.is_none() && e.gateway == Some(s.gateway) && e.oif == Some(s.oif) && e.onlink == s.onlink,
    };
    same_slot(e, &s.dst) && e.kind == RTN_UNICAST && hop
}

/// Why a desired route is (re)installed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteChange {
    /// Nothing was there.
    Add,
    /// Flannel's own route there was different (a peer moved, a MAC changed mode...).
    Update(RouteEntry),
    /// The same route, not marked as flannel's: re-marked.
    Adopt(RouteEntry),
    /// A route flannel does not own was in the way.
    Conflict(RouteEntry),
}

/// What one reconcile changes in the routing table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoutePlan {
    /// Routes to install, with why.
    pub replace: Vec<(RouteSpec, RouteChange)>,
    /// Owned routes to delete.
    pub delete: Vec<RouteEntry>,
}

impl RoutePlan {
    /// Whether the plan changes nothing.
    pub fn is_empty(&self) -> bool {
        self.replace.is_empty() && self.delete.is_empty()
    }
}

/// Compares the desired routes with the main table. Owned routes that no desired
/// route covers are deleted only when `complete`; owned duplicates of a desired
/// destination (another metric or TOS) are deleted in any case, since the desired
/// route is installed beside them.
pub fn plan_routes(
    desired: &BTreeMap<IpNet, RouteSpec>,
    actual: &[RouteEntry],
    owns: impl Fn(&RouteEntry) -> bool,
    complete: bool,
) -> RoutePlan {
    // Indexed by destination once: a linear scan per desired route made a steady-state
    // reconcile of 10,000 peers quadratic.
    let mut by_dst: HashMap<IpNet, Vec<&RouteEntry>> = HashMap::new();
    for e in actual {
        by_dst.entry(e.dst).or_default().push(e);
    }
    let mut plan = RoutePlan::default();
    for spec in desired.values() {
        let at = by_dst.get(&spec.dst).map_or(&[][..], Vec::as_slice);
        let in_slot = at.iter().copied().find(|e| same_slot(e, &spec.dst));
        let change = match in_slot {
            Some(e) if same_route(e, spec) && e.protocol == spec.protocol => None,
            Some(e) if same_route(e, spec) => Some(RouteChange::Adopt(*e)),
            Some(e) if owns(e) => Some(RouteChange::Update(*e)),
            Some(e) => Some(RouteChange::Conflict(*e)),
            None => Some(RouteChange::Add),
        };
        if let Some(c) = change {
            plan.replace.push((*spec, c));
        }
        plan.delete.extend(
            at.iter()
                .copied()
                .filter(|e| !same_slot(e, &spec.dst) && owns(e))
                .copied(),
        );
    }
    if complete {
        plan.delete
            .extend(actual.iter().filter(|e| !desired.contains_key(&e.dst) && owns(e)));
    }
    plan
}

/// Up to this many changes of one kind are logged one by one at `info`; a bigger batch
/// (a node joining a large cluster programs thousands) is logged one by one at `debug`
/// and summed up in one `info` line, so the log stays readable and cheap.
pub const LOG_EACH: usize = 32;

/// Installs the plan's routes, many requests in flight at once (see
/// [`crate::netlink::pipelined`]); returns the destinations that failed, each with its
/// error. `dev` names an interface index for the logs.
pub async fn apply_replaces(
    nl: &Netlink,
    plan: &RoutePlan,
    dev: impl Fn(u32) -> String,
) -> BTreeMap<IpNet, NetlinkError> {
    let specs: Vec<RouteSpec> = plan.replace.iter().map(|(s, _)| *s).collect();
    let failed: BTreeMap<IpNet, NetlinkError> = pipelined(specs, |s| {
        let nl = nl.clone();
        async move { nl.replace_route(&s).await }
    })
    .await
    .into_iter()
    .map(|(s, e)| (s.dst, e))
    .collect();
    let each = plan.replace.len() <= LOG_EACH;
    for (spec, change) in plan.replace.iter().filter(|(s, _)| !failed.contains_key(&s.dst)) {
        let (dst, gateway, dev) = (spec.dst, spec.gateway, dev(spec.oif));
        match change {
            RouteChange::Add if each => info!(%dst, %gateway, dev, onlink = spec.onlink, "route added"),
            RouteChange::Add => debug!(%dst, %gateway, dev, onlink = spec.onlink, "route added"),
            RouteChange::Update(old) if each => info!(
                %dst, %gateway, dev, old_gateway = ?old.gateway, old_dev = ?old.oif, "route updated"
            ),
            RouteChange::Update(old) => debug!(
                %dst, %gateway, dev, old_gateway = ?old.gateway, old_dev = ?old.oif, "route updated"
            ),
            RouteChange::Adopt(old) if each => {
                info!(%dst, %gateway, dev, old_protocol = old.protocol, "route adopted (re-marked as flannel's)")
            }
            RouteChange::Adopt(old) => {
                debug!(%dst, %gateway, dev, old_protocol = old.protocol, "route adopted (re-marked as flannel's)")
            }
            // Always one by one: someone else's route was overwritten.
            RouteChange::Conflict(old) => warn!(
                %dst, %gateway, dev, old_gateway = ?old.gateway, old_dev = ?old.oif, old_protocol = old.protocol,
                old_type = old.kind, "replaced a route flannel does not own: it was where a peer's route must go"
            ),
        }
    }
    let done = plan.replace.len() - failed.len();
    if !each && done > 0 {
        info!(routes = done, failed = failed.len(), "routes installed");
    }
    failed
}

/// Deletes the plan's stale routes, many in flight at once; returns those that failed.
pub async fn apply_deletes(
    nl: &Netlink,
    plan: &RoutePlan,
    dev: impl Fn(u32) -> String,
) -> BTreeMap<IpNet, NetlinkError> {
    let failed: BTreeMap<IpNet, NetlinkError> = pipelined(plan.delete.clone(), |e| {
        let nl = nl.clone();
        async move { nl.delete_route(&e).await }
    })
    .await
    .into_iter()
    .map(|(e, err)| (e.dst, err))
    .collect();
    let each = plan.delete.len() <= LOG_EACH;
    for e in plan.delete.iter().filter(|e| !failed.contains_key(&e.dst)) {
        let dev = e.oif.map(&dev);
        if each {
            info!(dst = %e.dst, gateway = ?e.gateway, dev = ?dev, "route removed");
        } else {
            debug!(dst = %e.dst, gateway = ?e.gateway, dev = ?dev, "route removed");
        }
    }
    let done = plan.delete.len() - failed.len();
    if !each && done > 0 {
        info!(routes = done, failed = failed.len(), "stale routes removed");
    }
    failed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::netlink::RTPROT_KERNEL;

    fn spec(dst: &str, gw: &str, oif: u32, onlink: bool) -> RouteSpec {
        RouteSpec {
            dst: dst.parse().unwrap(),
            gateway: gw.parse().unwrap(),
            oif,
            onlink,
            protocol: RTPROT_FLANNEL,
            nhid: None,
        }
    }

    fn entry(s: &RouteSpec) -> RouteEntry {
        RouteEntry {
            dst: s.dst,
            gateway: Some(s.gateway),
            oif: Some(s.oif),
            onlink: s.onlink,
            protocol: s.protocol,
            metric: default_metric(&s.dst),
            tos: 0,
            scope: 0,
            kind: RTN_UNICAST,
            nhid: s.nhid,
        }
    }

    fn desired(specs: &[RouteSpec]) -> BTreeMap<IpNet, RouteSpec> {
        specs.iter().map(|s| (s.dst, *s)).collect()
    }

    fn ours(e: &RouteEntry) -> bool {
        e.protocol == RTPROT_FLANNEL
    }

    #[test]
    fn in_sync_means_no_change() {
        let s = [
            spec("10.244.2.0/24", "10.244.2.0", 7, true),
            spec("fd00:2::/64", "fd00:2::", 8, true),
        ];
        let actual: Vec<_> = s.iter().map(entry).collect();
        assert!(plan_routes(&desired(&s), &actual, ours, true).is_empty());
    }

    #[test]
    fn adds_updates_adopts_and_replaces_conflicts() {
        let want = [
            spec("10.244.2.0/24", "10.244.2.0", 7, true),
            spec("10.244.3.0/24", "10.244.3.0", 7, true),
            spec("10.244.4.0/24", "192.168.0.4", 2, false),
            spec("10.244.5.0/24", "192.168.0.5", 2, false),
        ];
        let moved = RouteEntry {
            gateway: Some("10.244.3.9".parse().unwrap()),
            ..entry(&want[1])
        };
        let upstream = RouteEntry {
            protocol: 3,
            ..entry(&want[2])
        };
        let foreign = RouteEntry {
            protocol: 4,
            gateway: Some("192.168.0.99".parse().unwrap()),
            ..entry(&want[3])
        };
        let p = plan_routes(&desired(&want), &[moved, upstream, foreign], ours, true);
        assert_eq!(
            p.replace,
            vec![
                (want[0], RouteChange::Add),
                (want[1], RouteChange::Update(moved)),
                (want[2], RouteChange::Adopt(upstream)),
                (want[3], RouteChange::Conflict(foreign)),
            ]
        );
        assert!(p.delete.is_empty());
    }

    #[test]
    fn stale_owned_routes_go_only_when_complete() {
        let gone = entry(&spec("10.244.9.0/24", "10.244.9.0", 7, true));
        let not_ours = RouteEntry {
            protocol: 4,
            ..entry(&spec("10.244.8.0/24", "192.168.0.8", 2, false))
        };
        let kernel = RouteEntry {
            protocol: RTPROT_KERNEL,
            ..entry(&spec("10.99.0.0/24", "10.99.0.1", 2, false))
        };
        let actual = [gone, not_ours, kernel];
        assert_eq!(plan_routes(&BTreeMap::new(), &actual, ours, true).delete, vec![gone]);
        assert!(plan_routes(&BTreeMap::new(), &actual, ours, false).is_empty());
    }

    #[test]
    fn owned_duplicates_in_other_slots_are_removed_foreign_ones_kept() {
        let want = spec("10.244.2.0/24", "10.244.2.0", 7, true);
        let dup = RouteEntry {
            metric: 100,
            ..entry(&want)
        };
        let foreign = RouteEntry {
            metric: 200,
            protocol: 4,
            ..entry(&want)
        };
        let p = plan_routes(&desired(&[want]), &[entry(&want), dup, foreign], ours, false);
        assert!(p.replace.is_empty());
        assert_eq!(p.delete, vec![dup]);
    }

    #[test]
    fn plain_and_nexthop_routes_replace_each_other() {
        let plain = spec("10.244.2.0/24", "10.244.2.0", 7, true);
        let via_object = RouteSpec {
            nhid: Some(42),
            ..plain
        };
        // The kernel reports an object's gateway and device on the route too.
        let p = plan_routes(&desired(&[via_object]), &[entry(&plain)], ours, true);
        assert_eq!(p.replace, vec![(via_object, RouteChange::Update(entry(&plain)))]);
        let p = plan_routes(&desired(&[plain]), &[entry(&via_object)], ours, true);
        assert_eq!(p.replace, vec![(plain, RouteChange::Update(entry(&via_object)))]);
        let other_object = RouteEntry {
            nhid: Some(43),
            ..entry(&via_object)
        };
        assert_eq!(
            plan_routes(&desired(&[via_object]), &[other_object], ours, true)
                .replace
                .len(),
            1
        );
        assert!(plan_routes(&desired(&[via_object]), &[entry(&via_object)], ours, true).is_empty());
    }

    #[test]
    fn a_blackhole_in_the_slot_is_a_conflict() {
        let want = spec("10.244.2.0/24", "192.168.0.2", 2, false);
        let bh = RouteEntry {
            gateway: None,
            oif: None,
            kind: 6,
            protocol: 4,
            ..entry(&want)
        };
        let p = plan_routes(&desired(&[want]), &[bh], ours, true);
        assert_eq!(p.replace, vec![(want, RouteChange::Conflict(bh))]);
    }
}
