//! The policy file: TOML in, a validated [`Policy`] out, or every problem with its
//! `file:line:column`. Pure: no maps, no sockets. `docs/policy.md` documents each key.

pub mod countries;
pub mod criteria;
pub mod prefix;

use std::{
    collections::{BTreeMap, HashSet},
    fmt,
    ops::Range,
    path::{Path, PathBuf},
};

use serde::Deserialize;
use toml::Spanned;

pub use criteria::{Match, TcpFlags};
pub use prefix::{Prefix, PrefixError};

pub use cloudlet_common::MAX_RULES;

/// Most zones one policy may define (a multiple of 64: zone sets are bitmaps).
pub const MAX_ZONES: usize = 256;

/// What a rule, the default, the malformed or the non-IP verdict does with a packet.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    /// Hand the packet to the kernel stack.
    Pass,
    /// Drop it.
    Drop,
    /// Send it back out of the interface it came in on, MAC addresses swapped.
    Tx,
    /// Send it out of another interface (XDP_REDIRECT through a device map).
    Redirect(String),
    /// Hand it to the stack on another CPU (XDP_REDIRECT through a CPU map).
    Cpu(u32),
    /// Pass up to a rate, then the limit's `over` action.
    RateLimit(RateLimitSpec),
    /// Hand it to cloudletd's AF_XDP socket on this receive queue of the interface it came
    /// in on (XDP_REDIRECT through an XSK map).
    Xsk(u32),
}

/// `{ rate_limit = { pps = N, burst = M, per = "source" | "rule", over = "drop" | "pass" } }`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RateLimitSpec {
    /// Packets per second.
    pub pps: u64,
    /// Packets that may pass back to back (default: one second's worth, `pps`).
    pub burst: u64,
    /// One bucket per source address rather than one for the rule.
    pub per_source: bool,
    /// Drop (default) or pass what exceeds the rate.
    pub over_drop: bool,
}

impl RateLimitSpec {
    fn parse(value: &toml::Value) -> Result<Self, String> {
        let t = value.as_table().ok_or("`rate_limit` takes a table: { pps = N, burst = M, per = \"source\" | \"rule\", over = \"drop\" | \"pass\" }")?;
        if let Some(k) = t
            .keys()
            .find(|k| !["pps", "burst", "per", "over"].contains(&k.as_str()))
        {
            return Err(format!(
                "`rate_limit`: unknown key `{k}` (keys: pps, burst, per, over)"
            ));
        }
        let count = |key: &str| -> Result<Option<u64>, String> {
            t.get(key)
                .map(|v| {
                    v.as_integer()
                        .and_then(|n| u64::try_from(n).ok())
                        .filter(|n| (1..=1_000_000_000).contains(n))
                        .ok_or_else(|| {
                            format!(
                                "`rate_limit`: `{key}` must be a whole number from 1 to 1000000000"
                            )
                        })
                })
                .transpose()
        };
        let pps = count("pps")?.ok_or("`rate_limit` needs `pps`")?;
        let burst = count("burst")?.unwrap_or(pps);
        let per_source = match t.get("per").map(|v| v.as_str()) {
            None | Some(Some("rule")) => false,
            Some(Some("source")) => true,
            _ => return Err("`rate_limit`: `per` is \"source\" or \"rule\"".into()),
        };
        let over_drop = match t.get("over").map(|v| v.as_str()) {
            None | Some(Some("drop")) => true,
            Some(Some("pass")) => false,
            _ => return Err("`rate_limit`: `over` is \"drop\" or \"pass\"".into()),
        };
        Ok(Self {
            pps,
            burst,
            per_source,
            over_drop,
        })
    }
}

/// Whether `name` can name a network interface (1 to 15 bytes, no `/` or whitespace).
pub fn is_interface_name(name: &str) -> bool {
    !name.is_empty() && name.len() <= 15 && !name.contains(|c: char| c == '/' || c.is_whitespace())
}

/// How the accepted actions are spelled, for error messages.
const ACTIONS: &str = "\"pass\", \"drop\", \"tx\", { redirect = \"IFNAME\" }, { cpu = N }, { xsk = QUEUE } or { rate_limit = { ... } }";

