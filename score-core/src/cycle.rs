//! Beyond the paper (docs/EVALUATION.md, "Rotations"): three VMs on three
//! full hosts moving in a cycle. u on x goes to y, y's VM w goes on to z,
//! and z's VM v comes back to x, into the place u left.
//!
//! When every host is full, the paper's rule cannot move anything, a swap
//! needs the exchanged VM to gain at u's host, and an ejection chain
//! ([`crate::chain`]) needs a third host with room. A rotation needs none
//! of these: every host gives one VM and takes one, so only the memory
//! each host gives back must cover what it takes. Such placements are
//! stable against every move of one or two VMs, yet the rotation lowers
//! the total (a test below builds one).
//!
//! Each step is decided by the host that knows the VM it moves, as for
//! swaps and chains. The holder of u asks the full candidates where u
//! gains, best gain first ([`decide_rotation`]); the asked host y picks w
//! among its own VMs and w's candidates z where w gains ([`extend_rotation`]),
//! and asks z to close the cycle; z picks v among its VMs for x
//! ([`close_rotation`]). A request carries the moving VMs with their
//! measured peers, so the host that closes the cycle computes its benefit
//! exactly ([`moves_delta`]): the drop of the equation 1 total with all
//! three moves made at once, every pair of two moving VMs at its new
//! level. A rotation is three live migrations: it must beat the three
//! VMs' c_m, each as [`MigrationCost::threshold`] gives it for the VM's
//! own cost now, by more than the rounding margin.

use serde::{Deserialize, Serialize};

use crate::cost::Placement;
use crate::decision::{Capacity, MigrationCost, Peer, Plan, noise_margin};
use crate::swap::{CandidateSet, LocalVm, plan_with};
use crate::token::VmId;
use crate::topology::{HostId, Topology};

/// One VM of a rotation, with what its host measured of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Leg {
    /// The VM, its memory and its measured peers (hosts as its host
    /// knows them).
    pub vm: LocalVm,
    /// Its host now.
    pub from: HostId,
    /// Its host after the rotation.
    pub to: HostId,
    /// Its cost now, C(vm) (for its share of the threshold).
    pub cost_before: f64,
}

/// What travels from host to host while a rotation is being built: the
/// legs decided so far (u's first), and what the holder's host x can take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationRequest {
    /// The legs so far: u (x → y), then w (y → z) when z is asked.
    pub legs: Vec<Leg>,
    /// The sum of the legs' c_m so far.
    pub c_m: f64,
    /// Free memory on x now, MiB (v needs its memory there once u left).
    pub home_free_mem_mb: u64,
}

/// A closed rotation as the host that closed it, or the host it answers,
/// offers it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RotationOffer {
    /// The three legs: u (x → y), w (y → z), v (z → x).
    pub legs: Vec<Leg>,
    /// The drop of the equation 1 total with the three moves made.
    pub benefit: f64,
    /// The threshold it exceeds: c_m(u) + c_m(w) + c_m(v).
    pub c_m: f64,
    /// Requests asked to build it (capacity and rotation requests).
    pub asked: u32,
}

/// A decided rotation.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rotation {
    /// (VM, from, to) for u, w and v, in that order.
    pub moves: [(VmId, HostId, HostId); 3],
    /// The drop of the equation 1 total.
    pub benefit: f64,
    /// c_m(u) + c_m(w) + c_m(v).
    pub c_m: f64,
    /// Requests asked, by the holder and by the hosts it asked.
    pub asked: u32,
}

impl Rotation {
    /// Live migrations it takes: three.
    pub fn migrations(&self) -> u32 {
        3
    }

    /// Applies it to a placement whose VM indices are the VM IDs (the
    /// simulator's convention). Panics if a VM or host is out of range.
    pub fn apply(&self, p: &mut Placement) {
        for &(v, _, to) in &self.moves {
            p.move_vm(v, to);
        }
    }
}

fn usable(owner: VmId, z: &Peer, n_hosts: usize) -> bool {
    z.id != owner && z.rate.is_finite() && z.rate > 0.0 && (z.host as usize) < n_hosts
}

