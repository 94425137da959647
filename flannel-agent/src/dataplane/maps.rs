//! The agent's side of the maps: the remote VTEPs (`FLANNEL_VTEPS` and the known addresses in
//! `FLANNEL_VTEP_ADDRS`, kept consistent with each other) and the counters.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray, PerCpuHashMap};
use flannel_common::{
    FlowKey, KernelFlow, LocalPod, PeerStats, PodStat, RemoteVtep, Stat, XdpStat, MAP_KERNEL_FLOWS, MAP_LOCAL_PODS,
    MAP_PEER_STATS, MAP_POD_STATS, MAP_STATS, MAP_VTEPS, MAP_VTEP_ADDRS, MAP_XDP_STATS,
};
use ipnet::Ipv4Net;

use super::DataplaneError;

/// `FLANNEL_VTEPS` as aya addresses it.
type VtepTrie = LpmTrie<MapData, [u8; 4], RemoteVtep>;
/// `FLANNEL_VTEP_ADDRS` as aya addresses it.
type AddrHash = BpfHashMap<MapData, [u8; 4], u32>;
/// `FLANNEL_PEER_STATS` as aya addresses it.
pub type PeerStatsHash = PerCpuHashMap<MapData, [u8; 4], PeerStats>;
/// `FLANNEL_LOCAL_PODS` as aya addresses it.
type PodHash = BpfHashMap<MapData, [u8; 4], LocalPod>;

/// Wraps an aya map error with what was being done to which map.
fn map_error(
    op: &'static str,
    map: &'static str,
    object: impl Into<String>,
) -> impl FnOnce(MapError) -> DataplaneError {
    let object = object.into();
    move |source| DataplaneError::Map {
        op,
        map,
        object,
        source: Box::new(source),
    }
}

/// The LPM key of a subnet.
fn key(subnet: Ipv4Net) -> Key<[u8; 4]> {
    Key::new(u32::from(subnet.prefix_len()), subnet.network().octets())
}

/// The subnet of an LPM key; `None` for a prefix length over 32 (not one we wrote).
fn subnet(key: &Key<[u8; 4]>) -> Option<Ipv4Net> {
    let prefix_len = u8::try_from(key.prefix_len()).ok()?;
    Ipv4Net::new(Ipv4Addr::from(key.data()), prefix_len)
        .ok()
        .map(|net| net.trunc())
}

/// Reads every entry of a `FLANNEL_VTEPS` map.
fn read_vteps(trie: &VtepTrie) -> Result<Vec<(Ipv4Net, RemoteVtep)>, DataplaneError> {
    let mut entries = Vec::new();
    for entry in trie.iter() {
        let (key, vtep) = entry.map_err(map_error("read", MAP_VTEPS, "entries"))?;
        if let Some(subnet) = subnet(&key) {
            entries.push((subnet, vtep));
        }
    }
    Ok(entries)
}

/// The remote VTEPs: the LPM trie the encap program reads and the set of known VTEP addresses
/// the decap program checks, plus a copy of the trie so that address reference counts and
/// "unchanged" checks need no map reads. The agent is the only writer of both maps.
pub struct VtepTable {
    /// `FLANNEL_VTEPS`.
    trie: VtepTrie,
    /// `FLANNEL_VTEP_ADDRS`.
    addrs: AddrHash,
    /// `FLANNEL_PEER_STATS`: at most an entry per address of `addrs`, created by the programs
    /// on a peer's first packet and removed here when its address goes.
    peer_stats: PeerStatsHash,
    /// An address left since the last sweep: a packet racing its removal may have put its
    /// counters back, so the next call sweeps `peer_stats` for addresses not in `refs`.
    sweep_pending: bool,
    /// What `trie` holds.
    entries: BTreeMap<Ipv4Net, RemoteVtep>,
    /// How many entries name each VTEP address: what `addrs` holds.
    refs: HashMap<Ipv4Addr, u32>,
}

