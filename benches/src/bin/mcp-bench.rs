//! What the MCP guard costs: `tools/call` latency (p50, p99) and request rate through the
//! guard against straight to the same upstream, in the same run.
//!
//! The upstream is the official MCP Python SDK's server (`tests/mcp/upstream.py --profile
//! web`, Streamable HTTP with JSON answers). "direct" clients talk to it over HTTP/1.1;
//! "guard" clients talk to the front door over HTTPS (HTTP/1.1, kept-alive connections),
//! whose guard checks every call (roles, rate limit, pin, threat scan, JSON Schema),
//! forwards it, scans the result and writes the audit log before answering.
//! The guard runs as in cloudletd, on a single-threaded tokio runtime of its own thread,
//! with cloudletd's allocator. Latency rounds interleave the systems, a block of calls at a
//! time, so the upstream's drift falls on all alike; rate rounds alternate them; figures
//! are medians over rounds. Every client ends its session with `DELETE` when done.
//!
//! Two references put the guard's figure in proportion: a TLS relay (TLS and a second hop,
//! no checks) to the same upstream, and the three paths again to an upstream that answers
//! at once, where what each path adds shows in microseconds, without Python's time.
//!
//! The guard runs with its default `audit_sync = "write"` (an entry is in the kernel before
//! its answer leaves, on disk within 100 ms), the goal's figure, and again with
//! `audit_sync = "fdatasync"` (on disk before the answer): the difference is what an
//! `fdatasync` per answer costs on this machine's disk.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::Bytes;
use cloudlet::{
    mcp::guard::{AuditSync, GuardConfig, GuardPolicy, McpGuard},
    mcp::policy::{Role, ToolPolicy},
    mcp::upstream::{Transport, UpstreamConfig},
    quic::{
        PqMode,
        front_door::{FrontDoor, FrontDoorConfig, Identity, Services},
        metrics::FrontDoorMetrics,
    },
};
use cloudlet_benches::{Figure, ThreadClock, merge_results};
use cloudlet_tests::daemon::{Daemon, Output, spawn_until};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

/// The allocator cloudletd runs with, since the guard runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Opts {
    out: PathBuf,
    quick: bool,
    python: PathBuf,
}

fn opts() -> Result<Opts> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut o = Opts {
        out: PathBuf::from("target/cloudlet-bench"),
        quick: false,
        python: root.join("target/mcp-venv/bin/python"),
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = PathBuf::from(it.next().context("--out needs a folder")?),
            "--python" => o.python = PathBuf::from(it.next().context("--python needs a path")?),
            other => bail!("unknown argument {other} (takes --quick, --out DIR, --python PATH)"),
        }
    }
    Ok(o)
}

