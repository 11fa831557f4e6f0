//! One host's protocol state machine. Time is the caller's: every input
//! carries `now`, nanoseconds since the Unix epoch by the host's clock
//! (the daemon passes the wall clock, the simulator its simulated one);
//! [`Node::poll_timeout`] says when the node next needs to be woken.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::BytesMut;

use super::swap::{CommitAction, Reservations, order as swap_order};
use crate::chain::{
    Chain, ChainDecider, ChainQuery, EjectionOffer, MAX_EJECT_ASKS, choose_ejection, level_at,
};
use crate::cycle::{
    Leg, Rotation, RotationOffer, RotationRequest, close_rotation, decide_rotation, extend_rotation,
};
use crate::decision::{self, Capacity, CmDecay, Decision, MigrationCost, Plan, Rule};
use crate::group::{GroupLimits, GroupMove, decide_group, local_group};
use crate::policy::{self, HostShape, PolicyKind, TokenPolicy, order_from_reports};
use crate::swap::{
    LocalVm, Query, Scope, ScopedDecider, Settings, Step, Swap, SwapOffer, SwapRequest,
    choose_swap_partner, plan_with,
};
use crate::token::{Load, Token, VmId};
use crate::topology::{HostId, Topology};
use crate::wire::{
    ChunkBitmap, ChunkOutcome, Datagram, EjectAcceptance, FlowEntry, FlowReport, Freshness, Header,
    KeyRing, MAX_GROUP_VMS, MAX_MEMBER_VMS, MAX_ROTATION_PEERS, MAX_SWAP_PEERS, Message,
    PartsAssembler, PartsOutcome, Reassembler, RejectReason, ReplayTable, RotationAcceptance,
    RotationLeg, RotationProposal, SwapAcceptance, SwapOrder, SwapProposal, SwapRefusal,
    SwapResult, TokenChunk, TokenOrder, token_chunks,
};

const NS_PER_MS: u64 = 1_000_000;

/// What a node is told once, at its start.
#[derive(Clone, Debug)]
pub struct Config {
    /// This host's address.
    pub me: Ipv4Addr,
    /// The data-centre tree (this host must be in it).
    pub topology: Arc<Topology>,
    /// The keys: the current one seals, all verify.
    pub keys: KeyRing,
    /// The watcher hosts, lowest address first.
    pub watchers: Vec<Ipv4Addr>,
    /// Who gets the token next (round-robin, distributed or load-aware).
    pub policy: PolicyKind,
    /// The decision rule.
    pub rule: Rule,
    /// c_m (of the first round, when it decays).
    pub migration_cost: MigrationCost,
    /// How c_m decays over the token's rounds (beyond the paper; constant
    /// by default): a holder prices with its token's round, an asked host
    /// with the latest round it knows (docs/PROTOCOL.md).
    pub cm_decay: CmDecay,
    /// VMs this host may run.
    pub vm_slots: u32,
    /// Memory of one VM, MiB (what a capacity answer counts in).
    pub vm_memory_mib: u64,
    /// Peers below this rate are ignored.
    pub min_rate: f64,
    /// Least time a holder keeps the token before deciding.
    pub token_hold_ns: u64,
    /// Wait for a hop acknowledgement before resending.
    pub hop_timeout_ns: u64,
    /// Resends before the VM is skipped.
    pub hop_retries: u32,
    /// Wait for a location or capacity answer.
    pub request_timeout_ns: u64,
    /// With no sign of the token for this long, the first watcher
    /// regenerates it (the i-th watcher after i + 1 times this).
    pub token_timeout_ns: u64,
    /// A VM migrates at most once per this time.
    pub hold_down_ns: u64,
    /// How long a learnt location is trusted.
    pub location_ttl_ns: u64,
    /// How long a slot promised in a capacity answer stays reserved; must
    /// exceed the longest migration.
    pub reservation_ns: u64,
    /// How often the host reports its VMs to the watchers.
    pub report_interval_ns: u64,
    /// Oldest datagram accepted, in ms.
    pub max_age_ms: u64,
    /// Candidate hosts, and whether a full one is asked for a swap (the
    /// paper's rule by default).
    pub scope: Scope,
    /// VMs a host may run beyond `vm_slots` for the time of a swap (its
    /// first migration arrived, its second not yet gone).
    pub migration_headroom: u32,
    /// Ejection chains (beyond the paper; off by default): when the
    /// decision with `scope` lets the held VM u stay, ask up to four full
    /// candidates where u gains to take u and send one of their VMs on,
    /// to u's host or to a third host with room (docs/PROTOCOL.md). An
    /// asked host with chains off refuses them.
    pub chains: bool,
    /// Rotations (beyond the paper; off by default): when u would still
    /// stay, ask up to four full candidates y where u gains to take u and
    /// send one of their VMs w on to a full third host z, which sends
    /// one of its VMs back to u's host (docs/PROTOCOL.md, "Rotations").
    /// Each of y and z needs `migration_headroom` for one VM. An asked
    /// host with rotations off refuses them.
    pub rotations: bool,
    /// Group moves (beyond the paper; off by default): when u would still
    /// stay, move u's group (its traffic component among this host's
    /// VMs) into a rack near the members' peers, with score-core's
    /// `group::decide_group`, each destination host reserving its
    /// members' slots first (docs/PROTOCOL.md, "Group moves").
    pub groups: bool,
    /// How long an asked host keeps a swap partner reserved, and how long
    /// a proposer waits for the partner to move; longer than any
    /// migration.
    pub swap_timeout_ns: u64,
    /// The hypervisor only advises: a migration asked of the driver moves
    /// nothing ([`MigrationOutcome::Advisory`]), so a swap never lets the
    /// other host move its VM first (this one's would not follow).
    pub advisory: bool,
    /// The global policy's coordinator: every host sends it its flows with
    /// their rates, and it sends every host the order the token follows
    /// (`policy::order_from_reports`). `None`: no coordinator.
    pub coordinator: Option<Ipv4Addr>,
    /// A host's memory, MiB (what the coordinator counts room in).
    pub memory_mib: u64,
}

impl Config {
    /// A configuration with the agent's defaults.
    pub fn new(
        me: Ipv4Addr,
        topology: Arc<Topology>,
        keys: KeyRing,
        watchers: Vec<Ipv4Addr>,
    ) -> Self {
        Config {
            me,
            topology,
            keys,
            watchers,
            policy: PolicyKind::Distributed,
            rule: Rule::default(),
            migration_cost: MigrationCost::Absolute(0.0),
            cm_decay: CmDecay::CONSTANT,
            vm_slots: 16,
            vm_memory_mib: 1024,
            min_rate: 0.0,
            token_hold_ns: 1_000_000_000,
            hop_timeout_ns: 300_000_000,
            hop_retries: 5,
            request_timeout_ns: 500_000_000,
            token_timeout_ns: 15_000_000_000,
            hold_down_ns: 60_000_000_000,
            location_ttl_ns: 30_000_000_000,
            reservation_ns: 600_000_000_000,
            report_interval_ns: 2_000_000_000,
            max_age_ms: 30_000,
            scope: Scope::PAPER,
            migration_headroom: 0,
            chains: false,
            rotations: false,
            groups: false,
            swap_timeout_ns: 600_000_000_000,
            advisory: false,
            coordinator: None,
            memory_mib: 16 * 1024,
        }
    }
}

/// What the host keeps across a restart (the daemon writes it to disk
/// whenever [`Output::Persist`] says so; the simulator keeps it across a
/// crash).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Persisted {
    /// Raised at every start ([`Node::new`] does it).
    pub incarnation: u32,
    /// The highest token epoch this host knew: epochs never go back.
    pub epoch: u64,
}

/// One hosted VM and its measured peers.
#[derive(Clone, Debug, PartialEq)]
pub struct VmFacts {
    /// The VM.
    pub id: VmId,
    /// (peer, λ(vm, peer) in bytes/s, both directions summed).
    pub peers: Vec<(VmId, f64)>,
    /// The hypervisor reports the VM's state undefined (a migration of it
    /// ended so): it counts against the slots and is never moved. Said by
    /// the facts, not only remembered from the migration's outcome, so a
    /// restarted node leaves it alone too.
    pub undefined: bool,
}

/// What the host measures and runs: its VMs and their peers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    /// The VMs running here.
    pub vms: Vec<VmFacts>,
    /// VMs running here that the host cannot name yet (the agent knows a
    /// VM by the address it sends from): they take slots all the same.
    pub unnamed: u32,
}

/// How a migration the node asked for ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MigrationOutcome {
    /// The VM runs on the target.
    Done,
    /// The VM still runs here.
    Failed,
    /// Nobody knows where the VM is: it is left alone from now on.
    Undefined,
    /// Advisory mode: nothing moved, the VM runs here (and is not held
    /// down: nothing happened to it).
    Advisory,
}

/// What the node asks its driver to do.
#[derive(Clone, Debug, PartialEq)]
pub enum Output {
    /// Send these bytes to `to`'s protocol port.
    Send {
        /// A host or VM address.
        to: Ipv4Addr,
        /// The sealed datagram.
        bytes: Vec<u8>,
    },
    /// Live-migrate `vm` to host `to`; report with [`Node::migration_done`].
    Migrate {
        /// The VM.
        vm: VmId,
        /// The target host.
        to: Ipv4Addr,
    },
    /// Write this state durably before anything else is sent.
    Persist(Persisted),
}

/// How a swap this node proposed, and the asked host accepted, ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SwapOutcome {
    /// Both VMs moved.
    Done,
    /// One moved, the other did not: both run on one host.
    Partial,
    /// Neither moved.
    Failed,
    /// Advisory mode (here or at the asked host): nothing moved.
    Advisory,
}

/// A copy of the token and how far it has come: epoch, round, VMs visited
/// in the round, and the host holding it. Ordered field by field; of two
/// copies of one epoch, the greater survives (docs/PROTOCOL.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TokenStamp {
    /// The token's epoch.
    pub epoch: u64,
    /// Its round.
    pub round: u32,
    /// VMs visited in the round.
    pub visited: u32,
    /// The host holding the copy, as a number.
    pub host: u32,
}

/// Why a holder decided nothing for its VM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoDecision {
    /// The VM migrated less than `hold_down` ago.
    HeldDown,
    /// The VM is moving, or reserved as a swap's partner.
    Busy,
    /// A migration of the VM ended undefined: it is left alone.
    Undefined,
    /// The VM is not (or no longer) here.
    NotHere,
}

/// What happened, for metrics and logs (typed: no strings turned back
/// into enums).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A datagram was dropped.
    Rejected {
        /// Why, in the agent's bounded set (a malformed chunk or list, or
        /// a message this node does not take, is `Other`).
        reason: RejectReason,
    },
    /// The token arrived for a hosted VM.
    TokenReceived {
        /// The VM.
        vm: VmId,
        /// The token's stamp here.
        stamp: TokenStamp,
    },
    /// A hop was acknowledged.
    TokenPassed {
        /// The VM it went to.
        to: VmId,
        /// Its epoch.
        epoch: u64,
    },
    /// Missing chunks of a hop were sent again.
    TokenRetransmitted,
    /// No host acknowledged the token for `vm`; it was skipped, and the
    /// token continues under a new epoch.
    HopSkipped {
        /// The VM skipped.
        vm: VmId,
        /// The epoch minted for the continuing token.
        epoch: u64,
    },
    /// A node gave up the token: every VM was skipped.
    TokenDropped {
        /// Its epoch.
        epoch: u64,
    },
    /// This watcher regenerated the token.
    TokenRegenerated {
        /// The new epoch.
        epoch: u64,
        /// VMs in it.
        vms: usize,
    },
    /// This node's copy was overtaken by another copy or a newer epoch, and
    /// ends here.
    TokenSuperseded {
        /// The stamp of the copy that ended.
        mine: TokenStamp,
    },
    /// The token completed a round (on the host that handed it on).
    RoundComplete {
        /// Its epoch.
        epoch: u64,
        /// The round now starting.
        round: u32,
    },
    /// The node learnt a newer epoch.
    EpochAdopted {
        /// The epoch.
        epoch: u64,
    },
    /// The holder decided for a VM: migrate or stay.
    Decided {
        /// Equation 2's outcome with its numbers.
        decision: Decision,
    },
    /// The holder held the token for a VM and decided nothing for it.
    NotDecided {
        /// The VM.
        vm: VmId,
        /// Why.
        why: NoDecision,
    },
    /// The holder agreed a swap with a full host, which accepted it.
    SwapAgreed {
        /// The swap with its numbers.
        swap: Swap,
        /// Which migration goes first.
        order: SwapOrder,
    },
    /// A host this node proposed a swap to refused it.
    SwapRefused {
        /// The proposing VM.
        vm: VmId,
        /// The asked host.
        by: Ipv4Addr,
        /// Why.
        reason: SwapRefusal,
    },
    /// The holder agreed an ejection chain with a full host, which
    /// accepted it: u goes there, its partner on to `partner_to`.
    ChainAgreed {
        /// The chain with its numbers (hosts as the topology's indices).
        chain: Chain,
        /// Which migration goes first.
        order: SwapOrder,
    },
    /// An ejection chain this node agreed as the proposer ended
    /// (`Partial`: one VM moved, the other did not).
    ChainFinished {
        /// The proposing VM.
        vm: VmId,
        /// The asked host's VM.
        partner: VmId,
        /// How.
        outcome: SwapOutcome,
    },
    /// The holder agreed a rotation: u to y, y's w to z, z's v here.
    RotationAgreed {
        /// The rotation with its numbers (hosts as the topology's
        /// indices).
        rotation: Rotation,
    },
    /// A rotation this node agreed as the holder ended (`Partial`: u, or
    /// u and w, moved; the rest did not).
    RotationFinished {
        /// The holder's VM u.
        vm: VmId,
        /// How.
        outcome: SwapOutcome,
    },
    /// The holder agreed a group move: every destination host reserved
    /// its members' slots.
    GroupAgreed {
        /// The group move with its numbers (hosts as the topology's
        /// indices).
        group: GroupMove,
    },
    /// A group move this node agreed as the holder ended (`Partial`: some
    /// members moved, not all; each is where its migration left it).
    GroupFinished {
        /// The holder's VM u.
        vm: VmId,
        /// Members that moved.
        moved: u32,
        /// How.
        outcome: SwapOutcome,
    },
    /// A swap this node agreed as the proposer ended.
    SwapFinished {
        /// The proposing VM.
        vm: VmId,
        /// The asked host's VM.
        partner: VmId,
        /// How.
        outcome: SwapOutcome,
    },
    /// This host answered a swap proposal: the partner it reserved, or
    /// why not.
    SwapAnswered {
        /// The proposing VM.
        vm: VmId,
        /// The partner, or the refusal.
        answer: Result<VmId, SwapRefusal>,
    },
    /// A migration was asked of the driver.
    MigrationStarted {
        /// The VM.
        vm: VmId,
        /// The target host.
        to: Ipv4Addr,
    },
    /// The coordinator's order arrived (or, on the coordinator, was
    /// computed): the global policy follows it at the next hand-off.
    OrderReceived {
        /// VMs in it.
        vms: usize,
    },
    /// A migration ended.
    MigrationFinished {
        /// The VM.
        vm: VmId,
        /// How.
        outcome: MigrationOutcome,
    },
}

/// Where the holder of a token is in its work for one VM.
#[derive(Debug)]
enum Phase {
    /// Keeping the token a little (rates need time).
    Holding { until: u64 },
    /// Waiting for the locations of the VM's peers.
    Locating {
        pending: BTreeMap<u64, VmId>,
        deadline: u64,
    },
    /// Asking candidate hosts for room, a swap or a chain, one at a time.
    Walking(Walk),
    /// A migration of the VM is under way.
    Migrating,
    /// An agreed swap is under way.
    Swapping(Deal),
    /// A group move: asking, reserving, moving.
    Grouping(Box<Grouping>),
}

/// The holder's group move for u: the capacities of the target racks'
/// hosts, then the destinations' reservations, then the migrations.
#[derive(Debug)]
struct Grouping {
    /// What is told if no group move is made.
    stay: Decision,
    load: Load,
    /// This host's VMs that may move, u first, as it knows them.
    local: Vec<LocalVm>,
    /// Capacity answers by host (`None`: none in time).
    rooms: BTreeMap<HostId, Option<Capacity>>,
    /// Questions in flight: capacity requests (by host) or reservations
    /// (by destination, with its members).
    asking: BTreeMap<u64, (HostId, Vec<VmId>)>,
    deadline: u64,
    stage: GroupStage,
}

