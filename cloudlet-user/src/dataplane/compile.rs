//! Compiles a validated policy (plus the GeoIP database) into the XDP program's tables.
//!
//! Every address is given an *address class*: the zones it belongs to (longest prefix wins,
//! explicit prefixes win ties over countries, a country in several zones puts its networks
//! in all of them) and the rule prefix lists that contain it. Each class names two rule
//! sets, the rules whose source and whose destination criteria it satisfies; every value of
//! the other fields rules look at (protocol, ports, VLAN, TCP flags, IP version) names the
//! set of rules it satisfies. The kernel ANDs a packet's sets and takes the earliest rule,
//! so the per-packet cost does not scan the rule list. Rules that constrain the same fields
//! share a group of words (see [`Layout`]): a word then holds rules that fail or pass a
//! packet for the same fields, and the summaries point at words that really match. Zones live in user space only (for
//! `classify` and counters). Pure: no maps, no syscalls.
//!
//! A [`Compiler`] keeps what gives classes their meaning (zone sets, prefix lists, the
//! classes themselves) across compilations, so a later policy that differs a little keeps
//! the class ids of the earlier one and can be written into the running program's tables
//! without rebuilding them (see [`patch_table`]).

use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasher as _, Hash},
    net::IpAddr,
    sync::Arc,
};

use cloudlet_common::{
    AddrClass, BANKS, FlatChunk, PolicyConfig, RateLimit, RuleEntry, SUMMARY_WORDS, Summary,
    flat::{CHUNK_ENTRIES, CLASS, HOSTS, L1_CHUNKS, PTR},
};

use crate::{
    geoip::{GeoDb, GeoIpError},
    policy::{MAX_ZONES, Match, Policy, Prefix, Rule, TcpFlags, ZoneMatch},
};

/// A set of zones, bit i = zone i.
pub type ZoneSet = [u64; MAX_ZONES / 64];

fn has<const W: usize>(set: &[u64; W], i: usize) -> bool {
    set[i / 64] >> (i % 64) & 1 == 1
}

fn with<const W: usize>(mut set: [u64; W], i: usize) -> [u64; W] {
    set[i / 64] |= 1 << (i % 64);
    set
}

/// Values that can be merged: zone sets (bitwise or) and sorted lists of ids.
trait Union: Clone + Eq + Hash + Default {
    fn union(&self, other: &Self) -> Self;
}

impl<const W: usize> Union for [u64; W]
where
    [u64; W]: Default,
{
    fn union(&self, other: &Self) -> Self {
        std::array::from_fn(|i| self[i] | other[i])
    }
}

impl Union for Vec<u32> {
    fn union(&self, other: &Self) -> Self {
        let mut v: Vec<u32> = self.iter().chain(other).copied().collect();
        v.sort_unstable();
        v.dedup();
        v
    }
}

/// Interned values: equal values get equal ids, id 0 is the empty value. Ids never change
/// meaning while the interner lives.
#[derive(Clone)]
struct Sets<K: Union> {
    ids: HashMap<K, u32>,
    sets: Vec<K>,
    unions: HashMap<(u32, u32), u32>,
}

impl<K: Union> Sets<K> {
    fn new() -> Self {
        Self {
            ids: HashMap::from([(K::default(), 0)]),
            sets: vec![K::default()],
            unions: HashMap::new(),
        }
    }

    fn id(&mut self, set: K) -> u32 {
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
        let u = self.sets[a as usize].union(&self.sets[b as usize]);
        let id = self.id(u);
        self.unions.insert(key, id);
        id
    }
}

fn intern<K: Clone + Eq + Hash>(ids: &mut HashMap<K, u32>, all: &mut Vec<K>, key: K) -> u32 {
    if let Some(id) = ids.get(&key) {
        return *id;
    }
    all.push(key.clone());
    let id = (all.len() - 1) as u32;
    ids.insert(key, id);
    id
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
    pub v4_hosts: usize,
    pub v6_hosts: usize,
    pub classes: usize,
    /// Distinct rule sets.
    pub rule_sets: usize,
}

/// The rule sets of a policy, interned: set 0 is the empty set. Each set is `words` words
/// (bit r = rule r).
#[derive(Clone, Default)]
pub struct RuleSets {
    pub words: usize,
    /// Set i is `bits[i * words .. (i + 1) * words]`.
    pub bits: Vec<u64>,
    /// Set ids by the hash of their words (which stay in `bits` only).
    ids: hashbrown::HashTable<u32>,
    hasher: hashbrown::DefaultHashBuilder,
}

impl std::fmt::Debug for RuleSets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuleSets")
            .field("words", &self.words)
            .field("sets", &self.len())
            .finish()
    }
}

impl RuleSets {
    fn new(words: usize) -> Self {
        let mut s = Self {
            words,
            ..Self::default()
        };
        s.id(vec![0; words]);
        s
    }

    fn id(&mut self, set: Vec<u64>) -> u32 {
        debug_assert_eq!(set.len(), self.words);
        let Self {
            words,
            bits,
            ids,
            hasher,
        } = self;
        let w = (*words).max(1);
        let of = |id: u32| &bits[id as usize * w..(id as usize + 1) * w];
        let hash = hasher.hash_one(&set[..]);
        if let Some(id) = ids.find(hash, |&id| of(id) == &set[..]) {
            return *id;
        }
        let id = (bits.len() / w) as u32;
        bits.extend_from_slice(&set);
        let of = |id: u32| &bits[id as usize * w..(id as usize + 1) * w];
        ids.insert_unique(hash, id, |&id| hasher.hash_one(of(id)));
        id
    }

    /// Number of sets.
    pub fn len(&self) -> usize {
        self.bits.len() / self.words.max(1)
    }

