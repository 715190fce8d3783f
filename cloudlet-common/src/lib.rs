//! Types shared by the XDP program (`cloudlet-ebpf`) and user space (`cloudlet-user`).
//!
//! Every type here is `#[repr(C)]`, `Copy`, and laid out without implicit padding, so the
//! kernel and user space agree on each byte of map keys and values.
#![no_std]

/// Most rules one policy may hold.
pub const MAX_RULES: usize = 16_384;
/// `u64` words of a rule set's summary: bit `w` is set when word `w` of the set is not
/// zero, so 64 * 64 * SUMMARY_WORDS rules at most.
pub const SUMMARY_WORDS: usize = MAX_RULES / 64 / 64;
/// Most `u64` words of a rule set (one bit per rule slot).
pub const SET_WORDS: usize = MAX_RULES / 64;
/// One rule set, one element of the `SET_WORDS` map: its [`Summary`] in the first
/// [`SUMMARY_WORDS`] words, then its words (word `w` at `SUMMARY_WORDS + w`). A whole set
/// per element: a set is written with one map update, and a packet finds a set's summary
/// and words with one lookup.
pub type SetWords = [u64; SUMMARY_WORDS + SET_WORDS];
/// Policy banks: the program reads the bank named by `ACTIVE`; user space writes the other
/// one and then flips `ACTIVE`, so a packet sees either the old or the new policy.
pub const BANKS: u32 = 2;
/// Most IPv6 extension headers walked before a packet is judged malformed.
pub const MAX_IPV6_EXT_HEADERS: u32 = 8;
/// Most VLAN tags (802.1Q / 802.1ad) parsed; a third tag makes the frame malformed.
pub const MAX_VLAN_TAGS: u32 = 2;

/// Rule index meaning "no rule matched".
pub const NO_RULE: u32 = u32::MAX;

/// Actions a rule, the default or the malformed verdict can take.
pub mod action {
    /// Hand the packet to the kernel stack.
    pub const PASS: u32 = 0;
    /// Drop the packet.
    pub const DROP: u32 = 1;
    /// Send it back out of the interface it came in on, MAC addresses swapped.
    pub const TX: u32 = 2;
    /// Redirect it to another interface: `arg` is the index in `REDIRECT_DEVICES`.
    pub const REDIRECT: u32 = 3;
    /// Hand it to another CPU's stack: `arg` is the CPU (index in `REDIRECT_CPUS`).
    pub const CPU: u32 = 4;
    /// Pass within a rate, else the limit's `over_action`: `arg` indexes `RATE_LIMITS`.
    /// Never a verdict itself: the program counts the action it resolves to.
    pub const RATE_LIMIT: u32 = 5;
    /// Hand it to cloudletd's AF_XDP socket on queue `arg` of the interface it came in on
    /// (see [`super::xsk`]).
    pub const XSK: u32 = 6;
    /// Number of actions (size of the per-action counter block).
    pub const COUNT: u32 = 7;
}

/// Why a packet got its verdict: indexes the per-CPU `STATS` counters.
pub mod reason {
    /// A rule matched.
    pub const RULE: u32 = 0;
    /// No rule matched: the policy's default.
    pub const DEFAULT: u32 = 1;
    /// Not IPv4 or IPv6 (ARP, LLDP, ...): the policy's `non_ip` verdict.
    pub const NON_IP: u32 = 2;
    /// Shorter than an Ethernet header.
    pub const MALFORMED_ETHERNET: u32 = 3;
    /// Truncated VLAN tag, or more than [`super::MAX_VLAN_TAGS`] tags.
    pub const MALFORMED_VLAN: u32 = 4;
    /// IPv4 header truncated, wrong version, IHL below 5, or a total length that
    /// disagrees with the header or the frame.
    pub const MALFORMED_IPV4: u32 = 5;
    /// IPv6 fixed header truncated, wrong version, or payload beyond the frame.
    pub const MALFORMED_IPV6: u32 = 6;
    /// An IPv6 extension header runs past the end of the frame or of the IPv6 payload.
    pub const MALFORMED_IPV6_EXT: u32 = 7;
    /// More than [`super::MAX_IPV6_EXT_HEADERS`] IPv6 extension headers.
    pub const MALFORMED_IPV6_EXT_CHAIN: u32 = 8;
    /// TCP, UDP, ICMP (in IPv4) or ICMPv6 (in IPv6) header truncated, or a TCP data
    /// offset below 5, in an unfragmented packet or a first fragment.
    pub const MALFORMED_L4: u32 = 9;
    /// Number of reasons.
    pub const COUNT: u32 = 10;

