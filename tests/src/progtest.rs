//! Runs the real XDP program on crafted frames through BPF_PROG_TEST_RUN: policies compiled
//! from TOML text, the program loaded with decision tracing, and the exact [`Verdict`]
//! expected for each frame. Needs root (BPF).

use std::{net::IpAddr, path::Path, sync::OnceLock};

use cloudlet::{
    dataplane::{
        CompiledPolicy,
        classify::{Classifier, ClassifyError, Verdict},
        compile,
    },
    frame::to_hex,
    geoip::GeoDb,
    policy,
};

/// The GeoIP database `cargo xtask setup` installs.
pub const GEOIP_DATABASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/geoip/geo-whois-asn-country.mmdb"
);

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
/// Length of one VLAN tag.
pub const VLAN_HLEN: usize = 4;

/// The `[geoip]` table pointing at [`GEOIP_DATABASE`], to paste into a policy.
pub fn geoip_table() -> String {
    format!("[geoip]\ndatabase = {GEOIP_DATABASE:?}\n")
}

/// The GeoIP database, opened once per test binary (it is read into memory).
pub fn geo_db() -> &'static GeoDb {
    static DB: OnceLock<GeoDb> = OnceLock::new();
    DB.get_or_init(|| {
        GeoDb::open(Path::new(GEOIP_DATABASE))
            .unwrap_or_else(|e| panic!("{e} (install it with `cargo xtask setup`)"))
    })
}

/// The country the database gives `ip`, as a test precondition.
pub fn country(ip: IpAddr) -> Option<String> {
    geo_db()
        .country(ip)
        .unwrap_or_else(|e| panic!("looking up {ip}: {e}"))
}

/// Parses and compiles a policy, with the GeoIP database when its zones name countries.
pub fn compile_policy(toml: &str) -> CompiledPolicy {
    let policy = policy::parse(toml, Path::new("prog_test_run.toml"))
        .unwrap_or_else(|e| panic!("test policy is invalid:\n{e}\n--- policy ---\n{toml}"));
    let geo = policy.uses_countries().then(geo_db);
    compile(&policy, geo).unwrap_or_else(|e| panic!("compiling the test policy: {e}\n{toml}"))
}

/// A policy loaded into the program, ready to judge frames.
pub struct Program {
    compiled: CompiledPolicy,
    classifier: Classifier,
}

impl Program {
    /// Compiles `toml` and loads the program with it.
    pub fn new(toml: &str) -> Self {
        let compiled = compile_policy(toml);
        let classifier = Classifier::new(&compiled).unwrap_or_else(|e| {
            panic!("loading the XDP program (BPF_PROG_TEST_RUN needs root): {e}")
        });
        Self {
            compiled,
            classifier,
        }
    }

    /// Compiles `toml` and writes it into the loaded program in place (a bank swap).
    pub fn update(&mut self, toml: &str) {
        let compiled = compile_policy(toml);
        self.classifier
            .update(&compiled)
            .unwrap_or_else(|e| panic!("updating the loaded program: {e}"));
        self.compiled = compiled;
    }

    /// The compiled policy.
    pub fn compiled(&self) -> &CompiledPolicy {
        &self.compiled
    }

    /// The classifier, to fill maps a policy alone does not (AF_XDP sockets).
    pub fn classifier_mut(&mut self) -> &mut Classifier {
        &mut self.classifier
    }

    /// Runs the program once on `frame`, without judging the outcome.
    pub fn try_classify(&self, frame: &[u8]) -> Result<Verdict, ClassifyError> {
        self.classifier.classify(&self.compiled, frame)
    }

    /// Runs the program once on `frame` and returns the frame as the program left it.
    pub fn run(&self, case: &str, frame: &[u8]) -> (Verdict, Vec<u8>) {
        self.classifier
            .run(&self.compiled, frame)
            .unwrap_or_else(|e| panic!("case {case}: BPF_PROG_TEST_RUN failed: {e}"))
    }

    /// Runs the program once on `frame`; `case` names the frame in a failure.
    pub fn classify(&self, case: &str, frame: &[u8]) -> Verdict {
        self.try_classify(frame).unwrap_or_else(|e| {
            panic!(
                "case {case}: BPF_PROG_TEST_RUN failed: {e}\nframe: {}",
                to_hex(frame)
            )
        })
    }

