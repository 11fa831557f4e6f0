//! One host's protocol state machine. Time is the caller's: every input
//! carries `now`, nanoseconds since the Unix epoch by the host's clock
//! (the daemon passes the wall clock, the simulator its simulated one);
//! [`Node::poll_timeout`] says when the node next needs to be woken.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use bytes::BytesMut;

use crate::decision::{self, Capacity, Decision, MigrationCost, Plan, Rule};
use crate::policy::{self, PolicyKind, TokenPolicy};
use crate::token::{Load, Token, VmId};
use crate::topology::{HostId, Topology};
use crate::wire::{
    ChunkBitmap, ChunkOutcome, Datagram, FlowEntry, FlowReport, Freshness, Header, KeyRing,
    MAX_MEMBER_VMS, Message, PartsAssembler, PartsOutcome, Reassembler, ReplayTable, TokenChunk,
    token_chunks,
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
    /// c_m.
    pub migration_cost: MigrationCost,
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
}

/// What the host measures and runs: its VMs and their peers.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct HostFacts {
    /// The VMs running here.
    pub vms: Vec<VmFacts>,
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

/// What happened, for metrics and logs (typed: no strings turned back
/// into enums).
#[derive(Clone, Debug, PartialEq)]
pub enum Event {
    /// A datagram was dropped (`WireError::reason()` or "unsupported").
    Rejected {
        /// The reason label.
        reason: &'static str,
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
    /// The holder decided for a VM.
    Decided {
        /// Equation 2's outcome with its numbers.
        decision: Decision,
    },
    /// A migration was asked of the driver.
    MigrationStarted {
        /// The VM.
        vm: VmId,
        /// The target host.
        to: Ipv4Addr,
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
    /// Asking candidate hosts for room, one at a time.
    Asking {
        plan: Box<Plan>,
        answers: Vec<Option<Capacity>>,
        seq: u64,
        deadline: u64,
    },
    /// A migration of the VM is under way.
    Migrating,
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
    frozen: BTreeSet<VmId>,
    migrating: BTreeMap<VmId, Ipv4Addr>,
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
            frozen: BTreeSet::new(),
            migrating: BTreeMap::new(),
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
                Phase::Locating { deadline, .. } | Phase::Asking { deadline, .. } => {
                    t = t.min(*deadline)
                }
                Phase::Migrating => {}
            }
        }
        if let Some(s) = &self.sending {
            t = t.min(s.deadline);
        }
        if let Some(w) = self.watch_deadline() {
            t = t.min(w);
        }
        Some(t)
    }

    /// The host's facts changed (or are refreshed): its VMs and their
    /// peers. A VM that arrived frees the reservation made for it.
    pub fn set_facts(&mut self, now: u64, facts: &HostFacts) {
        self.now = now.max(self.now);
        self.hosted = facts.vms.iter().map(|v| (v.id, v.peers.clone())).collect();
        let hosted = &self.hosted;
        self.reservations.retain(|vm, _| !hosted.contains_key(vm));
    }

    /// A migration asked with [`Output::Migrate`] ended.
    pub fn migration_done(&mut self, now: u64, vm: VmId, outcome: MigrationOutcome) {
        self.now = now.max(self.now);
        let Some(to) = self.migrating.remove(&vm) else {
            return;
        };
        match outcome {
            MigrationOutcome::Done => {
                self.locations
                    .insert(vm, (to, now.saturating_add(self.cfg.location_ttl_ns)));
                self.hosted.remove(&vm);
            }
            MigrationOutcome::Failed => {}
            MigrationOutcome::Undefined => {
                self.frozen.insert(vm);
            }
        }
        self.events
            .push_back(Event::MigrationFinished { vm, outcome });
        if self
            .held
            .as_ref()
            .is_some_and(|h| h.vm == vm && matches!(h.phase, Phase::Migrating))
        {
            self.hand_on();
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
            Some(Phase::Locating { deadline, .. }) | Some(Phase::Asking { deadline, .. }) => {
                now >= *deadline
            }
            _ => false,
        };
        if due {
            match self.held.as_mut().map(|h| &mut h.phase) {
                Some(Phase::Holding { .. }) => self.start_decision(),
                Some(Phase::Locating { .. }) => self.plan_and_ask(),
                Some(Phase::Asking { answers, .. }) => {
                    answers.push(None);
                    self.ask_next();
                }
                _ => {}
            }
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
            Err(e) => return self.reject(e.reason()),
        };
        if let Err(e) = d.header.check_destination(received_on) {
            return self.reject(e.reason());
        }
        if let Err(e) = self.replay.accept(&d.header, now_ms) {
            return self.reject(e.reason());
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
            }
            Message::CapacityRequest { vm } => {
                let free = self.free_slots();
                if free > 0 && vm != 0 {
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
                let mine = match self.held.as_mut().map(|x| &mut x.phase) {
                    Some(Phase::Asking { seq, answers, .. }) if *seq == in_reply_to => {
                        answers.push(Some(Capacity {
                            free_slots,
                            free_mem_mb: free_memory_mib,
                        }));
                        true
                    }
                    _ => false,
                };
                if mine {
                    self.ask_next();
                }
            }
            Message::MigrationNotice { vm, to, .. } => {
                self.locations
                    .insert(vm, (to, self.now + self.cfg.location_ttl_ns));
            }
            Message::FlowReport(r) => {
                if self.is_watcher()
                    && let Ok(PartsOutcome::Complete(entries)) =
                        self.report_parts.insert_flow_report(h.sender, r)
                {
                    let mut vms: Vec<VmId> = entries.iter().map(|e| e.vm).collect();
                    vms.dedup();
                    self.reports.insert(h.sender, (vms, self.now));
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
            Message::TokenOrder(_)
            | Message::SwapPropose(_)
            | Message::SwapAccept(_)
            | Message::SwapRefuse { .. }
            | Message::SwapCommit { .. }
            | Message::SwapDone { .. } => self.reject("unsupported"),
        }
    }

    fn reject(&mut self, reason: &'static str) {
        self.events.push_back(Event::Rejected { reason });
    }

    fn is_watcher(&self) -> bool {
        self.cfg.watchers.contains(&self.cfg.me)
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

    fn free_slots(&mut self) -> u32 {
        let now = self.now;
        self.reservations.retain(|_, until| *until > now);
        let used = self.hosted.len() + self.reservations.len();
        self.cfg.vm_slots.saturating_sub(used as u32)
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
        let idle = self
            .held
            .as_ref()
            .is_some_and(|h| h.superseded && !matches!(h.phase, Phase::Migrating));
        if idle {
            let h = self.held.take().expect("checked");
            let mine = self.stamp(&h.token, Some(h.vm));
            self.events.push_back(Event::TokenSuperseded { mine });
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
        let _ = holder;
        if stamp.epoch >= self.persisted.epoch {
            self.last_seen = self.now;
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
            self.reject("stale_epoch");
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
                self.reject("bad_chunk");
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
            return self.reject("stale_epoch");
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
            return self.hand_on();
        };
        if held_down || self.frozen.contains(&vm) || self.migrating.contains_key(&vm) {
            return self.hand_on();
        }
        let mut pending = BTreeMap::new();
        for (p, rate) in peers {
            if rate < self.cfg.min_rate || rate <= 0.0 || p == vm || self.hosted.contains_key(&p) {
                continue;
            }
            let fresh = self.locations.get(&p).is_some_and(|(_, t)| *t > self.now);
            if !fresh {
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
        let plan = decision::plan(&topo, vm, self.host, &peers);
        let deadline = self.now;
        if let Some(h) = self.held.as_mut() {
            h.phase = Phase::Asking {
                plan: Box::new(plan),
                answers: Vec::new(),
                seq: 0,
                deadline,
            };
        }
        self.ask_next();
    }

    /// Asks the next candidate for room, or decides.
    fn ask_next(&mut self) {
        if self.held.as_ref().is_some_and(|h| h.superseded) {
            return self.drop_superseded_if_idle();
        }
        let (rule, cm, mem) = (
            self.cfg.rule,
            self.cfg.migration_cost,
            self.cfg.vm_memory_mib,
        );
        let Some(Held {
            phase: Phase::Asking { plan, answers, .. },
            vm,
            ..
        }) = self.held.as_ref()
        else {
            return;
        };
        let vm = *vm;
        let mut d = plan.decider(rule, cm, mem);
        for a in answers {
            d.answer(*a);
        }
        if let Some(h) = d.next_host() {
            let to = self.cfg.topology.host_addr(h);
            let seq = self.send(to, &Message::CapacityRequest { vm });
            let deadline = self.now + self.cfg.request_timeout_ns;
            if let Some(Held {
                phase:
                    Phase::Asking {
                        seq: s,
                        deadline: dl,
                        ..
                    },
                ..
            }) = self.held.as_mut()
            {
                *s = seq;
                *dl = deadline;
            }
            return;
        }
        let decision = d.finish();
        let load = Load::from_rate(plan.load);
        self.events.push_back(Event::Decided { decision });
        if let Some(h) = self.held.as_mut() {
            h.token.update(vm, decision.level_after(), load);
        }
        match decision {
            Decision::Migrate { to, .. } => {
                let to = self.cfg.topology.host_addr(to);
                self.migrating.insert(vm, to);
                self.migrated_at.insert(vm, self.now);
                if let Some(h) = self.held.as_mut() {
                    h.phase = Phase::Migrating;
                }
                self.out.push_back(Output::Migrate { vm, to });
                self.events.push_back(Event::MigrationStarted { vm, to });
            }
            Decision::Stay { .. } => self.hand_on(),
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
        let Some(next) = policy::advance(self.policy.as_mut(), &mut token, from) else {
            self.events
                .push_back(Event::TokenDropped { epoch: token.epoch });
            return;
        };
        if token.round != round {
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
    fn report(&mut self) {
        if self.cfg.watchers.iter().all(|w| *w == self.cfg.me) {
            return;
        }
        let entries: Vec<FlowEntry> = self
            .hosted
            .keys()
            .map(|vm| FlowEntry {
                vm: *vm,
                peer: *vm,
                rate: 0.0,
            })
            .collect();
        self.reports_sent += 1;
        let id = (u64::from(self.persisted.incarnation) << 32) | self.reports_sent;
        let Some(parts) = FlowReport::split(id, &entries) else {
            return;
        };
        for p in parts {
            self.send_to_watchers(&Message::FlowReport(p));
        }
    }
}
