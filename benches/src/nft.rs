//! The baselines' rulesets, generated from the same policy and GeoIP data Cloudlet loads:
//! nftables in the netdev ingress hook (interval sets for zones and prefix lists, one rule
//! per policy rule and family, first match wins) and ipset `hash:net` sets for iptables.

use std::{collections::BTreeMap, fmt::Write as _};

use anyhow::{Result, bail};
use cloudlet::{
    geoip::GeoDb,
    policy::{Action, Match, Policy, Prefix, ZoneMatch},
};

/// The table the benchmark owns.
pub const TABLE: &str = "cloudlet_bench";

/// Each zone's prefixes (its own plus its countries' networks), IPv4 and IPv6 apart.
pub fn zone_prefixes(policy: &Policy, db: Option<&GeoDb>) -> Result<Vec<[Vec<Prefix>; 2]>> {
    let mut out: Vec<[Vec<Prefix>; 2]> = policy
        .zones
        .iter()
        .map(|z| {
            let (v4, v6) = z.prefixes.iter().partition(|p| p.is_ipv4());
            [v4, v6]
        })
        .collect();
    let mut by_country: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, z) in policy.zones.iter().enumerate() {
        for c in &z.countries {
            by_country.entry(c.as_str()).or_default().push(i);
        }
    }
    if !by_country.is_empty() {
        let Some(db) = db else {
            bail!("the policy names countries: a GeoIP database is needed");
        };
        let codes: Vec<&str> = by_country.keys().copied().collect();
        db.for_each_network(
            |code| codes.iter().position(|c| *c == code),
            |p, c| {
                for &z in &by_country[codes[c]] {
                    out[z][usize::from(!p.is_ipv4())].push(p);
                }
            },
        )?;
    }
    Ok(out)
}

/// An nftables ruleset (for `nft -f`) on interface `iface`'s netdev ingress hook that
/// judges packets as `policy` does, for the policies it can express: rules of prefixes,
/// zones, protocols, ports, TCP flags and IP version with `pass` or `drop`, on untagged
/// traffic.
pub fn ruleset(policy: &Policy, db: Option<&GeoDb>, iface: &str) -> Result<String> {
    let verdict = |a: &Action| match a {
        Action::Pass => Ok("accept"),
        Action::Drop => Ok("drop"),
        other => bail!("nftables baseline: action {other} is not expressed"),
    };
    let zones = zone_prefixes(policy, db)?;
    let mut t = format!("table netdev {TABLE} {{\n");
    // Sets of the zones rules name.
    let named: std::collections::BTreeSet<usize> = policy
        .rules
        .iter()
        .flat_map(|r| [r.src_zone, r.dst_zone])
        .flatten()
        .map(|z| z.zone)
        .collect();
    for (i, z) in zones.iter().enumerate() {
        if !named.contains(&i) {
            continue;
        }
        for (fam, list) in z.iter().enumerate() {
            set(&mut t, &format!("z{i}_{}", FAMILIES[fam].0), fam, list);
        }
    }
    let mut lists = 0;
    let mut body = String::new();
    for rule in &policy.rules {
        let v = verdict(&rule.action)?;
        if rule.vlan.is_some() {
            // Untagged traffic never matches `vlan = N`; `!N` matches it.
            if rule.vlan.as_ref().is_some_and(|m| !m.negate) {
                continue;
            }
            bail!("nftables baseline: negated VLAN criteria are not expressed");
        }
        for (fam, (name, proto, _)) in FAMILIES.iter().enumerate() {
            if rule.ip_version.is_some_and(|v| (v == 6) != (fam == 1)) {
                continue;
            }
            let mut m = format!("meta protocol {proto}");
            let mut skip = false;
            for (side, prefixes, zone) in [
                ("saddr", &rule.src_prefix, rule.src_zone),
                ("daddr", &rule.dst_prefix, rule.dst_zone),
            ] {
                if let Some(p) = prefixes {
                    let fam_list: Vec<Prefix> = p
                        .iter()
                        .copied()
                        .filter(|p| p.is_ipv4() == (fam == 0))
                        .collect();
                    if fam_list.is_empty() {
                        // No prefix of this family: the rule cannot match it.
                        skip = true;
                        break;
                    }
                    let set_name = format!("l{lists}_{name}");
                    lists += 1;
                    set(&mut t, &set_name, fam, &fam_list);
                    write!(m, " {} {side} @{set_name}", FAMILIES[fam].2)?;
                }
                if let Some(ZoneMatch { zone, negate }) = zone {
                    let neg = if negate { "!= " } else { "" };
                    write!(m, " {} {side} {neg}@z{zone}_{name}", FAMILIES[fam].2)?;
                }
            }
            if skip {
                continue;
            }
            if let Some(p) = &rule.proto {
                write!(m, " meta l4proto {}", values(p))?;
            }
            let ports = rule.src_port.is_some() || rule.dst_port.is_some();
            let tcp_or_udp = rule.proto.as_ref().is_some_and(|p| {
                !p.negate
                    && p.ranges
                        .iter()
                        .all(|r| r.clone().all(|v| v == 6 || v == 17))
            });
            if rule.tcp_flags.is_some() {
                write!(m, " meta l4proto tcp")?;
            } else if ports && !tcp_or_udp {
                // Only TCP and UDP carry ports, negated or not.
                write!(m, " meta l4proto {{ tcp, udp }}")?;
            }
            for (field, port) in [("sport", &rule.src_port), ("dport", &rule.dst_port)] {
                if let Some(p) = port {
                    write!(m, " th {field} {}", values(p))?;
                }
            }
            if let Some(f) = rule.tcp_flags {
                write!(
                    m,
                    " tcp flags & 0x{:02x} == 0x{:02x}",
                    f.set | f.clear,
                    f.set
                )?;
            }
            writeln!(body, "    {m} {v}")?;
        }
    }
    let policy_verdict = match policy.default_action {
        Action::Pass => "accept",
        Action::Drop => "drop",
        ref other => bail!("nftables baseline: default {other} is not expressed"),
    };
    writeln!(
        t,
        "  chain ingress {{\n    type filter hook ingress device \"{iface}\" priority 0; policy {policy_verdict};\n{body}  }}\n}}"
    )?;
    Ok(t)
}