/// Most CPUs a `cpu` action can name (the CPU map's size).
pub const MAX_CPUS: u32 = 256;

/// Queues an `xsk` action can name: 0 to this less one.
pub const MAX_XSK_QUEUES: u32 = cloudlet_common::xsk::MAX_QUEUES;

impl Action {
    /// The action's name as printed by `classify` and `stats` (without its argument).
    pub const fn name(&self) -> &'static str {
        Self::code_name(self.code())
    }

    /// The code the XDP program uses (`cloudlet_common::action`).
    pub const fn code(&self) -> u32 {
        use cloudlet_common::action;
        match self {
            Self::Pass => action::PASS,
            Self::Drop => action::DROP,
            Self::Tx => action::TX,
            Self::Redirect(_) => action::REDIRECT,
            Self::Cpu(_) => action::CPU,
            Self::RateLimit(_) => action::RATE_LIMIT,
            Self::Xsk(_) => action::XSK,
        }
    }

    /// The name of a kernel action code.
    pub const fn code_name(code: u32) -> &'static str {
        use cloudlet_common::action;
        match code {
            action::PASS => "pass",
            action::DROP => "drop",
            action::TX => "tx",
            action::REDIRECT => "redirect",
            action::CPU => "cpu",
            action::RATE_LIMIT => "rate_limit",
            action::XSK => "xsk",
            _ => "unknown",
        }
    }

    /// Parses `"pass"`, `"drop"`, `"tx"`, `{ redirect = "IFNAME" }`, `{ cpu = N }`,
    /// `{ xsk = QUEUE }` or `{ rate_limit = { ... } }`.
    pub fn from_value(value: &toml::Value) -> Result<Self, String> {
        match value {
            toml::Value::String(s) => match s.as_str() {
                "pass" => Ok(Self::Pass),
                "drop" => Ok(Self::Drop),
                "tx" => Ok(Self::Tx),
                other => Err(format!("unknown action {other:?}; expected {ACTIONS}")),
            },
            toml::Value::Table(t) if t.len() == 1 => match t.iter().next() {
                Some((k, toml::Value::String(iface))) if k == "redirect" => {
                    if !is_interface_name(iface) {
                        Err(format!("`redirect`: {iface:?} is not an interface name"))
                    } else {
                        Ok(Self::Redirect(iface.clone()))
                    }
                }
                Some((k, toml::Value::Integer(n))) if k == "cpu" => u32::try_from(*n)
                    .ok()
                    .filter(|n| *n < MAX_CPUS)
                    .map(Self::Cpu)
                    .ok_or_else(|| format!("`cpu`: {n} is not a CPU number below {MAX_CPUS}")),
                Some((k, toml::Value::Integer(n))) if k == "xsk" => u32::try_from(*n)
                    .ok()
                    .filter(|n| *n < MAX_XSK_QUEUES)
                    .map(Self::Xsk)
                    .ok_or_else(|| {
                        format!("`xsk`: {n} is not a queue number below {MAX_XSK_QUEUES}")
                    }),
                Some((k, v)) if k == "xsk" => Err(format!(
                    "`xsk` takes a receive queue number (found {})",
                    v.type_str()
                )),
                Some((k, v)) if k == "rate_limit" => RateLimitSpec::parse(v).map(Self::RateLimit),
                _ => Err(format!("unknown action table; expected {ACTIONS}")),
            },
            toml::Value::Table(_) => Err(format!(
                "an action table has exactly one key; expected {ACTIONS}"
            )),
            other => Err(format!(
                "an action must be a string or a table (found {}); expected {ACTIONS}",
                other.type_str()
            )),
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Redirect(iface) => write!(f, "redirect {iface}"),
            Self::Cpu(cpu) => write!(f, "cpu {cpu}"),
            Self::Xsk(queue) => write!(f, "xsk {queue}"),
            Self::RateLimit(r) => write!(
                f,
                "rate_limit {} pps burst {} per {} over {}",
                r.pps,
                r.burst,
                if r.per_source { "source" } else { "rule" },
                if r.over_drop { "drop" } else { "pass" }
            ),
            other => f.write_str(other.name()),
        }
    }
}

