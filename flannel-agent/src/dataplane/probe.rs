//! Can this kernel run the eBPF datapath? `Datapath: auto` asks this before choosing it.
//!
//! The probe loads the embedded object with throwaway (unpinned) maps, has the kernel verify
//! every program with a realistic configuration (so the helpers they call must exist), and
//! runs `flannel_probe` once with `BPF_PROG_TEST_RUN` to learn which `bpf_skb_adjust_room`
//! flags the kernel accepts. Nothing is attached and nothing outlives the call.

use std::fmt;

use aya::{
    programs::{SchedClassifier, TestRun as _, TestRunOptions, Xdp},
    EbpfLoader,
};
use flannel_common::{
    DatapathConfig as ProgramConfig, CFG_F_DECAP_GSO, CFG_F_DECAP_L4_UDP, GLOBAL_CONFIG, PROBE_OK_DECAP,
    PROBE_OK_DECAP_L4_UDP, PROBE_OK_ENCAP, PROBE_RESULT_BASE, PROGRAM_NAMES, PROG_PROBE, PROG_XDP_DECAP,
};

use super::{attach::tcx_supported, object_bytes};

/// A kernel feature the probe checks, which a test can pretend is missing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeFeature {
    /// Loading BPF maps and programs at all (root or CAP_BPF, CONFIG_BPF_SYSCALL).
    Bpf,
    /// Every helper the programs call, as the verifier checks them.
    Helpers,
    /// `bpf_skb_adjust_room` with the VXLAN encapsulation flags (`ENCAP_L2_ETH`: 5.13).
    AdjustRoomEncap,
    /// `bpf_skb_adjust_room` in MAC mode with `DECAP_L3_IPV4` (6.3).
    AdjustRoomDecap,
}

impl fmt::Display for ProbeFeature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Bpf => "loading BPF maps and programs",
            Self::Helpers => "the BPF helpers the datapath calls",
            Self::AdjustRoomEncap => "bpf_skb_adjust_room with the VXLAN encapsulation flags",
            Self::AdjustRoomDecap => "bpf_skb_adjust_room with the decapsulation flags",
        })
    }
}

/// Options of [`probe`].
#[derive(Clone, Debug, Default)]
pub struct ProbeOptions {
    /// Report this feature as missing without asking the kernel, to test the fallback to the
    /// kernel datapath.
    pub pretend_missing: Option<ProbeFeature>,
}

/// What the probe found on a kernel that can run the datapath.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProbeReport {
    /// The kernel accepts `BPF_F_ADJ_ROOM_DECAP_L4_UDP`, so GRO aggregates can be
    /// decapsulated in BPF too ([`flannel_common::CFG_F_DECAP_GSO`]).
    pub decap_l4_udp: bool,
    /// The kernel has TCX (6.6), so attachments are pinned links.
    pub tcx: bool,
}

/// Why the kernel cannot run the datapath: one line for the log, saying what is missing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{missing} does not work: {detail}")]
pub struct ProbeError {
    /// The feature that failed.
    pub missing: ProbeFeature,
    /// What the kernel said.
    pub detail: String,
}

