//! The dataplane: compile a policy into the XDP program's maps, load and attach it,
//! swap policies, run it on test frames, read its counters.

pub mod classify;
pub mod compile;
pub mod events;
mod hosts;
pub mod metrics;
pub mod stats;
pub mod xsk;

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapError, lpm_trie::Key},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLink},
};
use cloudlet_common::{
    AddrClass, BANKS, Counter, FlatChunk, MAX_RULES, PolicyConfig, RuleEntry, SUMMARY_WORDS,
    SetWords, field, flat::L1_CHUNKS,
};

pub use compile::{CompileError, CompiledPolicy, Compiler, compile};
use compile::{FlatTable, Range, RuleSets};

/// Errors from loading, filling, attaching or reading the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The eBPF object failed to load (a map could not be created, the verifier refused).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    /// The interface to attach to does not exist (in this network namespace).
    #[error("no interface named {0}")]
    NoInterface(String),
    /// A `cpu` action names a CPU this machine does not have.
    #[error("cpu {cpu} does not exist (this machine has {count})")]
    NoCpu { cpu: u32, count: usize },
    /// A redirect target could not be entered into its map.
    #[error("redirect target {target}: {source}")]
    Redirect {
        target: String,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// A map or program the object should have is missing.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
    /// The policy cannot be written into the running program's maps (they are too small,
    /// or its redirect targets or rate limits differ): it needs a program of its own.
    #[error("the policy does not fit the running program: {0}")]
    NoRoom(String),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// Which program of the object to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// The policy program (flat address tables).
    Policy,
    /// The policy program with LPM tries instead of flat tables (for comparison).
    PolicyLpm,
    /// Parses, then passes (benchmark baseline).
    ParseOnly,
    /// Returns XDP_PASS (benchmark baseline).
    Noop,
}

impl ProgramKind {
    /// The program's name in the object.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Policy => "cloudlet",
            Self::PolicyLpm => "cloudlet_lpm",
            Self::ParseOnly => "cloudlet_parse",
            Self::Noop => "cloudlet_noop",
        }
    }
}

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode only.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

/// Time spent loading, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LoadTimings {
    /// Creating maps and loading (verifying) the program.
    pub load: Duration,
    /// Filling the maps.
    pub fill: Duration,
}

/// How much each bank of a program's maps holds, fixed when it is loaded with room to
/// grow, so later policies can be written into the same maps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Capacity {
    /// Words of every rule set (64 rule slots each).
    pub words: u32,
    /// Rule slots (`words * 64`).
    pub rules: u32,
    /// Address classes (ids shared by both banks).
    pub classes: u32,
    /// Rule sets.
    pub sets: u32,
    /// Elements of the flat tables (both banks' first levels and the chunks).
    pub v4_chunks: u32,
    pub v6_chunks: u32,
    /// Hosts (single addresses with classes of their own) per bank.
    pub v4_hosts: u32,
    pub v6_hosts: u32,
}

impl Capacity {
    /// Slots of each bank's hosts tables (IPv4, IPv6).
    fn host_slots(&self) -> (u32, u32) {
        (
            hosts::slots_for(self.v4_hosts),
            hosts::slots_for(self.v6_hosts),
        )
    }

    /// Room for `c` and for policies somewhat larger than it.
    pub fn for_policy(c: &CompiledPolicy) -> Self {
        let grow = |n: usize, extra: usize| (n + n / 4 + extra) as u32;
        let words = (c.rules.len() + c.rule_count() / 8 + 64)
            .div_ceil(64)
            .min(MAX_RULES / 64) as u32;
        Self {
            words,
            rules: words * 64,
            classes: grow(c.classes.len(), 1024),
            sets: grow(c.sets.len(), 1024),
            v4_chunks: grow(c.v4_chunks.len(), 256),
            v6_chunks: grow(c.v6_chunks.len(), 256),
            v4_hosts: grow(c.v4_hosts.len(), 256),
            v6_hosts: grow(c.v6_hosts.len(), 256),
        }
    }

    /// Why `c` does not fit, if it does not.
    fn misfit(&self, c: &CompiledPolicy) -> Option<String> {
        let checks = [
            // Slots within room means rule-set words within room too.
            ("rule slots", c.rules.len(), self.rules),
            ("address classes", c.classes.len(), self.classes),
            ("rule sets", c.sets.len(), self.sets),
            ("IPv4 hosts", c.v4_hosts.len(), self.v4_hosts),
            ("IPv6 hosts", c.v6_hosts.len(), self.v6_hosts),
        ];
        checks
            .into_iter()
            .find(|(_, n, cap)| *n > *cap as usize)
            .map(|(what, n, cap)| format!("{n} {what}, room for {cap}"))
    }
}

