//! Rule evaluation and the verdict: look up both addresses, AND the classes' rule bitmaps
//! (the lowest set bit is the first matching rule), act and count.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use cloudlet_common::{
    Counter, Decision, NO_RULE, PolicyConfig, RULE_WORDS, RuleSet, action, decision_flags, field,
    reason, stat,
};

use crate::{
    CLASS_STATS, CLASSES, CONFIG, FIELD_CLASS, FIELD_RULES, REDIRECT_CPUS, REDIRECT_DEVICES,
    RULE_STATS, RULES, STATS, TRACE, TRACE_DECISION, V4_TABLE, V4_TRIE, V6_TABLE, V6_TRIE, events,
    geofence,
    parse::{self, Packet},
    ratelimit,
};

/// Classifies and judges one frame. `LPM` selects the LPM tries instead of the flat tables.
#[inline(always)]
pub fn run<const LPM: bool>(ctx: &XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let Some(cfg) = CONFIG.get(0) else {
        return xdp_action::XDP_PASS;
    };
    let mut d = Decision {
        rule: NO_RULE,
        ..Decision::default()
    };
    // Addresses, for a drop event (zero when no IP header was parsed).
    let mut addrs = ([0u8; 16], [0u8; 16]);
    let (act, arg) = match parse::parse(ctx) {
        Ok(pkt) => {
            addrs = (pkt.src, pkt.dst);
            let (act, arg) = judge::<LPM>(&pkt, cfg, len, &mut d);
            if act == action::RATE_LIMIT {
                ratelimit::resolve(arg, &pkt, len)
            } else {
                (act, arg)
            }
        }
        Err(u) => {
            d.reason = u.reason;
            d.vlan_tags = u.vlan_tags;
            d.vlan_outer = u.vlan_outer;
            d.ip_version = u.ip_version;
            let act = if u.reason == reason::NON_IP {
                cfg.non_ip_action
            } else {
                cfg.malformed_action
            };
            (act, 0)
        }
    };
    if act == action::DROP {
        // `d` holds what the parser learned either way (ports only when parsed).
        events::report(ctx, |e| {
            e.reason = d.reason;
            e.rule = d.rule;
            e.ip_version = d.ip_version;
            e.l4_proto = d.l4_proto;
            e.src_port = d.src_port;
            e.dst_port = d.dst_port;
            e.src = addrs.0;
            e.dst = addrs.1;
        });
    }
    count(&STATS, stat::reason(d.reason), len);
    count(&STATS, stat::action(act), len);
    let code = apply(ctx, act, arg);
    // SAFETY: TRACE is a read-only global set at load time.
    if unsafe { core::ptr::read_volatile(&TRACE) } != 0 {
        d.action = act;
        d.xdp_code = code;
        if let Some(slot) = TRACE_DECISION.get_ptr_mut(0) {
            // SAFETY: the pointer comes from the map and is valid for writes.
            unsafe { *slot = d };
        }
    }
    code
}

#[inline(always)]
fn judge<const LPM: bool>(
    pkt: &Packet,
    cfg: &PolicyConfig,
    len: u64,
    d: &mut Decision,
) -> (u32, u32) {
    let default_action = (cfg.default_action, cfg.default_arg);
    d.ip_version = pkt.ip_version;
    d.l4_proto = pkt.l4_proto;
    d.vlan_tags = pkt.vlan_tags;
    d.vlan_outer = pkt.vlan_outer;
    d.flags = pkt.flags;
    d.ext_headers = pkt.ext_headers;
    d.src_port = pkt.src_port;
    d.dst_port = pkt.dst_port;
    d.tcp_flags = pkt.tcp_flags;

    let (src_class, dst_class) = match (pkt.ip_version == 4, LPM) {
        (true, false) => (
            geofence::class_flat(&V4_TABLE, &pkt.src_v4()),
            geofence::class_flat(&V4_TABLE, &pkt.dst_v4()),
        ),
        (true, true) => (
            geofence::class_trie(&V4_TRIE, &pkt.src_v4()),
            geofence::class_trie(&V4_TRIE, &pkt.dst_v4()),
        ),
        (false, false) => (
            geofence::class_flat(&V6_TABLE, &pkt.src),
            geofence::class_flat(&V6_TABLE, &pkt.dst),
        ),
        (false, true) => (
            geofence::class_trie(&V6_TRIE, &pkt.src),
            geofence::class_trie(&V6_TRIE, &pkt.dst),
        ),
    };
    d.src_class = src_class;
    d.dst_class = dst_class;
    count(&CLASS_STATS, src_class.wrapping_mul(2), len);
    count(&CLASS_STATS, dst_class.wrapping_mul(2).wrapping_add(1), len);

    d.reason = reason::DEFAULT;
    let (Some(src), Some(dst)) = (CLASSES.get(src_class), CLASSES.get(dst_class)) else {
        return default_action;
    };
    let mut acc: RuleSet = [0; RULE_WORDS];
    let mut w = 0;
    while w < RULE_WORDS {
        acc[w] = src.src_rules[w] & dst.dst_rules[w];
        w += 1;
    }
    // Other fields, only those some rule looks at: a policy of addresses and zones skips
    // this whole block.
    let used = cfg.fields_used;
    if used != 0 {
        let mut f = 0;
        while f < FIELDS {
            let bit = 1 << f;
            if used & bit != 0 {
                let set = FIELD_CLASS
                    .get(field_index(bit, pkt))
                    .and_then(|class| FIELD_RULES.get(*class));
                let Some(set) = set else {
                    return default_action;
                };
                let mut w = 0;
                while w < RULE_WORDS {
                    acc[w] &= set[w];
                    w += 1;
                }
            }
            f += 1;
        }
    }
    let mut w = 0;
    while w < RULE_WORDS {
        let m = acc[w];
        if m != 0 {
            let rule = (w as u32) * 64 + m.trailing_zeros();
            let Some(entry) = RULES.get(rule) else {
                return default_action;
            };
            d.rule = rule;
            d.reason = reason::RULE;
            count(&RULE_STATS, rule, len);
            return (entry.action, entry.arg);
        }
        w += 1;
    }
    default_action
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
