//! Rule evaluation and the verdict: look up both addresses and the other fields rules use,
//! AND their rule sets (in each group of rules, the lowest set bit is the group's first
//! matching rule; the earliest of those wins), act and count.

use core::{mem::MaybeUninit, ptr::addr_of_mut};

use aya_ebpf::{
    bindings::xdp_action, cty::c_void, helpers::bpf_loop, maps::Array, programs::XdpContext,
};
use cloudlet_common::{
    Counter, Decision, HostSlot, NO_RULE, PolicyConfig, SUMMARY_WORDS, action, decision_flags,
    field, reason, stat,
};

use crate::{
    ACTIVE, CLASS_STATS, CLASSES, CONFIG, FIELD_CLASS, REDIRECT_CPUS, REDIRECT_DEVICES, RULE_STATS,
    RULES, SET_WORDS, STATS, TRACE, TRACE_DECISION, V4_HOSTS, V4_HOSTS_MASK, V4_TABLE, V4_TRIE,
    V6_HOSTS, V6_HOSTS_MASK, V6_TABLE, V6_TRIE, events, geofence,
    parse::{self, Packet},
    ratelimit,
};

/// Classifies and judges one frame. `LPM` selects the LPM tries instead of the flat tables.
#[inline(always)]
pub fn run<const LPM: bool>(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    // One read of the bank: everything below comes from the same policy.
    let bank = ACTIVE.get(0).copied().unwrap_or(0);
    let Some(cfg) = CONFIG.get(bank) else {
        return xdp_action::XDP_PASS;
    };
    // What a drop event or a trace needs is taken from the parsed packet where it is
    // used, so a packet that needs neither pays for no record of its decision.
    match parse::parse(ctx) {
        Ok(pkt) => {
            let j = judge::<LPM>(&pkt, bank, cfg, len);
            let (act, arg) = if j.action == action::RATE_LIMIT {
                ratelimit::resolve(j.arg, &pkt, len)
            } else {
                (j.action, j.arg)
            };
            if act == action::DROP {
                events::report(ctx, |e| {
                    e.reason = j.reason;
                    e.rule = j.rule;
                    e.ip_version = pkt.ip_version;
                    e.l4_proto = pkt.l4_proto;
                    e.src_port = pkt.src_port;
                    e.dst_port = pkt.dst_port;
                    e.src = pkt.src;
                    e.dst = pkt.dst;
                });
            }
            let code = finish(ctx, j.reason, act, arg, len);
            trace(|d| {
                d.reason = j.reason;
                d.rule = j.rule;
                d.src_class = j.src_class;
                d.dst_class = j.dst_class;
                d.ip_version = pkt.ip_version;
                d.l4_proto = pkt.l4_proto;
                d.vlan_tags = pkt.vlan_tags;
                d.vlan_outer = pkt.vlan_outer;
                d.flags = pkt.flags;
                d.ext_headers = pkt.ext_headers;
                d.src_port = pkt.src_port;
                d.dst_port = pkt.dst_port;
                d.tcp_flags = pkt.tcp_flags;
                d.action = act;
                d.xdp_code = code;
            });
            code
        }
        Err(u) => {
            let act = if u.reason == reason::NON_IP {
                cfg.non_ip_action
            } else {
                cfg.malformed_action
            };
            if act == action::DROP {
                // No IP header parsed: no addresses, ports or rule.
                events::report(ctx, |e| {
                    e.reason = u.reason;
                    e.rule = NO_RULE;
                    e.ip_version = u.ip_version;
                });
            }
            let code = finish(ctx, u.reason, act, 0, len);
            trace(|d| {
                d.reason = u.reason;
                d.rule = NO_RULE;
                d.vlan_tags = u.vlan_tags;
                d.vlan_outer = u.vlan_outer;
                d.ip_version = u.ip_version;
                d.action = act;
                d.xdp_code = code;
            });
            code
        }
    }
}

/// Counts the verdict and carries it out, returning the XDP code.
#[inline(always)]
fn finish(ctx: &XdpContext, why: u32, act: u32, arg: u32, len: u64) -> u32 {
    count(&STATS, stat::verdict(why, act), len);
    apply(ctx, act, arg)
}

/// Records the decision `fill` describes in [`TRACE_DECISION`], in the program
/// `cloudlet classify` loads; the attached program (TRACE zero) prunes this away.
#[inline(always)]
fn trace(fill: impl FnOnce(&mut Decision)) {
    // SAFETY: TRACE is a read-only global set at load time.
    if unsafe { core::ptr::read_volatile(&TRACE) } == 0 {
        return;
    }
    let Some(slot) = TRACE_DECISION.get_ptr_mut(0) else {
        return;
    };
    // SAFETY: the pointer comes from the map and is valid for writes; a Decision is
    // 16 u32 words.
    let d = unsafe {
        fill_words(slot as *mut u32, size_of::<Decision>() / 4, 0);
        &mut *slot
    };
    fill(d);
}

