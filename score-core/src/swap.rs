//! Beyond the paper (docs/EVALUATION.md): decisions that escape the local optima where
//! the paper's rule stops once hosts are nearly full.
//!
//! The paper's rule moves one VM u, only to a host where one of its peers
//! lives, only if that host has room. Two extensions, each off by default
//! (a [`Scope::default`] gives exactly [`plan`] and [`Plan::decide`]):
//!
//! - **Wider candidate sets** ([`CandidateSet`]): besides the hosts of u's
//!   peers, every host in the racks ([`CandidateSet::PeerRacks`]) or pods
//!   ([`CandidateSet::PeerPods`]) of u's peers, or every host
//!   ([`CandidateSet::All`]). [`plan_with`] appends them after the paper's
//!   candidates, tier by tier (racks, then pods, ..., then the root), each
//!   tier in the order of the peer whose group brought the host in (the
//!   paper's order: peer cost now, highest first, ties to the lower ID),
//!   hosts of one group in ID order. A host that is in no group of any peer
//!   below the root costs u the most it can cost, so [`CandidateSet::All`]
//!   adds only hosts with a negative benefit: it changes no decision; it is
//!   there for completeness and for measurements.
//! - **Swaps**: u on x and w on y exchange hosts. The holder of u proposes
//!   a swap to a candidate y that is full (or, when c_m binds, to one where
//!   u's own gain is positive but not above c_m); the host y picks the
//!   partner w itself, from its own VMs, with only what it measures
//!   ([`choose_swap_partner`]): its VMs' peers and rates and where it
//!   believes those peers live. The benefit of a swap is exact: u's gain
//!   (its [`Candidate::benefit`], computed with w still on y), w's gain
//!   (computed with u still on x), minus the u–w pair's terms, which both
//!   gains count as going to level 0 while in fact the pair stays at level
//!   ℓ(x, y) (its two VMs trade places). A swap is two migrations, so it
//!   must beat c_m twice: c_m(u) + c_m(w), each as [`MigrationCost::threshold`]
//!   gives it for that VM; and it must beat that by more than a rounding
//!   margin (1e-9 of the two VMs' costs), so that a swap that changes
//!   nothing is never made on rounding noise.
//!
//! The holder's walk ([`ScopedDecider`], or [`decide_with`] with
//! callbacks) follows the [`Rule`]:
//!
//! - [`Rule::PaperFirst`]: candidates in plan order; for each whose benefit
//!   is above c_m, ask its capacity and migrate if it has room; if it has
//!   none (or does not answer), or if u's benefit is positive but not above
//!   c_m, ask it for a swap; the first migration or accepted swap wins.
//! - [`Rule::BestBenefit`]: candidates by decreasing benefit for u; the walk
//!   stops at the first host with room (the best migration, as without
//!   swaps) and takes, among that migration and the swaps offered by the
//!   full hosts asked before it, the one with the largest benefit net of
//!   its threshold (c_m for a migration, c_m(u) + c_m(w) for a swap).
//!
//! [`Scope::max_swap_asks`] bounds the swap requests of one decision.
//! With swaps off the walk *is* [`Decider`] on the plan of [`plan_with`].

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::cost::{CostModel, Placement, VmIdx};
use crate::decision::{
    Candidate, Capacity, Decider, Decision, MigrationCost, Peer, Plan, Rule, StayReason,
    best_candidate, level_sums, noise_margin, plan, price, usable_peers,
};
use crate::token::VmId;
use crate::topology::{HostId, Topology};

/// Which hosts are candidate destinations for the deciding VM u.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CandidateSet {
    /// The paper's: the hosts of u's peers.
    #[default]
    Paper,
    /// Also every host in the racks of u's peers.
    PeerRacks,
    /// Also every host in the racks and pods of u's peers.
    PeerPods,
    /// Every host.
    All,
}

impl CandidateSet {
    /// Every candidate set, narrowest first.
    pub const ALL: [CandidateSet; 4] = [
        CandidateSet::Paper,
        CandidateSet::PeerRacks,
        CandidateSet::PeerPods,
        CandidateSet::All,
    ];

    /// The name in configuration and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            CandidateSet::Paper => "paper",
            CandidateSet::PeerRacks => "peer-racks",
            CandidateSet::PeerPods => "peer-pods",
            CandidateSet::All => "all",
        }
    }

    /// The highest level of the groups whose hosts are added (0: none).
    fn widest_level(self, depth: u8) -> u8 {
        match self {
            CandidateSet::Paper => 0,
            CandidateSet::PeerRacks => 1.min(depth),
            CandidateSet::PeerPods => 2.min(depth),
            CandidateSet::All => depth,
        }
    }
}

impl fmt::Display for CandidateSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Errors of this module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwapError {
    /// The name is not one of the candidate sets.
    #[error("unknown candidate set {0:?} (expected paper, peer-racks, peer-pods or all)")]
    UnknownCandidateSet(String),
    /// The label is not a scope's (see [`Scope::label`]).
    #[error("unknown scope {0:?} (expected a candidate set, swap, or swap+<candidate set>)")]
    UnknownScope(String),
}

