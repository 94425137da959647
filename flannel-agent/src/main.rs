//! `flanneld`: parses the flags, builds the subnet manager and the backend, and
//! runs the daemon until SIGINT/SIGTERM.

use std::net::{IpAddr, SocketAddr};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use flannel_agent::backend::vxlan::EbpfSettings;
use flannel_agent::backend::{self, none::NoneBackend, Backend, BackendError};
use flannel_agent::cni_install::InstallFile;
use flannel_agent::config::NetworkConfig;
use flannel_agent::daemon::{self, DaemonConfig};
use flannel_agent::flags::{self, Flags, Invocation, LogFormat};
use flannel_agent::health::Health;
use flannel_agent::metrics::Metrics;
use flannel_agent::netlink::IfaceSelection;
use flannel_agent::subnet::etcd::{EtcdOptions, EtcdSubnetManager, DEFAULT_LEASE_TTL};
use flannel_agent::subnet::SubnetManager;
use flannel_agent::traffic::TrafficOptions;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// The version printed by `--version`: the crate version unless the build sets
/// `FLANNEL_VERSION` (release builds set it to the tag).
const VERSION: &str = match option_env!("FLANNEL_VERSION") {
    Some(v) => v,
    None => env!("CARGO_PKG_VERSION"),
};

fn main() -> ExitCode {
    let flags = match flags::parse() {
        Ok(Invocation::Run(f)) => f,
        Ok(Invocation::Help(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Ok(Invocation::Version) => {
            eprintln!("{VERSION}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("{e}");
            if e.exit_code() == 2 {
                eprint!("{}", flags::usage());
            }
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    init_logging(&flags);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(*flags)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(flags: &Flags) {
    // -v as klog's verbosity: 0 is info, 1..3 debug, 4 and up trace. RUST_LOG wins.
    let level = match flags.v {
        i32::MIN..=0 => "info",
        1..=3 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{level},h2=info,tower=info,hyper=info")));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    match flags.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn run(flags: Flags) -> anyhow::Result<()> {
    info!(version = VERSION, "flanneld starting");
    info!(flags = %flags.redacted_debug(), "CLI flags config");
    let shutdown = CancellationToken::new();
    tokio::spawn(watch_signals(shutdown.clone()));

    // Check the address flags before touching the store; families are set later.
    let iface = IfaceSelection::from_flags(&flags, true, false).context("invalid interface flags")?;
    let healthz = if flags.healthz_port > 0 {
        let ip: IpAddr = flags
            .healthz_ip
            .parse()
            .with_context(|| format!("invalid --healthz-ip {:?}: expected an IP address", flags.healthz_ip))?;
        Some(SocketAddr::new(ip, flags.healthz_port))
    } else {
        None
    };
    let metrics = Arc::new(Metrics::default());
    let health = Arc::new(Health::new(metrics.clone()));

    let sm = if flags.kube_subnet_mgr {
        flannel_agent::subnet::kube::from_flags(&flags, metrics.clone()).await?
    } else {
        let Some(sm) = connect_etcd(&flags, metrics.clone(), &shutdown).await else {
            return Ok(());
        };
        sm
    };
    let cfg = DaemonConfig {
        subnet_file: flags.subnet_file.clone(),
        ip_masq: flags.ip_masq,
        healthz,
        iface,
        reconcile_period: Duration::from_secs(10),
        traffic: TrafficOptions {
            masquerade: flags.ip_masq,
            fully_random_disable: flags.ip_masq_fully_random_disable,
            forward_rules: flags.iptables_forward_rules,
            nftables: false,
            resync: Duration::from_secs(flags.iptables_resync.max(1)),
        },
        cni_install: cni_install_files(&flags)?,
    };
    let ebpf = EbpfSettings {
        pin_dir: Some(flags.bpf_pin_dir.clone()),
        pretend_missing: pretend_missing()?,
        pods_masqueraded: !flags.ip_masq,
        pretend_no_nexthops: pretend_no_nexthops(),
    };
    let factory = move |config: &NetworkConfig| make_backend(config, &ebpf);
    daemon::run(cfg, sm, &factory, health, shutdown).await?;
    Ok(())
}

/// Connects to etcd, retrying every second: with auth the first request needs
/// etcd to answer, and upstream waits for the store at start-up too.
async fn connect_etcd(
    flags: &Flags,
    metrics: Arc<Metrics>,
    shutdown: &CancellationToken,
) -> Option<Arc<dyn SubnetManager>> {
    let opt = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let opts = EtcdOptions {
        endpoints: flags.etcd_endpoints.to_vec(),
        prefix: flags.etcd_prefix.clone(),
        keyfile: opt(&flags.etcd_keyfile).map(Into::into),
        certfile: opt(&flags.etcd_certfile).map(Into::into),
        cafile: opt(&flags.etcd_cafile).map(Into::into),
        username: opt(&flags.etcd_username),
        password: opt(flags.etcd_password.expose()),
        lease_ttl: DEFAULT_LEASE_TTL,
        renew_margin: Duration::from_secs(flags.subnet_lease_renew_margin.max(1) as u64 * 60),
        resync_period: Duration::from_secs(600),
    };
    loop {
        match EtcdSubnetManager::connect(opts.clone(), metrics.clone()).await {
            Ok(m) => return Some(Arc::new(m)),
            Err(e) => warn!(error = %e, "cannot connect to etcd; retrying in 1 s"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Test hook: `FLANNEL_EBPF_PRETEND_MISSING=<feature>` makes the eBPF probe report that
/// feature missing (`bpf`, `helpers`, `adjust-room-encap`, `adjust-room-decap`), to exercise
/// `Datapath: auto`'s fallback. Read here, once, with the rest of the configuration.
fn pretend_missing() -> anyhow::Result<Option<flannel_agent::dataplane::ProbeFeature>> {
    match std::env::var("FLANNEL_EBPF_PRETEND_MISSING") {
        Ok(v) if !v.is_empty() => {
            let feature = backend::vxlan::parse_probe_feature(&v)
                .map_err(|e| anyhow::anyhow!("FLANNEL_EBPF_PRETEND_MISSING: {e}"))?;
            warn!(feature = %feature, "test hook: the eBPF probe will report this feature missing");
            Ok(Some(feature))
        }
        _ => Ok(None),
    }
}

/// Test hook: `FLANNEL_PRETEND_NO_NEXTHOPS=1` makes the vxlan backend's nexthop probe fail,
/// to exercise the plain-route fallback of kernels before 5.3. Read here, once.
fn pretend_no_nexthops() -> bool {
    let set = std::env::var("FLANNEL_PRETEND_NO_NEXTHOPS").is_ok_and(|v| !v.is_empty() && v != "0");
    if set {
        warn!("test hook: the nexthop probe will fail; vxlan routes will be plain");
    }
    set
}

/// Builds the backend named by `Backend.Type`.
fn make_backend(config: &NetworkConfig, ebpf: &EbpfSettings) -> Result<Box<dyn Backend>, BackendError> {
    let ty = config.backend_type.as_str();
    if let Some(why) = backend::unsupported_reason(ty) {
        return Err(BackendError::Unsupported(format!("backend type {ty:?} {why}")));
    }
    match ty {
        "none" => Ok(Box::new(NoneBackend::default())),
        "vxlan" => Ok(Box::new(backend::vxlan::VxlanBackend::with_settings(
            config,
            ebpf.clone(),
        )?)),
        "host-gw" => Ok(Box::new(backend::hostgw::HostGwBackend::new(config)?)),
        "udp" => Ok(Box::new(backend::udp::UdpBackend::new(config)?)),
        _ => Err(BackendError::Unsupported(format!(
            "unknown backend type: {ty:?}; this build supports \"vxlan\", \"host-gw\", \"udp\" and \"none\""
        ))),
    }
}

/// First SIGINT/SIGTERM: graceful stop. Second: exit at once, as upstream
/// (its handler is unregistered after the first signal).
async fn watch_signals(shutdown: CancellationToken) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
        error!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    info!("shutting down");
    shutdown.cancel();
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    std::process::exit(130);
}

/// The CNI files to keep installed, from the `--cni-*-source`/`--cni-*-dest` pairs; a pair
/// with one side only is an error (it would silently install nothing).
fn cni_install_files(flags: &Flags) -> anyhow::Result<Vec<InstallFile>> {
    let pairs = [
        ("cni-plugin", &flags.cni_plugin_source, &flags.cni_plugin_dest, 0o755),
        ("cni-conf", &flags.cni_conf_source, &flags.cni_conf_dest, 0o644),
    ];
    let mut files = Vec::new();
    for (name, source, dest, mode) in pairs {
        match (source.as_os_str().is_empty(), dest.as_os_str().is_empty()) {
            (true, true) => {}
            (false, false) => files.push(InstallFile {
                source: source.clone(),
                dest: dest.clone(),
                mode,
            }),
            _ => anyhow::bail!("--{name}-source and --{name}-dest must be given together"),
        }
    }
    Ok(files)
}
