//! The communication cost model (paper §II, equation 1) over a whole data
//! centre: a sparse symmetric traffic matrix, a placement of VMs on hosts,
//! and the costs and incremental cost changes the simulator and the global
//! policy need.
//!
//! VMs are dense indices [`VmIdx`] `0..vm_count`. In the simulator a VM's
//! index is also its [`VmId`](crate::token::VmId); the agent maps IPv4 IDs to
//! indices itself.
//!
//! Conventions (docs/EVALUATION.md, "Model conventions"):
//! - λ(u,v) is all traffic between u and v, both directions summed, so
//!   [`Traffic`] is symmetric; self traffic is dropped.
//! - Equation 1 is taken literally: [`CostModel::total_cost`] sums, for every
//!   VM u, the cost of each of its peers, so every unordered pair counts
//!   twice. [`CostModel::total_cost_pairs`] is the per-pair figure (half).
//!   With that reading, the benefit of equation 2 is exactly the drop in
//!   [`CostModel::total_cost`] ([`CostModel::move_delta`] is its negation).

use crate::decision::Peer;
use crate::topology::{HostId, LinkWeights, Topology};

/// A VM as a dense index `0..vm_count`.
pub type VmIdx = u32;

/// Errors from building a traffic matrix or a placement.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum CostError {
    /// A traffic triple names a VM outside `0..vm_count`.
    #[error("vm {vm} out of range (vm count {vm_count})")]
    VmOutOfRange {
        /// The offending index.
        vm: VmIdx,
        /// The number of VMs.
        vm_count: u32,
    },
    /// A rate is negative, NaN or infinite.
    #[error("rate between vm {u} and vm {v} is {rate}: rates must be finite and >= 0")]
    BadRate {
        /// One end of the pair.
        u: VmIdx,
        /// The other end.
        v: VmIdx,
        /// The value found.
        rate: f64,
    },
    /// A placement puts a VM on a host the topology does not have.
    #[error("vm {vm} placed on host {host}, but there are only {host_count} hosts")]
    HostOutOfRange {
        /// The VM.
        vm: VmIdx,
        /// The host it was placed on.
        host: HostId,
        /// The number of hosts.
        host_count: u32,
    },
}

/// The cost of one unit-time of traffic `rate` at communication `level`:
/// `rate × W(level)` (one term of equation 1).
#[inline]
pub fn pair_cost(weights: &LinkWeights, rate: f64, level: u8) -> f64 {
    rate * weights.cumulative(level)
}

/// One peer of a VM in a [`Traffic`] matrix.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Neighbour {
    /// The peer VM.
    pub vm: VmIdx,
    /// λ(u, vm), both directions summed; always > 0.
    pub rate: f64,
}

/// A sparse symmetric traffic matrix in compressed rows: for each VM its
/// peers sorted by index, with their rates.
#[derive(Debug, Clone, PartialEq)]
pub struct Traffic {
    /// Row `u` is `nbrs[offsets[u]..offsets[u + 1]]`.
    offsets: Vec<usize>,
    nbrs: Vec<Neighbour>,
    loads: Vec<f64>,
}

impl Traffic {
    /// Builds the matrix from `(u, v, rate)` triples: the rates of (u,v) and
    /// (v,u) and of repeated triples are summed, self traffic (u == v) and
    /// zero rates are dropped.
    pub fn from_triples(
        vm_count: u32,
        triples: impl IntoIterator<Item = (VmIdx, VmIdx, f64)>,
    ) -> Result<Self, CostError> {
        let mut pairs: Vec<(VmIdx, VmIdx, f64)> = Vec::new();
        for (u, v, rate) in triples {
            for vm in [u, v] {
                if vm >= vm_count {
                    return Err(CostError::VmOutOfRange { vm, vm_count });
                }
            }
            if !(rate.is_finite() && rate >= 0.0) {
                return Err(CostError::BadRate { u, v, rate });
            }
            if u != v && rate > 0.0 {
                pairs.push((u.min(v), u.max(v), rate));
            }
        }
        pairs.sort_by_key(|&(a, b, _)| (a, b));
        let mut merged: Vec<(VmIdx, VmIdx, f64)> = Vec::with_capacity(pairs.len());
        for (a, b, r) in pairs {
            match merged.last_mut() {
                Some(last) if last.0 == a && last.1 == b => last.2 += r,
                _ => merged.push((a, b, r)),
            }
        }
        let n = vm_count as usize;
        let mut degree = vec![0usize; n];
        for &(a, b, _) in &merged {
            degree[a as usize] += 1;
            degree[b as usize] += 1;
        }
        let mut offsets = Vec::with_capacity(n + 1);
        let mut acc = 0;
        offsets.push(0);
        for d in &degree {
            acc += d;
            offsets.push(acc);
        }
        let mut fill = offsets[..n].to_vec();
        let mut nbrs = vec![Neighbour { vm: 0, rate: 0.0 }; acc];
        for &(a, b, r) in &merged {
            nbrs[fill[a as usize]] = Neighbour { vm: b, rate: r };
            fill[a as usize] += 1;
            nbrs[fill[b as usize]] = Neighbour { vm: a, rate: r };
            fill[b as usize] += 1;
        }
        let mut loads = Vec::with_capacity(n);
        for u in 0..n {
            let row = &mut nbrs[offsets[u]..offsets[u + 1]];
            // Rows come out sorted from the (a, b) order; sort anyway, it is cheap.
            row.sort_by_key(|x| x.vm);
            loads.push(row.iter().map(|x| x.rate).sum());
        }
        Ok(Traffic {
            offsets,
            nbrs,
            loads,
        })
    }

