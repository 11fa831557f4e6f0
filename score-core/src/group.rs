//! Beyond the paper (docs/EVALUATION.md): group moves, a VM moving together with the
//! peers it shares its host with.
//!
//! Once hosts are nearly full, the paper's rule and swaps (changes of one
//! or two VMs) stop where a tenant has gathered in several places at once:
//! around each of its hubs, on different hosts in different racks, each
//! cluster filling its host. Moving one VM of a cluster towards another
//! cluster loses as much as it gains (its co-located peers stay behind);
//! the cluster is stable against any change of one or two VMs. Moving the
//! whole cluster at once into a rack where another part of the tenant runs
//! keeps its own pairs close and brings the rest together.
//!
//! What the holder of u on host x decides with is what x knows: it measures
//! the flows of every VM it hosts, so it knows the **group** of u, the
//! connected component of u in the traffic among x's own VMs
//! ([`local_group`]), and every member's peers and rates; where those peers
//! live it learns as for u's own peers (location requests). A target is a
//! rack (level-1 group) where a peer of a member runs, other than x's own;
//! racks are ranked by the cost of the members' peers there, highest first
//! ([`group_targets`]). For a target rack the holder asks each of its hosts
//! for its capacity (the paper's capacity request) and lays the group out
//! there ([`layout`]): hosts where the members' peers run first, then the
//! emptiest; the members in the component's order (u first), each on the
//! first host with room. If the rack cannot take the whole group and the
//! tree has pods (depth 3 or more), the other hosts of the rack's pod are
//! asked too and the layout spills into them (the rack's hosts still
//! first when they draw the members' peers).
//!
//! The benefit is exact ([`group_delta`]): for every member g going to
//! a(g) and every peer z of g, the pair's term changes from W(ℓ(x, z's
//! host)) to W(ℓ(a(g), a(z))) where a(z) is z's host if it is not a member;
//! a pair of two members is seen from both sides, a pair with an outsider
//! from one, so the latter counts twice (each unordered pair counts twice
//! in equation 1). A group move of k VMs is k live migrations: it must beat
//! the sum of the members' c_m, as [`MigrationCost::threshold`] gives each
//! for its own cost now.
//!
//! **Group swaps.** When every host near the group's peers is full, the
//! group can still change places with VMs of one of those hosts: the group
//! goes to host y and y sends back some of its own VMs into the slots the
//! group left. On small instances filled to their last slots, this is the
//! move that the runs' end placements lack most often
//! (docs/EVALUATION.md, "Group swaps"): two co-located pairs that each sit
//! next to the other's peers. The holder asks the hosts where the members'
//! peers run, highest pull first ([`swap_targets`]); each asked host picks
//! the VMs it sends back ([`offer_exchange`]) among its own, knowing their
//! peers, the members' legs from the request, and x's room. The benefit is
//! exact ([`crate::cycle::moves_delta`] over every moving VM at once), and
//! the threshold is the sum of every moving VM's c_m.

use serde::{Deserialize, Serialize};

use crate::cost::Placement;
use crate::cycle::{Leg, moves_delta, vm_cost};
use crate::decision::{Capacity, MigrationCost};
use crate::swap::LocalVm;
use crate::token::VmId;
use crate::topology::{HostId, Topology};

/// Bounds on a group-move decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GroupLimits {
    /// Most members (u included); a larger component is cut in its order.
    pub max_members: usize,
    /// Most target racks evaluated (each costs one capacity request per
    /// host of the rack).
    pub max_racks: usize,
}

impl Default for GroupLimits {
    fn default() -> Self {
        GroupLimits {
            max_members: 32,
            max_racks: 4,
        }
    }
}

