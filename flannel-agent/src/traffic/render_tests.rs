//! The rendering against upstream's golden output (reference/flannel-upstream.md §6),
//! byte for byte, plus the parsers. The goldens are shared with `netns_tests`, which
//! checks that the kernel really ends up with them.

use super::exec::with_failed_line;
use super::iptables::{parse_version, Caps};
use super::render::*;
use super::RuleSet;

/// `iptables -t nat -S` lines flannel adds (e2e golden), `<NET>`/`<SUB>` to be filled.
pub(super) const GOLDEN_NAT: &str = r#"-N FLANNEL-POSTRTG
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s <SUB> -d <NET> -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s <NET> -d <SUB> -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG ! -s <NET> -d <SUB> -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s <NET> ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
-A FLANNEL-POSTRTG ! -s <NET> -d <NET> -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
"#;

/// `iptables -S` lines flannel adds to the filter table (`-N` first, as `-S` prints it).
pub(super) const GOLDEN_FILTER: &str = r#"-N FLANNEL-FWD
-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD
-A FLANNEL-FWD -s <NET> -m comment --comment "flanneld forward" -j ACCEPT
-A FLANNEL-FWD -d <NET> -m comment --comment "flanneld forward" -j ACCEPT
"#;

/// `nft list chain ip flannel-ipv4 postrtg` (golden output, with upstream's quirks).
pub(super) const GOLDEN_NFT_POSTRTG: &str = "table ip flannel-ipv4 {
\tchain postrtg {
\t\tcomment \"chain to manage traffic masquerading by flannel\"
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tmeta mark 0x00004000 return
\t\tip saddr <SUB> ip daddr <NET> return
\t\tip saddr <NET> ip daddr <SUB> return
\t\tip saddr != <SUB> ip daddr <NET> return
\t\tip saddr <NET> ip daddr != 224.0.0.0/4 masquerade fully-random
\t\tip saddr != <NET> ip daddr <NET> masquerade fully-random
\t}
}
";

/// `nft list chain ip flannel-ipv4 forward`.
pub(super) const GOLDEN_NFT_FORWARD: &str = "table ip flannel-ipv4 {
\tchain forward {
\t\tcomment \"chain to accept flannel traffic\"
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr <NET> accept
\t\tip daddr <NET> accept
\t}
}
";

/// A golden text for a network and subnet; `v6` turns it into the IPv6 twin as §6
/// describes it (ip6tables / `ip6`, multicast `ff00::/8`, table `flannel-ipv6`).
pub(super) fn fill(golden: &str, net: &str, sub: &str, v6: bool) -> String {
    let text = golden.replace("<NET>", net).replace("<SUB>", sub);
    if !v6 {
        return text;
    }
    text.replace("224.0.0.0/4", "ff00::/8")
        .replace("table ip flannel-ipv4", "table ip6 flannel-ipv6")
        .replace("ip saddr", "ip6 saddr")
        .replace("ip daddr", "ip6 daddr")
}

/// The `-A` lines of a golden `-S` text (what flannel renders; `-N` is the declaration).
fn appends(golden: &str) -> Vec<String> {
    golden
        .lines()
        .filter(|l| l.starts_with("-A "))
        .map(String::from)
        .collect()
}

fn lines(chain: &IptChain) -> Vec<String> {
    std::iter::once(chain.jump.clone())
        .chain(chain.rules.iter().cloned())
        .collect()
}

#[test]
fn iptables_masq_rules_match_upstream_golden() {
    let (net, sub) = ("10.42.0.0/16", "10.42.0.0/24");
    let chain = masq_chain(Family::V4, net.parse().unwrap(), sub.parse().unwrap(), true);
    assert_eq!(lines(&chain), appends(&fill(GOLDEN_NAT, net, sub, false)));
    assert_eq!(
        (chain.table, chain.chain, chain.parent),
        ("nat", "FLANNEL-POSTRTG", "POSTROUTING")
    );

    // Host bits are cleared, as upstream prints the lease's network address.
    let sloppy = masq_chain(
        Family::V4,
        "10.42.3.7/16".parse().unwrap(),
        "10.42.0.1/24".parse().unwrap(),
        true,
    );
    assert_eq!(sloppy, chain);

    // Without --random-fully (unsupported or --ip-masq-fully-random-disable).
    let plain = masq_chain(Family::V4, net.parse().unwrap(), sub.parse().unwrap(), false);
    let want = fill(GOLDEN_NAT, net, sub, false).replace(" --random-fully", "");
    assert_eq!(lines(&plain), appends(&want));
}