    /// Whether there are no sets (never: set 0 always exists).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The words of set `id`.
    pub fn get(&self, id: u32) -> &[u64] {
        let w = self.words;
        &self.bits[id as usize * w..(id as usize + 1) * w]
    }

    /// Whether set `id` holds rule `r`.
    pub fn contains(&self, id: u32, r: usize) -> bool {
        self.get(id)[r / 64] >> (r % 64) & 1 == 1
    }

    /// The summary of set `id`: bit w set when word w is not zero.
    pub fn summary(&self, id: u32) -> Summary {
        let mut s = [0u64; SUMMARY_WORDS];
        for (w, word) in self.get(id).iter().enumerate() {
            if *word != 0 {
                s[w / 64] |= 1 << (w % 64);
            }
        }
        s
    }
}

/// Where each rule's bit lies in the rule sets. Rules are grouped by the fields they
/// constrain (source address, destination address, protocol, ports, VLAN, TCP flags, IP
/// version); each group keeps policy order and starts on a word of its own, groups in
/// the order of their first rules. A packet that fails a field fails every rule of a group
/// that constrains it, so whole words drop out of the summaries' AND, where rules of
/// mixed kinds in one word would each pass some field and keep the word a candidate.
/// Policies of one word keep policy order. Groups are merged, smallest first, while their
/// padding would take the rule sets past [`MAX_RULES`](cloudlet_common::MAX_RULES) bits.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    /// Each rule's slot (bit), by position in the policy.
    pub slots: Vec<u32>,
    /// Each rule's first word after its group.
    pub group_end: Vec<u32>,
    /// Words of every rule set.
    pub words: usize,
}

impl Layout {
    fn of(rules: &[Rule]) -> Self {
        let n = rules.len();
        let mut groups: Vec<Vec<usize>> = Vec::new();
        if n <= 64 {
            groups.push((0..n).collect());
        } else {
            let mut by_sig: HashMap<u8, usize> = HashMap::new();
            for (r, rule) in rules.iter().enumerate() {
                let g = *by_sig.entry(signature(rule)).or_insert_with(|| {
                    groups.push(Vec::new());
                    groups.len() - 1
                });
                groups[g].push(r);
            }
            let max_words = cloudlet_common::MAX_RULES / 64;
            while groups.len() > 1
                && groups.iter().map(|g| g.len().div_ceil(64)).sum::<usize>() > max_words
            {
                // Merge the two smallest groups, in policy order.
                let mut by_len: Vec<usize> = (0..groups.len()).collect();
                by_len.sort_by_key(|&g| groups[g].len());
                let (a, b) = (by_len[0].min(by_len[1]), by_len[0].max(by_len[1]));
                let taken = groups.remove(b);
                groups[a].extend(taken);
                groups[a].sort_unstable();
            }
        }
        let mut slots = vec![0u32; n];
        let mut group_end = vec![0u32; n];
        let mut word = 0usize;
        for g in &groups {
            let end = word + g.len().div_ceil(64);
            for (i, &r) in g.iter().enumerate() {
                slots[r] = (word * 64 + i) as u32;
                group_end[r] = end as u32;
            }
            word = end;
        }
        Self {
            slots,
            group_end,
            words: word.max(1),
        }
    }

    /// Sets rule `r`'s bit in `set`.
    fn set(&self, set: &mut [u64], r: usize) {
        let s = self.slots[r] as usize;
        set[s / 64] |= 1 << (s % 64);
    }

    /// Clears rule `r`'s bit in `set`.
    fn clear(&self, set: &mut [u64], r: usize) {
        let s = self.slots[r] as usize;
        set[s / 64] &= !(1 << (s % 64));
    }

    /// A bitmap with the bits of `rules` set.
    fn bits_of(&self, rules: impl Iterator<Item = usize>) -> Vec<u64> {
        let mut set = vec![0u64; self.words];
        for r in rules {
            self.set(&mut set, r);
        }
        set
    }
}

/// Which fields `rule` constrains, one bit each.
fn signature(rule: &Rule) -> u8 {
    [
        rule.src_prefix.is_some() || rule.src_zone.is_some(),
        rule.dst_prefix.is_some() || rule.dst_zone.is_some(),
        rule.proto.is_some(),
        rule.src_port.is_some(),
        rule.dst_port.is_some(),
        rule.vlan.is_some(),
        rule.tcp_flags.is_some(),
        rule.ip_version.is_some(),
    ]
    .into_iter()
    .enumerate()
    .fold(0, |sig, (i, on)| sig | u8::from(on) << i)
}

/// Everything the XDP program needs for one policy, independent of where in the program's
/// maps it goes (see `dataplane::Loaded`).
#[derive(Clone, Debug)]
pub struct CompiledPolicy {
    /// Settings; the bank offsets are filled in when it is written.
    pub config: PolicyConfig,
    /// The `RULES` entries, by slot (`sets.words * 64` of them).
    pub rules: Arc<Vec<RuleEntry>>,
    /// Where each rule's bit lies.
    pub layout: Layout,
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
    /// The rule sets, each `sets.words` words, bits by slot (see [`Layout`]).
    pub sets: Arc<RuleSets>,
    /// Each class's source and destination sets (ids in `sets`). Class 0 is "no zone, no
    /// list": addresses nothing names.
    pub classes: Vec<AddrClass>,
    /// The zones of each class (user space only).
    pub class_zones: Vec<ZoneSet>,
    /// Field value to rule set (`cloudlet_common::field` layout); empty when no rule
    /// looks at a field other than addresses.
    pub field_class: Arc<Vec<u32>>,
    /// The flat IPv4 table as built for bank 0: the first level in elements
    /// `0..L1_CHUNKS`, bank 1's first level (zero) next, then the other chunks.
    pub v4_chunks: Arc<Vec<FlatChunk>>,
    /// The flat IPv6 table, the same layout.
    pub v6_chunks: Arc<Vec<FlatChunk>>,
    /// IPv4 as LPM entries (for the LPM variant of the program).
    pub v4_prefixes: Arc<Vec<LpmEntry<4>>>,
    pub v6_prefixes: Arc<Vec<LpmEntry<16>>>,
    pub v4_ranges: Arc<Vec<Range>>,
    pub v6_ranges: Arc<Vec<Range>>,
    /// The ranges of a single address (hosts), for the hosts tables that the flat tables'
    /// `HOSTS` entries send their lookups to.
    pub v4_hosts: Arc<Vec<Range>>,
    pub v6_hosts: Arc<Vec<Range>>,
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