/// A decided group move: the members leave `from` for hosts of one rack.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupMove {
    /// The deciding VM u (the first member).
    pub vm: VmId,
    /// The members' host now.
    pub from: HostId,
    /// The target rack (level-1 group). Members go to its hosts, or, if it
    /// could not take them all, also to other hosts of its pod.
    pub rack: u32,
    /// Every member and the host it goes to (u first).
    pub moves: Vec<(VmId, HostId)>,
    /// The drop of the equation 1 total.
    pub benefit: f64,
    /// The threshold it exceeded: the sum of the members' c_m.
    pub c_m: f64,
    /// Capacity requests asked.
    pub asked: u32,
}

impl GroupMove {
    /// Live migrations it takes: one per member.
    pub fn migrations(&self) -> u32 {
        self.moves.len() as u32
    }

    /// Applies it to a placement whose VM indices are the VM IDs (the
    /// simulator's convention). Panics if a VM or host is out of range.
    pub fn apply(&self, p: &mut Placement) {
        for &(v, h) in &self.moves {
            p.move_vm(v, h);
        }
    }
}

/// The group of `vm` on its host: the connected component of `vm` in the
/// traffic among the host's VMs `local` (edges: the peers each VM has, as
/// measured there, with a positive finite rate), in breadth-first order
/// from `vm`, at most `max` of them. Returns indices into `local`; empty if
/// `vm` is not there.
pub fn local_group(vm: VmId, local: &[LocalVm], max: usize) -> Vec<usize> {
    let Some(start) = local.iter().position(|l| l.id == vm) else {
        return Vec::new();
    };
    let mut out = vec![start];
    let mut i = 0;
    while i < out.len() && out.len() < max {
        let a = out[i];
        for z in &local[a].peers {
            if !(z.rate.is_finite() && z.rate > 0.0) || z.id == local[a].id {
                continue;
            }
            if let Some(j) = local.iter().position(|l| l.id == z.id)
                && !out.contains(&j)
                && out.len() < max
            {
                out.push(j);
            }
        }
        i += 1;
    }
    out
}

/// Whether a peer entry counts (the same filter as the paper's plan).
fn usable(owner: VmId, z: &crate::decision::Peer) -> bool {
    z.id != owner && z.rate.is_finite() && z.rate > 0.0
}

/// Change of the equation 1 total (negative is a saving) if the members
/// `members`, all on host `from` now, went to `to[i]` each, every other VM
/// staying where the members' peer lists say it is. Exact: see the module
/// documentation. Panics if the lengths differ.
pub fn group_delta(topo: &Topology, from: HostId, members: &[&LocalVm], to: &[HostId]) -> f64 {
    assert_eq!(members.len(), to.len(), "one target per member");
    let w = topo.weights();
    let mut d = 0.0;
    for (g, &a) in members.iter().zip(to) {
        for z in g.peers.iter().filter(|z| usable(g.id, z)) {
            match members.iter().position(|m| m.id == z.id) {
                // Seen from both members: once each.
                Some(j) => d += z.rate * w.cumulative(topo.level(a, to[j])),
                // A peer nowhere in the tree: no term to change.
                None if z.host >= topo.host_count() => {}
                None => {
                    let now = w.cumulative(topo.level(from, z.host));
                    let after = w.cumulative(topo.level(a, z.host));
                    d += 2.0 * z.rate * (after - now);
                }
            }
        }
    }
    // The members' own pairs cost W(0) = 0 now: all on `from`.
    d
}

/// The target racks of a group on `from`: racks other than `from`'s where
/// a peer of a member runs, ranked by the members' traffic cost to them
/// now (λ·W(ℓ(from, z's host)) summed), highest first, ties to the lower
/// rack. Peers that are members are not counted.
pub fn group_targets(topo: &Topology, from: HostId, members: &[&LocalVm]) -> Vec<u32> {
    let own = topo.group_of(from, 1);
    let w = topo.weights();
    let mut racks: Vec<(u32, f64)> = Vec::new();
    for g in members {
        for z in g.peers.iter().filter(|z| usable(g.id, z)) {
            if members.iter().any(|m| m.id == z.id) || z.host >= topo.host_count() {
                continue;
            }
            let r = topo.group_of(z.host, 1);
            if r == own {
                continue;
            }
            let c = z.rate * w.cumulative(topo.level(from, z.host));
            match racks.iter_mut().find(|(id, _)| *id == r) {
                Some(e) => e.1 += c,
                None => racks.push((r, c)),
            }
        }
    }
    racks.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    racks.into_iter().map(|(r, _)| r).collect()
}