#[test]
fn ip6tables_masq_rules_match_upstream_golden() {
    let (net, sub) = ("2001:cafe:42::/56", "2001:cafe:42::/64");
    let chain = masq_chain(Family::V6, net.parse().unwrap(), sub.parse().unwrap(), true);
    assert_eq!(lines(&chain), appends(&fill(GOLDEN_NAT, net, sub, true)));
    assert!(chain.rules[4].contains("! -d ff00::/8"));
}

#[test]
fn forward_rules_match_upstream_golden() {
    let chain = forward_chain("10.42.0.0/16".parse().unwrap());
    assert_eq!(lines(&chain), appends(&fill(GOLDEN_FILTER, "10.42.0.0/16", "", false)));
    assert_eq!(
        (chain.table, chain.chain, chain.parent),
        ("filter", "FLANNEL-FWD", "FORWARD")
    );
    let v6 = forward_chain("2001:cafe:42::/56".parse().unwrap());
    assert_eq!(
        v6.rules[1],
        r#"-A FLANNEL-FWD -d 2001:cafe:42::/56 -m comment --comment "flanneld forward" -j ACCEPT"#
    );
}

fn v4_table(masq: bool, forward: bool) -> NftTable {
    NftTable {
        family: Family::V4,
        masq: masq.then(|| ("10.42.0.0/16".parse().unwrap(), "10.42.0.0/24".parse().unwrap())),
        forward: forward.then(|| "10.42.0.0/16".parse().unwrap()),
    }
}

/// Extracts one chain of a rendered table listing, as `nft list chain` prints it.
pub(super) fn chain_of_listing(listing: &str, family: &str, table: &str, chain: &str) -> String {
    let start = listing.find(&format!("\tchain {chain} {{")).expect("chain in listing");
    let end = start + listing[start..].find("\t}\n").expect("chain end") + 3;
    format!("table {family} {table} {{\n{}}}\n", &listing[start..end])
}

#[test]
fn nft_listing_matches_upstream_golden() {
    let listing = nft_listing(&v4_table(true, true), true);
    let (net, sub) = ("10.42.0.0/16", "10.42.0.0/24");
    let postrtg = chain_of_listing(&listing, "ip", "flannel-ipv4", "postrtg");
    assert_eq!(postrtg, fill(GOLDEN_NFT_POSTRTG, net, sub, false));
    let forward = chain_of_listing(&listing, "ip", "flannel-ipv4", "forward");
    assert_eq!(forward, fill(GOLDEN_NFT_FORWARD, net, sub, false));
    assert!(listing.starts_with("table ip flannel-ipv4 {\n\tcomment \"rules for flannel-ipv4\"\n\tchain postrtg {"));
    assert!(
        listing.contains("\t}\n\n\tchain forward {"),
        "nft separates chains with a blank line"
    );

    let empty = NftTable {
        family: Family::V6,
        masq: None,
        forward: None,
    };
    assert_eq!(
        nft_listing(&empty, true),
        "table ip6 flannel-ipv6 {\n\tcomment \"rules for flannel-ipv6\"\n}\n"
    );
}

#[test]
fn nft_script_writes_one_transaction() {
    let v6 = NftTable {
        family: Family::V6,
        masq: None,
        forward: Some("2001:cafe:42::/56".parse().unwrap()),
    };
    let script = nft_script(&[v4_table(true, false), v6], false);
    assert_eq!(
        script,
        r#"add table ip flannel-ipv4 { comment "rules for flannel-ipv4" ; }
add chain ip flannel-ipv4 postrtg { type nat hook postrouting priority 100 ; comment "chain to manage traffic masquerading by flannel" ; }
flush chain ip flannel-ipv4 postrtg
add rule ip flannel-ipv4 postrtg meta mark 0x4000 return
add rule ip flannel-ipv4 postrtg ip saddr 10.42.0.0/24 ip daddr 10.42.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.42.0.0/16 ip daddr 10.42.0.0/24 return
add rule ip flannel-ipv4 postrtg ip saddr != 10.42.0.0/24 ip daddr 10.42.0.0/16 return
add rule ip flannel-ipv4 postrtg ip saddr 10.42.0.0/16 ip daddr != 224.0.0.0/4 masquerade
add rule ip flannel-ipv4 postrtg ip saddr != 10.42.0.0/16 ip daddr 10.42.0.0/16 masquerade
add chain ip flannel-ipv4 forward
flush chain ip flannel-ipv4 forward
delete chain ip flannel-ipv4 forward
add table ip6 flannel-ipv6 { comment "rules for flannel-ipv6" ; }
add chain ip6 flannel-ipv6 postrtg
flush chain ip6 flannel-ipv6 postrtg
delete chain ip6 flannel-ipv6 postrtg
add chain ip6 flannel-ipv6 forward { type filter hook forward priority 0 ; comment "chain to accept flannel traffic" ; }
flush chain ip6 flannel-ipv6 forward
add rule ip6 flannel-ipv6 forward ip6 saddr 2001:cafe:42::/56 accept
add rule ip6 flannel-ipv6 forward ip6 daddr 2001:cafe:42::/56 accept
"#
    );
    assert_eq!(
        nft_delete_tables(&Family::ALL),
        "delete table ip flannel-ipv4\ndelete table ip6 flannel-ipv6\n"
    );
    assert_eq!(
        nft_tables_present("table ip nat\ntable ip6 flannel-ipv6\ntable inet flannel-ipv4\n"),
        [Family::V6],
        "only flannel's own family/name pairs count"
    );
    assert!(nft_random_fully_probe().contains("masqueradeTest"));
}

