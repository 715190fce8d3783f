//! The program's counters, summed over CPUs and named.

use aya::{Ebpf, maps::PerCpuArray};
use cloudlet_common::{Counter, action, reason, stat};
use serde::{Deserialize, Serialize};

use super::{CompiledPolicy, DataplaneError, compile::ZoneSet, map_err};
use crate::policy::Action;

/// Name of a `reason` code, as printed by `classify` and `stats`.
pub const fn reason_name(r: u32) -> &'static str {
    match r {
        reason::RULE => "rule",
        reason::DEFAULT => "default",
        reason::NON_IP => "non_ip",
        reason::MALFORMED_ETHERNET => "malformed_ethernet",
        reason::MALFORMED_VLAN => "malformed_vlan",
        reason::MALFORMED_IPV4 => "malformed_ipv4",
        reason::MALFORMED_IPV6 => "malformed_ipv6",
        reason::MALFORMED_IPV6_EXT => "malformed_ipv6_ext",
        reason::MALFORMED_IPV6_EXT_CHAIN => "malformed_ipv6_ext_chain",
        reason::MALFORMED_L4 => "malformed_l4",
        _ => "unknown",
    }
}

/// Packets and bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Count {
    pub packets: u64,
    pub bytes: u64,
}

impl Count {
    pub fn add(&mut self, c: Count) {
        self.packets += c.packets;
        self.bytes += c.bytes;
    }
}

/// A named counter.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Named {
    pub name: String,
    #[serde(flatten)]
    pub count: Count,
}

/// Counters of one rule.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleCount {
    pub name: String,
    pub action: String,
    #[serde(flatten)]
    pub count: Count,
}

/// Counters of one zone: packets from it and packets to it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ZoneCount {
    pub name: String,
    pub src: Count,
    pub dst: Count,
}

/// Counters of one of cloudletd's AF_XDP sockets (an interface queue of `xsk` actions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct XskCount {
    pub interface: String,
    pub queue: u32,
    /// Whether the socket is open (false: the policy no longer names its queue).
    pub open: bool,
    /// Frames read from the socket.
    pub received: Count,
    /// Frames sent out of the forward interface.
    pub forwarded: Count,
    /// Frames the forward interface refused.
    pub forward_errors: u64,
    /// Frames the kernel dropped for want of a free buffer or room in the receive ring.
    pub dropped: u64,
}

/// All counters of a running policy.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stats {
    /// Packets by verdict taken ("pass", "drop").
    pub verdicts: Vec<Named>,
    /// Packets by reason ("rule", "default", "non_ip", "malformed_*").
    pub reasons: Vec<Named>,
    /// Packets by rule, in policy order.
    pub rules: Vec<RuleCount>,
    /// Packets by zone; an address in several zones counts in each. `(none)` holds
    /// IP packets whose address is in no zone.
    pub zones: Vec<ZoneCount>,
    /// Packets over a rate limit (given the limit's `over` verdict).
    #[serde(default)]
    pub rate_limited: Count,
    /// Frames of an `xsk` action with no socket on the interface and queue they came in
    /// on (dropped).
    #[serde(default)]
    pub xsk_undelivered: Count,
    /// cloudletd's AF_XDP sockets (counted by cloudletd, not by the program).
    #[serde(default)]
    pub xsk: Vec<XskCount>,
}

impl Stats {
    /// Adds `other`'s counters (matched by name) to these: keeps totals across policy swaps.
    pub fn absorb(&mut self, other: &Stats) {
        fn add_named(into: &mut [Named], from: &[Named]) {
            for f in from {
                if let Some(i) = into.iter_mut().find(|i| i.name == f.name) {
                    i.count.add(f.count);
                }
            }
        }
        self.rate_limited.add(other.rate_limited);
        self.xsk_undelivered.add(other.xsk_undelivered);
        add_named(&mut self.verdicts, &other.verdicts);
        add_named(&mut self.reasons, &other.reasons);
        for f in &other.rules {
            if let Some(i) = self.rules.iter_mut().find(|i| i.name == f.name) {
                i.count.add(f.count);
            }
        }
        for f in &other.zones {
            if let Some(i) = self.zones.iter_mut().find(|i| i.name == f.name) {
                i.src.add(f.src);
                i.dst.add(f.dst);
            }
        }
    }