/// Lays the members out on the hosts `room` (host, its capacity answer) of
/// one rack: hosts by the members' traffic to VMs on them (highest first),
/// then by free slots (most first), then by ID; members in order, each on
/// the first host that still fits it (a slot and its memory). `None` if
/// they do not all fit.
pub fn layout(members: &[&LocalVm], room: &[(HostId, Capacity)]) -> Option<Vec<HostId>> {
    let pull = |h: HostId| -> f64 {
        members
            .iter()
            .flat_map(|g| g.peers.iter().filter(|z| usable(g.id, z) && z.host == h))
            .filter(|z| !members.iter().any(|m| m.id == z.id))
            .map(|z| z.rate)
            .sum()
    };
    let mut hosts: Vec<(HostId, Capacity, f64)> = room
        .iter()
        .filter(|(_, c)| c.free_slots > 0)
        .map(|&(h, c)| (h, c, pull(h)))
        .collect();
    hosts.sort_by(|a, b| {
        b.2.total_cmp(&a.2)
            .then(b.1.free_slots.cmp(&a.1.free_slots))
            .then(a.0.cmp(&b.0))
    });
    let mut out = Vec::with_capacity(members.len());
    for g in members {
        let slot = hosts.iter_mut().find(|(_, c, _)| c.fits(g.mem_mb))?;
        slot.1.free_slots -= 1;
        slot.1.free_mem_mb -= g.mem_mb;
        out.push(slot.0);
    }
    Some(out)
}

/// The holder's group-move decision for `vm` on host `from`, whose VMs
/// (as `from` knows them) are `local`: the group ([`local_group`]), its
/// target racks ([`group_targets`], at most `limits.max_racks`), for each
/// the capacity of its hosts (`capacity`, `None`: no answer, no room) and
/// the [`layout`], spilling into the rack's pod if the rack is too full; the move with the largest benefit net of the members'
/// c_m (ties to the earlier rack), if that benefit is above the threshold
/// by more than a rounding margin (1e-9 of the members' costs). `cm` is
/// applied to each member with its cost now.
pub fn decide_group(
    topo: &Topology,
    from: HostId,
    vm: VmId,
    local: &[LocalVm],
    cm: MigrationCost,
    limits: GroupLimits,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
) -> Option<GroupMove> {
    if from >= topo.host_count() || topo.depth() < 2 {
        return None;
    }
    let idx = local_group(vm, local, limits.max_members.max(1));
    let members: Vec<&LocalVm> = idx.iter().map(|&i| &local[i]).collect();
    if members.is_empty() {
        return None;
    }
    let w = topo.weights();
    let costs: Vec<f64> = members
        .iter()
        .map(|g| {
            g.peers
                .iter()
                .filter(|z| usable(g.id, z) && z.host < topo.host_count())
                .map(|z| z.rate * w.cumulative(topo.level(from, z.host)))
                .sum()
        })
        .collect();
    let scale: f64 = costs.iter().map(|c| c.abs()).sum();
    let margin = crate::decision::noise_margin(scale);
    let mut asked = 0u32;
    let mut best: Option<(f64, u32, Vec<HostId>, f64, f64)> = None;
    for rack in group_targets(topo, from, &members)
        .into_iter()
        .take(limits.max_racks)
    {
        let room: Vec<(HostId, Capacity)> = topo
            .group_hosts(1, rack)
            .filter_map(|h| {
                asked += 1;
                capacity(h).map(|c| (h, c))
            })
            .collect();
        let to = match layout(&members, &room) {
            Some(to) => to,
            // The rack alone is too full: its pod too (not u's host).
            None if topo.depth() >= 3 => {
                let pod = topo.group_of(topo.group_hosts(1, rack).start, 2);
                let mut wide = room.clone();
                for h in topo.group_hosts(2, pod) {
                    if h != from && topo.group_of(h, 1) != rack {
                        asked += 1;
                        if let Some(c) = capacity(h) {
                            wide.push((h, c));
                        }
                    }
                }
                match layout(&members, &wide) {
                    Some(to) => to,
                    None => continue,
                }
            }
            None => continue,
        };
        let benefit = -group_delta(topo, from, &members, &to);
        // Each member's c_m for its own path.
        let c_m: f64 = costs
            .iter()
            .zip(&to)
            .map(|(&cost, &h)| cm.threshold(cost, w.cumulative(topo.level(from, h))))
            .sum();
        // NaN anywhere refuses.
        let clears = benefit > c_m + margin;
        if !clears {
            continue;
        }
        let net = benefit - c_m;
        if best.as_ref().is_none_or(|(b, ..)| net > *b) {
            best = Some((net, rack, to, benefit, c_m));
        }
    }
    best.map(|(_, rack, to, benefit, c_m)| GroupMove {
        vm,
        from,
        rack,
        moves: members.iter().map(|g| g.id).zip(to).collect(),
        benefit,
        c_m,
        asked,
    })
}

