//! The kernel/user contract of flannel-rs: BPF map and program names, map keys and values.
//!
//! `flannel-ebpf` (built for `bpfel-unknown-none`) and the agent's `dataplane` module both
//! use these definitions, so a layout change is one edit here and both sides follow. Every
//! type is `#[repr(C)]` with fixed-width fields, no implicit padding and a compile-time size
//! assert; with the `user` feature each one is also an [`aya::Pod`] so aya can copy it in and
//! out of maps.
#![no_std]

use core::{mem::size_of, net::Ipv4Addr};

/// Name of the LPM trie that maps a remote pod subnet to the VTEP that serves it.
pub const MAP_VTEPS: &str = "FLANNEL_VTEPS";
/// Name of the per-CPU array of datapath counters, indexed by [`Stat`].
pub const MAP_STATS: &str = "FLANNEL_STATS";
/// Every map the agent expects in the built object.
pub const MAP_NAMES: [&str; 2] = [MAP_VTEPS, MAP_STATS];

/// Name of the TC egress classifier that looks up the destination VTEP of a packet.
pub const PROG_ENCAP: &str = "flannel_encap";
/// Name of the TC ingress classifier for packets that arrive from remote VTEPs.
pub const PROG_DECAP: &str = "flannel_decap";
/// Every program the agent expects in the built object.
pub const PROGRAM_NAMES: [&str; 2] = [PROG_ENCAP, PROG_DECAP];

/// Capacity of [`MAP_VTEPS`]: one entry per remote node lease.
///
/// 65536 is a /16 cluster network cut into /32 leases, far above flannel's usual /8 into
/// /24s; the trie is created with `BPF_F_NO_PREALLOC` (the kernel insists), so the unused
/// capacity costs no memory.
pub const VTEPS_MAX_ENTRIES: u32 = 65536;

/// Key of [`MAP_VTEPS`]: an IPv4 prefix in the layout the kernel's LPM trie expects.
///
/// The kernel reads `prefix_len` first and then compares `addr` byte by byte, most significant
/// bit first (`struct bpf_lpm_trie_key_u8` in `include/uapi/linux/bpf.h`), so `addr` holds the
/// address in network byte order: its in-memory bytes are the four octets. The layout is the
/// same as aya's `lpm_trie::Key<u32>`, which both aya crates use to address the trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VtepKey {
    /// Number of leading bits of `addr` that are significant (0..=32).
    pub prefix_len: u32,
    /// IPv4 address, network byte order (`u32::from_ne_bytes(octets)`).
    pub addr: u32,
}

const _: () = assert!(size_of::<VtepKey>() == 8);

impl VtepKey {
    /// Builds the key for `addr/prefix_len`.
    pub const fn new(addr: Ipv4Addr, prefix_len: u32) -> Self {
        Self {
            prefix_len,
            addr: u32::from_ne_bytes(addr.octets()),
        }
    }

    /// Builds the key to look up a single address (a /32), as the datapath does per packet.
    ///
    /// `addr` is taken as it sits in the packet, i.e. already in network byte order.
    pub const fn host(addr: u32) -> Self {
        Self { prefix_len: 32, addr }
    }

    /// The prefix address as an [`Ipv4Addr`].
    pub const fn ipv4(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.addr.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }
}

/// [`VtepInfo::flags`] bit: the remote node shares an L2 segment with this one, so its
/// packets are routed directly instead of encapsulated (flannel's `DirectRouting`).
pub const VTEP_F_DIRECT_ROUTING: u16 = 1 << 0;

/// Value of [`MAP_VTEPS`]: how to reach the VTEP of a remote node.
///
/// Fields are ordered so that each is naturally aligned and the struct has no padding byte
/// (aya copies it as raw bytes, and padding would carry uninitialised memory into the map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct VtepInfo {
    /// Underlay (public) IPv4 address of the remote node: the outer destination, network
    /// byte order.
    pub remote_ip: u32,
    /// MAC address of the remote node's `flannel.<VNI>` device: the inner destination MAC.
    pub mac: [u8; 6],
    /// `VTEP_F_*` bits.
    pub flags: u16,
}

