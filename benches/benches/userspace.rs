//! User-space hot paths: compiling policies (small and whole-world), the GeoIP walk, and
//! encoding an update in place (recompiling with the running compiler, patching the
//! address tables).

use std::path::Path;

use cloudlet::{
    dataplane::{
        Compiler, compile,
        compile::{FlatTable, patch_table},
    },
    geoip::GeoDb,
    policy,
};
use cloudlet_benches::{GEOIP_DATABASE, Mix, mixed_rules, small_policy, world_policy};
use criterion::{Criterion, criterion_group, criterion_main};

fn benches(c: &mut Criterion) {
    let small = policy::parse(&small_policy(), Path::new("small.toml")).expect("small policy");
    c.bench_function("compile_small_policy", |b| {
        b.iter(|| compile(&small, None).expect("compile"))
    });

    let db = GeoDb::open(Path::new(GEOIP_DATABASE)).expect("GeoIP database (cargo xtask setup)");
    let world = policy::parse(&world_policy(), Path::new("world.toml")).expect("world policy");
    let mut g = c.benchmark_group("world");
    g.sample_size(10);
    g.bench_function("geoip_walk_all_networks", |b| {
        b.iter(|| {
            let mut n = 0usize;
            db.for_each_network(|_| Some(()), |_, ()| n += 1)
                .expect("walk");
            n
        })
    });
    g.bench_function("compile_world_policy", |b| {
        b.iter(|| compile(&world, Some(&db)).expect("compile"))
    });
    g.finish();

    // One rule changed in a policy of the world table and 1,000 rules, on a compiler
    // that compiled the policy before it: what an update in place computes before it
    // writes the maps.
    let with_rule = |port: u16, prefix: &str| {
        let text = format!(
            "{}[zones.svc]\nprefixes = [\"10.10.0.0/16\", \"fd00:10::/32\"]\n[[rules]]\nname = \"changed\"\nsrc_prefix = [\"{prefix}\"]\nproto = \"udp\"\ndst_port = {port}\naction = \"drop\"\n{}",
            world_policy(),
            mixed_rules(1_000, Mix::Clustered)
        );
        policy::parse(&text, Path::new("update.toml")).unwrap_or_else(|e| panic!("{e}"))
    };
    let (a, b) = (
        with_rule(9, "192.0.2.0/24"),
        with_rule(10, "198.51.100.0/24"),
    );
    let mut compiler = Compiler::default();
    let ca = compiler.compile(&a, Some(&db)).expect("compile");
    let cb = compiler.compile(&b, None).expect("compile");
    let mut g = c.benchmark_group("update");
    g.sample_size(10);
    let mut flip = false;
    g.bench_function("recompile_one_rule_changed", |bench| {
        bench.iter(|| {
            flip = !flip;
            compiler
                .compile(if flip { &b } else { &a }, None)
                .expect("compile")
        })
    });
    g.bench_function("patch_ipv4_table_one_prefix_changed", |bench| {
        let l1 = cloudlet_common::flat::L1_CHUNKS;
        bench.iter(|| {
            let mut table = FlatTable::new(ca.v4_chunks.clone(), ca.v4_chunks.len() + 4096);
            patch_table(&mut table, &ca.v4_ranges, &cb.v4_ranges, 32, 0, l1).expect("room")
        })
    });
    g.finish();
}

criterion_group!(userspace, benches);
criterion_main!(userspace);
