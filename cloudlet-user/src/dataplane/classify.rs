//! `cloudlet classify`: runs the real XDP program on frames through BPF_PROG_TEST_RUN and
//! reports what it decided.

use aya::{
    maps::Array,
    programs::{TestRun, TestRunOptions},
};
use cloudlet_common::{Decision, NO_RULE, decision_flags};
use serde::Serialize;

use super::{CompiledPolicy, DataplaneError, Loaded, ProgramKind, map_err, stats::reason_name};
use crate::policy::Action;

/// The kernel refuses test frames shorter than an Ethernet header (EINVAL).
pub const MIN_TEST_FRAME: usize = 14;
/// The longest frame a test run takes whole on 4 KiB pages: a page less XDP headroom (256)
/// and `struct skb_shared_info` (320). The kernel silently cuts longer frames.
pub const MAX_TEST_FRAME: usize = 4096 - 256 - 320;

/// What the program decided for one frame.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Verdict {
    /// The action taken: "pass", "drop", "tx", "redirect", "cpu" or "xsk".
    pub verdict: String,
    /// The XDP return code's name.
    pub xdp: &'static str,
    /// The matching rule's name, or null.
    pub rule: Option<String>,
    /// Why: "rule", "default", "non_ip" or a "malformed_*" reason.
    pub reason: &'static str,
    /// The first zone of the source address (zones are in name order), or null.
    pub src_zone: Option<String>,
    /// The first zone of the destination address, or null.
    pub dst_zone: Option<String>,
    /// Every zone of the source address.
    pub src_zones: Vec<String>,
    /// Every zone of the destination address.
    pub dst_zones: Vec<String>,
    /// 4, 6, or null when no IP header was parsed.
    pub ip_version: Option<u32>,
    /// Transport protocol number, when an IP header was parsed.
    pub proto: Option<u32>,
    pub src_port: Option<u32>,
    pub dst_port: Option<u32>,
    /// TCP flags as names (`"syn,ack"`), when a TCP header was parsed.
    pub tcp_flags: Option<String>,
    /// VLAN tags seen.
    pub vlan_tags: u32,
    /// Outer VLAN id, when tagged.
    pub vlan: Option<u32>,
    /// "first", "non_first", or null when not a fragment.
    pub fragment: Option<&'static str>,
    /// IPv6 extension headers walked.
    pub ipv6_ext_headers: u32,
}

/// Errors from `classify`.
#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    /// Loading or reading the program failed.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// The frame is shorter than the kernel accepts for a test run.
    #[error(
        "frame of {0} bytes is shorter than an Ethernet header ({MIN_TEST_FRAME}); the kernel cannot run it"
    )]
    TooShort(usize),
    /// The frame is longer than a test run can take whole.
    #[error("frame of {0} bytes is longer than a test run takes whole ({MAX_TEST_FRAME})")]
    TooLong(usize),
    /// BPF_PROG_TEST_RUN failed.
    #[error("BPF_PROG_TEST_RUN: {0}")]
    TestRun(#[source] aya::programs::ProgramError),
}

/// The policy program loaded with decision tracing, ready to classify frames.
pub struct Classifier {
    loaded: Loaded,
}

impl Classifier {
    /// Loads the program for `compiled`. Needs root (BPF).
    pub fn new(compiled: &CompiledPolicy) -> Result<Self, DataplaneError> {
        Ok(Self {
            loaded: Loaded::new(compiled, ProgramKind::Policy, true)?,
        })
    }

    /// Writes `compiled` into the loaded program in place (see [`Loaded::update`]).
    pub fn update(
        &mut self,
        compiled: &CompiledPolicy,
    ) -> Result<super::UpdateTimings, DataplaneError> {
        self.loaded.update(compiled)
    }

    /// The loaded program, to fill maps a policy alone does not (AF_XDP sockets).
    pub fn loaded_mut(&mut self) -> &mut Loaded {
        &mut self.loaded
    }