/// Bounds on a group swap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SwapLimits {
    /// Most members that change places (u included).
    pub max_members: usize,
    /// Most VMs an asked host sends back.
    pub max_back: usize,
    /// Most of its own VMs an asked host considers sending back (those
    /// that gain most alone at the group's host).
    pub pool: usize,
    /// Most hosts asked.
    pub max_hosts: usize,
}

impl Default for SwapLimits {
    fn default() -> Self {
        SwapLimits {
            max_members: 4,
            max_back: 4,
            pool: 8,
            max_hosts: 6,
        }
    }
}

/// What the group's host x sends to an asked host y: the members' legs
/// (each from x to y, with its measured peers and its cost now) and x's
/// room now (before the members leave).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeRequest {
    /// One leg per member, u first.
    pub legs: Vec<Leg>,
    /// x's capacity now.
    pub home: Capacity,
    /// The sum of the members' c_m for this path.
    pub c_m: f64,
}

/// An asked host's answer: the VMs it sends back to x.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExchangeOffer {
    /// Every moving VM: the members (x to y), then the VMs sent back
    /// (y to x).
    pub legs: Vec<Leg>,
    /// The drop of the equation 1 total with every move made.
    pub benefit: f64,
    /// The threshold it exceeds: the sum of every moving VM's c_m.
    pub c_m: f64,
}

/// A decided group swap.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupSwap {
    /// The deciding VM u (the first member).
    pub vm: VmId,
    /// (VM, from, to) for every moving VM: the members first.
    pub moves: Vec<(VmId, HostId, HostId)>,
    /// The drop of the equation 1 total.
    pub benefit: f64,
    /// The sum of every moving VM's c_m.
    pub c_m: f64,
    /// Requests asked.
    pub asked: u32,
}

impl GroupSwap {
    /// Live migrations it takes: one per moving VM.
    pub fn migrations(&self) -> u32 {
        self.moves.len() as u32
    }

    /// Applies it to a placement whose VM indices are the VM IDs (the
    /// simulator's convention). Panics if a VM or host is out of range.
    pub fn apply(&self, p: &mut Placement) {
        for &(v, _, to) in &self.moves {
            p.move_vm(v, to);
        }
    }
}

