//! Wire-format headers as byte-array structs, and the little bit of header math.
//!
//! Every struct is `#[repr(C)]` made of `u8` and byte arrays only: alignment 1, no padding, no
//! byte order ambiguity. They are read and written whole with `bpf_skb_load_bytes` /
//! `bpf_skb_store_bytes`, which also works on non-linear skbs and keeps the verifier out of
//! packet-pointer bounds tracking.

use core::mem::size_of;

/// Ethernet header length.
pub const ETH_HLEN: u32 = 14;
/// IPv4 header length without options.
pub const IPV4_HLEN: u32 = 20;
/// UDP header length.
pub const UDP_HLEN: u32 = 8;
/// VXLAN header length.
pub const VXLAN_HLEN: u32 = 8;
/// Bytes the encapsulation adds in front of the inner frame: outer Ethernet, IPv4, UDP and
/// VXLAN (the kernel's `VXLAN_HEADROOM`, drivers/net/vxlan, plus the outer Ethernet header).
pub const VXLAN_ENCAP_LEN: u32 = ETH_HLEN + IPV4_HLEN + UDP_HLEN + VXLAN_HLEN;
/// Bytes `bpf_skb_adjust_room` in MAC mode inserts or removes right after the first 14 bytes
/// (it keeps the frame's own Ethernet header in place): outer IPv4, UDP, VXLAN and the inner
/// Ethernet header. Same number as [`VXLAN_ENCAP_LEN`], other bytes.
pub const ADJUST_LEN: u32 = IPV4_HLEN + UDP_HLEN + VXLAN_HLEN + ETH_HLEN;

/// EtherType IPv4, as on the wire.
pub const ETH_P_IP: [u8; 2] = [0x08, 0x00];
/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;
/// IPv4 `frag_off` bits that mark a fragment (More Fragments, and the offset).
pub const IP_FRAG_MASK: u16 = 0x3fff;
/// The first word of a VXLAN header with only the I flag (valid VNI) set (RFC 7348).
pub const VXLAN_FLAGS_I: [u8; 4] = [0x08, 0, 0, 0];

/// An Ethernet header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct EthHdr {
    /// Destination MAC.
    pub dst: [u8; 6],
    /// Source MAC.
    pub src: [u8; 6],
    /// EtherType, network byte order.
    pub proto: [u8; 2],
}

/// An IPv4 header without options.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ipv4Hdr {
    /// Version (high nibble) and header length in 32-bit words (low nibble).
    pub version_ihl: u8,
    /// DSCP and ECN.
    pub tos: u8,
    /// Total length, network byte order.
    pub tot_len: [u8; 2],
    /// Identification.
    pub id: [u8; 2],
    /// Flags and fragment offset.
    pub frag_off: [u8; 2],
    /// Time to live.
    pub ttl: u8,
    /// Protocol of the payload.
    pub protocol: u8,
    /// Header checksum.
    pub check: [u8; 2],
    /// Source address.
    pub saddr: [u8; 4],
    /// Destination address.
    pub daddr: [u8; 4],
}

/// A UDP header.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct UdpHdr {
    /// Source port.
    pub source: [u8; 2],
    /// Destination port.
    pub dest: [u8; 2],
    /// Length of header and payload.
    pub len: [u8; 2],
    /// Checksum (0: none, allowed over IPv4).
    pub check: [u8; 2],
}

/// A VXLAN header (RFC 7348): flags, 24 reserved bits, the VNI and 8 reserved bits.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanHdr {
    /// Flags and reserved bits.
    pub flags: [u8; 4],
    /// VNI in the upper 24 bits.
    pub vni: [u8; 4],
}

/// Everything the encapsulation writes in front of the inner IPv4 packet, in wire order.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanEncap {
    /// Outer Ethernet header (placeholder: `bpf_redirect_neigh` replaces it).
    pub eth: EthHdr,
    /// Outer IPv4 header.
    pub ip: Ipv4Hdr,
    /// Outer UDP header.
    pub udp: UdpHdr,
    /// VXLAN header.
    pub vxlan: VxlanHdr,
    /// Inner Ethernet header.
    pub inner_eth: EthHdr,
}

/// The start of a frame that may be VXLAN: outer Ethernet, IPv4 (no options) and UDP.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct OuterHdrs {
    /// Outer Ethernet header.
    pub eth: EthHdr,
    /// Outer IPv4 header.
    pub ip: Ipv4Hdr,
    /// Outer UDP header.
    pub udp: UdpHdr,
}

/// What follows [`OuterHdrs`] in a VXLAN frame, up to the inner IPv4 version byte.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct VxlanPayloadHdrs {
    /// VXLAN header.
    pub vxlan: VxlanHdr,
    /// Inner Ethernet header.
    pub inner_eth: EthHdr,
    /// First byte of the inner IPv4 header (version and IHL).
    pub inner_version_ihl: u8,
}

const _: () = assert!(size_of::<EthHdr>() == ETH_HLEN as usize);
const _: () = assert!(size_of::<Ipv4Hdr>() == IPV4_HLEN as usize);
const _: () = assert!(size_of::<UdpHdr>() == UDP_HLEN as usize);
const _: () = assert!(size_of::<VxlanHdr>() == VXLAN_HLEN as usize);
const _: () = assert!(size_of::<VxlanEncap>() == (VXLAN_ENCAP_LEN + ETH_HLEN) as usize);
const _: () = assert!(size_of::<OuterHdrs>() == (ETH_HLEN + IPV4_HLEN + UDP_HLEN) as usize);
const _: () = assert!(size_of::<VxlanPayloadHdrs>() == (VXLAN_HLEN + ETH_HLEN + 1) as usize);
const _: () = assert!(ADJUST_LEN == VXLAN_ENCAP_LEN);

/// The IPv4 header checksum of `ip` (see [`flannel_common::wire::ipv4_checksum`]).
#[inline(always)]
pub fn ipv4_checksum(ip: &Ipv4Hdr) -> [u8; 2] {
    // SAFETY: `Ipv4Hdr` is 20 bytes of `u8`s and byte arrays (alignment 1, no padding).
    let bytes: &[u8; 20] = unsafe { &*(ip as *const Ipv4Hdr).cast() };
    flannel_common::wire::ipv4_checksum(bytes)
}