/// Change of the equation 1 total (negative is a saving) if every leg's VM
/// went from its `from` to its `to` at once, every other VM staying where
/// the legs' peer lists say it is. Each unordered pair counts twice in
/// equation 1: a pair of a moving VM with one that stays changes by twice
/// its rate times the change of weight; a pair of two moving VMs is seen
/// from both sides, each with its own measured rate, at the two VMs' new
/// hosts (not where either peer list places the other).
pub fn moves_delta(topo: &Topology, legs: &[Leg]) -> f64 {
    let n = topo.host_count() as usize;
    let w = topo.weights();
    let weight = |a: HostId, b: HostId| w.cumulative(topo.level(a, b));
    let mut d = 0.0;
    for g in legs {
        for z in g.vm.peers.iter().filter(|z| usable(g.vm.id, z, n)) {
            match legs.iter().find(|o| o.vm.id == z.id) {
                Some(o) => d += z.rate * (weight(g.to, o.to) - weight(g.from, o.from)),
                None => d += 2.0 * z.rate * (weight(g.to, z.host) - weight(g.from, z.host)),
            }
        }
    }
    d
}

/// C(vm) on `host`: its usable peers' rates times the weight of their level.
pub fn vm_cost(topo: &Topology, vm: &LocalVm, host: HostId) -> f64 {
    let n = topo.host_count() as usize;
    let w = topo.weights();
    vm.peers
        .iter()
        .filter(|z| usable(vm.id, z, n))
        .map(|z| z.rate * w.cumulative(topo.level(host, z.host)))
        .sum()
}

/// The host `me` (free memory `free_mem_mb` now, VMs `local` as it knows
/// them) closes a rotation whose two legs are in `req` (u: x → y, then
/// w: y → me): the VM v it sends to x, the one with the largest benefit
/// net of the three VMs' c_m (ties to the lower VM), if above that
/// threshold and the memory of x and of this host suffices. `cm` is this
/// host's c_m setting, for v.
pub fn close_rotation(
    topo: &Topology,
    me: HostId,
    free_mem_mb: u64,
    local: &[LocalVm],
    req: &RotationRequest,
    cm: MigrationCost,
) -> Option<RotationOffer> {
    let [u, w] = req.legs.as_slice() else {
        return None;
    };
    let x = u.from;
    if w.to != me || w.from != u.to || me == x || me == w.from || x == w.from {
        return None;
    }
    let mut best: Option<(f64, RotationOffer)> = None;
    for v in local {
        if v.id == u.vm.id || v.id == w.vm.id {
            continue;
        }
        // This host gives v's memory back and takes w's; x gives u's and takes v's.
        if free_mem_mb.saturating_add(v.mem_mb) < w.vm.mem_mb
            || req.home_free_mem_mb.saturating_add(u.vm.mem_mb) < v.mem_mb
        {
            continue;
        }
        let cost_v = vm_cost(topo, v, me);
        let legs = vec![
            u.clone(),
            w.clone(),
            Leg {
                vm: v.clone(),
                from: me,
                to: x,
                cost_before: cost_v,
            },
        ];
        let benefit = -moves_delta(topo, &legs);
        let c_m = req.c_m + cm.threshold(cost_v, topo.weight(me, x));
        let margin = noise_margin(legs.iter().map(|l| l.cost_before.abs()).sum());
        // NaN anywhere refuses.
        let clears = benefit > c_m + margin;
        if !clears {
            continue;
        }
        let net = benefit - c_m;
        if best
            .as_ref()
            .is_none_or(|(b, o)| net > *b || (net == *b && v.id < o.legs[2].vm.id))
        {
            best = Some((
                net,
                RotationOffer {
                    legs,
                    benefit,
                    c_m,
                    asked: 0,
                },
            ));
        }
    }
    best.map(|(_, o)| o)
}

