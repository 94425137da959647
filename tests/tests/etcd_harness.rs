//! Tests of the etcd harness itself, against the real `etcd` binary: if these fail, the etcd
//! subnet manager tests built on it cannot be trusted either.

use std::time::{Duration, Instant};

use anyhow::Context;
use etcd_client::{ConnectOptions, GetOptions, WatchOptions};
use flannel_tests::etcd::{
    EtcdOptions, EtcdServer, DEFAULT_PREFIX, FLANNEL_PASSWORD, FLANNEL_USER, ROOT_PASSWORD, ROOT_USER,
};

/// Bound on requests that are expected to fail, so a hang shows up as a clear failure.
const EXPECTED_FAILURE_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs `request`, expecting etcd to refuse it, and returns the error text. Silence is not a
/// refusal: a request that hangs fails the test too.
async fn expect_failure<T, E: std::fmt::Display>(
    what: &str,
    request: impl std::future::Future<Output = Result<T, E>>,
) -> String {
    match tokio::time::timeout(EXPECTED_FAILURE_TIMEOUT, request).await {
        Ok(Ok(_)) => panic!("{what} unexpectedly succeeded"),
        // `#` shows the whole chain of an anyhow error.
        Ok(Err(e)) => format!("{e:#}"),
        Err(_) => panic!("{what} got no answer within {EXPECTED_FAILURE_TIMEOUT:?}; expected a refusal"),
    }
}

#[tokio::test]
async fn starts_and_serves_put_get_delete() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    assert!(etcd.endpoint().starts_with("http://127.0.0.1:"), "{}", etcd.endpoint());

    let first = etcd
        .put("/coreos.com/network/config", r#"{"Network":"10.5.0.0/16"}"#)
        .await?;
    etcd.put("/coreos.com/network/subnets/10.5.1.0-24", "a").await?;
    let last = etcd.put("/coreos.com/network/subnets/10.5.2.0-24", "b").await?;
    assert!(last > first);
    assert_eq!(etcd.revision().await?, last);

    assert_eq!(
        etcd.get("/coreos.com/network/config").await?.as_deref(),
        Some(r#"{"Network":"10.5.0.0/16"}"#)
    );
    assert_eq!(etcd.get("/missing").await?, None);
    assert_eq!(
        etcd.get_prefix("/coreos.com/network/subnets/").await?,
        vec![
            ("/coreos.com/network/subnets/10.5.1.0-24".to_owned(), "a".to_owned()),
            ("/coreos.com/network/subnets/10.5.2.0-24".to_owned(), "b".to_owned()),
        ]
    );

    assert_eq!(etcd.delete("/coreos.com/network/subnets/10.5.1.0-24").await?, 1);
    assert_eq!(etcd.delete("/coreos.com/network/subnets/10.5.1.0-24").await?, 0);
    assert_eq!(etcd.get_prefix("/coreos.com/network/subnets/").await?.len(), 1);
    Ok(())
}

#[tokio::test]
async fn restart_keeps_data_and_port_and_clients_reconnect() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.put("/k", "before").await?;
    let endpoint = etcd.endpoint();
    let first_pid = etcd.pid();
    // A client made before the restart, like a long-running flanneld's.
    let mut survivor = etcd.connect(etcd.connect_options()?).await?;

    etcd.stop().await?;
    assert!(!etcd.is_running());
    etcd.restart().await?;
    assert_eq!(etcd.endpoint(), endpoint);
    assert_ne!(etcd.pid(), first_pid);
    assert_eq!(etcd.get("/k").await?.as_deref(), Some("before"));

    // The old connection is dead; the client must come back by itself within a few tries.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout(Duration::from_secs(1), survivor.put("/k", "after", None)).await {
            Ok(Ok(_)) => break,
            outcome if Instant::now() >= deadline => panic!("old client did not reconnect: {outcome:?}"),
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    assert_eq!(etcd.get("/k").await?.as_deref(), Some("after"));

    // A crash instead of a clean stop loses nothing that was acknowledged either.
    etcd.kill()?;
    etcd.restart().await?;
    assert_eq!(etcd.get("/k").await?.as_deref(), Some("after"));
    Ok(())
}