/// (set suffix, `meta protocol`, address expression) per family.
const FAMILIES: [(&str, &str, &str); 2] = [("4", "ip", "ip"), ("6", "ip6", "ip6")];

fn set(t: &mut String, name: &str, fam: usize, prefixes: &[Prefix]) {
    let ty = if fam == 0 { "ipv4_addr" } else { "ipv6_addr" };
    let _ = write!(
        t,
        "  set {name} {{\n    type {ty}; flags interval; auto-merge;\n"
    );
    if !prefixes.is_empty() {
        t.push_str("    elements = { ");
        for (i, p) in prefixes.iter().enumerate() {
            if i > 0 {
                t.push_str(", ");
            }
            let _ = write!(t, "{p}");
        }
        t.push_str(" }\n");
    }
    t.push_str("  }\n");
}

/// `{ 1-5, 7 }` or `!= { ... }`.
fn values<T: Copy + PartialEq + std::fmt::Display>(m: &Match<T>) -> String {
    let items: Vec<String> = m
        .ranges
        .iter()
        .map(|r| {
            if r.start() == r.end() {
                r.start().to_string()
            } else {
                format!("{}-{}", r.start(), r.end())
            }
        })
        .collect();
    let neg = if m.negate { "!= " } else { "" };
    format!("{neg}{{ {} }}", items.join(", "))
}

/// `ipset restore` input: hash:net sets `{name}4` and `{name}6` of `prefixes`.
pub fn ipset_restore(name: &str, prefixes: &[Vec<Prefix>; 2]) -> String {
    let mut s = String::new();
    for (fam, list) in prefixes.iter().enumerate() {
        let family = if fam == 0 { "inet" } else { "inet6" };
        let n = list.len().max(1024).next_power_of_two();
        let set = format!("{name}{}", FAMILIES[fam].0);
        let _ = writeln!(
            s,
            "create {set} hash:net family {family} hashsize {} maxelem {}",
            n / 4,
            n * 2
        );
        for p in list {
            let _ = writeln!(s, "add {set} {p}");
        }
    }
    s
}
