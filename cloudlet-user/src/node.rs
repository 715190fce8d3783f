//! A running node's dataplane: the policy in force, its program and attachments, and the
//! swap to a new policy that either fully happens or changes nothing.

use std::{path::Path, time::Instant};

use aya::programs::xdp::XdpLink;

use crate::{
    config::Config,
    dataplane::{
        self, AttachMode, CompileError, CompiledPolicy, DataplaneError, Loaded, ProgramKind,
        stats::Stats,
    },
    geoip::{GeoDb, GeoIpError},
    policy::{self, PolicyError},
};

/// Errors from preparing or applying a policy.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
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
    let geo = match (&policy.geoip_database, policy.uses_countries()) {
        (Some(db), true) => Some(GeoDb::open(db)?),
        _ => None,
    };
    let compiled = dataplane::compile(&policy, geo.as_ref())?;
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

/// A policy compiled and loaded into a program of its own, not attached yet: the slow
/// part of a reload, done while the running policy keeps filtering.
pub struct Prepared {
    path: std::path::PathBuf,
    compiled: CompiledPolicy,
    loaded: Loaded,
    started: Instant,
}

impl Prepared {
    /// Reads, compiles and loads the policy at `path`.
    pub fn new(path: &Path) -> Result<Self, NodeError> {
        let started = Instant::now();
        let compiled = prepare_policy(path)?;
        let loaded = Loaded::new(&compiled, ProgramKind::Policy, false)?;
        Ok(Self {
            path: path.to_path_buf(),
            compiled,
            loaded,
            started,
        })
    }
}

/// One attachment of the program.
pub struct Attachment {
    pub interface: String,
    pub mode: AttachMode,
    link: XdpLink,
}

/// The node's dataplane while it runs. Dropping it detaches the program.
pub struct Node {
    compiled: CompiledPolicy,
    loaded: Loaded,
    attachments: Vec<Attachment>,
    /// Counters of policies swapped out, so totals survive a reload.
    carried: Stats,
}

impl Node {
    /// Compiles the configured policy, loads the program and attaches it to every
    /// configured interface. Nothing stays attached if any step fails.
    pub fn start(config: &Config) -> Result<Self, NodeError> {
        let started = Instant::now();
        let compiled = prepare_policy(&config.policy)?;
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false)?;
        let mut attachments = Vec::new();
        for iface in &config.interfaces {
            let (link, mode) = loaded.attach(iface, config.xdp_mode)?;
            log::info!("attached to {iface} in {} mode", mode_name(mode));
            attachments.push(Attachment {
                interface: iface.clone(),
                mode,
                link,
            });
        }
        log_policy(&config.policy, &compiled, &loaded, started);
        Ok(Self {
            compiled,
            loaded,
            attachments,
            carried: Stats::default(),
        })
    }

    /// Replaces the policy with the one at `path` (see [`Prepared`] and [`Node::swap`]).
    pub fn reload(&mut self, path: &Path) -> Result<(), NodeError> {
        let prepared = Prepared::new(path)?;
        self.swap(prepared)
    }

    /// Moves every interface onto the prepared program, each in one `BPF_LINK_UPDATE`.
    /// Nothing changes if the policy failed to prepare; if the kernel refuses an update
    /// (not seen in practice), the interfaces not yet moved keep the running program.
    pub fn swap(&mut self, mut prepared: Prepared) -> Result<(), NodeError> {
        let before = self.stats()?;
        let mut old = std::mem::take(&mut self.attachments).into_iter();
        let mut moved = Vec::new();
        for a in old.by_ref() {
            let Attachment {
                interface,
                mode,
                link,
            } = a;
            match prepared.loaded.take_over(link) {
                Ok(link) => moved.push(Attachment {
                    interface,
                    mode,
                    link,
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
        self.compiled = prepared.compiled;
        self.loaded = prepared.loaded;
        // The new program's counters start at zero; keep the totals so far beside them.
        self.carried = before;
        Ok(())
    }

    /// Counters since start, across reloads (rules and zones matched by name).
    pub fn stats(&self) -> Result<Stats, NodeError> {
        let mut s = self.loaded.stats(&self.compiled)?;
        s.absorb(&self.carried);
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
        "policy {}: {} rules, {} zones, {} GeoIP networks -> {} IPv4 / {} IPv6 prefixes, {} address classes, {} IPv4 and {} IPv6 table chunks; ready in {} ms (program load {} ms, map fill {} ms)",
        path.display(),
        c.rules.len(),
        c.zone_names.len(),
        c.stats.geo_networks,
        c.stats.v4_prefixes,
        c.stats.v6_prefixes,
        c.stats.classes,
        c.stats.v4_chunks,
        c.stats.v6_chunks,
        started.elapsed().as_millis(),
        loaded.timings.load.as_millis(),
        loaded.timings.fill.as_millis(),
    );
}
