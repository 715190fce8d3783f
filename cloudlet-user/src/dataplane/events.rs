//! Sampled drop events: read from the program's ring buffer, named, and kept in a bounded
//! history that `/events` and `cloudlet events` read.

use std::{
    collections::VecDeque,
    net::IpAddr,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use aya::maps::{MapData, RingBuf};
use cloudlet_common::{DropEvent, NO_RULE};
use serde::{Deserialize, Serialize};

use super::{CompiledPolicy, stats::reason_name};
use crate::policy::prefix::bits_addr;

/// Events kept for readers.
pub const HISTORY: usize = 4096;

/// A drop, as reported to operators.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Increasing number, for `?since=`.
    pub seq: u64,
    /// When it was dropped, ms since the Unix epoch.
    pub time_ms: u64,
    pub reason: String,
    /// The rule that dropped it, if one did.
    pub rule: Option<String>,
    pub interface: String,
    pub ip_version: Option<u32>,
    pub proto: Option<u32>,
    pub src: Option<String>,
    pub dst: Option<String>,
    pub src_port: Option<u32>,
    pub dst_port: Option<u32>,
    /// Frame length.
    pub len: u32,
}

/// The ring buffer of the running program and the history read from it.
#[derive(Default)]
pub struct EventLog {
    ring: Option<RingBuf<MapData>>,
    history: VecDeque<Event>,
    next_seq: u64,
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid timespec to write to.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn interface_name(index: u32) -> String {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: the buffer holds IF_NAMESIZE bytes, as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return format!("if{index}");
    }
    // SAFETY: if_indextoname wrote a NUL-terminated name into buf.
    unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }
        .to_string_lossy()
        .into_owned()
}

impl EventLog {
    /// Reads from `ring` from now on (the program of a new policy has a new ring).
    pub fn attach(&mut self, ring: RingBuf<MapData>) {
        self.ring = Some(ring);
    }

    /// Moves whatever the ring holds into the history, named after `compiled`.
    pub fn poll(&mut self, compiled: &CompiledPolicy) {
        let Some(ring) = self.ring.as_mut() else {
            return;
        };
        // Wall-clock time of the monotonic clock's zero, to date the events.
        let boot = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Duration::from_nanos(monotonic_ns()));
        while let Some(item) = ring.next() {
            if item.len() < size_of::<DropEvent>() {
                continue;
            }
            // SAFETY: the program writes whole DropEvents; read_unaligned copes with alignment.
            let e: DropEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let ip = e.ip_version == 4 || e.ip_version == 6;
            let addr = |b: [u8; 16]| -> Option<String> {
                ip.then(|| {
                    let bits = if e.ip_version == 4 {
                        u128::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                    } else {
                        u128::from_be_bytes(b)
                    };
                    let a: IpAddr = bits_addr(bits, e.ip_version == 4);
                    a.to_string()
                })
            };
            let ports = ip && matches!(e.l4_proto, 6 | 17) && (e.src_port != 0 || e.dst_port != 0);
            let event = Event {
                seq: self.next_seq,
                time_ms: (boot + Duration::from_nanos(e.ktime_ns)).as_millis() as u64,
                reason: reason_name(e.reason).to_string(),
                rule: (e.rule != NO_RULE)
                    .then(|| compiled.rule_names.get(e.rule as usize).cloned())
                    .flatten(),
                interface: interface_name(e.ifindex),
                ip_version: ip.then_some(e.ip_version),
                proto: ip.then_some(e.l4_proto),
                src: addr(e.src),
                dst: addr(e.dst),
                src_port: ports.then_some(e.src_port),
                dst_port: ports.then_some(e.dst_port),
                len: e.len,
            };
            self.next_seq += 1;
            if self.history.len() == HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(event);
        }
    }

    /// Events numbered after `since` (all kept ones for None).
    pub fn since(&self, since: Option<u64>) -> Vec<Event> {
        self.history
            .iter()
            .filter(|e| since.is_none_or(|s| e.seq > s))
            .cloned()
            .collect()
    }
}
