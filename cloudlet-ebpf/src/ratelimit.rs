//! Rate limits: token buckets kept as theoretical arrival times (GCRA), one per rule or
//! one per source address. Updates are not atomic across CPUs: two CPUs admitting at the
//! same instant can both pass, so a limit can be exceeded by at most one packet per CPU
//! per interval, never undershot.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use cloudlet_common::{RateKey, action, stat};

use crate::{RATE_LIMITS, RATE_RULE_TAT, RATE_SOURCE_TAT, STATS, parse::Packet, rules::count};

/// The action a `rate_limit` resolves to for this packet: pass within the rate, the
/// limit's over-action beyond it.
#[inline(always)]
pub fn resolve(limit: u32, pkt: &Packet, len: u64) -> (u32, u32) {
    let Some(p) = RATE_LIMITS.get(limit) else {
        return (action::DROP, 0);
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let tat = if p.per_source != 0 {
        let key = RateKey {
            limit,
            addr: pkt.src,
        };
        if RATE_SOURCE_TAT.get_ptr_mut(&key).is_none() {
            // A new source starts with a full bucket. A failed insert (a race with another
            // CPU) is harmless: the lookup below finds the other CPU's entry.
            let _ = RATE_SOURCE_TAT.insert(&key, &now, 0);
        }
        RATE_SOURCE_TAT.get_ptr_mut(&key)
    } else {
        RATE_RULE_TAT.get_ptr_mut(limit)
    };
    let Some(tat) = tat else {
        return (action::DROP, 0);
    };
    // SAFETY: a pointer into the map's value, valid for this program run.
    let current = unsafe { *tat };
    let start = if current > now { current } else { now };
    if start - now > p.tolerance_ns {
        count(&STATS, stat::RATE_LIMITED, len);
        return (p.over_action, 0);
    }
    // SAFETY: as above.
    unsafe { *tat = start + p.interval_ns };
    (action::PASS, 0)
}
