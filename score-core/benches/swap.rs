//! Cost of the decisions beyond the paper on the paper's topology (2560
//! hosts): planning with each candidate set, a receiving host choosing a
//! swap partner among 16 VMs, a whole decision with swaps when every
//! candidate is full, and the exact optimum of 8 VMs on 6 hosts. Run
//! with `cargo bench -p score-core --bench swap`.

use std::hint::black_box;
use std::net::Ipv4Addr;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use score_core::cost::{CostModel, Traffic};
use score_core::decision::{Capacity, MigrationCost, Peer, Rule};
use score_core::optimum;
use score_core::swap::{
    CandidateSet, LocalVm, Scope, Settings, SwapRequest, choose_swap_partner, decide_with,
    plan_with,
};
use score_core::topology::{LinkWeights, Topology};

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

fn planning(c: &mut Criterion) {
    let topo = Topology::paper();
    let mut rng = StdRng::seed_from_u64(7);
    let mut g = c.benchmark_group("swap/plan_with");
    for n in [4u32, 100] {
        let ps = peers(&topo, n, &mut rng);
        for set in CandidateSet::ALL {
            g.bench_with_input(BenchmarkId::new(set.name(), n), &ps, |b, ps| {
                b.iter(|| plan_with(&topo, 1, 0, black_box(ps), set))
            });
        }
    }
    g.finish();
}

fn partner(c: &mut Criterion) {
    let topo = Topology::paper();
    let mut rng = StdRng::seed_from_u64(9);
    // 16 VMs on host 500 with 4 peers each; one of them talks to u.
    let local: Vec<LocalVm> = (0..16)
        .map(|i| LocalVm {
            id: 2000 + i,
            mem_mb: 1024,
            peers: peers(&topo, 4, &mut rng),
        })
        .collect();
    let req = SwapRequest {
        vm: 1,
        from: 0,
        to: 500,
        gain: 1e6,
        cost_before: 1e6,
        c_m: 0.0,
        mem_mb: 1024,
        from_free_mem_mb: 0,
        peers_on_target: vec![(2003, 5e5)],
    };
    c.bench_function("swap/choose_swap_partner/16x4", |b| {
        b.iter(|| {
            choose_swap_partner(
                &topo,
                500,
                0,
                black_box(&local),
                &req,
                MigrationCost::default(),
            )
        })
    });
    // A whole decision when every host is full: each candidate above 0 is
    // asked for its capacity, then for a swap (answered by the 16 VMs).
    let ps = peers(&topo, 4, &mut rng);
    let full = |_| {
        Some(Capacity {
            free_slots: 0,
            free_mem_mb: 0,
        })
    };
    for set in [CandidateSet::Paper, CandidateSet::PeerRacks] {
        let s = Settings {
            rule: Rule::BestBenefit,
            cm: MigrationCost::default(),
            mem_need_mb: 1024,
            scope: Scope::swaps(set),
        };
        c.bench_function(&format!("swap/decide_with/all-full/{set}"), |b| {
            b.iter(|| {
                let p = plan_with(&topo, 1, 0, black_box(&ps), set);
                decide_with(&topo, &p, &ps, s, 0, full, |r| {
                    choose_swap_partner(&topo, r.to, 0, &local, r, MigrationCost::default())
                })
            })
        });
    }
}

fn optimum(c: &mut Criterion) {
    let topo = Topology::regular(
        &[3, 2],
        LinkWeights::paper_truncated(2),
        Ipv4Addr::new(10, 0, 0, 1),
    )
    .unwrap();
    let mut rng = StdRng::seed_from_u64(11);
    let triples: Vec<(u32, u32, f64)> = (0..12)
        .map(|_| {
            (
                rng.random_range(0..8),
                rng.random_range(0..8),
                rng.random_range(1.0..100.0),
            )
        })
        .collect();
    let traffic = Traffic::from_triples(8, triples).unwrap();
    let model = CostModel::new(&topo, &traffic);
    c.bench_function("swap/brute_force/8vms-6hosts-2slots", |b| {
        b.iter(|| optimum::optimum(black_box(&model), &[2; 6], None, u64::MAX))
    });
}

criterion_group!(benches, planning, partner, optimum);
criterion_main!(benches);
