//! Tests of the embedded object: parsing it (unprivileged), and loading and attaching it in
//! network namespaces of its own (privileged: root; skipped loudly outside CI, failing in CI).

use std::{
    env,
    ffi::CString,
    fs::File,
    io::{self, Write as _},
    net::Ipv4Addr,
    os::{fd::AsRawFd as _, unix::ffi::OsStrExt as _},
    path::Path,
    process::{self, Command},
    ptr,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::{
    maps::{lpm_trie::Key, LpmTrie, PerCpuArray},
    programs::{
        tc::{self, NlOptions, TcAttachOptions},
        SchedClassifier, TcAttachType,
    },
};
use flannel_common::{Stat, VtepInfo, VtepKey, MAP_STATS, MAP_VTEPS, PROG_ENCAP};
use tempfile::TempDir;

use super::*;

#[test]
fn built_object_has_every_map_and_program() {
    let object = aya_obj::Object::parse(object_bytes()).expect("the embedded eBPF object parses");
    let contents = ObjectContents::new(
        object.maps.keys().map(String::as_str),
        object.programs.keys().map(String::as_str),
    );
    assert_eq!(contents.missing(), Vec::<&str>::new(), "object contains {contents:?}");
    // Without BTF the maps would have no key/value types for the kernel and bpftool.
    assert!(object.btf.is_some(), "the embedded eBPF object carries no BTF");
}

#[test]
fn contents_reports_what_is_missing() {
    let contents = ObjectContents::new([MAP_VTEPS], [PROG_ENCAP]);
    assert_eq!(contents.missing(), vec![MAP_STATS, flannel_common::PROG_DECAP]);
}

/// The pod-side veth in namespace A, where `flannel_encap` is attached.
const VETH_A: &str = "veth-a";
/// Its peer in namespace B.
const VETH_B: &str = "veth-b";
/// Addresses on the veth pair; they exist only inside the test's namespaces.
const ADDR_A: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const ADDR_B: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 2);
/// The "remote subnet" in FLANNEL_VTEPS that ADDR_B falls in.
const REMOTE_SUBNET: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 0);
const REMOTE_PREFIX_LEN: u32 = 24;