impl FromStr for CandidateSet {
    type Err = SwapError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        CandidateSet::ALL
            .into_iter()
            .find(|c| c.name() == s)
            .ok_or_else(|| SwapError::UnknownCandidateSet(s.to_string()))
    }
}

/// How far a decision looks beyond the paper's rule. The default is the
/// paper's: its candidates, no swaps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Scope {
    /// Candidate destinations.
    pub candidates: CandidateSet,
    /// Whether a full candidate is asked for a swap.
    pub swaps: bool,
    /// Most swap requests in one decision (`None`: as many as there are
    /// candidates to ask).
    pub max_swap_asks: Option<u32>,
}

impl Scope {
    /// The paper's rule: its candidates, no swaps.
    pub const PAPER: Scope = Scope {
        candidates: CandidateSet::Paper,
        swaps: false,
        max_swap_asks: None,
    };

    /// Swaps over `candidates`, with no bound on the requests.
    pub fn swaps(candidates: CandidateSet) -> Scope {
        Scope {
            candidates,
            swaps: true,
            max_swap_asks: None,
        }
    }

    /// A short name for reports: `paper`, `peer-racks`, `swap`,
    /// `swap+peer-racks`, ...
    pub fn label(&self) -> String {
        match (self.swaps, self.candidates) {
            (false, c) => c.name().to_string(),
            (true, CandidateSet::Paper) => "swap".to_string(),
            (true, c) => format!("swap+{}", c.name()),
        }
    }
}

impl FromStr for Scope {
    type Err = SwapError;

    /// Parses [`Scope::label`]'s form (no bound on swap requests).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SwapError::UnknownScope(s.to_string());
        match s.strip_prefix("swap") {
            Some("") => Ok(Scope::swaps(CandidateSet::Paper)),
            Some(rest) => {
                let set = rest.strip_prefix('+').ok_or_else(bad)?;
                set.parse().map(Scope::swaps).map_err(|_| bad())
            }
            None => s
                .parse()
                .map(|candidates| Scope {
                    candidates,
                    ..Scope::PAPER
                })
                .map_err(|_| bad()),
        }
    }
}

/// Like [`plan`], with the candidates of `set`: the paper's first, in its
/// order, then the hosts the wider set adds (see the module documentation).
/// An added host's [`Candidate::peer`] is the peer whose group brought it
/// in, with that peer's [`Candidate::peer_cost`]. With
/// [`CandidateSet::Paper`] it is exactly [`plan`].
pub fn plan_with(
    topo: &Topology,
    vm: VmId,
    host: HostId,
    peers: &[Peer],
    set: CandidateSet,
) -> Plan {
    let mut p = plan(topo, vm, host, peers);
    let top = set.widest_level(topo.depth());
    if top == 0 || p.peers_used == 0 {
        return p;
    }
    let usable = usable_peers(topo, vm, peers);
    let (sums, _) = level_sums(topo, &usable);
    let w = topo.weights();
    let mut ranked: Vec<(f64, VmId, HostId)> = usable
        .iter()
        .map(|z| {
            (
                z.rate * w.cumulative(topo.level(host, z.host)),
                z.id,
                z.host,
            )
        })
        .collect();
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let mut seen = vec![false; topo.host_count() as usize];
    seen[host as usize] = true;
    for c in &p.candidates {
        seen[c.host as usize] = true;
    }
    // A host in no group of a peer below the root has every peer at the
    // top level: its cost is W(depth) × the root's sum, bit for bit what
    // cost_at gives (one non-zero level sum, the root's); no need to
    // compute it. (Not the load: that adds the same rates in another
    // order, and a host as far as u's own then priced a few ulps apart
    // from it.)
    let depth = topo.depth();
    let far_cost = w.cumulative(depth) * sums.total();
    for l in 1..=top {
        let mut groups: Vec<u32> = Vec::new();
        for &(peer_cost, peer, zh) in &ranked {
            let g = topo.group_of(zh, l);
            if groups.contains(&g) {
                continue;
            }
            groups.push(g);
            for y in topo.group_hosts(l, g) {
                if seen[y as usize] {
                    continue;
                }
                seen[y as usize] = true;
                let (cost_after, level_after) = if l == depth {
                    (far_cost, depth)
                } else {
                    sums.cost_at(topo, y)
                };
                let (cost_after, benefit) = price(p.cost_before, cost_after);
                p.candidates.push(Candidate {
                    host: y,
                    peer,
                    peer_cost,
                    cost_after,
                    benefit,
                    level_after,
                    path_weight: w.cumulative(topo.level(host, y)),
                });
            }
        }
    }
    p
}