impl VtepTable {
    /// Takes over the three maps (possibly pinned by an earlier run, with entries) and repairs
    /// `FLANNEL_VTEP_ADDRS` and `FLANNEL_PEER_STATS` to match `FLANNEL_VTEPS`, which is the
    /// one that counts. Counters of peers that stay are kept.
    pub fn new(trie: Map, addrs: Map, peer_stats: Map) -> Result<Self, DataplaneError> {
        let trie = VtepTrie::try_from(trie).map_err(map_error("open", MAP_VTEPS, "as an LPM trie"))?;
        let mut addrs = AddrHash::try_from(addrs).map_err(map_error("open", MAP_VTEP_ADDRS, "as a hash"))?;
        let mut peer_stats =
            PeerStatsHash::try_from(peer_stats).map_err(map_error("open", MAP_PEER_STATS, "as a per-CPU hash"))?;
        let entries: BTreeMap<_, _> = read_vteps(&trie)?.into_iter().collect();
        let mut refs = HashMap::new();
        for vtep in entries.values() {
            *refs.entry(vtep.ipv4()).or_insert(0u32) += 1;
        }
        let mut stale = Vec::new();
        for key in addrs.keys() {
            let key = key.map_err(map_error("read", MAP_VTEP_ADDRS, "keys"))?;
            if !refs.contains_key(&Ipv4Addr::from(key)) {
                stale.push(key);
            }
        }
        for key in stale {
            let addr = Ipv4Addr::from(key);
            addrs
                .remove(&key)
                .map_err(map_error("remove", MAP_VTEP_ADDRS, addr.to_string()))?;
        }
        for (addr, count) in &refs {
            if addrs.get(&addr.octets(), 0).ok() != Some(*count) {
                addrs
                    .insert(addr.octets(), count, 0)
                    .map_err(map_error("insert", MAP_VTEP_ADDRS, addr.to_string()))?;
            }
        }
        let mut stale = Vec::new();
        for key in peer_stats.keys() {
            let key = key.map_err(map_error("read", MAP_PEER_STATS, "keys"))?;
            if !refs.contains_key(&Ipv4Addr::from(key)) {
                stale.push(key);
            }
        }
        for key in stale {
            remove_peer_stats(&mut peer_stats, Ipv4Addr::from(key))?;
        }
        Ok(Self {
            trie,
            addrs,
            peer_stats,
            sweep_pending: false,
            entries,
            refs,
        })
    }

    /// Removes counters whose address is no longer a VTEP, if one left since the last sweep.
    pub fn sweep_strays(&mut self) -> Result<(), DataplaneError> {
        if !std::mem::take(&mut self.sweep_pending) {
            return Ok(());
        }
        let mut stale = Vec::new();
        for key in self.peer_stats.keys() {
            let key = key.map_err(map_error("read", MAP_PEER_STATS, "keys"))?;
            if !self.refs.contains_key(&Ipv4Addr::from(key)) {
                stale.push(Ipv4Addr::from(key));
            }
        }
        for addr in stale {
            remove_peer_stats(&mut self.peer_stats, addr)?;
        }
        Ok(())
    }

    /// The per-peer counters, summed over CPUs, by VTEP address.
    pub fn peer_counters(&self) -> Result<BTreeMap<Ipv4Addr, PeerStats>, DataplaneError> {
        read_peer_counters(&self.peer_stats)
    }

    /// The entries, from the agent's copy.
    pub fn entries(&self) -> &BTreeMap<Ipv4Net, RemoteVtep> {
        &self.entries
    }

    /// The entries as the kernel has them.
    pub fn read(&self) -> Result<Vec<(Ipv4Net, RemoteVtep)>, DataplaneError> {
        read_vteps(&self.trie)
    }

