//! The traffic generator of the packet benchmarks: Cloudlet's `cloudlet_trafficgen` XDP
//! program run through `BPF_PROG_TEST_RUN` in live-frames mode (`BPF_F_TEST_XDP_LIVE_FRAMES`,
//! kernel 5.18 and later). The kernel builds real frames from the input, the program writes
//! the next prepared header over each and returns `XDP_TX`, which the test run turns into a
//! transmission out of the interface given as the frames' ingress: into the peer of a veth
//! pair, at millions of frames a second, with no socket or stack in the way.

use std::{
    os::fd::{AsFd as _, AsRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use aya::{
    EbpfLoader,
    maps::Array,
    programs::{ProgramFd, Xdp},
};
use cloudlet_common::{GenHeader, trafficgen::HEADER_BYTES};

/// `BPF_F_TEST_XDP_LIVE_FRAMES`.
const LIVE_FRAMES: u32 = 1 << 1;

/// The generator program, loaded with its headers.
pub struct Generator {
    _ebpf: aya::Ebpf,
    prog: OwnedFd,
    frame_len: usize,
}

impl Generator {
    /// Loads the generator with `frames` (at least one, all of the same length, at least
    /// [`HEADER_BYTES`] long, checksums computed for a payload of zeros): each sent frame is
    /// the next of them, in turn.
    pub fn new(frames: &[Vec<u8>]) -> Result<Self> {
        let Some(first) = frames.first() else {
            bail!("the generator needs at least one frame");
        };
        let frame_len = first.len();
        if frame_len < HEADER_BYTES || frames.iter().any(|f| f.len() != frame_len) {
            bail!("generator frames must all be {frame_len} bytes, at least {HEADER_BYTES}");
        }
        if frames
            .iter()
            .any(|f| f[HEADER_BYTES..].iter().any(|b| *b != 0))
        {
            bail!("generator frames carry zeros past their first {HEADER_BYTES} bytes");
        }
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("GEN_HEADERS", frames.len() as u32)
            .load(cloudlet::EBPF_OBJECT)
            .context("loading the traffic generator")?;
        let mut headers: Array<_, GenHeader> = Array::try_from(
            ebpf.map_mut("GEN_HEADERS")
                .context("the object has no GEN_HEADERS map")?,
        )?;
        for (i, f) in frames.iter().enumerate() {
            let mut h = GenHeader::default();
            h.bytes.copy_from_slice(&f[..HEADER_BYTES]);
            headers.set(i as u32, h, 0)?;
        }
        let prog: &mut Xdp = ebpf
            .program_mut("cloudlet_trafficgen")
            .context("the object has no cloudlet_trafficgen program")?
            .try_into()?;
        prog.load()?;
        let fd: &ProgramFd = prog.fd()?;
        let prog = fd.as_fd().try_clone_to_owned()?;
        Ok(Self {
            _ebpf: ebpf,
            prog,
            frame_len,
        })
    }

    /// Sends `count` frames out of interface `ifindex`, which must be in the calling
    /// thread's network namespace. Returns the time the kernel took.
    pub fn send(&self, ifindex: u32, count: u32) -> Result<Duration> {
        let frame = vec![0u8; self.frame_len];
        let ctx = XdpMd {
            data_end: self.frame_len as u32,
            ingress_ifindex: ifindex,
            ..Default::default()
        };
        let mut attr = TestAttr {
            prog_fd: self.prog.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: count,
            ctx_size_in: std::mem::size_of::<XdpMd>() as u32,
            ctx_in: &ctx as *const XdpMd as u64,
            flags: LIVE_FRAMES,
            ..Default::default()
        };
        let started = Instant::now();
        // SAFETY: attr points to the frame and the context, which outlive the call; no
        // output buffers.
        unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }
            .context("BPF_PROG_TEST_RUN in live-frames mode")?;
        Ok(started.elapsed())
    }
}

/// `struct xdp_md`, the context of an XDP test run.
#[repr(C)]
#[derive(Default)]
struct XdpMd {
    data: u32,
    data_end: u32,
    data_meta: u32,
    ingress_ifindex: u32,
    rx_queue_index: u32,
    egress_ifindex: u32,
}

/// The `test` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct TestAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_GET_FD_BY_ID: libc::c_long = 13;

/// The bpf(2) system call with `attr`.
///
/// # Safety
/// Every pointer in `attr` must be valid for what command `cmd` does with it.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> std::io::Result<i64> {
    // SAFETY: the caller's promise.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            std::mem::size_of::<T>() as u32,
        )
    };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(ret)
}

/// A file descriptor of the loaded program with id `id` (a program another tool loaded).
pub fn program_by_id(id: u32) -> Result<OwnedFd> {
    #[repr(C)]
    struct GetFd {
        prog_id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let mut attr = GetFd {
        prog_id: id,
        next_id: 0,
        open_flags: 0,
    };
    // SAFETY: no pointers in the attribute.
    let fd = unsafe { bpf(BPF_PROG_GET_FD_BY_ID, &mut attr) }
        .with_context(|| format!("no program with id {id}"))?;
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) })
}

/// One `BPF_PROG_TEST_RUN` (not live: the frame goes nowhere) of XDP program `prog` on
/// `frame`, `repeat` times: the program's return code and the kernel's mean ns per run.
pub fn test_run(
    prog: std::os::fd::BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
) -> Result<(u32, u32)> {
    let mut attr = TestAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat,
        ..Default::default()
    };
    // SAFETY: attr points to the frame, which outlives the call; no output buffers.
    unsafe { bpf(BPF_PROG_TEST_RUN, &mut attr) }.context("BPF_PROG_TEST_RUN")?;
    Ok((attr.retval, attr.duration))
}

/// Mean ns per frame of XDP program `prog` over `frames`, each run `repeat` times.
pub fn program_ns_per_packet(
    prog: std::os::fd::BorrowedFd<'_>,
    frames: &[Vec<u8>],
    repeat: u32,
) -> Result<f64> {
    let mut total = 0u64;
    for f in frames {
        total += u64::from(test_run(prog, f, repeat)?.1);
    }
    Ok(total as f64 / frames.len().max(1) as f64)
}
