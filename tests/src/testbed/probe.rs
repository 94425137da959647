//! Traffic probes between namespaces: ICMP with the system `ping`, a TCP echo exchange with
//! sockets opened from threads inside the namespaces, a tiny HTTP GET (for `/readyz`), and a
//! connectivity matrix over a set of endpoints.

use std::fmt;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;

use super::netns;

/// How many times [`ping`] tries before it reports a failure: the first packet may wait for
/// ARP/ND on every hop.
const PING_ATTEMPTS: u32 = 3;
/// Bytes [`tcp_check`] sends and expects back: several segments, so it catches an MTU that
/// only lets small packets through.
const TCP_PAYLOAD: usize = 16 * 1024;
/// Bound on every step of a TCP exchange (connect, accept, each read and write).
const TCP_STEP_TIMEOUT: Duration = Duration::from_secs(3);
/// How many probes of a matrix run at once; more only contends on two cores.
const MATRIX_PARALLELISM: usize = 8;

/// Something traffic can be sent to and from: a namespace and an address in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Label in matrices and messages (a pod name, `n1`, `outside`).
    pub name: String,
    /// The network namespace traffic leaves from.
    pub netns: String,
    /// The address others reach it at.
    pub ip: IpAddr,
}

/// Pings `to` from inside `netns` (`ping -c 1 -W 1`, a few attempts). True if a reply came.
pub async fn ping(netns: &str, to: IpAddr) -> bool {
    ping_attempts(netns, to, PING_ATTEMPTS).await
}

/// [`ping`] with a chosen number of attempts of one second each; one is enough to show that
/// something is *not* reachable once it was shown that the path works.
pub async fn ping_attempts(netns: &str, to: IpAddr, attempts: u32) -> bool {
    let to = to.to_string();
    for _ in 0..attempts {
        let args = ["netns", "exec", netns, "ping", "-n", "-q", "-c", "1", "-W", "1", &to];
        if let Ok(out) = netns::output("ip", &args, None, Duration::from_secs(5)).await {
            if out.status.success() {
                return true;
            }
        }
    }
    false
}

/// Opens a TCP connection from `src_netns` to a listener bound to `dst_ip` inside `dst_netns`,
/// sends 16 KiB and checks that the same bytes come back.
pub async fn tcp_check(src_netns: &str, dst_netns: &str, dst_ip: IpAddr) -> anyhow::Result<()> {
    echo_check(src_netns, dst_netns, SocketAddr::new(dst_ip, 0), move |port| {
        SocketAddr::new(dst_ip, port)
    })
    .await
}

/// [`tcp_check`] through a destination NAT, as a connection to a Kubernetes service: the
/// echo listens on `listen` inside `dst_netns`, and the client in `src_netns` connects to
/// `connect`, an address some DNAT rule on the path maps to `listen`.
pub async fn tcp_check_nat(
    src_netns: &str,
    dst_netns: &str,
    listen: SocketAddr,
    connect: SocketAddr,
) -> anyhow::Result<()> {
    echo_check(src_netns, dst_netns, listen, move |_| connect).await
}

/// The TCP echo exchange of [`tcp_check`]: the listener is bound to `bind` in `dst_netns`, and
/// the client connects to `target(port the listener got)`.
async fn echo_check(
    src_netns: &str,
    dst_netns: &str,
    bind: SocketAddr,
    target: impl FnOnce(u16) -> SocketAddr + Send + 'static,
) -> anyhow::Result<()> {
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = netns::in_netns(dst_netns, 4 * TCP_STEP_TIMEOUT, move || {
        let listener = TcpListener::bind(bind).with_context(|| format!("binding a listener to {bind}"))?;
        let _ = port_tx.send(listener.local_addr()?.port());
        echo_one(&listener)
    });
    let client = async {
        let port = port_rx.await.context("the listener was not set up")?;
        let target = target(port);
        netns::in_netns(src_netns, 4 * TCP_STEP_TIMEOUT, move || exchange(target)).await
    };
    match tokio::join!(client, server) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(client), Ok(())) => Err(client),
        (Ok(()), Err(server)) => Err(server.context("echo server")),
        // Both: the client's error says what went wrong on the path, the server's whether a
        // connection arrived at all.
        (Err(client), Err(server)) => Err(client.context(format!("echo server: {server:#}"))),
    }
}

