//! Compiles a validated policy (plus the GeoIP database) into the XDP program's tables.
//!
//! Every address is given an *address class*: the zones it belongs to (longest prefix wins,
//! explicit prefixes win ties over countries, a country in several zones puts its networks
//! in all of them) and the rule prefix lists that contain it. Each class carries two rule
//! bitmaps, the rules whose source and whose destination criteria it satisfies, so the
//! kernel matches a packet with one lookup per address and an AND, however many rules and
//! prefixes the policy has. Zones live in user space only (for `classify` and counters).
//! Pure: no maps, no syscalls.

use std::{collections::HashMap, hash::Hash, net::IpAddr};

use cloudlet_common::{
    AddrClass, FlatChunk, PolicyConfig, RULE_WORDS, RateLimit, RuleEntry, RuleSet,
    flat::{CHUNK_ENTRIES, L1_CHUNKS, PTR},
};

use crate::{
    geoip::{GeoDb, GeoIpError},
    policy::{MAX_ZONES, Match, Policy, Prefix, Rule, ZoneMatch},
};

/// A set of zones, bit i = zone i.
pub type ZoneSet = [u64; MAX_ZONES / 64];
/// A set of rule prefix lists: list `2r` is rule r's `src_prefix`, `2r + 1` its `dst_prefix`.
type ListSet = [u64; RULE_WORDS * 2];

fn has<const W: usize>(set: &[u64; W], i: usize) -> bool {
    set[i / 64] >> (i % 64) & 1 == 1
}

fn with<const W: usize>(mut set: [u64; W], i: usize) -> [u64; W] {
    set[i / 64] |= 1 << (i % 64);
    set
}

/// Interned sets: equal sets get equal ids, id 0 is the empty set.
struct Sets<const W: usize> {
    ids: HashMap<[u64; W], u32>,
    sets: Vec<[u64; W]>,
    unions: HashMap<(u32, u32), u32>,
}

impl<const W: usize> Sets<W> {
    fn new() -> Self {
        Self {
            ids: HashMap::from([([0; W], 0)]),
            sets: vec![[0; W]],
            unions: HashMap::new(),
        }
    }

    fn id(&mut self, set: [u64; W]) -> u32 {
        intern(&mut self.ids, &mut self.sets, set)
    }

    fn union(&mut self, a: u32, b: u32) -> u32 {
        if a == b || b == 0 {
            return a;
        }
        if a == 0 {
            return b;
        }
        let key = (a.min(b), a.max(b));
        if let Some(id) = self.unions.get(&key) {
            return *id;
        }
        let (x, y) = (self.sets[a as usize], self.sets[b as usize]);
        let id = self.id(std::array::from_fn(|i| x[i] | y[i]));
        self.unions.insert(key, id);
        id
    }
}

fn intern<K: Copy + Eq + Hash>(ids: &mut HashMap<K, u32>, all: &mut Vec<K>, key: K) -> u32 {
    *ids.entry(key).or_insert_with(|| {
        all.push(key);
        (all.len() - 1) as u32
    })
}

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
    pub v6_chunks: usize,
    pub classes: usize,
}

/// Everything the XDP program needs for one policy.
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    pub config: PolicyConfig,
    pub rules: Vec<RuleEntry>,
    pub rule_names: Vec<String>,
    /// Each rule's action as written (`"redirect eth1"`), for counters.
    pub rule_actions: Vec<String>,
    /// Interfaces of `redirect` actions: a rule's argument indexes this list.
    pub redirect_devices: Vec<String>,
    /// CPUs of `cpu` actions.
    pub redirect_cpus: Vec<u32>,
    /// Receive queues of `xsk` actions, ascending: cloudletd opens an AF_XDP socket on each
    /// of them on every interface it attaches to.
    pub xsk_queues: Vec<u32>,
    /// Rate limits of `rate_limit` actions: a rule's argument indexes this list.
    pub rate_limits: Vec<RateLimit>,
    pub zone_names: Vec<String>,
    /// Class 0 is "no zone, no list": addresses nothing names.
    pub classes: Vec<AddrClass>,
    /// The zones of each class (user space only).
    pub class_zones: Vec<ZoneSet>,
    /// Field value to field class (`cloudlet_common::field` layout); empty when no rule
    /// looks at a field other than addresses.
    pub field_class: Vec<u32>,
    /// Field class to the rules its values satisfy.
    pub field_rules: Vec<RuleSet>,
    /// The flat IPv4 table, `L1_CHUNKS` first-level chunks then the rest.
    pub v4_chunks: Vec<FlatChunk>,
    /// The flat IPv6 table.
    pub v6_chunks: Vec<FlatChunk>,
    /// IPv4 as LPM entries (for the LPM variant of the program).
    pub v4_prefixes: Vec<LpmEntry<4>>,
    pub v6_prefixes: Vec<LpmEntry<16>>,
    pub v4_ranges: Vec<Range>,
    pub v6_ranges: Vec<Range>,
    pub stats: CompileStats,
}

