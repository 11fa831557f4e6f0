//! A genetic algorithm over whole placements, the kind of centralised
//! approximation of the optimum the paper draws as its reference line.
//!
//! - Individual: a placement (host of every VM) within every host's capacity.
//! - Fitness: the equation 1 total (score-core's [`CostModel::total_cost`]),
//!   lower is better.
//! - Initial population: the initial placement and `population - 1` random
//!   placements within capacity.
//! - Selection: tournament of `tournament` individuals; the `elite` best are
//!   copied unchanged into the next generation.
//! - Crossover (with probability `crossover_prob`): rack-block crossover.
//!   A random half of the racks is chosen; the child keeps parent A's VMs on
//!   those racks where A has them, takes parent B's host for every other VM
//!   whose B host lies outside those racks and has room, then A's host if it
//!   has room, then a random host with room (repair). Whole racks of A are
//!   inherited intact, so co-located groups survive crossover.
//! - Mutation: `mutation_rate × VMs` times per child (at least once, plus a
//!   geometric number of extra times with mean 1), a
//!   random VM picks a target host: the host of a random peer (80%) or any
//!   host (20%); it moves there if the host has room (60% of the time), else
//!   it swaps places with a random VM of that host.
//!
//! Children of one generation are made in parallel, each with its own RNG
//! seeded from (seed, generation, index), so the result does not depend on
//! the number of threads.

use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use score_core::cost::{CostModel, Placement, VmIdx};
use score_core::topology::HostId;

use super::{BaselineRun, BaselineStats};
use crate::scenario::GaParams;
use crate::world::{HostLists, Setup, random_placement};

/// Runs the GA on the setup's initial traffic; `on_generation` is called
/// after each generation with its number.
pub fn run(
    setup: &Setup,
    params: &GaParams,
    seed: u64,
    on_generation: impl Fn(u32) + Sync,
) -> BaselineRun {
    let started = Instant::now();
    let model = setup.model();
    let hosts = setup.topo.host_count();
    let cap = setup.shape.max_vms();
    let n = setup.vms();
    let pop_size = params.population.max(2) as usize;

    let mut pop: Vec<(f64, Placement)> = Vec::with_capacity(pop_size);
    pop.push((model.total_cost(&setup.placement), setup.placement.clone()));
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6a09_e667_f3bc_c908);
    while pop.len() < pop_size {
        let p = random_placement(hosts, cap, n, &mut rng)
            .ok()
            .and_then(|h| Placement::new(hosts, h).ok())
            .unwrap_or_else(|| setup.placement.clone());
        pop.push((model.total_cost(&p), p));
    }
    sort_pop(&mut pop);

    let elite = (params.elite as usize).min(pop_size - 1);
    let mut evaluations = 0u64;
    for generation in 0..params.generations {
        let children: Vec<(f64, Placement)> = (elite..pop_size)
            .into_par_iter()
            .map(|i| {
                let mut r = ChaCha8Rng::seed_from_u64(
                    seed ^ (u64::from(generation) << 32) ^ (i as u64).wrapping_mul(0x9e37_79b9),
                );
                let a = tournament(&pop, params.tournament, &mut r);
                let child = if r.random_bool(params.crossover_prob) {
                    let b = tournament(&pop, params.tournament, &mut r);
                    crossover(setup, &pop[a].1, &pop[b].1, cap, &mut r)
                } else {
                    pop[a].1.clone()
                };
                let child = mutate(&model, child, cap, params.mutation_rate, &mut r);
                (model.total_cost(&child), child)
            })
            .collect();
        evaluations += children.len() as u64;
        pop.truncate(elite);
        pop.extend(children);
        sort_pop(&mut pop);
        on_generation(generation + 1);
    }
    let (cost, placement) = pop.swap_remove(0);
    BaselineRun {
        name: "genetic",
        cost,
        placement,
        elapsed_s: started.elapsed().as_secs_f64(),
        stats: BaselineStats {
            generations: params.generations,
            evaluations,
            ..BaselineStats::default()
        },
    }
}

fn sort_pop(pop: &mut [(f64, Placement)]) {
    pop.sort_by(|a, b| a.0.total_cmp(&b.0));
}