    /// Number of VMs (rows), including VMs without traffic.
    pub fn vm_count(&self) -> u32 {
        (self.offsets.len() - 1) as u32
    }

    /// Number of communicating unordered pairs.
    pub fn pair_count(&self) -> usize {
        self.nbrs.len() / 2
    }

    /// The peers of `u`, sorted by index. Panics if `u` is out of range.
    #[inline]
    pub fn neighbours(&self, u: VmIdx) -> &[Neighbour] {
        let u = u as usize;
        &self.nbrs[self.offsets[u]..self.offsets[u + 1]]
    }

    /// λ(u, v), 0 when they do not talk.
    pub fn rate(&self, u: VmIdx, v: VmIdx) -> f64 {
        let row = self.neighbours(u);
        match row.binary_search_by_key(&v, |x| x.vm) {
            Ok(i) => row[i].rate,
            Err(_) => 0.0,
        }
    }

    /// Aggregate load of `u`: all its traffic, in and out (Σ_v λ(u, v)).
    #[inline]
    pub fn load(&self, u: VmIdx) -> f64 {
        self.loads[u as usize]
    }

    /// Every communicating unordered pair once, as `(u, v, λ)` with u < v.
    pub fn pairs(&self) -> impl Iterator<Item = (VmIdx, VmIdx, f64)> + '_ {
        (0..self.vm_count()).flat_map(move |u| {
            self.neighbours(u)
                .iter()
                .filter(move |x| x.vm > u)
                .map(move |x| (u, x.vm, x.rate))
        })
    }
}

/// Where every VM runs: VM index -> host, with the number of VMs per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    host_of: Vec<HostId>,
    counts: Vec<u32>,
}

impl Placement {
    /// A placement of `host_of.len()` VMs on `host_count` hosts.
    pub fn new(host_count: u32, host_of: Vec<HostId>) -> Result<Self, CostError> {
        let mut counts = vec![0u32; host_count as usize];
        for (vm, &host) in host_of.iter().enumerate() {
            match counts.get_mut(host as usize) {
                Some(c) => *c += 1,
                None => {
                    return Err(CostError::HostOutOfRange {
                        vm: vm as VmIdx,
                        host,
                        host_count,
                    });
                }
            }
        }
        Ok(Placement { host_of, counts })
    }

    /// Number of VMs.
    pub fn vm_count(&self) -> u32 {
        self.host_of.len() as u32
    }

    /// Number of hosts.
    pub fn host_count(&self) -> u32 {
        self.counts.len() as u32
    }

    /// The host of `u`. Panics if `u` is out of range.
    #[inline]
    pub fn host(&self, u: VmIdx) -> HostId {
        self.host_of[u as usize]
    }

    /// Every VM's host, indexed by VM.
    pub fn hosts(&self) -> &[HostId] {
        &self.host_of
    }

    /// Number of VMs on host `h`. Panics if `h` is out of range.
    #[inline]
    pub fn count(&self, h: HostId) -> u32 {
        self.counts[h as usize]
    }

    /// Number of VMs on every host, indexed by host.
    pub fn counts(&self) -> &[u32] {
        &self.counts
    }