    /// Number of rules.
    pub fn rule_count(&self) -> usize {
        self.config.rule_count as usize
    }

    /// Whether set `set` holds rule `r` (by position in the policy).
    pub fn set_holds(&self, set: u32, r: usize) -> bool {
        self.sets.contains(set, self.layout.slots[r] as usize)
    }

    /// The first rule whose criteria hold for addresses of classes `src` and `dst` and
    /// fields of these `FIELD_CLASS` indexes (as the kernel decides it: the earliest rule
    /// of any slot all the sets hold).
    pub fn first_rule(&self, src: u32, dst: u32, fields: &[u32]) -> Option<usize> {
        let mut sets = vec![
            self.classes.get(src as usize)?.src_set,
            self.classes.get(dst as usize)?.dst_set,
        ];
        if !self.field_class.is_empty() {
            sets.extend(fields.iter().map(|f| self.field_class[*f as usize]));
        }
        (0..self.rules.len())
            .filter(|s| sets.iter().all(|set| self.sets.contains(*set, *s)))
            .map(|s| self.rules[s].rule)
            .filter(|r| *r != cloudlet_common::NO_RULE)
            .min()
            .map(|r| r as usize)
    }
}

/// One prefix with what it contributes; zone and list sets by id.
#[derive(Clone, Copy, PartialEq, Eq)]
struct Node {
    start: u128,
    end: u128,
    len: u8,
    explicit_zones: u32,
    country_zones: u32,
    lists: u32,
}

impl Node {
    fn new(p: Prefix, explicit_zones: u32, country_zones: u32, lists: u32) -> Self {
        let (start, end) = p.range();
        Self {
            start,
            end,
            len: p.len(),
            explicit_zones,
            country_zones,
            lists,
        }
    }
}

/// What gives classes their meaning, kept across compilations.
#[derive(Clone)]
struct Interned {
    zones: Sets<ZoneSet>,
    /// Sets of prefix lists (ids in `prefix_lists`).
    lists: Sets<Vec<u32>>,
    /// A rule's `src_prefix` or `dst_prefix`, by content.
    prefix_lists: HashMap<Vec<Prefix>, u32>,
    class_ids: HashMap<(u32, u32), u32>,
    /// (zone set id, list set id) of each class; class 0 is (0, 0).
    classes: Vec<(u32, u32)>,
}

impl Interned {
    fn class(&mut self, zones: u32, lists: u32) -> u32 {
        intern(&mut self.class_ids, &mut self.classes, (zones, lists))
    }

    /// The id of a prefix list (its prefixes sorted and deduplicated).
    fn prefix_list(&mut self, prefixes: &[Prefix]) -> u32 {
        let mut key = prefixes.to_vec();
        key.sort_unstable();
        key.dedup();
        let next = self.prefix_lists.len() as u32;
        *self.prefix_lists.entry(key).or_insert(next)
    }
}

/// What GeoIP networks were read for: the database (path, size and modification time)
/// and each zone's countries.
type GeoKey = (
    Option<std::path::PathBuf>,
    Option<(u64, std::time::SystemTime)>,
    Vec<Vec<String>>,
);

/// The GeoIP networks of a policy's countries, sorted, with the key they were read for.
#[derive(Clone)]
struct GeoNodes {
    key: GeoKey,
    v4: Arc<Vec<Node>>,
    v6: Arc<Vec<Node>>,
    networks: usize,
}

/// Compiles policies, keeping class ids stable from one to the next (see the module
/// docs). A fresh compiler for every policy gives the same tables as a long-lived one,
/// only with other class numbers.
#[derive(Clone)]
pub struct Compiler {
    it: Interned,
    geo: Option<GeoNodes>,
    /// Each zone's name, in order: class ids keep their meaning only while these stay.
    zone_names: Option<Vec<String>>,
    /// The policy's own prefixes (sorted) and the ranges they gave, last time: a policy
    /// with the same prefixes (rules and verdicts changed) reuses the ranges.
    last: Option<LastRanges>,
}

#[derive(Clone)]
struct LastRanges {
    v4: Vec<Node>,
    v6: Vec<Node>,
    v4_ranges: Arc<Vec<Range>>,
    v6_ranges: Arc<Vec<Range>>,
    tables: Tables,
}

/// The flat tables, LPM entries and hosts of both families.
type Tables = (
    Arc<Vec<FlatChunk>>,
    Arc<Vec<LpmEntry<4>>>,
    Arc<Vec<FlatChunk>>,
    Arc<Vec<LpmEntry<16>>>,
    (Arc<Vec<Range>>, Arc<Vec<Range>>),
);

/// Builds the tables of a policy's ranges, the two families side by side.
fn tables(v4_ranges: &[Range], v6_ranges: &[Range]) -> Tables {
    std::thread::scope(|s| {
        let v6 = s.spawn(|| {
            (
                Arc::new(flat_table(v6_ranges, 128)),
                Arc::new(lpm_entries::<16>(v6_ranges, 128)),
            )
        });
        let v4 = (
            Arc::new(flat_table(v4_ranges, 32)),
            Arc::new(lpm_entries::<4>(v4_ranges, 32)),
        );
        let v6 = v6.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        (v4.0, v4.1, v6.0, v6.1, (hosts(v4_ranges), hosts(v6_ranges)))
    })
}

