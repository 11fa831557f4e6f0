//! One policy's run: the token circulates among the VMs exactly as it would
//! among the agents. At each hand-off the holder asks score-core for the
//! decision ([`decide`]: [`plan`] then [`Plan::decide`], the agent's two
//! calls), migrates if told to, writes what it learnt into the token
//! ([`Token::update`]) and hands the token on with score-core's
//! [`advance`] and the policy's own choice. The total cost (eq. 1) is
//! recorded after every hand-off and every round.
//!
//! Beyond the paper (docs/EVALUATION.md), [`RunOptions::scope`] lets the holder look
//! at wider candidate sets and propose swaps ([`decide_scoped`]): a full
//! host asked for a swap picks the partner among its own VMs with
//! score-core's [`choose_swap_partner`], from what it measures (here: its
//! VMs' peers and where they are). A swap is two migrations.
//! [`RunOptions::group`] adds score-core's group moves
//! ([`score_core::group`]): the holder's host moves u together with the
//! peers it shares the host with, into a rack where their other peers run;
//! each member is one migration. [`RunOptions::chain`] adds ejection
//! chains ([`score_core::chain`]): u goes to a full host, which sends one
//! of its VMs on to u's host or to a third host with room.
//! [`RunOptions::cycle`] adds rotations ([`score_core::cycle`]): u goes to a
//! full host y, one of y's VMs to a full host z, one of z's VMs to u's host.
//! [`RunOptions::gswap`] adds group swaps ([`score_core::group`]): u's
//! group on its host changes places with VMs of a host near its peers.

use std::collections::BinaryHeap;
use std::time::Instant;

use score_core::chain::{Chain, choose_ejection, decide_chain};
use score_core::cost::{CostError, CostModel, Placement, Traffic, VmIdx};
use score_core::cycle::{Rotation, close_rotation, decide_rotation, extend_rotation};
use score_core::decision::{CmDecay, Decision, MigrationCost, Plan, Rule, plan};
use score_core::group::{
    GroupLimits, GroupMove, GroupSwap, Home, SwapLimits, decide_group, decide_group_swap,
    offer_exchange,
};
use score_core::policy::{PolicyKind, TokenPolicy, advance, best_move, rank_by_saving};
use score_core::swap::{
    LocalVm, Scope, Settings, Step, choose_swap_partner, decide_with, local_vms, plan_with,
};
use score_core::token::{Load, Token, VmId};
use score_core::topology::{HostId, Topology};

use crate::scenario::{MigrationCostSpec, TokenInit};
use crate::traffic::{Flow, FlowEvent};
use crate::world::{HostLists, HostShape, Setup, core_traffic};

/// How a run is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RunOptions {
    /// Decision rule.
    pub rule: Rule,
    /// Candidate set and swaps (beyond the paper; default: the paper's).
    /// The global policy's ranking stays that of single migrations over
    /// the paper's candidates; its holder decides with this scope.
    pub scope: Scope,
    /// c_m and how to read it.
    pub cm: MigrationCostSpec,
    /// Most token rounds.
    pub max_rounds: u32,
    /// What the token knows before its first round.
    pub token_init: TokenInit,
    /// Keep the placement after this many rounds (heat maps).
    pub snapshot_round: Option<u32>,
    /// Whether the workload's dynamic flow events are applied.
    pub dynamic: bool,
    /// Whether to record the cost after every hand-off (else per round).
    pub record_steps: bool,
    /// Record every hand-off's holder and decision in [`PolicyRun::trace`].
    pub trace: bool,
    /// Group moves (beyond the paper; default: off).
    pub group: GroupMode,
    /// Ejection chains when u would stay (beyond the paper; default: off).
    pub chain: bool,
    /// Rotations of three VMs on three full hosts when u would stay and
    /// has no better chain (beyond the paper; default: off).
    pub cycle: bool,
    /// Group swaps when u would stay and has no better chain, rotation or
    /// group move (beyond the paper; default: off).
    pub gswap: bool,
    /// c_m of round r is c_m × max(`cm_decay`^r, `cm_floor`) (decay 1:
    /// constant, the paper's). The token carries the round, so every holder
    /// knows it; with a decay, a round without migration ends the run only
    /// once c_m has reached its floor.
    pub cm_decay: f64,
    /// The floor of the decay, a fraction of the first c_m.
    pub cm_floor: f64,
    /// Slow self-checks after every hand-off (tests): the running total
    /// against a full recomputation, and the global policy's incremental
    /// ranking against score-core's [`score_core::policy::rank_by_saving`].
    pub self_check: bool,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            rule: Rule::PaperFirst,
            scope: Scope::PAPER,
            cm: MigrationCostSpec::Absolute(0.0),
            max_rounds: 10,
            token_init: TokenInit::Measured,
            snapshot_round: None,
            dynamic: false,
            record_steps: true,
            trace: false,
            self_check: false,
            group: GroupMode::Off,
            cm_decay: 1.0,
            cm_floor: 0.0,
            chain: false,
            cycle: false,
            gswap: false,
        }
    }
}

