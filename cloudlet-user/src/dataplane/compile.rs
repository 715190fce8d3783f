//! Compiles a validated policy (plus the GeoIP database) into the XDP program's tables.
//!
//! Every address is given an *address class*: the zones it belongs to (longest prefix wins,
//! explicit prefixes win ties over countries, a country in several zones puts its networks
//! in all of them) and the rule prefix lists that contain it. Each class carries two rule
//! bitmaps, the rules whose source and whose destination criteria it satisfies, so the
//! kernel matches a packet with one lookup per address and an AND, however many rules and
//! prefixes the policy has. Pure: no maps, no syscalls.

use std::{collections::HashMap, net::IpAddr};

use cloudlet_common::{
    AddrClass, PolicyConfig, RULE_WORDS, RuleEntry, V4Chunk,
    v4table::{CHUNK_ENTRIES, L1_CHUNKS, PTR},
};

use crate::{
    geoip::{GeoDb, GeoIpError},
    policy::{Policy, Prefix, ZoneMatch},
};

/// Most prefix lists (a source and a destination list per rule).
const LIST_WORDS: usize = RULE_WORDS * 2;
type ListSet = [u64; LIST_WORDS];

/// Errors from compiling a policy.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// The policy names countries but no database was given.
    #[error("the policy's zones name countries but no GeoIP database was opened")]
    NoGeoIp,
    /// Reading the GeoIP database failed.
    #[error(transparent)]
    GeoIp(#[from] GeoIpError),
    /// More address classes than class ids (never seen in practice).
    #[error("too many address classes ({0})")]
    TooManyClasses(usize),
}

/// A contiguous run of addresses with one class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    pub start: u128,
    pub end: u128,
    pub class: u32,
}

/// An LPM trie entry: prefix bytes (network order), length, class.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LpmEntry<const N: usize> {
    pub addr: [u8; N],
    pub len: u8,
    pub class: u32,
}

/// Sizes, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct CompileStats {
    /// Networks taken from the GeoIP database.
    pub geo_networks: usize,
    pub v4_ranges: usize,
    pub v6_ranges: usize,
    pub v4_prefixes: usize,
    pub v6_prefixes: usize,
    pub v4_chunks: usize,
    pub classes: usize,
}

/// Everything the XDP program needs for one policy.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub config: PolicyConfig,
    pub rules: Vec<RuleEntry>,
    pub rule_names: Vec<String>,
    pub zone_names: Vec<String>,
    /// Class 0 is "no zone, no list": addresses nothing names.
    pub classes: Vec<AddrClass>,
    /// The flat IPv4 table, `L1_CHUNKS` first-level chunks then the rest.
    pub v4_chunks: Vec<V4Chunk>,
    /// IPv4 as LPM entries (for the LPM variant of the program).
    pub v4_prefixes: Vec<LpmEntry<4>>,
    pub v6_prefixes: Vec<LpmEntry<16>>,
    pub v4_ranges: Vec<Range>,
    pub v6_ranges: Vec<Range>,
    pub stats: CompileStats,
}

impl CompiledPolicy {
    /// Names of the zones of class `class` (empty for unknown classes).
    pub fn class_zone_names(&self, class: u32) -> Vec<&str> {
        let zones = self.classes.get(class as usize).map_or(0, |c| c.zones);
        self.zone_names
            .iter()
            .enumerate()
            .filter(|(i, _)| zones >> i & 1 == 1)
            .map(|(_, n)| n.as_str())
            .collect()
    }

    /// Class of `ip` as the kernel will see it (a binary search over the ranges).
    pub fn class_of(&self, ip: IpAddr) -> u32 {
        let (ranges, bits) = match ip {
            IpAddr::V4(a) => (&self.v4_ranges, u128::from(u32::from(a))),
            IpAddr::V6(a) => (&self.v6_ranges, u128::from(a)),
        };
        let i = ranges.partition_point(|r| r.end < bits);
        ranges.get(i).map_or(0, |r| r.class)
    }
}

