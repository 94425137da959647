//! An in-memory subnet manager, for tests of the daemon and the backends: the
//! config and the peers are whatever the test puts there.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{
    alloc, Candidate, Lease, LeaseAttrs, LeaseValidator, PeerSet, PreviousSubnets, SubnetError, SubnetManager,
};
use crate::config::NetworkConfig;
use crate::metrics::Metrics;

/// A subnet manager that keeps everything in memory.
pub struct MemorySubnetManager {
    config: NetworkConfig,
    metrics: Arc<Metrics>,
    /// The other nodes' entries; tests change them with [`Self::set_peers`].
    peers: watch::Sender<Vec<Candidate>>,
    own: Mutex<Option<Lease>>,
}

impl MemorySubnetManager {
    /// A manager serving `config` (already checked).
    pub fn new(config: NetworkConfig, metrics: Arc<Metrics>) -> Self {
        Self {
            config,
            metrics,
            peers: watch::Sender::new(Vec::new()),
            own: Mutex::new(None),
        }
    }

    /// Replaces the other nodes' entries.
    pub fn set_peers(&self, peers: Vec<Candidate>) {
        self.peers.send_replace(peers);
    }
}

#[async_trait]
impl SubnetManager for MemorySubnetManager {
    fn name(&self) -> &'static str {
        "memory"
    }

    async fn network_config(&self) -> Result<NetworkConfig, SubnetError> {
        Ok(self.config.clone())
    }

    async fn acquire_lease(
        &self,
        config: &NetworkConfig,
        attrs: &LeaseAttrs,
        previous: PreviousSubnets,
    ) -> Result<Lease, SubnetError> {
        let taken: Vec<_> = self
            .peers
            .borrow()
            .iter()
            .filter_map(|c| c.lease.as_ref().ok().and_then(|l| l.subnet))
            .collect();
        let v4 = if config.enable_ipv4 {
            previous
                .v4
                .filter(|p| config.v4_compatible(p))
                .or_else(|| alloc::free_v4(config, &taken))
        } else {
            None
        };
        let v6 = if config.enable_ipv6 {
            previous.v6.or_else(|| alloc::free_v6(config, &[]))
        } else {
            None
        };
        let lease = Lease {
            subnet: v4,
            ipv6_subnet: v6,
            attrs: attrs.clone(),
            expiration: None,
        };
        *self.own.lock().unwrap_or_else(|p| p.into_inner()) = Some(lease.clone());
        Ok(lease)
    }

    async fn run(
        &self,
        config: NetworkConfig,
        own: Lease,
        peers: watch::Sender<PeerSet>,
        shutdown: CancellationToken,
    ) -> Result<(), SubnetError> {
        let mut validator = LeaseValidator::new(&config, Some(own), self.metrics.clone());
        let mut rx = self.peers.subscribe();
        let mut generation = 0;
        loop {
            generation += 1;
            let leases = validator.validate(rx.borrow_and_update().iter());
            peers.send_replace(PeerSet {
                leases,
                complete: true,
                generation,
            });
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                r = rx.changed() => if r.is_err() { return Ok(()) },
            }
        }
    }
}