#[tokio::test]
async fn restart_reports_a_port_taken_while_etcd_was_down() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.stop().await?;
    let port = etcd.endpoint().rsplit(':').next().context("port")?.parse::<u16>()?;
    let _squatter = std::net::TcpListener::bind(("127.0.0.1", port))?;
    let err = etcd.restart().await.expect_err("the client port is taken");
    let msg = format!("{err:#}");
    assert!(msg.contains(&format!("another process took port {port}")), "{msg}");
    assert!(msg.contains("address already in use"), "{msg}");
    Ok(())
}

#[tokio::test]
async fn requests_to_a_stopped_etcd_fail_instead_of_hanging() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start(EtcdOptions::default()).await?;
    etcd.stop().await?;
    let started = Instant::now();
    let err = etcd.get("/k").await.expect_err("etcd is stopped");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    assert!(format!("{err:#}").contains(&etcd.endpoint()), "{err:#}");
    Ok(())
}

#[tokio::test]
async fn tls_requires_a_client_certificate() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default().with_tls()).await?;
    assert!(etcd.endpoint().starts_with("https://127.0.0.1:"), "{}", etcd.endpoint());
    let tls = etcd.tls().context("TLS files")?;
    for file in [&tls.ca, &tls.client_cert, &tls.client_key] {
        assert!(
            std::fs::read_to_string(file)?.starts_with("-----BEGIN "),
            "{}",
            file.display()
        );
    }

    let with_cert = ConnectOptions::new().with_tls(tls.client_tls_options()?);
    let mut client = etcd.connect(with_cert).await?;
    client.put("/tls", "ok", None).await?;
    assert_eq!(etcd.get("/tls").await?.as_deref(), Some("ok"));

    // The server is trusted, but without a certificate of its own the client is turned away.
    let without_cert = ConnectOptions::new().with_tls(tls.server_only_tls_options()?);
    let mut client = etcd.connect(without_cert).await?;
    let err = expect_failure("get without a client certificate", client.get("/tls", None)).await;
    // Refused in the TLS handshake, before any request reaches etcd's server code.
    assert!(!err.contains("etcdserver"), "{err}");
    Ok(())
}

#[tokio::test]
async fn auth_rejects_a_wrong_password_and_limits_flannel_to_its_prefix() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default().with_auth(DEFAULT_PREFIX)).await?;

    let wrong = ConnectOptions::new().with_user(FLANNEL_USER, "not-the-password");
    let err = expect_failure("login with a wrong password", etcd.connect(wrong)).await;
    assert!(err.contains("authentication failed"), "{err}");

    let right = ConnectOptions::new().with_user(FLANNEL_USER, FLANNEL_PASSWORD);
    let mut flannel = etcd.connect(right).await?;
    let key = format!("{DEFAULT_PREFIX}config");
    flannel.put(key.as_str(), "{}", None).await?;
    assert_eq!(etcd.get(&key).await?.as_deref(), Some("{}"));
    let err = expect_failure("put outside the prefix", flannel.put("/elsewhere", "x", None)).await;
    assert!(err.contains("permission denied"), "{err}");

    // No credentials at all: the request has no user and is refused.
    let mut anonymous = etcd.connect(ConnectOptions::new()).await?;
    let err = expect_failure("anonymous put", anonymous.put(key.as_str(), "x", None)).await;
    assert!(err.contains("user name is empty"), "{err}");

    // Root, which the helpers use, may use any key.
    let root = ConnectOptions::new().with_user(ROOT_USER, ROOT_PASSWORD);
    etcd.connect(root).await?.put("/elsewhere", "x", None).await?;
    Ok(())
}

