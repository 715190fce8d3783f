//! Sampled drop events: a per-CPU budget (GCRA, no races: one bucket per CPU) decides
//! whether a drop is also reported through the ring buffer. Only drops are reported, and
//! never more than `EVENTS_PER_SECOND` per CPU, so the per-packet path stays cheap.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use cloudlet_common::{DropEvent, EVENT_BURST, EVENTS_PER_SECOND};

use crate::{EVENT_TAT, EVENTS};

const INTERVAL_NS: u64 = 1_000_000_000 / EVENTS_PER_SECOND;
const TOLERANCE_NS: u64 = INTERVAL_NS * (EVENT_BURST - 1);

/// Whether this CPU may send an event now (and if so, spends the budget).
#[inline(always)]
fn allowed() -> bool {
    let Some(tat) = EVENT_TAT.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments; a per-CPU slot only this CPU touches.
    unsafe {
        let now = bpf_ktime_get_ns();
        let start = if *tat > now { *tat } else { now };
        if start - now > TOLERANCE_NS {
            return false;
        }
        *tat = start + INTERVAL_NS;
    }
    true
}

/// Reports a drop if the budget allows; `fill` writes the packet's facts.
#[inline(always)]
pub fn report(ctx: &XdpContext, fill: impl FnOnce(&mut DropEvent)) {
    if !allowed() {
        return;
    }
    let Some(mut slot) = EVENTS.reserve::<DropEvent>(0) else {
        return;
    };
    let mut e = DropEvent {
        // SAFETY: a helper without arguments.
        ktime_ns: unsafe { bpf_ktime_get_ns() },
        len: (ctx.data_end() - ctx.data()) as u32,
        ifindex: ctx.ingress_ifindex() as u32,
        ..DropEvent::default()
    };
    fill(&mut e);
    slot.write(e);
    slot.submit(0);
}