/// What one bank of the maps holds, as written (for writing only what changes): the
/// compiled structures themselves, shared with the policy, set ids local to the bank.
#[derive(Default)]
struct Bank {
    sets: Arc<RuleSets>,
    classes: Vec<AddrClass>,
    field_class: Arc<Vec<u32>>,
    rules: Arc<Vec<RuleEntry>>,
    v4_hosts: Arc<Vec<Range>>,
    v6_hosts: Arc<Vec<Range>>,
    /// The hosts tables laid out from them.
    host_tables: Arc<hosts::Tables>,
}

/// The policy a program's maps hold, for writing the next one beside it.
struct Written {
    /// The bank in force.
    active: u32,
    banks: [Bank; BANKS as usize],
    v4: FlatTable,
    v6: FlatTable,
    v4_ranges: Arc<Vec<Range>>,
    v6_ranges: Arc<Vec<Range>>,
    redirect_devices: Vec<String>,
    redirect_cpus: Vec<u32>,
    rate_limits: Vec<cloudlet_common::RateLimit>,
    /// Set when a write failed half-way: the copy may disagree with the maps.
    broken: bool,
    /// Whether the inactive bank's rule counters are zero (see [`Loaded::retire`]).
    spare_counters_zero: bool,
}

/// Time an update in place took.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct UpdateTimings {
    /// Computing what to write (table patches, differences).
    pub prepare: Duration,
    /// Writing the inactive bank, up to and including the flip.
    pub write: Duration,
    /// Waiting until no packet can still see the old bank (then its chunks are reused).
    pub grace: Duration,
    /// Map elements written.
    pub elements: usize,
}

/// A loaded (not necessarily attached) program with its filled maps.
pub struct Loaded {
    ebpf: Ebpf,
    kind: ProgramKind,
    pub timings: LoadTimings,
    capacity: Capacity,
    written: Written,
}

impl Loaded {
    /// Creates the maps sized for `compiled` (with room to grow), fills bank 0 and loads
    /// program `kind`. `trace` makes the program record each decision (for `classify`).
    pub fn new(
        compiled: &CompiledPolicy,
        kind: ProgramKind,
        trace: bool,
    ) -> Result<Self, DataplaneError> {
        raise_memlock_limit();
        let started = Instant::now();
        let lpm = kind == ProgramKind::PolicyLpm;
        let cap = Capacity::for_policy(compiled);
        // Size only the structures this program uses; the others get one entry.
        let size = |used: bool, n: usize| if used { n.max(1) as u32 } else { 1 };
        let trace_flag = u32::from(trace);
        let slots = cap.host_slots();
        let masks = (slots.0 - 1, slots.1 - 1);
        let ebpf = EbpfLoader::new()
            .map_max_entries("RULES", cap.rules * BANKS)
            .map_max_entries("RULE_STATS", cap.rules * BANKS)
            .map_max_entries("CLASSES", cap.classes * BANKS)
            .map_max_entries("CLASS_STATS", cap.classes * 2)
            .map_max_entries("SET_WORDS", cap.sets * BANKS)
            .map_max_entries("RATE_LIMITS", compiled.rate_limits.len().max(1) as u32)
            .map_max_entries("RATE_RULE_TAT", compiled.rate_limits.len().max(1) as u32)
            .map_max_entries("V4_TABLE", size(!lpm, cap.v4_chunks as usize))
            .map_max_entries("V6_TABLE", size(!lpm, cap.v6_chunks as usize))
            .map_max_entries("V4_HOSTS", size(!lpm, (slots.0 * BANKS) as usize))
            .map_max_entries("V6_HOSTS", size(!lpm, (slots.1 * BANKS) as usize))
            .map_max_entries("V4_TRIE", size(lpm, compiled.v4_prefixes.len()))
            .map_max_entries("V6_TRIE", size(lpm, compiled.v6_prefixes.len()))
            .override_global("TRACE", &trace_flag, true)
            .override_global("V4_HOSTS_MASK", &masks.0, true)
            .override_global("V6_HOSTS_MASK", &masks.1, true)
            .load(crate::EBPF_OBJECT)?;
        // Filled by `fill` for the flat tables; the LPM variant has none.
        let empty = || FlatTable::new(Arc::default(), 0);
        let mut loaded = Self {
            ebpf,
            kind,
            timings: LoadTimings::default(),
            capacity: cap,
            written: Written {
                active: 0,
                banks: Default::default(),
                v4: empty(),
                v6: empty(),
                v4_ranges: compiled.v4_ranges.clone(),
                v6_ranges: compiled.v6_ranges.clone(),
                redirect_devices: compiled.redirect_devices.clone(),
                redirect_cpus: compiled.redirect_cpus.clone(),
                rate_limits: compiled.rate_limits.clone(),
                broken: false,
                // Fresh maps: both banks count from zero.
                spare_counters_zero: true,
            },
        };
        let fill_started = Instant::now();
        loaded.fill(compiled, lpm)?;
        loaded.timings.fill = fill_started.elapsed();
        loaded
            .program_mut()?
            .load()
            .map_err(|source| DataplaneError::Program {
                what: format!("loading program {}", kind.program_name()),
                source,
            })?;
        loaded.timings.load = started.elapsed() - loaded.timings.fill;
        Ok(loaded)
    }

