//! Tests of the datapath: the object (unprivileged), and privileged ones in network
//! namespaces: `BPF_PROG_TEST_RUN` and live frames compared byte for byte with what the
//! kernel's vxlan device produces, and end-to-end traffic between two namespaced nodes.
//! Privileged tests skip loudly when not root, and fail when CI is set.

mod flows;
mod lifecycle;
mod net;
mod packet;
mod traffic;
mod wire;

use std::{collections::BTreeMap, net::Ipv4Addr};

use anyhow::{Context as _, Result};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use flannel_common::{RemoteVtep, PROG_DECAP, PROG_ENCAP};
use ipnet::Ipv4Net;

use self::net::{NetnsGuard, TestNet, PORT, SUBNETS, UNDERLAY, VNI, VTEP_MACS};
use super::*;

#[test]
fn built_object_has_every_map_and_program() {
    let object = aya_obj::Object::parse(object_bytes()).expect("the embedded eBPF object parses");
    let contents = ObjectContents::new(
        object.maps.keys().map(String::as_str),
        object.programs.keys().map(String::as_str),
    );
    assert_eq!(contents.missing(), Vec::<&str>::new(), "object contains {contents:?}");
    // Without BTF the maps would have no key/value types for the kernel and bpftool.
    assert!(object.btf.is_some(), "the embedded eBPF object carries no BTF");
}

#[test]
fn contents_reports_what_is_missing() {
    let contents = ObjectContents::new([MAP_VTEPS], [PROG_ENCAP]);
    assert_eq!(
        contents.missing(),
        vec![
            MAP_VTEP_ADDRS,
            MAP_STATS,
            MAP_PEER_STATS,
            MAP_LOCAL_PODS,
            MAP_POD_STATS,
            MAP_XDP_STATS,
            MAP_KERNEL_FLOWS,
            PROG_DECAP,
            flannel_common::PROG_PROBE,
            PROG_POD_EGRESS,
            PROG_XDP_DECAP
        ]
    );
}

#[test]
fn port_ranges_parse_as_the_sysctl_prints_them() {
    assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
    assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
    assert_eq!(parse_port_range("60999 32768"), None);
    assert_eq!(parse_port_range("x"), None);
}

#[test]
fn config_validation_names_the_field() {
    let good = DatapathConfig::new(
        "flannel.1",
        "eth0",
        Ipv4Addr::new(192, 0, 2, 1),
        [2, 0, 0, 0, 0, 1],
        1,
        8472,
    );
    assert!(good.validate().is_ok());
    let bad = DatapathConfig {
        vni: 1 << 24,
        ..good.clone()
    };
    assert!(bad.validate().unwrap_err().to_string().contains("vni"));
    let bad = DatapathConfig {
        vtep_mac: [1, 0, 0, 0, 0, 1],
        ..good
    };
    assert!(bad.validate().unwrap_err().to_string().contains("vtep_mac"));
}

#[test]
fn probe_passes_here_and_a_pretended_missing_feature_fails() {
    if !net::can_run_privileged("probe_passes_here_and_a_pretended_missing_feature_fails") {
        return;
    }
    let report = probe(&ProbeOptions::default()).expect("this kernel (6.18) runs the datapath");
    assert!(report.tcx, "6.18 has TCX");
    let err = probe(&ProbeOptions {
        pretend_missing: Some(ProbeFeature::AdjustRoomEncap),
    })
    .unwrap_err();
    assert_eq!(err.missing, ProbeFeature::AdjustRoomEncap);
    assert!(err.to_string().contains("bpf_skb_adjust_room"), "{err}");
}

/// The datapath configuration of node `n` of a [`TestNet`].
fn node_config(n: usize) -> DatapathConfig {
    DatapathConfig::new("flannel.1", "eth0", UNDERLAY[n], VTEP_MACS[n], VNI, PORT)
}

/// The map entry for node `n`'s subnet.
fn vtep_entry(n: usize) -> (Ipv4Net, RemoteVtep) {
    (
        Ipv4Net::new(SUBNETS[n], 24).expect("a /24"),
        RemoteVtep::new(UNDERLAY[n], VTEP_MACS[n], 0),
    )
}

/// Loads the datapath on node `n` (in its namespace) with the other node as peer.
fn load_node(net: &TestNet, n: usize, config: DatapathConfig) -> Result<Datapath> {
    let _ns = NetnsGuard::enter(&net.nodes[n])?;
    let mut dp = Datapath::load(&config, net.pin_dir(n)).with_context(|| format!("loading on node {n}"))?;
    let peers: BTreeMap<_, _> = [vtep_entry(1 - n)].into_iter().collect();
    dp.sync_vteps(&peers)?;
    Ok(dp)
}

/// Runs a loaded program once on `frame` (in the calling thread's namespace); returns the
/// verdict and the frame after the program.
fn test_run(dp: &Datapath, name: &str, frame: &[u8]) -> Result<(u32, Vec<u8>)> {
    let program: &SchedClassifier = dp.ebpf.program(name).context("no such program")?.try_into()?;
    let mut out = vec![0u8; frame.len() + 256];
    let result = program.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    })?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}
