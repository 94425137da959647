//! A node's datapath as an operator reads it: `ip -j route`, `ip -j neigh`, `bridge -j fdb`
//! and `ip -j link`, parsed into small structs, so tests can say what must (not) be there.

use std::net::IpAddr;
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use serde_json::Value;

use super::cluster::Testbed;
use super::netns;

/// Bound on one `ip`/`bridge` invocation.
const TOOL_TIMEOUT: Duration = Duration::from_secs(10);

/// A route of a node's main table, as `ip -j route show` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Destination (`default` is `0.0.0.0/0` or `::/0`).
    pub dst: IpNet,
    /// The gateway, if any.
    pub gateway: Option<IpAddr>,
    /// The output device, if any.
    pub dev: Option<String>,
    /// `kernel`, `boot`, `static`, `102` (flannel-rs), ... iproute2 omits `boot`; so
    /// does this field's source, and it is filled in here.
    pub protocol: String,
    /// The `onlink` flag.
    pub onlink: bool,
    /// `unicast`, `blackhole`, ...
    pub kind: String,
    /// The nexthop object the route uses (`nhid`); `gateway`, `dev` and `onlink` are then
    /// the object's, as the kernel reports them with the route.
    pub nhid: Option<u32>,
}

impl Route {
    /// Whether flannel-rs installed it (`proto 102`).
    pub fn is_flannel(&self) -> bool {
        self.protocol == "102"
    }
}

/// A neighbour entry, as `ip -j neigh show dev <dev>` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    /// Its IP address.
    pub ip: IpAddr,
    /// Its link-layer address, lower case.
    pub mac: Option<String>,
    /// `nud permanent`.
    pub permanent: bool,
}

/// A forwarding database entry, as `bridge -j fdb show dev <dev>` prints it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FdbEntry {
    /// The MAC address, lower case.
    pub mac: String,
    /// The remote (VXLAN) destination, if any.
    pub dst: Option<IpAddr>,
    /// `permanent` (not learned, not aging).
    pub permanent: bool,
}

fn parse_net(text: &str, v6: bool) -> anyhow::Result<IpNet> {
    if text == "default" {
        return Ok(if v6 { "::/0" } else { "0.0.0.0/0" }.parse()?);
    }
    if text.contains('/') {
        return text.parse().with_context(|| format!("route destination {text:?}"));
    }
    let ip: IpAddr = text.parse().with_context(|| format!("route destination {text:?}"))?;
    Ok(IpNet::from(ip))
}

