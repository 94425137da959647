//! The HTTP side of the emulator: connections, routing, and the core/v1 endpoints the kube
//! client uses for nodes and pods.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ACCEPT, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::counters::{Counters, Meter};
use super::patch::{self, PatchType};
use super::store::{ApiError, Store};
use super::watch;

/// Response bodies: a whole JSON document, or a watch stream.
pub type Body = BoxBody<Bytes, Infallible>;

/// The largest request body accepted (the API server's limit is 3 MiB).
const MAX_BODY: usize = 3 << 20;

/// State shared by every connection.
#[derive(Debug, Default)]
pub struct Shared {
    /// The objects.
    pub store: Mutex<Store>,
    /// Bytes sent.
    pub counters: Arc<Counters>,
    /// When set, every request is answered with this HTTP status (e.g. 503).
    pub failing: Mutex<Option<u16>>,
    /// Period of BOOKMARK events on watches that allow them.
    pub bookmark_period: Mutex<Option<Duration>>,
}

impl Shared {
    /// Locks the store; a panic in another request does not make it unusable.
    pub fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Accepts connections until `cancel` fires; then every connection (and watch) ends too,
/// which is what a client sees when an API server goes away.
pub async fn serve(listener: TcpListener, shared: Arc<Shared>, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(_) => {
                    // Out of file descriptors or similar: do not spin.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tokio::spawn(async move {
            let c = cancel.clone();
            let svc = service_fn(move |req| handle(shared.clone(), req, c.clone()));
            let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
            tokio::select! {
                _ = conn => {}
                _ = cancel.cancelled() => {}
            }
        });
    }
}

/// The query parameters of a request, percent-decoded.
#[derive(Debug, Default)]
pub struct Query(HashMap<String, String>);

