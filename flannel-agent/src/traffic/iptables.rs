//! iptables mode (the default): flannel's chains `FLANNEL-POSTRTG` (nat) and
//! `FLANNEL-FWD` (filter), each with one jump from `POSTROUTING`/`FORWARD`, for
//! iptables and ip6tables.
//!
//! Every write is one `iptables-restore --noflush` transaction per table (see
//! [`render::bootstrap_payload`]); every check is one `iptables-save -t <table>`, with
//! `iptables -C` only to confirm a table that looks right but prints differently.

use tracing::{debug, error, info, warn};

use super::exec::Tool;
use super::render::{self, Drift, Family, IptChain, Nets, SavedTable, FWD_CHAIN, MASQ_CHAIN};
use super::{RuleSet, TrafficError, TrafficManager};

/// flannel's chains: (table, parent chain, flannel chain).
const OWNED: [(&str, &str, &str); 2] = [("nat", "POSTROUTING", MASQ_CHAIN), ("filter", "FORWARD", FWD_CHAIN)];

/// What one family's iptables supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Caps {
    /// `iptables-restore --wait` (wait for the xtables lock instead of failing).
    pub wait: bool,
    /// `MASQUERADE --random-fully`.
    pub random_fully: bool,
}

impl Caps {
    /// Reads `iptables --version` output. Both features came with iptables 1.6.2, the
    /// version go-iptables (and so upstream) checks; an unreadable version gets neither.
    pub(crate) fn from_version(text: &str) -> Self {
        let ok = parse_version(text).is_some_and(|v| v >= (1, 6, 2));
        Self {
            wait: ok,
            random_fully: ok,
        }
    }
}

/// `iptables v1.8.9 (nf_tables)` → (1, 8, 9).
pub(crate) fn parse_version(text: &str) -> Option<(u32, u32, u32)> {
    let word = text.split_whitespace().find_map(|w| {
        w.strip_prefix('v')
            .filter(|r| r.starts_with(|c: char| c.is_ascii_digit()))
    })?;
    let mut parts = word.split('.').map(|p| p.parse::<u32>().ok());
    Some((
        parts.next()??,
        parts.next().flatten().unwrap_or(0),
        parts.next().flatten().unwrap_or(0),
    ))
}

/// Which table and chain, for errors and logs.
fn object(family: Family, table: &str, chain: &str) -> String {
    format!("table {table} chain {chain} ({family})")
}

impl TrafficManager {
    /// This family's iptables features, probed once.
    async fn ipt_caps(&self, family: Family) -> Result<Caps, TrafficError> {
        let cell = &self.ipt_caps[family.index()];
        let caps = cell
            .get_or_try_init(|| async {
                let out = self
                    .exec
                    .run(Tool::Iptables, family.iptables(), &["--version"], None, "--version")
                    .await?;
                let caps = Caps::from_version(&out);
                debug!(%family, version = out.trim(), wait = caps.wait, random_fully = caps.random_fully, "iptables");
                Ok::<_, TrafficError>(caps)
            })
            .await?;
        Ok(*caps)
    }

    /// The chain flannel wants in each of its two tables; `None`: it should not exist.
    fn ipt_wanted(&self, nets: Option<Nets>, family: Family, caps: Caps) -> [Option<IptChain>; 2] {
        let random_fully = caps.random_fully && !self.opts.fully_random_disable;
        let masq = nets
            .filter(|_| self.opts.masquerade)
            .and_then(|n| Some(render::masq_chain(family, n.network, n.subnet?, random_fully)));
        let forward = nets
            .filter(|_| self.opts.forward_rules)
            .map(|n| render::forward_chain(n.network));
        [masq, forward]
    }

