//! Properties of ejection chains (score_core::chain) over random trees,
//! traffic, placements and capacities (proptest): the asked host's offer
//! is the exact drop of the fully recomputed equation 1 total, at least as
//! good as any swap there, never raises the cost and respects capacity.

mod common;

use common::{Shape, World, close, cm, set};
use proptest::prelude::*;
use score_core::chain::{Chain, choose_ejection, decide_chain};
use score_core::cost::{Placement, VmIdx};
use score_core::decision::MigrationCost;
use score_core::swap::{CandidateSet, SwapRequest, local_vms, plan_with, swap_delta};

/// What the tests ask of a [`World`] about ejection chains.
trait Chains {
    /// Host `r.to` answers a chain request with what it knows (here: all).
    fn offer(
        &self,
        p: &Placement,
        r: &SwapRequest,
        cm: MigrationCost,
        set: CandidateSet,
    ) -> Option<score_core::chain::EjectionOffer>;
    /// The chain the holder of `u` decides on in placement `p`, if any.
    fn chain(&self, p: &Placement, u: VmIdx, cm: MigrationCost, set: CandidateSet)
    -> Option<Chain>;
}

impl Chains for World {
    fn offer(
        &self,
        p: &Placement,
        r: &SwapRequest,
        cm: MigrationCost,
        set: CandidateSet,
    ) -> Option<score_core::chain::EjectionOffer> {
        let local = local_vms(&self.model(), p, &self.on(p, r.to), |_| 0);
        choose_ejection(&self.topo, r.to, 1 << 30, &local, r, cm, set, |h| {
            self.capacity(p, h)
        })
    }

    fn chain(
        &self,
        p: &Placement,
        u: VmIdx,
        cm: MigrationCost,
        set: CandidateSet,
    ) -> Option<Chain> {
        let model = self.model();
        let peers = model.peers(p, u);
        let pl = plan_with(&self.topo, u, p.host(u), &peers, set);
        decide_chain(
            &pl,
            &peers,
            cm,
            0,
            1 << 30,
            4,
            |h| self.capacity(p, h),
            |r| self.offer(p, r, cm, set),
        )
    }
}

/// A third of the hosts full, the rest with a little room.
fn world() -> impl Strategy<Value = World> {
    common::world(Shape {
        vms: 22,
        spare: 3,
        pairs: 40,
        extra: 3,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// Every offer's benefit is the drop of the recomputed total, above
    /// c_m(u) + c_m(w); w's destination had room (or is u's host); no swap
    /// on the asked host beats the offer.
    #[test]
    fn offers_are_exact_and_beat_every_swap(w in world(), cm in cm(), set in set()) {
        let model = w.model();
        let p = &w.placement;
        let total = model.total_cost(p);
        for u in 0..p.vm_count() {
            let peers = model.peers(p, u);
            let x = p.host(u);
            let pl = plan_with(&w.topo, u, x, &peers, CandidateSet::All);
            for c in &pl.candidates {
                let c_m = cm.threshold(pl.cost_before, c.path_weight);
                let req = SwapRequest {
                    vm: u,
                    from: x,
                    to: c.host,
                    gain: c.benefit,
                    cost_before: pl.cost_before,
                    c_m,
                    mem_mb: 0,
                    from_free_mem_mb: 0,
                    peers_on_target: peers
                        .iter()
                        .filter(|z| z.host == c.host)
                        .map(|z| (z.id, z.rate))
                        .collect(),
                };
                let offer = w.offer(p, &req, cm, set);
                let on: Vec<VmIdx> = (0..p.vm_count()).filter(|&v| p.host(v) == c.host).collect();
                if let Some(o) = offer {
                    prop_assert!(on.contains(&o.partner));
                    prop_assert_ne!(o.partner, u);
                    let mut q = p.clone();
                    q.move_vm(u, c.host);
                    q.move_vm(o.partner, o.partner_to);
                    let drop = total - model.total_cost(&q);
                    prop_assert!(close(o.benefit, drop, total), "{} vs {}", o.benefit, drop);
                    prop_assert!(o.benefit > o.c_m);
                    let thr = c_m + cm.threshold(model.vm_cost(p, o.partner), w.topo.weight(c.host, o.partner_to));
                    prop_assert!(close(o.c_m, thr, thr));
                    prop_assert!(o.partner_to != c.host);
                    if o.partner_to != x {
                        prop_assert!(p.count(o.partner_to) < w.cap[o.partner_to as usize]);
                    }
                }
                for &v in &on {
                    let drop = -swap_delta(&model, p, u, v);
                    let thr = c_m + cm.threshold(model.vm_cost(p, v), w.topo.weight(c.host, x));
                    match offer {
                        Some(o) => prop_assert!(drop - thr <= o.benefit - o.c_m + 1e-9 * total.max(1.0)),
                        None => prop_assert!(drop <= thr + 1e-9 * total.max(1.0)),
                    }
                }
            }
        }
    }

    /// Rounds of chain decisions never raise the total and keep capacity.
    #[test]
    fn chains_never_raise_the_cost(w in world(), cm in cm(), set in set()) {
        let model = w.model();
        let mut p = w.placement.clone();
        let mut total = model.total_cost(&p);
        for _round in 0..2 {
            for u in 0..p.vm_count() {
                let Some(ch) = w.chain(&p, u, cm, set) else { continue };
                let before = p.clone();
                ch.apply(&mut p);
                let now = model.total_cost(&p);
                prop_assert!(close(total - now, ch.benefit, total));
                prop_assert!(ch.benefit > ch.c_m && now < total);
                prop_assert_eq!(ch.migrations(), 2);
                prop_assert_eq!(before.host(ch.partner), ch.to);
                for h in 0..w.topo.host_count() {
                    prop_assert!(p.count(h) <= w.cap[h as usize].max(before.count(h)));
                }
                total = now;
            }
        }
    }
}
