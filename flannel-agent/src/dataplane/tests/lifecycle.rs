//! The datapath's life cycle: pinned maps, restarts that adopt the attachments, netlink mode,
//! detaching, mounting bpffs, refusing incompatible pins.

use std::{
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use anyhow::{bail, ensure, Context as _, Result};
use aya::programs::{SchedClassifier, TcAttachType};
use flannel_common::{Stat, MAP_STATS, MAP_VTEPS, MAP_VTEP_ADDRS, PIN_SUBDIR, PROG_ENCAP};

use super::{
    load_node,
    net::{can_run_privileged, run, NetnsGuard, TestNet, SUBNETS},
    node_config,
    traffic::{both_ways, DatapathConfigExt as _},
    vtep_entry,
};
use crate::dataplane::{detach_all, pinned_counters, pinned_vteps, AttachMode, Datapath};

#[test]
fn pinned_maps_dump_with_field_names() -> Result<()> {
    if !can_run_privileged("pinned_maps_dump_with_field_names") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let dp = load_node(&net, 0, node_config(0))?;
    TestNet::ping(&net.nodes[0], SUBNETS[1], 1)?;
    let dump = |map: &str| -> Result<serde_json::Value> {
        let path = net.pin_dir(0).join(PIN_SUBDIR).join(map);
        let out = run(
            "bpftool",
            &["map", "dump", "pinned", path.to_str().context("utf-8 path")?, "-j"],
        )?;
        serde_json::from_slice(&out.stdout).context("bpftool printed no JSON")
    };
    // With BTF, bpftool adds a "formatted" object with field names next to the raw bytes.
    let vteps = dump(MAP_VTEPS)?;
    let entry = &vteps[0]["formatted"];
    ensure!(entry["key"]["prefix_len"] == 24, "no named key fields: {vteps}");
    ensure!(
        entry["key"]["data"] == serde_json::json!([10, 244, 2, 0]),
        "unexpected key: {vteps}"
    );
    ensure!(
        entry["value"]["vtep_ip"] == serde_json::json!([192, 168, 50, 2]),
        "no named value fields: {vteps}"
    );
    ensure!(entry["value"]["vtep_mac"][5] == 0x0b, "unexpected VTEP MAC: {vteps}");
    let addrs = dump(MAP_VTEP_ADDRS)?;
    ensure!(addrs[0]["formatted"]["value"] == 1, "unexpected known VTEPs: {addrs}");
    let stats = dump(MAP_STATS)?;
    ensure!(
        stats
            .as_array()
            .is_some_and(|entries| entries.len() == Stat::COUNT as usize),
        "unexpected counters: {stats}"
    );
    // The same through the agent's readers of the pins (flannelctl).
    ensure!(pinned_vteps(net.pin_dir(0))? == dp.vteps()?);
    ensure!(pinned_counters(net.pin_dir(0))?.get(Stat::EncapPackets) >= 1);
    Ok(())
}

/// The ids of the TCX programs at `hook` of `iface` in namespace `ns`.
fn tcx_programs(ns: &str, iface: &str, direction: TcAttachType) -> Result<Vec<(u32, String)>> {
    let _ns = NetnsGuard::enter(ns)?;
    let (_, programs) = SchedClassifier::query_tcx(iface, direction)?;
    Ok(programs
        .iter()
        .map(|p| (p.id(), p.name_as_str().unwrap_or_default().to_owned()))
        .collect())
}

#[test]
fn restarts_adopt_the_attachments_without_losing_a_packet() -> Result<()> {
    if !can_run_privileged("restarts_adopt_the_attachments_without_losing_a_packet") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let dp = load_node(&net, 0, node_config(0))?;
    load_node(&net, 1, node_config(1)).map(drop)?;
    let before = tcx_programs(&net.nodes[0], "flannel.1", TcAttachType::Egress)?;
    ensure!(before.len() == 1 && before[0].1 == PROG_ENCAP, "{before:?}");
    // The agent exits (or is killed: Drop does nothing to the kernel).
    drop(dp);

    let ping = Command::new("ip")
        .args([
            "netns",
            "exec",
            &net.nodes[0],
            "ping",
            // Longer than the three reloads below take on a busy machine (each loads and
            // verifies every program twice: probe and load), so the last count is mid-flow.
            "-c",
            "400",
            "-i",
            "0.01",
            "-W",
            "1",
            "-q",
        ])
        .arg(SUBNETS[1].to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let mut last = None;
    for _ in 0..3 {
        thread::sleep(Duration::from_millis(300));
        let _ns = NetnsGuard::enter(&net.nodes[0])?;
        // Reloaded without sync_vteps: the pinned maps still hold the peer.
        let dp = Datapath::load(&node_config(0), net.pin_dir(0))?;
        ensure!(dp.vteps()? == vec![vtep_entry(1)], "the pinned VTEPs were not reused");
        ensure!(dp.decap_attached(), "decap waits although the pinned VTEPs are known");
        last = Some(dp.counters()?);
    }
    let out = ping.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success() && text.contains(" 0% packet loss"),
        "packets lost across reloads:\n{text}"
    );
    let after = tcx_programs(&net.nodes[0], "flannel.1", TcAttachType::Egress)?;
    ensure!(after.len() == 1 && after[0].1 == PROG_ENCAP, "{after:?}");
    ensure!(after[0].0 != before[0].0, "the program was not replaced");
    let decap = tcx_programs(&net.nodes[0], "eth0", TcAttachType::Ingress)?;
    ensure!(decap.len() == 1, "{decap:?}");
    // The counters carried over and kept counting.
    let last = last.context("reloaded")?;
    ensure!(pinned_counters(net.pin_dir(0))?.get(Stat::EncapPackets) > last.get(Stat::EncapPackets));
    Ok(())
}

/// The `tc filter show` output of `dev` `direction` in namespace `ns`.
fn tc_filters(ns: &str, dev: &str, direction: &str) -> Result<String> {
    let out = TestNet::exec(ns, &["tc", "filter", "show", "dev", dev, direction])?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn netlink_mode_attaches_replaces_in_place_and_detaches() -> Result<()> {
    if !can_run_privileged("netlink_mode_attaches_replaces_in_place_and_detaches") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let config = |n| node_config(n).with_attach(AttachMode::Netlink);
    let dp = load_node(&net, 0, config(0))?;
    ensure!(dp.attach_mode() == AttachMode::Netlink);
    load_node(&net, 1, config(1)).map(drop)?;
    drop(dp);
    // Reloading changes the same filter (priority and handle) instead of adding one.
    drop(load_node(&net, 0, config(0))?);
    let filters = tc_filters(&net.nodes[0], "flannel.1", "egress")?;
    let ours = filters
        .lines()
        .filter(|line| line.contains("name flannel_encap"))
        .count();
    ensure!(ours == 1, "expected one flannel_encap filter:\n{filters}");
    ensure!(filters.contains("pref 241"), "not at our priority:\n{filters}");
    ensure!(tcx_programs(&net.nodes[0], "flannel.1", TcAttachType::Egress)?.is_empty());
    both_ways(&net)?;
    let counters = pinned_counters(net.pin_dir(0))?;
    ensure!(
        counters.get(Stat::EncapPackets) > 0 && counters.get(Stat::DecapPackets) > 0,
        "{counters:?}"
    );

    // Switching to TCX removes the filters once the links are in place.
    drop(load_node(&net, 0, node_config(0))?);
    let filters = tc_filters(&net.nodes[0], "flannel.1", "egress")?;
    ensure!(!filters.contains(PROG_ENCAP), "the netlink filter stayed:\n{filters}");
    ensure!(tcx_programs(&net.nodes[0], "flannel.1", TcAttachType::Egress)?.len() == 1);

    for n in 0..2 {
        let _ns = NetnsGuard::enter(&net.nodes[n])?;
        detach_all(net.pin_dir(n))?;
    }
    ensure!(!tc_filters(&net.nodes[1], "flannel.1", "egress")?.contains(PROG_ENCAP));
    ensure!(!tc_filters(&net.nodes[1], "eth0", "ingress")?.contains("flannel_decap"));
    Ok(())
}

#[test]
fn detaching_leaves_the_kernel_path_working() -> Result<()> {
    if !can_run_privileged("detaching_leaves_the_kernel_path_working") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    drop(load_node(&net, 0, node_config(0))?);
    drop(load_node(&net, 1, node_config(1))?);
    TestNet::ping(&net.nodes[0], SUBNETS[1], 2)?;
    for n in 0..2 {
        let _ns = NetnsGuard::enter(&net.nodes[n])?;
        detach_all(net.pin_dir(n))?;
        ensure!(!net.pin_dir(n).join(PIN_SUBDIR).exists(), "pins left on node {n}");
    }
    for n in 0..2 {
        for (iface, direction) in [("flannel.1", TcAttachType::Egress), ("eth0", TcAttachType::Ingress)] {
            let left = tcx_programs(&net.nodes[n], iface, direction)?;
            ensure!(left.is_empty(), "node {n} {iface}: {left:?}");
        }
    }
    both_ways(&net)
}

#[test]
fn load_mounts_bpffs_where_there_is_none() -> Result<()> {
    if !can_run_privileged("load_mounts_bpffs_where_there_is_none") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let dir = tempfile::Builder::new().prefix("flannel-rs-nobpffs-").tempdir()?;
    let pin_dir = dir.path().join("pins");
    let result = (|| -> Result<()> {
        let _ns = NetnsGuard::enter(&net.nodes[0])?;
        let dp = Datapath::load(&node_config(0), &pin_dir)?;
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let mounts = crate::dataplane::bpffs::parse_mountinfo(&mountinfo);
        ensure!(crate::dataplane::bpffs::fstype_of(&mounts, dp.pin_dir()) == Some("bpf"));
        drop(dp);
        detach_all(&pin_dir)?;
        Ok(())
    })();
    super::net::unmount_and_remove(&pin_dir);
    result?;
    if pin_dir.exists() {
        bail!("{} left behind", pin_dir.display());
    }
    Ok(())
}

#[test]
fn an_incompatible_pinned_map_is_refused() -> Result<()> {
    if !can_run_privileged("an_incompatible_pinned_map_is_refused") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    // A FLANNEL_VTEPS from some other layout (a hash with 4-byte keys), pinned where ours goes.
    let dir = net.pin_dir(0).join(PIN_SUBDIR);
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(MAP_VTEPS);
    let path = path.to_str().context("utf-8 path")?;
    run(
        "bpftool",
        &[
            "map",
            "create",
            path,
            "type",
            "hash",
            "key",
            "4",
            "value",
            "12",
            "entries",
            "16",
            "name",
            "FLANNEL_VTEPS",
        ],
    )?;
    let _ns = NetnsGuard::enter(&net.nodes[0])?;
    let err = Datapath::load(&node_config(0), net.pin_dir(0)).expect_err("an incompatible pin was reused");
    let message = err.to_string();
    ensure!(
        message.contains("does not match") && message.contains(MAP_VTEPS),
        "{message}"
    );
    ensure!(
        tcx_programs(&net.nodes[0], "flannel.1", TcAttachType::Egress)?.is_empty(),
        "attached anyway"
    );
    Ok(())
}

#[test]
fn peer_counters_come_with_the_first_packet_and_go_with_the_peer() -> Result<()> {
    if !can_run_privileged("peer_counters_come_with_the_first_packet_and_go_with_the_peer") {
        return Ok(());
    }
    let net = TestNet::new(false)?;
    let mut dp = load_node(&net, 0, node_config(0))?;
    let peer = super::net::UNDERLAY[1];
    ensure!(dp.peer_counters()?.is_empty(), "no entry before any packet");
    TestNet::ping(&net.nodes[0], SUBNETS[1], 2)?;
    let counters = dp.peer_counters()?;
    let stats = counters
        .get(&peer)
        .context("the programs created the peer's counters")?;
    ensure!(stats.encap_packets >= 2 && stats.decap_packets >= 2, "{stats:?}");

    // The peer goes: so do its counters.
    let (subnet, _) = vtep_entry(1);
    ensure!(dp.remove_vtep(subnet)?);
    ensure!(dp.peer_counters()?.is_empty(), "removed with the address");
    // A packet that raced the removal re-creates them (here by hand); the next write sweeps.
    let path = net.pin_dir(0).join(PIN_SUBDIR).join(flannel_common::MAP_PEER_STATS);
    let key: Vec<String> = peer.octets().iter().map(u8::to_string).collect();
    let mut args = vec!["map", "update", "pinned", path.to_str().context("utf-8 path")?, "key"];
    args.extend(key.iter().map(String::as_str));
    args.push("value");
    args.extend(["0"; 32]);
    run("bpftool", &args)?;
    ensure!(dp.peer_counters()?.contains_key(&peer), "the stray is there");
    let other = flannel_common::RemoteVtep::new(std::net::Ipv4Addr::new(192, 168, 50, 9), [2, 0, 0, 0, 0, 9], 0);
    dp.upsert_vtep("10.244.9.0/24".parse()?, other)?;
    ensure!(
        dp.peer_counters()?.is_empty(),
        "the stray was swept: {:?}",
        dp.peer_counters()?
    );
    // A peer that never sent a packet has no counters to remove: its removal still works.
    ensure!(dp.remove_vtep("10.244.9.0/24".parse()?)?);
    ensure!(dp.vteps()?.is_empty());
    Ok(())
}