/// What the holder of u asks a full candidate host: "take u, and send me
/// one of yours in exchange".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SwapRequest {
    /// The proposing VM u.
    pub vm: VmId,
    /// Its host x (where the partner would go).
    pub from: HostId,
    /// The asked host y (where u would go).
    pub to: HostId,
    /// u's benefit of moving to y with every other VM where it is now
    /// (its [`Candidate::benefit`]; counts its peers on y as local).
    pub gain: f64,
    /// C(u) now.
    pub cost_before: f64,
    /// u's share of the threshold: c_m for u.
    pub c_m: f64,
    /// u's memory, MiB.
    pub mem_mb: u64,
    /// Free memory on x now, MiB (the partner needs its memory there once
    /// u has left).
    pub from_free_mem_mb: u64,
    /// u's peers that run on y, with λ(u, w) as x measures it.
    pub peers_on_target: Vec<(VmId, f64)>,
}

impl SwapRequest {
    /// The question for candidate `i` of `plan`: u (of `plan`) would go to
    /// that candidate's host, whose VMs may come to u's host in exchange.
    /// `peers` are u's measured peers; only those on the asked host with a
    /// usable rate travel in the request.
    pub(crate) fn for_candidate(
        plan: &Plan,
        i: usize,
        peers: &[Peer],
        c_m: f64,
        mem_mb: u64,
        from_free_mem_mb: u64,
    ) -> SwapRequest {
        let c = &plan.candidates[i];
        SwapRequest {
            vm: plan.vm,
            from: plan.host,
            to: c.host,
            gain: c.benefit,
            cost_before: plan.cost_before,
            c_m,
            mem_mb,
            from_free_mem_mb,
            peers_on_target: usable_peers_on(peers, plan.vm, c.host),
        }
    }
}

/// A VM of the host asked for a swap, as that host knows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LocalVm {
    /// The VM.
    pub id: VmId,
    /// Its memory, MiB.
    pub mem_mb: u64,
    /// Its peers with their rates (measured here) and their hosts as far
    /// as this host knows.
    pub peers: Vec<Peer>,
}

/// The asked host's answer: the partner it gives in exchange.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SwapOffer {
    /// The partner w (on the asked host y, would go to x).
    pub partner: VmId,
    /// w's benefit of moving to x with u still there.
    pub partner_gain: f64,
    /// C(w) now.
    pub partner_cost_before: f64,
    /// C(w) on x after the swap (u on y).
    pub partner_cost_after: f64,
    /// w's level on x after the swap.
    pub partner_level_after: u8,
    /// The swap's benefit: the drop of the equation 1 total.
    pub benefit: f64,
    /// The threshold it exceeds: c_m(u) + c_m(w).
    pub c_m: f64,
}

/// The asked host `me` chooses the partner of a swap among its VMs `local`
/// (`free_mem_mb`: its free memory now), with what it knows: its VMs' peers
/// and rates and where it believes they live; the request says where u is
/// (it overrides this host's belief). Returns the VM whose exchange has the
/// largest benefit net of c_m(u) + c_m(w) (ties to the lower ID), if that
/// benefit is above the threshold and both hosts have the memory; `None`
/// (refuse) otherwise. `cm` is this host's c_m setting, applied to w.
pub fn choose_swap_partner(
    topo: &Topology,
    me: HostId,
    free_mem_mb: u64,
    local: &[LocalVm],
    req: &SwapRequest,
    cm: MigrationCost,
) -> Option<SwapOffer> {
    let n_hosts = topo.host_count();
    if me >= n_hosts || req.from >= n_hosts || req.from == me {
        return None;
    }
    let w_xy = topo.weight(req.from, me);
    let level_xy = topo.level(req.from, me);
    let mut best: Option<(f64, SwapOffer)> = None;
    let mut peers: Vec<Peer> = Vec::new();
    for w in local {
        if w.id == req.vm {
            continue;
        }
        // y gives w's memory back and takes u's; x the reverse.
        let fits_here = free_mem_mb.saturating_add(w.mem_mb) >= req.mem_mb;
        let fits_there = req.from_free_mem_mb.saturating_add(req.mem_mb) >= w.mem_mb;
        if !(fits_here && fits_there) {
            continue;
        }
        peers.clear();
        peers.extend(w.peers.iter().map(|z| Peer {
            host: if z.id == req.vm { req.from } else { z.host },
            ..*z
        }));
        let usable = usable_peers(topo, w.id, &peers);
        let rate_wu: f64 = usable
            .iter()
            .filter(|z| z.id == req.vm)
            .map(|z| z.rate)
            .sum();
        let (sums, _) = level_sums(topo, &usable);
        let (cost_now, _) = sums.cost_at(topo, me);
        let (cost_there, level_there) = sums.cost_at(topo, req.from);
        let partner_gain = 2.0 * (cost_now - cost_there);
        let rate_uw: f64 = req
            .peers_on_target
            .iter()
            .filter(|&&(id, _)| id == w.id)
            .map(|&(_, r)| r)
            .sum();
        // Both gains count the u-w pair as becoming local; it stays at
        // level(x, y). Each side's term with its own measured rate.
        let benefit = req.gain + partner_gain - 2.0 * (rate_uw + rate_wu) * w_xy;
        let c_m = req.c_m + cm.threshold(cost_now, w_xy);
        let margin = noise_margin(req.cost_before.abs() + cost_now.abs());
        // NaN anywhere refuses.
        let clears = benefit > c_m + margin;
        if !clears {
            continue;
        }
        let (partner_cost_after, partner_level_after) = if rate_wu > 0.0 {
            (cost_there + rate_wu * w_xy, level_there.max(level_xy))
        } else {
            (cost_there, level_there)
        };
        let offer = SwapOffer {
            partner: w.id,
            partner_gain,
            partner_cost_before: cost_now,
            partner_cost_after,
            partner_level_after,
            benefit,
            c_m,
        };
        let net = benefit - c_m;
        let better = match &best {
            None => true,
            Some((b, o)) => net > *b || (net == *b && w.id < o.partner),
        };
        if better {
            best = Some((net, offer));
        }
    }
    best.map(|(_, o)| o)
}