/// When the holder considers a group move ([`score_core::group`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GroupMode {
    /// Never: the scope's decision alone.
    #[default]
    Off,
    /// Only when the scope's decision lets u stay.
    WhenStuck,
    /// Always; the group move is made if its benefit net of its threshold
    /// beats the scope's decision's.
    Best,
}

impl GroupMode {
    /// Suffix of a variant's label: `""`, `+group`, `+group-best`.
    pub fn suffix(self) -> &'static str {
        match self {
            GroupMode::Off => "",
            GroupMode::WhenStuck => "+group",
            GroupMode::Best => "+group-best",
        }
    }
}

/// Host `h`'s VMs as `h` knows them (`lists`), each with the shape's VM
/// memory: what a host decides or answers with.
fn host_view(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    h: HostId,
) -> Vec<LocalVm> {
    local_vms(model, placement, lists.on(h), |_| shape.vm_mem_mb)
}

/// The holder's group move for `u` (`None` if it has none worth making):
/// score-core's [`decide_group`] over the VMs of u's host as that host
/// knows them (`lists`), capacity answered from the hosts' VM counts.
pub fn decide_group_move(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    u: VmIdx,
    cm: MigrationCost,
) -> Option<GroupMove> {
    let x = placement.host(u);
    let local = host_view(model, placement, lists, shape, x);
    decide_group(model.topo, x, u, &local, cm, GroupLimits::default(), |h| {
        Some(shape.capacity(placement.count(h)))
    })
}

/// What a policy's run produced.
#[derive(Debug, Clone)]
pub struct PolicyRun {
    /// The policy.
    pub policy: PolicyKind,
    /// c_m as score-core applied it.
    pub c_m: MigrationCost,
    /// Equation 1 total before the first hand-off.
    pub initial_cost: f64,
    /// Equation 1 total at the end (under the traffic at the end).
    pub final_cost: f64,
    /// What the initial placement would cost under the traffic at the end
    /// (differs from `initial_cost` only when flows appeared during the run).
    pub final_cost_unmoved: f64,
    /// Total after every hand-off (empty unless `record_steps`).
    pub step_costs: Vec<f64>,
    /// Total at the start and after every completed round.
    pub round_costs: Vec<f64>,
    /// Migrations in every completed round (and the last, partial one).
    pub round_migrations: Vec<u64>,
    /// Hand-offs made.
    pub handoffs: u64,
    /// Migrations made (a swap counts two).
    pub migrations: u64,
    /// Σ W(ℓ(from, to)) over every migration: times the bytes a migration
    /// sends, the traffic cost of the migrations themselves (in byte ×
    /// weight, where the communication cost is in byte/s × weight).
    pub migration_path_weight: f64,
    /// Swaps made (each also counted as two migrations).
    pub swaps: u64,
    /// Group moves made (each also counted as one migration per member).
    pub groups: u64,
    /// Ejection chains made (each also counted as two migrations).
    pub chains: u64,
    /// Rotations made (each also counted as three migrations).
    pub rotations: u64,
    /// Group swaps made (each also counted as one migration per VM).
    pub group_swaps: u64,
    /// Steps taken (migrations, swaps, chains, group moves) whose exact
    /// change of the total ([`CostModel::exact_change_sign`]) was zero:
    /// moves on rounding noise, 0 unless the decisions have a bug.
    pub zero_change_steps: u64,
    /// Completed rounds.
    pub rounds: u32,
    /// Rounds until the last one that migrated a VM (0: nothing moved).
    pub rounds_to_converge: u32,
    /// Whether a round without migration was reached (with no flows left to
    /// appear) before `max_rounds`.
    pub converged: bool,
    /// VMs that never moved.
    pub never_moved: u32,
    /// The placement at the end.
    pub final_placement: Placement,
    /// The placement after `snapshot_round` rounds, if asked and reached.
    pub snapshot: Option<Placement>,
    /// Wall-clock time of the run, seconds.
    pub elapsed_s: f64,
    /// Every hand-off's holder and where it moved (if `trace`).
    pub trace: Vec<(VmId, Option<HostId>)>,
}

