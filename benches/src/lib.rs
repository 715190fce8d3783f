//! Shared pieces of Cloudlet's benchmarks: the policies they measure and the results file.

pub mod live;
pub mod loadgen;
pub mod nft;

use std::path::Path;

use serde::Serialize;

/// A thread's CPU clock (`pthread_getcpuclockid`), readable from any thread while that
/// thread runs: what a server thread spends on its work, measured from outside.
#[derive(Clone, Copy)]
pub struct ThreadClock(libc::clockid_t);

impl ThreadClock {
    /// The calling thread's clock.
    pub fn current() -> anyhow::Result<Self> {
        let mut clock: libc::clockid_t = 0;
        // SAFETY: `clock` is a valid out-pointer; the thread is the calling one.
        match unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } {
            0 => Ok(Self(clock)),
            rc => anyhow::bail!("pthread_getcpuclockid: error {rc}"),
        }
    }

    /// The thread's CPU time so far. Read it only while the thread runs: the clock of a
    /// thread that has ended is invalid.
    pub fn now(self) -> std::time::Duration {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: `ts` is a valid out-pointer.
        let rc = unsafe { libc::clock_gettime(self.0, &mut ts) };
        assert_eq!(rc, 0, "clock_gettime on a thread's CPU clock");
        std::time::Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
    }
}

/// The GeoIP database `cargo xtask setup` installs.
pub const GEOIP_DATABASE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../data/geoip/geo-whois-asn-country.mmdb"
);

/// EU member states, for the benchmark policies' `eu` zone.
pub const EU: &[&str] = &[
    "AT", "BE", "BG", "CY", "CZ", "DE", "DK", "EE", "ES", "FI", "FR", "GR", "HR", "HU", "IE", "IT",
    "LT", "LU", "LV", "MT", "NL", "PL", "PT", "RO", "SE", "SI", "SK",
];

/// The rules both benchmark policies share: a country block and a geo-fenced service.
const RULES: &str = r#"
[[rules]]
name = "embargoed"
src_zone = "kp"
action = "drop"
[[rules]]
name = "lab-only-from-eu"
dst_prefix = ["10.10.0.0/16", "fd00:10::/32"]
src_zone = "!eu"
action = "drop"
"#;

/// A policy with a handful of explicit prefixes and no GeoIP data.
pub fn small_policy() -> String {
    format!(
        "default = \"pass\"\n[zones.eu]\nprefixes = [\"192.0.2.0/24\", \"198.51.100.0/24\", \"2001:db8:1::/48\"]\n[zones.kp]\nprefixes = [\"203.0.113.0/24\"]\n{RULES}"
    )
}

