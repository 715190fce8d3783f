//! A running node's dataplane: the policy in force, its program and attachments, and the
//! swap to a new policy that either fully happens or changes nothing.

use std::{path::Path, time::Instant};

use aya::programs::xdp::XdpLink;

use crate::{
    config::Config,
    dataplane::{
        AttachMode, CompileError, CompiledPolicy, Compiler, DataplaneError, Loaded, ProgramKind,
        events::{Event, EventLog},
        stats::Stats,
        xsk::{XskError, XskSockets},
    },
    geoip::{GeoDb, GeoIpError},
    policy::{self, PolicyError},
};

/// Errors from preparing or applying a policy.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// The configuration names no policy, so there is no dataplane to start.
    #[error("no policy configured")]
    NoPolicy,
    /// The policy file is unreadable or invalid.
    #[error(transparent)]
    Policy(#[from] PolicyError),
    /// The GeoIP database could not be read.
    #[error(transparent)]
    GeoIp(#[from] GeoIpError),
    /// The policy could not be compiled.
    #[error(transparent)]
    Compile(#[from] CompileError),
    /// The program could not be loaded, filled or attached.
    #[error(transparent)]
    Dataplane(#[from] DataplaneError),
    /// An AF_XDP socket of an `xsk` action could not be opened.
    #[error(transparent)]
    Xsk(#[from] XskError),
    /// A link could not be pinned or taken over from its pin.
    #[error("pinning: {0}")]
    Pin(String),
    /// The kernel refused to move an interface onto the new program during a swap: that
    /// interface has no program now; those moved before it run the new policy, the rest
    /// the old one.
    #[error(
        "{interface} lost its program in the swap (interfaces before it run the new policy, the rest the old one): {source}"
    )]
    Swap {
        interface: String,
        #[source]
        source: Box<DataplaneError>,
    },
}

/// Reads, validates and compiles the policy at `path`, opening its GeoIP database if its
/// zones name countries.
pub fn prepare_policy(path: &Path) -> Result<CompiledPolicy, NodeError> {
    let policy = policy::load(path)?;
    compile_with(path, &policy, &mut Compiler::default())
}

/// Compiles `policy` (read from `path`) with `compiler`, opening its GeoIP database if
/// its zones name countries the compiler has not read.
fn compile_with(
    path: &Path,
    policy: &policy::Policy,
    compiler: &mut Compiler,
) -> Result<CompiledPolicy, NodeError> {
    let geo = match (&policy.geoip_database, policy.uses_countries()) {
        (Some(db), true) if !compiler.keeps_classes(policy) => Some(GeoDb::open(db)?),
        _ => None,
    };
    let compiled = compiler.compile(policy, geo.as_ref())?;
    if let Some(geo) = &geo
        && compiled.stats.geo_networks == 0
    {
        log::warn!(
            "{}: no network of the GeoIP database {} is in a country the zones name; records need a top-level `country_code`",
            path.display(),
            geo.path().display()
        );
    }
    Ok(compiled)
}

/// Pinning links under bpffs.
mod pin {
    use std::path::{Path, PathBuf};

    use aya::programs::{
        links::{FdLink, PinnedLink},
        xdp::XdpLink,
    };

    use super::NodeError;

    /// bpffs' magic number (`statfs`).
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

    /// The pin of the link on `iface`.
    pub fn link_path(dir: &Path, iface: &str) -> PathBuf {
        dir.join("links").join(iface)
    }

    fn pin_err(path: &Path, e: impl std::fmt::Display) -> NodeError {
        NodeError::Pin(format!("{}: {e}", path.display()))
    }

    /// Creates `dir/links`, mounting bpffs on /sys/fs/bpf first if `dir` is under it and
    /// nothing is mounted there (the kernel does not mount it by itself).
    pub fn prepare_dir(dir: &Path) -> Result<(), NodeError> {
        let root = Path::new("/sys/fs/bpf");
        if dir.starts_with(root) && !is_bpffs(root) {
            let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
            let (src, target, fstype) = (c("bpf"), c("/sys/fs/bpf"), c("bpf"));
            // SAFETY: valid NUL-terminated strings, no data argument.
            let ret = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    fstype.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if ret != 0 {
                return Err(pin_err(root, std::io::Error::last_os_error()));
            }
            log::info!("mounted bpffs on /sys/fs/bpf");
        }
        let links = dir.join("links");
        std::fs::create_dir_all(&links).map_err(|e| pin_err(&links, e))?;
        if !is_bpffs(&links) {
            return Err(pin_err(
                &links,
                "not on a bpf filesystem (mount -t bpf bpf DIR)",
            ));
        }
        Ok(())
    }

    fn is_bpffs(path: &Path) -> bool {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs into a zeroed struct with a valid path.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
        }
    }

    /// The link pinned at `path`, if there is one; the pin itself stays.
    pub fn take(path: &Path) -> Result<Option<XdpLink>, NodeError> {
        if !path.exists() {
            return Ok(None);
        }
        let pinned = PinnedLink::from_pin(path).map_err(|e| pin_err(path, e))?;
        let link = XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(path, e))?;
        Ok(Some(link))
    }

    /// Pins `link` at `path` (replacing a pin there) and hands it back.
    pub fn pin(link: XdpLink, path: &Path) -> Result<XdpLink, NodeError> {
        let fd = FdLink::try_from(link).map_err(|e| pin_err(path, e))?;
        if path.exists() {
            std::fs::remove_file(path).map_err(|e| pin_err(path, e))?;
        }
        let pinned = fd.pin(path).map_err(|e| pin_err(path, e))?;
        XdpLink::try_from(FdLink::from(pinned)).map_err(|e| pin_err(path, e))
    }
}

