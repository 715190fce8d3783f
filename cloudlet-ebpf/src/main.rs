//! Cloudlet's XDP programs: parse, classify addresses into zones, match rules, act, count.
//!
//! Entry points are thin; each stage lives in its own module. Nothing here logs on the
//! per-packet path: outcomes are counted in per-CPU arrays.
#![no_std]
#![no_main]

mod events;
mod geofence;
mod parse;
mod ratelimit;
mod rules;
mod trafficgen;
mod xsk;

use aya_ebpf::{
    bindings::xdp_action,
    macros::{map, xdp},
    maps::{Array, CpuMap, DevMap, LpmTrie, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use cloudlet_common::{
    AddrClass, BANKS, Counter, Decision, EventBudget, FlatChunk, HostSlot, Ipv6Addr, PolicyConfig,
    RateKey, RateLimit, RuleEntry, SetWords, field, flat, stat,
};

/// Set to 1 by `cloudlet classify` (through aya's `set_global`) so the program records
/// its decision in [`TRACE_DECISION`]. Zero in the attached program: the verifier sees a
/// constant and prunes the recording.
#[unsafe(no_mangle)]
static TRACE: u32 = 0;

/// The bank in force (0 or 1): the index in `CONFIG` of the policy packets are judged by.
/// User space fills the other bank, then flips this word.
#[map]
static ACTIVE: Array<u32> = Array::with_max_entries(1, 0);

/// Policy-wide settings of each bank; they locate the bank's part of the other maps.
#[map]
static CONFIG: Array<PolicyConfig> = Array::with_max_entries(BANKS, 0);

/// Compiled rules by slot (their bit in the rule sets), from each bank's `rule_base`.
/// Sized by the loader.
#[map]
static RULES: Array<RuleEntry> = Array::with_max_entries(1, 0);

/// Address classes: each bank's rule sets of each class, from its `class_base`. Sized by
/// the loader.
#[map]
static CLASSES: Array<AddrClass> = Array::with_max_entries(1, 0);

/// The rule sets, one per element: summary, then words (see `cloudlet_common::SetWords`).
/// Sized by the loader.
#[map]
static SET_WORDS: Array<SetWords> = Array::with_max_entries(1, 0);

/// IPv4 address to class: a flat multibit table (see `cloudlet_common::flat`), one first
/// level per bank. Sized by the loader.
#[map]
static V4_TABLE: Array<FlatChunk> = Array::with_max_entries(flat::L1_CHUNKS * BANKS, 0);

/// IPv6 address to class, the same structure. Sized by the loader.
#[map]
static V6_TABLE: Array<FlatChunk> = Array::with_max_entries(flat::L1_CHUNKS * BANKS, 0);

/// IPv4 hosts: single addresses with classes of their own, for the table entries marked
/// `flat::HOSTS`; an open-addressed table per bank (see `cloudlet_common::hosts`). Sized
/// by the loader.
#[map]
static V4_HOSTS: Array<HostSlot<1>> = Array::with_max_entries(1, 0);

/// IPv6 hosts, the same.
#[map]
static V6_HOSTS: Array<HostSlot<4>> = Array::with_max_entries(1, 0);

/// Slots of each bank's IPv4 hosts table, less one (a power of two less one). Set at load
/// time: the verifier sees a constant.
#[unsafe(no_mangle)]
static V4_HOSTS_MASK: u32 = 0;

/// The same for IPv6.
#[unsafe(no_mangle)]
static V6_HOSTS_MASK: u32 = 0;

/// IPv4 prefixes as an LPM trie, used only by `cloudlet_lpm` (kept for comparison).
#[map]
static V4_TRIE: LpmTrie<[u8; 4], u32> = LpmTrie::with_max_entries(1, 0);

/// IPv6 prefixes as an LPM trie, used only by `cloudlet_lpm`.
#[map]
static V6_TRIE: LpmTrie<Ipv6Addr, u32> = LpmTrie::with_max_entries(1, 0);

/// Packet field value to the rule set it satisfies (see `cloudlet_common::field`), per bank.
#[map]
static FIELD_CLASS: Array<u32> = Array::with_max_entries(field::ENTRIES * BANKS, 0);

/// Interfaces of `redirect` actions (filled by the loader with their ifindexes).
#[map]
static REDIRECT_DEVICES: DevMap = DevMap::with_max_entries(64, 0);

/// CPUs of `cpu` actions (filled by the loader with a queue per CPU used).
#[map]
static REDIRECT_CPUS: CpuMap = CpuMap::with_max_entries(256, 0);

/// Interfaces with AF_XDP sockets of `xsk` actions: ifindex to slot (see
/// `cloudlet_common::xsk`). Filled by cloudletd.
#[map]
static XSK_INTERFACES: aya_ebpf::maps::HashMap<u32, u32> =
    aya_ebpf::maps::HashMap::with_max_entries(cloudlet_common::xsk::MAX_INTERFACES, 0);

/// cloudletd's AF_XDP sockets, at `xsk::index(slot, queue)`.
#[map]
static XSK_SOCKETS: aya_ebpf::maps::XskMap =
    aya_ebpf::maps::XskMap::with_max_entries(cloudlet_common::xsk::SOCKETS, 0);

/// Rate limits of `rate_limit` actions. Sized by the loader.
#[map]
static RATE_LIMITS: Array<RateLimit> = Array::with_max_entries(1, 0);

/// Theoretical arrival time (ns) of each per-rule bucket, indexed like `RATE_LIMITS`.
#[map]
static RATE_RULE_TAT: Array<u64> = Array::with_max_entries(1, 0);

/// Theoretical arrival time (ns) of each per-source bucket; the least recently used go
/// first when it is full.
#[map]
static RATE_SOURCE_TAT: LruHashMap<RateKey, u64> = LruHashMap::with_max_entries(65_536, 0);

/// Sampled drop events for cloudletd.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU drop-event budget (see `events`).
#[map]
static EVENT_BUDGET: PerCpuArray<EventBudget> = PerCpuArray::with_max_entries(1, 0);

/// Counters per reason and per action (see `cloudlet_common::stat`).
#[map]
static STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(stat::COUNT, 0);

/// Counters per rule, by position in the policy, from each bank's `rule_base`. Sized by
/// the loader.
#[map]
static RULE_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(1, 0);

/// Counters per address class: index `2 * class` for sources, `2 * class + 1` for
/// destinations. User space folds classes into zones. Sized by the loader.
#[map]
static CLASS_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(2, 0);

/// The last decision, written only when [`TRACE`] is set.
#[map]
static TRACE_DECISION: Array<Decision> = Array::with_max_entries(1, 0);

/// The policy program, addresses looked up in the flat tables.
#[xdp]
pub fn cloudlet(ctx: XdpContext) -> u32 {
    rules::run::<false>(&ctx)
}

/// The same policy program with addresses looked up in the kernel's LPM tries, kept to
/// measure the flat tables against.
#[xdp]
pub fn cloudlet_lpm(ctx: XdpContext) -> u32 {
    rules::run::<true>(&ctx)
}

/// Parse only, then pass: the baseline for the cost of the lookups and rules.
#[xdp]
pub fn cloudlet_parse(ctx: XdpContext) -> u32 {
    match parse::parse(&ctx) {
        Ok(_) => xdp_action::XDP_PASS,
        Err(_) => xdp_action::XDP_DROP,
    }
}

/// The packet benchmarks' traffic generator (see [`trafficgen`]).
#[xdp]
pub fn cloudlet_trafficgen(ctx: XdpContext) -> u32 {
    trafficgen::run(&ctx)
}

/// Does nothing: the baseline cost of running an XDP program at all.
#[xdp]
pub fn cloudlet_noop(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects programs that could reach this; it is never executed.
    loop {}
}