/// A packet's verdict from the rules, before rate limits.
struct Judged {
    action: u32,
    arg: u32,
    /// `reason::RULE` or `reason::DEFAULT`.
    reason: u32,
    /// The matching rule, or `NO_RULE`.
    rule: u32,
    src_class: u32,
    dst_class: u32,
}

#[inline(always)]
fn judge<const LPM: bool>(pkt: &Packet, bank: u32, cfg: &PolicyConfig, len: u64) -> Judged {
    let root = cfg.table_root;
    let (src_class, dst_class) = match (pkt.ip_version == 4, LPM) {
        (true, false) => {
            let hosts = hosts_table(&V4_HOSTS, &V4_HOSTS_MASK, bank, cfg);
            (
                geofence::class_flat(&V4_TABLE, &hosts, root, &pkt.src_v4()),
                geofence::class_flat(&V4_TABLE, &hosts, root, &pkt.dst_v4()),
            )
        }
        (true, true) => (
            geofence::class_trie(&V4_TRIE, &pkt.src_v4()),
            geofence::class_trie(&V4_TRIE, &pkt.dst_v4()),
        ),
        (false, false) => {
            let hosts = hosts_table(&V6_HOSTS, &V6_HOSTS_MASK, bank, cfg);
            (
                geofence::class_flat(&V6_TABLE, &hosts, root, &pkt.src),
                geofence::class_flat(&V6_TABLE, &hosts, root, &pkt.dst),
            )
        }
        (false, true) => (
            geofence::class_trie(&V6_TRIE, &pkt.src),
            geofence::class_trie(&V6_TRIE, &pkt.dst),
        ),
    };
    count(&CLASS_STATS, src_class.wrapping_mul(2), len);
    count(&CLASS_STATS, dst_class.wrapping_mul(2).wrapping_add(1), len);
    let mut j = Judged {
        action: cfg.default_action,
        arg: cfg.default_arg,
        reason: reason::DEFAULT,
        rule: NO_RULE,
        src_class,
        dst_class,
    };
    let Some(rule) = search(pkt, cfg, src_class, dst_class) else {
        return j;
    };
    j.reason = reason::RULE;
    j.rule = rule.0;
    j.action = rule.1;
    j.arg = rule.2;
    count(&RULE_STATS, cfg.rule_base.wrapping_add(rule.0), len);
    j
}

/// Bank `bank`'s part of a hosts table whose slots per bank less one are `mask`.
#[inline(always)]
fn hosts_table<'a, const W: usize>(
    slots: &'a Array<HostSlot<W>>,
    mask: &u32,
    bank: u32,
    cfg: &PolicyConfig,
) -> geofence::Hosts<'a, W> {
    // SAFETY: a read-only global set at load time.
    let mask = unsafe { core::ptr::read_volatile(mask) };
    geofence::Hosts {
        slots,
        mask,
        base: bank.wrapping_mul(mask.wrapping_add(1)),
        seed: cfg.hosts_seed,
    }
}

/// The first rule matching a packet whose addresses are of classes `src_class` and
/// `dst_class`: its position in the policy, action and argument.
#[inline(always)]
fn search(
    pkt: &Packet,
    cfg: &PolicyConfig,
    src_class: u32,
    dst_class: u32,
) -> Option<(u32, u32, u32)> {
    let base = cfg.class_base;
    let (Some(src), Some(dst)) = (
        CLASSES.get(base.wrapping_add(src_class)),
        CLASSES.get(base.wrapping_add(dst_class)),
    ) else {
        return None;
    };
    let mut uninit = MaybeUninit::<Scan>::uninit();
    let p = uninit.as_mut_ptr();
    // SAFETY: every field is written before the reference is made.
    let scan = unsafe {
        fill_words(addr_of_mut!((*p).sets) as *mut u32, MAX_SETS, 0);
        fill_words(addr_of_mut!((*p).summary) as *mut u32, SUMMARY_WORDS * 2, 0);
        addr_of_mut!((*p).n).write(2);
        addr_of_mut!((*p).rule_base).write(cfg.rule_base);
        addr_of_mut!((*p).rule).write(NO_RULE);
        addr_of_mut!((*p).action).write(0);
        addr_of_mut!((*p).arg).write(0);
        &mut *p
    };
    scan.sets[0] = src.src_set;
    scan.sets[1] = dst.dst_set;
    // The other fields, those some rule looks at: a policy of addresses and zones skips
    // this block, and a field no rule looks at (its values all map to every rule) is
    // left out of the search.
    if cfg.fields_used != 0 {
        let mut f = 0;
        let mut n = 2;
        while f < FIELDS {
            if cfg.fields_used & (1 << f) != 0 {
                let index = cfg.field_base.wrapping_add(field_index(1 << f, pkt));
                let set = FIELD_CLASS.get(index)?;
                scan.sets[n & (MAX_SETS - 1)] = *set;
                n += 1;
            }
            f += 1;
        }
        scan.n = n as u32;
    }
    if cfg.rule_words == 1 {
        // Rules of one word: no summary to consult.
        scan.summary[0] = 1;
        scan.step();
    } else if !scan.summarize() {
        return None;
    } else if scan.step() {
        // The first candidate word above; the others, rarely needed, in a bounded loop
        // the verifier checks once.
        // SAFETY: `scan_step` is a bpf_loop callback taking a `Scan` as its context, and
        // `scan` outlives the call.
        unsafe {
            bpf_loop(
                (SUMMARY_WORDS * 64) as u32,
                scan_step as *mut c_void,
                scan as *mut Scan as *mut c_void,
                0,
            );
        }
    }
    if scan.rule == NO_RULE {
        return None;
    }
    Some((scan.rule, scan.action, scan.arg))
}