/// The full host `me` (free memory `free_mem_mb`), asked by the holder of
/// u with one leg (u: x → me), extends the rotation: for each of its VMs w
/// whose memory makes room for u, w's candidates in `set` where w gains
/// (u counted on this host, where w would leave it), best gain first and
/// at most `max_asks` of them over all w, not x nor this host, that have
/// no room (`capacity`: with room a chain is the simpler move) are asked
/// to close it (`close`: normally [`close_rotation`] on that host). The
/// best closed rotation net of its threshold wins. `cm` is this host's
/// c_m setting, for w.
// The arguments are what the asked host has at hand, as for chains.
#[allow(clippy::too_many_arguments)]
pub fn extend_rotation(
    topo: &Topology,
    me: HostId,
    free_mem_mb: u64,
    local: &[LocalVm],
    req: &RotationRequest,
    cm: MigrationCost,
    set: CandidateSet,
    max_asks: u32,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
    mut close: impl FnMut(&RotationRequest) -> Option<RotationOffer>,
) -> Option<RotationOffer> {
    let [u] = req.legs.as_slice() else {
        return None;
    };
    let x = u.from;
    if u.to != me || me == x || me >= topo.host_count() || x >= topo.host_count() {
        return None;
    }
    // Every (w, z) worth asking, by w's gain at z.
    let mut asks: Vec<(f64, usize, HostId, f64)> = Vec::new();
    let mut peers: Vec<Peer> = Vec::new();
    for (i, w) in local.iter().enumerate() {
        if w.id == u.vm.id || free_mem_mb.saturating_add(w.mem_mb) < u.vm.mem_mb {
            continue;
        }
        peers.clear();
        peers.extend(w.peers.iter().map(|z| Peer {
            host: if z.id == u.vm.id { me } else { z.host },
            ..*z
        }));
        let plan: Plan = plan_with(topo, w.id, me, &peers, set);
        let cost_w = vm_cost(topo, w, me);
        for c in plan.candidates.iter().filter(|c| c.benefit > 0.0) {
            if c.host != x && c.host != me {
                asks.push((c.benefit, i, c.host, cost_w));
            }
        }
    }
    asks.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    let mut asked = 0u32;
    let mut answers: Vec<(HostId, bool)> = Vec::new();
    let mut best: Option<(f64, RotationOffer)> = None;
    let mut sent = 0u32;
    for (_, i, z, cost_w) in asks {
        if sent >= max_asks {
            break;
        }
        let w = &local[i];
        let full = match answers.iter().find(|(h, _)| *h == z) {
            Some(&(_, f)) => f,
            None => {
                asked += 1;
                let f = !capacity(z).is_some_and(|c| c.fits(w.mem_mb));
                answers.push((z, f));
                f
            }
        };
        if !full {
            continue;
        }
        sent += 1;
        asked += 1;
        let next = RotationRequest {
            legs: vec![
                u.clone(),
                Leg {
                    vm: w.clone(),
                    from: me,
                    to: z,
                    cost_before: cost_w,
                },
            ],
            c_m: req.c_m + cm.threshold(cost_w, topo.weight(me, z)),
            home_free_mem_mb: req.home_free_mem_mb,
        };
        let Some(o) = close(&next) else {
            continue;
        };
        asked += o.asked;
        // Trust but check: the offer is the rotation asked for, and its
        // threshold covers what u's and w's hosts asked of it.
        let covers = o.c_m >= next.c_m;
        let net = o.benefit - o.c_m;
        let gains = net > 0.0;
        if o.legs.len() != 3 || o.legs[..2] != next.legs[..] || !covers || !gains {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| net > *b) {
            best = Some((net, o));
        }
    }
    best.map(|(_, o)| RotationOffer { asked, ..o })
}

