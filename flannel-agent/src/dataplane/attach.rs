//! Attaching the classifiers so that they survive the agent, and replacing them without a
//! moment in which no program runs.
//!
//! * TCX (kernel 6.6+, the default): each attachment is a BPF link pinned at
//!   `<pin-dir>/v1/link_<program>`. The pin keeps it attached after the agent exits or is
//!   killed. A restarted agent opens the pin and swaps its freshly loaded program into the
//!   link with `BPF_LINK_UPDATE`, which is atomic.
//! * netlink (older kernels, or on request): a `cls_bpf` filter under the `clsact` qdisc
//!   with a fixed priority and handle. Filters stay until deleted, so aya's handle on them is
//!   forgotten instead of dropped (dropping would delete the filter); a restarted agent
//!   changes the filter at the same priority and handle, which `cls_bpf` does atomically.

use std::{
    error::Error,
    ffi::CStr,
    fs, io, mem,
    path::{Path, PathBuf},
};

use aya::{
    programs::{
        links::{FdLink, LinkError, PinnedLink},
        tc::{self, NlOptions, SchedClassifierLink, TcAttachOptions, TcError, TcHandle},
        xdp::XdpLink,
        LinkOrder, ProgramError, SchedClassifier, TcAttachType, Xdp, XdpMode,
    },
    sys::SyscallError,
    util::KernelVersion,
};
use tracing::{debug, info};

use super::DataplaneError;

/// How the classifiers are attached.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6+), else netlink.
    #[default]
    Auto,
    /// TCX links, pinned.
    Tcx,
    /// `cls_bpf` filters under `clsact`, at [`NL_PRIORITY`] / [`NL_HANDLE`].
    Netlink,
}

impl AttachMode {
    /// `Auto` resolved for the running kernel.
    pub fn resolve(self) -> Self {
        match self {
            Self::Auto if tcx_supported() => Self::Tcx,
            Self::Auto => Self::Netlink,
            mode => mode,
        }
    }
}

/// Whether the kernel has TCX (6.6, the same test aya's `SchedClassifier::attach` makes).
pub fn tcx_supported() -> bool {
    KernelVersion::current().is_ok_and(|version| version >= KernelVersion::new(6, 6, 0))
}

/// Priority of our `cls_bpf` filters in netlink mode (lower runs first): ahead of filters that
/// others add with the default priority (49152 and up).
pub const NL_PRIORITY: u16 = 0xf1;
/// Handle of our `cls_bpf` filters in netlink mode; with the priority it names the filter.
pub const NL_HANDLE: TcHandle = TcHandle::new(0, 0xf1);

/// One attachment point: a program on one direction of one device.
#[derive(Clone, Debug)]
pub struct Hook {
    /// The program (`flannel_encap`, `flannel_decap`).
    pub program: &'static str,
    /// The device.
    pub iface: String,
    /// Ingress or egress.
    pub direction: TcAttachType,
    /// Where the TCX link is pinned.
    pub pin: PathBuf,
}

impl Hook {
    /// A hook whose link pin lives in `dir`.
    pub fn new(program: &'static str, iface: &str, direction: TcAttachType, dir: &Path) -> Self {
        Self {
            program,
            iface: iface.to_owned(),
            direction,
            pin: link_pin(dir, program),
        }
    }

    /// "egress of flannel.1", for messages.
    pub fn describe(&self) -> String {
        let direction = match self.direction {
            TcAttachType::Ingress => "ingress",
            TcAttachType::Egress => "egress",
            TcAttachType::Custom(_) => "custom hook",
        };
        format!("{direction} of {}", self.iface)
    }

    fn attach_error(&self, source: impl Into<Box<dyn Error + Send + Sync>>) -> DataplaneError {
        DataplaneError::Attach {
            program: self.program,
            hook: self.describe(),
            source: source.into(),
        }
    }

    fn detach_error(&self, source: impl Into<Box<dyn Error + Send + Sync>>) -> DataplaneError {
        DataplaneError::Detach {
            program: self.program,
            hook: self.describe(),
            source: source.into(),
        }
    }
}

/// Where the TCX link of `program` is pinned.
pub fn link_pin(dir: &Path, program: &str) -> PathBuf {
    dir.join(format!("link_{program}"))
}

/// Whether a pinned link's file name is one of ours.
pub fn is_link_pin(name: &str) -> bool {
    name.starts_with("link_")
}

/// Attaches the loaded `prog` at `hook`, replacing what an earlier agent attached there
/// without a gap, and removing what it attached in the other mode.
pub fn attach(prog: &mut SchedClassifier, hook: &Hook, mode: AttachMode) -> Result<(), DataplaneError> {
    match mode.resolve() {
        AttachMode::Netlink => {
            attach_netlink(prog, hook)?;
            // A TCX link from an agent that ran in TCX mode.
            detach_pinned_link(&hook.pin).map_err(|err| hook.detach_error(err))?;
        }
        _ => {
            attach_tcx(prog, hook)?;
            detach_netlink(hook)?;
        }
    }
    Ok(())
}

