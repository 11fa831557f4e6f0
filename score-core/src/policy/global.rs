//! Centralised global token policy (paper §II): the token goes to the VM
//! whose migration saves the most, recomputed after every move.
//!
//! This needs global knowledge (every VM's traffic and placement, every
//! host's free capacity), which is why the paper calls it not scalable: the
//! ranking is computed by the policy's owner, the simulator or the agent's
//! coordinator that collects flow reports, with [`rank_by_saving`], and fed
//! to the policy with [`TokenPolicy::feed_ranking`] before each hand-off.

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use super::TokenPolicy;
use super::round_robin::next_in_order;
use crate::cost::{CostModel, Placement, Traffic, VmIdx};
use crate::decision::{Capacity, Decision, MigrationCost, Rule, plan};
use crate::token::{Token, VmId};
use crate::topology::{HostId, Topology};
use crate::wire::FlowEntry;

/// A VM and the saving of the move it would make now.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ranked {
    /// The VM.
    pub vm: VmIdx,
    /// The benefit of its move: the drop of the equation 1 total.
    pub saving: f64,
    /// Where it would move.
    pub to: HostId,
}

/// The move `u` would make if it held the token now: the decision of
/// [`plan`] and [`Plan::decide`](crate::decision::Plan::decide) with `rule`,
/// `cm`, and `capacity` as the hosts' answers. `None` if it would stay.
pub fn best_move(
    model: &CostModel<'_>,
    placement: &Placement,
    u: VmIdx,
    rule: Rule,
    cm: MigrationCost,
    mem_need_mb: u64,
    capacity: impl FnMut(HostId) -> Option<Capacity>,
) -> Option<Ranked> {
    let peers = model.peers(placement, u);
    let p = plan(model.topo, u, placement.host(u), &peers);
    match p.decide(rule, cm, mem_need_mb, capacity) {
        Decision::Migrate { to, benefit, .. } => Some(Ranked {
            vm: u,
            saving: benefit,
            to,
        }),
        Decision::Stay { .. } => None,
    }
}

/// Every VM that would migrate now, ranked by the saving of its move,
/// largest first, ties to the lower VM index. The saving is that of the move
/// the VM would make under `rule` (with [`Rule::BestBenefit`], its best
/// achievable one). `mem_need_mb(u)` is u's memory; `capacity(h)` host h's
/// free room. Costs one [`plan`] per VM: recomputing it after every move is
/// what makes the global policy expensive.
pub fn rank_by_saving(
    model: &CostModel<'_>,
    placement: &Placement,
    rule: Rule,
    cm: MigrationCost,
    mem_need_mb: impl Fn(VmIdx) -> u64,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
) -> Vec<Ranked> {
    let mut out: Vec<Ranked> = (0..model.traffic.vm_count())
        .filter_map(|u| best_move(model, placement, u, rule, cm, mem_need_mb(u), &mut capacity))
        .collect();
    out.sort_by(|a, b| b.saving.total_cmp(&a.saving).then(a.vm.cmp(&b.vm)));
    out
}

/// The VM IDs of a ranking, in order (for [`TokenPolicy::feed_ranking`];
/// in the simulator a VM's index is its ID).
pub fn ranking_ids(ranking: &[Ranked]) -> Vec<VmId> {
    ranking.iter().map(|r| r.vm).collect()
}

/// Follows the ranking fed by its owner: the first ranked VM that is in the
/// token and is not the current holder. Each ranking is used once; with no
/// fresh ranking (or none usable: nothing would migrate), it falls back to
/// round-robin order so the token still visits every VM.
#[derive(Debug, Clone, Default)]
pub struct GlobalPolicy {
    ranking: Option<Vec<VmId>>,
}

impl GlobalPolicy {
    /// A global policy without a ranking yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Whether a ranking has been fed since the last choice.
    pub fn has_ranking(&self) -> bool {
        self.ranking.is_some()
    }
}

impl TokenPolicy for GlobalPolicy {
    fn name(&self) -> &'static str {
        "global"
    }

    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId> {
        let ranked = self.ranking.take().and_then(|r| {
            r.into_iter()
                .find(|&id| Some(id) != current && token.get(id).is_some())
        });
        ranked.or_else(|| next_in_order(token, current))
    }

    fn needs_global_knowledge(&self) -> bool {
        true
    }

    fn feed_ranking(&mut self, ranking: Vec<VmId>) {
        self.ranking = Some(ranking);
    }
}

/// What every host offers, as the coordinator assumes it: the same
/// `[node]` table on every host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostShape {
    /// VMs a host may run.
    pub vm_slots: u32,
    /// A host's memory, MiB.
    pub memory_mib: u64,
    /// One VM's memory, MiB.
    pub vm_memory_mib: u64,
}