/// Sends `datagrams` UDP datagrams of 1 KB from `src_netns` to an echo bound to `dst_ip` inside
/// `dst_netns`, one at a time; every one must come back unchanged.
pub async fn udp_check(src_netns: &str, dst_netns: &str, dst_ip: IpAddr, datagrams: u32) -> anyhow::Result<()> {
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = netns::in_netns(dst_netns, 4 * TCP_STEP_TIMEOUT, move || {
        let sock = UdpSocket::bind((dst_ip, 0)).with_context(|| format!("binding a UDP echo to {dst_ip}"))?;
        let _ = port_tx.send(sock.local_addr()?.port());
        sock.set_read_timeout(Some(TCP_STEP_TIMEOUT))?;
        let mut buf = [0u8; 2048];
        for _ in 0..datagrams {
            let (n, peer) = sock.recv_from(&mut buf).context("waiting for a datagram")?;
            sock.send_to(&buf[..n], peer)?;
        }
        Ok(())
    });
    let client = async {
        let port = port_rx.await.context("the UDP echo was not set up")?;
        netns::in_netns(src_netns, 4 * TCP_STEP_TIMEOUT, move || {
            let sock = UdpSocket::bind((if dst_ip.is_ipv4() { "0.0.0.0" } else { "::" }, 0))?;
            sock.connect((dst_ip, port))?;
            sock.set_read_timeout(Some(TCP_STEP_TIMEOUT))?;
            let mut buf = [0u8; 2048];
            for i in 0..datagrams {
                let msg = [i.to_be_bytes().as_slice(), &[7u8; 1000]].concat();
                sock.send(&msg)?;
                let n = sock
                    .recv(&mut buf)
                    .with_context(|| format!("datagram {i} to {dst_ip}:{port}"))?;
                anyhow::ensure!(buf[..n] == msg[..], "datagram {i} came back different");
            }
            Ok(())
        })
        .await
    };
    match tokio::join!(client, server) {
        (Ok(()), Ok(())) => Ok(()),
        (Err(client), Ok(())) => Err(client),
        (Ok(()), Err(server)) => Err(server.context("UDP echo")),
        (Err(client), Err(server)) => Err(client.context(format!("UDP echo: {server:#}"))),
    }
}

/// Opens a TCP connection from `src_netns` to a listener bound to `dst_ip` inside `dst_netns`
/// and returns the source address the listener saw: the client's own address, or the one a
/// NAT on the path (masquerading) replaced it with.
pub async fn tcp_source_seen(src_netns: &str, dst_netns: &str, dst_ip: IpAddr) -> anyhow::Result<SocketAddr> {
    let (port_tx, port_rx) = tokio::sync::oneshot::channel();
    let server = netns::in_netns(dst_netns, 4 * TCP_STEP_TIMEOUT, move || {
        let listener = TcpListener::bind((dst_ip, 0)).with_context(|| format!("binding a listener to {dst_ip}"))?;
        let _ = port_tx.send(listener.local_addr()?.port());
        let conn = accept_one(&listener)?;
        conn.peer_addr().context("reading the peer address")
    });
    let client = async {
        let port = port_rx.await.context("the listener was not set up")?;
        let target = SocketAddr::new(dst_ip, port);
        netns::in_netns(src_netns, 4 * TCP_STEP_TIMEOUT, move || {
            let mut conn = TcpStream::connect_timeout(&target, TCP_STEP_TIMEOUT)
                .with_context(|| format!("connecting to {target}"))?;
            conn.write_all(b"hello")
                .with_context(|| format!("sending to {target}"))?;
            Ok(())
        })
        .await
    };
    let (client, server) = tokio::join!(client, server);
    match (client, server) {
        (Ok(()), Ok(seen)) => Ok(seen),
        (Err(client), Ok(_)) => Err(client),
        (Ok(()), Err(server)) => Err(server.context("listener")),
        (Err(client), Err(server)) => Err(client.context(format!("listener: {server:#}"))),
    }
}

