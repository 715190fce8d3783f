//! Real frames across a veth pair with the XDP program attached in native mode: the
//! receiver gets exactly the frames the policy allows. And cloudletd itself: attach,
//! counters on the admin socket, SIGHUP reload (a bad policy leaves the running one in
//! force), detach on SIGTERM.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use cloudlet::{
    admin,
    dataplane::{AttachMode, Loaded, ProgramKind, stats::Stats},
    frame::Frame,
    geoip::GeoDb,
    node::prepare_policy,
};
use cloudlet_tests::{
    netns::{NetNs, veth_pair},
    progtest::GEOIP_DATABASE,
    traffic::PacketSocket,
};

/// Addresses whose country the test checks against the database before use.
const SOURCES: &[(&str, &str)] = &[
    ("194.25.2.129", "DE"),
    ("85.214.0.1", "DE"),
    ("90.0.0.1", "FR"),
    ("8.8.8.8", "US"),
    ("1.1.1.1", "AU"),
    ("2003::1", "DE"),
    ("2a01:cb00::1", "FR"),
    ("2001:4860:4860::8888", "US"),
];

fn policy_text(extra: &str) -> String {
    format!(
        r#"
default = "pass"
malformed = "drop"
[geoip]
database = "{}"
[zones.eu]
countries = ["DE", "FR", "NL"]
[zones.lab]
prefixes = ["10.10.0.0/16", "fd00:10::/32"]
[[rules]]
name = "lab-only-from-eu"
src_zone = "!eu"
dst_zone = "lab"
action = "drop"
{extra}
"#,
        GEOIP_DATABASE
    )
}

/// One frame per source and destination, each carrying its index as a marker.
fn frames(dst_mac: [u8; 6]) -> Vec<(String, IpAddr, IpAddr, Vec<u8>)> {
    let db =
        GeoDb::open(Path::new(GEOIP_DATABASE)).expect("GeoIP database (run cargo xtask setup)");
    let mut out = Vec::new();
    for (src, country) in SOURCES {
        let src: IpAddr = src.parse().unwrap();
        assert_eq!(
            db.country(src).unwrap().as_deref(),
            Some(*country),
            "country of {src}"
        );
        let dsts: [&str; 2] = if src.is_ipv4() {
            ["10.10.0.5", "10.20.0.5"]
        } else {
            ["fd00:10::5", "fd00:20::5"]
        };
        for dst in dsts {
            let dst: IpAddr = dst.parse().unwrap();
            let marker = format!("cloudlet-veth-{}", out.len());
            let mut f = Frame::udp(src, dst, 5353, 8443).payload(marker.as_bytes());
            f.dst_mac = dst_mac;
            out.push((country.to_string(), src, dst, f.build()));
        }
    }
    out
}

fn markers(frames: &[Vec<u8>]) -> BTreeSet<usize> {
    frames
        .iter()
        .filter_map(|f| {
            let at = f.windows(14).position(|w| w == b"cloudlet-veth-")?;
            std::str::from_utf8(&f[at + 14..])
                .ok()?
                .trim_end_matches('\0')
                .parse()
                .ok()
        })
        .collect()
}

/// Sends `frames` from `src`'s `src_if` and returns what arrived on `dut`'s `dut_if`.
fn exchange(
    src: &NetNs,
    src_if: &str,
    dut: &NetNs,
    dut_if: &str,
    frames: &[Vec<u8>],
) -> Vec<Vec<u8>> {
    dut.run(|| {
        let rx = PacketSocket::bind(dut_if).expect("receiver socket");
        src.run(|| {
            let tx = PacketSocket::bind(src_if).expect("sender socket");
            for f in frames {
                tx.send(f).expect("send");
            }
        });
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        while let Some(n) = rx.recv(&mut buf, Duration::from_millis(500)).expect("recv") {
            got.push(buf[..n].to_vec());
        }
        got
    })
}

