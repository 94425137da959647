//! The TUN device (`flannel0`), opened as upstream opens it (`/dev/net/tun`, `IFF_TUN |
//! IFF_NO_PI`, name template `flannel%d`: the kernel picks the number) plus `IFF_VNET_HDR`:
//! every packet read or written starts with a virtio-net header, which lets the proxy
//! write coalesced TCP runs ([`super::coalesce`]) and read a pod's TCP sends whole
//! ([`Tun::enable_tso`], [`super::segment`]).
//!
//! Plain `ioctl(TUNSETIFF)` through `libc` rather than a TUN crate: it is one ioctl, the
//! proxy needs nothing but the raw non-blocking fd (it batches reads itself and registers
//! the fd with tokio's `AsyncFd`), and configuring the device (address, MTU, up, route)
//! must go through our `netlink` module anyway, which the crates would duplicate.
//!
//! The device is not persistent (no `TUNSETPERSIST`), as upstream's: it goes away with the
//! last fd, i.e. when flanneld exits, and its route with it. A userspace datapath cannot
//! forward while its process is down, so a persistent device would only turn "no route"
//! into a black hole during a restart.

use std::ffi::CStr;
use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::coalesce::VNET_HDR_LEN;

/// An open TUN device.
#[derive(Debug)]
pub struct Tun {
    fd: OwnedFd,
    name: String,
}

impl Tun {
    /// Creates a TUN device named after `template` (`flannel%d`), non-blocking.
    pub fn create(template: &str) -> io::Result<Tun> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")?;
        // SAFETY: ifreq is plain old data; all zeroes is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        let bytes = template.as_bytes();
        if bytes.len() >= req.ifr_name.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "TUN name template too long",
            ));
        }
        for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
            *d = *s as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_TUN | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads and writes one ifreq, which `req` is, on a /dev/net/tun fd.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req as *mut libc::ifreq) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel writes the NUL-terminated device name back into ifr_name,
        // which is 16 bytes and zero-initialised, so a NUL is always there.
        let name = unsafe { CStr::from_ptr(req.ifr_name.as_ptr()) }
            .to_string_lossy()
            .into_owned();
        Ok(Tun {
            fd: OwnedFd::from(file),
            name,
        })
    }

    /// Turns on TCP segmentation offload towards us (`TUNSETOFFLOAD` with checksum and
    /// IPv4 TSO): a pod's TCP send then arrives as one large packet the proxy cuts itself
    /// ([`super::segment`]), and other packets may arrive with a partial checksum.
    pub fn enable_tso(&self) -> io::Result<()> {
        let flags = libc::c_ulong::from(libc::TUN_F_CSUM | libc::TUN_F_TSO4);
        // SAFETY: TUNSETOFFLOAD takes its flags by value on a /dev/net/tun fd.
        let r = unsafe { libc::ioctl(self.fd.as_raw_fd(), libc::TUNSETOFFLOAD, flags) };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    /// The name the kernel gave the device (normally `flannel0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// A second fd on the same device, so each forwarding direction can register its own
    /// with the reactor.
    pub fn try_clone(&self) -> io::Result<Tun> {
        Ok(Tun {
            fd: self.fd.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// Reads one packet, virtio-net header first, into `buf` (non-blocking: `WouldBlock`
    /// when none is queued).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet with an empty virtio-net header (no offload asked).
    pub fn write(&self, pkt: &[u8]) -> io::Result<usize> {
        let hdr = [0u8; VNET_HDR_LEN];
        let iov = [
            libc::iovec {
                iov_base: hdr.as_ptr() as *mut libc::c_void,
                iov_len: hdr.len(),
            },
            libc::iovec {
                iov_base: pkt.as_ptr() as *mut libc::c_void,
                iov_len: pkt.len(),
            },
        ];
        // SAFETY: both iovecs point at buffers valid for reads of their lengths.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), iov.len() as libc::c_int) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one packet that starts with its own virtio-net header.
    pub fn write_with_header(&self, pkt: &[u8]) -> io::Result<usize> {
        // SAFETY: `pkt` is valid for reads of its length.
        let n = unsafe { libc::write(self.fd.as_raw_fd(), pkt.as_ptr().cast(), pkt.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tun {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl AsFd for Tun {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}
