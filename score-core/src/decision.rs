//! The migration decision for one VM (paper §II equation 2, §III-F).
//!
//! The holder of the token for VM u on host x calls [`plan`] with u's peers
//! (their hosts and rates λ(z,u), both directions summed). The plan holds u's
//! current cost and the candidate hosts in the paper's order (§III-F.3): the
//! hosts of u's peers, ranked by the communication cost of the peer that lives
//! there, λ(u,z)·W(ℓ(x, host(z))), highest first, ties to the lower peer VM
//! ID, each host once, x excluded. Every candidate y carries the cost u would
//! have there and its benefit `2·Σ_z λ(z,u)·(W(ℓ(x,z)) − W(ℓ(y,z)))`, which is
//! exactly the drop of the equation 1 total (each pair counted twice, see
//! [`crate::cost`]).
//!
//! [`Plan::decide`] then asks for the capacity of candidates, lazily, through a
//! callback (the agent asks hosts over the network), and applies a [`Rule`]:
//!
//! - [`Rule::PaperFirst`] walks the candidates in order and migrates to the
//!   first one whose benefit is strictly greater than c_m and which has room
//!   (a free slot and enough free memory). A full host (or one that does not
//!   answer: the callback returns `None`) is skipped and the walk goes on; a
//!   candidate whose benefit is not above c_m is skipped as well, *without*
//!   asking its capacity, since its answer could not change the outcome. So
//!   the result is the paper's ("repeated until a hypervisor with available
//!   capacity is found, the overall communication cost of moving to that
//!   hypervisor is reduced"), with fewer capacity requests.
//! - [`Rule::BestBenefit`] takes, among all candidates with room, the one with
//!   the largest benefit, if it is above c_m. It asks candidates in order of
//!   decreasing benefit (ties in candidate order) and stops at the first with
//!   room, which is the same answer as asking them all.
//!
//! A caller that gets capacity answers asynchronously (the agent) drives the
//! same walk step by step with [`Plan::decider`]: [`Decider::next_host`],
//! [`Decider::answer`], [`Decider::finish`].
//!
//! The paper's rule can leave a better host unused (it takes the first that
//! improves, not the best); best-benefit needs, in the worst case, as many
//! capacity answers but moves each VM further down in one step.
//!
//! c_m is [`MigrationCost::Absolute`], [`MigrationCost::FractionOfVmCost`]
//! (c_m = f × u's current cost) or [`MigrationCost::Traffic`] (the
//! migration's own traffic over the path to each candidate, to be repaid
//! within a horizon; [`crate::migcost`]). The test "benefit > c_m" is strict. A
//! negative c_m is taken as 0 (a move must never raise the total cost); a NaN
//! c_m never migrates.
//!
//! Costs are computed from per-level rate sums (peers grouped by host, then by
//! rack, pod, ... in one pass). Two hosts that cost u the same can still get
//! costs a few units in the last place apart (the same rates, added in
//! another order), and with c_m = 0 a VM would then move back and forth
//! between them on a "benefit" of 1e-13. So a candidate whose cost is within
//! a rounding margin of u's cost now ([`NOISE`] of the two costs) gets
//! exactly u's cost and a benefit of exactly 0 ([`price`]): equal costs
//! compare equal, and no rule moves on them, whatever c_m. The decisions
//! beyond the paper ([`crate::swap`], [`crate::chain`], [`crate::group`])
//! require the same margin. Planning costs O(P log P + C·depth·log P) for P
//! peers and C candidates.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::token::VmId;
use crate::topology::{HostId, Topology};

/// One peer z of the deciding VM u.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Peer {
    /// The peer's VM ID.
    pub id: VmId,
    /// The host it runs on.
    pub host: HostId,
    /// λ(z, u): all traffic between z and u, both directions summed.
    pub rate: f64,
}

/// What a candidate host answers to a capacity request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Capacity {
    /// How many more VMs it can host.
    pub free_slots: u32,
    /// Free memory for VMs, in MiB.
    pub free_mem_mb: u64,
}

impl Capacity {
    /// Whether a VM needing `mem_need_mb` MiB fits: one free slot and the memory.
    pub fn fits(&self, mem_need_mb: u64) -> bool {
        self.free_slots >= 1 && self.free_mem_mb >= mem_need_mb
    }
}

/// How [`Plan::decide`] chooses among candidates (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Rule {
    /// The paper's: the first candidate in order with room and benefit > c_m.
    #[default]
    PaperFirst,
    /// The candidate with room and the largest benefit, if above c_m.
    BestBenefit,
}

impl Rule {
    /// Every rule.
    pub const ALL: [Rule; 2] = [Rule::PaperFirst, Rule::BestBenefit];

