//! The demo behind `cargo xtask run`: a cloudlet on a veth pair between two network
//! namespaces, cloudletd filtering with the demo policy on the real GeoIP database, traffic
//! from addresses of several countries, and live counters. Always tears down.
//!
//! Topology: namespace `cloudlet-demo-net` (the internet side, interface `demo-peer`) and
//! namespace `cloudlet-demo-gw` (the cloudlet, interface `demo-wan` with the XDP program).

use std::{
    io::{BufRead as _, BufReader, IsTerminal as _, Write as _},
    net::IpAddr,
    path::PathBuf,
    process::{Child, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use cloudlet::{admin, dataplane::stats::Stats, frame::Frame, geoip::GeoDb};
use cloudlet_tests::{
    netns::{NetNs, veth_pair},
    traffic::PacketSocket,
};

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Countries the demo sends from, with whether the policy counts them as EU.
const SOURCES: &[&str] = &["DE", "FR", "NL", "US", "JP", "BR", "IN", "IR"];

struct Args {
    cloudletd: PathBuf,
    policy: PathBuf,
    work: PathBuf,
    duration: Option<f64>,
    pps: u32,
}

fn parse_args() -> Args {
    let mut a = Args {
        cloudletd: PathBuf::from("target/release/cloudletd"),
        policy: PathBuf::from("examples/demo-policy.toml"),
        work: PathBuf::from("target/cloudlet-demo"),
        duration: None,
        pps: 2000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().unwrap_or_else(|| panic!("{flag} needs a value"));
        match flag.as_str() {
            "--cloudletd" => a.cloudletd = PathBuf::from(value()),
            "--policy" => a.policy = PathBuf::from(value()),
            "--work-dir" => a.work = PathBuf::from(value()),
            "--duration" => a.duration = Some(value().parse().expect("--duration seconds")),
            "--pps" => a.pps = value().parse().expect("--pps number"),
            other => panic!("unknown argument {other}"),
        }
    }
    a
}

/// A few addresses of each country, picked from the database itself.
fn sources(db: &GeoDb) -> Vec<(String, IpAddr)> {
    let mut picked: Vec<(String, IpAddr)> = Vec::new();
    let mut seen = std::collections::HashMap::<(usize, bool), usize>::new();
    db.for_each_network(
        |code| SOURCES.iter().position(|c| *c == code),
        |prefix, country| {
            let n = seen.entry((country, prefix.is_ipv4())).or_default();
            *n += 1;
            // Every 500th network, two of each family per country.
            if *n % 500 == 1 && *n < 1000 {
                let host = cloudlet::policy::Prefix::new(prefix.addr(), prefix.len())
                    .map(|p| p.range().0 + 1)
                    .unwrap_or_default();
                let ip = if prefix.is_ipv4() {
                    IpAddr::from(std::net::Ipv4Addr::from(host as u32))
                } else {
                    IpAddr::from(std::net::Ipv6Addr::from(host))
                };
                picked.push((SOURCES[country].to_string(), ip));
            }
        },
    )
    .expect("reading the GeoIP database");
    picked.sort();
    picked
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn main() {
    let args = parse_args();
    // SAFETY: installing an async-signal-safe handler that only stores an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    std::fs::create_dir_all(&args.work).expect("creating the work folder");
    let work = args.work.canonicalize().expect("work folder");
    let policy = args
        .policy
        .canonicalize()
        .unwrap_or_else(|e| panic!("{}: {e}", args.policy.display()));
    let parsed = cloudlet::policy::load(&policy).unwrap_or_else(|e| panic!("{e}"));
    let db_path = parsed
        .geoip_database
        .clone()
        .expect("the demo policy names a GeoIP database");
    let db = GeoDb::open(&db_path).unwrap_or_else(|e| panic!("{e}"));
    let sources = sources(&db);

    println!("Setting up namespaces cloudlet-demo-net and cloudlet-demo-gw joined by a veth pair");
    let net = NetNs::named("cloudlet-demo-net");
    let gw = NetNs::named("cloudlet-demo-gw");
    veth_pair(&net, "demo-peer", &gw, "demo-wan");
    for addr in ["10.10.1.10/16", "10.20.1.10/16"] {
        gw.exec(&["ip", "addr", "add", addr, "dev", "demo-wan"]);
    }
    let wan_mac = gw.mac("demo-wan");
    let peer_mac = net.mac("demo-peer");

    let socket = work.join("cloudletd.sock");
    let config = work.join("cloudlet.toml");
    std::fs::write(
        &config,
        format!(
            "# Written by the demo.\npolicy = {:?}\ninterfaces = [\"demo-wan\"]\n[admin]\nsocket = {:?}\n",
            policy.display().to_string(),
            socket.display().to_string()
        ),
    )
    .expect("writing the demo config");
    let mut child = gw
        .command(&args.cloudletd.display().to_string())
        .args([
            "--config",
            &config.display().to_string(),
            "--detach-on-exit",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {}: {e}", args.cloudletd.display()));
    let stderr = child.stderr.take().expect("piped stderr");
    let daemon = Daemon(child);
    let log_path = work.join("cloudletd.log");
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(&log_path).ok();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if let Some(f) = log.as_mut() {
                let _ = writeln!(f, "{line}");
            }
            if line.contains("policy")
                || line.contains("attached")
                || line.contains("ERROR")
                || line.contains("WARN")
            {
                eprintln!("cloudletd: {line}");
            }
        }
    });
    let started = Instant::now();
    while admin::get(&socket, "/healthz").is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "cloudletd did not come up; see {}",
            work.join("cloudletd.log").display()
        );
        if STOP.load(Ordering::SeqCst) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // Frames: each source to the clinic and to the web server, some IPv6, some malformed.
    let mut frames: Vec<(String, Vec<u8>)> = Vec::new();
    for (country, src) in &sources {
        for dst in ["10.10.1.10", "10.20.1.10"] {
            let dst: IpAddr = if src.is_ipv4() {
                dst.parse().expect("address")
            } else if dst.starts_with("10.10") {
                "fd00:10::10".parse().expect("address")
            } else {
                "fd00:20::10".parse().expect("address")
            };
            let mut f = Frame::udp(*src, dst, 40000, 443);
            f.dst_mac = wan_mac;
            f.src_mac = peer_mac;
            frames.push((country.clone(), f.build()));
        }
    }
    let mut truncated = frames[0].1.clone();
    truncated.truncate(30);
    frames.push(("malformed".into(), truncated));

    let sent = Arc::new(AtomicU64::new(0));
    let received = Arc::new(AtomicU64::new(0));
    std::thread::scope(|s| {
        let sent2 = sent.clone();
        let net = &net;
        let frames = &frames;
        s.spawn(move || {
            net.run(|| {
                let sock = PacketSocket::bind("demo-peer").expect("AF_PACKET socket on demo-peer");
                let gap = Duration::from_secs_f64(1.0 / f64::from(args.pps.max(1)));
                let mut next = Instant::now();
                let mut i = 0usize;
                while !STOP.load(Ordering::SeqCst) {
                    if sock.send(&frames[i % frames.len()].1).is_ok() {
                        sent2.fetch_add(1, Ordering::Relaxed);
                    }
                    i += 1;
                    next += gap;
                    if let Some(wait) = next.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        });
        let received2 = received.clone();
        let gw = &gw;
        s.spawn(move || {
            gw.run(|| {
                let sock = PacketSocket::bind("demo-wan").expect("AF_PACKET socket on demo-wan");
                let mut buf = [0u8; 2048];
                while !STOP.load(Ordering::SeqCst) {
                    if let Ok(Some(_)) = sock.recv(&mut buf, Duration::from_millis(200)) {
                        received2.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        });

        let tty = std::io::stdout().is_terminal();
        let began = Instant::now();
        loop {
            std::thread::sleep(Duration::from_secs(1));
            let done = STOP.load(Ordering::SeqCst)
                || args
                    .duration
                    .is_some_and(|d| began.elapsed().as_secs_f64() >= d);
            let stats: Option<Stats> = admin::get(&socket, "/stats")
                .ok()
                .and_then(|b| serde_json::from_str(&b).ok());
            let mut out = String::new();
            if tty {
                out.push_str("\x1b[2J\x1b[H");
            }
            out.push_str(&format!(
                "Cloudlet demo: {:.0}s, sent {} frames from {} addresses in {} ({} pps); passed to the stack {}\n\n",
                began.elapsed().as_secs_f64(),
                sent.load(Ordering::Relaxed),
                sources.len(),
                SOURCES.join(", "),
                args.pps,
                received.load(Ordering::Relaxed),
            ));
            match stats {
                Some(s) => {
                    let mut s = s;
                    s.zones.retain(|z| z.src.packets > 0 || z.dst.packets > 0);
                    out.push_str(&s.render_table());
                }
                None => out.push_str("(cloudletd is not answering)\n"),
            }
            if !tty {
                out.push_str("----\n");
            }
            print!("{out}");
            let _ = std::io::stdout().flush();
            if done {
                STOP.store(true, Ordering::SeqCst);
                break;
            }
        }
    });
    drop(daemon);
    println!(
        "cloudletd stopped; removing namespaces (log: {})",
        work.join("cloudletd.log").display()
    );
    drop(gw);
    drop(net);
}