/// The ranges of a single address.
fn hosts(ranges: &[Range]) -> Arc<Vec<Range>> {
    Arc::new(
        ranges
            .iter()
            .filter(|r| r.start == r.end)
            .copied()
            .collect(),
    )
}

impl Default for Compiler {
    fn default() -> Self {
        Self {
            it: Interned {
                zones: Sets::new(),
                lists: Sets::new(),
                prefix_lists: HashMap::new(),
                class_ids: HashMap::from([((0, 0), 0)]),
                classes: vec![(0, 0)],
            },
            geo: None,
            zone_names: None,
            last: None,
        }
    }
}

/// Compiles `policy`; `geo` must be given when its zones name countries.
pub fn compile(policy: &Policy, geo: Option<&GeoDb>) -> Result<CompiledPolicy, CompileError> {
    Compiler::default().compile(policy, geo)
}

impl Compiler {
    /// Whether `policy` can be compiled by this compiler keeping the class ids of the
    /// policies compiled before: the same zones in the same order, with the same countries
    /// from the same database (explicit prefixes, rules and verdicts may all differ).
    pub fn keeps_classes(&self, policy: &Policy) -> bool {
        let names: Vec<String> = policy.zones.iter().map(|z| z.name.clone()).collect();
        let same_zones = self.zone_names.as_ref().is_none_or(|n| *n == names);
        let same_geo =
            !policy.uses_countries() || self.geo.as_ref().is_some_and(|g| g.key == geo_key(policy));
        same_zones && same_geo
    }

    /// Compiles `policy`; `geo` must be given when its zones name countries and they are
    /// not the ones read before.
    pub fn compile(
        &mut self,
        policy: &Policy,
        geo: Option<&GeoDb>,
    ) -> Result<CompiledPolicy, CompileError> {
        let t0 = std::time::Instant::now();
        if !self.keeps_classes(policy) {
            *self = Self::default();
        }
        self.zone_names = Some(policy.zones.iter().map(|z| z.name.clone()).collect());
        let mut stats = CompileStats::default();
        let (geo_v4, geo_v6) = if policy.uses_countries() {
            let nodes = self.geo_nodes(policy, geo)?;
            stats.geo_networks = nodes.networks;
            (nodes.v4, nodes.v6)
        } else {
            (Arc::default(), Arc::default())
        };
        let it = &mut self.it;

        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        for (z, zone) in policy.zones.iter().enumerate() {
            let id = it.zones.id(with(ZoneSet::default(), z));
            for p in &zone.prefixes {
                let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(Node::new(*p, id, 0, 0));
            }
        }
        // Each rule's prefix lists, by id; the ids of list sets hold these.
        let mut rule_lists = Vec::with_capacity(policy.rules.len());
        for rule in &policy.rules {
            let mut ids = [None, None];
            for (slot, prefixes) in [&rule.src_prefix, &rule.dst_prefix].into_iter().enumerate() {
                let Some(prefixes) = prefixes else { continue };
                let list = it.prefix_list(prefixes);
                ids[slot] = Some(list);
                let set = it.lists.id(vec![list]);
                for p in prefixes {
                    let fam = if p.is_ipv4() { &mut v4 } else { &mut v6 };
                    fam.push(Node::new(*p, 0, 0, set));
                }
            }
            rule_lists.push(ids);
        }
        let t_geo = t0.elapsed();
        let key = |n: &Node| (n.start, n.len, n.explicit_zones, n.lists);
        v4.sort_unstable_by_key(key);
        v6.sort_unstable_by_key(key);
        let (v4_ranges, v6_ranges, tables) = match &self.last {
            Some(last) if last.v4 == v4 && last.v6 == v6 => (
                last.v4_ranges.clone(),
                last.v6_ranges.clone(),
                last.tables.clone(),
            ),
            _ => {
                let v4_ranges = Arc::new(sweep(true, &geo_v4, v4.clone(), it));
                let v6_ranges = Arc::new(sweep(false, &geo_v6, v6.clone(), it));
                if it.classes.len() > CLASS as usize {
                    return Err(CompileError::TooManyClasses(it.classes.len()));
                }
                let tables = tables(&v4_ranges, &v6_ranges);
                self.last = Some(LastRanges {
                    v4,
                    v6,
                    v4_ranges: v4_ranges.clone(),
                    v6_ranges: v6_ranges.clone(),
                    tables: tables.clone(),
                });
                (v4_ranges, v6_ranges, tables)
            }
        };
        let (v4_chunks, v4_prefixes, v6_chunks, v6_prefixes, (v4_hosts, v6_hosts)) = tables;
        let it = &self.it;
        let t_sweep = t0.elapsed();

        let layout = Layout::of(&policy.rules);
        let words = layout.words;
        let mut sets = RuleSets::new(words);
        let classes = class_sets(policy, it, &rule_lists, &layout, &mut sets);
        let field_class = field_tables(policy, &layout, &mut sets);
        let class_zones = it
            .classes
            .iter()
            .map(|&(z, _)| it.zones.sets[z as usize])
            .collect();
        let t_sets = t0.elapsed();
        log::debug!(
            "compiled in {:?}: prefixes gathered {t_geo:?}, ranges {t_sweep:?}, rule sets {t_sets:?}",
            t0.elapsed()
        );
        stats.v4_ranges = v4_ranges.len();
        stats.v6_ranges = v6_ranges.len();
        stats.v4_prefixes = v4_prefixes.len();
        stats.v6_prefixes = v6_prefixes.len();
        stats.v4_chunks = v4_chunks.len();
        stats.v6_chunks = v6_chunks.len();
        stats.v4_hosts = v4_hosts.len();
        stats.v6_hosts = v6_hosts.len();
        stats.classes = classes.len();
        stats.rule_sets = sets.len();
        let actions = actions(policy, &layout);
        Ok(CompiledPolicy {
            config: PolicyConfig {
                default_action: policy.default_action.code(),
                malformed_action: policy.malformed_action.code(),
                non_ip_action: policy.non_ip_action.code(),
                rule_count: policy.rules.len() as u32,
                fields_used: fields_used(policy),
                default_arg: actions.default_arg,
                rule_words: words as u32,
                ..PolicyConfig::default()
            },
            rules: Arc::new(actions.rules),
            layout,
            rule_names: policy.rules.iter().map(|r| r.name.clone()).collect(),
            rule_actions: policy.rules.iter().map(|r| r.action.to_string()).collect(),
            redirect_devices: actions.redirect_devices,
            redirect_cpus: actions.redirect_cpus,
            xsk_queues: actions.xsk_queues,
            rate_limits: actions.rate_limits,
            zone_names: policy.zones.iter().map(|z| z.name.clone()).collect(),
            sets: Arc::new(sets),
            classes,
            class_zones,
            field_class: Arc::new(field_class),
            v4_chunks,
            v6_chunks,
            v4_prefixes,
            v6_prefixes,
            v4_ranges,
            v6_ranges,
            v4_hosts,
            v6_hosts,
            stats,
        })
    }

