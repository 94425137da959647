//! Network namespace plumbing: named namespaces (`ip netns`), commands run inside them,
//! threads that enter them, and a TCP forwarder that lets the test process reach a service
//! that listens only inside a namespace.
//!
//! Threads, not processes, enter namespaces: `setns(CLONE_NEWNET)` changes the network
//! namespace of the calling thread only, and every socket remembers the namespace it was
//! created in. So a fresh thread that enters a namespace, opens its sockets and exits is all
//! a probe needs, and the rest of the test process stays where it was. Such threads are never
//! pooled threads (tokio's blocking pool would hand the namespace on to unrelated work).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use tokio::io::AsyncWriteExt;

/// Where `ip netns add` bind-mounts named namespaces.
pub const NETNS_RUN_DIR: &str = "/run/netns";

/// Bound on one `ip` invocation; they take milliseconds, so this only catches a hang.
const IP_TIMEOUT: Duration = Duration::from_secs(10);

/// The bind mount that names `netns`.
pub fn netns_path(netns: &str) -> PathBuf {
    Path::new(NETNS_RUN_DIR).join(netns)
}

/// Moves the calling thread into the named network namespace.
fn enter(netns: &str) -> anyhow::Result<()> {
    let path = netns_path(netns);
    let file = File::open(&path).with_context(|| format!("opening network namespace {}", path.display()))?;
    // SAFETY: setns(2) takes a valid open descriptor, which `file` holds for the whole call.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("entering network namespace {netns}"));
    }
    Ok(())
}

/// Runs `f` on a new thread inside `netns` and returns its result, blocking the caller.
///
/// `f` must bound its own waits (socket timeouts): the caller waits for it to finish.
pub fn in_netns_blocking<T, F>(netns: &str, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let netns = netns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            enter(&netns)?;
            f()
        })
        .context("spawning a namespace thread")?
        .join()
        .map_err(|_| anyhow!("a thread inside a network namespace panicked"))?
}

/// Runs `f` on a new thread inside `netns` without blocking the async caller, failing
/// after `timeout`. A thread that overruns is left to finish on its own.
pub async fn in_netns<T, F>(netns: &str, timeout: Duration, f: F) -> anyhow::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> anyhow::Result<T> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let name = netns.to_owned();
    std::thread::Builder::new()
        .name(format!("netns-{netns}"))
        .spawn(move || {
            let result = enter(&name).and_then(|()| f());
            let _ = tx.send(result);
        })
        .context("spawning a namespace thread")?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => bail!("a thread inside network namespace {netns} panicked"),
        Err(_) => bail!("work inside network namespace {netns} did not finish within {timeout:?}"),
    }
}

/// Runs `program args...`, feeding it `stdin`, and returns its output whatever the exit
/// status. The child is killed if it runs longer than `timeout`.
pub async fn output(program: &str, args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> anyhow::Result<Output> {
    output_with_env(program, args, &[], stdin, timeout).await
}

/// [`output`] with extra environment variables.
pub async fn output_with_env(
    program: &str,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let shown = describe(program, args);
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = cmd.spawn().with_context(|| format!("spawning `{shown}`"))?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Small inputs only (CNI configs): they fit in the pipe, so writing before reading
        // the output cannot deadlock.
        pipe.write_all(input)
            .await
            .with_context(|| format!("writing stdin of `{shown}`"))?;
    }
    match tokio::time::timeout(timeout, child.wait_with_output()).await {
        Ok(result) => result.with_context(|| format!("waiting for `{shown}`")),
        // Dropping the future drops the child, which kill_on_drop kills.
        Err(_) => bail!("`{shown}` did not finish within {timeout:?}"),
    }
}

