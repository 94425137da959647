//! Privileged tests: the real iptables, ip6tables and nft, each test in its own network
//! namespace (netfilter state is per namespace), checked against upstream's goldens.
//! They skip loudly without root, and fail instead when `CI` is set.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use super::render_tests::{fill, GOLDEN_FILTER, GOLDEN_NAT, GOLDEN_NFT_FORWARD, GOLDEN_NFT_POSTRTG};
use super::{RuleSet, TrafficManager, TrafficOptions};
use crate::netlink::testutil::privileged;

const RESYNC: Duration = Duration::from_millis(300);
const NAT_POLICIES: &str = "-P PREROUTING ACCEPT\n-P INPUT ACCEPT\n-P OUTPUT ACCEPT\n-P POSTROUTING ACCEPT\n";
const FILTER_POLICIES: &str = "-P INPUT ACCEPT\n-P FORWARD ACCEPT\n-P OUTPUT ACCEPT\n";
const NET4: &str = "10.42.0.0/16";
const SUB4: &str = "10.42.0.0/24";
const NET6: &str = "2001:cafe:42::/56";
const SUB6: &str = "2001:cafe:42::/64";

/// A network namespace `flt-trf-<pid>-<n>`, deleted on drop (also when the test panics).
struct Netns {
    name: String,
}

impl Netns {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "flt-trf-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .expect("run ip netns add");
        assert!(
            out.status.success(),
            "ip netns add {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { name }
    }

    /// A manager whose commands run in this namespace.
    fn manager(&self, opts: TrafficOptions) -> TrafficManager {
        TrafficManager::new(opts).with_command_prefix(["ip", "netns", "exec", self.name.as_str()])
    }

