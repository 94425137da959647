//! The udp backend's packet work, pure and unprivileged: checking an inner IPv4 header,
//! decrementing its TTL, and building the ICMP "net unreachable" upstream's proxy answers
//! with. The wire format is upstream's: the UDP payload is the raw inner IPv4 packet, with
//! no header of its own.

use std::net::Ipv4Addr;

/// The smallest IPv4 header.
pub const IPV4_MIN_HEADER: usize = 20;
/// What the outer IPv4 and UDP headers add to every packet (20 + 8): the TUN's MTU is the
/// underlay's less this.
pub const OVERHEAD: u32 = 28;
/// The TTL of the ICMP errors we generate, as upstream's proxy.
const ICMP_TTL: u8 = 8;
/// How much of the offending packet an ICMP error quotes beyond its IP header (RFC 792).
const ICMP_QUOTE: usize = 8;
/// The longest ICMP error we build: IPv4 header + ICMP header + the quoted header
/// (at most 60 bytes with options) + 8 bytes.
pub const ICMP_MAX: usize = IPV4_MIN_HEADER + 8 + 60 + ICMP_QUOTE;

/// Why a packet is not an IPv4 packet we can forward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not IP version 4 (from the TUN this is usually IPv6 the kernel sends on its own).
    NotIpv4,
    /// Shorter than its header, a header length under 5 words, or a total length that
    /// does not fit in the datagram.
    BadLength,
    /// The header checksum does not verify.
    BadChecksum,
}

/// The fields of an inner IPv4 header the proxy uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ipv4Header {
    /// Source address.
    pub src: Ipv4Addr,
    /// Destination address.
    pub dst: Ipv4Addr,
    /// Header length in bytes.
    pub header_len: usize,
    /// Total length from the header: the packet ends there (anything after it is padding).
    pub total_len: usize,
    /// The TTL as received.
    pub ttl: u8,
    /// The protocol number.
    pub protocol: u8,
    /// Whether this is a fragment other than the first (fragment offset > 0).
    pub later_fragment: bool,
}

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

fn addr(b: &[u8], at: usize) -> Ipv4Addr {
    Ipv4Addr::new(b[at], b[at + 1], b[at + 2], b[at + 3])
}

