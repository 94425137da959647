//! A two-node VXLAN testbed in network namespaces, laid out as upstream flannel lays out a
//! node: an underlay veth (`eth0`), `flannel.1` made as flannel makes it, and per peer a
//! permanent neighbour entry, an FDB entry and an onlink route. Optionally a pod behind node
//! A. Everything is deleted on drop, also when a test panics.

use std::{
    ffi::CString,
    fs::{self, File},
    io::{self, Write as _},
    net::Ipv4Addr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{self, Command, Output},
    ptr,
    sync::atomic::{AtomicU32, Ordering},
    thread,
};

use anyhow::{bail, ensure, Context as _, Result};
use tempfile::TempDir;

/// Whether a privileged test can run. As non-root it skips, loudly, unless CI is set, where
/// a skipped privileged test would hide a broken datapath: then it fails.
pub fn can_run_privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "{test} needs root and CI is set: run CI as root"
    );
    // Straight to stderr, not eprintln!: the harness captures eprintln! of passing tests.
    let _ = writeln!(
        io::stderr(),
        "SKIPPED {test}: needs root (eBPF, network namespaces); run the tests as root"
    );
    false
}

/// Runs `ip <args>` and fails with its stderr.
pub fn ip(args: &[&str]) -> Result<()> {
    run("ip", args).map(drop)
}

/// Runs a command and fails with its stderr; returns its output.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running `{program}` (run `cargo xtask setup`)"))?;
    ensure!(
        out.status.success(),
        "`{program} {}` failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    );
    Ok(out)
}

/// Moves the calling thread into a network namespace until dropped.
pub struct NetnsGuard {
    /// The thread's own namespace, to return to.
    home: File,
}

impl NetnsGuard {
    /// Enters `/run/netns/<name>`.
    pub fn enter(name: &str) -> Result<Self> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target = File::open(Path::new("/run/netns").join(name)).with_context(|| format!("opening netns {name}"))?;
        // SAFETY: setns only switches the calling thread's network namespace; `target` is an
        // open namespace file.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {name}: {}", io::Error::last_os_error());
        }
        Ok(Self { home })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        // SAFETY: as in `enter`; `home` is this thread's original namespace.
        if unsafe { libc::setns(self.home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            eprintln!("NetnsGuard: returning home: {}", io::Error::last_os_error());
        }
    }
}

/// Runs `f` on a new thread inside namespace `name`; returns its join handle.
pub fn spawn_in<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> thread::JoinHandle<Result<T>> {
    let name = name.to_owned();
    thread::spawn(move || {
        let _ns = NetnsGuard::enter(&name)?;
        f()
    })
}

/// Underlay addresses of the nodes.
pub const UNDERLAY: [Ipv4Addr; 2] = [Ipv4Addr::new(192, 168, 50, 1), Ipv4Addr::new(192, 168, 50, 2)];
/// An extra underlay address on node B that is no VTEP.
pub const STRANGER: Ipv4Addr = Ipv4Addr::new(192, 168, 50, 99);
/// `flannel.1` MACs of the nodes (fixed, so frames are reproducible).
pub const VTEP_MACS: [[u8; 6]; 2] = [[0x02, 0xfa, 0, 0, 0, 0x0a], [0x02, 0xfa, 0, 0, 0, 0x0b]];
/// Pod subnets of the nodes; `flannel.1` holds the `.0` address, as upstream assigns it.
pub const SUBNETS: [Ipv4Addr; 2] = [Ipv4Addr::new(10, 244, 1, 0), Ipv4Addr::new(10, 244, 2, 0)];
/// The pod behind node A.
pub const POD_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 2);
/// Node A's address on the pod's veth (the pod's gateway).
pub const POD_GW_A: Ipv4Addr = Ipv4Addr::new(10, 244, 1, 1);
/// The VNI and port of `flannel.1`.
pub const VNI: u32 = 1;
/// The VXLAN port flannel uses.
pub const PORT: u16 = 8472;
/// The underlay MTU.
pub const UNDERLAY_MTU: u32 = 1500;

/// Formats a MAC address for `ip`.
pub fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The two nodes (and maybe a pod), deleted on drop.
pub struct TestNet {
    /// Node namespaces A and B.
    pub nodes: [String; 2],
    /// The pod namespace behind A, if made.
    pub pod: Option<String>,
    /// Namespaces to delete.
    created: Vec<String>,
    /// Per node a bpffs for the pins (unmounted on drop).
    pins: Vec<BpfFs>,
}

