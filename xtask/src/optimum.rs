//! The best centralised answer for a small data centre: the placement of
//! minimum equation-1 cost for a given traffic matrix, within every host's
//! slot capacity, found by exact branch and bound. The demo prints it beside
//! the cost the agents reach; it uses nothing but score-core's types and cost
//! model, so the lead's end-to-end test can use the same function (moved
//! into a library if it needs to).
//!
//! Search: VMs with traffic are placed one at a time, most connected to the
//! already placed first. For each unplaced VM u and each host h the search
//! keeps `a[u][h]`, the cost u's placed peers would cost if u went to h; the
//! bound is the exact cost among placed VMs plus, for every unplaced VM, its
//! cheapest host with room. Hosts are tried cheapest first. Empty hosts that
//! are interchangeable (the tree is the same seen from either) are tried
//! once: an empty host is used only if it is the first host of the largest
//! empty group around it, and that group is the first empty one among its
//! siblings (for a tree whose groups at each level are all the same size;
//! otherwise only hosts of one rack count as interchangeable).

use score_core::cost::{CostModel, Placement, Traffic, VmIdx};

/// Search nodes the demo and `testbed status --cost` allow: the default
/// data centre (16 VMs) needs about 1,200; 32 VMs on 16 hosts need about
/// 13 million to prove (5 s in a release build, 2 min in a debug one), so
/// larger trees get the best found and a lower bound instead.
pub const NODE_LIMIT: u64 = 300_000;

/// How a result reads: "optimal" or "best found, optimum >= bound".
pub fn describe(o: &Optimum) -> String {
    if o.proven {
        format!("optimal, {} search nodes", o.nodes)
    } else {
        format!(
            "best found in {} search nodes; the optimum is at least {:.3} MB/s x W",
            o.nodes,
            o.lower_bound / 1e6
        )
    }
}
use score_core::topology::{HostId, Topology};

/// Errors of the search.
#[derive(Debug, thiserror::Error)]
pub enum OptimumError {
    /// More VMs than slots.
    #[error("{vms} VMs do not fit {hosts} hosts of {slots} slots")]
    NoRoom {
        /// VMs to place.
        vms: u32,
        /// Hosts of the topology.
        hosts: u32,
        /// Slots per host.
        slots: u32,
    },
    /// The starting placement does not match the traffic or the topology.
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
}

/// The result of [`optimum`].
#[derive(Debug, Clone)]
pub struct Optimum {
    /// Equation 1 total of [`Optimum::placement`] (each pair counted twice).
    pub cost: f64,
    /// A placement of that cost, within capacity.
    pub placement: Placement,
    /// Whether the search finished (the cost is the optimum) or stopped at
    /// the node limit (the cost is the best found).
    pub proven: bool,
    /// A lower bound on the optimum: `cost` when proven, else
    /// [`lower_bound`].
    pub lower_bound: f64,
    /// Search nodes visited.
    pub nodes: u64,
}

struct Search<'a> {
    topo: &'a Topology,
    slots: u32,
    /// VMs with traffic, in placement order.
    order: Vec<VmIdx>,
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
    regular: bool,
    best_cost: f64,
    best: Vec<HostId>,
    nodes: u64,
    node_limit: u64,
    stopped: bool,
}

