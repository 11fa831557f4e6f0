//! The centralised baselines find the optimum of small data centres whose
//! optimum is known by exact search, and never break capacity.

mod common;

use score_sim::baseline::{ga, search};
use score_sim::scenario::{GaParams, SearchParams};
use score_sim::world::Setup;

/// The lowest equation 1 total over every placement within capacity
/// (score-core's exact search, which is checked against enumeration).
fn brute_force(setup: &Setup) -> f64 {
    let cap = vec![setup.shape.max_vms(); setup.topo.host_count() as usize];
    let opt = score_core::optimum::optimum(&setup.model(), &cap, None, u64::MAX).unwrap();
    assert!(opt.proven);
    opt.cost
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() <= 1e-9 * b.abs().max(1.0)
}

/// (fan-out, slots per host, VMs, pair probability)
const CASES: [(&[u32], u32, u32, f64); 4] = [
    (&[2, 2], 2, 6, 0.5),
    (&[2, 2], 2, 8, 0.4),
    (&[3, 2], 2, 7, 0.35),
    (&[2, 2, 2], 1, 6, 0.5),
];

#[test]
fn local_search_finds_the_brute_force_optimum() {
    for (k, &(fanout, slots, vms, p)) in CASES.iter().enumerate() {
        for seed in 0..6u64 {
            let setup = common::tiny(fanout, slots, vms, p, 100 * k as u64 + seed);
            let opt = brute_force(&setup);
            let b = search::run(&setup, &SearchParams::default(), seed);
            assert!(setup.fits(&b.placement));
            assert!(close(b.cost, setup.model().total_cost(&b.placement)));
            assert!(
                close(b.cost, opt),
                "case {k} seed {seed}: search {} vs optimum {opt}",
                b.cost
            );
        }
    }
}

#[test]
fn genetic_algorithm_finds_the_brute_force_optimum() {
    // Tiny instances: evaluations are cheap, so the GA gets many
    // generations (the paper-scale default is set for run time).
    let params = GaParams {
        population: 32,
        generations: 2000,
        ..GaParams::default()
    };
    for (k, &(fanout, slots, vms, p)) in CASES.iter().enumerate() {
        for seed in 0..2u64 {
            let setup = common::tiny(fanout, slots, vms, p, 100 * k as u64 + seed);
            let opt = brute_force(&setup);
            let b = ga::run(&setup, &params, seed, |_| {});
            assert!(setup.fits(&b.placement));
            assert!(close(b.cost, setup.model().total_cost(&b.placement)));
            assert!(
                close(b.cost, opt),
                "case {k} seed {seed}: GA {} vs optimum {opt}",
                b.cost
            );
        }
    }
}

#[test]
fn baselines_respect_capacity_at_scale() {
    let s = common::small_scenario(400, 3);
    let setup = Setup::build(&s).unwrap();
    let initial = setup.initial_cost();
    let b = search::run(&setup, &SearchParams::default(), 3);
    assert!(setup.fits(&b.placement));
    assert!(b.cost < initial);
    let g = ga::run(&setup, &s.baselines.ga, 3, |_| {});
    assert!(setup.fits(&g.placement));
    assert!(g.cost < initial);
}