    /// The rule's name in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Rule::PaperFirst => "paper-first",
            Rule::BestBenefit => "best-benefit",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Error parsing a [`Rule`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecisionError {
    /// The name is not one of the rules.
    #[error("unknown rule {0:?} (expected paper-first or best-benefit)")]
    UnknownRule(String),
}

impl FromStr for Rule {
    type Err = DecisionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Rule::ALL
            .into_iter()
            .find(|r| r.name() == s)
            .ok_or_else(|| DecisionError::UnknownRule(s.to_string()))
    }
}

/// The migration cost c_m of equation 2, in the unit of the benefit (the
/// drop of the equation 1 total). The paper's Fig. 2c sets c_m to a share of
/// the *overall* cost; a driver expresses that as `Absolute(f × total)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationCost {
    /// A fixed value, in the unit of the benefit (rate × weight).
    Absolute(f64),
    /// A fraction of the deciding VM's current cost C(u).
    FractionOfVmCost(f64),
    /// The migration's own traffic, repaid within a horizon: a move that
    /// sends `bytes` over a path of weight W(ℓ(x, y)) costs `bytes × W`
    /// once, and the benefit (a rate) must repay it within `horizon_s`
    /// seconds, so c_m = `bytes × W(ℓ(x, y)) / horizon_s`. It depends on the
    /// target: a move within a rack costs less than one across the core.
    /// [`crate::migcost`] estimates `bytes` from measured migrations.
    Traffic {
        /// Bytes the migration sends (memory and re-sent dirty pages).
        bytes: f64,
        /// Seconds within which the benefit must repay them.
        horizon_s: f64,
    },
}

impl Default for MigrationCost {
    /// c_m = 0, as in the paper's simulations (§IV-A).
    fn default() -> Self {
        MigrationCost::Absolute(0.0)
    }
}

impl MigrationCost {
    /// c_m for moving a VM whose current cost is `cost_before` over a path
    /// of weight `path_weight` (W(ℓ(from, to)), [`Candidate::path_weight`]);
    /// only [`MigrationCost::Traffic`] reads the path. Negative values are
    /// taken as 0, NaN stays NaN (and then nothing migrates); a horizon that
    /// is not > 0 gives NaN.
    pub fn threshold(self, cost_before: f64, path_weight: f64) -> f64 {
        let c = match self {
            MigrationCost::Absolute(a) => a,
            MigrationCost::FractionOfVmCost(f) => f * cost_before,
            MigrationCost::Traffic { bytes, horizon_s } => {
                if horizon_s > 0.0 {
                    bytes * path_weight / horizon_s
                } else {
                    f64::NAN
                }
            }
        };
        if c < 0.0 { 0.0 } else { c }
    }

    /// Whether c_m depends on the path ([`MigrationCost::Traffic`]); the
    /// others are one number per VM.
    pub fn by_path(self) -> bool {
        matches!(self, MigrationCost::Traffic { .. })
    }

    /// The same c_m scaled by `f` (a decaying schedule).
    pub fn scaled(self, f: f64) -> MigrationCost {
        match self {
            MigrationCost::Absolute(a) => MigrationCost::Absolute(a * f),
            MigrationCost::FractionOfVmCost(x) => MigrationCost::FractionOfVmCost(x * f),
            MigrationCost::Traffic { bytes, horizon_s } => MigrationCost::Traffic {
                bytes: bytes * f,
                horizon_s,
            },
        }
    }
}

/// A c_m that decays over the token's rounds (beyond the paper,
/// docs/EVALUATION.md): round r prices with c_m × max(`decay`^r, `floor`).
/// The token carries its round, so every holder knows the round's c_m;
/// large gains are made first, and the many small moves that later become
/// pointless are not made. [`CmDecay::CONSTANT`] (decay 1) is the paper's
/// constant c_m. score-sim's engine and the protocol's
/// [`Node`](crate::proto::Node) both price with [`CmDecay::at`].
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CmDecay {
    /// Factor per round; 1 (or more): constant.
    pub decay: f64,
    /// The floor, a fraction of the first round's c_m.
    pub floor: f64,
}

impl Default for CmDecay {
    fn default() -> Self {
        CmDecay::CONSTANT
    }
}

impl CmDecay {
    /// No decay: the paper's constant c_m.
    pub const CONSTANT: CmDecay = CmDecay {
        decay: 1.0,
        floor: 0.0,
    };

    /// Whether c_m stays what it is (decay 1 or more, or NaN).
    pub fn is_constant(self) -> bool {
        self.decay.is_nan() || self.decay >= 1.0
    }

    /// The factor of round `round`: max(`decay`^round, `floor`), 1 when
    /// constant. A negative decay counts as 0.
    pub fn factor(self, round: u32) -> f64 {
        if self.is_constant() {
            return 1.0;
        }
        self.decay
            .max(0.0)
            .powi(round.min(1 << 20) as i32)
            .max(self.floor)
    }