    /// Moves `u` to `to` and returns its previous host. Capacity is the
    /// caller's business. Panics if `u` or `to` is out of range.
    pub fn move_vm(&mut self, u: VmIdx, to: HostId) -> HostId {
        let from = self.host_of[u as usize];
        // Index `to` first so that an out-of-range host leaves no trace.
        self.counts[to as usize] += 1;
        self.counts[from as usize] -= 1;
        self.host_of[u as usize] = to;
        from
    }
}

/// Equation 1 over a topology and a traffic matrix, for any placement.
#[derive(Debug, Clone, Copy)]
pub struct CostModel<'a> {
    /// The data-centre tree and its weights.
    pub topo: &'a Topology,
    /// The traffic between VMs.
    pub traffic: &'a Traffic,
}

impl<'a> CostModel<'a> {
    /// Ties a topology to a traffic matrix.
    pub fn new(topo: &'a Topology, traffic: &'a Traffic) -> Self {
        CostModel { topo, traffic }
    }

    /// C(u) = Σ_z λ(u,z)·W(ℓ(u,z)): the cost of `u`'s traffic.
    pub fn vm_cost(&self, p: &Placement, u: VmIdx) -> f64 {
        let x = p.host(u);
        self.traffic
            .neighbours(u)
            .iter()
            .map(|z| z.rate * self.topo.weight(x, p.host(z.vm)))
            .sum()
    }

    /// Equation 1 literally: Σ_u C(u). Every unordered pair counts twice.
    pub fn total_cost(&self, p: &Placement) -> f64 {
        (0..self.traffic.vm_count())
            .map(|u| self.vm_cost(p, u))
            .sum()
    }

    /// The per-pair total: each unordered pair once (half of
    /// [`total_cost`](Self::total_cost)).
    pub fn total_cost_pairs(&self, p: &Placement) -> f64 {
        self.traffic
            .pairs()
            .map(|(u, v, r)| r * self.topo.weight(p.host(u), p.host(v)))
            .sum()
    }

    /// Change of [`total_cost`](Self::total_cost) if `u` moved to `to`:
    /// 2·Σ_z λ(u,z)·(W(ℓ(to, z)) − W(ℓ(now, z))). Negative is a saving; it
    /// is minus the benefit of equation 2. Panics if `u` or `to` is out of
    /// range.
    pub fn move_delta(&self, p: &Placement, u: VmIdx, to: HostId) -> f64 {
        let x = p.host(u);
        if x == to {
            return 0.0;
        }
        let d: f64 = self
            .traffic
            .neighbours(u)
            .iter()
            .map(|z| {
                let hz = p.host(z.vm);
                z.rate * (self.topo.weight(to, hz) - self.topo.weight(x, hz))
            })
            .sum();
        2.0 * d
    }

    /// The sign of the exact change of [`total_cost`](Self::total_cost) if
    /// every `(vm, host)` of `moves` happened (a VM listed twice: its last
    /// host), computed without rounding: `Equal` only when the change is
    /// exactly zero. A check on the decisions, which compute benefits in
    /// floating point: a move whose exact change is zero (or positive)
    /// must never be taken. Panics if a VM or host is out of range.
    pub fn exact_change_sign(
        &self,
        p: &Placement,
        moves: &[(VmIdx, HostId)],
    ) -> std::cmp::Ordering {
        let after = |v: VmIdx| {
            moves
                .iter()
                .rev()
                .find(|&&(m, _)| m == v)
                .map_or(p.host(v), |&(_, h)| h)
        };
        let mut sum = ExactSum::default();
        let mut seen: Vec<VmIdx> = Vec::with_capacity(moves.len());
        for &(u, _) in moves {
            if seen.contains(&u) {
                continue;
            }
            seen.push(u);
            let (x, y) = (p.host(u), after(u));
            for z in self.traffic.neighbours(u) {
                // A pair of two moved VMs once, from the first of them.
                if seen.contains(&z.vm) && z.vm != u {
                    continue;
                }
                let (hz, hz_after) = (p.host(z.vm), after(z.vm));
                sum.add_product(z.rate, self.topo.weight(y, hz_after));
                sum.add_product(-z.rate, self.topo.weight(x, hz));
            }
        }
        sum.sign()
    }

