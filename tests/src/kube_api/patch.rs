//! Merge patches as the API server applies them to nodes.
//!
//! - JSON merge patch (RFC 7386, `application/merge-patch+json`): objects merge, `null`
//!   deletes, anything else (lists included) replaces.
//! - Strategic merge patch (`application/strategic-merge-patch+json`): the same, except that
//!   the lists Kubernetes declares with a merge key merge element by element on that key, an
//!   element `{"$patch": "delete", <key>: ...}` removes one, and the `$setElementOrder/...`
//!   and `$retainKeys` directives that client-go's two-way patches carry are accepted. Only
//!   the node lists with a merge key are known here, which is all the tests need.

use serde_json::{Map, Value};

use super::store::ApiError;

/// The patch types the emulator accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchType {
    /// `application/merge-patch+json`.
    Merge,
    /// `application/strategic-merge-patch+json`.
    Strategic,
}

impl PatchType {
    /// The patch type of a `Content-Type`, or 415 for one not supported.
    pub fn from_content_type(ct: &str) -> Result<Self, ApiError> {
        match ct.split(';').next().unwrap_or("").trim() {
            "application/merge-patch+json" => Ok(Self::Merge),
            "application/strategic-merge-patch+json" => Ok(Self::Strategic),
            other => Err(ApiError {
                code: 415,
                reason: "UnsupportedMediaType",
                message: format!("the body of the request was in an unknown format - accepted media types include: application/merge-patch+json, application/strategic-merge-patch+json (got {other:?})"),
            }),
        }
    }
}

/// The merge key of a node list at `path` (JSON field names from the root), if it has one.
fn merge_key(path: &[&str]) -> Option<&'static str> {
    match path {
        ["status", "conditions"] | ["status", "addresses"] => Some("type"),
        ["spec", "taints"] => Some("key"),
        ["metadata", "ownerReferences"] => Some("uid"),
        _ => None,
    }
}

/// Applies `patch` to `target` in place.
pub fn apply(target: &mut Value, patch: &Value, ty: PatchType) -> Result<(), ApiError> {
    if !patch.is_object() {
        return Err(ApiError::bad_request("the patch must be a JSON object"));
    }
    merge(target, patch, ty, &mut Vec::new())
}

fn merge<'a>(target: &mut Value, patch: &'a Value, ty: PatchType, path: &mut Vec<&'a str>) -> Result<(), ApiError> {
    let Value::Object(p) = patch else {
        *target = patch.clone();
        return Ok(());
    };
    if !target.is_object() {
        *target = Value::Object(Map::new());
    }
    let Value::Object(t) = target else {
        unreachable!("made an object above")
    };
    for (k, v) in p {
        if ty == PatchType::Strategic && (k.starts_with("$setElementOrder/") || k == "$retainKeys") {
            continue;
        }
        if v.is_null() {
            t.remove(k);
            continue;
        }
        path.push(k);
        let slot = t.entry(k.clone()).or_insert(Value::Null);
        match (ty, v, merge_key(path)) {
            (PatchType::Strategic, Value::Array(items), Some(key)) => merge_list(slot, items, key)?,
            (_, Value::Object(_), _) => merge(slot, v, ty, path)?,
            _ => *slot = v.clone(),
        }
        path.pop();
    }
    Ok(())
}

/// Strategic merge of a list of objects keyed by `key`.
fn merge_list(target: &mut Value, items: &[Value], key: &str) -> Result<(), ApiError> {
    if !target.is_array() {
        *target = Value::Array(Vec::new());
    }
    let Value::Array(list) = target else {
        unreachable!("made an array above")
    };
    for item in items {
        let id = item
            .get(key)
            .ok_or_else(|| ApiError::bad_request(format!("map: {item} does not contain declared merge key: {key}")))?;
        let pos = list.iter().position(|e| e.get(key) == Some(id));
        if item.get("$patch").and_then(Value::as_str) == Some("delete") {
            if let Some(i) = pos {
                list.remove(i);
            }
            continue;
        }
        match pos {
            // Elements are plain objects: their fields merge as in a merge patch.
            Some(i) => merge(&mut list[i], item, PatchType::Merge, &mut Vec::new())?,
            None => list.push(item.clone()),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node() -> Value {
        json!({
            "metadata": {"name": "n", "annotations": {"a": "1", "b": "2"}},
            "status": {"conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}
            ]}
        })
    }

    #[test]
    fn merge_patch_replaces_lists_and_deletes_nulls() {
        let mut n = node();
        let p = json!({"metadata": {"annotations": {"a": null, "c": "3"}}, "status": {"conditions": []}});
        apply(&mut n, &p, PatchType::Merge).unwrap();
        assert_eq!(n["metadata"]["annotations"], json!({"b": "2", "c": "3"}));
        assert_eq!(n["status"]["conditions"], json!([]));
    }

    #[test]
    fn strategic_patch_merges_conditions_by_type() {
        let mut n = node();
        let p = json!({
            "$setElementOrder/conditions": [{"type": "Ready"}, {"type": "NetworkUnavailable"}],
            "status": {"conditions": [
                {"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"},
                {"type": "MemoryPressure", "status": "False"}
            ]}
        });
        apply(&mut n, &p, PatchType::Strategic).unwrap();
        let c = n["status"]["conditions"].as_array().unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0], json!({"type": "Ready", "status": "True"}));
        assert_eq!(c[1]["status"], "False");
        assert_eq!(c[1]["reason"], "FlannelIsUp");
        let del = json!({"status": {"conditions": [{"$patch": "delete", "type": "Ready"}]}});
        apply(&mut n, &del, PatchType::Strategic).unwrap();
        assert_eq!(n["status"]["conditions"].as_array().unwrap().len(), 2);
    }

    #[test]
    fn unknown_content_type_is_415() {
        assert_eq!(
            PatchType::from_content_type("application/apply-patch+yaml")
                .unwrap_err()
                .code,
            415
        );
        assert_eq!(
            PatchType::from_content_type("application/strategic-merge-patch+json; charset=utf-8").unwrap(),
            PatchType::Strategic
        );
    }
}
