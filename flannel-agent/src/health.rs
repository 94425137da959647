//! The healthz server (`--healthz-ip`, `--healthz-port`): upstream's `/healthz`
//! and `/readyz`, plus `/metrics` (Prometheus text), `/status` and `/status/datapath`
//! (JSON, read by `flannelctl`).
//!
//! Ready means what upstream means and a little more: the lease is held,
//! `subnet.env` is written, the traffic rules are installed and the backend has
//! programmed the peers known at that time.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::any;
use axum::Router;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;

/// What the agent reports about itself.
#[derive(Debug, Default)]
pub struct Health {
    /// Counters served on `/metrics`.
    pub metrics: Arc<Metrics>,
    status: Mutex<Status>,
    /// The backend's own report (`Backend::status`), served on `/status/datapath`.
    datapath: Mutex<serde_json::Value>,
    /// Counters the backend keeps itself (the udp proxy's), read at each request.
    live: Mutex<Option<Arc<dyn LiveReport>>>,
}

/// Counters a backend updates continuously (rather than at each reconcile), read when
/// `/status/datapath` or `/metrics` is requested.
pub trait LiveReport: Send + Sync + std::fmt::Debug {
    /// Merged into `/status/datapath` under `"counters"`.
    fn json(&self) -> serde_json::Value;
    /// Appended to `/metrics` (Prometheus text).
    fn render(&self, out: &mut String);
}

/// The agent's state as `/status` shows it.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Status {
    /// Whether `/readyz` answers 200.
    pub ready: bool,
    /// What the agent is waiting for, while not ready.
    pub waiting_for: String,
    /// The subnet manager in use.
    pub subnet_manager: String,
    /// The backend in use.
    pub backend: String,
    /// This node's IPv4 subnet.
    pub subnet: Option<String>,
    /// This node's IPv6 subnet.
    pub ipv6_subnet: Option<String>,
    /// The address peers reach this node at.
    pub public_ip: Option<String>,
    /// How many peers the backend has programmed.
    pub peers: usize,
}

impl Health {
    /// A health state with its counters.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            status: Mutex::new(Status {
                waiting_for: "start".into(),
                ..Status::default()
            }),
            datapath: Mutex::new(serde_json::Value::Null),
            live: Mutex::new(None),
        }
    }

    /// Changes the status under the lock.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        f(&mut self.status.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// Replaces the backend's report served on `/status/datapath`.
    pub fn set_datapath(&self, report: serde_json::Value) {
        *self.datapath.lock().unwrap_or_else(|p| p.into_inner()) = report;
    }

    /// Registers the backend's live counters.
    pub fn set_live(&self, live: Arc<dyn LiveReport>) {
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(live);
    }

    fn live(&self) -> Option<Arc<dyn LiveReport>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// A copy of the backend's report, with its live counters as they are now.
    pub fn datapath(&self) -> serde_json::Value {
        let mut v = self.datapath.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let (Some(live), Some(obj)) = (self.live(), v.as_object_mut()) {
            obj.insert("counters".into(), live.json());
        }
        v
    }

    /// `/metrics`: the agent's counters and the backend's live ones.
    pub fn render_metrics(&self) -> String {
        let mut out = self.metrics.render();
        if let Some(live) = self.live() {
            live.render(&mut out);
        }
        out
    }

    /// A copy of the current status.
    pub fn status(&self) -> Status {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The server could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen for healthz on {addr}: {source}; pick a free --healthz-port or set it to 0")]
pub struct HealthError {
    /// The address asked for.
    pub addr: SocketAddr,
    /// Why binding failed.
    #[source]
    pub source: std::io::Error,
}

/// Binds the server; serving starts with [`serve`]. Binding first lets `main`
/// fail at start-up, before touching the network, if the port is taken.
pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HealthError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError { addr, source })
}

/// Serves the endpoints until `shutdown` fires.
pub async fn serve(listener: tokio::net::TcpListener, health: Arc<Health>, shutdown: CancellationToken) {
    let app = Router::new()
        .route("/healthz", any(|| async { "flanneld is running" }))
        .route("/readyz", any(readyz))
        .route(
            "/metrics",
            any(|State(h): State<Arc<Health>>| async move { h.render_metrics() }),
        )
        .route(
            "/status",
            any(|State(h): State<Arc<Health>>| async move { axum::Json(h.status()) }),
        )
        .route(
            "/status/datapath",
            any(|State(h): State<Arc<Health>>| async move { axum::Json(h.datapath()) }),
        )
        .with_state(health);
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "start healthz server");
    }
    let r = axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await;
    if let Err(e) = r {
        tracing::error!(error = %e, "healthz server failed");
    }
}

async fn readyz(State(h): State<Arc<Health>>) -> (StatusCode, &'static str) {
    if h.status().ready {
        (StatusCode::OK, "flanneld is ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "flanneld is not ready yet")
    }
}
