//! [`EtcdServer`]: a real, single-member etcd on loopback for integration tests.
//!
//! Each server gets free ports, its own temporary directory (data, logs, certificates) and a
//! unique member name, so tests can run in parallel. It can serve TLS with client-certificate
//! checks and enable user/password auth, and it can be stopped and restarted on the same ports
//! with the same data, which is what "etcd goes away and comes back" tests need.
//!
//! The process is a [`ChildGuard`]: dropping the server (also during a panic) kills etcd and
//! removes the directory, and etcd dies with the test binary even if no destructor runs.
//!
//! With [`EtcdOptions::in_netns`] etcd runs inside a network namespace (the testbed's fabric)
//! and listens on an address there, where the processes under test connect directly
//! ([`EtcdServer::netns_endpoint`]); the test process reaches it through a loopback
//! forwarder, so [`EtcdServer::endpoint`] and every helper work unchanged.
//!
//! Everything that talks to etcd or waits for it is async and needs a tokio runtime with
//! timers (any `#[tokio::test]`). The data helpers use the admin (root) identity, so they work
//! on any key whether or not auth is enabled.
//!
//! ```no_run
//! # async fn example() -> anyhow::Result<()> {
//! use flannel_tests::etcd::{EtcdOptions, EtcdServer, DEFAULT_PREFIX, FLANNEL_USER, FLANNEL_PASSWORD};
//!
//! let mut etcd = EtcdServer::start(EtcdOptions::default().with_tls().with_auth(DEFAULT_PREFIX)).await?;
//! let tls = etcd.tls().expect("started with TLS");
//! // Hand etcd.endpoint(), tls.ca, tls.client_cert, tls.client_key, FLANNEL_USER and
//! // FLANNEL_PASSWORD to the code under test, then:
//! etcd.put("/coreos.com/network/config", r#"{"Network":"10.5.0.0/16"}"#).await?;
//! etcd.stop().await?; // etcd is away...
//! tokio::time::sleep(std::time::Duration::from_secs(30)).await;
//! etcd.restart().await?; // ...and back on the same port with the same data
//! # Ok(())
//! # }
//! ```

mod certs;

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use etcd_client::{Client, CompactionOptions, ConnectOptions, GetOptions, Permission};
use tempfile::TempDir;

pub use self::certs::{TlsFiles, CLIENT_CERT_CN};
use crate::process::ChildGuard;
use crate::testbed::netns::TcpForwarder;

/// The etcd superuser, created when auth is enabled.
pub const ROOT_USER: &str = "root";
/// Password of [`ROOT_USER`].
pub const ROOT_PASSWORD: &str = "root-test-password";
/// The unprivileged user for flanneld, created when auth is enabled; it may read and write
/// only keys under the configured prefix.
pub const FLANNEL_USER: &str = "flannel";
/// Password of [`FLANNEL_USER`].
pub const FLANNEL_PASSWORD: &str = "flannel-test-password";
/// Role granted to [`FLANNEL_USER`].
pub const FLANNEL_ROLE: &str = "flannel";
/// flannel's default etcd prefix, a sensible value for [`EtcdOptions::with_auth`].
pub const DEFAULT_PREFIX: &str = "/coreos.com/network/";

/// How long a single request of the helpers may take before we call etcd unreachable.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a graceful stop may take before etcd is killed.
const STOP_GRACE: Duration = Duration::from_secs(10);
/// How many times `start` picks new ports when another process took the ones it chose.
const PORT_ATTEMPTS: u32 = 3;
/// Client and peer ports inside a namespace of etcd's own, where nothing else listens.
const NETNS_CLIENT_PORT: u16 = 2379;
const NETNS_PEER_PORT: u16 = 2380;

/// Makes member names unique among the servers of one test binary; the pid makes them
/// unique across binaries.
static NEXT_ID: AtomicU32 = AtomicU32::new(0);

/// What kind of etcd [`EtcdServer::start`] runs. The default is plain HTTP, no auth and no
/// automatic compaction.
#[derive(Debug, Clone)]
pub struct EtcdOptions {
    /// Serve clients over HTTPS and require a client certificate signed by the generated CA.
    pub tls: bool,
    /// Enable auth: [`ROOT_USER`] plus [`FLANNEL_USER`], who may read and write keys under
    /// this prefix only.
    pub auth_prefix: Option<String>,
    /// Automatic compaction; off by default so that tests compact when they choose to.
    pub auto_compaction: Option<AutoCompaction>,
    /// How long etcd may take to start serving, at start and at each restart.
    pub start_timeout: Duration,
    /// Run etcd inside this network namespace instead of the test's own.
    pub netns: Option<EtcdNetns>,
}