/// The web upstream, serving Streamable HTTP with JSON answers on a port it picks.
fn start_upstream(python: &Path) -> Result<(Daemon, u16)> {
    if !python.exists() {
        bail!("{} missing: run `cargo xtask setup`", python.display());
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/mcp/upstream.py");
    let (up, port) = spawn_until(
        Command::new(python)
            .arg(&script)
            .args(["--profile", "web", "--http", "0", "--json"]),
        Output::Stderr,
        "listening on ",
        Duration::from_secs(30),
    );
    Ok((up, port.trim().parse()?))
}

/// Starts the front door with the guard on a thread of its own; returns its address.
fn start_guard(
    upstream_port: u16,
    dir: &Path,
    id: &cloudlet::quic::SelfSigned,
    audit_sync: AuditSync,
) -> Result<(SocketAddr, ThreadClock)> {
    std::fs::create_dir_all(dir)?;
    let (cert, key) = (id.cert.clone(), id.key.clone_key());
    let config = GuardConfig {
        path: "/mcp".into(),
        allowed_origins: Vec::new(),
        upstreams: vec![UpstreamConfig {
            name: "web".into(),
            prefix: "web".into(),
            transport: Transport::Http {
                url: format!("http://127.0.0.1:{upstream_port}/mcp"),
                ca: None,
                headers: Default::default(),
            },
            timeout: Duration::from_secs(30),
        }],
        issuers: Vec::new(),
        anonymous_roles: vec!["bench".into()],
        cert_roles: Default::default(),
        pins: dir.join("mcp-pins.json"),
        audit: dir.join("mcp-audit.jsonl"),
        audit_max_bytes: 64 << 20,
        audit_keep: 1,
        audit_sync,
        max_body: 1 << 20,
        session_idle: Duration::from_secs(3600),
        policy: GuardPolicy {
            roles: ToolPolicy {
                roles: [(
                    "bench".to_string(),
                    Role {
                        allow: vec!["web__*".into()],
                        deny: vec!["web__post_*".into()],
                    },
                )]
                .into(),
            },
            per_identity: Some("1000000/s".parse().map_err(anyhow::Error::msg)?),
            max_result_bytes: 1 << 20,
            ..GuardPolicy::default()
        },
    };
    let _ = std::fs::remove_file(&config.pins);
    let fd = FrontDoorConfig {
        listen: "127.0.0.1:0".parse()?,
        pq: PqMode::Preferred,
        cert: dir.join("unused-cert.pem"),
        key: dir.join("unused-key.pem"),
        self_signed: false,
        names: vec!["localhost".into()],
        backhaul: Vec::new(),
        client_ca: None,
    };
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("guard".into())
        .spawn(move || {
            let clock = ThreadClock::current();
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = tx.send(Err(anyhow::Error::from(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let started = async {
                    let guard = McpGuard::start(&config)?;
                    guard.ready(Duration::from_secs(10)).await;
                    let identity = Identity {
                        chain: vec![cert],
                        key,
                        generated: false,
                    };
                    let door = FrontDoor::bind_with(
                        &fd,
                        identity,
                        FrontDoorMetrics::default(),
                        Services {
                            embeddings: None,
                            mcp: Some(guard),
                        },
                    )?;
                    anyhow::Ok(door)
                };
                match started.await {
                    Ok(door) => {
                        let _ = tx.send(clock.map(|c| (door.local_addr(), c)));
                        door.serve().await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
            });
        })?;
    rx.recv()?
}

/// A TLS relay on a thread of its own, as the guard runs: it terminates TLS with `id` and
/// copies bytes both ways to `to` on one connection per client. It does what the guard's
/// path must do at least (TLS, a second hop), and nothing of what it checks.
fn start_tls_relay(
    to: SocketAddr,
    id: &cloudlet::quic::SelfSigned,
) -> Result<(SocketAddr, ThreadClock)> {
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(vec![id.cert.clone()], id.key.clone_key())?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let clock = serve_on_thread("tls-relay", listener, move |inc| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut out) = tokio::net::TcpStream::connect(to).await else {
                return;
            };
            let _ = out.set_nodelay(true);
            if let Ok(mut tls) = acceptor.accept(inc).await {
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut out).await;
            }
        }
    })?;
    Ok((addr, clock))
}

/// Accepts on `listener` from a single-threaded runtime on a thread of its own, handing
/// each connection (no Nagle) to `serve` in a task.
fn serve_on_thread<F, Fut>(
    name: &str,
    listener: std::net::TcpListener,
    serve: F,
) -> Result<ThreadClock>
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + 'static,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            let _ = tx.send(ThreadClock::current());
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                    return;
                };
                while let Ok((inc, _)) = listener.accept().await {
                    let _ = inc.set_nodelay(true);
                    tokio::task::spawn_local(serve(inc));
                }
            });
        })?;
    rx.recv()?
}

/// The web upstream's `search` tool, as its server lists it (the only tool the bench calls).
const FIXED_TOOLS: &str = r#"[{"description":"Search the web.","inputSchema":{"properties":{"query":{"title":"Query","type":"string"},"limit":{"default":5,"title":"Limit","type":"integer"}},"required":["query"],"type":"object","title":"searchArguments"},"name":"search","outputSchema":{"properties":{"result":{"title":"Result","type":"string"}},"required":["result"],"type":"object","title":"searchOutput"}}]"#;

