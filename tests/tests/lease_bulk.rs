//! Privileged: the real flanneld programs a few hundred leases at once (the pipelined
//! netlink writes and the map fill), with the eBPF and with the kernel datapath. Every
//! neighbour, FDB entry and route, every `FLANNEL_VTEPS` entry and every `FLANNEL_VTEP_ADDRS`
//! reference count is checked; a periodic reconcile afterwards must change nothing; and when
//! most leases go, exactly their entries go, in the kernel and in both maps. Outside CI it
//! skips loudly without root. Build the binaries first (`cargo build -p flannel-agent --bins`).

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use etcd_client::{Txn, TxnOp};
use flannel_tests::bench::leases::{fake_lease, write_leases};
use flannel_tests::testbed::{netns, probe, require_root, Testbed, TestbedOptions, AGENT_HEALTHZ_PORT};
use ipnet::IpNet;
use serde_json::Value;

/// More than one window of netlink requests in flight, few enough for CI.
const LEASES: usize = 300;
/// Leases left after the removal.
const KEEP: usize = 100;
const READY: Duration = Duration::from_secs(90);
/// Two periodic reconciles (every 10 s) and then some.
const CONVERGE: Duration = Duration::from_secs(30);

/// Leases `0..n` as the kernel and the maps should hold them: (subnet, public IP, MAC).
fn expected(n: usize) -> BTreeSet<(IpNet, Ipv4Addr, String)> {
    (0..n)
        .map(|i| {
            let (subnet, ip, mac) = fake_lease(i);
            (IpNet::V4(subnet), ip, mac)
        })
        .collect()
}

/// Node 1's flannel entries as (neighbours, FDB entries, routes), each reduced to what a
/// lease decides: (gateway, MAC), (MAC, remote), (subnet, gateway). Only routes through the
/// nexthop object flannel derives from the gateway (its address as the id) count.
async fn kernel_entries(
    tb: &Testbed,
) -> anyhow::Result<(
    BTreeSet<(IpAddr, String)>,
    BTreeSet<(String, IpAddr)>,
    BTreeSet<(IpNet, IpAddr)>,
)> {
    let neigh = tb
        .neighbours(1, "flannel.1", false)
        .await?
        .into_iter()
        .filter(|n| n.permanent)
        .filter_map(|n| Some((n.ip, n.mac?.to_ascii_lowercase())))
        .collect();
    let fdb = tb
        .fdb(1, "flannel.1")
        .await?
        .into_iter()
        .filter(|f| f.permanent)
        .filter_map(|f| Some((f.mac.to_ascii_lowercase(), f.dst?)))
        .collect();
    let routes = tb
        .flannel_routes(1, false)
        .await?
        .into_iter()
        .filter(|r| r.dev.as_deref() == Some("flannel.1") && r.onlink)
        .filter(|r| match r.gateway {
            Some(IpAddr::V4(gw)) => r.nhid == Some(u32::from(gw)),
            _ => false,
        })
        .filter_map(|r| Some((r.dst, r.gateway?)))
        .collect();
    Ok((neigh, fdb, routes))
}

/// `FLANNEL_VTEP_ADDRS` through bpftool: VTEP address → reference count.
async fn vtep_addrs(tb: &mut Testbed) -> anyhow::Result<BTreeSet<(Ipv4Addr, u64)>> {
    let pin = tb.bpf_pin_dir(1)?.join("v1/FLANNEL_VTEP_ADDRS");
    let dump = netns::run(
        "bpftool",
        &["map", "dump", "pinned", pin.to_str().context("pin path")?, "-j"],
        Duration::from_secs(20),
    )
    .await?;
    let entries: Value = serde_json::from_str(&dump).with_context(|| format!("bpftool output: {dump}"))?;
    let mut out = BTreeSet::new();
    for e in entries.as_array().context("bpftool output is not a list")? {
        // Keys and values are printed as byte strings ("0xc6") unless BTF names them.
        let bytes = |v: &Value| -> anyhow::Result<Vec<u8>> {
            v.as_array()
                .context("not a byte list")?
                .iter()
                .map(|b| {
                    let s = b.as_str().context("not a byte")?;
                    Ok(u8::from_str_radix(s.trim_start_matches("0x"), 16)?)
                })
                .collect()
        };
        let key = e.get("key").context("entry without key")?;
        let addr: [u8; 4] = match key.as_array() {
            Some(a) if a.first().is_some_and(Value::is_string) => bytes(key)?
                .try_into()
                .map_err(|_| anyhow::anyhow!("key is not 4 bytes"))?,
            Some(a) => a
                .iter()
                .map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()).context("key byte"))
                .collect::<anyhow::Result<Vec<u8>>>()?
                .try_into()
                .map_err(|_| anyhow::anyhow!("key is not 4 bytes"))?,
            None => anyhow::bail!("unexpected key {key}"),
        };
        let value = e.get("value").context("entry without value")?;
        let count = match value.as_u64() {
            Some(n) => n,
            None => {
                let b = bytes(value)?;
                u64::from(u32::from_le_bytes(
                    b.try_into().map_err(|_| anyhow::anyhow!("value is not 4 bytes"))?,
                ))
            }
        };
        out.insert((Ipv4Addr::from(addr), count));
    }
    Ok(out)
}