    /// First malformed reason: `reason >= FIRST_MALFORMED` means the packet was malformed.
    pub const FIRST_MALFORMED: u32 = MALFORMED_ETHERNET;
}

/// Indexes of the `STATS` per-CPU array: one counter per pair of reason and action, then
/// the rate-limit and `xsk` counters.
pub mod stat {
    use super::{action, reason};
    /// Counter index of a verdict: the reason it was reached for and the action taken
    /// (one counter per packet; user space sums them by reason and by action).
    pub const fn verdict(r: u32, a: u32) -> u32 {
        r * action::COUNT + a
    }
    /// Packets over a rate limit.
    pub const RATE_LIMITED: u32 = reason::COUNT * action::COUNT;
    /// Packets of an `xsk` action that found no socket for the interface and queue they
    /// came in on (dropped).
    pub const XSK_UNDELIVERED: u32 = RATE_LIMITED + 1;
    /// Size of the `STATS` array.
    pub const COUNT: u32 = XSK_UNDELIVERED + 1;
}

/// AF_XDP sockets of `xsk` actions. A socket receives only frames of the one interface
/// queue it is bound to, so the program looks a socket up by the frame's interface and
/// receive queue: `XSK_INTERFACES` maps an ifindex to a slot, and the socket of queue `q`
/// on that interface is entry `slot * MAX_QUEUES + q` of `XSK_SOCKETS`.
pub mod xsk {
    /// Queues per interface: an `xsk` action's queue is below this.
    pub const MAX_QUEUES: u32 = 64;
    /// Interfaces that can have sockets (entries of `XSK_INTERFACES`).
    pub const MAX_INTERFACES: u32 = 64;
    /// Entries of `XSK_SOCKETS`.
    pub const SOCKETS: u32 = MAX_QUEUES * MAX_INTERFACES;
    /// The `XSK_SOCKETS` index of queue `queue` of the interface in slot `slot`.
    pub const fn index(slot: u32, queue: u32) -> u32 {
        slot * MAX_QUEUES + queue
    }
}

/// The traffic generator of the packet benchmarks (`cloudlet_trafficgen`): run through
/// `BPF_PROG_TEST_RUN` in live-frames mode, it writes the next of `GEN_HEADERS` over the
/// start of each frame and sends it out with `XDP_TX`.
pub mod trafficgen {
    /// Bytes of each header: Ethernet, IPv6 and UDP (62) fit.
    pub const HEADER_BYTES: usize = 64;
}

/// One frame start of the traffic generator, built in user space (checksums included).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GenHeader {
    pub bytes: [u8; trafficgen::HEADER_BYTES],
}

impl Default for GenHeader {
    fn default() -> Self {
        Self {
            bytes: [0; trafficgen::HEADER_BYTES],
        }
    }
}

/// A packet and byte counter (per CPU in the kernel, summed in user space).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Policy-wide settings, the single entry of the `CONFIG` array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PolicyConfig {
    /// Action when no rule matches.
    pub default_action: u32,
    /// Action for packets that cannot be parsed.
    pub malformed_action: u32,
    /// Action for frames that carry neither IPv4 nor IPv6.
    pub non_ip_action: u32,
    /// Number of rules in `RULES`.
    pub rule_count: u32,
    /// Which packet fields some rule looks at (bits of [`field::USED_*`](field)); the
    /// program skips the others.
    pub fields_used: u32,
    /// Argument of the default action (see [`RuleEntry::arg`]).
    pub default_arg: u32,
    /// Index of this bank's rule 0 in `RULES` and `RULE_STATS`.
    pub rule_base: u32,
    /// Index of this bank's class 0 in `CLASSES`.
    pub class_base: u32,
    /// Index of this bank's first entry in `FIELD_CLASS`.
    pub field_base: u32,
    /// First-level element of this bank in the flat tables (`flat::L1_CHUNKS * bank`).
    pub table_root: u32,
    /// Words of the sets this bank's rules occupy (at most 256): with one, the program
    /// ANDs word 0 of each set and skips the summaries.
    pub rule_words: u32,
    /// Seed of this bank's hosts tables (see [`hosts`]).
    pub hosts_seed: u32,
}