/// An agreed swap: u and w exchange hosts.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Swap {
    /// The proposing VM u.
    pub vm: VmId,
    /// u's host now, the partner's after.
    pub from: HostId,
    /// The partner's host now, u's after.
    pub to: HostId,
    /// The partner w, chosen by `to`.
    pub partner: VmId,
    /// C(u) now.
    pub cost_before: f64,
    /// C(u) on `to` after the swap.
    pub cost_after: f64,
    /// C(w) now.
    pub partner_cost_before: f64,
    /// C(w) on `from` after the swap.
    pub partner_cost_after: f64,
    /// The drop of the equation 1 total.
    pub benefit: f64,
    /// The threshold it exceeded: c_m(u) + c_m(w).
    pub c_m: f64,
    /// u's level after (what the holder writes in the token).
    pub level_after: u8,
    /// w's level after.
    pub partner_level_after: u8,
    /// Questions asked (capacity and swap requests).
    pub asked: u32,
}

/// The outcome of a decision with a [`Scope`]: the paper's decision
/// (migrate or stay), or a swap.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Migrate u or let it stay, as [`Plan::decide`] would say.
    Single(Decision),
    /// u and a partner exchange hosts.
    Swap(Swap),
}

impl Step {
    /// Whether nothing is to be done.
    pub fn is_noop(&self) -> bool {
        matches!(self, Step::Single(d) if d.is_noop())
    }

    /// The drop of the equation 1 total (0 when u stays).
    pub fn benefit(&self) -> f64 {
        match self {
            Step::Single(d) => d.benefit(),
            Step::Swap(s) => s.benefit,
        }
    }

    /// Live migrations it takes: 0, 1, or 2 for a swap.
    pub fn migrations(&self) -> u32 {
        match self {
            Step::Single(d) if d.is_noop() => 0,
            Step::Single(_) => 1,
            Step::Swap(_) => 2,
        }
    }

    /// u's level after the step: what the holder writes in the token.
    pub fn level_after(&self) -> u8 {
        match self {
            Step::Single(d) => d.level_after(),
            Step::Swap(s) => s.level_after,
        }
    }

    /// Where u goes, if it moves.
    pub fn target(&self) -> Option<HostId> {
        match self {
            Step::Single(d) => d.target(),
            Step::Swap(s) => Some(s.to),
        }
    }

    /// Applies the step to a placement whose VM indices are the VM IDs (the
    /// simulator's convention). Capacity is the caller's business; a swap
    /// keeps both hosts' counts. Panics if a VM or host is out of range.
    pub fn apply(&self, p: &mut Placement) {
        match *self {
            Step::Single(Decision::Migrate { vm, to, .. }) => {
                p.move_vm(vm, to);
            }
            Step::Single(Decision::Stay { .. }) => {}
            Step::Swap(s) => {
                p.move_vm(s.vm, s.to);
                p.move_vm(s.partner, s.from);
            }
        }
    }
}

/// What a holder decides with: the paper's rule and c_m, u's memory, and
/// how far to look.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", default, deny_unknown_fields)]
pub struct Settings {
    /// The rule among candidates.
    pub rule: Rule,
    /// c_m.
    pub cm: MigrationCost,
    /// u's memory, MiB (a host has room if it has a slot and this much).
    pub mem_need_mb: u64,
    /// Candidates and swaps.
    pub scope: Scope,
}

/// A question of a [`ScopedDecider`] to a candidate host.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// Its free capacity (the paper's capacity request).
    Capacity(HostId),
    /// A swap proposal to `request.to`; answered with
    /// [`choose_swap_partner`]'s result there.
    Swap(SwapRequest),
}

impl Query {
    /// The host asked.
    pub fn host(&self) -> HostId {
        match self {
            Query::Capacity(h) => *h,
            Query::Swap(r) => r.to,
        }
    }
}

/// A decision with a [`Scope`] in progress, one question at a time (the
/// agent asks over the network): [`next_query`](Self::next_query), then
/// [`answer_capacity`](Self::answer_capacity) or
/// [`answer_swap`](Self::answer_swap) according to the question, until
/// `next_query` is `None`; then [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct ScopedDecider<'p> {
    inner: Inner<'p>,
}

