//! Live traffic through a real interface: the generator (see [`crate::loadgen`]) sends
//! frames out of `g0` in one namespace into `s0` in another, where the system under test
//! judges them: Cloudlet's XDP program in native mode, nftables in the netdev ingress hook,
//! iptables with ipset, or xdp-filter. Every system sees the same frames at the same offered
//! load, more than any of them can take, so what each handles per second is its capacity.
//!
//! `s0` runs its NAPI poll in a kernel thread of its own (`threaded` NAPI), pinned to the
//! second CPU while the generator runs on the first, so the receiving side's CPU time is
//! that thread's and nothing else. The counters do not depend on the system under test:
//! frames the receiving veth took off its ring (`rx_queue_0_xdp_packets`, counted by the
//! veth driver before any program runs) and frames that made it through to UDP (the
//! namespace's `NoPorts` counters: nothing listens on the benchmark's ports). Dropped is
//! the difference.

use std::{
    io::Write as _,
    net::IpAddr,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use cloudlet::{
    dataplane::{AttachMode, CompiledPolicy, Loaded, ProgramKind},
    frame::Frame,
};
use cloudlet_tests::netns::{NetNs, veth_pair};

use crate::loadgen::Generator;

/// The receiving interface.
pub const SUT_IF: &str = "s0";
const GEN_IF: &str = "g0";
/// Addresses of `s0`, inside the benchmark policies' `svc` zone.
pub const SUT_V4: &str = "10.10.1.1";
pub const SUT_V6: &str = "fd00:10::1";

/// The two namespaces and the veth pair between them.
pub struct Bed {
    // Dropped in this order: the SUT namespace goes first, taking both veth ends.
    sut: NetNs,
    gen_ns: NetNs,
    gen_ifindex: u32,
    gen_mac: [u8; 6],
    sut_mac: [u8; 6],
}

/// Counters read before and after a run.
#[derive(Clone, Copy, Debug, Default)]
struct Counters {
    /// Frames `s0` took off its ring.
    received: u64,
    /// Frames that reached UDP.
    delivered: u64,
    /// CPU time of `s0`'s NAPI thread, in nanoseconds.
    napi_ns: u64,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    /// Frames the generator sent per second.
    pub offered_pps: f64,
    /// Frames the receiving side handled per second.
    pub handled_pps: f64,
    /// Of those, passed up to the stack, and dropped, per second.
    pub passed_pps: f64,
    pub dropped_pps: f64,
    /// CPU time of the receiving side per frame handled.
    pub cpu_ns_per_packet: f64,
    /// For the systems that are an XDP program: its own cost per frame through
    /// `BPF_PROG_TEST_RUN` on the same frames, without the path around it.
    pub program_ns_per_packet: Option<f64>,
}

impl Bed {
    /// Creates the namespaces and the veth pair, `s0` with the addresses [`SUT_V4`] and
    /// [`SUT_V6`].
    pub fn new() -> Result<Self> {
        let gen_ns = NetNs::new("cl-live-gen");
        let sut = NetNs::new("cl-live-sut");
        veth_pair(&gen_ns, GEN_IF, &sut, SUT_IF);
        sut.exec(&[
            "sysctl",
            "-qw",
            &format!("net.ipv6.conf.{SUT_IF}.disable_ipv6=0"),
        ]);
        sut.exec(&["ip", "addr", "add", &format!("{SUT_V4}/16"), "dev", SUT_IF]);
        sut.exec(&[
            "ip",
            "addr",
            "add",
            &format!("{SUT_V6}/64"),
            "dev",
            SUT_IF,
            "nodad",
        ]);
        let index = gen_ns.exec(&["cat", &format!("/sys/class/net/{GEN_IF}/ifindex")]);
        let gen_ifindex = String::from_utf8_lossy(&index.stdout)
            .trim()
            .parse()
            .context("ifindex of g0")?;
        Ok(Self {
            gen_mac: gen_ns.mac(GEN_IF),
            sut_mac: sut.mac(SUT_IF),
            gen_ns,
            sut,
            gen_ifindex,
        })
    }

    /// The namespace of the system under test.
    pub fn sut(&self) -> &NetNs {
        &self.sut
    }

    /// A UDP frame from `src` to `s0`'s address of the same family and `dport`, addressed
    /// to `s0`'s MAC, `len` bytes long (zeros after the headers).
    pub fn frame(&self, src: IpAddr, dport: u16, len: usize) -> Vec<u8> {
        let dst: IpAddr = if src.is_ipv4() { SUT_V4 } else { SUT_V6 }
            .parse()
            .expect("address");
        let headers = if src.is_ipv4() { 42 } else { 62 };
        let mut f = Frame::udp(src, dst, 40000, dport).payload(&vec![0; len - headers]);
        f.dst_mac = self.sut_mac;
        f.src_mac = self.gen_mac;
        f.build()
    }

    /// Attaches `loaded` to `s0` in native mode, with the NAPI thread set up.
    pub fn attach(&self, loaded: &mut Loaded) -> Result<aya::programs::xdp::XdpLink> {
        let (link, mode) = self.sut.run(|| loaded.attach(SUT_IF, AttachMode::Native))?;
        if mode != AttachMode::Native {
            bail!("{SUT_IF}: not attached in native mode");
        }
        Ok(link)
    }

    /// Runs `s0`'s NAPI poll in a thread of its own (needs a program attached) on the
    /// second CPU, and returns the thread's pid.
    fn napi_thread(&self) -> Result<u32> {
        self.sut.exec(&[
            "sh",
            "-c",
            &format!("echo 1 > /sys/class/net/{SUT_IF}/threaded"),
        ]);
        // The newest thread of that name is this device's.
        let prefix = format!("napi/{SUT_IF}-");
        let mut newest = None;
        for entry in std::fs::read_dir("/proc")? {
            let entry = entry?;
            let Some(pid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            let comm = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
            if comm.trim_end().starts_with(&prefix) && newest.is_none_or(|n| pid > n) {
                newest = Some(pid);
            }
        }
        let pid = newest.context("no NAPI thread for s0 (threaded NAPI unsupported?)")?;
        pin(pid, 1);
        Ok(pid)
    }

    fn counters(&self, napi: u32) -> Result<Counters> {
        let out = self.sut.exec(&[
            "sh",
            "-c",
            &format!("ethtool -S {SUT_IF}; cat /proc/net/snmp /proc/net/snmp6"),
        ]);
        let text = String::from_utf8_lossy(&out.stdout);
        let mut c = Counters::default();
        let mut udp_header: Option<Vec<&str>> = None;
        for line in text.lines() {
            let line = line.trim();
            if let Some(v) = line.strip_prefix("rx_queue_0_xdp_packets:") {
                c.received = v.trim().parse()?;
            } else if let Some(v) = line.strip_prefix("Udp6NoPorts") {
                c.delivered += v.trim().parse::<u64>()?;
            } else if let Some(rest) = line.strip_prefix("Udp:") {
                // Two lines: the names, then the values.
                let fields: Vec<&str> = rest.split_whitespace().collect();
                match udp_header.take() {
                    None => udp_header = Some(fields),
                    Some(names) => {
                        let i = names
                            .iter()
                            .position(|n| *n == "NoPorts")
                            .context("Udp NoPorts")?;
                        c.delivered += fields[i].parse::<u64>()?;
                    }
                }
            }
        }
        let sched = std::fs::read_to_string(format!("/proc/{napi}/schedstat"))?;
        c.napi_ns = sched
            .split_whitespace()
            .next()
            .context("schedstat")?
            .parse()?;
        Ok(c)
    }

    /// Sends `count` frames of `generator` and measures what the receiving side made of
    /// them. A program must be attached to `s0`.
    pub fn run(&self, generator: &Generator, count: u32) -> Result<Sample> {
        let napi = self.napi_thread()?;
        let before = self.counters(napi)?;
        let ifindex = self.gen_ifindex;
        let took = self.gen_ns.run(|| {
            pin(0, 0);
            generator.send(ifindex, count)
        })?;
        // Let the receiving thread finish what is on its ring.
        std::thread::sleep(Duration::from_millis(50));
        let after = self.counters(napi)?;
        let secs = took.as_secs_f64();
        let received = after.received - before.received;
        let delivered = (after.delivered - before.delivered).min(received);
        Ok(Sample {
            offered_pps: f64::from(count) / secs,
            handled_pps: received as f64 / secs,
            passed_pps: delivered as f64 / secs,
            dropped_pps: (received - delivered) as f64 / secs,
            cpu_ns_per_packet: (after.napi_ns - before.napi_ns) as f64 / received.max(1) as f64,
            program_ns_per_packet: None,
        })
    }

    /// The id of the XDP program attached to `s0`.
    fn attached_program(&self) -> Result<u32> {
        let out = self.sut.exec(&["ip", "-j", "link", "show", "dev", SUT_IF]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        v[0]["xdp"]["prog"]["id"]
            .as_u64()
            .map(|id| id as u32)
            .context("no XDP program attached to s0")
    }

    /// The attached program alone, run by `BPF_PROG_TEST_RUN` on `frames` (200 times
    /// each): ns per frame.
    fn program_cost(&self, frames: &[Vec<u8>]) -> Result<f64> {
        let fd = crate::loadgen::program_by_id(self.attached_program()?)?;
        crate::loadgen::program_ns_per_packet(std::os::fd::AsFd::as_fd(&fd), frames, 200)
    }

    /// Runs a command in the SUT namespace without a new mount namespace (xdp-filter keeps
    /// its state in the host's bpffs), feeding it `input`.
    pub fn nsenter(&self, args: &[&str], input: &str) -> Result<()> {
        let mut child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.sut.name()))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("running {args:?}"))?;
        // A command that fails before reading its input closes the pipe: its own error,
        // below, says more than the write's.
        let written = child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes());
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        written.with_context(|| format!("feeding {args:?}"))
    }
}

