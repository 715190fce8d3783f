//! Cost of the hybrid X25519MLKEM768 key exchange in QUIC handshakes, against classical
//! X25519 in the same run: handshakes per second and the server's CPU time per handshake,
//! over loopback with quinn and Cloudlet's rustls configurations; and one-stream HTTP/3 bulk
//! throughput with each. The server runs alone on a thread of its own, whose CPU clock is
//! read from outside; the modes alternate within every round and the figures are medians
//! over rounds. Figures are added to `results.json` (replacing figures of the same names).

use std::{
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use bytes::{Buf as _, Bytes};
use cloudlet::quic::{self, PqMode, SelfSigned};
use cloudlet_benches::{Figure, ThreadClock, merge_results};
use rustls::{NamedGroup, RootCertStore};

/// The allocator cloudletd runs with, since the front door runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct Opts {
    out: PathBuf,
    quick: bool,
    /// Only this part: `handshakes` or `bulk` (for profiling one of them).
    only: Option<String>,
}

fn opts() -> Result<Opts> {
    let mut o = Opts {
        out: PathBuf::from("target/cloudlet-bench"),
        quick: false,
        only: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = PathBuf::from(it.next().context("--out needs a folder")?),
            "--only" => {
                let part = it.next().context("--only needs handshakes or bulk")?;
                if part != "handshakes" && part != "bulk" {
                    bail!("--only takes handshakes or bulk, not {part}");
                }
                o.only = Some(part);
            }
            other => {
                bail!("unknown argument {other} (takes --quick, --out DIR, --only PART)")
            }
        }
    }
    Ok(o)
}

/// What the server does with a connection.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Serve {
    /// Nothing: wait for the client to close it (handshake cost alone).
    Handshake,
    /// HTTP/3: `GET /bytes/N` answers N bytes.
    Bulk,
}