const SAVE: &str = r#"# Generated by iptables-save v1.8.9 (nf_tables) on Mon Nov 23 17:58:05 2026
*nat
:PREROUTING ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
:KUBE-POSTROUTING - [0:0]
-A POSTROUTING -m comment --comment "kubernetes postrouting rules" -j KUBE-POSTROUTING
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A POSTROUTING -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.42.0.0/16 -j RETURN
COMMIT
# Completed on Mon Nov 23 17:58:05 2026
*filter
:FORWARD ACCEPT [0:0]
-A FORWARD -j FLANNEL-POSTRTG
COMMIT
"#;

#[test]
fn save_output_is_parsed_per_table() {
    let nat = SavedTable::parse(SAVE, "nat");
    assert!(nat.has_chain("FLANNEL-POSTRTG") && nat.has_chain("POSTROUTING") && !nat.has_chain("FORWARD"));
    assert_eq!(
        nat.rules_of("FLANNEL-POSTRTG"),
        ["-A FLANNEL-POSTRTG -s 10.42.0.0/16 -j RETURN"]
    );
    assert_eq!(
        nat.jumps("POSTROUTING", "FLANNEL-POSTRTG"),
        [
            r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#,
            "-A POSTROUTING -j FLANNEL-POSTRTG"
        ]
    );
    let filter = SavedTable::parse(SAVE, "filter");
    assert_eq!(filter.rules_of("FORWARD").len(), 1);
    assert!(filter.jumps("FORWARD", "FLANNEL-FWD").is_empty());
    assert_eq!(SavedTable::parse("", "nat"), SavedTable::default());
}

#[test]
fn bootstrap_flushes_our_chain_and_replaces_every_jump() {
    let want = masq_chain(
        Family::V4,
        "10.42.0.0/16".parse().unwrap(),
        "10.42.0.0/24".parse().unwrap(),
        false,
    );
    let payload = bootstrap_payload(&want, &SavedTable::parse(SAVE, "nat"));
    let mut expected = String::from("*nat\n:FLANNEL-POSTRTG - [0:0]\n");
    expected += "-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n";
    expected += "-D POSTROUTING -j FLANNEL-POSTRTG\n";
    for line in lines(&want) {
        expected += &line;
        expected.push('\n');
    }
    expected += "COMMIT\n";
    assert_eq!(payload, expected);
    assert!(!payload.contains("KUBE-POSTROUTING"), "foreign rules are never named");

    let fresh = bootstrap_payload(&want, &SavedTable::default());
    assert!(fresh.starts_with("*nat\n:FLANNEL-POSTRTG - [0:0]\n-A POSTROUTING "));
}

#[test]
fn removal_deletes_jumps_then_the_chain() {
    let saved = SavedTable::parse(SAVE, "nat");
    assert_eq!(
        removal_payload("nat", "POSTROUTING", "FLANNEL-POSTRTG", &saved).unwrap(),
        "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n\
         -D POSTROUTING -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n"
    );
    assert_eq!(
        removal_payload("filter", "FORWARD", "FLANNEL-FWD", &SavedTable::parse(SAVE, "filter")),
        None
    );
}

