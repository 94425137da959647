//! The `udp` backend: userspace encapsulation over a TUN device, for kernels with neither
//! VXLAN nor eBPF, and for debugging. Upstream-compatible (see the reference, §5.3): TUN
//! `flannel0` with `<lease subnet IP>/32` and MTU = underlay − 28, the route for the whole
//! cluster network via `flannel0`, UDP port 8285 (`Port`), the raw inner IPv4 packet as the
//! UDP payload, and a lease with no `BackendType` and no backend data, so upstream udp
//! nodes and flannel-rs udp nodes talk to each other.
//!
//! Unlike upstream's proxy, datagrams are accepted only from a peer's `PublicIP:Port` and
//! only with an inner source inside that peer's subnet (a node behind NAT whose datagrams
//! arrive from another address than its PublicIP is therefore not reachable); everything
//! else is dropped and counted by reason ([`stats::Stat`]).
//!
//! * [`wire`]: packet checks, TTL, ICMP errors (pure, unit-tested).
//! * [`peers`]: the routing table, swapped atomically on reconcile.
//! * [`proxy`]: the two forwarding tasks.
//! * [`mmsg`]: their batched socket calls, with UDP segmentation and receive coalescing.
//! * [`coalesce`]: TCP runs written to the TUN as one segmentation-offload packet.
//! * [`segment`]: segmentation-offload packets read from the TUN cut into packets.
//! * [`tun`]: the device.
//!
//! The device is not persistent: it and its route go when flanneld exits (as upstream's).
//! A deleted `flannel0` or a stopped proxy task is re-created by the next reconcile.

pub mod coalesce;
pub mod mmsg;
pub mod peers;
pub mod proxy;
pub mod segment;
pub mod stats;
pub mod tun;
pub mod wire;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::sync::Arc;

use async_trait::async_trait;
use ipnet::Ipv4Net;
use serde_json::{json, Map, Value};
use tokio::task::JoinHandle;
use tracing::{debug, info, warn};

use super::routes::RTPROT_FLANNEL;
use super::{Backend, BackendError, BackendInfo};
use crate::config::{get_ci, NetworkConfig};
use crate::health::LiveReport;
use crate::netlink::{ExternalInterface, Netlink};
use crate::subnet::{Lease, PeerSet};
use peers::{PeerRoute, PeerTable, SharedPeers};
use stats::Counters;

/// Upstream's default `Port`.
pub const DEFAULT_PORT: u16 = 8285;
/// The TUN name template; the kernel picks the number (normally `flannel0`).
const TUN_TEMPLATE: &str = "flannel%d";

/// `flannel0`'s queue length (packets waiting for the proxy to read them).
const TUN_QUEUE_LEN: u32 = 10_000;
/// The UDP socket's send and receive buffers.
const SOCKET_BUFFER: libc::c_int = 4 << 20;

/// `setsockopt(SOL_SOCKET, opt, bytes)` (the `*FORCE` options pass `rmem_max`/`wmem_max`,
/// which a node agent with CAP_NET_ADMIN may).
fn set_buffer(socket: &UdpSocket, opt: libc::c_int, bytes: libc::c_int) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: passes a valid c_int and its size for a SOL_SOCKET option of an open socket.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads `Port` from the raw `Backend` object.
pub fn parse_port(backend: &Value) -> Result<u16, BackendError> {
    let empty = Map::new();
    let obj = backend.as_object().unwrap_or(&empty);
    match get_ci(obj, "Port") {
        None | Some(Value::Null) => Ok(DEFAULT_PORT),
        Some(v) => v
            .as_u64()
            .filter(|p| (1..=u64::from(u16::MAX)).contains(p))
            .map(|p| p as u16)
            .ok_or_else(|| BackendError::Option {
                option: "Port",
                value: v.to_string(),
                expected: "expected a UDP port from 1 to 65535 (default 8285), the same on every node".into(),
            }),
    }
}

