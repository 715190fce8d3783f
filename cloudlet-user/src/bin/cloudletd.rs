//! cloudletd: the Cloudlet node daemon.
//!
//! Loads the policy, attaches the XDP program to the configured interfaces, serves counters
//! on the admin socket, runs the HTTP/3 and HTTPS front door if configured, reloads the
//! policy on SIGHUP and detaches on SIGINT/SIGTERM. Without a policy it loads no program and
//! runs only the front door and the admin endpoint.

use std::{
    path::PathBuf,
    process::ExitCode,
    sync::{Arc, Mutex},
};

use clap::Parser;
use cloudlet::{
    admin::{self, Response},
    config::Config,
    dataplane::metrics::DataplaneCollector,
    error_chain,
    node::{Node, NodeError, Update, mode_name},
    quic::{
        front_door::{self, FrontDoor},
        metrics::FrontDoorMetrics,
    },
};
use prometheus_client::registry::Registry;
use tokio::signal::unix::{SignalKind, signal};

/// mimalloc: the front door and the MCP guard allocate and free many small buffers per
/// request; `benches/src/bin/mcp-bench.rs` measured glibc's allocator adding tens of
/// microseconds to a guarded call (see `docs/benchmarks.md`).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: u8 = 64;

#[derive(Parser)]
#[command(name = "cloudletd", version, about = "Cloudlet node daemon")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short)]
    config: PathBuf,
    /// On exit, detach the program from every interface. By default it stays attached
    /// (pinned) and keeps filtering with the last policy until cloudletd starts again and
    /// takes it over.
    #[arg(long)]
    detach_on_exit: bool,
}

/// What the dataplane routes answer when no policy is configured.
const NO_DATAPLANE: &str = "no dataplane: the configuration names no policy";

/// Loads (or generates) the front door's certificate and binds its listeners; on failure,
/// logs and returns the exit status.
fn start_front_door(
    config: &front_door::FrontDoorConfig,
    metrics: FrontDoorMetrics,
    services: front_door::Services,
) -> Result<FrontDoor, ExitCode> {
    let fail = |e: front_door::FrontDoorError| {
        log::error!("front door: {}", error_chain(&e));
        if e.is_config() {
            ExitCode::from(EXIT_CONFIG)
        } else {
            ExitCode::FAILURE
        }
    };
    let identity = front_door::load_or_generate(config).map_err(fail)?;
    if identity.generated {
        log::info!(
            "front door: generated a self-signed certificate for {} in {} (key in {})",
            config.names.join(", "),
            config.cert.display(),
            config.key.display()
        );
    }
    let door = FrontDoor::bind_with(config, identity, metrics, services).map_err(fail)?;
    let addr = door.local_addr();
    log::info!(
        "front door on {addr}: HTTP/3 (UDP) and HTTPS (TCP), pq {}, certificate SPKI sha256 {}",
        config.pq,
        door.spki_sha256()
    );
    for route in &config.backhaul {
        log::info!(
            "front door: {}* proxied to {} (pq {}, connect timeout {} ms, request timeout {} ms)",
            route.prefix,
            route.origin,
            route.pq,
            route.connect_timeout.as_millis(),
            route.request_timeout.as_millis()
        );
    }
    Ok(door)
}

