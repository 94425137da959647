//! Receive coalescing for the TUN: consecutive segments of one TCP stream, as a peer's
//! proxy sends them (one run of same-sized datagrams, see [`super::mmsg`]), are written to
//! `flannel0` as one large packet with a virtio-net header asking the kernel for TCP
//! segmentation offload (`IFF_VNET_HDR`), the way a NIC's GRO hands them up.
//!
//! Why: once sending was batched, the receiving proxy was the bottleneck, and ~65 % of its
//! time went into the TUN `write` of each 1.4 kB packet, which runs the whole forwarding
//! path into the pod (bridge, veth, the pod's TCP receive) once per packet. One write of
//! a coalesced packet runs it once per run. The pod's TCP sees what a GRO NIC would hand
//! it; should the packet leave the node again, the kernel cuts it into the same segments.
//!
//! Only plain segments join: IPv4 without options, don't-fragment, TCP with ACK (PSH on
//! the last one only), identical headers but for the sequence number, contiguous
//! sequence numbers, every payload of the first's size but the last's, and a TCP checksum
//! that verifies (the coalesced packet carries a partial checksum the kernel trusts).
//! Anything else is written as it came.

use super::wire::{self, fold, sum16};

/// The virtio-net header `IFF_VNET_HDR` puts before every packet on the TUN.
pub const VNET_HDR_LEN: usize = 10;
/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const VNET_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const VNET_GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const VNET_GSO_TCPV4: u8 = 1;
/// The largest IPv4 packet.
const MAX_PACKET: usize = 65_535;
pub(super) const TCP: u8 = 6;
pub(super) const TCP_ACK: u8 = 0x10;
pub(super) const TCP_PSH: u8 = 0x08;

/// The TCP pseudo-header sum of an IPv4 packet `ip` (header of 20 bytes) for a TCP
/// segment of `tcp_len` bytes.
pub(super) fn pseudo_sum(ip: &[u8], tcp_len: usize) -> u64 {
    sum16(&ip[12..20], u64::from(TCP) + tcp_len as u64)
}

/// The TCP header length of `pkt` when it is a segment that may join a run, else `None`.
pub(super) fn joinable(pkt: &[u8]) -> Option<usize> {
    if pkt.len() < 40 || pkt[0] != 0x45 || pkt[9] != TCP {
        return None;
    }
    // Don't-fragment, not a fragment.
    if u16::from_be_bytes([pkt[6], pkt[7]]) != 0x4000 {
        return None;
    }
    let thl = usize::from(pkt[32] >> 4) * 4;
    if thl < 20 || 20 + thl >= pkt.len() || pkt[33] & !(TCP_ACK | TCP_PSH) != 0 || pkt[33] & TCP_ACK == 0 {
        return None;
    }
    // The checksum over the pseudo-header and the segment, its own field included.
    if fold(sum16(&pkt[20..], pseudo_sum(pkt, pkt.len() - 20))) != 0xffff {
        return None;
    }
    Some(thl)
}

/// Whether `b` may follow `a` (the run's first packet) in the same run, headers-wise.
fn same_stream(a: &[u8], b: &[u8], thl: usize) -> bool {
    // Version/IHL, TOS; flags/fragment; TTL, protocol; addresses.
    a[0..2] == b[0..2] && a[6..10] == b[6..10] && a[12..20] == b[12..20]
        // Ports; acknowledgement, data offset; window, urgent pointer, options.
        && a[20..24] == b[20..24] && a[28..33] == b[28..33] && a[34..36] == b[34..36]
        && a[38..20 + thl] == b[38..20 + thl]
}

/// The run being built: the first packet's headers and every payload so far, after room
/// for the virtio-net header.
#[derive(Debug)]
pub struct Coalescer {
    buf: Vec<u8>,
    /// Packets in the run.
    count: usize,
    /// TCP header length, when the run may grow (`None`: a packet that joins nothing).
    thl: Option<usize>,
    /// The payload size of every segment but the last.
    seg: usize,
    /// The sequence number the next segment must have.
    next_seq: u32,
    /// Set by a short or PSH segment: nothing may follow.
    closed: bool,
    /// The inner packets' bytes, as they came.
    bytes: usize,
    /// The flags of the last segment.
    last_flags: u8,
}

impl Default for Coalescer {
    fn default() -> Self {
        Coalescer {
            buf: Vec::with_capacity(VNET_HDR_LEN + MAX_PACKET),
            count: 0,
            thl: None,
            seg: 0,
            next_seq: 0,
            closed: false,
            bytes: 0,
            last_flags: 0,
        }
    }
}