/// The udp backend.
#[derive(Debug)]
pub struct UdpBackend {
    /// The IPv4 cluster network: the route via the TUN covers it.
    network: Ipv4Net,
    /// `Port`.
    port: u16,
    /// Opened in `prepare`.
    nl: Option<Netlink>,
    /// The TUN MTU: the underlay's less 28.
    mtu: u32,
    /// The socket bound to `IfaceAddr:Port` in `prepare`.
    socket: Option<Arc<UdpSocket>>,
    /// The TUN opened in `prepare`, until the proxy takes it.
    tun: Option<tun::Tun>,
    /// Our lease subnet, once known.
    own: Option<Ipv4Net>,
    /// The running proxy.
    running: Option<Running>,
    /// The routing table the proxy reads.
    peers: Arc<SharedPeers>,
    /// The proxy's counters.
    counters: Arc<Counters>,
    /// How many times the proxy was (re)started.
    starts: u64,
}

/// A running proxy and its device.
#[derive(Debug)]
struct Running {
    /// The TUN's name.
    dev: String,
    /// Its index when it was created; another index under the same name is not ours.
    index: u32,
    /// The two forwarding tasks.
    tasks: [JoinHandle<String>; 2],
}

/// The counters as `/status/datapath` and `/metrics` read them.
#[derive(Debug)]
struct Live(Arc<Counters>);

impl LiveReport for Live {
    fn json(&self) -> Value {
        self.0.json()
    }
    fn render(&self, out: &mut String) {
        self.0.render(out)
    }
}

fn kernel(op: &'static str, object: impl Into<String>, e: impl ToString) -> BackendError {
    BackendError::Kernel {
        op,
        object: object.into(),
        detail: e.to_string(),
    }
}

impl UdpBackend {
    /// A udp backend for `config` (IPv4 only, as upstream's).
    pub fn new(config: &NetworkConfig) -> Result<Self, BackendError> {
        let port = parse_port(&config.backend)?;
        if config.enable_ipv6 {
            return Err(BackendError::Unsupported(
                "the udp backend carries IPv4 only (as upstream's): set EnableIPv6 to false, or use vxlan or host-gw for dual stack".into(),
            ));
        }
        let network = config
            .enable_ipv4
            .then_some(config.network)
            .flatten()
            .ok_or_else(|| BackendError::Unsupported("the udp backend needs an IPv4 Network".into()))?;
        Ok(UdpBackend {
            network,
            port,
            nl: None,
            mtu: 0,
            socket: None,
            tun: None,
            own: None,
            running: None,
            peers: Arc::new(SharedPeers::default()),
            counters: Arc::new(Counters::default()),
            starts: 0,
        })
    }

    fn nl(&self) -> Result<&Netlink, BackendError> {
        self.nl
            .as_ref()
            .ok_or_else(|| BackendError::Unsupported("udp: used before prepare".into()))
    }

    /// Opens a new TUN device.
    fn open_tun() -> Result<tun::Tun, BackendError> {
        let tun = tun::Tun::create(TUN_TEMPLATE).map_err(|e| {
            BackendError::Unsupported(format!(
                "udp backend: cannot create a TUN device from /dev/net/tun: {e}; the udp backend needs the tun \
                 module and CAP_NET_ADMIN (in a container: /dev/net/tun mounted)"
            ))
        })?;
        // Optional: without it every packet is read on its own, which is correct, only slower.
        if let Err(e) = tun.enable_tso() {
            debug!(error = %e, "udp: no TCP segmentation offload on the TUN; reading packet by packet");
        }
        Ok(tun)
    }

    /// Sets the device's MTU, address and up state and the route for the network via it;
    /// each step is idempotent, so this also repairs what someone changed.
    async fn configure(&self, dev: &str, index: u32, own: Ipv4Net, fresh: bool) -> Result<(), BackendError> {
        let nl = self.nl()?;
        let link = nl
            .link_by_name(dev)
            .await
            .map_err(|e| kernel("get link", dev, e))?
            .ok_or_else(|| kernel("get link", dev, "gone"))?;
        // The queue length is set with the MTU on a new device (LinkDetails does not carry
        // it). The kernel's 500 overflowed in the bench (1.6 % of a TCP stream dropped on
        // flannel0's TX while the proxy was off-CPU); a deeper queue absorbs those gaps.
        // Only on change: a set_link would be a link event, which wakes the reconcile.
        if fresh || link.mtu != self.mtu {
            nl.set_link_mtu(index, self.mtu, TUN_QUEUE_LEN)
                .await
                .map_err(|e| kernel("set mtu", dev, e))?;
        }
        nl.add_address(index, own.network().into(), 32)
            .await
            .map_err(|e| kernel("add address", dev, e))?;
        if !link.up {
            nl.set_link_up(index).await.map_err(|e| kernel("set up", dev, e))?;
        }
        nl.replace_device_route(self.network, index, RTPROT_FLANNEL)
            .await
            .map_err(|e| kernel("replace route", format!("{} dev {dev}", self.network), e))
    }

