//! Shared pieces of Cloudlet's benchmarks: the policies they measure and the results file.

use std::path::Path;

use serde::Serialize;

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