/// A token bucket, as the generic cell rate algorithm keeps it: a packet conforms when its
/// bucket's theoretical arrival time is at most `tolerance_ns` ahead of now, and then
/// pushes it `interval_ns` further.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimit {
    /// 1e9 / packets per second.
    pub interval_ns: u64,
    /// `interval_ns * (burst - 1)`.
    pub tolerance_ns: u64,
    /// 1: one bucket per source address (in `RATE_SOURCES`); 0: one for the rule.
    pub per_source: u32,
    /// Action for packets over the limit (pass or drop).
    pub over_action: u32,
}

/// Key of a per-source bucket: the limit's index and the source address (IPv4 in the
/// first four bytes).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateKey {
    pub limit: u32,
    pub addr: [u8; 16],
}

/// A sampled drop, sent to user space through the `EVENTS` ring buffer. At most
/// [`EVENT_BURST`] per CPU in each window of `2^EVENT_WINDOW_SHIFT` jiffies are sent; the
/// rest are only counted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DropEvent {
    /// `bpf_ktime_get_ns()` (monotonic, since boot).
    pub ktime_ns: u64,
    /// One of [`reason`].
    pub reason: u32,
    /// Index of the rule that dropped it, or [`NO_RULE`].
    pub rule: u32,
    /// 4, 6, or 0 when no IP header was parsed.
    pub ip_version: u32,
    pub l4_proto: u32,
    /// Ports when TCP/UDP was parsed, else 0.
    pub src_port: u32,
    pub dst_port: u32,
    /// Frame length.
    pub len: u32,
    /// Interface the frame arrived on.
    pub ifindex: u32,
    /// Addresses (IPv4 in the first four bytes), zero when not parsed.
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

/// Drop events a CPU may send per window.
pub const EVENT_BURST: u64 = 16;
/// A window is `2^EVENT_WINDOW_SHIFT` jiffies: 256, a quarter second at HZ=1000 and a
/// second at HZ=250, so a CPU sends 16 to 64 events a second at most.
pub const EVENT_WINDOW_SHIFT: u32 = 8;

/// Per-CPU drop-event budget (`EVENT_BUDGET`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventBudget {
    /// The current window (jiffies >> EVENT_WINDOW_SHIFT).
    pub window: u64,
    /// Events sent in it.
    pub sent: u64,
}

/// One compiled rule, indexed by its slot: its bit in the rule sets. Rules are laid out
/// in groups (rules constraining the same fields), each group in policy order and
/// starting on a word of its own, so a slot's position is not the rule's priority.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RuleEntry {
    /// One of [`action`].
    pub action: u32,
    /// Action argument (unused by pass and drop).
    pub arg: u32,
    /// The rule's position in the policy (the lower, the earlier it wins), or [`NO_RULE`]
    /// for an unused slot. Indexes `RULE_STATS`.
    pub rule: u32,
    /// The first word after the rule's group: once a rule of the group matched, the
    /// group's later words hold only later rules.
    pub group_end: u32,
}

/// What an address class means in one bank, the value of the `CLASSES` array.
///
/// Each address is looked up once and yields a class: all addresses of a class
/// belong to the same zones and to the same rule prefix lists. The class names two
/// precomputed rule sets, so matching a packet is two lookups and an AND.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddrClass {
    /// Set (element of `SET_WORDS`) of the rules whose source criteria
    /// (`src_zone`, `src_prefix`) this class satisfies.
    pub src_set: u32,
    /// Set of the rules whose destination criteria this class satisfies.
    pub dst_set: u32,
}

/// Key of the IPv6 (and optional IPv4) LPM tries: aya's `Key` layout,
/// prefix length then the address in network byte order.
pub type Ipv6Addr = [u8; 16];