impl Coalescer {
    /// Adds a checked inner packet (exactly its total length). False when it cannot join
    /// the pending run: write that ([`Coalescer::take`]) and push again.
    pub fn push(&mut self, pkt: &[u8]) -> bool {
        if self.count == 0 {
            self.buf.clear();
            self.buf.resize(VNET_HDR_LEN, 0);
            self.buf.extend_from_slice(pkt);
            self.count = 1;
            self.bytes = pkt.len();
            self.thl = joinable(pkt);
            if let Some(thl) = self.thl {
                self.seg = pkt.len() - 20 - thl;
                self.next_seq = seq(pkt).wrapping_add(self.seg as u32);
                self.last_flags = pkt[33];
                self.closed = pkt[33] & TCP_PSH != 0;
            }
            return true;
        }
        let Some(thl) = self.thl else {
            return false;
        };
        if self.closed || joinable(pkt) != Some(thl) {
            return false;
        }
        let first = &self.buf[VNET_HDR_LEN..VNET_HDR_LEN + 20 + thl];
        let payload = &pkt[20 + thl..];
        if !same_stream(first, pkt, thl)
            || seq(pkt) != self.next_seq
            || payload.len() > self.seg
            || self.buf.len() - VNET_HDR_LEN + payload.len() > MAX_PACKET
        {
            return false;
        }
        self.buf.extend_from_slice(payload);
        self.count += 1;
        self.bytes += pkt.len();
        self.next_seq = self.next_seq.wrapping_add(payload.len() as u32);
        self.last_flags = pkt[33];
        self.closed = payload.len() < self.seg || pkt[33] & TCP_PSH != 0;
        true
    }

    /// The pending packet, virtio-net header first, how many packets it holds and their
    /// bytes; `None` when nothing is pending. The next push starts a new run.
    pub fn take(&mut self) -> Option<(&[u8], usize, usize)> {
        let count = std::mem::take(&mut self.count);
        if count == 0 {
            return None;
        }
        if count > 1 {
            let thl = self.thl.unwrap_or(20);
            let total = self.buf.len() - VNET_HDR_LEN;
            let ip = &mut self.buf[VNET_HDR_LEN..];
            ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
            ip[10..12].fill(0);
            let c = wire::checksum(&ip[..20]);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ip[33] = self.last_flags;
            // A partial checksum: the pseudo-header's sum; the kernel adds the segment's.
            let partial = fold(pseudo_sum(ip, total - 20));
            ip[36..38].copy_from_slice(&partial.to_be_bytes());
            let hdr = vnet_header(VNET_NEEDS_CSUM, VNET_GSO_TCPV4, 20 + thl, self.seg, 20, 16);
            self.buf[..VNET_HDR_LEN].copy_from_slice(&hdr);
        }
        Some((&self.buf, count, self.bytes))
    }
}

fn seq(pkt: &[u8]) -> u32 {
    u32::from_be_bytes([pkt[24], pkt[25], pkt[26], pkt[27]])
}

/// A virtio-net header (legacy layout, host byte order, as the TUN reads it by default).
pub fn vnet_header(
    flags: u8,
    gso_type: u8,
    hdr_len: usize,
    gso_size: usize,
    csum_start: usize,
    csum_offset: usize,
) -> [u8; VNET_HDR_LEN] {
    let mut h = [0u8; VNET_HDR_LEN];
    h[0] = flags;
    h[1] = gso_type;
    for (i, v) in [hdr_len, gso_size, csum_start, csum_offset].into_iter().enumerate() {
        h[2 + 2 * i..4 + 2 * i].copy_from_slice(&(v as u16).to_ne_bytes());
    }
    h
}

