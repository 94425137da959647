//! Reading `subnet.env` the way flannel's CNI plugin does, and waiting for it.
//!
//! flanneld writes the file once it holds a lease. On a booting node the kubelet starts
//! pods before that, and upstream's plugin then fails every ADD with "no such file"
//! (flannel-io/flannel#2253, the most asked flannel question). This plugin waits a bounded
//! time for the file instead, and only then fails with a message that says what to check.

use std::path::Path;
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::error::PluginError;

/// How often the plugin looks for `subnet.env` while it waits.
const POLL: Duration = Duration::from_millis(100);

/// The values of `subnet.env` the plugin uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubnetEnv {
    /// `FLANNEL_NETWORK`, comma-separated networks (host bits cleared).
    pub networks: Vec<IpNet>,
    /// `FLANNEL_SUBNET` as a network: the file holds the node's first address
    /// (`10.244.1.1/24`), host-local wants the network (`10.244.1.0/24`).
    pub subnet: Option<IpNet>,
    /// `FLANNEL_IPV6_NETWORK`, comma-separated.
    pub ipv6_networks: Vec<IpNet>,
    /// `FLANNEL_IPV6_SUBNET` as a network.
    pub ipv6_subnet: Option<IpNet>,
    /// `FLANNEL_MTU`: the MTU pods get.
    pub mtu: u32,
    /// `FLANNEL_IPMASQ`: whether flanneld masquerades pod traffic.
    pub ipmasq: bool,
}

/// Why `subnet.env` cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SubnetEnvError {
    /// The file cannot be read (usually: it does not exist yet).
    #[error("{0}")]
    Read(std::io::Error),
    /// A value does not parse.
    #[error("{key}={value:?} is not valid: {reason}")]
    Invalid {
        /// The key.
        key: String,
        /// Its value.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Required keys are absent (also what a half-written file looks like).
    #[error("the file is missing {0}")]
    Incomplete(String),
}

impl SubnetEnv {
    /// Parses `KEY=VALUE` lines as upstream's plugin does: unknown keys are ignored, a
    /// network and a subnet of at least one family plus `FLANNEL_MTU` and
    /// `FLANNEL_IPMASQ` are required, and `FLANNEL_IPMASQ` is true only when it is `true`.
    pub fn parse(text: &str) -> Result<Self, SubnetEnvError> {
        let (mut networks, mut ipv6_networks) = (Vec::new(), Vec::new());
        let (mut subnet, mut ipv6_subnet, mut mtu, mut ipmasq) = (None, None, None, None);
        for (key, value) in crate::subnet_file::entries(text) {
            let invalid = |reason: String| SubnetEnvError::Invalid {
                key: key.to_owned(),
                value: value.to_owned(),
                reason,
            };
            let cidr = |v: &str| {
                v.trim()
                    .parse::<IpNet>()
                    .map(|n| n.trunc())
                    .map_err(|e| invalid(e.to_string()))
            };
            match key {
                "FLANNEL_NETWORK" => networks = value.split(',').map(cidr).collect::<Result<_, _>>()?,
                "FLANNEL_IPV6_NETWORK" => ipv6_networks = value.split(',').map(cidr).collect::<Result<_, _>>()?,
                "FLANNEL_SUBNET" => subnet = Some(cidr(value)?),
                "FLANNEL_IPV6_SUBNET" => ipv6_subnet = Some(cidr(value)?),
                "FLANNEL_MTU" => mtu = Some(value.parse::<u32>().map_err(|e| invalid(e.to_string()))?),
                "FLANNEL_IPMASQ" => ipmasq = Some(value == "true"),
                _ => {}
            }
        }
        let mut missing = Vec::new();
        if networks.is_empty() && ipv6_networks.is_empty() {
            missing.extend(["FLANNEL_NETWORK", "FLANNEL_IPV6_NETWORK"]);
        }
        if subnet.is_none() && ipv6_subnet.is_none() {
            missing.extend(["FLANNEL_SUBNET", "FLANNEL_IPV6_SUBNET"]);
        }
        if mtu.is_none() {
            missing.push("FLANNEL_MTU");
        }
        if ipmasq.is_none() {
            missing.push("FLANNEL_IPMASQ");
        }
        match (mtu, ipmasq) {
            (Some(mtu), Some(ipmasq)) if missing.is_empty() => Ok(Self {
                networks,
                subnet,
                ipv6_networks,
                ipv6_subnet,
                mtu,
                ipmasq,
            }),
            _ => Err(SubnetEnvError::Incomplete(missing.join(", "))),
        }
    }

