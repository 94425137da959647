//! The emulator's state: nodes and pods as JSON, one resourceVersion counter for every write,
//! and the history of node events that watches replay from.
//!
//! Objects are kept as `serde_json::Value` rather than typed structs so that whatever a client
//! writes (including fields this crate's k8s-openapi does not know) comes back unchanged, as
//! from a real API server.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;
use serde_json::{json, Value};
use tokio::sync::broadcast;

/// How many node events are kept for watches; older ones are compacted away, so a watch from
/// before them gets 410 Gone, as from an API server whose watch cache has moved on.
const HISTORY_LIMIT: usize = 10_000;
/// Capacity of the live event fan-out; a watch that falls this far behind is ended with 410.
const FANOUT_CAPACITY: usize = 4096;

/// The type of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventType {
    /// The object was created.
    Added,
    /// The object changed.
    Modified,
    /// The object was deleted (the event carries its last state).
    Deleted,
}

impl EventType {
    /// The name in the watch stream.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One node event, as kept in the history and sent to watches.
#[derive(Debug)]
pub struct NodeEvent {
    /// The resourceVersion of the write.
    pub rv: u64,
    /// What happened.
    pub kind: EventType,
    /// The node after the write (before it, for a delete).
    pub object: Value,
}

/// An API error: the HTTP status, the `reason` of the Status object and its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// HTTP status code.
    pub code: u16,
    /// `Status.reason`, e.g. `NotFound`.
    pub reason: &'static str,
    /// `Status.message`.
    pub message: String,
}

impl ApiError {
    /// 404 for `resource/name`.
    pub fn not_found(resource: &str, name: &str) -> Self {
        Self {
            code: 404,
            reason: "NotFound",
            message: format!("{resource} \"{name}\" not found"),
        }
    }

    /// 400 with a message.
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            code: 400,
            reason: "BadRequest",
            message: message.into(),
        }
    }

    /// 410: the resourceVersion asked for is older than the retained history.
    pub fn gone(rv: u64, oldest: u64) -> Self {
        Self {
            code: 410,
            reason: "Expired",
            message: format!("too old resource version: {rv} ({oldest})"),
        }
    }

    /// The `Status` object a real API server sends with this error.
    pub fn status(&self) -> Value {
        json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        })
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.reason, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The current time in the API's format (RFC 3339, whole seconds, UTC).
pub fn now_rfc3339() -> String {
    format!("{:.0}", Timestamp::now())
}

/// The start of a watch: the retained events after its resourceVersion, and a receiver
/// for the ones still to come.
pub type WatchStart = (Vec<Arc<NodeEvent>>, broadcast::Receiver<Arc<NodeEvent>>);

/// Everything the emulator stores.
#[derive(Debug)]
pub struct Store {
    rv: u64,
    uid: u64,
    nodes: BTreeMap<String, Value>,
    pods: BTreeMap<(String, String), Value>,
    history: VecDeque<Arc<NodeEvent>>,
    /// Node events at or before this resourceVersion are no longer in the history.
    compacted: u64,
    fanout: broadcast::Sender<Arc<NodeEvent>>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            rv: 1000,
            uid: 0,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            history: VecDeque::new(),
            compacted: 1000,
            fanout: broadcast::Sender::new(FANOUT_CAPACITY),
        }
    }
}

impl Store {
    /// The resourceVersion of the last write.
    pub fn resource_version(&self) -> u64 {
        self.rv
    }