/// A named set of addresses: the networks of some countries plus explicit prefixes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Zone {
    pub name: String,
    /// ISO 3166 alpha-2 codes, upper case.
    pub countries: Vec<String>,
    pub prefixes: Vec<Prefix>,
}

/// A reference to a zone from a rule: `"eu"` or `"!eu"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ZoneMatch {
    /// Index into [`Policy::zones`].
    pub zone: usize,
    /// True for `"!name"`: the address is in none of that zone's networks.
    pub negate: bool,
}

/// One rule. Every criterion present must hold (AND); a rule without criteria matches all.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub src_prefix: Option<Vec<Prefix>>,
    pub dst_prefix: Option<Vec<Prefix>>,
    pub src_zone: Option<ZoneMatch>,
    pub dst_zone: Option<ZoneMatch>,
    /// IP protocol (after IPv6 extension headers).
    pub proto: Option<Match<u8>>,
    /// TCP/UDP source ports; never matches a packet without ports (non-TCP/UDP, non-first
    /// fragments), negated or not.
    pub src_port: Option<Match<u16>>,
    /// TCP/UDP destination ports, likewise.
    pub dst_port: Option<Match<u16>>,
    /// Outer VLAN id; an untagged packet matches only a negated criterion.
    pub vlan: Option<Match<u16>>,
    /// 4 or 6.
    pub ip_version: Option<u8>,
    /// TCP flags; never matches a packet without a TCP header.
    pub tcp_flags: Option<TcpFlags>,
    pub action: Action,
}

/// A validated policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Verdict when no rule matches.
    pub default_action: Action,
    /// Verdict for packets that cannot be parsed.
    pub malformed_action: Action,
    /// Verdict for frames that carry neither IPv4 nor IPv6.
    pub non_ip_action: Action,
    /// The GeoIP database, resolved against the policy file's folder.
    pub geoip_database: Option<PathBuf>,
    /// Zones, sorted by name; a zone's index is its bit in zone sets.
    pub zones: Vec<Zone>,
    /// Rules in file order: the first match wins.
    pub rules: Vec<Rule>,
}

impl Policy {
    /// Index of the zone called `name`.
    pub fn zone_index(&self, name: &str) -> Option<usize> {
        self.zones.iter().position(|z| z.name == name)
    }

    /// Whether any zone is built from countries (and so needs the GeoIP database).
    pub fn uses_countries(&self) -> bool {
        self.zones.iter().any(|z| !z.countries.is_empty())
    }
}

/// One problem found in a policy file, located by line and column (1-based).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Errors from reading or validating a policy.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML, or does not have the policy's shape, or breaks a rule
    /// of validation. Every problem found is listed.
    #[error("{}", render_diagnostics(.path, .diagnostics))]
    Invalid {
        path: PathBuf,
        diagnostics: Vec<Diagnostic>,
    },
}

fn render_diagnostics(path: &Path, diagnostics: &[Diagnostic]) -> String {
    diagnostics
        .iter()
        .map(|d| format!("{}:{}:{}: {}", path.display(), d.line, d.column, d.message))
        .collect::<Vec<_>>()
        .join("\n")
}

// The file's shape. Spans locate validation errors.

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    default: Option<Spanned<toml::Value>>,
    malformed: Option<Spanned<String>>,
    non_ip: Option<Spanned<String>>,
    geoip: Option<RawGeoip>,
    #[serde(default)]
    zones: BTreeMap<Spanned<String>, RawZone>,
    #[serde(default)]
    rules: Vec<Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGeoip {
    database: Spanned<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawZone {
    #[serde(default)]
    countries: Vec<Spanned<String>>,
    #[serde(default)]
    prefixes: Vec<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<Spanned<String>>,
    src_prefix: Option<Vec<Spanned<String>>>,
    dst_prefix: Option<Vec<Spanned<String>>>,
    src_zone: Option<Spanned<String>>,
    dst_zone: Option<Spanned<String>>,
    proto: Option<Spanned<toml::Value>>,
    src_port: Option<Spanned<toml::Value>>,
    dst_port: Option<Spanned<toml::Value>>,
    vlan: Option<Spanned<toml::Value>>,
    ip_version: Option<Spanned<toml::Value>>,
    tcp_flags: Option<Spanned<toml::Value>>,
    action: Spanned<toml::Value>,
}

/// Reads and validates the policy at `path`.
pub fn load(path: &Path) -> Result<Policy, PolicyError> {
    let text = std::fs::read_to_string(path).map_err(|source| PolicyError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse(&text, path)
}

/// Validates policy `text`; `path` names it in errors and anchors relative paths.
pub fn parse(text: &str, path: &Path) -> Result<Policy, PolicyError> {
    let mut v = Validator {
        text,
        diagnostics: Vec::new(),
    };
    let raw: RawPolicy = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            v.error(e.span().unwrap_or(0..0), e.message().to_string());
            return Err(v.into_error(path));
        }
    };
    let policy = v.policy(raw, path);
    if v.diagnostics.is_empty() {
        Ok(policy)
    } else {
        Err(v.into_error(path))
    }
}

