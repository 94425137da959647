//! The agent's life: config, interface, backend, lease, `subnet.env`, then the
//! lease-keeping task and the reconcile loop until shutdown.
//!
//! Tasks once running (see ARCHITECTURE.md):
//! - the subnet manager's `run`: renews our lease and publishes the validated
//!   peers on a watch channel;
//! - the reconcile loop (here): converges the backend on the latest peers,
//!   whenever they change and every `reconcile_period`;
//! - the healthz server, when a port is given.
//!
//! On shutdown nothing is torn down: lease, devices and routes stay, so a
//! restart does not disturb traffic (as upstream).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::backend::{Backend, BackendError};
use crate::backoff::Backoff;
use crate::cni_install::{InstallFile, Installer};
use crate::config::NetworkConfig;
use crate::health::{self, Health};
use crate::netlink::{IfaceSelection, Netlink};
use crate::subnet::{LeaseAttrs, PeerSet, SubnetError, SubnetManager};
use crate::subnet_file::{self, SubnetEnv};
use crate::traffic::{RuleSet, TrafficError, TrafficManager, TrafficOptions};

/// What the daemon needs beyond the subnet manager and the backend.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// Where `subnet.env` is written (`--subnet-file`).
    pub subnet_file: PathBuf,
    /// `--ip-masq`, reported as `FLANNEL_IPMASQ`.
    pub ip_masq: bool,
    /// The healthz listen address, if enabled.
    pub healthz: Option<SocketAddr>,
    /// How the external interface is chosen; its address families are set
    /// from the network config once that is read.
    pub iface: IfaceSelection,
    /// Period of the full reconcile of the datapath.
    pub reconcile_period: Duration,
    /// Masquerade and forward rules; `nftables` is taken from net-conf.json.
    pub traffic: TrafficOptions,
    /// CNI files to keep installed on the host (`--cni-*-source`/`--cni-*-dest`).
    pub cni_install: Vec<InstallFile>,
}