/// Completes the checksum of a packet the kernel handed over with a partial one
/// (`VIRTIO_NET_HDR_F_NEEDS_CSUM` at `start`/`offset`); false when they do not fit.
pub fn complete_checksum(pkt: &mut [u8], start: usize, offset: usize) -> bool {
    if start + offset + 2 > pkt.len() {
        return false;
    }
    let c = wire::checksum(&pkt[start..]);
    pkt[start + offset..start + offset + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A TCP segment 10.244.1.2:40000 → 10.244.2.2:5201 with a valid checksum.
    fn segment(seq: u32, payload: &[u8], flags: u8) -> Vec<u8> {
        let total = 20 + 32 + payload.len();
        let mut p = vec![0u8; total];
        p[0] = 0x45;
        p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        p[4..6].copy_from_slice(&(seq as u16).to_be_bytes()); // any ID
        p[6] = 0x40;
        p[8] = 63;
        p[9] = TCP;
        p[12..16].copy_from_slice(&[10, 244, 1, 2]);
        p[16..20].copy_from_slice(&[10, 244, 2, 2]);
        let c = wire::checksum(&p[..20]);
        p[10..12].copy_from_slice(&c.to_be_bytes());
        p[20..22].copy_from_slice(&40000u16.to_be_bytes());
        p[22..24].copy_from_slice(&5201u16.to_be_bytes());
        p[24..28].copy_from_slice(&seq.to_be_bytes());
        p[28..32].copy_from_slice(&7u32.to_be_bytes());
        p[32] = 8 << 4;
        p[33] = flags;
        p[34..36].copy_from_slice(&512u16.to_be_bytes());
        p[40..52].copy_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2]); // timestamps
        p[52..].copy_from_slice(payload);
        let c = !fold(sum16(&p[20..], pseudo_sum(&p, total - 20)));
        p[36..38].copy_from_slice(&c.to_be_bytes());
        p
    }

    #[test]
    fn a_run_becomes_one_tso_packet() {
        let mut co = Coalescer::default();
        let a = segment(1000, &[1; 100], TCP_ACK);
        let b = segment(1100, &[2; 100], TCP_ACK);
        let c = segment(1200, &[3; 40], TCP_ACK | TCP_PSH);
        assert!(co.push(&a) && co.push(&b) && co.push(&c));
        let d = segment(1240, &[4; 100], TCP_ACK);
        assert!(!co.push(&d), "nothing follows a short segment");
        let (out, n, bytes) = co.take().unwrap();
        assert_eq!((n, bytes), (3, a.len() + b.len() + c.len()));
        let (hdr, ip) = out.split_at(VNET_HDR_LEN);
        assert_eq!(hdr, vnet_header(VNET_NEEDS_CSUM, VNET_GSO_TCPV4, 52, 100, 20, 16));
        assert_eq!(ip.len(), 52 + 240);
        assert_eq!(usize::from(u16::from_be_bytes([ip[2], ip[3]])), ip.len());
        assert_eq!(fold(sum16(&ip[..20], 0)), 0xffff, "IPv4 header checksum");
        assert_eq!(ip[33], TCP_ACK | TCP_PSH);
        assert_eq!(&ip[52..152], &[1; 100][..]);
        assert_eq!(&ip[252..], &[3; 40][..]);
        // The partial checksum completed over the segment gives a valid TCP checksum.
        let mut full = ip.to_vec();
        assert!(complete_checksum(&mut full, 20, 16));
        assert!(joinable(&full).is_some());
        // The next run starts with d.
        assert!(co.push(&d));
        let (out, n, _) = co.take().unwrap();
        assert_eq!(
            (n, &out[VNET_HDR_LEN..], &out[..VNET_HDR_LEN]),
            (1, &d[..], &[0u8; 10][..])
        );
        assert!(co.take().is_none());
    }

    #[test]
    fn only_contiguous_plain_segments_of_one_stream_join() {
        let base = segment(1000, &[1; 100], TCP_ACK);
        let mut gap = segment(1150, &[2; 100], TCP_ACK);
        let mut longer = segment(1100, &[2; 120], TCP_ACK);
        let mut other_port = segment(1100, &[2; 100], TCP_ACK);
        other_port[20] ^= 1;
        let fix = |p: &mut Vec<u8>| {
            p[36..38].fill(0);
            let c = !fold(sum16(&p[20..], pseudo_sum(p, p.len() - 20)));
            p[36..38].copy_from_slice(&c.to_be_bytes());
        };
        fix(&mut other_port);
        let mut bad_sum = segment(1100, &[2; 100], TCP_ACK);
        bad_sum[60] ^= 0xff;
        let fin = segment(1100, &[2; 100], TCP_ACK | 0x01);
        for (what, p) in [
            ("a gap", &mut gap),
            ("a longer payload", &mut longer),
            ("another port", &mut other_port),
            ("a bad checksum", &mut bad_sum),
            ("FIN", &mut fin.clone()),
        ] {
            let mut co = Coalescer::default();
            assert!(co.push(&base));
            assert!(!co.push(p), "{what} joined");
            assert_eq!(co.take().unwrap().1, 1);
        }
        // A packet that cannot join anything (here UDP) stays alone.
        let mut udp = base.clone();
        udp[9] = 17;
        let mut co = Coalescer::default();
        assert!(co.push(&udp));
        assert!(!co.push(&segment(1100, &[2; 100], TCP_ACK)));
    }
}
