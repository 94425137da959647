//! Node objects shaped like the ones a kubeadm cluster has, so that byte counts measured
//! against the emulator mean something: labels, the annotations kubeadm and the kubelet set,
//! `managedFields` of the kubelet and the controller manager, the five node conditions,
//! addresses, capacity, node info and an image list.
//!
//! A node of a real cluster is 10 to 30 KB of JSON, most of it `status` (the image list alone
//! is up to 50 entries); this one is about 12 KB in full and about 2.5 KB as metadata only.

use k8s_openapi::jiff::{SignedDuration, Timestamp};
use serde_json::{json, Value};

use super::store::now_rfc3339;

/// How many container images the fixture node lists (the kubelet reports up to 50).
const IMAGES: usize = 30;

/// A node named `name` with the given pod CIDRs (the first is also `spec.podCIDR`) and
/// annotations, plus the fields a kubelet and kubeadm put on every node.
pub fn node(name: &str, pod_cidrs: &[&str], annotations: &[(&str, &str)]) -> Value {
    let now = now_rfc3339();
    let mut ann = serde_json::Map::new();
    ann.insert(
        "kubeadm.alpha.kubernetes.io/cri-socket".into(),
        json!("unix:///var/run/containerd/containerd.sock"),
    );
    ann.insert("node.alpha.kubernetes.io/ttl".into(), json!("0"));
    ann.insert(
        "volumes.kubernetes.io/controller-managed-attach-detach".into(),
        json!("true"),
    );
    for (k, v) in annotations {
        ann.insert((*k).into(), json!(v));
    }
    let mut spec = json!({});
    if let Some(first) = pod_cidrs.first() {
        spec["podCIDR"] = json!(first);
        spec["podCIDRs"] = json!(pod_cidrs);
    }
    json!({
        "metadata": {
            "name": name,
            "labels": {
                "beta.kubernetes.io/arch": "amd64",
                "beta.kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "node.kubernetes.io/instance-type": "m5.xlarge",
                "topology.kubernetes.io/region": "eu-west-1",
                "topology.kubernetes.io/zone": "eu-west-1a"
            },
            "annotations": ann,
            "managedFields": managed_fields(&now),
        },
        "spec": spec,
        "status": status(name, &now),
    })
}

fn managed_fields(now: &str) -> Value {
    json!([
        {
            "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:node.alpha.kubernetes.io/ttl": {},
                "f:volumes.kubernetes.io/controller-managed-attach-detach": {}},
                "f:labels": {".": {}, "f:beta.kubernetes.io/arch": {}, "f:beta.kubernetes.io/os": {},
                "f:kubernetes.io/arch": {}, "f:kubernetes.io/hostname": {}, "f:kubernetes.io/os": {},
                "f:node.kubernetes.io/instance-type": {}, "f:topology.kubernetes.io/region": {},
                "f:topology.kubernetes.io/zone": {}}}}
        },
        {
            "manager": "kube-controller-manager", "operation": "Update", "apiVersion": "v1", "time": now,
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:spec": {"f:podCIDR": {}, "f:podCIDRs": {".": {}, "v:\"10.244.0.0/24\"": {}}}}
        },
        {
            "manager": "kubelet", "operation": "Update", "apiVersion": "v1", "time": now,
            "fieldsType": "FieldsV1", "subresource": "status",
            "fieldsV1": {"f:status": {"f:allocatable": {"f:cpu": {}, "f:ephemeral-storage": {}, "f:memory": {}},
                "f:capacity": {"f:cpu": {}, "f:ephemeral-storage": {}, "f:memory": {}},
                "f:conditions": {"k:{\"type\":\"DiskPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"MemoryPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"PIDPressure\"}": {"f:lastHeartbeatTime": {}},
                    "k:{\"type\":\"Ready\"}": {"f:lastHeartbeatTime": {}, "f:lastTransitionTime": {},
                        "f:message": {}, "f:reason": {}, "f:status": {}}},
                "f:images": {}, "f:nodeInfo": {"f:bootID": {}, "f:kernelVersion": {}}}}
        }
    ])
}

fn status(name: &str, now: &str) -> Value {
    let cond = |ty: &str, st: &str, reason: &str, msg: &str| {
        json!({"type": ty, "status": st, "lastHeartbeatTime": now, "lastTransitionTime": now,
               "reason": reason, "message": msg})
    };
    let images: Vec<Value> = (0..IMAGES)
        .map(|i| {
            json!({
                "names": [
                    format!("registry.example.com/team-{i}/service-{i}@sha256:{:064x}", i * 7919 + 1),
                    format!("registry.example.com/team-{i}/service-{i}:v1.{i}.0"),
                ],
                "sizeBytes": 10_000_000 + i * 1_234_567,
            })
        })
        .collect();
    json!({
        "capacity": {"cpu": "4", "ephemeral-storage": "101430960Ki", "hugepages-1Gi": "0",
                     "hugepages-2Mi": "0", "memory": "16106132Ki", "pods": "110"},
        "allocatable": {"cpu": "4", "ephemeral-storage": "93478772582", "hugepages-1Gi": "0",
                        "hugepages-2Mi": "0", "memory": "16003732Ki", "pods": "110"},
        "conditions": [
            cond("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            cond("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            cond("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            cond("Ready", "True", "KubeletReady", "kubelet is posting ready status"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": "192.0.2.10"},
            {"type": "Hostname", "address": name},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "machineID": "ec2a9e0a4f6d4c7b9b1f0e1d2c3b4a59", "systemUUID": "ec2a9e0a-4f6d-4c7b-9b1f-0e1d2c3b4a59",
            "bootID": "5b1c2d3e-4f50-6172-8394-a5b6c7d8e9f0", "kernelVersion": "6.1.0-18-cloud-amd64",
            "osImage": "Debian GNU/Linux 12 (bookworm)", "containerRuntimeVersion": "containerd://1.7.13",
            "kubeletVersion": "v1.33.1", "kubeProxyVersion": "v1.33.1", "operatingSystem": "linux",
            "architecture": "amd64"
        },
        "images": images,
    })
}

/// What the kubelet does on a status update: new heartbeat times in the conditions and in
/// the status entry of `managedFields`. Changes nothing flannel reads. The clock is
/// simulated (10 s after the last heartbeat), so heartbeats in quick succession are still
/// real writes, as a kubelet's are minutes apart.
pub fn heartbeat(node: &mut Value) {
    let last = node
        .pointer("/status/conditions/0/lastHeartbeatTime")
        .and_then(Value::as_str)
        .and_then(|s| s.parse::<Timestamp>().ok())
        .unwrap_or_else(Timestamp::now);
    let now = format!("{:.0}", last + SignedDuration::from_secs(10));
    if let Some(conds) = node.pointer_mut("/status/conditions").and_then(Value::as_array_mut) {
        for c in conds {
            c["lastHeartbeatTime"] = json!(now);
        }
    }
    if let Some(mf) = node
        .pointer_mut("/metadata/managedFields")
        .and_then(Value::as_array_mut)
    {
        for m in mf {
            if m.get("subresource").and_then(Value::as_str) == Some("status") {
                m["time"] = json!(now);
            }
        }
    }
}
