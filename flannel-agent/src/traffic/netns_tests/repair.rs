//! Privileged tests of repair and cleanup: the resync loop, subnet changes, switching
//! modes, disabled features, foreign rules and error messages.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::*;

/// Polls `check` until it holds; returns how long it took, or panics after `limit`.
async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while !check().await {
        assert!(start.elapsed() < limit, "{what}: not repaired within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    start.elapsed()
}

/// Repair budget: one resync period plus the time the tools take on a busy 2-core box.
const REPAIR_LIMIT: Duration = Duration::from_millis(RESYNC.as_millis() as u64 + 1200);

#[tokio::test]
async fn iptables_resync_restores_deleted_rules_and_flushed_chains() {
    privileged_test!("iptables_resync_restores_deleted_rules_and_flushed_chains");
    let ns = Netns::new();
    let manager = std::sync::Arc::new(ns.manager(opts(false)));
    let rules = v4(NET4, SUB4);
    manager.setup(&rules, &RuleSet::default()).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (manager, shutdown) = (manager.clone(), shutdown.clone());
        async move { manager.run(&rules, shutdown).await }
    });
    let nat_ok = || async { ns.sh(&["iptables", "-t", "nat", "-S"]).await == want_nat(NET4, SUB4, false) };
    let filter_ok = || async { ns.sh(&["iptables", "-S"]).await == want_filter(NET4) };

    // One masquerade rule deleted by hand (the third, so order matters on repair).
    let spec = [
        "-s",
        NET4,
        "-d",
        SUB4,
        "-m",
        "comment",
        "--comment",
        "flanneld masq",
        "-j",
        "RETURN",
    ];
    ns.sh(&[&["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG"][..], &spec].concat())
        .await;
    let took = eventually(REPAIR_LIMIT, "deleted rule", nat_ok).await;
    eprintln!("deleted masquerade rule restored after {took:?}");

    // The chain flushed by hand.
    ns.sh(&["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"]).await;
    let took = eventually(REPAIR_LIMIT, "flushed chain", nat_ok).await;
    eprintln!("flushed chain restored after {took:?}");

    // The forward jump deleted and the chain removed, in one transaction: as separate
    // commands, a resync between them puts the jump back and the chain delete fails (busy).
    ns.sh(&[
        "sh",
        "-c",
        "printf '*filter\\n-D FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\\n\
         -F FLANNEL-FWD\\n-X FLANNEL-FWD\\nCOMMIT\\n' | iptables-restore -w --noflush",
    ])
    .await;
    let took = eventually(REPAIR_LIMIT, "removed chain", filter_ok).await;
    eprintln!("removed forward chain restored after {took:?}");

    // Stopping leaves everything in place.
    shutdown.cancel();
    task.await.unwrap();
    assert!(nat_ok().await && filter_ok().await, "rules stay after shutdown");
}

#[tokio::test]
async fn nft_resync_restores_flushed_chain_and_deleted_table() {
    privileged_test!("nft_resync_restores_flushed_chain_and_deleted_table");
    let ns = Netns::new();
    let manager = std::sync::Arc::new(ns.manager(opts(true)));
    let rules = dual();
    manager.setup(&rules, &RuleSet::default()).await.unwrap();
    let shutdown = CancellationToken::new();
    let task = tokio::spawn({
        let (manager, shutdown) = (manager.clone(), shutdown.clone());
        async move { manager.run(&rules, shutdown).await }
    });
    let ok = || async {
        ns.try_sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await.stdout
            == want_nft_table(NET4, SUB4, false).as_bytes()
            && ns.try_sh(&["nft", "list", "table", "ip6", "flannel-ipv6"]).await.stdout
                == want_nft_table(NET6, SUB6, true).as_bytes()
    };
    ns.sh(&["nft", "flush", "chain", "ip", "flannel-ipv4", "postrtg"]).await;
    let took = eventually(REPAIR_LIMIT, "flushed nft chain", ok).await;
    eprintln!("flushed nft chain restored after {took:?}");
    ns.sh(&["nft", "delete", "table", "ip6", "flannel-ipv6"]).await;
    let took = eventually(REPAIR_LIMIT, "deleted nft table", ok).await;
    eprintln!("deleted nft table restored after {took:?}");
    shutdown.cancel();
    task.await.unwrap();
    assert!(ok().await, "rules stay after shutdown");
}