#[derive(Debug)]
enum GroupStage {
    /// Asking the target racks' hosts for their capacity.
    Asking,
    /// The destinations reserving their members' slots; those that did.
    Reserving {
        group: GroupMove,
        granted: Vec<(HostId, Vec<VmId>)>,
    },
    /// Every member's migration started at once (each into a slot its
    /// destination reserved); those still under way, and those done.
    Moving {
        group: GroupMove,
        pending: BTreeMap<VmId, HostId>,
        moved: u32,
        outcome: Option<MigrationOutcome>,
    },
}

/// What the holder's walk over the candidates decides.
#[derive(Clone, Copy, Debug)]
enum WalkKind {
    /// The decision with the configured scope: a migration, a swap, or
    /// u stays (score-core's `ScopedDecider`).
    Decide,
    /// That decision let u stay: an ejection chain with a full candidate
    /// (score-core's `ChainDecider`), or `stay` is told.
    Chains { stay: Decision },
    /// Still u stays: a rotation through a full candidate and a full
    /// third host (score-core's `decide_rotation`), or `stay` is told.
    Rotations { stay: Decision },
}

/// The holder's walk over the plan's candidates: one question at a time,
/// replayed from the answers so far (the deciders borrow the plan).
#[derive(Debug)]
struct Walk {
    kind: WalkKind,
    plan: Box<Plan>,
    /// The peers the plan was made with.
    peers: Vec<decision::Peer>,
    /// Free memory here when the plan was made (the walk's input).
    home_free_mem: u64,
    answers: Vec<Answer>,
    /// Proposals accepted so far (their partners reserved there).
    accepted: Vec<Accepted>,
    seq: u64,
    /// The question in flight is a proposal (a swap or a chain), not a
    /// capacity request.
    proposing: bool,
    deadline: u64,
}

impl Walk {
    /// The answer that a time-out (or a refusal) of the question in
    /// flight gives.
    fn none(&self) -> Answer {
        match (self.proposing, self.kind) {
            (false, _) => Answer::Capacity(None),
            (true, WalkKind::Decide) => Answer::Swap(None),
            (true, WalkKind::Chains { .. }) => Answer::Eject(None),
            (true, WalkKind::Rotations { .. }) => Answer::Rotate(None),
        }
    }
}

/// A walk's next question: a capacity request (for `vm`, whose slot it
/// reserves; 0 reserves none), or a proposal.
enum Ask {
    Room(HostId, VmId),
    Swap(SwapRequest),
    Eject(SwapRequest),
    Rotate(RotationRequest),
}

/// How a walk ended.
#[derive(Clone, Copy, Debug)]
enum WalkEnd {
    /// The decision: a migration, a swap, or u stays.
    Step(Step),
    /// The chains' walk: the best chain (and u's level after it), or
    /// `stay`.
    Chain {
        stay: Decision,
        chain: Option<Chain>,
        level: Option<u8>,
    },
    /// The rotations' walk: the best rotation, or `stay`.
    Rotation {
        stay: Decision,
        rotation: Option<Rotation>,
    },
}

/// One answer of a walk, in the order asked.
#[derive(Clone, Copy, Debug)]
enum Answer {
    Capacity(Option<Capacity>),
    Swap(Option<SwapOffer>),
    Eject(Option<EjectionOffer>),
    Rotate(Option<RotationAcceptance>),
}

/// A proposal an asked host accepted, its partner reserved there.
#[derive(Clone, Copy, Debug)]
struct Accepted {
    /// The asked host.
    host: Ipv4Addr,
    vm: VmId,
    partner: VmId,
    /// Where the partner goes.
    partner_to: Ipv4Addr,
    /// The partner's level there.
    partner_level_after: u8,
    order: SwapOrder,
    /// A rotation's third host z and its VM v (reserved there, coming
    /// here).
    closing: Option<(Ipv4Addr, VmId)>,
}

/// The proposer's side of an agreed swap or ejection chain.
#[derive(Debug)]
struct Deal {
    /// The asked host.
    to: Ipv4Addr,
    partner: VmId,
    /// Where the partner goes: this host (a swap) or a third host (a
    /// chain).
    partner_to: Ipv4Addr,
    /// Agreed as a chain (its end is told as one).
    chain: bool,
    /// Agreed as a rotation (its end is told as one).
    rotation: bool,
    /// The proposing VM the commit names: the held VM, or a rotation's w
    /// (its second commit goes to z, where w came).
    commit_vm: VmId,
    /// A rotation's second commit, to z for v, once w has moved.
    then: Option<(Ipv4Addr, VmId)>,
    order: SwapOrder,
    stage: Stage,
    /// When the commit is sent again.
    resend_at: u64,
    /// When the proposer stops waiting for the partner.
    give_up_at: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Stage {
    /// The held VM moves first (into the asked host's headroom).
    FirstMove,
    /// Waiting for the partner's migration (commits sent).
    Committing,
    /// The partner came; the held VM moves now.
    SecondMove,
}

/// The asked host's side of a proposal while it locates its VMs' peers
/// (and, for a chain, asks the third hosts for room).
#[derive(Debug)]
struct Considering {
    seq: u64,
    proposal: SwapProposal,
    /// A chain proposal, with the proposer's round.
    eject: Option<u32>,
    pending: BTreeMap<u64, VmId>,
    /// A chain's capacity questions to third hosts: by sequence number.
    asking: BTreeMap<u64, HostId>,
    /// Their answers (`None`: not yet, or none).
    rooms: Vec<(HostId, Option<Capacity>)>,
    deadline: u64,
}

/// An asked host's side of a rotation proposal: locating its VMs' peers,
/// then (asked by the holder) asking third hosts to close the cycle.
#[derive(Debug)]
struct Rotating {
    /// Who asked, and the proposal's sequence number.
    from: Ipv4Addr,
    seq: u64,
    proposal: RotationProposal,
    pending: BTreeMap<u64, VmId>,
    /// The third hosts asked to close it were asked (once).
    asked: bool,
    /// Their questions in flight: by sequence number.
    closes: BTreeMap<u64, Ipv4Addr>,
    /// Their acceptances, by third host.
    offers: Vec<(Ipv4Addr, RotationAcceptance)>,
    deadline: u64,
}

/// What an asked host answers a swap or chain proposal with: the
/// proposer's host, this host's VMs that may be given and their peers,
/// the proposal as score-core's request, and this host's free memory.
struct Answering {
    now: u64,
    topo: Arc<Topology>,
    from: HostId,
    local: Vec<LocalVm>,
    req: SwapRequest,
    free_mem: u64,
}

/// An asked host's chain partner about to leave for a third host: the
/// slot asked for it there (a capacity request that reserves it).
#[derive(Debug)]
struct Placing {
    vm: VmId,
    partner: VmId,
    to: Ipv4Addr,
    seq: u64,
    deadline: u64,
}

#[derive(Debug)]
struct Held {
    token: Token,
    vm: VmId,
    phase: Phase,
    /// Another copy of this epoch overtook this one, or a newer epoch
    /// exists: it ends at its next step.
    superseded: bool,
    /// When the watchers are next told the token is alive.
    keepalive_at: u64,
}

#[derive(Debug)]
struct Sending {
    token: Token,
    to: VmId,
    transfer: u64,
    chunks: Vec<TokenChunk>,
    have: ChunkBitmap,
    attempts: u32,
    deadline: u64,
    /// VMs skipped in a row by this hand-off.
    skipped: usize,
}

fn offer_of(a: &SwapAcceptance) -> SwapOffer {
    SwapOffer {
        partner: a.partner,
        partner_gain: a.partner_gain,
        partner_cost_before: a.partner_cost_before,
        partner_cost_after: a.partner_cost_after,
        partner_level_after: a.partner_level_after,
        benefit: a.benefit,
        c_m: a.c_m,
    }
}

/// A rotation request on the wire: hosts as addresses, each leg's peers
/// cut to its share of [`MAX_ROTATION_PEERS`], the largest rates first.
fn rotation_proposal(topo: &Topology, r: &RotationRequest, round: u32) -> RotationProposal {
    let share = MAX_ROTATION_PEERS / 2;
    let legs = r
        .legs
        .iter()
        .map(|l| {
            let mut peers: Vec<(VmId, Ipv4Addr, f64)> =
                l.vm.peers
                    .iter()
                    .filter(|p| p.host < topo.host_count())
                    .map(|p| (p.id, topo.host_addr(p.host), p.rate))
                    .collect();
            peers.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.0.cmp(&b.0)));
            peers.truncate(share);
            RotationLeg {
                vm: l.vm.id,
                from: topo.host_addr(l.from),
                to: topo.host_addr(l.to),
                cost_before: l.cost_before,
                mem_mib: l.vm.mem_mb,
                peers,
            }
        })
        .collect();
    RotationProposal {
        round,
        c_m: r.c_m,
        home_free_mem_mib: r.home_free_mem_mb,
        legs,
    }
}

