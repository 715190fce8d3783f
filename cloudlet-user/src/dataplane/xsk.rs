//! cloudletd's AF_XDP sockets for `xsk` actions: one per attached interface and receive
//! queue the policy names, each drained by a thread of its own that counts what arrives
//! and, if configured, forwards it out of another interface.
//!
//! The kernel fills a socket's receive ring only with frames of the one interface queue it
//! is bound to. The program finds the socket by the frame's interface and queue (see
//! `cloudlet_common::xsk`); [`XskSockets::register`] enters the sockets into a program's
//! maps, so a program swapped in on reload gets the same sockets.

use std::{
    collections::BTreeMap,
    ffi::CString,
    io,
    mem::{size_of, zeroed},
    num::NonZeroU32,
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd, RawFd},
    ptr::NonNull,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use xdpilone::{IfInfo, RingRx, Socket, SocketConfig, Umem, UmemConfig, User};

use super::{
    interface_index,
    stats::{Count, XskCount},
};

/// Frames of a socket's UMEM; also the size of its fill and receive rings, so every frame
/// fits in the fill ring and a refill never runs out of slots.
const FRAMES: u32 = 1024;
/// Bytes per frame: a page, enough for a 1500-byte MTU frame plus the kernel's headroom.
const FRAME_SIZE: u32 = 4096;
/// Descriptors read from the receive ring at a time.
const BATCH: u32 = 64;
/// How long a receive thread waits for frames before it looks at its stop flag.
const POLL_MS: i32 = 100;