/// A policy whose zones cover the whole world: one zone per country (so neighbouring
/// networks of different countries stay distinct) plus `eu`, on the real GeoIP database.
pub fn world_policy() -> String {
    let mut p = format!("default = \"pass\"\n[geoip]\ndatabase = {GEOIP_DATABASE:?}\n");
    p.push_str(&format!(
        "[zones.eu]\ncountries = [{}]\n",
        EU.iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    for code in cloudlet::policy::countries::ISO_3166_ALPHA2 {
        p.push_str(&format!(
            "[zones.{}]\ncountries = [{code:?}]\n",
            code.to_ascii_lowercase()
        ));
    }
    p.push_str(RULES);
    p
}

/// Writes `policy` into `dir` and returns its path.
pub fn write_policy(dir: &Path, name: &str, policy: &str) -> std::path::PathBuf {
    std::fs::create_dir_all(dir).expect("creating the benchmark folder");
    let path = dir.join(name);
    std::fs::write(&path, policy).expect("writing a benchmark policy");
    path
}

/// One figure of `results.json`.
#[derive(Clone, Debug, Serialize)]
pub struct Figure {
    pub name: String,
    pub value: f64,
    pub unit: String,
    /// The figure this one is compared with, measured in the same run.
    pub baseline: Option<String>,
    /// `value / baseline`.
    pub ratio: Option<f64>,
}

/// How the kinds of rules of [`mixed_rules`] are ordered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mix {
    /// Each kind in one run, as blocklists and allowlists are written: the rule sets of a
    /// packet's fields rarely overlap within 64 consecutive rules.
    Clustered,
    /// Kinds in turn, rule after rule: every 64 consecutive rules hold every kind, the
    /// worst case for the summaries.
    Interleaved,
}

/// `n` rules of mixed criteria (source and destination prefixes, zones, protocols, port
/// lists and ranges, TCP flags, VLANs, IP version), none of which the benchmark's traffic
/// (UDP from everywhere to port 443 of the `svc` zone) matches except the last, so every
/// packet is judged against the whole rule set.
pub fn mixed_rules(n: usize, mix: Mix) -> String {
    // A fixed generator: the same policy every run.
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut p = String::new();
    for i in 0..n.saturating_sub(1) {
        let r = next();
        let (a, b, port) = (
            r >> 8 & 0xff,
            r >> 16 & 0xff,
            (r >> 24 & 0x3fff) as u16 + 1024,
        );
        p.push_str(&format!("[[rules]]\nname = \"r{i}\"\n"));
        let kind = match mix {
            Mix::Interleaved => i % 8,
            Mix::Clustered => i * 8 / n,
        };
        match kind {
            // Blocklists: sources in the documentation and shared address ranges.
            0 => p.push_str(&format!(
                "src_prefix = [\"100.{}.{b}.0/24\", \"2001:db8:{a:x}{b:02x}::/48\"]\naction = \"drop\"\n",
                64 + (a & 63)
            )),
            1 => p.push_str(&format!(
                "dst_prefix = [\"172.{}.{b}.0/24\"]\nproto = \"tcp\"\ndst_port = {port}\naction = \"pass\"\n",
                16 + (a & 15)
            )),
            2 => p.push_str(&format!(
                "src_prefix = [\"198.18.{a}.0/24\"]\nproto = \"udp\"\ndst_port = \"{port}-{}\"\naction = \"drop\"\n",
                port + 100
            )),
            3 => p.push_str(&format!(
                "dst_zone = \"svc\"\nproto = \"tcp\"\ntcp_flags = \"syn,!ack\"\nsrc_port = [{port}, {}]\naction = \"drop\"\n",
                port + 1
            )),
            4 => p.push_str(&format!("vlan = {}\naction = \"pass\"\n", 1 + (r >> 40) % 4000)),
            5 => p.push_str(&format!(
                "src_zone = \"kp\"\ndst_port = [{port}, {}, {}]\naction = \"drop\"\n",
                port + 7,
                port + 9
            )),
            6 => p.push_str(&format!(
                "ip_version = 6\ndst_prefix = [\"fd00:{a:x}:{b:x}::/48\"]\naction = \"drop\"\n"
            )),
            _ => p.push_str(&format!(
                "dst_zone = \"svc\"\nproto = \"udp\"\ndst_port = \"!{port}-{}\"\nsrc_port = {}\naction = \"drop\"\n",
                port + 50000u16.min(u16::MAX - port),
                port / 2
            )),
        }
    }
    p.push_str("[[rules]]\nname = \"last\"\ndst_zone = \"svc\"\nproto = \"udp\"\ndst_port = 443\naction = \"pass\"\n");
    p
}

/// A policy of `n` mixed rules (see [`mixed_rules`]) with a few explicit zones.
pub fn rules_policy(n: usize, mix: Mix) -> String {
    format!(
        "default = \"drop\"\n[zones.svc]\nprefixes = [\"10.10.0.0/16\", \"fd00:10::/32\"]\n[zones.kp]\nprefixes = [\"203.0.113.0/24\"]\n{}",
        mixed_rules(n, mix)
    )
}

/// Adds `figures` to `results.json` in `out`, replacing figures of the same names.
pub fn merge_results(
    out: &std::path::Path,
    figures: &[Figure],
) -> anyhow::Result<std::path::PathBuf> {
    use anyhow::Context as _;
    std::fs::create_dir_all(out)?;
    let path = out.join("results.json");
    let mut all: Vec<serde_json::Value> = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a list of figures", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    all.retain(|f| {
        !figures
            .iter()
            .any(|n| f.get("name").and_then(|v| v.as_str()) == Some(n.name.as_str()))
    });
    for f in figures {
        all.push(serde_json::to_value(f)?);
    }
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)?;
    Ok(path)
}