/// Writes `v` to the `n` words from `p`, one store each. LLVM would turn a run of stores
/// (a struct or array initializer) into a call to compiler_builtins' `memset`, which for
/// BPF is a loop over bytes: hundreds of instructions per packet.
///
/// # Safety
/// `p` must be valid for writing `n` aligned `u32`s.
#[inline(always)]
pub(crate) unsafe fn fill_words(p: *mut u32, n: usize, v: u32) {
    let mut i = 0;
    while i < n {
        // SAFETY: within the caller's `n` words.
        unsafe { p.add(i).write_volatile(v) };
        i += 1;
    }
}

/// Rule sets a packet is matched against: source class, destination class, and one per
/// field.
const MAX_SETS: usize = 2 + FIELDS as usize;

/// The state of the search for the first rule in every one of a packet's sets.
#[repr(C)]
struct Scan {
    /// Set ids: source class, destination class, then the fields some rule looks at.
    sets: [u32; MAX_SETS],
    /// Sets in use.
    n: u32,
    /// Index of the bank's slot 0 in `RULES`.
    rule_base: u32,
    /// AND of the sets' summaries; candidate words are cleared as they are tried, and a
    /// group's words once one of its rules matched.
    summary: [u64; SUMMARY_WORDS],
    /// The earliest matching rule so far (position in the policy), or `NO_RULE`.
    rule: u32,
    /// Its action and argument.
    action: u32,
    arg: u32,
}

impl Scan {
    /// ANDs the summaries of the sets; false if a set is missing.
    #[inline(always)]
    fn summarize(&mut self) -> bool {
        let (mut s0, mut s1, mut s2, mut s3) = (u64::MAX, u64::MAX, u64::MAX, u64::MAX);
        let mut i = 0;
        while i < MAX_SETS {
            if i as u32 >= self.n {
                break;
            }
            let Some(s) = SET_WORDS.get(self.sets[i]) else {
                return false;
            };
            s0 &= s[0];
            s1 &= s[1];
            s2 &= s[2];
            s3 &= s[3];
            i += 1;
        }
        self.summary[0] = s0;
        self.summary[1] = s1;
        self.summary[2] = s2;
        self.summary[3] = s3;
        true
    }

    /// Tries the next candidate word: false when the search is over (no candidate
    /// left), true to go on.
    #[inline(always)]
    fn step(&mut self) -> bool {
        // The lowest candidate, taken out of the summary. Constant indexes: this also runs
        // as a bpf_loop callback, where the verifier does not know which word is next.
        let (k, m) = if self.summary[0] != 0 {
            (0, self.summary[0])
        } else if self.summary[1] != 0 {
            (1, self.summary[1])
        } else if self.summary[2] != 0 {
            (2, self.summary[2])
        } else if self.summary[3] != 0 {
            (3, self.summary[3])
        } else {
            return false;
        };
        let rest = m & m.wrapping_sub(1);
        match k {
            0 => self.summary[0] = rest,
            1 => self.summary[1] = rest,
            2 => self.summary[2] = rest,
            _ => self.summary[3] = rest,
        }
        let w = k * 64 + m.trailing_zeros();
        let mut acc = u64::MAX;
        let mut i = 0;
        while i < MAX_SETS {
            if i as u32 >= self.n {
                break;
            }
            match SET_WORDS.get(self.sets[i]) {
                Some(set) => {
                    acc &= set[SUMMARY_WORDS + (w as usize & (cloudlet_common::SET_WORDS - 1))]
                }
                None => acc = 0,
            }
            i += 1;
        }
        if acc != 0 {
            // The group's first match; its later words can only hold later rules.
            let slot = w * 64 + acc.trailing_zeros();
            let Some(entry) = RULES.get(self.rule_base.wrapping_add(slot)) else {
                return false;
            };
            if entry.rule < self.rule {
                self.rule = entry.rule;
                self.action = entry.action;
                self.arg = entry.arg;
            }
            let end = entry.group_end;
            clear_below(&mut self.summary[0], end, 0);
            clear_below(&mut self.summary[1], end, 64);
            clear_below(&mut self.summary[2], end, 128);
            clear_below(&mut self.summary[3], end, 192);
        }
        // Go on only if candidates are left.
        (self.summary[0] | self.summary[1] | self.summary[2] | self.summary[3]) != 0
    }
}

