//! Properties of group moves (score_core::group) over random trees,
//! traffic, placements and capacities (proptest): the benefit is the exact
//! drop of the fully recomputed equation 1 total, a decided group move
//! never raises the cost and respects capacity; the same for group swaps.

mod common;

use common::{Shape, World, close, cm};
use proptest::prelude::*;
use score_core::cost::{Placement, VmIdx};
use score_core::decision::Capacity;
use score_core::group::{
    GroupLimits, Home, SwapLimits, decide_group, decide_group_swap, group_delta, local_group,
    offer_exchange,
};
use score_core::swap::{LocalVm, local_vms};
use score_core::topology::HostId;

/// The VMs of host `x` as that host knows them, with memory sizes of
/// 512, 768 and 1024 MiB.
fn local(w: &World, p: &Placement, x: HostId) -> Vec<LocalVm> {
    local_vms(&w.model(), p, &w.on(p, x), |v| 512 + 256 * u64::from(v % 3))
}

/// Few hosts and many VMs per host, so that hosts hold groups.
fn world() -> impl Strategy<Value = World> {
    common::world(Shape {
        vms: 28,
        spare: 5,
        pairs: 50,
        extra: 4,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// For any group and any hosts its members go to (capacity aside), the
    /// delta is the change of the fully recomputed total.
    #[test]
    fn group_delta_is_exact(w in world(), picks in prop::collection::vec(any::<u32>(), 32), max in 1usize..10) {
        let model = w.model();
        let p = &w.placement;
        let total = model.total_cost(p);
        let hosts = w.topo.host_count();
        for u in 0..p.vm_count() {
            let x = p.host(u);
            let local = local(&w, p, x);
            let idx = local_group(u, &local, max);
            prop_assert!(!idx.is_empty() && idx.len() <= max);
            prop_assert_eq!(local[idx[0]].id, u);
            let members: Vec<&LocalVm> = idx.iter().map(|&i| &local[i]).collect();
            let to: Vec<HostId> = (0..members.len()).map(|i| picks[(i + u as usize) % picks.len()] % hosts).collect();
            let mut q = p.clone();
            for (g, &h) in members.iter().zip(&to) {
                q.move_vm(g.id, h);
            }
            let d = group_delta(&w.topo, x, &members, &to);
            prop_assert!(close(d, model.total_cost(&q) - total, total), "{} vs {}", d, model.total_cost(&q) - total);
        }
    }

    /// A decided group move: its benefit is the drop of the recomputed
    /// total, above the members' summed c_m (so the cost never rises), it
    /// keeps every host within capacity and memory, moves the group of u
    /// (u first) from u's host into one rack (or its pod); and a run of such decisions
    /// only lowers the total.
    #[test]
    fn group_moves_are_exact_and_never_raise_the_cost(w in world(), cm in cm(), racks in 1usize..4) {
        let model = w.model();
        let mut p = w.placement.clone();
        let mut total = model.total_cost(&p);
        let lim = GroupLimits { max_members: 6, max_racks: racks };
        let mem = |v: VmIdx| 512 + 256 * u64::from(v % 3);
        for _round in 0..2 {
            for u in 0..p.vm_count() {
                let x = p.host(u);
                let local = local(&w, &p, x);
                let cap = |h: HostId| {
                    let used: u64 = (0..p.vm_count()).filter(|&v| p.host(v) == h).map(mem).sum();
                    Some(Capacity {
                        free_slots: w.cap[h as usize].saturating_sub(p.count(h)),
                        free_mem_mb: (u64::from(w.cap[h as usize]) * 1024).saturating_sub(used),
                    })
                };
                let Some(g) = decide_group(&w.topo, x, u, &local, cm, lim, cap) else {
                    continue;
                };
                let before = p.clone();
                g.apply(&mut p);
                let now = model.total_cost(&p);
                prop_assert!(close(g.benefit, total - now, total), "{} vs {}", g.benefit, total - now);
                prop_assert!(g.benefit > g.c_m && g.c_m >= 0.0);
                prop_assert!(now < total);
                prop_assert_eq!(g.vm, u);
                prop_assert_eq!(g.moves[0].0, u);
                prop_assert!(g.moves.len() <= lim.max_members);
                prop_assert_eq!(g.migrations() as usize, g.moves.len());
                let thr: f64 = g.moves.iter().map(|&(v, h)| cm.threshold(model.vm_cost(&before, v), w.topo.weight(x, h))).sum();
                prop_assert!(close(g.c_m, thr, total));
                let in_rack = g.moves.iter().all(|&(_, h)| w.topo.group_of(h, 1) == g.rack);
                let pod = w.topo.group_of(w.topo.group_hosts(1, g.rack).start, 2);
                for &(v, h) in &g.moves {
                    prop_assert_eq!(before.host(v), x);
                    prop_assert_ne!(h, x);
                    // The rack, or (spilled, depth >= 3) the rack's pod.
                    prop_assert!(in_rack || (w.topo.depth() >= 3 && w.topo.group_of(h, 2) == pod));
                }
                prop_assert!(g.rack != w.topo.group_of(x, 1));
                for h in 0..w.topo.host_count() {
                    prop_assert!(p.count(h) <= w.cap[h as usize].max(before.count(h)));
                    let used: u64 = (0..p.vm_count()).filter(|&v| p.host(v) == h).map(mem).sum();
                    prop_assert!(used <= u64::from(w.cap[h as usize]) * 1024 || h == x);
                }
                total = now;
            }
        }
    }

    /// A decided group swap: its benefit is the drop of the recomputed
    /// total, above every moving VM's summed c_m, it moves u's group (u
    /// first) from u's host to one host and VMs of that host back, keeps
    /// every host within its slots and memory, and a run of them only
    /// lowers the total.
    #[test]
    fn group_swaps_are_exact_and_never_raise_the_cost(w in world(), cm in cm(), hosts in 1usize..6, pool in 1usize..8) {
        let model = w.model();
        let mut p = w.placement.clone();
        let mut total = model.total_cost(&p);
        let lim = SwapLimits { max_members: 4, max_back: 4, pool, max_hosts: hosts };
        let mem = |v: VmIdx| 512 + 256 * u64::from(v % 3);
        for _round in 0..2 {
            for u in 0..p.vm_count() {
                let x = p.host(u);
                let room = |p: &Placement, h: HostId| {
                    let used: u64 = (0..p.vm_count()).filter(|&v| p.host(v) == h).map(mem).sum();
                    Capacity {
                        free_slots: w.cap[h as usize].saturating_sub(p.count(h)),
                        free_mem_mb: (u64::from(w.cap[h as usize]) * 1024).saturating_sub(used),
                    }
                };
                let lx = local(&w, &p, x);
                let home = Home { host: x, room: room(&p, x), local: &lx };
                let Some(g) = decide_group_swap(&w.topo, home, u, cm, lim, |y, req| {
                    offer_exchange(&w.topo, y, room(&p, y), &local(&w, &p, y), req, cm, lim)
                }) else {
                    continue;
                };
                let before = p.clone();
                g.apply(&mut p);
                let now = model.total_cost(&p);
                prop_assert!(close(g.benefit, total - now, total), "{} vs {}", g.benefit, total - now);
                prop_assert!(g.benefit > g.c_m && g.c_m >= 0.0);
                prop_assert!(now < total);
                prop_assert_eq!(g.vm, u);
                prop_assert_eq!(g.moves[0], (u, x, g.moves[0].2));
                let y = g.moves[0].2;
                prop_assert_ne!(y, x);
                let thr: f64 = g.moves.iter().map(|&(v, a, b)| cm.threshold(model.vm_cost(&before, v), w.topo.weight(a, b))).sum();
                prop_assert!(close(g.c_m, thr, total));
                let mut back = 0;
                for &(v, a, b) in &g.moves {
                    prop_assert_eq!(before.host(v), a);
                    prop_assert!((a, b) == (x, y) || (a, b) == (y, x));
                    back += usize::from(a == y);
                }
                prop_assert!(back >= 1 && back <= lim.max_back);
                for h in [x, y] {
                    let used: u64 = (0..p.vm_count()).filter(|&v| p.host(v) == h).map(mem).sum();
                    prop_assert!(p.count(h) <= w.cap[h as usize].max(before.count(h)));
                    prop_assert!(used <= u64::from(w.cap[h as usize]) * 1024);
                }
                total = now;
            }
        }
    }
}
