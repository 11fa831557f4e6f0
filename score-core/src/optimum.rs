//! The exact optimum of small instances: the lowest equation 1 total over
//! every placement that respects each host's capacity, by branch and
//! bound. The one yardstick for the decisions, the simulator's baselines,
//! the demo and the end-to-end tests.
//!
//! Search: VMs with traffic are placed one at a time, most connected to the
//! already placed first. For each unplaced VM u and each host h the search
//! keeps `a[u][h]`, the cost u's placed peers would cost if u went to h; the
//! bound is the exact cost among placed VMs plus, for every unplaced VM, its
//! cheapest host with room, plus a bound on the pairs among the unplaced
//! ones ([`lower_bound`]'s packing). Hosts are tried cheapest first. Empty
//! hosts that are interchangeable (the same capacity, and the tree the same
//! seen from either) are tried once: an empty host is used only if it is
//! the first host of the largest empty group around it, and that group is
//! the first empty one among its siblings (when every host has the same
//! capacity and the groups at each level are all the same size; otherwise
//! only empty hosts of one rack with the same capacity count as
//! interchangeable). A branch whose bound reaches the best total so far is
//! cut, so the answer is exact unless the node limit stops the search
//! ([`Optimum::proven`]).

use crate::cost::{CostError, CostModel, Placement, Traffic, VmIdx};
use crate::topology::{HostId, Topology};

/// Errors from [`optimum`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum OptimumError {
    /// The capacity list does not have one entry per host.
    #[error("capacity given for {given} hosts, the topology has {hosts}")]
    CapacityLength {
        /// Entries given.
        given: usize,
        /// Hosts in the topology.
        hosts: u32,
    },
    /// The VMs do not fit the hosts.
    #[error("{vms} VMs do not fit in {slots} slots")]
    NoFit {
        /// VMs to place.
        vms: u32,
        /// Total slots.
        slots: u64,
    },
    /// The start placement does not match the traffic or the topology.
    #[error(
        "the start placement has {placement} VMs on {hosts} hosts, the traffic {traffic} VMs on {topo_hosts} hosts"
    )]
    Mismatch {
        /// VMs of the placement.
        placement: u32,
        /// Hosts of the placement.
        hosts: u32,
        /// VMs of the traffic.
        traffic: u32,
        /// Hosts of the topology.
        topo_hosts: u32,
    },
    /// The placement found was refused by the cost model (not expected).
    #[error("cost model: {0}")]
    Cost(#[from] CostError),
}

/// The result of [`optimum`].
#[derive(Debug, Clone, PartialEq)]
pub struct Optimum {
    /// Equation 1 total of [`Optimum::placement`] ([`CostModel::total_cost`],
    /// each pair counted twice).
    pub cost: f64,
    /// A placement of that cost, within capacity.
    pub placement: Placement,
    /// Whether the search finished (the cost is the optimum) or stopped at
    /// the node limit (the cost is the best found).
    pub proven: bool,
    /// A lower bound on the optimum: `cost` when proven, else
    /// [`lower_bound`].
    pub lower_bound: f64,
    /// Search nodes visited (placements of one VM).
    pub nodes: u64,
}