    /// Installs the wanted chains and removes unwanted ones, for both families.
    pub(super) async fn iptables_setup(&self, rules: &RuleSet, previous: &RuleSet) -> Result<(), TrafficError> {
        info!("Starting flannel in iptables mode...");
        for family in Family::ALL {
            let nets = rules.nets(family);
            let wants_any = nets.is_some() && (self.opts.masquerade || self.opts.forward_rules);
            let caps = match self.ipt_caps(family).await {
                Ok(caps) => caps,
                Err(e) if !wants_any => {
                    debug!(%family, error = %e, "no usable iptables for this unused family; nothing to remove");
                    continue;
                }
                Err(e) => return Err(e),
            };
            if let (true, Some(nets)) = (self.opts.masquerade, nets) {
                match nets.subnet {
                    Some(_) => log_recycle(family, nets, previous.nets(family)),
                    None => warn!(%family, network = %nets.network, "no subnet leased; not masquerading this family"),
                }
            }
            for ((table, parent, chain), want) in OWNED.into_iter().zip(self.ipt_wanted(nets, family, caps)) {
                match want {
                    Some(want) => {
                        log_setup(family, &want);
                        self.ipt_bootstrap(family, caps, &want, None).await?;
                    }
                    None => {
                        if let Err(e) = self.ipt_remove(family, caps, table, parent, chain).await {
                            warn!(%family, table, chain, error = %e, "could not remove a disabled flannel chain");
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Removes every flannel chain and jump (nftables mode uses none of them). Upstream
    /// forgets `FLANNEL-FWD`, which lives in the filter table. Failures are logged: they
    /// do not stop nftables mode, and a host without iptables has nothing to remove.
    pub(super) async fn iptables_cleanup(&self) {
        info!("Cleaning-up iptables rules...");
        for family in Family::ALL {
            let caps = match self.ipt_caps(family).await {
                Ok(caps) => caps,
                Err(e) => {
                    debug!(%family, error = %e, "no usable iptables; no iptables rules to remove");
                    continue;
                }
            };
            for (table, parent, chain) in OWNED {
                if let Err(e) = self.ipt_remove(family, caps, table, parent, chain).await {
                    warn!(%family, table, chain, error = %e, "could not remove flannel's iptables chain");
                }
            }
        }
    }

    /// One resync pass: re-installs every table whose flannel chain drifted.
    pub(super) async fn iptables_resync(&self, rules: &RuleSet) {
        for family in Family::ALL {
            let Some(nets) = rules.nets(family) else { continue };
            if !self.opts.masquerade && !self.opts.forward_rules {
                continue;
            }
            let caps = match self.ipt_caps(family).await {
                Ok(caps) => caps,
                Err(e) => {
                    error!(%family, error = %e, "Failed to ensure iptables rules");
                    continue;
                }
            };
            for want in self.ipt_wanted(Some(nets), family, caps).into_iter().flatten() {
                if let Err(e) = self.ipt_ensure(family, caps, &want).await {
                    error!(%family, table = want.table, chain = want.chain, error = %e, "Failed to ensure iptables rules");
                }
            }
        }
    }

    /// Checks one table and re-installs the whole chain (so the order is right again)
    /// when anything is missing. Returns whether it had to.
    pub(crate) async fn ipt_ensure(&self, family: Family, caps: Caps, want: &IptChain) -> Result<bool, TrafficError> {
        let saved = self.ipt_save(family, want.table).await?;
        let reason = match render::diff(want, &saved) {
            Drift::InSync => return Ok(false),
            Drift::Unconfirmed => match self.ipt_confirm(family, caps, want, &saved).await? {
                None => return Ok(false),
                Some(reason) => reason,
            },
            Drift::Changed(reason) => reason,
        };
        info!(%family, table = want.table, chain = want.chain, %reason,
            "Some iptables rules are missing; deleting and recreating rules");
        self.ipt_bootstrap(family, caps, want, Some(saved)).await?;
        Ok(true)
    }

    /// Asks iptables itself (`-C`) about each line `iptables-save` printed differently.
    /// `None`: all there.
    async fn ipt_confirm(
        &self,
        family: Family,
        caps: Caps,
        want: &IptChain,
        saved: &SavedTable,
    ) -> Result<Option<String>, TrafficError> {
        let present = saved
            .rules_of(want.parent)
            .into_iter()
            .chain(saved.rules_of(want.chain))
            .collect::<Vec<_>>();
        for line in std::iter::once(&want.jump).chain(&want.rules) {
            if present.contains(&line.as_str()) {
                continue;
            }
            let mut args = vec!["-t", want.table];
            if caps.wait {
                args.push("--wait");
            }
            let check = render::check_args(line);
            args.extend(check.iter().map(String::as_str));
            let obj = object(family, want.table, want.chain);
            if self
                .exec
                .run(Tool::Iptables, family.iptables(), &args, None, &obj)
                .await
                .is_err()
            {
                return Ok(Some(format!("rule missing: {line}")));
            }
        }
        debug!(%family, table = want.table, "iptables prints flannel's rules differently than rendered; they are in place");
        Ok(None)
    }

    /// Writes `want` in one transaction; `saved` is a fresh save of its table, if at hand.
    async fn ipt_bootstrap(
        &self,
        family: Family,
        caps: Caps,
        want: &IptChain,
        saved: Option<SavedTable>,
    ) -> Result<(), TrafficError> {
        let saved = match saved {
            Some(saved) => saved,
            None => self.ipt_save(family, want.table).await?,
        };
        let payload = render::bootstrap_payload(want, &saved);
        self.ipt_restore(family, caps, &payload, &object(family, want.table, want.chain))
            .await?;
        info!(%family, table = want.table, chain = want.chain, "bootstrap done");
        Ok(())
    }

    /// Removes a flannel chain and the jumps into it, if present. Returns whether it did.
    async fn ipt_remove(
        &self,
        family: Family,
        caps: Caps,
        table: &str,
        parent: &str,
        chain: &str,
    ) -> Result<bool, TrafficError> {
        let saved = self.ipt_save(family, table).await?;
        let Some(payload) = render::removal_payload(table, parent, chain, &saved) else {
            return Ok(false);
        };
        self.ipt_restore(family, caps, &payload, &object(family, table, chain))
            .await?;
        info!(%family, table, chain, "removed flannel's iptables chain and its jump");
        Ok(true)
    }

    async fn ipt_save(&self, family: Family, table: &str) -> Result<SavedTable, TrafficError> {
        let obj = format!("table {table} ({family})");
        let out = self
            .exec
            .run(Tool::Iptables, family.iptables_save(), &["-t", table], None, &obj)
            .await?;
        Ok(SavedTable::parse(&out, table))
    }

    async fn ipt_restore(&self, family: Family, caps: Caps, payload: &str, obj: &str) -> Result<(), TrafficError> {
        let args: &[&str] = if caps.wait {
            &["--noflush", "--wait"]
        } else {
            &["--noflush"]
        };
        debug!(%family, %payload, "iptables-restore");
        self.exec
            .run(Tool::Iptables, family.iptables_restore(), args, Some(payload), obj)
            .await?;
        Ok(())
    }
}

/// Upstream's log lines for installing a chain.
fn log_setup(family: Family, want: &IptChain) {
    match (want.chain, family) {
        (MASQ_CHAIN, Family::V4) => info!(%family, "Setting up masking rules"),
        (MASQ_CHAIN, Family::V6) => info!(%family, "Setting up masking rules for IPv6"),
        (_, Family::V4) => info!(%family, "Changing default FORWARD chain policy to ACCEPT"),
        (_, Family::V6) => info!(%family, "IPv6: Changing default FORWARD chain policy to ACCEPT"),
    }
}

/// Logs upstream's recycling line when the network or subnet changed since the last run.
/// The old rules themselves go with the bootstrap: they all live in `FLANNEL-POSTRTG`,
/// which the transaction flushes before writing the new ones, and the jump is the same.
fn log_recycle(family: Family, now: Nets, prev: Option<Nets>) {
    let (Some(sub), Some(prev)) = (now.subnet, prev) else {
        return;
    };
    let Some(prev_sub) = prev.subnet else { return };
    if prev.network != now.network || prev_sub != sub {
        info!(
            %family,
            "Current network or subnet ({}, {}) is not equal to previous one ({}, {}), trying to recycle old iptables rules",
            now.network, sub, prev.network, prev_sub
        );
    }
}