/// Pins thread `pid` (0: the calling one) to `cpu`, when the machine has that CPU.
fn pin(pid: u32, cpu: usize) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cpu >= cpus {
        return;
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays within it.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(pid as i32, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// A command's arguments and what it reads on standard input.
type Step<'a> = (Vec<&'a str>, &'a str);

/// A system under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum System {
    /// An XDP program that passes everything: the path's own capacity.
    XdpPass,
    Cloudlet,
    Nftables,
    IptablesIpset,
    XdpFilter,
}

impl System {
    pub fn name(self) -> &'static str {
        match self {
            Self::XdpPass => "xdp_pass",
            Self::Cloudlet => "cloudlet",
            Self::Nftables => "nftables",
            Self::IptablesIpset => "iptables_ipset",
            Self::XdpFilter => "xdp_filter",
        }
    }
}

/// One policy as each system expresses it, and the traffic.
pub struct Scenario {
    pub name: &'static str,
    /// What the figures are about, for the summary.
    pub about: &'static str,
    pub cloudlet: CompiledPolicy,
    /// `nft -f` input.
    pub nftables: String,
    /// `ipset restore` input and iptables / ip6tables rules (`-t raw -A PREROUTING ...`).
    pub ipset: Option<(String, Vec<Vec<String>>)>,
    /// xdp-filter commands after `load`.
    pub xdp_filter: Option<Vec<Vec<String>>>,
    pub frames: Vec<Vec<u8>>,
}