/// The hosts a group on `from` asks for a swap: hosts other than `from`
/// where a member's peer runs (peers that are members left out), by the
/// members' traffic to them now (λ·W(ℓ(from, z's host)) summed), highest
/// first, ties to the lower host; then the other hosts of those hosts'
/// racks in the same order (a group next to its peer's host gains as much
/// as on it, and that host may have nothing to send back).
pub fn swap_targets(topo: &Topology, from: HostId, members: &[&LocalVm]) -> Vec<HostId> {
    let w = topo.weights();
    let mut hosts: Vec<(HostId, f64)> = Vec::new();
    for g in members {
        for z in g.peers.iter().filter(|z| usable(g.id, z)) {
            if z.host == from || z.host >= topo.host_count() || members.iter().any(|m| m.id == z.id)
            {
                continue;
            }
            let c = z.rate * w.cumulative(topo.level(from, z.host));
            match hosts.iter_mut().find(|(h, _)| *h == z.host) {
                Some(e) => e.1 += c,
                None => hosts.push((z.host, c)),
            }
        }
    }
    hosts.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut out: Vec<HostId> = hosts.iter().map(|&(h, _)| h).collect();
    if topo.depth() >= 2 {
        for &(h, _) in &hosts {
            for n in topo.group_hosts(1, topo.group_of(h, 1)) {
                if n != from && !out.contains(&n) {
                    out.push(n);
                }
            }
        }
    }
    out
}

/// The asked host `me` (capacity `room` now, VMs `local` as it knows them)
/// answers a group swap request: the set of its VMs to send back to x (at
/// least one, at most `limits.max_back`, drawn from the `limits.pool` that
/// gain most alone at x) with the largest benefit net of every moving VM's
/// c_m (ties to the smaller set, then the earlier one), if that benefit is
/// above the threshold by more than the rounding margin and both hosts keep
/// within their slots and memory. The benefit is exact: every moving VM's
/// pairs at their new levels ([`moves_delta`]). `cm` prices the VMs sent
/// back with their costs now.
pub fn offer_exchange(
    topo: &Topology,
    me: HostId,
    room: Capacity,
    local: &[LocalVm],
    req: &ExchangeRequest,
    cm: MigrationCost,
    limits: SwapLimits,
) -> Option<ExchangeOffer> {
    let x = req.legs.first()?.from;
    if x == me || req.legs.iter().any(|l| l.from != x || l.to != me) {
        return None;
    }
    let k = req.legs.len() as u32;
    let out_mem: u64 = req.legs.iter().map(|l| l.vm.mem_mb).sum();
    let w = topo.weights();
    let path = w.cumulative(topo.level(x, me));
    // Candidates: VMs not already moving, by their gain alone at x.
    let mut pool: Vec<(f64, usize)> = local
        .iter()
        .enumerate()
        .filter(|(_, v)| !req.legs.iter().any(|l| l.vm.id == v.id))
        .map(|(i, v)| (vm_cost(topo, v, me) - vm_cost(topo, v, x), i))
        .collect();
    pool.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    pool.truncate(limits.pool);
    let idx: Vec<usize> = pool.into_iter().map(|(_, i)| i).collect();
    let n = idx.len();
    let mut best: Option<(f64, ExchangeOffer)> = None;
    // Every subset of the pool by bit mask, smaller sets first so that
    // ties go to fewer migrations.
    let mut masks: Vec<u32> = (1u32..(1 << n))
        .filter(|m| (m.count_ones() as usize) <= limits.max_back)
        .collect();
    masks.sort_by_key(|m| (m.count_ones(), *m));
    for mask in masks {
        let back: Vec<&LocalVm> = (0..n)
            .filter(|b| mask >> b & 1 == 1)
            .map(|b| &local[idx[b]])
            .collect();
        let s = back.len() as u32;
        let back_mem: u64 = back.iter().map(|v| v.mem_mb).sum();
        // Slots: me gives s and takes k; x gives k and takes s.
        let me_ok = room.free_slots + s >= k && room.free_mem_mb + back_mem >= out_mem;
        let x_ok = req.home.free_slots + k >= s && req.home.free_mem_mb + out_mem >= back_mem;
        if !(me_ok && x_ok) {
            continue;
        }
        let mut legs = req.legs.clone();
        let mut c_m = req.c_m;
        for v in &back {
            let cost = vm_cost(topo, v, me);
            c_m += cm.threshold(cost, path);
            legs.push(Leg {
                vm: (*v).clone(),
                from: me,
                to: x,
                cost_before: cost,
            });
        }
        let benefit = -moves_delta(topo, &legs);
        let scale: f64 = legs.iter().map(|l| l.cost_before.abs()).sum();
        // NaN anywhere refuses.
        let clears = benefit > c_m + crate::decision::noise_margin(scale);
        if !clears {
            continue;
        }
        let net = benefit - c_m;
        if best.as_ref().is_none_or(|(b, _)| net > *b) {
            best = Some((net, ExchangeOffer { legs, benefit, c_m }));
        }
    }
    best.map(|(_, o)| o)
}

