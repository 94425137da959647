//! The agent's side of the maps: the remote VTEPs (`FLANNEL_VTEPS` and the known addresses in
//! `FLANNEL_VTEP_ADDRS`, kept consistent with each other) and the counters.

use std::{
    collections::{BTreeMap, HashMap},
    net::Ipv4Addr,
};

use aya::maps::{lpm_trie::Key, HashMap as BpfHashMap, LpmTrie, Map, MapData, MapError, PerCpuArray};
use flannel_common::{RemoteVtep, Stat, MAP_STATS, MAP_VTEPS, MAP_VTEP_ADDRS};
use ipnet::Ipv4Net;

use super::DataplaneError;

/// `FLANNEL_VTEPS` as aya addresses it.
type VtepTrie = LpmTrie<MapData, [u8; 4], RemoteVtep>;
/// `FLANNEL_VTEP_ADDRS` as aya addresses it.
type AddrHash = BpfHashMap<MapData, [u8; 4], u32>;

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
    /// What `trie` holds.
    entries: BTreeMap<Ipv4Net, RemoteVtep>,
    /// How many entries name each VTEP address: what `addrs` holds.
    refs: HashMap<Ipv4Addr, u32>,
}

impl VtepTable {
    /// Takes over the two maps (possibly pinned by an earlier run, with entries) and repairs
    /// `FLANNEL_VTEP_ADDRS` to match `FLANNEL_VTEPS`, which is the one that counts.
    pub fn new(trie: Map, addrs: Map) -> Result<Self, DataplaneError> {
        let trie = VtepTrie::try_from(trie).map_err(map_error("open", MAP_VTEPS, "as an LPM trie"))?;
        let mut addrs = AddrHash::try_from(addrs).map_err(map_error("open", MAP_VTEP_ADDRS, "as a hash"))?;
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
        Ok(Self {
            trie,
            addrs,
            entries,
            refs,
        })
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
            Ok(()) | Err(MapError::KeyNotFound) => {}
            Err(source) => return Err(map_error("remove", MAP_VTEPS, subnet.to_string())(source)),
        }
        self.entries.remove(&subnet);
        self.drop_ref(old.ipv4())?;
        Ok(true)
    }

    /// One more entry names `addr`.
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
                    Ok(()) | Err(MapError::KeyNotFound) => {}
                    Err(source) => return Err(map_error("remove", MAP_VTEP_ADDRS, addr.to_string())(source)),
                }
                self.refs.remove(&addr);
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
        MAP_STATS => Map::PerCpuArray(data),
        _ => Map::HashMap(data),
    })
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