/// The holder's rotation for the plan's VM u (planned with [`plan_with`]):
/// the candidates where u gains, best gain first, that have no room for u
/// (`capacity`), at most `max_asks` of them, are asked to extend a
/// rotation (`ask`: normally [`extend_rotation`] on the asked host); the
/// rotation with the largest benefit net of its threshold wins. `u` is u
/// as its host knows it (its memory and measured peers), `cm` its c_m
/// setting, `home_free_mem_mb` the free memory on u's host now.
pub fn decide_rotation(
    plan: &Plan,
    u: &LocalVm,
    cm: MigrationCost,
    home_free_mem_mb: u64,
    max_asks: u32,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
    mut ask: impl FnMut(&RotationRequest) -> Option<RotationOffer>,
) -> Option<Rotation> {
    if cm.threshold(plan.cost_before, 0.0).is_nan() || u.id != plan.vm {
        return None;
    }
    let order = plan.gaining_best_first();
    let mut asked = 0u32;
    let mut asks = 0u32;
    let mut best: Option<(f64, RotationOffer)> = None;
    for i in order {
        if asks >= max_asks {
            break;
        }
        let y = plan.candidates[i].host;
        let c_m = cm.threshold(plan.cost_before, plan.candidates[i].path_weight);
        asked += 1;
        if capacity(y).is_some_and(|cap| cap.fits(u.mem_mb)) {
            // Room: a plain migration, the paper's business.
            continue;
        }
        asks += 1;
        asked += 1;
        let req = RotationRequest {
            legs: vec![Leg {
                vm: u.clone(),
                from: plan.host,
                to: y,
                cost_before: plan.cost_before,
            }],
            c_m,
            home_free_mem_mb,
        };
        let Some(o) = ask(&req) else {
            continue;
        };
        asked += o.asked;
        let covers = o.c_m >= c_m;
        let net = o.benefit - o.c_m;
        let gains = net > 0.0;
        if o.legs.len() != 3 || o.legs[0] != req.legs[0] || !covers || !gains {
            continue;
        }
        if best.as_ref().is_none_or(|(b, _)| net > *b) {
            best = Some((net, o));
        }
    }
    best.map(|(_, o)| Rotation {
        moves: [0, 1, 2].map(|k| (o.legs[k].vm.id, o.legs[k].from, o.legs[k].to)),
        benefit: o.benefit,
        c_m: o.c_m,
        asked,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostModel, Traffic};
    use crate::swap::local_vms;
    use crate::topology::LinkWeights;
    use proptest::prelude::*;
    use std::net::Ipv4Addr;

    /// A regular tree with whole link weights 1, 3, 9, ... (every cost sum
    /// then is exact in f64).
    fn topo(fanout: &[u32]) -> Topology {
        let c = (0..fanout.len()).map(|l| 3f64.powi(l as i32)).collect();
        Topology::regular(
            fanout,
            LinkWeights::new(c).unwrap(),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    /// Runs the three hosts' decisions over a placement where every host
    /// holds `slots` VMs of equal memory, each host answering from what
    /// the model says it measures.
    fn decide(m: &CostModel<'_>, p: &Placement, slots: u32, u: VmId) -> Option<Rotation> {
        let t = m.topo;
        // One MiB per VM: free memory is free slots.
        let free = |h: HostId| u64::from(slots - p.count(h));
        let cap = |h: HostId| {
            Some(Capacity {
                free_slots: slots - p.count(h),
                free_mem_mb: free(h),
            })
        };
        let on =
            |h: HostId| -> Vec<u32> { (0..p.vm_count()).filter(|&v| p.host(v) == h).collect() };
        let local = |h: HostId| local_vms(m, p, &on(h), |_| 1);
        let x = p.host(u);
        let peers = m.peers(p, u);
        let plan = plan_with(t, u, x, &peers, CandidateSet::All);
        let me = local(x).into_iter().find(|l| l.id == u)?;
        let cm = MigrationCost::Absolute(0.0);
        decide_rotation(&plan, &me, cm, free(x), 4, cap, |r| {
            let y = r.legs[0].to;
            extend_rotation(
                t,
                y,
                free(y),
                &local(y),
                r,
                cm,
                CandidateSet::All,
                4,
                cap,
                |r2| {
                    let z = r2.legs[1].to;
                    close_rotation(t, z, free(z), &local(z), r2, cm)
                },
            )
        })
    }

    /// Three racks of two hosts, two slots each, all full. u, w and v sit
    /// in racks 0, 1 and 2; each talks to a peer in the next rack (rate
    /// 20) and to one in its own rack (rate 10), so each gains 10 rack
    /// crossings' worth by moving forward and loses 10 by moving to the
    /// rack behind. A swap of two of them is then worth exactly 0, and
    /// the rotation u → rack 1, w → rack 2, v → rack 0 is worth 30.
    #[test]
    fn a_rotation_where_no_swap_helps() {
        let t = topo(&[2, 3]);
        // u=0, w=1, v=2; ahead: 3 (u's, rack 1), 4 (w's, rack 2), 5 (v's,
        // rack 0); behind: 6 (u's, rack 0), 7 (w's, rack 1), 8 (v's,
        // rack 2); 9, 10, 11 silent.
        let tr = Traffic::from_triples(
            12,
            [
                (0, 3, 20.0),
                (1, 4, 20.0),
                (2, 5, 20.0),
                (0, 6, 10.0),
                (1, 7, 10.0),
                (2, 8, 10.0),
            ],
        )
        .unwrap();
        let p = Placement::new(6, vec![0, 2, 4, 3, 5, 1, 1, 3, 5, 0, 2, 4]).unwrap();
        let m = CostModel::new(&t, &tr);
        for (a, b) in [(0, 1), (1, 2), (0, 2)] {
            let mut q = p.clone();
            let (ha, hb) = (q.host(a), q.host(b));
            q.move_vm(a, hb);
            q.move_vm(b, ha);
            assert_eq!(m.total_cost(&q), m.total_cost(&p), "swap {a}-{b}");
        }
        let r = decide(&m, &p, 2, 0).expect("a rotation");
        let mut q = p.clone();
        r.apply(&mut q);
        assert!(r.benefit > 0.0);
        assert_eq!(m.total_cost(&p) - m.total_cost(&q), r.benefit);
        assert_eq!(r.migrations(), 3);
        let hosts: Vec<HostId> = r.moves.iter().map(|&(_, from, _)| from).collect();
        assert!(hosts[0] != hosts[1] && hosts[1] != hosts[2] && hosts[0] != hosts[2]);
        for &(vm, from, to) in &r.moves {
            assert_eq!(p.host(vm), from);
            assert_eq!(q.count(to), 2, "host {to} stays within its slots");
        }
    }

    #[test]
    fn a_rotation_needs_the_memory_it_takes() {
        let t = topo(&[2, 3]);
        let tr = Traffic::from_triples(6, [(0, 3, 10.0), (1, 4, 10.0), (2, 5, 10.0)]).unwrap();
        let p = Placement::new(6, vec![0, 2, 4, 3, 5, 1]).unwrap();
        let m = CostModel::new(&t, &tr);
        let local = |h: HostId, mem: u64| -> Vec<LocalVm> {
            let on: Vec<u32> = (0..6).filter(|&v| p.host(v) == h).collect();
            local_vms(&m, &p, &on, |v| if v == 2 { mem } else { 1 })
        };
        let u = local(0, 1).remove(0);
        let w = local(2, 1).remove(0);
        let req = RotationRequest {
            legs: vec![
                Leg {
                    cost_before: vm_cost(&t, &u, 0),
                    vm: u,
                    from: 0,
                    to: 2,
                },
                Leg {
                    cost_before: vm_cost(&t, &w, 2),
                    vm: w,
                    from: 2,
                    to: 4,
                },
            ],
            c_m: 0.0,
            home_free_mem_mb: 0,
        };
        let cm = MigrationCost::Absolute(0.0);
        // c (2 MiB) does not fit where a (1 MiB) left.
        assert!(close_rotation(&t, 4, 0, &local(4, 2), &req, cm).is_none());
        assert!(close_rotation(&t, 4, 0, &local(4, 1), &req, cm).is_some());
        // A threshold above the benefit refuses it.
        let high = MigrationCost::Absolute(1e9);
        assert!(close_rotation(&t, 4, 0, &local(4, 1), &req, high).is_none());
    }

    proptest! {
        /// The benefit of any three simultaneous moves is exactly the drop
        /// of the recomputed equation 1 total (rates and weights whole
        /// numbers, so every sum is exact).
        #[test]
        fn moves_delta_is_the_recomputed_drop(
            pairs in proptest::collection::vec((0u32..9, 0u32..9, 1u32..50), 1..30),
            hosts in proptest::collection::vec(0u32..8, 9),
            pick in proptest::sample::subsequence((0u32..9).collect::<Vec<_>>(), 3),
            to in proptest::collection::vec(0u32..8, 3),
        ) {
            let t = topo(&[2, 2, 2]);
            let tr = Traffic::from_triples(
                9,
                pairs.iter().filter(|(a, b, _)| a != b).map(|&(a, b, r)| (a, b, f64::from(r))),
            )
            .unwrap();
            let p = Placement::new(8, hosts).unwrap();
            let m = CostModel::new(&t, &tr);
            let legs: Vec<Leg> = pick
                .iter()
                .zip(&to)
                .map(|(&v, &h)| Leg {
                    vm: local_vms(&m, &p, &[v], |_| 1).remove(0),
                    from: p.host(v),
                    to: h,
                    cost_before: 0.0,
                })
                .collect();
            let mut q = p.clone();
            for l in &legs {
                q.move_vm(l.vm.id, l.to);
            }
            prop_assert_eq!(moves_delta(&t, &legs), m.total_cost(&q) - m.total_cost(&p));
        }
    }
}
