//! The dataplane: compile a policy into the XDP program's maps, load and attach it,
//! swap policies, run it on test frames, read its counters.

pub mod classify;
pub mod compile;
pub mod events;
pub mod metrics;
pub mod stats;
pub mod xsk;

use std::time::{Duration, Instant};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, LpmTrie, MapError, lpm_trie::Key},
    programs::{ProgramError, Xdp, XdpMode, xdp::XdpLink},
};
use cloudlet_common::{AddrClass, FlatChunk, PolicyConfig, RuleEntry};

pub use compile::{CompileError, CompiledPolicy, compile};

/// Errors from loading, filling, attaching or reading the XDP program.
#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    /// The eBPF object failed to load (a map could not be created, the verifier refused).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("{what}: {source}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    /// Reading or writing a map failed.
    #[error("map {map}: {source}")]
    Map {
        map: &'static str,
        #[source]
        source: MapError,
    },
    /// The interface to attach to does not exist (in this network namespace).
    #[error("no interface named {0}")]
    NoInterface(String),
    /// A `cpu` action names a CPU this machine does not have.
    #[error("cpu {cpu} does not exist (this machine has {count})")]
    NoCpu { cpu: u32, count: usize },
    /// A redirect target could not be entered into its map.
    #[error("redirect target {target}: {source}")]
    Redirect {
        target: String,
        #[source]
        source: aya::maps::xdp::XdpMapError,
    },
    /// A map or program the object should have is missing.
    #[error("the eBPF object has no {0}")]
    Missing(&'static str),
}

fn map_err(map: &'static str) -> impl FnOnce(MapError) -> DataplaneError {
    move |source| DataplaneError::Map { map, source }
}

/// Which program of the object to load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProgramKind {
    /// The policy program (flat address tables).
    Policy,
    /// The policy program with LPM tries instead of flat tables (for comparison).
    PolicyLpm,
    /// Parses, then passes (benchmark baseline).
    ParseOnly,
    /// Returns XDP_PASS (benchmark baseline).
    Noop,
}

impl ProgramKind {
    /// The program's name in the object.
    pub const fn program_name(self) -> &'static str {
        match self {
            Self::Policy => "cloudlet",
            Self::PolicyLpm => "cloudlet_lpm",
            Self::ParseOnly => "cloudlet_parse",
            Self::Noop => "cloudlet_noop",
        }
    }
}

/// How to attach to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// Native (driver) mode, falling back to generic mode with a warning.
    #[default]
    Auto,
    /// Native mode only.
    Native,
    /// Generic (SKB) mode only.
    Generic,
}

/// Time spent loading, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct LoadTimings {
    /// Creating maps and loading (verifying) the program.
    pub load: Duration,
    /// Filling the maps.
    pub fill: Duration,
}

/// A loaded (not necessarily attached) program with its filled maps.
pub struct Loaded {
    ebpf: Ebpf,
    kind: ProgramKind,
    pub timings: LoadTimings,
}

impl Loaded {
    /// Creates the maps sized for `compiled`, fills them and loads program `kind`.
    /// `trace` makes the program record each decision (for `classify`).
    pub fn new(
        compiled: &CompiledPolicy,
        kind: ProgramKind,
        trace: bool,
    ) -> Result<Self, DataplaneError> {
        raise_memlock_limit();
        let started = Instant::now();
        let lpm = kind == ProgramKind::PolicyLpm;
        let classes = compiled.classes.len().max(1) as u32;
        // Size only the structures this program uses; the others get one entry.
        let size = |used: bool, n: usize| if used { n.max(1) as u32 } else { 1 };
        let trace_flag = u32::from(trace);
        let ebpf = EbpfLoader::new()
            .map_max_entries("CLASSES", classes)
            .map_max_entries("CLASS_STATS", classes * 2)
            .map_max_entries("FIELD_RULES", compiled.field_rules.len().max(1) as u32)
            .map_max_entries("RATE_LIMITS", compiled.rate_limits.len().max(1) as u32)
            .map_max_entries("RATE_RULE_TAT", compiled.rate_limits.len().max(1) as u32)
            .map_max_entries("V4_TABLE", size(!lpm, compiled.v4_chunks.len()))
            .map_max_entries("V6_TABLE", size(!lpm, compiled.v6_chunks.len()))
            .map_max_entries("V4_TRIE", size(lpm, compiled.v4_prefixes.len()))
            .map_max_entries("V6_TRIE", size(lpm, compiled.v6_prefixes.len()))
            .override_global("TRACE", &trace_flag, true)
            .load(crate::EBPF_OBJECT)?;
        let mut loaded = Self {
            ebpf,
            kind,
            timings: LoadTimings::default(),
        };
        let fill_started = Instant::now();
        loaded.fill(compiled, lpm)?;
        loaded.timings.fill = fill_started.elapsed();
        loaded
            .program_mut()?
            .load()
            .map_err(|source| DataplaneError::Program {
                what: format!("loading program {}", kind.program_name()),
                source,
            })?;
        loaded.timings.load = started.elapsed() - loaded.timings.fill;
        Ok(loaded)
    }

