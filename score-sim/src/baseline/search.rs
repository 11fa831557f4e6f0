//! Greedy placement plus local search, the strong centralised baseline.
//!
//! 1. Greedy: VMs are laid out in one sequence by growing clusters along
//!    heavy traffic (start from the busiest unplaced VM; repeatedly append
//!    the unplaced VM with the most traffic to those already laid out), and
//!    the sequence fills the hosts in tree order, so that VMs close in the
//!    sequence share a host, then a rack, then a pod.
//! 2. Local search from the greedy placement and, separately, from the
//!    initial one (and, for small data centres, from `restarts` random
//!    placements): for each VM, every host of one of its peers and, in the
//!    rack of each such host, the first host with room (every host, in data
//!    centres of at most `all_hosts_below` hosts), are tried as a move
//!    (if it has room) and as a swap with each VM there; the best improving
//!    change is applied. Passes repeat until none improves (or
//!    `max_passes`). The better of the two results is kept.
//!
//! Costs and deltas are score-core's ([`CostModel::move_delta`]); a swap's
//! delta is the two moves' deltas corrected for the pair itself, whose
//! level does not change when the two VMs trade hosts.

use std::cmp::Ordering;
use std::collections::BinaryHeap;
use std::time::Instant;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use score_core::cost::{CostModel, Placement, VmIdx};
use score_core::topology::HostId;

use super::{BaselineRun, BaselineStats};
use crate::scenario::SearchParams;
use crate::world::{HostLists, Setup, random_placement};