    /// Whether c_m has reached its floor by round `round` (a quiet round
    /// then means no later round would move anything either). Always true
    /// when constant.
    pub fn settled(self, round: u32) -> bool {
        self.is_constant() || self.factor(round) <= self.floor
    }

    /// The c_m of round `round`, from the first round's `cm`.
    pub fn at(self, cm: MigrationCost, round: u32) -> MigrationCost {
        if self.is_constant() {
            cm
        } else {
            cm.scaled(self.factor(round))
        }
    }
}

/// A candidate host for the deciding VM.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Candidate {
    /// The candidate host.
    pub host: HostId,
    /// The peer that made it a candidate (the most costly one living there).
    pub peer: VmId,
    /// That peer's communication cost now, λ(u,z)·W(ℓ(x, host)): the rank key.
    pub peer_cost: f64,
    /// C(u) if u ran on this host.
    pub cost_after: f64,
    /// 2·(C(u) now − C(u) there): the drop of the equation 1 total.
    pub benefit: f64,
    /// u's level if it ran on this host.
    pub level_after: u8,
    /// W(ℓ(x, host)): the weight of the path u's migration would cross
    /// (what [`MigrationCost::Traffic`] charges).
    pub path_weight: f64,
}

/// The costs of VM u now and on every candidate host, in the paper's order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    /// The deciding VM.
    pub vm: VmId,
    /// Its host now.
    pub host: HostId,
    /// C(u) now: Σ_z λ(z,u)·W(ℓ(x, z)).
    pub cost_before: f64,
    /// u's level now: the highest level its traffic crosses.
    pub level: u8,
    /// u's aggregate load: Σ_z λ(z,u).
    pub load: f64,
    /// Number of peers taken into account.
    pub peers_used: u32,
    /// Peers ignored: a rate that is zero, negative or not finite, a host
    /// that the topology does not have, or the VM itself.
    pub peers_ignored: u32,
    /// The candidate hosts, in the paper's order.
    pub candidates: Vec<Candidate>,
}

/// Why a VM stays where it is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "kebab-case")]
pub enum StayReason {
    /// It has no (usable) peer.
    NoPeers,
    /// All its peers run on its own host: it already costs nothing.
    AllPeersLocal,
    /// No candidate's benefit is above c_m (whatever their room).
    NotWorthIt {
        /// The largest benefit among the candidates.
        best_benefit: f64,
        /// The candidate that has it.
        best_host: HostId,
        /// The c_m it had to exceed.
        c_m: f64,
    },
    /// Some candidates' benefit is above c_m, but none of them has room (or
    /// answered).
    NoRoom {
        /// Capacity requests made (all refused).
        asked: u32,
        /// The c_m in force.
        c_m: f64,
    },
}

/// The outcome of equation 2 for one VM, with its numbers.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "decision", rename_all = "kebab-case")]
pub enum Decision {
    /// Migrate u from `from` to `to`.
    Migrate {
        /// The VM.
        vm: VmId,
        /// Its host now.
        from: HostId,
        /// The chosen host.
        to: HostId,
        /// C(u) now.
        cost_before: f64,
        /// C(u) on `to`.
        cost_after: f64,
        /// 2·(cost_before − cost_after): the drop of the equation 1 total.
        benefit: f64,
        /// The c_m it exceeded.
        c_m: f64,
        /// u's level on `to` (what the holder writes in the token).
        level_after: u8,
        /// Capacity requests made.
        asked: u32,
    },
    /// u stays on its host.
    Stay {
        /// The VM.
        vm: VmId,
        /// Its host.
        host: HostId,
        /// C(u) now.
        cost_before: f64,
        /// u's level now (what the holder writes in the token).
        level: u8,
        /// Why it stays.
        reason: StayReason,
    },
}

impl Decision {
    /// Whether nothing is to be done (u stays).
    pub fn is_noop(&self) -> bool {
        matches!(self, Decision::Stay { .. })
    }

    /// The destination host, if u migrates.
    pub fn target(&self) -> Option<HostId> {
        match *self {
            Decision::Migrate { to, .. } => Some(to),
            Decision::Stay { .. } => None,
        }
    }

    /// C(u) before the decision.
    pub fn cost_before(&self) -> f64 {
        match *self {
            Decision::Migrate { cost_before, .. } | Decision::Stay { cost_before, .. } => {
                cost_before
            }
        }
    }

    /// C(u) after the decision (unchanged when u stays).
    pub fn cost_after(&self) -> f64 {
        match *self {
            Decision::Migrate { cost_after, .. } => cost_after,
            Decision::Stay { cost_before, .. } => cost_before,
        }
    }