/// Accepts one connection, polling so that a client that never comes cannot hang us.
fn accept_one(listener: &TcpListener) -> anyhow::Result<TcpStream> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + 2 * TCP_STEP_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((conn, _)) => return Ok(conn),
            Err(e) if e.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => bail!("nobody connected within {:?}", 2 * TCP_STEP_TIMEOUT),
            Err(e) => return Err(e).context("accepting"),
        }
    }
}

/// Accepts one connection and echoes until the client closes its side.
fn echo_one(listener: &TcpListener) -> anyhow::Result<()> {
    let mut conn = accept_one(listener)?;
    conn.set_nonblocking(false)?;
    conn.set_read_timeout(Some(TCP_STEP_TIMEOUT))?;
    conn.set_write_timeout(Some(TCP_STEP_TIMEOUT))?;
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).context("echo server reading")?;
        if n == 0 {
            return Ok(());
        }
        conn.write_all(&buf[..n]).context("echo server writing")?;
    }
}

fn exchange(target: SocketAddr) -> anyhow::Result<()> {
    let mut conn =
        TcpStream::connect_timeout(&target, TCP_STEP_TIMEOUT).with_context(|| format!("connecting to {target}"))?;
    conn.set_read_timeout(Some(TCP_STEP_TIMEOUT))?;
    conn.set_write_timeout(Some(TCP_STEP_TIMEOUT))?;
    let payload: Vec<u8> = (0..TCP_PAYLOAD).map(|i| (i % 251) as u8).collect();
    // 16 KiB fits in the socket buffers of both ends, so writing it all before reading the
    // echo cannot deadlock.
    conn.write_all(&payload)
        .with_context(|| format!("sending to {target}"))?;
    conn.shutdown(std::net::Shutdown::Write)?;
    let mut echoed = Vec::with_capacity(TCP_PAYLOAD);
    conn.read_to_end(&mut echoed).with_context(|| {
        format!(
            "reading the echo from {target} ({} of {TCP_PAYLOAD} bytes came back)",
            echoed.len()
        )
    })?;
    if echoed != payload {
        bail!(
            "{target} echoed {} bytes that differ from the {TCP_PAYLOAD} sent",
            echoed.len()
        );
    }
    Ok(())
}

/// A tiny HTTP/1.1 GET of `path` on `addr`, from inside `netns`. Returns the status code and
/// the body. Enough for flanneld's health endpoints; no redirects, no TLS.
pub async fn http_get(netns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let response = netns::in_netns(netns, Duration::from_secs(5), move || {
        let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(1))
            .with_context(|| format!("connecting to {addr}"))?;
        conn.set_read_timeout(Some(Duration::from_secs(2)))?;
        conn.set_write_timeout(Some(Duration::from_secs(2)))?;
        conn.write_all(request.as_bytes())?;
        let mut response = Vec::new();
        conn.read_to_end(&mut response)
            .with_context(|| format!("reading the response from {addr}"))?;
        Ok(response)
    })
    .await?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("not an HTTP response from {addr}: {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// The outcome of probing one ordered pair.
#[derive(Debug, Clone)]
pub struct Cell {
    /// Whether the source got an ICMP echo reply from the destination address.
    pub icmp: bool,
    /// The TCP echo exchange: `Ok` or why it failed.
    pub tcp: Result<(), String>,
}

impl Cell {
    /// Both probes passed.
    pub fn ok(&self) -> bool {
        self.icmp && self.tcp.is_ok()
    }
}

/// Results of probing every ordered pair of a set of endpoints. Print it to see a table.
#[derive(Debug, Clone)]
pub struct Matrix {
    /// The endpoints, in row (source) and column (destination) order.
    pub endpoints: Vec<Endpoint>,
    /// `cells[from][to]`; `None` on the diagonal, which is not probed.
    pub cells: Vec<Vec<Option<Cell>>>,
}

impl Matrix {
    /// Probes every ordered pair of distinct endpoints with [`ping`] and [`tcp_check`].
    pub async fn probe(endpoints: &[Endpoint]) -> Self {
        let n = endpoints.len();
        let pairs = (0..n).flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)));
        let results: Vec<(usize, usize, Cell)> = futures::stream::iter(pairs)
            .map(|(i, j)| async move {
                let (from, to) = (&endpoints[i], &endpoints[j]);
                let icmp = ping(&from.netns, to.ip).await;
                let tcp = tcp_check(&from.netns, &to.netns, to.ip)
                    .await
                    .map_err(|e| format!("{e:#}"));
                (i, j, Cell { icmp, tcp })
            })
            .buffer_unordered(MATRIX_PARALLELISM)
            .collect()
            .await;
        let mut cells = vec![vec![None; n]; n];
        for (i, j, cell) in results {
            cells[i][j] = Some(cell);
        }
        Self {
            endpoints: endpoints.to_vec(),
            cells,
        }
    }

    /// Every probed pair passed both probes.
    pub fn is_full(&self) -> bool {
        self.cells.iter().flatten().flatten().all(Cell::ok)
    }

    /// One line per failing pair: `a1 -> b2 (10.244.2.3): ICMP ✗, TCP ✗ (why)`.
    pub fn failures(&self) -> Vec<String> {
        let mut out = Vec::new();
        for (i, row) in self.cells.iter().enumerate() {
            for (j, cell) in row.iter().enumerate() {
                let Some(cell) = cell.as_ref().filter(|c| !c.ok()) else {
                    continue;
                };
                let (from, to) = (&self.endpoints[i], &self.endpoints[j]);
                let tcp = match &cell.tcp {
                    Ok(()) => "✓".to_owned(),
                    Err(why) => format!("✗ ({why})"),
                };
                out.push(format!(
                    "{} -> {} ({}): ICMP {}, TCP {tcp}",
                    from.name,
                    to.name,
                    to.ip,
                    mark(cell.icmp)
                ));
            }
        }
        out
    }

    /// Panics, showing the table and every failing pair, unless every pair passed.
    #[track_caller]
    pub fn assert_full(&self) {
        if !self.is_full() {
            panic!(
                "connectivity matrix is not full:\n{self}\nfailing pairs:\n  {}",
                self.failures().join("\n  ")
            );
        }
    }
}