impl Scenario {
    /// The systems that can express this scenario's policy.
    pub fn systems(&self) -> Vec<System> {
        let mut s = vec![System::XdpPass, System::Cloudlet, System::Nftables];
        if self.ipset.is_some() {
            s.push(System::IptablesIpset);
        }
        if self.xdp_filter.is_some() {
            s.push(System::XdpFilter);
        }
        s
    }

    /// Sets `system` up on `bed`, runs `count` frames through it and, for the systems
    /// that are an XDP program, that program alone on the scenario's frames; then takes
    /// the system down again (also when the run fails).
    pub fn measure(
        &self,
        bed: &Bed,
        generator: &Generator,
        system: System,
        count: u32,
        pass: &CompiledPolicy,
    ) -> Result<Sample> {
        self.with_system(bed, system, pass, || {
            let mut sample = bed.run(generator, count)?;
            if matches!(
                system,
                System::Cloudlet | System::XdpFilter | System::XdpPass
            ) {
                sample.program_ns_per_packet = Some(bed.program_cost(&self.frames)?);
            }
            Ok(sample)
        })
    }

    /// Runs `f` with `system` set up on `s0`, and takes it down after, whatever `f` gave.
    fn with_system<T>(
        &self,
        bed: &Bed,
        system: System,
        pass: &CompiledPolicy,
        f: impl FnOnce() -> Result<T>,
    ) -> Result<T> {
        // The commands that set the system up (run in order) and take it down again.
        let (program, up, down): (_, Vec<Step>, Vec<Vec<&str>>) = match system {
            System::Cloudlet => (Some((&self.cloudlet, ProgramKind::Policy)), vec![], vec![]),
            System::XdpPass => (Some((pass, ProgramKind::Noop)), vec![], vec![]),
            System::XdpFilter => {
                let cmds = self.xdp_filter.as_ref().context("no xdp-filter form")?;
                let load = vec![
                    "xdp-filter",
                    "load",
                    SUT_IF,
                    "-m",
                    "native",
                    "-f",
                    "udp,ipv4,ipv6",
                ];
                let mut up = vec![(load, "")];
                up.extend(cmds.iter().map(|c| {
                    let mut args = vec!["xdp-filter"];
                    args.extend(c.iter().map(String::as_str));
                    (args, "")
                }));
                (None, up, vec![vec!["xdp-filter", "unload", SUT_IF]])
            }
            // The stack's hooks behind a program that passes everything (a veth only
            // polls its ring with a program attached).
            System::Nftables => (
                Some((pass, ProgramKind::Noop)),
                vec![(vec!["nft", "-f", "-"], self.nftables.as_str())],
                vec![vec!["nft", "delete", "table", "netdev", crate::nft::TABLE]],
            ),
            System::IptablesIpset => {
                let (restore, rules) = self.ipset.as_ref().context("no ipset form")?;
                let mut up = vec![(vec!["ipset", "restore"], restore.as_str())];
                up.extend(
                    rules
                        .iter()
                        .map(|r| (r.iter().map(String::as_str).collect(), "")),
                );
                let down = vec![
                    vec!["iptables", "-t", "raw", "-F", "PREROUTING"],
                    vec!["ip6tables", "-t", "raw", "-F", "PREROUTING"],
                    vec!["ipset", "destroy"],
                ];
                (Some((pass, ProgramKind::Noop)), up, down)
            }
        };
        let mut loaded = program
            .map(|(c, kind)| Loaded::new(c, kind, false))
            .transpose()?;
        let _link = loaded.as_mut().map(|l| bed.attach(l)).transpose()?;
        let result = up
            .iter()
            .try_for_each(|(args, input)| bed.nsenter(args, input))
            .and_then(|()| f());
        // Every step down, even after a failure; the first error is the one reported.
        let downs: Vec<Result<()>> = down.iter().map(|args| bed.nsenter(args, "")).collect();
        let value = result?;
        downs.into_iter().collect::<Result<()>>()?;
        Ok(value)
    }
}