    /// The counter of verdict `name`.
    pub fn verdict(&self, name: &str) -> Count {
        self.verdicts
            .iter()
            .find(|n| n.name == name)
            .map(|n| n.count)
            .unwrap_or_default()
    }

    /// The counters as aligned tables, as `cloudlet stats` prints them.
    pub fn render_table(&self) -> String {
        let s = self;
        use std::fmt::Write as _;
        let mut o = String::new();
        let _ = writeln!(o, "{:<28} {:>14} {:>16}", "VERDICT", "PACKETS", "BYTES");
        for n in &s.verdicts {
            let _ = writeln!(
                o,
                "{:<28} {:>14} {:>16}",
                n.name, n.count.packets, n.count.bytes
            );
        }
        if s.rate_limited.packets > 0 {
            let _ = writeln!(
                o,
                "{:<28} {:>14} {:>16}",
                "(over a rate limit)", s.rate_limited.packets, s.rate_limited.bytes
            );
        }
        if s.xsk_undelivered.packets > 0 {
            let _ = writeln!(
                o,
                "{:<28} {:>14} {:>16}",
                "(xsk, no socket: dropped)", s.xsk_undelivered.packets, s.xsk_undelivered.bytes
            );
        }
        let _ = writeln!(o, "\n{:<28} {:>14} {:>16}", "REASON", "PACKETS", "BYTES");
        for n in s
            .reasons
            .iter()
            .filter(|n| n.count.packets > 0 || !n.name.starts_with("malformed"))
        {
            let _ = writeln!(
                o,
                "{:<28} {:>14} {:>16}",
                n.name, n.count.packets, n.count.bytes
            );
        }
        let _ = writeln!(
            o,
            "\n{:<28} {:<6} {:>14} {:>16}",
            "RULE", "ACTION", "PACKETS", "BYTES"
        );
        for r in &s.rules {
            let _ = writeln!(
                o,
                "{:<28} {:<6} {:>14} {:>16}",
                r.name, r.action, r.count.packets, r.count.bytes
            );
        }
        let _ = writeln!(
            o,
            "\n{:<28} {:>14} {:>14}",
            "ZONE", "FROM (PKTS)", "TO (PKTS)"
        );
        for z in &s.zones {
            let _ = writeln!(
                o,
                "{:<28} {:>14} {:>14}",
                z.name, z.src.packets, z.dst.packets
            );
        }
        if !s.xsk.is_empty() {
            let _ = writeln!(
                o,
                "\n{:<22} {:>5} {:>14} {:>16} {:>14} {:>10}",
                "XSK SOCKET", "QUEUE", "RECEIVED", "BYTES", "FORWARDED", "DROPPED"
            );
            for x in &s.xsk {
                let name = if x.open {
                    x.interface.clone()
                } else {
                    format!("{} (closed)", x.interface)
                };
                let _ = writeln!(
                    o,
                    "{:<22} {:>5} {:>14} {:>16} {:>14} {:>10}",
                    name,
                    x.queue,
                    x.received.packets,
                    x.received.bytes,
                    x.forwarded.packets,
                    x.dropped
                );
            }
        }
        o
    }
}