#[tokio::test]
async fn subnet_change_recycles_old_rules() {
    privileged_test!("subnet_change_recycles_old_rules");
    let ns = Netns::new();
    let old = v4("10.50.0.0/16", "10.50.7.0/24");
    ns.manager(opts(false)).setup(&old, &RuleSet::default()).await.unwrap();
    assert_eq!(
        ns.sh(&["iptables", "-t", "nat", "-S"]).await,
        want_nat("10.50.0.0/16", "10.50.7.0/24", false)
    );

    // A new run with a new network and subnet; `previous` as read from subnet.env.
    let previous = RuleSet::parse("FLANNEL_NETWORK=10.50.0.0/16\nFLANNEL_SUBNET=10.50.7.1/24\n");
    assert_eq!(previous, old);
    ns.manager(opts(false)).setup(&v4(NET4, SUB4), &previous).await.unwrap();
    let nat = ns.sh(&["iptables", "-t", "nat", "-S"]).await;
    assert_eq!(nat, want_nat(NET4, SUB4, false));
    assert!(!nat.contains("10.50.") && !ns.sh(&["iptables", "-S"]).await.contains("10.50."));
}

#[tokio::test]
async fn switching_modes_removes_the_other_modes_rules() {
    privileged_test!("switching_modes_removes_the_other_modes_rules");
    let ns = Netns::new();
    ns.manager(opts(false))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();

    ns.manager(opts(true))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    assert_eq!(ns.sh(&["iptables", "-t", "nat", "-S"]).await, NAT_POLICIES);
    assert_eq!(ns.sh(&["iptables", "-S"]).await, FILTER_POLICIES);
    assert_eq!(ns.sh(&["ip6tables", "-t", "nat", "-S"]).await, NAT_POLICIES);
    assert_eq!(
        ns.sh(&["ip6tables", "-S"]).await,
        FILTER_POLICIES,
        "FLANNEL-FWD goes too (upstream forgets it)"
    );
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await,
        want_nft_table(NET4, SUB4, false)
    );

    ns.manager(opts(false))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    assert!(!ns.sh(&["nft", "list", "tables"]).await.contains("flannel-"));
    assert_eq!(
        ns.sh(&["iptables", "-t", "nat", "-S"]).await,
        want_nat(NET4, SUB4, false)
    );
    assert_eq!(ns.sh(&["ip6tables", "-S"]).await, want_filter(NET6));
}