/// Removes the attachment at `hook`, whichever mode made it.
pub fn detach(hook: &Hook) -> Result<(), DataplaneError> {
    detach_pinned_link(&hook.pin).map_err(|err| hook.detach_error(err))?;
    detach_netlink(hook)
}

/// TCX: update the pinned link if it is attached at this hook, else make and pin a new one.
fn attach_tcx(prog: &mut SchedClassifier, hook: &Hook) -> Result<(), DataplaneError> {
    match PinnedLink::from_pin(&hook.pin) {
        Ok(pinned) => {
            let link = FdLink::from(pinned);
            if is_attached_at(&link, hook)? {
                let link = SchedClassifierLink::try_from(link).map_err(|err| hook.attach_error(err))?;
                let id = prog.attach_to_link(link).map_err(|err| hook.attach_error(err))?;
                // Take the link out of the program so that nothing detaches it; dropping our
                // descriptor leaves the pinned link attached.
                drop(prog.take_link(id).map_err(|err| hook.attach_error(err))?);
                debug!(hook = %hook.describe(), program = hook.program, "replaced the program of the pinned TCX link");
                return Ok(());
            }
            // Pinned for a device that is gone or is not this one (the link no longer runs
            // our program there).
            info!(hook = %hook.describe(), pin = %hook.pin.display(), "releasing a stale TCX link");
            detach_pinned_link(&hook.pin).map_err(|err| hook.attach_error(err))?;
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. })) if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(hook.attach_error(err)),
    }
    let id = prog
        .attach_with_options(
            &hook.iface,
            hook.direction,
            TcAttachOptions::TcxOrder(LinkOrder::default()),
        )
        .map_err(|err| hook.attach_error(err))?;
    let link = prog.take_link(id).map_err(|err| hook.attach_error(err))?;
    let link = FdLink::try_from(link).map_err(|err| hook.attach_error(err))?;
    link.pin(&hook.pin).map_err(|err| hook.attach_error(err))?;
    debug!(hook = %hook.describe(), program = hook.program, "attached a new pinned TCX link");
    Ok(())
}

/// Whether `link` runs one of the TCX programs attached at `hook` right now.
fn is_attached_at(link: &FdLink, hook: &Hook) -> Result<bool, DataplaneError> {
    let program_id = link.info().map_err(|err| hook.attach_error(err))?.program_id();
    let attached = match SchedClassifier::query_tcx(&hook.iface, hook.direction) {
        Ok((_, programs)) => programs,
        // The device is not there (yet): nothing is attached, and attaching will say so.
        Err(ProgramError::TcError(TcError::IoError(err))) if err.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(err) => return Err(hook.attach_error(err)),
    };
    Ok(attached.iter().any(|program| program.id() == program_id))
}

/// netlink: change our filter in place if it exists, else create it; never detach on drop.
fn attach_netlink(prog: &mut SchedClassifier, hook: &Hook) -> Result<(), DataplaneError> {
    match tc::qdisc_add_clsact(&hook.iface) {
        Ok(()) => {}
        Err(TcError::NetlinkError(err)) if err.raw_os_error() == Some(libc::EEXIST) => {}
        Err(err) => return Err(hook.attach_error(err)),
    }
    let existing = SchedClassifierLink::attached(&hook.iface, hook.direction, NL_PRIORITY, NL_HANDLE, None)
        .map_err(|err| hook.attach_error(err))?;
    // Without NLM_F_CREATE the kernel only changes an existing filter (cls_bpf swaps the
    // program under RCU) and answers ENOENT if there is none; then we create it.
    let id = match prog.attach_to_link(existing) {
        Ok(id) => id,
        Err(_) => prog
            .attach_with_options(
                &hook.iface,
                hook.direction,
                TcAttachOptions::Netlink(NlOptions {
                    priority: NL_PRIORITY,
                    handle: NL_HANDLE,
                    classid: None,
                }),
            )
            .map_err(|err| hook.attach_error(err))?,
    };
    let link = prog.take_link(id).map_err(|err| hook.attach_error(err))?;
    // Dropping the link would delete the filter; it must stay after the agent exits.
    mem::forget(link);
    Ok(())
}