#[derive(Debug, Clone)]
enum Inner<'p> {
    /// Swaps off: the paper's walk, untouched.
    Single(Decider<'p>),
    Swaps(Box<SwapWalk<'p>>),
}

#[derive(Debug, Clone)]
struct SwapWalk<'p> {
    topo: &'p Topology,
    plan: &'p Plan,
    peers: &'p [Peer],
    rule: Rule,
    cm: MigrationCost,
    /// What [`ScopedDecider::c_m`] reports: the first candidate's c_m.
    c_m: f64,
    mem_need_mb: u64,
    home_free_mem_mb: u64,
    swap_budget: u32,
    /// Candidate indices with a positive benefit for u, in walk order.
    order: Vec<usize>,
    pos: usize,
    /// The question pending for `order[pos]`.
    pending: Option<Query>,
    asked: u32,
    swap_asks: u32,
    migrate: Option<usize>,
    swap: Option<(usize, SwapOffer)>,
    done: bool,
}

impl<'p> ScopedDecider<'p> {
    /// Starts a decision for the plan's VM (plan it with [`plan_with`] and
    /// the scope's candidate set). `peers` are the peers it was planned
    /// with; `home_free_mem_mb` is the free memory of u's host now (a swap
    /// partner needs room there once u has left).
    pub fn new(
        topo: &'p Topology,
        plan: &'p Plan,
        peers: &'p [Peer],
        settings: Settings,
        home_free_mem_mb: u64,
    ) -> Self {
        let Settings {
            rule,
            cm,
            mem_need_mb,
            scope,
        } = settings;
        if !scope.swaps {
            return ScopedDecider {
                inner: Inner::Single(plan.decider(rule, cm, mem_need_mb)),
            };
        }
        let c_m = match plan.candidates.first() {
            Some(c) => cm.threshold(plan.cost_before, c.path_weight),
            None => cm.threshold(plan.cost_before, 0.0),
        };
        let mut order: Vec<usize> = if c_m.is_nan() {
            Vec::new()
        } else {
            (0..plan.candidates.len())
                .filter(|&i| plan.candidates[i].benefit > 0.0)
                .collect()
        };
        if rule == Rule::BestBenefit {
            // Stable: equal benefits keep the plan's order.
            order.sort_by(|&a, &b| {
                plan.candidates[b]
                    .benefit
                    .total_cmp(&plan.candidates[a].benefit)
            });
        }
        let mut walk = SwapWalk {
            topo,
            plan,
            peers,
            rule,
            cm,
            c_m,
            mem_need_mb,
            home_free_mem_mb,
            swap_budget: scope.max_swap_asks.unwrap_or(u32::MAX),
            order,
            pos: 0,
            pending: None,
            asked: 0,
            swap_asks: 0,
            migrate: None,
            swap: None,
            done: false,
        };
        walk.advance_to_question();
        ScopedDecider {
            inner: Inner::Swaps(Box::new(walk)),
        }
    }

    /// The question to ask now; `None` once decided.
    pub fn next_query(&self) -> Option<Query> {
        match &self.inner {
            Inner::Single(d) => d.next_host().map(Query::Capacity),
            Inner::Swaps(w) => w.pending.clone(),
        }
    }

    /// The answer to a [`Query::Capacity`] (`None`: no answer, no room).
    /// Ignored if that is not the pending question.
    pub fn answer_capacity(&mut self, capacity: Option<Capacity>) {
        match &mut self.inner {
            Inner::Single(d) => d.answer(capacity),
            Inner::Swaps(w) => w.answer_capacity(capacity),
        }
    }

    /// The answer to a [`Query::Swap`] (`None`: refused or no answer).
    /// Ignored if that is not the pending question.
    pub fn answer_swap(&mut self, offer: Option<SwapOffer>) {
        if let Inner::Swaps(w) = &mut self.inner {
            w.answer_swap(offer);
        }
    }

    /// The c_m in force for u (a swap must beat c_m(u) + c_m(w)).
    pub fn c_m(&self) -> f64 {
        match &self.inner {
            Inner::Single(d) => d.c_m(),
            Inner::Swaps(w) => w.c_m,
        }
    }

    /// The decision. Called early, it decides with the answers so far.
    pub fn finish(self) -> Step {
        match self.inner {
            Inner::Single(d) => Step::Single(d.finish()),
            Inner::Swaps(w) => w.finish(),
        }
    }
}