fn str_field(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

fn has_flag(v: &Value, key: &str, flag: &str) -> bool {
    match v.get(key) {
        Some(Value::Array(items)) => items.iter().any(|i| i.as_str() == Some(flag)),
        Some(Value::String(s)) => s == flag,
        _ => false,
    }
}

fn parse_json_array(text: &str, what: &str) -> anyhow::Result<Vec<Value>> {
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let value: Value = serde_json::from_str(text).with_context(|| format!("{what} printed no JSON: {text}"))?;
    match value {
        Value::Array(items) => Ok(items),
        other => anyhow::bail!("{what} printed {other}, not a JSON array"),
    }
}

/// Parses the output of `ip -j [-6] route show`.
pub fn parse_routes(text: &str, v6: bool) -> anyhow::Result<Vec<Route>> {
    parse_json_array(text, "ip route")?
        .iter()
        .map(|r| {
            let dst = str_field(r, "dst").context("route without dst")?;
            Ok(Route {
                dst: parse_net(&dst, v6)?,
                gateway: str_field(r, "gateway").map(|g| g.parse()).transpose()?,
                dev: str_field(r, "dev"),
                protocol: str_field(r, "protocol").unwrap_or_else(|| "boot".to_owned()),
                onlink: has_flag(r, "flags", "onlink"),
                kind: str_field(r, "type").unwrap_or_else(|| "unicast".to_owned()),
                nhid: r
                    .get("nhid")
                    .and_then(Value::as_u64)
                    .map(u32::try_from)
                    .transpose()
                    .context("nhid out of range")?,
            })
        })
        .collect()
}

/// Parses the output of `ip -j neigh show`.
pub fn parse_neighbours(text: &str) -> anyhow::Result<Vec<Neighbour>> {
    parse_json_array(text, "ip neigh")?
        .iter()
        .map(|n| {
            let ip = str_field(n, "dst").context("neighbour without dst")?;
            Ok(Neighbour {
                ip: ip.parse().with_context(|| format!("neighbour {ip:?}"))?,
                mac: str_field(n, "lladdr").map(|m| m.to_ascii_lowercase()),
                permanent: has_flag(n, "state", "PERMANENT"),
            })
        })
        .collect()
}

/// Parses the output of `bridge -j fdb show`.
pub fn parse_fdb(text: &str) -> anyhow::Result<Vec<FdbEntry>> {
    parse_json_array(text, "bridge fdb")?
        .iter()
        .map(|f| {
            Ok(FdbEntry {
                mac: str_field(f, "mac")
                    .context("FDB entry without mac")?
                    .to_ascii_lowercase(),
                dst: str_field(f, "dst").map(|d| d.parse()).transpose()?,
                permanent: has_flag(f, "state", "permanent"),
            })
        })
        .collect()
}

impl Testbed {
    /// The main routing table of node `number` (IPv6 when `v6`).
    pub async fn routes(&self, number: usize, v6: bool) -> anyhow::Result<Vec<Route>> {
        let family = if v6 { "-6" } else { "-4" };
        let text = netns::ip(
            &self.node(number).netns,
            &["-j", family, "route", "show", "table", "main"],
        )
        .await?;
        parse_routes(&text, v6)
    }

    /// The routes flannel-rs installed on node `number` (`ip route show proto 102`).
    pub async fn flannel_routes(&self, number: usize, v6: bool) -> anyhow::Result<Vec<Route>> {
        Ok(self
            .routes(number, v6)
            .await?
            .into_iter()
            .filter(Route::is_flannel)
            .collect())
    }

    /// The route of node `number` to exactly `dst`, if there is one.
    pub async fn route_to(&self, number: usize, dst: IpNet) -> anyhow::Result<Option<Route>> {
        let v6 = matches!(dst, IpNet::V6(_));
        Ok(self.routes(number, v6).await?.into_iter().find(|r| r.dst == dst))
    }

    /// The neighbour entries on `dev` of node `number` (IPv6 when `v6`); empty if the
    /// device does not exist.
    pub async fn neighbours(&self, number: usize, dev: &str, v6: bool) -> anyhow::Result<Vec<Neighbour>> {
        if self.link_mac(number, dev).await?.is_none() {
            return Ok(Vec::new());
        }
        let family = if v6 { "-6" } else { "-4" };
        let text = netns::ip(&self.node(number).netns, &["-j", family, "neigh", "show", "dev", dev]).await?;
        parse_neighbours(&text)
    }

    /// The FDB entries on `dev` of node `number`; empty if the device does not exist.
    pub async fn fdb(&self, number: usize, dev: &str) -> anyhow::Result<Vec<FdbEntry>> {
        if self.link_mac(number, dev).await?.is_none() {
            return Ok(Vec::new());
        }
        let ns = &self.node(number).netns;
        let text = netns::run(
            "ip",
            &["netns", "exec", ns, "bridge", "-j", "fdb", "show", "dev", dev],
            TOOL_TIMEOUT,
        )
        .await?;
        parse_fdb(&text)
    }

    /// The MAC address of `dev` on node `number`, lower case; `None` if there is no such
    /// device.
    pub async fn link_mac(&self, number: usize, dev: &str) -> anyhow::Result<Option<String>> {
        let ns = &self.node(number).netns;
        let out = netns::output("ip", &["-n", ns, "-j", "link", "show", "dev", dev], None, TOOL_TIMEOUT).await?;
        if !out.status.success() {
            let stderr = String::from_utf8_lossy(&out.stderr);
            if stderr.contains("does not exist") || stderr.contains("Cannot find device") {
                return Ok(None);
            }
            netns::check("ip", &["-n", ns, "link", "show", "dev", dev], &out)?;
        }
        let links = parse_json_array(&String::from_utf8_lossy(&out.stdout), "ip link")?;
        Ok(links
            .first()
            .and_then(|l| str_field(l, "address"))
            .map(|m| m.to_ascii_lowercase()))
    }

    /// `ip -d -j link show dev <dev>` on node `number`: the whole JSON object, for
    /// attributes such as `linkinfo.info_data`.
    pub async fn link_details(&self, number: usize, dev: &str) -> anyhow::Result<Value> {
        let text = netns::ip(&self.node(number).netns, &["-d", "-j", "link", "show", "dev", dev]).await?;
        parse_json_array(&text, "ip link")?
            .into_iter()
            .next()
            .with_context(|| format!("no link {dev} on node {number}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_iproute2_json() {
        let routes = parse_routes(
            r#"[{"dst":"default","gateway":"198.18.0.254","dev":"eth0","flags":[]},
                {"dst":"10.244.3.0/24","nhid":183763712,"gateway":"10.244.3.0","dev":"flannel.1","protocol":"102","flags":["onlink"]},
                {"dst":"10.9.9.9","type":"blackhole","protocol":"static","flags":[]}]"#,
            false,
        )
        .unwrap();
        assert_eq!(routes[0].dst, "0.0.0.0/0".parse::<IpNet>().unwrap());
        assert_eq!(routes[0].protocol, "boot");
        assert!(routes[1].is_flannel() && routes[1].onlink);
        assert_eq!(routes[1].gateway, Some("10.244.3.0".parse().unwrap()));
        assert_eq!((routes[0].nhid, routes[1].nhid), (None, Some(183_763_712)));
        assert_eq!(routes[2].dst, "10.9.9.9/32".parse::<IpNet>().unwrap());
        assert_eq!(routes[2].kind, "blackhole");

        let neigh =
            parse_neighbours(r#"[{"dst":"10.244.3.0","lladdr":"02:AA:bb:cc:dd:ee","state":["PERMANENT"]}]"#).unwrap();
        assert_eq!(neigh[0].mac.as_deref(), Some("02:aa:bb:cc:dd:ee"));
        assert!(neigh[0].permanent);

        let fdb = parse_fdb(
            r#"[{"mac":"02:aa:bb:cc:dd:ee","dst":"198.18.0.3","flags":["self"],"state":"permanent"},
                               {"mac":"33:33:00:00:00:01","flags":["self"],"state":"permanent"}]"#,
        )
        .unwrap();
        assert_eq!(fdb[0].dst, Some("198.18.0.3".parse().unwrap()));
        assert!(fdb[0].permanent);
        assert_eq!(fdb[1].dst, None);
        assert!(parse_fdb("").unwrap().is_empty());
    }
}