/// Layout of the flat address tables (`V4_TABLE`, `V6_TABLE`): a multibit trie with a
/// 16-bit first level and 8-bit levels below, stored as an array of 256-entry chunks (one
/// map element per chunk, so a chunk is one map update).
///
/// Elements `0..L1_CHUNKS` form the first level, indexed by the first two address bytes
/// (element `addr[0]`, slot `addr[1]`). An entry is either a class id, or `PTR | element`:
/// then the next address byte indexes that element, and so on. A lookup reads at most one
/// chunk per address byte after the second, and stops at the first class it meets.
pub mod flat {
    /// Elements making up the first level (256 x 256 = one entry per /16).
    pub const L1_CHUNKS: u32 = 256;
    /// Entries in each chunk (8 address bits).
    pub const CHUNK_ENTRIES: usize = 256;
    /// Set in an entry that points to a chunk rather than holding a class.
    pub const PTR: u32 = 1 << 31;
    /// Set in an entry that holds a class for its block's addresses except single
    /// addresses with classes of their own (hosts), which are in the family's hosts table
    /// (see [`hosts`](super::hosts)): a probe or two instead of a walk down to the address.
    pub const HOSTS: u32 = 1 << 30;
    /// The class bits of an entry that is not a pointer.
    pub const CLASS: u32 = HOSTS - 1;
}

/// The hosts tables (`V4_HOSTS`, `V6_HOSTS`): single addresses with classes of their own,
/// in open-addressed arrays the program probes itself, a few array reads where a kernel
/// hash map costs a hash of the whole key and a bucket walk in a helper call.
///
/// Each bank has `2^bits` slots (the same for both banks, fixed when the program is
/// loaded, at most half full). An address of `W` 32-bit words (network order, each word
/// as the bytes lie in memory) goes in the first free slot from `hash(addr, seed) & mask`
/// on, at most [`MAX_PROBES`](hosts::MAX_PROBES) slots away; user space picks the bank's
/// seed (`PolicyConfig::hosts_seed`) so every host lies within that distance. A lookup
/// stops at the host or at the first free slot.
pub mod hosts {
    /// Slots a lookup reads at most.
    pub const MAX_PROBES: u32 = 16;
    /// Set in [`HostSlot::class`](super::HostSlot) of a slot that holds a host.
    pub const USED: u32 = 1 << 31;

    /// The home slot of `addr` (before masking) under `seed`.
    #[inline(always)]
    pub fn hash<const W: usize>(addr: &[u32; W], seed: u32) -> u32 {
        // A multiply and a fold per word: the layout, not the hash, guarantees the probe
        // bound, so the hash only has to spread the addresses operators list.
        let mut h = seed ^ 0x9e37_79b9;
        let mut i = 0;
        while i < W {
            h = (h ^ addr[i]).wrapping_mul(0x85eb_ca6b);
            h ^= h >> 16;
            i += 1;
        }
        h
    }
}

/// A slot of a hosts table: an address and its class, or free (class without
/// [`hosts::USED`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostSlot<const W: usize> {
    pub addr: [u32; W],
    pub class: u32,
}

impl<const W: usize> Default for HostSlot<W> {
    fn default() -> Self {
        Self {
            addr: [0; W],
            class: 0,
        }
    }
}

/// Packet fields other than addresses that rules can match: each value of a field maps, in
/// `FIELD_CLASS` (at the bank's base plus the field's base offset), to the rule set its
/// value satisfies.
pub mod field {
    /// IP protocol (256 values).
    pub const PROTO_BASE: u32 = 0;
    /// Source port: 65,536 ports, then one entry for "no port" (no TCP/UDP header).
    pub const SRC_PORT_BASE: u32 = PROTO_BASE + 256;
    /// Destination port, laid out like the source port.
    pub const DST_PORT_BASE: u32 = SRC_PORT_BASE + NO_PORT + 1;
    /// Outer VLAN id: 4,096 ids, then one entry for "untagged".
    pub const VLAN_BASE: u32 = DST_PORT_BASE + NO_PORT + 1;
    /// TCP flag byte: 256 values, then one entry for "not TCP".
    pub const TCP_FLAGS_BASE: u32 = VLAN_BASE + UNTAGGED + 1;
    /// IP version: index 0 for IPv4, 1 for IPv6.
    pub const IP_VERSION_BASE: u32 = TCP_FLAGS_BASE + NOT_TCP + 1;
    /// Entries of `FIELD_CLASS`.
    pub const ENTRIES: u32 = IP_VERSION_BASE + 2;

    /// The "no port" index within a port field.
    pub const NO_PORT: u32 = 65_536;
    /// The "untagged" index within the VLAN field.
    pub const UNTAGGED: u32 = 4_096;
    /// The "not TCP" index within the TCP flags field.
    pub const NOT_TCP: u32 = 256;

