//! `subnet.env`: the file the CNI plugin and Docker read, in upstream's format.
//!
//! Written atomically (a temporary file in the same directory, then rename), so
//! a reader never sees half a file (flannel-io/flannel#2253), with mode 0644
//! whatever the umask. Read back at start for the previous subnet.

use std::io::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ipnet::{Ipv4Net, Ipv6Net};

use crate::subnet::PreviousSubnets;

/// The content of `subnet.env`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`: the cluster network, when IPv4 is on.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`: this node's subnet, when IPv4 is on.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET`.
    pub ipv6_subnet: Option<Ipv6Net>,
    /// `FLANNEL_MTU`: the MTU pods should use.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades (`--ip-masq`).
    pub ipmasq: bool,
}

/// Writing `subnet.env` failed.
#[derive(Debug, thiserror::Error)]
#[error("failed to write subnet file {path}: {source}; check that its directory is writable")]
pub struct WriteError {
    /// The file being written.
    pub path: PathBuf,
    /// The underlying error.
    #[source]
    pub source: std::io::Error,
}

impl SubnetEnv {
    /// Renders the file: the subnets carry the first host address (`10.244.1.1/24`),
    /// lines in upstream's order.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let (Some(n), Some(s)) = (self.network, self.subnet) {
            let first = Ipv4Addr::from(u32::from(s.network()).wrapping_add(1));
            out += &format!("FLANNEL_NETWORK={n}\nFLANNEL_SUBNET={first}/{}\n", s.prefix_len());
        }
        if let (Some(n), Some(s)) = (self.ipv6_network, self.ipv6_subnet) {
            let first = Ipv6Addr::from(u128::from(s.network()).wrapping_add(1));
            out += &format!(
                "FLANNEL_IPV6_NETWORK={n}\nFLANNEL_IPV6_SUBNET={first}/{}\n",
                s.prefix_len()
            );
        }
        out += &format!("FLANNEL_MTU={}\nFLANNEL_IPMASQ={}\n", self.mtu, self.ipmasq);
        out
    }

    /// Writes the file atomically, creating its directory (0755) if needed.
    pub fn write(&self, path: &Path) -> Result<(), WriteError> {
        let err = |source| WriteError {
            path: path.to_path_buf(),
            source,
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(err)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".subnet.env")
            .tempfile_in(dir)
            .map_err(err)?;
        tmp.write_all(self.render().as_bytes()).map_err(err)?;
        tmp.as_file().sync_all().map_err(err)?;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o644))
            .map_err(err)?;
        tmp.persist(path).map_err(|e| err(e.error))?;
        Ok(())
    }
}

/// The `KEY=VALUE` lines of a `subnet.env`, key and value trimmed and the value unquoted;
/// other lines are skipped. Every reader of the file in flannel-rs goes through this: the
/// agent reading back its previous run here, the traffic rules, and the CNI plugin.
pub fn entries(text: &str) -> impl Iterator<Item = (&str, &str)> {
    text.lines().filter_map(|line| {
        let (k, v) = line.split_once('=')?;
        Some((k.trim(), v.trim().trim_matches('"')))
    })
}

/// The four networks of a `subnet.env`, read back leniently as upstream reads its own file:
/// an invalid value is skipped, host bits are cleared (the file holds the first host
/// address, `10.42.0.1/24`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Networks {
    /// `FLANNEL_NETWORK`.
    pub network: Option<Ipv4Net>,
    /// `FLANNEL_SUBNET`, as a network.
    pub subnet: Option<Ipv4Net>,
    /// `FLANNEL_IPV6_NETWORK`.
    pub ipv6_network: Option<Ipv6Net>,
    /// `FLANNEL_IPV6_SUBNET`, as a network.
    pub ipv6_subnet: Option<Ipv6Net>,
}

impl Networks {
    /// Parses `subnet.env` text, skipping what does not parse.
    pub fn parse(text: &str) -> Self {
        let mut n = Self::default();
        for (key, value) in entries(text) {
            let v4 = || value.parse::<Ipv4Net>().ok().map(|n| n.trunc());
            let v6 = || value.parse::<Ipv6Net>().ok().map(|n| n.trunc());
            match key {
                "FLANNEL_NETWORK" => n.network = v4(),
                "FLANNEL_SUBNET" => n.subnet = v4(),
                "FLANNEL_IPV6_NETWORK" => n.ipv6_network = v6(),
                "FLANNEL_IPV6_SUBNET" => n.ipv6_subnet = v6(),
                _ => {}
            }
        }
        n
    }

    /// Reads `path`; a missing or unreadable file gives none.
    pub fn read(path: &Path) -> Self {
        std::fs::read_to_string(path).map_or_else(|_| Self::default(), |text| Self::parse(&text))
    }
}

/// Reads the subnets a previous run wrote, as upstream does: host bits are
/// masked, invalid values are skipped. A missing or unreadable file gives none.
pub fn read_previous(path: &Path) -> PreviousSubnets {
    let n = Networks::read(path);
    PreviousSubnets {
        v4: n.subnet,
        v6: n.ipv6_subnet,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_upstreams_format() {
        let env = SubnetEnv {
            network: Some("10.42.0.0/16".parse().unwrap()),
            subnet: Some("10.42.0.0/24".parse().unwrap()),
            ipv6_network: Some("2001:cafe:42::/56".parse().unwrap()),
            ipv6_subnet: Some("2001:cafe:42::/64".parse().unwrap()),
            mtu: 1450,
            ipmasq: true,
        };
        assert_eq!(
            env.render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_IPV6_NETWORK=2001:cafe:42::/56\n\
             FLANNEL_IPV6_SUBNET=2001:cafe:42::1/64\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n"
        );
        let v4 = SubnetEnv {
            ipv6_network: None,
            ipv6_subnet: None,
            ipmasq: false,
            ..env
        };
        assert_eq!(
            v4.render(),
            "FLANNEL_NETWORK=10.42.0.0/16\nFLANNEL_SUBNET=10.42.0.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n"
        );
    }

    #[test]
    fn writes_atomically_with_mode_0644_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/flannel/subnet.env");
        let env = SubnetEnv {
            network: Some("10.5.0.0/16".parse().unwrap()),
            subnet: Some("10.5.72.0/24".parse().unwrap()),
            ipv6_network: None,
            ipv6_subnet: None,
            mtu: 1450,
            ipmasq: false,
        };
        env.write(&path).unwrap();
        env.write(&path).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        let names: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["subnet.env"], "no temporary file is left behind");
        let prev = read_previous(&path);
        assert_eq!(prev.v4, Some("10.5.72.0/24".parse().unwrap()));
        assert_eq!(prev.v6, None);
    }

    #[test]
    fn previous_skips_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        std::fs::write(&path, "FLANNEL_SUBNET=bogus\nFLANNEL_IPV6_SUBNET=fd00::5/64\n").unwrap();
        let prev = read_previous(&path);
        assert_eq!(prev.v4, None);
        assert_eq!(prev.v6, Some("fd00::/64".parse().unwrap()));
        assert_eq!(read_previous(&dir.path().join("absent")), PreviousSubnets::default());
    }
}