/// The per-CPU counters `start..start + count` of the array `name`, each summed over CPUs:
/// in one batch lookup where the kernel has them (5.6+), else one lookup a key.
fn counts(
    ebpf: &Ebpf,
    name: &'static str,
    start: u32,
    count: u32,
) -> Result<Vec<Count>, DataplaneError> {
    if count == 0 {
        return Ok(Vec::new());
    }
    let map = ebpf.map(name).ok_or(DataplaneError::Missing(name))?;
    if let aya::maps::Map::PerCpuArray(data) = map
        && let Some((per_key, values)) = super::lookup_array_batch(data, start, count)
            .map_err(super::batch_call_err(name, "bpf_map_lookup_batch"))?
    {
        // Each key: one counter per possible CPU, each 8-byte aligned.
        let stride = std::mem::size_of::<Counter>().next_multiple_of(8);
        let word =
            |b: &[u8], at: usize| u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        return Ok(values
            .chunks_exact(per_key)
            .map(|key| {
                let mut c = Count::default();
                for cpu in key.chunks_exact(stride) {
                    c.packets += word(cpu, std::mem::offset_of!(Counter, packets));
                    c.bytes += word(cpu, std::mem::offset_of!(Counter, bytes));
                }
                c
            })
            .collect());
    }
    let array: PerCpuArray<_, Counter> = PerCpuArray::try_from(map).map_err(map_err(name))?;
    (start..start + count)
        .map(|index| {
            let values = array.get(&index, 0).map_err(map_err(name))?;
            let mut c = Count::default();
            for v in values.iter() {
                c.packets += v.packets;
                c.bytes += v.bytes;
            }
            Ok(c)
        })
        .collect()
}

/// Reads every counter of a loaded program; the rules' counters from `rule_base` (the
/// bank in force). One batch lookup per counter map where the kernel has them.
pub fn read(
    ebpf: &Ebpf,
    compiled: &CompiledPolicy,
    rule_base: u32,
) -> Result<Stats, DataplaneError> {
    let stats = counts(ebpf, "STATS", 0, stat::COUNT)?;
    let mut out = Stats {
        rate_limited: stats[stat::RATE_LIMITED as usize],
        xsk_undelivered: stats[stat::XSK_UNDELIVERED as usize],
        ..Stats::default()
    };
    // One counter per reason and action taken: summed both ways.
    let mut by_reason = vec![Count::default(); reason::COUNT as usize];
    let mut by_action = vec![Count::default(); action::COUNT as usize];
    for r in 0..reason::COUNT {
        for a in 0..action::COUNT {
            let c = stats[stat::verdict(r, a) as usize];
            by_reason[r as usize].add(c);
            by_action[a as usize].add(c);
        }
    }
    for a in (0..action::COUNT).filter(|a| *a != action::RATE_LIMIT) {
        out.verdicts.push(Named {
            name: Action::code_name(a).to_string(),
            count: by_action[a as usize],
        });
    }
    for r in 0..reason::COUNT {
        out.reasons.push(Named {
            name: reason_name(r).to_string(),
            count: by_reason[r as usize],
        });
    }

    let rule_counts = counts(
        ebpf,
        "RULE_STATS",
        rule_base,
        compiled.rule_names.len() as u32,
    )?;
    for (i, (name, count)) in compiled.rule_names.iter().zip(rule_counts).enumerate() {
        out.rules.push(RuleCount {
            name: name.clone(),
            action: compiled.rule_actions[i].to_string(),
            count,
        });
    }

    let class_counts = counts(ebpf, "CLASS_STATS", 0, 2 * compiled.classes.len() as u32)?;
    let mut zones: Vec<ZoneCount> = compiled
        .zone_names
        .iter()
        .chain(std::iter::once(&"(none)".to_string()))
        .map(|n| ZoneCount {
            name: n.clone(),
            src: Count::default(),
            dst: Count::default(),
        })
        .collect();
    let none = zones.len() - 1;
    for (class, pair) in class_counts.chunks_exact(2).enumerate() {
        let (src, dst) = (pair[0], pair[1]);
        if compiled.class_zones[class] == ZoneSet::default() {
            zones[none].src.add(src);
            zones[none].dst.add(dst);
        }
        for (z, zone) in zones.iter_mut().enumerate().take(none) {
            if compiled.class_in_zone(class as u32, z) {
                zone.src.add(src);
                zone.dst.add(dst);
            }
        }
    }
    out.zones = zones;
    Ok(out)
}