/// The request a rotation proposal carries, hosts as the topology's
/// indices; `None` if a host is not in it.
fn rotation_request(topo: &Topology, p: &RotationProposal) -> Option<RotationRequest> {
    let legs = p
        .legs
        .iter()
        .map(|l| {
            let peers = l
                .peers
                .iter()
                .map(|&(id, host, rate)| {
                    let host = topo.host_by_addr(host)?;
                    Some(decision::Peer { id, host, rate })
                })
                .collect::<Option<Vec<_>>>()?;
            Some(Leg {
                vm: LocalVm {
                    id: l.vm,
                    mem_mb: l.mem_mib,
                    peers,
                },
                from: topo.host_by_addr(l.from)?,
                to: topo.host_by_addr(l.to)?,
                cost_before: l.cost_before,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(RotationRequest {
        legs,
        c_m: p.c_m,
        home_free_mem_mb: p.home_free_mem_mib,
    })
}

/// The offer an acceptance `a` of the request `req` stands for: the legs
/// asked for, then the legs the asked hosts added (their VMs' peers stay
/// with their hosts); `None` if it is not a rotation of three hosts that
/// begins with the legs asked for.
fn rotation_offer(
    topo: &Topology,
    req: &RotationRequest,
    a: &RotationAcceptance,
    mem_mb: u64,
) -> Option<RotationOffer> {
    let [Some(x), Some(y), Some(z)] = a.hosts.map(|h| topo.host_by_addr(h)) else {
        return None;
    };
    let moves = [(a.vms[0], x, y), (a.vms[1], y, z), (a.vms[2], z, x)];
    let distinct = x != y && y != z && z != x && {
        let [u, w, v] = a.vms;
        u != w && w != v && v != u
    };
    let begins = req
        .legs
        .iter()
        .zip(&moves)
        .all(|(l, &(vm, from, to))| (l.vm.id, l.from, l.to) == (vm, from, to));
    if !distinct || !begins || req.legs.len() > 2 {
        return None;
    }
    let legs = moves
        .iter()
        .enumerate()
        .map(|(i, &(id, from, to))| {
            req.legs.get(i).cloned().unwrap_or(Leg {
                vm: LocalVm {
                    id,
                    mem_mb,
                    peers: Vec::new(),
                },
                from,
                to,
                cost_before: 0.0,
            })
        })
        .collect();
    Some(RotationOffer {
        legs,
        benefit: a.benefit,
        c_m: a.c_m,
        asked: 0,
    })
}

/// One host's protocol state machine (see the module documentation).
pub struct Node {
    cfg: Config,
    host: HostId,
    policy: Box<dyn TokenPolicy>,
    persisted: Persisted,
    now: u64,
    seq: u64,
    transfers: u64,
    replay: ReplayTable,
    reasm: Reassembler,
    hosted: BTreeMap<VmId, Vec<(VmId, f64)>>,
    /// VMs here that the facts cannot name: they take slots.
    unnamed: u32,
    frozen: BTreeSet<VmId>,
    migrating: BTreeMap<VmId, Ipv4Addr>,
    /// For each VM migrating: the hosts to tell where it went.
    peer_hosts: BTreeMap<VmId, BTreeSet<Ipv4Addr>>,
    migrated_at: HashMap<VmId, u64>,
    reservations: BTreeMap<VmId, u64>,
    locations: HashMap<VmId, (Ipv4Addr, u64)>,
    held: Option<Held>,
    sending: Option<Sending>,
    last_seen: u64,
    best_seen: Option<TokenStamp>,
    backup: Option<Token>,
    /// The backup copy (epoch, round) a members list was last sent for: a
    /// watcher sends one per round at most.
    members_sent: Option<(u64, u32)>,
    /// VMs a watcher said the token lacks, kept until the token arrives
    /// here (the list may overtake the token it is meant for), and when
    /// they came.
    joining: (Vec<VmId>, u64),
    /// Each host's last report: its VMs, and when it arrived.
    reports: BTreeMap<Ipv4Addr, (Vec<VmId>, u64)>,
    report_parts: PartsAssembler<FlowEntry>,
    next_report: u64,
    reports_sent: u64,
    /// The partners this host gave to swaps, by proposing VM.
    swaps: Reservations,
    /// A swap proposal being considered.
    considering: Option<Considering>,
    /// A chain's partner waiting for its slot on the third host.
    placing: Option<Placing>,
    /// A rotation proposal being considered.
    rotating: Option<Rotating>,
    /// Partners moving for a swap: partner -> proposing VM.
    partner_moves: BTreeMap<VmId, VmId>,
    /// The coordinator's last order, fed to a global policy at each
    /// hand-off.
    order: Option<Vec<VmId>>,
    order_parts: PartsAssembler<VmId>,
    /// The coordinator: each host's last flows, with their rates.
    flows: BTreeMap<Ipv4Addr, Vec<FlowEntry>>,
    /// The highest token round this node has seen (held, backed up or
    /// reported to it): what an asked host and the coordinator price c_m
    /// with when it decays.
    round_seen: u32,
    out: VecDeque<Output>,
    events: VecDeque<Event>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("me", &self.cfg.me)
            .field("epoch", &self.persisted.epoch)
            .field("holding", &self.held.as_ref().map(|h| h.vm))
            .finish()
    }
}

impl Node {
    /// A node starting at `now` with the state its host kept (`persisted`,
    /// default on a first start). Its incarnation is raised at once: the
    /// first output is the [`Output::Persist`] to write before sending.
    ///
    /// Panics if `cfg.me` is not a host of `cfg.topology`.
    pub fn new(cfg: Config, persisted: Persisted, now: u64) -> Node {
        let host = cfg
            .topology
            .host_by_addr(cfg.me)
            .expect("node address is a host of the topology");
        let persisted = Persisted {
            incarnation: persisted.incarnation.wrapping_add(1),
            epoch: persisted.epoch,
        };
        let hosts = cfg.topology.host_count() as usize;
        let replay = ReplayTable::new(
            hosts.max(16) * 2,
            Freshness {
                started_ms: now / NS_PER_MS,
                max_age_ms: cfg.max_age_ms,
            },
        );
        let policy = cfg.policy.build();
        let next_report = now;
        let mut n = Node {
            cfg,
            host,
            policy,
            persisted,
            now,
            seq: 0,
            transfers: 0,
            replay,
            reasm: Reassembler::default(),
            hosted: BTreeMap::new(),
            unnamed: 0,
            frozen: BTreeSet::new(),
            migrating: BTreeMap::new(),
            peer_hosts: BTreeMap::new(),
            migrated_at: HashMap::new(),
            reservations: BTreeMap::new(),
            locations: HashMap::new(),
            held: None,
            sending: None,
            last_seen: now,
            best_seen: None,
            backup: None,
            members_sent: None,
            joining: (Vec::new(), 0),
            reports: BTreeMap::new(),
            report_parts: PartsAssembler::default(),
            next_report,
            reports_sent: 0,
            swaps: Reservations::default(),
            considering: None,
            placing: None,
            rotating: None,
            partner_moves: BTreeMap::new(),
            order: None,
            order_parts: PartsAssembler::default(),
            flows: BTreeMap::new(),
            round_seen: 0,
            out: VecDeque::new(),
            events: VecDeque::new(),
        };
        n.out.push_back(Output::Persist(n.persisted));
        n
    }

    /// This host's address.
    pub fn me(&self) -> Ipv4Addr {
        self.cfg.me
    }

    /// The state to keep across a restart.
    pub fn persisted(&self) -> Persisted {
        self.persisted
    }

    /// The highest epoch this node knows.
    pub fn epoch(&self) -> u64 {
        self.persisted.epoch
    }

    /// The VM this node holds the token for, with the token's stamp.
    pub fn holding(&self) -> Option<(VmId, TokenStamp)> {
        self.held
            .as_ref()
            .filter(|h| !h.superseded)
            .map(|h| (h.vm, self.stamp(&h.token, Some(h.vm))))
    }

    /// Whether a hop is being sent (awaiting its acknowledgement).
    pub fn sending(&self) -> Option<(VmId, u64)> {
        self.sending.as_ref().map(|s| (s.to, s.token.epoch))
    }

    /// The next thing to do, if any.
    pub fn poll_output(&mut self) -> Option<Output> {
        self.out.pop_front()
    }

    /// The next event, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When the node must next be woken with [`Node::handle_timeout`].
    pub fn poll_timeout(&self) -> Option<u64> {
        let mut t = self.next_report;
        if let Some(h) = &self.held {
            t = t.min(h.keepalive_at);
            match &h.phase {
                Phase::Holding { until } => t = t.min(*until),
                Phase::Locating { deadline, .. } | Phase::Walking(Walk { deadline, .. }) => {
                    t = t.min(*deadline)
                }
                Phase::Swapping(d) if d.stage == Stage::Committing => t = t.min(d.resend_at),
                Phase::Grouping(g) if !matches!(g.stage, GroupStage::Moving { .. }) => {
                    t = t.min(g.deadline)
                }
                Phase::Migrating | Phase::Swapping(_) | Phase::Grouping(_) => {}
            }
        }
        if let Some(c) = &self.considering {
            t = t.min(c.deadline);
        }
        if let Some(r) = &self.rotating {
            t = t.min(r.deadline);
        }
        if let Some(p) = &self.placing {
            t = t.min(p.deadline);
        }
        if let Some(s) = &self.sending {
            t = t.min(s.deadline);
        }
        if let Some(w) = self.watch_deadline() {
            t = t.min(w);
        }
        Some(t)
    }

    /// c_m changed: what the host learnt from its migrations (the shell's
    /// [`crate::migcost::Estimator`]) prices the decisions from now on; a
    /// decaying schedule scales it as it scaled the configured one.
    pub fn set_migration_cost(&mut self, cm: MigrationCost) {
        self.cfg.migration_cost = cm;
    }

    /// The host's facts changed (or are refreshed): its VMs and their
    /// peers. A VM that arrived frees the reservation made for it.
    pub fn set_facts(&mut self, now: u64, facts: &HostFacts) {
        self.now = now.max(self.now);
        self.hosted = facts.vms.iter().map(|v| (v.id, v.peers.clone())).collect();
        self.unnamed = facts.unnamed;
        self.frozen
            .extend(facts.vms.iter().filter(|v| v.undefined).map(|v| v.id));
        let hosted = &self.hosted;
        self.reservations.retain(|vm, _| !hosted.contains_key(vm));
    }

    /// A migration asked with [`Output::Migrate`] ended.
    pub fn migration_done(&mut self, now: u64, vm: VmId, outcome: MigrationOutcome) {
        self.now = now.max(self.now);
        let Some(to) = self.migrating.remove(&vm) else {
            return;
        };
        let tell = self.peer_hosts.remove(&vm).unwrap_or_default();
        match outcome {
            MigrationOutcome::Done => {
                self.locations
                    .insert(vm, (to, now.saturating_add(self.cfg.location_ttl_ns)));
                self.hosted.remove(&vm);
                // The hosts of its peers would otherwise price their VMs
                // against its old place until their cached location
                // expires; only they are told, not every host.
                let notice = Message::MigrationNotice {
                    vm,
                    from: self.cfg.me,
                    to,
                };
                for host in tell {
                    self.send(host, &notice);
                }
            }
            MigrationOutcome::Failed => {}
            MigrationOutcome::Undefined => {
                self.frozen.insert(vm);
            }
            MigrationOutcome::Advisory => {
                self.migrated_at.remove(&vm);
            }
        }
        self.events
            .push_back(Event::MigrationFinished { vm, outcome });
        if let Some(u) = self.partner_moves.remove(&vm) {
            // A swap's partner: answer the proposer's latest commit.
            let result = match outcome {
                MigrationOutcome::Done => SwapResult::Done,
                MigrationOutcome::Failed => SwapResult::Failed,
                MigrationOutcome::Undefined => SwapResult::Undefined,
                MigrationOutcome::Advisory => SwapResult::Advisory,
            };
            let linger = now.saturating_add(self.cfg.swap_timeout_ns);
            if outcome == MigrationOutcome::Done {
                // The partner left first: the proposing VM comes next, into
                // the slot it freed, which is promised to it until it does.
                self.promise_slot(u);
            }
            if let Some((seq, proposer)) = self.swaps.end(u, result, linger) {
                let done = Message::SwapDone {
                    in_reply_to: seq,
                    vm: u,
                    partner: vm,
                    result,
                };
                self.send(proposer, &done);
            }
        }
        if self.group_member_done(vm, outcome) {
            return;
        }
        let Some(h) = self.held.as_mut().filter(|h| h.vm == vm) else {
            return;
        };
        match &mut h.phase {
            Phase::Migrating => self.hand_on(),
            Phase::Swapping(d) => match d.stage {
                Stage::FirstMove if outcome == MigrationOutcome::Done => {
                    d.stage = Stage::Committing;
                    d.resend_at = now;
                    // The partner (a rotation's v) comes into the slot the
                    // held VM freed.
                    let coming = d.then.map_or(d.partner, |(_, v)| v);
                    self.promise_slot(coming);
                    self.send_commit();
                }
                Stage::FirstMove => {
                    let (to, partner, then) = (d.to, d.partner, d.then);
                    self.cancel_swap(to, vm, partner);
                    if let Some((z, v)) = then {
                        self.cancel_swap(z, partner, v);
                    }
                    self.swap_finished(if outcome == MigrationOutcome::Advisory {
                        SwapOutcome::Advisory
                    } else {
                        SwapOutcome::Failed
                    });
                }
                Stage::SecondMove if outcome == MigrationOutcome::Done => {
                    self.swap_finished(SwapOutcome::Done)
                }
                Stage::SecondMove if outcome == MigrationOutcome::Advisory => {
                    self.swap_finished(SwapOutcome::Advisory)
                }
                Stage::SecondMove => self.swap_finished(SwapOutcome::Partial),
                Stage::Committing => {}
            },
            _ => {}
        }
    }

    /// Time passed: handles every deadline that is due at `now`.
    pub fn handle_timeout(&mut self, now: u64) {
        self.now = now.max(self.now);
        let now = self.now;
        if now >= self.next_report {
            self.report();
            self.next_report = now + self.cfg.report_interval_ns;
        }
        if self.held.as_ref().is_some_and(|h| now >= h.keepalive_at) {
            self.tell_alive();
        }
        let due = match self.held.as_ref().map(|h| &h.phase) {
            Some(Phase::Holding { until }) => now >= *until,
            Some(Phase::Locating { deadline, .. })
            | Some(Phase::Walking(Walk { deadline, .. })) => now >= *deadline,
            Some(Phase::Swapping(d)) => d.stage == Stage::Committing && now >= d.resend_at,
            Some(Phase::Grouping(g)) => {
                !matches!(g.stage, GroupStage::Moving { .. }) && now >= g.deadline
            }
            _ => false,
        };
        if due {
            match self.held.as_mut().map(|h| &mut h.phase) {
                Some(Phase::Holding { .. }) => self.start_decision(),
                Some(Phase::Locating { .. }) => self.plan_and_ask(),
                Some(Phase::Walking(w)) => {
                    w.answers.push(w.none());
                    self.walk_next();
                }
                Some(Phase::Swapping(d)) if now >= d.give_up_at => {
                    // The partner's fate is unknown; the swap timeout is
                    // longer than any migration, so it has ended by now.
                    let outcome = match d.order {
                        SwapOrder::ProposerFirst => SwapOutcome::Partial,
                        SwapOrder::PartnerFirst => SwapOutcome::Failed,
                    };
                    // A rotation's third host, not yet committed, is
                    // released.
                    if let Some((z, v)) = d.then {
                        let w = d.partner;
                        self.cancel_swap(z, w, v);
                    }
                    self.swap_finished(outcome);
                }
                Some(Phase::Swapping(_)) => self.send_commit(),
                Some(Phase::Grouping(g)) => {
                    // Unanswered questions: no room.
                    let late = std::mem::take(&mut g.asking);
                    if matches!(g.stage, GroupStage::Asking) {
                        for (h, _) in late.into_values() {
                            g.rooms.insert(h, None);
                        }
                        self.group_next();
                    } else {
                        // A reservation may have been made: released.
                        for (h, vms) in late.into_values() {
                            self.release_group(h, vms);
                        }
                        self.group_refused();
                    }
                }
                _ => {}
            }
        }
        if self.considering.as_ref().is_some_and(|c| now >= c.deadline) {
            self.answer_proposal();
        }
        if self.rotating.as_ref().is_some_and(|r| now >= r.deadline) {
            // Unanswered questions are dropped: a late answer is released.
            if let Some(r) = self.rotating.as_mut() {
                r.closes.clear();
                r.pending.clear();
            }
            self.answer_rotation();
        }
        if self.placing.as_ref().is_some_and(|p| now >= p.deadline) {
            self.placed(None);
        }
        if self.sending.as_ref().is_some_and(|s| now >= s.deadline) {
            self.hop_timed_out();
        }
        if self.watch_deadline().is_some_and(|d| now >= d) {
            self.regenerate();
        }
    }

    /// A datagram arrived on `received_on` (this host's address, or the
    /// hosted VM's address it was intercepted for).
    pub fn handle_datagram(&mut self, now: u64, received_on: Ipv4Addr, bytes: &[u8]) {
        self.now = now.max(self.now);
        let now_ms = self.now / NS_PER_MS;
        self.cfg.keys.expire(now_ms);
        let d = match Datagram::decode(bytes, &self.cfg.keys) {
            Ok(d) => d,
            Err(e) => return self.reject(e.reject_reason()),
        };
        if let Err(e) = d.header.check_destination(received_on) {
            return self.reject(e.reject_reason());
        }
        if let Err(e) = self.replay.accept(&d.header, now_ms) {
            return self.reject(e.reject_reason());
        }
        let h = d.header;
        if h.epoch > self.persisted.epoch {
            self.adopt(h.epoch);
        }
        match d.message {
            Message::TokenChunk(c) => self.on_chunk(&h, received_on, &c),
            Message::HopAck(a) => {
                if let Some(s) = self.sending.as_mut().filter(|s| s.transfer == a.transfer) {
                    if a.received.count() == s.have.count() {
                        for i in 0..s.have.count() {
                            if a.received.contains(i) {
                                s.have.set(i);
                            }
                        }
                    }
                    if s.have.is_complete() {
                        let s = self.sending.take().expect("checked");
                        self.events.push_back(Event::TokenPassed {
                            to: s.to,
                            epoch: s.token.epoch,
                        });
                    }
                }
            }
            Message::TokenSeen {
                holder,
                round,
                visited,
                host,
            } => self.on_seen(
                &h,
                holder,
                TokenStamp {
                    epoch: h.epoch,
                    round,
                    visited,
                    host: u32::from(host),
                },
            ),
            Message::LocationRequest { vm } => {
                if u32::from(received_on) == vm && self.hosted.contains_key(&vm) {
                    let reply = Message::LocationResponse {
                        in_reply_to: h.seq,
                        vm,
                        host: self.cfg.me,
                    };
                    self.send(h.sender, &reply);
                }
            }
            Message::LocationResponse {
                in_reply_to,
                vm,
                host,
            } => {
                self.locations
                    .insert(vm, (host, self.now + self.cfg.location_ttl_ns));
                let done = match self.held.as_mut().map(|x| &mut x.phase) {
                    Some(Phase::Locating { pending, .. }) => {
                        pending.remove(&in_reply_to);
                        pending.is_empty()
                    }
                    _ => false,
                };
                if done {
                    self.plan_and_ask();
                }
                let considered = self.considering.as_mut().is_some_and(|c| {
                    c.pending.remove(&in_reply_to).is_some() && c.pending.is_empty()
                });
                if considered {
                    self.answer_proposal();
                }
                let rotating = self.rotating.as_mut().is_some_and(|r| {
                    r.pending.remove(&in_reply_to).is_some() && r.pending.is_empty()
                });
                if rotating {
                    self.answer_rotation();
                }
            }
            Message::CapacityRequest { vm } => {
                let free = self.free_slots();
                // An advisory cluster moves nothing: a promise would only
                // fill the host with VMs that never come.
                if free > 0 && vm != 0 && !self.cfg.advisory {
                    self.reservations
                        .insert(vm, self.now + self.cfg.reservation_ns);
                }
                let reply = Message::CapacityResponse {
                    in_reply_to: h.seq,
                    free_slots: free,
                    free_memory_mib: u64::from(free) * self.cfg.vm_memory_mib,
                };
                self.send(h.sender, &reply);
            }
            Message::CapacityResponse {
                in_reply_to,
                free_slots,
                free_memory_mib,
            } => {
                let cap = Capacity {
                    free_slots,
                    free_mem_mb: free_memory_mib,
                };
                self.on_capacity(in_reply_to, cap);
            }
            Message::MigrationNotice { vm, to, .. } => {
                self.locations
                    .insert(vm, (to, self.now + self.cfg.location_ttl_ns));
            }
            Message::FlowReport(r) => {
                if (self.is_watcher() || self.is_coordinator())
                    && let Ok(PartsOutcome::Complete(entries)) =
                        self.report_parts.insert_flow_report(h.sender, r)
                {
                    let mut vms: Vec<VmId> = entries.iter().map(|e| e.vm).collect();
                    vms.sort_unstable();
                    vms.dedup();
                    if self.is_watcher() {
                        self.reports.insert(h.sender, (vms, self.now));
                    }
                    if self.is_coordinator() {
                        self.flows.insert(h.sender, entries);
                    }
                }
            }
            Message::Members { vms } => {
                if let Some(x) = self.held.as_mut().filter(|x| !x.superseded) {
                    for vm in vms {
                        if !self.frozen.contains(&vm) {
                            x.token.insert(vm);
                        }
                    }
                } else {
                    self.joining = (vms, self.now);
                }
            }
            Message::SwapPropose(p) => self.on_propose(&h, p, None),
            Message::SwapAccept(a) => {
                let accepted = Accepted {
                    host: h.sender,
                    vm: a.vm,
                    partner: a.partner,
                    partner_to: self.cfg.me,
                    partner_level_after: a.partner_level_after,
                    order: a.order,
                    closing: None,
                };
                self.on_accept(a.in_reply_to, Answer::Swap(Some(offer_of(&a))), accepted);
            }
            Message::SwapRefuse {
                in_reply_to,
                vm,
                reason,
            } => {
                // A third host's refusal, for a rotation extended here.
                let mut all = None;
                if let Some(r) = self.rotating.as_mut()
                    && r.closes.get(&in_reply_to) == Some(&h.sender)
                {
                    r.closes.remove(&in_reply_to);
                    all = Some(r.closes.is_empty());
                }
                if let Some(all) = all {
                    if all {
                        self.answer_rotation();
                    }
                    return;
                }
                let none = match self.held.as_ref().map(|x| &x.phase) {
                    Some(Phase::Walking(w)) if w.proposing => Some(w.none()),
                    _ => None,
                };
                if none.is_some_and(|n| self.walk_answer(in_reply_to, None, n)) {
                    self.events.push_back(Event::SwapRefused {
                        vm,
                        by: h.sender,
                        reason,
                    });
                    self.walk_next();
                }
            }
            Message::EjectPropose { round, proposal } => self.on_propose(&h, proposal, Some(round)),
            Message::EjectAccept(a) => self.on_eject_accept(h.sender, a),
            Message::RotatePropose(p) => self.on_rotate_propose(&h, p),
            Message::RotateAccept(a) => self.on_rotate_accept(h.sender, a),
            Message::SwapCommit { vm, partner, go } => self.on_commit(&h, vm, partner, go),
            Message::SwapDone {
                vm,
                partner,
                result,
                ..
            } => self.on_swap_done(h.sender, vm, partner, result),
            Message::GroupReserve { vms } => {
                let free = self.free_slots();
                // All of them or none: a group move needs every slot.
                let sane = !vms.iter().any(|v| self.hosted.contains_key(v));
                let granted = sane && u64::from(free) >= vms.len() as u64;
                // An advisory cluster moves nothing: as for a capacity
                // request, nothing is promised.
                if granted && !self.cfg.advisory {
                    let until = self.now.saturating_add(self.cfg.reservation_ns);
                    for v in vms {
                        self.reservations.insert(v, until);
                    }
                }
                let free = if sane { free } else { 0 };
                let reply = Message::CapacityResponse {
                    in_reply_to: h.seq,
                    free_slots: free,
                    free_memory_mib: u64::from(free) * self.cfg.vm_memory_mib,
                };
                self.send(h.sender, &reply);
            }
            Message::GroupRelease { vms } => {
                for v in vms {
                    if !self.hosted.contains_key(&v) {
                        self.reservations.remove(&v);
                    }
                }
            }
            Message::TokenOrder(o) => {
                if self.cfg.coordinator != Some(h.sender) {
                    return self.reject(RejectReason::Other);
                }
                match self.order_parts.insert_token_order(h.sender, o) {
                    Ok(PartsOutcome::Complete(vms)) => self.follow_order(vms),
                    Ok(_) => {}
                    Err(_) => self.reject(RejectReason::Other),
                }
            }
        }
    }

    fn reject(&mut self, reason: RejectReason) {
        self.events.push_back(Event::Rejected { reason });
    }

    fn is_watcher(&self) -> bool {
        self.cfg.watchers.contains(&self.cfg.me)
    }

    fn is_coordinator(&self) -> bool {
        self.cfg.coordinator == Some(self.cfg.me)
    }

    /// The coordinator's order, followed by a global policy at the next
    /// hand-off (a policy that needs no global knowledge ignores it).
    fn follow_order(&mut self, vms: Vec<VmId>) {
        self.events
            .push_back(Event::OrderReceived { vms: vms.len() });
        self.order = Some(vms);
    }

    /// The stamp of `token` here: held for `holder` (whose visit counts
    /// from the token's arrival), or in transit (`None`). So the copy a
    /// receiver holds is always greater than the sender's last report.
    fn stamp(&self, token: &Token, holder: Option<VmId>) -> TokenStamp {
        let visited = token.entries().iter().filter(|e| e.visited).count() as u32;
        let own = holder
            .and_then(|vm| token.get(vm))
            .is_some_and(|e| !e.visited);
        TokenStamp {
            epoch: token.epoch,
            round: token.round,
            visited: visited + u32::from(own),
            host: u32::from(self.cfg.me),
        }
    }

    /// VMs here and slots promised.
    fn used(&mut self) -> u32 {
        let now = self.now;
        self.reservations.retain(|_, until| *until > now);
        self.swaps.expire(now);
        (self.hosted.len() + self.reservations.len()) as u32 + self.unnamed
    }

    /// Whether this node's own decision may claim the headroom: while it
    /// asks for swaps (its proposals offer the headroom), and while a
    /// swap whose partner comes first is under way.
    fn holder_claims(&self) -> bool {
        match self.held.as_ref().map(|h| &h.phase) {
            Some(Phase::Walking(w)) => match w.kind {
                WalkKind::Decide => self.cfg.scope.swaps,
                WalkKind::Chains { .. } => true,
                // u leaves first: no VM comes here before it.
                WalkKind::Rotations { .. } => false,
            },
            // A chain's partner goes to a third host: no headroom here.
            Some(Phase::Swapping(d)) => {
                d.order == SwapOrder::PartnerFirst && d.partner_to == self.cfg.me
            }
            _ => false,
        }
    }

    /// The headroom is taken: by a swap accepted here whose proposing VM
    /// comes first, or by this node's own swap.
    fn headroom_taken(&self) -> bool {
        self.swaps.incoming_first() || self.holder_claims()
    }

    /// Slots free for a capacity answer: a slot the headroom may need is
    /// not offered.
    fn free_slots(&mut self) -> u32 {
        let used = self.used() + u32::from(self.headroom_taken());
        self.cfg.vm_slots.saturating_sub(used)
    }

    /// Keeps a slot for `vm`, which is to arrive (the second migration of
    /// a swap, into the slot its first one freed), until it does or the
    /// reservation time passes: no capacity answer may promise it.
    fn promise_slot(&mut self, vm: VmId) {
        if !self.hosted.contains_key(&vm) {
            self.reservations
                .insert(vm, self.now.saturating_add(self.cfg.reservation_ns));
        }
    }

    /// Whether one VM more may arrive before one leaves (the slots and the
    /// headroom, with every promise counted).
    fn room_for_one_more(&mut self) -> bool {
        let used = u64::from(self.used()) + 1;
        used <= u64::from(self.cfg.vm_slots) + u64::from(self.cfg.migration_headroom)
    }

    /// Learns a newer epoch: every copy of an older one held or being
    /// sent here ends.
    fn adopt(&mut self, epoch: u64) {
        if epoch <= self.persisted.epoch {
            return;
        }
        self.persisted.epoch = epoch;
        self.out.push_back(Output::Persist(self.persisted));
        self.events.push_back(Event::EpochAdopted { epoch });
        self.reasm.discard_below_epoch(epoch);
        if let Some(h) = self.held.as_mut().filter(|h| h.token.epoch < epoch) {
            h.superseded = true;
        }
        if self.sending.as_ref().is_some_and(|s| s.token.epoch < epoch) {
            let s = self.sending.take().expect("checked");
            let mine = self.stamp(&s.token, None);
            self.events.push_back(Event::TokenSuperseded { mine });
        }
        self.drop_superseded_if_idle();
    }

    /// A copy that is superseded while it only waits (its hold, a location
    /// or capacity answer) ends now; one whose VM is migrating ends when
    /// the migration does.
    fn drop_superseded_if_idle(&mut self) {
        let idle = self.held.as_ref().is_some_and(|h| {
            h.superseded
                && !matches!(h.phase, Phase::Migrating | Phase::Swapping(_))
                && !matches!(&h.phase, Phase::Grouping(g) if matches!(g.stage, GroupStage::Moving { .. }))
        });
        if idle {
            let h = self.held.take().expect("checked");
            let mine = self.stamp(&h.token, Some(h.vm));
            self.events.push_back(Event::TokenSuperseded { mine });
            match h.phase {
                Phase::Walking(w) => {
                    for a in w.accepted {
                        self.release(&a);
                    }
                }
                Phase::Grouping(g) => {
                    if let GroupStage::Reserving { granted, .. } = g.stage {
                        for (to, vms) in granted.into_iter().chain(g.asking.into_values()) {
                            self.release_group(to, vms);
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// Mints a new epoch, greater than any this node knows and unique to
    /// it: the count in the high 32 bits, this host's address in the low.
    fn mint(&mut self) -> u64 {
        let count = (self.persisted.epoch >> 32) + 1;
        let epoch = (count << 32) | u64::from(u32::from(self.cfg.me));
        self.adopt(epoch);
        epoch
    }

    fn seal(&mut self, to: Ipv4Addr, message: &Message) -> Option<Vec<u8>> {
        self.seq += 1;
        let header = Header {
            sender: self.cfg.me,
            destination: to,
            incarnation: self.persisted.incarnation,
            sent_at_ms: self.now / NS_PER_MS,
            epoch: self.persisted.epoch,
            seq: self.seq,
        };
        let mut buf = BytesMut::new();
        message
            .encode(&header, self.cfg.keys.current(), &mut buf)
            .ok()?;
        Some(buf.to_vec())
    }

    /// Sends `message`; returns its sequence number.
    fn send(&mut self, to: Ipv4Addr, message: &Message) -> u64 {
        if let Some(bytes) = self.seal(to, message) {
            self.out.push_back(Output::Send { to, bytes });
        }
        self.seq
    }

    fn send_to_watchers(&mut self, message: &Message) {
        for w in self.cfg.watchers.clone() {
            if w != self.cfg.me {
                self.send(w, message);
            }
        }
    }

    fn seen_message(holder: VmId, stamp: TokenStamp) -> Message {
        Message::TokenSeen {
            holder,
            round: stamp.round,
            visited: stamp.visited,
            host: Ipv4Addr::from(stamp.host),
        }
    }

    /// Reports a copy held here to the watchers (and to itself if it is
    /// one).
    fn report_copy(&mut self, holder: VmId, token: &Token, held: bool) {
        let stamp = self.stamp(token, held.then_some(holder));
        self.last_seen = self.now;
        if self.is_watcher() {
            self.note_stamp(stamp);
        }
        self.send_to_watchers(&Self::seen_message(holder, stamp));
    }

    fn tell_alive(&mut self) {
        let Some(h) = self.held.as_mut() else {
            return;
        };
        h.keepalive_at = self.now + (self.cfg.token_timeout_ns / 3).max(1);
        let (vm, token) = (h.vm, h.token.clone());
        self.report_copy(vm, &token, true);
    }

    /// A watcher's record of the greatest copy of the newest epoch.
    fn note_stamp(&mut self, stamp: TokenStamp) {
        if self.best_seen.is_none_or(|b| stamp > b) {
            self.best_seen = Some(stamp);
        }
    }

    fn on_seen(&mut self, h: &Header, holder: VmId, stamp: TokenStamp) {
        if stamp.epoch >= self.persisted.epoch {
            self.last_seen = self.now;
            self.round_seen = self.round_seen.max(stamp.round);
        }
        // A notice that a greater copy of this epoch exists ends ours.
        let overtaken = self.held.as_ref().is_some_and(|x| {
            stamp.host != u32::from(self.cfg.me) && stamp > self.stamp(&x.token, Some(x.vm))
        });
        if overtaken {
            if let Some(x) = self.held.as_mut() {
                x.superseded = true;
            }
            self.drop_superseded_if_idle();
        }
        if !self.is_watcher() {
            return;
        }
        match self.best_seen {
            // The reporter's copy is behind a copy another host reported:
            // tell it, so it ends.
            Some(b) if b > stamp && b.host != stamp.host && b.epoch >= stamp.epoch => {
                let m = Self::seen_message(0, b);
                // Sealed in b's epoch at least (ours is never lower).
                self.send(h.sender, &m);
            }
            _ => {
                self.note_stamp(stamp);
                if stamp.epoch >= self.persisted.epoch && holder != 0 {
                    self.offer_members(holder);
                }
            }
        }
    }

    /// Sends the holder of the copy just reported the VMs that hosts
    /// reported lately and the last round's copy lacks: once per round,
    /// so a lost list is sent again a round later (docs/PROTOCOL.md,
    /// "Membership").
    fn offer_members(&mut self, holder: VmId) {
        let Some(b) = &self.backup else {
            return;
        };
        let round = (b.epoch, b.round);
        if self.members_sent == Some(round) {
            return;
        }
        let mut missing: Vec<VmId> = self
            .reported_members()
            .into_iter()
            .chain(self.hosted.keys().copied())
            .filter(|vm| b.get(*vm).is_none() && !self.frozen.contains(vm))
            .collect();
        missing.sort_unstable();
        missing.dedup();
        missing.truncate(MAX_MEMBER_VMS);
        self.members_sent = Some(round);
        if !missing.is_empty() {
            self.send(Ipv4Addr::from(holder), &Message::Members { vms: missing });
        }
    }

    fn on_chunk(&mut self, h: &Header, received_on: Ipv4Addr, c: &TokenChunk) {
        if h.epoch < self.persisted.epoch {
            // A copy of an older epoch: refuse it, and tell the sender the
            // newer epoch, so it stops resending (and skipping).
            self.reject(RejectReason::StaleEpoch);
            let best = self.best_seen.filter(|b| b.epoch == self.persisted.epoch);
            let stamp = best.unwrap_or(TokenStamp {
                epoch: self.persisted.epoch,
                round: 0,
                visited: 0,
                host: 0,
            });
            self.send(h.sender, &Self::seen_message(0, stamp));
            return;
        }
        self.last_seen = self.now;
        let outcome = self.reasm.insert(h, c);
        let ack = match &outcome {
            Ok(ChunkOutcome::AlreadyComplete) | Ok(ChunkOutcome::Complete(_)) => {
                Some(crate::wire::HopAck {
                    transfer: c.transfer,
                    received: ChunkBitmap::full(c.count),
                })
            }
            Ok(_) => self.reasm.ack(h.sender, c.transfer),
            Err(_) => {
                self.reject(RejectReason::Other);
                None
            }
        };
        if let Some(a) = ack {
            self.send(h.sender, &Message::HopAck(a));
        }
        if let Ok(ChunkOutcome::Complete(token)) = outcome {
            if received_on == self.cfg.me {
                // A watcher's backup copy.
                if self
                    .backup
                    .as_ref()
                    .is_none_or(|b| self.stamp(b, None) < self.stamp(&token, None))
                {
                    self.backup = Some(token);
                }
            } else {
                self.receive_token(token, u32::from(received_on));
            }
        }
    }

    fn receive_token(&mut self, token: Token, vm: VmId) {
        if token.epoch < self.persisted.epoch {
            return self.reject(RejectReason::StaleEpoch);
        }
        let stamp = self.stamp(&token, Some(vm));
        if let Some(h) = &self.held {
            // Two copies here at once: the greater survives.
            let held = self.stamp(&h.token, Some(h.vm));
            if held >= stamp {
                self.events
                    .push_back(Event::TokenSuperseded { mine: stamp });
                return;
            }
            if let Some(x) = self.held.as_mut() {
                x.superseded = true;
            }
            self.drop_superseded_if_idle();
            if self.held.is_some() {
                // The old copy's VM is migrating; the new copy cannot be
                // held beside it: it ends instead (its stamp is greater,
                // but it will be re-issued under a newer epoch by a skip
                // if no one else holds it).
                self.events
                    .push_back(Event::TokenSuperseded { mine: stamp });
                return;
            }
        }
        self.round_seen = self.round_seen.max(token.round);
        let mut token = token;
        let (joining, at) = std::mem::take(&mut self.joining);
        if self.now.saturating_sub(at) <= self.cfg.token_timeout_ns {
            for j in joining {
                if !self.frozen.contains(&j) {
                    token.insert(j);
                }
            }
        }
        self.events.push_back(Event::TokenReceived { vm, stamp });
        let until = self.now + self.cfg.token_hold_ns;
        self.held = Some(Held {
            token,
            vm,
            phase: Phase::Holding { until },
            superseded: false,
            keepalive_at: self.now,
        });
        self.tell_alive();
    }

    fn start_decision(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.superseded) {
            return self.drop_superseded_if_idle();
        }
        let Some(vm) = self.held.as_ref().map(|h| h.vm) else {
            return;
        };
        let held_down = self
            .migrated_at
            .get(&vm)
            .is_some_and(|t| self.now < t.saturating_add(self.cfg.hold_down_ns));
        let Some(peers) = self.hosted.get(&vm).cloned() else {
            self.events.push_back(Event::NotDecided {
                vm,
                why: NoDecision::NotHere,
            });
            return self.hand_on();
        };
        let why = if self.frozen.contains(&vm) {
            Some(NoDecision::Undefined)
        } else if self.migrating.contains_key(&vm) || self.swaps.holds(vm) {
            Some(NoDecision::Busy)
        } else if held_down {
            Some(NoDecision::HeldDown)
        } else {
            None
        };
        if let Some(why) = why {
            self.events.push_back(Event::NotDecided { vm, why });
            return self.hand_on();
        }
        let mut pending = BTreeMap::new();
        let mut asked = BTreeSet::new();
        // With group moves, the peers of every member of u's group too:
        // a group move is decided with their places.
        let members = if self.cfg.groups {
            self.group_members(vm)
        } else {
            Vec::new()
        };
        let others = members
            .iter()
            .filter(|&&g| g != vm)
            .flat_map(|g| self.hosted.get(g).cloned().unwrap_or_default());
        let all: Vec<(VmId, f64)> = peers.into_iter().chain(others).collect();
        for (p, rate) in all {
            if rate < self.cfg.min_rate || rate <= 0.0 || p == vm || self.hosted.contains_key(&p) {
                continue;
            }
            let fresh = self.locations.get(&p).is_some_and(|(_, t)| *t > self.now);
            if !fresh && asked.insert(p) {
                let seq = self.send(Ipv4Addr::from(p), &Message::LocationRequest { vm: p });
                pending.insert(seq, p);
            }
        }
        if pending.is_empty() {
            return self.plan_and_ask();
        }
        let deadline = self.now + self.cfg.request_timeout_ns;
        if let Some(h) = self.held.as_mut() {
            h.phase = Phase::Locating { pending, deadline };
        }
    }

    fn plan_and_ask(&mut self) {
        let Some(vm) = self.held.as_ref().map(|h| h.vm) else {
            return;
        };
        let topo = self.cfg.topology.clone();
        let mut peers = Vec::new();
        for (p, rate) in self.hosted.get(&vm).cloned().unwrap_or_default() {
            if rate < self.cfg.min_rate {
                continue;
            }
            let host = if self.hosted.contains_key(&p) {
                Some(self.host)
            } else {
                self.locations
                    .get(&p)
                    .and_then(|(a, _)| topo.host_by_addr(*a))
            };
            if let Some(host) = host {
                peers.push(decision::Peer { id: p, host, rate });
            }
        }
        let plan = plan_with(&topo, vm, self.host, &peers, self.cfg.scope.candidates);
        let home_free_mem = u64::from(self.free_slots()) * self.cfg.vm_memory_mib;
        let deadline = self.now;
        if let Some(h) = self.held.as_mut() {
            h.phase = Phase::Walking(Walk {
                kind: WalkKind::Decide,
                plan: Box::new(plan),
                peers,
                home_free_mem,
                answers: Vec::new(),
                accepted: Vec::new(),
                seq: 0,
                proposing: false,
                deadline,
            });
        }
        self.walk_next();
    }

    /// c_m in round `round` (the schedule's, constant by default).
    fn cm(&self, round: u32) -> MigrationCost {
        self.cfg.cm_decay.at(self.cfg.migration_cost, round)
    }

    /// The holder decides with its token's round's c_m.
    fn settings(&self) -> Settings {
        let round = self
            .held
            .as_ref()
            .map_or(self.round_seen, |h| h.token.round);
        Settings {
            rule: self.cfg.rule,
            cm: self.cm(round),
            mem_need_mb: self.cfg.vm_memory_mib,
            scope: self.cfg.scope,
        }
    }

    /// Asks the walk's next question, or ends it: with the decision (a
    /// migration, a swap, or u stays, and then the chains' walk if they
    /// are on), or with the best chain accepted (or u stays). Proposals
    /// accepted and not chosen are released.
    fn walk_next(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.superseded) {
            return self.drop_superseded_if_idle();
        }
        let topo = self.cfg.topology.clone();
        let settings = self.settings();
        let Some(Held {
            phase: Phase::Walking(w),
            vm,
            token,
            ..
        }) = self.held.as_ref()
        else {
            return;
        };
        let (vm, round, kind) = (*vm, token.round, w.kind);
        let load = Load::from_rate(w.plan.load);
        let (query, end) = match kind {
            WalkKind::Decide => {
                let mut d = ScopedDecider::new(&topo, &w.plan, &w.peers, settings, w.home_free_mem);
                for a in &w.answers {
                    match a {
                        Answer::Capacity(c) => d.answer_capacity(*c),
                        Answer::Swap(o) => d.answer_swap(*o),
                        Answer::Eject(_) | Answer::Rotate(_) => {}
                    }
                }
                match d.next_query() {
                    Some(Query::Capacity(h)) => (Some(Ask::Room(h, vm)), None),
                    Some(Query::Swap(r)) => (Some(Ask::Swap(r)), None),
                    None => (None, Some(WalkEnd::Step(d.finish()))),
                }
            }
            WalkKind::Chains { stay } => {
                let mem = settings.mem_need_mb;
                let mut d = ChainDecider::new(
                    &w.plan,
                    &w.peers,
                    settings.cm,
                    mem,
                    w.home_free_mem,
                    MAX_EJECT_ASKS,
                );
                for a in &w.answers {
                    match a {
                        Answer::Capacity(c) => d.answer_capacity(*c),
                        Answer::Eject(o) => d.answer_eject(*o),
                        Answer::Swap(_) | Answer::Rotate(_) => {}
                    }
                }
                match d.next_query() {
                    // Only whether it is full: a question that reserves
                    // nothing.
                    Some(ChainQuery::Capacity(h)) => (Some(Ask::Room(h, 0)), None),
                    Some(ChainQuery::Eject(r)) => (Some(Ask::Eject(r)), None),
                    None => {
                        let chain = d.finish();
                        // u's level if the chain is made: its peers where
                        // they are, w on its new host.
                        let level = chain.map(|c| {
                            let mut ps = w.peers.clone();
                            for p in ps.iter_mut().filter(|p| p.id == c.partner) {
                                p.host = c.partner_to;
                            }
                            level_at(&topo, vm, &ps, c.to)
                        });
                        (None, Some(WalkEnd::Chain { stay, chain, level }))
                    }
                }
            }
            WalkKind::Rotations { stay } => {
                let u = LocalVm {
                    id: vm,
                    mem_mb: settings.mem_need_mb,
                    peers: w.peers.clone(),
                };
                // Replayed from the answers: the first question beyond
                // them is the next one asked.
                let replay = RefCell::new((w.answers.iter(), None::<Ask>));
                let rotation = decide_rotation(
                    &w.plan,
                    &u,
                    settings.cm,
                    w.home_free_mem,
                    MAX_EJECT_ASKS,
                    |h| {
                        let (answers, next) = &mut *replay.borrow_mut();
                        match (next.is_some(), answers.next()) {
                            (false, Some(Answer::Capacity(c))) => *c,
                            (false, _) => {
                                *next = Some(Ask::Room(h, 0));
                                None
                            }
                            (true, _) => None,
                        }
                    },
                    |req| {
                        let (answers, next) = &mut *replay.borrow_mut();
                        match (next.is_some(), answers.next()) {
                            (false, Some(Answer::Rotate(a))) => {
                                a.and_then(|a| rotation_offer(&topo, req, &a, settings.mem_need_mb))
                            }
                            (false, _) => {
                                *next = Some(Ask::Rotate(req.clone()));
                                None
                            }
                            (true, _) => None,
                        }
                    },
                );
                match replay.into_inner().1 {
                    Some(q) => (Some(q), None),
                    None => (None, Some(WalkEnd::Rotation { stay, rotation })),
                }
            }
        };
        if let Some(q) = query {
            let (to, message) = match q {
                Ask::Room(h, vm) => (topo.host_addr(h), Message::CapacityRequest { vm }),
                Ask::Swap(r) => {
                    let to = topo.host_addr(r.to);
                    (to, Message::SwapPropose(self.proposal(&r, to)))
                }
                Ask::Eject(r) => {
                    let to = topo.host_addr(r.to);
                    let proposal = self.proposal(&r, to);
                    (to, Message::EjectPropose { round, proposal })
                }
                Ask::Rotate(r) => (
                    topo.host_addr(r.legs[0].to),
                    Message::RotatePropose(rotation_proposal(&topo, &r, round)),
                ),
            };
            let proposing = !matches!(message, Message::CapacityRequest { .. });
            let seq = self.send(to, &message);
            // An asked host may locate its VMs' peers first (and, for a
            // chain, ask the third hosts for room; for a rotation, ask the
            // third hosts to close it, which locate theirs).
            let wait = match message {
                Message::CapacityRequest { .. } => self.cfg.request_timeout_ns,
                Message::RotatePropose(_) => self.cfg.request_timeout_ns.saturating_mul(5),
                _ => self.cfg.request_timeout_ns.saturating_mul(4),
            };
            let deadline = self.now + wait;
            if let Some(Held {
                phase: Phase::Walking(w),
                ..
            }) = self.held.as_mut()
            {
                w.seq = seq;
                w.proposing = proposing;
                w.deadline = deadline;
            }
            return;
        }
        let Some(end) = end else { return };
        let accepted = match self.held.as_mut().map(|h| &mut h.phase) {
            Some(Phase::Walking(w)) => std::mem::take(&mut w.accepted),
            _ => Vec::new(),
        };
        // The proposal chosen; the others' partners are released.
        let (to, partner) = match end {
            WalkEnd::Step(Step::Swap(s)) => (Some(s.to), s.partner),
            WalkEnd::Chain { chain: Some(c), .. } => (Some(c.to), c.partner),
            WalkEnd::Rotation {
                rotation: Some(r), ..
            } => (Some(r.moves[0].2), r.moves[1].0),
            _ => (None, 0),
        };
        let chosen = to.and_then(|to| {
            let to = topo.host_addr(to);
            accepted
                .iter()
                .find(|a| a.host == to && a.partner == partner)
                .copied()
        });
        for a in &accepted {
            if chosen.is_none_or(|c| (a.host, a.partner) != (c.host, c.partner)) {
                self.release(a);
            }
        }
        match (end, chosen) {
            (WalkEnd::Step(Step::Single(stay @ Decision::Stay { .. })), _) if self.cfg.chains => {
                self.walk_again(WalkKind::Chains { stay })
            }
            (WalkEnd::Step(Step::Single(stay @ Decision::Stay { .. })), _)
            | (
                WalkEnd::Chain {
                    stay, chain: None, ..
                },
                _,
            ) if self.cfg.rotations => self.walk_again(WalkKind::Rotations { stay }),
            (WalkEnd::Step(Step::Single(stay @ Decision::Stay { .. })), _)
            | (
                WalkEnd::Chain {
                    stay, chain: None, ..
                },
                _,
            )
            | (
                WalkEnd::Rotation {
                    stay,
                    rotation: None,
                },
                _,
            ) if self.cfg.groups => self.start_groups(stay, load),
            (WalkEnd::Step(step), chosen) => {
                if let Some(h) = self.held.as_mut() {
                    h.token.update(vm, step.level_after(), load);
                }
                match (step, chosen) {
                    (Step::Single(decision), _) => {
                        self.events.push_back(Event::Decided { decision });
                        match decision {
                            Decision::Migrate { to, .. } => {
                                let to = topo.host_addr(to);
                                if let Some(h) = self.held.as_mut() {
                                    h.phase = Phase::Migrating;
                                }
                                self.start_migration(vm, to);
                            }
                            Decision::Stay { .. } => self.hand_on(),
                        }
                    }
                    (Step::Swap(swap), Some(a)) => {
                        self.events.push_back(Event::SwapAgreed {
                            swap,
                            order: a.order,
                        });
                        self.agree(a, false);
                    }
                    // The walk chose a swap no host accepted: cannot
                    // happen (it only chooses among answers); stay.
                    (Step::Swap(_), None) => self.hand_on(),
                }
            }
            (
                WalkEnd::Chain {
                    chain: Some(chain),
                    level,
                    stay,
                },
                Some(a),
            ) => {
                if let Some(h) = self.held.as_mut() {
                    h.token
                        .update(vm, level.unwrap_or(stay.level_after()), load);
                    if let Some(e) = h.token.get_mut(chain.partner) {
                        e.level = a.partner_level_after.min(15);
                    }
                }
                self.events.push_back(Event::ChainAgreed {
                    chain,
                    order: a.order,
                });
                self.agree(a, true);
            }
            (
                WalkEnd::Rotation {
                    rotation: Some(rotation),
                    ..
                },
                Some(a),
            ) => {
                // u's level on y, w and v where they go.
                let mut ps = self
                    .held
                    .as_ref()
                    .and_then(|h| match &h.phase {
                        Phase::Walking(w) => Some(w.peers.clone()),
                        _ => None,
                    })
                    .unwrap_or_default();
                for p in ps.iter_mut() {
                    if let Some(&(_, _, to)) = rotation.moves[1..].iter().find(|m| m.0 == p.id) {
                        p.host = to;
                    }
                }
                let level = level_at(&topo, vm, &ps, rotation.moves[0].2);
                if let Some(h) = self.held.as_mut() {
                    h.token.update(vm, level, load);
                }
                self.events.push_back(Event::RotationAgreed { rotation });
                self.agree(a, false);
            }
            (WalkEnd::Chain { stay, .. }, _) | (WalkEnd::Rotation { stay, .. }, _) => {
                if let Some(h) = self.held.as_mut() {
                    h.token.update(vm, stay.level_after(), load);
                }
                self.events.push_back(Event::Decided { decision: stay });
                self.hand_on()
            }
        }
    }

    /// The walk starts again over the same plan, for `kind`.
    fn walk_again(&mut self, kind: WalkKind) {
        if let Some(Held {
            phase: Phase::Walking(w),
            ..
        }) = self.held.as_mut()
        {
            w.kind = kind;
            w.answers.clear();
            w.seq = 0;
            w.proposing = false;
            w.deadline = self.now;
        }
        self.walk_next()
    }

    /// The group moves' limits: at most [`MAX_GROUP_VMS`] members, so a
    /// destination's share fits one reservation.
    fn group_limits() -> GroupLimits {
        let l = GroupLimits::default();
        GroupLimits {
            max_members: l.max_members.min(MAX_GROUP_VMS),
            ..l
        }
    }

    /// This host's VMs that a group move of `vm` may take, `vm` first, as
    /// this host knows them: the others as for a swap (not moving, not
    /// reserved, not undefined, not held down).
    fn group_view(&self, vm: VmId) -> Vec<LocalVm> {
        std::iter::once(vm)
            .chain(self.swap_candidates())
            .map(|w| self.local_vm(w, &[]))
            .collect()
    }

    /// The members of `vm`'s group as this host knows it now
    /// (score-core's `group::local_group`), `vm` first.
    fn group_members(&self, vm: VmId) -> Vec<VmId> {
        let local = self.group_view(vm);
        local_group(vm, &local, Self::group_limits().max_members)
            .into_iter()
            .map(|i| local[i].id)
            .collect()
    }

    /// Whether `w` is a member of the group move under way here (reserved
    /// at its destination or moving): no swap, chain or rotation may take
    /// it meanwhile.
    fn in_group_move(&self, w: VmId) -> bool {
        let Some(Phase::Grouping(g)) = self.held.as_ref().map(|h| &h.phase) else {
            return false;
        };
        match &g.stage {
            GroupStage::Asking => false,
            GroupStage::Reserving { group, .. } | GroupStage::Moving { group, .. } => {
                group.moves.iter().any(|(v, _)| *v == w)
            }
        }
    }

    /// u would stay: a move of its group is looked for (docs/PROTOCOL.md,
    /// "Group moves"), starting with the target racks' capacities.
    fn start_groups(&mut self, stay: Decision, load: Load) {
        let Some(vm) = self.held.as_ref().map(|h| h.vm) else {
            return;
        };
        let g = Grouping {
            stay,
            load,
            local: self.group_view(vm),
            rooms: BTreeMap::new(),
            asking: BTreeMap::new(),
            deadline: self.now,
            stage: GroupStage::Asking,
        };
        if let Some(h) = self.held.as_mut() {
            h.phase = Phase::Grouping(Box::new(g));
        }
        self.group_next();
    }

    /// score-core's `group::decide_group`, replayed over the capacities
    /// known so far: the hosts of the next rack it reaches are asked, all
    /// at once (which hosts it asks beyond depends on their answers), or
    /// the decision is made and its destinations asked to reserve.
    fn group_next(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.superseded) {
            return self.drop_superseded_if_idle();
        }
        let topo = self.cfg.topology.clone();
        let cm = self.settings().cm;
        let (decided, missing) = {
            let Some((vm, g)) = self.grouping() else {
                return;
            };
            let mut missing = Vec::new();
            let decided = decide_group(
                &topo,
                self.host,
                vm,
                &g.local,
                cm,
                Self::group_limits(),
                |h| match g.rooms.get(&h) {
                    Some(c) => *c,
                    None => {
                        missing.push(h);
                        None
                    }
                },
            );
            (decided, missing)
        };
        if let Some(&first) = missing.first() {
            let rack = topo.group_of(first, 1);
            let mut hosts: Vec<HostId> = Vec::new();
            for h in missing {
                if topo.group_of(h, 1) == rack && !hosts.contains(&h) {
                    hosts.push(h);
                }
            }
            let asks = hosts
                .into_iter()
                .map(|h| (h, Vec::new(), Message::CapacityRequest { vm: 0 }))
                .collect();
            return self.group_ask(asks, None);
        }
        let Some(group) = decided else {
            return self.group_refused();
        };
        // Each destination reserves its members' slots, all or none.
        let mut shares: BTreeMap<HostId, Vec<VmId>> = BTreeMap::new();
        for &(v, h) in &group.moves {
            shares.entry(h).or_default().push(v);
        }
        let asks = shares
            .into_iter()
            .map(|(h, vms)| (h, vms.clone(), Message::GroupReserve { vms }))
            .collect();
        let reserving = GroupStage::Reserving {
            group,
            granted: Vec::new(),
        };
        self.group_ask(asks, Some(reserving));
    }

    /// Sends the group move's questions (each to its host, with the
    /// members it concerns) and waits a request's time-out for them; they
    /// belong to `stage` if one is given, else to the stage now.
    fn group_ask(&mut self, asks: Vec<(HostId, Vec<VmId>, Message)>, stage: Option<GroupStage>) {
        let topo = self.cfg.topology.clone();
        let mut asking = BTreeMap::new();
        for (h, vms, m) in asks {
            let seq = self.send(topo.host_addr(h), &m);
            asking.insert(seq, (h, vms));
        }
        let deadline = self.now + self.cfg.request_timeout_ns;
        if let Some(Held {
            phase: Phase::Grouping(g),
            ..
        }) = self.held.as_mut()
        {
            g.asking = asking;
            g.deadline = deadline;
            if let Some(s) = stage {
                g.stage = s;
            }
        }
    }

    /// A capacity answer for the group move: a target host's room, or a
    /// destination's reservation (made if its free slots, counted before
    /// it, cover its members); whether it was one.
    fn group_answer(&mut self, in_reply_to: u64, cap: Capacity) -> bool {
        enum Then {
            Wait,
            Next,
            Move,
            Refused(Vec<(HostId, Vec<VmId>)>),
        }
        let Some(Held {
            phase: Phase::Grouping(g),
            ..
        }) = self.held.as_mut()
        else {
            return false;
        };
        let Some((h, vms)) = g.asking.remove(&in_reply_to) else {
            return false;
        };
        let all = g.asking.is_empty();
        let then = match &mut g.stage {
            GroupStage::Asking => {
                g.rooms.insert(h, Some(cap));
                if all { Then::Next } else { Then::Wait }
            }
            GroupStage::Reserving { granted, .. } => {
                if u64::from(cap.free_slots) >= vms.len() as u64 {
                    granted.push((h, vms));
                    if all { Then::Move } else { Then::Wait }
                } else {
                    // The others' reservations are released (those still
                    // asked too: their answers will not be waited for).
                    let mut rest = std::mem::take(granted);
                    rest.extend(std::mem::take(&mut g.asking).into_values());
                    Then::Refused(rest)
                }
            }
            GroupStage::Moving { .. } => Then::Wait,
        };
        match then {
            Then::Wait => {}
            Then::Next => self.group_next(),
            Then::Move => self.start_group(),
            Then::Refused(rest) => {
                for (h, vms) in rest {
                    self.release_group(h, vms);
                }
                self.group_refused();
            }
        }
        true
    }

    /// Tells destination `h` the slots reserved for `vms` are not needed.
    /// Sent once: if it is lost, the reservations expire there.
    fn release_group(&mut self, h: HostId, vms: Vec<VmId>) {
        if vms.is_empty() {
            return;
        }
        let to = self.cfg.topology.host_addr(h);
        self.send(to, &Message::GroupRelease { vms });
    }

    /// The held VM and its group move, if one is under way.
    fn grouping(&self) -> Option<(VmId, &Grouping)> {
        match self.held.as_ref() {
            Some(Held {
                vm,
                phase: Phase::Grouping(g),
                ..
            }) => Some((*vm, g)),
            _ => None,
        }
    }

    /// No group move: u stays, as the walk decided.
    fn group_refused(&mut self) {
        let Some((vm, g)) = self.grouping() else {
            return;
        };
        let (stay, load) = (g.stay, g.load);
        if let Some(h) = self.held.as_mut() {
            h.token.update(vm, stay.level_after(), load);
        }
        self.events.push_back(Event::Decided { decision: stay });
        self.hand_on();
    }

    /// The members' levels with each on `placed` (its host), their peers
    /// elsewhere where this host believes they are.
    fn group_levels(&self, local: &[LocalVm], placed: &[(VmId, HostId)]) -> Vec<(VmId, u8)> {
        let topo = &self.cfg.topology;
        placed
            .iter()
            .filter_map(|&(v, at)| {
                let g = local.iter().find(|l| l.id == v)?;
                let mut ps = g.peers.clone();
                for p in ps.iter_mut() {
                    if let Some(&(_, h)) = placed.iter().find(|(m, _)| *m == p.id) {
                        p.host = h;
                    }
                }
                Some((v, level_at(topo, v, &ps, at)))
            })
            .collect()
    }

    /// Every destination reserved its members' slots: the members'
    /// migrations start, all at once. x only loses VMs and each
    /// destination receives only into slots it reserved, so no order can
    /// take a host beyond its slots; at once, because a reservation lasts
    /// `reservation_ns`, longer than one migration, not than k in a row.
    fn start_group(&mut self) {
        let Some(Held {
            vm,
            phase: Phase::Grouping(g),
            ..
        }) = self.held.as_mut()
        else {
            return;
        };
        let vm = *vm;
        let GroupStage::Reserving { group, .. } =
            std::mem::replace(&mut g.stage, GroupStage::Asking)
        else {
            return;
        };
        let (load, local) = (g.load, std::mem::take(&mut g.local));
        // A member taken meanwhile (gone, moving, a swap's partner) stays,
        // and its slot is released.
        let (go, stay): (Vec<_>, Vec<_>) = group.moves.iter().partition(|&&(v, _)| {
            self.hosted.contains_key(&v)
                && !self.migrating.contains_key(&v)
                && !self.frozen.contains(&v)
                && !self.swaps.holds(v)
        });
        let levels = self.group_levels(&local, &group.moves);
        if let Some(h) = self.held.as_mut() {
            for &(v, level) in &levels {
                if v == vm {
                    h.token.update(vm, level, load);
                } else if let Some(e) = h.token.get_mut(v) {
                    e.level = level.min(15);
                }
            }
            if let Phase::Grouping(g) = &mut h.phase {
                g.local = local;
                g.stage = GroupStage::Moving {
                    group: group.clone(),
                    pending: go.iter().copied().collect(),
                    moved: 0,
                    outcome: None,
                };
            }
        }
        self.events.push_back(Event::GroupAgreed { group });
        for (v, h) in stay {
            self.release_group(h, vec![v]);
        }
        let topo = self.cfg.topology.clone();
        for &(v, h) in &go {
            self.start_migration(v, topo.host_addr(h));
        }
        if go.is_empty() {
            self.group_finished();
        }
    }

    /// A migration ended: if of a member of the group move under way, it
    /// is counted (a failed one's slot released), and the move ends with
    /// the last; whether it was one.
    fn group_member_done(&mut self, vm: VmId, outcome: MigrationOutcome) -> bool {
        let Some(Held {
            phase: Phase::Grouping(g),
            ..
        }) = self.held.as_mut()
        else {
            return false;
        };
        let GroupStage::Moving {
            pending,
            moved,
            outcome: worst,
            ..
        } = &mut g.stage
        else {
            return false;
        };
        let Some(to) = pending.remove(&vm) else {
            return false;
        };
        let last = pending.is_empty();
        match outcome {
            MigrationOutcome::Done => *moved += 1,
            other => *worst = worst.or(Some(other)),
        }
        // A VM whose migration ended undefined may be there: its slot
        // stays reserved until it expires.
        if matches!(
            outcome,
            MigrationOutcome::Failed | MigrationOutcome::Advisory
        ) {
            self.release_group(to, vec![vm]);
        }
        if last {
            self.group_finished();
        }
        true
    }

    /// The group move ended: told, u's and the members' levels where they
    /// are, and the token goes on.
    fn group_finished(&mut self) {
        let Some((vm, g)) = self.grouping() else {
            return;
        };
        let GroupStage::Moving {
            group,
            moved,
            outcome,
            ..
        } = &g.stage
        else {
            return;
        };
        let moved = *moved;
        let outcome = if moved as usize == group.moves.len() {
            SwapOutcome::Done
        } else if moved > 0 {
            SwapOutcome::Partial
        } else if *outcome == Some(MigrationOutcome::Advisory) {
            SwapOutcome::Advisory
        } else {
            SwapOutcome::Failed
        };
        if outcome != SwapOutcome::Done {
            // Where each member is now: moved, or still here.
            let placed: Vec<(VmId, HostId)> = group
                .moves
                .iter()
                .map(|&(v, to)| {
                    let here = self.hosted.contains_key(&v) || self.frozen.contains(&v);
                    (v, if here { self.host } else { to })
                })
                .collect();
            let levels = self.group_levels(&g.local, &placed);
            if let Some(h) = self.held.as_mut() {
                for (v, level) in levels {
                    if let Some(e) = h.token.get_mut(v) {
                        e.level = level.min(15);
                    }
                }
            }
        }
        self.events
            .push_back(Event::GroupFinished { vm, moved, outcome });
        self.hand_on();
    }

    /// Releases what an asked host reserved for a proposal not chosen
    /// (and, for a rotation, what the third host reserved).
    fn release(&mut self, a: &Accepted) {
        self.cancel_swap(a.host, a.vm, a.partner);
        if let Some((z, v)) = a.closing {
            self.cancel_swap(z, a.partner, v);
        }
    }

    /// The holder agreed the proposal `a` (a swap, or a chain): its VM is
    /// held down, and the first migration starts (or the first commit is
    /// sent, if the partner goes first).
    fn agree(&mut self, a: Accepted, chain: bool) {
        let Some(vm) = self.held.as_ref().map(|h| h.vm) else {
            return;
        };
        self.migrated_at.insert(vm, self.now);
        let deal = Deal {
            to: a.host,
            partner: a.partner,
            partner_to: a.partner_to,
            chain,
            rotation: a.closing.is_some(),
            commit_vm: vm,
            then: a.closing,
            order: a.order,
            stage: match a.order {
                SwapOrder::ProposerFirst => Stage::FirstMove,
                SwapOrder::PartnerFirst => Stage::Committing,
            },
            resend_at: self.now,
            give_up_at: self.now.saturating_add(self.cfg.swap_timeout_ns),
        };
        let first = deal.stage;
        if let Some(h) = self.held.as_mut() {
            h.phase = Phase::Swapping(deal);
        }
        match first {
            Stage::FirstMove => self.start_migration(vm, a.host),
            _ => self.send_commit(),
        }
    }

    /// An answer to the walk's question in flight: taken if `in_reply_to`
    /// is it and it is of the kind asked (`vm`: the proposal's VM, if the
    /// answer names one); whether it was.
    fn walk_answer(&mut self, in_reply_to: u64, vm: Option<VmId>, answer: Answer) -> bool {
        let Some(Held {
            vm: held,
            phase: Phase::Walking(w),
            ..
        }) = self.held.as_mut()
        else {
            return false;
        };
        let fits = match (answer, w.kind) {
            (Answer::Capacity(_), _) => !w.proposing,
            (Answer::Swap(_), WalkKind::Decide) => w.proposing,
            (Answer::Eject(_), WalkKind::Chains { .. }) => w.proposing,
            (Answer::Rotate(_), WalkKind::Rotations { .. }) => w.proposing,
            _ => false,
        };
        if !fits || w.seq != in_reply_to || vm.is_some_and(|v| v != *held) {
            return false;
        }
        w.answers.push(answer);
        true
    }

    /// An asked host accepted a swap or a chain: the holder's walk takes
    /// it (if it is the question in flight, and makes sense), or it is
    /// released.
    fn on_accept(&mut self, in_reply_to: u64, answer: Answer, a: Accepted) {
        if self.walk_answer(in_reply_to, Some(a.vm), answer) {
            if let Some(Held {
                phase: Phase::Walking(w),
                ..
            }) = self.held.as_mut()
            {
                w.accepted.push(a);
            }
            self.walk_next();
        } else {
            // The proposer stopped waiting: release the partner.
            self.release(&a);
        }
    }

    /// An asked host accepted a chain.
    fn on_eject_accept(&mut self, from: Ipv4Addr, a: EjectAcceptance) {
        let topo = self.cfg.topology.clone();
        let me = self.cfg.me;
        // A partner sent to a third host goes first (it needs no
        // headroom); into the asked host's headroom first, only back here.
        let sane =
            a.partner_to != from && (a.partner_to == me || a.order == SwapOrder::PartnerFirst);
        let target = topo.host_by_addr(a.partner_to).filter(|_| sane);
        let offer = target.map(|partner_to| EjectionOffer {
            partner: a.partner,
            partner_to,
            benefit: a.benefit,
            c_m: a.c_m,
            asked: 0,
        });
        let accepted = Accepted {
            host: from,
            vm: a.vm,
            partner: a.partner,
            partner_to: a.partner_to,
            partner_level_after: a.partner_level_after,
            order: a.order,
            closing: None,
        };
        self.on_accept(a.in_reply_to, Answer::Eject(offer), accepted);
    }

    /// A rotation proposal arrived: from the holder of u (one leg: this
    /// host is y) or from y (two legs: this host is z, asked to close
    /// it). Checked, then this host's VMs' peers are located, then it is
    /// answered ([`Node::answer_rotation`]).
    fn on_rotate_propose(&mut self, h: &Header, p: RotationProposal) {
        let topo = self.cfg.topology.clone();
        let me = self.cfg.me;
        let vm = p.legs[0].vm;
        let known = |a: Ipv4Addr| topo.host_by_addr(a).is_some();
        let last = &p.legs[p.legs.len() - 1];
        let valid = last.to == me
            && last.from == h.sender
            && p.legs.iter().all(|l| {
                known(l.from) && known(l.to) && l.from != l.to && !self.hosted.contains_key(&l.vm)
            })
            && (p.legs.len() == 1 || (p.legs[0].to == h.sender && p.legs[0].from != me));
        let now = self.now;
        self.swaps.expire(now);
        let refusal = if !self.cfg.rotations || self.cfg.advisory {
            Some(SwapRefusal::Disabled)
        } else if !valid {
            Some(SwapRefusal::Invalid)
        } else if self.considering.is_some() || self.rotating.is_some() || self.swaps.busy() {
            Some(SwapRefusal::Busy)
        } else if self.holder_claims() || !self.room_for_one_more() {
            // The VM asked to come arrives before this host's leaves.
            Some(SwapRefusal::NoHeadroom)
        } else if p.legs.len() == 2 && self.free_slots() > 0 {
            // With room, a chain is the simpler move.
            Some(SwapRefusal::NoPartner)
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.refuse_swap(h.sender, h.seq, vm, r);
        }
        let moving: Vec<VmId> = p.legs.iter().map(|l| l.vm).collect();
        let pending = self.locate_candidates_peers(&moving);
        let empty = pending.is_empty();
        self.rotating = Some(Rotating {
            from: h.sender,
            seq: h.seq,
            proposal: p,
            pending,
            asked: false,
            closes: BTreeMap::new(),
            offers: Vec::new(),
            deadline: now + self.cfg.request_timeout_ns,
        });
        if empty {
            self.answer_rotation();
        }
    }

    /// Moves the rotation being considered on: z closes it with score-core's
    /// `close_rotation` (v reserved, or a refusal); y first asks the third
    /// hosts that `extend_rotation` would ask, all at once, then takes the
    /// best closed rotation (w reserved, the other offers released), or
    /// refuses.
    fn answer_rotation(&mut self) {
        let Some(mut r) = self.rotating.take() else {
            return;
        };
        let topo = self.cfg.topology.clone();
        let vm = r.proposal.legs[0].vm;
        let Some(req) = rotation_request(&topo, &r.proposal) else {
            return self.refuse_swap(r.from, r.seq, vm, SwapRefusal::Invalid);
        };
        let placed: Vec<(VmId, HostId)> = req.legs.iter().map(|l| (l.vm.id, l.from)).collect();
        let local = self.local_with(&placed);
        let free_mem = u64::from(self.free_slots()) * self.cfg.vm_memory_mib;
        let round = r.proposal.round;
        let cm = self.cm(round);
        let until = self.now.saturating_add(self.cfg.swap_timeout_ns);
        let x = r.proposal.legs[0].from;
        if req.legs.len() == 2 {
            let offer = close_rotation(&topo, self.host, free_mem, &local, &req, cm);
            let w = req.legs[1].vm.id;
            // Its headroom may have been taken while it located.
            let room = !self.holder_claims() && self.room_for_one_more();
            let reserved = room
                && offer.as_ref().is_some_and(|o| {
                    self.swaps
                        .reserve_rotation(w, o.legs[2].vm.id, x, x, Some(r.from), until)
                });
            return match offer {
                Some(o) if reserved => {
                    self.events.push_back(Event::SwapAnswered {
                        vm: w,
                        answer: Ok(o.legs[2].vm.id),
                    });
                    let a = RotationAcceptance {
                        in_reply_to: r.seq,
                        vms: [vm, w, o.legs[2].vm.id],
                        hosts: [x, r.from, self.cfg.me],
                        benefit: o.benefit,
                        c_m: o.c_m,
                    };
                    self.send(r.from, &Message::RotateAccept(a));
                }
                Some(_) if !room => self.refuse_swap(r.from, r.seq, w, SwapRefusal::NoHeadroom),
                Some(_) => self.refuse_swap(r.from, r.seq, w, SwapRefusal::Busy),
                None => self.refuse_swap(r.from, r.seq, w, SwapRefusal::NoPartner),
            };
        }
        let (host, set) = (self.host, self.cfg.scope.candidates);
        let extend = |close: &mut dyn FnMut(&RotationRequest) -> Option<RotationOffer>| {
            extend_rotation(
                &topo,
                host,
                free_mem,
                &local,
                &req,
                cm,
                set,
                MAX_EJECT_ASKS,
                // Whether z is full, z says itself.
                |_| None,
                close,
            )
        };
        if !r.asked {
            // Whom it asks does not depend on the answers: a first pass
            // with none records them (one question a host).
            let mut asks: Vec<RotationRequest> = Vec::new();
            extend(&mut |r2| {
                if asks.iter().all(|a| a.legs[1].to != r2.legs[1].to) {
                    asks.push(r2.clone());
                }
                None
            });
            r.asked = true;
            for r2 in asks {
                let z = topo.host_addr(r2.legs[1].to);
                let m = Message::RotatePropose(rotation_proposal(&topo, &r2, round));
                let seq = self.send(z, &m);
                r.closes.insert(seq, z);
            }
            if !r.closes.is_empty() {
                r.pending.clear();
                // z locates its VMs' peers too.
                r.deadline = self.now + self.cfg.request_timeout_ns.saturating_mul(2);
                self.rotating = Some(r);
                return;
            }
        }
        let mem = self.cfg.vm_memory_mib;
        let offers = std::mem::take(&mut r.offers);
        let best = extend(&mut |r2| {
            let z = topo.host_addr(r2.legs[1].to);
            offers
                .iter()
                .find(|(h, a)| *h == z && a.vms[1] == r2.legs[1].vm.id)
                .and_then(|(_, a)| rotation_offer(&topo, r2, a, mem))
        });
        let chosen = best.as_ref().map(|o| {
            (
                topo.host_addr(o.legs[2].from),
                o.legs[1].vm.id,
                o.legs[2].vm.id,
            )
        });
        for (z, a) in &offers {
            if chosen != Some((*z, a.vms[1], a.vms[2])) {
                self.cancel_swap(*z, a.vms[1], a.vms[2]);
            }
        }
        let Some((z, w, v)) = chosen else {
            return self.refuse_swap(r.from, r.seq, vm, SwapRefusal::NoPartner);
        };
        let room = !self.holder_claims() && self.room_for_one_more();
        if !room || !self.swaps.reserve_rotation(vm, w, x, z, None, until) {
            self.cancel_swap(z, w, v);
            let why = if room {
                SwapRefusal::Busy
            } else {
                SwapRefusal::NoHeadroom
            };
            return self.refuse_swap(r.from, r.seq, vm, why);
        }
        let o = best.expect("chosen");
        self.events
            .push_back(Event::SwapAnswered { vm, answer: Ok(w) });
        let a = RotationAcceptance {
            in_reply_to: r.seq,
            vms: [vm, w, v],
            hosts: [x, self.cfg.me, z],
            benefit: o.benefit,
            c_m: o.c_m,
        };
        self.send(r.from, &Message::RotateAccept(a));
    }

    /// A rotation was closed: by a third host, for the rotation being
    /// extended here; or by the asked host, for the holder's walk. One
    /// nobody waits for any more is released.
    fn on_rotate_accept(&mut self, from: Ipv4Addr, a: RotationAcceptance) {
        let mut all = false;
        let theirs = self.rotating.as_mut().is_some_and(|r| {
            let asked = r.closes.get(&a.in_reply_to) == Some(&from);
            if asked {
                r.closes.remove(&a.in_reply_to);
                r.offers.push((from, a));
                all = r.closes.is_empty();
            }
            asked
        });
        if theirs {
            if all {
                self.answer_rotation();
            }
            return;
        }
        let me = self.cfg.me;
        if a.hosts[0] == me && a.hosts[1] == from {
            let accepted = Accepted {
                host: from,
                vm: a.vms[0],
                partner: a.vms[1],
                partner_to: a.hosts[2],
                partner_level_after: 0,
                order: SwapOrder::ProposerFirst,
                closing: Some((a.hosts[2], a.vms[2])),
            };
            self.on_accept(a.in_reply_to, Answer::Rotate(Some(a)), accepted);
        } else if a.hosts[2] == from {
            // Too late for the rotation extended here.
            self.cancel_swap(from, a.vms[1], a.vms[2]);
        }
    }

    /// A capacity answer: for the holder's walk, for a chain being
    /// considered here (a third host's room), or for a chain's partner
    /// about to leave (its slot there).
    fn on_capacity(&mut self, in_reply_to: u64, cap: Capacity) {
        if self.walk_answer(in_reply_to, None, Answer::Capacity(Some(cap))) {
            return self.walk_next();
        }
        if self.group_answer(in_reply_to, cap) {
            return;
        }
        if self.placing.as_ref().is_some_and(|p| p.seq == in_reply_to) {
            return self.placed(Some(cap));
        }
        let all = self.considering.as_mut().and_then(|c| {
            let host = c.asking.remove(&in_reply_to)?;
            if let Some(r) = c.rooms.iter_mut().find(|(h, _)| *h == host) {
                r.1 = Some(cap);
            }
            Some(c.asking.is_empty())
        });
        if all == Some(true) {
            self.answer_proposal();
        }
    }

    /// The third host answered (or not: `None`) for a chain's partner:
    /// with room (reserved there for it), the partner leaves now; without,
    /// the chain fails and the proposer is told.
    fn placed(&mut self, cap: Option<Capacity>) {
        let Some(p) = self.placing.take() else {
            return;
        };
        let movable = self.hosted.contains_key(&p.partner)
            && !self.migrating.contains_key(&p.partner)
            && !self.frozen.contains(&p.partner);
        if movable && cap.is_some_and(|c| c.fits(self.cfg.vm_memory_mib)) {
            self.partner_moves.insert(p.partner, p.vm);
            return self.start_migration(p.partner, p.to);
        }
        let linger = self.now.saturating_add(self.cfg.swap_timeout_ns);
        if let Some((in_reply_to, to)) = self.swaps.end(p.vm, SwapResult::Failed, linger) {
            let done = Message::SwapDone {
                in_reply_to,
                vm: p.vm,
                partner: p.partner,
                result: SwapResult::Failed,
            };
            self.send(to, &done);
        }
    }

    fn start_migration(&mut self, vm: VmId, to: Ipv4Addr) {
        // Whom to tell where it went, if it goes: the hosts of its peers
        // as located now (the facts may have dropped it by the time the
        // migration ends), and the destination, which counts the VM only
        // from its next drain on: until then its own holders would ask
        // themselves where the VM is, and wait a request's time-out.
        let peer_hosts: BTreeSet<Ipv4Addr> = self
            .hosted
            .get(&vm)
            .into_iter()
            .flatten()
            .filter_map(|(p, _)| self.locations.get(p).map(|&(h, _)| h))
            .chain(std::iter::once(to))
            .filter(|&h| h != self.cfg.me)
            .collect();
        self.peer_hosts.insert(vm, peer_hosts);
        self.migrating.insert(vm, to);
        self.migrated_at.insert(vm, self.now);
        self.out.push_back(Output::Migrate { vm, to });
        self.events.push_back(Event::MigrationStarted { vm, to });
    }

    /// The proposal for the walk's swap question `r` to host `to`.
    fn proposal(&mut self, r: &SwapRequest, to: Ipv4Addr) -> SwapProposal {
        let mut peers_on_target = r.peers_on_target.clone();
        // The largest rates first, if they must be cut to one datagram.
        peers_on_target.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        peers_on_target.truncate(MAX_SWAP_PEERS);
        SwapProposal {
            vm: r.vm,
            from: self.cfg.me,
            to,
            gain: r.gain,
            cost_before: r.cost_before,
            c_m: r.c_m,
            mem_mib: r.mem_mb,
            from_free_mem_mib: r.from_free_mem_mb,
            // An advisory host moves nothing: the partner must not come
            // first.
            from_headroom: !self.cfg.advisory
                && !self.swaps.incoming_first()
                && self.room_for_one_more(),
            peers_on_target,
        }
    }

    /// Releases a partner reserved for a swap that will not happen. Sent
    /// once: if it is lost, the reservation expires there.
    fn cancel_swap(&mut self, host: Ipv4Addr, vm: VmId, partner: VmId) {
        let m = Message::SwapCommit {
            vm,
            partner,
            go: false,
        };
        self.send(host, &m);
    }

    /// Tells the asked host to move the partner now; sent again until its
    /// answer (a repeated commit never moves the partner twice).
    fn send_commit(&mut self) {
        let again = self.now + self.cfg.request_timeout_ns.saturating_mul(4);
        let Some(Held {
            phase: Phase::Swapping(d),
            ..
        }) = self.held.as_mut()
        else {
            return;
        };
        d.resend_at = again;
        let (to, m) = (
            d.to,
            Message::SwapCommit {
                vm: d.commit_vm,
                partner: d.partner,
                go: true,
            },
        );
        self.send(to, &m);
    }

    /// The proposer's swap ended: the token goes on.
    fn swap_finished(&mut self, outcome: SwapOutcome) {
        if let Some(Held {
            vm,
            phase: Phase::Swapping(d),
            ..
        }) = self.held.as_ref()
        {
            let (vm, partner) = (*vm, d.partner);
            self.events.push_back(if d.rotation {
                Event::RotationFinished { vm, outcome }
            } else if d.chain {
                Event::ChainFinished {
                    vm,
                    partner,
                    outcome,
                }
            } else {
                Event::SwapFinished {
                    vm,
                    partner,
                    outcome,
                }
            });
        }
        self.hand_on();
    }

    /// The asked host's answer to a commit arrived at the proposer.
    fn on_swap_done(&mut self, from: Ipv4Addr, vm: VmId, partner: VmId, result: SwapResult) {
        let me = self.cfg.me;
        let Some(Held {
            phase: Phase::Swapping(d),
            ..
        }) = self.held.as_mut()
        else {
            return;
        };
        if d.commit_vm != vm || d.to != from || d.partner != partner || d.stage != Stage::Committing
        {
            return;
        }
        match (d.order, result, d.then) {
            // A rotation's w reached z: z is told to send v here now.
            (SwapOrder::ProposerFirst, SwapResult::Done, Some((z, v))) => {
                let until = self.now + self.cfg.location_ttl_ns;
                self.locations.insert(partner, (z, until));
                let Some(Held {
                    phase: Phase::Swapping(d),
                    ..
                }) = self.held.as_mut()
                else {
                    return;
                };
                d.to = z;
                d.commit_vm = partner;
                d.partner = v;
                d.partner_to = me;
                d.then = None;
                self.send_commit();
            }
            (_, _, Some((z, v))) => {
                // w did not move: z is released; u moved.
                self.cancel_swap(z, partner, v);
                self.swap_finished(SwapOutcome::Partial);
            }
            (_, SwapResult::Advisory, None) => self.swap_finished(SwapOutcome::Advisory),
            (SwapOrder::ProposerFirst, SwapResult::Done, None) => {
                self.swap_finished(SwapOutcome::Done)
            }
            (SwapOrder::ProposerFirst, _, None) => self.swap_finished(SwapOutcome::Partial),
            (SwapOrder::PartnerFirst, SwapResult::Done, None) => {
                d.stage = Stage::SecondMove;
                let to = d.to;
                let at = d.partner_to;
                self.locations
                    .insert(partner, (at, self.now + self.cfg.location_ttl_ns));
                self.start_migration(vm, to);
            }
            (SwapOrder::PartnerFirst, _, None) => self.swap_finished(SwapOutcome::Failed),
        }
    }

    /// This host's VMs that may be a swap's partner: not moving, not
    /// moved lately, not held for a decision or another swap.
    fn swap_candidates(&self) -> Vec<VmId> {
        let holding = self.held.as_ref().map(|h| h.vm);
        self.hosted
            .keys()
            .copied()
            .filter(|w| {
                Some(*w) != holding
                    && !self.migrating.contains_key(w)
                    && !self.frozen.contains(w)
                    && !self.swaps.holds(*w)
                    && !self.in_group_move(*w)
                    && self
                        .migrated_at
                        .get(w)
                        .is_none_or(|t| self.now >= t.saturating_add(self.cfg.hold_down_ns))
            })
            .collect()
    }

    /// A swap proposal (or, with `eject`, a chain proposal and the
    /// proposer's round) arrived: check it, then locate the peers of this
    /// host's VMs that it does not know the place of, then answer.
    fn on_propose(&mut self, h: &Header, p: SwapProposal, eject: Option<u32>) {
        let valid = p.from == h.sender
            && p.to == self.cfg.me
            && p.from != self.cfg.me
            && self.cfg.topology.host_by_addr(p.from).is_some()
            && !self.hosted.contains_key(&p.vm);
        let now = self.now;
        self.swaps.expire(now);
        let enabled = if eject.is_some() {
            self.cfg.chains
        } else {
            self.cfg.scope.swaps
        };
        let refusal = if !enabled {
            Some(SwapRefusal::Disabled)
        } else if !valid {
            Some(SwapRefusal::Invalid)
        } else if self.considering.is_some() || self.rotating.is_some() || self.swaps.busy() {
            Some(SwapRefusal::Busy)
        } else {
            None
        };
        if let Some(r) = refusal {
            return self.refuse_swap(h.sender, h.seq, p.vm, r);
        }
        let pending = self.locate_candidates_peers(&[p.vm]);
        let empty = pending.is_empty();
        self.considering = Some(Considering {
            seq: h.seq,
            proposal: p,
            eject,
            pending,
            asking: BTreeMap::new(),
            rooms: Vec::new(),
            deadline: now + self.cfg.request_timeout_ns,
        });
        if empty {
            self.answer_proposal();
        }
    }

    /// Asks where the peers of this host's swap candidates are, those it
    /// does not know the place of (nor are `moving`, whose places the
    /// proposal says); by sequence number.
    fn locate_candidates_peers(&mut self, moving: &[VmId]) -> BTreeMap<u64, VmId> {
        let now = self.now;
        let mut pending = BTreeMap::new();
        let mut asked = BTreeSet::new();
        for w in self.swap_candidates() {
            for (z, rate) in self.hosted.get(&w).cloned().unwrap_or_default() {
                let known = self.hosted.contains_key(&z)
                    || moving.contains(&z)
                    || self.locations.get(&z).is_some_and(|(_, t)| *t > now);
                if rate < self.cfg.min_rate || rate <= 0.0 || known || !asked.insert(z) {
                    continue;
                }
                let seq = self.send(Ipv4Addr::from(z), &Message::LocationRequest { vm: z });
                pending.insert(seq, z);
            }
        }
        pending
    }

    fn refuse_swap(&mut self, to: Ipv4Addr, in_reply_to: u64, vm: VmId, reason: SwapRefusal) {
        self.events.push_back(Event::SwapAnswered {
            vm,
            answer: Err(reason),
        });
        self.send(
            to,
            &Message::SwapRefuse {
                in_reply_to,
                vm,
                reason,
            },
        );
    }

    /// Answers the proposal being considered: the partner chosen with
    /// score-core's `choose_swap_partner`, reserved; or a refusal.
    fn answer_proposal(&mut self) {
        let Some(mut c) = self.considering.take() else {
            return;
        };
        if let Some(round) = c.eject {
            if c.rooms.is_empty() && c.asking.is_empty() {
                // The peers are located: ask the third hosts a chain may
                // send a VM to whether they have room (reserving nothing).
                for host in self.ejection_hosts(&c.proposal, round) {
                    let seq = self.send(
                        self.cfg.topology.host_addr(host),
                        &Message::CapacityRequest { vm: 0 },
                    );
                    c.asking.insert(seq, host);
                    c.rooms.push((host, None));
                }
                if !c.asking.is_empty() {
                    c.pending.clear();
                    c.deadline = self.now + self.cfg.request_timeout_ns;
                    self.considering = Some(c);
                    return;
                }
            }
            let (seq, p) = (c.seq, c.proposal.clone());
            match self.consider_eject(&p, round, &c.rooms) {
                Ok(a) => {
                    self.events.push_back(Event::SwapAnswered {
                        vm: p.vm,
                        answer: Ok(a.partner),
                    });
                    let a = EjectAcceptance {
                        in_reply_to: seq,
                        ..a
                    };
                    self.send(p.from, &Message::EjectAccept(a));
                }
                Err(r) => self.refuse_swap(p.from, seq, p.vm, r),
            }
            return;
        }
        let p = c.proposal;
        match self.consider(&p) {
            Ok(offer) => {
                let order = offer.1;
                let offer = offer.0;
                self.events.push_back(Event::SwapAnswered {
                    vm: p.vm,
                    answer: Ok(offer.partner),
                });
                let a = SwapAcceptance {
                    in_reply_to: c.seq,
                    vm: p.vm,
                    partner: offer.partner,
                    partner_gain: offer.partner_gain,
                    partner_cost_before: offer.partner_cost_before,
                    partner_cost_after: offer.partner_cost_after,
                    benefit: offer.benefit,
                    c_m: offer.c_m,
                    partner_level_after: offer.partner_level_after,
                    order,
                };
                self.send(p.from, &Message::SwapAccept(a));
            }
            Err(r) => self.refuse_swap(p.from, c.seq, p.vm, r),
        }
    }

    /// This host's VMs that may be given in a swap or chain, as it knows
    /// them: their peers (u on the proposer's host `from`) where it
    /// believes they are.
    fn local_view(&self, p: &SwapProposal, from: HostId) -> Vec<LocalVm> {
        self.local_with(&[(p.vm, from)])
    }

    /// This host's VMs that may be given in a swap, chain or rotation, as
    /// it knows them: their peers where it believes they are (those in
    /// `placed` where it says).
    fn local_with(&self, placed: &[(VmId, HostId)]) -> Vec<LocalVm> {
        self.swap_candidates()
            .into_iter()
            .map(|w| self.local_vm(w, placed))
            .collect()
    }

    /// Hosted VM `w` as this host knows it: its peers where it believes
    /// they are (those in `placed` where it says; unknown ones left out).
    fn local_vm(&self, w: VmId, placed: &[(VmId, HostId)]) -> LocalVm {
        let now = self.now;
        let topo = &self.cfg.topology;
        let peers = self
            .hosted
            .get(&w)
            .map(|ps| {
                ps.iter()
                    .filter(|(_, rate)| *rate >= self.cfg.min_rate && *rate > 0.0)
                    .filter_map(|&(z, rate)| {
                        let host = if let Some(&(_, h)) = placed.iter().find(|(v, _)| *v == z) {
                            Some(h)
                        } else if self.hosted.contains_key(&z) {
                            Some(self.host)
                        } else {
                            self.locations
                                .get(&z)
                                .filter(|(_, t)| *t > now)
                                .and_then(|(a, _)| topo.host_by_addr(*a))
                        };
                        host.map(|host| decision::Peer { id: z, host, rate })
                    })
                    .collect()
            })
            .unwrap_or_default();
        LocalVm {
            id: w,
            mem_mb: self.cfg.vm_memory_mib,
            peers,
        }
    }

    /// The proposal as score-core's request to this host.
    fn request_of(&self, p: &SwapProposal, from: HostId) -> SwapRequest {
        SwapRequest {
            vm: p.vm,
            from,
            to: self.host,
            gain: p.gain,
            cost_before: p.cost_before,
            c_m: p.c_m,
            mem_mb: p.mem_mib,
            from_free_mem_mb: p.from_free_mem_mib,
            peers_on_target: p.peers_on_target.clone(),
        }
    }

    /// The third hosts a chain from `p` may send one of this host's VMs
    /// to: those score-core's `choose_ejection` would ask for room.
    fn ejection_hosts(&mut self, p: &SwapProposal, round: u32) -> Vec<HostId> {
        let topo = self.cfg.topology.clone();
        let Some(from) = topo.host_by_addr(p.from) else {
            return Vec::new();
        };
        let local = self.local_view(p, from);
        let req = self.request_of(p, from);
        let free_mem = u64::from(self.free_slots()) * self.cfg.vm_memory_mib;
        let mut hosts = Vec::new();
        // Whom it asks does not depend on the answers: a first pass with
        // none records them.
        choose_ejection(
            &topo,
            self.host,
            free_mem,
            &local,
            &req,
            self.cm(round),
            self.cfg.scope.candidates,
            |z| {
                hosts.push(z);
                None
            },
        );
        hosts
    }

    /// What the answer to a swap or chain proposal `p` starts from, or the
    /// refusal it ends with at once (this host is busy with another, or
    /// `p` is not sane).
    fn answering(&mut self, p: &SwapProposal) -> Result<Answering, SwapRefusal> {
        let now = self.now;
        self.swaps.expire(now);
        if self.swaps.busy() {
            return Err(SwapRefusal::Busy);
        }
        if self.hosted.contains_key(&p.vm) {
            return Err(SwapRefusal::Invalid);
        }
        let topo = self.cfg.topology.clone();
        let from = topo.host_by_addr(p.from).ok_or(SwapRefusal::Invalid)?;
        Ok(Answering {
            now,
            from,
            local: self.local_view(p, from),
            req: self.request_of(p, from),
            free_mem: u64::from(self.free_slots()) * self.cfg.vm_memory_mib,
            topo,
        })
    }

    /// The chain this host offers for `p`, with the third hosts' answers
    /// `rooms`: the partner (reserved) and where it goes, or a refusal.
    fn consider_eject(
        &mut self,
        p: &SwapProposal,
        round: u32,
        rooms: &[(HostId, Option<Capacity>)],
    ) -> Result<EjectAcceptance, SwapRefusal> {
        let Answering {
            now,
            topo,
            from,
            local,
            req,
            free_mem,
        } = self.answering(p)?;
        let offer = choose_ejection(
            &topo,
            self.host,
            free_mem,
            &local,
            &req,
            self.cm(round),
            self.cfg.scope.candidates,
            |z| rooms.iter().find(|(h, _)| *h == z).and_then(|(_, c)| *c),
        )
        .ok_or(SwapRefusal::NoPartner)?;
        let order = if offer.partner_to == from {
            // Back to the proposer: a swap, ordered as one.
            let here = !self.holder_claims() && self.room_for_one_more();
            swap_order(self.cfg.advisory, here, p.from_headroom)?
        } else {
            // To a third host, into a slot it promises: the partner goes
            // first, and no host needs headroom.
            SwapOrder::PartnerFirst
        };
        let partner_to = topo.host_addr(offer.partner_to);
        // w's level there, with u here.
        let level = local.iter().find(|w| w.id == offer.partner).map_or(0, |w| {
            let mut ps = w.peers.clone();
            for z in ps.iter_mut().filter(|z| z.id == p.vm) {
                z.host = self.host;
            }
            level_at(&topo, w.id, &ps, offer.partner_to)
        });
        let until = now.saturating_add(self.cfg.swap_timeout_ns);
        if !self
            .swaps
            .reserve_to(p.vm, offer.partner, p.from, partner_to, order, until)
        {
            return Err(SwapRefusal::Busy);
        }
        Ok(EjectAcceptance {
            in_reply_to: 0,
            vm: p.vm,
            partner: offer.partner,
            partner_to,
            benefit: offer.benefit,
            c_m: offer.c_m,
            partner_level_after: level,
            order,
        })
    }

    fn consider(&mut self, p: &SwapProposal) -> Result<(SwapOffer, SwapOrder), SwapRefusal> {
        let Answering {
            now,
            topo,
            local,
            req,
            free_mem,
            ..
        } = self.answering(p)?;
        let here = !self.holder_claims() && self.room_for_one_more();
        let order = swap_order(self.cfg.advisory, here, p.from_headroom)?;
        let offer = choose_swap_partner(
            &topo,
            self.host,
            free_mem,
            &local,
            &req,
            self.cm(self.round_seen),
        )
        .ok_or(SwapRefusal::NoPartner)?;
        let until = now.saturating_add(self.cfg.swap_timeout_ns);
        if !self
            .swaps
            .reserve(p.vm, offer.partner, p.from, order, until)
        {
            return Err(SwapRefusal::Busy);
        }
        Ok((offer, order))
    }

    /// The asked host's side of a commit: move the partner (once), or
    /// release it; answer with the result.
    fn on_commit(&mut self, h: &Header, vm: VmId, partner: VmId, go: bool) {
        let linger = self.now.saturating_add(self.cfg.swap_timeout_ns);
        let reply = match self.swaps.commit(h.sender, vm, partner, go, h.seq, linger) {
            CommitAction::Wait => return,
            CommitAction::Reply(result) => Some((h.seq, h.sender, result)),
            CommitAction::Migrate(w) => {
                let to = self.swaps.destination(vm).unwrap_or(h.sender);
                let movable = self.hosted.contains_key(&w)
                    && !self.migrating.contains_key(&w)
                    && !self.frozen.contains(&w);
                if movable && to != h.sender && !self.swaps.placed(vm) {
                    // A chain: ask the third host for the slot (reserved
                    // there for w), then move w.
                    let seq = self.send(to, &Message::CapacityRequest { vm: w });
                    self.placing = Some(Placing {
                        vm,
                        partner: w,
                        to,
                        seq,
                        deadline: self.now + self.cfg.request_timeout_ns,
                    });
                    None
                } else if movable {
                    // A swap's partner goes to the proposer; a rotation's
                    // to the host that promised it its headroom.
                    self.partner_moves.insert(w, vm);
                    self.start_migration(w, to);
                    None
                } else {
                    self.swaps
                        .end(vm, SwapResult::Failed, linger)
                        .map(|(seq, to)| (seq, to, SwapResult::Failed))
                }
            }
        };
        if let Some((in_reply_to, to, result)) = reply {
            let done = Message::SwapDone {
                in_reply_to,
                vm,
                partner,
                result,
            };
            self.send(to, &done);
        }
    }

    /// Hands the held token on by the policy.
    fn hand_on(&mut self) {
        let Some(h) = self.held.take() else {
            return;
        };
        if h.superseded || h.token.epoch < self.persisted.epoch {
            let mine = self.stamp(&h.token, Some(h.vm));
            self.events.push_back(Event::TokenSuperseded { mine });
            return;
        }
        let mut token = h.token;
        for vm in self.hosted.keys() {
            token.insert(*vm);
        }
        self.pass(token, Some(h.vm), 0);
    }

    /// The VMs that hosts reported lately (a watcher's view; empty
    /// elsewhere). A report older than three intervals is not trusted: its
    /// host may be down, or its VMs gone.
    fn reported_members(&self) -> Vec<VmId> {
        let horizon = self
            .now
            .saturating_sub(self.cfg.report_interval_ns.saturating_mul(3));
        self.reports
            .values()
            .filter(|(_, at)| *at >= horizon)
            .flat_map(|(vms, _)| vms.iter().copied())
            .collect()
    }

    fn pass(&mut self, mut token: Token, from: Option<VmId>, skipped: usize) {
        let round = token.round;
        if self.policy.needs_global_knowledge()
            && let Some(order) = &self.order
        {
            self.policy.feed_ranking(order.clone());
        }
        let Some(next) = policy::advance(self.policy.as_mut(), &mut token, from) else {
            self.events
                .push_back(Event::TokenDropped { epoch: token.epoch });
            return;
        };
        if token.round != round {
            self.round_seen = self.round_seen.max(token.round);
            self.events.push_back(Event::RoundComplete {
                epoch: token.epoch,
                round: token.round,
            });
            self.copy_to_watchers(&token);
        }
        self.report_copy(next, &token, false);
        self.transfers += 1;
        let transfer = (u64::from(self.persisted.incarnation) << 32) | self.transfers;
        let Ok(chunks) = token_chunks(&token, transfer) else {
            self.events
                .push_back(Event::TokenDropped { epoch: token.epoch });
            return;
        };
        let have = ChunkBitmap::new(chunks.len() as u16);
        self.sending = Some(Sending {
            token,
            to: next,
            transfer,
            chunks,
            have,
            attempts: 0,
            deadline: 0,
            skipped,
        });
        self.send_missing();
    }

    fn send_missing(&mut self) {
        let Some(s) = self.sending.as_ref() else {
            return;
        };
        let to = Ipv4Addr::from(s.to);
        let chunks: Vec<TokenChunk> = s
            .have
            .missing()
            .map(|i| s.chunks[usize::from(i)].clone())
            .collect();
        for c in chunks {
            self.send(to, &Message::TokenChunk(c));
        }
        let deadline = self.now + self.cfg.hop_timeout_ns;
        if let Some(s) = self.sending.as_mut() {
            s.deadline = deadline;
        }
    }

    fn hop_timed_out(&mut self) {
        let Some(s) = self.sending.as_mut() else {
            return;
        };
        if s.attempts < self.cfg.hop_retries {
            s.attempts += 1;
            self.events.push_back(Event::TokenRetransmitted);
            return self.send_missing();
        }
        // Nobody acknowledged: the VM's host may be down, or only the
        // acks were lost and it holds the token. Skip the VM under a new
        // epoch: if the other copy exists, it is older and ends wherever
        // the new epoch is known (docs/PROTOCOL.md).
        let s = self.sending.take().expect("checked");
        let epoch = self.mint();
        self.events.push_back(Event::HopSkipped { vm: s.to, epoch });
        let mut token = s.token;
        token.epoch = epoch;
        let skipped = s.skipped + 1;
        if skipped >= token.len() {
            self.events.push_back(Event::TokenDropped { epoch });
            return;
        }
        // The VM leaves the token; its host adds it back when it next
        // holds the token.
        token.remove(s.to);
        if token.is_empty() {
            self.events.push_back(Event::TokenDropped { epoch });
            return;
        }
        let from = token.holder.filter(|v| token.get(*v).is_some());
        self.pass(token, from, skipped);
    }

    fn copy_to_watchers(&mut self, token: &Token) {
        for w in self.cfg.watchers.clone() {
            if w == self.cfg.me {
                self.backup = Some(token.clone());
                continue;
            }
            self.transfers += 1;
            let transfer = (u64::from(self.persisted.incarnation) << 32) | self.transfers;
            if let Ok(chunks) = token_chunks(token, transfer) {
                for c in chunks {
                    self.send(w, &Message::TokenChunk(c));
                }
            }
        }
    }

    /// When this watcher regenerates the token, if it hears nothing: the
    /// i-th watcher waits i + 1 time-outs, so the lowest live one does it.
    fn watch_deadline(&self) -> Option<u64> {
        let i = self.cfg.watchers.iter().position(|w| *w == self.cfg.me)?;
        if self.held.is_some() || self.sending.is_some() {
            return None;
        }
        Some(
            self.last_seen
                .saturating_add(self.cfg.token_timeout_ns.saturating_mul(i as u64 + 1)),
        )
    }

    fn regenerate(&mut self) {
        self.last_seen = self.now;
        let mut members: BTreeSet<VmId> = self.hosted.keys().copied().collect();
        members.extend(self.reported_members());
        if let Some(b) = &self.backup {
            members.extend(b.entries().iter().map(|e| e.id));
        }
        if members.is_empty() {
            return;
        }
        let epoch = self.mint();
        let mut token = Token::new(epoch, members.iter().copied());
        if let Some(b) = &self.backup {
            for e in b.entries() {
                if let Some(t) = token.get_mut(e.id) {
                    t.level = e.level;
                    t.load = e.load;
                }
            }
            token.round = b.round;
        }
        self.events.push_back(Event::TokenRegenerated {
            epoch,
            vms: token.len(),
        });
        self.best_seen = None;
        self.pass(token, None, 0);
    }

    /// Tells the watchers which VMs run here (membership for a
    /// regenerated token).
    /// With a coordinator, the report also carries each VM's peers and
    /// their rates, and goes to the coordinator too; the coordinator then
    /// computes the order and sends it to every host.
    fn report(&mut self) {
        let with_rates = self.cfg.coordinator.is_some();
        let mut entries = Vec::new();
        for (vm, peers) in &self.hosted {
            entries.push(FlowEntry {
                vm: *vm,
                peer: *vm,
                rate: 0.0,
            });
            if with_rates {
                entries.extend(
                    peers
                        .iter()
                        .filter(|(p, rate)| p != vm && rate.is_finite() && *rate > 0.0)
                        .map(|&(peer, rate)| FlowEntry {
                            vm: *vm,
                            peer,
                            rate,
                        }),
                );
            }
        }
        if self.is_coordinator() {
            self.flows.insert(self.cfg.me, entries.clone());
        }
        let mut to: Vec<Ipv4Addr> = self.cfg.watchers.clone();
        to.extend(self.cfg.coordinator);
        to.sort_unstable();
        to.dedup();
        to.retain(|h| *h != self.cfg.me);
        if !to.is_empty() {
            self.reports_sent += 1;
            let id = (u64::from(self.persisted.incarnation) << 32) | self.reports_sent;
            if let Some(parts) = FlowReport::split(id, &entries) {
                for p in parts {
                    for host in &to {
                        self.send(*host, &Message::FlowReport(p.clone()));
                    }
                }
            }
        }
        if self.is_coordinator() {
            self.coordinate();
        }
    }

    /// The coordinator: the order from every host's last flows, sent to
    /// every host (docs/PROTOCOL.md, "The global policy").
    fn coordinate(&mut self) {
        let shape = HostShape {
            vm_slots: self.cfg.vm_slots,
            memory_mib: self.cfg.memory_mib,
            vm_memory_mib: self.cfg.vm_memory_mib,
        };
        let order = order_from_reports(
            &self.cfg.topology,
            self.flows.iter().map(|(h, e)| (*h, e.as_slice())),
            self.cfg.rule,
            self.cm(self.round_seen),
            shape,
        );
        if order.is_empty() {
            return;
        }
        self.reports_sent += 1;
        let id = (u64::from(self.persisted.incarnation) << 32) | self.reports_sent;
        if let Some(parts) = TokenOrder::split(id, &order) {
            let hosts: Vec<Ipv4Addr> = (0..self.cfg.topology.host_count())
                .map(|h| self.cfg.topology.host_addr(h))
                .filter(|a| *a != self.cfg.me)
                .collect();
            for host in hosts {
                for p in &parts {
                    self.send(host, &Message::TokenOrder(p.clone()));
                }
            }
        }
        self.follow_order(order);
    }
}
