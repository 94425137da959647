//! The rule text for a [`RuleSet`](super::RuleSet), exactly as upstream writes it: the
//! lines `iptables -S`/`iptables-save` print and the `iptables-restore` transactions
//! (here), the nft scripts and the listings `nft list table` prints (`nft`). No I/O, so
//! every byte is checked against upstream's golden output in `render_tests`.

use std::fmt::Write as _;

use ipnet::IpNet;

mod nft;
pub(crate) use nft::*;

/// flannel's chain in the nat table (masquerading).
pub(crate) const MASQ_CHAIN: &str = "FLANNEL-POSTRTG";
/// flannel's chain in the filter table (forwarding).
pub(crate) const FWD_CHAIN: &str = "FLANNEL-FWD";
/// kube-proxy's masquerade mark (`KubeProxyMark`).
const KUBE_PROXY_MARK: &str = "0x4000/0x4000";
/// The comments are quoted as `iptables-save` prints them (they contain a space).
const MASQ_COMMENT: &str = "\"flanneld masq\"";
const FWD_COMMENT: &str = "\"flanneld forward\"";

/// An address family: its tools, nft table and multicast range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    /// IPv4: iptables, `table ip flannel-ipv4`.
    V4,
    /// IPv6: ip6tables, `table ip6 flannel-ipv6`.
    V6,
}

impl Family {
    /// Both families, IPv4 first (the order upstream works in).
    pub(crate) const ALL: [Family; 2] = [Family::V4, Family::V6];

    /// Index into per-family arrays.
    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// `iptables` or `ip6tables`.
    pub(crate) fn iptables(self) -> &'static str {
        match self {
            Family::V4 => "iptables",
            Family::V6 => "ip6tables",
        }
    }

    /// `iptables-save` or `ip6tables-save`.
    pub(crate) fn iptables_save(self) -> &'static str {
        match self {
            Family::V4 => "iptables-save",
            Family::V6 => "ip6tables-save",
        }
    }

    /// `iptables-restore` or `ip6tables-restore`.
    pub(crate) fn iptables_restore(self) -> &'static str {
        match self {
            Family::V4 => "iptables-restore",
            Family::V6 => "ip6tables-restore",
        }
    }

    /// The nft family keyword, also the address match keyword (`ip saddr`).
    pub(crate) fn nft_family(self) -> &'static str {
        match self {
            Family::V4 => "ip",
            Family::V6 => "ip6",
        }
    }

    /// flannel's nft table of this family.
    pub(crate) fn nft_table(self) -> &'static str {
        match self {
            Family::V4 => "flannel-ipv4",
            Family::V6 => "flannel-ipv6",
        }
    }

    /// Multicast destinations are never masqueraded.
    pub(crate) fn multicast(self) -> &'static str {
        match self {
            Family::V4 => "224.0.0.0/4",
            Family::V6 => "ff00::/8",
        }
    }
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::V4 => "IPv4",
            Family::V6 => "IPv6",
        })
    }
}

/// One family's cluster network and own subnet, host bits cleared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Nets {
    /// The cluster network.
    pub network: IpNet,
    /// This node's subnet, when leased.
    pub subnet: Option<IpNet>,
}

/// One flannel chain in one iptables table and the jump into it, as `-A` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct IptChain {
    /// `nat` or `filter`.
    pub table: &'static str,
    /// flannel's chain.
    pub chain: &'static str,
    /// The built-in chain that jumps into it.
    pub parent: &'static str,
    /// The jump, appended to `parent`.
    pub jump: String,
    /// The chain's rules, in order.
    pub rules: Vec<String>,
}

/// The masquerade chain (nat `FLANNEL-POSTRTG`) for a network and own subnet.
pub(crate) fn masq_chain(family: Family, network: IpNet, subnet: IpNet, random_fully: bool) -> IptChain {
    let (net, sub, c) = (network.trunc(), subnet.trunc(), MASQ_COMMENT);
    let masq = if random_fully {
        "MASQUERADE --random-fully"
    } else {
        "MASQUERADE"
    };
    let multicast = family.multicast();
    let rules = [
        // kube-proxy masquerades what it marked; NATing it twice hit a kernel checksum bug.
        format!("-m mark --mark {KUBE_PROXY_MARK} -m comment --comment {c} -j RETURN"),
        // Pod to pod inside the overlay keeps its source address, both ways.
        format!("-s {sub} -d {net} -m comment --comment {c} -j RETURN"),
        format!("-s {net} -d {sub} -m comment --comment {c} -j RETURN"),
        // Outside traffic delivered to our own pods keeps its source too.
        format!("! -s {net} -d {sub} -m comment --comment {c} -j RETURN"),
        // Pods leaving the cluster, except to multicast.
        format!("-s {net} ! -d {multicast} -m comment --comment {c} -j {masq}"),
        // The host (or anything outside) talking to pods on other nodes.
        format!("! -s {net} -d {net} -m comment --comment {c} -j {masq}"),
    ];
    IptChain {
        table: "nat",
        chain: MASQ_CHAIN,
        parent: "POSTROUTING",
        jump: format!("-A POSTROUTING -m comment --comment {c} -j {MASQ_CHAIN}"),
        rules: rules.into_iter().map(|r| format!("-A {MASQ_CHAIN} {r}")).collect(),
    }
}

/// The forward chain (filter `FLANNEL-FWD`): accept anything from or to the network.
pub(crate) fn forward_chain(network: IpNet) -> IptChain {
    let (net, c) = (network.trunc(), FWD_COMMENT);
    IptChain {
        table: "filter",
        chain: FWD_CHAIN,
        parent: "FORWARD",
        jump: format!("-A FORWARD -m comment --comment {c} -j {FWD_CHAIN}"),
        rules: vec![
            format!("-A {FWD_CHAIN} -s {net} -m comment --comment {c} -j ACCEPT"),
            format!("-A {FWD_CHAIN} -d {net} -m comment --comment {c} -j ACCEPT"),
        ],
    }
}

