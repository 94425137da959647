//! The peers as seen through a metadata-only watch of nodes.
//!
//! The watch carries annotations but not `spec.podCIDRs`, so pod CIDRs are fetched once per
//! node (by uid) and cached: Kubernetes does not let a node's pod CIDRs change once set, so
//! the cache only grows when a node first appears and shrinks when it goes. A node whose pod
//! CIDRs were empty is fetched again when it changes, at most every [`REFETCH_EMPTY`].
//!
//! Only what flannel reads is kept per node (its flannel annotations, uid, versions), so
//! memory stays small however big the node objects are.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::annotations::AnnotationNames;
use super::node::{peer_lease, Families, PodCidrs};
use crate::metrics::Rejection;
use crate::subnet::lease::MAX_LEASE_VALUE;
use crate::subnet::Candidate;

/// How soon a node whose pod CIDRs were empty may be fetched again.
pub const REFETCH_EMPTY: Duration = Duration::from_secs(10);

/// What is kept of one node.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRecord {
    /// `metadata.uid`: a node deleted and created again is another node.
    pub uid: String,
    /// The latest `metadata.resourceVersion`.
    pub resource_version: String,
    /// The resourceVersion at which the flannel annotations last changed, so a lease is
    /// re-validated (and a bad one warned about) only when flannel's part of it changes,
    /// not at every kubelet status update.
    pub version: i64,
    /// `metadata.creationTimestamp` in seconds: the older node wins an overlap.
    pub age: i64,
    /// The annotations under the flannel prefix, except oversized ones.
    pub annotations: BTreeMap<String, String>,
    /// Flannel annotations longer than [`MAX_LEASE_VALUE`], by key: their size only.
    pub oversized: BTreeMap<String, usize>,
}

/// A pod CIDR lookup: the result and the node version it was read at.
#[derive(Debug, Clone)]
struct Fetched {
    cidrs: Result<PodCidrs, String>,
    resource_version: String,
    at: Instant,
}

/// The nodes, their cached pod CIDRs, and whether a complete list has been seen.
#[derive(Debug)]
pub struct PeerTracker {
    names: AnnotationNames,
    own: String,
    families: Families,
    nodes: BTreeMap<String, NodeRecord>,
    /// Nodes of a re-list in progress; they replace `nodes` when it completes.
    relist: Option<BTreeMap<String, NodeRecord>>,
    cidrs: HashMap<String, Fetched>,
    synced: bool,
    generation: u64,
}

fn parse_rv(rv: &str) -> i64 {
    // Kubernetes resourceVersions are etcd revisions; an opaque one still needs to change
    // when the node changes, which a hash does.
    rv.parse().unwrap_or_else(|_| {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        rv.hash(&mut h);
        (h.finish() >> 1) as i64
    })
}

impl PeerTracker {
    /// A tracker for the nodes other than `own`.
    pub fn new(names: AnnotationNames, own: String, families: Families) -> Self {
        Self {
            names,
            own,
            families,
            nodes: BTreeMap::new(),
            relist: None,
            cidrs: HashMap::new(),
            synced: false,
            generation: 0,
        }
    }

    fn record(&self, meta: &ObjectMeta, prev: Option<&NodeRecord>) -> NodeRecord {
        let mut annotations = BTreeMap::new();
        let mut oversized = BTreeMap::new();
        for (k, v) in meta.annotations.iter().flatten() {
            if !k.starts_with(&self.names.prefix) {
                continue;
            }
            // Keeps the rejection (and the size) without keeping the bytes.
            if v.len() > MAX_LEASE_VALUE {
                oversized.insert(k.clone(), v.len());
            } else {
                annotations.insert(k.clone(), v.clone());
            }
        }
        let uid = meta.uid.clone().unwrap_or_default();
        let resource_version = meta.resource_version.clone().unwrap_or_default();
        let version = match prev {
            Some(p) if p.uid == uid && p.annotations == annotations && p.oversized == oversized => p.version,
            _ => parse_rv(&resource_version),
        };
        NodeRecord {
            uid,
            resource_version,
            version,
            age: meta.creation_timestamp.as_ref().map_or(0, |t| t.0.as_second()),
            annotations,
            oversized,
        }
    }

    /// A re-list starts: its nodes are collected apart until [`Self::init_done`].
    pub fn init(&mut self) {
        self.relist = Some(BTreeMap::new());
    }

    /// A node of the re-list in progress.
    pub fn init_apply(&mut self, meta: &ObjectMeta) {
        let name = meta.name.clone().unwrap_or_default();
        let rec = self.record(meta, self.nodes.get(&name));
        self.relist.get_or_insert_with(BTreeMap::new).insert(name, rec);
    }

    /// The re-list is complete: it replaces what was known, and nodes it lacks are gone.
    pub fn init_done(&mut self) {
        self.nodes = self.relist.take().unwrap_or_default();
        self.forget_unknown_uids();
        self.synced = true;
        self.generation += 1;
    }

