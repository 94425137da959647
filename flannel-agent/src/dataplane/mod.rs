//! The eBPF datapath: the one module of the agent that uses aya.
//!
//! build.rs builds `flannel-ebpf` and this module embeds the object. For now it can load the
//! object and report the maps and programs in it, checked against the names in
//! `flannel-common`; attaching the classifiers and filling `FLANNEL_VTEPS` from the leases
//! come with the full datapath.

#[cfg(test)]
mod tests;

use std::collections::BTreeSet;

use aya::{Ebpf, EbpfError};
use flannel_common::{MAP_NAMES, PROGRAM_NAMES};

/// The object built from flannel-ebpf by build.rs, aligned as aya's ELF parser requires.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/flannel-ebpf.o"));

/// The embedded eBPF object: an ELF file for `bpfel-unknown-none`, with BTF.
pub fn object_bytes() -> &'static [u8] {
    OBJECT
}

/// Errors of the eBPF datapath.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The kernel refused the object (creating its maps needs root, or CAP_BPF).
    #[error("loading the embedded eBPF object (flannel-ebpf) into the kernel failed; run flanneld as root")]
    Load(#[source] EbpfError),
    /// The embedded object lacks maps or programs that flannel-common names: flannel-ebpf and
    /// flannel-common disagree, which a rebuild of the agent should fix.
    #[error("the embedded eBPF object lacks {missing:?}, which flannel-common names; rebuild flanneld")]
    MissingNames {
        /// The names from flannel-common that the object does not have.
        missing: Vec<&'static str>,
    },
}

/// The maps and programs an eBPF object contains, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectContents {
    /// Map names, including aya-log's maps (`AYA_LOGS`, ...).
    pub maps: BTreeSet<String>,
    /// Program names (the names of the entry-point functions).
    pub programs: BTreeSet<String>,
}

impl ObjectContents {
    /// Collects map and program names.
    pub fn new<'a>(maps: impl IntoIterator<Item = &'a str>, programs: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            maps: maps.into_iter().map(str::to_owned).collect(),
            programs: programs.into_iter().map(str::to_owned).collect(),
        }
    }

    /// The map and program names from flannel-common that are not in this object.
    pub fn missing(&self) -> Vec<&'static str> {
        let maps = MAP_NAMES.into_iter().filter(|name| !self.maps.contains(*name));
        let programs = PROGRAM_NAMES.into_iter().filter(|name| !self.programs.contains(*name));
        maps.chain(programs).collect()
    }
}

/// Loads the embedded object: the kernel creates its maps; programs are only parsed, each is
/// loaded when it is attached. Needs root (or CAP_BPF).
fn load() -> Result<Ebpf, DataplaneError> {
    Ebpf::load(object_bytes()).map_err(DataplaneError::Load)
}

/// The names of the maps and programs of a loaded object.
fn contents(ebpf: &Ebpf) -> ObjectContents {
    ObjectContents::new(ebpf.maps().map(|(name, _)| name), ebpf.programs().map(|(name, _)| name))
}

/// Loads the embedded object, returns what it contains, and fails if anything flannel-common
/// names is missing. The maps are freed again when this returns.
pub fn load_and_list() -> Result<ObjectContents, DataplaneError> {
    let contents = contents(&load()?);
    let missing = contents.missing();
    if !missing.is_empty() {
        return Err(DataplaneError::MissingNames { missing });
    }
    Ok(contents)
}