    /// The drop of the equation 1 total (0 when u stays).
    pub fn benefit(&self) -> f64 {
        match *self {
            Decision::Migrate { benefit, .. } => benefit,
            Decision::Stay { .. } => 0.0,
        }
    }

    /// u's level after the decision: what the holder writes in the token.
    pub fn level_after(&self) -> u8 {
        match *self {
            Decision::Migrate { level_after, .. } => level_after,
            Decision::Stay { level, .. } => level,
        }
    }
}

/// Peer rates summed per group at every level, groups in host order.
/// Shared with [`crate::swap`], which costs hosts outside the paper's
/// candidate set with the same sums (so equal costs are equal bit for bit).
pub(crate) struct LevelSums {
    /// `sums[l]`: (group at level l, Σ rate of peers in it), sorted by group.
    /// Levels 0..depth; the root's sum is `total`.
    sums: Vec<Vec<(u32, f64)>>,
    total: f64,
}

impl LevelSums {
    /// `hosts` sorted by host ID, one entry per host.
    fn new(topo: &Topology, hosts: Vec<(HostId, f64)>) -> Self {
        let depth = topo.depth();
        let mut sums = Vec::with_capacity(usize::from(depth));
        sums.push(hosts);
        // Host IDs are in tree order, so every group is a run of consecutive
        // entries: merging runs of the level below gives this level, and a
        // group with a single child gets that child's sum bit for bit.
        for l in 1..depth {
            let below = &sums[usize::from(l) - 1];
            let mut out: Vec<(u32, f64)> = Vec::with_capacity(below.len());
            for &(child, r) in below {
                // Any host of the child group tells its parent.
                let any_host = topo.group_hosts(l - 1, child).start;
                let g = topo.group_of(any_host, l);
                match out.last_mut() {
                    Some(last) if last.0 == g => last.1 += r,
                    _ => out.push((g, r)),
                }
            }
            sums.push(out);
        }
        // The root's sum from the level below too, so that when all peers
        // share one pod (say) the two sums are the same bits.
        let total = sums[usize::from(depth) - 1].iter().map(|&(_, r)| r).sum();
        LevelSums { sums, total }
    }

    /// Rate of peers at each level 0..=depth from host `y`, and `y`'s cost
    /// and level. S_l(y) is the sum in y's level-l group; peers at exactly
    /// level l are S_l − S_{l−1}.
    pub(crate) fn cost_at(&self, topo: &Topology, y: HostId) -> (f64, u8) {
        let depth = topo.depth();
        let w = topo.weights();
        let mut prev = self.lookup(0, y);
        let mut cost = 0.0;
        let mut level = 0u8;
        for l in 1..=depth {
            let s = if l == depth {
                self.total
            } else {
                self.lookup(l, topo.group_of(y, l))
            };
            let at_l = s - prev;
            if at_l > 0.0 {
                cost += w.cumulative(l) * at_l;
                level = l;
            }
            prev = s;
        }
        (cost, level)
    }

    /// The root's sum: the rates of all the peers.
    pub(crate) fn total(&self) -> f64 {
        self.total
    }

    fn lookup(&self, level: u8, group: u32) -> f64 {
        let v = &self.sums[usize::from(level)];
        match v.binary_search_by_key(&group, |&(g, _)| g) {
            Ok(i) => v[i].1,
            Err(_) => 0.0,
        }
    }
}

/// The share of the costs involved below which a change of the equation 1
/// total is rounding noise, not a benefit. Costs are sums of at most a few
/// thousand products, each rounded once: their error is many orders of
/// magnitude below this, and a real change this small is worth no
/// migration.
pub const NOISE: f64 = 1e-9;

/// The rounding margin of a change between costs whose magnitudes sum to
/// `costs`: [`NOISE`] of them.
pub(crate) fn noise_margin(costs: f64) -> f64 {
    NOISE * costs.abs()
}

/// u's cost on a candidate and its benefit (the drop of the equation 1
/// total, twice the drop of u's cost) when u's cost now is `before` and
/// there `after`: within the rounding margin, exactly `before` and 0.
pub(crate) fn price(before: f64, after: f64) -> (f64, f64) {
    let drop = before - after;
    if drop.abs() <= noise_margin(before.abs() + after.abs()) {
        (before, 0.0)
    } else {
        (after, 2.0 * drop)
    }
}

/// The peers [`plan`] takes into account (see there).
pub(crate) fn usable_peers<'a>(topo: &Topology, vm: VmId, peers: &'a [Peer]) -> Vec<&'a Peer> {
    let n_hosts = topo.host_count();
    peers
        .iter()
        .filter(|z| z.rate.is_finite() && z.rate > 0.0 && z.host < n_hosts && z.id != vm)
        .collect()
}

