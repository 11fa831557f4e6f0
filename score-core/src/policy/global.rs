//! Centralised global token policy (paper §II): the token goes to the VM
//! whose migration saves the most, recomputed after every move.
//!
//! This needs global knowledge (every VM's traffic and placement, every
//! host's free capacity), which is why the paper calls it not scalable: the
//! ranking is computed by the policy's owner, the simulator or the agent's
//! coordinator that collects flow reports, with [`rank_by_saving`], and fed
//! to the policy with [`TokenPolicy::feed_ranking`] before each hand-off.

use super::TokenPolicy;
use super::round_robin::next_in_order;
use crate::cost::{CostModel, Placement, VmIdx};
use crate::decision::{Capacity, Decision, MigrationCost, Rule, plan};
use crate::token::{Token, VmId};
use crate::topology::HostId;

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
