//! The `none` backend: programs nothing and remembers the peers it was given.
//! It lets the control plane run (and be tested) without touching the kernel.

use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::{Backend, BackendError, BackendInfo};
use crate::config::NetworkConfig;
use crate::netlink::ExternalInterface;
use crate::subnet::{Lease, PeerSet};

/// A backend that only records the desired state.
#[derive(Debug, Default, Clone)]
pub struct NoneBackend {
    /// The last peer set reconciled, shared so tests can look at it.
    pub programmed: Arc<Mutex<PeerSet>>,
}

#[async_trait]
impl Backend for NoneBackend {
    fn name(&self) -> &'static str {
        "none"
    }

    async fn prepare(&mut self, ext: &ExternalInterface, _config: &NetworkConfig) -> Result<BackendInfo, BackendError> {
        Ok(BackendInfo {
            backend_type: "none".into(),
            backend_data: None,
            backend_v6_data: None,
            mtu: ext.mtu,
        })
    }

    async fn set_own_lease(&mut self, _lease: &Lease) -> Result<(), BackendError> {
        Ok(())
    }

    async fn reconcile(&mut self, peers: &PeerSet) -> Result<usize, BackendError> {
        let mut p = self.programmed.lock().unwrap_or_else(|e| e.into_inner());
        *p = peers.clone();
        Ok(p.leases.len())
    }
}