/// Adds `data` as big-endian 16-bit words to `sum` (RFC 1071, not folded); the running sum
/// the checksum helpers below and the TCP segment code share.
///
/// Every byte of a forwarded TCP stream goes through here twice (segment checksums on send,
/// their verification on receive), so it reads 32-bit native-endian words: the one's
/// complement sum does not depend on byte order (RFC 1071 §2(B)), so the 16-bit fold of
/// the native sum, byte-swapped once on a little-endian CPU, is the big-endian sum. A 64-bit
/// accumulator of 32-bit words cannot overflow below 2^32 words, far beyond any packet.
pub(super) fn sum16(data: &[u8], sum: u64) -> u64 {
    let mut words = data.chunks_exact(4);
    let mut native: u64 = 0;
    for w in &mut words {
        native += u64::from(u32::from_ne_bytes([w[0], w[1], w[2], w[3]]));
    }
    let folded = fold(native);
    let mut sum = sum
        + u64::from(if cfg!(target_endian = "little") {
            folded.swap_bytes()
        } else {
            folded
        });
    // The tail starts at an offset divisible by 4, so its words are aligned as RFC 1071's.
    let mut tail = words.remainder().chunks_exact(2);
    for w in &mut tail {
        sum += u64::from(u16::from_be_bytes([w[0], w[1]]));
    }
    if let [last] = tail.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

/// Folds a running [`sum16`] into 16 bits (not complemented).
pub(super) fn fold(mut sum: u64) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The Internet checksum (RFC 1071) of `data`, folded and complemented.
pub fn checksum(data: &[u8]) -> u16 {
    !fold(sum16(data, 0))
}

/// Parses the IPv4 header at the start of `pkt`. `verify_checksum` is for packets from the
/// network (the TUN hands us what our own kernel built).
pub fn parse(pkt: &[u8], verify_checksum: bool) -> Result<Ipv4Header, Malformed> {
    let Some(&first) = pkt.first() else {
        return Err(Malformed::BadLength);
    };
    if first >> 4 != 4 {
        return Err(Malformed::NotIpv4);
    }
    let header_len = usize::from(first & 0x0f) * 4;
    if header_len < IPV4_MIN_HEADER || pkt.len() < header_len {
        return Err(Malformed::BadLength);
    }
    let total_len = usize::from(be16(pkt, 2));
    if total_len < header_len || total_len > pkt.len() {
        return Err(Malformed::BadLength);
    }
    if verify_checksum && checksum(&pkt[..header_len]) != 0 {
        return Err(Malformed::BadChecksum);
    }
    Ok(Ipv4Header {
        src: addr(pkt, 12),
        dst: addr(pkt, 16),
        header_len,
        total_len,
        ttl: pkt[8],
        protocol: pkt[9],
        later_fragment: be16(pkt, 6) & 0x1fff != 0,
    })
}

/// Decrements the TTL in place with an incremental checksum update (RFC 1624, eqn. 3);
/// returns false, leaving the packet as it was, when the TTL would reach 0 (upstream's
/// proxy drops such packets in both directions). `pkt` must have passed [`parse`].
pub fn decrement_ttl(pkt: &mut [u8]) -> bool {
    let ttl = pkt[8];
    if ttl <= 1 {
        return false;
    }
    // The TTL is the high byte of the 16-bit word it shares with the protocol.
    let old = u16::from_be_bytes([ttl, pkt[9]]);
    let new = u16::from_be_bytes([ttl - 1, pkt[9]]);
    let hc = be16(pkt, 10);
    // HC' = ~(~HC + ~m + m')
    let mut sum = u32::from(!hc) + u32::from(!old) + u32::from(new);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    pkt[8] = ttl - 1;
    pkt[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    true
}

/// Whether upstream's proxy would answer this packet with an ICMP error: never for ICMP
/// itself (no errors about errors) nor for fragments past the first (RFC 1122 3.2.2).
pub fn wants_icmp_error(h: &Ipv4Header) -> bool {
    h.protocol != 1 && !h.later_fragment
}

/// Writes into `out` an ICMP destination unreachable / net unreachable (type 3, code 0)
/// from `from` back to the sender of `pkt`, quoting its IP header and 8 bytes, and returns
/// its length. `pkt` must have passed [`parse`] with header `h`.
pub fn icmp_net_unreachable(pkt: &[u8], h: &Ipv4Header, from: Ipv4Addr, out: &mut [u8; ICMP_MAX]) -> usize {
    let quote = (h.header_len + ICMP_QUOTE).min(h.total_len);
    let icmp_len = 8 + quote;
    let total = IPV4_MIN_HEADER + icmp_len;
    let ip = &mut out[..IPV4_MIN_HEADER];
    ip.fill(0);
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    ip[8] = ICMP_TTL;
    ip[9] = 1;
    ip[12..16].copy_from_slice(&from.octets());
    ip[16..20].copy_from_slice(&h.src.octets());
    let c = checksum(ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let icmp = &mut out[IPV4_MIN_HEADER..total];
    icmp[..8].fill(0);
    icmp[0] = 3;
    icmp[8..].copy_from_slice(&pkt[..quote]);
    let c = checksum(icmp);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    total
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An IPv4 packet of `proto` with `payload`, checksum filled in.
    pub(crate) fn packet(src: [u8; 4], dst: [u8; 4], ttl: u8, proto: u8, payload: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; 20];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
        p[6] = 0x40; // DF
        p[8] = ttl;
        p[9] = proto;
        p[12..16].copy_from_slice(&src);
        p[16..20].copy_from_slice(&dst);
        let c = checksum(&p);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p.extend_from_slice(payload);
        p
    }

    /// The plain RFC 1071 definition, one big-endian word at a time.
    fn reference_sum(data: &[u8]) -> u16 {
        let mut sum = 0u64;
        for (i, b) in data.iter().enumerate() {
            sum += u64::from(*b) << if i % 2 == 0 { 8 } else { 0 };
        }
        fold(sum)
    }

    #[test]
    fn word_sum_matches_the_definition_at_every_length() {
        // Bytes that make carries frequent, lengths that leave every tail (0 to 3 bytes).
        let data: Vec<u8> = (0..2000u32)
            .map(|i| (i.wrapping_mul(0x9e37_79b9) >> 13) as u8 | 0x80)
            .collect();
        for len in 0..300 {
            assert_eq!(
                fold(sum16(&data[..len], 0)),
                reference_sum(&data[..len]),
                "length {len}"
            );
        }
        assert_eq!(fold(sum16(&data, 0)), reference_sum(&data));
        assert_eq!(fold(sum16(&[0xff; 65_535], 0)), reference_sum(&[0xff; 65_535]));
        // A running sum carries in.
        assert_eq!(
            fold(sum16(&data[7..], 0x1_2345)),
            fold(u64::from(reference_sum(&data[7..])) + 0x1_2345)
        );
    }

    #[test]
    fn parses_a_valid_header() {
        let p = packet([10, 244, 1, 2], [10, 244, 2, 3], 64, 6, &[0; 12]);
        let h = parse(&p, true).unwrap();
        assert_eq!(h.src, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!(h.dst, Ipv4Addr::new(10, 244, 2, 3));
        assert_eq!((h.header_len, h.total_len, h.ttl, h.protocol), (20, 32, 64, 6));
        assert!(!h.later_fragment);
    }

    #[test]
    fn rejects_malformed_headers() {
        let good = packet([10, 244, 1, 2], [10, 244, 2, 3], 64, 17, &[1, 2, 3, 4]);
        assert_eq!(parse(&[], true), Err(Malformed::BadLength));
        assert_eq!(parse(&good[..19], true), Err(Malformed::BadLength));
        let mut v6 = good.clone();
        v6[0] = 0x60;
        assert_eq!(parse(&v6, true), Err(Malformed::NotIpv4));
        let mut short_ihl = good.clone();
        short_ihl[0] = 0x44;
        assert_eq!(parse(&short_ihl, false), Err(Malformed::BadLength));
        let mut long_ihl = good.clone();
        long_ihl[0] = 0x4f;
        assert_eq!(parse(&long_ihl, false), Err(Malformed::BadLength));
        // Total length beyond the datagram, and shorter than the header.
        assert_eq!(parse(&good[..23], true), Err(Malformed::BadLength));
        let mut tiny_total = good.clone();
        tiny_total[2..4].copy_from_slice(&10u16.to_be_bytes());
        assert_eq!(parse(&tiny_total, false), Err(Malformed::BadLength));
        let mut bad_sum = good.clone();
        bad_sum[15] ^= 1;
        assert_eq!(parse(&bad_sum, true), Err(Malformed::BadChecksum));
        assert!(parse(&bad_sum, false).is_ok());
        // Padding after the packet is allowed; the total length says where it ends.
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert_eq!(parse(&padded, true).unwrap().total_len, good.len());
    }

    #[test]
    fn ttl_decrement_keeps_the_checksum_valid() {
        for ttl in [2u8, 3, 64, 128, 255] {
            for proto in [1u8, 6, 17, 255] {
                let mut p = packet([10, 244, 1, 2], [192, 168, 255, 255], ttl, proto, &[]);
                assert!(decrement_ttl(&mut p));
                assert_eq!(p[8], ttl - 1);
                assert_eq!(checksum(&p[..20]), 0, "ttl {ttl} proto {proto}");
            }
        }
        // Checksums at the edges of the ones' complement arithmetic.
        for src3 in 0..=255u8 {
            let mut p = packet([255, 255, 255, src3], [255, 255, 0, 0], 2, 0, &[]);
            assert!(decrement_ttl(&mut p));
            assert_eq!(checksum(&p[..20]), 0, "src .{src3}");
        }
    }

    #[test]
    fn ttl_of_one_or_zero_is_dropped_untouched() {
        for ttl in [0u8, 1] {
            let mut p = packet([10, 244, 1, 2], [10, 244, 2, 3], ttl, 6, &[]);
            let before = p.clone();
            assert!(!decrement_ttl(&mut p));
            assert_eq!(p, before);
        }
    }

    #[test]
    fn icmp_error_quotes_header_and_eight_bytes() {
        let p = packet([10, 244, 1, 2], [10, 244, 9, 3], 64, 17, &[9; 40]);
        let h = parse(&p, false).unwrap();
        assert!(wants_icmp_error(&h));
        let mut out = [0u8; ICMP_MAX];
        let n = icmp_net_unreachable(&p, &h, Ipv4Addr::new(10, 244, 1, 0), &mut out);
        let r = &out[..n];
        assert_eq!(n, 20 + 8 + 28);
        let rh = parse(r, true).unwrap();
        assert_eq!(rh.src, Ipv4Addr::new(10, 244, 1, 0));
        assert_eq!(rh.dst, Ipv4Addr::new(10, 244, 1, 2));
        assert_eq!((rh.protocol, rh.ttl, rh.total_len), (1, 8, n));
        assert_eq!((r[20], r[21]), (3, 0));
        assert_eq!(checksum(&r[20..]), 0);
        assert_eq!(&r[28..], &p[..28]);
    }

    #[test]
    fn icmp_error_quotes_less_of_a_short_packet() {
        let p = packet([10, 244, 1, 2], [10, 244, 9, 3], 64, 6, &[1, 2, 3]);
        let h = parse(&p, false).unwrap();
        let mut out = [0u8; ICMP_MAX];
        let n = icmp_net_unreachable(&p, &h, Ipv4Addr::new(10, 244, 1, 0), &mut out);
        assert_eq!(n, 20 + 8 + 23);
        assert_eq!(checksum(&out[20..n]), 0);
    }

    #[test]
    fn no_icmp_errors_for_icmp_or_later_fragments() {
        let icmp = packet([10, 244, 1, 2], [10, 244, 9, 3], 64, 1, &[8, 0, 0, 0]);
        assert!(!wants_icmp_error(&parse(&icmp, false).unwrap()));
        let mut frag = packet([10, 244, 1, 2], [10, 244, 9, 3], 64, 17, &[0; 8]);
        frag[6] = 0x20; // MF
        frag[7] = 0x10; // offset 16 * 8
        assert!(!wants_icmp_error(&parse(&frag, false).unwrap()));
        frag[7] = 0; // first fragment, MF set: answered
        assert!(wants_icmp_error(&parse(&frag, false).unwrap()));
    }
}