/// A policy compiled and loaded into a program of its own, not attached yet: the slow
/// part of a reload, done while the running policy keeps filtering.
pub struct Prepared {
    path: std::path::PathBuf,
    compiled: CompiledPolicy,
    compiler: Compiler,
    loaded: Loaded,
    started: Instant,
}

impl Prepared {
    /// Reads, compiles and loads the policy at `path`.
    pub fn new(path: &Path) -> Result<Self, NodeError> {
        let policy = policy::load(path)?;
        Self::from_policy(path, &policy, Instant::now())
    }

    fn from_policy(
        path: &Path,
        policy: &policy::Policy,
        started: Instant,
    ) -> Result<Self, NodeError> {
        let mut compiler = Compiler::default();
        let compiled = compile_with(path, policy, &mut compiler)?;
        let loaded = Loaded::new(&compiled, ProgramKind::Policy, false)?;
        Ok(Self {
            path: path.to_path_buf(),
            compiled,
            compiler,
            loaded,
            started,
        })
    }
}

/// A new policy, ready to apply with [`Node::apply`].
#[allow(clippy::large_enum_variant, reason = "one per reload, moved once")]
pub enum Update {
    /// Compiled with the running policy's compiler: written into the running program's
    /// inactive bank, then flipped to (no program load, tables patched, not rebuilt).
    InPlace {
        path: std::path::PathBuf,
        /// Kept for loading it into a program of its own if it does not fit.
        policy: policy::Policy,
        compiled: CompiledPolicy,
        compiler: Compiler,
        started: Instant,
    },
    /// Loaded into a program of its own, to be swapped in with `BPF_LINK_UPDATE`: when
    /// the zones or their countries changed.
    Full(Prepared),
}