/// Checks node 1 holds exactly leases `0..n`: kernel entries always, maps with eBPF.
async fn check_exactly(tb: &mut Testbed, n: usize, ebpf: bool) -> anyhow::Result<()> {
    let want = expected(n);
    let (neigh, fdb, routes) = kernel_entries(tb).await?;
    let want_neigh: BTreeSet<_> = want.iter().map(|(s, _, m)| (s.network(), m.clone())).collect();
    let want_fdb: BTreeSet<_> = want.iter().map(|(_, ip, m)| (m.clone(), IpAddr::V4(*ip))).collect();
    let want_routes: BTreeSet<_> = want.iter().map(|(s, _, _)| (*s, s.network())).collect();
    ensure!(
        neigh == want_neigh,
        "neighbours: {} of {n}, e.g. missing {:?}",
        neigh.len(),
        want_neigh.difference(&neigh).next()
    );
    ensure!(
        fdb == want_fdb,
        "FDB entries: {} of {n}, e.g. missing {:?}",
        fdb.len(),
        want_fdb.difference(&fdb).next()
    );
    ensure!(
        routes == want_routes,
        "routes: {} of {n}, e.g. missing {:?}",
        routes.len(),
        want_routes.difference(&routes).next()
    );
    if !ebpf {
        return Ok(());
    }
    let pin_dir = tb.bpf_pin_dir(1)?;
    let map: BTreeSet<(IpNet, Ipv4Addr, String)> = flannel_agent::dataplane::pinned_vteps(&pin_dir)?
        .into_iter()
        .map(|(subnet, v)| {
            let m = v.vtep_mac;
            let mac = format!(
                "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                m[0], m[1], m[2], m[3], m[4], m[5]
            );
            (IpNet::V4(subnet), v.ipv4(), mac)
        })
        .collect();
    ensure!(
        map == want,
        "FLANNEL_VTEPS: {} of {n}, e.g. missing {:?}",
        map.len(),
        want.difference(&map).next()
    );
    let addrs = vtep_addrs(tb).await?;
    let want_addrs: BTreeSet<_> = want.iter().map(|(_, ip, _)| (*ip, 1)).collect();
    ensure!(
        addrs == want_addrs,
        "FLANNEL_VTEP_ADDRS: {} entries for {n} VTEPs, e.g. unexpected {:?}, missing {:?}",
        addrs.len(),
        addrs.difference(&want_addrs).next(),
        want_addrs.difference(&addrs).next()
    );
    Ok(())
}

async fn metric(tb: &Testbed, name: &str) -> anyhow::Result<f64> {
    let addr = SocketAddr::new(tb.node(1).ip.into(), AGENT_HEALTHZ_PORT);
    let (code, body) = probe::http_get(&tb.node(1).netns, addr, "/metrics").await?;
    ensure!(code == 200, "/metrics answered {code}");
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .with_context(|| format!("no {name} in /metrics"))
}

async fn bulk(datapath: &str) -> anyhow::Result<()> {
    let ebpf = datapath == "ebpf";
    let conf =
        format!(r#"{{"Network":"10.0.0.0/8","SubnetLen":24,"Backend":{{"Type":"vxlan","Datapath":"{datapath}"}}}}"#);
    let mut tb = Testbed::start(TestbedOptions::new(1).net_conf(&conf)).await?;
    write_leases(&tb, LEASES).await?;
    tb.start_agent(1, &[]).await?;
    tb.wait_ready(1, READY).await?;
    check_exactly(&mut tb, LEASES, ebpf).await?;

    // The next periodic reconcile finds everything in place and writes nothing (the agent
    // logs "vxlan datapath reconciled" only when it changed something).
    let changed = |tb: &mut Testbed| -> anyhow::Result<usize> {
        Ok(tb.agent_logs(1)?.matches("vxlan datapath reconciled").count())
    };
    let (n0, c0) = (metric(&tb, "flannel_reconciles_total").await?, changed(&mut tb)?);
    let deadline = Instant::now() + CONVERGE;
    while metric(&tb, "flannel_reconciles_total").await? < n0 + 1.0 {
        ensure!(Instant::now() < deadline, "no periodic reconcile within {CONVERGE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    ensure!(
        changed(&mut tb)? == c0,
        "a reconcile in sync changed something: {}",
        tb.agent(1)?.log_tail(5)
    );

    // Most leases go: exactly their entries go, in the kernel and in both maps.
    let mut client = tb.etcd().context("no etcd")?.client().await?;
    let keys: Vec<String> = (KEEP..LEASES).map(|i| tb.lease_key(fake_lease(i).0, None)).collect();
    for chunk in keys.chunks(100) {
        let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::delete(k.as_str(), None)).collect();
        client.txn(Txn::new().and_then(ops)).await?;
    }
    let deadline = Instant::now() + CONVERGE;
    loop {
        match check_exactly(&mut tb, KEEP, ebpf).await {
            Ok(()) => break,
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{CONVERGE:?} after the removal: {}", tb.agent(1)?.log_tail(8))))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_leases_with_the_ebpf_datapath_land_in_kernel_and_maps_exactly() -> anyhow::Result<()> {
    if !require_root("hundreds_of_leases_with_the_ebpf_datapath_land_in_kernel_and_maps_exactly") {
        return Ok(());
    }
    bulk("ebpf").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hundreds_of_leases_with_the_kernel_datapath_land_exactly() -> anyhow::Result<()> {
    if !require_root("hundreds_of_leases_with_the_kernel_datapath_land_exactly") {
        return Ok(());
    }
    bulk("kernel").await
}
