//! Decision time for one VM (plan + decide) with 10, 100 and 1000 peers on
//! the paper's topology (2560 hosts, 128 racks of 20), and the cost of one
//! `Topology::level` call. Run with
//! `cargo bench -p score-core --bench decision`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use score_core::decision::{Capacity, MigrationCost, Peer, Rule, plan};
use score_core::topology::Topology;

/// `n` peers spread uniformly over the data centre, rates 1 B/s .. 1 MB/s.
fn peers(topo: &Topology, n: u32, rng: &mut StdRng) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer {
            id: 1000 + i,
            host: rng.random_range(0..topo.host_count()),
            rate: rng.random_range(1.0..1e6),
        })
        .collect()
}

fn decision(c: &mut Criterion) {
    let topo = Topology::paper();
    let mut rng = StdRng::seed_from_u64(7);
    let mut g = c.benchmark_group("decision");
    for n in [10u32, 100, 1000] {
        let ps = peers(&topo, n, &mut rng);
        let room = |_| {
            Some(Capacity {
                free_slots: 1,
                free_mem_mb: 1024,
            })
        };
        // Every other host full, so the rules walk past some candidates.
        let half_full = |h: u32| {
            Some(Capacity {
                free_slots: h % 2,
                free_mem_mb: 1024,
            })
        };
        g.bench_with_input(BenchmarkId::new("plan", n), &ps, |b, ps| {
            b.iter(|| plan(&topo, 1, 0, black_box(ps)))
        });
        g.bench_with_input(
            BenchmarkId::new("plan+decide/paper-first", n),
            &ps,
            |b, ps| {
                b.iter(|| {
                    plan(&topo, 1, 0, black_box(ps)).decide(
                        Rule::PaperFirst,
                        MigrationCost::Absolute(0.0),
                        1024,
                        half_full,
                    )
                })
            },
        );
        g.bench_with_input(
            BenchmarkId::new("plan+decide/best-benefit", n),
            &ps,
            |b, ps| {
                b.iter(|| {
                    plan(&topo, 1, 0, black_box(ps)).decide(
                        Rule::BestBenefit,
                        MigrationCost::Absolute(0.0),
                        1024,
                        room,
                    )
                })
            },
        );
    }
    g.finish();
}

fn level(c: &mut Criterion) {
    let topo = Topology::paper();
    let mut rng = StdRng::seed_from_u64(11);
    let n = topo.host_count();
    let pairs: Vec<(u32, u32)> = (0..4096)
        .map(|_| (rng.random_range(0..n), rng.random_range(0..n)))
        .collect();
    let mut g = c.benchmark_group("topology");
    g.throughput(Throughput::Elements(pairs.len() as u64));
    g.bench_function("level x4096", |b| {
        b.iter(|| {
            let mut acc = 0u32;
            for &(a, h) in black_box(&pairs) {
                acc += u32::from(topo.level(a, h));
            }
            acc
        })
    });
    g.bench_function("weight x4096", |b| {
        b.iter(|| {
            let mut acc = 0.0;
            for &(a, h) in black_box(&pairs) {
                acc += topo.weight(a, h);
            }
            acc
        })
    });
    g.finish();
}

criterion_group!(benches, decision, level);
criterion_main!(benches);
