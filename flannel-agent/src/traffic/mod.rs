//! Masquerade and forward rules: upstream's traffic manager, in iptables or nftables mode.
//!
//! The only module that runs `iptables`, `ip6tables`, their `-save`/`-restore` twins and
//! `nft`. Commands get arguments and stdin, never a shell line, so nothing read from the
//! store can be interpreted by a shell.
//!
//! * `render`: the rule text for a [`RuleSet`] (pure; unit-tested against upstream's
//!   golden output byte for byte).
//! * `iptables`: the default mode. One `iptables-restore --noflush` transaction per table
//!   installs a flannel chain and the jump into it; a resync re-reads the table with one
//!   `iptables-save -t <table>` per period and re-installs the set when it drifted.
//! * `nftables`: `EnableNFTables`. Tables `flannel-ipv4`/`flannel-ipv6`, written in one
//!   `nft -f -` transaction; unlike upstream, also re-checked every resync period.
//! * `exec`: runs the tools, with a time limit, and turns failures into [`TrafficError`].
//!
//! Each mode removes the other's leftovers at start, so switching needs no reboot. Rules
//! stay in place on shutdown (a restart must not cut pod traffic, flannel-io/flannel#2237).

use std::sync::Mutex;
use std::time::Duration;

use ipnet::IpNet;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

mod exec;
mod iptables;
mod nftables;
mod render;

#[cfg(test)]
mod netns_tests;
#[cfg(test)]
mod render_tests;

use exec::Exec;
use render::Family;

/// The networks the rules are written for: the cluster networks and this node's lease
/// subnets, the four networks of `subnet.env` (read back from it with `RuleSet::read`). A
/// family is configured when its network is set (as upstream); its masquerade rules also
/// need the subnet. Host bits are ignored (`10.42.0.1/24` is `10.42.0.0/24`).
pub use crate::subnet_file::Networks as RuleSet;

impl RuleSet {
    /// One family's networks with host bits cleared, if that family is configured.
    pub(crate) fn nets(&self, family: Family) -> Option<render::Nets> {
        let (network, subnet) = match family {
            Family::V4 => (self.network.map(IpNet::V4), self.subnet.map(IpNet::V4)),
            Family::V6 => (self.ipv6_network.map(IpNet::V6), self.ipv6_subnet.map(IpNet::V6)),
        };
        Some(render::Nets {
            network: network?.trunc(),
            subnet: subnet.map(|s| s.trunc()),
        })
    }
}

/// How the rules are managed; the flags and net-conf.json keys upstream reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrafficOptions {
    /// `--ip-masq`: install the masquerade rules.
    pub masquerade: bool,
    /// `--ip-masq-fully-random-disable`: never use `--random-fully` / `fully-random`.
    pub fully_random_disable: bool,
    /// `--iptables-forward-rules`: install the rules accepting forwarded flannel traffic.
    pub forward_rules: bool,
    /// `EnableNFTables` in net-conf.json: use nftables instead of iptables.
    pub nftables: bool,
    /// `--iptables-resync`: how often the installed rules are checked and repaired.
    pub resync: Duration,
}

impl Default for TrafficOptions {
    /// Upstream's defaults: no masquerading, forward rules on, iptables, 5 s resync.
    fn default() -> Self {
        Self {
            masquerade: false,
            fully_random_disable: false,
            forward_rules: true,
            nftables: false,
            resync: Duration::from_secs(5),
        }
    }
}

/// Hint appended to iptables failures: what usually makes them fail.
const IPTABLES_HINT: &str = "is iptables installed, and are the kernel modules for the nat and filter tables and \
     the comment, mark and MASQUERADE extensions (xt_comment, xt_mark, xt_MASQUERADE, or nft_compat for iptables-nft) \
     available?";
/// Hint appended to nft failures.
const NFT_HINT: &str = "is nft (nftables) installed, and does the kernel support nf_tables with NAT \
     (nf_tables, nft_chain_nat, nft_masq)? Or set EnableNFTables to false to use iptables";