/// Like [`output`], but a non-zero exit is an error carrying the command's stderr.
pub async fn run(program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let out = output(program, args, None, timeout).await?;
    check(program, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `ip -n <netns> args...`, checked.
pub async fn ip(netns: &str, args: &[&str]) -> anyhow::Result<String> {
    let mut full = vec!["-n", netns];
    full.extend_from_slice(args);
    run("ip", &full, IP_TIMEOUT).await
}

/// Creates a named network namespace (`ip netns add`).
pub async fn add(netns: &str) -> anyhow::Result<()> {
    run("ip", &["netns", "add", netns], IP_TIMEOUT)
        .await
        .map(drop)
        .context("creating a network namespace; is iproute2 installed and are we root?")
}

/// Synchronous, checked command for teardown paths (`Drop`, signal handler), where there
/// may be no runtime. Bounded like the async helpers.
pub fn run_blocking(program: &str, args: &[&str], timeout: Duration) -> anyhow::Result<String> {
    let shown = describe(program, args);
    let child = std::process::Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning `{shown}`"))?;
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(timeout) {
        Ok(result) => result.with_context(|| format!("waiting for `{shown}`"))?,
        Err(_) => {
            // The waiting thread has not reaped the child (it would have sent its output),
            // so the pid is still ours.
            if let Ok(pid) = libc::pid_t::try_from(pid) {
                // SAFETY: kill(2) has no memory-safety preconditions.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            bail!("`{shown}` did not finish within {timeout:?}");
        }
    };
    check(program, args, &out)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Turns a non-zero exit into an error that shows the command and its output.
pub fn check(program: &str, args: &[&str], out: &Output) -> anyhow::Result<()> {
    if out.status.success() {
        return Ok(());
    }
    bail!(
        "`{}` failed ({}): {}{}",
        describe(program, args),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim(),
        String::from_utf8_lossy(&out.stdout).trim()
    )
}

fn describe(program: &str, args: &[&str]) -> String {
    std::iter::once(program)
        .chain(args.iter().copied())
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names of all named network namespaces (entries of `/run/netns`).
pub fn list() -> Vec<String> {
    std::fs::read_dir(NETNS_RUN_DIR)
        .map(|dir| {
            dir.filter_map(Result::ok)
                .filter_map(|e| e.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// A TCP forwarder from a loopback port of the test process's own namespace to an address
/// reachable only inside another namespace.
///
/// The harness uses it to talk to an etcd that listens on the fabric address of a testbed
/// while the agents under test connect to that address directly, with no proxy in their path.
/// Every accepted connection is paired with one made from a thread inside the target
/// namespace; two threads copy the bytes. Dropping the forwarder stops accepting and shuts
/// down every open pair, so no thread or socket outlives it for long.
pub struct TcpForwarder {
    /// The loopback address clients connect to.
    local: SocketAddr,
    /// Set on drop; the accept loop polls it.
    stop: Arc<AtomicBool>,
    /// Open pairs (client side, target side) by id, shut down on drop.
    conns: Arc<Mutex<HashMap<u64, (TcpStream, TcpStream)>>>,
    /// The accept loop, joined on drop.
    acceptor: Option<JoinHandle<()>>,
}

/// How often the accept loop checks whether it should stop.
const ACCEPT_POLL: Duration = Duration::from_millis(20);
/// Bound on connecting to the target; a refused connection fails at once anyway.
const FORWARD_CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

impl TcpForwarder {
    /// Listens on a free port of 127.0.0.1 and forwards every connection to `target` as seen
    /// from inside `netns`.
    pub fn start(netns: &str, target: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding the forwarder's port")?;
        // Non-blocking so the loop can notice `stop` without a wake-up connection.
        listener.set_nonblocking(true)?;
        let local = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let conns = Arc::new(Mutex::new(HashMap::new()));
        let acceptor = {
            let (stop, conns, netns) = (stop.clone(), conns.clone(), netns.to_owned());
            std::thread::Builder::new()
                .name(format!("forward-{}", local.port()))
                .spawn(move || accept_loop(&listener, &netns, target, &stop, &conns))
                .context("spawning the forwarder thread")?
        };
        Ok(Self {
            local,
            stop,
            conns,
            acceptor: Some(acceptor),
        })
    }

    /// The loopback address to connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }
}

impl Drop for TcpForwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        // Shutting both sockets down ends both copy threads of each pair promptly.
        for (client, upstream) in self.conns.lock().unwrap_or_else(|e| e.into_inner()).values() {
            let _ = client.shutdown(Shutdown::Both);
            let _ = upstream.shutdown(Shutdown::Both);
        }
    }
}

impl std::fmt::Debug for TcpForwarder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TcpForwarder").field("local", &self.local).finish()
    }
}

type Conns = Mutex<HashMap<u64, (TcpStream, TcpStream)>>;

fn accept_loop(listener: &TcpListener, netns: &str, target: SocketAddr, stop: &AtomicBool, conns: &Arc<Conns>) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(0);
    while !stop.load(Ordering::Relaxed) {
        match listener.accept() {
            Ok((client, _)) => {
                let id = NEXT_CONN.fetch_add(1, Ordering::Relaxed);
                let (netns, conns) = (netns.to_owned(), conns.clone());
                let spawned = std::thread::Builder::new()
                    .name(format!("forward-conn-{id}"))
                    .spawn(move || forward(id, client, &netns, target, &conns));
                if let Err(e) = spawned {
                    eprintln!("testbed forwarder: cannot spawn a connection thread: {e}");
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => std::thread::sleep(ACCEPT_POLL),
            Err(e) => {
                eprintln!("testbed forwarder: accept failed: {e}");
                std::thread::sleep(ACCEPT_POLL);
            }
        }
    }
}

/// Connects to `target` from inside `netns` and copies bytes both ways until both sides are
/// done. A failed connect closes the client's connection, which is what it would see without
/// the forwarder (a reset rather than a refusal, which clients treat alike).
fn forward(id: u64, client: TcpStream, netns: &str, target: SocketAddr, conns: &Conns) {
    let connected = enter(netns).and_then(|()| {
        TcpStream::connect_timeout(&target, FORWARD_CONNECT_TIMEOUT)
            .with_context(|| format!("connecting to {target} in {netns}"))
    });
    let Ok(upstream) = connected else { return };
    let _ = client.set_nonblocking(false);
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let clones = (|| Ok::<_, io::Error>((client.try_clone()?, upstream.try_clone()?, client.try_clone()?)))();
    let Ok((client_reader, upstream_writer, registered)) = clones else {
        return;
    };
    let Ok(upstream_registered) = upstream.try_clone() else {
        return;
    };
    conns
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id, (registered, upstream_registered));

    let up = std::thread::Builder::new()
        .name(format!("forward-up-{id}"))
        .spawn(move || copy_then_close(client_reader, upstream_writer));
    copy_then_close(upstream, client);
    if let Ok(up) = up {
        let _ = up.join();
    }
    conns.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
}

/// Copies until EOF or an error, then passes the EOF on.
fn copy_then_close(mut from: TcpStream, mut to: TcpStream) {
    let _ = io::copy(&mut from, &mut to);
    let _ = to.shutdown(Shutdown::Write);
    // The other direction may still be blocked reading from `from`'s peer; a reset or a
    // closed peer ends it too, so nothing more is needed here.
    let _ = from.shutdown(Shutdown::Read);
}