    /// The room each bank of the maps has.
    pub fn capacity(&self) -> Capacity {
        self.capacity
    }

    /// The bank in force.
    pub fn active_bank(&self) -> u32 {
        self.written.active
    }

    /// Writes `compiled` into the inactive bank of the running maps, then makes it the
    /// bank in force with one word: packets see the old policy or the new one, never a
    /// mix. Only what differs is written: address-table chunks of the /16s whose classes
    /// change, and the rule sets, classes, field entries and rules that differ. `compiled`
    /// must come from the [`Compiler`] that compiled the policy in force (class ids must
    /// mean the same). Fails with [`DataplaneError::NoRoom`], changing nothing, when it
    /// does not fit; after any other error the packets still see the old policy, and
    /// later updates are refused (a full reload is needed).
    pub fn update(&mut self, compiled: &CompiledPolicy) -> Result<UpdateTimings, DataplaneError> {
        let started = Instant::now();
        let w = &self.written;
        if self.kind != ProgramKind::Policy {
            return Err(DataplaneError::NoRoom("not the policy program".into()));
        }
        if w.broken {
            return Err(DataplaneError::NoRoom(
                "an earlier update failed half-way".into(),
            ));
        }
        if let Some(why) = self.capacity.misfit(compiled) {
            return Err(DataplaneError::NoRoom(why));
        }
        if w.redirect_devices != compiled.redirect_devices
            || w.redirect_cpus != compiled.redirect_cpus
            || w.rate_limits != compiled.rate_limits
        {
            return Err(DataplaneError::NoRoom(
                "redirect targets or rate limits changed".into(),
            ));
        }
        let (from, to) = (w.active, 1 - w.active);
        let tables = self.host_tables(compiled, to)?;
        let room = || DataplaneError::NoRoom("the address tables are full".into());
        let w = &mut self.written;
        let p4 = compile::patch_table(
            &mut w.v4,
            &w.v4_ranges,
            &compiled.v4_ranges,
            32,
            from * L1_CHUNKS,
            to * L1_CHUNKS,
        )
        .ok_or_else(room)?;
        let Some(p6) = compile::patch_table(
            &mut w.v6,
            &w.v6_ranges,
            &compiled.v6_ranges,
            128,
            from * L1_CHUNKS,
            to * L1_CHUNKS,
        ) else {
            w.v4.undo(p4);
            return Err(room());
        };
        let prepared = started.elapsed();
        // From here on the maps change: a failure leaves the copy unreliable.
        self.written.broken = true;
        let mut elements = p4.writes.len() + p6.writes.len();
        write_entries(&mut self.ebpf, "V4_TABLE", &p4.writes)?;
        write_entries(&mut self.ebpf, "V6_TABLE", &p6.writes)?;
        let retired = self.write_bank(compiled, to, tables)?;
        elements += retired.1;
        if !self.written.spare_counters_zero {
            zero_rule_stats(
                &mut self.ebpf,
                to * self.capacity.rules,
                self.capacity.rules as usize,
            )?;
        }
        let config = self.bank_config(compiled, to);
        write_entries(&mut self.ebpf, "CONFIG", &[(to, config)])?;
        // The flip: one word.
        write_entries(&mut self.ebpf, "ACTIVE", &[(0u32, to)])?;
        let written = started.elapsed();
        // What the bank held before goes only now, off the way to the flip.
        drop(retired);
        wait_for_readers();
        let w = &mut self.written;
        w.active = to;
        w.v4.free.extend(p4.garbage);
        w.v6.free.extend(p6.garbage);
        w.v4_ranges = compiled.v4_ranges.clone();
        w.v6_ranges = compiled.v6_ranges.clone();
        w.broken = false;
        w.spare_counters_zero = false;
        Ok(UpdateTimings {
            prepare: prepared,
            write: written - prepared,
            grace: started.elapsed() - written,
            elements,
        })
    }

