//! A two-node lab for privileged backend tests: namespaces `a` and `b` play two
//! nodes joined by a veth pair `ul` (the underlay), each with a bridge `cni0`
//! holding the first address of its pod subnet, so traffic between
//! `10.244.1.1` and `10.244.2.1` (and `fd10:0:0:1::1` / `fd10:0:0:2::1`) proves
//! the backend's datapath works in both directions.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::fd::AsRawFd;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::testutil::TestNetns;
use super::{ExternalInterface, Netlink};
use crate::backend::BackendInfo;
use crate::config::NetworkConfig;
use crate::subnet::{Lease, LeaseAttrs, PeerSet};

/// A way into a namespace that works from any thread: a `/proc/<pid>/fd/<n>`
/// path to an open namespace file, for `nsenter --net=`.
#[derive(Clone, Debug)]
pub(crate) struct NsPath(String);

impl NsPath {
    /// Runs `args` in the namespace and returns stdout; panics with stderr on failure.
    pub(crate) fn sh(&self, args: &[&str]) -> String {
        self.try_sh(args).unwrap_or_else(|e| panic!("{args:?}: {e}"))
    }

    /// Runs `args` in the namespace; `Err(stderr)` if it fails.
    pub(crate) fn try_sh(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", self.0))
            .arg("--")
            .args(args)
            .output()
            .unwrap_or_else(|e| panic!("cannot run nsenter {args:?}: {e}"));
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    /// Starts `ip monitor` for links, addresses, routes and neighbours (FDB entries
    /// included), to prove that an operation sends the kernel no change at all.
    pub(crate) fn monitor(&self) -> Monitor {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", self.0))
            .args(["--", "ip", "monitor", "link", "address", "route", "neigh"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn ip monitor");
        // Let it subscribe before anything happens.
        std::thread::sleep(Duration::from_millis(300));
        Monitor(child)
    }

    /// Whether `ping` from `src` to `dst` gets answers (three tries, short timeout).
    pub(crate) fn ping(&self, src: &str, dst: &str) -> bool {
        self.try_sh(&["ping", "-c", "3", "-i", "0.2", "-W", "1", "-I", src, dst])
            .is_ok()
    }
}

/// A running `ip monitor`.
pub(crate) struct Monitor(Child);

impl Monitor {
    /// Stops it and returns the events it printed.
    pub(crate) fn stop(mut self) -> String {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let out = self.0.wait_with_output().expect("wait for ip monitor");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// One node of the lab.
pub(crate) struct Node {
    /// Its namespace; `run` drives a backend inside it.
    pub(crate) ns: TestNetns,
    /// Kept open so that `path` stays valid.
    file: File,
}

impl Node {
    /// A path into the namespace for `nsenter`, usable from any thread.
    pub(crate) fn path(&self) -> NsPath {
        NsPath(format!("/proc/{}/fd/{}", std::process::id(), self.file.as_raw_fd()))
    }
}

/// Two nodes, `a` (10.244.1.0/24, fd10:0:0:1::/64) and `b` (10.244.2.0/24,
/// fd10:0:0:2::/64), on the underlay 192.168.50.0/24 and fd50::/64.
pub(crate) struct Lab {
    /// Node A.
    pub(crate) a: Node,
    /// Node B.
    pub(crate) b: Node,
}

impl Lab {
    /// Builds the lab; `prefix` names the namespaces.
    pub(crate) fn new(prefix: &str) -> Lab {
        let node = |tag: &str| {
            let ns = TestNetns::new(&format!("{prefix}-{tag}"));
            let file = ns.run(|| async { File::open("/proc/thread-self/ns/net").expect("open own netns") });
            Node { ns, file }
        };
        let (a, b) = (node("a"), node("b"));
        // No duplicate address detection on the lab's links: until it finishes on
        // `ul`'s link-local address, neighbour discovery for a peer's global
        // address stalls (about a second), which would make pings flaky.
        for n in [&a, &b] {
            n.path().sh(&[
                "sysctl",
                "-qw",
                "net.ipv6.conf.default.accept_dad=0",
                "net.ipv6.conf.all.accept_dad=0",
            ]);
        }
        // ip(8) opens a netns argument containing '/' as a path.
        a.ns.ip(&[
            "link",
            "add",
            "ul",
            "type",
            "veth",
            "peer",
            "name",
            "ul",
            "netns",
            &b.path().0,
        ]);
        for (n, node) in [(1u8, &a), (2u8, &b)] {
            let ns = &node.ns;
            ns.ip(&["link", "set", "lo", "up"]);
            ns.ip(&["link", "set", "ul", "up"]);
            ns.ip(&["addr", "add", &format!("192.168.50.{n}/24"), "dev", "ul"]);
            ns.ip(&["addr", "add", &format!("fd50::{n}/64"), "dev", "ul", "nodad"]);
            ns.ip(&["link", "add", "cni0", "type", "bridge"]);
            ns.ip(&["link", "set", "cni0", "up"]);
            ns.ip(&["addr", "add", &format!("10.244.{n}.1/24"), "dev", "cni0"]);
            ns.ip(&["addr", "add", &format!("fd10:0:0:{n}::1/64"), "dev", "cni0", "nodad"]);
        }
        Lab { a, b }
    }
}

/// The external interface of a lab node (`ul`), as interface selection would
/// find it; call inside the node's namespace.
pub(crate) async fn lab_ext(v4: Option<Ipv4Addr>, v6: Option<Ipv6Addr>) -> ExternalInterface {
    let nl = Netlink::new().expect("netlink socket");
    let ul = nl.link_by_name("ul").await.expect("get ul").expect("ul exists");
    ExternalInterface {
        name: ul.name,
        index: ul.index,
        mtu: ul.mtu,
        iface_addr: v4,
        iface_v6_addr: v6,
        ext_addr: v4,
        ext_v6_addr: v6,
    }
}

/// The lab's network config: `10.244.0.0/16` (and `fd10::/48` with `v6`), with
/// `backend` as the raw `Backend` object.
pub(crate) fn config(backend: &str, v6: bool) -> NetworkConfig {
    let v6 = if v6 {
        r#""EnableIPv6":true,"IPv6Network":"fd10::/48","#
    } else {
        ""
    };
    NetworkConfig::parse_and_check(&format!(r#"{{"Network":"10.244.0.0/16",{v6}"Backend":{backend}}}"#)).unwrap()
}

/// Node `n`'s lease: `10.244.<n>.0/24` (and `fd10:0:0:<n>::/64`) on `192.168.50.<n>`
/// (and `fd50::<n>`), with the backend data `info` says.
pub(crate) fn lease(n: u8, info: &BackendInfo, v6: bool) -> Lease {
    Lease {
        subnet: Some(format!("10.244.{n}.0/24").parse().unwrap()),
        ipv6_subnet: v6.then(|| format!("fd10:0:0:{n}::/64").parse().unwrap()),
        attrs: LeaseAttrs {
            public_ip: format!("192.168.50.{n}").parse().unwrap(),
            public_ipv6: v6.then(|| format!("fd50::{n}").parse().unwrap()),
            backend_type: info.backend_type.clone(),
            backend_data: info.backend_data.clone(),
            backend_v6_data: info.backend_v6_data.clone(),
        },
        expiration: None,
    }
}

/// A peer set of `list`, complete or not.
pub(crate) fn peers(list: &[(&str, &Lease)], complete: bool) -> PeerSet {
    PeerSet {
        leases: list
            .iter()
            .map(|(n, l)| (n.to_string(), (*l).clone()))
            .collect::<BTreeMap<_, _>>(),
        complete,
        generation: 1,
    }
}
