//! Per-packet cost of the XDP programs through BPF_PROG_TEST_RUN, and the time to build and
//! load the whole-world table. Every configuration runs in the same process, alternated
//! round by round; figures are medians over rounds, each round a mean over many packets.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use cloudlet::{
    dataplane::{AttachMode, CompiledPolicy, Loaded, ProgramKind},
    frame::Frame,
    geoip::GeoDb,
    node::prepare_policy,
};
use cloudlet_benches::{Figure, GEOIP_DATABASE, small_policy, world_policy, write_policy};
use cloudlet_tests::netns::{NetNs, veth_pair};

struct Opts {
    out: PathBuf,
    quick: bool,
}

fn opts() -> Opts {
    let mut o = Opts {
        out: PathBuf::from("target/cloudlet-bench"),
        quick: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = PathBuf::from(it.next().expect("--out needs a folder")),
            other => panic!("unknown argument {other}"),
        }
    }
    o
}

/// Source addresses spread over the world: one from every 400th network of the database,
/// so lookups walk many different paths of the tables.
fn sample_sources(db: &GeoDb) -> Result<(Vec<IpAddr>, Vec<IpAddr>)> {
    let (mut v4, mut v6) = (Vec::new(), Vec::new());
    let mut n = 0usize;
    db.for_each_network(
        |_| Some(()),
        |p, ()| {
            n += 1;
            if n.is_multiple_of(400) {
                let host = p.range().0 + 1;
                if p.is_ipv4() {
                    v4.push(IpAddr::from(std::net::Ipv4Addr::from(host as u32)));
                } else {
                    v6.push(IpAddr::from(std::net::Ipv6Addr::from(host)));
                }
            }
        },
    )?;
    Ok((v4, v6))
}

fn frames(sources: &[IpAddr], dst: &str) -> Vec<Vec<u8>> {
    let dst: IpAddr = dst.parse().expect("address");
    sources
        .iter()
        .map(|s| Frame::udp(*s, dst, 40000, 443).build())
        .collect()
}

