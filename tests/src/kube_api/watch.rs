//! Node watches: `GET /api/v1/nodes?watch=1&resourceVersion=N`, streamed as JSON lines.
//!
//! From `resourceVersion` N the stream replays the retained events after N, then follows live
//! ones; with no resourceVersion (or 0) it starts with a synthetic ADDED per node, as the API
//! server does. N older than the retained history gives one `ERROR` event with a 410 Status,
//! and so does a watcher that falls too far behind. The stream ends after `timeoutSeconds`,
//! when the client goes away, or when the emulator becomes unavailable.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use serde_json::{json, Value};
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::counters::Meter;
use super::http::{field_selector_name, name_of, to_metadata, Body, Query, Shared};
use super::store::{ApiError, NodeEvent};

/// How a watch renders and filters its events.
#[derive(Debug, Clone)]
struct Shape {
    metadata_only: bool,
    name: Option<String>,
}

impl Shape {
    fn line(&self, kind: &str, obj: &Value) -> Option<Bytes> {
        if self.name.as_deref().is_some_and(|n| n != name_of(obj)) {
            return None;
        }
        let object = if self.metadata_only {
            to_metadata(obj)
        } else {
            obj.clone()
        };
        let mut s = json!({"type": kind, "object": object}).to_string();
        s.push('\n');
        Some(Bytes::from(s))
    }

    fn bookmark(&self, rv: u64) -> Bytes {
        let (kind, api_version) = if self.metadata_only {
            ("PartialObjectMetadata", "meta.k8s.io/v1")
        } else {
            ("Node", "v1")
        };
        let obj = json!({"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": rv.to_string()}});
        Bytes::from(format!("{}\n", json!({"type": "BOOKMARK", "object": obj})))
    }
}

fn error_line(e: &ApiError) -> Bytes {
    Bytes::from(format!("{}\n", json!({"type": "ERROR", "object": e.status()})))
}

/// Starts a watch and returns the streaming response.
pub fn start(
    shared: &Arc<Shared>,
    q: &Query,
    metadata_only: bool,
    meter: Meter,
    cancel: CancellationToken,
) -> Result<Response<Body>, ApiError> {
    let shape = Shape {
        metadata_only,
        name: field_selector_name(q)?,
    };
    let deadline = q
        .number("timeoutSeconds")?
        .filter(|t| *t > 0)
        .map(|t| Instant::now() + Duration::from_secs(t));
    let bookmarks = if q.flag("allowWatchBookmarks") {
        *shared.bookmark_period.lock().unwrap_or_else(|p| p.into_inner())
    } else {
        None
    };
    let rv = q.number("resourceVersion")?;
    let mut first: Vec<Bytes> = Vec::new();
    let (events, last_rv) = {
        let store = shared.store();
        match rv {
            None | Some(0) => {
                first.extend(store.nodes().filter_map(|n| shape.line("ADDED", n)));
                (Some(store.subscribe()), store.resource_version())
            }
            Some(n) => match store.watch_from(n) {
                Ok((past, rx)) => {
                    let last = past.last().map_or(n, |e| e.rv);
                    first.extend(past.iter().filter_map(|e| shape.line(e.kind.as_str(), &e.object)));
                    (Some(rx), last)
                }
                Err(e) => {
                    first.push(error_line(&e));
                    (None, n)
                }
            },
        }
    };
    let (tx, rx) = mpsc::channel::<Bytes>(256);
    tokio::spawn(pump(tx, events, first, last_rv, shape, deadline, bookmarks, cancel));
    let stream = futures::stream::unfold((rx, meter), |(mut rx, meter)| async move {
        let b = rx.recv().await?;
        // Counted as the connection takes it, so a client that reads slowly is not credited
        // with bytes still queued.
        meter.add(b.len());
        Some((Ok::<_, std::convert::Infallible>(Frame::data(b)), (rx, meter)))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    Ok(resp)
}

#[expect(clippy::too_many_arguments, reason = "one task's whole state, passed once")]
async fn pump(
    tx: mpsc::Sender<Bytes>,
    events: Option<broadcast::Receiver<Arc<NodeEvent>>>,
    first: Vec<Bytes>,
    mut last_rv: u64,
    shape: Shape,
    deadline: Option<Instant>,
    bookmarks: Option<Duration>,
    cancel: CancellationToken,
) {
    for b in first {
        if tx.send(b).await.is_err() {
            return;
        }
    }
    let Some(mut events) = events else { return };
    let until_deadline = async {
        match deadline {
            Some(d) => tokio::time::sleep_until(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(until_deadline);
    let mut next_bookmark = bookmarks.map(|p| Instant::now() + p);
    loop {
        let bookmark_due = async {
            match next_bookmark {
                Some(t) => tokio::time::sleep_until(t).await,
                None => std::future::pending().await,
            }
        };
        let line = tokio::select! {
            _ = cancel.cancelled() => return,
            _ = &mut until_deadline => return,
            _ = tx.closed() => return,
            _ = bookmark_due => {
                next_bookmark = bookmarks.map(|p| Instant::now() + p);
                Some(shape.bookmark(last_rv))
            }
            r = events.recv() => match r {
                // Already sent from the history.
                Ok(ev) if ev.rv <= last_rv => None,
                Ok(ev) => {
                    last_rv = ev.rv;
                    shape.line(ev.kind.as_str(), &ev.object)
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    let _ = tx.send(error_line(&ApiError::gone(last_rv, last_rv + 1))).await;
                    return;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        };
        if let Some(b) = line {
            if tx.send(b).await.is_err() {
                return;
            }
        }
    }
}
