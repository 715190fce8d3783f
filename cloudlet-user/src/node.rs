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
}

/// Reads, validates and compiles the policy at `path`, opening its GeoIP database if its
/// zones name countries.
pub fn prepare_policy(path: &Path) -> Result<CompiledPolicy, NodeError> {
    let policy = policy::load(path)?;
    let geo = match (&policy.geoip_database, policy.uses_countries()) {
        (Some(db), true) => Some(GeoDb::open(db)?),
        _ => None,
    };
    Ok(dataplane::compile(&policy, geo.as_ref())?)
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

    /// Replaces the policy with the one at `path`. The new program is loaded and filled
    /// beside the running one, then moved onto each interface in one step; if anything
    /// fails before that, the running policy stays as it was.
    pub fn reload(&mut self, path: &Path) -> Result<(), NodeError> {
        let started = Instant::now();
        let compiled = prepare_policy(path)?;
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false)?;
        let before = self.stats()?;
        let mut attachments = Vec::with_capacity(self.attachments.len());
        for old in self.attachments.drain(..) {
            let link = loaded.take_over(old.link)?;
            attachments.push(Attachment { link, ..old });
        }
        self.attachments = attachments;
        log_policy(path, &compiled, &loaded, started);
        self.compiled = compiled;
        self.loaded = loaded;
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
        "policy {}: {} rules, {} zones, {} GeoIP networks -> {} IPv4 / {} IPv6 prefixes, {} address classes, {} IPv4 chunks; ready in {} ms (program load {} ms, map fill {} ms)",
        path.display(),
        c.rules.len(),
        c.zone_names.len(),
        c.stats.geo_networks,
        c.stats.v4_prefixes,
        c.stats.v6_prefixes,
        c.stats.classes,
        c.stats.v4_chunks,
        started.elapsed().as_millis(),
        loaded.timings.load.as_millis(),
        loaded.timings.fill.as_millis(),
    );
}