    /// A node was added or changed; returns whether anything flannel reads changed.
    pub fn apply(&mut self, meta: &ObjectMeta) -> bool {
        let name = meta.name.clone().unwrap_or_default();
        let rec = self.record(meta, self.nodes.get(&name));
        let prev = self.nodes.insert(name, rec.clone());
        prev.is_none_or(|p| p.version != rec.version || p.uid != rec.uid)
    }

    /// A node was deleted; returns whether it was known.
    pub fn delete(&mut self, meta: &ObjectMeta) -> bool {
        let known = meta.name.as_ref().and_then(|n| self.nodes.remove(n)).is_some();
        self.forget_unknown_uids();
        known
    }

    fn forget_unknown_uids(&mut self) {
        let live: std::collections::HashSet<&str> = self.nodes.values().map(|n| n.uid.as_str()).collect();
        self.cidrs.retain(|uid, _| live.contains(uid.as_str()));
    }

    fn managed(&self) -> impl Iterator<Item = (&String, &NodeRecord)> {
        self.nodes
            .iter()
            .filter(|(name, rec)| **name != self.own && self.names.is_managed(&rec.annotations))
    }

    /// Managed nodes whose pod CIDRs must be fetched: never fetched, or fetched empty at an
    /// older version more than [`REFETCH_EMPTY`] ago.
    pub fn to_fetch(&self, now: Instant) -> Vec<(String, String)> {
        self.managed()
            .filter(|(_, rec)| self.wants(rec, now))
            .map(|(name, rec)| (name.clone(), rec.uid.clone()))
            .collect()
    }

    /// Whether one node's pod CIDRs must be fetched (see [`Self::to_fetch`]); cheaper than
    /// the whole list after an event about that node alone.
    pub fn wants_fetch(&self, name: &str, now: Instant) -> bool {
        self.nodes
            .get(name)
            .is_some_and(|rec| name != self.own && self.names.is_managed(&rec.annotations) && self.wants(rec, now))
    }

    fn wants(&self, rec: &NodeRecord, now: Instant) -> bool {
        match self.cidrs.get(&rec.uid) {
            None => true,
            Some(f) => {
                matches!(&f.cidrs, Ok(c) if c.is_empty())
                    && f.resource_version != rec.resource_version
                    && now.duration_since(f.at) >= REFETCH_EMPTY
            }
        }
    }

    /// Records the pod CIDRs of the node with `uid`, read at `resource_version`.
    pub fn set_cidrs(&mut self, uid: &str, resource_version: &str, cidrs: Result<PodCidrs, String>, now: Instant) {
        let f = Fetched {
            cidrs,
            resource_version: resource_version.to_string(),
            at: now,
        };
        self.cidrs.insert(uid.to_string(), f);
    }

    /// Whether a complete list has been seen and every managed node's pod CIDRs are known:
    /// only then may the set be published as complete.
    pub fn ready(&self) -> bool {
        self.synced && self.managed().all(|(_, rec)| self.cidrs.contains_key(&rec.uid))
    }

    /// Bumped on every complete re-list.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// This node's record, if the watch has seen it.
    pub fn own(&self) -> Option<&NodeRecord> {
        self.nodes.get(&self.own)
    }

    /// How many nodes are known, and how many of them are flannel peers.
    pub fn counts(&self) -> (usize, usize) {
        (self.nodes.len(), self.managed().count())
    }

