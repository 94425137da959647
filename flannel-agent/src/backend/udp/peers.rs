//! The udp proxy's routing table: which peer (PublicIP) carries a destination subnet, and
//! which subnets each peer may send from. Built whole from the lease set on every reconcile
//! and swapped in atomically: the forwarding tasks keep their own `Arc` of the table and
//! only look at the shared slot when its generation number moved, so the per-packet path
//! takes no lock and traffic never stops while routes change.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ipnet::Ipv4Net;

/// One peer's route: its subnet and where to send the packets for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerRoute {
    /// The peer's lease subnet.
    pub subnet: Ipv4Net,
    /// The peer's PublicIP: datagrams go to `PublicIP:Port` and must come from there.
    pub public_ip: Ipv4Addr,
}

/// An immutable routing table.
#[derive(Debug, Default)]
pub struct PeerTable {
    /// The routes as given, for status reports.
    routes: Vec<PeerRoute>,
    /// The prefix lengths in use, longest first (usually one: `SubnetLen`).
    prefix_lens: Vec<u8>,
    /// (prefix length, network address) → PublicIP.
    by_subnet: HashMap<(u8, u32), Ipv4Addr>,
    /// PublicIP → the subnets that peer leases.
    by_peer: HashMap<Ipv4Addr, Vec<Ipv4Net>>,
}

fn mask(addr: u32, len: u8) -> u32 {
    if len == 0 {
        0
    } else {
        addr & (u32::MAX << (32 - u32::from(len)))
    }
}

impl PeerTable {
    /// A table of `routes`; where two leases claim the same subnet the first wins (the
    /// lease validation already rejects overlaps).
    pub fn new(routes: Vec<PeerRoute>) -> Self {
        let mut by_subnet = HashMap::with_capacity(routes.len());
        let mut by_peer: HashMap<Ipv4Addr, Vec<Ipv4Net>> = HashMap::new();
        let mut prefix_lens = Vec::new();
        for r in &routes {
            let len = r.subnet.prefix_len();
            by_subnet
                .entry((len, u32::from(r.subnet.network())))
                .or_insert(r.public_ip);
            by_peer.entry(r.public_ip).or_default().push(r.subnet);
            if !prefix_lens.contains(&len) {
                prefix_lens.push(len);
            }
        }
        prefix_lens.sort_unstable_by(|a, b| b.cmp(a));
        PeerTable {
            routes,
            prefix_lens,
            by_subnet,
            by_peer,
        }
    }

    /// The PublicIP of the peer whose subnet holds `dst` (longest prefix first).
    pub fn next_hop(&self, dst: Ipv4Addr) -> Option<Ipv4Addr> {
        let a = u32::from(dst);
        self.prefix_lens
            .iter()
            .find_map(|&len| self.by_subnet.get(&(len, mask(a, len))).copied())
    }

    /// The subnets leased by the peer at `public_ip`, or `None` if it is not a peer.
    pub fn subnets_of(&self, public_ip: Ipv4Addr) -> Option<&[Ipv4Net]> {
        self.by_peer.get(&public_ip).map(Vec::as_slice)
    }

    /// The routes, as given to [`PeerTable::new`].
    pub fn routes(&self) -> &[PeerRoute] {
        &self.routes
    }
}

/// The slot the reconcile writes and the forwarding tasks read.
#[derive(Debug, Default)]
pub struct SharedPeers {
    generation: AtomicU64,
    table: RwLock<Arc<PeerTable>>,
}

impl SharedPeers {
    /// Publishes a new table.
    pub fn store(&self, table: PeerTable) {
        *self.table.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(table);
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The current table.
    pub fn load(&self) -> Arc<PeerTable> {
        self.table.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// A forwarding task's view of [`SharedPeers`]: its own `Arc`, refreshed only when the
/// generation moved (one relaxed atomic load per batch, no lock).
#[derive(Debug)]
pub struct PeerCache {
    shared: Arc<SharedPeers>,
    seen: u64,
    table: Arc<PeerTable>,
}

impl PeerCache {
    /// A cache of `shared`.
    pub fn new(shared: Arc<SharedPeers>) -> Self {
        let seen = shared.generation.load(Ordering::Acquire);
        let table = shared.load();
        PeerCache { shared, seen, table }
    }

    /// The current table, refreshed if a new one was published.
    pub fn get(&mut self) -> &PeerTable {
        let g = self.shared.generation.load(Ordering::Acquire);
        if g != self.seen {
            self.seen = g;
            self.table = self.shared.load();
        }
        &self.table
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(subnet: &str, ip: [u8; 4]) -> PeerRoute {
        PeerRoute {
            subnet: subnet.parse().unwrap(),
            public_ip: ip.into(),
        }
    }

    #[test]
    fn finds_the_peer_of_a_destination() {
        let t = PeerTable::new(vec![
            route("10.244.1.0/24", [198, 18, 0, 1]),
            route("10.244.2.0/24", [198, 18, 0, 2]),
            route("10.244.4.0/22", [198, 18, 0, 3]),
            route("10.244.5.128/25", [198, 18, 0, 4]),
        ]);
        assert_eq!(t.next_hop([10, 244, 1, 7].into()), Some([198, 18, 0, 1].into()));
        assert_eq!(t.next_hop([10, 244, 2, 255].into()), Some([198, 18, 0, 2].into()));
        assert_eq!(t.next_hop([10, 244, 6, 1].into()), Some([198, 18, 0, 3].into()));
        // Longest prefix wins.
        assert_eq!(t.next_hop([10, 244, 5, 200].into()), Some([198, 18, 0, 4].into()));
        assert_eq!(t.next_hop([10, 244, 5, 100].into()), Some([198, 18, 0, 3].into()));
        assert_eq!(t.next_hop([10, 244, 3, 1].into()), None);
        assert_eq!(PeerTable::default().next_hop([10, 244, 1, 1].into()), None);
    }

    #[test]
    fn knows_each_peers_subnets() {
        let t = PeerTable::new(vec![
            route("10.244.1.0/24", [198, 18, 0, 1]),
            route("10.244.9.0/24", [198, 18, 0, 1]),
            route("10.244.2.0/24", [198, 18, 0, 2]),
        ]);
        assert_eq!(t.subnets_of([198, 18, 0, 1].into()).map(<[_]>::len), Some(2));
        assert_eq!(t.subnets_of([198, 18, 0, 9].into()), None);
    }

    #[test]
    fn cache_follows_the_published_table() {
        let shared = Arc::new(SharedPeers::default());
        let mut cache = PeerCache::new(shared.clone());
        assert_eq!(cache.get().next_hop([10, 244, 1, 1].into()), None);
        shared.store(PeerTable::new(vec![route("10.244.1.0/24", [198, 18, 0, 1])]));
        assert_eq!(
            cache.get().next_hop([10, 244, 1, 1].into()),
            Some([198, 18, 0, 1].into())
        );
        shared.store(PeerTable::default());
        assert_eq!(cache.get().next_hop([10, 244, 1, 1].into()), None);
    }
}