impl Update {
    /// Reads and compiles the policy at `path`: in place when `compiler` (the running
    /// policy's, from [`Node::compiler`]) keeps its class ids, else into a new program.
    /// The slow part of a reload; the running policy keeps filtering meanwhile.
    pub fn new(path: &Path, compiler: Compiler) -> Result<Self, NodeError> {
        let started = Instant::now();
        let policy = policy::load(path)?;
        if compiler.keeps_classes(&policy) {
            let mut compiler = compiler;
            let compiled = compile_with(path, &policy, &mut compiler)?;
            return Ok(Self::InPlace {
                path: path.to_path_buf(),
                policy,
                compiled,
                compiler,
                started,
            });
        }
        Ok(Self::Full(Prepared::from_policy(path, &policy, started)?))
    }
}

/// One attachment of the program.
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
    link: XdpLink,
    /// Where the link is pinned, if it is.
    pinned: Option<std::path::PathBuf>,
}

/// The node's dataplane while it runs. Dropping it detaches the program.
pub struct Node {
    compiled: CompiledPolicy,
    /// The compiler of the policy in force (its class ids are the tables').
    compiler: Compiler,
    loaded: Loaded,
    attachments: Vec<Attachment>,
    /// Counters of policies swapped out, so totals survive a reload.
    carried: Stats,
    /// Sampled drops.
    events: EventLog,
    /// Policies put in force so far by writing the running program's maps in place, and
    /// by swapping in a new program.
    pub reloads: Reloads,
    /// AF_XDP sockets of `xsk` actions. Last: they close after the program lets go of them.
    xsk: XskSockets,
}

/// How the policies after the first were put in force.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct Reloads {
    pub in_place: u64,
    pub new_program: u64,
}