/// Attaches the loaded XDP program `prog` (`program` names it) to `iface` as a BPF link
/// pinned at `pin`: replaces the program of a link pinned there before (atomic, like TCX), or
/// makes and pins a new link. A pinned link whose device is gone is released first. XDP links
/// need 5.9+; a kernel where aya falls back to netlink attachment gets an error (and no
/// XDP program).
pub fn attach_xdp(prog: &mut Xdp, program: &'static str, iface: &str, pin: &Path) -> Result<(), DataplaneError> {
    let error = |source: Box<dyn Error + Send + Sync>| DataplaneError::Attach {
        program,
        hook: format!("XDP of {iface}"),
        source,
    };
    match PinnedLink::from_pin(pin) {
        Ok(pinned) => {
            let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| error(e.into()))?;
            match prog.attach_to_link(link) {
                Ok(id) => {
                    // As for TCX: our descriptor goes, the pinned link stays attached.
                    drop(prog.take_link(id).map_err(|e| error(e.into()))?);
                    debug!(iface, program, "replaced the program of the pinned XDP link");
                    return Ok(());
                }
                Err(err) => {
                    info!(iface, pin = %pin.display(), error = %err, "releasing a stale XDP link");
                    detach_pinned_link(pin).map_err(|e| error(e.into()))?;
                }
            }
        }
        Err(LinkError::SyscallError(SyscallError { io_error, .. })) if io_error.kind() == io::ErrorKind::NotFound => {}
        Err(err) => return Err(error(err.into())),
    }
    let id = prog.attach(iface, XdpMode::default()).map_err(|e| error(e.into()))?;
    let link = prog.take_link(id).map_err(|e| error(e.into()))?;
    // A netlink-attached program (no bpf_link) would be detached when `link` drops here.
    let link =
        FdLink::try_from(link).map_err(|e| error(format!("XDP decap needs BPF links (Linux 5.9+): {e}").into()))?;
    link.pin(pin).map_err(|e| error(e.into()))?;
    debug!(iface, program, "attached a new pinned XDP link");
    Ok(())
}

/// Deletes `cls_bpf` filters running our program at `hook` (none is fine).
fn detach_netlink(hook: &Hook) -> Result<(), DataplaneError> {
    match tc::qdisc_detach_program(&hook.iface, hook.direction, hook.program) {
        Ok(()) => Ok(()),
        Err(TcError::IoError(err)) if err.kind() == io::ErrorKind::NotFound => Ok(()),
        // No clsact qdisc (EINVAL/ENOENT from the filter dump), or no such device: no filter.
        Err(TcError::NetlinkError(err))
            if matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOENT | libc::ENODEV)) =>
        {
            Ok(())
        }
        Err(err) => Err(hook.detach_error(err)),
    }
}

/// Detaches the BPF link pinned at `path` and removes the pin (no pin is fine).
///
/// Only removing the pin would detach the link too, but later: the last reference to a link
/// is put from a workqueue (`bpf_link_put`, kernel/bpf/syscall.c). `BPF_LINK_DETACH` detaches
/// it now, so that when this returns the program no longer runs.
pub fn detach_pinned_link(path: &Path) -> io::Result<()> {
    let fd = match sys::obj_get(path) {
        Ok(fd) => fd,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(err),
    };
    match sys::link_detach(&fd) {
        // ENOLINK: already detached (its device is gone); EINVAL: not a link we can detach.
        Err(err) if !matches!(err.raw_os_error(), Some(libc::ENOLINK | libc::EINVAL)) => return Err(err),
        _ => {}
    }
    match fs::remove_file(path) {
        Err(err) if err.kind() != io::ErrorKind::NotFound => Err(err),
        _ => Ok(()),
    }
}

/// The two `bpf(2)` commands aya does not offer on pinned links.
mod sys {
    use std::{
        ffi::CString,
        io,
        os::{
            fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
            unix::ffi::OsStrExt as _,
        },
        path::Path,
    };

    /// `BPF_OBJ_GET` (include/uapi/linux/bpf.h).
    const BPF_OBJ_GET: libc::c_long = 7;
    /// `BPF_LINK_DETACH`.
    const BPF_LINK_DETACH: libc::c_long = 34;

    /// `bpf(cmd, attr, size)` on a zero-filled `union bpf_attr` prefix.
    fn bpf(cmd: libc::c_long, attr: &mut [u64; 8]) -> io::Result<libc::c_long> {
        // SAFETY: `attr` is a live, writable buffer of the size passed; the commands used here
        // read at most its first 24 bytes and the rest is zero, as the kernel requires.
        let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), size_of_val(attr)) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(rc)
        }
    }

    /// Opens the object pinned at `path`.
    pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
        let path =
            CString::new(path.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut attr = [0u64; 8];
        // `pathname` is the first field of the BPF_OBJ_GET member.
        attr[0] = path.as_ptr() as u64;
        let fd = bpf(BPF_OBJ_GET, &mut attr)?;
        // SAFETY: the kernel returned a new file descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
    }

    /// Detaches the link `fd` refers to.
    pub fn link_detach(fd: &OwnedFd) -> io::Result<()> {
        let mut attr = [0u64; 8];
        // `link_fd` is the first (u32) field of the BPF_LINK_DETACH member.
        attr[0] = u64::from(fd.as_raw_fd() as u32);
        bpf(BPF_LINK_DETACH, &mut attr).map(drop)
    }
}

/// The names of every network device in the calling thread's network namespace.
pub fn interfaces() -> io::Result<Vec<String>> {
    // SAFETY: if_nameindex has no preconditions; it returns NULL or an array terminated by an
    // entry with index 0, which we free with if_freenameindex after copying the names.
    unsafe {
        let list = libc::if_nameindex();
        if list.is_null() {
            return Err(io::Error::last_os_error());
        }
        let mut names = Vec::new();
        let mut entry = list;
        while (*entry).if_index != 0 {
            names.push(CStr::from_ptr((*entry).if_name).to_string_lossy().into_owned());
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
        Ok(names)
    }
}