/// The minimum-cost placement of the model's VMs on its topology's hosts
/// with at most `capacity[h]` VMs on host h. A `start` placement within
/// capacity, polished by local search, is the first incumbent (a good one
/// prunes most of the tree). Stops after `node_limit` search nodes with
/// the best placement found ([`Optimum::proven`] false).
pub fn optimum(
    model: &CostModel<'_>,
    capacity: &[u32],
    start: Option<&Placement>,
    node_limit: u64,
) -> Result<Optimum, OptimumError> {
    let topo = model.topo;
    let traffic = model.traffic;
    let hosts = topo.host_count();
    if capacity.len() != hosts as usize {
        return Err(OptimumError::CapacityLength {
            given: capacity.len(),
            hosts,
        });
    }
    let n = traffic.vm_count();
    let slots: u64 = capacity.iter().map(|&c| u64::from(c)).sum();
    if u64::from(n) > slots {
        return Err(OptimumError::NoFit { vms: n, slots });
    }
    if let Some(s) = start
        && (s.vm_count() != n || s.host_count() != hosts)
    {
        return Err(OptimumError::Mismatch {
            placement: s.vm_count(),
            hosts: s.host_count(),
            traffic: n,
            topo_hosts: hosts,
        });
    }
    let (order, pos) = placement_order(traffic);
    let m = order.len();
    let mut fwd = vec![Vec::new(); m];
    for (k, &u) in order.iter().enumerate() {
        for z in traffic.neighbours(u) {
            let j = pos[z.vm as usize];
            if j > k && j != usize::MAX {
                fwd[k].push((j, z.rate));
            }
        }
    }
    let n_hosts = hosts as usize;
    let depth = topo.depth();
    let uniform = capacity.iter().all(|&c| c == capacity[0]);
    let regular = uniform
        && (1..depth).all(|l| {
            let size = topo.group_hosts(l, 0).len();
            (0..topo.group_count(l)).all(|g| topo.group_hosts(l, g).len() == size)
        });
    let room = room_by_level(topo, capacity);
    let mut s = Search {
        topo,
        capacity,
        fwd,
        hosts: n_hosts,
        a: vec![0.0; m * n_hosts],
        tail: tail_bounds(topo, traffic, &room, &order, &pos),
        count: vec![0; n_hosts],
        occupancy: (1..depth)
            .map(|l| vec![0; topo.group_count(l) as usize])
            .collect(),
        host_at: vec![0; m],
        regular,
        best_cost: f64::INFINITY,
        best: Vec::new(),
        nodes: 0,
        node_limit,
        stopped: false,
    };
    if let Some(start) = start
        && start
            .counts()
            .iter()
            .zip(capacity)
            .all(|(&c, &cap)| c <= cap)
    {
        let mut p = start.clone();
        polish(model, &mut p, capacity);
        s.best_cost = model.total_cost_pairs(&p);
        s.best = order.iter().map(|&u| p.host(u)).collect();
    }
    s.branch(0, 0.0);
    // Lay out: searched VMs where the best says, the rest (no traffic, or
    // no leaf reached) in the first free slots.
    let mut host_of = vec![HostId::MAX; n as usize];
    let mut count = vec![0u32; n_hosts];
    if s.best.len() == m {
        for (k, &u) in order.iter().enumerate() {
            host_of[u as usize] = s.best[k];
            count[s.best[k] as usize] += 1;
        }
    }
    let mut h = 0usize;
    for slot in host_of.iter_mut().filter(|x| **x == HostId::MAX) {
        while count[h] >= capacity[h] {
            h += 1;
        }
        *slot = h as HostId;
        count[h] += 1;
    }
    let placement = Placement::new(hosts, host_of)?;
    // Recomputed in the model's own order, so callers compare bit for bit.
    let cost = model.total_cost(&placement);
    let proven = !s.stopped;
    Ok(Optimum {
        cost,
        placement,
        proven,
        lower_bound: if proven {
            cost
        } else {
            lower_bound(model, capacity)
        },
        nodes: s.nodes,
    })
}

/// The VMs with traffic in search order, and each VM's position in it
/// (`usize::MAX` for VMs without traffic): the busiest first, then always
/// the VM with the most traffic to those already ordered (ties: busier,
/// lower ID).
fn placement_order(traffic: &Traffic) -> (Vec<VmIdx>, Vec<usize>) {
    let n = traffic.vm_count();
    let active: Vec<VmIdx> = (0..n).filter(|&u| traffic.load(u) > 0.0).collect();
    let mut order: Vec<VmIdx> = Vec::with_capacity(active.len());
    let mut pos = vec![usize::MAX; n as usize];
    let mut pull = vec![0.0f64; n as usize];
    while order.len() < active.len() {
        let next = active
            .iter()
            .copied()
            .filter(|&u| pos[u as usize] == usize::MAX)
            .max_by(|&x, &y| {
                pull[x as usize]
                    .total_cmp(&pull[y as usize])
                    .then(traffic.load(x).total_cmp(&traffic.load(y)))
                    .then(y.cmp(&x))
            });
        let Some(u) = next else { break };
        pos[u as usize] = order.len();
        order.push(u);
        for z in traffic.neighbours(u) {
            pull[z.vm as usize] += z.rate;
        }
    }
    (order, pos)
}