    /// `compiled.config` with the offsets of `bank`.
    fn bank_config(&self, compiled: &CompiledPolicy, bank: u32) -> PolicyConfig {
        PolicyConfig {
            rule_base: bank * self.capacity.rules,
            class_base: bank * self.capacity.classes,
            field_base: bank * field::ENTRIES,
            table_root: bank * L1_CHUNKS,
            hosts_seed: self.written.banks[bank as usize].host_tables.seed,
            ..compiled.config
        }
    }

    /// The hosts tables of `c` for `bank`: those the bank holds when its hosts are the
    /// same, else laid out anew (starting from the bank's seed). The LPM program has none.
    fn host_tables(
        &self,
        c: &CompiledPolicy,
        bank: u32,
    ) -> Result<Arc<hosts::Tables>, DataplaneError> {
        if self.kind == ProgramKind::PolicyLpm {
            return Ok(Arc::default());
        }
        let old = &self.written.banks[bank as usize];
        let same = |a: &Arc<Vec<Range>>, b: &Arc<Vec<Range>>| Arc::ptr_eq(a, b) || a == b;
        if same(&old.v4_hosts, &c.v4_hosts) && same(&old.v6_hosts, &c.v6_hosts) {
            return Ok(old.host_tables.clone());
        }
        hosts::tables(
            &c.v4_hosts,
            &c.v6_hosts,
            self.capacity.host_slots(),
            old.host_tables.seed,
        )
        .map(Arc::new)
        .ok_or_else(|| {
            DataplaneError::NoRoom("no layout of the hosts tables keeps every host in reach".into())
        })
    }

    /// Writes the rule sets, classes, field entries and rules of `c` into `bank`, only
    /// where they differ from what the bank holds. Returns what the bank held before (to
    /// drop when time allows) and the elements written.
    fn write_bank(
        &mut self,
        c: &CompiledPolicy,
        bank: u32,
        host_tables: Arc<hosts::Tables>,
    ) -> Result<(Bank, usize), DataplaneError> {
        let cap = self.capacity;
        let set_base = bank * cap.sets;
        let old = std::mem::take(&mut self.written.banks[bank as usize]);
        // The sets that changed, each with its summary.
        let mut words = Vec::new();
        if !Arc::ptr_eq(&old.sets, &c.sets) {
            let (new_sets, old_sets) = (&*c.sets, &*old.sets);
            for i in 0..new_sets.len() as u32 {
                let was = (i as usize) < old_sets.len();
                if was && old_sets.get(i) == new_sets.get(i) {
                    continue;
                }
                let mut value: SetWords = [0; SUMMARY_WORDS + cloudlet_common::SET_WORDS];
                let set = new_sets.get(i);
                value[..SUMMARY_WORDS].copy_from_slice(&new_sets.summary(i));
                value[SUMMARY_WORDS..SUMMARY_WORDS + set.len()].copy_from_slice(set);
                words.push((set_base + i, value));
            }
        }
        let global = |id: u32| set_base + id;
        let classes: Vec<AddrClass> = c
            .classes
            .iter()
            .map(|k| AddrClass {
                src_set: global(k.src_set),
                dst_set: global(k.dst_set),
            })
            .collect();
        let field_class: Vec<(u32, u32)> = if Arc::ptr_eq(&old.field_class, &c.field_class) {
            Vec::new()
        } else {
            c.field_class
                .iter()
                .enumerate()
                .filter(|(i, s)| old.field_class.get(*i) != Some(*s))
                .map(|(i, s)| (bank * field::ENTRIES + i as u32, global(*s)))
                .collect()
        };
        let e = &mut self.ebpf;
        let mut n = words.len() + field_class.len();
        write_entries(e, "SET_WORDS", &words)?;
        n += write_diff(e, "CLASSES", bank * cap.classes, &classes, &old.classes)?;
        write_entries(e, "FIELD_CLASS", &field_class)?;
        if !Arc::ptr_eq(&old.rules, &c.rules) {
            n += write_diff(e, "RULES", bank * cap.rules, &c.rules, &old.rules)?;
        }
        // The hosts of the flat tables (the LPM tries hold them as prefixes).
        let flat = self.kind != ProgramKind::PolicyLpm;
        if flat && !Arc::ptr_eq(&host_tables, &old.host_tables) {
            let (t, was, slots) = (&*host_tables, &*old.host_tables, cap.host_slots());
            n += write_diff(e, "V4_HOSTS", bank * slots.0, &t.v4, &was.v4)?;
            n += write_diff(e, "V6_HOSTS", bank * slots.1, &t.v6, &was.v6)?;
        }
        self.written.banks[bank as usize] = Bank {
            sets: c.sets.clone(),
            classes,
            field_class: c.field_class.clone(),
            rules: c.rules.clone(),
            v4_hosts: if flat {
                c.v4_hosts.clone()
            } else {
                Arc::default()
            },
            v6_hosts: if flat {
                c.v6_hosts.clone()
            } else {
                Arc::default()
            },
            host_tables,
        };
        Ok((old, n))
    }