impl SwapWalk<'_> {
    fn can_swap(&self) -> bool {
        self.swap_asks < self.swap_budget
    }

    /// c_m for u's move to candidate `i`.
    fn c_m_at(&self, i: usize) -> f64 {
        self.cm
            .threshold(self.plan.cost_before, self.plan.candidates[i].path_weight)
    }

    fn swap_request(&self, i: usize) -> SwapRequest {
        SwapRequest::for_candidate(
            self.plan,
            i,
            self.peers,
            self.c_m_at(i),
            self.mem_need_mb,
            self.home_free_mem_mb,
        )
    }

    /// Sets `pending` to the first question from `order[pos]` on, or ends
    /// the walk.
    fn advance_to_question(&mut self) {
        self.pending = None;
        while !self.done && self.pos < self.order.len() {
            let i = self.order[self.pos];
            let c = &self.plan.candidates[i];
            if c.benefit > self.c_m_at(i) {
                self.pending = Some(Query::Capacity(c.host));
                return;
            }
            if self.can_swap() {
                self.pending = Some(Query::Swap(self.swap_request(i)));
                return;
            }
            self.pos += 1;
        }
        self.done = true;
    }

    fn answer_capacity(&mut self, capacity: Option<Capacity>) {
        let Some(Query::Capacity(_)) = self.pending else {
            return;
        };
        self.asked += 1;
        let i = self.order[self.pos];
        if capacity.is_some_and(|c| c.fits(self.mem_need_mb)) {
            // The first host with room is the best migration in either
            // walk order; both rules stop here.
            self.migrate = Some(i);
            self.pending = None;
            self.done = true;
            return;
        }
        if self.can_swap() {
            self.pending = Some(Query::Swap(self.swap_request(i)));
            return;
        }
        self.pos += 1;
        self.advance_to_question();
    }

    fn answer_swap(&mut self, offer: Option<SwapOffer>) {
        let Some(Query::Swap(req)) = &self.pending else {
            return;
        };
        let to = req.to;
        self.asked += 1;
        self.swap_asks += 1;
        let i = self.order[self.pos];
        // Trust but check: the offer must clear u's own share as well.
        if let Some(o) = offer.filter(|o| {
            o.benefit > o.c_m && o.c_m >= self.c_m_at(i) && to == self.plan.candidates[i].host
        }) {
            let better = self
                .swap
                .as_ref()
                .is_none_or(|(_, b)| o.benefit - o.c_m > b.benefit - b.c_m);
            if better {
                self.swap = Some((i, o));
            }
            if self.rule == Rule::PaperFirst {
                self.pending = None;
                self.done = true;
                return;
            }
        }
        self.pos += 1;
        self.advance_to_question();
    }

    fn finish(self) -> Step {
        let p = self.plan;
        let migrate = self.migrate.map(|i| {
            let c = &p.candidates[i];
            Decision::Migrate {
                vm: p.vm,
                from: p.host,
                to: c.host,
                cost_before: p.cost_before,
                cost_after: c.cost_after,
                benefit: c.benefit,
                c_m: self.c_m_at(i),
                level_after: c.level_after,
                asked: self.asked,
            }
        });
        let swap = self.swap.map(|(i, o)| {
            let c = &p.candidates[i];
            let rate_uw: f64 = usable_peers_on(self.peers, p.vm, c.host)
                .iter()
                .filter(|&&(id, _)| id == o.partner)
                .map(|&(_, r)| r)
                .sum();
            let (cost_after, level_after) = if rate_uw > 0.0 {
                // The pair stays at level(x, y) instead of becoming local.
                (
                    c.cost_after + rate_uw * self.topo.weight(p.host, c.host),
                    c.level_after.max(self.topo.level(p.host, c.host)),
                )
            } else {
                (c.cost_after, c.level_after)
            };
            Swap {
                vm: p.vm,
                from: p.host,
                to: c.host,
                partner: o.partner,
                cost_before: p.cost_before,
                cost_after,
                partner_cost_before: o.partner_cost_before,
                partner_cost_after: o.partner_cost_after,
                benefit: o.benefit,
                c_m: o.c_m,
                level_after,
                partner_level_after: o.partner_level_after,
                asked: self.asked,
            }
        });
        match (migrate, swap) {
            (Some(m), Some(s)) => {
                let m_net = match &m {
                    Decision::Migrate { benefit, c_m, .. } => benefit - c_m,
                    Decision::Stay { .. } => f64::NEG_INFINITY,
                };
                if s.benefit - s.c_m > m_net {
                    Step::Swap(s)
                } else {
                    Step::Single(m)
                }
            }
            (Some(m), None) => Step::Single(m),
            (None, Some(s)) => Step::Swap(s),
            (None, None) => Step::Single(self.stay()),
        }
    }
}

impl SwapWalk<'_> {
    /// Why u stays: the reasons of [`Decider::finish`].
    fn stay(&self) -> Decision {
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
        // All usable peers on u's own host (the wider sets add candidates
        // even then, all of them worse).
        if p.level == 0 {
            return stay(StayReason::AllPeersLocal);
        }
        let worth_it = (0..p.candidates.len()).any(|i| p.candidates[i].benefit > self.c_m_at(i));
        if !worth_it && self.swap_asks == 0 {
            let b = best_candidate(&p.candidates);
            let best = &p.candidates[b];
            return stay(StayReason::NotWorthIt {
                best_benefit: best.benefit,
                best_host: best.host,
                c_m: self.c_m_at(b),
            });
        }
        stay(StayReason::NoRoom {
            asked: self.asked,
            c_m,
        })
    }
}

/// u's usable peers on host `h`, with their rates (the same filter as
/// [`plan`]).
fn usable_peers_on(peers: &[Peer], vm: VmId, h: HostId) -> Vec<(VmId, f64)> {
    peers
        .iter()
        .filter(|z| z.host == h && z.id != vm && z.rate.is_finite() && z.rate > 0.0)
        .map(|z| (z.id, z.rate))
        .collect()
}