/// Where a namespaced etcd runs: see [`EtcdOptions::in_netns`].
#[derive(Debug, Clone)]
pub struct EtcdNetns {
    /// Name of the network namespace (as in `ip netns`); it must exist, with `lo` up.
    pub name: String,
    /// The address etcd listens on for clients (port 2379), and that the TLS server
    /// certificate is valid for.
    pub ip: IpAddr,
}

impl Default for EtcdOptions {
    fn default() -> Self {
        Self {
            tls: false,
            auth_prefix: None,
            auto_compaction: None,
            // A fresh member is normally ready in well under a second; the slack is for a
            // loaded two-core CI machine that is compiling at the same time.
            start_timeout: Duration::from_secs(10),
            netns: None,
        }
    }
}

impl EtcdOptions {
    /// Serve TLS and require client certificates.
    pub fn with_tls(mut self) -> Self {
        self.tls = true;
        self
    }

    /// Enable auth, letting [`FLANNEL_USER`] use keys under `prefix`.
    pub fn with_auth(mut self, prefix: &str) -> Self {
        self.auth_prefix = Some(prefix.to_owned());
        self
    }

    /// Run etcd with `ip netns exec <netns>`, listening on `ip:2379` (peers on 127.0.0.1:2380
    /// of that namespace). One such etcd per namespace.
    pub fn in_netns(mut self, netns: &str, ip: IpAddr) -> Self {
        self.netns = Some(EtcdNetns {
            name: netns.to_owned(),
            ip,
        });
        self
    }

    /// Turn on etcd's automatic compaction.
    pub fn with_auto_compaction(mut self, compaction: AutoCompaction) -> Self {
        self.auto_compaction = Some(compaction);
        self
    }
}

/// etcd's `--auto-compaction-mode` with its retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AutoCompaction {
    /// Keep history for this long (`--auto-compaction-mode=periodic`).
    Periodic(Duration),
    /// Keep this many revisions (`--auto-compaction-mode=revision`).
    Revision(u64),
}

/// A running (or stopped) etcd member owned by a test. See the module docs.
pub struct EtcdServer {
    /// The current or last etcd process; `None` only while the first start is in progress.
    /// Declared before `dir` so etcd is dead before its directory is removed.
    process: Option<ChildGuard>,
    /// Member name, unique per server.
    name: String,
    /// Loopback port for clients; kept across restarts.
    client_port: u16,
    /// Loopback port for peers (there are none, but etcd always listens); kept across restarts.
    peer_port: u16,
    /// What was asked for.
    options: EtcdOptions,
    /// Certificate paths when serving TLS.
    tls: Option<TlsFiles>,
    /// Whether auth is on, so connections must log in as root.
    auth_enabled: bool,
    /// Counts starts, to name each start's log files.
    starts: u32,
    /// Admin client reused by the helpers; dropped whenever etcd stops so a restart gets a
    /// fresh connection and token.
    client: Mutex<Option<Client>>,
    /// With [`EtcdOptions::in_netns`]: how the test process reaches etcd.
    forwarder: Option<TcpForwarder>,
    /// Holds `data/`, the logs and the certificates; removed on drop.
    dir: TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it serves requests (and, with auth, until users and roles
    /// are set up and auth is on).
    ///
    /// Fails after [`EtcdOptions::start_timeout`], with the tail of etcd's output, if etcd
    /// does not come up.
    pub async fn start(options: EtcdOptions) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("flannel-test-etcd-")
            .tempdir()
            .context("creating a temporary directory for etcd")?;
        let tls = if options.tls {
            let extra_ips: Vec<IpAddr> = options.netns.iter().map(|n| n.ip).collect();
            Some(TlsFiles::generate_for(dir.path(), &extra_ips)?)
        } else {
            None
        };
        let name = format!(
            "flannel-test-{}-{}",
            std::process::id(),
            NEXT_ID.fetch_add(1, Ordering::Relaxed)
        );
        let mut server = Self {
            process: None,
            name,
            client_port: 0,
            peer_port: 0,
            options,
            tls,
            auth_enabled: false,
            starts: 0,
            client: Mutex::new(None),
            forwarder: None,
            dir,
        };

        if let Some(netns) = server.options.netns.clone() {
            // A namespace of its own has its ports free, so there is no race to retry.
            (server.client_port, server.peer_port) = (NETNS_CLIENT_PORT, NETNS_PEER_PORT);
            let target = SocketAddr::new(netns.ip, NETNS_CLIENT_PORT);
            server.forwarder = Some(TcpForwarder::start(&netns.name, target)?);
            server.launch().await?;
        } else {
            // Ports are found by binding port 0 and letting go, so another process can grab
            // one before etcd binds it; then etcd exits at once and we try again with new ones.
            for attempt in 1..=PORT_ATTEMPTS {
                (server.client_port, server.peer_port) = free_port_pair()?;
                match server.launch().await {
                    Ok(()) => break,
                    Err(e) if attempt < PORT_ATTEMPTS && server.lost_port_race() => {
                        eprintln!("etcd harness: ports taken, retrying ({e:#})");
                        // A member that got far enough to write its data dir has recorded the
                        // old peer URL in it; start from scratch.
                        let _ = std::fs::remove_dir_all(server.data_dir());
                    }
                    Err(e) => return Err(e),
                }
            }
        }

        if let Some(prefix) = server.options.auth_prefix.clone() {
            server.enable_auth(&prefix).await?;
        }
        Ok(server)
    }