    /// The sorted GeoIP networks of the policy's countries, read once per database and
    /// set of countries.
    fn geo_nodes(
        &mut self,
        policy: &Policy,
        geo: Option<&GeoDb>,
    ) -> Result<GeoNodes, CompileError> {
        let key = geo_key(policy);
        if let Some(g) = &self.geo
            && g.key == key
        {
            return Ok(g.clone());
        }
        let geo = geo.ok_or(CompileError::NoGeoIp)?;
        let it = &mut self.it;
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
        let (mut v4, mut v6) = (Vec::new(), Vec::new());
        let mut networks = 0;
        geo.for_each_network(
            |code| country_ids.get(code).copied(),
            |prefix, zones| {
                networks += 1;
                let fam = if prefix.is_ipv4() { &mut v4 } else { &mut v6 };
                fam.push(Node::new(prefix, 0, zones, 0));
            },
        )?;
        v4.sort_unstable_by_key(|n: &Node| (n.start, n.len));
        v6.sort_unstable_by_key(|n: &Node| (n.start, n.len));
        let nodes = GeoNodes {
            key,
            v4: Arc::new(v4),
            v6: Arc::new(v6),
            networks,
        };
        self.geo = Some(nodes.clone());
        Ok(nodes)
    }
}

fn geo_key(policy: &Policy) -> GeoKey {
    let file = policy
        .geoip_database
        .as_ref()
        .and_then(|p| std::fs::metadata(p).ok())
        .and_then(|m| Some((m.len(), m.modified().ok()?)));
    (
        policy.geoip_database.clone(),
        file,
        policy.zones.iter().map(|z| z.countries.clone()).collect(),
    )
}

/// Rule actions with their arguments resolved.
struct Actions {
    rules: Vec<RuleEntry>,
    default_arg: u32,
    redirect_devices: Vec<String>,
    redirect_cpus: Vec<u32>,
    xsk_queues: Vec<u32>,
    rate_limits: Vec<RateLimit>,
}