#[test]
fn encap_attaches_in_a_netns_and_its_maps_dump_with_field_names() -> Result<()> {
    if !can_run_privileged("encap_attaches_in_a_netns_and_its_maps_dump_with_field_names") {
        return Ok(());
    }
    // Declared before the object so it drops after it: aya detaches the TC filter by
    // interface index when the object drops, and that index only names veth-a while this
    // thread is still in namespace A.
    let mut net = TestNet::create()?;
    let mut ebpf = load()?;
    net.enter_a()?;

    let vtep = VtepInfo::new(Ipv4Addr::new(192, 0, 2, 7), [0x02, 0, 0, 0, 0, 0x07], 0);
    let key = VtepKey::new(REMOTE_SUBNET, REMOTE_PREFIX_LEN);
    {
        let map = ebpf.map_mut(MAP_VTEPS).context("no FLANNEL_VTEPS map")?;
        let mut vteps: LpmTrie<_, u32, VtepInfo> = LpmTrie::try_from(map)?;
        vteps.insert(&Key::new(key.prefix_len, key.addr), vtep, 0)?;
    }
    let bpffs = BpfFs::mount()?;
    let pinned = bpffs.path().join(MAP_VTEPS);
    ebpf.map(MAP_VTEPS).context("no FLANNEL_VTEPS map")?.pin(&pinned)?;

    tc::qdisc_add_clsact(VETH_A)?;
    let program: &mut SchedClassifier = ebpf.program_mut(PROG_ENCAP).context("no flannel_encap")?.try_into()?;
    program.load()?;
    // Netlink, i.e. a filter under the clsact qdisc as `tc` shows it, not a TCX link.
    program.attach_with_options(
        VETH_A,
        TcAttachType::Egress,
        TcAttachOptions::Netlink(NlOptions::default()),
    )?;
    let filters = net.run_in_a(&["tc", "filter", "show", "dev", VETH_A, "egress"])?;
    ensure!(
        filters.contains(PROG_ENCAP),
        "tc shows no {PROG_ENCAP} filter: {filters}"
    );

    // Real packets through the classifier: ARP (not IPv4) and ICMP to an address in the
    // remote subnet (a VTEP hit).
    net.run_in_a(&["ping", "-c", "2", "-i", "0.2", "-W", "2", &ADDR_B.to_string()])?;
    let stats: PerCpuArray<_, u64> = PerCpuArray::try_from(ebpf.map(MAP_STATS).context("no FLANNEL_STATS")?)?;
    let total = |stat: Stat| -> Result<u64> { Ok(stats.get(&stat.index(), 0)?.iter().sum()) };
    ensure!(
        total(Stat::EncapVtepHit)? >= 2,
        "pings to {ADDR_B} did not hit the VTEP entry"
    );
    ensure!(
        total(Stat::EncapNotIpv4)? >= 1,
        "the ARP request was not counted as not-IPv4"
    );
    ensure!(
        total(Stat::EncapPackets)? >= 3,
        "the encap program saw fewer packets than were sent"
    );

    let dump = Command::new("bpftool")
        .args(["map", "dump", "pinned"])
        .arg(&pinned)
        .arg("-j")
        .output()?;
    ensure!(
        dump.status.success(),
        "bpftool failed: {}",
        String::from_utf8_lossy(&dump.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&dump.stdout).context("bpftool printed no JSON")?;
    // With BTF, bpftool adds a "formatted" object with field names next to the raw bytes.
    let formatted = &entries[0]["formatted"];
    ensure!(
        formatted["key"]["prefix_len"] == REMOTE_PREFIX_LEN,
        "no named key fields: {entries}"
    );
    ensure!(formatted["key"]["data"] == key.addr, "unexpected key: {entries}");
    ensure!(
        formatted["value"]["remote_ip"] == vtep.remote_ip,
        "no named value fields: {entries}"
    );
    ensure!(formatted["value"]["mac"][5] == 7, "unexpected VTEP MAC: {entries}");
    Ok(())
}

/// A bpffs instance of the test's own on a temporary directory, unmounted on drop (which
/// also frees whatever is pinned in it). Not /sys/fs/bpf: a machine need not have it mounted,
/// and the test should not leave pins behind in a shared one.
struct BpfFs {
    /// The mount point, for the unmount in `drop`.
    target: CString,
    /// Removed (empty again) after the unmount.
    dir: TempDir,
}

impl BpfFs {
    fn mount() -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("flannel-rs-bpffs-").tempdir()?;
        let target = CString::new(dir.path().as_os_str().as_bytes())?;
        // SAFETY: every pointer is a NUL-terminated string that outlives the call; bpffs
        // takes no mount data.
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

    fn path(&self) -> &Path {
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

/// Whether a privileged test can run. As non-root it skips, loudly, unless CI is set, where
/// a skipped privileged test would hide a broken datapath: then it fails.
fn can_run_privileged(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    assert!(
        env::var_os("CI").is_none(),
        "{test} needs root and CI is set: run CI as root"
    );
    // Straight to stderr, not eprintln!: the test harness captures eprintln! output of
    // passing tests, and a skip must be seen.
    let _ = writeln!(
        io::stderr(),
        "SKIPPED {test}: needs root (eBPF load, network namespaces); run the tests as root"
    );
    false
}

/// Two network namespaces joined by a veth pair, deleted on drop (also on panic). It also
/// returns the thread to its own namespace if it entered one.
struct TestNet {
    /// Namespace A (`VETH_A`, `ADDR_A`) and namespace B (`VETH_B`, `ADDR_B`), once created.
    namespaces: Vec<String>,
    /// The thread's own network namespace while it is in namespace A.
    home: Option<File>,
}

impl TestNet {
    /// Creates the namespaces with names unique to this process and test.
    fn create() -> Result<Self> {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let id = format!("{}-{}", process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        let mut net = Self {
            namespaces: Vec::new(),
            home: None,
        };
        for side in ["a", "b"] {
            let name = format!("flrs-dp-{side}-{id}");
            ip(&["netns", "add", &name])?;
            net.namespaces.push(name);
        }
        let (a, b) = (net.namespaces[0].clone(), net.namespaces[1].clone());
        ip(&[
            "-n", &a, "link", "add", VETH_A, "type", "veth", "peer", "name", VETH_B, "netns", &b,
        ])?;
        for (ns, dev, addr) in [(&a, VETH_A, ADDR_A), (&b, VETH_B, ADDR_B)] {
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev])?;
            ip(&["-n", ns, "link", "set", dev, "up"])?;
        }
        Ok(net)
    }

    /// Moves this thread (only) into namespace A, for aya's netlink and interface lookups.
    fn enter_a(&mut self) -> Result<()> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target_path = Path::new("/run/netns").join(&self.namespaces[0]);
        let target = File::open(&target_path).with_context(|| format!("opening {}", target_path.display()))?;
        // SAFETY: setns only switches the calling thread's network namespace, and `target` is
        // an open namespace file for the duration of the call.
        if unsafe { libc::setns(target.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            bail!("setns into {}: {}", self.namespaces[0], io::Error::last_os_error());
        }
        self.home = Some(home);
        Ok(())
    }

    /// Runs `args` in namespace A and returns its stdout.
    fn run_in_a(&self, args: &[&str]) -> Result<String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.namespaces[0]])
            .args(args)
            .output()
            .context("running `ip netns exec` (is iproute2 installed? run `cargo xtask setup`)")?;
        ensure!(
            out.status.success(),
            "`{}` in {} failed: {}",
            args.join(" "),
            self.namespaces[0],
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // SAFETY: as in `enter_a`; `home` is this thread's original namespace.
            if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                eprintln!(
                    "TestNet: returning to the original netns: {}",
                    io::Error::last_os_error()
                );
            }
        }
        // Deleting a namespace deletes the veth in it, and with it the TC filter.
        for name in &self.namespaces {
            if let Err(err) = ip(&["netns", "del", name]) {
                eprintln!("TestNet: {err:#}");
            }
        }
    }
}

/// Runs `ip <args>` and fails with its stderr.
fn ip(args: &[&str]) -> Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running `ip` (is iproute2 installed? run `cargo xtask setup`)")?;
    ensure!(
        out.status.success(),
        "`ip {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}
