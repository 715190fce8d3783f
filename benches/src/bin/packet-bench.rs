//! Per-packet cost of the XDP programs through BPF_PROG_TEST_RUN, and the time to build and
//! load the whole-world table. Every configuration runs in the same process, alternated
//! round by round, each round a mean over many packets. The per-packet figures are the
//! fastest round of each configuration, the others medians over rounds.

use std::{collections::BTreeMap, net::IpAddr, os::fd::AsFd as _, path::PathBuf, time::Instant};

use anyhow::{Context as _, Result};
use aya::programs::{TestRun, TestRunOptions};
use cloudlet::{
    dataplane::{AttachMode, CompiledPolicy, Loaded, ProgramKind},
    frame::Frame,
    geoip::GeoDb,
    node::prepare_policy,
};
use cloudlet_benches::{
    Figure, GEOIP_DATABASE, Mix, mixed_rules, rules_policy, small_policy, world_policy,
    write_policy,
};
use cloudlet_tests::netns::{NetNs, veth_pair};

struct Opts {
    out: PathBuf,
    quick: bool,
    /// Only this part: `test-run` or `live`.
    only: Option<String>,
    /// Length of the live benchmark's frames.
    frame_len: usize,
    /// Only this live scenario (`geofence_world`, `rules_1000`, `rate_limit`, `exact`).
    scenario: Option<String>,
}