impl PolicyRun {
    /// Cost reduction in percent of what the placement would cost without
    /// migrations (under the same traffic).
    pub fn reduction_pct(&self) -> f64 {
        if self.final_cost_unmoved > 0.0 {
            100.0 * (1.0 - self.final_cost / self.final_cost_unmoved)
        } else {
            0.0
        }
    }
}

/// The decision for the token holder `u`, as the agent makes it: its peers
/// and where they are, [`plan`], then [`Plan::decide`] with the hosts'
/// capacity answers. Returns the plan (for the token update) and the decision.
pub fn decide(
    model: &CostModel<'_>,
    placement: &Placement,
    shape: HostShape,
    u: VmIdx,
    rule: Rule,
    cm: MigrationCost,
) -> (Plan, Decision) {
    let peers = model.peers(placement, u);
    let p = plan(model.topo, u, placement.host(u), &peers);
    let d = p.decide(rule, cm, shape.vm_mem_mb, |h| {
        Some(shape.capacity(placement.count(h)))
    });
    (p, d)
}

/// [`decide`] with a [`Scope`]: [`plan_with`] the scope's candidates, then
/// score-core's [`decide_with`]; capacity requests are answered from the
/// host's VM count, swap requests by the asked host with
/// [`choose_swap_partner`] over its VMs (`lists`). With
/// [`Scope::PAPER`] the step is exactly [`decide`]'s decision.
pub fn decide_scoped(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    u: VmIdx,
    settings: Settings,
) -> (Plan, Step) {
    let peers = model.peers(placement, u);
    let x = placement.host(u);
    let p = plan_with(model.topo, u, x, &peers, settings.scope.candidates);
    let free_mem = |h: HostId| shape.capacity(placement.count(h)).free_mem_mb;
    let step = decide_with(
        model.topo,
        &p,
        &peers,
        settings,
        free_mem(x),
        |h| Some(shape.capacity(placement.count(h))),
        |r| {
            let local = host_view(model, placement, lists, shape, r.to);
            choose_swap_partner(model.topo, r.to, free_mem(r.to), &local, r, settings.cm)
        },
    );
    (p, step)
}

/// Most full candidates a holder asks for an ejection chain (or a
/// rotation).
const CHAIN_ASKS: u32 = score_core::chain::MAX_EJECT_ASKS;

/// The holder's ejection chain for `u` (`None` if none is worth making):
/// score-core's [`decide_chain`] over the scope's candidates; each asked
/// host answers with [`choose_ejection`] over its VMs (`lists`), capacity
/// from the hosts' VM counts.
pub fn decide_chain_move(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    u: VmIdx,
    settings: Settings,
) -> Option<Chain> {
    let peers = model.peers(placement, u);
    let x = placement.host(u);
    let set = settings.scope.candidates;
    let p = plan_with(model.topo, u, x, &peers, set);
    let cap = |h: HostId| Some(shape.capacity(placement.count(h)));
    decide_chain(
        &p,
        &peers,
        settings.cm,
        shape.vm_mem_mb,
        cap(x).map_or(0, |c| c.free_mem_mb),
        CHAIN_ASKS,
        cap,
        |r| {
            let local = host_view(model, placement, lists, shape, r.to);
            let free = shape.capacity(placement.count(r.to)).free_mem_mb;
            choose_ejection(model.topo, r.to, free, &local, r, settings.cm, set, cap)
        },
    )
}