    /// Bits of `PolicyConfig::fields_used`.
    pub const USED_PROTO: u32 = 1;
    pub const USED_SRC_PORT: u32 = 2;
    pub const USED_DST_PORT: u32 = 4;
    pub const USED_VLAN: u32 = 8;
    pub const USED_TCP_FLAGS: u32 = 16;
    pub const USED_IP_VERSION: u32 = 32;
}

/// The summary of a rule set (the head of its [`SetWords`] element): bit r of the set is
/// bit `r % 64` of word `r / 64`, and bit w of the summary says word w is not zero.
/// Matching ANDs the summaries, then only the words they leave, lowest first.
pub type Summary = [u64; SUMMARY_WORDS];

/// One element of a flat address table.
pub type FlatChunk = [u32; flat::CHUNK_ENTRIES];

/// Frame-level facts recorded by the program for `cloudlet classify`.
///
/// Only written when the program was loaded with the `TRACE` global set, which only
/// `classify` does: the verifier prunes the write from the attached program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// XDP return code.
    pub xdp_code: u32,
    /// One of [`action`].
    pub action: u32,
    /// One of [`reason`].
    pub reason: u32,
    /// Index of the matching rule, or [`NO_RULE`].
    pub rule: u32,
    /// Class of the source address (0 when not looked up).
    pub src_class: u32,
    /// Class of the destination address.
    pub dst_class: u32,
    /// 4, 6, or 0 when no IP header was parsed.
    pub ip_version: u32,
    /// IP protocol of the transport header (after extension headers), or 0.
    pub l4_proto: u32,
    /// VLAN tags seen (0..=2).
    pub vlan_tags: u32,
    /// Outer VLAN id, valid when `vlan_tags > 0`.
    pub vlan_outer: u32,
    /// Bit flags, see [`decision_flags`].
    pub flags: u32,
    /// IPv6 extension headers walked.
    pub ext_headers: u32,
    /// Source port (TCP/UDP), 0 otherwise.
    pub src_port: u32,
    /// Destination port (TCP/UDP), 0 otherwise.
    pub dst_port: u32,
    /// TCP flag byte (FIN 0x01 ... CWR 0x80), when a TCP header was parsed.
    pub tcp_flags: u32,
    pub _pad: u32,
}

/// Bits of [`Decision::flags`].
pub mod decision_flags {
    /// The packet is a fragment (IPv4 MF/offset or an IPv6 fragment header).
    pub const FRAGMENT: u32 = 1;
    /// The fragment is not the first one (offset != 0): no transport header.
    pub const NON_FIRST_FRAGMENT: u32 = 2;
    /// A transport header was parsed.
    pub const L4_PARSED: u32 = 4;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are repr(C), Copy, made only of integers, without padding.
    unsafe impl aya::Pod for super::Counter {}
    unsafe impl aya::Pod for super::PolicyConfig {}
    unsafe impl aya::Pod for super::RuleEntry {}
    unsafe impl aya::Pod for super::AddrClass {}
    unsafe impl aya::Pod for super::Decision {}
    unsafe impl aya::Pod for super::RateLimit {}
    unsafe impl aya::Pod for super::RateKey {}
    unsafe impl aya::Pod for super::DropEvent {}
    unsafe impl aya::Pod for super::GenHeader {}
    unsafe impl<const W: usize> aya::Pod for super::HostSlot<W> {}
}

// Layout checks: a size change here must be a deliberate change on both sides.
const _: () = assert!(core::mem::size_of::<Counter>() == 16);
const _: () = assert!(core::mem::size_of::<PolicyConfig>() == 48);
const _: () = assert!(core::mem::size_of::<RuleEntry>() == 16);
const _: () = assert!(core::mem::size_of::<RateLimit>() == 24);
const _: () = assert!(core::mem::size_of::<RateKey>() == 20);
const _: () = assert!(core::mem::size_of::<DropEvent>() == 72);
const _: () = assert!(core::mem::size_of::<AddrClass>() == 8);
const _: () = assert!(core::mem::size_of::<HostSlot<1>>() == 8);
const _: () = assert!(core::mem::size_of::<HostSlot<4>>() == 20);
const _: () = assert!(core::mem::size_of::<GenHeader>() == trafficgen::HEADER_BYTES);
const _: () = assert!(core::mem::size_of::<Decision>() == 16 * 4);
const _: () = assert!(
    SUMMARY_WORDS == 4,
    "the XDP program walks the summary word by word"
);