/// Mean ns per packet over `frames`, each run `repeat` times by the kernel.
fn ns_per_packet(loaded: &Loaded, frames: &[Vec<u8>], repeat: u32) -> Result<f64> {
    let prog = loaded.program()?;
    let mut total = 0.0;
    for f in frames {
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(f),
                repeat,
                ..Default::default()
            })
            .context("BPF_PROG_TEST_RUN")?;
        total += r.duration.as_nanos() as f64;
    }
    Ok(total / frames.len() as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let o = opts();
    let dir = o.out.clone();
    let small_path = write_policy(&dir, "small-policy.toml", &small_policy());
    let world_path = write_policy(&dir, "world-policy.toml", &world_policy());

    // Building and loading the world table, as cloudletd does at start and on reload.
    let mut load_rounds: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let rounds_load = if o.quick { 2 } else { 5 };
    let mut world: Option<CompiledPolicy> = None;
    for _ in 0..rounds_load {
        let t = Instant::now();
        let c = prepare_policy(&world_path)?;
        let compile = t.elapsed().as_secs_f64() * 1e3;
        let flat = Loaded::new(&c, ProgramKind::Policy, false)?;
        let total = t.elapsed().as_secs_f64() * 1e3;
        drop(flat);
        let t = Instant::now();
        let lpm = Loaded::new(&c, ProgramKind::PolicyLpm, false)?;
        let lpm_load = t.elapsed().as_secs_f64() * 1e3;
        drop(lpm);
        load_rounds
            .entry("world_compile_ms")
            .or_default()
            .push(compile);
        load_rounds
            .entry("world_build_and_load_ms")
            .or_default()
            .push(total);
        load_rounds
            .entry("world_load_lpm_ms")
            .or_default()
            .push(lpm_load);
        world = Some(c);
    }
    let world = world.expect("at least one round");
    let small = prepare_policy(&small_path)?;

    let db = GeoDb::open(std::path::Path::new(GEOIP_DATABASE))?;
    let (v4_sources, v6_sources) = sample_sources(&db)?;
    let v4 = frames(&v4_sources, "10.10.1.1");
    let v6 = frames(&v6_sources, "fd00:10::1");

    let mut configs: Vec<(&str, Loaded)> = vec![
        ("noop", Loaded::new(&small, ProgramKind::Noop, false)?),
        (
            "parse_only",
            Loaded::new(&small, ProgramKind::ParseOnly, false)?,
        ),
        (
            "small_flat",
            Loaded::new(&small, ProgramKind::Policy, false)?,
        ),
        (
            "world_flat",
            Loaded::new(&world, ProgramKind::Policy, false)?,
        ),
        (
            "small_lpm",
            Loaded::new(&small, ProgramKind::PolicyLpm, false)?,
        ),
        (
            "world_lpm",
            Loaded::new(&world, ProgramKind::PolicyLpm, false)?,
        ),
    ];
    // BPF_PROG_TEST_RUN installs an XDP program in the kernel's XDP dispatcher for each call
    // and removes it after, two synchronize_rcu() (milliseconds) a call, unless the program
    // is attached somewhere in native mode already (kernel/bpf/dispatcher.c). So attach each
    // one to a veth of a private namespace for the duration of the run.
    let ns = NetNs::new("cl-bench");
    let mut links = Vec::new();
    for (i, (_, loaded)) in configs.iter_mut().enumerate() {
        let (a, b) = (format!("bench{i}a"), format!("bench{i}b"));
        veth_pair(&ns, &a, &ns, &b);
        let link = ns
            .run(|| loaded.attach(&a, AttachMode::Native))
            .context("attaching for the run")?;
        links.push(link);
    }
    let (rounds, repeat) = if o.quick { (5, 2_000) } else { (15, 10_000) };
    let mut samples: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for _ in 0..rounds {
        for (name, loaded) in &configs {
            for (family, frames) in [("ipv4", &v4), ("ipv6", &v6)] {
                let ns = ns_per_packet(loaded, frames, repeat)?;
                samples
                    .entry(format!("{name}_{family}"))
                    .or_default()
                    .push(ns);
            }
        }
    }
    drop(links);
    drop(ns);
    let ns: BTreeMap<String, f64> = samples.into_iter().map(|(k, v)| (k, median(v))).collect();

    let mut figures = Vec::new();
    let mut fig = |name: &str, value: f64, unit: &str, baseline: Option<(&str, f64)>| {
        figures.push(Figure {
            name: name.to_string(),
            value,
            unit: unit.to_string(),
            baseline: baseline.map(|(b, _)| b.to_string()),
            ratio: baseline.map(|(_, v)| value / v),
        });
    };
    for family in ["ipv4", "ipv6"] {
        let get = |c: &str| ns[&format!("{c}_{family}")];
        let noop = format!("test_run_noop_{family}");
        fig(&noop, get("noop"), "ns/packet", None);
        fig(
            &format!("test_run_parse_only_{family}"),
            get("parse_only"),
            "ns/packet",
            Some((&noop, get("noop"))),
        );
        for table in ["flat", "lpm"] {
            let small = format!("test_run_small_{table}_{family}");
            fig(
                &small,
                get(&format!("small_{table}")),
                "ns/packet",
                Some((&noop, get("noop"))),
            );
            fig(
                &format!("test_run_world_{table}_{family}"),
                get(&format!("world_{table}")),
                "ns/packet",
                Some((&small, get(&format!("small_{table}")))),
            );
        }
    }
    let load: BTreeMap<&str, f64> = load_rounds
        .into_iter()
        .map(|(k, v)| (k, median(v)))
        .collect();
    fig("world_compile", load["world_compile_ms"], "ms", None);
    fig(
        "world_build_and_load",
        load["world_build_and_load_ms"],
        "ms",
        None,
    );
    fig("world_load_lpm_only", load["world_load_lpm_ms"], "ms", None);
    fig(
        "world_ipv4_prefixes",
        world.stats.v4_prefixes as f64,
        "prefixes",
        None,
    );
    fig(
        "world_ipv6_prefixes",
        world.stats.v6_prefixes as f64,
        "prefixes",
        None,
    );
    fig(
        "world_ipv6_flat_chunks",
        world.stats.v6_chunks as f64,
        "chunks (1 KiB)",
        None,
    );
    fig(
        "world_ipv4_flat_chunks",
        world.stats.v4_chunks as f64,
        "chunks (1 KiB)",
        None,
    );

    println!(
        "BPF_PROG_TEST_RUN, {} IPv4 and {} IPv6 sources, {repeat} runs each, median of {rounds} rounds",
        v4.len(),
        v6.len()
    );
    println!(
        "{:<34} {:>12} {:<16} {:>8}  BASELINE",
        "FIGURE", "VALUE", "UNIT", "RATIO"
    );
    for f in &figures {
        println!(
            "{:<34} {:>12.1} {:<16} {:>8}  {}",
            f.name,
            f.value,
            f.unit,
            f.ratio.map_or(String::new(), |r| format!("{r:.2}x")),
            f.baseline.as_deref().unwrap_or("")
        );
    }
    let goal_ratio = figures
        .iter()
        .filter(|f| f.name.starts_with("test_run_world_flat"))
        .map(|f| f.ratio.unwrap_or(f64::NAN))
        .fold(0.0f64, f64::max);
    let goal_load = load["world_build_and_load_ms"];
    println!(
        "goal: world table <= 1.2x the small table per packet (flat tables): {:.2}x {}",
        goal_ratio,
        if goal_ratio <= 1.2 { "met" } else { "NOT met" }
    );
    println!(
        "goal: world table built and loaded in < 2000 ms: {goal_load:.0} ms {}",
        if goal_load < 2000.0 { "met" } else { "NOT met" }
    );
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    println!("wrote {}", path.display());
    Ok(())
}