/// A step of several VMs decided by several hosts: an ejection chain, a
/// rotation or a group swap, as (VM, from, to), u's first.
struct Multi {
    moves: Vec<(VmIdx, HostId, HostId)>,
    benefit: f64,
    net: f64,
    kind: MultiKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MultiKind {
    Chain,
    Rotation,
    GroupSwap,
}

/// The holder's group swap for `u` (`None` if none is worth making):
/// score-core's [`decide_group_swap`] over the VMs of u's host; each asked
/// host answers with [`offer_exchange`] over its own VMs (`lists`),
/// capacities from the hosts' VM counts.
pub fn decide_group_swap_move(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    u: VmIdx,
    cm: MigrationCost,
) -> Option<GroupSwap> {
    let x = placement.host(u);
    let local = |h: HostId| host_view(model, placement, lists, shape, h);
    let room = |h: HostId| shape.capacity(placement.count(h));
    let lim = SwapLimits::default();
    let lx = local(x);
    let home = Home {
        host: x,
        room: room(x),
        local: &lx,
    };
    decide_group_swap(model.topo, home, u, cm, lim, |y, req| {
        offer_exchange(model.topo, y, room(y), &local(y), req, cm, lim)
    })
}

/// The holder's rotation for `u` (`None` if none is worth making):
/// score-core's [`decide_rotation`] over the scope's candidates; the
/// asked host extends it with [`extend_rotation`] and the host it asks
/// closes it with [`close_rotation`], each over its own VMs (`lists`),
/// capacity from the hosts' VM counts.
pub fn decide_rotation_move(
    model: &CostModel<'_>,
    placement: &Placement,
    lists: &HostLists,
    shape: HostShape,
    u: VmIdx,
    settings: Settings,
) -> Option<Rotation> {
    let x = placement.host(u);
    let set = settings.scope.candidates;
    let cm = settings.cm;
    let cap = |h: HostId| Some(shape.capacity(placement.count(h)));
    let free = |h: HostId| shape.capacity(placement.count(h)).free_mem_mb;
    let local = |h: HostId| host_view(model, placement, lists, shape, h);
    let me = local_vms(model, placement, &[u], |_| shape.vm_mem_mb).remove(0);
    let p = plan_with(model.topo, u, x, &me.peers, set);
    decide_rotation(&p, &me, cm, free(x), CHAIN_ASKS, cap, |r| {
        let y = r.legs[0].to;
        extend_rotation(
            model.topo,
            y,
            free(y),
            &local(y),
            r,
            cm,
            set,
            CHAIN_ASKS,
            cap,
            |r2| {
                let z = r2.legs[1].to;
                close_rotation(model.topo, z, free(z), &local(z), r2, cm)
            },
        )
    })
}

/// The mutable state of one run.
struct State<'a> {
    topo: &'a Topology,
    traffic: Traffic,
    flows: Vec<Flow>,
    placement: Placement,
    lists: HostLists,
    shape: HostShape,
    total: f64,
}

impl State<'_> {
    fn model(&self) -> CostModel<'_> {
        CostModel::new(self.topo, &self.traffic)
    }

    /// Adds a batch of flows and rebuilds the traffic matrix.
    fn add_flows(&mut self, batch: &[FlowEvent]) -> Result<(), CostError> {
        for e in batch {
            self.flows.push(e.flow);
        }
        self.traffic = core_traffic(self.traffic.vm_count(), &self.flows)?;
        // Exact recomputation: the spike is what the new flows cost where
        // their VMs are now.
        self.total = self.model().total_cost(&self.placement);
        Ok(())
    }
}

/// The global policy's ranking, kept up to date incrementally. After a move
/// of u from x to y, a VM's best move can change only if its own cost
/// changed (u and u's peers) or if the room on one of its candidate hosts
/// changed. All VMs have the same size, so a host's answer to "is there
/// room?" changes only when it crosses full: if x was full before u left,
/// every VM with a peer on x may now choose x; if y became full, only the
/// VMs whose chosen move went to y must choose again. Each affected VM is
/// re-evaluated with score-core's [`best_move`], exactly as
/// [`score_core::policy::rank_by_saving`] would (a self-check compares them).
struct GlobalIndex {
    heap: BinaryHeap<Entry>,
    version: Vec<u32>,
    /// Where each VM's current best move goes.
    target: Vec<Option<HostId>>,
    stamp: Vec<u32>,
    epoch: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Entry {
    saving: f64,
    vm: VmIdx,
    version: u32,
}

impl Eq for Entry {}

impl Ord for Entry {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        // Largest saving first, ties to the lower VM (rank_by_saving's order).
        self.saving.total_cmp(&o.saving).then(o.vm.cmp(&self.vm))
    }
}

impl PartialOrd for Entry {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}

impl GlobalIndex {
    fn new(st: &State<'_>, rule: Rule, cm: MigrationCost) -> Self {
        let n = st.placement.vm_count() as usize;
        let mut g = GlobalIndex {
            heap: BinaryHeap::with_capacity(n),
            version: vec![0; n],
            target: vec![None; n],
            stamp: vec![0; n],
            epoch: 0,
        };
        for u in 0..n as VmIdx {
            g.refresh(st, u, rule, cm);
        }
        g
    }

    fn refresh(&mut self, st: &State<'_>, u: VmIdx, rule: Rule, cm: MigrationCost) {
        let v = &mut self.version[u as usize];
        *v = v.wrapping_add(1);
        let version = *v;
        let shape = st.shape;
        let placement = &st.placement;
        let best = best_move(&st.model(), placement, u, rule, cm, shape.vm_mem_mb, |h| {
            Some(shape.capacity(placement.count(h)))
        });
        self.target[u as usize] = best.map(|r| r.to);
        if let Some(r) = best {
            self.heap.push(Entry {
                saving: r.saving,
                vm: u,
                version,
            });
        }
    }

