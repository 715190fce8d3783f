//! User-space hot paths: compiling policies (small and whole-world) and the GeoIP walk.

use std::path::Path;

use cloudlet::{dataplane::compile, geoip::GeoDb, policy};
use cloudlet_benches::{GEOIP_DATABASE, small_policy, world_policy};
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
}

criterion_group!(userspace, benches);
criterion_main!(userspace);