/// One prefix with what it contributes.
#[derive(Clone, Copy)]
struct Node {
    start: u128,
    end: u128,
    len: u8,
    explicit_zones: u64,
    country_zones: u64,
    /// Index into the list-set table, 0 for none.
    lists: u32,
}

struct Family {
    ipv4: bool,
    nodes: Vec<Node>,
}

impl Family {
    fn push(&mut self, p: Prefix, explicit_zones: u64, country_zones: u64, lists: u32) {
        let (start, end) = p.range();
        self.nodes.push(Node {
            start,
            end,
            len: p.len(),
            explicit_zones,
            country_zones,
            lists,
        });
    }
}

/// Compiles `policy`; `geo` must be given when its zones name countries.
pub fn compile(policy: &Policy, geo: Option<&GeoDb>) -> Result<CompiledPolicy, CompileError> {
    let mut v4 = Family {
        ipv4: true,
        nodes: Vec::new(),
    };
    let mut v6 = Family {
        ipv4: false,
        nodes: Vec::new(),
    };
    // List sets: index 0 is the empty set.
    let mut list_sets: Vec<ListSet> = vec![[0; LIST_WORDS]];
    let mut stats = CompileStats::default();

    for (z, zone) in policy.zones.iter().enumerate() {
        for p in &zone.prefixes {
            let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
            fam.push(*p, 1 << z, 0, 0);
        }
    }
    for (r, rule) in policy.rules.iter().enumerate() {
        for (list_id, list) in [(2 * r, &rule.src_prefix), (2 * r + 1, &rule.dst_prefix)] {
            let Some(list) = list else { continue };
            let mut set = [0; LIST_WORDS];
            set[list_id / 64] |= 1 << (list_id % 64);
            list_sets.push(set);
            let idx = (list_sets.len() - 1) as u32;
            for p in list {
                let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(*p, 0, 0, idx);
            }
        }
    }
    if policy.uses_countries() {
        let geo = geo.ok_or(CompileError::NoGeoIp)?;
        let mut country_zones: HashMap<&str, u64> = HashMap::new();
        for (z, zone) in policy.zones.iter().enumerate() {
            for c in &zone.countries {
                *country_zones.entry(c.as_str()).or_default() |= 1 << z;
            }
        }
        geo.for_each_network(
            |code| country_zones.get(code).copied(),
            |prefix, zones| {
                stats.geo_networks += 1;
                let fam = if prefix.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(prefix, 0, zones, 0);
            },
        )?;
    }

    let mut interner = ClassInterner::default();
    let v4_ranges = sweep(&mut v4, &mut list_sets, &mut interner);
    let v6_ranges = sweep(&mut v6, &mut list_sets, &mut interner);
    if interner.classes.len() >= PTR as usize {
        return Err(CompileError::TooManyClasses(interner.classes.len()));
    }

    let classes = interner
        .classes
        .iter()
        .map(|(zones, lists)| class_entry(policy, *zones, lists))
        .collect::<Vec<_>>();
    let v4_chunks = flat_v4_table(&v4_ranges);
    let v4_prefixes = lpm_entries::<4>(&v4_ranges, 32);
    let v6_prefixes = lpm_entries::<16>(&v6_ranges, 128);

    stats.v4_ranges = v4_ranges.len();
    stats.v6_ranges = v6_ranges.len();
    stats.v4_prefixes = v4_prefixes.len();
    stats.v6_prefixes = v6_prefixes.len();
    stats.v4_chunks = v4_chunks.len();
    stats.classes = classes.len();

    Ok(CompiledPolicy {
        config: PolicyConfig {
            default_action: policy.default_action.code(),
            malformed_action: policy.malformed_action.code(),
            non_ip_action: policy.non_ip_action.code(),
            rule_count: policy.rules.len() as u32,
        },
        rules: policy
            .rules
            .iter()
            .map(|r| RuleEntry {
                action: r.action.code(),
                arg: 0,
            })
            .collect(),
        rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
        zone_names: policy.zones.iter().map(|z| z.name.clone()).collect(),
        classes,
        v4_chunks,
        v4_prefixes,
        v6_prefixes,
        v4_ranges,
        v6_ranges,
        stats,
    })
}