    /// Sets the VTEP of `subnet`. The address becomes known to the decap program before the
    /// encap program can send packets to it.
    pub fn upsert(&mut self, subnet: Ipv4Net, vtep: RemoteVtep) -> Result<(), DataplaneError> {
        let subnet = subnet.trunc();
        let old = self.entries.get(&subnet).copied();
        if old == Some(vtep) {
            return Ok(());
        }
        self.add_ref(vtep.ipv4())?;
        self.trie
            .insert(&key(subnet), vtep, 0)
            .map_err(map_error("insert", MAP_VTEPS, subnet.to_string()))?;
        self.entries.insert(subnet, vtep);
        if let Some(old) = old {
            self.drop_ref(old.ipv4())?;
        }
        Ok(())
    }

    /// Removes the VTEP of `subnet`; `false` if there was none.
    pub fn remove(&mut self, subnet: Ipv4Net) -> Result<bool, DataplaneError> {
        let subnet = subnet.trunc();
        let Some(old) = self.entries.get(&subnet).copied() else {
            return Ok(false);
        };
        match self.trie.remove(&key(subnet)) {
            // Already gone from the kernel: the copy was wrong, which the removal fixes.
            Ok(()) => {}
            Err(e) if is_absent(&e) => {}
            Err(source) => return Err(map_error("remove", MAP_VTEPS, subnet.to_string())(source)),
        }
        self.entries.remove(&subnet);
        self.drop_ref(old.ipv4())?;
        Ok(true)
    }

    /// One more entry names `addr`. Its counters come with its first packet.
    fn add_ref(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        let count = self.refs.get(&addr).copied().unwrap_or(0) + 1;
        self.addrs
            .insert(addr.octets(), count, 0)
            .map_err(map_error("insert", MAP_VTEP_ADDRS, addr.to_string()))?;
        self.refs.insert(addr, count);
        Ok(())
    }

    /// One entry fewer names `addr`; the last one makes it unknown.
    fn drop_ref(&mut self, addr: Ipv4Addr) -> Result<(), DataplaneError> {
        match self.refs.get(&addr).copied() {
            None => Ok(()),
            Some(count) if count <= 1 => {
                match self.addrs.remove(&addr.octets()) {
                    Ok(()) => {}
                    Err(e) if is_absent(&e) => {}
                    Err(source) => return Err(map_error("remove", MAP_VTEP_ADDRS, addr.to_string())(source)),
                }
                remove_peer_stats(&mut self.peer_stats, addr)?;
                self.refs.remove(&addr);
                self.sweep_pending = true;
                Ok(())
            }
            Some(count) => {
                self.addrs.insert(addr.octets(), count - 1, 0).map_err(map_error(
                    "insert",
                    MAP_VTEP_ADDRS,
                    addr.to_string(),
                ))?;
                self.refs.insert(addr, count - 1);
                Ok(())
            }
        }
    }
}