    /// The managed nodes with known pod CIDRs, as candidates for the validator.
    pub fn candidates(&self) -> Vec<Candidate> {
        self.managed()
            .filter_map(|(name, rec)| {
                let fetched = self.cidrs.get(&rec.uid)?;
                let lease = match (&fetched.cidrs, rec.oversized.iter().next()) {
                    (_, Some((k, n))) => Err((
                        Rejection::BadValue,
                        format!("annotation {k} is {n} bytes, more than {MAX_LEASE_VALUE}"),
                    )),
                    (Ok(c), None) => peer_lease(&self.names, self.families, &rec.annotations, c),
                    (Err(e), None) => Err((Rejection::BadKey, e.clone())),
                };
                Some(Candidate {
                    name: name.clone(),
                    version: rec.version,
                    age: rec.age,
                    lease,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    fn meta(name: &str, uid: &str, rv: u64, ann: &[(&str, &str)]) -> ObjectMeta {
        ObjectMeta {
            name: Some(name.into()),
            uid: Some(uid.into()),
            resource_version: Some(rv.to_string()),
            creation_timestamp: Some(Time(
                k8s_openapi::jiff::Timestamp::from_second(1_700_000_000 + rv as i64).unwrap(),
            )),
            annotations: Some(ann.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
            ..Default::default()
        }
    }

    const PEER: &[(&str, &str)] = &[
        ("flannel.alpha.coreos.com/kube-subnet-manager", "true"),
        ("flannel.alpha.coreos.com/backend-type", "vxlan"),
        ("flannel.alpha.coreos.com/public-ip", "192.0.2.2"),
        ("node.alpha.kubernetes.io/ttl", "0"),
    ];

    fn tracker() -> PeerTracker {
        let names = AnnotationNames::new("flannel.alpha.coreos.com").unwrap();
        PeerTracker::new(names, "me".into(), Families { v4: true, v6: false })
    }

    #[test]
    fn ready_only_after_a_full_list_and_all_pod_cidrs() {
        let mut t = tracker();
        let now = Instant::now();
        t.init();
        t.init_apply(&meta("me", "u0", 1, PEER));
        t.init_apply(&meta("b", "u1", 2, PEER));
        t.init_apply(&meta("plain", "u2", 3, &[]));
        assert!(!t.ready());
        t.init_done();
        assert!(!t.ready());
        // Only the managed peer needs its pod CIDRs; not this node, not unmanaged ones.
        assert_eq!(t.to_fetch(now), vec![("b".to_string(), "u1".to_string())]);
        assert!(t.wants_fetch("b", now) && !t.wants_fetch("me", now) && !t.wants_fetch("plain", now));
        t.set_cidrs("u1", "2", PodCidrs::parse(Some("10.244.2.0/24"), &[]), now);
        assert!(!t.wants_fetch("b", now));
        assert!(t.ready());
        let c = t.candidates();
        assert_eq!(c.len(), 1);
        assert_eq!(
            c[0].lease.as_ref().unwrap().subnet,
            Some("10.244.2.0/24".parse().unwrap())
        );
        assert_eq!(t.generation(), 1);
    }

    #[test]
    fn status_updates_change_nothing_and_annotation_changes_do() {
        let mut t = tracker();
        t.init();
        t.init_done();
        assert!(t.apply(&meta("b", "u1", 5, PEER)));
        // A kubelet heartbeat: new resourceVersion, same flannel annotations.
        assert!(!t.apply(&meta("b", "u1", 6, PEER)));
        assert_eq!(t.nodes["b"].version, 5);
        let mut changed = PEER.to_vec();
        changed[2] = ("flannel.alpha.coreos.com/public-ip", "192.0.2.3");
        assert!(t.apply(&meta("b", "u1", 7, &changed)));
        assert_eq!(t.nodes["b"].version, 7);
        // Non-flannel annotations are not kept.
        assert!(!t.nodes["b"].annotations.contains_key("node.alpha.kubernetes.io/ttl"));
    }

    #[test]
    fn deleted_and_recreated_nodes_are_fetched_again() {
        let mut t = tracker();
        let now = Instant::now();
        t.init();
        t.init_done();
        t.apply(&meta("b", "u1", 5, PEER));
        t.set_cidrs("u1", "5", PodCidrs::parse(Some("10.244.2.0/24"), &[]), now);
        assert!(t.to_fetch(now).is_empty());
        assert!(t.delete(&meta("b", "u1", 6, PEER)));
        assert!(t.candidates().is_empty());
        t.apply(&meta("b", "u9", 7, PEER));
        assert_eq!(t.to_fetch(now), vec![("b".to_string(), "u9".to_string())]);
    }

    #[test]
    fn empty_pod_cidrs_are_fetched_again_later_and_only_after_a_change() {
        let mut t = tracker();
        let now = Instant::now();
        t.init();
        t.init_done();
        t.apply(&meta("b", "u1", 5, PEER));
        t.set_cidrs("u1", "5", Ok(PodCidrs::default()), now);
        assert!(t.ready());
        assert_eq!(t.candidates()[0].lease.as_ref().unwrap_err().0, Rejection::BadKey);
        let later = now + REFETCH_EMPTY;
        assert!(t.to_fetch(later).is_empty());
        t.apply(&meta("b", "u1", 6, PEER));
        assert!(t.to_fetch(now).is_empty());
        assert_eq!(t.to_fetch(later).len(), 1);
    }

    #[test]
    fn a_relist_replaces_the_nodes_and_drops_missing_ones() {
        let mut t = tracker();
        t.init();
        t.init_apply(&meta("b", "u1", 5, PEER));
        t.init_apply(&meta("c", "u2", 6, PEER));
        t.init_done();
        t.set_cidrs("u1", "5", PodCidrs::parse(Some("10.244.2.0/24"), &[]), Instant::now());
        t.init();
        t.init_apply(&meta("b", "u1", 9, PEER));
        // Until the re-list completes, the old state stands.
        assert_eq!(t.counts(), (2, 2));
        t.init_done();
        assert_eq!(t.counts(), (1, 1));
        assert_eq!(t.generation(), 2);
        assert!(t.ready());
    }
}
