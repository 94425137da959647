//! The emulator against the real `kube` client: what the subnet manager relies on must
//! behave as a real API server's does.

use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, watcher, Event};
use kube::Api;
use serde_json::json;

use super::KubeApi;

const STEP: Duration = Duration::from_secs(10);

async fn next<S: futures::Stream + Unpin>(s: &mut S) -> S::Item {
    tokio::time::timeout(STEP, s.next())
        .await
        .expect("an event within 10 s")
        .expect("the stream goes on")
}

#[tokio::test]
async fn list_get_and_metadata_only() -> anyhow::Result<()> {
    let (api, _) = KubeApi::start().await?;
    for i in 0..5 {
        api.add_node(&format!("n{i}"), &[&format!("10.244.{i}.0/24")], &[("a", "b")]);
    }
    let nodes: Api<Node> = Api::all(api.client().await?);
    let all = nodes.list(&ListParams::default()).await?;
    assert_eq!(all.items.len(), 5);
    assert_eq!(all.metadata.resource_version, Some(api.resource_version().to_string()));
    // Paged: 2 + 2 + 1, each page with a continue token but the last.
    let mut lp = ListParams::default().limit(2);
    let mut names = Vec::new();
    loop {
        let page = nodes.list(&lp).await?;
        names.extend(page.items.iter().filter_map(|n| n.metadata.name.clone()));
        match page.metadata.continue_ {
            Some(c) if !c.is_empty() => lp = lp.continue_token(&c),
            _ => break,
        }
    }
    assert_eq!(names, ["n0", "n1", "n2", "n3", "n4"]);
    let n2 = nodes.get("n2").await?;
    assert_eq!(n2.spec.unwrap().pod_cidrs.unwrap(), ["10.244.2.0/24"]);
    assert!(nodes.get_opt("missing").await?.is_none());

    let before = api.bytes_sent();
    let meta = nodes.list_metadata(&ListParams::default()).await?;
    let meta_bytes = api.bytes_sent() - before;
    assert_eq!(meta.items[0].metadata.annotations.as_ref().unwrap()["a"], "b");
    let before = api.bytes_sent();
    nodes.list(&ListParams::default()).await?;
    let full_bytes = api.bytes_sent() - before;
    assert!(
        meta_bytes * 3 < full_bytes,
        "metadata {meta_bytes} B vs full {full_bytes} B"
    );
    let r = api.requests();
    assert!(r.iter().any(|r| r.metadata_only && r.path == "/api/v1/nodes"));

    api.add_pod("kube-flannel", "kube-flannel-ds-x", Some("n3"));
    let pods: Api<Pod> = Api::namespaced(api.client().await?, "kube-flannel");
    let pod = pods.get("kube-flannel-ds-x").await?;
    assert_eq!(pod.spec.unwrap().node_name.as_deref(), Some("n3"));
    Ok(())
}

#[tokio::test]
async fn watch_streams_changes_and_expires_with_410() -> anyhow::Result<()> {
    let (api, _) = KubeApi::start().await?;
    api.add_node("a", &["10.244.1.0/24"], &[]);
    let nodes: Api<Node> = Api::all(api.client().await?);
    let rv = nodes
        .list(&ListParams::default())
        .await?
        .metadata
        .resource_version
        .unwrap();
    let mut w = nodes.watch(&WatchParams::default(), &rv).await?.boxed();
    api.add_node("b", &["10.244.2.0/24"], &[]);
    api.heartbeat("a")?;
    api.delete_node("b");
    assert!(matches!(next(&mut w).await?, WatchEvent::Added(n) if n.metadata.name.as_deref() == Some("b")));
    assert!(matches!(next(&mut w).await?, WatchEvent::Modified(n) if n.metadata.name.as_deref() == Some("a")));
    assert!(matches!(next(&mut w).await?, WatchEvent::Deleted(n) if n.metadata.name.as_deref() == Some("b")));

    // From a resourceVersion older than the history: one ERROR event with a 410 Status.
    api.compact();
    let mut old = nodes.watch(&WatchParams::default(), &rv).await?.boxed();
    match next(&mut old).await? {
        WatchEvent::Error(s) => assert_eq!(s.code, 410),
        other => panic!("expected a 410, got {other:?}"),
    }
    let lp = ListParams::default()
        .at(&rv)
        .matching(kube::api::VersionMatch::NotOlderThan);
    match nodes.list(&lp).await {
        Err(kube::Error::Api(s)) => assert_eq!(s.code, 410),
        other => panic!("expected a 410, got {other:?}"),
    }

    // A metadata watch carries no status.
    let meta: Api<PartialObjectMeta<Node>> = Api::all(api.client().await?);
    let rv = api.resource_version().to_string();
    let mut mw = meta.watch(&WatchParams::default(), &rv).await?.boxed();
    api.heartbeat("a")?;
    assert!(matches!(next(&mut mw).await?, WatchEvent::Modified(m) if m.metadata.name.as_deref() == Some("a")));
    assert!(api.requests().iter().any(|r| r.watch && r.metadata_only && r.bytes > 0));
    Ok(())
}

