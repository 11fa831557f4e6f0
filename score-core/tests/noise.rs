//! No decision moves a VM on rounding noise: over random trees, traffic
//! and placements whose rates are tenths (0.1, 0.3, ...: not exact in
//! binary, so sums in different orders differ in the last bits) and whose
//! link weights are whole numbers, every migration, swap, ejection chain
//! and group move the rules take, with c_m = 0 and every candidate set,
//! lowers the equation 1 total computed exactly (in integers, tenths of a
//! rate times whole weights). A move whose exact change is zero, or
//! positive, fails the test.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use score_core::chain::{choose_ejection, decide_chain};
use score_core::cost::{CostModel, Placement, Traffic, VmIdx};
use score_core::decision::{Capacity, MigrationCost, Rule};
use score_core::group::{GroupLimits, decide_group};
use score_core::swap::{
    CandidateSet, Scope, Settings, Step, choose_swap_partner, decide_with, local_vms, plan_with,
};
use score_core::topology::{HostId, LinkWeights, Topology};

/// A data centre with exact integer traffic next to its f64 model.
#[derive(Debug, Clone)]
struct World {
    topo: Topology,
    /// Whole weights c_1..c_depth.
    weights: Vec<i64>,
    /// (u, v, tenths of a rate).
    tenths: Vec<(VmIdx, VmIdx, i64)>,
    traffic: Traffic,
    placement: Placement,
    cap: Vec<u32>,
}

impl World {
    fn model(&self) -> CostModel<'_> {
        CostModel::new(&self.topo, &self.traffic)
    }

    /// The equation 1 total in tenths, exactly (each pair once).
    fn exact_total(&self, p: &Placement) -> i64 {
        self.tenths
            .iter()
            .filter(|(u, v, _)| u != v)
            .map(|&(u, v, k)| {
                let level = self.topo.level(p.host(u), p.host(v));
                k * self.weights[..usize::from(level)].iter().sum::<i64>()
            })
            .sum()
    }

    fn capacity(&self, p: &Placement, h: HostId) -> Option<Capacity> {
        Some(Capacity {
            free_slots: self.cap[h as usize].saturating_sub(p.count(h)),
            free_mem_mb: 1 << 30,
        })
    }

    fn on(&self, p: &Placement, x: HostId) -> Vec<VmIdx> {
        (0..p.vm_count()).filter(|&v| p.host(v) == x).collect()
    }
}

fn world() -> impl Strategy<Value = World> {
    (prop::collection::vec(2u32..4, 1..=3), 2u32..20)
        .prop_flat_map(|(fanout, n_vms)| {
            let depth = fanout.len();
            let hosts: u32 = fanout.iter().product();
            (
                Just(fanout),
                prop::collection::vec(1i64..6, depth),
                prop::collection::vec(0..hosts, n_vms as usize),
                prop::collection::vec((0..n_vms, 0..n_vms, 1i64..40), 1..40),
                prop::collection::vec(0u32..3, hosts as usize),
            )
        })
        .prop_map(|(fanout, weights, host_of, tenths, extra)| {
            let topo = Topology::regular(
                &fanout,
                LinkWeights::new(weights.iter().map(|&c| c as f64).collect()).unwrap(),
                Ipv4Addr::new(10, 0, 0, 1),
            )
            .unwrap();
            let n = host_of.len() as u32;
            let placement = Placement::new(topo.host_count(), host_of).unwrap();
            let cap = placement
                .counts()
                .iter()
                .zip(&extra)
                .map(|(&c, &e)| c + e)
                .collect();
            let traffic =
                Traffic::from_triples(n, tenths.iter().map(|&(u, v, k)| (u, v, k as f64 / 10.0)))
                    .unwrap();
            World {
                topo,
                weights,
                tenths,
                traffic,
                placement,
                cap,
            }
        })
}

/// Applies `moves` to `p` and checks the exact total fell.
fn take(w: &World, p: &mut Placement, moves: &[(VmIdx, HostId)], what: &str) {
    let before = w.exact_total(p);
    let mut q = p.clone();
    for &(vm, to) in moves {
        q.move_vm(vm, to);
    }
    let after = w.exact_total(&q);
    assert!(
        after < before,
        "{what} {moves:?} taken with an exact change of {} tenths",
        after - before
    );
    *p = q;
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    #[test]
    fn no_move_is_taken_on_rounding_noise(w in world()) {
        let cm = MigrationCost::Absolute(0.0);
        for set in CandidateSet::ALL {
            for rule in [Rule::PaperFirst, Rule::BestBenefit] {
                for swaps in [false, true] {
                    let mut p = w.placement.clone();
                    let s = Settings {
                        rule,
                        cm,
                        mem_need_mb: 0,
                        scope: Scope { candidates: set, swaps, max_swap_asks: None },
                    };
                    // A few rounds: a VM moved back and forth shows in the
                    // second move, whose exact change is 0.
                    for _round in 0..3 {
                        for u in 0..p.vm_count() {
                            let model = w.model();
                            let peers = model.peers(&p, u);
                            let pl = plan_with(&w.topo, u, p.host(u), &peers, set);
                            let q = p.clone();
                            let step = decide_with(
                                &w.topo, &pl, &peers, s, 1 << 30,
                                |h| w.capacity(&q, h),
                                |r| {
                                    let local = local_vms(&model, &q, &w.on(&q, r.to), |_| 0);
                                    choose_swap_partner(&w.topo, r.to, 1 << 30, &local, r, cm)
                                },
                            );
                            match step {
                                Step::Single(d) => {
                                    if let Some(to) = d.target() {
                                        take(&w, &mut p, &[(u, to)], "migration");
                                    }
                                }
                                Step::Swap(sw) => take(
                                    &w, &mut p, &[(u, sw.to), (sw.partner, sw.from)], "swap",
                                ),
                            }
                        }
                    }
                }
            }
            // Ejection chains.
            let mut p = w.placement.clone();
            for _round in 0..3 {
                for u in 0..p.vm_count() {
                    let model = w.model();
                    let peers = model.peers(&p, u);
                    let pl = plan_with(&w.topo, u, p.host(u), &peers, set);
                    let q = p.clone();
                    let chain = decide_chain(
                        &pl, &peers, cm, 0, 1 << 30, 8,
                        |h| w.capacity(&q, h),
                        |r| {
                            let local = local_vms(&model, &q, &w.on(&q, r.to), |_| 0);
                            choose_ejection(&w.topo, r.to, 1 << 30, &local, r, cm, set, |h| {
                                w.capacity(&q, h)
                            })
                        },
                    );
                    if let Some(c) = chain {
                        take(&w, &mut p, &[(c.vm, c.to), (c.partner, c.partner_to)], "chain");
                    }
                }
            }
        }
        // Group moves.
        let mut p = w.placement.clone();
        let limits = GroupLimits { max_members: 6, max_racks: 3 };
        for _round in 0..3 {
            for u in 0..p.vm_count() {
                let x = p.host(u);
                let local = local_vms(&w.model(), &p, &w.on(&p, x), |_| 0);
                let q = p.clone();
                if let Some(g) = decide_group(&w.topo, x, u, &local, cm, limits, |h| {
                    w.capacity(&q, h)
                }) {
                    take(&w, &mut p, &g.moves, "group move");
                }
            }
        }
    }
}