    /// The loaded program.
    pub fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let name = self.kind.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("program {name}"),
                source,
            })
    }

    /// The program, read-only (for `test_run`).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        let name = self.kind.program_name();
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("program {name}"),
                source,
            })
    }

    /// The eBPF object (maps).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    fn fill(&mut self, c: &CompiledPolicy, lpm: bool) -> Result<(), DataplaneError> {
        let tables = self.host_tables(c, 0)?;
        self.write_bank(c, 0, tables)?;
        let config = self.bank_config(c, 0);
        let e = &mut self.ebpf;
        write_entries(e, "CONFIG", &[(0u32, config)])?;
        fill_redirects(e, c)?;
        if !c.rate_limits.is_empty() {
            let limits: Vec<(u32, _)> = c
                .rate_limits
                .iter()
                .copied()
                .enumerate()
                .map(|(i, l)| (i as u32, l))
                .collect();
            write_entries(e, "RATE_LIMITS", &limits)?;
        }
        if lpm {
            fill_lpm(e, "V4_TRIE", &c.v4_prefixes)?;
            fill_lpm(e, "V6_TRIE", &c.v6_prefixes)?;
        } else {
            let w = &mut self.written;
            w.v4 = FlatTable::new(c.v4_chunks.clone(), self.capacity.v4_chunks as usize);
            w.v6 = FlatTable::new(c.v6_chunks.clone(), self.capacity.v6_chunks as usize);
            fill_flat(e, "V4_TABLE", &c.v4_chunks)?;
            fill_flat(e, "V6_TABLE", &c.v6_chunks)?;
        }
        Ok(())
    }

    /// Attaches to `iface`, returning the link (dropping it detaches) and the mode used.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(XdpLink, AttachMode), DataplaneError> {
        if !interface_exists(iface) {
            return Err(DataplaneError::NoInterface(iface.to_string()));
        }
        let prog = self.program_mut()?;
        let attach = |prog: &mut Xdp, m: XdpMode| {
            let name = if m == XdpMode::Skb {
                "generic"
            } else {
                "native"
            };
            prog.attach(iface, m)
                .and_then(|id| prog.take_link(id))
                .map_err(|source| DataplaneError::Program {
                    what: format!("attaching to {iface} in {name} mode"),
                    source,
                })
        };
        match mode {
            AttachMode::Native => attach(prog, XdpMode::Driver).map(|l| (l, AttachMode::Native)),
            AttachMode::Generic => attach(prog, XdpMode::Skb).map(|l| (l, AttachMode::Generic)),
            AttachMode::Auto => match attach(prog, XdpMode::Driver) {
                Ok(l) => Ok((l, AttachMode::Native)),
                Err(e) => {
                    log::warn!("{e}; falling back to generic (SKB) mode, which is much slower");
                    attach(prog, XdpMode::Skb).map(|l| (l, AttachMode::Generic))
                }
            },
        }
    }

    /// Moves an attachment made by another `Loaded` onto this program in one step
    /// (`BPF_LINK_UPDATE`): the interface is never without a program.
    pub fn take_over(&mut self, link: XdpLink) -> Result<XdpLink, DataplaneError> {
        let prog = self.program_mut()?;
        prog.attach_to_link(link)
            .and_then(|id| prog.take_link(id))
            .map_err(|source| DataplaneError::Program {
                what: "replacing the attached program".to_string(),
                source,
            })
    }

    /// Takes the program's drop-event ring buffer (once).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.ebpf
            .take_map("EVENTS")
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok())
    }

    /// Enters an AF_XDP socket into the program's maps: `fd`, bound to queue `queue` of
    /// interface `ifindex`, which takes socket slot `slot` (see `cloudlet_common::xsk`).
    pub fn register_xsk(
        &mut self,
        slot: u32,
        ifindex: u32,
        queue: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DataplaneError> {
        let mut interfaces: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("XSK_INTERFACES")
                .ok_or(DataplaneError::Missing("map XSK_INTERFACES"))?,
        )
        .map_err(map_err("XSK_INTERFACES"))?;
        interfaces
            .insert(ifindex, slot, 0)
            .map_err(map_err("XSK_INTERFACES"))?;
        let mut sockets = aya::maps::XskMap::try_from(
            self.ebpf
                .map_mut("XSK_SOCKETS")
                .ok_or(DataplaneError::Missing("map XSK_SOCKETS"))?,
        )
        .map_err(map_err("XSK_SOCKETS"))?;
        sockets
            .set(cloudlet_common::xsk::index(slot, queue), fd, 0)
            .map_err(map_err("XSK_SOCKETS"))
    }

    /// Reads the counters, folded by rule and zone names of `compiled` (the policy in
    /// force).
    pub fn stats(&self, compiled: &CompiledPolicy) -> Result<stats::Stats, DataplaneError> {
        self.stats_in_bank(compiled, self.written.active)
    }

    /// Reads the counters with the rule counters of `bank`, which held `compiled`.
    pub fn stats_in_bank(
        &self,
        compiled: &CompiledPolicy,
        bank: u32,
    ) -> Result<stats::Stats, DataplaneError> {
        stats::read(&self.ebpf, compiled, bank * self.capacity.rules)
    }

    /// After an [`update`](Self::update): reads the rule counters of the bank it put out
    /// of force, which held `compiled` and which no packet counts into any more, then
    /// zeroes them, so that the next update need not do it on its way to the flip.
    pub fn retire(&mut self, compiled: &CompiledPolicy) -> Result<stats::Stats, DataplaneError> {
        let spare = 1 - self.written.active;
        let stats = self.stats_in_bank(compiled, spare)?;
        zero_rule_stats(
            &mut self.ebpf,
            spare * self.capacity.rules,
            self.capacity.rules as usize,
        )?;
        self.written.spare_counters_zero = true;
        Ok(stats)
    }
}