    /// The highest level any of `u`'s traffic crosses (0 if it has none or
    /// all its peers share its host): what the token carries for `u`.
    pub fn vm_level(&self, p: &Placement, u: VmIdx) -> u8 {
        let x = p.host(u);
        self.traffic
            .neighbours(u)
            .iter()
            .map(|z| self.topo.level(x, p.host(z.vm)))
            .max()
            .unwrap_or(0)
    }

    /// Aggregate load of `u` (all its traffic, in and out).
    pub fn vm_load(&self, u: VmIdx) -> f64 {
        self.traffic.load(u)
    }

    /// `u`'s peers as the decision wants them (VM index as the VM ID).
    pub fn peers(&self, p: &Placement, u: VmIdx) -> Vec<Peer> {
        self.traffic
            .neighbours(u)
            .iter()
            .map(|z| Peer {
                id: z.vm,
                host: p.host(z.vm),
                rate: z.rate,
            })
            .collect()
    }

    /// Traffic per level, each unordered pair once: entry `l` is the sum of
    /// λ over pairs whose level is `l` (length `depth + 1`).
    pub fn rate_by_level(&self, p: &Placement) -> Vec<f64> {
        let mut out = vec![0.0; usize::from(self.topo.depth()) + 1];
        for (u, v, r) in self.traffic.pairs() {
            out[usize::from(self.topo.level(p.host(u), p.host(v)))] += r;
        }
        out
    }
}

/// A sum of floating-point numbers kept exactly, as a list of parts that
/// do not overlap in their bits, smallest first (Shewchuk's expansions,
/// "Adaptive Precision Floating-Point Arithmetic", 1997): adding a number
/// splits it and each part into the rounded sum and its exact error, so
/// no bit is ever lost (barring overflow).
#[derive(Debug, Default)]
struct ExactSum {
    parts: Vec<f64>,
}

impl ExactSum {
    fn add(&mut self, mut x: f64) {
        let mut kept = 0;
        for i in 0..self.parts.len() {
            let y = self.parts[i];
            // Knuth's two-sum: hi + lo == x + y exactly.
            let hi = x + y;
            let y_virtual = hi - x;
            let lo = (x - (hi - y_virtual)) + (y - y_virtual);
            if lo != 0.0 {
                self.parts[kept] = lo;
                kept += 1;
            }
            x = hi;
        }
        self.parts.truncate(kept);
        self.parts.push(x);
    }

    /// Adds a × b exactly: the rounded product and, by a fused
    /// multiply-add, its exact error.
    fn add_product(&mut self, a: f64, b: f64) {
        let p = a * b;
        self.add(p);
        self.add(a.mul_add(b, -p));
    }

