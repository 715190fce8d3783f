//! What the MCP guard costs: `tools/call` latency (p50, p99) and request rate through the
//! guard against straight to the same upstream, in the same run.
//!
//! The upstream is the official MCP Python SDK's server (`tests/mcp/upstream.py --profile
//! web`, Streamable HTTP with JSON answers). "direct" clients talk to it over HTTP/1.1;
//! "guard" clients talk to the front door over HTTPS (HTTP/1.1, kept-alive connections),
//! whose guard checks every call (roles, rate limit, pin, threat scan, JSON Schema),
//! forwards it, scans the result and writes the audit log before answering.
//! The guard runs as in cloudletd, on a single-threaded tokio runtime of its own thread.
//! Rounds alternate the systems; figures are medians over rounds.
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
use cloudlet_benches::{Figure, merge_results};
use cloudlet_tests::daemon::{Daemon, Output, spawn_until};
use http_body_util::{BodyExt as _, Full};
use serde_json::{Value, json};

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
) -> Result<SocketAddr> {
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
                        let _ = tx.send(Ok(door.local_addr()));
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

/// One round: `clients` connections calling for `length`; latencies and calls per second.
async fn round(
    addr: SocketAddr,
    tls: Option<&tokio_rustls::TlsConnector>,
    tool: &'static str,
    clients: usize,
    length: Duration,
) -> Result<(Vec<Duration>, f64)> {
    let mut conns = Vec::new();
    for _ in 0..clients {
        conns.push(Client::connect(addr, tls).await?);
    }
    // Warm-up: a few calls on each connection.
    for c in &mut conns {
        for _ in 0..5 {
            c.call(tool).await?;
        }
    }
    let start = Instant::now();
    let tasks: Vec<_> = conns
        .into_iter()
        .map(|mut c| {
            tokio::spawn(async move {
                let mut lat = Vec::new();
                while start.elapsed() < length {
                    lat.push(c.call(tool).await?);
                }
                anyhow::Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    let rate = all.len() as f64 / start.elapsed().as_secs_f64();
    Ok((all, rate))
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
    let guard_addr = start_guard(port, &dir.join("mcp-guard"), &id, AuditSync::Write)?;
    let sync_addr = start_guard(
        port,
        &dir.join("mcp-guard-fdatasync"),
        &id,
        AuditSync::Fdatasync,
    )?;
    let direct_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cloudlet::quic::client_config(
        PqMode::Preferred,
        roots,
        &[b"http/1.1"],
    )?));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Python's answer times drift by tens of percent from second to second on a busy
    // machine: many short rounds, alternated, and their medians.
    let (rounds, length) = if o.quick {
        (6, Duration::from_secs(1))
    } else {
        (15, Duration::from_secs(2))
    };
    let concurrency = 8;
    println!(
        "MCP tools/call, {rounds} rounds of {length:?} per system: 1 client (latency) and {concurrency} clients (rate)"
    );
    // direct, guard, guard with `audit_sync = "fdatasync"`.
    let systems: [(
        SocketAddr,
        Option<&tokio_rustls::TlsConnector>,
        &'static str,
    ); 3] = [
        (direct_addr, None, "search"),
        (guard_addr, Some(&tls), "web__search"),
        (sync_addr, Some(&tls), "web__search"),
    ];
    let mut p50 = vec![Vec::new(); systems.len()];
    let mut p99 = vec![Vec::new(); systems.len()];
    let mut rate = vec![Vec::new(); systems.len()];
    rt.block_on(async {
        for r in 0..rounds {
            // Rotate which system goes first.
            for k in 0..systems.len() {
                let which = (k + r) % systems.len();
                let (addr, tls, tool) = systems[which];
                let (mut lat, _) = round(addr, tls, tool, 1, length).await?;
                lat.sort();
                p50[which].push(percentile(&lat, 0.5));
                p99[which].push(percentile(&lat, 0.99));
                let (_, r) = round(addr, tls, tool, concurrency, length).await?;
                rate[which].push(r);
            }
        }
        anyhow::Ok(())
    })?;
    let p50: Vec<f64> = p50.into_iter().map(median).collect();
    let p99: Vec<f64> = p99.into_iter().map(median).collect();
    let rate: Vec<f64> = rate.into_iter().map(median).collect();
    let (d50, g50, d99, g99, drate, grate) = (p50[0], p50[1], p99[0], p99[1], rate[0], rate[1]);
    println!("                 direct      guard   ratio");
    println!("p50 (ms)      {d50:9.3}  {g50:9.3}   {:.2}x", g50 / d50);
    println!("p99 (ms)      {d99:9.3}  {g99:9.3}   {:.2}x", g99 / d99);
    println!(
        "calls/s (x{concurrency})  {drate:9.0}  {grate:9.0}   {:.2}x",
        grate / drate
    );
    {
        println!(
            "audit_sync = \"fdatasync\": p50 {:.3} ms ({:.2}x direct), {:.0} calls/s ({:.2}x); an fdatasync per answer adds {:.3} ms to the p50",
            p50[2],
            p50[2] / d50,
            rate[2],
            rate[2] / drate,
            p50[2] - g50
        );
    }
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
    let path = merge_results(&o.out, &figures)?;
    println!("figures added to {}", path.display());
    Ok(())
}