/// Clears the bits of summary word `s`, which covers words `lo..lo + 64`, below word `end`.
#[inline(always)]
fn clear_below(s: &mut u64, end: u32, lo: u32) {
    if end >= lo + 64 {
        *s = 0;
    } else if end > lo {
        *s &= u64::MAX << (end - lo);
    }
}

/// `bpf_loop` callback: one candidate word per call; 1 stops the loop.
extern "C" fn scan_step(_index: u64, ctx: *mut c_void) -> i64 {
    // SAFETY: `judge` passes its `Scan`, alive for the whole loop.
    let scan = unsafe { &mut *(ctx as *mut Scan) };
    i64::from(!scan.step())
}

/// Number of `field::USED_*` bits.
const FIELDS: u32 = 6;

/// Index in `FIELD_CLASS` of the packet's value of field `bit` (one `field::USED_*`).
#[inline(always)]
fn field_index(bit: u32, pkt: &Packet) -> u32 {
    let l4 = pkt.flags & decision_flags::L4_PARSED != 0;
    let ports = l4 && (pkt.l4_proto == 6 || pkt.l4_proto == 17);
    match bit {
        field::USED_PROTO => field::PROTO_BASE + (pkt.l4_proto & 0xff),
        field::USED_SRC_PORT if ports => field::SRC_PORT_BASE + (pkt.src_port & 0xffff),
        field::USED_SRC_PORT => field::SRC_PORT_BASE + field::NO_PORT,
        field::USED_DST_PORT if ports => field::DST_PORT_BASE + (pkt.dst_port & 0xffff),
        field::USED_DST_PORT => field::DST_PORT_BASE + field::NO_PORT,
        field::USED_VLAN if pkt.vlan_tags > 0 => field::VLAN_BASE + (pkt.vlan_outer & 0xfff),
        field::USED_VLAN => field::VLAN_BASE + field::UNTAGGED,
        field::USED_TCP_FLAGS if l4 && pkt.l4_proto == 6 => {
            field::TCP_FLAGS_BASE + (pkt.tcp_flags & 0xff)
        }
        field::USED_TCP_FLAGS => field::TCP_FLAGS_BASE + field::NOT_TCP,
        _ => field::IP_VERSION_BASE + u32::from(pkt.ip_version == 6),
    }
}

/// Carries out an action, returning the XDP code.
#[inline(always)]
fn apply(ctx: &XdpContext, act: u32, arg: u32) -> u32 {
    match act {
        action::DROP => xdp_action::XDP_DROP,
        action::TX => {
            let start = ctx.data();
            if start + 12 > ctx.data_end() {
                return xdp_action::XDP_DROP;
            }
            // SAFETY: the 12 bytes of the two MAC addresses are inside the frame.
            unsafe {
                let p = start as *mut [u8; 6];
                let dst = p.read_unaligned();
                let src = p.add(1).read_unaligned();
                p.write_unaligned(src);
                p.add(1).write_unaligned(dst);
            }
            xdp_action::XDP_TX
        }
        // A missing map entry falls back to the low bits of the flags: drop.
        action::REDIRECT => REDIRECT_DEVICES
            .redirect(arg, u64::from(xdp_action::XDP_DROP))
            .unwrap_or_else(|c| c),
        action::CPU => REDIRECT_CPUS
            .redirect(arg, u64::from(xdp_action::XDP_DROP))
            .unwrap_or_else(|c| c),
        action::XSK => crate::xsk::redirect(ctx, arg),
        _ => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
pub(crate) fn count(map: &aya_ebpf::maps::PerCpuArray<Counter>, index: u32, len: u64) {
    if let Some(c) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot from the map; no other context on this CPU runs concurrently
        // with an XDP program.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += len;
        }
    }
}