/// A lower bound on the equation 1 total of any placement within
/// `capacity`: each VM on its own, with its peers, heaviest first, at the
/// lowest level that still has room around it (the fullest host holds
/// `capacity - 1` others, the largest rack its total capacity less one,
/// ...). Each VM's term of equation 1 is at least that, whatever the
/// others do. `capacity` has one entry per host.
pub fn lower_bound(model: &CostModel<'_>, capacity: &[u32]) -> f64 {
    let room = room_by_level(model.topo, capacity);
    let traffic = model.traffic;
    let mut rates: Vec<f64> = Vec::new();
    (0..traffic.vm_count())
        .map(|u| {
            rates.clear();
            rates.extend(traffic.neighbours(u).iter().map(|z| z.rate));
            packed_cost(model.topo, &room, &mut rates)
        })
        .sum()
}

/// For each k, a lower bound on the per-pair cost of the pairs between VMs
/// at positions k.. of `order`: half the sum, over those VMs, of each one's
/// cost to its peers in that set packed heaviest first at the lowest level
/// with room (each pair is seen from both ends, hence half). Empty slots
/// are assumed everywhere, which only loosens the bound.
fn tail_bounds(
    topo: &Topology,
    traffic: &Traffic,
    room: &[u64],
    order: &[VmIdx],
    pos: &[usize],
) -> Vec<f64> {
    let m = order.len();
    let mut tail = vec![0.0; m + 1];
    let mut rates: Vec<f64> = Vec::new();
    for (k, t) in tail.iter_mut().enumerate().take(m) {
        let mut sum = 0.0;
        for &u in &order[k..] {
            rates.clear();
            rates.extend(
                traffic
                    .neighbours(u)
                    .iter()
                    .filter(|z| pos[z.vm as usize] != usize::MAX && pos[z.vm as usize] >= k)
                    .map(|z| z.rate),
            );
            sum += packed_cost(topo, room, &mut rates);
        }
        *t = sum / 2.0;
    }
    tail
}

/// Room around a VM within each level: the other VMs that fit in the
/// group of the largest capacity at that level.
fn room_by_level(topo: &Topology, capacity: &[u32]) -> Vec<u64> {
    (0..=topo.depth())
        .map(|l| {
            let largest = (0..topo.group_count(l))
                .map(|g| {
                    topo.group_hosts(l, g)
                        .map(|h| u64::from(capacity[h as usize]))
                        .sum::<u64>()
                })
                .max()
                .unwrap_or(1);
            largest.saturating_sub(1)
        })
        .collect()
}

/// The cheapest cost of peers with these rates around one VM: heaviest at
/// the lowest level with room. Sorts `rates`.
fn packed_cost(topo: &Topology, room: &[u64], rates: &mut [f64]) -> f64 {
    let depth = topo.depth();
    let w = topo.weights();
    rates.sort_by(|a, b| b.total_cmp(a));
    let mut level = 0u8;
    let mut total = 0.0;
    for (i, r) in rates.iter().enumerate() {
        while (i as u64) >= room[usize::from(level)] && level < depth {
            level += 1;
        }
        total += r * w.cumulative(level);
    }
    total
}

/// Local search to a local optimum: for each VM, the best improving move
/// to a host with room or swap with a VM of another host, until no VM has
/// one (at most 100 passes).
fn polish(model: &CostModel<'_>, p: &mut Placement, capacity: &[u32]) {
    let topo = model.topo;
    let t = model.traffic;
    let hosts = topo.host_count();
    let eps = model.total_cost(p).abs() * 1e-12;
    for _ in 0..100 {
        let mut improved = false;
        for u in 0..t.vm_count() {
            if t.load(u) == 0.0 {
                continue;
            }
            let x = p.host(u);
            let mut best: Option<(f64, HostId, Option<VmIdx>)> = None;
            for y in (0..hosts).filter(|&y| y != x) {
                let du = model.move_delta(p, u, y);
                if p.count(y) < capacity[y as usize] && best.is_none_or(|b| du < b.0) {
                    best = Some((du, y, None));
                }
                for w in (0..t.vm_count()).filter(|&w| p.host(w) == y) {
                    // The two moves' deltas count the pair (u, w) as if the
                    // other stayed; after a swap their level is unchanged.
                    let d = du + model.move_delta(p, w, x) + 4.0 * t.rate(u, w) * topo.weight(x, y);
                    if best.is_none_or(|b| d < b.0) {
                        best = Some((d, y, Some(w)));
                    }
                }
            }
            if let Some((d, y, w)) = best
                && d < -eps
            {
                p.move_vm(u, y);
                if let Some(w) = w {
                    p.move_vm(w, x);
                }
                improved = true;
            }
        }
        if !improved {
            break;
        }
    }
}