/// Re-reads the configuration and applies its `[mcp]` policy (roles, constraints, limits,
/// threat and pin settings); open sessions stay. Upstreams, issuers and paths need a
/// restart. On any error the running policy stays.
fn reload_mcp(
    guard: &cloudlet::mcp::guard::McpGuard,
    running: &cloudlet::mcp::guard::GuardConfig,
    path: &std::path::Path,
) {
    let policy = match Config::load(path) {
        Ok(Config { mcp: Some(m), .. }) => {
            let restart_only = cloudlet::mcp::guard::GuardConfig {
                policy: running.policy.clone(),
                ..m.clone()
            };
            if restart_only != *running {
                log::warn!(
                    "SIGHUP: [mcp] keys other than the policy changed (upstreams, issuers, paths, origins, limits): they take effect at the next start"
                );
            }
            m.policy
        }
        Ok(_) => {
            log::error!(
                "SIGHUP: {} has no [mcp] any more; the running MCP policy stays (restart to remove the guard)",
                path.display()
            );
            return;
        }
        Err(e) => {
            log::error!("SIGHUP: {e}; the running MCP policy stays");
            return;
        }
    };
    match guard.set_policy(policy) {
        Ok(()) => log::info!("SIGHUP: MCP policy reloaded"),
        Err(e) => log::error!("SIGHUP: {}; the running MCP policy stays", error_chain(&e)),
    }
}

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let args = Args::parse();
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    let node = match config
        .policy
        .is_some()
        .then(|| Node::start(&config))
        .transpose()
    {
        Ok(n) => n,
        Err(e) => {
            log::error!("{}", error_chain(&e));
            return match e {
                NodeError::Policy(_) | NodeError::GeoIp(_) => ExitCode::from(EXIT_CONFIG),
                _ => ExitCode::FAILURE,
            };
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            log::error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let node = node.map(|n| Arc::new(Mutex::new(n)));
    let code = runtime.block_on(run(config.clone(), args.config.clone(), node.clone()));
    let pin_dir = config.pin_dir.clone();
    let (ifaces, pinned) = match node.as_ref().map(|n| n.lock()) {
        None => (Vec::new(), false),
        Some(Ok(mut n)) => {
            // Without pins, closing the links detaches the program; with them it stays.
            if args.detach_on_exit {
                n.unpin();
            }
            let ifaces = n
                .attachments()
                .iter()
                .map(|a| a.interface.clone())
                .collect::<Vec<_>>();
            (ifaces, !args.detach_on_exit && pin_dir.is_some())
        }
        Some(Err(_)) => (Vec::new(), false),
    };
    drop(node);
    for iface in ifaces {
        if pinned {
            log::info!(
                "left the program filtering on {iface}, pinned under {}; a restarted cloudletd takes it over (--detach-on-exit detaches instead)",
                pin_dir
                    .as_deref()
                    .unwrap_or(std::path::Path::new(""))
                    .display()
            );
        } else {
            log::info!("detached from {iface}");
        }
    }
    code
}

async fn run(
    config: Config,
    config_path: std::path::PathBuf,
    node: Option<Arc<Mutex<Node>>>,
) -> ExitCode {
    let stats_node = node.clone();
    let read_stats = move || match stats_node.as_ref().map(|n| n.lock()) {
        Some(Ok(n)) => n.stats().map_err(|e| error_chain(&e)),
        Some(Err(_)) => Err("node lock poisoned".to_string()),
        None => Err(NO_DATAPLANE.to_string()),
    };
    let mut registry = Registry::default();
    if node.is_some() {
        let metrics_read = read_stats.clone();
        registry.register_collector(Box::new(DataplaneCollector::new(Arc::new(move || {
            metrics_read()
                .map_err(|e| log::warn!("reading counters for /metrics: {e}"))
                .ok()
        }))));
    }
    let front_door_metrics = FrontDoorMetrics::default();
    if config.front_door.is_some() {
        front_door_metrics.register(&mut registry);
    }
    let embeddings = match &config.compute {
        None => None,
        Some(c) => {
            let started = std::time::Instant::now();
            match cloudlet::compute::start(c) {
                Ok(service) => {
                    let d = &service.dispatcher;
                    log::info!(
                        "compute: {} from {} on the {} backend in {} ms (batches of {} inputs, waiting {} ms at most; queue of {}): POST /v1/embeddings",
                        cloudlet::compute::MODEL_NAME,
                        c.model.display(),
                        d.backend(),
                        started.elapsed().as_millis(),
                        c.dispatch.max_batch,
                        c.dispatch.max_wait.as_millis(),
                        c.dispatch.queue
                    );
                    registry.register_collector(Box::new(
                        cloudlet::compute::metrics::ComputeCollector {
                            backend: d.backend(),
                            stats: d.stats(),
                        },
                    ));
                    Some(Arc::new(service))
                }
                Err(e) => {
                    log::error!("compute: {}", error_chain(&e));
                    return ExitCode::from(EXIT_CONFIG);
                }
            }
        }
    };
    let mcp = match &config.mcp {
        None => None,
        Some(m) => match cloudlet::mcp::guard::McpGuard::start(m) {
            Ok(guard) => {
                guard.ready(std::time::Duration::from_secs(10)).await;
                log::info!(
                    "MCP guard on {} with {} upstream(s): {}; {}; audit log {}",
                    m.path,
                    m.upstreams.len(),
                    m.upstreams
                        .iter()
                        .map(|u| format!("{} (tools {}__*)", u.name, u.prefix))
                        .collect::<Vec<_>>()
                        .join(", "),
                    match (m.issuers.len(), m.cert_roles.is_empty()) {
                        (0, true) => "no credentials asked".to_string(),
                        (0, false) => "client certificates".to_string(),
                        (n, true) => format!("bearer tokens from {n} issuer(s)"),
                        (n, false) => {
                            format!("bearer tokens from {n} issuer(s) or client certificates")
                        }
                    },
                    m.audit.display()
                );
                Some(guard)
            }
            Err(e) => {
                log::error!("{}", error_chain(&e));
                return ExitCode::from(EXIT_CONFIG);
            }
        },
    };
    let events_node = node.clone();
    let has_dataplane = node.is_some();
    let handler: admin::Handler = Arc::new(move |target: &str| match target {
        t if t == "/events" || t.starts_with("/events?") => {
            let Some(events_node) = &events_node else {
                return Some(Response::json(
                    503,
                    serde_json::json!({ "error": NO_DATAPLANE }).to_string(),
                ));
            };
            let since = t
                .split_once("?since=")
                .and_then(|(_, n)| n.split('&').next())
                .and_then(|n| n.parse::<u64>().ok());
            Some(match events_node.lock() {
                Ok(n) => Response::json(
                    200,
                    serde_json::to_string(&n.events(since)).unwrap_or_default(),
                ),
                Err(_) => Response::json(500, "{\"error\":\"node lock poisoned\"}".to_string()),
            })
        }
        "/stats" => Some(match read_stats() {
            Ok(s) => Response::json(200, serde_json::to_string(&s).unwrap_or_default()),
            Err(e) => Response::json(
                if has_dataplane { 500 } else { 503 },
                serde_json::json!({ "error": e }).to_string(),
            ),
        }),
        "/metrics" => {
            let mut body = String::new();
            Some(
                match prometheus_client::encoding::text::encode(&mut body, &registry) {
                    Ok(()) => Response {
                        status: 200,
                        content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    },
                    Err(e) => Response::json(
                        500,
                        serde_json::json!({ "error": e.to_string() }).to_string(),
                    ),
                },
            )
        }
        "/healthz" => Some(Response::json(200, "{\"status\":\"ok\"}".to_string())),
        _ => None,
    });
    if let Some(addr) = config.admin_listen {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                log::info!("admin routes (/metrics, /stats, /healthz) also on http://{addr}");
                tokio::spawn(admin::serve_tcp(l, handler.clone()));
            }
            Err(e) => {
                log::error!("admin listener {addr}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let listener = match admin::bind(&config.admin_socket) {
        Ok(l) => l,
        Err(e) => {
            log::error!("{}", error_chain(&e));
            return ExitCode::FAILURE;
        }
    };
    let admin_task = tokio::spawn(admin::serve(listener, handler));
    if let Some(Ok(n)) = node.as_ref().map(|n| n.lock()) {
        for a in n.attachments() {
            log::info!("filtering on {} ({})", a.interface, mode_name(a.mode));
        }
    }
    log::info!("admin endpoint on {}", config.admin_socket.display());

    let front_door_task = match &config.front_door {
        None => None,
        Some(fd) => match start_front_door(
            fd,
            front_door_metrics,
            front_door::Services {
                embeddings,
                mcp: mcp.clone(),
            },
        ) {
            Ok(door) => Some(tokio::spawn(door.serve())),
            Err(code) => return code,
        },
    };

    // Drop events: move them from the ring buffer into the history a few times a second.
    let events_task = node.clone().map(|poll_node| {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
            loop {
                tick.tick().await;
                if let Ok(mut n) = poll_node.lock() {
                    n.poll_events();
                }
            }
        })
    });
    let (Ok(mut int), Ok(mut term), Ok(mut hup)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
        signal(SignalKind::hangup()),
    ) else {
        log::error!("cannot install signal handlers");
        return ExitCode::FAILURE;
    };
    loop {
        tokio::select! {
            _ = int.recv() => { log::info!("SIGINT: shutting down"); break; }
            _ = term.recv() => { log::info!("SIGTERM: shutting down"); break; }
            _ = hup.recv() => {
                if let (Some(guard), Some(running)) = (&mcp, &config.mcp) {
                    reload_mcp(guard, running, &config_path);
                }
                let (Some(node), Some(path)) = (node.clone(), config.policy.clone()) else {
                    if mcp.is_none() {
                        log::info!("SIGHUP: no policy configured, nothing to reload");
                    }
                    continue;
                };
                log::info!("SIGHUP: reloading {}", path.display());
                let result = tokio::task::spawn_blocking(move || {
                    // Compile (and load, if it needs a program of its own) without the
                    // lock: counters stay readable meanwhile.
                    let compiler = match node.lock() {
                        Ok(n) => n.compiler(),
                        Err(_) => {
                            log::error!("node lock poisoned");
                            return Ok(());
                        }
                    };
                    let update = Update::new(&path, compiler)?;
                    match node.lock() {
                        Ok(mut n) => n.apply(update),
                        Err(_) => {
                            log::error!("node lock poisoned");
                            Ok(())
                        }
                    }
                }).await;
                match result {
                    Ok(Ok(())) => log::info!("policy reloaded"),
                    Ok(Err(e @ NodeError::Swap { .. })) => log::error!("reload failed halfway: {}", error_chain(&e)),
                    Ok(Err(e)) => log::error!("reload failed, the running policy stays in force: {}", error_chain(&e)),
                    Err(e) => log::error!("reload task failed, the running policy stays in force: {e}"),
                }
            }
        }
    }
    admin_task.abort();
    if let Some(t) = events_task {
        t.abort();
    }
    if let Some(t) = front_door_task {
        t.abort();
    }
    let _ = std::fs::remove_file(&config.admin_socket);
    ExitCode::SUCCESS
}