    /// Starts the proxy on `tun` (opening a new device if `None`).
    async fn start(&mut self, tun: Option<tun::Tun>) -> Result<(), BackendError> {
        let own = self
            .own
            .ok_or_else(|| BackendError::Unsupported("udp: started before the lease".into()))?;
        let socket = self
            .socket
            .clone()
            .ok_or_else(|| BackendError::Unsupported("udp: started before prepare".into()))?;
        let tun = match tun {
            Some(t) => t,
            None => Self::open_tun()?,
        };
        let dev = tun.name().to_string();
        let index = self
            .nl()?
            .link_by_name(&dev)
            .await
            .map_err(|e| kernel("get link", dev.as_str(), e))?
            .ok_or_else(|| kernel("get link", dev.as_str(), "gone right after creation"))?
            .index;
        self.configure(&dev, index, own, true).await?;
        let tasks = proxy::spawn(proxy::ProxyParams {
            tun,
            socket,
            port: self.port,
            own_ip: own.network(),
            peers: self.peers.clone(),
            counters: self.counters.clone(),
        })
        .map_err(|e| kernel("register", format!("{dev} and the UDP socket"), e))?;
        self.starts += 1;
        info!(dev = %dev, mtu = self.mtu, port = self.port, network = %self.network, "udp proxy running");
        self.running = Some(Running { dev, index, tasks });
        Ok(())
    }

    /// Whether the proxy runs on a device that is still ours; says why not.
    async fn check_running(&mut self) -> Result<Option<String>, BackendError> {
        let Some(r) = &self.running else {
            return Ok(Some("not started".into()));
        };
        if r.tasks.iter().any(JoinHandle::is_finished) {
            let mut why = String::new();
            if let Some(r) = self.running.take() {
                for t in r.tasks {
                    t.abort();
                    if let Ok(Ok(s)) = tokio::time::timeout(std::time::Duration::from_millis(100), t).await {
                        why = s;
                    }
                }
            }
            return Ok(Some(format!("a forwarding task stopped: {why}")));
        }
        let link = self
            .nl()?
            .link_by_name(&r.dev)
            .await
            .map_err(|e| kernel("get link", r.dev.as_str(), e))?;
        if link.as_ref().map(|l| l.index) != Some(r.index) {
            if let Some(r) = self.running.take() {
                r.tasks.iter().for_each(JoinHandle::abort);
            }
            return Ok(Some("the TUN device was deleted".into()));
        }
        Ok(None)
    }
}