/// Default frame length: the shortest that carries IPv6 and UDP.
pub const FRAME_LEN: usize = 64;

/// The scenarios, on sources spread over the world (`sources`), frames of `frame_len`
/// bytes (at least [`FRAME_LEN`], at most 1,514).
pub fn scenarios(
    bed: &Bed,
    db: &cloudlet::geoip::GeoDb,
    sources: &[IpAddr],
    dir: &std::path::Path,
    frame_len: usize,
) -> Result<Vec<Scenario>> {
    if !(FRAME_LEN..=1514).contains(&frame_len) {
        bail!("frame length {frame_len}: from {FRAME_LEN} to 1514 bytes");
    }
    use cloudlet::{node::prepare_policy, policy};

    use crate::{Mix, nft, rules_policy, world_policy, write_policy};
    let frames = |dport: &dyn Fn(usize) -> u16| -> Vec<Vec<u8>> {
        sources
            .iter()
            .enumerate()
            .map(|(i, s)| bed.frame(*s, dport(i), frame_len))
            .collect()
    };
    let load = |name: &str, text: &str| -> Result<(policy::Policy, CompiledPolicy)> {
        let path = write_policy(dir, &format!("live-{name}.toml"), text);
        Ok((policy::load(&path)?, prepare_policy(&path)?))
    };
    let iptables = |tool: &str, args: &str| -> Vec<String> {
        let mut v: Vec<String> = [tool, "-t", "raw", "-A", "PREROUTING", "-i", SUT_IF]
            .iter()
            .map(|s| s.to_string())
            .collect();
        v.extend(args.split_whitespace().map(String::from));
        v
    };
    let mut out = Vec::new();

    // The whole-world table: a zone per country plus `eu`; the service behind s0 takes
    // traffic from the EU only, and nothing comes in from `kp`. The traffic is a flood from
    // outside the EU with one frame in 16 from inside.
    let (p, c) = load("geofence", &world_policy())?;
    let in_eu = |ip: &IpAddr| {
        db.country(*ip)
            .ok()
            .flatten()
            .is_some_and(|c| crate::EU.contains(&c.as_str()))
    };
    let (eu_sources, others): (Vec<IpAddr>, Vec<IpAddr>) = sources.iter().partition(|s| in_eu(s));
    let mut geo_frames = Vec::new();
    for (i, src) in others.iter().enumerate() {
        geo_frames.push(bed.frame(*src, 443, frame_len));
        if i % 15 == 14 {
            let eu = eu_sources[i / 15 % eu_sources.len().max(1)];
            geo_frames.push(bed.frame(eu, 443, frame_len));
        }
    }
    let zones = nft::zone_prefixes(&p, Some(db))?;
    let zone = |name: &str| p.zones.iter().position(|z| z.name == name).expect("zone");
    let (eu, kp) = (zone("eu"), zone("kp"));
    let restore = format!(
        "{}{}",
        nft::ipset_restore("eu", &zones[eu]),
        nft::ipset_restore("kp", &zones[kp])
    );
    let mut rules = Vec::new();
    for (tool, fam, svc) in [
        ("iptables", "4", "10.10.0.0/16"),
        ("ip6tables", "6", "fd00:10::/32"),
    ] {
        rules.push(iptables(
            tool,
            &format!("-m set --match-set kp{fam} src -j DROP"),
        ));
        rules.push(iptables(
            tool,
            &format!("-d {svc} -m set ! --match-set eu{fam} src -j DROP"),
        ));
    }
    out.push(Scenario {
        name: "geofence_world",
        about: "country geo-fence on the whole-world table (EU only into the service, nothing from KP)",
        nftables: nft::ruleset(&p, Some(db), SUT_IF)?,
        cloudlet: c,
        ipset: Some((restore, rules)),
        xdp_filter: None,
        frames: geo_frames,
    });

    // 1,000 rules of mixed criteria; one frame in 16 is for the last rule (pass), the
    // others match none and take the default (drop).
    let (p, c) = load("rules1000", &rules_policy(1_000, Mix::Clustered))?;
    out.push(Scenario {
        name: "rules_1000",
        about: "1,000 mixed rules (prefixes, zones, protocols, ports, TCP flags, VLANs), first match wins",
        nftables: nft::ruleset(&p, Some(db), SUT_IF)?,
        cloudlet: c,
        ipset: None,
        xdp_filter: None,
        frames: frames(&|i| if i % 32 < 2 { 443 } else { 444 }),
    });

    // One rule limits the service to 100,000 packets a second (one bucket for both
    // families, so one nftables rule).
    let (_, c) = load(
        "ratelimit",
        "default = \"pass\"\n[zones.svc]\nprefixes = [\"10.10.0.0/16\", \"fd00:10::/32\"]\n[[rules]]\nname = \"limit\"\ndst_zone = \"svc\"\nproto = \"udp\"\ndst_port = 443\naction = { rate_limit = { pps = 100000, burst = 1000, per = \"rule\", over = \"drop\" } }\n",
    )?;
    out.push(Scenario {
        name: "rate_limit",
        about: "one rule rate-limited to 100,000 packets/s (burst 1,000), the rest dropped",
        nftables: format!(
            "table netdev {} {{\n  chain ingress {{\n    type filter hook ingress device \"{SUT_IF}\" priority 0; policy accept;\n    udp dport 443 limit rate over 100000/second burst 1000 packets drop\n  }}\n}}\n",
            nft::TABLE
        ),
        cloudlet: c,
        ipset: None,
        xdp_filter: None,
        frames: frames(&|_| 443),
    });

    // Exact addresses and ports, which xdp-filter can express: half the sources are
    // blocked, and half the frames of the others go to a blocked port (sources alternate
    // between the families, so in eights: 4 blocked sources, 2 blocked ports, 2 open).
    let blocked: Vec<IpAddr> = sources
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 8 < 4)
        .map(|(_, s)| *s)
        .collect();
    let ports = [7u16, 19, 1900, 11211];
    let text = format!(
        "default = \"pass\"\n[[rules]]\nname = \"blocked-hosts\"\nsrc_prefix = [{}]\naction = \"drop\"\n[[rules]]\nname = \"blocked-ports\"\ndst_port = [{}]\naction = \"drop\"\n",
        blocked
            .iter()
            .map(|a| format!("\"{a}/{}\"", if a.is_ipv4() { 32 } else { 128 }))
            .collect::<Vec<_>>()
            .join(", "),
        ports.map(|p| p.to_string()).join(", ")
    );
    let (p, c) = load("exact", &text)?;
    let mut cmds: Vec<Vec<String>> = blocked
        .iter()
        .map(|a| vec!["ip".into(), a.to_string(), "-m".into(), "src".into()])
        .collect();
    cmds.extend(
        ports
            .iter()
            .map(|p| vec!["port".into(), p.to_string(), "-m".into(), "dst".into()]),
    );
    let (v4, v6): (Vec<_>, Vec<_>) = blocked
        .iter()
        .map(|a| policy::Prefix::new(*a, if a.is_ipv4() { 32 } else { 128 }).expect("prefix"))
        .partition(|p| p.is_ipv4());
    let list = ports.map(|p| p.to_string()).join(",");
    let mut rules = Vec::new();
    for (tool, fam) in [("iptables", "4"), ("ip6tables", "6")] {
        rules.push(iptables(
            tool,
            &format!("-m set --match-set blk{fam} src -j DROP"),
        ));
        for proto in ["udp", "tcp"] {
            rules.push(iptables(
                tool,
                &format!("-p {proto} -m multiport --dports {list} -j DROP"),
            ));
        }
    }
    out.push(Scenario {
        name: "exact",
        about: "exact source addresses and destination ports (the policy xdp-filter can express)",
        nftables: nft::ruleset(&p, None, SUT_IF)?,
        cloudlet: c,
        ipset: Some((nft::ipset_restore("blk", &[v4, v6]), rules)),
        xdp_filter: Some(cmds),
        frames: frames(&|i| {
            if i % 8 == 4 || i % 8 == 5 {
                ports[i / 8 % 4]
            } else {
                443
            }
        }),
    });
    Ok(out)
}