#[test]
fn native_xdp_passes_exactly_the_allowed_frames() {
    let dir = std::env::temp_dir().join(format!("cloudlet-veth-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(&policy, policy_text("")).unwrap();
    let compiled = prepare_policy(&policy).unwrap_or_else(|e| panic!("{e}"));

    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src0", &dut, "dut0");
    let frames = frames(dut.mac("dut0"));
    let allowed: BTreeSet<usize> = frames
        .iter()
        .enumerate()
        .filter(|(_, (country, _, dst, _))| {
            let to_lab =
                dst.to_string().starts_with("10.10.") || dst.to_string().starts_with("fd00:10:");
            !to_lab || matches!(country.as_str(), "DE" | "FR" | "NL")
        })
        .map(|(i, _)| i)
        .collect();
    assert!(
        allowed.len() < frames.len() && !allowed.is_empty(),
        "the case mixes allowed and denied frames"
    );
    let raw: Vec<Vec<u8>> = frames.iter().map(|f| f.3.clone()).collect();

    // Without a program every frame arrives: the path itself loses nothing.
    let got = exchange(&src, "src0", &dut, "dut0", &raw);
    assert_eq!(
        markers(&got),
        (0..frames.len()).collect(),
        "baseline without XDP"
    );

    let (got, stats) = dut.run(|| {
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false).expect("load");
        let (link, mode) = loaded
            .attach("dut0", AttachMode::Native)
            .expect("native attach on veth");
        assert_eq!(mode, AttachMode::Native);
        let got = exchange(&src, "src0", &dut, "dut0", &raw);
        let stats = loaded.stats(&compiled).expect("stats");
        drop(link);
        (got, stats)
    });
    assert_eq!(
        markers(&got),
        allowed,
        "the receiver gets exactly the allowed frames"
    );
    assert_eq!(stats.verdict("pass").packets as usize, allowed.len());
    assert_eq!(
        stats.verdict("drop").packets as usize,
        frames.len() - allowed.len()
    );
    let rule = &stats.rules[0];
    assert_eq!(rule.count.packets as usize, frames.len() - allowed.len());
    let eu = stats.zones.iter().find(|z| z.name == "eu").unwrap();
    let from_eu = frames
        .iter()
        .filter(|f| matches!(f.0.as_str(), "DE" | "FR" | "NL"))
        .count();
    assert_eq!(eu.src.packets as usize, from_eu);

    // Detached again: everything arrives.
    let got = exchange(&src, "src0", &dut, "dut0", &raw);
    assert_eq!(markers(&got).len(), frames.len(), "after detach");
    let _ = std::fs::remove_dir_all(&dir);
}

fn cloudletd_path() -> PathBuf {
    std::env::var_os("CLOUDLETD")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/debug/cloudletd"))
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for(socket: &Path) {
    let start = Instant::now();
    while admin::get(socket, "/healthz").is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "cloudletd did not answer on {}",
            socket.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stats(socket: &Path) -> Stats {
    serde_json::from_str(&admin::get(socket, "/stats").expect("GET /stats")).expect("stats JSON")
}

fn hup_and_wait(d: &Daemon, socket: &Path, until: impl Fn(&Stats) -> bool) {
    // SAFETY: signalling our own child.
    unsafe { libc::kill(d.0.id() as i32, libc::SIGHUP) };
    let start = Instant::now();
    while !until(&stats(socket)) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "cloudletd did not reach the expected state after SIGHUP"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn cloudletd_filters_reloads_and_keeps_a_good_policy_over_a_bad_one() {
    let bin = cloudletd_path();
    assert!(
        bin.exists(),
        "{} missing: build it with `cargo build -p cloudlet-user --bins` (cargo xtask test does)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("cloudlet-daemon-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    let socket = dir.join("cloudletd.sock");
    std::fs::write(&policy, policy_text("")).unwrap();
    std::fs::write(
        dir.join("cloudlet.toml"),
        format!("policy = \"policy.toml\"\ninterfaces = [\"dut1\"]\nxdp_mode = \"native\"\n[admin]\nsocket = {:?}\nlisten = \"127.0.0.1:9464\"\n", socket.display().to_string()),
    )
    .unwrap();

    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src1", &dut, "dut1");
    let frames = frames(dut.mac("dut1"));
    let raw: Vec<Vec<u8>> = frames.iter().map(|f| f.3.clone()).collect();
    let denied = frames
        .iter()
        .filter(|(c, _, d, _)| {
            !matches!(c.as_str(), "DE" | "FR" | "NL")
                && (d.to_string().starts_with("10.10.") || d.to_string().starts_with("fd00:10:"))
        })
        .count();

    let daemon = Daemon(
        dut.command(&bin.display().to_string())
            .args([
                "--config",
                &dir.join("cloudlet.toml").display().to_string(),
                "--detach-on-exit",
            ])
            .stderr(Stdio::null())
            .spawn()
            .expect("start cloudletd"),
    );
    wait_for(&socket);
    let got = exchange(&src, "src1", &dut, "dut1", &raw);
    assert_eq!(got.len(), frames.len() - denied, "policy 1 in force");
    let s = stats(&socket);
    assert_eq!(s.rules[0].count.packets as usize, denied);
    // The same counters for Prometheus, on the socket and on the TCP listener (which is in
    // the daemon's namespace).
    let line = format!(
        "cloudlet_rule_packets_total{{rule=\"lab-only-from-eu\",action=\"drop\"}} {denied}"
    );
    // Each drop of that exchange is also a sampled event (well within the budget).
    let start = Instant::now();
    let events = loop {
        let list: Vec<cloudlet::dataplane::events::Event> =
            serde_json::from_str(&admin::get(&socket, "/events").expect("GET /events"))
                .expect("events JSON");
        if list.len() >= denied || start.elapsed() > Duration::from_secs(5) {
            break list;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(events.len(), denied, "one event per drop: {events:?}");
    for e in &events {
        assert_eq!(e.rule.as_deref(), Some("lab-only-from-eu"));
        assert_eq!(e.reason, "rule");
        assert_eq!(e.interface, "dut1");
        assert_eq!(e.proto, Some(17));
        assert_eq!((e.src_port, e.dst_port), (Some(5353), Some(8443)));
        let dst: IpAddr = e.dst.as_deref().expect("dst").parse().expect("address");
        assert!(frames.iter().any(|(c, s, d, _)| *d == dst
            && e.src.as_deref() == Some(&s.to_string())
            && !matches!(c.as_str(), "DE" | "FR" | "NL")));
    }
    let newer: Vec<cloudlet::dataplane::events::Event> = serde_json::from_str(
        &admin::get(&socket, &format!("/events?since={}", events[0].seq)).unwrap(),
    )
    .unwrap();
    assert_eq!(newer.len(), denied - 1, "?since= skips what was read");
    let metrics = admin::get(&socket, "/metrics").expect("GET /metrics");
    assert!(
        metrics.lines().any(|l| l == line),
        "{line:?} missing from\n{metrics}"
    );
    let scraped = dut.run(|| {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect("127.0.0.1:9464").expect("TCP admin listener");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    });
    assert!(
        scraped.starts_with("HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text"),
        "{scraped}"
    );
    assert!(
        scraped.lines().any(|l| l == line),
        "{line:?} missing from\n{scraped}"
    );

    // A policy that does not validate: the running one stays.
    std::fs::write(&policy, "[[rules]]\naction = \"reject\"\n").unwrap();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGHUP) };
    std::thread::sleep(Duration::from_millis(500));
    let got = exchange(&src, "src1", &dut, "dut1", &raw);
    assert_eq!(
        got.len(),
        frames.len() - denied,
        "after a bad policy, the old one still filters"
    );
    assert_eq!(stats(&socket).rules[0].count.packets as usize, 2 * denied);

    // A good new policy: drop everything from the US as well, ahead of the old rule.
    let text = policy_text("").replace(
        "[[rules]]\nname = \"lab-only-from-eu\"",
        "[zones.us]\ncountries = [\"US\"]\n[[rules]]\nname = \"no-us\"\nsrc_zone = \"us\"\naction = \"drop\"\n[[rules]]\nname = \"lab-only-from-eu\"",
    );
    std::fs::write(&policy, text).unwrap();
    hup_and_wait(&daemon, &socket, |s| s.rules.len() == 2);
    let from_us = frames.iter().filter(|f| f.0 == "US").count();
    let us_to_lab = frames
        .iter()
        .filter(|(c, _, d, _)| {
            c == "US"
                && (d.to_string().starts_with("10.10.") || d.to_string().starts_with("fd00:10:"))
        })
        .count();
    let got = exchange(&src, "src1", &dut, "dut1", &raw);
    assert_eq!(
        got.len(),
        frames.len() - denied - (from_us - us_to_lab),
        "policy 2 in force"
    );
    let s = stats(&socket);
    assert_eq!(s.rules[0].name, "no-us");
    assert_eq!(s.rules[0].count.packets as usize, from_us);
    // Counters of the kept rule carry over the swap.
    assert_eq!(
        s.rules[1].count.packets as usize,
        2 * denied + denied - us_to_lab
    );

    // SIGTERM detaches: afterwards every frame arrives.
    // SAFETY: signalling our own child.
    unsafe { libc::kill(daemon.0.id() as i32, libc::SIGTERM) };
    let mut d = daemon;
    let status = d.0.wait().expect("wait");
    assert!(status.success(), "cloudletd exit status {status}");
    let got = exchange(&src, "src1", &dut, "dut1", &raw);
    assert_eq!(
        got.len(),
        frames.len(),
        "after cloudletd exits, nothing is filtered"
    );
    assert!(!socket.exists(), "the admin socket is removed on exit");
    let _ = Command::new("true").status();
    let _ = std::fs::remove_dir_all(&dir);
}

/// `redirect` sends frames out of another interface and `cpu` hands them to the stack on
/// another CPU, with native XDP on veth: each frame arrives exactly where its rule says.
#[test]
fn redirect_and_cpu_actions_deliver_where_the_rule_says() {
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    let sink = NetNs::new("cl-sink");
    veth_pair(&src, "src2", &dut, "dut2");
    veth_pair(&dut, "out2", &sink, "sink2");
    // A veth only takes redirected frames in native mode when its peer can receive them in
    // NAPI: GRO on (or an XDP program) on the peer.
    sink.exec(&["ethtool", "-K", "sink2", "gro", "on"]);

    let dir = std::env::temp_dir().join(format!("cloudlet-actions-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "default = \"pass\"\n[[rules]]\nname = \"out\"\ndst_port = 9\naction = { redirect = \"out2\" }\n\
         [[rules]]\nname = \"other-cpu\"\ndst_port = 10\naction = { cpu = 1 }\n",
    )
    .unwrap();
    let compiled = prepare_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let dst_mac = dut.mac("dut2");
    let frame = |dport: u16, n: usize| {
        let mut f = Frame::udp(
            "192.0.2.1".parse().unwrap(),
            "192.0.2.2".parse().unwrap(),
            5000,
            dport,
        )
        .payload(format!("cloudlet-veth-{n}").as_bytes());
        f.dst_mac = dst_mac;
        f.build()
    };
    // Markers 0-9 go out, 10-19 to the other CPU, 20-29 pass.
    let frames: Vec<Vec<u8>> = (0..30).map(|n| frame([9, 10, 11][n / 10], n)).collect();

    let (at_dut, at_sink, stats) = dut.run(|| {
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false).expect("load");
        let (link, mode) = loaded
            .attach("dut2", AttachMode::Native)
            .expect("native attach");
        assert_eq!(mode, AttachMode::Native);
        let rx_dut = PacketSocket::bind("dut2").expect("receiver on dut2");
        let at_sink = sink.run(|| {
            let rx_sink = PacketSocket::bind("sink2").expect("receiver on sink2");
            src.run(|| {
                let tx = PacketSocket::bind("src2").expect("sender");
                for f in &frames {
                    tx.send(f).expect("send");
                }
            });
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Some(n) = rx_sink
                .recv(&mut buf, Duration::from_millis(500))
                .expect("recv")
            {
                got.push(buf[..n].to_vec());
            }
            got
        });
        let mut at_dut = Vec::new();
        let mut buf = [0u8; 2048];
        while let Some(n) = rx_dut
            .recv(&mut buf, Duration::from_millis(200))
            .expect("recv")
        {
            at_dut.push(buf[..n].to_vec());
        }
        let stats = loaded.stats(&compiled).expect("stats");
        drop(link);
        (at_dut, at_sink, stats)
    });
    assert_eq!(
        markers(&at_sink),
        (0..10).collect(),
        "redirected frames leave through out2"
    );
    assert_eq!(
        markers(&at_dut),
        (10..30).collect(),
        "cpu and pass frames reach dut2's stack"
    );
    assert_eq!(stats.verdict("redirect").packets, 10);
    assert_eq!(stats.verdict("cpu").packets, 10);
    assert_eq!(stats.verdict("pass").packets, 10);
    let _ = std::fs::remove_dir_all(&dir);
}

/// `tx` sends a frame back out of the interface it came in on, MACs swapped: the sender
/// gets it back.
#[test]
fn tx_action_bounces_frames_to_the_sender() {
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src3", &dut, "dut3");
    let dir = std::env::temp_dir().join(format!("cloudlet-tx-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        "default = \"pass\"\n[[rules]]\nname = \"echo\"\ndst_port = 7\naction = \"tx\"\n",
    )
    .unwrap();
    let compiled = prepare_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let (src_mac, dst_mac) = (src.mac("src3"), dut.mac("dut3"));
    let frames: Vec<Vec<u8>> = (0..20)
        .map(|n| {
            let mut f = Frame::udp(
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
                5000,
                if n < 10 { 7 } else { 8 },
            )
            .payload(format!("cloudlet-veth-{n}").as_bytes());
            f.src_mac = src_mac;
            f.dst_mac = dst_mac;
            f.build()
        })
        .collect();
    let back = dut.run(|| {
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false).expect("load");
        let (link, _) = loaded
            .attach("dut3", AttachMode::Native)
            .expect("native attach");
        let back = src.run(|| {
            // XDP_TX on a veth hands the frame to the peer's XDP receive path: the peer
            // needs a program of its own (a pass-through one here).
            let mut noop = Loaded::new(&compiled, ProgramKind::Noop, false).expect("load no-op");
            let (_noop_link, _) = noop
                .attach("src3", AttachMode::Native)
                .expect("attach no-op");
            let sock = PacketSocket::bind("src3").expect("socket on src3");
            for f in &frames {
                sock.send(f).expect("send");
            }
            let mut got = Vec::new();
            let mut buf = [0u8; 2048];
            while let Some(n) = sock
                .recv(&mut buf, Duration::from_millis(500))
                .expect("recv")
            {
                got.push(buf[..n].to_vec());
            }
            got
        });
        drop(link);
        back
    });
    assert_eq!(
        markers(&back),
        (0..10).collect(),
        "only the port-7 frames come back"
    );
    for f in &back {
        assert_eq!(&f[..6], &src_mac, "addressed back to the sender");
        assert_eq!(&f[6..12], &dst_mac, "from the cloudlet's interface");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A rate limit under a load well above it: the rate that passes is within 20% of the
/// configured one. The load is paced at 4x the limit for about 1.5 s.
#[test]
fn rate_limit_holds_under_load() {
    const PPS: u64 = 2_000;
    const BURST: u64 = 20;
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src4", &dut, "dut4");
    let dir = std::env::temp_dir().join(format!("cloudlet-rate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let policy = dir.join("policy.toml");
    std::fs::write(
        &policy,
        format!("[[rules]]\nname = \"limit\"\nproto = \"udp\"\naction = {{ rate_limit = {{ pps = {PPS}, burst = {BURST} }} }}\n"),
    )
    .unwrap();
    let compiled = prepare_policy(&policy).unwrap_or_else(|e| panic!("{e}"));
    let mut f = Frame::udp(
        "192.0.2.1".parse().unwrap(),
        "192.0.2.2".parse().unwrap(),
        5000,
        9,
    )
    .payload(b"cloudlet-veth-0");
    f.dst_mac = dut.mac("dut4");
    let frame = f.build();

    let (sent, elapsed, received, stats, events) = dut.run(|| {
        let mut loaded = Loaded::new(&compiled, ProgramKind::Policy, false).expect("load");
        let (link, _) = loaded
            .attach("dut4", AttachMode::Native)
            .expect("native attach");
        let rx = PacketSocket::bind("dut4").expect("receiver");
        let (sent, elapsed) = src.run(|| {
            let tx = PacketSocket::bind("src4").expect("sender");
            let offered = 4 * PPS;
            let total = offered * 3 / 2;
            let start = Instant::now();
            for i in 0..total {
                tx.send(&frame).expect("send");
                let due = start + Duration::from_secs_f64((i + 1) as f64 / offered as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
            (total, start.elapsed())
        });
        let mut received = 0u64;
        let mut buf = [0u8; 2048];
        while rx
            .recv(&mut buf, Duration::from_millis(300))
            .expect("recv")
            .is_some()
        {
            received += 1;
        }
        let stats = loaded.stats(&compiled).expect("stats");
        // Drop events are sampled: the first burst, then a trickle, however many drops.
        let mut ring = loaded.take_events().expect("events ring");
        let mut events = 0u64;
        while ring.next().is_some() {
            events += 1;
        }
        drop(link);
        (sent, elapsed, received, stats, events)
    });
    let expected = BURST as f64 + PPS as f64 * elapsed.as_secs_f64();
    let ratio = received as f64 / expected;
    assert!(
        (0.8..=1.2).contains(&ratio),
        "passed {received} of {sent} in {elapsed:?}; expected about {expected:.0} (ratio {ratio:.2})"
    );
    assert!(
        sent as f64 > 3.0 * expected,
        "the load ({sent}) is well above the limit"
    );
    assert_eq!(stats.verdict("pass").packets, received);
    assert_eq!(stats.rate_limited.packets, sent - received);
    assert_eq!(stats.verdict("drop").packets, sent - received);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    // At most EVENT_BURST per CPU per window of 256 jiffies (0.256 s or more).
    let windows = (elapsed.as_secs_f64() / 0.256).ceil() + 1.0;
    let most = cpus * cloudlet_common::EVENT_BURST as f64 * windows;
    assert!(
        events >= cloudlet_common::EVENT_BURST && (events as f64) <= most,
        "{events} drop events for {} drops in {elapsed:?} (at most {most:.0})",
        sent - received
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two policies updated in place (same zones: the running program's inactive bank is
/// written, then flipped to) 100 times while traffic flows.
#[test]
fn atomic_in_place_update_under_continuous_traffic() {
    let reloads = swap_under_traffic("", "", "src5", "dut5");
    assert_eq!(reloads.in_place, 100, "{reloads:?}");
}

/// Two policies with different zones, so each reload loads a program of its own and moves
/// the interface onto it with BPF_LINK_UPDATE, 100 times while traffic flows.
#[test]
fn atomic_program_swap_under_continuous_traffic() {
    let reloads = swap_under_traffic(
        "[zones.x]\nprefixes = [\"198.51.100.0/24\"]\n",
        "[zones.y]\nprefixes = [\"198.51.100.0/24\"]\n",
        "src7",
        "dut7",
    );
    assert_eq!(reloads.new_program, 100, "{reloads:?}");
}

/// Alternates two policies 100 times while traffic flows: a frame both pass always
/// arrives, a frame both drop never does, and frames they disagree on may go either way. No
/// packet is judged by anything but one policy or the other.
fn swap_under_traffic(
    a_zones: &str,
    b_zones: &str,
    src_if: &str,
    dut_if: &str,
) -> cloudlet::node::Reloads {
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, src_if, &dut, dut_if);
    let dir = std::env::temp_dir().join(format!("cloudlet-swap-{}-{dut_if}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // Port 10: both pass. 11: both drop. 12: only A drops. 13: only B drops.
    let a = dir.join("a.toml");
    let b = dir.join("b.toml");
    std::fs::write(
        &a,
        format!("{a_zones}[[rules]]\nname = \"a\"\ndst_port = [11, 12]\naction = \"drop\"\n"),
    )
    .unwrap();
    std::fs::write(
        &b,
        format!("{b_zones}[[rules]]\nname = \"b\"\ndst_port = [11, 13]\naction = \"drop\"\n"),
    )
    .unwrap();
    let config = cloudlet::config::Config {
        policy: Some(a.clone()),
        interfaces: vec![dut_if.into()],
        xdp_mode: AttachMode::Native,
        admin_socket: dir.join("unused.sock"),
        admin_listen: None,
        pin_dir: None,
        xsk_forward: None,
        front_door: None,
        compute: None,
        mcp: None,
    };
    let dst_mac = dut.mac(dut_if);
    let frames: Vec<Vec<u8>> = (10..14)
        .map(|port| {
            let mut f = Frame::udp(
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
                5000,
                port,
            )
            .payload(b"cloudlet-swap");
            f.dst_mac = dst_mac;
            f.build()
        })
        .collect();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (sent, received, swaps, reloads) = dut.run(|| {
        let mut node = cloudlet::node::Node::start(&config).expect("start");
        let rx = PacketSocket::bind(dut_if).expect("receiver");
        std::thread::scope(|s| {
            let sender = s.spawn(|| {
                src.run(|| {
                    let tx = PacketSocket::bind(src_if).expect("sender");
                    let mut sent = [0u64; 4];
                    let mut i = 0usize;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        tx.send(&frames[i % 4]).expect("send");
                        sent[i % 4] += 1;
                        i += 1;
                        // About 8,000 frames a second: far below what the receiver drains.
                        if i.is_multiple_of(8) {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                    sent
                })
            });
            let receiver = s.spawn(|| {
                let mut got = [0u64; 4];
                let mut buf = [0u8; 2048];
                let mut quiet = 0;
                while quiet < 3 {
                    match rx.recv(&mut buf, Duration::from_millis(200)).expect("recv") {
                        Some(n) if n >= 38 => {
                            let port = u16::from_be_bytes([buf[36], buf[37]]);
                            if (10..14).contains(&port) {
                                got[usize::from(port - 10)] += 1;
                            }
                            quiet = 0;
                        }
                        Some(_) => {}
                        None if stop.load(std::sync::atomic::Ordering::Relaxed) => quiet += 1,
                        None => {}
                    }
                }
                got
            });
            let mut swaps = 0;
            for i in 0..100 {
                let next = if i % 2 == 0 { &b } else { &a };
                node.reload(next).expect("swap");
                swaps += 1;
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let sent = sender.join().expect("sender");
            let received = receiver.join().expect("receiver");
            (sent, received, swaps, node.reloads)
        })
    });
    assert_eq!(swaps, 100);
    assert!(sent[0] > 1_000, "traffic flowed throughout ({sent:?})");
    assert_eq!(received[1], 0, "a frame both policies drop never passed");
    assert_eq!(
        received[0], sent[0],
        "every frame both policies pass arrived"
    );
    assert!(
        received[2] < sent[2] && received[3] < sent[3],
        "each policy dropped its own port: {received:?} of {sent:?}"
    );
    assert!(
        received[2] > 0 && received[3] > 0,
        "each policy passed the other's port: {received:?} of {sent:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    reloads
}

/// A bpffs mounted on a folder of the test's, unmounted and removed on drop.
struct BpfFs(PathBuf);

impl BpfFs {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let status = Command::new("mount")
            .args(["-t", "bpf", "bpf"])
            .arg(&dir)
            .status()
            .expect("mount");
        assert!(status.success(), "mount -t bpf on {}", dir.display());
        Self(dir)
    }
}

impl Drop for BpfFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A cloudletd configuration whose links are pinned on a private bpffs, for restart tests:
/// the daemon's folder (removed on drop) and admin socket.
struct PinnedDaemon {
    bin: PathBuf,
    bpffs: BpfFs,
    dir: PathBuf,
    socket: PathBuf,
}

impl PinnedDaemon {
    /// Writes `policy` and a configuration attaching to `iface` into a folder named after
    /// `tag`.
    fn new(tag: &str, policy: &str, iface: &str) -> Self {
        let bin = cloudletd_path();
        assert!(
            bin.exists(),
            "{} missing (cargo xtask test builds it)",
            bin.display()
        );
        let bpffs = BpfFs::new(&format!("{tag}-pins"));
        let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("cloudletd.sock");
        std::fs::write(dir.join("policy.toml"), policy).unwrap();
        std::fs::write(
            dir.join("cloudlet.toml"),
            format!(
                "policy = \"policy.toml\"\ninterfaces = [\"{iface}\"]\nxdp_mode = \"native\"\npin_dir = {:?}\n[admin]\nsocket = {:?}\n",
                bpffs.0.join("cloudlet").display().to_string(),
                socket.display().to_string()
            ),
        )
        .unwrap();
        Self {
            bin,
            bpffs,
            dir,
            socket,
        }
    }

    /// Starts cloudletd in `ns` with `extra` arguments and waits for its admin socket.
    fn start(&self, ns: &NetNs, extra: &[&str]) -> Daemon {
        let d = Daemon(
            ns.command(&self.bin.display().to_string())
                .args([
                    "--config",
                    &self.dir.join("cloudlet.toml").display().to_string(),
                ])
                .args(extra)
                .stderr(Stdio::null())
                .spawn()
                .expect("start cloudletd"),
        );
        wait_for(&self.socket);
        d
    }

    /// Stops it with SIGTERM; it must exit successfully.
    fn stop(mut d: Daemon) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(d.0.id() as i32, libc::SIGTERM) };
        let status = d.0.wait().expect("wait");
        assert!(status.success(), "cloudletd exit status {status}");
    }

    /// Whether the link of `iface` is pinned.
    fn pinned(&self, iface: &str) -> bool {
        self.bpffs.0.join("cloudlet/links").join(iface).exists()
    }
}

impl Drop for PinnedDaemon {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// cloudletd stops and starts again while traffic flows: the pinned program keeps
/// filtering with no daemon running, the new daemon takes it over, and
/// `--detach-on-exit` finally detaches it.
#[test]
fn hitless_restart_keeps_filtering() {
    let d = PinnedDaemon::new(
        "cloudlet-restart",
        "[[rules]]\nname = \"no-9\"\ndst_port = 9\naction = \"drop\"\n",
        "dut6",
    );
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src6", &dut, "dut6");
    let dst_mac = dut.mac("dut6");
    // Port 8 passes, port 9 is dropped.
    let frames: Vec<Vec<u8>> = [8u16, 9]
        .iter()
        .map(|&port| {
            let mut f = Frame::udp(
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
                5000,
                port,
            );
            f.dst_mac = dst_mac;
            f.build()
        })
        .collect();
    // (frames of port 8 that arrived, frames of port 9 that arrived) of a round of 50 each.
    let round = || {
        let raw: Vec<Vec<u8>> = (0..100).map(|i| frames[i % 2].clone()).collect();
        let got = exchange(&src, "src6", &dut, "dut6", &raw);
        let port = |f: &Vec<u8>| u16::from_be_bytes([f[36], f[37]]);
        (
            got.iter().filter(|f| port(f) == 8).count(),
            got.iter().filter(|f| port(f) == 9).count(),
        )
    };

    let first = d.start(&dut, &[]);
    assert_eq!(round(), (50, 0), "first daemon filters");
    PinnedDaemon::stop(first);
    assert!(d.pinned("dut6"), "the link stays pinned");
    assert_eq!(
        round(),
        (50, 0),
        "no daemon running: the pinned program still filters"
    );
    let second = d.start(&dut, &["--detach-on-exit"]);
    assert_eq!(round(), (50, 0), "the second daemon took the program over");
    assert_eq!(
        stats(&d.socket).rules[0].count.packets,
        50,
        "its counters run from the takeover"
    );
    PinnedDaemon::stop(second);
    assert!(!d.pinned("dut6"), "--detach-on-exit removes the pin");
    assert_eq!(round(), (50, 50), "detached: nothing is filtered");
}

/// UDP frames to `port` from 192.0.2.1 to 192.0.2.2, to `dst_mac`, carrying markers
/// `markers`.
fn marked_udp(dst_mac: [u8; 6], port: u16, markers: std::ops::Range<usize>) -> Vec<Vec<u8>> {
    markers
        .map(|n| {
            let mut f = Frame::udp(
                "192.0.2.1".parse().unwrap(),
                "192.0.2.2".parse().unwrap(),
                5000,
                port,
            )
            .payload(format!("cloudlet-veth-{n}").as_bytes());
            f.dst_mac = dst_mac;
            f.build()
        })
        .collect()
}

/// Receives on `iface` (in the calling thread's namespace) until 500 ms pass without a
/// frame.
fn drain(rx: &PacketSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    while let Some(n) = rx.recv(&mut buf, Duration::from_millis(500)).expect("recv") {
        got.push(buf[..n].to_vec());
    }
    got
}

/// Waits until cloudletd's AF_XDP socket counters satisfy `until`.
fn wait_for_xsk(socket: &Path, until: impl Fn(&Stats) -> bool) -> Stats {
    let start = Instant::now();
    loop {
        let s = stats(socket);
        if until(&s) {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "AF_XDP counters did not get there: {:?}",
            s.xsk
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `{ xsk = 0 }`: cloudletd's AF_XDP socket on dut7 queue 0 receives exactly the frames
/// the rule steers to it, counts them, and forwards them out of fwd7 (`[xsk] forward`);
/// other traffic reaches the stack. After a SIGHUP reload the new program delivers to the
/// same socket.
#[test]
fn xsk_action_delivers_to_cloudletd_which_counts_and_forwards() {
    let bin = cloudletd_path();
    assert!(
        bin.exists(),
        "{} missing (cargo xtask test builds it)",
        bin.display()
    );
    let dir = std::env::temp_dir().join(format!("cloudlet-xsk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("cloudletd.sock");
    let policy = |name: &str| {
        format!(
            "default = \"pass\"\n[[rules]]\nname = \"{name}\"\ndst_port = 4789\naction = {{ xsk = 0 }}\n"
        )
    };
    std::fs::write(dir.join("policy.toml"), policy("to-cloudletd")).unwrap();
    std::fs::write(
        dir.join("cloudlet.toml"),
        format!(
            "policy = \"policy.toml\"\ninterfaces = [\"dut7\"]\nxdp_mode = \"native\"\npin_dir = \"\"\n[admin]\nsocket = {:?}\n[xsk]\nforward = \"fwd7\"\n",
            socket.display().to_string()
        ),
    )
    .unwrap();
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    let sink = NetNs::new("cl-sink");
    veth_pair(&src, "src7", &dut, "dut7");
    veth_pair(&dut, "fwd7", &sink, "sink7");
    let dst_mac = dut.mac("dut7");
    // Markers 0-19 go to the socket, 20-29 (DNS) pass.
    let mut frames = marked_udp(dst_mac, 4789, 0..20);
    frames.extend(marked_udp(dst_mac, 53, 20..30));
    let xsk_bytes: u64 = frames[..20].iter().map(|f| f.len() as u64).sum();

    let daemon = Daemon(
        dut.command(&bin.display().to_string())
            .args(["--config", &dir.join("cloudlet.toml").display().to_string()])
            .stderr(std::fs::File::create(dir.join("cloudletd.log")).unwrap())
            .spawn()
            .expect("start cloudletd"),
    );
    wait_for(&socket);
    let s = stats(&socket);
    assert_eq!(s.xsk.len(), 1, "one socket: {:?}", s.xsk);
    assert_eq!(
        (s.xsk[0].interface.as_str(), s.xsk[0].queue, s.xsk[0].open),
        ("dut7", 0, true)
    );

    // Sends `frames` from src7; returns what reached dut7's stack and what left fwd7.
    let round = |frames: &[Vec<u8>]| {
        dut.run(|| {
            let rx_dut = PacketSocket::bind("dut7").expect("receiver on dut7");
            let at_sink = sink.run(|| {
                let rx_sink = PacketSocket::bind("sink7").expect("receiver on sink7");
                src.run(|| {
                    let tx = PacketSocket::bind("src7").expect("sender");
                    for f in frames {
                        tx.send(f).expect("send");
                    }
                });
                drain(&rx_sink)
            });
            (drain(&rx_dut), at_sink)
        })
    };
    let (at_dut, at_sink) = round(&frames);
    assert_eq!(
        markers(&at_dut),
        (20..30).collect(),
        "only the other traffic reaches dut7's stack"
    );
    assert_eq!(
        markers(&at_sink),
        (0..20).collect(),
        "cloudletd forwards what its socket receives out of fwd7"
    );
    assert!(
        at_sink.iter().all(|f| frames[..20].contains(f)),
        "forwarded frames are unchanged"
    );
    let s = wait_for_xsk(&socket, |s| s.xsk[0].received.packets >= 20);
    assert_eq!(s.xsk[0].received.packets, 20, "{:?}", s.xsk);
    assert_eq!(s.xsk[0].received.bytes, xsk_bytes);
    assert_eq!(s.xsk[0].forwarded.packets, 20);
    assert_eq!(s.xsk[0].forward_errors, 0);
    assert_eq!(s.xsk[0].dropped, 0);
    assert_eq!(s.verdict("xsk").packets, 20);
    assert_eq!(s.xsk_undelivered.packets, 0);
    assert_eq!(s.verdict("pass").packets, 10);
    let metrics = admin::get(&socket, "/metrics").expect("GET /metrics");
    for line in [
        "cloudlet_xsk_received_packets_total{interface=\"dut7\",queue=\"0\"} 20".to_string(),
        format!("cloudlet_xsk_received_bytes_total{{interface=\"dut7\",queue=\"0\"}} {xsk_bytes}"),
        "cloudlet_xsk_forwarded_packets_total{interface=\"dut7\",queue=\"0\"} 20".to_string(),
        "cloudlet_packets_total{verdict=\"xsk\"} 20".to_string(),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "{line:?} missing from\n{metrics}"
        );
    }

    // A reload: the new program has the same socket in its map.
    std::fs::write(dir.join("policy.toml"), policy("to-cloudletd-v2")).unwrap();
    hup_and_wait(&daemon, &socket, |s| {
        s.rules.first().is_some_and(|r| r.name == "to-cloudletd-v2")
    });
    let (at_dut, at_sink) = round(&frames);
    assert_eq!(markers(&at_dut), (20..30).collect(), "after reload");
    assert_eq!(markers(&at_sink), (0..20).collect(), "after reload");
    let s = wait_for_xsk(&socket, |s| s.xsk[0].received.packets >= 40);
    assert_eq!(s.xsk[0].received.packets, 40, "{:?}", s.xsk);
    assert_eq!(s.rules[0].count.packets, 20, "the new rule's own count");
    assert_eq!(
        s.verdict("xsk").packets,
        40,
        "verdicts carried over the reload"
    );

    // A policy without xsk actions closes the socket; its counters stay.
    std::fs::write(dir.join("policy.toml"), "default = \"pass\"\n").unwrap();
    hup_and_wait(&daemon, &socket, |s| s.xsk.iter().all(|x| !x.open));
    let (at_dut, at_sink) = round(&frames);
    assert_eq!(markers(&at_dut), (0..30).collect(), "no xsk rule: all pass");
    assert!(at_sink.is_empty(), "nothing forwarded");
    assert_eq!(stats(&socket).xsk[0].received.packets, 40);
    drop(daemon);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A restart with `xsk` actions: the first daemon's sockets close with it, so while no
/// daemon runs the pinned program drops those frames (counted as undelivered, not passed);
/// the second daemon opens new sockets and enters them into its program before taking the
/// link over, and receives from then on.
#[test]
fn hitless_restart_reopens_xsk_sockets() {
    let d = PinnedDaemon::new(
        "cloudlet-xsk-restart",
        "[[rules]]\nname = \"to-cloudletd\"\ndst_port = 4789\naction = { xsk = 0 }\n",
        "dut8",
    );
    let src = NetNs::new("cl-src");
    let dut = NetNs::new("cl-dut");
    veth_pair(&src, "src8", &dut, "dut8");
    let dst_mac = dut.mac("dut8");
    let frames = marked_udp(dst_mac, 4789, 0..10);
    // Frames that reached dut8's stack.
    let round = || exchange(&src, "src8", &dut, "dut8", &frames);

    let first = d.start(&dut, &[]);
    assert!(round().is_empty(), "first daemon: frames go to its socket");
    let s = wait_for_xsk(&d.socket, |s| s.xsk[0].received.packets >= 10);
    assert_eq!(s.xsk[0].received.packets, 10);
    PinnedDaemon::stop(first);
    assert!(
        round().is_empty(),
        "no daemon: the pinned program has no socket and drops, rather than pass"
    );
    let second = d.start(&dut, &["--detach-on-exit"]);
    assert!(round().is_empty(), "second daemon: frames go to its socket");
    let s = wait_for_xsk(&d.socket, |s| s.xsk[0].received.packets >= 10);
    assert_eq!(s.xsk[0].received.packets, 10, "{:?}", s.xsk);
    assert!(s.xsk[0].open);
    assert_eq!(s.xsk_undelivered.packets, 0, "its program had the socket");
    PinnedDaemon::stop(second);
    assert_eq!(
        markers(&round()),
        (0..10).collect(),
        "detached: nothing is steered"
    );
}