/// The minimum-cost placement of `traffic` on `topo` with at most `slots`
/// VMs per host, starting from `start` (its cost is the first incumbent).
/// Stops after `node_limit` search nodes with the best placement found.
pub fn optimum(
    topo: &Topology,
    traffic: &Traffic,
    slots: u32,
    start: &Placement,
    node_limit: u64,
) -> Result<Optimum, OptimumError> {
    let n = traffic.vm_count();
    if start.vm_count() != n || start.host_count() != topo.host_count() {
        return Err(OptimumError::Mismatch {
            placement: start.vm_count(),
            hosts: start.host_count(),
            traffic: n,
            topo_hosts: topo.host_count(),
        });
    }
    if u64::from(n) > u64::from(topo.host_count()) * u64::from(slots) {
        return Err(OptimumError::NoRoom {
            vms: n,
            hosts: topo.host_count(),
            slots,
        });
    }
    let model = CostModel::new(topo, traffic);
    let start_fits = start.counts().iter().all(|&c| c <= slots);
    // Placement order: start from the busiest VM, then always the VM with
    // the most traffic to those already ordered (ties: busier, lower id).
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
    let hosts = topo.host_count() as usize;
    let depth = topo.depth();
    let occupancy: Vec<Vec<u32>> = (1..depth)
        .map(|l| vec![0; topo.group_count(l) as usize])
        .collect();
    let regular = (1..depth).all(|l| {
        let size = topo.group_hosts(l, 0).len();
        (0..topo.group_count(l)).all(|g| topo.group_hosts(l, g).len() == size)
    });
    let tail = tail_bounds(topo, traffic, slots, &order, &pos);
    let mut s = Search {
        topo,
        slots,
        order,
        fwd,
        hosts,
        a: vec![0.0; m * hosts],
        tail,
        count: vec![0; hosts],
        occupancy,
        host_at: vec![0; m],
        regular,
        best_cost: f64::INFINITY,
        best: Vec::new(),
        nodes: 0,
        node_limit,
        stopped: false,
    };
    // The incumbent: the start placement polished by local search, in
    // per-pair units; a good one early prunes most of the tree.
    if start_fits {
        let mut p = start.clone();
        polish(&model, &mut p, slots);
        s.best_cost = model.total_cost_pairs(&p);
        s.best = s.order.iter().map(|&u| p.host(u)).collect();
    }
    s.branch(0, 0.0);
    // Lay out: searched VMs where the best says, the rest (no traffic) in
    // the first free slots.
    let mut host_of = vec![HostId::MAX; n as usize];
    let mut count = vec![0u32; hosts];
    if s.best.len() == s.order.len() {
        for (k, &u) in s.order.iter().enumerate() {
            host_of[u as usize] = s.best[k];
            count[s.best[k] as usize] += 1;
        }
    }
    let mut h = 0usize;
    for slot in host_of.iter_mut().filter(|x| **x == HostId::MAX) {
        while count[h] >= slots {
            h += 1;
        }
        *slot = h as HostId;
        count[h] += 1;
    }
    let placement = Placement::new(topo.host_count(), host_of).map_err(|_| {
        // Cannot happen: every host index above is < hosts.
        OptimumError::NoRoom {
            vms: n,
            hosts: topo.host_count(),
            slots,
        }
    })?;
    let cost = model.total_cost(&placement);
    let proven = !s.stopped;
    Ok(Optimum {
        cost,
        placement,
        proven,
        lower_bound: if proven {
            cost
        } else {
            lower_bound(topo, traffic, slots)
        },
        nodes: s.nodes,
    })
}

/// For each k, a lower bound on the per-pair cost of the pairs between VMs
/// at positions k.. of `order`: half the sum, over those VMs, of each one's
/// cost to its peers in that set packed heaviest first at the lowest level
/// with room (each pair is seen from both ends, hence half). Empty slots
/// are assumed everywhere, which only loosens the bound.
fn tail_bounds(
    topo: &Topology,
    traffic: &Traffic,
    slots: u32,
    order: &[VmIdx],
    pos: &[usize],
) -> Vec<f64> {
    let room = room_by_level(topo, slots);
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
            sum += packed_cost(topo, &room, &mut rates);
        }
        *t = sum / 2.0;
    }
    tail
}

