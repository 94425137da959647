//! Segmentation for TUN reads: with TCP segmentation offload on `flannel0`
//! (`TUNSETOFFLOAD`), the kernel hands the proxy a pod's TCP send as one large packet (up to
//! 64 kB) and a virtio-net header with the segment size, instead of one `read` per 1.4 kB
//! packet. The proxy cuts it into the packets the kernel would have sent, each complete
//! (its own IPv4 and TCP headers and checksums), back to back, so that they go out as one
//! `UDP_SEGMENT` message: one inner packet per datagram on the wire, as upstream's.
//!
//! The cut follows the kernel's TSO: sequence numbers advance by the segment size, the IPv4
//! ID by one per segment, FIN and PSH stay on the last segment only, CWR on the first.

use super::coalesce::{pseudo_sum, TCP};
use super::wire::{self, be16, fold, sum16};

const TCP_FIN: u8 = 0x01;
const TCP_PSH: u8 = 0x08;
const TCP_CWR: u8 = 0x80;

/// Cuts the IPv4/TCP offload packet `pkt` into segments of `gso_size` payload bytes,
/// written back to back into `out`. Returns the size of every segment but the last (which
/// may be shorter); `None` when `pkt` is not IPv4 TCP with a payload, or its headers do not
/// fit.
pub fn segment(pkt: &[u8], gso_size: usize, out: &mut Vec<u8>) -> Option<usize> {
    out.clear();
    if pkt.len() < 20 || pkt[0] >> 4 != 4 || pkt[9] != TCP || gso_size == 0 {
        return None;
    }
    let ihl = usize::from(pkt[0] & 0x0f) * 4;
    if ihl < 20 || pkt.len() < ihl + 20 {
        return None;
    }
    let thl = usize::from(pkt[ihl + 12] >> 4) * 4;
    let hl = ihl + thl;
    if thl < 20 || pkt.len() <= hl {
        return None;
    }
    let payload = &pkt[hl..];
    let count = payload.len().div_ceil(gso_size);
    let id = be16(pkt, 4);
    let seq = u32::from_be_bytes([pkt[ihl + 4], pkt[ihl + 5], pkt[ihl + 6], pkt[ihl + 7]]);
    let flags = pkt[ihl + 13];
    for (k, chunk) in payload.chunks(gso_size).enumerate() {
        let start = out.len();
        out.extend_from_slice(&pkt[..hl]);
        out.extend_from_slice(chunk);
        let p = &mut out[start..];
        let total = hl + chunk.len();
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&id.wrapping_add(k as u16).to_be_bytes());
        p[10..12].fill(0);
        let c = wire::checksum(&p[..ihl]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        let t = &mut p[ihl..];
        let s = seq.wrapping_add((k * gso_size) as u32);
        t[4..8].copy_from_slice(&s.to_be_bytes());
        let mut f = flags;
        if k + 1 < count {
            f &= !(TCP_FIN | TCP_PSH);
        }
        if k > 0 {
            f &= !TCP_CWR;
        }
        t[13] = f;
        t[16..18].fill(0);
        let c = !fold(sum16(&p[ihl..], pseudo_sum(&p[..ihl], total - ihl)));
        p[ihl + 16..ihl + 18].copy_from_slice(&c.to_be_bytes());
    }
    Some(hl + gso_size)
}

#[cfg(test)]
mod tests {
    use super::super::coalesce::{joinable, Coalescer, TCP_ACK, VNET_HDR_LEN};
    use super::*;

    /// A TSO packet as the TUN hands it over: one IPv4/TCP header, `payload`, a partial
    /// (here: zero) TCP checksum.
    fn offload_packet(payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 20 + 32 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&0xfffeu16.to_be_bytes());
        p[6] = 0x40;
        p[8] = 63;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&0xffff_ff00u32.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]);
        p[52..].copy_from_slice(payload);
        p
    }

    #[test]
    fn cuts_like_tso_and_coalesces_back() {
        let payload: Vec<u8> = (0..240u32).map(|i| i as u8).collect();
        let big = offload_packet(&payload, TCP_ACK | TCP_PSH | TCP_CWR);
        let mut out = Vec::new();
        assert_eq!(segment(&big, 100, &mut out), Some(152));
        assert_eq!(out.len(), 3 * 52 + 240);
        let segs: Vec<&[u8]> = out.chunks(152).collect();
        assert_eq!(segs.len(), 3);
        for (k, s) in segs.iter().enumerate() {
            assert_eq!(fold(sum16(&s[..20], 0)), 0xffff, "segment {k}: IPv4 checksum");
            let tcp_sum = fold(sum16(&s[20..], pseudo_sum(s, s.len() - 20)));
            assert_eq!(tcp_sum, 0xffff, "segment {k}: TCP checksum");
            assert_eq!(joinable(s).is_some(), k > 0, "segment {k}: only CWR keeps it alone");
            assert_eq!(usize::from(be16(s, 2)), s.len());
            assert_eq!(be16(s, 4), 0xfffeu16.wrapping_add(k as u16), "IPv4 ID");
            let seq = u32::from_be_bytes([s[24], s[25], s[26], s[27]]);
            assert_eq!(seq, 0xffff_ff00u32.wrapping_add(100 * k as u32), "sequence wraps");
            let want = match k {
                0 => TCP_ACK | TCP_CWR,
                1 => TCP_ACK,
                _ => TCP_ACK | TCP_PSH,
            };
            assert_eq!(s[33], want, "flags of segment {k}");
        }
        // CWR makes the first one unjoinable; the other two coalesce back into the tail.
        let mut co = Coalescer::default();
        assert!(co.push(segs[1]) && co.push(segs[2]));
        let (back, n, _) = co.take().unwrap();
        assert_eq!(n, 2);
        assert_eq!(&back[VNET_HDR_LEN + 52..], &payload[100..]);
    }

    #[test]
    fn rejects_what_is_not_tcp_with_a_payload() {
        let mut out = Vec::new();
        let mut udp = offload_packet(&[0; 10], TCP_ACK);
        udp[9] = 17;
        assert_eq!(segment(&udp, 100, &mut out), None);
        assert_eq!(segment(&offload_packet(&[], TCP_ACK), 100, &mut out), None);
        assert_eq!(segment(&offload_packet(&[0; 10], TCP_ACK)[..30], 100, &mut out), None);
        assert_eq!(segment(&offload_packet(&[0; 10], TCP_ACK), 0, &mut out), None);
        // A single short segment is just that packet, with its checksum completed.
        assert_eq!(segment(&offload_packet(&[5; 10], TCP_ACK), 100, &mut out), Some(152));
        assert_eq!(out.len(), 62);
        assert!(joinable(&out).is_some());
    }
}
