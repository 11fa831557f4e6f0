//! How far the end placements of the small instances are from local optima
//! of larger neighbourhoods (docs/EVALUATION.md, "Group swaps").
//!
//! For each small case of `score-sim capacity` and 30 seeds, the run of one
//! variant (the first argument; distributed policy) ends in a placement
//! that no move of its repertoire improves. From there this descends, by
//! best improvement, over every change of k VMs to any hosts (k = 2, 3, 4)
//! and over every exchange of any VMs between two hosts, and prints how many
//! instances stay below 0.95 of the exact optimum's reduction. Brute force:
//! only for instances of a dozen VMs.
//!
//! `cargo run --release -p score-sim --example neighbourhood [VARIANT]`

use score_core::cost::{CostModel, Placement, VmIdx};
use score_core::optimum::optimum;
use score_core::policy::PolicyKind;
use score_sim::capacity::{SMALL_CASES, Variant, small_setup};
use score_sim::engine::{RunOptions, run_policy};
use score_sim::scenario::{Scenario, TokenInit};

/// The cheapest placement that moves `set` to any hosts within `cap`, if
/// cheaper than `p` by more than rounding.
fn best_of_set(
    m: &CostModel<'_>,
    p: &Placement,
    cap: u32,
    set: &[VmIdx],
) -> Option<(f64, Placement)> {
    let hosts = p.host_count();
    let base = m.total_cost(p);
    let mut best: Option<(f64, Placement)> = None;
    let mut to = vec![0u32; set.len()];
    loop {
        let mut q = p.clone();
        for (&u, &h) in set.iter().zip(&to) {
            q.move_vm(u, h);
        }
        let c = m.total_cost(&q);
        if q.counts().iter().all(|&n| n <= cap)
            && c < base - 1e-9 * base.max(1.0)
            && best.as_ref().is_none_or(|b| c < b.0)
        {
            best = Some((c, q));
        }
        // The next assignment, as a number in base `hosts`.
        let mut i = 0;
        while i < to.len() {
            to[i] += 1;
            if to[i] < hosts {
                break;
            }
            to[i] = 0;
            i += 1;
        }
        if i == to.len() {
            return best;
        }
    }
}

/// The best change of `k` VMs (each to any host, its own included).
fn best_k_change(m: &CostModel<'_>, p: &Placement, cap: u32, k: usize) -> Option<Placement> {
    let n = p.vm_count() as usize;
    let mut idx: Vec<usize> = (0..k).collect();
    let mut best: Option<(f64, Placement)> = None;
    loop {
        let set: Vec<VmIdx> = idx.iter().map(|&i| i as VmIdx).collect();
        if let Some((c, q)) = best_of_set(m, p, cap, &set)
            && best.as_ref().is_none_or(|b| c < b.0)
        {
            best = Some((c, q));
        }
        // The next k-subset in lexicographic order.
        let Some(j) = (0..k).rev().find(|&j| idx[j] < n - k + j) else {
            return best.map(|b| b.1);
        };
        idx[j] += 1;
        for l in j + 1..k {
            idx[l] = idx[l - 1] + 1;
        }
    }
}

/// The best exchange between two hosts: any of x's VMs for any of y's.
fn best_host_pair(m: &CostModel<'_>, p: &Placement, cap: u32) -> Option<Placement> {
    let base = m.total_cost(p);
    let mut best: Option<(f64, Placement)> = None;
    for x in 0..p.host_count() {
        for y in x + 1..p.host_count() {
            let on = |h| {
                (0..p.vm_count())
                    .filter(|&u| p.host(u) == h)
                    .collect::<Vec<_>>()
            };
            let (xs, ys) = (on(x), on(y));
            for a in 0u32..1 << xs.len() {
                for b in 0u32..1 << ys.len() {
                    let mut q = p.clone();
                    xs.iter()
                        .enumerate()
                        .filter(|(i, _)| a >> i & 1 == 1)
                        .for_each(|(_, &u)| {
                            q.move_vm(u, y);
                        });
                    ys.iter()
                        .enumerate()
                        .filter(|(i, _)| b >> i & 1 == 1)
                        .for_each(|(_, &u)| {
                            q.move_vm(u, x);
                        });
                    let c = m.total_cost(&q);
                    if q.count(x) <= cap
                        && q.count(y) <= cap
                        && c < base - 1e-9 * base.max(1.0)
                        && best.as_ref().is_none_or(|b| c < b.0)
                    {
                        best = Some((c, q));
                    }
                }
            }
        }
    }
    best.map(|b| b.1)
}

fn descend(mut p: Placement, step: impl Fn(&Placement) -> Option<Placement>) -> Placement {
    while let Some(q) = step(&p) {
        p = q;
    }
    p
}

fn main() {
    let label = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "swap+peer-pods+chain+cycle+group".to_string());
    let variant: Variant = label
        .parse()
        .expect("a variant as score-sim capacity takes it");
    let scenario = Scenario::default();
    let names = ["run", "+2 VMs", "+3 VMs", "+4 VMs", "+host pairs"];
    println!(
        "variant {label}, distributed policy: instances below 0.95 of the optimum's reduction"
    );
    for (case, &(fanout, slots, vms, prob)) in SMALL_CASES.iter().enumerate() {
        let mut below = [0u32; 5];
        let mut worst = [f64::INFINITY; 5];
        let mut instances = 0;
        for seed in 0..30u64 {
            let setup = small_setup(fanout, slots, vms, prob, 1000 * case as u64 + seed).unwrap();
            let m = setup.model();
            let cap = setup.shape.max_vms();
            let caps = vec![cap; setup.topo.host_count() as usize];
            let opt = match optimum(&m, &caps, Some(&setup.placement), 5_000_000_000) {
                Ok(o) if o.proven => o,
                _ => continue,
            };
            let initial = setup.initial_cost();
            let gain = initial - opt.cost;
            if gain <= 1e-9 * initial.max(1.0) {
                continue;
            }
            instances += 1;
            let o = RunOptions {
                token_init: TokenInit::Measured,
                ..variant.options(&scenario, 50)
            };
            let end = run_policy(&setup, PolicyKind::Distributed, &o, |_| {})
                .unwrap()
                .final_placement;
            let ends = [
                end.clone(),
                descend(end.clone(), |p| best_k_change(&m, p, cap, 2)),
                descend(end.clone(), |p| best_k_change(&m, p, cap, 3)),
                descend(end.clone(), |p| best_k_change(&m, p, cap, 4)),
                descend(end, |p| best_host_pair(&m, p, cap)),
            ];
            for (i, p) in ends.iter().enumerate() {
                let share = (initial - m.total_cost(p)) / gain;
                below[i] += u32::from(share < 0.95 - 1e-9);
                worst[i] = worst[i].min(share);
            }
        }
        println!("{fanout:?}, {slots} slots, {vms} VMs: {instances} instances");
        for i in 0..names.len() {
            println!(
                "  {:<12} {:>2} below, worst {:.3}",
                names[i], below[i], worst[i]
            );
        }
    }
}