impl Node {
    /// Compiles the configured policy, loads the program and attaches it to every
    /// configured interface. Nothing stays attached if any step fails.
    pub fn start(config: &Config) -> Result<Self, NodeError> {
        let started = Instant::now();
        let policy_path = config.policy.as_deref().ok_or(NodeError::NoPolicy)?;
        let policy = policy::load(policy_path)?;
        let mut compiler = Compiler::default();
        let compiled = compile_with(policy_path, &policy, &mut compiler)?;
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false)?;
        // Sockets before attaching: a program taken over from a previous daemon moves onto
        // this one with its sockets in place (the previous daemon's closed with it).
        let mut xsk = XskSockets::new(config.xsk_forward.as_deref())?;
        xsk.open(&config.interfaces, &compiled.xsk_queues)?;
        xsk.register(&mut loaded, &config.interfaces, &compiled.xsk_queues)?;
        if let Some(dir) = &config.pin_dir {
            pin::prepare_dir(dir)?;
        }
        let mut attachments = Vec::new();
        for iface in &config.interfaces {
            let pin_path = config.pin_dir.as_ref().map(|d| pin::link_path(d, iface));
            // A link a previous daemon left pinned: move it onto this policy in one step,
            // so the interface is filtered throughout the restart.
            let (link, mode) = match pin_path.as_deref().map(pin::take).transpose()? {
                Some(Some(old)) => {
                    let link = loaded.take_over(old)?;
                    log::info!("took over the program pinned for {iface}");
                    (link, config.xdp_mode)
                }
                _ => {
                    let (link, mode) = loaded.attach(iface, config.xdp_mode)?;
                    log::info!("attached to {iface} in {} mode", mode_name(mode));
                    (link, mode)
                }
            };
            let link = match &pin_path {
                Some(path) => pin::pin(link, path)?,
                None => link,
            };
            attachments.push(Attachment {
                interface: iface.clone(),
                mode,
                link,
                pinned: pin_path,
            });
        }
        log_policy(policy_path, &compiled, &loaded, started);
        let mut events = EventLog::default();
        if let Some(ring) = loaded.take_events() {
            events.attach(ring);
        }
        Ok(Self {
            compiled,
            compiler,
            loaded,
            attachments,
            carried: Stats::default(),
            events,
            reloads: Reloads::default(),
            xsk,
        })
    }

    /// Replaces the policy with the one at `path` (see [`Update`]).
    pub fn reload(&mut self, path: &Path) -> Result<(), NodeError> {
        let update = Update::new(path, self.compiler())?;
        self.apply(update)
    }

    /// A copy of the running policy's compiler, for [`Update::new`].
    pub fn compiler(&self) -> Compiler {
        self.compiler.clone()
    }

    /// Puts a new policy in force: in place when it was compiled so and fits the running
    /// program's maps, else by loading and swapping in a program of its own.
    pub fn apply(&mut self, update: Update) -> Result<(), NodeError> {
        let (path, policy, compiled, compiler, started) = match update {
            Update::Full(prepared) => return self.swap(prepared),
            Update::InPlace {
                path,
                policy,
                compiled,
                compiler,
                started,
            } => (path, policy, compiled, compiler, started),
        };
        // Sockets for `xsk` queues the running policy has none on, in the map both banks
        // share, before the new bank can send frames to them.
        open_xsk(
            &mut self.xsk,
            &self.attachments,
            &mut self.loaded,
            &compiled.xsk_queues,
            &self.compiled.xsk_queues,
        )?;
        // Drain events while their rule numbers still mean the old rules.
        self.events.poll(&self.compiled);
        match self.loaded.update(&compiled) {
            Ok(t) => {
                // The old bank's rule counters are final now: keep them by name.
                let old = self.loaded.retire(&self.compiled)?;
                for r in old.rules {
                    match self.carried.rules.iter_mut().find(|c| c.name == r.name) {
                        Some(c) => c.count.add(r.count),
                        None => self.carried.rules.push(r),
                    }
                }
                log::info!(
                    "policy {}: {} rules, {} address classes, {} rule sets; updated in place in {} ms (compile {} ms, patch {} us, write {} us for {} map elements, grace period {} us)",
                    path.display(),
                    compiled.rule_count(),
                    compiled.stats.classes,
                    compiled.stats.rule_sets,
                    started.elapsed().as_millis(),
                    (started.elapsed() - t.prepare - t.write - t.grace).as_millis(),
                    t.prepare.as_micros(),
                    t.write.as_micros(),
                    t.elements,
                    t.grace.as_micros(),
                );
                self.compiled = compiled;
                self.compiler = compiler;
                self.reloads.in_place += 1;
                // No packet sees the old bank any more: close the sockets it alone used.
                self.xsk.retain(&self.compiled.xsk_queues);
                Ok(())
            }
            Err(DataplaneError::NoRoom(why)) => {
                self.xsk.retain(&self.compiled.xsk_queues);
                log::info!(
                    "policy {}: {why}; loading it into a new program",
                    path.display()
                );
                let prepared = Prepared::from_policy(&path, &policy, started)?;
                self.swap(prepared)
            }
            Err(e) => {
                self.xsk.retain(&self.compiled.xsk_queues);
                Err(e.into())
            }
        }
    }

    /// Moves every interface onto the prepared program, each in one `BPF_LINK_UPDATE`.
    /// Nothing changes if the policy failed to prepare; if the kernel refuses an update
    /// (not seen in practice), the interfaces not yet moved keep the running program.
    pub fn swap(&mut self, mut prepared: Prepared) -> Result<(), NodeError> {
        let before = self.stats()?;
        // The new program gets the sockets of its `xsk` queues, opening those the running
        // policy has none on.
        open_xsk(
            &mut self.xsk,
            &self.attachments,
            &mut prepared.loaded,
            &prepared.compiled.xsk_queues,
            &self.compiled.xsk_queues,
        )?;
        let mut old = std::mem::take(&mut self.attachments).into_iter();
        let mut moved = Vec::new();
        for a in old.by_ref() {
            let Attachment {
                interface,
                mode,
                link,
                pinned,
            } = a;
            match prepared.loaded.take_over(link) {
                Ok(link) => moved.push(Attachment {
                    interface,
                    mode,
                    link,
                    pinned,
                }),
                Err(e) => {
                    log::error!(
                        "{interface}: the kernel refused the new program and the link is gone: {e}"
                    );
                    moved.extend(old);
                    self.attachments = moved;
                    return Err(e.into());
                }
            }
        }
        self.attachments = moved;
        log_policy(
            &prepared.path,
            &prepared.compiled,
            &prepared.loaded,
            prepared.started,
        );
        // Drain the old program's events before its ring goes.
        self.events.poll(&self.compiled);
        if let Some(ring) = prepared.loaded.take_events() {
            self.events.attach(ring);
        }
        self.reloads.new_program += 1;
        self.compiled = prepared.compiled;
        self.compiler = prepared.compiler;
        self.loaded = prepared.loaded;
        // The old program is gone: close the sockets the new one does not use.
        self.xsk.retain(&self.compiled.xsk_queues);
        // The new program's counters start at zero; keep the totals so far beside them.
        self.carried = before;
        Ok(())
    }

    /// Counters since start, across reloads (rules and zones matched by name).
    pub fn stats(&self) -> Result<Stats, NodeError> {
        let mut s = self.loaded.stats(&self.compiled)?;
        s.absorb(&self.carried);
        // Socket counters run since start, across reloads.
        s.xsk = self.xsk.counts();
        Ok(s)
    }

    /// The attachments.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }

    /// The policy in force.
    pub fn compiled(&self) -> &CompiledPolicy {
        &self.compiled
    }

    /// Reads new drop events from the program.
    pub fn poll_events(&mut self) {
        self.events.poll(&self.compiled);
    }

    /// Drop events numbered after `since`.
    pub fn events(&self, since: Option<u64>) -> Vec<Event> {
        self.events.since(since)
    }

    /// Removes the pins, so that dropping the node detaches the program everywhere.
    pub fn unpin(&mut self) {
        for a in &mut self.attachments {
            if let Some(path) = a.pinned.take()
                && let Err(e) = std::fs::remove_file(&path)
            {
                log::warn!("removing the pin {}: {e}", path.display());
            }
        }
    }
}