/// One table as `iptables-save -t <table>` printed it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct SavedTable {
    /// Declared chains, built-in and user.
    chains: Vec<String>,
    /// `-A <chain> ...` lines, in order.
    rules: Vec<String>,
}

impl SavedTable {
    /// Reads the `*<table>` section of `iptables-save` output.
    pub(crate) fn parse(text: &str, table: &str) -> Self {
        let mut saved = Self::default();
        let mut inside = false;
        for line in text.lines().map(str::trim_end) {
            if let Some(name) = line.strip_prefix('*') {
                inside = name == table;
            } else if !inside {
                continue;
            } else if line == "COMMIT" {
                inside = false;
            } else if let Some(decl) = line.strip_prefix(':') {
                saved.chains.extend(decl.split_whitespace().next().map(String::from));
            } else if line.starts_with("-A ") {
                saved.rules.push(line.to_string());
            }
        }
        saved
    }

    /// Whether the chain exists.
    pub(crate) fn has_chain(&self, chain: &str) -> bool {
        self.chains.iter().any(|c| c == chain)
    }

    /// The rules of a chain, as `-A <chain> ...` lines.
    pub(crate) fn rules_of(&self, chain: &str) -> Vec<&str> {
        self.rules
            .iter()
            .map(String::as_str)
            .filter(|l| rule_chain(l) == Some(chain))
            .collect()
    }

    /// The rules of `parent` that jump to `target`, whatever their matches (older
    /// flannel versions wrote other comments).
    pub(crate) fn jumps(&self, parent: &str, target: &str) -> Vec<&str> {
        let tail = format!(" -j {target}");
        self.rules_of(parent)
            .into_iter()
            .filter(|l| l.ends_with(&tail))
            .collect()
    }
}

fn rule_chain(line: &str) -> Option<&str> {
    line.strip_prefix("-A ")?.split_whitespace().next()
}

/// How a table compares with what flannel wants in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Drift {
    /// Exactly our lines, in order, and one jump.
    InSync,
    /// The right number of rules and one jump, but some printed differently than
    /// rendered: maybe another iptables version's style. Worth a semantic check
    /// (`iptables -C`) of those lines.
    Unconfirmed,
    /// Something is missing or extra; the string says what.
    Changed(String),
}

/// Compares a saved table with the chain flannel wants in it.
pub(crate) fn diff(want: &IptChain, saved: &SavedTable) -> Drift {
    if !saved.has_chain(want.chain) {
        return Drift::Changed(format!("chain {} is missing", want.chain));
    }
    let jumps = saved.jumps(want.parent, want.chain);
    let rules = saved.rules_of(want.chain);
    if jumps == [want.jump.as_str()] && rules == want.rules {
        Drift::InSync
    } else if jumps.len() == 1 && rules.len() == want.rules.len() {
        let verbatim = jumps[0] == want.jump && want.rules.iter().all(|r| rules.contains(&r.as_str()));
        if verbatim {
            // Every line is there as we print it, so only the order can be wrong.
            Drift::Changed(format!("the rules of {} are out of order", want.chain))
        } else {
            Drift::Unconfirmed
        }
    } else {
        Drift::Changed(format!(
            "{} jump(s) from {} (want 1), {} has {} rule(s) (want {})",
            jumps.len(),
            want.parent,
            want.chain,
            rules.len(),
            want.rules.len()
        ))
    }
}

/// The `iptables-restore --noflush` transaction that installs `want`: declaring the
/// chain creates it, or flushes it when it exists (so stale, duplicate or recycled rules
/// go); every jump from the parent into it is deleted and ours appended after the rules
/// already there. One transaction, so no packet sees a half-written chain.
pub(crate) fn bootstrap_payload(want: &IptChain, saved: &SavedTable) -> String {
    let mut out = format!("*{}\n:{} - [0:0]\n", want.table, want.chain);
    for jump in saved.jumps(want.parent, want.chain) {
        let _ = writeln!(out, "-D {}", &jump[3..]);
    }
    out += &want.jump;
    out.push('\n');
    for rule in &want.rules {
        out += rule;
        out.push('\n');
    }
    out += "COMMIT\n";
    out
}

/// The transaction that removes a flannel chain and the jumps into it, if any is left.
pub(crate) fn removal_payload(table: &str, parent: &str, chain: &str, saved: &SavedTable) -> Option<String> {
    let jumps = saved.jumps(parent, chain);
    if jumps.is_empty() && !saved.has_chain(chain) {
        return None;
    }
    let mut out = format!("*{table}\n");
    for jump in jumps {
        let _ = writeln!(out, "-D {}", &jump[3..]);
    }
    if saved.has_chain(chain) {
        let _ = write!(out, "-F {chain}\n-X {chain}\n");
    }
    out += "COMMIT\n";
    Some(out)
}

/// The argument vector for `iptables -C` of an `-A` line we rendered (only our own
/// lines: the sole quoting in them is the comment).
pub(crate) fn check_args(line: &str) -> Vec<String> {
    let body = line.strip_prefix("-A ").unwrap_or(line);
    let mut args = vec!["-C".to_string()];
    // Between quotes (odd pieces) is one argument; outside, words are.
    for (i, piece) in body.split('"').enumerate() {
        if i % 2 == 1 {
            args.push(piece.to_string());
        } else {
            args.extend(piece.split_whitespace().map(String::from));
        }
    }
    args
}
