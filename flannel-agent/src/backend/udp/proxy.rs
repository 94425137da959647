//! The forwarding loop: two tokio tasks, one per direction, so that on a multi-core node
//! the two directions of a flow run in parallel.
//!
//! * encap: TUN → look up the destination's peer → TTL − 1 → UDP to `PublicIP:Port`.
//!   Each wakeup drains up to [`BATCH`] packets from the TUN (one `read` each: the TUN
//!   has no batched read) and sends them with one `sendmmsg`, each run of same-sized
//!   packets to one peer as one `UDP_SEGMENT` message ([`super::mmsg`]). A packet for no
//!   peer's subnet is answered with ICMP net unreachable through the TUN, as upstream's.
//! * decap: one `recvmmsg` takes up to [`BATCH`] messages (with `UDP_GRO`, a message may
//!   hold several datagrams of one sender); each datagram is checked (sender is a peer's
//!   `PublicIP:Port`, inner source inside that peer's subnets, a valid IPv4 header),
//!   TTL − 1, and written to the TUN.
//!
//! Buffers are allocated once per task; the per-packet path allocates nothing, takes no
//! lock (see [`super::peers::PeerCache`]) and touches no atomic (see [`super::stats`]).
//! A task ends only on an error of its fd that retrying cannot fix (the TUN device was
//! deleted); the backend's reconcile notices and starts the proxy again.

use std::io;
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::Arc;

use ipnet::Ipv4Net;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;
use tracing::warn;

use super::coalesce::{self, Coalescer, VNET_GSO_NONE, VNET_GSO_TCPV4, VNET_HDR_LEN, VNET_NEEDS_CSUM};
use super::mmsg::{self, sockaddr, Received, Run};
use super::peers::{PeerCache, SharedPeers};
use super::segment;
use super::stats::{Counters, Stat, Tally};
use super::tun::Tun;
use super::wire::{self, Malformed, ICMP_MAX};

/// Packets per wakeup and per `sendmmsg`/`recvmmsg`.
pub const BATCH: usize = 32;
/// Room for any datagram or TUN packet (a larger one would be truncated, and is counted
/// as malformed).
pub const SLOT: usize = 65536;

/// What the proxy tasks need.
#[derive(Debug)]
pub struct ProxyParams {
    /// The TUN device.
    pub tun: Tun,
    /// The bound, non-blocking UDP socket.
    pub socket: Arc<UdpSocket>,
    /// The UDP port peers listen on (ours too).
    pub port: u16,
    /// The source of our ICMP errors: the TUN's address (our lease subnet's first address).
    pub own_ip: Ipv4Addr,
    /// The routing table.
    pub peers: Arc<SharedPeers>,
    /// Where the tasks count.
    pub counters: Arc<Counters>,
}

/// Starts both directions; each task returns why it stopped.
pub fn spawn(p: ProxyParams) -> io::Result<[JoinHandle<String>; 2]> {
    let tun_rx = register(p.tun.try_clone()?, Interest::READABLE)?;
    let udp_tx = register(p.socket.try_clone()?, Interest::WRITABLE)?;
    let udp_rx = register(p.socket.try_clone()?, Interest::READABLE)?;
    let encap = Encap {
        tun: tun_rx,
        udp: udp_tx,
        port: p.port,
        own_ip: p.own_ip,
        peers: PeerCache::new(p.peers.clone()),
        counters: p.counters.clone(),
        gso: true,
    };
    let decap = Decap {
        udp: udp_rx,
        tun: p.tun,
        port: p.port,
        peers: PeerCache::new(p.peers),
        counters: p.counters,
    };
    Ok([
        tokio::spawn(async move { encap.run().await }),
        tokio::spawn(async move { decap.run().await }),
    ])
}

/// Registers an owned fd (a `dup` of the TUN or the socket, so each task has its own).
fn register<T: AsRawFd>(inner: T, interest: Interest) -> io::Result<AsyncFd<T>> {
    // SAFETY: `Tun` and `UdpSocket` own their fd, never replace it, and close it only when
    // dropped, which the AsyncFd does after deregistering.
    Ok(unsafe { AsyncFd::register_with_interest(inner, interest) }?)
}