#[tokio::test]
async fn the_runtime_watcher_relists_after_410_and_outage() -> anyhow::Result<()> {
    let (api, _) = KubeApi::start().await?;
    api.add_node("a", &["10.244.1.0/24"], &[]);
    let nodes: Api<PartialObjectMeta<Node>> = Api::all(api.client().await?);
    let mut w = watcher(nodes, watcher::Config::default()).boxed();
    assert!(matches!(next(&mut w).await?, Event::Init));
    assert!(matches!(next(&mut w).await?, Event::InitApply(_)));
    assert!(matches!(next(&mut w).await?, Event::InitDone));
    // Away, history compacted meanwhile, back: the watch cannot resume and re-lists.
    api.set_unavailable(true).await?;
    api.add_node("b", &["10.244.2.0/24"], &[]);
    api.compact();
    let mut saw_error = false;
    let relisted = async {
        loop {
            match w.next().await {
                Some(Err(_)) => {
                    saw_error = true;
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Some(Ok(Event::Init)) => break,
                _ => {}
            }
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    api.set_unavailable(false).await?;
    tokio::time::timeout(Duration::from_secs(20), relisted).await?;
    assert!(saw_error);
    let rest: Vec<_> = w.by_ref().take(3).try_collect().await?;
    assert!(matches!(rest[2], Event::InitDone), "{rest:?}");
    Ok(())
}

#[tokio::test]
async fn status_and_node_patches_merge_as_the_api_server_does() -> anyhow::Result<()> {
    let (api, _) = KubeApi::start().await?;
    api.add_node("a", &["10.244.1.0/24"], &[("keep", "1")]);
    let nodes: Api<Node> = Api::all(api.client().await?);
    let pp = PatchParams::default();
    let p = json!({
        "metadata": {"annotations": {"x/y": "z", "keep": null}},
        "spec": {"podCIDR": "10.9.9.0/24"},
        "status": {"conditions": [{"type": "NetworkUnavailable", "status": "False", "reason": "FlannelIsUp"}]}
    });
    let n = nodes.patch_status("a", &pp, &Patch::Strategic(&p)).await?;
    let conds = n.status.unwrap().conditions.unwrap();
    assert_eq!(conds.len(), 5, "merged by type into the kubelet's four");
    assert_eq!(
        n.metadata.annotations.as_ref().unwrap().get("x/y").map(String::as_str),
        Some("z")
    );
    assert!(!n.metadata.annotations.unwrap().contains_key("keep"));
    assert_eq!(
        n.spec.unwrap().pod_cidr.as_deref(),
        Some("10.244.1.0/24"),
        "status keeps spec"
    );

    let rv = api.resource_version();
    nodes.patch_status("a", &pp, &Patch::Strategic(&p)).await?;
    assert_eq!(api.resource_version(), rv, "a no-op patch is not a write");

    let m = json!({"spec": {"unschedulable": true}, "status": {"conditions": []}});
    let n = nodes.patch("a", &pp, &Patch::Merge(&m)).await?;
    assert_eq!(n.spec.unwrap().unschedulable, Some(true));
    assert_eq!(
        n.status.unwrap().conditions.unwrap().len(),
        5,
        "the node keeps its status"
    );

    // 500, not 503: the kube client retries 503s by itself for minutes.
    api.set_failing(Some(500));
    assert!(matches!(nodes.get("a").await, Err(kube::Error::Api(s)) if s.code == 500));
    api.set_failing(None);
    api.set_unavailable(true).await?;
    assert!(nodes.get("a").await.is_err());
    api.set_unavailable(false).await?;
    assert!(nodes.get("a").await.is_ok());
    Ok(())
}