/// The coordinator's order (paper §II, the global policy): from every
/// host's last flow report (`reports`: the reporting host's address and
/// its entries; an entry whose peer is its VM only says the VM runs
/// there), every VM ranked by the saving of its best move, largest first,
/// then every other located VM in ID order, so the token still visits all.
/// Peers whose host never reported are left out (their place is unknown);
/// a pair reported by both its hosts counts at the mean of the two rates.
/// Deterministic for a given input: the agent's coordinator and the
/// protocol's [`Node`](crate::proto::Node) share it.
pub fn order_from_reports<'a>(
    topo: &Topology,
    reports: impl IntoIterator<Item = (Ipv4Addr, &'a [FlowEntry])>,
    rule: Rule,
    cm: MigrationCost,
    shape: HostShape,
) -> Vec<VmId> {
    let mut host_of: BTreeMap<VmId, Ipv4Addr> = BTreeMap::new();
    let mut triples = Vec::new();
    for (host, entries) in reports {
        for e in entries {
            host_of.insert(e.vm, host);
            if e.peer != e.vm {
                triples.push((e.vm, e.peer, e.rate));
            }
        }
    }
    // Dense indices in VM ID order.
    let located: Vec<VmId> = host_of.keys().copied().collect();
    if located.is_empty() {
        return Vec::new();
    }
    let index: HashMap<VmId, u32> = located
        .iter()
        .enumerate()
        .map(|(i, v)| (*v, i as u32))
        .collect();
    // Each report gives λ from one side: halve when both sides reported.
    let mut lam: BTreeMap<(u32, u32), (f64, u32)> = BTreeMap::new();
    for (a, b, r) in triples {
        let (Some(&i), Some(&j)) = (index.get(&a), index.get(&b)) else {
            continue;
        };
        let k = if i < j { (i, j) } else { (j, i) };
        let e = lam.entry(k).or_default();
        e.0 += r;
        e.1 += 1;
    }
    let triples = lam
        .into_iter()
        .map(|((i, j), (r, n))| (i, j, r / f64::from(n)));
    let Ok(traffic) = Traffic::from_triples(located.len() as u32, triples) else {
        return located;
    };
    let hosts: Vec<HostId> = located
        .iter()
        .map(|v| {
            host_of
                .get(v)
                .and_then(|h| topo.host_by_addr(*h))
                .unwrap_or(0)
        })
        .collect();
    let Ok(placement) = Placement::new(topo.host_count(), hosts) else {
        return located;
    };
    let model = CostModel::new(topo, &traffic);
    let ranking = rank_by_saving(
        &model,
        &placement,
        rule,
        cm,
        |_| shape.vm_memory_mib,
        |h| {
            let used = u64::from(placement.count(h));
            Some(Capacity {
                free_slots: u64::from(shape.vm_slots).saturating_sub(used) as u32,
                free_mem_mb: shape.memory_mib.saturating_sub(used * shape.vm_memory_mib),
            })
        },
    );
    let mut order: Vec<VmId> = ranking.iter().map(|r| located[r.vm as usize]).collect();
    let ranked: std::collections::BTreeSet<VmId> = order.iter().copied().collect();
    order.extend(located.iter().filter(|v| !ranked.contains(v)));
    order
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::LinkWeights;

    fn entry(vm: u32, peer: u32, rate: f64) -> FlowEntry {
        FlowEntry { vm, peer, rate }
    }

    /// Four hosts, two racks: VM 1 on host a talks to VM 3 on host c
    /// (across the core); VM 2 (host b) talks to no one.
    #[test]
    fn the_order_puts_the_movers_first_then_every_vm_by_id() {
        let topo = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let [a, b, c, _d] = [0, 1, 2, 3].map(|h| topo.host_addr(h));
        let ra = [entry(1, 1, 0.0), entry(1, 3, 1000.0)];
        let rb = [entry(2, 2, 0.0)];
        let rc = [entry(3, 3, 0.0), entry(3, 1, 1000.0)];
        let shape = HostShape {
            vm_slots: 2,
            memory_mib: 4096,
            vm_memory_mib: 256,
        };
        let order = order_from_reports(
            &topo,
            [(a, &ra[..]), (b, &rb[..]), (c, &rc[..])],
            Rule::default(),
            MigrationCost::Absolute(0.0),
            shape,
        );
        assert_eq!(order.len(), 3, "{order:?}");
        assert!(order[0] == 1 || order[0] == 3, "a mover first: {order:?}");
        assert_eq!(order[2], 2, "the VM with no saving last: {order:?}");
        // No room anywhere: nothing would move, ID order.
        let full = HostShape {
            vm_slots: 1,
            ..shape
        };
        let order = order_from_reports(
            &topo,
            [(a, &ra[..]), (b, &rb[..]), (c, &rc[..])],
            Rule::default(),
            MigrationCost::Absolute(0.0),
            full,
        );
        assert_eq!(order, vec![1, 2, 3]);
        assert!(
            order_from_reports(
                &topo,
                [],
                Rule::default(),
                MigrationCost::Absolute(0.0),
                shape
            )
            .is_empty()
        );
    }
}
