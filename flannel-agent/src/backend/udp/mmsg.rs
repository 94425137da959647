//! The proxy's batched socket calls: `sendmmsg` with UDP segmentation offload and
//! `recvmmsg` with UDP receive coalescing.
//!
//! Why offloads: the bench showed the proxy CPU-bound, not loss-bound (no drop anywhere on
//! a TCP stream once `flannel0`'s queue was deep), with ~60 % of the sending proxy's time
//! in `sendmmsg` walking the network stack once per datagram. A run of datagrams of one
//! size to one peer (a TCP stream's full-sized segments, a flood of small ones) is sent as
//! one `UDP_SEGMENT` message instead: the stack is walked once and the datagrams are cut
//! at the device (or the NIC). They are the same datagrams on the wire, one inner packet
//! each, so peers (upstream flanneld too) see no difference. On receive, `UDP_GRO` lets the
//! kernel hand such a run over as one buffer plus its segment size; the proxy cuts it into
//! the inner packets again.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::Ipv4Addr;
use std::os::fd::RawFd;

use super::proxy::{BATCH, SLOT};

/// The most UDP payload one message may carry (65,535 less the IPv4 and UDP headers).
pub const MAX_GSO_BYTES: usize = 65_535 - 28;

/// A run of packets, consecutive in the batch, sent as one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Index of its first packet in the batch.
    pub first: usize,
    /// Number of packets.
    pub count: usize,
    /// Size of every packet but the last (which may be shorter): the segment size.
    pub seg: usize,
}

/// Splits a batch into runs: consecutive packets to the same destination, all of the
/// first packet's size but the last, which may be shorter (that is how the kernel cuts
/// a segmented message), and at most [`MAX_GSO_BYTES`] together. Without `gso`, every
/// packet is its own run.
pub fn runs(lens: &[usize], dests: &[libc::sockaddr_in], gso: bool, out: &mut Vec<Run>) {
    out.clear();
    let mut i = 0;
    while i < lens.len() {
        let seg = lens[i];
        let mut total = seg;
        let mut j = i + 1;
        while gso && j < lens.len() && same_dest(&dests[i], &dests[j]) && total + lens[j] <= MAX_GSO_BYTES {
            if lens[j] > seg {
                break;
            }
            total += lens[j];
            j += 1;
            if lens[j - 1] < seg {
                break;
            }
        }
        out.push(Run {
            first: i,
            count: j - i,
            seg,
        });
        i = j;
    }
}

fn same_dest(a: &libc::sockaddr_in, b: &libc::sockaddr_in) -> bool {
    a.sin_addr.s_addr == b.sin_addr.s_addr && a.sin_port == b.sin_port
}

/// The control message carrying `UDP_SEGMENT` (a `u16`), laid out as `CMSG_SPACE(2)`.
#[repr(C)]
#[derive(Clone, Copy)]
struct SegmentCmsg {
    hdr: libc::cmsghdr,
    seg: u16,
    _pad: [u8; 6],
}

impl SegmentCmsg {
    /// `UDP_SEGMENT` with segment size `seg`.
    fn new(seg: usize) -> Self {
        // SAFETY: cmsghdr is plain old data; zeroes are valid.
        let mut c: SegmentCmsg = unsafe { zeroed() };
        // SAFETY: CMSG_LEN only computes a length.
        c.hdr.cmsg_len = unsafe { libc::CMSG_LEN(size_of::<u16>() as u32) } as _;
        c.hdr.cmsg_level = libc::SOL_UDP;
        c.hdr.cmsg_type = libc::UDP_SEGMENT;
        c.seg = seg as u16;
        c
    }
}

