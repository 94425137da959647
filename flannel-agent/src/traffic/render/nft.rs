//! nftables text: the `nft -f -` transaction for flannel's tables and what
//! `nft list table` prints for them.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::Family;

/// The nft chains in `flannel-ipv4`/`flannel-ipv6`.
pub(crate) const NFT_MASQ_CHAIN: &str = "postrtg";
pub(crate) const NFT_FWD_CHAIN: &str = "forward";
const NFT_MASQ_COMMENT: &str = "chain to manage traffic masquerading by flannel";
const NFT_FWD_COMMENT: &str = "chain to accept flannel traffic";

/// What flannel wants in one family's nft table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NftTable {
    /// The family (and so the table).
    pub family: Family,
    /// Network and own subnet, when masquerading.
    pub masq: Option<(IpNet, IpNet)>,
    /// Network, when accepting forwarded traffic.
    pub forward: Option<IpNet>,
}

/// The masquerade rules as nft takes them, with upstream's quirks: the mark is matched
/// exactly (not masked), and rule 4 is `saddr != <subnet> daddr <network>` where
/// iptables has `! -s <network> -d <subnet>`.
fn nft_masq_rules(family: Family, network: IpNet, subnet: IpNet, random_fully: bool) -> [String; 6] {
    let (f, net, sub, mc) = (family.nft_family(), network.trunc(), subnet.trunc(), family.multicast());
    let masq = if random_fully {
        "masquerade fully-random"
    } else {
        "masquerade"
    };
    [
        "meta mark 0x4000 return".to_string(),
        format!("{f} saddr {sub} {f} daddr {net} return"),
        format!("{f} saddr {net} {f} daddr {sub} return"),
        format!("{f} saddr != {sub} {f} daddr {net} return"),
        format!("{f} saddr {net} {f} daddr != {mc} {masq}"),
        format!("{f} saddr != {net} {f} daddr {net} {masq}"),
    ]
}

fn nft_forward_rules(family: Family, network: IpNet) -> [String; 2] {
    let (f, net) = (family.nft_family(), network.trunc());
    [format!("{f} saddr {net} accept"), format!("{f} daddr {net} accept")]
}

/// The `nft -f -` transaction for these tables: each table is created (with upstream's
/// comment), each wanted chain created, flushed and filled, each unwanted chain deleted
/// (added first, so deleting never fails on an absent chain). Priorities are written as
/// numbers (srcnat = 100, filter = 0), which every nft version accepts.
pub(crate) fn nft_script(tables: &[NftTable], random_fully: bool) -> String {
    let mut out = String::new();
    for t in tables {
        let (fam, name) = (t.family.nft_family(), t.family.nft_table());
        let _ = writeln!(out, "add table {fam} {name} {{ comment \"rules for {name}\" ; }}");
        let chains = [
            (
                NFT_MASQ_CHAIN,
                "nat hook postrouting priority 100",
                NFT_MASQ_COMMENT,
                t.masq
                    .map(|(n, s)| nft_masq_rules(t.family, n, s, random_fully).to_vec()),
            ),
            (
                NFT_FWD_CHAIN,
                "filter hook forward priority 0",
                NFT_FWD_COMMENT,
                t.forward.map(|n| nft_forward_rules(t.family, n).to_vec()),
            ),
        ];
        for (chain, hook, comment, rules) in chains {
            let at = format!("{fam} {name} {chain}");
            match rules {
                Some(rules) => {
                    let _ = writeln!(out, "add chain {at} {{ type {hook} ; comment \"{comment}\" ; }}");
                    let _ = writeln!(out, "flush chain {at}");
                    for rule in rules {
                        let _ = writeln!(out, "add rule {at} {rule}");
                    }
                }
                None => {
                    let _ = write!(out, "add chain {at}\nflush chain {at}\ndelete chain {at}\n");
                }
            }
        }
    }
    out
}

/// What `nft list table <family> <table>` prints for a freshly written table (nft 1.0).
pub(crate) fn nft_listing(t: &NftTable, random_fully: bool) -> String {
    let (fam, name) = (t.family.nft_family(), t.family.nft_table());
    let mut chains = Vec::new();
    if let Some((net, sub)) = t.masq {
        let mut rules = nft_masq_rules(t.family, net, sub, random_fully);
        // nft prints the mark with eight hex digits.
        rules[0] = "meta mark 0x00004000 return".to_string();
        chains.push(nft_chain_listing(
            NFT_MASQ_CHAIN,
            NFT_MASQ_COMMENT,
            "nat hook postrouting priority srcnat",
            &rules,
        ));
    }
    if let Some(net) = t.forward {
        let rules = nft_forward_rules(t.family, net);
        chains.push(nft_chain_listing(
            NFT_FWD_CHAIN,
            NFT_FWD_COMMENT,
            "filter hook forward priority filter",
            &rules,
        ));
    }
    format!(
        "table {fam} {name} {{\n\tcomment \"rules for {name}\"\n{}}}\n",
        chains.join("\n")
    )
}

/// One chain as nft lists it, indented one level inside its table.
pub(crate) fn nft_chain_listing(chain: &str, comment: &str, hook: &str, rules: &[String]) -> String {
    let mut out = format!("\tchain {chain} {{\n\t\tcomment \"{comment}\"\n\t\ttype {hook}; policy accept;\n");
    for rule in rules {
        let _ = writeln!(out, "\t\t{rule}");
    }
    out += "\t}\n";
    out
}

/// Deletes these tables in one transaction.
pub(crate) fn nft_delete_tables(families: &[Family]) -> String {
    families
        .iter()
        .map(|f| format!("delete table {} {}\n", f.nft_family(), f.nft_table()))
        .collect()
}

/// Which of flannel's tables `nft list tables` shows.
pub(crate) fn nft_tables_present(list_tables: &str) -> Vec<Family> {
    Family::ALL
        .into_iter()
        .filter(|f| {
            let want = format!("table {} {}", f.nft_family(), f.nft_table());
            list_tables.lines().any(|l| l.trim() == want)
        })
        .collect()
}

/// Upstream's `fully-random` probe, for `nft --check -f -` (never committed).
pub(crate) fn nft_random_fully_probe() -> String {
    let at = "ip flannel-ipv4 masqueradeTest";
    format!(
        "add table ip flannel-ipv4\nadd chain {at} {{ type nat hook postrouting priority 100 ; }}\nflush chain {at}\n\
         add rule {at} ip saddr != 127.0.0.1 masquerade fully-random\n"
    )
}