    /// The URL clients connect to, e.g. `http://127.0.0.1:40123` (or `https://` with TLS).
    /// For an etcd in a namespace, this is the test process's forwarder.
    pub fn endpoint(&self) -> String {
        let port = self
            .forwarder
            .as_ref()
            .map_or(self.client_port, |f| f.local_addr().port());
        format!("{}://127.0.0.1:{port}", self.scheme())
    }

    /// For an etcd in a namespace ([`EtcdOptions::in_netns`]): the URL processes inside that
    /// namespace, or routed to it, connect to, e.g. `http://198.18.0.254:2379`.
    pub fn netns_endpoint(&self) -> Option<String> {
        let netns = self.options.netns.as_ref()?;
        Some(format!(
            "{}://{}",
            self.scheme(),
            SocketAddr::new(netns.ip, self.client_port)
        ))
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }

    /// The member name (`--name`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// etcd's data directory (`--data-dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Certificate paths, when started with TLS.
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    /// The prefix [`FLANNEL_USER`] may use, when started with auth.
    pub fn auth_prefix(&self) -> Option<&str> {
        self.options.auth_prefix.as_deref()
    }

    /// Whether the etcd process is running.
    pub fn is_running(&mut self) -> bool {
        self.process.as_mut().is_some_and(ChildGuard::is_running)
    }