    /// The loaded program.
    pub fn program_mut(&mut self) -> Result<&mut Xdp, DataplaneError> {
        let name = self.kind.program_name();
        self.ebpf
            .program_mut(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("program {name}"),
                source,
            })
    }

    /// The program, read-only (for `test_run`).
    pub fn program(&self) -> Result<&Xdp, DataplaneError> {
        let name = self.kind.program_name();
        self.ebpf
            .program(name)
            .ok_or(DataplaneError::Missing(name))?
            .try_into()
            .map_err(|source| DataplaneError::Program {
                what: format!("program {name}"),
                source,
            })
    }

    /// The eBPF object (maps).
    pub fn ebpf(&self) -> &Ebpf {
        &self.ebpf
    }

    fn fill(&mut self, c: &CompiledPolicy, lpm: bool) -> Result<(), DataplaneError> {
        let e = &mut self.ebpf;
        let mut config: Array<_, PolicyConfig> = Array::try_from(
            e.map_mut("CONFIG")
                .ok_or(DataplaneError::Missing("map CONFIG"))?,
        )
        .map_err(map_err("CONFIG"))?;
        config.set(0, c.config, 0).map_err(map_err("CONFIG"))?;

        let mut rules: Array<_, RuleEntry> = Array::try_from(
            e.map_mut("RULES")
                .ok_or(DataplaneError::Missing("map RULES"))?,
        )
        .map_err(map_err("RULES"))?;
        for (i, r) in c.rules.iter().enumerate() {
            rules.set(i as u32, r, 0).map_err(map_err("RULES"))?;
        }

        let mut classes: Array<_, AddrClass> = Array::try_from(
            e.map_mut("CLASSES")
                .ok_or(DataplaneError::Missing("map CLASSES"))?,
        )
        .map_err(map_err("CLASSES"))?;
        for (i, class) in c.classes.iter().enumerate() {
            classes
                .set(i as u32, class, 0)
                .map_err(map_err("CLASSES"))?;
        }

        fill_redirects(e, c)?;
        if !c.rate_limits.is_empty() {
            fill_array(e, "RATE_LIMITS", &c.rate_limits)?;
        }
        if !c.field_class.is_empty() {
            fill_array(e, "FIELD_CLASS", &c.field_class)?;
            fill_array(e, "FIELD_RULES", &c.field_rules)?;
        }
        if lpm {
            fill_lpm(e, "V4_TRIE", &c.v4_prefixes)?;
            fill_lpm(e, "V6_TRIE", &c.v6_prefixes)?;
        } else {
            fill_flat(e, "V4_TABLE", &c.v4_chunks)?;
            fill_flat(e, "V6_TABLE", &c.v6_chunks)?;
        }
        Ok(())
    }

    /// Attaches to `iface`, returning the link (dropping it detaches) and the mode used.
    pub fn attach(
        &mut self,
        iface: &str,
        mode: AttachMode,
    ) -> Result<(XdpLink, AttachMode), DataplaneError> {
        if !interface_exists(iface) {
            return Err(DataplaneError::NoInterface(iface.to_string()));
        }
        let prog = self.program_mut()?;
        let attach = |prog: &mut Xdp, m: XdpMode| {
            let name = if m == XdpMode::Skb {
                "generic"
            } else {
                "native"
            };
            prog.attach(iface, m)
                .and_then(|id| prog.take_link(id))
                .map_err(|source| DataplaneError::Program {
                    what: format!("attaching to {iface} in {name} mode"),
                    source,
                })
        };
        match mode {
            AttachMode::Native => attach(prog, XdpMode::Driver).map(|l| (l, AttachMode::Native)),
            AttachMode::Generic => attach(prog, XdpMode::Skb).map(|l| (l, AttachMode::Generic)),
            AttachMode::Auto => match attach(prog, XdpMode::Driver) {
                Ok(l) => Ok((l, AttachMode::Native)),
                Err(e) => {
                    log::warn!("{e}; falling back to generic (SKB) mode, which is much slower");
                    attach(prog, XdpMode::Skb).map(|l| (l, AttachMode::Generic))
                }
            },
        }
    }

    /// Moves an attachment made by another `Loaded` onto this program in one step
    /// (`BPF_LINK_UPDATE`): the interface is never without a program.
    pub fn take_over(&mut self, link: XdpLink) -> Result<XdpLink, DataplaneError> {
        let prog = self.program_mut()?;
        prog.attach_to_link(link)
            .and_then(|id| prog.take_link(id))
            .map_err(|source| DataplaneError::Program {
                what: "replacing the attached program".to_string(),
                source,
            })
    }

    /// Takes the program's drop-event ring buffer (once).
    pub fn take_events(&mut self) -> Option<aya::maps::RingBuf<aya::maps::MapData>> {
        self.ebpf
            .take_map("EVENTS")
            .and_then(|m| aya::maps::RingBuf::try_from(m).ok())
    }

    /// Enters an AF_XDP socket into the program's maps: `fd`, bound to queue `queue` of
    /// interface `ifindex`, which takes socket slot `slot` (see `cloudlet_common::xsk`).
    pub fn register_xsk(
        &mut self,
        slot: u32,
        ifindex: u32,
        queue: u32,
        fd: std::os::fd::RawFd,
    ) -> Result<(), DataplaneError> {
        let mut interfaces: aya::maps::HashMap<_, u32, u32> = aya::maps::HashMap::try_from(
            self.ebpf
                .map_mut("XSK_INTERFACES")
                .ok_or(DataplaneError::Missing("map XSK_INTERFACES"))?,
        )
        .map_err(map_err("XSK_INTERFACES"))?;
        interfaces
            .insert(ifindex, slot, 0)
            .map_err(map_err("XSK_INTERFACES"))?;
        let mut sockets = aya::maps::XskMap::try_from(
            self.ebpf
                .map_mut("XSK_SOCKETS")
                .ok_or(DataplaneError::Missing("map XSK_SOCKETS"))?,
        )
        .map_err(map_err("XSK_SOCKETS"))?;
        sockets
            .set(cloudlet_common::xsk::index(slot, queue), fd, 0)
            .map_err(map_err("XSK_SOCKETS"))
    }

    /// Reads the counters, folded by rule and zone names of `compiled`.
    pub fn stats(&self, compiled: &CompiledPolicy) -> Result<stats::Stats, DataplaneError> {
        stats::read(&self.ebpf, compiled)
    }
}