/// The holder's host as a group swap starts from it.
#[derive(Debug, Clone, Copy)]
pub struct Home<'a> {
    /// The host, x.
    pub host: HostId,
    /// Its capacity now.
    pub room: Capacity,
    /// Its VMs as it knows them.
    pub local: &'a [LocalVm],
}

/// The holder's group swap for `vm` on `home`: the group ([`local_group`],
/// at most `limits.max_members`), the hosts it asks ([`swap_targets`], at
/// most `limits.max_hosts`), each asked with an [`ExchangeRequest`]
/// through `ask` (`None`: no answer or no offer); the offer with the
/// largest benefit net of its threshold (ties to the earlier host). `cm`
/// prices the members with their costs now.
pub fn decide_group_swap(
    topo: &Topology,
    home: Home<'_>,
    vm: VmId,
    cm: MigrationCost,
    limits: SwapLimits,
    mut ask: impl FnMut(HostId, &ExchangeRequest) -> Option<ExchangeOffer>,
) -> Option<GroupSwap> {
    let Home {
        host: from,
        room,
        local,
    } = home;
    if from >= topo.host_count() {
        return None;
    }
    let idx = local_group(vm, local, limits.max_members.max(1));
    let members: Vec<&LocalVm> = idx.iter().map(|&i| &local[i]).collect();
    if members.is_empty() {
        return None;
    }
    let w = topo.weights();
    let mut asked = 0u32;
    let mut best: Option<(f64, ExchangeOffer)> = None;
    for y in swap_targets(topo, from, &members)
        .into_iter()
        .take(limits.max_hosts)
    {
        let path = w.cumulative(topo.level(from, y));
        let legs: Vec<Leg> = members
            .iter()
            .map(|g| Leg {
                vm: (*g).clone(),
                from,
                to: y,
                cost_before: vm_cost(topo, g, from),
            })
            .collect();
        let c_m = legs.iter().map(|l| cm.threshold(l.cost_before, path)).sum();
        let req = ExchangeRequest {
            legs,
            home: room,
            c_m,
        };
        asked += 1;
        let Some(offer) = ask(y, &req) else {
            continue;
        };
        let net = offer.benefit - offer.c_m;
        if best.as_ref().is_none_or(|(b, _)| net > *b) {
            best = Some((net, offer));
        }
    }
    best.map(|(_, o)| GroupSwap {
        vm,
        moves: o.legs.iter().map(|l| (l.vm.id, l.from, l.to)).collect(),
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
    use std::net::Ipv4Addr;

    /// A tree [2, 2, 2]: racks of two hosts, two racks per pod, two pods;
    /// two slots per host.
    /// A tenant: a=0, b=1 on host 0 (rack 0, pod 0), c=2, d=3 on host 4
    /// (rack 2, pod 1); a-b and c-d talk a lot, b-c a little. Host 1 is
    /// full of silent VMs 4, 5; host 5 has room.
    fn split() -> (Topology, Traffic, Placement) {
        let t = Topology::regular(
            &[2, 2, 2],
            LinkWeights::paper_truncated(3),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let tr = Traffic::from_triples(6, [(0, 1, 10.0), (2, 3, 10.0), (1, 2, 1.0)]).unwrap();
        let p = Placement::new(8, vec![0, 0, 4, 4, 1, 1]).unwrap();
        (t, tr, p)
    }

    fn room(p: &Placement) -> impl Fn(HostId) -> Option<Capacity> + '_ {
        |h| {
            Some(Capacity {
                free_slots: 2u32.saturating_sub(p.count(h)),
                free_mem_mb: 1 << 20,
            })
        }
    }

    #[test]
    fn a_cluster_joins_the_rest_of_its_tenant() {
        let (t, tr, p) = split();
        let m = CostModel::new(&t, &tr);
        let local = local_vms(&m, &p, &[0, 1], |_| 0);
        // No single VM gains: each would leave a heavier peer behind.
        assert!(m.move_delta(&p, 1, 5) > 0.0);
        let g = decide_group(
            &t,
            0,
            0,
            &local,
            MigrationCost::default(),
            GroupLimits::default(),
            room(&p),
        )
        .unwrap();
        // Both go to host 5, next to c and d's host 4 in rack 2.
        assert_eq!(g.rack, 2);
        assert_eq!(g.moves, vec![(0, 5), (1, 5)]);
        assert_eq!(g.asked, 2);
        let mut q = p.clone();
        g.apply(&mut q);
        let drop = m.total_cost(&p) - m.total_cost(&q);
        assert_eq!(g.benefit, drop);
        let w = t.weights();
        assert_eq!(drop, 2.0 * (w.cumulative(3) - w.cumulative(1)));
        assert_eq!(g.migrations(), 2);
    }

    #[test]
    fn c_m_counts_once_per_member_and_full_racks_refuse() {
        let (t, tr, p) = split();
        let m = CostModel::new(&t, &tr);
        let local = local_vms(&m, &p, &[0, 1], |_| 0);
        let w = t.weights();
        let benefit = 2.0 * (w.cumulative(3) - w.cumulative(1));
        let lim = GroupLimits::default();
        // Half the benefit per member is exactly reached: refused.
        let cm = MigrationCost::Absolute(benefit / 2.0);
        assert!(decide_group(&t, 0, 0, &local, cm, lim, room(&p)).is_none());
        let cm = MigrationCost::Absolute(benefit / 2.0 * 0.99);
        assert!(decide_group(&t, 0, 0, &local, cm, lim, room(&p)).is_some());
        // Rack 2 with a single free slot cannot take both.
        let one = |h: HostId| {
            Some(Capacity {
                free_slots: u32::from(h == 5),
                free_mem_mb: 1 << 20,
            })
        };
        assert!(decide_group(&t, 0, 0, &local, MigrationCost::default(), lim, one).is_none());
    }

    #[test]
    fn the_group_is_the_component_on_the_host() {
        let t = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        // On host 0: 0-1-2 a chain, 3 alone; 1 also talks to 4 elsewhere.
        let tr = Traffic::from_triples(5, [(0, 1, 1.0), (1, 2, 1.0), (1, 4, 1.0)]).unwrap();
        let p = Placement::new(4, vec![0, 0, 0, 0, 3]).unwrap();
        let m = CostModel::new(&t, &tr);
        let local = local_vms(&m, &p, &[3, 2, 1, 0], |_| 0);
        let ids = |v: Vec<usize>| v.into_iter().map(|i| local[i].id).collect::<Vec<_>>();
        assert_eq!(ids(local_group(0, &local, 8)), [0, 1, 2]);
        assert_eq!(ids(local_group(2, &local, 8)), [2, 1, 0]);
        assert_eq!(ids(local_group(0, &local, 2)), [0, 1]);
        assert_eq!(ids(local_group(3, &local, 8)), [3]);
        assert!(local_group(9, &local, 8).is_empty());
    }

    /// A tree [2, 2], two slots per host, every host full: pairs 0-1 on
    /// host 0 and 6-7 on host 3 talk a lot within; 0 and 1 also talk to 4
    /// (host 2, rack 1), 6 and 7 to 2 (host 1, rack 0). 2-3 and 4-5 talk a
    /// lot within.
    fn crossed() -> (Topology, Traffic, Placement) {
        let t = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let tr = Traffic::from_triples(
            8,
            [
                (0, 1, 10.0),
                (2, 3, 10.0),
                (4, 5, 10.0),
                (6, 7, 10.0),
                (0, 4, 3.0),
                (1, 4, 3.0),
                (6, 2, 3.0),
                (7, 2, 3.0),
            ],
        )
        .unwrap();
        let p = Placement::new(4, vec![0, 0, 1, 1, 2, 2, 3, 3]).unwrap();
        (t, tr, p)
    }

    #[test]
    fn two_pairs_change_places_where_no_swap_gains() {
        let (t, tr, p) = crossed();
        let m = CostModel::new(&t, &tr);
        let total = m.total_cost(&p);
        // Every exchange of two VMs, and every move (no room anywhere), loses or
        // changes nothing.
        for a in 0..8u32 {
            for b in a + 1..8 {
                let mut q = p.clone();
                let (ha, hb) = (p.host(a), p.host(b));
                q.move_vm(a, hb);
                q.move_vm(b, ha);
                assert!(m.total_cost(&q) >= total, "swap {a} {b} gains");
            }
        }
        let room = |h: HostId| Capacity {
            free_slots: 2u32.saturating_sub(p.count(h)),
            free_mem_mb: 1 << 20,
        };
        let local_at = |h: HostId| {
            let on: Vec<u32> = (0..8).filter(|&v| p.host(v) == h).collect();
            local_vms(&m, &p, &on, |_| 1024)
        };
        let lim = SwapLimits::default();
        let cm = MigrationCost::default();
        // Where 0's group could go with no exchange: nowhere.
        assert!(
            decide_group(
                &t,
                0,
                0,
                &local_at(0),
                cm,
                GroupLimits::default(),
                |h| Some(room(h))
            )
            .is_none()
        );
        let l0 = local_at(0);
        let home = Home {
            host: 0,
            room: room(0),
            local: &l0,
        };
        let g = decide_group_swap(&t, home, 0, cm, lim, |y, req| {
            offer_exchange(&t, y, room(y), &local_at(y), req, cm, lim)
        })
        .unwrap();
        let mut moves = g.moves.clone();
        moves.sort_unstable();
        assert_eq!(moves, vec![(0, 0, 3), (1, 0, 3), (6, 3, 0), (7, 3, 0)]);
        assert_eq!(g.moves[0].0, 0, "u first");
        let mut q = p.clone();
        g.apply(&mut q);
        let drop = total - m.total_cost(&q);
        assert!(
            (g.benefit - drop).abs() <= 1e-9 * total,
            "{} != {drop}",
            g.benefit
        );
        let w = t.weights();
        assert!((drop - 2.0 * 12.0 * (w.cumulative(2) - w.cumulative(1))).abs() < 1e-9);
        assert_eq!(g.migrations(), 4);
        // The host of the group's peer was asked first; it had nothing to
        // send back that gains (4 and 5 would split 4 from 0 and 1).
        assert_eq!(
            swap_targets(&t, 0, &[&local_at(0)[0], &local_at(0)[1]]),
            [2, 3]
        );
        assert_eq!(g.asked, 2);
        // A c_m that takes the whole benefit refuses.
        let cm = MigrationCost::Absolute(drop / 4.0);
        assert!(
            decide_group_swap(&t, home, 0, cm, lim, |y, req| {
                offer_exchange(&t, y, room(y), &local_at(y), req, cm, lim)
            })
            .is_none()
        );
    }
}
