//! The exact optimum of small instances, by exhaustive search: the lowest
//! equation 1 total over every placement that respects each host's
//! capacity. A yardstick for the decisions and the simulator's baselines
//! (8 VMs on 6 hosts is a few milliseconds).
//!
//! Depth-first over the VMs, busiest first, each on every host with room;
//! the cost of the pairs already placed only grows as more VMs are placed
//! (every term is >= 0), so a branch whose partial cost reaches the best
//! total so far is cut. The answer is exact: a cut branch cannot beat the
//! best.

use crate::cost::{CostError, CostModel, Placement, VmIdx};
use crate::topology::HostId;

/// Errors from [`brute_force`].
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
    /// The search visited more nodes than allowed.
    #[error("search stopped after {visited} nodes (budget {budget})")]
    OverBudget {
        /// Nodes visited.
        visited: u64,
        /// The budget given.
        budget: u64,
    },
    /// The placement found was refused by the cost model (not expected).
    #[error("cost model: {0}")]
    Cost(#[from] CostError),
}

/// The optimum of an instance.
#[derive(Debug, Clone, PartialEq)]
pub struct Optimum {
    /// Its equation 1 total ([`CostModel::total_cost`], each pair twice).
    pub cost: f64,
    /// A placement that has it (the first found in search order).
    pub placement: Placement,
    /// Search nodes visited (placements of one VM).
    pub visited: u64,
}

/// The lowest [`CostModel::total_cost`] over all placements of the model's
/// VMs on its topology's hosts with at most `capacity[h]` VMs on host h.
/// Stops with [`OptimumError::OverBudget`] after `budget` search nodes.
pub fn brute_force(
    model: &CostModel<'_>,
    capacity: &[u32],
    budget: u64,
) -> Result<Optimum, OptimumError> {
    let hosts = model.topo.host_count();
    if capacity.len() != hosts as usize {
        return Err(OptimumError::CapacityLength {
            given: capacity.len(),
            hosts,
        });
    }
    let t = model.traffic;
    let n = t.vm_count();
    let slots: u64 = capacity.iter().map(|&c| u64::from(c)).sum();
    if u64::from(n) > slots {
        return Err(OptimumError::NoFit { vms: n, slots });
    }
    // Busiest first: their pairs make the partial cost grow early.
    let mut order: Vec<VmIdx> = (0..n).collect();
    order.sort_by(|&a, &b| t.load(b).total_cmp(&t.load(a)).then(a.cmp(&b)));
    let mut s = Search {
        model,
        order,
        left: capacity.to_vec(),
        host_of: vec![None; n as usize],
        best: f64::INFINITY,
        best_hosts: None,
        visited: 0,
        budget,
    };
    s.go(0, 0.0)?;
    let hosts_of = s.best_hosts.unwrap_or_default();
    let placement = Placement::new(hosts, hosts_of)?;
    // Recompute in the model's own order so callers compare bit for bit.
    let cost = model.total_cost(&placement);
    Ok(Optimum {
        cost,
        placement,
        visited: s.visited,
    })
}

struct Search<'a, 'm> {
    model: &'a CostModel<'m>,
    order: Vec<VmIdx>,
    left: Vec<u32>,
    host_of: Vec<Option<HostId>>,
    best: f64,
    best_hosts: Option<Vec<HostId>>,
    visited: u64,
    budget: u64,
}

impl Search<'_, '_> {
    fn go(&mut self, i: usize, partial: f64) -> Result<(), OptimumError> {
        if i == self.order.len() {
            if partial < self.best {
                self.best = partial;
                self.best_hosts = Some(self.host_of.iter().map(|h| h.unwrap_or(0)).collect());
            }
            return Ok(());
        }
        let u = self.order[i];
        let topo = self.model.topo;
        for h in 0..topo.host_count() {
            if self.left[h as usize] == 0 {
                continue;
            }
            self.visited += 1;
            if self.visited > self.budget {
                return Err(OptimumError::OverBudget {
                    visited: self.visited,
                    budget: self.budget,
                });
            }
            // Pairs with the VMs already placed, each counted twice (eq. 1).
            let added: f64 = self
                .model
                .traffic
                .neighbours(u)
                .iter()
                .filter_map(|z| self.host_of[z.vm as usize].map(|hz| z.rate * topo.weight(h, hz)))
                .sum();
            let cost = partial + 2.0 * added;
            if cost >= self.best {
                continue;
            }
            self.left[h as usize] -= 1;
            self.host_of[u as usize] = Some(h);
            let r = self.go(i + 1, cost);
            self.host_of[u as usize] = None;
            self.left[h as usize] += 1;
            r?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Traffic;
    use crate::topology::{LinkWeights, Topology};
    use std::net::Ipv4Addr;

    fn topo(fanout: &[u32]) -> Topology {
        Topology::regular(
            fanout,
            LinkWeights::paper_truncated(fanout.len()),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    #[test]
    fn pairs_share_hosts_when_they_fit() {
        // Two racks of two hosts, one slot each... two slots each: the two
        // chatty pairs each get a host; the weak link crosses the racks.
        let t = topo(&[2, 2]);
        let tr = Traffic::from_triples(4, [(0, 1, 5.0), (2, 3, 5.0), (1, 2, 1.0)]).unwrap();
        let m = CostModel::new(&t, &tr);
        let o = brute_force(&m, &[2, 2, 2, 2], 1_000_000).unwrap();
        // Best: {0,1} on one host, {2,3} on a host of the same rack: the
        // 1-2 pair at level 1 (W = 1), counted twice.
        assert_eq!(o.cost, 2.0);
        let p = &o.placement;
        assert_eq!(p.host(0), p.host(1));
        assert_eq!(p.host(2), p.host(3));
        assert_eq!(t.level(p.host(1), p.host(2)), 1);
    }

    #[test]
    fn capacity_and_budget_are_enforced() {
        let t = topo(&[2, 2]);
        let tr = Traffic::from_triples(3, [(0, 1, 1.0), (1, 2, 1.0)]).unwrap();
        let m = CostModel::new(&t, &tr);
        // One slot per host: a rack holds two of the chain 0-1-2, the
        // third pair crosses the racks.
        let o = brute_force(&m, &[1, 1, 1, 1], 1_000_000).unwrap();
        assert_eq!(o.cost, 2.0 * (1.0 + t.weights().cumulative(2)));
        assert!(o.placement.counts().iter().all(|&c| c <= 1));
        assert!(matches!(
            brute_force(&m, &[1, 1], 10),
            Err(OptimumError::CapacityLength { given: 2, hosts: 4 })
        ));
        assert!(matches!(
            brute_force(&m, &[1, 0, 0, 1], 10),
            Err(OptimumError::NoFit { vms: 3, slots: 2 })
        ));
        assert!(matches!(
            brute_force(&m, &[1, 1, 1, 1], 2),
            Err(OptimumError::OverBudget { .. })
        ));
    }
}