    /// Process id of the current (or last) etcd process.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(ChildGuard::id)
    }

    /// The last lines of etcd's output, for assertion messages.
    pub fn log_tail(&self, lines: usize) -> String {
        self.process.as_ref().map_or_else(String::new, |p| p.log_tail(lines))
    }

    /// etcd-client TLS options presenting the client certificate, when started with TLS.
    pub fn tls_options(&self) -> anyhow::Result<Option<etcd_client::TlsOptions>> {
        self.tls.as_ref().map(TlsFiles::client_tls_options).transpose()
    }

    /// Options for an admin connection: the client certificate with TLS, root with auth.
    pub fn connect_options(&self) -> anyhow::Result<ConnectOptions> {
        let mut options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // Simple tokens die with the etcd process; this lets a client outlive a restart.
            .with_auto_token_refresh(true);
        if let Some(tls) = self.tls_options()? {
            options = options.with_tls(tls);
        }
        if self.auth_enabled {
            options = options.with_user(ROOT_USER, ROOT_PASSWORD);
        }
        Ok(options)
    }

    /// An admin client (see [`Self::connect_options`]), shared with the helpers until etcd
    /// stops. Cloning it is cheap.
    pub async fn client(&self) -> anyhow::Result<Client> {
        if let Some(client) = self.client.lock().expect("client cache poisoned").clone() {
            return Ok(client);
        }
        let client = self.connect(self.connect_options()?).await?;
        *self.client.lock().expect("client cache poisoned") = Some(client.clone());
        Ok(client)
    }

    /// Connects to this server with the given options, failing after a timeout rather than
    /// waiting for a server that is down.
    pub async fn connect(&self, options: ConnectOptions) -> anyhow::Result<Client> {
        let endpoint = self.endpoint();
        self.timed("connect", Client::connect([endpoint.as_str()], Some(options)))
            .await
    }

    /// Stops etcd with SIGTERM and waits for it to exit (SIGKILL after 10 s).
    /// Stopping a stopped server does nothing.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        self.forget_client();
        if let Some(process) = self.process.as_mut() {
            process.terminate(STOP_GRACE).await?;
        }
        Ok(())
    }

    /// Kills etcd with SIGKILL, as a crash would.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        self.forget_client();
        if let Some(process) = self.process.as_mut() {
            process.kill()?;
        }
        Ok(())
    }

    /// Stops etcd if it runs, then starts it again on the same ports with the same data and
    /// waits until it serves. Clients that keep retrying reconnect by themselves.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.stop().await?;
        self.launch().await.with_context(|| {
            if self.lost_port_race() {
                format!(
                    "restarting etcd: another process took port {} or {}",
                    self.client_port, self.peer_port
                )
            } else {
                "restarting etcd".to_owned()
            }
        })
    }

    /// Writes `key`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: &str) -> anyhow::Result<i64> {
        let mut client = self.client().await?;
        let response = self.timed("put", client.put(key, value, None)).await?;
        header_revision(response.header())
    }

    /// Reads `key`.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<String>> {
        let mut client = self.client().await?;
        let response = self.timed("get", client.get(key, None)).await?;
        response
            .kvs()
            .first()
            .map(|kv| Ok(kv.value_str()?.to_owned()))
            .transpose()
    }

    /// Reads every key under `prefix`, sorted by key.
    pub async fn get_prefix(&self, prefix: &str) -> anyhow::Result<Vec<(String, String)>> {
        let mut client = self.client().await?;
        let response = self
            .timed("get", client.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        // etcd returns a range in key order already.
        response
            .kvs()
            .iter()
            .map(|kv| Ok((kv.key_str()?.to_owned(), kv.value_str()?.to_owned())))
            .collect()
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: &str) -> anyhow::Result<i64> {
        let mut client = self.client().await?;
        let response = self.timed("delete", client.delete(key, None)).await?;
        Ok(response.deleted())
    }

    /// The current revision of the key-value store.
    pub async fn revision(&self) -> anyhow::Result<i64> {
        let mut client = self.client().await?;
        let options = GetOptions::new().with_count_only();
        let response = self.timed("get", client.get("/", Some(options))).await?;
        header_revision(response.header())
    }

    /// Compacts history up to `revision` and waits until the compaction is applied, so that
    /// watches and reads at older revisions fail with "required revision has been compacted".
    pub async fn compact(&self, revision: i64) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let options = CompactionOptions::new().with_physical();
        self.timed("compact", client.compact(revision, Some(options))).await?;
        Ok(())
    }

    /// Starts the etcd process and waits until it answers a linearizable read.
    async fn launch(&mut self) -> anyhow::Result<()> {
        self.forget_client();
        self.starts += 1;
        let command = self.command();
        let process = ChildGuard::spawn_in(&format!("etcd.{}", self.starts), command, self.dir.path())
            .context("starting etcd; the `etcd` binary (Debian package etcd-server) must be on PATH")?;
        self.process = Some(process);
        self.wait_until_serving().await
    }

    fn command(&self) -> Command {
        let client_url = self.netns_endpoint().unwrap_or_else(|| self.endpoint());
        let peer_url = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = match &self.options.netns {
            Some(netns) => {
                let mut cmd = Command::new("ip");
                cmd.args(["netns", "exec", &netns.name, "etcd"]);
                cmd
            }
            None => Command::new("etcd"),
        };
        cmd.arg("--name")
            .arg(&self.name)
            .arg("--data-dir")
            .arg(self.data_dir())
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args(["--initial-cluster", &format!("{}={peer_url}", self.name)])
            .args(["--initial-cluster-state", "new", "--initial-cluster-token", &self.name])
            // A lone member still waits one election timeout before it leads; the defaults
            // (100 ms / 1 s) would add a second to every start and restart.
            .args(["--heartbeat-interval", "10", "--election-timeout", "100"])
            // The default bcrypt cost makes each login take ~100 ms of CPU.
            .args(["--bcrypt-cost", "4"])
            // 3.4 logs through capnslog unless told otherwise, and warns that it is deprecated.
            .args(["--logger", "zap", "--log-outputs", "stderr"]);
        match self.options.auto_compaction {
            None => cmd.args(["--auto-compaction-retention", "0"]),
            Some(AutoCompaction::Periodic(keep)) => cmd.args([
                "--auto-compaction-mode",
                "periodic",
                "--auto-compaction-retention",
                &format!("{}ms", keep.as_millis()),
            ]),
            Some(AutoCompaction::Revision(keep)) => cmd.args([
                "--auto-compaction-mode",
                "revision",
                "--auto-compaction-retention",
                &keep.to_string(),
            ]),
        };
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        cmd
    }

    /// Polls with a linearizable read (which needs an elected leader, unlike a bare TCP
    /// connect) until it succeeds, etcd exits, or the start timeout passes.
    async fn wait_until_serving(&mut self) -> anyhow::Result<()> {
        let timeout = self.options.start_timeout;
        let deadline = Instant::now() + timeout;
        let mut last_error = anyhow!("no attempt made");
        loop {
            let process = self.process.as_mut().expect("launch sets the process");
            if let Some(status) = process.try_wait()? {
                bail!(
                    "etcd exited ({status}) before serving on {}\n{}",
                    self.endpoint(),
                    self.log_tail(30)
                );
            }
            let remaining = deadline.saturating_duration_since(Instant::now());
            match self.probe(remaining.min(Duration::from_secs(1))).await {
                Ok(client) => {
                    *self.client.lock().expect("client cache poisoned") = Some(client);
                    return Ok(());
                }
                Err(e) => last_error = e,
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd did not serve on {} within {timeout:?}; last error: {last_error:#}\n{}",
                    self.endpoint(),
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn probe(&self, timeout: Duration) -> anyhow::Result<Client> {
        let options = self.connect_options()?.with_connect_timeout(Duration::from_millis(500));
        let endpoint = self.endpoint();
        let attempt = async {
            let mut client = Client::connect([endpoint.as_str()], Some(options)).await?;
            client.get("health", Some(GetOptions::new().with_count_only())).await?;
            Ok::<_, etcd_client::Error>(client)
        };
        Ok(tokio::time::timeout(timeout, attempt)
            .await
            .context("probe timed out")??)
    }

    /// Creates root and the flannel user and role, then turns auth on.
    async fn enable_auth(&mut self, prefix: &str) -> anyhow::Result<()> {
        let mut client = self.client().await?;
        let steps = async {
            client.user_add(ROOT_USER, ROOT_PASSWORD, None).await?;
            // etcd 3.4 refuses to enable auth unless root also has the built-in "root" role,
            // which has to be added by hand (etcdctl's `auth enable` quietly does the same).
            client.role_add("root").await?;
            client.user_grant_role(ROOT_USER, "root").await?;
            client.role_add(FLANNEL_ROLE).await?;
            client
                .role_grant_permission(FLANNEL_ROLE, Permission::read_write(prefix).with_prefix())
                .await?;
            client.user_add(FLANNEL_USER, FLANNEL_PASSWORD, None).await?;
            client.user_grant_role(FLANNEL_USER, FLANNEL_ROLE).await?;
            client.auth_enable().await?;
            Ok::<_, etcd_client::Error>(())
        };
        self.timed("set up auth", steps).await?;
        self.auth_enabled = true;
        // The cached client has no token and would now be refused.
        self.forget_client();
        Ok(())
    }

    /// Whether the last start failed because a port was taken.
    fn lost_port_race(&self) -> bool {
        self.process
            .as_ref()
            .is_some_and(|p| p.stderr().contains("address already in use"))
    }

    fn forget_client(&self) {
        self.client.lock().expect("client cache poisoned").take();
    }

    /// Runs an etcd request with a deadline, so a stopped etcd gives an error, not a hang.
    async fn timed<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
            Ok(result) => result.with_context(|| format!("etcd {what} on {}", self.endpoint())),
            Err(_) => Err(anyhow!(
                "etcd {what} on {} got no answer within {REQUEST_TIMEOUT:?}; is etcd stopped?",
                self.endpoint()
            )),
        }
    }
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer")
            .field("name", &self.name)
            .field("endpoint", &self.endpoint())
            .field("dir", &self.dir.path())
            .field("process", &self.process)
            .field("auth_enabled", &self.auth_enabled)
            .finish()
    }
}

/// Two distinct free loopback ports. Both listeners are held until both ports are known, so
/// the kernel cannot hand out the same port twice.
fn free_port_pair() -> anyhow::Result<(u16, u16)> {
    let a = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    let b = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("finding a free port")?;
    Ok((a.local_addr()?.port(), b.local_addr()?.port()))
}

fn header_revision(header: Option<&etcd_client::ResponseHeader>) -> anyhow::Result<i64> {
    header
        .map(etcd_client::ResponseHeader::revision)
        .context("etcd sent a response without a header")
}