const _: () = assert!(size_of::<VtepInfo>() == 12);
const _: () = assert!(size_of::<VtepInfo>() == size_of::<u32>() + size_of::<[u8; 6]>() + size_of::<u16>());

impl VtepInfo {
    /// Builds the value for a remote VTEP at `remote_ip` with device MAC `mac`.
    pub const fn new(remote_ip: Ipv4Addr, mac: [u8; 6], flags: u16) -> Self {
        Self {
            remote_ip: u32::from_ne_bytes(remote_ip.octets()),
            mac,
            flags,
        }
    }

    /// The underlay address as an [`Ipv4Addr`].
    pub const fn remote_ipv4(&self) -> Ipv4Addr {
        let [a, b, c, d] = self.remote_ip.to_ne_bytes();
        Ipv4Addr::new(a, b, c, d)
    }
}

/// Index of a counter in [`MAP_STATS`]; each slot is a per-CPU `u64`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stat {
    /// Packets seen by the encap program.
    EncapPackets = 0,
    /// IPv4 packets whose destination matched a remote subnet in [`MAP_VTEPS`].
    EncapVtepHit = 1,
    /// IPv4 packets whose destination matched no remote subnet (left to the stack).
    EncapVtepMiss = 2,
    /// Packets the encap program passed without a lookup (not IPv4, or too short).
    EncapNotIpv4 = 3,
    /// Packets seen by the decap program.
    DecapPackets = 4,
}

impl Stat {
    /// Every counter, in index order.
    pub const ALL: [Self; 5] = [
        Self::EncapPackets,
        Self::EncapVtepHit,
        Self::EncapVtepMiss,
        Self::EncapNotIpv4,
        Self::DecapPackets,
    ];
    /// Number of slots in [`MAP_STATS`].
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// The slot of this counter in [`MAP_STATS`].
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable snake_case name for metrics and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Self::EncapPackets => "encap_packets",
            Self::EncapVtepHit => "encap_vtep_hit",
            Self::EncapVtepMiss => "encap_vtep_miss",
            Self::EncapNotIpv4 => "encap_not_ipv4",
            Self::DecapPackets => "decap_packets",
        }
    }
}

// `ALL` must list every variant in index order, or `COUNT` under-sizes the map.
const _: () = {
    let mut i = 0;
    while i < Stat::ALL.len() {
        assert!(Stat::ALL[i].index() as usize == i);
        i += 1;
    }
};

// SAFETY: `VtepKey` and `VtepInfo` are `#[repr(C)]`, made only of integers and byte arrays
// (every bit pattern is valid), `Copy`, and have no padding (the size asserts above).
#[cfg(feature = "user")]
unsafe impl aya::Pod for VtepKey {}
// SAFETY: see `VtepKey` above.
#[cfg(feature = "user")]
unsafe impl aya::Pod for VtepInfo {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vtep_key_holds_the_address_in_network_byte_order() {
        let key = VtepKey::new(Ipv4Addr::new(10, 244, 1, 0), 24);
        assert_eq!(key.addr.to_ne_bytes(), [10, 244, 1, 0]);
        assert_eq!(key.ipv4(), Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(VtepKey::host(key.addr).prefix_len, 32);
    }

    #[test]
    fn vtep_info_round_trips_the_remote_address() {
        let info = VtepInfo::new(Ipv4Addr::new(192, 0, 2, 7), [2, 0, 0, 0, 0, 1], VTEP_F_DIRECT_ROUTING);
        assert_eq!(info.remote_ipv4(), Ipv4Addr::new(192, 0, 2, 7));
    }

    #[test]
    fn stat_names_are_unique() {
        for (i, a) in Stat::ALL.iter().enumerate() {
            for b in &Stat::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