/// [`ScopedDecider`] in one call, for callers that answer synchronously:
/// `capacity(h)` answers capacity requests, `swap(request)` swap requests
/// (normally [`choose_swap_partner`] on the asked host).
pub fn decide_with(
    topo: &Topology,
    plan: &Plan,
    peers: &[Peer],
    settings: Settings,
    home_free_mem_mb: u64,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
    mut swap: impl FnMut(&SwapRequest) -> Option<SwapOffer>,
) -> Step {
    let mut d = ScopedDecider::new(topo, plan, peers, settings, home_free_mem_mb);
    while let Some(q) = d.next_query() {
        match q {
            Query::Capacity(h) => d.answer_capacity(capacity(h)),
            Query::Swap(r) => d.answer_swap(swap(&r)),
        }
    }
    d.finish()
}

/// The VMs `vms` (on one host) as that host knows them, from a cost model
/// whose VM indices are the VM IDs (the simulator's view: every host knows
/// where its VMs' peers are).
pub fn local_vms(
    model: &CostModel<'_>,
    placement: &Placement,
    vms: &[VmIdx],
    mem_mb: impl Fn(VmIdx) -> u64,
) -> Vec<LocalVm> {
    vms.iter()
        .map(|&w| LocalVm {
            id: w,
            mem_mb: mem_mb(w),
            peers: model.peers(placement, w),
        })
        .collect()
}