struct Encap {
    tun: AsyncFd<Tun>,
    udp: AsyncFd<UdpSocket>,
    port: u16,
    own_ip: Ipv4Addr,
    peers: PeerCache,
    counters: Arc<Counters>,
    /// Whether runs of datagrams go as one segmented message (until the kernel refuses).
    gso: bool,
}

/// What to do with a packet read from the TUN.
enum Verdict {
    /// Send it to this peer.
    Send(Ipv4Addr),
    /// Dropped (and counted).
    Drop,
}

impl Encap {
    async fn run(mut self) -> String {
        let mut bufs = vec![0u8; BATCH * SLOT];
        let mut lens = [0usize; BATCH];
        let mut dests = [sockaddr(Ipv4Addr::UNSPECIFIED, 0); BATCH];
        let mut runs = Vec::with_capacity(BATCH);
        let mut offload = None;
        let mut cut = Vec::with_capacity(2 * SLOT);
        let mut icmp = [0u8; ICMP_MAX];
        let mut tally = Tally::default();
        loop {
            let mut guard = match self.tun.readable().await {
                Ok(g) => g,
                Err(e) => return format!("waiting on the TUN device: {e}"),
            };
            let mut n = 0;
            while n < BATCH {
                let slot = &mut bufs[n * SLOT..(n + 1) * SLOT];
                match guard.get_inner().read(slot) {
                    Ok(len) => {
                        let Some((pkt, gso_size)) = strip_vnet_header(&mut slot[..len]) else {
                            tally.count(Stat::DropMalformed, 1);
                            continue;
                        };
                        match classify(
                            guard.get_inner(),
                            &mut self.peers,
                            self.own_ip,
                            pkt,
                            &mut icmp,
                            &mut tally,
                        ) {
                            (Verdict::Send(peer), len) => {
                                lens[n] = len;
                                dests[n] = sockaddr(peer, self.port);
                                if gso_size.is_some() {
                                    // Cut and sent after the packets before it.
                                    offload = gso_size;
                                    break;
                                }
                                n += 1;
                            }
                            (Verdict::Drop, _) => {}
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        guard.clear_ready();
                        break;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        self.counters.add(&mut tally);
                        return format!("reading the TUN device: {e}");
                    }
                }
            }
            drop(guard);
            if n > 0 {
                if let Err(e) = self.send(&bufs, &lens[..n], &dests[..n], &mut runs, &mut tally).await {
                    self.counters.add(&mut tally);
                    return format!("sending to peers: {e}");
                }
            }
            if let Some(gso_size) = offload.take() {
                let pkt = &bufs[n * SLOT + VNET_HDR_LEN..n * SLOT + VNET_HDR_LEN + lens[n]];
                if let Err(e) = self.send_offload(pkt, gso_size, dests[n], &mut cut, &mut tally).await {
                    self.counters.add(&mut tally);
                    return format!("sending to peers: {e}");
                }
            }
            self.counters.add(&mut tally);
        }
    }

    /// Sends the batch, waiting while the socket buffer is full: runs of same-sized packets
    /// to one peer as one segmented message each (see [`mmsg`]). A message the kernel
    /// refuses (e.g. no route to that peer) is counted and skipped; one it refuses because
    /// it cannot segment it turns segmentation off for good (and is sent again).
    async fn send(
        &mut self,
        bufs: &[u8],
        lens: &[usize],
        dests: &[libc::sockaddr_in],
        runs: &mut Vec<Run>,
        tally: &mut Tally,
    ) -> io::Result<()> {
        mmsg::runs(lens, dests, self.gso, runs);
        let mut r = 0;
        while r < runs.len() {
            let mut guard = self.udp.writable().await?;
            match guard
                .try_io(|s| mmsg::send_runs(s.get_ref().as_raw_fd(), bufs, VNET_HDR_LEN, lens, dests, &runs[r..]))
            {
                Ok(Ok(k)) => {
                    for run in &runs[r..r + k] {
                        let sent = &lens[run.first..run.first + run.count];
                        tally.count(Stat::EncapPackets, sent.len() as u64);
                        tally.count(Stat::EncapBytes, sent.iter().sum::<usize>() as u64);
                    }
                    r += k;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if runs[r].count > 1 && refuses_segmentation(&e) => {
                    self.stop_segmenting(&e);
                    // Without segmentation every run is one packet: run i is packet i.
                    let first = runs[r].first;
                    mmsg::runs(lens, dests, false, runs);
                    r = first;
                }
                Ok(Err(_)) => {
                    // sendmmsg fails only when its first message fails.
                    tally.count(Stat::DropUdpSend, runs[r].count as u64);
                    r += 1;
                }
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

impl Encap {
    /// Sends datagrams one by one from now on, after the kernel refused to segment them.
    fn stop_segmenting(&mut self, e: &io::Error) {
        warn!(
            error = %e,
            "udp: the kernel cannot segment our datagrams (UDP_SEGMENT) on this path; \
             sending them one by one from now on"
        );
        self.gso = false;
    }

    /// Cuts a TCP segmentation-offload packet into its segments and sends them to `dest`,
    /// as few `UDP_SEGMENT` messages as fit (one per ≈ 64 kB), or one by one once the kernel
    /// refused segmentation.
    async fn send_offload(
        &mut self,
        pkt: &[u8],
        gso_size: usize,
        dest: libc::sockaddr_in,
        cut: &mut Vec<u8>,
        tally: &mut Tally,
    ) -> io::Result<()> {
        let Some(seg) = segment::segment(pkt, gso_size, cut) else {
            tally.count(Stat::DropMalformed, 1);
            return Ok(());
        };
        let mut off = 0;
        while off < cut.len() {
            let per = if self.gso {
                (mmsg::MAX_GSO_BYTES / seg).max(1)
            } else {
                1
            };
            let chunk = &cut[off..(off + per * seg).min(cut.len())];
            let packets = chunk.len().div_ceil(seg) as u64;
            let mut guard = self.udp.writable().await?;
            match guard.try_io(|s| mmsg::send_segmented(s.get_ref().as_raw_fd(), chunk, seg, &dest)) {
                Ok(Ok(())) => {
                    tally.count(Stat::EncapPackets, packets);
                    tally.count(Stat::EncapBytes, chunk.len() as u64);
                    off += chunk.len();
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(e)) if packets > 1 && refuses_segmentation(&e) => self.stop_segmenting(&e),
                Ok(Err(_)) => {
                    tally.count(Stat::DropUdpSend, packets);
                    off += chunk.len();
                }
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
}

/// Errors of a `UDP_SEGMENT` send that mean "not this way" rather than "not to this peer":
/// no such option (kernel before 4.18), no checksum offload on the way (EIO), or a segment
/// too large for the path (EINVAL).
fn refuses_segmentation(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::ENOPROTOOPT | libc::EOPNOTSUPP)
    )
}

/// The packet after the virtio-net header the TUN puts first and, for a TCP segmentation
/// offload packet, its segment size (the packet is cut after routing, [`segment`]); a
/// partial checksum of a single packet is completed. `None` for an offload type we never
/// asked for, or a header that does not fit.
fn strip_vnet_header(read: &mut [u8]) -> Option<(&mut [u8], Option<usize>)> {
    if read.len() < VNET_HDR_LEN {
        return None;
    }
    let (hdr, pkt) = read.split_at_mut(VNET_HDR_LEN);
    let field = |at: usize| usize::from(u16::from_ne_bytes([hdr[at], hdr[at + 1]]));
    match hdr[1] {
        VNET_GSO_NONE => {}
        VNET_GSO_TCPV4 if field(4) > 0 => return Some((pkt, Some(field(4)))),
        _ => return None,
    }
    if hdr[0] & VNET_NEEDS_CSUM != 0 && !coalesce::complete_checksum(pkt, field(6), field(8)) {
        return None;
    }
    Some((pkt, None))
}

/// Checks, routes and TTL-decrements one packet from the TUN; returns where it goes and
/// its length (trailing bytes past its total length are not sent).
fn classify(
    tun: &Tun,
    peers: &mut PeerCache,
    own_ip: Ipv4Addr,
    pkt: &mut [u8],
    icmp: &mut [u8; ICMP_MAX],
    tally: &mut Tally,
) -> (Verdict, usize) {
    let h = match wire::parse(pkt, false) {
        Ok(h) => h,
        Err(Malformed::NotIpv4) => {
            tally.count(Stat::DropNotIpv4, 1);
            return (Verdict::Drop, 0);
        }
        Err(_) => {
            tally.count(Stat::DropMalformed, 1);
            return (Verdict::Drop, 0);
        }
    };
    let Some(peer) = peers.get().next_hop(h.dst) else {
        tally.count(Stat::DropNoRoute, 1);
        if wire::wants_icmp_error(&h) {
            let len = wire::icmp_net_unreachable(pkt, &h, own_ip, icmp);
            if tun.write(&icmp[..len]).is_ok() {
                tally.count(Stat::IcmpUnreachableSent, 1);
            }
        }
        return (Verdict::Drop, 0);
    };
    if !wire::decrement_ttl(pkt) {
        tally.count(Stat::DropTtlExpired, 1);
        return (Verdict::Drop, 0);
    }
    (Verdict::Send(peer), h.total_len)
}

struct Decap {
    udp: AsyncFd<UdpSocket>,
    tun: Tun,
    port: u16,
    peers: PeerCache,
    counters: Arc<Counters>,
}

impl Decap {
    async fn run(mut self) -> String {
        let mut bufs = vec![0u8; BATCH * SLOT];
        let mut meta = [Received::EMPTY; BATCH];
        let mut run = Coalescer::default();
        let mut tally = Tally::default();
        loop {
            let mut guard = match self.udp.readable().await {
                Ok(g) => g,
                Err(e) => return format!("waiting on the UDP socket: {e}"),
            };
            let n = match guard.try_io(|s| mmsg::recv(s.get_ref().as_raw_fd(), &mut bufs, &mut meta)) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return format!("receiving from peers: {e}"),
                Err(_would_block) => continue,
            };
            drop(guard);
            for (i, m) in meta.iter().take(n).enumerate() {
                let buf = &mut bufs[i * SLOT..i * SLOT + m.len];
                self.deliver(buf, m, &mut run, &mut tally);
            }
            self.counters.add(&mut tally);
        }
    }

    /// Checks one received message (one datagram, or several the kernel coalesced, all
    /// from one sender) and writes the inner packet of each datagram to the TUN, runs of
    /// one TCP stream as one packet ([`coalesce`]).
    fn deliver(&mut self, buf: &mut [u8], m: &Received, run: &mut Coalescer, tally: &mut Tally) {
        let datagrams = m.len.div_ceil(m.seg.max(1)).max(1) as u64;
        let from_ip = Ipv4Addr::from(u32::from_be(m.from.sin_addr.s_addr));
        let table = self.peers.get();
        let subnets = match table.subnets_of(from_ip) {
            Some(s) if u16::from_be(m.from.sin_port) == self.port => s,
            _ => {
                tally.count(Stat::DropNotAPeer, datagrams);
                return;
            }
        };
        if m.truncated {
            tally.count(Stat::DropMalformed, datagrams);
            return;
        }
        for pkt in buf.chunks_mut(m.seg.max(1)) {
            if let Some(pkt) = check_inner(subnets, pkt, tally) {
                if !run.push(pkt) {
                    write_run(&self.tun, run, tally);
                    run.push(pkt);
                }
            }
        }
        write_run(&self.tun, run, tally);
    }
}

/// Checks one inner packet from the peer owning `subnets` and decrements its TTL; the
/// packet (without trailing bytes) if it may go to the TUN.
fn check_inner<'a>(subnets: &[Ipv4Net], pkt: &'a mut [u8], tally: &mut Tally) -> Option<&'a [u8]> {
    let h = match wire::parse(pkt, true) {
        Ok(h) => h,
        Err(Malformed::NotIpv4) => {
            tally.count(Stat::DropNotIpv4, 1);
            return None;
        }
        Err(_) => {
            tally.count(Stat::DropMalformed, 1);
            return None;
        }
    };
    if !subnets.iter().any(|s| s.contains(&h.src)) {
        tally.count(Stat::DropForeignSource, 1);
        return None;
    }
    if !wire::decrement_ttl(pkt) {
        tally.count(Stat::DropTtlExpired, 1);
        return None;
    }
    Some(&pkt[..h.total_len])
}

/// Writes the pending run (if any) to the TUN.
fn write_run(tun: &Tun, run: &mut Coalescer, tally: &mut Tally) {
    let Some((pkt, count, bytes)) = run.take() else {
        return;
    };
    match tun.write_with_header(pkt) {
        Ok(_) => {
            tally.count(Stat::DecapPackets, count as u64);
            tally.count(Stat::DecapBytes, bytes as u64);
        }
        Err(_) => tally.count(Stat::DropTunWrite, count as u64),
    }
}