fn opts() -> Opts {
    let mut o = Opts {
        out: PathBuf::from("target/cloudlet-bench"),
        quick: false,
        only: None,
        frame_len: cloudlet_benches::live::FRAME_LEN,
        scenario: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => o.quick = true,
            "--out" => o.out = PathBuf::from(it.next().expect("--out needs a folder")),
            "--frame-len" => {
                o.frame_len = it
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--frame-len needs a length in bytes");
            }
            "--only" => {
                let part = it.next().expect("--only needs test-run or live");
                assert!(
                    part == "test-run" || part == "live",
                    "--only takes test-run or live, not {part}"
                );
                o.only = Some(part);
            }
            "--scenario" => {
                o.scenario = Some(it.next().expect("--scenario needs a live scenario's name"));
            }
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

fn mix_name(mix: Mix) -> &'static str {
    match mix {
        Mix::Clustered => "clustered",
        Mix::Interleaved => "interleaved",
    }
}

/// A full swap of the world table plus 10,000 rules (compile, build, load) and one-rule
/// updates in place of that policy: the time to compile the changed policy with the
/// running compiler, to write and flip, and until a packet sees the change (a probe runs
/// the program in a loop on another thread). Medians over rounds.
fn update_timings(
    world_path: &std::path::Path,
    dir: &std::path::Path,
    quick: bool,
) -> Result<Vec<(String, f64, String)>> {
    use cloudlet::{dataplane::Compiler, policy};
    let world = std::fs::read_to_string(world_path)?;
    // The probe's rule comes first: it drops UDP to the ports given, and each update
    // changes them, so the probe frame (port 10) is dropped after every other update and
    // the bank written never holds the new rule already.
    let text = |port: &str| {
        let mut t = world.clone();
        let at = t.find("[[rules]]").unwrap_or(t.len());
        t.insert_str(
            at,
            &format!(
                "[zones.svc]\nprefixes = [\"10.10.0.0/16\", \"fd00:10::/32\"]\n[[rules]]\nname = \"probe\"\nproto = \"udp\"\ndst_port = {port}\naction = \"drop\"\n"
            ),
        );
        t.push_str(&mixed_rules(9_998, Mix::Clustered));
        t
    };
    let a = write_policy(dir, "update-a.toml", &text("9"));
    let rounds = if quick { 2 } else { 5 };
    let mut swap = Vec::new();
    for _ in 0..rounds {
        let t = Instant::now();
        let c = prepare_policy(&a)?;
        let loaded = Loaded::new(&c, ProgramKind::Policy, false)?;
        swap.push(t.elapsed().as_secs_f64() * 1e3);
        drop(loaded);
    }
    let mut compiler = Compiler::default();
    let pa = policy::load(&a)?;
    let db = GeoDb::open(std::path::Path::new(GEOIP_DATABASE))?;
    let ca = compiler.compile(&pa, Some(&db))?;
    let mut loaded = Loaded::new(&ca, ProgramKind::Policy, false)?;
    let mut in_force = ca;
    // Attached natively somewhere, so each BPF_PROG_TEST_RUN of the probe skips the XDP
    // dispatcher's synchronize_rcu() (see main).
    let ns = NetNs::new("cl-upd");
    veth_pair(&ns, "upd0a", &ns, "upd0b");
    let _link = ns
        .run(|| loaded.attach("upd0a", AttachMode::Native))
        .context("attaching for the run")?;
    // Outside the policy's other rules: only `probe` decides its verdict.
    let probe = Frame::udp(
        "192.0.2.1".parse().expect("address"),
        "10.20.1.1".parse().expect("address"),
        40000,
        10,
    )
    .build();
    let (mut compile, mut write, mut visible, mut elements) = (vec![], vec![], vec![], vec![]);
    let updates = if quick { 6 } else { 20 };
    for i in 0..updates {
        // The probe frame's verdict flips each time.
        let drops_probe = i % 2 == 0;
        let ports = if drops_probe {
            format!("\"10-{}\"", 10 + i)
        } else {
            format!("{}", 2000 + i)
        };
        let path = write_policy(dir, "update-b.toml", &text(&ports));
        let policy = policy::load(&path)?;
        let t = Instant::now();
        let c = compiler.compile(&policy, None)?;
        compile.push(t.elapsed().as_secs_f64() * 1e3);
        let want = if drops_probe { 1 } else { 2 }; // XDP_DROP, XDP_PASS
        let prog_fd = loaded.program()?.fd()?.as_fd().try_clone_to_owned()?;
        let stop = std::sync::atomic::AtomicBool::new(false);
        let start = Instant::now();
        let (timings, seen) = std::thread::scope(|s| -> Result<_> {
            let watcher = s.spawn(|| {
                loop {
                    let code = cloudlet_benches::loadgen::test_run(prog_fd.as_fd(), &probe, 1)
                        .ok()
                        .map(|(code, _)| code);
                    if code == Some(want) {
                        return Some(start.elapsed());
                    }
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        return None;
                    }
                }
            });
            let timings = loaded.update(&c);
            std::thread::sleep(std::time::Duration::from_millis(20));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let seen = watcher.join().expect("probe thread");
            Ok((timings?, seen))
        })?;
        let seen = seen.context("the probe never saw the update")?;
        // As cloudletd does after an update: the old bank's counters, then zero them.
        loaded.retire(&in_force)?;
        in_force = c;
        write.push((timings.prepare + timings.write).as_secs_f64() * 1e3);
        visible.push(seen.as_secs_f64() * 1e3);
        elements.push(timings.elements as f64);
    }
    Ok(vec![
        ("swap_world_10000_rules".into(), median(swap), "ms".into()),
        (
            "update_one_rule_compile".into(),
            median(compile),
            "ms".into(),
        ),
        ("update_one_rule_write".into(), median(write), "ms".into()),
        (
            "update_one_rule_visible".into(),
            median(visible),
            "ms".into(),
        ),
        (
            "update_one_rule_elements".into(),
            median(elements),
            "map elements".into(),
        ),
    ])
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let o = opts();
    let mut figures = Vec::new();
    let mut goals = Vec::new();
    let runs = |part: &str| o.only.as_deref().is_none_or(|p| p == part);
    let db = GeoDb::open(std::path::Path::new(GEOIP_DATABASE))?;
    let (v4_sources, v6_sources) = sample_sources(&db)?;
    if runs("test-run") {
        test_run_section(&o, &v4_sources, &v6_sources, &mut figures, &mut goals)?;
    }
    if runs("live") {
        live_section(&o, &db, &v4_sources, &v6_sources, &mut figures, &mut goals)?;
    }
    let mut summary = format!(
        "{:<44} {:>12} {:<16} {:>8}  BASELINE\n",
        "FIGURE", "VALUE", "UNIT", "RATIO"
    );
    for f in &figures {
        let digits = if f.value.abs() < 10.0 { 3 } else { 1 };
        summary.push_str(&format!(
            "{:<44} {:>12.digits$} {:<16} {:>8}  {}\n",
            f.name,
            f.value,
            f.unit,
            f.ratio.map_or(String::new(), |r| format!("{r:.2}x")),
            f.baseline.as_deref().unwrap_or("")
        ));
    }
    for g in &goals {
        summary.push_str(&format!("{g}\n"));
    }
    print!("{summary}");
    std::fs::create_dir_all(&o.out)?;
    let path = o.out.join("results.json");
    std::fs::write(&path, serde_json::to_string_pretty(&figures)?)?;
    std::fs::write(o.out.join("summary.txt"), &summary)?;
    println!("wrote {} and summary.txt", path.display());
    Ok(())
}