/// Checks that the kernel can run the datapath; see the module docs.
pub fn probe(options: &ProbeOptions) -> Result<ProbeReport, ProbeError> {
    let fail = |missing, detail: String| ProbeError { missing, detail };
    if let Some(missing) = options.pretend_missing {
        return Err(fail(
            missing,
            "pretended missing (ProbeOptions::pretend_missing)".into(),
        ));
    }
    // A configuration that makes no branch dead, so the verifier checks every helper call.
    let config = ProgramConfig {
        vtep_ip: [192, 0, 2, 1],
        vni: 1,
        vxlan_ifindex: 1,
        uplink_ifindex: 1,
        flags: CFG_F_DECAP_GSO | CFG_F_DECAP_L4_UDP,
        vtep_mac: [0x02, 0, 0, 0, 0, 1],
        port: 8472,
        src_port_min: 32768,
        src_port_max: 60999,
        ttl: 64,
        _pad: [0; 3],
    };
    let mut ebpf = EbpfLoader::new()
        .override_global(GLOBAL_CONFIG, &config, true)
        .load(object_bytes())
        .map_err(|err| fail(ProbeFeature::Bpf, format!("{err} (is the agent root?)")))?;
    for name in PROGRAM_NAMES.into_iter().filter(|name| *name != PROG_XDP_DECAP) {
        let program: &mut SchedClassifier = ebpf
            .program_mut(name)
            .ok_or_else(|| fail(ProbeFeature::Helpers, format!("the object has no program {name}")))?
            .try_into()
            .map_err(|err| fail(ProbeFeature::Helpers, format!("{name}: {err}")))?;
        program
            .load()
            .map_err(|err| fail(ProbeFeature::Helpers, format!("the verifier rejected {name}: {err:#?}")))?;
    }
    // The one XDP program: loaded (verified) even when `DecapMode` is "tc", so that a kernel
    // which rejects it is found here rather than when someone switches the option.
    let xdp: &mut Xdp = ebpf
        .program_mut(PROG_XDP_DECAP)
        .ok_or_else(|| {
            fail(
                ProbeFeature::Helpers,
                format!("the object has no program {PROG_XDP_DECAP}"),
            )
        })?
        .try_into()
        .map_err(|err| fail(ProbeFeature::Helpers, format!("{PROG_XDP_DECAP}: {err}")))?;
    xdp.load().map_err(|err| {
        fail(
            ProbeFeature::Helpers,
            format!("the verifier rejected {PROG_XDP_DECAP}: {err:#?}"),
        )
    })?;
    let program: &SchedClassifier = ebpf
        .program(PROG_PROBE)
        .ok_or_else(|| fail(ProbeFeature::Helpers, format!("the object has no program {PROG_PROBE}")))?
        .try_into()
        .map_err(|err| fail(ProbeFeature::Helpers, format!("{PROG_PROBE}: {err}")))?;
    let frame = probe_frame();
    let result = program
        .test_run(TestRunOptions {
            data_in: Some(&frame),
            ..TestRunOptions::default()
        })
        .map_err(|err| fail(ProbeFeature::AdjustRoomEncap, format!("BPF_PROG_TEST_RUN: {err}")))?;
    let ok = result.return_value.checked_sub(PROBE_RESULT_BASE).ok_or_else(|| {
        let value = result.return_value;
        fail(ProbeFeature::AdjustRoomEncap, format!("{PROG_PROBE} returned {value}"))
    })?;
    if ok & PROBE_OK_ENCAP == 0 {
        return Err(fail(
            ProbeFeature::AdjustRoomEncap,
            "the kernel rejected the flags (5.13+ needed)".into(),
        ));
    }
    if ok & PROBE_OK_DECAP == 0 {
        return Err(fail(
            ProbeFeature::AdjustRoomDecap,
            "the kernel rejected the flags (6.3+ needed)".into(),
        ));
    }
    Ok(ProbeReport {
        decap_l4_udp: ok & PROBE_OK_DECAP_L4_UDP != 0,
        tcx: tcx_supported(),
    })
}

/// An Ethernet/IPv4/UDP frame of 300 bytes for `flannel_probe` to resize.
fn probe_frame() -> Vec<u8> {
    let mut frame = vec![0u8; 300];
    frame[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 2]);
    frame[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip_len = (frame.len() - 14) as u16;
    let ip = &mut frame[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&[192, 0, 2, 2]);
    ip[16..20].copy_from_slice(&[192, 0, 2, 1]);
    let mut header = [0u8; 20];
    header.copy_from_slice(ip);
    let check = flannel_common::wire::ipv4_checksum(&header);
    frame[24..26].copy_from_slice(&check);
    frame
}