struct Search<'a> {
    topo: &'a Topology,
    capacity: &'a [u32],
    /// For position k: (later position, λ) of its peers placed after it.
    fwd: Vec<Vec<(usize, f64)>>,
    hosts: usize,
    /// a[k * hosts + h]: cost of position k's placed peers if k went to h.
    a: Vec<f64>,
    /// tail[k]: a lower bound on the cost among positions k.. themselves
    /// (see [`tail_bounds`]).
    tail: Vec<f64>,
    count: Vec<u32>,
    /// occupancy[l][g]: VMs in group g at level l (1..depth).
    occupancy: Vec<Vec<u32>>,
    host_at: Vec<HostId>,
    /// Same capacity everywhere and groups of one size per level: whole
    /// empty groups are interchangeable.
    regular: bool,
    best_cost: f64,
    best: Vec<HostId>,
    nodes: u64,
    node_limit: u64,
    stopped: bool,
}

impl Search<'_> {
    fn branch(&mut self, k: usize, partial: f64) {
        self.nodes += 1;
        if self.nodes > self.node_limit {
            self.stopped = true;
            return;
        }
        if k == self.host_at.len() {
            if partial < self.best_cost {
                self.best_cost = partial;
                self.best = self.host_at.clone();
            }
            return;
        }
        if partial + self.bound(k) >= self.best_cost * (1.0 - 1e-12) {
            return;
        }
        let mut cands: Vec<(f64, HostId)> = (0..self.hosts as HostId)
            .filter(|&h| self.has_room(h))
            .filter(|&h| self.count[h as usize] > 0 || self.representative(h))
            .map(|h| (self.a[k * self.hosts + h as usize], h))
            .collect();
        cands.sort_by(|x, y| x.0.total_cmp(&y.0).then(x.1.cmp(&y.1)));
        for (add, h) in cands {
            if self.stopped {
                return;
            }
            self.place(k, h, 1.0);
            self.branch(k + 1, partial + add);
            self.place(k, h, -1.0);
        }
    }

    fn has_room(&self, h: HostId) -> bool {
        self.count[h as usize] < self.capacity[h as usize]
    }

    /// Places (`sign` 1) or removes (-1) position `k` on host `h`.
    fn place(&mut self, k: usize, h: HostId, sign: f64) {
        self.host_at[k] = h;
        let c = &mut self.count[h as usize];
        if sign > 0.0 {
            *c += 1;
        } else {
            *c -= 1;
        }
        for l in 1..self.topo.depth() {
            let g = self.topo.group_of(h, l) as usize;
            let o = &mut self.occupancy[usize::from(l) - 1][g];
            if sign > 0.0 {
                *o += 1;
            } else {
                *o -= 1;
            }
        }
        for i in 0..self.fwd[k].len() {
            let (j, rate) = self.fwd[k][i];
            for x in 0..self.hosts {
                self.a[j * self.hosts + x] += sign * rate * self.topo.weight(x as HostId, h);
            }
        }
    }

    /// Σ over unplaced positions of their cheapest host with room (their
    /// placed peers only), plus the bound on the pairs among them: a lower
    /// bound on what placing them adds.
    fn bound(&self, k: usize) -> f64 {
        self.tail[k]
            + (k..self.host_at.len())
                .map(|j| {
                    let row = &self.a[j * self.hosts..(j + 1) * self.hosts];
                    row.iter()
                        .enumerate()
                        .filter(|(h, _)| self.has_room(*h as HostId))
                        .map(|(_, &c)| c)
                        .fold(f64::INFINITY, f64::min)
                })
                .sum::<f64>()
    }

    fn empty(&self, level: u8, g: u32) -> bool {
        if level == 0 {
            return self.count[g as usize] == 0;
        }
        self.occupancy[usize::from(level) - 1][g as usize] == 0
    }

    /// Whether empty host `h` stands for all the empty hosts like it.
    fn representative(&self, h: HostId) -> bool {
        let t = self.topo;
        let depth = t.depth();
        if !self.regular {
            // Only the empty hosts of h's rack with h's capacity are
            // interchangeable with it: h stands for them if it is the first.
            let cap = self.capacity[h as usize];
            return t
                .group_hosts(1, t.group_of(h, 1))
                .find(|&x| self.count[x as usize] == 0 && self.capacity[x as usize] == cap)
                == Some(h);
        }
        // The largest empty group around h, below the root.
        let mut e = 0u8;
        while e < depth - 1 && self.empty(e + 1, t.group_of(h, e + 1)) {
            e += 1;
        }
        let g = t.group_of(h, e);
        if t.group_hosts(e, g).start != h {
            return false;
        }
        // ... and the first empty group among its siblings.
        let parent = t.group_of(h, e + 1);
        let mut x = t.group_hosts(e + 1, parent).start;
        let end = t.group_hosts(e + 1, parent).end;
        while x < end {
            let sib = t.group_of(x, e);
            if self.empty(e, sib) {
                return sib == g;
            }
            x = t.group_hosts(e, sib).end;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::LinkWeights;
    use std::net::Ipv4Addr;

    fn tree(fanout: &[u32]) -> Topology {
        Topology::regular(
            fanout,
            LinkWeights::paper_truncated(fanout.len()),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    /// Every placement within capacity, no pruning: the reference the
    /// search is checked against on tiny cases.
    fn enumerate(model: &CostModel<'_>, capacity: &[u32]) -> Option<f64> {
        let n = model.traffic.vm_count();
        let h = model.topo.host_count();
        let mut best: Option<f64> = None;
        let mut hosts = vec![0u32; n as usize];
        loop {
            let p = Placement::new(h, hosts.clone()).unwrap();
            if p.counts().iter().zip(capacity).all(|(c, k)| c <= k) {
                let c = model.total_cost(&p);
                best = Some(best.map_or(c, |b: f64| b.min(c)));
            }
            let mut i = 0;
            loop {
                if i == hosts.len() {
                    return best;
                }
                hosts[i] += 1;
                if hosts[i] < h {
                    break;
                }
                hosts[i] = 0;
                i += 1;
            }
        }
    }

    #[test]
    fn pairs_share_hosts_when_they_fit() {
        // Two racks of two hosts, two slots each: the two chatty pairs
        // each get a host; the weak link crosses to the other host of
        // the rack.
        let t = tree(&[2, 2]);
        let tr = Traffic::from_triples(4, [(0, 1, 5.0), (2, 3, 5.0), (1, 2, 1.0)]).unwrap();
        let m = CostModel::new(&t, &tr);
        let o = optimum(&m, &[2, 2, 2, 2], None, 1_000_000).unwrap();
        assert!(o.proven);
        // The 1-2 pair at level 1 (W = 1), counted twice.
        assert_eq!(o.cost, 2.0);
        let p = &o.placement;
        assert_eq!(p.host(0), p.host(1));
        assert_eq!(p.host(2), p.host(3));
        assert_eq!(t.level(p.host(1), p.host(2)), 1);
    }

    #[test]
    fn capacity_is_enforced_and_bad_input_refused() {
        let t = tree(&[2, 2]);
        let tr = Traffic::from_triples(3, [(0, 1, 1.0), (1, 2, 1.0)]).unwrap();
        let m = CostModel::new(&t, &tr);
        // One slot per host: a rack holds two of the chain 0-1-2, the
        // third pair crosses the racks.
        let o = optimum(&m, &[1, 1, 1, 1], None, 1_000_000).unwrap();
        assert_eq!(o.cost, 2.0 * (1.0 + t.weights().cumulative(2)));
        assert!(o.placement.counts().iter().all(|&c| c <= 1));
        assert!(matches!(
            optimum(&m, &[1, 1], None, 10),
            Err(OptimumError::CapacityLength { given: 2, hosts: 4 })
        ));
        assert!(matches!(
            optimum(&m, &[1, 0, 0, 1], None, 10),
            Err(OptimumError::NoFit { vms: 3, slots: 2 })
        ));
        let wrong = Placement::new(4, vec![0, 1]).unwrap();
        assert!(matches!(
            optimum(&m, &[1, 1, 1, 1], Some(&wrong), 10),
            Err(OptimumError::Mismatch { .. })
        ));
    }

    #[test]
    fn pairs_end_on_one_host() {
        let topo = tree(&[2, 2, 2]);
        // Four chatty pairs scattered over the pods.
        let t = Traffic::from_triples(8, [(0, 4, 10.0), (1, 5, 10.0), (2, 6, 10.0), (3, 7, 10.0)])
            .unwrap();
        let m = CostModel::new(&topo, &t);
        let start = Placement::new(8, (0..8).collect()).unwrap();
        let o = optimum(&m, &[2; 8], Some(&start), 1_000_000).unwrap();
        assert!(o.proven);
        assert_eq!(o.cost, 0.0);
        assert!(o.placement.counts().iter().all(|&c| c <= 2));
        for (a, b) in [(0, 4), (1, 5), (2, 6), (3, 7)] {
            assert_eq!(o.placement.host(a), o.placement.host(b));
        }
    }

    #[test]
    fn matches_enumeration_on_small_trees() {
        // A deterministic pseudo-random family of traffic matrices.
        let mut x = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        // Uneven: racks of 1, 2 and 3 hosts in two pods.
        let uneven = Topology::from_toml_str(
            "[[children]]\n[[children.children]]\nhosts = [\"10.0.0.1\"]\n\
             [[children.children]]\nhosts = [\"10.0.0.2\", \"10.0.0.3\"]\n\
             [[children]]\n[[children.children]]\n\
             hosts = [\"10.0.1.1\", \"10.0.1.2\", \"10.0.1.3\"]\n",
        )
        .unwrap();
        for case in 0..40 {
            let topo = match case % 4 {
                0 => tree(&[2, 2, 2]),
                1 => tree(&[2, 3]),
                2 => tree(&[3]),
                _ => uneven.clone(),
            };
            let hosts = topo.host_count();
            let n = 4 + (next() % 3) as u32;
            // Half the cases with one capacity everywhere, half mixed.
            let capacity: Vec<u32> = if case % 2 == 0 {
                vec![1 + (case % 3) as u32; hosts as usize]
            } else {
                (0..hosts).map(|_| (next() % 4) as u32).collect()
            };
            let mut triples = Vec::new();
            for u in 0..n {
                for v in u + 1..n {
                    if next() % 3 == 0 {
                        triples.push((u, v, (next() % 100) as f64 / 7.0));
                    }
                }
            }
            let t = Traffic::from_triples(n, triples).unwrap();
            let m = CostModel::new(&topo, &t);
            let Some(want) = enumerate(&m, &capacity) else {
                assert!(matches!(
                    optimum(&m, &capacity, None, u64::MAX),
                    Err(OptimumError::NoFit { .. })
                ));
                continue;
            };
            let start: Vec<HostId> = (0..n).map(|u| u % hosts).collect();
            let start = Placement::new(hosts, start).unwrap();
            for start in [None, Some(&start)] {
                let o = optimum(&m, &capacity, start, u64::MAX).unwrap();
                assert!(o.proven);
                assert!(lower_bound(&m, &capacity) <= want * (1.0 + 1e-12) + 1e-12);
                assert!(
                    (o.cost - want).abs() <= 1e-9 * want.max(1.0),
                    "case {case}: {} vs enumeration {want}",
                    o.cost
                );
                assert!(
                    o.placement
                        .counts()
                        .iter()
                        .zip(&capacity)
                        .all(|(c, k)| c <= k)
                );
            }
        }
    }

    #[test]
    fn node_limit_gives_the_polished_start_and_a_bound() {
        let topo = tree(&[2, 2, 2]);
        let t = Traffic::from_triples(8, [(0, 4, 10.0), (1, 5, 10.0), (0, 1, 1.0)]).unwrap();
        let m = CostModel::new(&topo, &t);
        let start = Placement::new(8, (0..8).collect()).unwrap();
        let o = optimum(&m, &[2; 8], Some(&start), 1).unwrap();
        assert!(!o.proven);
        assert!(o.cost <= m.total_cost(&start));
        assert!(o.lower_bound <= o.cost);
        // Two slots: 0 has room for one peer on its host (4, the heavier),
        // so (0,1) is at least at rack level, from either side: 2 * 1.0 * W(1).
        assert_eq!(o.lower_bound, 2.0);
        // Local search alone joins each chatty pair but cannot bring the
        // two pairs together (that takes two moves, each one worse):
        // (0,1) stays across pods.
        assert_eq!(o.cost, 2.0 * topo.weights().cumulative(3));
        // With room to search, the pairs end in one rack.
        let o = optimum(&m, &[2; 8], Some(&start), 300_000).unwrap();
        assert!(o.proven);
        assert_eq!(o.cost, 2.0);
    }
}
