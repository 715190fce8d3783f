//! The packet benchmarks' traffic generator. Run through `BPF_PROG_TEST_RUN` in live-frames
//! mode (`BPF_F_TEST_XDP_LIVE_FRAMES`) on one end of a veth pair, it writes the next of the
//! headers user space put in `GEN_HEADERS` over the start of each frame and sends it out
//! with `XDP_TX`, so the other end receives a mix of sources, destinations, families and
//! ports at several million frames a second, with no socket or stack in the way.

use aya_ebpf::{
    bindings::xdp_action,
    macros::map,
    maps::{Array, PerCpuArray},
    programs::XdpContext,
};
use cloudlet_common::{GenHeader, trafficgen::HEADER_BYTES};

/// The headers to cycle through. Sized (and filled) by the benchmark.
#[map]
static GEN_HEADERS: Array<GenHeader> = Array::with_max_entries(1, 0);

/// Per CPU, the index of the next header.
#[map]
static GEN_NEXT: PerCpuArray<u32> = PerCpuArray::with_max_entries(1, 0);

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let Some(next) = GEN_NEXT.get_ptr_mut(0) else {
        return xdp_action::XDP_ABORTED;
    };
    // SAFETY: this CPU's slot of a per-CPU map.
    let i = unsafe { *next };
    let header = match GEN_HEADERS.get(i) {
        Some(h) => {
            // SAFETY: as above.
            unsafe { *next = i + 1 };
            h
        }
        // Past the last header: start over.
        None => match GEN_HEADERS.get(0) {
            Some(h) => {
                // SAFETY: as above.
                unsafe { *next = 1 };
                h
            }
            None => return xdp_action::XDP_ABORTED,
        },
    };
    let start = ctx.data();
    if start + HEADER_BYTES > ctx.data_end() {
        return xdp_action::XDP_ABORTED;
    }
    let dst = start as *mut u64;
    let src = header.bytes.as_ptr() as *const u64;
    let mut k = 0;
    while k < HEADER_BYTES / 8 {
        // SAFETY: the frame holds HEADER_BYTES bytes from `start` (checked above), and the
        // map value is HEADER_BYTES long.
        unsafe { dst.add(k).write_unaligned(src.add(k).read_unaligned()) };
        k += 1;
    }
    xdp_action::XDP_TX
}
