//! nftables mode (`EnableNFTables`): flannel's own tables `ip flannel-ipv4` and
//! `ip6 flannel-ipv6`, with base chains `postrtg` (nat) and `forward` (filter), written
//! in one `nft -f -` transaction. No shared chain, so no rule order to defend.
//!
//! Upstream installs the rules once. Here the resync lists both tables every period and
//! rewrites them when the listing differs from the one taken right after our last write
//! (a baseline rather than our rendering, so any nft version's printing style works).

use tracing::{debug, error, info, warn};

use super::exec::{is_not_found, Tool};
use super::render::{self, Family, NftTable};
use super::{RuleSet, TrafficError, TrafficManager};

impl TrafficManager {
    /// What flannel wants in each family's table. Both tables exist in every case, as
    /// upstream creates them; unwanted chains are removed.
    fn nft_wanted(&self, rules: &RuleSet) -> [NftTable; 2] {
        Family::ALL.map(|family| {
            let nets = rules.nets(family);
            NftTable {
                family,
                masq: nets
                    .filter(|_| self.opts.masquerade)
                    .and_then(|n| Some((n.network, n.subnet?))),
                forward: nets.filter(|_| self.opts.forward_rules).map(|n| n.network),
            }
        })
    }

    /// Whether to write `fully-random`: not disabled and accepted by nft and the kernel
    /// (upstream's `nft --check` probe), probed once.
    async fn nft_random_fully(&self) -> bool {
        if self.opts.fully_random_disable {
            return false;
        }
        *self
            .nft_random_fully
            .get_or_init(|| async {
                let probe = render::nft_random_fully_probe();
                match self
                    .exec
                    .run(Tool::Nft, "nft", &["--check", "-f", "-"], Some(&probe), "probe")
                    .await
                {
                    Ok(_) => true,
                    Err(e) => {
                        warn!(error = %e, "nftables: random fully unsupported");
                        false
                    }
                }
            })
            .await
    }

    /// Writes both tables.
    pub(super) async fn nft_setup(&self, rules: &RuleSet) -> Result<(), TrafficError> {
        info!("Starting flannel in nftables mode...");
        let tables = self.nft_wanted(rules);
        for t in &tables {
            let suffix = if t.family == Family::V4 { "ipv4" } else { "ipv6" };
            if t.masq.is_some() {
                info!(family = %t.family, "nftables: setting up masking rules ({suffix})");
            } else if let (true, Some(nets)) = (self.opts.masquerade, rules.nets(t.family)) {
                warn!(family = %t.family, network = %nets.network, "no subnet leased; not masquerading this family");
            }
            if t.forward.is_some() {
                match t.family {
                    Family::V4 => info!(family = %t.family, "Changing default FORWARD chain policy to ACCEPT"),
                    Family::V6 => info!(family = %t.family, "Changing default FORWARD chain policy to ACCEPT (ipv6)"),
                }
            }
        }
        self.nft_apply(&tables).await
    }

    /// One transaction for both tables, then a new baseline.
    async fn nft_apply(&self, tables: &[NftTable; 2]) -> Result<(), TrafficError> {
        let random_fully = tables.iter().any(|t| t.masq.is_some()) && self.nft_random_fully().await;
        let script = render::nft_script(tables, random_fully);
        debug!(%script, "nft -f -");
        let obj = "tables ip flannel-ipv4 and ip6 flannel-ipv6";
        self.exec
            .run(Tool::Nft, "nft", &["-f", "-"], Some(&script), obj)
            .await?;
        let mut baseline = [None, None];
        for t in tables {
            match self.nft_list(t.family).await {
                Ok(listing) => {
                    if listing.as_deref() != Some(render::nft_listing(t, random_fully).as_str()) {
                        // Harmless (another nft version's style, or a foreign chain in our
                        // table); the baseline is what counts.
                        debug!(family = %t.family, listing = listing.as_deref().unwrap_or(""), "nft lists the table differently than rendered");
                    }
                    baseline[t.family.index()] = listing;
                }
                // The rules are in; without a baseline the next resync just rewrites them.
                Err(e) => warn!(family = %t.family, error = %e, "cannot list the nftables table after writing it"),
            }
        }
        *self.nft_baseline.lock().unwrap_or_else(|p| p.into_inner()) = baseline;
        Ok(())
    }

    /// `nft list table`; `None` when the table does not exist.
    async fn nft_list(&self, family: Family) -> Result<Option<String>, TrafficError> {
        let (fam, table) = (family.nft_family(), family.nft_table());
        let obj = format!("table {fam} {table}");
        match self
            .exec
            .run(Tool::Nft, "nft", &["list", "table", fam, table], None, &obj)
            .await
        {
            Ok(listing) => Ok(Some(listing)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One resync pass: rewrites both tables if either changed since our last write.
    pub(super) async fn nft_resync(&self, rules: &RuleSet) {
        let baseline = self.nft_baseline.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let mut changed = None;
        for family in Family::ALL {
            match self.nft_list(family).await {
                Ok(Some(listing)) if Some(&listing) == baseline[family.index()].as_ref() => {}
                Ok(_) => {
                    changed = Some(family);
                    break;
                }
                Err(e) => {
                    error!(%family, error = %e, "Failed to check nftables rules");
                    return;
                }
            }
        }
        let Some(family) = changed else { return };
        info!(%family, table = family.nft_table(), "nftables rules changed; deleting and recreating rules");
        if let Err(e) = self.nft_apply(&self.nft_wanted(rules)).await {
            error!(error = %e, "Failed to ensure nftables rules");
        }
    }

    /// Deletes flannel's nftables tables (iptables mode uses none). Failures are logged:
    /// they do not stop iptables mode, and a host without nft has nothing to remove.
    pub(super) async fn nft_cleanup(&self) {
        let tables = match self
            .exec
            .run(Tool::Nft, "nft", &["list", "tables"], None, "nftables")
            .await
        {
            Ok(out) => out,
            Err(e) => {
                debug!(error = %e, "no usable nft; no nftables tables to remove");
                return;
            }
        };
        let present = render::nft_tables_present(&tables);
        if present.is_empty() {
            return;
        }
        info!("Cleaning-up flannel tables...");
        let script = render::nft_delete_tables(&present);
        match self
            .exec
            .run(
                Tool::Nft,
                "nft",
                &["-f", "-"],
                Some(&script),
                "flannel's nftables tables",
            )
            .await
        {
            Ok(_) => {
                info!(tables = ?present.iter().map(|f| f.nft_table()).collect::<Vec<_>>(), "removed flannel's nftables tables")
            }
            Err(e) => warn!(error = %e, "could not remove flannel's nftables tables"),
        }
    }
}