/// Whether a failed delete found no such key. aya reports a delete's ENOENT as a syscall
/// error, not as `KeyNotFound` (which its lookups return), so both mean "already gone".
fn is_absent(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(e) => e.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

/// Removes the counters of the peer at `addr` (none is fine).
fn remove_peer_stats(map: &mut PeerStatsHash, addr: Ipv4Addr) -> Result<(), DataplaneError> {
    match map.remove(&addr.octets()) {
        Ok(()) => Ok(()),
        Err(e) if is_absent(&e) => Ok(()),
        Err(source) => Err(map_error("remove", MAP_PEER_STATS, addr.to_string())(source)),
    }
}

/// Reads a `FLANNEL_PEER_STATS` map, summing each peer's per-CPU values.
pub fn read_peer_counters(map: &PeerStatsHash) -> Result<BTreeMap<Ipv4Addr, PeerStats>, DataplaneError> {
    let mut out = BTreeMap::new();
    for entry in map.iter() {
        let (key, values) = entry.map_err(map_error("read", MAP_PEER_STATS, "entries"))?;
        let sum = values.iter().fold(PeerStats::default(), |a, v| PeerStats {
            encap_packets: a.encap_packets + v.encap_packets,
            encap_bytes: a.encap_bytes + v.encap_bytes,
            decap_packets: a.decap_packets + v.decap_packets,
            decap_bytes: a.decap_bytes + v.decap_bytes,
        });
        out.insert(Ipv4Addr::from(key), sum);
    }
    Ok(out)
}

/// The pod fast path's table of local pods (`FLANNEL_LOCAL_PODS`), with the agent's copy.
pub struct PodTable {
    /// The map.
    map: PodHash,
    /// What it holds.
    entries: BTreeMap<Ipv4Addr, LocalPod>,
}

impl PodTable {
    /// Takes over the map (possibly pinned, with entries).
    pub fn new(map: Map) -> Result<Self, DataplaneError> {
        let map = PodHash::try_from(map).map_err(map_error("open", MAP_LOCAL_PODS, "as a hash"))?;
        let mut entries = BTreeMap::new();
        for entry in map.iter() {
            let (key, pod) = entry.map_err(map_error("read", MAP_LOCAL_PODS, "entries"))?;
            entries.insert(Ipv4Addr::from(key), pod);
        }
        Ok(Self { map, entries })
    }

    /// The entries, from the agent's copy.
    pub fn entries(&self) -> &BTreeMap<Ipv4Addr, LocalPod> {
        &self.entries
    }

    /// Makes the map hold exactly `desired`; returns how many entries changed.
    pub fn sync(&mut self, desired: &BTreeMap<Ipv4Addr, LocalPod>) -> Result<usize, DataplaneError> {
        let stale: Vec<Ipv4Addr> = self
            .entries
            .keys()
            .filter(|ip| !desired.contains_key(ip))
            .copied()
            .collect();
        let mut changed = 0;
        for ip in stale {
            match self.map.remove(&ip.octets()) {
                Ok(()) => {}
                Err(e) if is_absent(&e) => {}
                Err(source) => return Err(map_error("remove", MAP_LOCAL_PODS, ip.to_string())(source)),
            }
            self.entries.remove(&ip);
            changed += 1;
        }
        for (ip, pod) in desired {
            if self.entries.get(ip) != Some(pod) {
                self.map
                    .insert(ip.octets(), pod, 0)
                    .map_err(map_error("insert", MAP_LOCAL_PODS, ip.to_string()))?;
                self.entries.insert(*ip, *pod);
                changed += 1;
            }
        }
        Ok(changed)
    }
}

/// The pod fast path's counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodCounters {
    /// One value per [`PodStat`], in index order.
    values: [u64; PodStat::COUNT as usize],
}

impl PodCounters {
    /// The value of one counter.
    pub fn get(&self, stat: PodStat) -> u64 {
        self.values[stat.index() as usize]
    }

    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (PodStat, u64)> + '_ {
        PodStat::ALL.into_iter().map(|stat| (stat, self.get(stat)))
    }
}

/// Reads and sums the per-CPU counters of a `FLANNEL_POD_STATS` map.
pub fn read_pod_counters(stats: &PerCpuArray<MapData, u64>) -> Result<PodCounters, DataplaneError> {
    let mut counters = PodCounters::default();
    for stat in PodStat::ALL {
        let values = stats
            .get(&stat.index(), 0)
            .map_err(map_error("read", MAP_POD_STATS, stat.name()))?;
        counters.values[stat.index() as usize] = values.iter().sum();
    }
    Ok(counters)
}

/// `flannel_xdp_decap`'s counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct XdpCounters {
    /// One value per [`XdpStat`], in index order.
    values: [u64; XdpStat::COUNT as usize],
}

impl XdpCounters {
    /// The value of one counter.
    pub fn get(&self, stat: XdpStat) -> u64 {
        self.values[stat.index() as usize]
    }

    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (XdpStat, u64)> + '_ {
        XdpStat::ALL.into_iter().map(|stat| (stat, self.get(stat)))
    }
}