/// A quinn server on a thread of its own.
struct Server {
    addr: SocketAddr,
    /// The server thread's CPU clock (valid until `self` is dropped, which ends the thread).
    clock: ThreadClock,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Server {
    fn start(mode: PqMode, id: &SelfSigned, serve: Serve) -> Result<Self> {
        let config = quic::quinn_server_config(mode, vec![id.cert.clone()], id.key.clone_key())?;
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            // Named by mode, so profiles can tell the servers apart.
            .name(format!("quic-{}", mode.as_str()))
            .spawn(move || {
                let clock = ThreadClock::current();
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("server runtime");
                runtime.block_on(async move {
                    let endpoint = quinn::Endpoint::server(config, (Ipv4Addr::LOCALHOST, 0).into())
                        .expect("binding the server");
                    let addr = endpoint.local_addr().expect("server address");
                    let _ = ready_tx.send(clock.map(|c| (c, addr)));
                    let accept = async {
                        while let Some(incoming) = endpoint.accept().await {
                            tokio::spawn(async move {
                                let Ok(conn) = incoming.await else { return };
                                match serve {
                                    Serve::Handshake => {
                                        conn.closed().await;
                                    }
                                    Serve::Bulk => serve_bulk(conn).await,
                                }
                            });
                        }
                    };
                    tokio::select! {
                        () = accept => {}
                        _ = stopped => {}
                    }
                    endpoint.close(0u32.into(), b"");
                });
            })?;
        let (clock, addr) = ready_rx
            .recv()
            .context("the server thread did not start")??;
        Ok(Self {
            addr,
            clock,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// The server thread's CPU time so far.
    fn cpu(&self) -> Duration {
        self.clock.now()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Serves `GET /bytes/N` with N zero bytes, in 64 KiB chunks.
async fn serve_bulk(conn: quinn::Connection) {
    let Ok(mut h3) = h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await
    else {
        return;
    };
    let chunk = Bytes::from(vec![0u8; 64 << 10]);
    while let Ok(Some(resolver)) = h3.accept().await {
        let chunk = chunk.clone();
        tokio::spawn(async move {
            let Ok((request, mut stream)) = resolver.resolve_request().await else {
                return;
            };
            let n: usize = request
                .uri()
                .path()
                .strip_prefix("/bytes/")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            let response = http::Response::builder()
                .status(200)
                .header(http::header::CONTENT_LENGTH, n)
                .body(())
                .unwrap_or_default();
            if stream.send_response(response).await.is_err() {
                return;
            }
            let mut left = n;
            while left > 0 {
                let part = chunk.slice(..left.min(chunk.len()));
                left -= part.len();
                if stream.send_data(part).await.is_err() {
                    return;
                }
            }
            let _ = stream.finish().await;
        });
    }
}

/// The key exchange group a client connection negotiated.
fn group(conn: &quinn::Connection) -> Option<NamedGroup> {
    conn.handshake_data()?
        .downcast::<quinn::crypto::rustls::HandshakeData>()
        .ok()
        .map(|h| h.negotiated_key_exchange_group)
}

fn expected_group(mode: PqMode) -> NamedGroup {
    match mode {
        PqMode::Off => NamedGroup::X25519,
        _ => NamedGroup::X25519MLKEM768,
    }
}

/// `n` handshakes with `workers` in flight; returns the wall time.
async fn handshakes(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    mode: PqMode,
    n: usize,
    workers: usize,
) -> Result<Duration> {
    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for w in 0..workers {
        let (endpoint, config) = (endpoint.clone(), config.clone());
        let count = n / workers + usize::from(w < n % workers);
        tasks.spawn(async move {
            for _ in 0..count {
                let conn = endpoint
                    .connect_with(config.clone(), addr, "localhost")?
                    .await?;
                let got = group(&conn);
                if got != Some(expected_group(mode)) {
                    bail!("negotiated {got:?}, expected {:?}", expected_group(mode));
                }
                conn.close(0u32.into(), b"");
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok(started.elapsed())
}

/// Fetches `bytes` over one HTTP/3 stream; returns the time from request to last byte.
async fn bulk(
    endpoint: &quinn::Endpoint,
    config: &quinn::ClientConfig,
    addr: SocketAddr,
    bytes: usize,
) -> Result<Duration> {
    let conn = endpoint
        .connect_with(config.clone(), addr, "localhost")?
        .await?;
    let (mut driver, mut send) = h3::client::new(h3_quinn::Connection::new(conn)).await?;
    let drive = tokio::spawn(async move {
        let _ = driver.wait_idle().await;
    });
    let started = Instant::now();
    let request = http::Request::get(format!("https://localhost/bytes/{bytes}")).body(())?;
    let mut stream = send.send_request(request).await?;
    stream.finish().await?;
    let response = stream.recv_response().await?;
    if response.status() != 200 {
        bail!("bulk: status {}", response.status());
    }
    let mut got = 0usize;
    while let Some(chunk) = stream.recv_data().await? {
        got += chunk.remaining();
    }
    let took = started.elapsed();
    if got != bytes {
        bail!("bulk: {got} bytes, expected {bytes}");
    }
    drop(stream);
    drop(send);
    drive.abort();
    Ok(took)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn figure(name: &str, value: f64, unit: &str, baseline: Option<(&str, f64)>) -> Figure {
    Figure {
        name: name.to_string(),
        value,
        unit: unit.to_string(),
        baseline: baseline.map(|(b, _)| b.to_string()),
        ratio: baseline.map(|(_, v)| value / v),
    }
}

const MODES: [(PqMode, &str); 2] = [(PqMode::Required, "hybrid"), (PqMode::Off, "classical")];

fn main() -> Result<()> {
    let o = opts()?;
    let (rounds, per_round, workers, bulk_bytes, bulk_rounds) = if o.quick {
        (5, 150, 4, 32 << 20, 3)
    } else {
        (15, 400, 4, 256 << 20, 5)
    };
    let id = quic::self_signed(&["localhost"])?;
    let mut roots = RootCertStore::empty();
    roots.add(id.cert.clone())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let started = Instant::now();

    let run = |part: &str| o.only.as_deref().is_none_or(|p| p == part);
    let configs = MODES
        .iter()
        .map(|(mode, _)| quic::quinn_client_config(*mode, roots.clone()))
        .collect::<Result<Vec<_>, _>>()?;

    // Handshakes: per round, each mode in turn on its own server (order alternating).
    let mut rate: [Vec<f64>; 2] = Default::default();
    let mut cpu_us: [Vec<f64>; 2] = Default::default();
    if run("handshakes") {
        let servers = MODES
            .iter()
            .map(|(mode, _)| Server::start(*mode, &id, Serve::Handshake))
            .collect::<Result<Vec<_>>>()?;
        runtime.block_on(async {
            let endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into())?;
            // Warm-up: caches, allocator, the first connections.
            for (i, (mode, _)) in MODES.iter().enumerate() {
                handshakes(&endpoint, &configs[i], servers[i].addr, *mode, 50, workers).await?;
            }
            for round in 0..rounds {
                for k in 0..MODES.len() {
                    let i = (round + k) % MODES.len();
                    let before = servers[i].cpu();
                    let wall = handshakes(
                        &endpoint,
                        &configs[i],
                        servers[i].addr,
                        MODES[i].0,
                        per_round,
                        workers,
                    )
                    .await?;
                    // Let the server finish its side (the last Finished, the closes).
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    let cpu = servers[i].cpu() - before;
                    rate[i].push(per_round as f64 / wall.as_secs_f64());
                    cpu_us[i].push(cpu.as_secs_f64() * 1e6 / per_round as f64);
                }
            }
            endpoint.wait_idle().await;
            Ok::<_, anyhow::Error>(())
        })?;
        drop(servers);
    }

    // Bulk: one HTTP/3 stream per transfer.
    let mut mib_s: [Vec<f64>; 2] = Default::default();
    if run("bulk") {
        let servers = MODES
            .iter()
            .map(|(mode, _)| Server::start(*mode, &id, Serve::Bulk))
            .collect::<Result<Vec<_>>>()?;
        runtime.block_on(async {
            let endpoint = quinn::Endpoint::client((Ipv4Addr::LOCALHOST, 0).into())?;
            for round in 0..bulk_rounds {
                for k in 0..MODES.len() {
                    let i = (round + k) % MODES.len();
                    let took = bulk(&endpoint, &configs[i], servers[i].addr, bulk_bytes).await?;
                    mib_s[i].push(bulk_bytes as f64 / (1 << 20) as f64 / took.as_secs_f64());
                }
            }
            Ok::<_, anyhow::Error>(())
        })?;
        drop(servers);
    }

    // Each round runs both modes back to back, so its ratio leaves out the machine's drift
    // from round to round (this guest has slow and fast phases lasting seconds).
    let paired: Vec<f64> = cpu_us[0]
        .iter()
        .zip(&cpu_us[1])
        .map(|(h, c)| h / c)
        .collect();
    let (paired_min, paired_max) = paired
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(*r), hi.max(*r))
        });
    let paired_ratio = median(paired);
    let [rate_h, rate_c] = rate.map(median);
    let [cpu_h, cpu_c] = cpu_us.map(median);
    let [bulk_h, bulk_c] = mib_s.map(median);
    let mut figures = vec![
        figure(
            "quic_handshakes_per_s_classical",
            rate_c,
            "handshakes/s",
            None,
        ),
        figure(
            "quic_handshakes_per_s_hybrid",
            rate_h,
            "handshakes/s",
            Some(("quic_handshakes_per_s_classical", rate_c)),
        ),
        figure(
            "quic_server_cpu_per_handshake_classical",
            cpu_c,
            "us/handshake",
            None,
        ),
        figure(
            "quic_server_cpu_per_handshake_hybrid",
            cpu_h,
            "us/handshake",
            Some(("quic_server_cpu_per_handshake_classical", cpu_c)),
        ),
        // The goal's figure: the median of the rounds' hybrid/classical ratios, as the
        // hybrid's extra server CPU.
        figure(
            "quic_server_cpu_hybrid_extra_round_by_round",
            (paired_ratio - 1.0) * 100.0,
            "%",
            None,
        ),
        figure("quic_h3_bulk_classical", bulk_c, "MiB/s", None),
        figure(
            "quic_h3_bulk_hybrid",
            bulk_h,
            "MiB/s",
            Some(("quic_h3_bulk_classical", bulk_c)),
        ),
    ];
    // A part left out has no figures.
    figures.retain(|f| f.value.is_finite());
    println!(
        "QUIC handshakes over loopback: {rounds} rounds of {per_round} per mode ({workers} in flight), \
         one-stream HTTP/3 bulk: {bulk_rounds} rounds of {} MiB; medians",
        bulk_bytes >> 20
    );
    for f in &figures {
        println!(
            "{:<40} {:>10.1} {:<14} {:>7}  {}",
            f.name,
            f.value,
            f.unit,
            f.ratio.map_or(String::new(), |r| format!("{r:.2}x")),
            f.baseline.as_deref().unwrap_or("")
        );
    }
    if paired_ratio.is_finite() {
        println!(
            "hybrid/classical server CPU per handshake, round by round: median {paired_ratio:.3}x \
             (rounds {paired_min:.3}x to {paired_max:.3}x; ratio of the medians above {:.3}x)",
            cpu_h / cpu_c
        );
        println!(
            "goal: hybrid server CPU per handshake at most 1.15x classical (pure Rust): {} ({paired_ratio:.2}x)",
            if paired_ratio <= 1.15 {
                "met"
            } else {
                "NOT met"
            }
        );
    }
    let path = merge_results(&o.out, &figures)?;
    println!(
        "added to {} ({:.1} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