/// The per-level sums of usable peers' rates, and their total (the load).
pub(crate) fn level_sums(topo: &Topology, usable: &[&Peer]) -> (LevelSums, f64) {
    // Rates per host, sorted by host.
    let mut by_host: Vec<(HostId, f64)> = usable.iter().map(|z| (z.host, z.rate)).collect();
    by_host.sort_by_key(|&(h, _)| h);
    let mut merged: Vec<(HostId, f64)> = Vec::with_capacity(by_host.len());
    for (h, r) in by_host {
        match merged.last_mut() {
            Some(last) if last.0 == h => last.1 += r,
            _ => merged.push((h, r)),
        }
    }
    let load = merged.iter().map(|&(_, r)| r).sum();
    (LevelSums::new(topo, merged), load)
}

/// Computes u's cost now and its candidate hosts in the paper's order.
///
/// `vm` runs on `host`; `peers` are its peers with their hosts and rates.
/// Peers with a rate that is not a finite number > 0, with a host outside
/// the topology, or with `vm`'s own ID are ignored (and counted). Panics if
/// `host` is not a host of `topo`.
pub fn plan(topo: &Topology, vm: VmId, host: HostId, peers: &[Peer]) -> Plan {
    let n_hosts = topo.host_count();
    assert!(host < n_hosts, "deciding VM's host {host} not in topology");
    let usable = usable_peers(topo, vm, peers);
    let peers_ignored = (peers.len() - usable.len()) as u32;
    let (sums, load) = level_sums(topo, &usable);
    let (cost_before, level) = sums.cost_at(topo, host);

    // Candidate order: each peer's cost now, highest first, ties to lower ID.
    let w = topo.weights();
    let mut ranked: Vec<(f64, VmId, HostId)> = usable
        .iter()
        .filter(|z| z.host != host)
        .map(|z| {
            (
                z.rate * w.cumulative(topo.level(host, z.host)),
                z.id,
                z.host,
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // Each host once: a flag per entry of the per-host sums (sorted by host).
    let hosts = &sums.sums[0];
    let mut seen = vec![false; hosts.len()];
    let mut candidates = Vec::new();
    for (peer_cost, peer, y) in ranked {
        match hosts.binary_search_by_key(&y, |&(h, _)| h) {
            Ok(i) if !seen[i] => seen[i] = true,
            _ => continue,
        }
        let (cost_after, level_after) = sums.cost_at(topo, y);
        let (cost_after, benefit) = price(cost_before, cost_after);
        candidates.push(Candidate {
            host: y,
            peer,
            peer_cost,
            cost_after,
            benefit,
            level_after,
            path_weight: w.cumulative(topo.level(host, y)),
        });
    }
    Plan {
        vm,
        host,
        cost_before,
        level,
        load,
        peers_used: usable.len() as u32,
        peers_ignored,
        candidates,
    }
}

impl Plan {
    /// Indices of the candidates where u gains, largest benefit first (ties
    /// in candidate order): the order in which chains and rotations ask
    /// full hosts.
    pub(crate) fn gaining_best_first(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].benefit > 0.0)
            .collect();
        order.sort_by(|&a, &b| {
            self.candidates[b]
                .benefit
                .total_cmp(&self.candidates[a].benefit)
        });
        order
    }

    /// Applies equation 2 with `rule`: see the module documentation.
    /// `capacity(h)` is asked lazily, only for candidates whose benefit is
    /// above c_m, and `None` (no answer) counts as no room. For callers that
    /// cannot answer synchronously (the agent asks over the network), the
    /// same walk is available step by step with [`Plan::decider`].
    pub fn decide(
        &self,
        rule: Rule,
        cm: MigrationCost,
        mem_need_mb: u64,
        mut capacity: impl FnMut(HostId) -> Option<Capacity>,
    ) -> Decision {
        let mut d = self.decider(rule, cm, mem_need_mb);
        while let Some(h) = d.next_host() {
            d.answer(capacity(h));
        }
        d.finish()
    }

    /// Starts the decision of [`Plan::decide`] without a callback: ask
    /// [`Decider::next_host`] for the host whose capacity is needed, give
    /// its answer to [`Decider::answer`], and repeat until `next_host` is
    /// `None`; then [`Decider::finish`] gives the decision.
    pub fn decider(&self, rule: Rule, cm: MigrationCost, mem_need_mb: u64) -> Decider<'_> {
        let c_m_at = |i: usize| cm.threshold(self.cost_before, self.candidates[i].path_weight);
        let mut queue: Vec<usize> = (0..self.candidates.len())
            .filter(|&i| self.candidates[i].benefit > c_m_at(i))
            .collect();
        if rule == Rule::BestBenefit {
            // Stable: equal benefits keep the paper's order.
            queue.sort_by(|&a, &b| {
                self.candidates[b]
                    .benefit
                    .total_cmp(&self.candidates[a].benefit)
            });
        }
        // The c_m reported: the first asked candidate's (one number unless
        // c_m is priced by path).
        let c_m = match queue.first() {
            Some(&i) => c_m_at(i),
            None if self.candidates.is_empty() => cm.threshold(self.cost_before, 0.0),
            None => c_m_at(best_candidate(&self.candidates)),
        };
        Decider {
            plan: self,
            cm,
            c_m,
            mem_need_mb,
            queue,
            pos: 0,
            chosen: None,
        }
    }
}

