//! The `xsk` action: hand the frame to cloudletd's AF_XDP socket.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use cloudlet_common::{stat, xsk};

use crate::{STATS, XSK_INTERFACES, XSK_SOCKETS, rules::count};

/// Redirects the frame to the socket bound to `queue` of the interface it came in on.
///
/// A socket only takes frames received on its own interface and queue (the kernel refuses
/// the others after the program has returned, out of sight of the counters), so a frame
/// received on another queue, or on an interface or queue without a socket, is dropped
/// here and counted as undelivered: the same fallback as `redirect` to a missing device.
#[inline(always)]
pub fn redirect(ctx: &XdpContext, queue: u32) -> u32 {
    if ctx.rx_queue_index() == queue
        // SAFETY: a plain value read from the map.
        && let Some(slot) = unsafe { XSK_INTERFACES.get(&(ctx.ingress_ifindex() as u32)) }
        && let Ok(code) = XSK_SOCKETS.redirect(xsk::index(*slot, queue), 0)
    {
        return code;
    }
    count(
        &STATS,
        stat::XSK_UNDELIVERED,
        (ctx.data_end() - ctx.data()) as u64,
    );
    xdp_action::XDP_DROP
}