/// Reads and sums the per-CPU counters of a `FLANNEL_XDP_STATS` map.
pub fn read_xdp_counters(stats: &PerCpuArray<MapData, u64>) -> Result<XdpCounters, DataplaneError> {
    let mut counters = XdpCounters::default();
    for stat in XdpStat::ALL {
        let values = stats
            .get(&stat.index(), 0)
            .map_err(map_error("read", MAP_XDP_STATS, stat.name()))?;
        counters.values[stat.index() as usize] = values.iter().sum();
    }
    Ok(counters)
}

/// Datapath counters, summed over CPUs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// One value per [`Stat`], in index order.
    values: [u64; Stat::COUNT as usize],
}

impl Counters {
    /// The value of one counter.
    pub fn get(&self, stat: Stat) -> u64 {
        self.values[stat.index() as usize]
    }

    /// Every counter with its value, in index order.
    pub fn iter(&self) -> impl Iterator<Item = (Stat, u64)> + '_ {
        Stat::ALL.into_iter().map(|stat| (stat, self.get(stat)))
    }
}

/// Reads and sums the per-CPU counters of a `FLANNEL_STATS` map.
pub fn read_counters(stats: &PerCpuArray<MapData, u64>) -> Result<Counters, DataplaneError> {
    let mut counters = Counters::default();
    for stat in Stat::ALL {
        let values = stats
            .get(&stat.index(), 0)
            .map_err(map_error("read", MAP_STATS, stat.name()))?;
        counters.values[stat.index() as usize] = values.iter().sum();
    }
    Ok(counters)
}

/// Opens a pinned `FLANNEL_STATS` or `FLANNEL_VTEPS`, for readers other than the agent
/// (`flannelctl`).
pub fn open_pinned(path: &std::path::Path, name: &'static str) -> Result<Map, DataplaneError> {
    let data = MapData::from_pin(path).map_err(map_error("open pinned", name, path.display().to_string()))?;
    Ok(match name {
        MAP_VTEPS => Map::LpmTrie(data),
        MAP_STATS | MAP_POD_STATS | MAP_XDP_STATS => Map::PerCpuArray(data),
        MAP_PEER_STATS => Map::PerCpuHashMap(data),
        MAP_KERNEL_FLOWS => Map::LruHashMap(data),
        _ => Map::HashMap(data),
    })
}

/// The flows a pinned `FLANNEL_KERNEL_FLOWS` holds.
pub fn read_kernel_flows(map: Map) -> Result<Vec<(FlowKey, KernelFlow)>, DataplaneError> {
    let flows = BpfHashMap::<MapData, FlowKey, KernelFlow>::try_from(map).map_err(map_error(
        "open",
        MAP_KERNEL_FLOWS,
        "as an LRU hash",
    ))?;
    flows
        .iter()
        .map(|entry| entry.map_err(map_error("read", MAP_KERNEL_FLOWS, "entries")))
        .collect()
}

/// Reads the entries of a pinned `FLANNEL_VTEPS`.
pub fn read_pinned_vteps(map: Map) -> Result<Vec<(Ipv4Net, RemoteVtep)>, DataplaneError> {
    let trie = VtepTrie::try_from(map).map_err(map_error("open", MAP_VTEPS, "as an LPM trie"))?;
    read_vteps(&trie)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_subnets_round_trip() {
        let net: Ipv4Net = "10.244.3.0/24".parse().unwrap();
        let k = key(net);
        assert_eq!((k.prefix_len(), k.data()), (24, [10, 244, 3, 0]));
        assert_eq!(subnet(&k), Some(net));
        // Host bits are not part of the key.
        assert_eq!(key("10.244.3.7/24".parse().unwrap()).data(), [10, 244, 3, 0]);
        assert_eq!(subnet(&Key::new(33, [0; 4])), None);
    }
}