    /// The sign of the exact sum: that of its largest non-zero part, which
    /// outweighs all the smaller ones together.
    fn sign(&self) -> std::cmp::Ordering {
        self.parts
            .iter()
            .rev()
            .find(|&&x| x != 0.0)
            .map_or(std::cmp::Ordering::Equal, |x| {
                if *x > 0.0 {
                    std::cmp::Ordering::Greater
                } else {
                    std::cmp::Ordering::Less
                }
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn exact_sums_lose_nothing() {
        let mut s = ExactSum::default();
        for x in [0.1, 0.2, -0.3] {
            s.add(x);
        }
        // 0.1 + 0.2 - 0.3 is 5.55e-17 in floating point, and not 0 in
        // binary either: the doubles nearest 0.1, 0.2 and 0.3 do not add up.
        assert_eq!(s.sign(), std::cmp::Ordering::Greater);
        let mut s = ExactSum::default();
        for x in [1e300, 1.0, -1e300, -1.0] {
            s.add(x);
        }
        assert_eq!(s.sign(), std::cmp::Ordering::Equal);
        let mut s = ExactSum::default();
        s.add_product(0.1, 3.0);
        s.add_product(-0.3, 1.0);
        // 3 × (double 0.1) is above the double 0.3.
        assert_eq!(s.sign(), std::cmp::Ordering::Greater);
        let mut s = ExactSum::default();
        s.add_product(0.1, 4.0);
        s.add_product(-0.4, 1.0);
        // 4 × (double 0.1) is the double 0.4: a power of two only shifts
        // the bits.
        assert_eq!(s.sign(), std::cmp::Ordering::Equal);
    }

    #[test]
    fn exact_change_sign_matches_the_totals() {
        let topo = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let t = Traffic::from_triples(4, [(0, 1, 0.1), (0, 2, 0.2), (2, 3, 0.3)]).unwrap();
        let m = CostModel::new(&topo, &t);
        let p = Placement::new(4, vec![0, 1, 2, 3]).unwrap();
        use std::cmp::Ordering::*;
        // 0 next to 1 (same host): cheaper.
        assert_eq!(m.exact_change_sign(&p, &[(0, 1)]), Less);
        assert_eq!(m.exact_change_sign(&p, &[]), Equal);
        // 0 and 1 both to host 1: their distances to each other and to
        // 2 are those they had.
        let q = Placement::new(4, vec![0, 0, 2, 3]).unwrap();
        assert_eq!(m.exact_change_sign(&q, &[(0, 1), (1, 1)]), Equal);
        // Moving there and back changes nothing.
        assert_eq!(m.exact_change_sign(&p, &[(0, 3), (0, 0)]), Equal);
        // The pair 2-3 together on host 3, and 0 with it: compare with
        // the totals, which are exact here up to rounding.
        let moves = [(2, 3), (0, 3)];
        let mut r = p.clone();
        for &(v, h) in &moves {
            r.move_vm(v, h);
        }
        let d = m.total_cost(&r) - m.total_cost(&p);
        assert_eq!(
            m.exact_change_sign(&p, &moves),
            d.partial_cmp(&0.0).unwrap()
        );
    }

    #[test]
    fn traffic_is_symmetric_and_sums_both_directions() {
        let t = Traffic::from_triples(
            4,
            [
                (0, 1, 2.0),
                (1, 0, 3.0),
                (2, 2, 9.0),
                (3, 1, 0.0),
                (0, 1, 1.0),
            ],
        )
        .unwrap();
        assert_eq!(t.vm_count(), 4);
        assert_eq!(t.pair_count(), 1);
        assert_eq!(t.rate(0, 1), 6.0);
        assert_eq!(t.rate(1, 0), 6.0);
        assert_eq!(t.neighbours(1), &[Neighbour { vm: 0, rate: 6.0 }]);
        assert!(t.neighbours(2).is_empty());
        assert!(t.neighbours(3).is_empty());
        assert_eq!(t.load(0), 6.0);
        assert_eq!(t.pairs().collect::<Vec<_>>(), [(0, 1, 6.0)]);
    }

    #[test]
    fn traffic_rejects_bad_input() {
        assert_eq!(
            Traffic::from_triples(2, [(0, 2, 1.0)]),
            Err(CostError::VmOutOfRange { vm: 2, vm_count: 2 })
        );
        assert!(matches!(
            Traffic::from_triples(2, [(0, 1, -1.0)]),
            Err(CostError::BadRate { u: 0, v: 1, .. })
        ));
        assert!(matches!(
            Traffic::from_triples(2, [(0, 1, f64::INFINITY)]),
            Err(CostError::BadRate { .. })
        ));
    }

    #[test]
    fn rows_are_sorted() {
        let t =
            Traffic::from_triples(5, [(4, 2, 1.0), (2, 0, 1.0), (3, 2, 1.0), (2, 1, 1.0)]).unwrap();
        let ids: Vec<VmIdx> = t.neighbours(2).iter().map(|n| n.vm).collect();
        assert_eq!(ids, [0, 1, 3, 4]);
    }

    #[test]
    fn placement_counts_follow_moves() {
        assert_eq!(
            Placement::new(2, vec![0, 2]),
            Err(CostError::HostOutOfRange {
                vm: 1,
                host: 2,
                host_count: 2
            })
        );
        let mut p = Placement::new(3, vec![0, 0, 2]).unwrap();
        assert_eq!(p.counts(), [2, 0, 1]);
        assert_eq!(p.move_vm(1, 1), 0);
        assert_eq!(p.counts(), [1, 1, 1]);
        assert_eq!(p.host(1), 1);
        assert_eq!(p.hosts(), [0, 1, 2]);
    }

    #[test]
    fn move_to_own_host_changes_nothing() {
        let topo = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let t = Traffic::from_triples(2, [(0, 1, 3.0)]).unwrap();
        let p = Placement::new(4, vec![0, 3]).unwrap();
        let m = CostModel::new(&topo, &t);
        assert_eq!(m.move_delta(&p, 0, 0), 0.0);
        // Moving 0 next to 1: 2 * 3 * (W(0) - W(2)).
        assert_eq!(m.move_delta(&p, 0, 3), -6.0 * topo.weights().cumulative(2));
        assert_eq!(pair_cost(topo.weights(), 3.0, 1), 3.0);
    }
}