#[tokio::test]
async fn foreign_rules_are_left_alone_and_come_first() {
    privileged_test!("foreign_rules_are_left_alone_and_come_first");
    let ns = Netns::new();
    let foreign_nat = "-A POSTROUTING -s 192.168.0.0/16 -m comment --comment kube -j MASQUERADE";
    let foreign_fwd = "-A FORWARD -s 192.168.0.0/16 -j DROP";
    ns.sh(&[
        "iptables",
        "-t",
        "nat",
        "-A",
        "POSTROUTING",
        "-s",
        "192.168.0.0/16",
        "-m",
        "comment",
        "--comment",
        "kube",
        "-j",
        "MASQUERADE",
    ])
    .await;
    ns.sh(&["iptables", "-A", "FORWARD", "-s", "192.168.0.0/16", "-j", "DROP"])
        .await;
    ns.sh(&["nft", "add", "table", "inet", "foreign"]).await;

    ns.manager(opts(false))
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    let nat = ns.sh(&["iptables", "-t", "nat", "-S"]).await;
    let golden = fill(GOLDEN_NAT, NET4, SUB4, false);
    let (first, rest) = golden.split_once('\n').unwrap();
    assert_eq!(
        nat,
        format!("{NAT_POLICIES}{first}\n{foreign_nat}\n{rest}"),
        "our jump comes after the foreign rule"
    );
    let filter = ns.sh(&["iptables", "-S"]).await;
    assert!(filter.contains(&format!(
        "{foreign_fwd}\n-A FORWARD -m comment --comment \"flanneld forward\" -j FLANNEL-FWD\n"
    )));

    // A repair (after a flush of our chain) still touches nothing foreign.
    ns.sh(&["iptables", "-t", "nat", "-F", "FLANNEL-POSTRTG"]).await;
    let manager = ns.manager(opts(false));
    let want = crate::traffic::render::masq_chain(
        crate::traffic::render::Family::V4,
        NET4.parse().unwrap(),
        SUB4.parse().unwrap(),
        true,
    );
    let caps = crate::traffic::iptables::Caps {
        wait: true,
        random_fully: true,
    };
    assert!(
        manager
            .ipt_ensure(crate::traffic::render::Family::V4, caps, &want)
            .await
            .unwrap(),
        "drift detected"
    );
    assert!(
        !manager
            .ipt_ensure(crate::traffic::render::Family::V4, caps, &want)
            .await
            .unwrap(),
        "then in sync"
    );
    assert_eq!(ns.sh(&["iptables", "-t", "nat", "-S"]).await, nat);

    // Switching to nftables and back removes only flannel's objects.
    ns.manager(opts(true))
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    ns.manager(opts(false))
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    assert!(ns.sh(&["iptables", "-t", "nat", "-S"]).await.contains(foreign_nat));
    assert!(ns.sh(&["iptables", "-S"]).await.contains(foreign_fwd));
    assert!(ns.sh(&["nft", "list", "tables"]).await.contains("table inet foreign"));
}

#[tokio::test]
async fn disabled_features_remove_their_chains() {
    privileged_test!("disabled_features_remove_their_chains");
    let ns = Netns::new();
    ns.manager(opts(false))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    let no_masq = TrafficOptions {
        masquerade: false,
        ..opts(false)
    };
    ns.manager(no_masq.clone())
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    assert_eq!(ns.sh(&["iptables", "-t", "nat", "-S"]).await, NAT_POLICIES);
    assert_eq!(ns.sh(&["ip6tables", "-t", "nat", "-S"]).await, NAT_POLICIES);
    assert_eq!(ns.sh(&["iptables", "-S"]).await, want_filter(NET4));

    // Dropping IPv6 from the config removes its chains too.
    ns.manager(no_masq)
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    assert_eq!(ns.sh(&["ip6tables", "-S"]).await, FILTER_POLICIES);

    let ns = Netns::new();
    ns.manager(opts(true))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    let no_fwd = TrafficOptions {
        forward_rules: false,
        ..opts(true)
    };
    ns.manager(no_fwd).setup(&dual(), &RuleSet::default()).await.unwrap();
    let table = ns.sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await;
    assert!(
        table.contains("chain postrtg") && !table.contains("chain forward"),
        "{table}"
    );
}

#[tokio::test]
async fn errors_name_the_command_and_say_what_to_do() {
    privileged_test!("errors_name_the_command_and_say_what_to_do");
    let ns = Netns::new();
    // A tool that cannot be started (here the prefix): the error names the command and asks about nft.
    let missing = TrafficManager::new(opts(true)).with_command_prefix(["/nonexistent/flannel-test-prefix"]);
    let err = missing.setup(&v4(NET4, SUB4), &RuleSet::default()).await.unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("cannot start `/nonexistent/flannel-test-prefix nft"),
        "{text}"
    );
    assert!(text.contains("is nft (nftables) installed"), "{text}");

    // nft refuses a chain of an unknown type: the error carries nft's stderr and a hint.
    let manager = ns.manager(opts(true));
    let err = manager
        .exec
        .run(
            crate::traffic::exec::Tool::Nft,
            "nft",
            &["-f", "-"],
            Some("add table ip t\nadd chain ip t c { type bogus hook input priority 0 ; }\n"),
            "table ip t",
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("failed on table ip t")
            && err.contains("Error:")
            && err.contains("does the kernel support nf_tables"),
        "{err}"
    );
}