/// An upstream that answers at once, with what the web upstream answers for `search`:
/// the paths to it show what they cost without Python's time and drift.
fn start_fixed_upstream() -> Result<SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let tools: Value = serde_json::from_str(FIXED_TOOLS)?;
    let _ = serve_on_thread("at-once", listener, move |inc| {
        let tools = tools.clone();
        async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let tools = tools.clone();
                    async move {
                        let body = req.into_body().collect().await?.to_bytes();
                        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        let result = match v["method"].as_str() {
                            Some("initialize") => json!({
                            "capabilities": {"tools": {"listChanged": false}},
                            "protocolVersion": "2025-11-25",
                            "serverInfo": {"name": "web", "version": ""}}),
                            Some("tools/list") => json!({"tools": tools}),
                            Some("tools/call") => json!({
                            "content": [{"text": "results for edge nodes", "type": "text"}],
                            "isError": false,
                            "structuredContent": {"result": "results for edge nodes"}}),
                            _ => Value::Null,
                        };
                        let resp = http::Response::builder()
                            .header("content-type", "application/json")
                            .header("mcp-session-id", "at-once");
                        let resp = if result.is_null() {
                            resp.status(202).body(Full::new(Bytes::new()))
                        } else {
                            let msg = json!({"jsonrpc": "2.0", "id": v["id"], "result": result});
                            resp.body(Full::new(Bytes::from(msg.to_string())))
                        };
                        anyhow::Ok(resp?)
                    }
                });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(inc), svc)
                .await;
        }
    })?;
    Ok(addr)
}

/// A client's way to a system: its address, TLS or not, and the tool name to call.
type System<'a> = (
    SocketAddr,
    Option<&'a tokio_rustls::TlsConnector>,
    &'static str,
);

type Sender = hyper::client::conn::http1::SendRequest<Full<Bytes>>;

/// One client connection with its MCP session.
struct Client {
    send: Sender,
    host: String,
    session: String,
    next_id: u64,
}

impl Client {
    async fn connect(addr: SocketAddr, tls: Option<&tokio_rustls::TlsConnector>) -> Result<Self> {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let send = match tls {
            Some(c) => {
                let stream = c.connect("localhost".try_into()?, tcp).await?;
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                        .await?;
                tokio::spawn(conn);
                send
            }
            None => {
                let (send, conn) =
                    hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
                        .await?;
                tokio::spawn(conn);
                send
            }
        };
        let mut c = Self {
            send,
            host: addr.to_string(),
            session: String::new(),
            next_id: 1,
        };
        let (headers, _) = c
            .post(
                &json!({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {
                "protocolVersion": "2025-11-25", "capabilities": {},
                "clientInfo": {"name": "mcp-bench", "version": "1"}}}),
            )
            .await?;
        c.session = headers
            .get("mcp-session-id")
            .and_then(|v| v.to_str().ok())
            .context("no Mcp-Session-Id")?
            .to_string();
        c.post(&json!({"jsonrpc": "2.0", "method": "notifications/initialized"}))
            .await?;
        Ok(c)
    }

    async fn post(&mut self, msg: &Value) -> Result<(http::HeaderMap, Bytes)> {
        let mut req = http::Request::post("/mcp")
            .header("host", &self.host)
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if !self.session.is_empty() {
            req = req
                .header("mcp-session-id", &self.session)
                .header("mcp-protocol-version", "2025-11-25");
        }
        let req = req.body(Full::new(Bytes::from(msg.to_string())))?;
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        if !parts.status.is_success() {
            bail!("HTTP {}: {}", parts.status, String::from_utf8_lossy(&body));
        }
        Ok((parts.headers, body))
    }

    /// Ends the session, as a client that is done should.
    async fn close(mut self) -> Result<()> {
        let req = http::Request::delete("/mcp")
            .header("host", &self.host)
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-11-25")
            .body(Full::new(Bytes::new()))?;
        self.send.ready().await?;
        let resp = self.send.send_request(req).await?;
        resp.into_body().collect().await?;
        Ok(())
    }

    /// One `tools/call`; its latency.
    async fn call(&mut self, tool: &str) -> Result<Duration> {
        self.next_id += 1;
        let msg = json!({"jsonrpc": "2.0", "id": self.next_id, "method": "tools/call",
            "params": {"name": tool, "arguments": {"query": "edge nodes", "limit": 3}}});
        let t = Instant::now();
        let (_, body) = self.post(&msg).await?;
        let took = t.elapsed();
        let v: Value = serde_json::from_slice(&body)?;
        if v["result"]["content"][0]["text"] != "results for edge nodes" {
            bail!("unexpected answer: {v}");
        }
        Ok(took)
    }
}

