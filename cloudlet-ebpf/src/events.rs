//! Sampled drop events: a per-CPU budget (no races: one per CPU) decides whether a drop is
//! also reported through the ring buffer. The budget counts in windows of jiffies, which
//! cost a memory read, where a nanosecond clock read costs tens of nanoseconds on every
//! drop.

use aya_ebpf::{
    helpers::{bpf_jiffies64, bpf_ktime_get_ns},
    programs::XdpContext,
};
use cloudlet_common::{DropEvent, EVENT_BURST, EVENT_WINDOW_SHIFT};

use crate::{EVENT_BUDGET, EVENTS};

/// Whether this CPU may send an event now (and if so, spends the budget).
#[inline(always)]
fn allowed() -> bool {
    let Some(b) = EVENT_BUDGET.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: a helper without arguments; a per-CPU slot only this CPU touches.
    unsafe {
        let window = bpf_jiffies64() >> EVENT_WINDOW_SHIFT;
        if (*b).window != window {
            (*b).window = window;
            (*b).sent = 0;
        }
        if (*b).sent >= EVENT_BURST {
            return false;
        }
        (*b).sent += 1;
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
    // Filled in place: a DropEvent built on the stack first would take room the rule
    // search needs.
    let p = slot.as_mut_ptr();
    // SAFETY: the reserved entry is valid for writing a DropEvent, and all of it is
    // written (zeroed, then the fields) before the reference is made.
    let e = unsafe {
        crate::rules::fill_words(p as *mut u32, size_of::<DropEvent>() / 4, 0);
        &mut *p
    };
    // SAFETY: helpers without arguments.
    e.ktime_ns = unsafe { bpf_ktime_get_ns() };
    e.len = (ctx.data_end() - ctx.data()) as u32;
    e.ifindex = ctx.ingress_ifindex() as u32;
    fill(e);
    slot.submit(0);
}
