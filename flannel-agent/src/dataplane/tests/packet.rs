//! Crafting frames and moving them through `AF_PACKET` sockets.

use std::{
    io,
    mem::{size_of, zeroed},
    net::Ipv4Addr,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use flannel_common::wire::ipv4_checksum;

/// Offsets in an outer VXLAN frame.
pub mod off {
    /// Outer IPv4 identification.
    pub const IP_ID: usize = 18;
    /// Outer IPv4 header checksum.
    pub const IP_CHECK: usize = 24;
}

/// An IPv4 header (20 bytes) with a valid checksum.
pub fn ipv4_header(src: Ipv4Addr, dst: Ipv4Addr, protocol: u8, payload_len: usize, tos: u8, df: bool) -> [u8; 20] {
    let mut h = [0u8; 20];
    h[0] = 0x45;
    h[1] = tos;
    h[2..4].copy_from_slice(&((20 + payload_len) as u16).to_be_bytes());
    h[4..6].copy_from_slice(&0x1234u16.to_be_bytes());
    if df {
        h[6] = 0x40;
    }
    h[8] = 64;
    h[9] = protocol;
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    let check = ipv4_checksum(&h);
    h[10..12].copy_from_slice(&check);
    h
}

/// An Ethernet frame carrying IPv4/UDP.
pub fn udp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len();
    let mut frame = Vec::with_capacity(14 + 20 + udp_len);
    frame.extend_from_slice(&dst_mac);
    frame.extend_from_slice(&src_mac);
    frame.extend_from_slice(&[0x08, 0x00]);
    frame.extend_from_slice(&ipv4_header(src.0, dst.0, 17, udp_len, 0, false));
    frame.extend_from_slice(&src.1.to_be_bytes());
    frame.extend_from_slice(&dst.1.to_be_bytes());
    frame.extend_from_slice(&(udp_len as u16).to_be_bytes());
    frame.extend_from_slice(&[0, 0]);
    frame.extend_from_slice(payload);
    frame
}

/// A VXLAN frame from `src` to `dst` (outer MACs given) around `inner`.
pub fn vxlan_frame(
    macs: ([u8; 6], [u8; 6]),
    src: (Ipv4Addr, u16),
    dst: (Ipv4Addr, u16),
    vni: u32,
    inner: &[u8],
) -> Vec<u8> {
    let mut payload = vec![0x08, 0, 0, 0];
    payload.extend_from_slice(&(vni << 8).to_be_bytes());
    payload.extend_from_slice(inner);
    udp_frame(macs.0, macs.1, src, dst, &payload)
}

/// Whether a frame is IPv4/UDP to `port`.
pub fn is_udp_to(frame: &[u8], port: u16) -> bool {
    frame.len() >= 42 && frame[12..14] == [0x08, 0x00] && frame[23] == 17 && frame[36..38] == port.to_be_bytes()
}

/// Copies `frame` with the given byte ranges zeroed.
pub fn masked(frame: &[u8], ranges: &[std::ops::Range<usize>]) -> Vec<u8> {
    let mut out = frame.to_vec();
    for range in ranges {
        if let Some(bytes) = out.get_mut(range.clone()) {
            bytes.fill(0);
        }
    }
    out
}

/// A frame as hex, 16 bytes a line, for failure messages.
pub fn hex(frame: &[u8]) -> String {
    frame
        .chunks(16)
        .map(|line| line.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
}

/// An `AF_PACKET` socket bound to one device of the namespace it was created in.
pub struct PacketSocket {
    fd: OwnedFd,
    ifindex: i32,
}

/// `PACKET_OUTGOING`: the frame was sent by this host.
const PACKET_OUTGOING: u8 = 4;

impl PacketSocket {
    /// Opens a socket for all protocols on `ifname` (in the calling thread's namespace).
    pub fn open(ifname: &str) -> Result<Self> {
        let name = std::ffi::CString::new(ifname)?;
        // SAFETY: plain syscalls on values we own.
        unsafe {
            let ifindex = libc::if_nametoindex(name.as_ptr()) as i32;
            if ifindex == 0 {
                bail!("no interface {ifname}: {}", io::Error::last_os_error());
            }
            let raw = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            );
            if raw < 0 {
                bail!("socket(AF_PACKET): {}", io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_ll = zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = ifindex;
            if libc::bind(
                fd.as_raw_fd(),
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            ) != 0
            {
                bail!("bind(AF_PACKET, {ifname}): {}", io::Error::last_os_error());
            }
            Ok(Self { fd, ifindex })
        }
    }

    /// Sends one frame out of the device.
    pub fn send(&self, frame: &[u8]) -> Result<()> {
        // SAFETY: `addr` and `frame` outlive the call.
        unsafe {
            let mut addr: libc::sockaddr_ll = zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = self.ifindex;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            let sent = libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const addr).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            if sent < 0 {
                bail!("sendto(AF_PACKET): {}", io::Error::last_os_error());
            }
        }
        Ok(())
    }

    /// Receives frames until one that `wanted` accepts (outgoing ones only if `outgoing`),
    /// or `timeout` passes.
    pub fn recv_matching(
        &self,
        timeout: Duration,
        outgoing: bool,
        wanted: impl Fn(&[u8]) -> bool,
    ) -> Result<Option<Vec<u8>>> {
        let deadline = Instant::now() + timeout;
        let mut buf = vec![0u8; 65536];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            let tv = libc::timeval {
                tv_sec: left.as_secs() as libc::time_t,
                tv_usec: left.subsec_micros().max(1) as libc::suseconds_t,
            };
            // SAFETY: `tv`, `buf` and `addr` outlive the calls.
            unsafe {
                libc::setsockopt(
                    self.fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    (&raw const tv).cast(),
                    size_of::<libc::timeval>() as u32,
                );
                let mut addr: libc::sockaddr_ll = zeroed();
                let mut len = size_of::<libc::sockaddr_ll>() as u32;
                let n = libc::recvfrom(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    0,
                    (&raw mut addr).cast(),
                    &mut len,
                );
                if n < 0 {
                    let err = io::Error::last_os_error();
                    if matches!(err.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) {
                        return Ok(None);
                    }
                    bail!("recvfrom(AF_PACKET): {err}");
                }
                let frame = &buf[..n as usize];
                if (outgoing || addr.sll_pkttype != PACKET_OUTGOING) && wanted(frame) {
                    return Ok(Some(frame.to_vec()));
                }
            }
        }
    }
}