    /// Runs the program once on `frame`.
    pub fn classify(
        &self,
        compiled: &CompiledPolicy,
        frame: &[u8],
    ) -> Result<Verdict, ClassifyError> {
        self.run(compiled, frame).map(|(v, _)| v)
    }

    /// Runs the program once on `frame`, returning the frame as the program left it too
    /// (`tx` swaps the MAC addresses).
    pub fn run(
        &self,
        compiled: &CompiledPolicy,
        frame: &[u8],
    ) -> Result<(Verdict, Vec<u8>), ClassifyError> {
        if frame.len() < MIN_TEST_FRAME {
            return Err(ClassifyError::TooShort(frame.len()));
        }
        if frame.len() > MAX_TEST_FRAME {
            return Err(ClassifyError::TooLong(frame.len()));
        }
        let prog = self.loaded.program()?;
        let mut out = vec![0u8; frame.len()];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat: 1,
            ..Default::default()
        };
        let result = prog.test_run(opts).map_err(ClassifyError::TestRun)?;
        out.truncate(result.data_size_out as usize);
        let trace: Array<_, Decision> = Array::try_from(
            self.loaded
                .ebpf()
                .map("TRACE_DECISION")
                .ok_or(DataplaneError::Missing("map TRACE_DECISION"))?,
        )
        .map_err(map_err("TRACE_DECISION"))?;
        let d = trace.get(&0, 0).map_err(map_err("TRACE_DECISION"))?;
        Ok((verdict(compiled, &d, result.return_value), out))
    }
}

fn xdp_name(code: u32) -> &'static str {
    match code {
        0 => "XDP_ABORTED",
        1 => "XDP_DROP",
        2 => "XDP_PASS",
        3 => "XDP_TX",
        4 => "XDP_REDIRECT",
        _ => "unknown",
    }
}

fn verdict(compiled: &CompiledPolicy, d: &Decision, code: u32) -> Verdict {
    let ip = d.ip_version != 0
        && d.reason < cloudlet_common::reason::FIRST_MALFORMED
        && d.reason != cloudlet_common::reason::NON_IP;
    let zones = |class: u32| -> Vec<String> {
        if ip {
            compiled
                .class_zone_names(class)
                .into_iter()
                .map(str::to_string)
                .collect()
        } else {
            Vec::new()
        }
    };
    let src_zones = zones(d.src_class);
    let dst_zones = zones(d.dst_class);
    let l4 = d.flags & decision_flags::L4_PARSED != 0;
    let ports = l4 && matches!(d.l4_proto, 6 | 17);
    Verdict {
        verdict: Action::code_name(d.action).to_string(),
        xdp: xdp_name(code),
        rule: (d.rule != NO_RULE)
            .then(|| compiled.rule_names.get(d.rule as usize).cloned())
            .flatten(),
        reason: reason_name(d.reason),
        src_zone: src_zones.first().cloned(),
        dst_zone: dst_zones.first().cloned(),
        src_zones,
        dst_zones,
        ip_version: ip.then_some(d.ip_version),
        proto: ip.then_some(d.l4_proto),
        src_port: ports.then_some(d.src_port),
        dst_port: ports.then_some(d.dst_port),
        tcp_flags: (l4 && d.l4_proto == 6).then(|| {
            crate::policy::criteria::TCP_FLAG_NAMES
                .iter()
                .enumerate()
                .filter(|(i, _)| d.tcp_flags >> i & 1 == 1)
                .map(|(_, n)| *n)
                .collect::<Vec<_>>()
                .join(",")
        }),
        vlan_tags: d.vlan_tags,
        vlan: (d.vlan_tags > 0).then_some(d.vlan_outer),
        fragment: if d.flags & decision_flags::NON_FIRST_FRAGMENT != 0 {
            Some("non_first")
        } else if d.flags & decision_flags::FRAGMENT != 0 {
            Some("first")
        } else {
            None
        },
        ipv6_ext_headers: d.ext_headers,
    }
}