    /// Re-evaluates the VMs a change can have affected: `touched_vms` (whose
    /// cost changed) and their peers, the peers of the VMs on `freed` (a
    /// host that was full and now has room), and, among the peers of the
    /// VMs on `filled` (a host that just became full), those whose move
    /// went there.
    fn after_change(
        &mut self,
        st: &State<'_>,
        touched_vms: &[VmIdx],
        freed: Option<HostId>,
        filled: Option<HostId>,
        rule: Rule,
        cm: MigrationCost,
    ) {
        self.epoch = self.epoch.wrapping_add(1);
        let epoch = self.epoch;
        let mut todo: Vec<VmIdx> = Vec::new();
        let stamp = &mut self.stamp;
        let mut mark = |u: VmIdx| {
            if stamp[u as usize] != epoch {
                stamp[u as usize] = epoch;
                todo.push(u);
            }
        };
        for &u in touched_vms {
            mark(u);
            for z in st.traffic.neighbours(u) {
                mark(z.vm);
            }
        }
        if let Some(h) = freed {
            for &v in st.lists.on(h) {
                for z in st.traffic.neighbours(v) {
                    mark(z.vm);
                }
            }
        }
        if let Some(h) = filled {
            for &v in st.lists.on(h) {
                for z in st.traffic.neighbours(v) {
                    if self.target[z.vm as usize] == Some(h) {
                        mark(z.vm);
                    }
                }
            }
        }
        for u in todo {
            self.refresh(st, u, rule, cm);
        }
    }

    /// Re-evaluates exactly these VMs (their own traffic changed).
    fn after_change_own(&mut self, st: &State<'_>, vms: &[VmIdx], rule: Rule, cm: MigrationCost) {
        for &u in vms {
            self.refresh(st, u, rule, cm);
        }
    }

    /// The best `k` VMs that would migrate now, best first.
    fn top(&mut self, k: usize) -> Vec<VmId> {
        let mut out = Vec::with_capacity(k);
        let mut keep = Vec::with_capacity(k);
        while out.len() < k {
            match self.heap.pop() {
                None => break,
                Some(e) if e.version != self.version[e.vm as usize] => {}
                Some(e) => {
                    out.push(e.vm);
                    keep.push(e);
                }
            }
        }
        self.heap.extend(keep);
        out
    }
}

