//! The delegate configs saved at ADD, one file per container in the data directory.
//!
//! DEL must undo exactly what ADD did even if `subnet.env` changed or is gone since (a
//! node whose lease moved, flanneld down), so ADD saves the rendered config and DEL uses
//! it, as upstream does. The file is written atomically so that a crash mid-write never
//! leaves a truncated config that would make every later DEL of the pod fail.

use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::error::PluginError;

/// The saved delegate configs under one data directory.
#[derive(Debug, Clone)]
pub struct Store {
    /// The data directory, `/var/lib/cni/flannel` by default.
    pub dir: PathBuf,
}

impl Store {
    /// The store in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// Where the config of `container_id` lives (the caller validated the ID).
    pub fn path(&self, container_id: &str) -> PathBuf {
        self.dir.join(container_id)
    }

    /// Saves `config` for `container_id`, atomically, mode 0600 (it may hold runtime
    /// config such as port mappings), in a directory made 0700.
    pub fn save(&self, container_id: &str, config: &[u8]) -> Result<(), PluginError> {
        let path = self.path(container_id);
        let err = |what, error| PluginError::Io {
            what,
            path: path.clone(),
            error,
        };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.dir)
            .map_err(|e| err("creating the directory of", e))?;
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{container_id}"))
            .permissions(std::fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(|e| err("saving the delegate config to", e))?;
        tmp.write_all(config)
            .and_then(|()| tmp.as_file().sync_all())
            .map_err(|e| err("saving the delegate config to", e))?;
        tmp.persist(&path)
            .map_err(|e| err("saving the delegate config to", e.error))?;
        Ok(())
    }

    /// The config saved for `container_id`, or `None` if there is none.
    pub fn load(&self, container_id: &str) -> Result<Option<Vec<u8>>, PluginError> {
        let path = self.path(container_id);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(PluginError::Io {
                what: "reading the delegate config saved in",
                path,
                error,
            }),
        }
    }

    /// Forgets `container_id`; nothing to forget is fine.
    pub fn remove(&self, container_id: &str) -> Result<(), PluginError> {
        let path = self.path(container_id);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(PluginError::Io {
                what: "removing the delegate config",
                path,
                error: e,
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn saves_loads_and_removes() {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::new(&tmp.path().join("var/lib/cni/flannel"));
        assert_eq!(store.load("c1").unwrap(), None);
        store.save("c1", b"{\"a\":1}").unwrap();
        store.save("c1", b"{\"a\":2}").unwrap();
        assert_eq!(store.load("c1").unwrap().unwrap(), b"{\"a\":2}");
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&store.path("c1")), 0o600);
        assert_eq!(mode(&store.dir), 0o700);
        let names: Vec<_> = std::fs::read_dir(&store.dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["c1"], "no temporary file is left behind");
        store.remove("c1").unwrap();
        store.remove("c1").unwrap();
        assert_eq!(store.load("c1").unwrap(), None);
    }
}