/// A netfilter tool could not do its job.
#[derive(Debug, thiserror::Error)]
pub enum TrafficError {
    /// The tool could not be started.
    #[error("cannot start `{command}`: {error}; is {tool} installed and in PATH?")]
    Spawn {
        /// The command line (for reading only: it was never given to a shell).
        command: String,
        /// The tool that was not found or not executable.
        tool: &'static str,
        /// Why it could not be started.
        error: std::io::Error,
    },
    /// The tool ran and failed.
    #[error("`{command}` failed on {object} ({status}): {stderr}; {hint}")]
    Failed {
        /// The command line.
        command: String,
        /// The table or chain it was working on.
        object: String,
        /// How it exited.
        status: String,
        /// What it printed on stderr (with the offending input line, when it names one).
        stderr: String,
        /// What to check.
        hint: &'static str,
    },
    /// The tool did not finish in time (it was killed).
    #[error(
        "`{command}` on {object} did not finish within {timeout:?}; another program may hold the xtables lock \
         (/run/xtables.lock: mount it into the flannel container so that waiting works)"
    )]
    Timeout {
        /// The command line.
        command: String,
        /// The table or chain it was working on.
        object: String,
        /// The time limit.
        timeout: Duration,
    },
}

/// Installs and keeps flannel's masquerade and forward rules, in iptables or nftables
/// mode. Create it once, call [`setup`](Self::setup) at start, then [`run`](Self::run)
/// until shutdown.
#[derive(Debug)]
pub struct TrafficManager {
    /// The flags.
    opts: TrafficOptions,
    /// Runs the tools (with a command prefix in tests).
    exec: Exec,
    /// What `iptables --version` / `ip6tables --version` allow, probed once per family.
    ipt_caps: [OnceCell<iptables::Caps>; 2],
    /// Whether nft accepts `masquerade fully-random`, probed once.
    nft_random_fully: OnceCell<bool>,
    /// `nft list table` per family right after our last write: the resync compares the
    /// live table with it, which tolerates any nft version's printing style.
    nft_baseline: Mutex<[Option<String>; 2]>,
}

impl TrafficManager {
    /// A manager with these options; no command runs until [`setup`](Self::setup).
    pub fn new(opts: TrafficOptions) -> Self {
        Self {
            opts,
            exec: Exec::new(Vec::new()),
            ipt_caps: Default::default(),
            nft_random_fully: OnceCell::new(),
            nft_baseline: Mutex::new([None, None]),
        }
    }

    /// Runs every tool behind this prefix, e.g. `["ip", "netns", "exec", "<ns>"]`, so
    /// tests can work in a throw-away network namespace (netfilter state is per netns).
    pub fn with_command_prefix<S: Into<String>>(mut self, prefix: impl IntoIterator<Item = S>) -> Self {
        self.exec = Exec::new(prefix.into_iter().map(Into::into).collect());
        self
    }

    /// The options this manager was built with.
    pub fn options(&self) -> &TrafficOptions {
        &self.opts
    }

    /// Removes the other mode's leftovers, then installs the rules for `rules`.
    /// `previous` is what the last run wrote to `subnet.env`; when it differs, the old
    /// masquerade rules are recycled (they live in flannel's own chain, which is
    /// rewritten whole). Rules of a disabled feature or unconfigured family are removed.
    /// An error means the rules are not (all) in place; upstream exits on it.
    pub async fn setup(&self, rules: &RuleSet, previous: &RuleSet) -> Result<(), TrafficError> {
        if self.opts.nftables {
            self.iptables_cleanup().await;
            self.nft_setup(rules).await
        } else {
            self.nft_cleanup().await;
            self.iptables_setup(rules, previous).await
        }
    }

    /// Checks the rules every `resync` and repairs them when something changed them,
    /// until `shutdown` fires. Failures are logged and retried next period. Nothing is
    /// removed on shutdown.
    pub async fn run(&self, rules: &RuleSet, shutdown: CancellationToken) {
        // A zero period would spin; the flags already require 1 s or more.
        let period = self.opts.resync.max(Duration::from_millis(100));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.opts.nftables {
                self.nft_resync(rules).await;
            } else {
                self.iptables_resync(rules).await;
            }
        }
    }
}