    /// Runs the program on `frame` and asserts the whole verdict.
    pub fn check(&self, case: &str, frame: &[u8], want: &Verdict) {
        if let Some(failure) = self.mismatch(case, frame, want) {
            panic!("{failure}");
        }
    }

    /// Runs every case and panics listing each one whose verdict is wrong.
    pub fn check_all(&self, cases: &[Case]) {
        assert!(!cases.is_empty(), "no cases to run");
        let failures: Vec<String> = cases
            .iter()
            .filter_map(|c| self.mismatch(&c.name, &c.frame, &c.want))
            .collect();
        assert!(
            failures.is_empty(),
            "{} of {} cases failed:\n\n{}",
            failures.len(),
            cases.len(),
            failures.join("\n\n")
        );
    }

    fn mismatch(&self, case: &str, frame: &[u8], want: &Verdict) -> Option<String> {
        let got = self.classify(case, frame);
        (&got != want).then(|| {
            format!(
                "case {case}: wrong verdict\nframe ({} bytes): {}\ngot:  {}\nwant: {}",
                frame.len(),
                to_hex(frame),
                json(&got),
                json(want)
            )
        })
    }
}

/// One frame and the verdict it must get.
#[derive(Clone, Debug)]
pub struct Case {
    /// Names the case in failures.
    pub name: String,
    pub frame: Vec<u8>,
    pub want: Verdict,
}

/// A [`Case`].
pub fn case(name: impl Into<String>, frame: Vec<u8>, want: Expect) -> Case {
    Case {
        name: name.into(),
        frame,
        want: want.build(),
    }
}

fn json(v: &Verdict) -> String {
    serde_json::to_string(v).unwrap_or_else(|e| format!("<{e}>"))
}

/// Builds the whole [`Verdict`] a frame should get, from the facts that differ from case to
/// case. Every field is compared, so a fact left out is asserted to be absent.
#[derive(Clone, Debug)]
pub struct Expect(Verdict);

impl Expect {
    fn new(action: &str, reason: &'static str) -> Self {
        let xdp = match action {
            "pass" => "XDP_PASS",
            "drop" => "XDP_DROP",
            "tx" => "XDP_TX",
            "redirect" | "cpu" | "xsk" => "XDP_REDIRECT",
            other => panic!("unknown action {other:?} in a test case"),
        };
        Self(Verdict {
            verdict: action.to_string(),
            xdp,
            rule: None,
            reason,
            src_zone: None,
            dst_zone: None,
            src_zones: Vec::new(),
            dst_zones: Vec::new(),
            ip_version: None,
            proto: None,
            src_port: None,
            dst_port: None,
            tcp_flags: None,
            vlan_tags: 0,
            vlan: None,
            fragment: None,
            ipv6_ext_headers: 0,
        })
    }

    /// Rule `rule` matched with `action`.
    pub fn rule(action: &str, rule: &str) -> Self {
        let mut e = Self::new(action, "rule");
        e.0.rule = Some(rule.to_string());
        e
    }

    /// No rule matched: the policy's default `action`.
    pub fn default(action: &str) -> Self {
        Self::new(action, "default")
    }

    /// Neither IPv4 nor IPv6: the policy's `non_ip` action.
    pub fn non_ip(action: &str) -> Self {
        Self::new(action, "non_ip")
    }

    /// Refused by the parser with `reason` (a `malformed_*` name): the `malformed` action.
    pub fn malformed(action: &str, reason: &'static str) -> Self {
        assert!(
            reason.starts_with("malformed_"),
            "{reason} is not a malformed reason"
        );
        Self::new(action, reason)
    }

    /// The XDP code and action name when they differ from the usual pairing (an `xsk`
    /// action without a socket is dropped: `("xsk", "XDP_DROP")`).
    pub fn action(mut self, action: &str, xdp: &'static str) -> Self {
        self.0.verdict = action.to_string();
        self.0.xdp = xdp;
        self
    }

    /// The IP version and transport protocol the parser found.
    pub fn ip(mut self, version: u32, proto: u32) -> Self {
        self.0.ip_version = Some(version);
        self.0.proto = Some(proto);
        self
    }

