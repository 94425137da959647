//! The forwarding loop: two tokio tasks, one per direction, so that on a multi-core node
//! the two directions of a flow run in parallel.
//!
//! * encap: TUN → look up the destination's peer → TTL − 1 → UDP to `PublicIP:Port`.
//!   Each wakeup drains up to [`BATCH`] packets from the TUN (one `read` each: the TUN
//!   has no batched read) and sends them with one `sendmmsg`. A packet for no peer's
//!   subnet is answered with ICMP net unreachable through the TUN, as upstream's proxy.
//! * decap: one `recvmmsg` takes up to [`BATCH`] datagrams; each is checked (sender is a
//!   peer's `PublicIP:Port`, inner source inside that peer's subnets, a valid IPv4
//!   header), TTL − 1, and written to the TUN.
//!
//! Buffers are allocated once per task; the per-packet path allocates nothing, takes no
//! lock (see [`super::peers::PeerCache`]) and touches no atomic (see [`super::stats`]).
//! A task ends only on an error of its fd that retrying cannot fix (the TUN device was
//! deleted); the backend's reconcile notices and starts the proxy again.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::task::JoinHandle;

use super::peers::{PeerCache, SharedPeers};
use super::stats::{Counters, Stat, Tally};
use super::tun::Tun;
use super::wire::{self, Malformed, ICMP_MAX};

/// Packets per wakeup and per `sendmmsg`/`recvmmsg`.
pub const BATCH: usize = 32;
/// Room for any datagram or TUN packet (a larger one would be truncated, and is counted
/// as malformed).
const SLOT: usize = 65536;

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

fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    }
}