/// A decision in progress: the capacity questions of [`Plan::decide`], one
/// at a time, for callers that get the answers asynchronously.
#[derive(Debug, Clone)]
pub struct Decider<'p> {
    plan: &'p Plan,
    cm: MigrationCost,
    /// What [`Decider::c_m`] reports.
    c_m: f64,
    mem_need_mb: u64,
    /// Indices of the candidates above c_m, in the order they are asked.
    queue: Vec<usize>,
    /// Questions answered so far.
    pos: usize,
    /// The candidate taken, once one had room.
    chosen: Option<usize>,
}

impl Decider<'_> {
    /// The host whose capacity is needed now; `None` once decided.
    pub fn next_host(&self) -> Option<HostId> {
        if self.chosen.is_some() {
            return None;
        }
        self.queue
            .get(self.pos)
            .map(|&i| self.plan.candidates[i].host)
    }

    /// The hosts that may still be asked, in order, starting with
    /// [`next_host`](Self::next_host) (a caller may prefetch them; answers
    /// must still be given in this order).
    pub fn pending_hosts(&self) -> impl Iterator<Item = HostId> + '_ {
        let from = if self.chosen.is_some() {
            self.queue.len()
        } else {
            self.pos
        };
        self.queue[from..]
            .iter()
            .map(|&i| self.plan.candidates[i].host)
    }

    /// The answer for [`next_host`](Self::next_host) (`None`: no answer,
    /// taken as no room). Ignored once decided.
    pub fn answer(&mut self, capacity: Option<Capacity>) {
        let Some(&i) = self.queue.get(self.pos) else {
            return;
        };
        if self.chosen.is_some() {
            return;
        }
        self.pos += 1;
        if capacity.is_some_and(|c| c.fits(self.mem_need_mb)) {
            self.chosen = Some(i);
        }
    }

    /// The c_m in force for this decision; with a c_m priced by path
    /// ([`MigrationCost::Traffic`]), the one of the first candidate asked
    /// (of the best one when none is asked).
    pub fn c_m(&self) -> f64 {
        self.c_m
    }

    /// The decision. Called before every question is answered, it decides
    /// with the answers so far (the unasked hosts count as full).
    pub fn finish(self) -> Decision {
        let p = self.plan;
        let c_m = self.c_m;
        let stay = |reason| Decision::Stay {
            vm: p.vm,
            host: p.host,
            cost_before: p.cost_before,
            level: p.level,
            reason,
        };
        if p.peers_used == 0 {
            return stay(StayReason::NoPeers);
        }
        if p.candidates.is_empty() {
            return stay(StayReason::AllPeersLocal);
        }
        if let Some(i) = self.chosen {
            let c = &p.candidates[i];
            return Decision::Migrate {
                vm: p.vm,
                from: p.host,
                to: c.host,
                cost_before: p.cost_before,
                cost_after: c.cost_after,
                benefit: c.benefit,
                c_m: self.cm.threshold(p.cost_before, c.path_weight),
                level_after: c.level_after,
                asked: self.pos as u32,
            };
        }
        if self.queue.is_empty() {
            let best = &p.candidates[best_candidate(&p.candidates)];
            return stay(StayReason::NotWorthIt {
                best_benefit: best.benefit,
                best_host: best.host,
                c_m,
            });
        }
        stay(StayReason::NoRoom {
            asked: self.pos as u32,
            c_m,
        })
    }
}