fn interface_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn interface_exists(iface: &str) -> bool {
    interface_index(iface).is_some()
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer; failure only matters on old kernels.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn batch_err(map: &'static str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    batch_call_err(map, "bpf_map_update_batch")
}

fn batch_call_err(
    map: &'static str,
    call: &'static str,
) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |io_error| DataplaneError::Map {
        map,
        source: MapError::SyscallError(aya::sys::SyscallError { call, io_error }),
    }
}

/// Enters the interfaces of `redirect` actions (by ifindex, resolved now, in this network
/// namespace) and a queue for each CPU of a `cpu` action.
fn fill_redirects(ebpf: &mut Ebpf, c: &CompiledPolicy) -> Result<(), DataplaneError> {
    use aya::maps::{CpuMap, DevMap};
    if !c.redirect_devices.is_empty() {
        let mut devices = DevMap::try_from(
            ebpf.map_mut("REDIRECT_DEVICES")
                .ok_or(DataplaneError::Missing("map REDIRECT_DEVICES"))?,
        )
        .map_err(map_err("REDIRECT_DEVICES"))?;
        for (i, iface) in c.redirect_devices.iter().enumerate() {
            let index =
                interface_index(iface).ok_or_else(|| DataplaneError::NoInterface(iface.clone()))?;
            devices
                .set(i as u32, index, None, 0)
                .map_err(|source| DataplaneError::Redirect {
                    target: iface.clone(),
                    source,
                })?;
        }
    }
    if !c.redirect_cpus.is_empty() {
        let count = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            map: "REDIRECT_CPUS",
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        let mut cpus = CpuMap::try_from(
            ebpf.map_mut("REDIRECT_CPUS")
                .ok_or(DataplaneError::Missing("map REDIRECT_CPUS"))?,
        )
        .map_err(map_err("REDIRECT_CPUS"))?;
        for &cpu in &c.redirect_cpus {
            if cpu as usize >= count {
                return Err(DataplaneError::NoCpu { cpu, count });
            }
            // 2048 frames of queue, the size the kernel's samples use.
            cpus.set(cpu, 2048, None, 0)
                .map_err(|source| DataplaneError::Redirect {
                    target: format!("cpu {cpu}"),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Writes `(index, value)` pairs into an array map, in batches where the kernel can.
fn write_entries<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[(u32, V)],
) -> Result<(), DataplaneError> {
    if entries.is_empty() {
        return Ok(());
    }
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let (keys, values): (Vec<u32>, Vec<V>) = entries.iter().copied().unzip();
    let batched = match &*map {
        aya::maps::Map::Array(data) => {
            update_batch(data, &keys, &values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut array: Array<_, V> = Array::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(&values) {
            array.set(*k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Writes the elements of `new` (at `base + i`) that differ from `old` (missing elements
/// of `old` count as zero, as in a new map). Returns how many were written.
fn write_diff<V: aya::Pod + PartialEq + Default>(
    ebpf: &mut Ebpf,
    name: &'static str,
    base: u32,
    new: &[V],
    old: &[V],
) -> Result<usize, DataplaneError> {
    let zero = V::default();
    let entries: Vec<(u32, V)> = new
        .iter()
        .enumerate()
        .filter(|(i, v)| *v != old.get(*i).unwrap_or(&zero))
        .map(|(i, v)| (base + i as u32, *v))
        .collect();
    write_entries(ebpf, name, &entries)?;
    Ok(entries.len())
}

/// Zeroes the per-CPU counters of `count` rules from `base` (a bank about to come into
/// force starts counting from zero).
fn zero_rule_stats(ebpf: &mut Ebpf, base: u32, count: usize) -> Result<(), DataplaneError> {
    use aya::maps::{PerCpuArray, PerCpuValues};
    let name = "RULE_STATS";
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
        map: name,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "nr_cpus",
            io_error: e,
        }),
    })?;
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let keys: Vec<u32> = (base..base + count as u32).collect();
    // A per-CPU batch value is one (8-byte aligned) value per possible CPU.
    let zeros = vec![Counter::default(); keys.len() * cpus];
    let batched = match &*map {
        aya::maps::Map::PerCpuArray(data) => {
            update_batch_raw(data, &keys, zeros.as_ptr().cast()).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut array: PerCpuArray<_, Counter> =
            PerCpuArray::try_from(map).map_err(map_err(name))?;
        for k in keys {
            let values =
                PerCpuValues::try_from(vec![Counter::default(); cpus]).map_err(batch_err(name))?;
            array.set(k, values, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Waits until every XDP program run that started before now has finished, so nothing
/// still reads the bank just retired (`membarrier(MEMBARRIER_CMD_GLOBAL)` is an RCU grace
/// period, and XDP runs inside RCU read-side sections).
fn wait_for_readers() {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: membarrier takes no pointers.
    let ret = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if ret != 0 {
        // Refused on nohz_full kernels: an XDP run lasts microseconds.
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Fills a flat table with its chunks (chunks of class 0 only are already zero).
fn fill_flat(
    ebpf: &mut Ebpf,
    name: &'static str,
    chunks: &[FlatChunk],
) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let (keys, values): (Vec<u32>, Vec<FlatChunk>) = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.iter().any(|e| *e != 0))
        .map(|(i, c)| (i as u32, *c))
        .unzip();
    let batched = match &*map {
        aya::maps::Map::Array(data) => {
            update_batch(data, &keys, &values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut table: Array<_, FlatChunk> = Array::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(&values) {
            table.set(*k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Fills an LPM trie map with `entries`: in batches where the kernel supports it, one
/// update per entry where not.
fn fill_lpm<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[compile::LpmEntry<N>],
) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let keys: Vec<Key<[u8; N]>> = entries
        .iter()
        .map(|p| Key::new(u32::from(p.len), p.addr))
        .collect();
    let values: Vec<u32> = entries.iter().map(|p| p.class).collect();
    let batched = match &*map {
        aya::maps::Map::LpmTrie(data) => {
            update_batch(data, &keys, &values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut trie: LpmTrie<_, [u8; N], u32> = LpmTrie::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(&values) {
            trie.insert(k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+): writes many entries in one syscall. Returns
/// `Ok(false)` when the map type has no batch support, so callers fall back to single
/// updates.
fn update_batch<K: Copy, V: Copy>(
    map: &aya::maps::MapData,
    keys: &[K],
    values: &[V],
) -> std::io::Result<bool> {
    debug_assert_eq!(keys.len(), values.len());
    update_batch_raw(map, keys, values.as_ptr().cast())
}

/// The attribute of the `BPF_MAP_*_BATCH` commands (`union bpf_attr`'s `batch`).
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs the batch command `cmd` on `map`'s descriptor with `attr`.
fn batch_syscall(
    cmd: libc::c_long,
    map: &aya::maps::MapData,
    attr: &mut BatchAttr,
) -> std::io::Result<()> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    attr.map_fd = map.fd().as_fd().as_raw_fd() as u32;
    // SAFETY: attr points to key and value arrays of `count` entries each, laid out as the
    // map's key and value types (the callers' contract); the kernel writes back `count`
    // and, for lookups, at most `count` keys and values.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut BatchAttr,
            std::mem::size_of::<BatchAttr>() as u32,
        )
    };
    if ret != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes of one key's value in a batch: the map's value size, or for per-CPU maps one
/// value per possible CPU, each rounded up to 8 bytes.
fn batch_value_size(map: &aya::maps::MapData) -> std::io::Result<usize> {
    let info = map.info().map_err(std::io::Error::other)?;
    let value_size = info.value_size() as usize;
    Ok(
        if matches!(
            info.map_type(),
            Ok(aya::maps::MapType::PerCpuArray | aya::maps::MapType::PerCpuHash)
        ) {
            value_size.next_multiple_of(8) * aya::util::nr_cpus().map_err(|(_, e)| e)?
        } else {
            value_size
        },
    )
}

/// Whether a batch command's error means the kernel has no batch operations for the map.
fn batch_unsupported(err: &std::io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524))
}

/// [`update_batch`] with values as the kernel lays them out: `keys.len()` values of
/// [`batch_value_size`] bytes.
fn update_batch_raw<K: Copy>(
    map: &aya::maps::MapData,
    keys: &[K],
    values: *const u8,
) -> std::io::Result<bool> {
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    let per_key = batch_value_size(map)?;
    let mut done = 0usize;
    while done < keys.len() {
        let n = (keys.len() - done).min(1 << 16);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            // SAFETY: within the caller's buffer of keys.len() values.
            values: unsafe { values.add(done * per_key) } as u64,
            count: n as u32,
            ..Default::default()
        };
        if let Err(err) = batch_syscall(BPF_MAP_UPDATE_BATCH, map, &mut attr) {
            if done == 0 && batch_unsupported(&err) {
                return Ok(false);
            }
            return Err(err);
        }
        done += n;
    }
    Ok(true)
}

/// `BPF_MAP_LOOKUP_BATCH` (kernel 5.6+) on an array map: the values of the `count` keys
/// from `start`, as the kernel lays them out ([`batch_value_size`] bytes a key), in as few
/// syscalls as the kernel allows. `Ok(None)` when the map has no batch support.
pub(crate) fn lookup_array_batch(
    map: &aya::maps::MapData,
    start: u32,
    count: u32,
) -> std::io::Result<Option<(usize, Vec<u8>)>> {
    const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
    let per_key = batch_value_size(map)?;
    let mut keys = vec![0u32; count as usize];
    let mut values = vec![0u8; count as usize * per_key];
    let mut done = 0u32;
    while done < count {
        // The batch position is the key before the first one wanted (none: from key 0).
        let position = (start + done).wrapping_sub(1);
        // Where the kernel writes the last key read (required; the keys say as much).
        let mut next = 0u32;
        let mut attr = BatchAttr {
            in_batch: if start + done == 0 {
                0
            } else {
                &position as *const u32 as u64
            },
            out_batch: &mut next as *mut u32 as u64,
            keys: keys[done as usize..].as_mut_ptr() as u64,
            values: values[done as usize * per_key..].as_mut_ptr() as u64,
            count: count - done,
            ..Default::default()
        };
        let result = batch_syscall(BPF_MAP_LOOKUP_BATCH, map, &mut attr);
        // ENOENT: the end of the map came first; what was read is in `count`.
        match result {
            Ok(()) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                if done + attr.count < count {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        format!("the map ends before key {}", start + count - 1),
                    ));
                }
            }
            Err(e) if done == 0 && batch_unsupported(&e) => return Ok(None),
            Err(e) => return Err(e),
        }
        if attr.count == 0 {
            return Err(std::io::Error::other("a batch lookup read nothing"));
        }
        let read = &keys[done as usize..(done + attr.count) as usize];
        if read.iter().zip(start + done..).any(|(k, want)| *k != want) {
            return Err(std::io::Error::other("a batch lookup skipped keys"));
        }
        done += attr.count;
    }
    Ok(Some((per_key, values)))
}