/// Runs one policy from the setup's initial placement and traffic.
pub fn run_policy(
    setup: &Setup,
    kind: PolicyKind,
    opts: &RunOptions,
    mut on_handoff: impl FnMut(u64),
) -> Result<PolicyRun, CostError> {
    let started = Instant::now();
    let n = setup.vms();
    let mut st = State {
        topo: &setup.topo,
        traffic: setup.traffic.clone(),
        flows: setup.workload.flows.clone(),
        placement: setup.placement.clone(),
        lists: HostLists::new(&setup.placement),
        shape: setup.shape,
        total: 0.0,
    };
    st.total = st.model().total_cost(&st.placement);
    let initial_cost = st.total;
    let cm0 = opts.cm.resolve(initial_cost, n);
    let mut cm = cm0;
    let events: &[FlowEvent] = if opts.dynamic {
        &setup.workload.events
    } else {
        &[]
    };

    let mut token = Token::new(0, 0..n);
    if opts.token_init == TokenInit::Measured {
        let model = st.model();
        for u in 0..n {
            let level = model.vm_level(&st.placement, u);
            let load = Load::from_rate(model.vm_load(u));
            if let Some(e) = token.get_mut(u) {
                e.level = level;
                e.load = load;
            }
        }
    }
    let mut policy: Box<dyn TokenPolicy> = kind.build();
    let mut global = kind
        .needs_global_knowledge()
        .then(|| GlobalIndex::new(&st, opts.rule, cm));
    if let Some(g) = global.as_mut() {
        policy.feed_ranking(g.top(2));
    }

    let max_handoffs = u64::from(opts.max_rounds) * u64::from(n);
    let mut step_costs = Vec::new();
    if opts.record_steps {
        step_costs.reserve(max_handoffs.min(50_000_000) as usize);
    }
    let mut round_costs = vec![initial_cost];
    let mut round_migrations = Vec::new();
    let mut moved = vec![false; n as usize];
    let (mut handoffs, mut migrations, mut this_round) = (0u64, 0u64, 0u64);
    let mut path_weight = 0.0f64;
    let mut swaps = 0u64;
    let mut groups = 0u64;
    let mut chains = 0u64;
    let mut rotations = 0u64;
    let mut group_swaps = 0u64;
    let mut zero_change_steps = 0u64;
    let exactly_zero = |st: &State<'_>, moves: &[(VmIdx, HostId)]| {
        u64::from(st.model().exact_change_sign(&st.placement, moves) == std::cmp::Ordering::Equal)
    };
    let mut settings = Settings {
        rule: opts.rule,
        cm,
        mem_need_mb: st.shape.vm_mem_mb,
        scope: opts.scope,
    };
    let mut rounds_to_converge = 0u32;
    let mut converged = false;
    let mut snapshot = None;
    let mut next_event = 0usize;
    let mut trace = Vec::new();

    let mut holder = advance(policy.as_mut(), &mut token, None);
    while let Some(u) = holder {
        if handoffs >= max_handoffs {
            break;
        }
        // Flows due before this hand-off appear now.
        if next_event < events.len() && events[next_event].at <= handoffs {
            let end = next_event
                + events[next_event..]
                    .iter()
                    .take_while(|e| e.at <= handoffs)
                    .count();
            st.add_flows(&events[next_event..end])?;
            if let Some(g) = global.as_mut() {
                let vms: Vec<VmIdx> = events[next_event..end]
                    .iter()
                    .flat_map(|e| [e.flow.a, e.flow.b])
                    .collect();
                // New flows change only their two VMs' costs (and so their
                // peers' rankings are untouched: their peers did not move).
                g.after_change_own(&st, &vms, opts.rule, cm);
            }
            next_event = end;
        }

        let (p, d) = if opts.scope == Scope::PAPER {
            let (p, d) = decide(&st.model(), &st.placement, st.shape, u, opts.rule, cm);
            (p, Step::Single(d))
        } else {
            decide_scoped(&st.model(), &st.placement, &st.lists, st.shape, u, settings)
        };
        let group = match opts.group {
            GroupMode::Off => None,
            GroupMode::WhenStuck if !d.is_noop() => None,
            _ => decide_group_move(&st.model(), &st.placement, &st.lists, st.shape, u, cm)
                .filter(|g| d.is_noop() || g.benefit - g.c_m > d.benefit() - step_threshold(&d)),
        };
        let beats_group = |net: f64| group.as_ref().is_none_or(|g| net > g.benefit - g.c_m);
        let mut multi = if opts.chain && d.is_noop() {
            decide_chain_move(&st.model(), &st.placement, &st.lists, st.shape, u, settings)
                .filter(|c| beats_group(c.benefit - c.c_m))
                .map(|c| Multi {
                    moves: vec![(u, c.from, c.to), (c.partner, c.to, c.partner_to)],
                    benefit: c.benefit,
                    net: c.benefit - c.c_m,
                    kind: MultiKind::Chain,
                })
        } else {
            None
        };
        if opts.cycle && d.is_noop() {
            let r =
                decide_rotation_move(&st.model(), &st.placement, &st.lists, st.shape, u, settings)
                    .filter(|r| beats_group(r.benefit - r.c_m))
                    .filter(|r| multi.as_ref().is_none_or(|m| r.benefit - r.c_m > m.net));
            if let Some(r) = r {
                multi = Some(Multi {
                    moves: r.moves.to_vec(),
                    benefit: r.benefit,
                    net: r.benefit - r.c_m,
                    kind: MultiKind::Rotation,
                });
            }
        }
        if opts.gswap && d.is_noop() {
            let g = decide_group_swap_move(&st.model(), &st.placement, &st.lists, st.shape, u, cm)
                .filter(|g| beats_group(g.benefit - g.c_m))
                .filter(|g| multi.as_ref().is_none_or(|m| g.benefit - g.c_m > m.net));
            if let Some(g) = g {
                multi = Some(Multi {
                    moves: g.moves,
                    benefit: g.benefit,
                    net: g.benefit - g.c_m,
                    kind: MultiKind::GroupSwap,
                });
            }
        }
        let group = if multi.is_some() { None } else { group };
        if let Some(c) = multi {
            let targets: Vec<(VmIdx, HostId)> = c.moves.iter().map(|&(v, _, to)| (v, to)).collect();
            zero_change_steps += exactly_zero(&st, &targets);
            let max = st.shape.max_vms();
            let mut hosts: Vec<HostId> = c.moves.iter().flat_map(|&(_, a, b)| [a, b]).collect();
            hosts.sort_unstable();
            hosts.dedup();
            let full_before: Vec<bool> = hosts
                .iter()
                .map(|&h| st.placement.count(h) == max)
                .collect();
            for &(v, from, to) in &c.moves {
                st.placement.move_vm(v, to);
                st.lists.moved(v, from, to);
                moved[v as usize] = true;
            }
            st.total -= c.benefit;
            migrations += c.moves.len() as u64;
            path_weight += c
                .moves
                .iter()
                .map(|&(_, a, b)| setup.topo.weight(a, b))
                .sum::<f64>();
            match c.kind {
                MultiKind::Chain => chains += 1,
                MultiKind::Rotation => rotations += 1,
                MultiKind::GroupSwap => group_swaps += 1,
            }
            this_round += 1;
            {
                // The holder learnt the others' new levels from the hosts it asked.
                let model = st.model();
                for &(v, _, _) in &c.moves[1..] {
                    if let Some(e) = token.get_mut(v) {
                        e.level = model.vm_level(&st.placement, v);
                    }
                }
            }
            if let Some(gi) = global.as_mut() {
                let members: Vec<VmIdx> = c.moves.iter().map(|&(v, _, _)| v).collect();
                let full_now = |h: HostId| st.placement.count(h) == max;
                let freed = hosts
                    .iter()
                    .zip(&full_before)
                    .find(|&(&h, &f)| f && !full_now(h));
                let filled = hosts
                    .iter()
                    .zip(&full_before)
                    .find(|&(&h, &f)| !f && full_now(h));
                gi.after_change(
                    &st,
                    &members,
                    freed.map(|(&h, _)| h),
                    filled.map(|(&h, _)| h),
                    opts.rule,
                    cm,
                );
            }
            let level_u = st.model().vm_level(&st.placement, u);
            token.update(u, level_u, Load::from_rate(p.load));
            handoffs += 1;
            if opts.trace {
                trace.push((u, Some(c.moves[0].2)));
            }
            if opts.self_check {
                self_check(&st, global.as_mut(), opts.rule, cm);
            }
            if opts.record_steps {
                step_costs.push(st.total);
            }
            on_handoff(handoffs);
        } else if let Some(g) = group {
            zero_change_steps += exactly_zero(&st, &g.moves);
            let x = g.from;
            let max = st.shape.max_vms();
            let was_full = st.placement.count(x) == max;
            let mut filled = Vec::new();
            for &(v, h) in &g.moves {
                st.placement.move_vm(v, h);
                st.lists.moved(v, x, h);
                moved[v as usize] = true;
                if st.placement.count(h) == max {
                    filled.push(h);
                }
            }
            st.total -= g.benefit;
            migrations += u64::from(g.migrations());
            path_weight += g
                .moves
                .iter()
                .map(|&(_, h)| setup.topo.weight(x, h))
                .sum::<f64>();
            groups += 1;
            this_round += 1;
            let members: Vec<VmIdx> = g.moves.iter().map(|&(v, _)| v).collect();
            {
                // The holder learnt every member's new level (it knows their peers).
                let model = st.model();
                for &v in &members {
                    if let Some(e) = token.get_mut(v) {
                        e.level = model.vm_level(&st.placement, v);
                    }
                }
            }
            if let Some(gi) = global.as_mut() {
                gi.after_change(&st, &members, was_full.then_some(x), None, opts.rule, cm);
                for h in filled {
                    gi.after_change(&st, &[], None, Some(h), opts.rule, cm);
                }
            }
            let level = token.get_mut(u).map_or(0, |e| e.level);
            token.update(u, level, Load::from_rate(p.load));
            handoffs += 1;
            if opts.trace {
                trace.push((u, g.moves.first().map(|&(_, h)| h)));
            }
            if opts.self_check {
                self_check(&st, global.as_mut(), opts.rule, cm);
            }
            if opts.record_steps {
                step_costs.push(st.total);
            }
            on_handoff(handoffs);
        } else {
            match d {
                Step::Single(Decision::Migrate {
                    from, to, benefit, ..
                }) => {
                    zero_change_steps += exactly_zero(&st, &[(u, to)]);
                    st.placement.move_vm(u, to);
                    st.lists.moved(u, from, to);
                    // The benefit of eq. 2 is exactly the drop of the eq. 1 total.
                    st.total -= benefit;
                    moved[u as usize] = true;
                    migrations += 1;
                    path_weight += setup.topo.weight(from, to);
                    this_round += 1;
                    if let Some(g) = global.as_mut() {
                        let max = st.shape.max_vms();
                        // Counts are after the move: x was full if it is one short now.
                        let freed = (st.placement.count(from) + 1 == max).then_some(from);
                        let filled = (st.placement.count(to) == max).then_some(to);
                        g.after_change(&st, &[u], freed, filled, opts.rule, cm);
                    }
                }
                Step::Single(Decision::Stay { .. }) => {}
                Step::Swap(s) => {
                    let w = s.partner;
                    zero_change_steps += exactly_zero(&st, &[(u, s.to), (w, s.from)]);
                    st.placement.move_vm(u, s.to);
                    st.lists.moved(u, s.from, s.to);
                    st.placement.move_vm(w, s.from);
                    st.lists.moved(w, s.to, s.from);
                    // score-core's swap benefit is the exact drop of the total.
                    st.total -= s.benefit;
                    moved[u as usize] = true;
                    moved[w as usize] = true;
                    migrations += 2;
                    path_weight += 2.0 * setup.topo.weight(s.from, s.to);
                    swaps += 1;
                    this_round += 1;
                    // The holder learnt w's new level from w's host.
                    if let Some(e) = token.get_mut(w) {
                        e.level = s.partner_level_after;
                    }
                    if let Some(g) = global.as_mut() {
                        // Both hosts keep their counts: no host crosses full.
                        g.after_change(&st, &[u, w], None, None, opts.rule, cm);
                    }
                }
            }
            token.update(u, d.level_after(), Load::from_rate(p.load));
            handoffs += 1;
            if opts.trace {
                trace.push((u, d.target()));
            }
            if opts.self_check {
                self_check(&st, global.as_mut(), opts.rule, cm);
            }
            if opts.record_steps {
                step_costs.push(st.total);
            }
            on_handoff(handoffs);
        }

        if let Some(g) = global.as_mut() {
            policy.feed_ranking(g.top(2));
        }
        let round_before = token.round;
        holder = advance(policy.as_mut(), &mut token, Some(u));
        if token.round != round_before {
            // A round ended: resynchronise the running total (no drift).
            st.total = st.model().total_cost(&st.placement);
            round_costs.push(st.total);
            round_migrations.push(this_round);
            if this_round > 0 {
                rounds_to_converge = token.round;
            }
            if opts.snapshot_round == Some(token.round) {
                snapshot = Some(st.placement.clone());
            }
            let mut quiet = this_round == 0 && next_event >= events.len();
            this_round = 0;
            let decay = CmDecay {
                decay: opts.cm_decay,
                floor: opts.cm_floor,
            };
            if !decay.is_constant() {
                // The token carries the round: every holder knows this
                // round's c_m. A quiet round ends the run only once c_m
                // has decayed to nothing that matters.
                quiet &= decay.settled(token.round);
                cm = decay.at(cm0, token.round);
                settings.cm = cm;
                if let Some(g) = global.as_mut() {
                    *g = GlobalIndex::new(&st, opts.rule, cm);
                }
            }
            if quiet {
                converged = true;
                break;
            }
            if token.round >= opts.max_rounds {
                break;
            }
        }
    }
    if this_round > 0 || round_migrations.is_empty() {
        round_migrations.push(this_round);
    }
    let final_cost = st.model().total_cost(&st.placement);
    let final_cost_unmoved = st.model().total_cost(&setup.placement);
    if snapshot.is_none() && opts.snapshot_round.is_some() {
        // Converged before the snapshot round: the placement no longer changes.
        snapshot = Some(st.placement.clone());
    }
    Ok(PolicyRun {
        policy: kind,
        c_m: cm0,
        initial_cost,
        final_cost,
        final_cost_unmoved,
        step_costs,
        round_costs,
        round_migrations,
        handoffs,
        migrations,
        migration_path_weight: path_weight,
        swaps,
        groups,
        chains,
        rotations,
        group_swaps,
        zero_change_steps,
        rounds: token.round,
        rounds_to_converge,
        converged,
        never_moved: moved.iter().filter(|&&m| !m).count() as u32,
        final_placement: st.placement,
        snapshot,
        elapsed_s: started.elapsed().as_secs_f64(),
        trace,
    })
}