#[tokio::test]
async fn tls_and_auth_together() -> anyhow::Result<()> {
    let mut etcd = EtcdServer::start(EtcdOptions::default().with_tls().with_auth(DEFAULT_PREFIX)).await?;
    let tls = etcd.tls().context("TLS files")?.client_tls_options()?;

    let options = ConnectOptions::new()
        .with_tls(tls.clone())
        .with_user(FLANNEL_USER, FLANNEL_PASSWORD);
    etcd.connect(options)
        .await?
        .put(format!("{DEFAULT_PREFIX}k"), "v", None)
        .await?;

    // With auth on, etcd 3.4 takes the CN of a client certificate as the user of a request
    // without a token. The harness's CN names no user, so the certificate alone is refused.
    let mut cert_only = etcd.connect(ConnectOptions::new().with_tls(tls.clone())).await?;
    let err = expect_failure(
        "put with only a certificate",
        cert_only.put(format!("{DEFAULT_PREFIX}k"), "x", None),
    )
    .await;
    assert!(err.contains("permission denied"), "{err}");

    etcd.restart().await?;
    let options = ConnectOptions::new().with_tls(tls).with_user(FLANNEL_USER, "wrong");
    let err = expect_failure("login with a wrong password after restart", etcd.connect(options)).await;
    assert!(err.contains("authentication failed"), "{err}");
    assert_eq!(etcd.get(&format!("{DEFAULT_PREFIX}k")).await?.as_deref(), Some("v"));
    Ok(())
}

#[tokio::test]
async fn compaction_cancels_a_watch_from_an_old_revision() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default()).await?;
    let old = etcd.put("/w", "1").await?;
    etcd.put("/w", "2").await?;
    let latest = etcd.put("/w", "3").await?;
    etcd.compact(latest).await?;

    let mut client = etcd.client().await?;
    let err = expect_failure(
        "read at a compacted revision",
        client.get("/w", Some(GetOptions::new().with_revision(old))),
    )
    .await;
    assert!(err.contains("compacted"), "{err}");

    let mut watch = client
        .watch("/w", Some(WatchOptions::new().with_start_revision(old)))
        .await?;
    // etcd first confirms the watch was created, then cancels it because of the compaction.
    let canceled = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(response) = watch.message().await? {
            if response.canceled() {
                return Ok::<_, etcd_client::Error>(Some(response));
            }
        }
        Ok(None)
    })
    .await
    .context("watch was neither canceled nor ended")??
    .context("watch stream ended without a cancel")?;
    assert_eq!(canceled.compact_revision(), latest);
    // etcd 3.4 leaves the reason empty for a compaction (3.5 fills it in); the compact
    // revision is what a client has to go by.
    let reason = canceled.cancel_reason();
    assert!(reason.is_empty() || reason.contains("compacted"), "{reason}");
    Ok(())
}

#[tokio::test]
async fn drop_kills_etcd_and_removes_its_directory() -> anyhow::Result<()> {
    let etcd = EtcdServer::start(EtcdOptions::default().with_tls()).await?;
    let pid = libc::pid_t::try_from(etcd.pid().context("pid")?)?;
    let dir = etcd.data_dir();
    assert!(dir.exists());
    drop(etcd);
    assert!(!dir.exists(), "{} left behind", dir.display());
    // SAFETY: signal 0 only probes for existence; etcd was reaped on drop.
    assert_ne!(
        unsafe { libc::kill(pid, 0) },
        0,
        "etcd (pid {pid}) outlived its harness"
    );
    Ok(())
}

#[tokio::test]
async fn a_failed_start_reports_etcd_output() {
    let options = EtcdOptions {
        start_timeout: Duration::ZERO,
        ..EtcdOptions::default()
    };
    let err = EtcdServer::start(options)
        .await
        .expect_err("no etcd serves within zero time");
    let msg = format!("{err:#}");
    assert!(msg.contains("did not serve") && msg.contains("etcd.1 stderr"), "{msg}");
}