struct Validator<'a> {
    text: &'a str,
    diagnostics: Vec<Diagnostic>,
}

impl Validator<'_> {
    fn error(&mut self, span: Range<usize>, message: String) {
        let (line, column) = line_column(self.text, span.start);
        self.diagnostics.push(Diagnostic {
            line,
            column,
            message,
        });
    }

    fn into_error(mut self, path: &Path) -> PolicyError {
        self.diagnostics.sort_by_key(|d| (d.line, d.column));
        PolicyError::Invalid {
            path: path.to_path_buf(),
            diagnostics: self.diagnostics,
        }
    }

    /// `malformed` and `non_ip`: pass or drop only.
    fn pass_or_drop(
        &mut self,
        value: Option<Spanned<String>>,
        key: &str,
        default: Action,
    ) -> Action {
        let Some(value) = value else {
            return default;
        };
        match value.get_ref().as_str() {
            "pass" => Action::Pass,
            "drop" => Action::Drop,
            other => {
                self.error(
                    value.span(),
                    format!("`{key}`: unknown action {other:?}, expected \"pass\" or \"drop\""),
                );
                default
            }
        }
    }

    fn action(&mut self, value: &Spanned<toml::Value>, key: &str) -> Action {
        Action::from_value(value.get_ref()).unwrap_or_else(|e| {
            self.error(value.span(), format!("`{key}`: {e}"));
            Action::Pass
        })
    }

    /// Parses one criterion, reporting a bad value at its position.
    fn criterion<T>(
        &mut self,
        value: Option<Spanned<toml::Value>>,
        key: &str,
        parse: impl FnOnce(&toml::Value) -> Result<T, String>,
    ) -> Option<T> {
        let value = value?;
        parse(value.get_ref())
            .map_err(|e| self.error(value.span(), format!("`{key}`: {e}")))
            .ok()
    }

    fn prefixes(&mut self, list: Vec<Spanned<String>>) -> Vec<Prefix> {
        list.into_iter()
            .filter_map(|p| match p.get_ref().parse::<Prefix>() {
                Ok(prefix) => Some(prefix),
                Err(e) => {
                    self.error(p.span(), format!("bad prefix {:?}: {e}", p.get_ref()));
                    None
                }
            })
            .collect()
    }

    fn zone_match(&mut self, value: Option<Spanned<String>>, zones: &[Zone]) -> Option<ZoneMatch> {
        let value = value?;
        let text = value.get_ref().trim();
        let (negate, name) = match text.strip_prefix('!') {
            Some(rest) => (true, rest.trim()),
            None => (false, text),
        };
        match zones.iter().position(|z| z.name == name) {
            Some(zone) => Some(ZoneMatch { zone, negate }),
            None => {
                let known = zones.iter().map(|z| z.name.as_str()).collect::<Vec<_>>();
                self.error(
                    value.span(),
                    format!(
                        "unknown zone {name:?} (zones defined: {})",
                        if known.is_empty() {
                            "none".to_string()
                        } else {
                            known.join(", ")
                        }
                    ),
                );
                None
            }
        }
    }

    fn policy(&mut self, raw: RawPolicy, path: &Path) -> Policy {
        let default_action = raw
            .default
            .map_or(Action::Pass, |v| self.action(&v, "default"));
        let malformed_action = self.pass_or_drop(raw.malformed, "malformed", Action::Drop);
        let non_ip_action = self.pass_or_drop(raw.non_ip, "non_ip", Action::Pass);

        let geoip_database = raw.geoip.map(|g| {
            let db = PathBuf::from(g.database.get_ref());
            if db.is_absolute() {
                db
            } else {
                path.parent().unwrap_or(Path::new(".")).join(db)
            }
        });

        let mut zones = Vec::with_capacity(raw.zones.len());
        for (name, zone) in raw.zones {
            let span = name.span();
            let name = name.into_inner();
            if name.is_empty() || name.starts_with('!') || name.chars().any(char::is_whitespace) {
                self.error(
                    span.clone(),
                    format!(
                        "bad zone name {name:?}: must be non-empty, without spaces or a leading '!'"
                    ),
                );
            }
            let mut countries = Vec::with_capacity(zone.countries.len());
            for c in zone.countries {
                let code = c.get_ref().trim().to_ascii_uppercase();
                if countries::is_country_code(&code) {
                    countries.push(code);
                } else {
                    self.error(
                        c.span(),
                        format!(
                            "unknown country code {:?} (expected ISO 3166 alpha-2, such as \"DE\")",
                            c.get_ref()
                        ),
                    );
                }
            }
            if !countries.is_empty() && geoip_database.is_none() {
                self.error(
                    span.clone(),
                    format!(
                        "zone {name:?} names countries, but the policy has no [geoip] database"
                    ),
                );
            }
            let prefixes = self.prefixes(zone.prefixes);
            zones.push(Zone {
                name,
                countries,
                prefixes,
            });
        }
        if zones.len() > MAX_ZONES {
            self.error(
                0..0,
                format!(
                    "{} zones defined; at most {MAX_ZONES} are supported",
                    zones.len()
                ),
            );
        }

        if raw.rules.len() > MAX_RULES {
            self.error(
                raw.rules[MAX_RULES].span(),
                format!(
                    "{} rules defined; at most {MAX_RULES} are supported",
                    raw.rules.len()
                ),
            );
        }
        let mut names = HashSet::new();
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, rule) in raw.rules.into_iter().enumerate() {
            let rule_span = rule.span();
            let rule = rule.into_inner();
            let name = match rule.name {
                Some(name) => {
                    if name.get_ref().is_empty() {
                        self.error(name.span(), "empty rule name".to_string());
                    } else if !names.insert(name.get_ref().clone()) {
                        self.error(
                            name.span(),
                            format!("duplicate rule name {:?}", name.get_ref()),
                        );
                    }
                    name.into_inner()
                }
                None => {
                    let name = format!("rule-{}", i + 1);
                    if !names.insert(name.clone()) {
                        self.error(
                            rule_span,
                            format!(
                                "duplicate rule name {name:?} (the default name of rule {})",
                                i + 1
                            ),
                        );
                    }
                    name
                }
            };
            let src_prefix = rule.src_prefix.map(|l| self.prefixes(l));
            let dst_prefix = rule.dst_prefix.map(|l| self.prefixes(l));
            let src_zone = self.zone_match(rule.src_zone, &zones);
            let dst_zone = self.zone_match(rule.dst_zone, &zones);
            let action = self.action(&rule.action, "action");
            rules.push(Rule {
                name,
                src_prefix,
                dst_prefix,
                src_zone,
                dst_zone,
                proto: self.criterion(rule.proto, "proto", criteria::proto),
                src_port: self.criterion(rule.src_port, "src_port", criteria::ports),
                dst_port: self.criterion(rule.dst_port, "dst_port", criteria::ports),
                vlan: self.criterion(rule.vlan, "vlan", criteria::vlan),
                ip_version: self.criterion(rule.ip_version, "ip_version", criteria::ip_version),
                tcp_flags: self.criterion(rule.tcp_flags, "tcp_flags", criteria::tcp_flags),
                action,
            });
        }

        Policy {
            default_action,
            malformed_action,
            non_ip_action,
            geoip_database,
            zones,
            rules,
        }
    }
}

/// 1-based line and column (in characters) of byte `offset` in `text`.
pub(crate) fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    (line, column)
}

#[cfg(test)]
mod tests;