#[derive(Default)]
struct ClassInterner {
    ids: HashMap<(u64, ListSet), u32>,
    classes: Vec<(u64, ListSet)>,
}

impl ClassInterner {
    fn id(&mut self, zones: u64, lists: ListSet) -> u32 {
        if self.classes.is_empty() {
            self.classes.push((0, [0; LIST_WORDS]));
            self.ids.insert((0, [0; LIST_WORDS]), 0);
        }
        *self.ids.entry((zones, lists)).or_insert_with(|| {
            self.classes.push((zones, lists));
            (self.classes.len() - 1) as u32
        })
    }
}

fn class_entry(policy: &Policy, zones: u64, lists: &ListSet) -> AddrClass {
    let zone_ok = |m: Option<ZoneMatch>| {
        m.is_none_or(|m| (zones >> m.zone & 1 == 1) != m.negate)
    };
    let in_list = |id: usize| lists[id / 64] >> (id % 64) & 1 == 1;
    let mut c = AddrClass {
        zones,
        ..AddrClass::default()
    };
    for (r, rule) in policy.rules.iter().enumerate() {
        if zone_ok(rule.src_zone) && (rule.src_prefix.is_none() || in_list(2 * r)) {
            c.src_rules[r / 64] |= 1 << (r % 64);
        }
        if zone_ok(rule.dst_zone) && (rule.dst_prefix.is_none() || in_list(2 * r + 1)) {
            c.dst_rules[r / 64] |= 1 << (r % 64);
        }
    }
    c
}

fn union(a: &ListSet, b: &ListSet) -> ListSet {
    std::array::from_fn(|i| a[i] | b[i])
}

/// Turns the family's (nested or disjoint) prefixes into contiguous ranges covering the
/// whole address space, each with its class, adjacent equal classes merged.
fn sweep(fam: &mut Family, list_sets: &mut Vec<ListSet>, interner: &mut ClassInterner) -> Vec<Range> {
    let max: u128 = if fam.ipv4 { u128::from(u32::MAX) } else { u128::MAX };
    let nodes = &mut fam.nodes;
    // Parents sort before their children: same start, shorter first.
    nodes.sort_unstable_by_key(|n| (n.start, n.len));
    // Merge duplicates of one prefix.
    let mut merged: Vec<Node> = Vec::with_capacity(nodes.len());
    for n in nodes.drain(..) {
        match merged.last_mut() {
            Some(m) if m.start == n.start && m.len == n.len => {
                m.explicit_zones |= n.explicit_zones;
                m.country_zones |= n.country_zones;
                if n.lists != 0 {
                    m.lists = if m.lists == 0 {
                        n.lists
                    } else {
                        let u = union(&list_sets[m.lists as usize], &list_sets[n.lists as usize]);
                        list_sets.push(u);
                        (list_sets.len() - 1) as u32
                    };
                }
            }
            _ => merged.push(n),
        }
    }

    struct Open {
        end: u128,
        class: u32,
        zones: u64,
        lists: ListSet,
    }
    let mut out: Vec<Range> = Vec::new();
    let mut emit = |start: u128, end: u128, class: u32| match out.last_mut() {
        Some(last) if last.class == class && last.end.checked_add(1) == Some(start) => last.end = end,
        _ => out.push(Range { start, end, class }),
    };
    // Next address not yet emitted; None once the whole space is done.
    let mut cursor: Option<u128> = Some(0);
    let mut stack: Vec<Open> = Vec::new();
    for n in &merged {
        while let Some(top) = stack.last() {
            if top.end >= n.start {
                break;
            }
            if let Some(c) = cursor {
                if c <= top.end {
                    emit(c, top.end, top.class);
                }
            }
            cursor = top.end.checked_add(1);
            stack.pop();
        }
        let (parent_class, parent_zones, parent_lists) = stack
            .last()
            .map_or((0, 0, [0; LIST_WORDS]), |t| (t.class, t.zones, t.lists));
        if let Some(c) = cursor {
            if c < n.start {
                emit(c, n.start - 1, parent_class);
            }
        }
        cursor = Some(n.start);
        let zones = if n.explicit_zones != 0 {
            n.explicit_zones
        } else if n.country_zones != 0 {
            n.country_zones
        } else {
            parent_zones
        };
        let lists = union(&parent_lists, &list_sets[n.lists as usize]);
        stack.push(Open {
            end: n.end,
            class: interner.id(zones, lists),
            zones,
            lists,
        });
    }
    while let Some(top) = stack.pop() {
        if let Some(c) = cursor {
            if c <= top.end {
                emit(c, top.end, top.class);
            }
        }
        cursor = top.end.checked_add(1);
    }
    if let Some(c) = cursor {
        if c <= max {
            emit(c, max, 0);
        }
    }
    out
}

