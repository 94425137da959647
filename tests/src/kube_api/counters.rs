//! Bytes sent, in total, on watches, and per request, so tests can measure what a client's
//! way of watching costs the API server.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Requests remembered for [`Counters::requests`]; older ones are forgotten (their bytes stay
/// in the totals).
const LOG_LIMIT: usize = 100_000;

/// One request the emulator answered, and the body bytes it has sent so far.
#[derive(Debug)]
pub struct RequestRecord {
    /// Order of arrival, from 1.
    pub id: u64,
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// URL query, as sent.
    pub query: String,
    /// Whether it is a watch (a streamed response).
    pub watch: bool,
    /// Whether the client asked for metadata only (`as=PartialObjectMetadata...`).
    pub metadata_only: bool,
    bytes: AtomicU64,
}

impl RequestRecord {
    /// Response body bytes sent so far (a watch keeps adding).
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }
}

/// A summary of one request, as tests see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestSummary {
    /// Order of arrival, from 1.
    pub id: u64,
    /// HTTP method.
    pub method: String,
    /// URL path.
    pub path: String,
    /// URL query.
    pub query: String,
    /// Whether it is a watch.
    pub watch: bool,
    /// Whether only metadata was asked for.
    pub metadata_only: bool,
    /// Response body bytes sent so far.
    pub bytes: u64,
}

/// The emulator's byte counters.
#[derive(Debug, Default)]
pub struct Counters {
    next_id: AtomicU64,
    total: AtomicU64,
    watch: AtomicU64,
    log: Mutex<Vec<Arc<RequestRecord>>>,
}

/// Where the bytes of one response are added up.
#[derive(Debug, Clone)]
pub struct Meter {
    counters: Arc<Counters>,
    record: Arc<RequestRecord>,
}

impl Meter {
    /// Counts `n` body bytes sent for this request.
    pub fn add(&self, n: usize) {
        let n = n as u64;
        self.record.bytes.fetch_add(n, Ordering::Relaxed);
        self.counters.total.fetch_add(n, Ordering::Relaxed);
        if self.record.watch {
            self.counters.watch.fetch_add(n, Ordering::Relaxed);
        }
    }
}

impl Counters {
    /// Registers a request; its bytes are counted through the returned meter.
    pub fn start(self: &Arc<Self>, method: &str, path: &str, query: &str, watch: bool, metadata_only: bool) -> Meter {
        let record = Arc::new(RequestRecord {
            id: self.next_id.fetch_add(1, Ordering::Relaxed) + 1,
            method: method.to_string(),
            path: path.to_string(),
            query: query.to_string(),
            watch,
            metadata_only,
            bytes: AtomicU64::new(0),
        });
        let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        if log.len() >= LOG_LIMIT {
            log.drain(..LOG_LIMIT / 2);
        }
        log.push(record.clone());
        Meter {
            counters: self.clone(),
            record,
        }
    }

    /// Response body bytes sent in total.
    pub fn total(&self) -> u64 {
        self.total.load(Ordering::Relaxed)
    }

    /// Response body bytes sent on watch streams.
    pub fn watch(&self) -> u64 {
        self.watch.load(Ordering::Relaxed)
    }

    /// The requests answered so far (the last [`LOG_LIMIT`] at most), oldest first.
    pub fn requests(&self) -> Vec<RequestSummary> {
        let log = self.log.lock().unwrap_or_else(|p| p.into_inner());
        log.iter()
            .map(|r| RequestSummary {
                id: r.id,
                method: r.method.clone(),
                path: r.path.clone(),
                query: r.query.clone(),
                watch: r.watch,
                metadata_only: r.metadata_only,
                bytes: r.bytes(),
            })
            .collect()
    }
}