#[test]
fn diff_tells_in_sync_from_drift() {
    let want = forward_chain("10.42.0.0/16".parse().unwrap());
    let render = |body: &[String]| {
        format!(
            "*filter\n:FORWARD ACCEPT [0:0]\n:FLANNEL-FWD - [0:0]\n{}COMMIT\n",
            body.join("\n") + "\n"
        )
    };
    let good = lines(&want);
    assert_eq!(diff(&want, &SavedTable::parse(&render(&good), "filter")), Drift::InSync);

    let mut reordered = good.clone();
    reordered.swap(1, 2);
    assert!(
        matches!(diff(&want, &SavedTable::parse(&render(&reordered), "filter")), Drift::Changed(r) if r.contains("out of order"))
    );

    // Printed in another style (a netmask instead of a prefix): only `iptables -C` can tell.
    let mut restyled = good.clone();
    restyled[1] = restyled[1].replace("10.42.0.0/16", "10.42.0.0/255.255.0.0");
    assert_eq!(
        diff(&want, &SavedTable::parse(&render(&restyled), "filter")),
        Drift::Unconfirmed
    );

    let missing = &good[..2];
    assert!(
        matches!(diff(&want, &SavedTable::parse(&render(missing), "filter")), Drift::Changed(r) if r.contains("has 1 rule"))
    );
    let mut doubled = good.clone();
    doubled.push(good[0].clone());
    assert!(
        matches!(diff(&want, &SavedTable::parse(&render(&doubled), "filter")), Drift::Changed(r) if r.starts_with("2 jump"))
    );
    let no_chain = SavedTable::parse("*filter\n:FORWARD ACCEPT [0:0]\nCOMMIT\n", "filter");
    assert_eq!(
        diff(&want, &no_chain),
        Drift::Changed("chain FLANNEL-FWD is missing".into())
    );
}

#[test]
fn check_args_split_our_lines_like_a_shell_would() {
    let want = masq_chain(
        Family::V4,
        "10.42.0.0/16".parse().unwrap(),
        "10.42.0.0/24".parse().unwrap(),
        true,
    );
    assert_eq!(
        check_args(&want.rules[4]),
        [
            "-C",
            "FLANNEL-POSTRTG",
            "-s",
            "10.42.0.0/16",
            "!",
            "-d",
            "224.0.0.0/4",
            "-m",
            "comment",
            "--comment"
        ]
        .into_iter()
        .chain(["flanneld masq", "-j", "MASQUERADE", "--random-fully"])
        .collect::<Vec<_>>()
    );
}

#[test]
fn iptables_version_decides_wait_and_random_fully() {
    assert_eq!(parse_version("iptables v1.8.9 (nf_tables)\n"), Some((1, 8, 9)));
    assert_eq!(parse_version("ip6tables v1.6.1"), Some((1, 6, 1)));
    assert_eq!(parse_version("iptables v1.8"), Some((1, 8, 0)));
    assert_eq!(parse_version("garbage"), None);
    let new = Caps {
        wait: true,
        random_fully: true,
    };
    assert_eq!(Caps::from_version("iptables v1.6.2"), new);
    assert_eq!(Caps::from_version("iptables v1.8.10 (legacy)"), new);
    assert_eq!(
        Caps::from_version("iptables v1.6.1"),
        Caps {
            wait: false,
            random_fully: false
        }
    );
    assert_eq!(
        Caps::from_version(""),
        Caps {
            wait: false,
            random_fully: false
        }
    );
}

#[test]
fn previous_rule_set_is_read_from_subnet_env() {
    let text = "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.7.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
                FLANNEL_IPV6_SUBNET=2001:cafe:42:7::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";
    let set = RuleSet::parse(text);
    assert_eq!(set.network, Some("10.42.0.0/16".parse().unwrap()));
    assert_eq!(set.subnet, Some("10.42.7.0/24".parse().unwrap()), "host bits cleared");
    assert_eq!(set.ipv6_network, Some("2001:cafe:42::/56".parse().unwrap()));
    assert_eq!(set.ipv6_subnet, Some("2001:cafe:42:7::/64".parse().unwrap()));
    let junk = RuleSet::parse("FLANNEL_NETWORK=bogus\nFLANNEL_SUBNET=\"10.5.1.1/24\"\nnonsense\n");
    assert_eq!(
        junk,
        RuleSet {
            subnet: Some("10.5.1.0/24".parse().unwrap()),
            ..RuleSet::default()
        }
    );
    assert_eq!(
        RuleSet::read(std::path::Path::new("/nonexistent/subnet.env")),
        RuleSet::default()
    );
}

#[test]
fn restore_errors_quote_the_failing_line() {
    let input = "*nat\n:FLANNEL-POSTRTG - [0:0]\n-A FLANNEL-POSTRTG -j NOPE\nCOMMIT\n";
    assert_eq!(
        with_failed_line(
            "iptables-restore: line 3 failed: No chain/target/match by that name.",
            Some(input)
        ),
        "iptables-restore: line 3 failed: No chain/target/match by that name. (line 3: -A FLANNEL-POSTRTG -j NOPE)"
    );
    assert_eq!(
        with_failed_line("Error: syntax error", Some(input)),
        "Error: syntax error"
    );
    assert_eq!(with_failed_line("line 99 failed", Some(input)), "line 99 failed");
}