fn interface_index(iface: &str) -> Option<u32> {
    let name = std::ffi::CString::new(iface).ok()?;
    // SAFETY: a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

fn interface_exists(iface: &str) -> bool {
    interface_index(iface).is_some()
}

/// Kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK; later ones ignore it.
fn raise_memlock_limit() {
    let rlim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit with a valid pointer; failure only matters on old kernels.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &rlim) };
    if ret != 0 {
        log::debug!(
            "setrlimit(RLIMIT_MEMLOCK) failed: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn batch_err(map: &'static str) -> impl FnOnce(std::io::Error) -> DataplaneError {
    move |io_error| DataplaneError::Map {
        map,
        source: MapError::SyscallError(aya::sys::SyscallError {
            call: "bpf_map_update_batch",
            io_error,
        }),
    }
}

/// Enters the interfaces of `redirect` actions (by ifindex, resolved now, in this network
/// namespace) and a queue for each CPU of a `cpu` action.
fn fill_redirects(ebpf: &mut Ebpf, c: &CompiledPolicy) -> Result<(), DataplaneError> {
    use aya::maps::{CpuMap, DevMap};
    if !c.redirect_devices.is_empty() {
        let mut devices = DevMap::try_from(
            ebpf.map_mut("REDIRECT_DEVICES")
                .ok_or(DataplaneError::Missing("map REDIRECT_DEVICES"))?,
        )
        .map_err(map_err("REDIRECT_DEVICES"))?;
        for (i, iface) in c.redirect_devices.iter().enumerate() {
            let index =
                interface_index(iface).ok_or_else(|| DataplaneError::NoInterface(iface.clone()))?;
            devices
                .set(i as u32, index, None, 0)
                .map_err(|source| DataplaneError::Redirect {
                    target: iface.clone(),
                    source,
                })?;
        }
    }
    if !c.redirect_cpus.is_empty() {
        let count = aya::util::nr_cpus().map_err(|(_, e)| DataplaneError::Map {
            map: "REDIRECT_CPUS",
            source: MapError::SyscallError(aya::sys::SyscallError {
                call: "nr_cpus",
                io_error: e,
            }),
        })?;
        let mut cpus = CpuMap::try_from(
            ebpf.map_mut("REDIRECT_CPUS")
                .ok_or(DataplaneError::Missing("map REDIRECT_CPUS"))?,
        )
        .map_err(map_err("REDIRECT_CPUS"))?;
        for &cpu in &c.redirect_cpus {
            if cpu as usize >= count {
                return Err(DataplaneError::NoCpu { cpu, count });
            }
            // 2048 frames of queue, the size the kernel's samples use.
            cpus.set(cpu, 2048, None, 0)
                .map_err(|source| DataplaneError::Redirect {
                    target: format!("cpu {cpu}"),
                    source,
                })?;
        }
    }
    Ok(())
}

/// Writes `values` at indexes 0.. of an array map.
fn fill_array<V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
    values: &[V],
) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let keys: Vec<u32> = (0..values.len() as u32).collect();
    let batched = match &*map {
        aya::maps::Map::Array(data) => {
            update_batch(data, &keys, values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut array: Array<_, V> = Array::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(values) {
            array.set(*k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Fills a flat table with its chunks (chunks of class 0 only are already zero).
fn fill_flat(
    ebpf: &mut Ebpf,
    name: &'static str,
    chunks: &[FlatChunk],
) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let (keys, values): (Vec<u32>, Vec<FlatChunk>) = chunks
        .iter()
        .enumerate()
        .filter(|(_, c)| c.iter().any(|e| *e != 0))
        .map(|(i, c)| (i as u32, *c))
        .unzip();
    let batched = match &*map {
        aya::maps::Map::Array(data) => {
            update_batch(data, &keys, &values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut table: Array<_, FlatChunk> = Array::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(&values) {
            table.set(*k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// Fills an LPM trie map with `entries`: in batches where the kernel supports it, one
/// update per entry where not.
fn fill_lpm<const N: usize>(
    ebpf: &mut Ebpf,
    name: &'static str,
    entries: &[compile::LpmEntry<N>],
) -> Result<(), DataplaneError> {
    let map = ebpf.map_mut(name).ok_or(DataplaneError::Missing(name))?;
    let keys: Vec<Key<[u8; N]>> = entries
        .iter()
        .map(|p| Key::new(u32::from(p.len), p.addr))
        .collect();
    let values: Vec<u32> = entries.iter().map(|p| p.class).collect();
    let batched = match &*map {
        aya::maps::Map::LpmTrie(data) => {
            update_batch(data, &keys, &values).map_err(batch_err(name))?
        }
        _ => false,
    };
    if !batched {
        let mut trie: LpmTrie<_, [u8; N], u32> = LpmTrie::try_from(map).map_err(map_err(name))?;
        for (k, v) in keys.iter().zip(&values) {
            trie.insert(k, v, 0).map_err(map_err(name))?;
        }
    }
    Ok(())
}

/// `BPF_MAP_UPDATE_BATCH` (kernel 5.6+): writes many entries in one syscall. Returns
/// `Ok(false)` when the map type has no batch support, so callers fall back to single
/// updates.
fn update_batch<K: Copy, V: Copy>(
    map: &aya::maps::MapData,
    keys: &[K],
    values: &[V],
) -> std::io::Result<bool> {
    use std::os::fd::{AsFd as _, AsRawFd as _};
    #[repr(C)]
    #[derive(Default)]
    struct BatchAttr {
        in_batch: u64,
        out_batch: u64,
        keys: u64,
        values: u64,
        count: u32,
        map_fd: u32,
        elem_flags: u64,
        flags: u64,
    }
    const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
    debug_assert_eq!(keys.len(), values.len());
    let fd = map.fd().as_fd().as_raw_fd();
    let mut done = 0usize;
    while done < keys.len() {
        let n = (keys.len() - done).min(1 << 16);
        let mut attr = BatchAttr {
            keys: keys[done..].as_ptr() as u64,
            values: values[done..].as_ptr() as u64,
            count: n as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: attr points to key and value arrays of `count` entries each, laid out
        // as the map's key and value types; the kernel writes back only `count`.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_UPDATE_BATCH,
                &mut attr as *mut BatchAttr,
                std::mem::size_of::<BatchAttr>() as u32,
            )
        };
        if ret != 0 {
            let err = std::io::Error::last_os_error();
            if done == 0 && matches!(err.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | 524)) {
                return Ok(false);
            }
            return Err(err);
        }
        done += n;
    }
    Ok(true)
}