/// Index of the fittest of `k` random individuals.
fn tournament(pop: &[(f64, Placement)], k: u32, r: &mut ChaCha8Rng) -> usize {
    let mut best = r.random_range(0..pop.len());
    for _ in 1..k.max(1) {
        let c = r.random_range(0..pop.len());
        if pop[c].0 < pop[best].0 {
            best = c;
        }
    }
    best
}

/// A random host with room, scanning from a random start.
fn any_room(counts: &[u32], cap: u32, r: &mut ChaCha8Rng) -> Option<HostId> {
    let h = counts.len();
    let start = r.random_range(0..h);
    (0..h)
        .map(|i| (start + i) % h)
        .find(|&i| counts[i] < cap)
        .map(|i| i as HostId)
}

/// Rack-block crossover with capacity repair (see the module documentation).
fn crossover(
    setup: &Setup,
    a: &Placement,
    b: &Placement,
    cap: u32,
    r: &mut ChaCha8Rng,
) -> Placement {
    let topo = &setup.topo;
    let racks = topo.group_count(1) as usize;
    let chosen: Vec<bool> = (0..racks).map(|_| r.random_bool(0.5)).collect();
    let in_chosen = |h: HostId| chosen[topo.group_of(h, 1) as usize];
    let n = a.vm_count() as usize;
    let mut counts = vec![0u32; topo.host_count() as usize];
    let mut host_of: Vec<Option<HostId>> = vec![None; n];
    for (v, slot) in host_of.iter_mut().enumerate() {
        let ha = a.host(v as VmIdx);
        if in_chosen(ha) {
            *slot = Some(ha);
            counts[ha as usize] += 1;
        }
    }
    for (v, slot) in host_of.iter_mut().enumerate() {
        if slot.is_some() {
            continue;
        }
        let hb = b.host(v as VmIdx);
        let ha = a.host(v as VmIdx);
        let pick = if !in_chosen(hb) && counts[hb as usize] < cap {
            Some(hb)
        } else if counts[ha as usize] < cap {
            Some(ha)
        } else {
            any_room(&counts, cap, r)
        };
        if let Some(h) = pick {
            counts[h as usize] += 1;
            *slot = Some(h);
        }
    }
    // Every VM found a host: the VMs fit (the scenario checked it), and
    // each step only uses hosts with room.
    let hosts: Vec<HostId> = host_of
        .iter()
        .enumerate()
        .map(|(v, h)| h.unwrap_or_else(|| a.host(v as VmIdx)))
        .collect();
    Placement::new(topo.host_count(), hosts).unwrap_or_else(|_| a.clone())
}

/// Guided mutation (see the module documentation).
fn mutate(
    model: &CostModel<'_>,
    mut p: Placement,
    cap: u32,
    rate: f64,
    r: &mut ChaCha8Rng,
) -> Placement {
    let n = p.vm_count();
    if n == 0 {
        return p;
    }
    let hosts = p.host_count();
    let mut lists = HostLists::new(&p);
    // At least one change, plus a geometric number of extra ones (mean 1),
    // so that a child can also jump out of a single-change local optimum.
    let mut times = ((f64::from(n) * rate).round() as u64).max(1);
    while r.random_bool(0.5) {
        times += 1;
    }
    for _ in 0..times {
        let v = r.random_range(0..n);
        let from = p.host(v);
        let peers = model.traffic.neighbours(v);
        let roll: f64 = r.random();
        // Target host: a peer's (guided) or any host (exploration).
        let to = if !peers.is_empty() && roll < 0.8 {
            p.host(peers[r.random_range(0..peers.len())].vm)
        } else {
            r.random_range(0..hosts)
        };
        if to == from {
            continue;
        }
        if p.count(to) < cap && r.random_bool(0.6) {
            p.move_vm(v, to);
            lists.moved(v, from, to);
        } else {
            // Swap with a random VM on the target host, if it has any.
            let on_to = lists.on(to);
            if on_to.is_empty() {
                continue;
            }
            let w = on_to[r.random_range(0..on_to.len())];
            p.move_vm(v, to);
            lists.moved(v, from, to);
            p.move_vm(w, from);
            lists.moved(w, to, from);
        }
    }
    p
}