/// Calls a latency round makes on one system before it turns to the next.
const BLOCK: usize = 16;

/// A client of `system` with its session open and a few calls made.
async fn warm_client((addr, tls, tool): System<'_>) -> Result<Client> {
    let mut c = Client::connect(addr, tls).await?;
    for _ in 0..5 {
        c.call(tool).await?;
    }
    Ok(c)
}

/// One latency round: one connection per system, taking turns of [`BLOCK`] calls each (the
/// order rotates every turn) for `length`, so that the upstream's drift from second to
/// second falls on every system alike; the latencies per system.
///
/// With each system's guard thread clock (`None`: no guard), also the guard's CPU time per
/// call in µs over the calls of the round (sessions' setup and teardown left out).
async fn latency_round(
    systems: &[System<'_>],
    clocks: &[Option<ThreadClock>],
    length: Duration,
) -> Result<(Vec<Vec<Duration>>, Vec<Option<f64>>)> {
    let mut conns = Vec::new();
    for &system in systems {
        conns.push(warm_client(system).await?);
    }
    let mut lat = vec![Vec::new(); systems.len()];
    let cpu_before: Vec<Option<Duration>> =
        clocks.iter().map(|c| c.map(ThreadClock::now)).collect();
    let start = Instant::now();
    let mut turn = 0;
    while start.elapsed() < length {
        for k in 0..systems.len() {
            let which = (k + turn) % systems.len();
            for _ in 0..BLOCK {
                lat[which].push(conns[which].call(systems[which].2).await?);
            }
        }
        turn += 1;
    }
    let cpu_per_call = clocks
        .iter()
        .zip(&cpu_before)
        .zip(&lat)
        .map(|((clock, before), calls)| {
            Some((clock.as_ref()?.now() - (*before)?).as_secs_f64() * 1e6 / calls.len() as f64)
        })
        .collect();
    for c in conns {
        c.close().await?;
    }
    Ok((lat, cpu_per_call))
}

/// One rate round: `clients` connections to `system` calling for `length`; calls per
/// second.
async fn rate_round(system: System<'_>, clients: usize, length: Duration) -> Result<f64> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(warm_client(system).await?);
    }
    let tool = system.2;
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut calls = 0u64;
                while start.elapsed() < length {
                    c.call(tool).await?;
                    calls += 1;
                }
                anyhow::Ok((calls, c))
            })
        })
        .collect();
    let mut calls = 0;
    let mut done = Vec::new();
    for t in tasks {
        let (n, c) = t.await??;
        calls += n;
        done.push(c);
    }
    let rate = calls as f64 / start.elapsed().as_secs_f64();
    for c in done {
        c.close().await?;
    }
    Ok(rate)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let o = opts()?;
    std::fs::create_dir_all(&o.out)?;
    let dir = o.out.canonicalize()?;
    let (_upstream, port) = start_upstream(&o.python)?;
    let id = cloudlet::quic::self_signed(&["localhost"])?;
    let mut roots = rustls::RootCertStore::empty();
    roots.add(id.cert.clone())?;
    let direct_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let (guard_addr, guard_clock) =
        start_guard(port, &dir.join("mcp-guard"), &id, AuditSync::Write)?;
    let (sync_addr, _) = start_guard(
        port,
        &dir.join("mcp-guard-fdatasync"),
        &id,
        AuditSync::Fdatasync,
    )?;
    let (relay_addr, relay_clock) = start_tls_relay(direct_addr, &id)?;
    let at_once_addr = start_fixed_upstream()?;
    let (at_once_guard, at_once_clock) = start_guard(
        at_once_addr.port(),
        &dir.join("mcp-guard-at-once"),
        &id,
        AuditSync::Write,
    )?;
    let (at_once_relay, at_once_relay_clock) = start_tls_relay(at_once_addr, &id)?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cloudlet::quic::client_config(
        PqMode::Preferred,
        roots,
        &[b"http/1.1"],
    )?));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Python's answer times drift by tens of percent from second to second on a busy
    // machine: latency rounds interleave the systems in blocks of calls, rate rounds
    // alternate them, and figures are medians over many short rounds.
    let (rounds, length) = if o.quick {
        (6, Duration::from_secs(1))
    } else {
        (15, Duration::from_secs(2))
    };
    let concurrency = 8;
    println!(
        "MCP tools/call, {rounds} rounds of {length:?} per system: 1 client (latency, systems interleaved {BLOCK} calls at a time) and {concurrency} clients (rate)"
    );
    // direct, guard, guard with `audit_sync = "fdatasync"`, and a TLS relay.
    let systems: [System; 4] = [
        (direct_addr, None, "search"),
        (guard_addr, Some(&tls), "web__search"),
        (sync_addr, Some(&tls), "web__search"),
        (relay_addr, Some(&tls), "search"),
    ];
    // The same kinds of path to an upstream that answers at once.
    let at_once: [System; 3] = [
        (at_once_addr, None, "search"),
        (at_once_guard, Some(&tls), "web__search"),
        (at_once_relay, Some(&tls), "search"),
    ];
    let mut p50 = vec![Vec::new(); systems.len()];
    let mut p99 = vec![Vec::new(); systems.len()];
    let mut rate = vec![Vec::new(); 3];
    let mut at_once_p50 = vec![Vec::new(); at_once.len()];
    // The guard's and the TLS relay's thread CPU per call (µs), against Python and against
    // the upstream that answers at once.
    let mut guard_cpu: [Vec<f64>; 2] = Default::default();
    let mut relay_cpu: [Vec<f64>; 2] = Default::default();
    rt.block_on(async {
        for r in 0..rounds {
            let (lats, cpu) = latency_round(
                &systems,
                &[None, Some(guard_clock), None, Some(relay_clock)],
                length,
            )
            .await?;
            guard_cpu[0].extend(cpu[1]);
            relay_cpu[0].extend(cpu[3]);
            for (which, mut lat) in lats.into_iter().enumerate() {
                lat.sort();
                p50[which].push(percentile(&lat, 0.5));
                p99[which].push(percentile(&lat, 0.99));
            }
            let (lats, cpu) = latency_round(
                &at_once,
                &[None, Some(at_once_clock), Some(at_once_relay_clock)],
                length / 4,
            )
            .await?;
            guard_cpu[1].extend(cpu[1]);
            relay_cpu[1].extend(cpu[2]);
            for (which, mut lat) in lats.into_iter().enumerate() {
                lat.sort();
                at_once_p50[which].push(percentile(&lat, 0.5));
            }
            // Rotate which system goes first.
            for k in 0..rate.len() {
                let which = (k + r) % rate.len();
                rate[which].push(rate_round(systems[which], concurrency, length).await?);
            }
        }
        anyhow::Ok(())
    })?;
    let p50: Vec<f64> = p50.into_iter().map(median).collect();
    let p99: Vec<f64> = p99.into_iter().map(median).collect();
    let rate: Vec<f64> = rate.into_iter().map(median).collect();
    let at_once_us: Vec<f64> = at_once_p50.into_iter().map(|v| median(v) * 1e3).collect();
    let [cpu_python, cpu_at_once] = guard_cpu.map(median);
    let [relay_cpu_python, relay_cpu_at_once] = relay_cpu.map(median);
    let (d50, g50, d99, g99, drate, grate) = (p50[0], p50[1], p99[0], p99[1], rate[0], rate[1]);
    println!("                 direct      guard   ratio");
    println!("p50 (ms)      {d50:9.3}  {g50:9.3}   {:.2}x", g50 / d50);
    println!("p99 (ms)      {d99:9.3}  {g99:9.3}   {:.2}x", g99 / d99);
    println!(
        "calls/s (x{concurrency})  {drate:9.0}  {grate:9.0}   {:.2}x",
        grate / drate
    );
    println!(
        "audit_sync = \"fdatasync\": p50 {:.3} ms ({:.2}x direct), {:.0} calls/s ({:.2}x); an fdatasync per answer adds {:.3} ms to the p50",
        p50[2],
        p50[2] / d50,
        rate[2],
        rate[2] / drate,
        p50[2] - g50
    );
    println!(
        "reference: a TLS relay (no checks) to the same upstream: p50 {:.3} ms ({:.2}x direct)",
        p50[3],
        p50[3] / d50
    );
    println!(
        "to an upstream that answers at once, p50: direct {:.1} us, TLS relay {:.1} us (+{:.1}), guard {:.1} us (+{:.1})",
        at_once_us[0],
        at_once_us[2],
        at_once_us[2] - at_once_us[0],
        at_once_us[1],
        at_once_us[1] - at_once_us[0]
    );
    println!(
        "thread CPU per call (latency rounds): guard {cpu_python:.1} us, TLS relay {relay_cpu_python:.1} us with the Python upstream; guard {cpu_at_once:.1} us, TLS relay {relay_cpu_at_once:.1} us with the one that answers at once"
    );
    let p50_goal = g50 / d50 <= 1.10;
    let rate_goal = grate / drate >= 0.90;
    println!(
        "goal: the guard adds at most 10% to p50: {:.1}% {}",
        (g50 / d50 - 1.0) * 100.0,
        if p50_goal { "met" } else { "NOT met" }
    );
    println!(
        "goal: the guard holds at least 90% of the direct rate: {:.1}% {}",
        grate / drate * 100.0,
        if rate_goal { "met" } else { "NOT met" }
    );
    let fig = |name: &str, value: f64, unit: &str, baseline: Option<(&str, f64)>| Figure {
        name: name.into(),
        value,
        unit: unit.into(),
        baseline: baseline.map(|(b, _)| b.into()),
        ratio: baseline.map(|(_, b)| value / b),
    };
    let mut figures = vec![
        fig("mcp tools/call p50 direct", d50, "ms", None),
        fig(
            "mcp tools/call p50 guard",
            g50,
            "ms",
            Some(("mcp tools/call p50 direct", d50)),
        ),
        fig("mcp tools/call p99 direct", d99, "ms", None),
        fig(
            "mcp tools/call p99 guard",
            g99,
            "ms",
            Some(("mcp tools/call p99 direct", d99)),
        ),
        fig("mcp tools/call rate direct", drate, "calls/s", None),
        fig(
            "mcp tools/call rate guard",
            grate,
            "calls/s",
            Some(("mcp tools/call rate direct", drate)),
        ),
    ];
    figures.push(fig(
        "mcp tools/call p50 guard, audit_sync fdatasync",
        p50[2],
        "ms",
        Some(("mcp tools/call p50 direct", d50)),
    ));
    figures.push(fig(
        "mcp tools/call rate guard, audit_sync fdatasync",
        rate[2],
        "calls/s",
        Some(("mcp tools/call rate direct", drate)),
    ));
    figures.push(fig(
        "mcp tools/call p50 tls relay",
        p50[3],
        "ms",
        Some(("mcp tools/call p50 direct", d50)),
    ));
    figures.push(fig(
        "mcp tools/call p50 direct, upstream answering at once",
        at_once_us[0],
        "us",
        None,
    ));
    figures.push(fig(
        "mcp tools/call p50 guard, upstream answering at once",
        at_once_us[1],
        "us",
        Some((
            "mcp tools/call p50 direct, upstream answering at once",
            at_once_us[0],
        )),
    ));
    figures.push(fig(
        "mcp tools/call p50 tls relay, upstream answering at once",
        at_once_us[2],
        "us",
        Some((
            "mcp tools/call p50 direct, upstream answering at once",
            at_once_us[0],
        )),
    ));
    figures.push(fig("mcp guard thread CPU per call", cpu_python, "us", None));
    figures.push(fig(
        "mcp guard thread CPU per call, upstream answering at once",
        cpu_at_once,
        "us",
        None,
    ));
    figures.push(fig(
        "mcp tls relay thread CPU per call",
        relay_cpu_python,
        "us",
        None,
    ));
    figures.push(fig(
        "mcp tls relay thread CPU per call, upstream answering at once",
        relay_cpu_at_once,
        "us",
        None,
    ));
    let path = merge_results(&o.out, &figures)?;
    println!("figures added to {}", path.display());
    Ok(())
}