/// Change of [`CostModel::total_cost`] if `u` and `w` exchanged hosts:
/// both moves' deltas, corrected for the u-w pair, whose level does not
/// change (each move's delta counts it as becoming local). Negative is a
/// saving. Panics if a VM is out of range.
pub fn swap_delta(model: &CostModel<'_>, p: &Placement, u: VmIdx, w: VmIdx) -> f64 {
    let (x, y) = (p.host(u), p.host(w));
    if x == y {
        return 0.0;
    }
    let fix = 4.0 * model.traffic.rate(u, w) * model.topo.weight(x, y);
    model.move_delta(p, u, y) + model.move_delta(p, w, x) + fix
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::Traffic;
    use crate::topology::LinkWeights;
    use std::net::Ipv4Addr;

    /// Two racks of two hosts, two slots each. Host 0: u=0 and a=1; host 2:
    /// v=2 and b=3; hosts 1 and 3 are full of silent VMs 4..8. u talks to
    /// v, a to b: each pair crosses the pods' link, and every host where a
    /// peer lives is full.
    fn blocked() -> (Topology, Traffic, Placement) {
        let t = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let tr = Traffic::from_triples(8, [(0, 2, 10.0), (1, 3, 10.0)]).unwrap();
        let p = Placement::new(4, vec![0, 0, 2, 2, 1, 1, 3, 3]).unwrap();
        (t, tr, p)
    }

    fn settings(rule: Rule, scope: Scope) -> Settings {
        Settings {
            rule,
            cm: MigrationCost::default(),
            mem_need_mb: 0,
            scope,
        }
    }

    fn room(p: &Placement) -> impl Fn(HostId) -> Option<Capacity> + '_ {
        |h| {
            Some(Capacity {
                free_slots: 2 - p.count(h),
                free_mem_mb: 1 << 20,
            })
        }
    }

    #[test]
    fn a_swap_escapes_what_the_paper_rule_cannot() {
        let (t, tr, p) = blocked();
        let m = CostModel::new(&t, &tr);
        let peers = m.peers(&p, 0);
        let pl = plan_with(&t, 0, 0, &peers, CandidateSet::Paper);
        for rule in Rule::ALL {
            // The paper's rule: the only candidate is full.
            let d = pl.decide(rule, MigrationCost::default(), 0, room(&p));
            assert!(matches!(
                d,
                Decision::Stay {
                    reason: StayReason::NoRoom { asked: 1, .. },
                    ..
                }
            ));
            let swap = |r: &SwapRequest| {
                let on: Vec<VmIdx> = (0..8).filter(|&v| p.host(v) == r.to).collect();
                let local = local_vms(&m, &p, &on, |_| 0);
                choose_swap_partner(&t, r.to, 0, &local, r, MigrationCost::default())
            };
            let step = decide_with(
                &t,
                &pl,
                &peers,
                settings(rule, Scope::swaps(CandidateSet::Paper)),
                0,
                room(&p),
                swap,
            );
            // Host 2 gives b (3), not v (2): exchanging u and v saves nothing.
            let Step::Swap(s) = step else {
                panic!("expected a swap, got {step:?}");
            };
            assert_eq!((s.vm, s.from, s.to, s.partner), (0, 0, 2, 3));
            assert_eq!(s.asked, 2);
            let w2 = t.weights().cumulative(2);
            assert_eq!(s.benefit, 40.0 * w2);
            assert_eq!(s.benefit, -swap_delta(&m, &p, 0, 3));
            assert_eq!((s.cost_after, s.partner_cost_after), (0.0, 0.0));
            assert_eq!((s.level_after, s.partner_level_after), (0, 0));
            let mut after = p.clone();
            step.apply(&mut after);
            assert_eq!(m.total_cost(&after), 0.0);
            assert_eq!(after.counts(), p.counts());
            assert_eq!(step.migrations(), 2);
        }
    }

    #[test]
    fn the_pair_itself_keeps_its_level() {
        let (t, tr, p) = blocked();
        let m = CostModel::new(&t, &tr);
        // u (0) proposes to host 2 and only v (2) may be chosen: they trade
        // places, the pair stays across the pods, nothing is saved.
        let local = local_vms(&m, &p, &[2], |_| 0);
        let peers = m.peers(&p, 0);
        let pl = plan(&t, 0, 0, &peers);
        let c = pl.candidates[0];
        let req = SwapRequest {
            vm: 0,
            from: 0,
            to: 2,
            gain: c.benefit,
            cost_before: pl.cost_before,
            c_m: 0.0,
            mem_mb: 0,
            from_free_mem_mb: 0,
            peers_on_target: vec![(2, 10.0)],
        };
        assert_eq!(swap_delta(&m, &p, 0, 2), 0.0);
        assert_eq!(
            choose_swap_partner(&t, 2, 0, &local, &req, MigrationCost::default()),
            None
        );
    }

    #[test]
    fn swaps_beat_c_m_twice_and_check_memory() {
        let (t, tr, p) = blocked();
        let m = CostModel::new(&t, &tr);
        let local = local_vms(&m, &p, &[2, 3], |v| if v == 3 { 2048 } else { 1024 });
        let w2 = t.weights().cumulative(2);
        let req = |c_m: f64, from_free: u64| SwapRequest {
            vm: 0,
            from: 0,
            to: 2,
            gain: 20.0 * w2,
            cost_before: 10.0 * w2,
            c_m,
            mem_mb: 1024,
            from_free_mem_mb: from_free,
            peers_on_target: vec![(2, 10.0)],
        };
        // Benefit 40 W(2); c_m = 20 W(2) each is exactly reached: refused.
        let cm = MigrationCost::Absolute(20.0 * w2);
        assert!(choose_swap_partner(&t, 2, 0, &local, &req(20.0 * w2, 1024), cm).is_none());
        let cm = MigrationCost::Absolute(19.0 * w2);
        let o = choose_swap_partner(&t, 2, 0, &local, &req(19.0 * w2, 1024), cm).unwrap();
        assert_eq!(o.partner, 3);
        assert_eq!(o.c_m, 38.0 * w2);
        // b needs 2 GiB on x: with u's 1 GiB freed, x needs 1 GiB free.
        assert!(choose_swap_partner(&t, 2, 0, &local, &req(0.0, 1023), cm).is_none());
    }

    #[test]
    fn wider_sets_add_the_peers_groups() {
        let t = Topology::regular(
            &[3, 2, 2],
            LinkWeights::paper_truncated(3),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        // u on host 0; one peer on host 7 (rack 2 = hosts 6..9, pod 1 =
        // hosts 6..12).
        let peers = [Peer {
            id: 5,
            host: 7,
            rate: 1.0,
        }];
        let hosts = |set| -> Vec<HostId> {
            plan_with(&t, 1, 0, &peers, set)
                .candidates
                .iter()
                .map(|c| c.host)
                .collect()
        };
        assert_eq!(hosts(CandidateSet::Paper), [7]);
        assert_eq!(hosts(CandidateSet::PeerRacks), [7, 6, 8]);
        assert_eq!(hosts(CandidateSet::PeerPods), [7, 6, 8, 9, 10, 11]);
        let all = hosts(CandidateSet::All);
        assert_eq!(all.len(), 11);
        assert_eq!(&all[..6], [7, 6, 8, 9, 10, 11]);
        let p = plan_with(&t, 1, 0, &peers, CandidateSet::All);
        // Hosts of u's own pod are as far from the peer as u is now.
        for c in &p.candidates[6..] {
            assert_eq!(c.benefit, 0.0);
            assert_eq!(c.level_after, 3);
            assert_eq!(c.peer, 5);
        }
    }

    #[test]
    fn names_round_trip() {
        for c in CandidateSet::ALL {
            assert_eq!(c.name().parse::<CandidateSet>().unwrap(), c);
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.name()));
        }
        assert!("racks".parse::<CandidateSet>().is_err());
        assert_eq!(Scope::default(), Scope::PAPER);
        assert_eq!(
            Scope::swaps(CandidateSet::PeerRacks).label(),
            "swap+peer-racks"
        );
        for set in CandidateSet::ALL {
            for swaps in [false, true] {
                let sc = Scope {
                    candidates: set,
                    swaps,
                    max_swap_asks: None,
                };
                assert_eq!(sc.label().parse::<Scope>().unwrap(), sc);
            }
        }
        for bad in ["swap+", "swapx", "swap+racks", "racks", ""] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
        let s: Scope = serde_json::from_str(r#"{"candidates":"peer-pods","swaps":true}"#).unwrap();
        assert_eq!(s, Scope::swaps(CandidateSet::PeerPods));
    }
}