/// Builds the 16-8-8 IPv4 table from ranges covering all of IPv4.
fn flat_v4_table(ranges: &[Range]) -> Vec<V4Chunk> {
    let mut chunks: Vec<V4Chunk> = vec![[0; CHUNK_ENTRIES]; L1_CHUNKS as usize];
    let uniform = |start: u128, end: u128| {
        let i = ranges.partition_point(|r| r.end < start);
        ranges.get(i).filter(|r| r.end >= end).map(|r| r.class)
    };
    fn slot(
        chunks: &mut Vec<V4Chunk>,
        uniform: &dyn Fn(u128, u128) -> Option<u32>,
        start: u128,
        slot_bits: u32,
    ) -> u32 {
        if let Some(class) = uniform(start, start + (1u128 << slot_bits) - 1) {
            return class;
        }
        // A single address (slot_bits 0) is always uniform, so slot_bits >= 8 here.
        let child_bits = slot_bits - 8;
        let idx = chunks.len();
        chunks.push([0; CHUNK_ENTRIES]);
        for i in 0..CHUNK_ENTRIES {
            let e = slot(chunks, uniform, start + ((i as u128) << child_bits), child_bits);
            chunks[idx][i] = e;
        }
        PTR | idx as u32
    }
    for top in 0..(L1_CHUNKS as usize * CHUNK_ENTRIES) {
        let e = slot(&mut chunks, &uniform, (top as u128) << 16, 16);
        chunks[top / CHUNK_ENTRIES][top % CHUNK_ENTRIES] = e;
    }
    chunks
}

/// Last address of the block of `2^bits` addresses starting at `start` (aligned).
fn block_end(start: u128, bits: u32) -> u128 {
    if bits >= 128 { u128::MAX } else { start | ((1u128 << bits) - 1) }
}

/// The fewest CIDR prefixes covering each range of a non-zero class.
fn lpm_entries<const N: usize>(ranges: &[Range], width: u32) -> Vec<LpmEntry<N>> {
    let mut out = Vec::new();
    for r in ranges.iter().filter(|r| r.class != 0) {
        let mut start = r.start;
        loop {
            // Largest aligned block at `start` that stays within the range.
            let mut bits = start.trailing_zeros().min(width);
            while block_end(start, bits) > r.end {
                bits -= 1;
            }
            let bytes = start.to_be_bytes();
            let mut addr = [0u8; N];
            addr.copy_from_slice(&bytes[16 - N..]);
            out.push(LpmEntry {
                addr,
                len: (width - bits) as u8,
                class: r.class,
            });
            let end = block_end(start, bits);
            if end >= r.end {
                break;
            }
            start = end + 1;
        }
    }
    out
}

#[cfg(test)]
mod tests;