    /// Reads and parses `path` once.
    pub fn load(path: &Path) -> Result<Self, SubnetEnvError> {
        let text = std::fs::read_to_string(path).map_err(SubnetEnvError::Read)?;
        Self::parse(&text)
    }

    /// Reads `path`, waiting up to `wait` for it to appear and be complete. Every failure
    /// is retried until the deadline: a missing file (flanneld not up yet) and a partial
    /// one (a flanneld that does not write atomically) both heal by themselves.
    pub fn load_waiting(path: &Path, wait: Duration) -> Result<Self, PluginError> {
        let started = Instant::now();
        loop {
            let error = match Self::load(path) {
                Ok(env) => return Ok(env),
                Err(e) => e,
            };
            let waited = started.elapsed();
            if waited >= wait {
                return Err(PluginError::SubnetEnv {
                    path: path.to_path_buf(),
                    waited,
                    error,
                });
            }
            std::thread::sleep(POLL.min(wait - waited));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V4: &str =
        "FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.1.1/24\nFLANNEL_MTU=1450\nFLANNEL_IPMASQ=true\n";

    #[test]
    fn parses_upstreams_format() {
        let env = SubnetEnv::parse(V4).unwrap();
        assert_eq!(env.networks, ["10.244.0.0/16".parse::<IpNet>().unwrap()]);
        assert_eq!(env.subnet, Some("10.244.1.0/24".parse().unwrap()));
        assert_eq!((env.mtu, env.ipmasq), (1450, true));
        assert!(env.ipv6_networks.is_empty() && env.ipv6_subnet.is_none());
    }

    #[test]
    fn several_networks_and_ipv6_only() {
        let text = "FLANNEL_IPV6_NETWORK=fd00::/56,fd01::/56\nFLANNEL_IPV6_SUBNET=fd00:0:0:5::1/64\n\
                    FLANNEL_MTU=1430\nFLANNEL_IPMASQ=True\n";
        let env = SubnetEnv::parse(text).unwrap();
        assert_eq!(env.ipv6_networks.len(), 2);
        assert_eq!(env.ipv6_subnet, Some("fd00:0:0:5::/64".parse().unwrap()));
        assert!(!env.ipmasq, "only exactly `true` is true");
    }

    #[test]
    fn names_missing_keys_and_bad_values() {
        let err = SubnetEnv::parse("FLANNEL_NETWORK=10.0.0.0/8\n").unwrap_err();
        assert_eq!(
            err.to_string(),
            "the file is missing FLANNEL_SUBNET, FLANNEL_IPV6_SUBNET, FLANNEL_MTU, FLANNEL_IPMASQ"
        );
        let err = SubnetEnv::parse("FLANNEL_SUBNET=nonsense\n").unwrap_err();
        assert!(
            err.to_string().starts_with("FLANNEL_SUBNET=\"nonsense\" is not valid"),
            "{err}"
        );
        assert!(SubnetEnv::parse("FLANNEL_MTU=-1\n").is_err());
    }

    #[test]
    fn waits_for_the_file_then_gives_up() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("subnet.env");
        let started = Instant::now();
        let err = SubnetEnv::load_waiting(&path, Duration::from_millis(300)).unwrap_err();
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(matches!(err, PluginError::SubnetEnv { .. }), "{err}");

        let writer = {
            let path = path.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(200));
                std::fs::write(path, V4).unwrap();
            })
        };
        let env = SubnetEnv::load_waiting(&path, Duration::from_secs(10)).unwrap();
        writer.join().unwrap();
        assert_eq!(env.mtu, 1450);
    }
}