fn actions(policy: &Policy, layout: &Layout) -> Actions {
    use crate::policy::Action;
    // Redirect targets by name, in first-use order; a rule's argument is the index.
    let mut redirect_devices: Vec<String> = Vec::new();
    let mut redirect_cpus: Vec<u32> = Vec::new();
    let mut xsk_queues: Vec<u32> = Vec::new();
    let mut rate_limits: Vec<RateLimit> = Vec::new();
    let mut arg = |a: &Action| match a {
        // Each rate_limit action has a bucket (or set of buckets) of its own.
        Action::RateLimit(r) => {
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
        Action::Redirect(iface) => {
            let i = redirect_devices
                .iter()
                .position(|d| d == iface)
                .unwrap_or_else(|| {
                    redirect_devices.push(iface.clone());
                    redirect_devices.len() - 1
                });
            i as u32
        }
        Action::Cpu(cpu) => {
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
    let mut rules = vec![
        RuleEntry {
            rule: cloudlet_common::NO_RULE,
            ..RuleEntry::default()
        };
        layout.words * 64
    ];
    for (r, rule) in policy.rules.iter().enumerate() {
        rules[layout.slots[r] as usize] = RuleEntry {
            action: rule.action.code(),
            arg: arg(&rule.action),
            rule: r as u32,
            group_end: layout.group_end[r],
        };
    }
    xsk_queues.sort_unstable();
    Actions {
        rules,
        default_arg,
        redirect_devices,
        redirect_cpus,
        xsk_queues,
        rate_limits,
    }
}

/// Each class's source and destination rule sets. A rule holds for a class's addresses
/// when its zone criterion holds for the class's zones and, if it has a prefix list, the
/// class lies in that list. Rules without a prefix list depend on the zones only, so
/// they are computed once per zone set.
fn class_sets(
    policy: &Policy,
    it: &Interned,
    rule_lists: &[[Option<u32>; 2]],
    layout: &Layout,
    sets: &mut RuleSets,
) -> Vec<AddrClass> {
    let zone_ok =
        |m: Option<ZoneMatch>, zones: &ZoneSet| m.is_none_or(|m| has(zones, m.zone) != m.negate);
    // Rules of each prefix list, per side.
    let mut by_list: [HashMap<u32, Vec<usize>>; 2] = [HashMap::new(), HashMap::new()];
    for (r, lists) in rule_lists.iter().enumerate() {
        for side in 0..2 {
            if let Some(l) = lists[side] {
                by_list[side].entry(l).or_default().push(r);
            }
        }
    }
    let zone_of = |r: &Rule, side: usize| if side == 0 { r.src_zone } else { r.dst_zone };
    // Rules without a prefix list: those without a zone criterion hold for every class;
    // the others depend on the class's zones.
    let no_list = |side: usize| {
        policy
            .rules
            .iter()
            .enumerate()
            .filter(move |(r, _)| rule_lists[*r][side].is_none())
    };
    let any_zone: [Vec<u64>; 2] = std::array::from_fn(|side| {
        layout.bits_of(
            no_list(side)
                .filter(|(_, rule)| zone_of(rule, side).is_none())
                .map(|(r, _)| r),
        )
    });
    let by_zone: [Vec<(usize, ZoneMatch)>; 2] = std::array::from_fn(|side| {
        no_list(side)
            .filter_map(|(r, rule)| Some((r, zone_of(rule, side)?)))
            .collect()
    });
    let mut zone_base: [HashMap<u32, Vec<u64>>; 2] = [HashMap::new(), HashMap::new()];
    let mut out = Vec::with_capacity(it.classes.len());
    for &(z, l) in &it.classes {
        let zones = &it.zones.sets[z as usize];
        let pair: [Vec<u64>; 2] = std::array::from_fn(|side| {
            let mut set = zone_base[side]
                .entry(z)
                .or_insert_with(|| {
                    let mut set = any_zone[side].clone();
                    for (r, m) in &by_zone[side] {
                        if zone_ok(Some(*m), zones) {
                            layout.set(&mut set, *r);
                        }
                    }
                    set
                })
                .clone();
            for list in &it.lists.sets[l as usize] {
                for &r in by_list[side].get(list).into_iter().flatten() {
                    if zone_ok(zone_of(&policy.rules[r], side), zones) {
                        layout.set(&mut set, r);
                    }
                }
            }
            set
        });
        let [src, dst] = pair;
        let class = AddrClass {
            src_set: sets.id(src),
            dst_set: sets.id(dst),
        };
        out.push(class);
    }
    out
}

/// Which fields other than addresses some rule looks at (`field::USED_*` bits).
fn fields_used(policy: &Policy) -> u32 {
    use cloudlet_common::field::*;
    let mut used = 0;
    for r in &policy.rules {
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
    used
}

/// For every value of every field some rule looks at, the set of rules that value
/// satisfies. Rules without a criterion on a field hold for all its values; ports and
/// VLANs are swept from one range bound to the next, so the work follows the rules, not
/// the 65,536 values.
fn field_tables(policy: &Policy, layout: &Layout, sets: &mut RuleSets) -> Vec<u32> {
    use cloudlet_common::field::*;
    if fields_used(policy) == 0 {
        return Vec::new();
    }
    let rules = &policy.rules;
    let mut class = vec![0u32; ENTRIES as usize];
    // Rules without the criterion, plus those of `with` that accept.
    let of = |without: &dyn Fn(&Rule) -> bool, accepts: &dyn Fn(&Rule) -> bool| {
        layout.bits_of(
            rules
                .iter()
                .enumerate()
                .filter(|(_, r)| without(r) || accepts(r))
                .map(|(i, _)| i),
        )
    };
    // Rules without the criterion, then each value's own.
    let without_proto = of(&|r| r.proto.is_none(), &|_| false);
    let with_proto: Vec<(usize, &Match<u8>)> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.proto.as_ref()?)))
        .collect();
    for p in 0..=255u8 {
        let mut set = without_proto.clone();
        for (r, m) in &with_proto {
            if m.accepts(p) {
                layout.set(&mut set, *r);
            }
        }
        class[(PROTO_BASE + u32::from(p)) as usize] = sets.id(set);
    }
    type Pick = fn(&Rule) -> Option<&Match<u16>>;
    let ports: [(u32, u32, Pick); 3] = [
        (SRC_PORT_BASE, 65_535, |r| r.src_port.as_ref()),
        (DST_PORT_BASE, 65_535, |r| r.dst_port.as_ref()),
        (VLAN_BASE, 4_095, |r| r.vlan.as_ref()),
    ];
    for (base, max, pick) in ports {
        for (lo, hi, set) in sweep_ranges(rules, pick, max, layout) {
            let id = sets.id(set);
            class[(base + lo) as usize..=(base + hi) as usize].fill(id);
        }
    }
    // No ports: only rules without a port criterion of this kind.
    for (base, pick) in [(SRC_PORT_BASE, ports[0].2), (DST_PORT_BASE, ports[1].2)] {
        let set = of(&|r| pick(r).is_none(), &|_| false);
        class[(base + NO_PORT) as usize] = sets.id(set);
    }
    // Untagged: "vlan = N" does not match, "vlan = !N" does.
    let set = of(&|r| r.vlan.is_none(), &|r| {
        r.vlan.as_ref().is_some_and(|m| m.negate)
    });
    class[(VLAN_BASE + UNTAGGED) as usize] = sets.id(set);
    let without_flags = of(&|r| r.tcp_flags.is_none(), &|_| false);
    let with_flags: Vec<(usize, TcpFlags)> = rules
        .iter()
        .enumerate()
        .filter_map(|(i, r)| Some((i, r.tcp_flags?)))
        .collect();
    for f in 0..=255u8 {
        let mut set = without_flags.clone();
        for (r, t) in &with_flags {
            if t.accepts(f) {
                layout.set(&mut set, *r);
            }
        }
        class[(TCP_FLAGS_BASE + u32::from(f)) as usize] = sets.id(set);
    }
    class[(TCP_FLAGS_BASE + NOT_TCP) as usize] = sets.id(without_flags);
    for (i, v) in [4u8, 6].into_iter().enumerate() {
        let set = of(&|r| r.ip_version.is_none(), &|r| r.ip_version == Some(v));
        class[(IP_VERSION_BASE + i as u32) as usize] = sets.id(set);
    }
    class
}

/// Cuts `0..=max` at every bound of the rules' ranges on one field and gives each segment
/// the rules it satisfies, keeping the set up to date from one bound to the next.
fn sweep_ranges(
    rules: &[Rule],
    pick: fn(&Rule) -> Option<&Match<u16>>,
    max: u32,
    layout: &Layout,
) -> Vec<(u32, u32, Vec<u64>)> {
    // (value, rule, +1 entering a range / -1 leaving it)
    let mut events: Vec<(u32, usize, i32)> = Vec::new();
    let mut set = vec![0u64; layout.words];
    let mut negate = vec![false; rules.len()];
    for (r, rule) in rules.iter().enumerate() {
        match pick(rule) {
            None => layout.set(&mut set, r),
            Some(m) => {
                negate[r] = m.negate;
                if m.negate {
                    layout.set(&mut set, r);
                }
                for range in &m.ranges {
                    events.push((u32::from(*range.start()), r, 1));
                    events.push((u32::from(*range.end()) + 1, r, -1));
                }
            }
        }
    }
    events.sort_unstable();
    let mut cover = vec![0i32; rules.len()];
    let mut out = Vec::new();
    let mut lo = 0u32;
    let mut e = 0;
    while lo <= max {
        while e < events.len() && events[e].0 == lo {
            let (_, r, d) = events[e];
            cover[r] += d;
            let on = (cover[r] > 0) != negate[r];
            if on {
                layout.set(&mut set, r);
            } else {
                layout.clear(&mut set, r);
            }
            e += 1;
        }
        let next = events.get(e).map_or(max + 1, |ev| ev.0.min(max + 1));
        out.push((lo, next - 1, set.clone()));
        lo = next;
    }
    out
}

/// Turns a family's (nested or disjoint) prefixes, the GeoIP ones (sorted) and the
/// policy's own, into contiguous ranges covering the whole address space, each with its
/// class, adjacent equal classes merged.
fn sweep(ipv4: bool, geo: &[Node], mut own: Vec<Node>, it: &mut Interned) -> Vec<Range> {
    let max: u128 = if ipv4 {
        u128::from(u32::MAX)
    } else {
        u128::MAX
    };
    // CIDR prefixes nest or are disjoint; sorted so, a parent comes before its children.
    let key = |n: &Node| (n.start, n.len);
    own.sort_unstable_by_key(key);
    let mut merged: Vec<Node> = Vec::with_capacity(geo.len() + own.len());
    let (mut g, mut o) = (geo.iter().peekable(), own.into_iter().peekable());
    loop {
        let n = match (g.peek(), o.peek()) {
            (Some(a), Some(b)) if key(a) <= key(b) => *g.next().expect("peeked"),
            (_, Some(_)) => o.next().expect("peeked"),
            (Some(_), None) => *g.next().expect("peeked"),
            (None, None) => break,
        };
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
/// covering the whole family of `width` bits, for bank 0: its first level in elements
/// `0..L1_CHUNKS`, bank 1's (zero) after it, then the chunks below. Each slot is given the
/// ranges overlapping it, so the build is linear in the number of ranges and chunks.
fn flat_table(ranges: &[Range], width: u32) -> Vec<FlatChunk> {
    let mut chunks: Vec<FlatChunk> = vec![[0; CHUNK_ENTRIES]; (L1_CHUNKS * BANKS) as usize];
    let l1 = L1_CHUNKS as usize * CHUNK_ENTRIES;
    children(&mut chunks, ranges, 0, width - 16, l1, |chunks, i, e| {
        chunks[i / CHUNK_ENTRIES][i % CHUNK_ENTRIES] = e;
    });
    chunks
}

/// The ranges of `ranges` overlapping the block `start ..= end` (`ranges` starts with
/// the first range overlapping it and covers it contiguously).
fn overlapping(ranges: &[Range], end: u128) -> usize {
    ranges
        .iter()
        .position(|r| r.end >= end)
        .map_or(ranges.len(), |i| i + 1)
}

/// The entry for a block of `2^slot_bits` addresses at `start` covered by `ranges`: a
/// class, or a pointer to chunks appended to `chunks`.
fn slot(chunks: &mut Vec<FlatChunk>, ranges: &[Range], start: u128, slot_bits: u32) -> u32 {
    if ranges.len() == 1 {
        return ranges[0].class;
    }
    // A block of one class but for single addresses (blocklisted hosts, say): the class,
    // marked for a lookup in the hosts table, instead of one chunk per address byte down to
    // each host, which would cost a read per byte and scatter the table. Blocks that would
    // take one chunk more are split as usual: a chunk read is cheaper than a probe.
    if slot_bits >= 16
        && let Some(class) = background(ranges)
    {
        return HOSTS | class;
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

/// The class of the ranges of more than one address in `ranges`, if there are any and they
/// all have the same.
fn background(ranges: &[Range]) -> Option<u32> {
    let mut wide = ranges.iter().filter(|r| r.start != r.end);
    let class = wide.next()?.class;
    wide.all(|r| r.class == class).then_some(class)
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

/// A flat table as the program's map holds it, with the elements not in use.
#[derive(Clone, Debug)]
pub struct FlatTable {
    /// The map's elements (a copy of what the kernel holds); those past the end are zero.
    /// Shared with the compiled policy until the first patch.
    pub chunks: Arc<Vec<FlatChunk>>,
    /// Elements of the map.
    capacity: usize,
    /// Elements free for new chunks.
    pub free: Vec<u32>,
}

impl FlatTable {
    /// The table of a freshly filled map of `capacity` elements holding `chunks`.
    pub fn new(chunks: Arc<Vec<FlatChunk>>, capacity: usize) -> Self {
        let used = chunks.len();
        let capacity = capacity.max(used);
        let free = (used as u32..capacity as u32).rev().collect();
        Self {
            chunks,
            capacity,
            free,
        }
    }

    /// The elements, writable: the copy is made (and grown to the map's size) here.
    fn chunks_mut(&mut self) -> &mut Vec<FlatChunk> {
        let chunks = Arc::make_mut(&mut self.chunks);
        chunks.resize(self.capacity, [0; CHUNK_ENTRIES]);
        chunks
    }

    /// The first-level entry `slot` of the bank rooted at `root`.
    fn l1(&self, root: u32, slot: usize) -> u32 {
        self.chunks[root as usize + slot / CHUNK_ENTRIES][slot % CHUNK_ENTRIES]
    }

    /// The chunks under entry `e`.
    fn subtree(&self, e: u32, out: &mut Vec<u32>) {
        if e & PTR != 0 {
            let idx = e & !PTR;
            out.push(idx);
            for child in self.chunks[idx as usize] {
                self.subtree(child, out);
            }
        }
    }
}

/// What to write into a flat table's map to move it from one policy's ranges to
/// another's, in the inactive bank.
#[derive(Debug, Default)]
pub struct TablePatch {
    /// Elements to write (new chunks first, then the new bank's first level).
    pub writes: Vec<(u32, FlatChunk)>,
    /// Elements only the old bank reaches: free once no packet can still be walking it.
    pub garbage: Vec<u32>,
    /// What the written elements held, and the elements taken from the free list: enough
    /// to take the patch back ([`FlatTable::undo`]).
    undo: Vec<(u32, FlatChunk)>,
    taken: Vec<u32>,
}

impl FlatTable {
    /// Takes back `patch` (its writes must not have reached the map, or must be
    /// overwritten too).
    pub fn undo(&mut self, patch: TablePatch) {
        let chunks = self.chunks_mut();
        for (idx, chunk) in patch.undo.into_iter().rev() {
            chunks[idx as usize] = chunk;
        }
        self.free.extend(patch.taken.into_iter().rev());
    }
}

/// Builds, into the free elements of `table`, the parts of the tree that differ between
/// `old` and `new` ranges (whole first-level slots: a /16 of IPv4, a /16 of IPv6), and a
/// first level for the bank at `to_root` that shares every unchanged slot with the bank at
/// `from_root`. Nothing the bank at `from_root` reaches is written. `None` when the free
/// elements do not suffice; `table` is then unchanged.
pub fn patch_table(
    table: &mut FlatTable,
    old: &[Range],
    new: &[Range],
    width: u32,
    from_root: u32,
    to_root: u32,
) -> Option<TablePatch> {
    let shift = width - 16;
    let max = block_end(0, width);
    // First-level slots whose addresses change class.
    let mut changed = BTreeSet::new();
    let (mut i, mut j, mut pos) = (0, 0, 0u128);
    // The same ranges (the compiler reuses them when the prefixes did not change).
    let same = std::ptr::eq(old, new);
    while !same && i < old.len() && j < new.len() {
        let (a, b) = (&old[i], &new[j]);
        let end = a.end.min(b.end);
        if a.class != b.class {
            changed.extend((pos >> shift) as usize..=(end >> shift) as usize);
        }
        if end == max {
            break;
        }
        pos = end + 1;
        if a.end == end {
            i += 1;
        }
        if b.end == end {
            j += 1;
        }
    }
    let mut l1: Vec<u32> = (0..L1_CHUNKS as usize * CHUNK_ENTRIES)
        .map(|s| table.l1(from_root, s))
        .collect();
    let mut built: Vec<FlatChunk> = Vec::new();
    let mut roots = Vec::with_capacity(changed.len());
    let mut garbage = Vec::new();
    for &s in &changed {
        let start = (s as u128) << shift;
        let end = block_end(start, shift);
        let first = new.partition_point(|r| r.end < start);
        let n = overlapping(&new[first..], end);
        let base = built.len();
        // Build with indexes relative to `built`; relocated below.
        let mut local = Vec::new();
        let e = slot(&mut local, &new[first..first + n], start, shift);
        built.extend(local);
        roots.push((s, e, base));
        table.subtree(l1[s], &mut garbage);
    }
    if built.len() > table.free.len() {
        return None;
    }
    let at: Vec<u32> = (0..built.len())
        .map(|_| table.free.pop().expect("checked"))
        .collect();
    let mut writes = Vec::with_capacity(built.len() + L1_CHUNKS as usize);
    // Relocate: a pointer to local chunk k of the slot whose chunks start at `base`.
    let mut next_root = roots.iter().peekable();
    let mut base = 0;
    for (k, chunk) in built.iter().enumerate() {
        while let Some(&&(_, _, b)) = next_root.peek() {
            if b > k {
                break;
            }
            base = b;
            next_root.next();
        }
        let moved = chunk.map(|e| {
            if e & PTR != 0 {
                PTR | at[base + (e & !PTR) as usize]
            } else {
                e
            }
        });
        writes.push((at[k], moved));
    }
    for &(s, e, base) in &roots {
        l1[s] = if e & PTR != 0 {
            PTR | at[base + (e & !PTR) as usize]
        } else {
            e
        };
    }
    for c in 0..L1_CHUNKS as usize {
        let chunk: FlatChunk = std::array::from_fn(|k| l1[c * CHUNK_ENTRIES + k]);
        writes.push((to_root + c as u32, chunk));
    }
    let chunks = table.chunks_mut();
    writes.retain(|(idx, chunk)| chunks[*idx as usize] != *chunk);
    let mut undo = Vec::with_capacity(writes.len());
    for (idx, chunk) in &writes {
        undo.push((*idx, chunks[*idx as usize]));
        chunks[*idx as usize] = *chunk;
    }
    Some(TablePatch {
        writes,
        garbage,
        undo,
        taken: at,
    })
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