/// Runs the baseline on the setup's initial traffic and placement.
pub fn run(setup: &Setup, params: &SearchParams, seed: u64) -> BaselineRun {
    let started = Instant::now();
    let model = setup.model();
    let cap = setup.shape.max_vms();
    let greedy = greedy_placement(setup);
    let greedy_cost = model.total_cost(&greedy);
    let mut stats = BaselineStats {
        greedy_cost,
        ..BaselineStats::default()
    };
    let mut best: Option<(f64, Placement)> = None;
    let mut starts = vec![greedy, setup.placement.clone()];
    if setup.vms() <= params.restart_max_vms {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0xbb67_ae85_84ca_a73b);
        for _ in 0..params.restarts {
            if let Ok(h) = random_placement(setup.topo.host_count(), cap, setup.vms(), &mut rng)
                && let Ok(p) = Placement::new(setup.topo.host_count(), h)
            {
                starts.push(p);
            }
        }
    }
    for start in starts {
        let mut p = start;
        let (passes, moves, swaps) = local_search(&model, &mut p, cap, params);
        stats.passes += passes;
        stats.moves += moves;
        stats.swaps += swaps;
        let c = model.total_cost(&p);
        if best.as_ref().is_none_or(|(b, _)| c < *b) {
            best = Some((c, p));
        }
    }
    let (cost, placement) = match best {
        Some(b) => b,
        None => (setup.initial_cost(), setup.placement.clone()),
    };
    BaselineRun {
        name: "greedy+local-search",
        cost,
        placement,
        elapsed_s: started.elapsed().as_secs_f64(),
        stats,
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Keyed(f64, VmIdx);

impl Eq for Keyed {}

impl Ord for Keyed {
    fn cmp(&self, o: &Self) -> Ordering {
        self.0.total_cmp(&o.0).then(o.1.cmp(&self.1))
    }
}

impl PartialOrd for Keyed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

/// The greedy placement (step 1 of the module documentation).
pub fn greedy_placement(setup: &Setup) -> Placement {
    let t = &setup.traffic;
    let n = t.vm_count();
    let cap = setup.shape.max_vms().max(1);
    let mut by_load: Vec<VmIdx> = (0..n).collect();
    by_load.sort_by(|&a, &b| t.load(b).total_cmp(&t.load(a)).then(a.cmp(&b)));
    let mut placed = vec![false; n as usize];
    let mut key = vec![0.0f64; n as usize];
    let mut heap = BinaryHeap::new();
    let mut order = Vec::with_capacity(n as usize);
    let mut seed_pos = 0;
    while order.len() < n as usize {
        let next = loop {
            match heap.pop() {
                Some(Keyed(k, v)) if !placed[v as usize] && k == key[v as usize] => break Some(v),
                Some(_) => continue,
                None => break None,
            }
        };
        let v = match next {
            Some(v) => v,
            None => {
                while placed[by_load[seed_pos] as usize] {
                    seed_pos += 1;
                }
                by_load[seed_pos]
            }
        };
        placed[v as usize] = true;
        order.push(v);
        for z in t.neighbours(v) {
            if !placed[z.vm as usize] {
                key[z.vm as usize] += z.rate;
                heap.push(Keyed(key[z.vm as usize], z.vm));
            }
        }
    }
    let mut host_of = vec![0 as HostId; n as usize];
    for (i, &v) in order.iter().enumerate() {
        host_of[v as usize] = (i as u32) / cap;
    }
    // The scenario guarantees that n <= hosts * cap, so every index fits.
    match Placement::new(setup.topo.host_count(), host_of) {
        Ok(p) => p,
        Err(_) => setup.placement.clone(),
    }
}

/// A change found by local search.
#[derive(Debug, Clone, Copy)]
enum Change {
    Move(HostId),
    Swap(VmIdx, HostId),
}

/// Local search with moves and swaps until no change improves; returns
/// (passes, moves, swaps).
pub fn local_search(
    model: &CostModel<'_>,
    p: &mut Placement,
    cap: u32,
    params: &SearchParams,
) -> (u32, u64, u64) {
    let topo = model.topo;
    let t = model.traffic;
    let mut lists = HostLists::new(p);
    let total = model.total_cost(p);
    // Ignore improvements below rounding noise of the total.
    let eps = total.abs() * 1e-12;
    let (mut moves, mut swaps, mut passes) = (0u64, 0u64, 0u32);
    let mut cands: Vec<HostId> = Vec::new();
    while passes < params.max_passes {
        passes += 1;
        let mut improved = false;
        for u in 0..t.vm_count() {
            let x = p.host(u);
            cands.clear();
            for z in t.neighbours(u) {
                let h = p.host(z.vm);
                if h != x {
                    cands.push(h);
                    // A host with room in the same rack, when h is full.
                    if p.count(h) >= cap {
                        let rack = topo.group_of(h, 1);
                        if let Some(r) = topo
                            .group_hosts(1, rack)
                            .find(|&r| r != x && p.count(r) < cap)
                        {
                            cands.push(r);
                        }
                    }
                }
            }
            if topo.host_count() <= params.all_hosts_below {
                cands.clear();
                cands.extend((0..topo.host_count()).filter(|&h| h != x));
            }
            cands.sort_unstable();
            cands.dedup();
            let mut best: Option<(f64, Change)> = None;
            let consider = |d: f64, c: Change, best: &mut Option<(f64, Change)>| {
                if d < -eps && best.is_none_or(|(b, _)| d < b) {
                    *best = Some((d, c));
                }
            };
            for &y in &cands {
                let du = model.move_delta(p, u, y);
                if p.count(y) < cap {
                    consider(du, Change::Move(y), &mut best);
                }
                if params.swaps {
                    let wxy = topo.weight(x, y);
                    for &w in lists.on(y) {
                        let dw = model.move_delta(p, w, x);
                        let fix = 4.0 * t.rate(u, w) * wxy;
                        consider(du + dw + fix, Change::Swap(w, y), &mut best);
                    }
                }
            }
            match best {
                Some((_, Change::Move(y))) => {
                    p.move_vm(u, y);
                    lists.moved(u, x, y);
                    moves += 1;
                    improved = true;
                }
                Some((_, Change::Swap(w, y))) => {
                    p.move_vm(u, y);
                    lists.moved(u, x, y);
                    p.move_vm(w, x);
                    lists.moved(w, y, x);
                    swaps += 1;
                    improved = true;
                }
                None => {}
            }
        }
        if !improved {
            break;
        }
    }
    (passes, moves, swaps)
}