impl Query {
    fn parse(q: &str) -> Self {
        let pairs = q.split('&').filter(|p| !p.is_empty()).map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        });
        Self(pairs.collect())
    }

    /// A parameter, if present.
    pub fn get(&self, k: &str) -> Option<&str> {
        self.0.get(k).map(String::as_str)
    }

    /// A boolean parameter (`true` or `1`).
    pub fn flag(&self, k: &str) -> bool {
        matches!(self.get(k), Some("true" | "1"))
    }

    /// A resourceVersion-like number; empty or absent is `None`.
    pub fn number(&self, k: &str) -> Result<Option<u64>, ApiError> {
        match self.get(k) {
            None | Some("") => Ok(None),
            Some(s) => s
                .parse()
                .map(Some)
                .map_err(|_| ApiError::bad_request(format!("invalid {k} {s:?}"))),
        }
    }
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < b.len() => {
                match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(v) => {
                        out.push(v);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A JSON response, counted.
pub fn json_response(code: u16, body: &Value, meter: &Meter) -> Response<Body> {
    let bytes = Bytes::from(body.to_string());
    meter.add(bytes.len());
    let mut resp = Response::new(Full::new(bytes).boxed());
    *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn error_response(e: &ApiError, meter: &Meter) -> Response<Body> {
    json_response(e.code, &e.status(), meter)
}

/// The object as `PartialObjectMetadata`: what a client asking for metadata only gets.
pub fn to_metadata(obj: &Value) -> Value {
    json!({"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": obj["metadata"]})
}

async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    cancel: CancellationToken,
) -> Result<Response<Body>, Infallible> {
    let path = req.uri().path().to_string();
    let raw_query = req.uri().query().unwrap_or("").to_string();
    let query = Query::parse(&raw_query);
    let accept = req.headers().get(ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    let metadata_only = accept.contains("as=PartialObjectMetadata");
    let is_watch = query.flag("watch");
    let meter = shared
        .counters
        .start(req.method().as_str(), &path, &raw_query, is_watch, metadata_only);
    let failing = *shared.failing.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(code) = failing {
        let e = ApiError {
            code,
            reason: "ServiceUnavailable",
            message: "the emulated API server is unavailable".into(),
        };
        return Ok(error_response(&e, &meter));
    }
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    let resp = match (&method, segs.as_slice()) {
        (&Method::GET, ["version"]) => Ok(json_response(200, &version(), &meter)),
        (&Method::GET, ["api"]) => Ok(json_response(200, &api_versions(), &meter)),
        (&Method::GET, ["api", "v1"]) => Ok(json_response(200, &core_resources(), &meter)),
        (&Method::GET, ["apis"]) => Ok(json_response(
            200,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            &meter,
        )),
        (&Method::GET, ["api", "v1", "nodes"]) if is_watch => {
            watch::start(&shared, &query, metadata_only, meter.clone(), cancel)
        }
        (&Method::GET, ["api", "v1", "nodes"]) => {
            list(&shared, &query, metadata_only).map(|v| json_response(200, &v, &meter))
        }
        (&Method::POST, ["api", "v1", "nodes"]) => match read_json(req).await {
            Ok(body) => shared.store().create_node(body).map(|v| json_response(201, &v, &meter)),
            Err(e) => Err(e),
        },
        (&Method::GET, ["api", "v1", "nodes", name] | ["api", "v1", "nodes", name, "status"]) => {
            let node = shared.store().node(name).cloned();
            node.ok_or_else(|| ApiError::not_found("nodes", name))
                .map(|n| json_response(200, &if metadata_only { to_metadata(&n) } else { n }, &meter))
        }
        (&Method::PATCH, ["api", "v1", "nodes", name, rest @ ..]) if rest.len() <= 1 => {
            let status = rest == ["status"];
            if !status && !rest.is_empty() {
                Err(ApiError::not_found("nodes", name))
            } else {
                let name = name.to_string();
                patch_node(&shared, req, &name, status)
                    .await
                    .map(|n| json_response(200, &if metadata_only { to_metadata(&n) } else { n }, &meter))
            }
        }
        (&Method::DELETE, ["api", "v1", "nodes", name]) => {
            shared.store().delete_node(name).map(|n| json_response(200, &n, &meter))
        }
        (&Method::GET, ["api", "v1", "namespaces", ns, "pods", name]) => {
            let pod = shared.store().pod(ns, name).cloned();
            pod.ok_or_else(|| ApiError::not_found("pods", name))
                .map(|p| json_response(200, &p, &meter))
        }
        _ => Err(ApiError::not_found("path", &path)),
    };
    Ok(resp.unwrap_or_else(|e| error_response(&e, &meter)))
}

async fn read_body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map(|b| b.to_bytes())
        .map_err(|e| ApiError::bad_request(format!("reading the body: {e}")))
}

async fn read_json(req: Request<Incoming>) -> Result<Value, ApiError> {
    let body = read_body(req).await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::bad_request(format!("invalid JSON: {e}")))
}

/// PATCH of a node or of its status. As in the API server, the status subresource keeps the
/// old spec and the main resource keeps the old status; metadata changes through either.
async fn patch_node(shared: &Shared, req: Request<Incoming>, name: &str, status: bool) -> Result<Value, ApiError> {
    let ct = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let ty = PatchType::from_content_type(&ct)?;
    let body = read_json(req).await?;
    shared.store().update_node(name, |node| {
        let want_rv = body.pointer("/metadata/resourceVersion").and_then(Value::as_str);
        let have_rv = node.pointer("/metadata/resourceVersion").and_then(Value::as_str);
        if want_rv.is_some() && want_rv != have_rv {
            return Err(ApiError {
                code: 409,
                reason: "Conflict",
                message: format!("Operation cannot be fulfilled on nodes \"{name}\": the object has been modified; please apply your changes to the latest version and try again"),
            });
        }
        let keep = if status { "spec" } else { "status" };
        let kept = node.get(keep).cloned();
        patch::apply(node, &body, ty)?;
        match kept {
            Some(v) => node[keep] = v,
            None => {
                if let Some(o) = node.as_object_mut() {
                    o.remove(keep);
                }
            }
        }
        Ok(())
    })
}

/// LIST of nodes, optionally paged (`limit`, `continue`) and as metadata only.
fn list(shared: &Shared, q: &Query, metadata_only: bool) -> Result<Value, ApiError> {
    let store = shared.store();
    // A continue token is "<resourceVersion of the first page>:<last name returned>".
    let (list_rv, after) = match q.get("continue").filter(|c| !c.is_empty()) {
        Some(c) => {
            let (rv, name) = c
                .split_once(':')
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?;
            let rv: u64 = rv
                .parse()
                .map_err(|_| ApiError::bad_request("invalid continue token"))?;
            store.check_not_compacted(rv).map_err(|_| ApiError {
                code: 410,
                reason: "Expired",
                message: "The provided continue parameter is too old to display a consistent list result. You can start a new list without the continue parameter.".into(),
            })?;
            (rv, Some(name.to_string()))
        }
        None => {
            if let Some(rv) = q.number("resourceVersion")?.filter(|rv| *rv != 0) {
                store.check_not_compacted(rv)?;
            }
            (store.resource_version(), None)
        }
    };
    let limit = q.number("limit")?.filter(|l| *l > 0).map_or(usize::MAX, |l| l as usize);
    let field_name = field_selector_name(q)?;
    let mut items: Vec<&Value> = store
        .nodes()
        .filter(|n| after.as_deref().is_none_or(|a| name_of(n) > a))
        .filter(|n| field_name.as_deref().is_none_or(|f| name_of(n) == f))
        .collect();
    let more = items.len() > limit;
    items.truncate(limit);
    let mut meta = json!({"resourceVersion": list_rv.to_string()});
    if more {
        let last = items.last().map_or("", |n| name_of(n));
        meta["continue"] = json!(format!("{list_rv}:{last}"));
        meta["remainingItemCount"] = json!(store.nodes().filter(|n| name_of(n) > last).count());
    }
    let (kind, api_version, items): (&str, &str, Vec<Value>) = if metadata_only {
        let items = items.into_iter().map(to_metadata).collect();
        ("PartialObjectMetadataList", "meta.k8s.io/v1", items)
    } else {
        ("NodeList", "v1", items.into_iter().cloned().collect())
    };
    Ok(json!({"kind": kind, "apiVersion": api_version, "metadata": meta, "items": items}))
}

/// The node name of a `fieldSelector=metadata.name=<name>`; other selectors are refused
/// rather than ignored, so a test never passes by accident.
pub fn field_selector_name(q: &Query) -> Result<Option<String>, ApiError> {
    if q.get("labelSelector").is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::bad_request("the emulator does not support label selectors"));
    }
    match q.get("fieldSelector").filter(|s| !s.is_empty()) {
        None => Ok(None),
        Some(s) => s
            .strip_prefix("metadata.name=")
            .map(|n| Some(n.to_string()))
            .ok_or_else(|| ApiError::bad_request(format!("unsupported field selector {s:?}"))),
    }
}

/// `metadata.name` of an object.
pub fn name_of(obj: &Value) -> &str {
    obj.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("")
}

fn version() -> Value {
    json!({
        "major": "1", "minor": "33", "gitVersion": "v1.33.0", "gitCommit": "flannel-rs-emulator",
        "gitTreeState": "clean", "buildDate": "2025-04-23T00:00:00Z", "goVersion": "go1.24.2",
        "compiler": "gc", "platform": "linux/amd64"
    })
}

fn api_versions() -> Value {
    json!({"kind": "APIVersions", "versions": ["v1"],
           "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": "127.0.0.1:6443"}]})
}

fn core_resources() -> Value {
    let res = |name: &str, kind: &str, namespaced: bool, verbs: &[&str]| json!({"name": name, "singularName": "", "namespaced": namespaced, "kind": kind, "verbs": verbs});
    json!({
        "kind": "APIResourceList", "groupVersion": "v1",
        "resources": [
            res("nodes", "Node", false, &["create", "delete", "get", "list", "patch", "watch"]),
            res("nodes/status", "Node", false, &["get", "patch"]),
            res("pods", "Pod", true, &["get"]),
        ]
    })
}