#[async_trait]
impl Backend for UdpBackend {
    fn name(&self) -> &'static str {
        "udp"
    }

    async fn prepare(&mut self, ext: &ExternalInterface, _config: &NetworkConfig) -> Result<BackendInfo, BackendError> {
        let addr = ext
            .iface_addr
            .ok_or_else(|| BackendError::Unsupported(format!("udp: interface {} has no IPv4 address", ext.name)))?;
        self.mtu = ext.mtu.saturating_sub(wire::OVERHEAD);
        if self.mtu < 576 {
            return Err(BackendError::Unsupported(format!(
                "udp: interface {} has MTU {}, too small to carry IPv4 after 28 bytes of UDP/IP",
                ext.name, ext.mtu
            )));
        }
        // Upstream binds IfaceAddr:Port; so do we (peers send to our PublicIP, which is
        // IfaceAddr unless NAT maps it there).
        let bind = SocketAddrV4::new(addr, self.port);
        let socket = UdpSocket::bind(bind).map_err(|e| {
            BackendError::Unsupported(format!(
                "udp: cannot bind UDP {bind}: {e}; is another flanneld (or anything else) using port {}?",
                self.port
            ))
        })?;
        socket
            .set_nonblocking(true)
            .map_err(|e| kernel("set non-blocking", format!("UDP socket {bind}"), e))?;
        // A burst the proxy has not drained yet must not overflow the default ~200 KiB
        // buffers: every datagram lost there is a TCP retransmission for a pod.
        for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
            if let Err(e) = set_buffer(&socket, opt, SOCKET_BUFFER) {
                warn!(error = %e, "udp: cannot enlarge the socket buffers; bursts may be dropped");
            }
        }
        // Coalesced receive: optional, the proxy cuts what it gets either way.
        if let Err(e) = mmsg::enable_gro(std::os::fd::AsRawFd::as_raw_fd(&socket)) {
            debug!(error = %e, "udp: no UDP_GRO on this kernel; receiving datagram by datagram");
        }
        self.socket = Some(Arc::new(socket));
        self.nl = Some(Netlink::new().map_err(|e| kernel("open", "rtnetlink socket", e))?);
        self.tun = Some(Self::open_tun()?);
        Ok(BackendInfo {
            // Upstream's udp backend writes no BackendType and no BackendData.
            backend_type: String::new(),
            backend_data: None,
            backend_v6_data: None,
            mtu: self.mtu,
        })
    }

    async fn set_own_lease(&mut self, lease: &Lease) -> Result<(), BackendError> {
        let own = lease
            .subnet
            .ok_or_else(|| BackendError::Unsupported("udp: the lease has no IPv4 subnet".into()))?;
        self.own = Some(own);
        let tun = self.tun.take();
        self.start(tun).await
    }

    /// Swaps in the routing table for `peers` (every lease, whatever its BackendType, as
    /// upstream's udp backend does), and repairs the device, its route or the proxy.
    async fn reconcile(&mut self, peers: &PeerSet) -> Result<usize, BackendError> {
        if let Some(why) = self.check_running().await? {
            warn!(reason = %why, "udp proxy not running; starting it again");
            self.start(None).await?;
        } else if let Some(r) = &self.running {
            let (dev, index, own) = (r.dev.clone(), r.index, self.own.unwrap_or_default());
            self.configure(&dev, index, own, false).await?;
        }
        let routes: Vec<PeerRoute> = peers
            .leases
            .values()
            .filter_map(|l| {
                Some(PeerRoute {
                    subnet: l.subnet?,
                    public_ip: l.attrs.public_ip,
                })
            })
            .filter(|r| !r.public_ip.is_unspecified() && r.public_ip != Ipv4Addr::BROADCAST)
            .collect();
        let n = routes.len();
        let old = self.peers.load();
        if old.routes() != routes.as_slice() {
            debug!(peers = n, "udp routing table updated");
            self.peers.store(PeerTable::new(routes));
        }
        Ok(n)
    }

    fn status(&self) -> Value {
        let routes: Vec<Value> = self
            .peers
            .load()
            .routes()
            .iter()
            .map(|r| json!({"subnet": r.subnet.to_string(), "public_ip": r.public_ip.to_string()}))
            .collect();
        json!({
            "datapath": "udp",
            "requested": "udp",
            "reason": "userspace proxy over a TUN device",
            "udp": {
                "device": self.running.as_ref().map(|r| r.dev.clone()),
                "mtu": self.mtu,
                "port": self.port,
                "network": self.network.to_string(),
                "proxy_starts": self.starts,
                "routes": routes,
            },
        })
    }

    fn live_report(&self) -> Option<Arc<dyn LiveReport>> {
        Some(Arc::new(Live(self.counters.clone())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_option() {
        assert_eq!(parse_port(&json!({"Type": "udp"})).unwrap(), 8285);
        assert_eq!(parse_port(&json!({"Type": "udp", "port": 7890})).unwrap(), 7890);
        assert_eq!(parse_port(&Value::Null).unwrap(), 8285);
        for bad in [json!(0), json!(65536), json!("8285"), json!(-1)] {
            let e = parse_port(&json!({"Port": bad})).unwrap_err();
            assert!(e.to_string().contains("Port"), "{e}");
        }
    }
}