/// Opens the AF_XDP sockets of `queues` on every attached interface and enters them into
/// `loaded`'s maps. On failure only the sockets of `running` (the policy in force) stay.
fn open_xsk(
    xsk: &mut XskSockets,
    attachments: &[Attachment],
    loaded: &mut Loaded,
    queues: &[u32],
    running: &[u32],
) -> Result<(), NodeError> {
    let interfaces: Vec<String> = attachments.iter().map(|a| a.interface.clone()).collect();
    let opened = xsk.open(&interfaces, queues).map_err(NodeError::from);
    let registered = opened.and_then(|()| {
        xsk.register(loaded, &interfaces, queues)
            .map_err(NodeError::from)
    });
    if registered.is_err() {
        xsk.retain(running);
    }
    registered
}

/// How an attach mode is named in logs and docs.
pub const fn mode_name(mode: AttachMode) -> &'static str {
    match mode {
        AttachMode::Auto => "auto",
        AttachMode::Native => "native",
        AttachMode::Generic => "generic",
    }
}

fn log_policy(path: &Path, c: &CompiledPolicy, loaded: &Loaded, started: Instant) {
    log::info!(
        "policy {}: {} rules, {} zones, {} GeoIP networks -> {} IPv4 / {} IPv6 prefixes, {} address classes, {} IPv4 and {} IPv6 table chunks, {} IPv4 and {} IPv6 hosts; ready in {} ms (program load {} ms, map fill {} ms)",
        path.display(),
        c.rule_count(),
        c.zone_names.len(),
        c.stats.geo_networks,
        c.stats.v4_prefixes,
        c.stats.v6_prefixes,
        c.stats.classes,
        c.stats.v4_chunks,
        c.stats.v6_chunks,
        c.stats.v4_hosts,
        c.stats.v6_hosts,
        started.elapsed().as_millis(),
        loaded.timings.load.as_millis(),
        loaded.timings.fill.as_millis(),
    );
}