/// Top-left cell of the table.
const CORNER: &str = "from\\to";

fn mark(ok: bool) -> &'static str {
    if ok {
        "✓"
    } else {
        "✗"
    }
}

impl fmt::Display for Matrix {
    /// Rows are sources, columns destinations; each cell is `<ICMP><TCP>`, e.g. `✓✗`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self
            .endpoints
            .iter()
            .map(|e| e.name.chars().count())
            .max()
            .unwrap_or(0)
            .max(CORNER.len());
        writeln!(f, "{:width$}  (rows ping/connect to columns; cell = ICMP TCP)", "")?;
        write!(f, "{CORNER:width$}")?;
        for e in &self.endpoints {
            write!(f, "  {:>width$}", e.name)?;
        }
        writeln!(f)?;
        for (i, row) in self.cells.iter().enumerate() {
            write!(f, "{:width$}", self.endpoints[i].name)?;
            for cell in row {
                let text = match cell {
                    None => "-".to_owned(),
                    Some(c) => format!("{}{}", mark(c.icmp), mark(c.tcp.is_ok())),
                };
                write!(f, "  {text:>width$}")?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(name: &str) -> Endpoint {
        Endpoint {
            name: name.into(),
            netns: format!("ns-{name}"),
            ip: "10.0.0.1".parse().unwrap(),
        }
    }

    #[test]
    fn prints_a_table_and_lists_failures() {
        let ok = Cell {
            icmp: true,
            tcp: Ok(()),
        };
        let bad = Cell {
            icmp: false,
            tcp: Err("connect timed out".into()),
        };
        let matrix = Matrix {
            endpoints: vec![endpoint("a1"), endpoint("b1")],
            cells: vec![vec![None, Some(ok)], vec![Some(bad), None]],
        };
        assert!(!matrix.is_full());
        let table = matrix.to_string();
        assert!(table.contains("✓✓") && table.contains("✗✗"), "{table}");
        assert_eq!(
            matrix.failures(),
            vec!["b1 -> a1 (10.0.0.1): ICMP ✗, TCP ✗ (connect timed out)"]
        );
        let panic = std::panic::catch_unwind(|| matrix.assert_full()).unwrap_err();
        let msg = panic.downcast_ref::<String>().unwrap();
        assert!(msg.contains("b1 -> a1"), "{msg}");
    }
}