    /// Runs a command in the namespace; panics with its stderr if it fails.
    async fn sh(&self, argv: &[&str]) -> String {
        let out = self.try_sh(argv).await;
        assert!(
            out.status.success(),
            "{argv:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).expect("utf-8 output")
    }

    async fn try_sh(&self, argv: &[&str]) -> std::process::Output {
        tokio::process::Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(argv)
            .output()
            .await
            .expect("run ip netns exec")
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let out = Command::new("ip").args(["netns", "del", &self.name]).output();
        if !matches!(&out, Ok(o) if o.status.success()) {
            eprintln!("warning: could not delete netns {}: {out:?}", self.name);
        }
    }
}

fn opts(nftables: bool) -> TrafficOptions {
    TrafficOptions {
        masquerade: true,
        fully_random_disable: false,
        forward_rules: true,
        nftables,
        resync: RESYNC,
    }
}

fn v4(net: &str, sub: &str) -> RuleSet {
    RuleSet {
        network: Some(net.parse().unwrap()),
        subnet: Some(sub.parse().unwrap()),
        ..RuleSet::default()
    }
}

fn dual() -> RuleSet {
    RuleSet {
        ipv6_network: Some(NET6.parse().unwrap()),
        ipv6_subnet: Some(SUB6.parse().unwrap()),
        ..v4(NET4, SUB4)
    }
}

/// What `iptables -t nat -S` / `iptables -S` print with only flannel's rules installed.
fn want_nat(net: &str, sub: &str, v6: bool) -> String {
    NAT_POLICIES.to_string() + &fill(GOLDEN_NAT, net, sub, v6)
}

fn want_filter(net: &str) -> String {
    FILTER_POLICIES.to_string() + &fill(GOLDEN_FILTER, net, "", false)
}

/// `nft list table` for a table with both chains, from the reference's chain goldens.
fn want_nft_table(net: &str, sub: &str, v6: bool) -> String {
    let postrtg = fill(GOLDEN_NFT_POSTRTG, net, sub, v6);
    let forward = fill(GOLDEN_NFT_FORWARD, net, sub, v6);
    let body = |chain: &str| {
        chain
            .lines()
            .skip(1)
            .take(chain.lines().count() - 2)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (fam, table) = if v6 {
        ("ip6", "flannel-ipv6")
    } else {
        ("ip", "flannel-ipv4")
    };
    format!(
        "table {fam} {table} {{\n\tcomment \"rules for {table}\"\n{}\n\n{}\n}}\n",
        body(&postrtg),
        body(&forward)
    )
}

macro_rules! privileged_test {
    ($name:literal) => {
        if !privileged(concat!("traffic::netns_tests::", $name)) {
            return;
        }
    };
}

#[tokio::test]
async fn iptables_v4_rules_match_upstream_golden() {
    privileged_test!("iptables_v4_rules_match_upstream_golden");
    let ns = Netns::new();
    ns.manager(opts(false))
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    assert_eq!(
        ns.sh(&["iptables", "-t", "nat", "-S"]).await,
        want_nat(NET4, SUB4, false)
    );
    assert_eq!(ns.sh(&["iptables", "-S"]).await, want_filter(NET4));
    assert!(
        !ns.sh(&["ip6tables-save"]).await.contains("FLANNEL"),
        "IPv6 is not configured"
    );
}

#[tokio::test]
async fn iptables_dual_stack_rules_match_upstream_golden() {
    privileged_test!("iptables_dual_stack_rules_match_upstream_golden");
    let ns = Netns::new();
    ns.manager(opts(false))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    assert_eq!(
        ns.sh(&["iptables", "-t", "nat", "-S"]).await,
        want_nat(NET4, SUB4, false)
    );
    assert_eq!(
        ns.sh(&["ip6tables", "-t", "nat", "-S"]).await,
        want_nat(NET6, SUB6, true)
    );
    assert_eq!(ns.sh(&["ip6tables", "-S"]).await, want_filter(NET6));

    // --ip-masq-fully-random-disable drops --random-fully, nothing else.
    let ns = Netns::new();
    let plain = TrafficOptions {
        fully_random_disable: true,
        ..opts(false)
    };
    ns.manager(plain).setup(&dual(), &RuleSet::default()).await.unwrap();
    let want = want_nat(NET6, SUB6, true).replace(" --random-fully", "");
    assert_eq!(ns.sh(&["ip6tables", "-t", "nat", "-S"]).await, want);
}

#[tokio::test]
async fn nft_v4_rules_match_upstream_golden() {
    privileged_test!("nft_v4_rules_match_upstream_golden");
    let ns = Netns::new();
    ns.manager(opts(true))
        .setup(&v4(NET4, SUB4), &RuleSet::default())
        .await
        .unwrap();
    let chain = ns.sh(&["nft", "list", "chain", "ip", "flannel-ipv4", "postrtg"]).await;
    assert_eq!(chain, fill(GOLDEN_NFT_POSTRTG, NET4, SUB4, false));
    let chain = ns.sh(&["nft", "list", "chain", "ip", "flannel-ipv4", "forward"]).await;
    assert_eq!(chain, fill(GOLDEN_NFT_FORWARD, NET4, SUB4, false));
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await,
        want_nft_table(NET4, SUB4, false)
    );
    // Upstream creates both tables whatever the families.
    let v6 = ns.sh(&["nft", "list", "table", "ip6", "flannel-ipv6"]).await;
    assert_eq!(
        v6,
        "table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}\n"
    );
}

#[tokio::test]
async fn nft_v6_rules_match_upstream_golden() {
    privileged_test!("nft_v6_rules_match_upstream_golden");
    let ns = Netns::new();
    ns.manager(opts(true))
        .setup(&dual(), &RuleSet::default())
        .await
        .unwrap();
    let chain = ns.sh(&["nft", "list", "chain", "ip6", "flannel-ipv6", "postrtg"]).await;
    assert_eq!(chain, fill(GOLDEN_NFT_POSTRTG, NET6, SUB6, true));
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip6", "flannel-ipv6"]).await,
        want_nft_table(NET6, SUB6, true)
    );
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await,
        want_nft_table(NET4, SUB4, false)
    );
}

#[tokio::test]
async fn setup_twice_adds_nothing() {
    privileged_test!("setup_twice_adds_nothing");
    let ns = Netns::new();
    for _ in 0..2 {
        ns.manager(opts(false))
            .setup(&dual(), &RuleSet::default())
            .await
            .unwrap();
    }
    assert_eq!(
        ns.sh(&["iptables", "-t", "nat", "-S"]).await,
        want_nat(NET4, SUB4, false)
    );
    assert_eq!(ns.sh(&["iptables", "-S"]).await, want_filter(NET4));
    assert_eq!(
        ns.sh(&["ip6tables", "-t", "nat", "-S"]).await,
        want_nat(NET6, SUB6, true)
    );

    let ns = Netns::new();
    let manager = ns.manager(opts(true));
    for _ in 0..2 {
        manager.setup(&dual(), &RuleSet::default()).await.unwrap();
    }
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip", "flannel-ipv4"]).await,
        want_nft_table(NET4, SUB4, false)
    );
    assert_eq!(
        ns.sh(&["nft", "list", "table", "ip6", "flannel-ipv6"]).await,
        want_nft_table(NET6, SUB6, true)
    );
}

// After the macro above, which the repair tests use too.
mod repair;