/// Met or not, as the goal lines say it.
fn met(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// BPF_PROG_TEST_RUN costs per packet, table loads and policy updates.
fn test_run_section(
    o: &Opts,
    v4_sources: &[IpAddr],
    v6_sources: &[IpAddr],
    figures: &mut Vec<Figure>,
    goals: &mut Vec<String>,
) -> Result<()> {
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
        // Creating the maps and loading the program, most of it the verifier's check of
        // the program: paid at every load, whatever the policy.
        let program = flat.timings.load.as_secs_f64() * 1e3;
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
        load_rounds
            .entry("policy_program_load_ms")
            .or_default()
            .push(program);
        world = Some(c);
    }
    let world = world.expect("at least one round");
    let small = prepare_policy(&small_path)?;

    let v4 = frames(v4_sources, "10.10.1.1");
    let v6 = frames(v6_sources, "fd00:10::1");
    let update = update_timings(&world_path, &dir, o.quick)?;

    // Policies of 10 to 10,000 mixed rules, clustered and interleaved.
    let rule_counts = [10usize, 100, 1_000, 10_000];
    let mut rule_policies = Vec::new();
    for mix in [Mix::Clustered, Mix::Interleaved] {
        for n in rule_counts {
            let name = format!("rules_{}_{n}", mix_name(mix));
            let path = write_policy(&dir, &format!("{name}.toml"), &rules_policy(n, mix));
            rule_policies.push((name, prepare_policy(&path)?));
        }
    }
    let mut configs: Vec<(String, Loaded)> = Vec::new();
    for (name, c) in &rule_policies {
        configs.push((name.clone(), Loaded::new(c, ProgramKind::Policy, false)?));
    }
    let fixed: Vec<(&str, Loaded)> = vec![
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
    configs.extend(fixed.into_iter().map(|(n, l)| (n.to_string(), l)));
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
    let (rounds, repeat) = if o.quick { (5, 1_000) } else { (9, 2_000) };
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
    // The fastest round: the noise of a shared machine only ever adds (a neighbour's load
    // slows whole rounds, by up to 100 ns a packet here), so the slower rounds measure the
    // machine, and their median flips with how many of them a configuration drew.
    let ns: BTreeMap<String, f64> = samples
        .into_iter()
        .map(|(k, v)| (k, v.into_iter().fold(f64::INFINITY, f64::min)))
        .collect();

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
    for mix in [Mix::Clustered, Mix::Interleaved] {
        for family in ["ipv4", "ipv6"] {
            let base = format!("test_run_rules_{}_10_{family}", mix_name(mix));
            let base_ns = ns[&format!("rules_{}_10_{family}", mix_name(mix))];
            for n in rule_counts {
                let name = format!("test_run_rules_{}_{n}_{family}", mix_name(mix));
                let v = ns[&format!("rules_{}_{n}_{family}", mix_name(mix))];
                let baseline = (n != 10).then_some((base.as_str(), base_ns));
                fig(&name, v, "ns/packet", baseline);
            }
        }
    }
    for (name, value, unit) in &update {
        fig(name, *value, unit, None);
    }
    let st = &world.stats;
    for (name, value, unit) in [
        ("world_compile", load["world_compile_ms"], "ms"),
        (
            "world_build_and_load",
            load["world_build_and_load_ms"],
            "ms",
        ),
        ("world_load_lpm_only", load["world_load_lpm_ms"], "ms"),
        ("policy_program_load", load["policy_program_load_ms"], "ms"),
        ("world_ipv4_prefixes", st.v4_prefixes as f64, "prefixes"),
        ("world_ipv6_prefixes", st.v6_prefixes as f64, "prefixes"),
        (
            "world_ipv6_flat_chunks",
            st.v6_chunks as f64,
            "chunks (1 KiB)",
        ),
        (
            "world_ipv4_flat_chunks",
            st.v4_chunks as f64,
            "chunks (1 KiB)",
        ),
        ("world_ipv4_hosts", st.v4_hosts as f64, "single addresses"),
        ("world_ipv6_hosts", st.v6_hosts as f64, "single addresses"),
    ] {
        fig(name, value, unit, None);
    }

    goals.push(format!(
        "BPF_PROG_TEST_RUN figures: {} IPv4 and {} IPv6 sources, {repeat} runs each, fastest of {rounds} rounds",
        v4.len(),
        v6.len()
    ));
    let goal_ratio = figures
        .iter()
        .filter(|f| f.name.starts_with("test_run_world_flat"))
        .map(|f| f.ratio.unwrap_or(f64::NAN))
        .fold(0.0f64, f64::max);
    let goal_load = load["world_build_and_load_ms"];
    goals.push(format!(
        "goal: world table <= 1.2x the small table per packet (flat tables): {goal_ratio:.2}x {}",
        met(goal_ratio <= 1.2)
    ));
    goals.push(format!(
        "goal: world table built and loaded in < 2000 ms: {goal_load:.0} ms {}",
        met(goal_load < 2000.0)
    ));
    for mix in [Mix::Clustered, Mix::Interleaved] {
        let worst = figures
            .iter()
            .filter(|f| {
                f.name
                    .starts_with(&format!("test_run_rules_{}_10000", mix_name(mix)))
            })
            .map(|f| f.ratio.unwrap_or(f64::NAN))
            .fold(0.0f64, f64::max);
        goals.push(format!(
            "goal: 10,000 rules ({}) <= 1.5x 10 rules per packet: {worst:.2}x {}",
            mix_name(mix),
            met(worst <= 1.5)
        ));
    }
    let get = |name: &str| {
        update
            .iter()
            .find(|u| u.0 == name)
            .map_or(f64::NAN, |u| u.1)
    };
    let visible = get("update_one_rule_visible");
    goals.push(format!(
        "goal: a one-rule update visible to packets within 10 ms of the start of the update: {visible:.2} ms {}",
        met(visible <= 10.0)
    ));
    let swap = get("swap_world_10000_rules");
    goals.push(format!(
        "goal: full swap of the world table plus 10,000 rules within 2000 ms: {swap:.0} ms {}",
        met(swap <= 2000.0)
    ));
    Ok(())
}

/// Live traffic through a veth pair into each system under test (see
/// `cloudlet_benches::live`), every scenario's systems alternated round by round.
fn live_section(
    o: &Opts,
    db: &GeoDb,
    v4_sources: &[IpAddr],
    v6_sources: &[IpAddr],
    figures: &mut Vec<Figure>,
    goals: &mut Vec<String>,
) -> Result<()> {
    use cloudlet_benches::{
        live::{Bed, System, scenarios},
        loadgen::Generator,
    };
    let bed = Bed::new()?;
    // IPv4 and IPv6 sources in turn.
    let sources: Vec<IpAddr> = v4_sources
        .iter()
        .zip(v6_sources)
        .flat_map(|(a, b)| [*a, *b])
        .collect();
    let pass = prepare_policy(&write_policy(&o.out, "small-policy.toml", &small_policy()))?;
    let mut all = scenarios(&bed, db, &sources, &o.out, o.frame_len)?;
    if let Some(name) = &o.scenario {
        all.retain(|s| s.name == name);
        anyhow::ensure!(!all.is_empty(), "no live scenario {name}");
    }
    let (rounds, count) = if o.quick {
        (1, 1_000_000)
    } else {
        (3, 4_000_000)
    };
    for s in &all {
        let mut samples: BTreeMap<&str, Vec<cloudlet_benches::live::Sample>> = BTreeMap::new();
        let generator = Generator::new(&s.frames)?;
        for _ in 0..rounds {
            for system in s.systems() {
                let sample = s
                    .measure(&bed, &generator, system, count, &pass)
                    .with_context(|| format!("{} on {}", s.name, system.name()))?;
                samples.entry(system.name()).or_default().push(sample);
            }
        }
        let median_of = |system: System, f: fn(&cloudlet_benches::live::Sample) -> f64| {
            samples
                .get(system.name())
                .map(|v| median(v.iter().map(f).collect()))
        };
        let base = |what: &str| format!("live_{}_nftables_{what}", s.name);
        let filter_program = median_of(System::XdpFilter, |x| {
            x.program_ns_per_packet.unwrap_or(f64::NAN)
        });
        let nft_handled = median_of(System::Nftables, |x| x.handled_pps);
        let nft_dropped = median_of(System::Nftables, |x| x.dropped_pps);
        let mut add = Vec::new();
        for system in s.systems() {
            let name = |what: &str| format!("live_{}_{}_{what}", s.name, system.name());
            let get = |f: fn(&cloudlet_benches::live::Sample) -> f64| {
                median_of(system, f).unwrap_or(f64::NAN)
            };
            let vs_nft = |v: Option<f64>, what: &str| {
                (system != System::Nftables).then(|| (base(what), v.unwrap_or(f64::NAN)))
            };
            for (what, value, unit, baseline) in [
                ("offered", get(|x| x.offered_pps) / 1e6, "Mpps", None),
                (
                    "handled",
                    get(|x| x.handled_pps) / 1e6,
                    "Mpps",
                    vs_nft(nft_handled.map(|v| v / 1e6), "handled"),
                ),
                (
                    "dropped",
                    get(|x| x.dropped_pps) / 1e6,
                    "Mpps",
                    vs_nft(nft_dropped.map(|v| v / 1e6), "dropped"),
                ),
                ("passed", get(|x| x.passed_pps) / 1e6, "Mpps", None),
                ("cpu", get(|x| x.cpu_ns_per_packet), "ns/packet", None),
            ] {
                add.push(Figure {
                    name: name(what),
                    value,
                    unit: unit.into(),
                    ratio: baseline.as_ref().map(|(_, b)| value / b),
                    baseline: baseline.map(|(n, _)| n),
                });
            }
        }
        for system in [System::XdpPass, System::Cloudlet, System::XdpFilter] {
            let Some(v) = median_of(system, |x| x.program_ns_per_packet.unwrap_or(f64::NAN)) else {
                continue;
            };
            let baseline = (system == System::Cloudlet)
                .then_some(filter_program)
                .flatten()
                .map(|b| (format!("live_{}_xdp_filter_program", s.name), b));
            add.push(Figure {
                name: format!("live_{}_{}_program", s.name, system.name()),
                value: v,
                unit: "ns/packet".into(),
                ratio: baseline.as_ref().map(|(_, b)| v / b),
                baseline: baseline.map(|(n, _)| n),
            });
        }
        let ratio = |system: System, what: &str| {
            add.iter()
                .find(|f| f.name == format!("live_{}_{}_{what}", s.name, system.name()))
                .and_then(|f| f.ratio)
                .unwrap_or(f64::NAN)
        };
        match s.name {
            "geofence_world" => {
                let r = ratio(System::Cloudlet, "dropped");
                goals.push(format!(
                    "goal: geo-fence on the world table, drop rate >= 3x nftables: {r:.2}x {}",
                    met(r >= 3.0)
                ));
            }
            "rate_limit" => {
                let passed = |system: System| {
                    add.iter()
                        .find(|f| f.name == format!("live_{}_{}_passed", s.name, system.name()))
                        .map_or(f64::NAN, |f| f.value * 1e6)
                };
                goals.push(format!(
                    "rate limit of 100,000 packets/s: Cloudlet passed {:.0}/s, nftables {:.0}/s",
                    passed(System::Cloudlet),
                    passed(System::Nftables)
                ));
            }
            "rules_1000" => {
                let r = ratio(System::Cloudlet, "handled");
                goals.push(format!(
                    "goal: 1,000 mixed rules >= 3x nftables: {r:.2}x {}",
                    met(r >= 3.0)
                ));
            }
            "exact" => {
                let c = ratio(System::Cloudlet, "handled");
                let x = ratio(System::XdpFilter, "handled");
                let program = ratio(System::Cloudlet, "program");
                goals.push(format!(
                    "goal: ahead of xdp-filter on exact addresses and ports: handles {:.2}x xdp-filter's rate {}; its program costs {program:.2}x xdp-filter's per packet {}",
                    c / x,
                    met(c > x),
                    met(program < 1.0)
                ));
            }
            _ => {}
        }
        goals.push(format!("live {}: {}", s.name, s.about));
        figures.extend(add);
    }
    goals.push(format!(
        "live figures: {count} frames of {} bytes per run, median of {rounds} rounds, systems alternated",
        o.frame_len
    ));
    Ok(())
}