struct Encap {
    tun: AsyncFd<Tun>,
    udp: AsyncFd<UdpSocket>,
    port: u16,
    own_ip: Ipv4Addr,
    peers: PeerCache,
    counters: Arc<Counters>,
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
                        let pkt = &mut slot[..len];
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
                if let Err(e) = self.send(&bufs, &lens[..n], &dests[..n], &mut tally).await {
                    self.counters.add(&mut tally);
                    return format!("sending to peers: {e}");
                }
            }
            self.counters.add(&mut tally);
        }
    }

    /// Sends the batch, waiting while the socket buffer is full. A datagram the kernel
    /// refuses (e.g. no route to that peer) is counted and skipped.
    async fn send(
        &self,
        bufs: &[u8],
        lens: &[usize],
        dests: &[libc::sockaddr_in],
        tally: &mut Tally,
    ) -> io::Result<()> {
        let mut off = 0;
        while off < lens.len() {
            let mut guard = self.udp.writable().await?;
            match guard.try_io(|s| sendmmsg(s.get_ref().as_raw_fd(), bufs, &lens[off..], &dests[off..], off)) {
                Ok(Ok(k)) => {
                    tally.count(Stat::EncapPackets, k as u64);
                    tally.count(Stat::EncapBytes, lens[off..off + k].iter().sum::<usize>() as u64);
                    off += k;
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => {}
                Ok(Err(_)) => {
                    // sendmmsg fails only when its first datagram fails.
                    tally.count(Stat::DropUdpSend, 1);
                    off += 1;
                }
                Err(_would_block) => {}
            }
        }
        Ok(())
    }
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

/// `sendmmsg` of `lens.len()` datagrams, the i-th from slot `first + i` of `bufs`.
fn sendmmsg(fd: RawFd, bufs: &[u8], lens: &[usize], dests: &[libc::sockaddr_in], first: usize) -> io::Result<usize> {
    let n = lens.len().min(BATCH);
    // SAFETY: iovec and mmsghdr are plain old data; zeroes are valid (null pointers, 0 lengths).
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    for i in 0..n {
        let start = (first + i) * SLOT;
        iov[i] = libc::iovec {
            iov_base: bufs[start..start + lens[i]].as_ptr() as *mut libc::c_void,
            iov_len: lens[i],
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
        h.msg_name = &dests[i] as *const libc::sockaddr_in as *mut libc::c_void;
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    }
    // SAFETY: `msgs[..n]` point into `iov`, `bufs` and `dests`, all alive for the call; the
    // kernel only reads the buffers and names and writes `msg_len`.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

struct Decap {
    udp: AsyncFd<UdpSocket>,
    tun: Tun,
    port: u16,
    peers: PeerCache,
    counters: Arc<Counters>,
}

/// One received datagram's metadata.
#[derive(Clone, Copy)]
struct Received {
    len: usize,
    from: libc::sockaddr_in,
    truncated: bool,
}

impl Decap {
    async fn run(mut self) -> String {
        let mut bufs = vec![0u8; BATCH * SLOT];
        let mut meta = [Received {
            len: 0,
            from: sockaddr(Ipv4Addr::UNSPECIFIED, 0),
            truncated: false,
        }; BATCH];
        let mut tally = Tally::default();
        loop {
            let mut guard = match self.udp.readable().await {
                Ok(g) => g,
                Err(e) => return format!("waiting on the UDP socket: {e}"),
            };
            let n = match guard.try_io(|s| recvmmsg(s.get_ref().as_raw_fd(), &mut bufs, &mut meta)) {
                Ok(Ok(n)) => n,
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return format!("receiving from peers: {e}"),
                Err(_would_block) => continue,
            };
            drop(guard);
            for (i, m) in meta.iter().take(n).enumerate() {
                let pkt = &mut bufs[i * SLOT..i * SLOT + m.len];
                self.deliver(pkt, m, &mut tally);
            }
            self.counters.add(&mut tally);
        }
    }

    /// Checks one datagram and writes its inner packet to the TUN.
    fn deliver(&mut self, pkt: &mut [u8], m: &Received, tally: &mut Tally) {
        let from_ip = Ipv4Addr::from(u32::from_be(m.from.sin_addr.s_addr));
        let table = self.peers.get();
        let subnets = match table.subnets_of(from_ip) {
            Some(s) if u16::from_be(m.from.sin_port) == self.port => s,
            _ => {
                tally.count(Stat::DropNotAPeer, 1);
                return;
            }
        };
        if m.truncated {
            tally.count(Stat::DropMalformed, 1);
            return;
        }
        let h = match wire::parse(pkt, true) {
            Ok(h) => h,
            Err(Malformed::NotIpv4) => {
                tally.count(Stat::DropNotIpv4, 1);
                return;
            }
            Err(_) => {
                tally.count(Stat::DropMalformed, 1);
                return;
            }
        };
        if !subnets.iter().any(|s| s.contains(&h.src)) {
            tally.count(Stat::DropForeignSource, 1);
            return;
        }
        if !wire::decrement_ttl(pkt) {
            tally.count(Stat::DropTtlExpired, 1);
            return;
        }
        match self.tun.write(&pkt[..h.total_len]) {
            Ok(_) => {
                tally.count(Stat::DecapPackets, 1);
                tally.count(Stat::DecapBytes, h.total_len as u64);
            }
            Err(_) => tally.count(Stat::DropTunWrite, 1),
        }
    }
}

/// `recvmmsg` of up to [`BATCH`] datagrams into the slots of `bufs`.
fn recvmmsg(fd: RawFd, bufs: &mut [u8], meta: &mut [Received; BATCH]) -> io::Result<usize> {
    // SAFETY: iovec, mmsghdr and sockaddr_in are plain old data; zeroes are valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut names: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
    for (i, slot) in bufs.chunks_exact_mut(SLOT).take(BATCH).enumerate() {
        iov[i] = libc::iovec {
            iov_base: slot.as_mut_ptr().cast(),
            iov_len: SLOT,
        };
        let h = &mut msgs[i].msg_hdr;
        h.msg_iov = &mut iov[i];
        h.msg_iovlen = 1;
        h.msg_name = (&mut names[i] as *mut libc::sockaddr_in).cast();
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    }
    // SAFETY: every message points at a distinct slot of `bufs` and a distinct name, all
    // alive and exclusively borrowed for the call.
    let r = unsafe {
        libc::recvmmsg(
            fd,
            msgs.as_mut_ptr(),
            BATCH as libc::c_uint,
            libc::MSG_DONTWAIT,
            std::ptr::null_mut(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = r as usize;
    for i in 0..n {
        let h = &msgs[i].msg_hdr;
        let ipv4 = h.msg_namelen as usize == size_of::<libc::sockaddr_in>()
            && names[i].sin_family == libc::AF_INET as libc::sa_family_t;
        meta[i] = Received {
            len: (msgs[i].msg_len as usize).min(SLOT),
            // A sender we cannot name is no peer: 0.0.0.0:0 matches none.
            from: if ipv4 {
                names[i]
            } else {
                sockaddr(Ipv4Addr::UNSPECIFIED, 0)
            },
            truncated: h.msg_flags & libc::MSG_TRUNC != 0,
        };
    }
    Ok(n)
}