/// The threshold a step had to beat: c_m for a migration, c_m(u) + c_m(w)
/// for a swap, nothing when u stays.
fn step_threshold(d: &Step) -> f64 {
    match d {
        Step::Single(Decision::Migrate { c_m, .. }) => *c_m,
        Step::Single(Decision::Stay { .. }) => 0.0,
        Step::Swap(s) => s.c_m,
    }
}

/// The slow checks of [`RunOptions::self_check`]; panics on a mismatch.
fn self_check(st: &State<'_>, global: Option<&mut GlobalIndex>, rule: Rule, cm: MigrationCost) {
    let model = st.model();
    let exact = model.total_cost(&st.placement);
    assert!(
        (exact - st.total).abs() <= 1e-9 * exact.abs().max(1.0),
        "running total {} drifted from {exact}",
        st.total
    );
    if let Some(g) = global {
        let shape = st.shape;
        let placement = &st.placement;
        let full = rank_by_saving(
            &model,
            placement,
            rule,
            cm,
            |_| shape.vm_mem_mb,
            |h| Some(shape.capacity(placement.count(h))),
        );
        let ours = g.top(1);
        assert_eq!(
            ours.first().copied(),
            full.first().map(|r| r.vm),
            "incremental global ranking differs from rank_by_saving"
        );
    }
}
