//! A tiny HTTP/1.1 GET for the agent's healthz server: enough for `/status`, and no
//! dependency on an HTTP client crate for a one-shot CLI.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

use serde_json::Value;

/// How long one request may take; the agent answers from memory.
const TIMEOUT: Duration = Duration::from_secs(3);

/// Why the agent could not be asked.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// The address does not resolve.
    #[error("resolve the agent address {addr}; pass --healthz HOST:PORT")]
    Resolve {
        /// What was given.
        addr: String,
    },
    /// Connecting, sending or reading failed.
    #[error(
        "ask the agent at {addr} for {path}: {source}; is flanneld running with --healthz-port \
         (and is --healthz right)?"
    )]
    Io {
        /// The address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// The socket error.
        #[source]
        source: std::io::Error,
    },
    /// The answer was not a 200 with a JSON body.
    #[error("the agent at {addr} answered {path} with {detail}")]
    Response {
        /// The address.
        addr: SocketAddr,
        /// The path asked for.
        path: String,
        /// What was wrong.
        detail: String,
    },
}

/// GETs `path` from `addr` and parses the body as JSON.
pub fn get_json(addr: &str, path: &str) -> Result<Value, HttpError> {
    let sock = addr
        .to_socket_addrs()
        .ok()
        .and_then(|mut a| a.next())
        .ok_or_else(|| HttpError::Resolve { addr: addr.to_owned() })?;
    let io = |source| HttpError::Io {
        addr: sock,
        path: path.to_owned(),
        source,
    };
    let mut conn = TcpStream::connect_timeout(&sock, TIMEOUT).map_err(io)?;
    conn.set_read_timeout(Some(TIMEOUT)).map_err(io)?;
    conn.set_write_timeout(Some(TIMEOUT)).map_err(io)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {sock}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).map_err(io)?;
    let mut raw = Vec::new();
    conn.read_to_end(&mut raw).map_err(io)?;
    let bad = |detail: String| HttpError::Response {
        addr: sock,
        path: path.to_owned(),
        detail,
    };
    let text = String::from_utf8_lossy(&raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| bad("an incomplete HTTP response".into()))?;
    let status = head.split_whitespace().nth(1).unwrap_or("?");
    if status != "200" {
        return Err(bad(format!("status {status}")));
    }
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.to_ascii_lowercase().contains("chunked")
    });
    let body = if chunked { dechunk(body) } else { body.to_owned() };
    serde_json::from_str(&body).map_err(|e| bad(format!("a body that is not JSON ({e})")))
}

/// Joins the chunks of a chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks() {
        assert_eq!(dechunk("4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n"), "{\"a\":1}");
    }
}