/// Room around a VM within each level: the other VMs that fit in the
/// largest group at that level (`slots - 1` on its host, ...).
fn room_by_level(topo: &Topology, slots: u32) -> Vec<u64> {
    (0..=topo.depth())
        .map(|l| {
            let largest = (0..topo.group_count(l))
                .map(|g| topo.group_hosts(l, g).len() as u64)
                .max()
                .unwrap_or(1);
            (largest * u64::from(slots)).saturating_sub(1)
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
fn polish(model: &CostModel<'_>, p: &mut Placement, slots: u32) {
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
                if p.count(y) < slots && best.is_none_or(|b| du < b.0) {
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

/// A lower bound on the equation-1 total of any placement within `slots`
/// per host: each VM on its own, with its peers, heaviest first, at the
/// lowest level that still has room around it (a host holds `slots - 1`
/// others, a rack `slots × hosts - 1`, ...). Each VM's term of equation 1 is
/// at least that, whatever the others do.
pub fn lower_bound(topo: &Topology, traffic: &Traffic, slots: u32) -> f64 {
    let room = room_by_level(topo, slots);
    let mut rates: Vec<f64> = Vec::new();
    (0..traffic.vm_count())
        .map(|u| {
            rates.clear();
            rates.extend(traffic.neighbours(u).iter().map(|z| z.rate));
            packed_cost(topo, &room, &mut rates)
        })
        .sum()
}

impl Search<'_> {
    fn branch(&mut self, k: usize, partial: f64) {
        self.nodes += 1;
        if self.nodes > self.node_limit {
            self.stopped = true;
            return;
        }
        if k == self.order.len() {
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
            .filter(|&h| self.count[h as usize] < self.slots)
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
            + (k..self.order.len())
                .map(|j| {
                    let row = &self.a[j * self.hosts..(j + 1) * self.hosts];
                    row.iter()
                        .enumerate()
                        .filter(|(h, _)| self.count[*h] < self.slots)
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
        // The largest empty group around h, below the root.
        let top = if self.regular {
            depth - 1
        } else {
            1.min(depth - 1)
        };
        let mut e = 0u8;
        while e < top && self.empty(e + 1, t.group_of(h, e + 1)) {
            e += 1;
        }
        let g = t.group_of(h, e);
        if t.group_hosts(e, g).start != h {
            return false;
        }
        // ... and the first empty group among its siblings. For e == 0 the
        // siblings are the hosts of its rack, interchangeable in any tree.
        if e > 0 && !self.regular {
            return true;
        }
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
    use score_core::topology::LinkWeights;
    use std::net::Ipv4Addr;

    fn tree(fanout: &[u32]) -> Topology {
        Topology::regular(
            fanout,
            LinkWeights::paper_truncated(fanout.len()),
            Ipv4Addr::new(198, 18, 0, 1),
        )
        .unwrap()
    }

    /// Every placement within capacity, for checking on tiny cases.
    fn brute_force(topo: &Topology, t: &Traffic, slots: u32) -> f64 {
        let n = t.vm_count();
        let h = topo.host_count();
        let model = CostModel::new(topo, t);
        let mut best = f64::INFINITY;
        let mut hosts = vec![0u32; n as usize];
        loop {
            let p = Placement::new(h, hosts.clone()).unwrap();
            if p.counts().iter().all(|&c| c <= slots) {
                best = best.min(model.total_cost(&p));
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
    fn pairs_end_on_one_host() {
        let topo = tree(&[2, 2, 2]);
        // Four chatty pairs scattered over the pods.
        let t = Traffic::from_triples(8, [(0, 4, 10.0), (1, 5, 10.0), (2, 6, 10.0), (3, 7, 10.0)])
            .unwrap();
        let start = Placement::new(8, (0..8).collect()).unwrap();
        let o = optimum(&topo, &t, 2, &start, 1_000_000).unwrap();
        assert!(o.proven);
        assert_eq!(o.cost, 0.0);
        assert!(o.placement.counts().iter().all(|&c| c <= 2));
        for (a, b) in [(0, 4), (1, 5), (2, 6), (3, 7)] {
            assert_eq!(o.placement.host(a), o.placement.host(b));
        }
    }

    #[test]
    fn matches_brute_force_on_small_trees() {
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
        for case in 0..15 {
            let topo = match case % 3 {
                0 => tree(&[2, 2, 2]),
                1 => tree(&[2, 3]),
                _ => uneven.clone(),
            };
            let n = 5 + (case % 2) as u32;
            let slots = 1 + (case % 2) as u32;
            let mut triples = Vec::new();
            for u in 0..n {
                for v in u + 1..n {
                    if next() % 3 == 0 {
                        triples.push((u, v, (next() % 100) as f64));
                    }
                }
            }
            let t = Traffic::from_triples(n, triples).unwrap();
            let start: Vec<HostId> = (0..n).map(|u| u % topo.host_count()).collect();
            let start = Placement::new(topo.host_count(), start).unwrap();
            if start.counts().iter().any(|&c| c > slots) {
                continue;
            }
            let o = optimum(&topo, &t, slots, &start, 10_000_000).unwrap();
            let want = brute_force(&topo, &t, slots);
            assert!(o.proven);
            assert!(lower_bound(&topo, &t, slots) <= want * (1.0 + 1e-12));
            assert!(
                (o.cost - want).abs() <= 1e-9 * want.max(1.0),
                "case {case}: {} vs brute force {want}",
                o.cost
            );
            assert!(o.placement.counts().iter().all(|&c| c <= slots));
        }
    }

    #[test]
    fn node_limit_gives_the_polished_start_and_a_bound() {
        let topo = tree(&[2, 2, 2]);
        let t = Traffic::from_triples(8, [(0, 4, 10.0), (1, 5, 10.0), (0, 1, 1.0)]).unwrap();
        let start = Placement::new(8, (0..8).collect()).unwrap();
        let o = optimum(&topo, &t, 2, &start, 1).unwrap();
        assert!(!o.proven);
        assert!(o.cost <= CostModel::new(&topo, &t).total_cost(&start));
        assert!(o.lower_bound <= o.cost);
        // Two slots: 0 has room for one peer on its host (4, the heavier),
        // so (0,1) is at least at rack level, from either side: 2 * 1.0 * W(1).
        assert_eq!(o.lower_bound, 2.0);
        // Local search alone joins each chatty pair but cannot bring the
        // two pairs together (that takes two moves, each one worse):
        // (0,1) stays across pods.
        let w3 = topo.weights().cumulative(3);
        assert_eq!(o.cost, 2.0 * w3);
        // With room to search, the pairs end in one rack.
        let o = optimum(&topo, &t, 2, &start, NODE_LIMIT).unwrap();
        assert!(o.proven);
        assert_eq!(o.cost, 2.0);
    }

    /// The planned traffic of a testbed, as score-core's matrix, and the
    /// testbed's topology and initial placement.
    fn planned(sizes: &crate::testbed::Sizes) -> (Topology, Traffic, Placement) {
        let state = crate::testbed::planned_state(sizes);
        let topo = crate::testbed::topology_of(&state).unwrap();
        let rates = crate::traffic::Rates {
            pattern: crate::traffic::Pattern::Pairs,
            group_size: 4,
            chatty: 200_000,
            background: 10_000,
            background_peers: 2,
        };
        let flows = crate::traffic::plan(&state, &rates);
        let idx = |a| state.vms.iter().position(|v| v.address == a).unwrap() as u32;
        let t = Traffic::from_triples(
            state.vms.len() as u32,
            flows
                .iter()
                .map(|f| (idx(f.src), idx(f.dst), f.rate as f64)),
        )
        .unwrap();
        let p = Placement::new(
            topo.host_count(),
            state
                .vms
                .iter()
                .map(|v| state.host_index(&v.initial_host).unwrap() as HostId)
                .collect(),
        )
        .unwrap();
        (topo, t, p)
    }

    #[test]
    fn default_demo_traffic_is_proven_quickly() {
        let sizes = crate::testbed::Sizes {
            pods: 2,
            racks_per_pod: 2,
            hosts_per_rack: 2,
            vms_per_host: 2,
            slots: 4,
        };
        let (topo, t, p) = planned(&sizes);
        let o = optimum(&topo, &t, 4, &p, NODE_LIMIT).unwrap();
        assert!(o.proven, "{} nodes", o.nodes);
        // Every chatty pair shares a host in an optimal placement.
        assert!(o.cost < CostModel::new(&topo, &t).total_cost(&p) / 50.0);
    }

    /// How many nodes 32 VMs on 16 hosts take (run with --ignored
    /// --nocapture, in release).
    #[test]
    #[ignore = "a measurement, slow in debug builds"]
    fn nodes_for_32_vms() {
        let sizes = crate::testbed::Sizes {
            pods: 2,
            racks_per_pod: 2,
            hosts_per_rack: 4,
            vms_per_host: 2,
            slots: 4,
        };
        let (topo, t, p) = planned(&sizes);
        let started = std::time::Instant::now();
        let o = optimum(&topo, &t, 4, &p, 100_000_000).unwrap();
        eprintln!(
            "32 VMs: cost {} proven {} nodes {} lower bound {} in {:?}",
            o.cost,
            o.proven,
            o.nodes,
            lower_bound(&topo, &t, 4),
            started.elapsed()
        );
    }

    #[test]
    fn refuses_what_cannot_fit() {
        let topo = tree(&[2, 2]);
        let t = Traffic::from_triples(5, []).unwrap();
        let start = Placement::new(4, vec![0, 0, 1, 2, 3]).unwrap();
        assert!(matches!(
            optimum(&topo, &t, 1, &start, 10),
            Err(OptimumError::NoRoom { .. })
        ));
    }
}
