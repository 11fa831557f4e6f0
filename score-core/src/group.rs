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

use serde::Serialize;

use crate::cost::Placement;
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
}