impl TestNet {
    /// Two nodes with flannel.1 and each other's peer entries, as upstream programs them.
    pub fn new(with_pod: bool) -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut net = Self {
            nodes: [format!("flrs-dp-{id}-a"), format!("flrs-dp-{id}-b")],
            pod: with_pod.then(|| format!("flrs-dp-{id}-p")),
            created: Vec::new(),
            pins: Vec::new(),
        };
        for ns in net.nodes.clone().iter().chain(net.pod.clone().iter()) {
            ip(&["netns", "add", ns])?;
            net.created.push(ns.clone());
            ip(&["-n", ns, "link", "set", "lo", "up"])?;
            run("ip", &["netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"])?;
        }
        let [a, b] = net.nodes.clone();
        ip(&[
            "-n", &a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", &b,
        ])?;
        for n in 0..2 {
            let ns = &net.nodes[n];
            ip(&["-n", ns, "link", "set", "eth0", "mtu", &UNDERLAY_MTU.to_string(), "up"])?;
            ip(&["-n", ns, "addr", "add", &format!("{}/24", UNDERLAY[n]), "dev", "eth0"])?;
            ip(&[
                "-n",
                ns,
                "link",
                "add",
                "flannel.1",
                "address",
                &mac_str(VTEP_MACS[n]),
                "type",
                "vxlan",
                "id",
                &VNI.to_string(),
                "dev",
                "eth0",
                "local",
                &UNDERLAY[n].to_string(),
                "dstport",
                &PORT.to_string(),
                "nolearning",
                "noudpcsum",
            ])?;
            ip(&[
                "-n",
                ns,
                "link",
                "set",
                "flannel.1",
                "mtu",
                &(UNDERLAY_MTU - 50).to_string(),
                "up",
            ])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/32", SUBNETS[n]),
                "dev",
                "flannel.1",
            ])?;
            let peer = 1 - n;
            net.add_peer(n, peer)?;
        }
        if let Some(pod) = net.pod.clone() {
            ip(&[
                "-n", &a, "link", "add", "vp", "type", "veth", "peer", "name", "eth0", "netns", &pod,
            ])?;
            ip(&["-n", &a, "addr", "add", &format!("{POD_GW_A}/24"), "dev", "vp"])?;
            ip(&[
                "-n",
                &a,
                "link",
                "set",
                "vp",
                "mtu",
                &(UNDERLAY_MTU - 50).to_string(),
                "up",
            ])?;
            ip(&["-n", &pod, "addr", "add", &format!("{POD_A}/24"), "dev", "eth0"])?;
            ip(&[
                "-n",
                &pod,
                "link",
                "set",
                "eth0",
                "mtu",
                &(UNDERLAY_MTU - 50).to_string(),
                "up",
            ])?;
            ip(&["-n", &pod, "route", "add", "default", "via", &POD_GW_A.to_string()])?;
        }
        for _ in 0..2 {
            net.pins.push(BpfFs::mount()?);
        }
        Ok(net)
    }

    /// Programs node `node`'s kernel path to `peer` as upstream flannel does: neighbour,
    /// FDB entry, onlink route.
    pub fn add_peer(&self, node: usize, peer: usize) -> Result<()> {
        let ns = &self.nodes[node];
        let mac = mac_str(VTEP_MACS[peer]);
        let gw = SUBNETS[peer].to_string();
        ip(&[
            "-n",
            ns,
            "neigh",
            "replace",
            &gw,
            "lladdr",
            &mac,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ])?;
        run(
            "bridge",
            &[
                "-n",
                ns,
                "fdb",
                "replace",
                &mac,
                "dev",
                "flannel.1",
                "dst",
                &UNDERLAY[peer].to_string(),
                "self",
                "permanent",
            ],
        )?;
        ip(&[
            "-n",
            ns,
            "route",
            "replace",
            &format!("{gw}/24"),
            "via",
            &gw,
            "dev",
            "flannel.1",
            "onlink",
        ])
    }

    /// The bpffs directory node `node` pins into.
    pub fn pin_dir(&self, node: usize) -> &Path {
        self.pins[node].path()
    }

    /// Runs a command in namespace `ns` and returns its output (failing on a non-zero exit).
    pub fn exec(ns: &str, args: &[&str]) -> Result<Output> {
        let mut all = vec!["netns", "exec", ns];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Pings `dst` from namespace `ns` `count` times; fails if any reply is missing.
    pub fn ping(ns: &str, dst: Ipv4Addr, count: u32) -> Result<()> {
        Self::exec(
            ns,
            &[
                "ping",
                "-c",
                &count.to_string(),
                "-i",
                "0.1",
                "-W",
                "2",
                "-q",
                &dst.to_string(),
            ],
        )
        .map(drop)
        .with_context(|| format!("ping {dst} from {ns}"))
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace deletes its devices, and with them every TC attachment; the
        // pins (and so the maps) go with the bpffs mounts.
        for name in &self.created {
            if let Err(err) = ip(&["netns", "del", name]) {
                eprintln!("TestNet: {err:#}");
            }
        }
    }
}

/// A bpffs of the test's own on a temporary directory, unmounted on drop (which also frees
/// what is pinned in it).
pub struct BpfFs {
    /// The mount point.
    target: CString,
    /// Removed (empty again) after the unmount.
    dir: TempDir,
}

impl BpfFs {
    /// Mounts bpffs on a fresh temporary directory.
    pub fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("flannel-rs-bpffs-").tempdir()?;
        let target = CString::new(dir.path().as_os_str().as_encoded_bytes())?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call.
        let rc = unsafe { libc::mount(c"bpf".as_ptr(), target.as_ptr(), c"bpf".as_ptr(), 0, ptr::null()) };
        if rc != 0 {
            bail!(
                "mounting bpffs on {}: {}",
                dir.path().display(),
                io::Error::last_os_error()
            );
        }
        Ok(Self { target, dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        // SAFETY: `target` is a NUL-terminated path; MNT_DETACH cannot leave it half-mounted.
        if unsafe { libc::umount2(self.target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "BpfFs: unmounting {}: {}",
                self.dir.path().display(),
                io::Error::last_os_error()
            );
        }
    }
}

/// Unmounts whatever is mounted on `path` (lazily) and removes the directory.
pub fn unmount_and_remove(path: &PathBuf) {
    if let Ok(target) = CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: `target` is a NUL-terminated path.
        unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    }
    let _ = fs::remove_dir(path);
}