/// `sendmmsg` of `runs` (at most [`BATCH`]), the packets of `bufs` (slot `i` holds packet
/// `i`, `lens[i]` bytes from offset `head`) to `dests`. A run of more than one packet goes as one
/// `UDP_SEGMENT` message. Returns how many runs the kernel took.
pub fn send_runs(
    fd: RawFd,
    bufs: &[u8],
    head: usize,
    lens: &[usize],
    dests: &[libc::sockaddr_in],
    runs: &[Run],
) -> io::Result<usize> {
    let n = runs.len().min(BATCH);
    // SAFETY: iovec, mmsghdr and cmsghdr are plain old data; zeroes are valid (null
    // pointers, 0 lengths).
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut cmsgs: [SegmentCmsg; BATCH] = unsafe { zeroed() };
    for (k, run) in runs[..n].iter().enumerate() {
        for i in run.first..run.first + run.count {
            iov[i] = libc::iovec {
                iov_base: bufs[i * SLOT + head..i * SLOT + head + lens[i]].as_ptr() as *mut libc::c_void,
                iov_len: lens[i],
            };
        }
        let h = &mut msgs[k].msg_hdr;
        h.msg_iov = &mut iov[run.first];
        h.msg_iovlen = run.count;
        h.msg_name = &dests[run.first] as *const libc::sockaddr_in as *mut libc::c_void;
        h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
        if run.count > 1 {
            let c = &mut cmsgs[k];
            *c = SegmentCmsg::new(run.seg);
            h.msg_control = (c as *mut SegmentCmsg).cast();
            h.msg_controllen = size_of::<SegmentCmsg>() as _;
        }
    }
    // SAFETY: `msgs[..n]` point into `iov`, `cmsgs`, `bufs` and `dests`, all alive for the
    // call; the kernel only reads them and writes `msg_len`.
    let r = unsafe { libc::sendmmsg(fd, msgs.as_mut_ptr(), n as libc::c_uint, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as usize)
    }
}

/// Sends `data`, packets of `seg` bytes back to back (the last may be shorter), to `dest`:
/// as one `UDP_SEGMENT` message when it holds more than one (at most [`MAX_GSO_BYTES`]).
pub fn send_segmented(fd: RawFd, data: &[u8], seg: usize, dest: &libc::sockaddr_in) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: data.as_ptr() as *mut libc::c_void,
        iov_len: data.len(),
    };
    // SAFETY: msghdr is plain old data; zeroes are valid.
    let mut h: libc::msghdr = unsafe { zeroed() };
    let mut c = SegmentCmsg::new(seg);
    h.msg_iov = &mut iov;
    h.msg_iovlen = 1;
    h.msg_name = dest as *const libc::sockaddr_in as *mut libc::c_void;
    h.msg_namelen = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    if data.len() > seg {
        h.msg_control = (&mut c as *mut SegmentCmsg).cast();
        h.msg_controllen = size_of::<SegmentCmsg>() as _;
    }
    // SAFETY: `h` points at `iov`, `c`, `data` and `dest`, all alive for the call; the
    // kernel only reads them.
    let r = unsafe { libc::sendmsg(fd, &h, libc::MSG_DONTWAIT) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// One received message's metadata.
#[derive(Clone, Copy, Debug)]
pub struct Received {
    /// Its length: one datagram, or several of `seg` bytes coalesced.
    pub len: usize,
    /// The size of each coalesced datagram (the last may be shorter); `len` when the kernel
    /// coalesced nothing.
    pub seg: usize,
    /// The sender.
    pub from: libc::sockaddr_in,
    /// Longer than the buffer.
    pub truncated: bool,
}

impl Received {
    /// Nothing received yet.
    pub const EMPTY: Received = Received {
        len: 0,
        seg: 0,
        from: sockaddr(Ipv4Addr::UNSPECIFIED, 0),
        truncated: false,
    };
}

/// An IPv4 socket address.
pub const fn sockaddr(ip: Ipv4Addr, port: u16) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    }
}

/// Room for the control messages of one received message (`UDP_GRO` is the only one we
/// enable; more room than its 24 bytes costs nothing), 8-byte aligned as cmsghdr needs.
type ControlBuf = [u64; 8];