    /// All nodes, sorted by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Value> {
        self.nodes.values()
    }

    /// One node.
    pub fn node(&self, name: &str) -> Option<&Value> {
        self.nodes.get(name)
    }

    /// One pod.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<&Value> {
        self.pods.get(&(namespace.to_string(), name.to_string()))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Fills in what the server owns: uid, creationTimestamp, resourceVersion.
    fn admit(&mut self, obj: &mut Value, kind: &str) -> Result<String, ApiError> {
        let name = obj
            .pointer("/metadata/name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| ApiError::bad_request("metadata.name: Required value"))?
            .to_string();
        self.uid += 1;
        let rv = self.next_rv();
        let meta = obj
            .as_object_mut()
            .ok_or_else(|| ApiError::bad_request("the body must be an object"))?
            .entry("metadata")
            .or_insert_with(|| json!({}));
        meta["uid"] = json!(format!("00000000-0000-4000-8000-{:012x}", self.uid));
        meta["creationTimestamp"] = json!(now_rfc3339());
        meta["resourceVersion"] = json!(rv.to_string());
        obj["kind"] = json!(kind);
        obj["apiVersion"] = json!("v1");
        Ok(name)
    }

    /// Creates a node; 409 if one of that name exists.
    pub fn create_node(&mut self, mut obj: Value) -> Result<Value, ApiError> {
        if let Some(name) = obj.pointer("/metadata/name").and_then(Value::as_str) {
            if self.nodes.contains_key(name) {
                return Err(ApiError {
                    code: 409,
                    reason: "AlreadyExists",
                    message: format!("nodes \"{name}\" already exists"),
                });
            }
        }
        let name = self.admit(&mut obj, "Node")?;
        self.nodes.insert(name, obj.clone());
        self.record(EventType::Added, obj.clone());
        Ok(obj)
    }

    /// Creates or replaces a pod (pods have no watch here, only GET).
    pub fn put_pod(&mut self, namespace: &str, mut obj: Value) -> Result<Value, ApiError> {
        let name = self.admit(&mut obj, "Pod")?;
        obj["metadata"]["namespace"] = json!(namespace);
        self.pods.insert((namespace.to_string(), name), obj.clone());
        Ok(obj)
    }

    /// Applies `f` to a copy of the node and stores the result. As in a real API server a
    /// write that changes nothing is not a write: no new resourceVersion, no watch event.
    pub fn update_node(
        &mut self,
        name: &str,
        f: impl FnOnce(&mut Value) -> Result<(), ApiError>,
    ) -> Result<Value, ApiError> {
        let old = self.nodes.get(name).ok_or_else(|| ApiError::not_found("nodes", name))?;
        let mut new = old.clone();
        f(&mut new)?;
        // The server owns these; a client cannot change them by a patch.
        for key in ["uid", "creationTimestamp", "name"] {
            new["metadata"][key] = old["metadata"][key].clone();
        }
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"].clone();
        if new == *old {
            return Ok(new);
        }
        let rv = self.next_rv();
        new["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.nodes.insert(name.to_string(), new.clone());
        self.record(EventType::Modified, new.clone());
        Ok(new)
    }

    /// Deletes a node; returns its last state.
    pub fn delete_node(&mut self, name: &str) -> Result<Value, ApiError> {
        let mut obj = self
            .nodes
            .remove(name)
            .ok_or_else(|| ApiError::not_found("nodes", name))?;
        let rv = self.next_rv();
        obj["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(EventType::Deleted, obj.clone());
        Ok(obj)
    }

    fn record(&mut self, kind: EventType, object: Value) {
        let ev = Arc::new(NodeEvent {
            rv: self.rv,
            kind,
            object,
        });
        self.history.push_back(ev.clone());
        while self.history.len() > HISTORY_LIMIT {
            if let Some(old) = self.history.pop_front() {
                self.compacted = old.rv;
            }
        }
        // No receivers is fine: nobody is watching.
        let _ = self.fanout.send(ev);
    }

    /// Drops the whole history, so any watch or list from an older resourceVersion gets 410.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted = self.rv;
    }

    /// Checks that `rv` is still inside the retained history.
    pub fn check_not_compacted(&self, rv: u64) -> Result<(), ApiError> {
        if rv < self.compacted {
            return Err(ApiError::gone(rv, self.compacted));
        }
        Ok(())
    }

    /// The events after `rv` and a receiver for the ones still to come. Taken together under
    /// the store's lock, so none is missed or sent twice.
    pub fn watch_from(&self, rv: u64) -> Result<WatchStart, ApiError> {
        self.check_not_compacted(rv)?;
        let past = self.history.iter().filter(|e| e.rv > rv).cloned().collect();
        Ok((past, self.fanout.subscribe()))
    }

    /// A receiver for future events only (a watch without a resourceVersion).
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<NodeEvent>> {
        self.fanout.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str) -> Value {
        json!({"metadata": {"name": name}, "spec": {}})
    }

    #[test]
    fn writes_bump_the_resource_version_and_no_op_writes_do_not() {
        let mut s = Store::default();
        let a = s.create_node(node("a")).unwrap();
        let rv0: u64 = a["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
        let same = s.update_node("a", |_| Ok(())).unwrap();
        assert_eq!(same["metadata"]["resourceVersion"], a["metadata"]["resourceVersion"]);
        let b = s.update_node("a", |n| {
            n["spec"]["podCIDR"] = json!("10.0.0.0/24");
            Ok(())
        });
        let rv1: u64 = b.unwrap()["metadata"]["resourceVersion"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(rv1 > rv0);
        assert_eq!(s.create_node(node("a")).unwrap_err().code, 409);
    }

    #[test]
    fn compaction_makes_old_versions_gone() {
        let mut s = Store::default();
        s.create_node(node("a")).unwrap();
        let rv = s.resource_version();
        s.create_node(node("b")).unwrap();
        let (past, _) = s.watch_from(rv).unwrap();
        assert_eq!(past.len(), 1);
        s.compact();
        assert_eq!(s.watch_from(rv).unwrap_err().code, 410);
        assert!(s.watch_from(s.resource_version()).is_ok());
    }
}