/// The first of the largest benefits, in candidate order (`candidates` is
/// not empty).
pub(crate) fn best_candidate(candidates: &[Candidate]) -> usize {
    let mut best = 0;
    for (i, c) in candidates.iter().enumerate().skip(1) {
        if c.benefit.total_cmp(&candidates[best].benefit) == Ordering::Greater {
            best = i;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::LinkWeights;
    use std::net::Ipv4Addr;

    #[test]
    fn c_m_decays_by_round_to_its_floor() {
        let d = CmDecay {
            decay: 0.5,
            floor: 0.1,
        };
        let cm = MigrationCost::Absolute(8.0);
        assert_eq!(d.at(cm, 0), MigrationCost::Absolute(8.0));
        assert_eq!(d.at(cm, 2), MigrationCost::Absolute(2.0));
        // 0.5^4 = 0.0625 is below the floor.
        assert_eq!(d.factor(4), 0.1);
        assert!(!d.settled(3) && d.settled(4) && d.settled(u32::MAX));
        assert_eq!(CmDecay::default(), CmDecay::CONSTANT);
        for c in [
            CmDecay::CONSTANT,
            CmDecay {
                decay: 2.0,
                floor: 0.0,
            },
        ] {
            assert!(c.is_constant() && c.settled(0));
            assert_eq!(c.at(cm, 7), cm);
        }
    }

    fn topo() -> Topology {
        Topology::regular(
            &[4, 4, 4, 4],
            LinkWeights::paper(),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap()
    }

    fn room(_: HostId) -> Option<Capacity> {
        Some(Capacity {
            free_slots: 1,
            free_mem_mb: 1024,
        })
    }

    #[test]
    fn cost_neutral_moves_have_exactly_zero_benefit() {
        let t = topo();
        // u on host 0 with z1 on host 0 and z2 on host 1 (same rack), equal
        // non-integer rates; z3 and z4 far away. Moving to host 1 swaps z1
        // and z2: mathematically no change, and it must be exactly 0 so that
        // c_m = 0 does not move u back and forth.
        let r = 0.1 + 0.2;
        let peers = [
            Peer {
                id: 1,
                host: 0,
                rate: r,
            },
            Peer {
                id: 2,
                host: 1,
                rate: r,
            },
            Peer {
                id: 3,
                host: 200,
                rate: 0.7,
            },
            Peer {
                id: 4,
                host: 17,
                rate: 1.3,
            },
        ];
        let p = plan(&t, 9, 0, &peers);
        let c = p.candidates.iter().find(|c| c.host == 1).unwrap();
        assert_eq!(c.benefit, 0.0);
        assert_eq!(c.cost_after, p.cost_before);
        // Only host 1 has room: u must stay, and host 1 is not even asked.
        let mut asked = Vec::new();
        let d = p.decide(Rule::BestBenefit, MigrationCost::default(), 0, |h| {
            asked.push(h);
            (h == 1).then_some(Capacity {
                free_slots: 1,
                free_mem_mb: 1,
            })
        });
        assert!(d.is_noop());
        assert!(!asked.contains(&1));
    }

    #[test]
    fn bad_peers_are_ignored_and_counted() {
        let t = topo();
        let peers = [
            Peer {
                id: 1,
                host: 5,
                rate: f64::NAN,
            },
            Peer {
                id: 2,
                host: 5,
                rate: -1.0,
            },
            Peer {
                id: 3,
                host: 9999,
                rate: 1.0,
            },
            Peer {
                id: 9,
                host: 5,
                rate: 1.0,
            },
            Peer {
                id: 4,
                host: 5,
                rate: 2.0,
            },
        ];
        let p = plan(&t, 9, 0, &peers);
        assert_eq!(p.peers_ignored, 4);
        assert_eq!(p.peers_used, 1);
        assert_eq!(p.load, 2.0);
        assert_eq!(p.candidates.len(), 1);
    }

    #[test]
    fn peers_sharing_a_host_make_one_candidate() {
        let t = topo();
        // Racks of 4, pods of 16, level-3 groups of 64 hosts. Two peers on
        // host 70 (level 4 from host 0), the costlier is id 8 (2 W(4)); one
        // on host 4 (level 2, W(2)).
        let peers = [
            Peer {
                id: 7,
                host: 70,
                rate: 1.0,
            },
            Peer {
                id: 8,
                host: 70,
                rate: 2.0,
            },
            Peer {
                id: 6,
                host: 4,
                rate: 1.0,
            },
        ];
        let p = plan(&t, 1, 0, &peers);
        let hosts: Vec<HostId> = p.candidates.iter().map(|c| c.host).collect();
        assert_eq!(hosts, [70, 4]);
        assert_eq!(p.candidates[0].peer, 8);
        assert_eq!(p.candidates[0].peer_cost, 2.0 * t.weights().cumulative(4));
        // On host 70 both peers are local and host 4 is at level 4: W(4).
        assert_eq!(p.candidates[0].cost_after, t.weights().cumulative(4));
        assert_eq!(p.candidates[0].level_after, 4);
    }

    #[test]
    fn negative_and_nan_migration_costs() {
        assert_eq!(MigrationCost::Absolute(-3.0).threshold(10.0, 5.0), 0.0);
        assert_eq!(
            MigrationCost::FractionOfVmCost(0.1).threshold(10.0, 5.0),
            1.0
        );
        assert!(
            MigrationCost::Absolute(f64::NAN)
                .threshold(1.0, 5.0)
                .is_nan()
        );
        let traffic = MigrationCost::Traffic {
            bytes: 1e9,
            horizon_s: 100.0,
        };
        assert_eq!(traffic.threshold(10.0, 3.0), 3e7);
        assert_eq!(traffic.threshold(99.0, 0.0), 0.0);
        let never = MigrationCost::Traffic {
            bytes: 1e9,
            horizon_s: 0.0,
        };
        assert!(never.threshold(10.0, 3.0).is_nan());
        assert_eq!(traffic.scaled(0.5).threshold(10.0, 3.0), 1.5e7);
        let t = topo();
        let p = plan(
            &t,
            1,
            0,
            &[Peer {
                id: 2,
                host: 255,
                rate: 1.0,
            }],
        );
        let d = p.decide(Rule::PaperFirst, MigrationCost::Absolute(f64::NAN), 0, room);
        assert!(d.is_noop());
        let d = p.decide(Rule::PaperFirst, MigrationCost::Absolute(-1.0), 0, room);
        assert_eq!(d.target(), Some(255));
    }

    #[test]
    fn a_traffic_c_m_charges_the_path_of_each_candidate() {
        let t = topo();
        // u on host 0; peer 1 across the core (host 70), peer 2 in the rack.
        let peers = [
            Peer {
                id: 1,
                host: 70,
                rate: 1.0,
            },
            Peer {
                id: 2,
                host: 1,
                rate: 0.9,
            },
        ];
        let p = plan(&t, 0, 0, &peers);
        let (far, near) = (&p.candidates[0], &p.candidates[1]);
        assert_eq!((far.host, near.host), (70, 1));
        assert_eq!(far.path_weight, t.weight(0, 70));
        assert_eq!(near.path_weight, t.weight(0, 1));
        let to = |k: f64| match p.decide(
            Rule::PaperFirst,
            MigrationCost::Traffic {
                bytes: k,
                horizon_s: 1.0,
            },
            0,
            room,
        ) {
            Decision::Migrate { to, c_m, .. } => Some((to, c_m)),
            Decision::Stay { .. } => None,
        };
        // Cheap bytes: the far host's larger benefit pays for the core.
        assert!(far.benefit > 0.1 * far.path_weight);
        assert_eq!(to(0.1), Some((70, 0.1 * far.path_weight)));
        // Dear bytes: crossing the core no longer pays; the rack still does.
        assert!(far.benefit < 0.5 * far.path_weight && near.benefit > 0.5 * near.path_weight);
        assert_eq!(to(0.5), Some((1, 0.5 * near.path_weight)));
        // Dearer still: nothing pays.
        assert_eq!(to(1e6), None);
    }

    #[test]
    fn decider_asks_step_by_step() {
        let t = topo();
        // Peers in three other racks, costliest first: hosts 255, 40, 5.
        let peers = [
            Peer {
                id: 2,
                host: 255,
                rate: 3.0,
            },
            Peer {
                id: 3,
                host: 40,
                rate: 2.0,
            },
            Peer {
                id: 4,
                host: 5,
                rate: 1.0,
            },
        ];
        let p = plan(&t, 1, 0, &peers);
        let mut d = p.decider(Rule::PaperFirst, MigrationCost::default(), 512);
        let improving: Vec<HostId> = d.pending_hosts().collect();
        assert_eq!(d.next_host(), Some(improving[0]));
        // First has no answer, second not enough memory, third fits.
        d.answer(None);
        d.answer(Some(Capacity {
            free_slots: 3,
            free_mem_mb: 100,
        }));
        let last = d.next_host();
        d.answer(Some(Capacity {
            free_slots: 1,
            free_mem_mb: 512,
        }));
        assert_eq!(d.next_host(), None);
        assert_eq!(d.pending_hosts().count(), 0);
        // Extra answers are ignored.
        d.answer(None);
        let dec = d.finish();
        assert_eq!(dec.target(), last);
        assert!(matches!(dec, Decision::Migrate { asked: 3, .. }));
        // Finishing early: the unasked hosts count as full.
        let d = p.decider(Rule::PaperFirst, MigrationCost::default(), 512);
        assert!(matches!(
            d.finish(),
            Decision::Stay {
                reason: StayReason::NoRoom { asked: 0, .. },
                ..
            }
        ));
    }

    #[test]
    fn decisions_serialize_for_export() {
        let t = topo();
        let p = plan(
            &t,
            1,
            0,
            &[Peer {
                id: 2,
                host: 0,
                rate: 1.0,
            }],
        );
        let d = p.decide(Rule::PaperFirst, MigrationCost::default(), 0, room);
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(
            json,
            r#"{"decision":"stay","vm":1,"host":0,"cost_before":0.0,"level":0,"reason":{"reason":"all-peers-local"}}"#
        );
    }

    #[test]
    fn rule_names_round_trip() {
        for r in Rule::ALL {
            assert_eq!(r.name().parse::<Rule>().unwrap(), r);
        }
        assert!("first".parse::<Rule>().is_err());
    }
}