/// `recvmmsg` of up to [`BATCH`] messages into the slots of `bufs`.
pub fn recv(fd: RawFd, bufs: &mut [u8], meta: &mut [Received; BATCH]) -> io::Result<usize> {
    // SAFETY: iovec, mmsghdr and sockaddr_in are plain old data; zeroes are valid.
    let mut iov: [libc::iovec; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut msgs: [libc::mmsghdr; BATCH] = unsafe { zeroed() };
    // SAFETY: as above.
    let mut names: [libc::sockaddr_in; BATCH] = unsafe { zeroed() };
    let mut control: [ControlBuf; BATCH] = [[0; 8]; BATCH];
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
        h.msg_control = control[i].as_mut_ptr().cast();
        h.msg_controllen = size_of::<ControlBuf>() as _;
    }
    // SAFETY: every message points at a distinct slot of `bufs`, name and control buffer,
    // all alive and exclusively borrowed for the call.
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
        let len = (msgs[i].msg_len as usize).min(SLOT);
        meta[i] = Received {
            len,
            seg: gro_segment(h).filter(|&s| s > 0).unwrap_or(len),
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

/// The `UDP_GRO` segment size among a received message's control messages.
fn gro_segment(h: &libc::msghdr) -> Option<usize> {
    // SAFETY: `h` is a msghdr the kernel filled in; its control pointer and length describe
    // the buffer `recv` passed, which is alive, and the CMSG_* helpers stay within it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(h);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_UDP && (*c).cmsg_type == libc::UDP_GRO {
                let seg = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return usize::try_from(seg).ok();
            }
            c = libc::CMSG_NXTHDR(h, c);
        }
    }
    None
}

/// Asks the kernel to coalesce received datagrams (`UDP_GRO`, Linux 5.0). Without it each
/// datagram is received on its own, which is correct, only slower.
pub fn enable_gro(fd: RawFd) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: passes a valid c_int and its size for an option of an open UDP socket.
    let r = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_UDP,
            libc::UDP_GRO,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(last: u8) -> libc::sockaddr_in {
        sockaddr(Ipv4Addr::new(198, 18, 0, last), 8285)
    }

    fn split(lens: &[usize], dests: &[libc::sockaddr_in], gso: bool) -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        runs(lens, dests, gso, &mut out);
        out.iter().map(|r| (r.first, r.count, r.seg)).collect()
    }

    #[test]
    fn runs_group_same_size_same_peer() {
        let a = to(1);
        let b = to(2);
        // Three full-sized to a, a shorter one ends the run; then b; then a again.
        let lens = [1472, 1472, 1472, 100, 1472, 1472, 1472];
        let dests = [a, a, a, a, b, a, a];
        assert_eq!(
            split(&lens, &dests, true),
            vec![(0, 4, 1472), (4, 1, 1472), (5, 2, 1472)]
        );
        // A larger packet after a shorter one starts a new run, as does a larger one.
        let lens = [100, 1472, 1472, 60, 60];
        let dests = [a; 5];
        assert_eq!(split(&lens, &dests, true), vec![(0, 1, 100), (1, 3, 1472), (4, 1, 60)]);
    }

    #[test]
    fn runs_stay_under_64k_and_off_without_gso() {
        let a = to(1);
        let lens = [8972; 10];
        let dests = [a; 10];
        // 7 × 8972 = 62,804 fits; 8 do not.
        assert_eq!(split(&lens, &dests, true), vec![(0, 7, 8972), (7, 3, 8972)]);
        let lens = [1472, 1472];
        assert_eq!(split(&lens, &[a, a], false), vec![(0, 1, 1472), (1, 1, 1472)]);
    }

    #[test]
    fn segment_cmsg_has_the_kernel_layout() {
        // SAFETY: CMSG_SPACE and CMSG_LEN only compute lengths.
        let (space, len) = unsafe { (libc::CMSG_SPACE(2) as usize, libc::CMSG_LEN(2) as usize) };
        assert_eq!(size_of::<SegmentCmsg>(), space);
        assert_eq!(std::mem::offset_of!(SegmentCmsg, seg), len - 2);
    }
}