/// Errors from opening sockets.
#[derive(Debug, thiserror::Error)]
pub enum XskError {
    /// An interface to open a socket on (or to forward to) does not exist.
    #[error("no interface named {0}")]
    NoInterface(String),
    /// More interfaces than the program's socket map has slots for.
    #[error("AF_XDP sockets on {count} interfaces; the program has room for {max}")]
    TooManyInterfaces { count: usize, max: u32 },
    /// A step of creating or binding an AF_XDP socket failed.
    #[error("AF_XDP socket on {interface} queue {queue}: {step}: {source}")]
    Socket {
        interface: String,
        queue: u32,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    /// The AF_PACKET socket to forward frames through could not be opened.
    #[error("forwarding socket on {interface}: {source}")]
    Forward {
        interface: String,
        #[source]
        source: io::Error,
    },
    /// The receive thread could not be started.
    #[error("starting the receive thread: {0}")]
    Thread(#[source] io::Error),
}

/// Counters of one interface queue, shared with its receive thread.
#[derive(Debug, Default)]
struct Counters {
    packets: AtomicU64,
    bytes: AtomicU64,
    forwarded_packets: AtomicU64,
    forwarded_bytes: AtomicU64,
    forward_errors: AtomicU64,
    /// Frames the kernel could not put in the receive ring (no free frame, ring full).
    dropped: AtomicU64,
}

/// An AF_PACKET socket that sends frames out of one interface.
#[derive(Debug)]
struct Forward {
    fd: OwnedFd,
}

impl Forward {
    fn open(interface: &str) -> Result<Self, XskError> {
        let err = |source| XskError::Forward {
            interface: interface.to_string(),
            source,
        };
        let ifindex =
            interface_index(interface).ok_or_else(|| XskError::NoInterface(interface.into()))?;
        // SAFETY: plain libc calls with valid arguments; the fd is owned right away.
        unsafe {
            // Protocol 0: the socket sends only and is handed no frames to read.
            let raw = libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0);
            if raw < 0 {
                return Err(err(io::Error::last_os_error()));
            }
            let fd = OwnedFd::from_raw_fd(raw);
            let mut addr: libc::sockaddr_ll = zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = ifindex as i32;
            let ret = libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            );
            if ret != 0 {
                return Err(err(io::Error::last_os_error()));
            }
            Ok(Self { fd })
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<()> {
        // SAFETY: sends `frame.len()` bytes from a valid slice.
        let n = unsafe {
            libc::send(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// Anonymous memory for a UMEM, unmapped on drop.
struct Area(NonNull<[u8]>);

impl Area {
    fn new(len: usize) -> io::Result<Self> {
        // SAFETY: an anonymous private mapping; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let slice = std::ptr::slice_from_raw_parts_mut(ptr.cast::<u8>(), len);
        NonNull::new(slice)
            .map(Self)
            .ok_or_else(|| io::Error::other("mmap returned null"))
    }

    fn base(&self) -> *const u8 {
        self.0.as_ptr().cast::<u8>()
    }
}

impl Drop for Area {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.0.as_ptr().cast(), self.0.len()) };
    }
}

/// One bound socket with its rings. Fields drop in order: the rings and the socket go
/// before the UMEM's memory they point into.
struct Receiver {
    rx: RingRx,
    fill: xdpilone::DeviceQueue,
    user: User,
    _umem: Umem,
    area: Area,
    fd: RawFd,
    zero_copy: bool,
}

fn errno(e: xdpilone::Errno) -> io::Error {
    io::Error::from_raw_os_error(e.get_raw().abs())
}

impl Receiver {
    fn open(interface: &str, queue: u32) -> Result<Self, XskError> {
        let err = |step: &'static str| {
            move |source: io::Error| XskError::Socket {
                interface: interface.to_string(),
                queue,
                step,
                source,
            }
        };
        let area = Area::new((FRAMES * FRAME_SIZE) as usize).map_err(err("mapping the UMEM"))?;
        let config = UmemConfig {
            fill_size: FRAMES,
            complete_size: FRAMES,
            frame_size: FRAME_SIZE,
            headroom: 0,
            flags: 0,
        };
        // SAFETY: the area is page aligned (mmap), FRAMES * FRAME_SIZE long, and outlives
        // the UMEM (field order of `Receiver`).
        let umem = unsafe { Umem::new(config, area.0) }
            .map_err(errno)
            .map_err(err("registering the UMEM"))?;
        let mut info = IfInfo::invalid();
        let name =
            CString::new(interface).map_err(|_| XskError::NoInterface(interface.to_string()))?;
        info.from_name(&name)
            .map_err(|_| XskError::NoInterface(interface.to_string()))?;
        info.set_queue(queue);
        let sock = Socket::with_shared(&info, &umem)
            .map_err(errno)
            .map_err(err("creating the socket"))?;
        let mut fill = umem
            .fq_cq(&sock)
            .map_err(errno)
            .map_err(err("creating the fill and completion rings"))?;
        let user = umem
            .rx_tx(
                &sock,
                &SocketConfig {
                    rx_size: NonZeroU32::new(FRAMES),
                    tx_size: None,
                    // No copy or zero-copy flag: the kernel tries zero-copy and falls back
                    // to copy mode where the driver has none (veth).
                    bind_flags: SocketConfig::XDP_BIND_NEED_WAKEUP,
                },
            )
            .map_err(errno)
            .map_err(err("creating the receive ring"))?;
        let rx = user
            .map_rx()
            .map_err(errno)
            .map_err(err("mapping the receive ring"))?;
        umem.bind(&user).map_err(errno).map_err(|e| {
            if e.raw_os_error() == Some(libc::EBUSY) {
                err("binding (another AF_XDP socket holds this queue)")(e)
            } else {
                err("binding")(e)
            }
        })?;
        // Every frame starts in the fill ring.
        {
            let mut w = fill.fill(FRAMES);
            w.insert((0..u64::from(FRAMES)).map(|i| i * u64::from(FRAME_SIZE)));
            w.commit();
        }
        let fd = user.as_raw_fd();
        let zero_copy = is_zero_copy(fd);
        Ok(Self {
            rx,
            fill,
            user,
            _umem: umem,
            area,
            fd,
            zero_copy,
        })
    }

    /// Receives until `stop` is set.
    fn run(&mut self, counters: &Counters, forward: Option<&Forward>, stop: &AtomicBool) {
        let mut recycled: Vec<u64> = Vec::with_capacity(FRAMES as usize);
        let mut dropped_seen = 0u64;
        let mut stats_at = Instant::now();
        while !stop.load(Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd: self.fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, POLL_MS) };
            loop {
                let mut rx = self.rx.receive(BATCH);
                if rx.capacity() == 0 {
                    break;
                }
                while let Some(desc) = rx.read() {
                    let len = desc.len as usize;
                    // The kernel hands out addresses inside frames it took from the fill
                    // ring; check anyway rather than trust them.
                    let in_area = usize::try_from(desc.addr)
                        .ok()
                        .and_then(|a| a.checked_add(len))
                        .is_some_and(|end| end <= (FRAMES * FRAME_SIZE) as usize);
                    if in_area {
                        counters.packets.fetch_add(1, Ordering::Relaxed);
                        counters.bytes.fetch_add(len as u64, Ordering::Relaxed);
                        if let Some(f) = forward {
                            // SAFETY: the frame lies inside the area (checked above), and
                            // the kernel does not write it until it is back in the fill
                            // ring.
                            let frame = unsafe {
                                std::slice::from_raw_parts(
                                    self.area.base().add(desc.addr as usize),
                                    len,
                                )
                            };
                            match f.send(frame) {
                                Ok(()) => {
                                    counters.forwarded_packets.fetch_add(1, Ordering::Relaxed);
                                    counters
                                        .forwarded_bytes
                                        .fetch_add(len as u64, Ordering::Relaxed);
                                }
                                Err(_) => {
                                    counters.forward_errors.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    recycled.push(desc.addr & !u64::from(FRAME_SIZE - 1));
                }
                rx.release();
                drop(rx);
                // The fill ring holds every frame, so there is room for all of them.
                let mut w = self.fill.fill(recycled.len() as u32);
                let n = w.insert(recycled.iter().copied());
                w.commit();
                drop(w);
                recycled.drain(..n as usize);
            }
            if self.fill.needs_wakeup() {
                self.fill.wake();
            }
            if stats_at.elapsed() >= Duration::from_secs(1) {
                stats_at = Instant::now();
                if let Ok(s) = self.user.statistics_v2() {
                    let total = s.rx_dropped + s.rx_ring_full;
                    counters
                        .dropped
                        .fetch_add(total.saturating_sub(dropped_seen), Ordering::Relaxed);
                    dropped_seen = total;
                }
            }
        }
    }
}

/// Whether the socket was bound in zero-copy mode (`XDP_OPTIONS`).
fn is_zero_copy(fd: RawFd) -> bool {
    const SOL_XDP: libc::c_int = 283;
    const XDP_OPTIONS: libc::c_int = 8;
    const XDP_OPTIONS_ZEROCOPY: u32 = 1;
    let mut flags: u32 = 0;
    let mut len = size_of::<u32>() as libc::socklen_t;
    // SAFETY: getsockopt into a u32 of the given length.
    let ret = unsafe {
        libc::getsockopt(
            fd,
            SOL_XDP,
            XDP_OPTIONS,
            (&mut flags as *mut u32).cast(),
            &mut len,
        )
    };
    ret == 0 && flags & XDP_OPTIONS_ZEROCOPY != 0
}

/// A socket and its receive thread; dropping it stops the thread, which closes the socket
/// (the kernel then takes it out of every socket map).
struct Running {
    ifindex: u32,
    fd: RawFd,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An interface queue.
type Key = (String, u32);

impl Drop for XskSockets {
    fn drop(&mut self) {
        // Stop every thread first; dropping the map then joins them.
        for r in self.running.values() {
            r.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// The node's AF_XDP sockets and their counters.
pub struct XskSockets {
    forward: Option<Arc<Forward>>,
    forward_name: Option<String>,
    running: BTreeMap<Key, Running>,
    /// Counters since start, kept when a socket closes (a reload dropped its queue).
    counters: BTreeMap<Key, Arc<Counters>>,
}

impl XskSockets {
    /// No sockets yet; received frames go out of `forward` if given.
    pub fn new(forward: Option<&str>) -> Result<Self, XskError> {
        Ok(Self {
            forward: forward.map(Forward::open).transpose()?.map(Arc::new),
            forward_name: forward.map(str::to_string),
            running: BTreeMap::new(),
            counters: BTreeMap::new(),
        })
    }

    /// Opens a socket on each of `queues` of each of `interfaces` that has none yet.
    pub fn open(&mut self, interfaces: &[String], queues: &[u32]) -> Result<(), XskError> {
        if !queues.is_empty() && interfaces.len() > cloudlet_common::xsk::MAX_INTERFACES as usize {
            return Err(XskError::TooManyInterfaces {
                count: interfaces.len(),
                max: cloudlet_common::xsk::MAX_INTERFACES,
            });
        }
        for iface in interfaces {
            for &queue in queues {
                let key = (iface.clone(), queue);
                if self.running.contains_key(&key) {
                    continue;
                }
                let counters = self.counters.entry(key.clone()).or_default().clone();
                let running = self.spawn(iface, queue, counters)?;
                self.running.insert(key, running);
            }
        }
        Ok(())
    }

    fn spawn(&self, iface: &str, queue: u32, counters: Arc<Counters>) -> Result<Running, XskError> {
        let ifindex =
            interface_index(iface).ok_or_else(|| XskError::NoInterface(iface.to_string()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let (tx, rx) = mpsc::sync_channel(1);
        let forward = self.forward.clone();
        let thread_stop = stop.clone();
        let name = iface.to_string();
        // The UMEM and rings are not Send: the thread creates and owns them.
        let thread = std::thread::Builder::new()
            .name(format!("xsk-{iface}-{queue}"))
            .spawn(move || match Receiver::open(&name, queue) {
                Ok(mut r) => {
                    let _ = tx.send(Ok((r.fd, r.zero_copy)));
                    r.run(&counters, forward.as_deref(), &thread_stop);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            })
            .map_err(XskError::Thread)?;
        let mut running = Running {
            ifindex,
            fd: -1,
            stop,
            thread: Some(thread),
        };
        match rx.recv() {
            Ok(Ok((fd, zero_copy))) => {
                running.fd = fd;
                log::info!(
                    "AF_XDP socket on {iface} queue {queue} ({} mode){}",
                    if zero_copy { "zero-copy" } else { "copy" },
                    self.forward_name
                        .as_deref()
                        .map(|f| format!(", forwarding to {f}"))
                        .unwrap_or_default()
                );
                Ok(running)
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(XskError::Thread(io::Error::other(
                "the receive thread ended before opening its socket",
            ))),
        }
    }

    /// Closes the sockets of queues not in `queues`; their counters stay.
    pub fn retain(&mut self, queues: &[u32]) {
        // Stop every thread first, so they wind down together rather than one poll
        // timeout after another.
        for ((iface, queue), r) in &self.running {
            if !queues.contains(queue) {
                log::info!("closing the AF_XDP socket on {iface} queue {queue}");
                r.stop.store(true, Ordering::Relaxed);
            }
        }
        self.running.retain(|(_, queue), _| queues.contains(queue));
    }

    /// Enters the sockets of `queues` into a program's maps: interface `interfaces[i]`
    /// takes slot `i`.
    pub fn register(
        &self,
        loaded: &mut super::Loaded,
        interfaces: &[String],
        queues: &[u32],
    ) -> Result<(), super::DataplaneError> {
        for (slot, iface) in interfaces.iter().enumerate() {
            for &queue in queues {
                if let Some(r) = self.running.get(&(iface.clone(), queue)) {
                    loaded.register_xsk(slot as u32, r.ifindex, queue, r.fd)?;
                }
            }
        }
        Ok(())
    }

    /// Counters of every interface queue that had a socket, open or since closed.
    pub fn counts(&self) -> Vec<XskCount> {
        self.counters
            .iter()
            .map(|((iface, queue), c)| {
                let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
                XskCount {
                    interface: iface.clone(),
                    queue: *queue,
                    open: self.running.contains_key(&(iface.clone(), *queue)),
                    received: Count {
                        packets: load(&c.packets),
                        bytes: load(&c.bytes),
                    },
                    forwarded: Count {
                        packets: load(&c.forwarded_packets),
                        bytes: load(&c.forwarded_bytes),
                    },
                    forward_errors: load(&c.forward_errors),
                    dropped: load(&c.dropped),
                }
            })
            .collect()
    }
}
