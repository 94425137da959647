//! Making sure the pin directory is on a BPF file system.
//!
//! Pins only outlive the agent on bpffs. A node normally has it at `/sys/fs/bpf`, but not
//! always: `ip netns exec` gives its command a fresh `/sys` without it, and some hosts never
//! mount it. Then we mount it ourselves.

use std::{
    ffi::CString,
    fs, io,
    os::unix::ffi::OsStrExt as _,
    path::{Path, PathBuf},
    ptr,
};

use super::DataplaneError;

/// Where bpffs conventionally lives; a pin directory below it gets bpffs mounted here.
pub const BPFFS_ROOT: &str = "/sys/fs/bpf";

/// A mount from `/proc/self/mountinfo`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mount point.
    pub point: PathBuf,
    /// The file system type (`bpf` for bpffs).
    pub fstype: String,
}

/// Parses `/proc/self/mountinfo` lines (proc(5)): field 5 is the mount point (with spaces,
/// tabs, newlines and backslashes octal-escaped), and the file system type follows the `-`
/// separator.
pub fn parse_mountinfo(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let point = fields.nth(4)?;
            let mut rest = fields.skip_while(|field| *field != "-");
            rest.next()?;
            let fstype = rest.next()?;
            Some(Mount {
                point: PathBuf::from(unescape_octal(point)),
                fstype: fstype.to_owned(),
            })
        })
        .collect()
}

/// Undoes the kernel's `\ooo` escaping of mount points.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|digits| digits.iter().all(|d| (b'0'..=b'7').contains(d)));
        match (bytes[i], octal) {
            (b'\\', Some(digits)) => {
                let value = digits.iter().fold(0u32, |acc, d| acc * 8 + u32::from(d - b'0'));
                out.push(value as u8);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The file system type of the mount that holds `path` (the longest mount point that is a
/// prefix of it; the last one wins when mounts are stacked).
pub fn fstype_of<'a>(mounts: &'a [Mount], path: &Path) -> Option<&'a str> {
    mounts
        .iter()
        .filter(|mount| path.starts_with(&mount.point))
        .fold(None::<&Mount>, |best, mount| match best {
            Some(best) if best.point.as_os_str().len() > mount.point.as_os_str().len() => Some(best),
            _ => Some(mount),
        })
        .map(|mount| mount.fstype.as_str())
}

/// Where to mount bpffs so that `pin_dir` is on it: `/sys/fs/bpf` for pin directories below
/// it (so that other tools find it there too), else the pin directory itself.
pub fn mount_point_for(pin_dir: &Path) -> PathBuf {
    let root = Path::new(BPFFS_ROOT);
    if pin_dir.starts_with(root) {
        root.to_path_buf()
    } else {
        pin_dir.to_path_buf()
    }
}

/// Makes sure `pin_dir` is on bpffs, mounting it if it is not; returns the mount point it
/// mounted, if any.
pub fn ensure(pin_dir: &Path) -> Result<Option<PathBuf>, DataplaneError> {
    let read_mounts = || {
        fs::read_to_string("/proc/self/mountinfo")
            .map(|text| parse_mountinfo(&text))
            .map_err(|source| DataplaneError::Io {
                op: "read",
                path: PathBuf::from("/proc/self/mountinfo"),
                source,
            })
    };
    if fstype_of(&read_mounts()?, pin_dir) == Some("bpf") {
        return Ok(None);
    }
    let point = mount_point_for(pin_dir);
    fs::create_dir_all(&point).map_err(|source| DataplaneError::Io {
        op: "create directory",
        path: point.clone(),
        source,
    })?;
    mount_bpffs(&point)?;
    Ok(Some(point))
}

/// `mount -t bpf bpf <point>`.
fn mount_bpffs(point: &Path) -> Result<(), DataplaneError> {
    let error = |source| DataplaneError::MountBpffs {
        path: point.to_path_buf(),
        source,
    };
    let target =
        CString::new(point.as_os_str().as_bytes()).map_err(|_| error(io::Error::from(io::ErrorKind::InvalidInput)))?;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call; bpffs takes no
    // mount data.
    let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, ptr::null()) };
    if rc != 0 {
        return Err(error(io::Error::last_os_error()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
23 22 0:21 / /sys rw,nosuid shared:2 - sysfs sysfs rw
24 23 0:22 / /sys/fs/bpf rw,nosuid shared:3 - bpf bpf rw,mode=700
25 22 0:23 / /tmp/with\\040space rw - tmpfs tmpfs rw
26 25 0:24 / /tmp/with\\040space/pins rw - bpf bpf rw
";

    #[test]
    fn mountinfo_gives_mount_points_and_types() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(mounts.len(), 5);
        assert_eq!(mounts[2].point, Path::new("/sys/fs/bpf"));
        assert_eq!(mounts[2].fstype, "bpf");
        assert_eq!(mounts[3].point, Path::new("/tmp/with space"));
    }

    #[test]
    fn the_longest_mount_point_decides() {
        let mounts = parse_mountinfo(MOUNTINFO);
        assert_eq!(fstype_of(&mounts, Path::new("/sys/fs/bpf/flannel-rs/v1")), Some("bpf"));
        assert_eq!(fstype_of(&mounts, Path::new("/sys/fs")), Some("sysfs"));
        assert_eq!(fstype_of(&mounts, Path::new("/sys/fs/bpfx")), Some("sysfs"));
        assert_eq!(fstype_of(&mounts, Path::new("/tmp/with space/pins/v1")), Some("bpf"));
        assert_eq!(fstype_of(&mounts, Path::new("/var/run")), Some("ext4"));
    }

    #[test]
    fn bpffs_goes_on_sys_fs_bpf_or_on_the_pin_dir() {
        assert_eq!(
            mount_point_for(Path::new("/sys/fs/bpf/flannel-rs")),
            Path::new("/sys/fs/bpf")
        );
        assert_eq!(
            mount_point_for(Path::new("/run/flannel/bpf")),
            Path::new("/run/flannel/bpf")
        );
    }
}