/// Why the daemon stopped with an error. Each is fatal at start-up, as upstream.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The subnet manager failed in a way retrying cannot fix.
    #[error(transparent)]
    Subnet(#[from] SubnetError),
    /// The backend could not be created or prepared.
    #[error("error registering network: {0}")]
    Backend(#[from] BackendError),
    /// No usable external interface.
    #[error("failed to find any valid interface to use: {0}")]
    Iface(String),
    /// The healthz server could not bind.
    #[error(transparent)]
    Health(#[from] health::HealthError),
    /// Masquerade or forward rules could not be installed (upstream exits too).
    #[error("failed to set up masquerade/forward rules: {0}")]
    Traffic(#[from] TrafficError),
}

/// Builds the backend for a network config (chosen by `Backend.Type`).
pub type BackendFactory = dyn Fn(&NetworkConfig) -> Result<Box<dyn Backend>, BackendError> + Send + Sync;

/// Runs the agent until `shutdown` fires.
pub async fn run(
    cfg: DaemonConfig,
    sm: Arc<dyn SubnetManager>,
    make_backend: &BackendFactory,
    health: Arc<Health>,
    shutdown: CancellationToken,
) -> Result<(), DaemonError> {
    let started = Instant::now();
    let server = match cfg.healthz {
        Some(addr) => {
            let listener = health::bind(addr).await?;
            Some(tokio::spawn(health::serve(listener, health.clone(), shutdown.clone())))
        }
        None => None,
    };
    health.update(|s| {
        s.subnet_manager = sm.name().into();
        s.waiting_for = "network config".into();
    });

    let Some(config) = fetch_config(sm.as_ref(), &shutdown).await? else {
        return Ok(());
    };
    // What this node published before (kube: annotations): an operator-set public
    // IP replaces the flag before the interface is chosen, as upstream; the VTEP
    // MACs let a re-created device keep the MAC its peers know.
    let stored = sm.stored_node().await;
    let mut sel = cfg.iface.clone();
    sel.ipv4 = config.enable_ipv4;
    sel.ipv6 = config.enable_ipv6;
    if let Some(ip) = stored.public_ip {
        sel.public_ip = Some(ip);
    }
    if let Some(ip) = stored.public_ipv6 {
        sel.public_ipv6 = Some(ip);
    }
    let nl = Netlink::new().map_err(|e| DaemonError::Iface(e.to_string()))?;
    let ext = nl
        .select_external_interface(&sel)
        .await
        .map_err(|e| DaemonError::Iface(e.to_string()))?;
    info!(iface = %ext.name, addr = ?ext.iface_addr, ext_addr = ?ext.ext_addr, mtu = ext.mtu, "using interface");
    let mut backend = make_backend(&config)?;
    backend.use_stored(&stored);
    let info = backend.prepare(&ext, &config).await?;
    health.update(|s| s.backend = backend.name().into());
    health.set_datapath(backend.status());
    if let Some(live) = backend.live_report() {
        health.set_live(live);
    }

    let attrs = LeaseAttrs {
        public_ip: ext.ext_addr.unwrap_or(Ipv4Addr::UNSPECIFIED),
        public_ipv6: ext.ext_v6_addr,
        backend_type: info.backend_type.clone(),
        backend_data: info.backend_data.clone(),
        backend_v6_data: info.backend_v6_data.clone(),
    };
    let previous = subnet_file::read_previous(&cfg.subnet_file);
    // Read before subnet.env is rewritten: the old rules are recycled if the subnet changed.
    let previous_rules = RuleSet::read(&cfg.subnet_file);
    health.update(|s| s.waiting_for = "subnet lease".into());
    let Some(lease) = acquire(sm.as_ref(), &config, &attrs, previous, &shutdown).await? else {
        return Ok(());
    };
    info!(
        subnet = ?lease.subnet, ipv6_subnet = ?lease.ipv6_subnet, public_ip = %attrs.public_ip,
        elapsed_ms = started.elapsed().as_millis() as u64, "lease acquired"
    );
    backend.set_own_lease(&lease).await?;
    health.update(|s| {
        s.subnet = lease.subnet.map(|n| n.to_string());
        s.ipv6_subnet = lease.ipv6_subnet.map(|n| n.to_string());
        s.public_ip = Some(attrs.public_ip.to_string());
    });

    // Upstream's order: rules before subnet.env, so "ready" implies the rules are in place.
    let rules = RuleSet {
        network: config.enable_ipv4.then_some(config.network).flatten(),
        subnet: config.enable_ipv4.then_some(lease.subnet).flatten(),
        ipv6_network: config.enable_ipv6.then_some(config.ipv6_network).flatten(),
        ipv6_subnet: config.enable_ipv6.then_some(lease.ipv6_subnet).flatten(),
    };
    let traffic = Arc::new(TrafficManager::new(TrafficOptions {
        nftables: config.enable_nftables,
        ..cfg.traffic
    }));
    health.update(|s| s.waiting_for = "traffic rules".into());
    traffic.setup(&rules, &previous_rules).await?;
    let traffic_task = {
        let (traffic, rules, shutdown) = (traffic.clone(), rules, shutdown.clone());
        tokio::spawn(async move { traffic.run(&rules, shutdown).await })
    };

    let env = SubnetEnv {
        network: config.enable_ipv4.then_some(config.network).flatten(),
        subnet: config.enable_ipv4.then_some(lease.subnet).flatten(),
        ipv6_network: config.enable_ipv6.then_some(config.ipv6_network).flatten(),
        ipv6_subnet: config.enable_ipv6.then_some(lease.ipv6_subnet).flatten(),
        mtu: info.mtu,
        ipmasq: cfg.ip_masq,
    };
    let env_written = match env.write(&cfg.subnet_file) {
        Ok(()) => {
            info!(path = %cfg.subnet_file.display(), "wrote subnet file");
            true
        }
        Err(e) => {
            // As upstream: keep running (the datapath still works), never ready.
            error!(error = %e, "flanneld will not report ready");
            false
        }
    };

    // After subnet.env, as the init containers of the manifest run before the agent: the
    // plugin then finds the file at its first ADD.
    let installer = Arc::new(Installer::new(cfg.cni_install.clone()));
    let cni_task = (!installer.is_empty()).then(|| {
        let stamps = installer.install(&health.metrics);
        let (installer, metrics, shutdown) = (installer.clone(), health.metrics.clone(), shutdown.clone());
        tokio::spawn(installer.run(stamps, metrics, shutdown))
    });

    let (peers_tx, peers_rx) = watch::channel(PeerSet::default());
    let sm_task = {
        let (sm, config, lease, shutdown) = (sm.clone(), config.clone(), lease.clone(), shutdown.clone());
        tokio::spawn(async move { sm.run(config, lease, peers_tx, shutdown).await })
    };
    health.update(|s| s.waiting_for = "peers programmed".into());
    reconcile_loop(
        backend.as_mut(),
        peers_rx,
        &cfg,
        &health,
        Ready {
            env_written,
            installer: &installer,
        },
        started,
        &shutdown,
    )
    .await;
    if let Some(task) = cni_task {
        let _ = task.await;
    }

    match sm_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "subnet manager stopped"),
        Err(e) => error!(error = %e, "subnet manager task failed"),
    }
    let _ = traffic_task.await;
    if let Some(s) = server {
        let _ = tokio::time::timeout(Duration::from_secs(3), s).await;
    }
    info!("exiting cleanly; lease, devices and routes are left in place");
    Ok(())
}

/// Reads the network config, retrying every second while it is absent or the
/// store cannot be reached, as upstream does (an operator may write it after
/// starting the agents). A config that is there but invalid is fatal: upstream
/// retries forever and buries the reason in its log; exiting with one line that
/// names the field shows it where an operator looks.
async fn fetch_config(
    sm: &dyn SubnetManager,
    shutdown: &CancellationToken,
) -> Result<Option<NetworkConfig>, DaemonError> {
    loop {
        match sm.network_config().await {
            Ok(c) => {
                info!(network = ?c.network, ipv6_network = ?c.ipv6_network, backend = %c.backend_type, "network config");
                return Ok(Some(c));
            }
            Err(e @ SubnetError::Config { .. }) => return Err(e.into()),
            Err(e) => warn!(error = %e, "couldn't fetch network config; retrying in 1 s"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(None),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Acquires the lease, retrying store failures with backoff (upstream exits on
/// them); a config that cannot be served is fatal.
async fn acquire(
    sm: &dyn SubnetManager,
    config: &NetworkConfig,
    attrs: &LeaseAttrs,
    previous: crate::subnet::PreviousSubnets,
    shutdown: &CancellationToken,
) -> Result<Option<crate::subnet::Lease>, DaemonError> {
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        match sm.acquire_lease(config, attrs, previous).await {
            Ok(l) => return Ok(Some(l)),
            Err(e @ (SubnetError::Store { .. } | SubnetError::Contended(_))) => {
                let d = backoff.next_delay();
                warn!(error = %e, retry_in = ?d, "failed to acquire lease; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(None),
                    _ = tokio::time::sleep(d) => {}
                }
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// What readiness needs besides a reconciled datapath.
struct Ready<'a> {
    /// `subnet.env` was written.
    env_written: bool,
    /// The CNI files are installed (always, when there are none to install).
    installer: &'a Installer,
}

impl Ready<'_> {
    /// Whether the agent is ready, and what it waits for if not.
    fn check(&self) -> (bool, &'static str) {
        if !self.env_written {
            (false, "subnet file")
        } else if !self.installer.ok() {
            (false, "CNI files installed")
        } else {
            (true, "")
        }
    }
}

async fn reconcile_loop(
    backend: &mut dyn Backend,
    mut peers: watch::Receiver<PeerSet>,
    cfg: &DaemonConfig,
    health: &Health,
    ready: Ready<'_>,
    started: Instant,
    shutdown: &CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    // A deleted or changed device (ours, or the uplink) should not wait for the
    // periodic pass; without the subscription the periodic pass still repairs it.
    let mut links = match crate::netlink::link_events() {
        Ok(rx) => Some(rx),
        Err(e) => {
            warn!(error = %e, "cannot watch link changes; relying on the periodic reconcile");
            None
        }
    };
    let mut next_full = tokio::time::Instant::now() + cfg.reconcile_period;
    let mut retry_at: Option<tokio::time::Instant> = None;
    loop {
        let set = peers.borrow_and_update().clone();
        // Nothing to converge on until the subnet manager has read the store once.
        if set.complete {
            let began = Instant::now();
            match backend.reconcile(&set).await {
                Ok(n) => {
                    health.metrics.reconciled(began.elapsed());
                    health.set_datapath(backend.status());
                    backoff.reset();
                    retry_at = None;
                    let was_ready = health.status().ready;
                    let (is_ready, waiting_for) = ready.check();
                    health.update(|s| {
                        s.peers = n;
                        s.ready = is_ready;
                        s.waiting_for = waiting_for.into();
                    });
                    if is_ready && !was_ready {
                        info!(
                            peers = n,
                            elapsed_ms = started.elapsed().as_millis() as u64,
                            "flannel is ready"
                        );
                        sd_notify_ready();
                    }
                }
                Err(e) => {
                    health.metrics.reconcile_errors.fetch_add(1, Ordering::Relaxed);
                    let d = backoff.next_delay();
                    warn!(error = %e, retry_in = ?d, "reconciling the datapath failed; retrying");
                    retry_at = Some(tokio::time::Instant::now() + d);
                }
            }
        }
        let wake = retry_at.map_or(next_full, |r| r.min(next_full));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = peers.changed() => if r.is_err() { return },
            ev = async { match links.as_mut() { Some(rx) => rx.recv().await, None => std::future::pending().await } } => {
                match ev {
                    // Let a burst of link events (a device re-created with its
                    // addresses) settle, then reconcile once.
                    Some(_) => {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        while links.as_mut().is_some_and(|rx| rx.try_recv().is_ok()) {}
                    }
                    None => links = None,
                }
            }
            // The CNI files went missing or are back: readiness follows at the reconcile this
            // wakes (cheap when nothing else changed), not at the next periodic one.
            _ = ready.installer.flipped() => {}
            _ = tokio::time::sleep_until(wake) => {
                if tokio::time::Instant::now() >= next_full {
                    next_full = tokio::time::Instant::now() + cfg.reconcile_period;
                }
            }
        }
    }
}

/// Tells systemd we are ready (`READY=1` on `$NOTIFY_SOCKET`), as upstream does.
fn sd_notify_ready() {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(_) => return,
    };
    let bytes = path.as_encoded_bytes();
    let r = if let Some(abstract_name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &path)
    };
    if let Err(e) = r {
        warn!(error = %e, "failed to notify systemd the message READY=1");
    }
}