impl CompiledPolicy {
    /// Whether class `class` lies in zone `zone`.
    pub fn class_in_zone(&self, class: u32, zone: usize) -> bool {
        self.class_zones
            .get(class as usize)
            .is_some_and(|z| has(z, zone))
    }

    /// Names of the zones of class `class` (empty for unknown classes).
    pub fn class_zone_names(&self, class: u32) -> Vec<&str> {
        self.zone_names
            .iter()
            .enumerate()
            .filter(|(i, _)| self.class_in_zone(class, *i))
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

/// One prefix with what it contributes; zone and list sets by id.
#[derive(Clone, Copy)]
struct Node {
    start: u128,
    end: u128,
    len: u8,
    explicit_zones: u32,
    country_zones: u32,
    lists: u32,
}

/// Prefixes of one address family.
struct Family {
    ipv4: bool,
    nodes: Vec<Node>,
}

impl Family {
    fn push(&mut self, p: Prefix, explicit_zones: u32, country_zones: u32, lists: u32) {
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

/// The interning state shared by both families.
struct Interned {
    zones: Sets<{ MAX_ZONES / 64 }>,
    lists: Sets<{ RULE_WORDS * 2 }>,
    class_ids: HashMap<(u32, u32), u32>,
    /// (zone set id, list set id) of each class; class 0 is (0, 0).
    classes: Vec<(u32, u32)>,
}

impl Interned {
    fn class(&mut self, zones: u32, lists: u32) -> u32 {
        intern(&mut self.class_ids, &mut self.classes, (zones, lists))
    }
}

/// Compiles `policy`; `geo` must be given when its zones name countries.
pub fn compile(policy: &Policy, geo: Option<&GeoDb>) -> Result<CompiledPolicy, CompileError> {
    let t0 = std::time::Instant::now();
    let mut v4 = Family {
        ipv4: true,
        nodes: Vec::new(),
    };
    let mut v6 = Family {
        ipv4: false,
        nodes: Vec::new(),
    };
    let mut it = Interned {
        zones: Sets::new(),
        lists: Sets::new(),
        class_ids: HashMap::from([((0, 0), 0)]),
        classes: vec![(0, 0)],
    };
    let mut stats = CompileStats::default();

    for (z, zone) in policy.zones.iter().enumerate() {
        let id = it.zones.id(with([0; MAX_ZONES / 64], z));
        for p in &zone.prefixes {
            let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
            fam.push(*p, id, 0, 0);
        }
    }
    for (r, rule) in policy.rules.iter().enumerate() {
        for (list, prefixes) in [(2 * r, &rule.src_prefix), (2 * r + 1, &rule.dst_prefix)] {
            let Some(prefixes) = prefixes else { continue };
            let id = it.lists.id(with([0; RULE_WORDS * 2], list));
            for p in prefixes {
                let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(*p, 0, 0, id);
            }
        }
    }
    if policy.uses_countries() {
        let geo = geo.ok_or(CompileError::NoGeoIp)?;
        let mut country_zones: HashMap<&str, ZoneSet> = HashMap::new();
        for (z, zone) in policy.zones.iter().enumerate() {
            for c in &zone.countries {
                let set = country_zones.entry(c.as_str()).or_default();
                *set = with(*set, z);
            }
        }
        let country_ids: HashMap<&str, u32> = country_zones
            .into_iter()
            .map(|(c, set)| (c, it.zones.id(set)))
            .collect();
        geo.for_each_network(
            |code| country_ids.get(code).copied(),
            |prefix, zones| {
                stats.geo_networks += 1;
                let fam = if prefix.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(prefix, 0, zones, 0);
            },
        )?;
    }

    let t_geo = t0.elapsed();
    let v4_ranges = sweep(&mut v4, &mut it);
    let v6_ranges = sweep(&mut v6, &mut it);
    if it.classes.len() >= PTR as usize {
        return Err(CompileError::TooManyClasses(it.classes.len()));
    }

    let classes = it
        .classes
        .iter()
        .map(|&(z, l)| {
            class_entry(
                policy,
                &it.zones.sets[z as usize],
                &it.lists.sets[l as usize],
            )
        })
        .collect::<Vec<_>>();
    let fields = field_tables(policy);
    let class_zones = it
        .classes
        .iter()
        .map(|&(z, _)| it.zones.sets[z as usize])
        .collect();
    let t_sweep = t0.elapsed();
    // The two families' tables are independent: build them side by side.
    let ((v4_chunks, v4_prefixes), (v6_chunks, v6_prefixes)) = std::thread::scope(|s| {
        let v6 = s.spawn(|| {
            (
                flat_table(&v6_ranges, 128),
                lpm_entries::<16>(&v6_ranges, 128),
            )
        });
        let v4 = (flat_table(&v4_ranges, 32), lpm_entries::<4>(&v4_ranges, 32));
        (
            v4,
            v6.join().unwrap_or_else(|e| std::panic::resume_unwind(e)),
        )
    });
    log::debug!(
        "compiled in {:?}: prefixes gathered {t_geo:?}, ranges {t_sweep:?}",
        t0.elapsed()
    );
    stats.v4_ranges = v4_ranges.len();
    stats.v6_ranges = v6_ranges.len();
    stats.v4_prefixes = v4_prefixes.len();
    stats.v6_prefixes = v6_prefixes.len();
    stats.v4_chunks = v4_chunks.len();
    stats.v6_chunks = v6_chunks.len();
    stats.classes = classes.len();

    // Redirect targets by name, in first-use order; a rule's argument is the index.
    let mut redirect_devices: Vec<String> = Vec::new();
    let mut redirect_cpus: Vec<u32> = Vec::new();
    let mut xsk_queues: Vec<u32> = Vec::new();
    let mut rate_limits: Vec<RateLimit> = Vec::new();
    let mut arg = |a: &crate::policy::Action| match a {
        // Each rate_limit action has a bucket (or set of buckets) of its own.
        crate::policy::Action::RateLimit(r) => {
            let interval_ns = 1_000_000_000 / r.pps;
            rate_limits.push(RateLimit {
                interval_ns,
                tolerance_ns: interval_ns * (r.burst - 1),
                per_source: u32::from(r.per_source),
                over_action: if r.over_drop {
                    cloudlet_common::action::DROP
                } else {
                    cloudlet_common::action::PASS
                },
            });
            (rate_limits.len() - 1) as u32
        }
        crate::policy::Action::Redirect(iface) => {
            let i = redirect_devices
                .iter()
                .position(|d| d == iface)
                .unwrap_or_else(|| {
                    redirect_devices.push(iface.clone());
                    redirect_devices.len() - 1
                });
            i as u32
        }
        crate::policy::Action::Cpu(cpu) => {
            if !redirect_cpus.contains(cpu) {
                redirect_cpus.push(*cpu);
            }
            *cpu
        }
        crate::policy::Action::Xsk(queue) => {
            if !xsk_queues.contains(queue) {
                xsk_queues.push(*queue);
            }
            *queue
        }
        _ => 0,
    };
    let default_arg = arg(&policy.default_action);
    let rules = policy
        .rules
        .iter()
        .map(|r| RuleEntry {
            action: r.action.code(),
            arg: arg(&r.action),
        })
        .collect();
    xsk_queues.sort_unstable();

    Ok(CompiledPolicy {
        config: PolicyConfig {
            default_action: policy.default_action.code(),
            malformed_action: policy.malformed_action.code(),
            non_ip_action: policy.non_ip_action.code(),
            rule_count: policy.rules.len() as u32,
            fields_used: fields.used,
            default_arg,
        },
        rules,
        rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
        rule_actions: policy.rules.iter().map(|r| r.action.to_string()).collect(),
        redirect_devices,
        redirect_cpus,
        xsk_queues,
        rate_limits,
        zone_names: policy.zones.iter().map(|z| z.name.clone()).collect(),
        classes,
        class_zones,
        field_class: fields.class,
        field_rules: fields.rules,
        v4_chunks,
        v6_chunks,
        v4_prefixes,
        v6_prefixes,
        v4_ranges,
        v6_ranges,
        stats,
    })
}

/// The field tables of a policy.
struct FieldTables {
    used: u32,
    class: Vec<u32>,
    rules: Vec<RuleSet>,
}

/// For every value of every field some rule looks at, the set of rules that value
/// satisfies, interned into field classes. Ports and VLANs are cut at the rules' range
/// bounds so each segment is computed once.
fn field_tables(policy: &Policy) -> FieldTables {
    use cloudlet_common::field::*;
    let rules = &policy.rules;
    let mut used = 0;
    for r in rules {
        for (present, bit) in [
            (r.proto.is_some(), USED_PROTO),
            (r.src_port.is_some(), USED_SRC_PORT),
            (r.dst_port.is_some(), USED_DST_PORT),
            (r.vlan.is_some(), USED_VLAN),
            (r.tcp_flags.is_some(), USED_TCP_FLAGS),
            (r.ip_version.is_some(), USED_IP_VERSION),
        ] {
            if present {
                used |= bit;
            }
        }
    }
    if used == 0 {
        return FieldTables {
            used,
            class: Vec::new(),
            rules: Vec::new(),
        };
    }
    let mut ids: HashMap<RuleSet, u32> = HashMap::new();
    let mut sets: Vec<RuleSet> = Vec::new();
    let mut class = vec![0u32; ENTRIES as usize];
    let set_of = |accepts: &dyn Fn(&Rule) -> bool| -> RuleSet {
        let mut set = [0u64; RULE_WORDS];
        for (i, r) in rules.iter().enumerate() {
            if accepts(r) {
                set[i / 64] |= 1 << (i % 64);
            }
        }
        set
    };
    let mut put = |index: u32, set: RuleSet| {
        class[index as usize] = intern(&mut ids, &mut sets, set);
    };
    for p in 0..=255u8 {
        put(
            PROTO_BASE + u32::from(p),
            set_of(&|r| r.proto.as_ref().is_none_or(|m| m.accepts(p))),
        );
    }
    for (base, pick) in [
        (
            SRC_PORT_BASE,
            (|r: &Rule| r.src_port.as_ref()) as fn(&Rule) -> Option<&Match<u16>>,
        ),
        (DST_PORT_BASE, |r: &Rule| r.dst_port.as_ref()),
    ] {
        for (lo, hi) in segments(rules.iter().filter_map(pick), 65_535) {
            let set = set_of(&|r| pick(r).is_none_or(|m| m.accepts(lo)));
            for port in lo..=hi {
                put(base + u32::from(port), set);
            }
        }
        // No ports: only rules without a port criterion of this kind.
        put(base + NO_PORT, set_of(&|r| pick(r).is_none()));
    }
    for (lo, hi) in segments(rules.iter().filter_map(|r| r.vlan.as_ref()), 4_095) {
        let set = set_of(&|r| r.vlan.as_ref().is_none_or(|m| m.accepts(lo)));
        for id in lo..=hi {
            put(VLAN_BASE + u32::from(id), set);
        }
    }
    // Untagged: "vlan = N" does not match, "vlan = !N" does.
    put(
        VLAN_BASE + UNTAGGED,
        set_of(&|r| r.vlan.as_ref().is_none_or(|m| m.negate)),
    );
    for f in 0..=255u8 {
        put(
            TCP_FLAGS_BASE + u32::from(f),
            set_of(&|r| r.tcp_flags.is_none_or(|t| t.accepts(f))),
        );
    }
    put(TCP_FLAGS_BASE + NOT_TCP, set_of(&|r| r.tcp_flags.is_none()));
    for (i, v) in [4u8, 6].into_iter().enumerate() {
        put(
            IP_VERSION_BASE + i as u32,
            set_of(&|r| r.ip_version.is_none_or(|x| x == v)),
        );
    }
    FieldTables {
        used,
        class,
        rules: sets,
    }
}

/// Cuts `0..=max` at every bound of the criteria's ranges: within a segment every value is
/// accepted by the same criteria.
fn segments<'a>(criteria: impl Iterator<Item = &'a Match<u16>>, max: u16) -> Vec<(u16, u16)> {
    let mut cuts = vec![0u32, u32::from(max) + 1];
    for m in criteria {
        for r in &m.ranges {
            cuts.push(u32::from(*r.start()));
            cuts.push(u32::from(*r.end()) + 1);
        }
    }
    cuts.sort_unstable();
    cuts.dedup();
    cuts.windows(2)
        .filter(|w| w[0] <= u32::from(max))
        .map(|w| (w[0] as u16, (w[1] - 1).min(u32::from(max)) as u16))
        .collect()
}

/// The rule bitmaps of a class with these zones and prefix lists.
fn class_entry(policy: &Policy, zones: &ZoneSet, lists: &ListSet) -> AddrClass {
    let zone_ok = |m: Option<ZoneMatch>| m.is_none_or(|m| has(zones, m.zone) != m.negate);
    let mut c = AddrClass::default();
    for (r, rule) in policy.rules.iter().enumerate() {
        if zone_ok(rule.src_zone) && (rule.src_prefix.is_none() || has(lists, 2 * r)) {
            c.src_rules[r / 64] |= 1 << (r % 64);
        }
        if zone_ok(rule.dst_zone) && (rule.dst_prefix.is_none() || has(lists, 2 * r + 1)) {
            c.dst_rules[r / 64] |= 1 << (r % 64);
        }
    }
    c
}

/// Turns the family's (nested or disjoint) prefixes into contiguous ranges covering the
/// whole address space, each with its class, adjacent equal classes merged.
fn sweep(fam: &mut Family, it: &mut Interned) -> Vec<Range> {
    let max: u128 = if fam.ipv4 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    let nodes = &mut fam.nodes;
    // CIDR prefixes nest or are disjoint; sorted so, a parent comes before its children.
    nodes.sort_unstable_by_key(|n| (n.start, n.len));
    let mut merged: Vec<Node> = Vec::with_capacity(nodes.len());
    for n in nodes.drain(..) {
        match merged.last_mut() {
            Some(m) if m.start == n.start && m.len == n.len => {
                m.explicit_zones = it.zones.union(m.explicit_zones, n.explicit_zones);
                m.country_zones = it.zones.union(m.country_zones, n.country_zones);
                m.lists = it.lists.union(m.lists, n.lists);
            }
            _ => merged.push(n),
        }
    }

    /// A prefix whose range is still open, with its effective sets.
    struct Open {
        end: u128,
        class: u32,
        zones: u32,
        lists: u32,
    }
    let mut out: Vec<Range> = Vec::new();
    let mut emit = |start: u128, end: u128, class: u32| match out.last_mut() {
        Some(last) if last.class == class && last.end.checked_add(1) == Some(start) => {
            last.end = end
        }
        _ => out.push(Range { start, end, class }),
    };
    // Next address not yet emitted; None once the whole space is done.
    let mut cursor: Option<u128> = Some(0);
    let mut stack: Vec<Open> = Vec::new();
    let close = |top: &Open, cursor: &mut Option<u128>, emit: &mut dyn FnMut(u128, u128, u32)| {
        if let Some(c) = *cursor
            && c <= top.end
        {
            emit(c, top.end, top.class);
        }
        *cursor = top.end.checked_add(1);
    };
    for n in &merged {
        while let Some(top) = stack.last() {
            if top.end >= n.start {
                break;
            }
            close(top, &mut cursor, &mut emit);
            stack.pop();
        }
        let (parent_class, parent_zones, parent_lists) = stack
            .last()
            .map_or((0, 0, 0), |t| (t.class, t.zones, t.lists));
        if let Some(c) = cursor
            && c < n.start
        {
            emit(c, n.start - 1, parent_class);
        }
        cursor = Some(n.start);
        // Longest prefix wins for zones; explicit prefixes win ties over countries.
        let zones = if n.explicit_zones != 0 {
            n.explicit_zones
        } else if n.country_zones != 0 {
            n.country_zones
        } else {
            parent_zones
        };
        // Prefix lists accumulate: an address is in every list that covers it.
        let lists = it.lists.union(parent_lists, n.lists);
        stack.push(Open {
            end: n.end,
            class: it.class(zones, lists),
            zones,
            lists,
        });
    }
    while let Some(top) = stack.pop() {
        close(&top, &mut cursor, &mut emit);
    }
    if let Some(c) = cursor
        && c <= max
    {
        emit(c, max, 0);
    }
    out
}

/// Builds a flat multibit table (16-bit first level, then 8-bit chunks) from ranges
/// covering the whole family of `width` bits. Each slot is given the ranges overlapping it,
/// so the build is linear in the number of ranges and chunks.
fn flat_table(ranges: &[Range], width: u32) -> Vec<FlatChunk> {
    /// The ranges of `ranges` overlapping the block `start ..= end` (`ranges` starts with
    /// the first range overlapping it and covers it contiguously).
    fn overlapping(ranges: &[Range], end: u128) -> usize {
        ranges
            .iter()
            .position(|r| r.end >= end)
            .map_or(ranges.len(), |i| i + 1)
    }
    fn slot(chunks: &mut Vec<FlatChunk>, ranges: &[Range], start: u128, slot_bits: u32) -> u32 {
        if ranges.len() == 1 {
            return ranges[0].class;
        }
        // More than one range in the block: split it. A single address lies in exactly
        // one range, so slot_bits >= 8 here.
        let idx = chunks.len();
        chunks.push([0; CHUNK_ENTRIES]);
        children(
            chunks,
            ranges,
            start,
            slot_bits - 8,
            CHUNK_ENTRIES,
            |chunks, i, e| {
                chunks[idx][i] = e;
            },
        );
        PTR | idx as u32
    }
    /// Fills `count` child slots of `child_bits` each, starting at `start`.
    fn children(
        chunks: &mut Vec<FlatChunk>,
        ranges: &[Range],
        start: u128,
        child_bits: u32,
        count: usize,
        mut set: impl FnMut(&mut Vec<FlatChunk>, usize, u32),
    ) {
        let mut rest = ranges;
        for i in 0..count {
            let cs = start + ((i as u128) << child_bits);
            let ce = block_end(cs, child_bits);
            let skip = rest.iter().position(|r| r.end >= cs).unwrap_or(rest.len());
            rest = &rest[skip..];
            let n = overlapping(rest, ce);
            let e = slot(chunks, &rest[..n], cs, child_bits);
            set(chunks, i, e);
        }
    }
    let mut chunks: Vec<FlatChunk> = vec![[0; CHUNK_ENTRIES]; L1_CHUNKS as usize];
    let l1 = L1_CHUNKS as usize * CHUNK_ENTRIES;
    children(&mut chunks, ranges, 0, width - 16, l1, |chunks, i, e| {
        chunks[i / CHUNK_ENTRIES][i % CHUNK_ENTRIES] = e;
    });
    chunks
}

/// Last address of the block of `2^bits` addresses starting at `start` (aligned).
fn block_end(start: u128, bits: u32) -> u128 {
    if bits >= 128 {
        u128::MAX
    } else {
        start | ((1u128 << bits) - 1)
    }
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