    /// TCP or UDP ports (after [`Expect::ip`]). A TCP header also reports its flags: the
    /// TCP frames of these tables are SYNs unless [`Expect::tcp_flags`] says otherwise.
    pub fn ports(mut self, src: u16, dst: u16) -> Self {
        self.0.src_port = Some(u32::from(src));
        self.0.dst_port = Some(u32::from(dst));
        if self.0.proto == Some(6) {
            self.0.tcp_flags = Some("syn".to_string());
        }
        self
    }

    /// The TCP flags reported, as `classify` names them (`"syn,ack"`).
    pub fn tcp_flags(mut self, flags: &str) -> Self {
        self.0.tcp_flags = Some(flags.to_string());
        self
    }

    /// VLAN tags seen and the outer tag's id.
    pub fn vlan(mut self, tags: u32, outer: u16) -> Self {
        self.0.vlan_tags = tags;
        self.0.vlan = (tags > 0).then_some(u32::from(outer));
        self
    }

    /// A fragment: "first" or "non_first".
    pub fn fragment(mut self, which: &'static str) -> Self {
        self.0.fragment = Some(which);
        self
    }

    /// IPv6 extension headers walked.
    pub fn ext(mut self, headers: u32) -> Self {
        self.0.ipv6_ext_headers = headers;
        self
    }

    /// Every zone of the source address, in name order.
    pub fn src_zones(mut self, zones: &[&str]) -> Self {
        self.0.src_zones = zones.iter().map(|z| z.to_string()).collect();
        self.0.src_zone = self.0.src_zones.first().cloned();
        self
    }

    /// Every zone of the destination address, in name order.
    pub fn dst_zones(mut self, zones: &[&str]) -> Self {
        self.0.dst_zones = zones.iter().map(|z| z.to_string()).collect();
        self.0.dst_zone = self.0.dst_zones.first().cloned();
        self
    }

    /// The verdict.
    pub fn build(self) -> Verdict {
        self.0
    }
}

/// Parses an address literal of a test case.
pub fn ip(s: &str) -> IpAddr {
    s.parse()
        .unwrap_or_else(|e| panic!("bad address {s:?} in a test case: {e}"))
}

/// An Ethernet frame with the given VLAN tags `(tpid, id)`, ethertype and body.
pub fn ethernet(vlans: &[(u16, u16)], ethertype: u16, body: &[u8]) -> Vec<u8> {
    let mut f = vec![0xff; 6];
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    for (tpid, id) in vlans {
        f.extend_from_slice(&tpid.to_be_bytes());
        f.extend_from_slice(&id.to_be_bytes());
    }
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(body);
    f
}

/// An ARP request body (who has 192.0.2.2, tell 192.0.2.1).
pub const ARP_REQUEST: [u8; 28] = [
    0x00, 0x01, 0x08, 0x00, 6, 4, 0x00, 0x01, 0x02, 0, 0, 0, 0, 0x01, 192, 0, 2, 1, 0, 0, 0, 0, 0,
    0, 192, 0, 2, 2,
];

/// `frame` with `bytes` written at `at`.
pub fn patched(mut frame: Vec<u8>, at: usize, bytes: &[u8]) -> Vec<u8> {
    frame[at..at + bytes.len()].copy_from_slice(bytes);
    frame
}

/// Offset of the IP header: past the Ethernet header and any VLAN tags.
pub fn ip_offset(frame: &[u8]) -> usize {
    let mut off = ETH_HLEN;
    while matches!(
        u16::from_be_bytes([frame[off - 2], frame[off - 1]]),
        0x8100 | 0x88a8
    ) {
        off += VLAN_HLEN;
    }
    off
}

/// The first `len` bytes of `frame` with the IPv4 total length or the IPv6 payload length
/// rewritten to end where the frame now ends, as a sender would write it for a packet whose
/// headers are cut short. Fields the cut removed stay removed.
pub fn truncated_consistently(frame: &[u8], len: usize) -> Vec<u8> {
    let ip = ip_offset(frame);
    let mut f = frame[..len].to_vec();
    match frame[ip] >> 4 {
        4 if len >= ip + 4 => {
            let total = (len - ip) as u16;
            f[ip + 2..ip + 4].copy_from_slice(&total.to_be_bytes());
        }
        6 if len >= ip + 40 => {
            let payload = (len - ip - 40) as u16;
            f[ip + 4..ip + 6].copy_from_slice(&payload.to_be_bytes());
        }
        _ => {}
    }
    f
}
