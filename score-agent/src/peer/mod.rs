//! The S-CORE peer protocol (paper §III-D/F) between agents, over UDP:
//! token passing with per-hop acknowledgements and chunking, token loss
//! detection and regeneration by epoch, location and capacity requests,
//! migration notices, flow reports and the global policy's coordinator.
//!
//! A token for VM u is sent to u's own address; the eBPF program on u's vif
//! intercepts it (the guest never sees it) and this agent, u's host, holds
//! the token for u: it runs score-core's decision, asks the backend to
//! migrate if the decision says so, updates u's token entry, and hands the
//! token on by the configured policy.
//!
//! Token loss: the holder tells the watchers (the lowest-addressed hosts)
//! at every hop that the token is alive, and sends them a copy at the end of
//! every round. A watcher that hears nothing for `token_timeout` asks the
//! lower watchers whether they are alive; if none answers, it regenerates
//! the token from its copy (plus the VMs hosts have reported) with the next
//! epoch and tells the other watchers. Datagrams of an older epoch are
//! dropped everywhere, so an old token dies at its next hop. Only the lowest
//! live watcher regenerates, so one epoch has one token.
//!
//! Swaps (beyond the paper, docs/EVALUATION.md; `[policy] swaps`): when the holder's
//! decision asks a full candidate host for a swap, it sends a swap proposal;
//! that host picks the partner from its own VMs with its own measurements
//! (score-core's `choose_swap_partner`), reserves it and accepts, or
//! refuses. An agreed swap is two live migrations, ordered by [`swap`] so
//! that no host runs more than `vm_slots + migration_headroom` VMs; each
//! host migrates its own VM, the proposer drives the order with commits.

pub mod incarnation;
pub mod net;
pub mod swap;

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    net::Ipv4Addr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use score_core::{
    decision::{self, Capacity, Decision},
    policy::{self, HostShape, TokenPolicy, order_from_reports},
    swap::{
        LocalVm, Query, ScopedDecider, Settings, Step, Swap, SwapOffer, SwapRequest,
        choose_swap_partner, plan_with,
    },
    token::{Load, Token, VmId},
    topology::HostId,
    wire::{
        ChunkBitmap, ChunkOutcome, FlowEntry, FlowReport, Header, HopAck, KeyRing, MAX_SWAP_PEERS,
        Message, PartsAssembler, PartsOutcome, Reassembler, RejectReason, SwapAcceptance,
        SwapOrder, SwapProposal, SwapRefusal, SwapResult, TokenOrder, token_chunks,
    },
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    cluster::ClusterSettings,
    collector::{Collector, monotonic_ns},
    datapath::{ControlReader, HostedVm},
};
use net::{Net, Via};

/// What the protocol reports as it runs; the agent's Prometheus metrics
/// implement it, tests use [`NoMetrics`].
pub trait PeerMetrics: Send + Sync {
    /// A token arrived for a hosted VM.
    fn token_received(&self) {}
    /// A token hop was acknowledged.
    fn token_passed(&self) {}
    /// A token hop was resent.
    fn token_retransmitted(&self) {}
    /// A hop was never acknowledged (its VM was skipped).
    fn token_lost(&self) {}
    /// This agent regenerated the token.
    fn token_regenerated(&self) {}
    /// The token epoch this agent is in.
    fn set_token_epoch(&self, _epoch: u64) {}
    /// The token's round.
    fn set_token_round(&self, _round: u64) {}
    /// A decision was evaluated for a hosted VM.
    fn decision_evaluated(&self) {}
    /// A migration ended with `outcome`: done, failed or advisory.
    fn migration(&self, _outcome: &str) {}
    /// A migration was done and took this long (reported with
    /// `migration("done")`, swap halves included).
    fn migration_duration(&self, _took: Duration) {}
    /// The benefit of a migration about to be made.
    fn observe_benefit(&self, _benefit: f64) {}
    /// A hosted VM's communication cost and level, as of its last decision.
    fn set_vm_cost(&self, _vm: &str, _cost: f64, _level: u8) {}
    /// A datagram was dropped, for `reason`.
    fn rejected(&self, _reason: RejectReason) {}
    /// A hosted VM migrated away: its series go now.
    fn vm_left(&self, _vm: &str) {}
    /// A swap this host proposed, and the other accepted, ended with
    /// `outcome`: done, partial, failed or advisory.
    fn swap(&self, _outcome: &str) {}
    /// This host answered a swap proposal: accepted, or the refusal's name.
    fn swap_request(&self, _answer: &str) {}
}

/// Metrics that go nowhere.
#[derive(Debug, Default)]
pub struct NoMetrics;

impl PeerMetrics for NoMetrics {}

/// What a migration attempt came to.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationResult {
    /// The VM runs on the target now.
    Done(Duration),
    /// Advisory mode: nothing moved.
    Advisory,
    /// It failed and the VM still runs at the source.
    Failed(String),
    /// It failed and where the VM runs is not known: reported, not retried.
    Undefined(String),
}

/// The hypervisor, as the protocol sees it: move this VM to that host.
pub type Migrator = Arc<
    dyn Fn(HostedVm, Ipv4Addr) -> Pin<Box<dyn Future<Output = MigrationResult> + Send>>
        + Send
        + Sync,
>;

/// The last decision this agent made, for /status and logs.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRecord {
    /// The VM decided for.
    pub vm: Ipv4Addr,
    /// The token epoch.
    pub epoch: u64,
    /// score-core's decision (a migration, a stay or a swap), with its
    /// numbers.
    pub decision: Step,
    /// What the backend did, if asked.
    pub outcome: Option<String>,
}

struct State {
    reasm: Reassembler,
    locations: HashMap<VmId, Ipv4Addr>,
    /// Watchers: the latest copy of the token.
    backup: Option<Token>,
    /// Watchers and coordinator: each host's latest complete flow report
    /// (in address order: the coordinator's order is a function of them).
    reports: BTreeMap<Ipv4Addr, Vec<FlowEntry>>,
    /// Flow reports still missing parts.
    report_parts: PartsAssembler<FlowEntry>,
    /// Global policy: the coordinator's latest order, by parts.
    order: Option<Vec<VmId>>,
    /// The coordinator's order while parts are missing.
    order_parts: PartsAssembler<VmId>,
    migrated_at: HashMap<VmId, Instant>,
    last_seen: Instant,
    last_decisions: Vec<DecisionRecord>,
    /// Epochs this agent created, to prove one token per epoch.
    regenerated: Vec<u64>,
    /// Partners this host gave to swaps, by proposing VM.
    swaps: swap::Reservations,
}

/// One agent's side of the protocol.
pub struct Peer {
    cfg: Arc<ClusterSettings>,
    net: Arc<Net>,
    collector: Arc<Collector>,
    metrics: Arc<dyn PeerMetrics>,
    migrate: Migrator,
    /// The backend only advises: a swap must not let the other host move
    /// its VM first, since this one's would not follow.
    advisory: bool,
    epoch: AtomicU64,
    state: Mutex<State>,
    tokens: mpsc::Sender<(Header, Token, Ipv4Addr)>,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("me", &self.cfg.node.address)
            .finish()
    }
}

/// What the HTTP face shows of the protocol.
#[derive(Clone, Debug, Serialize)]
pub struct PeerStatus {
    /// Current token epoch.
    pub epoch: u64,
    /// Seconds since the token was last seen.
    pub token_seen_seconds_ago: f64,
    /// VMs hosted here.
    pub hosted: Vec<HostedVm>,
    /// Recent decisions, newest last.
    pub decisions: Vec<DecisionRecord>,
    /// Epochs this agent regenerated.
    pub regenerated: Vec<u64>,
}

impl Peer {
    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Adopts a newer epoch: older token transfers are dropped.
    fn adopt_epoch(&self, e: u64) {
        if self.epoch.fetch_max(e, Ordering::SeqCst) < e {
            self.state().reasm.discard_below_epoch(e);
            self.metrics.set_token_epoch(e);
            info!(epoch = e, "adopted a newer token epoch");
        }
    }

    fn saw_token(&self) {
        self.state().last_seen = Instant::now();
    }

    /// A snapshot for /status.
    pub fn status(&self) -> PeerStatus {
        let hosted = self.hosted();
        let s = self.state();
        PeerStatus {
            epoch: self.epoch(),
            token_seen_seconds_ago: s.last_seen.elapsed().as_secs_f64(),
            hosted,
            decisions: s.last_decisions.clone(),
            regenerated: s.regenerated.clone(),
        }
    }

    fn hosted(&self) -> Vec<HostedVm> {
        self.collector
            .with_datapath(|d| d.hosted_vms())
            .unwrap_or_default()
    }

    /// This host's room, for swaps.
    fn room(&self) -> swap::Room {
        let n = &self.cfg.node;
        swap::Room {
            used: self.collector.with_datapath(|d| d.attached_count()) as u32,
            slots: n.vm_slots,
            headroom: n.migration_headroom,
            memory_mib: n.memory_mib,
            vm_memory_mib: n.vm_memory_mib,
        }
    }

    fn capacity(&self) -> Capacity {
        let used = self.collector.with_datapath(|d| d.attached_count()) as u64;
        let n = &self.cfg.node;
        Capacity {
            free_slots: u64::from(n.vm_slots).saturating_sub(used) as u32,
            free_mem_mb: n.memory_mib.saturating_sub(used * n.vm_memory_mib),
        }
    }

    /// Handles one datagram; never fails: bad input is counted and dropped.
    async fn handle(self: &Arc<Self>, bytes: &[u8], via: Via) {
        let received_on = match via {
            Via::Host => self.net.me(),
            Via::Vm(vm) => vm,
        };
        let d = match self.net.open(bytes, received_on) {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, ?via, "datagram rejected");
                self.metrics.rejected(e.reject_reason());
                return;
            }
        };
        let h = d.header;
        // Every header carries its sender's newest epoch: a restarted agent
        // learns the current one from any datagram, so score_token_epoch
        // agrees across agents without waiting for the token.
        if !matches!(d.message, Message::TokenChunk(_) | Message::HopAck(_))
            && h.epoch > self.epoch()
        {
            self.adopt_epoch(h.epoch);
        }
        if let Message::TokenSeen { round, .. } = d.message {
            self.metrics.set_token_round(u64::from(round));
        }
        let token_kind = matches!(
            d.message,
            Message::TokenChunk(_) | Message::TokenSeen { .. }
        );
        if token_kind {
            if let Err(e) = h.check_epoch(self.epoch()) {
                self.metrics.rejected(e.reject_reason());
                return;
            }
            self.adopt_epoch(h.epoch);
        }
        match d.message {
            Message::TokenChunk(chunk) => {
                self.saw_token();
                let outcome = self.state().reasm.insert(&h, &chunk);
                let ack = match &outcome {
                    Ok(ChunkOutcome::AlreadyComplete) | Ok(ChunkOutcome::Complete(_)) => {
                        Some(HopAck {
                            transfer: chunk.transfer,
                            received: ChunkBitmap::full(chunk.count),
                        })
                    }
                    Ok(_) => self.state().reasm.ack(h.sender, chunk.transfer),
                    Err(e) => {
                        debug!(error = %e, "token chunk refused");
                        self.metrics.rejected(RejectReason::Other);
                        None
                    }
                };
                if let Some(ack) = ack {
                    let _ = self
                        .net
                        .send(h.sender, h.epoch, &Message::HopAck(ack))
                        .await;
                }
                if let Ok(ChunkOutcome::Complete(token)) = outcome {
                    match via {
                        Via::Vm(vm) => {
                            let _ = self.tokens.send((h, token, vm)).await;
                        }
                        Via::Host => {
                            debug!(epoch = token.epoch, vms = token.len(), "token copy stored");
                            self.state().backup = Some(token);
                        }
                    }
                }
            }
            Message::HopAck(ack) => {
                self.net.deliver_ack(ack);
            }
            Message::TokenSeen { .. } => self.saw_token(),
            Message::LocationRequest { vm } => {
                let hosted = match via {
                    Via::Vm(v) => u32::from(v) == vm,
                    Via::Host => self.hosted().iter().any(|x| u32::from(x.ip) == vm),
                };
                if hosted {
                    let reply = Message::LocationResponse {
                        in_reply_to: h.seq,
                        vm,
                        host: self.net.me(),
                    };
                    let _ = self.net.send(h.sender, self.epoch(), &reply).await;
                }
            }
            Message::CapacityRequest { .. } => {
                let c = self.capacity();
                let reply = Message::CapacityResponse {
                    in_reply_to: h.seq,
                    free_slots: c.free_slots,
                    free_memory_mib: c.free_mem_mb,
                };
                let _ = self.net.send(h.sender, self.epoch(), &reply).await;
            }
            Message::LocationResponse { in_reply_to, .. }
            | Message::CapacityResponse { in_reply_to, .. }
            | Message::SwapRefuse { in_reply_to, .. }
            | Message::SwapDone { in_reply_to, .. } => {
                self.net.answer(in_reply_to, d.message);
            }
            Message::SwapAccept(a) => {
                if !self.net.answer(a.in_reply_to, Message::SwapAccept(a)) {
                    // The proposer gave up waiting: release the partner.
                    let cancel = Message::SwapCommit {
                        vm: a.vm,
                        partner: a.partner,
                        go: false,
                    };
                    let _ = self.net.send(h.sender, self.epoch(), &cancel).await;
                }
            }
            // Both may take long (locating peers, a live migration): off
            // the receive loop, which must keep delivering answers.
            Message::SwapPropose(p) => {
                let me = self.clone();
                tokio::spawn(async move { me.on_swap_propose(h, p).await });
            }
            Message::SwapCommit { vm, partner, go } => {
                let me = self.clone();
                tokio::spawn(async move { me.on_swap_commit(h, vm, partner, go).await });
            }
            Message::MigrationNotice { vm, to, .. } => {
                self.state().locations.insert(vm, to);
            }
            // This peer keeps a skipped VM in the token (it is tried again
            // next round), so it has nothing to add back.
            Message::Members { .. } => debug!("members list ignored"),
            Message::FlowReport(r) => {
                let mut s = self.state();
                match s.report_parts.insert_flow_report(h.sender, r) {
                    Ok(PartsOutcome::Complete(entries)) => {
                        s.reports.insert(h.sender, entries);
                    }
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, from = %h.sender, "flow report part refused");
                        self.metrics.rejected(RejectReason::Other);
                    }
                }
            }
            Message::TokenOrder(o) => {
                let mut s = self.state();
                match s.order_parts.insert_token_order(h.sender, o) {
                    Ok(PartsOutcome::Complete(vms)) => s.order = Some(vms),
                    Ok(_) => {}
                    Err(e) => {
                        debug!(error = %e, from = %h.sender, "token order part refused");
                        self.metrics.rejected(RejectReason::Other);
                    }
                }
            }
        }
    }

    /// Where VM `vm` runs: the cache, else a location request to its own
    /// address (answered by its host).
    async fn locate(&self, vm: Ipv4Addr) -> Option<Ipv4Addr> {
        let id = u32::from(vm);
        if let Some(h) = self.state().locations.get(&id).copied() {
            return Some(h);
        }
        let ans = self
            .net
            .request(
                vm,
                self.epoch(),
                &Message::LocationRequest { vm: id },
                self.cfg.peer.request_timeout,
            )
            .await;
        match ans {
            Some(Message::LocationResponse { host, .. }) => {
                self.state().locations.insert(id, host);
                Some(host)
            }
            _ => None,
        }
    }

    async fn ask_capacity(&self, host: Ipv4Addr, vm: VmId) -> Option<Capacity> {
        if host == self.net.me() {
            return Some(self.capacity());
        }
        match self
            .net
            .request(
                host,
                self.epoch(),
                &Message::CapacityRequest { vm },
                self.cfg.peer.request_timeout,
            )
            .await
        {
            Some(Message::CapacityResponse {
                free_slots,
                free_memory_mib,
                ..
            }) => Some(Capacity {
                free_slots,
                free_mem_mb: free_memory_mib,
            }),
            _ => None,
        }
    }

    /// The measured peers `rates` (of one VM) above `min_rate`, located
    /// (peers that cannot be located are left out); `known` gives one VM's
    /// host without asking.
    async fn located_peers(
        &self,
        rates: Vec<(Ipv4Addr, f64)>,
        known: Option<(VmId, HostId)>,
    ) -> Vec<decision::Peer> {
        let topo = &self.cfg.topology;
        let mut peers = Vec::new();
        for (z, rate) in rates {
            if rate <= self.cfg.policy.min_rate {
                continue;
            }
            let id = u32::from(z);
            let host = match known {
                Some((k, h)) if k == id => Some(h),
                _ => match self.locate(z).await {
                    Some(a) => topo.host_by_addr(a),
                    None => {
                        debug!(peer = %z, "peer not located; left out");
                        None
                    }
                },
            };
            if let Some(host) = host {
                peers.push(decision::Peer { id, host, rate });
            }
        }
        peers
    }

    /// Holds the token for hosted VM `u`: decide, maybe migrate or swap,
    /// and return u's level and load for its token entry.
    async fn decide_for(&self, u: &HostedVm) -> (u8, Load) {
        let topo = &self.cfg.topology;
        let uid = u32::from(u.ip);
        let rates = self.collector.flows().peers_of(u.ip);
        let load: f64 = rates.iter().map(|(_, r)| r).sum();
        let peers = self.located_peers(rates, None).await;
        let held = {
            let s = self.state();
            s.migrated_at
                .get(&uid)
                .is_some_and(|t| t.elapsed() < self.cfg.policy.hold_down)
                || s.swaps.holds(uid)
        };
        let mut scope = self.cfg.policy.scope();
        if held {
            // Reserve no partner for a VM that may not move anyway.
            scope.swaps = false;
        }
        let p = plan_with(topo, uid, self.cfg.me, &peers, scope.candidates);
        let settings = Settings {
            rule: self.cfg.policy.rule,
            cm: self.cfg.migration_cost,
            mem_need_mb: self.cfg.node.vm_memory_mib,
            scope,
        };
        let mut decider =
            ScopedDecider::new(topo, &p, &peers, settings, self.capacity().free_mem_mb);
        let mut accepted: Vec<(Ipv4Addr, SwapAcceptance)> = Vec::new();
        while let Some(q) = decider.next_query() {
            match q {
                Query::Capacity(h) => {
                    let c = self.ask_capacity(topo.host_addr(h), uid).await;
                    decider.answer_capacity(c);
                }
                Query::Swap(r) => {
                    let to = topo.host_addr(r.to);
                    let a = self.propose_swap(&r, to).await;
                    decider.answer_swap(a.as_ref().map(offer_of));
                    if let Some(a) = a {
                        accepted.push((to, a));
                    }
                }
            }
        }
        let step = decider.finish();
        // Partners reserved for swaps not chosen are released.
        let chosen = match &step {
            Step::Swap(s) => Some((topo.host_addr(s.to), s.partner)),
            Step::Single(_) => None,
        };
        for (host, a) in &accepted {
            if chosen != Some((*host, a.partner)) {
                self.cancel_swap(*host, a.vm, a.partner).await;
            }
        }
        self.metrics.decision_evaluated();
        let cost_before = match &step {
            Step::Single(d) => d.cost_before(),
            Step::Swap(s) => s.cost_before,
        };
        let mut level = match step {
            Step::Single(Decision::Stay { level, .. }) => level,
            _ => p.level,
        };
        self.metrics
            .set_vm_cost(&u.ip.to_string(), cost_before, level);
        let mut outcome = None;
        match step {
            Step::Single(Decision::Migrate {
                to,
                benefit,
                level_after,
                ..
            }) => {
                let target = topo.host_addr(to);
                if held {
                    info!(vm = %u.ip, "migration worth it but the VM moved recently: held down");
                    outcome = Some("held-down".to_owned());
                } else {
                    info!(vm = %u.ip, to = %target, benefit, "migrating");
                    self.metrics.observe_benefit(benefit);
                    let result = self.migrate_vm(u, target).await;
                    if matches!(result, MigrationResult::Done(_)) {
                        level = level_after;
                    }
                    outcome = Some(format!("{result:?}"));
                }
            }
            Step::Swap(s) => {
                let target = topo.host_addr(s.to);
                let a = accepted
                    .iter()
                    .find(|(h, a)| *h == target && a.partner == s.partner)
                    .map(|(_, a)| *a);
                if let Some(a) = a {
                    // u's level if it moved and the partner did not follow.
                    let alone = p
                        .candidates
                        .iter()
                        .find(|c| c.host == s.to)
                        .map_or(p.level, |c| c.level_after);
                    let (o, l) = self.execute_swap(u, &s, target, &a, p.level, alone).await;
                    outcome = Some(format!("swap {o}"));
                    level = l;
                }
            }
            Step::Single(Decision::Stay { .. }) => {}
        }
        let mut s = self.state();
        s.last_decisions.push(DecisionRecord {
            vm: u.ip,
            epoch: self.epoch(),
            decision: step,
            outcome,
        });
        if s.last_decisions.len() > 32 {
            s.last_decisions.remove(0);
        }
        (level, Load::from_rate(load))
    }

    /// Asks the backend to move hosted VM `vm` to `target`; logs, counts,
    /// and on success records the move and announces it.
    async fn migrate_vm(&self, vm: &HostedVm, target: Ipv4Addr) -> MigrationResult {
        let result = (self.migrate)(vm.clone(), target).await;
        let id = u32::from(vm.ip);
        match &result {
            MigrationResult::Done(took) => {
                info!(vm = %vm.ip, to = %target, seconds = took.as_secs_f64(), "migration done");
                // The duration first: a scrape that sees the count sees it.
                self.metrics.migration_duration(*took);
                self.metrics.migration("done");
                self.state().migrated_at.insert(id, Instant::now());
                self.announce_move(vm.ip, target).await;
            }
            MigrationResult::Advisory => {
                info!(vm = %vm.ip, to = %target, "advisory: would migrate");
                self.metrics.migration("advisory");
            }
            MigrationResult::Failed(e) => {
                warn!(vm = %vm.ip, to = %target, error = %e, "migration failed; VM stays");
                self.metrics.migration("failed");
            }
            MigrationResult::Undefined(e) => {
                warn!(vm = %vm.ip, to = %target, error = %e, "migration outcome unknown; not retried");
                self.metrics.migration("failed");
                self.state().migrated_at.insert(id, Instant::now());
            }
        }
        result
    }

    /// How long a proposer waits for the answer to a swap proposal: the
    /// asked host may have to locate its VMs' peers first.
    fn swap_answer_timeout(&self) -> Duration {
        self.cfg.peer.request_timeout * 4
    }

    /// Sends the swap proposal of the decider's question to `to`; the
    /// acceptance if it came.
    async fn propose_swap(&self, r: &SwapRequest, to: Ipv4Addr) -> Option<SwapAcceptance> {
        let mut peers_on_target = r.peers_on_target.clone();
        // The largest rates first, if they must be cut to one datagram.
        peers_on_target.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        peers_on_target.truncate(MAX_SWAP_PEERS);
        let proposal = SwapProposal {
            vm: r.vm,
            from: self.net.me(),
            to,
            gain: r.gain,
            cost_before: r.cost_before,
            c_m: r.c_m,
            mem_mib: r.mem_mb,
            from_free_mem_mib: r.from_free_mem_mb,
            // An advisory host moves nothing: the partner must not come
            // first.
            from_headroom: !self.advisory && self.room().can_hold_one_more(),
            peers_on_target,
        };
        let vm = Ipv4Addr::from(r.vm);
        let answer = self
            .net
            .request(
                to,
                self.epoch(),
                &Message::SwapPropose(proposal),
                self.swap_answer_timeout(),
            )
            .await;
        match answer {
            Some(Message::SwapAccept(a)) if a.vm == r.vm => {
                info!(vm = %vm, host = %to, partner = %Ipv4Addr::from(a.partner), benefit = a.benefit, "swap accepted");
                Some(a)
            }
            Some(Message::SwapAccept(a)) => {
                self.cancel_swap(to, a.vm, a.partner).await;
                None
            }
            Some(Message::SwapRefuse { reason, .. }) => {
                info!(vm = %vm, host = %to, reason = reason.name(), "swap refused");
                None
            }
            _ => {
                debug!(vm = %vm, host = %to, "no answer to a swap proposal");
                None
            }
        }
    }

    /// Releases a partner reserved for a swap that will not happen.
    async fn cancel_swap(&self, host: Ipv4Addr, vm: VmId, partner: VmId) {
        let m = Message::SwapCommit {
            vm,
            partner,
            go: false,
        };
        for _ in 0..3 {
            let a = self
                .net
                .request(host, self.epoch(), &m, self.cfg.peer.request_timeout)
                .await;
            if matches!(a, Some(Message::SwapDone { .. })) {
                return;
            }
        }
        debug!(host = %host, "swap cancel unanswered; the reservation expires there");
    }

    /// Tells the asked host to move the partner now, and waits (resending)
    /// until its migration ended or `policy.swap_timeout`.
    async fn commit_swap(&self, host: Ipv4Addr, vm: VmId, partner: VmId) -> Option<SwapResult> {
        let m = Message::SwapCommit {
            vm,
            partner,
            go: true,
        };
        let deadline = Instant::now() + self.cfg.policy.swap_timeout;
        while Instant::now() < deadline {
            let wait = (self.cfg.peer.request_timeout * 4).min(deadline - Instant::now());
            if let Some(Message::SwapDone { result, .. }) =
                self.net.request(host, self.epoch(), &m, wait).await
            {
                return Some(result);
            }
        }
        None
    }

    /// Makes an agreed swap: the two migrations in the order the asked
    /// host gave. Returns the outcome's label and u's level after.
    async fn execute_swap(
        &self,
        u: &HostedVm,
        s: &Swap,
        target: Ipv4Addr,
        a: &SwapAcceptance,
        level_now: u8,
        level_alone: u8,
    ) -> (&'static str, u8) {
        let partner = Ipv4Addr::from(s.partner);
        info!(vm = %u.ip, to = %target, partner = %partner, benefit = s.benefit, c_m = s.c_m, order = ?a.order, "swapping");
        self.metrics.observe_benefit(s.benefit);
        let (outcome, level) = match a.order {
            SwapOrder::ProposerFirst => match self.migrate_vm(u, target).await {
                MigrationResult::Done(_) => match self.commit_swap(target, s.vm, s.partner).await {
                    Some(SwapResult::Done) => ("done", s.level_after),
                    r => {
                        warn!(vm = %u.ip, partner = %partner, result = ?r, "swap half done: this VM moved, the partner did not follow; both run on the partner's host");
                        ("partial", level_alone)
                    }
                },
                MigrationResult::Advisory => {
                    self.cancel_swap(target, s.vm, s.partner).await;
                    ("advisory", level_now)
                }
                MigrationResult::Failed(_) | MigrationResult::Undefined(_) => {
                    self.cancel_swap(target, s.vm, s.partner).await;
                    ("failed", level_now)
                }
            },
            SwapOrder::PartnerFirst => match self.commit_swap(target, s.vm, s.partner).await {
                Some(SwapResult::Done) => {
                    self.state().locations.insert(s.partner, self.net.me());
                    match self.migrate_vm(u, target).await {
                        MigrationResult::Done(_) => ("done", s.level_after),
                        r => {
                            warn!(vm = %u.ip, partner = %partner, result = ?r, "swap half done: the partner came, this VM could not go; both run here");
                            ("partial", level_now)
                        }
                    }
                }
                Some(SwapResult::Advisory) => {
                    info!(vm = %u.ip, to = %target, partner = %partner, "advisory: would swap");
                    ("advisory", level_now)
                }
                r => {
                    warn!(vm = %u.ip, partner = %partner, result = ?r, "swap failed: the partner did not move; nothing moved here");
                    ("failed", level_now)
                }
            },
        };
        info!(vm = %u.ip, partner = %partner, outcome, "swap {outcome}");
        self.metrics.swap(outcome);
        (outcome, level)
    }

    /// The asked host's side of a proposal: choose, reserve, answer.
    async fn on_swap_propose(self: Arc<Self>, h: Header, p: SwapProposal) {
        let reply = match self.consider_swap(&h, &p).await {
            Ok(a) => {
                info!(vm = %Ipv4Addr::from(p.vm), from = %h.sender, partner = %Ipv4Addr::from(a.partner), benefit = a.benefit, order = ?a.order, "swap proposal accepted; partner reserved");
                self.metrics.swap_request("accepted");
                Message::SwapAccept(a)
            }
            Err(reason) => {
                info!(vm = %Ipv4Addr::from(p.vm), from = %h.sender, reason = reason.name(), "swap proposal refused");
                self.metrics.swap_request(reason.name());
                Message::SwapRefuse {
                    in_reply_to: h.seq,
                    vm: p.vm,
                    reason,
                }
            }
        };
        let _ = self.net.send(h.sender, self.epoch(), &reply).await;
    }

    async fn consider_swap(
        &self,
        h: &Header,
        p: &SwapProposal,
    ) -> Result<SwapAcceptance, SwapRefusal> {
        if !self.cfg.policy.swaps {
            return Err(SwapRefusal::Disabled);
        }
        let topo = &self.cfg.topology;
        let from = topo
            .host_by_addr(p.from)
            .filter(|_| p.from == h.sender && p.to == self.net.me())
            .ok_or(SwapRefusal::Invalid)?;
        let hosted = self.hosted();
        if hosted.iter().any(|x| u32::from(x.ip) == p.vm) {
            return Err(SwapRefusal::Invalid);
        }
        {
            let mut s = self.state();
            s.swaps.expire(monotonic_ns());
            if s.swaps.busy() {
                return Err(SwapRefusal::Busy);
            }
        }
        let order = swap::order(
            self.advisory,
            self.room().can_hold_one_more(),
            p.from_headroom,
        )?;
        let mut local = Vec::new();
        for w in &hosted {
            let id = u32::from(w.ip);
            let recent = self
                .state()
                .migrated_at
                .get(&id)
                .is_some_and(|t| t.elapsed() < self.cfg.policy.hold_down);
            if recent {
                continue;
            }
            let rates = self.collector.flows().peers_of(w.ip);
            let peers = self.located_peers(rates, Some((p.vm, from))).await;
            local.push(LocalVm {
                id,
                mem_mb: self.cfg.node.vm_memory_mib,
                peers,
            });
        }
        let req = SwapRequest {
            vm: p.vm,
            from,
            to: self.cfg.me,
            gain: p.gain,
            cost_before: p.cost_before,
            c_m: p.c_m,
            mem_mb: p.mem_mib,
            from_free_mem_mb: p.from_free_mem_mib,
            peers_on_target: p.peers_on_target.clone(),
        };
        let offer = choose_swap_partner(
            topo,
            self.cfg.me,
            self.capacity().free_mem_mb,
            &local,
            &req,
            self.cfg.migration_cost,
        )
        .ok_or(SwapRefusal::NoPartner)?;
        let until = monotonic_ns() + self.cfg.policy.swap_timeout.as_nanos() as u64;
        if !self
            .state()
            .swaps
            .reserve(p.vm, offer.partner, h.sender, order, until)
        {
            return Err(SwapRefusal::Busy);
        }
        Ok(SwapAcceptance {
            in_reply_to: h.seq,
            vm: p.vm,
            partner: offer.partner,
            partner_gain: offer.partner_gain,
            partner_cost_before: offer.partner_cost_before,
            partner_cost_after: offer.partner_cost_after,
            benefit: offer.benefit,
            c_m: offer.c_m,
            partner_level_after: offer.partner_level_after,
            order,
        })
    }

    /// The asked host's side of a commit: move the partner (once), or
    /// release it; answer with the result.
    async fn on_swap_commit(self: Arc<Self>, h: Header, vm: VmId, partner: VmId, go: bool) {
        let linger = monotonic_ns() + self.cfg.policy.swap_timeout.as_nanos() as u64;
        let action = self
            .state()
            .swaps
            .commit(h.sender, vm, partner, go, h.seq, linger);
        let (reply_to, result) = match action {
            swap::CommitAction::Wait => return,
            swap::CommitAction::Reply(result) => (h.seq, result),
            swap::CommitAction::Migrate(w) => {
                let here = self.hosted().into_iter().find(|x| u32::from(x.ip) == w);
                let result = match here {
                    None => {
                        warn!(partner = %Ipv4Addr::from(w), "swap partner no longer here");
                        SwapResult::Failed
                    }
                    Some(wvm) => {
                        info!(vm = %wvm.ip, to = %h.sender, "swap: moving the partner");
                        match self.migrate_vm(&wvm, h.sender).await {
                            MigrationResult::Done(_) => SwapResult::Done,
                            MigrationResult::Advisory => SwapResult::Advisory,
                            MigrationResult::Failed(_) => SwapResult::Failed,
                            MigrationResult::Undefined(_) => SwapResult::Undefined,
                        }
                    }
                };
                let linger = monotonic_ns() + self.cfg.policy.swap_timeout.as_nanos() as u64;
                match self.state().swaps.end(vm, result, linger) {
                    Some((seq, _)) => (seq, result),
                    None => return,
                }
            }
        };
        let done = Message::SwapDone {
            in_reply_to: reply_to,
            vm,
            partner,
            result,
        };
        let _ = self.net.send(h.sender, self.epoch(), &done).await;
    }

    async fn announce_move(&self, vm: Ipv4Addr, to: Ipv4Addr) {
        let id = u32::from(vm);
        self.state().locations.insert(id, to);
        let notice = Message::MigrationNotice {
            vm: id,
            from: self.net.me(),
            to,
        };
        for host in self.cfg.hosts().collect::<Vec<_>>() {
            if host != self.net.me() {
                let _ = self.net.send(host, self.epoch(), &notice).await;
            }
        }
    }

    /// Sends the token to `next` chunk by chunk until its host acknowledges
    /// every chunk; false if it never did.
    async fn pass(&self, token: &Token, next: VmId) -> bool {
        let epoch = token.epoch;
        let transfer = rand_transfer();
        let Ok(chunks) = token_chunks(token, transfer) else {
            warn!("token too large to send");
            return false;
        };
        let to = Ipv4Addr::from(next);
        let count = chunks.len() as u16;
        let mut have = ChunkBitmap::new(count);
        let mut acks = self.net.await_acks(transfer);
        for attempt in 0..=self.cfg.peer.hop_retries {
            if attempt > 0 {
                self.metrics.token_retransmitted();
            }
            for i in (0..count).filter(|&i| !have.contains(i)) {
                let _ = self
                    .net
                    .send(
                        to,
                        epoch,
                        &Message::TokenChunk(chunks[usize::from(i)].clone()),
                    )
                    .await;
            }
            // Every chunk is acknowledged with the receiver's whole bitmap:
            // collect them until all chunks are in or the time is up.
            let deadline = tokio::time::Instant::now() + self.cfg.peer.hop_timeout;
            while let Some(a) = acks.next_until(deadline).await {
                for i in 0..count {
                    if a.received.count() == count && a.received.contains(i) {
                        have.set(i);
                    }
                }
                if have.is_complete() {
                    return true;
                }
            }
        }
        false
    }

    /// Sends a small message to every watcher but this host.
    async fn tell_watchers(&self, m: &Message, epoch: u64) {
        for w in self.cfg.watchers.clone() {
            if w != self.net.me() {
                let _ = self.net.send(w, epoch, m).await;
            }
        }
    }

    /// Sends a full copy of the token to every watcher (their host address).
    async fn copy_to_watchers(&self, token: &Token) {
        for w in self.cfg.watchers.clone() {
            if w == self.net.me() {
                self.state().backup = Some(token.clone());
                continue;
            }
            let transfer = rand_transfer();
            if let Ok(chunks) = token_chunks(token, transfer) {
                for c in chunks {
                    let _ = self.net.send(w, token.epoch, &Message::TokenChunk(c)).await;
                }
            }
        }
    }

    /// Hands the token on from `current` by the policy, skipping VMs whose
    /// host does not acknowledge.
    async fn hand_on(&self, policy: &mut dyn TokenPolicy, mut token: Token, current: Option<VmId>) {
        let round = token.round;
        let mut from = current;
        for _ in 0..token.len().max(1) {
            self.feed_order(policy);
            let Some(next) = policy::advance(policy, &mut token, from) else {
                warn!("empty token: nothing to pass");
                return;
            };
            if token.round != round {
                info!(
                    epoch = token.epoch,
                    round = token.round,
                    "token round complete"
                );
                self.metrics.set_token_round(u64::from(token.round));
                self.copy_to_watchers(&token).await;
            }
            let seen = seen_message(next, &token, self.net.me());
            self.tell_watchers(&seen, token.epoch).await;
            if self.pass(&token, next).await {
                self.metrics.token_passed();
                debug!(to = %Ipv4Addr::from(next), "token passed");
                return;
            }
            warn!(vm = %Ipv4Addr::from(next), "no host acknowledged the token for this VM; skipping it");
            self.metrics.token_lost();
            from = Some(next);
        }
        warn!("no VM's host acknowledged the token; it will be regenerated");
    }

    fn feed_order(&self, policy: &mut dyn TokenPolicy) {
        if !policy.needs_global_knowledge() {
            return;
        }
        if let Some(order) = &self.state().order {
            policy.feed_ranking(order.clone());
        }
    }

    /// Members known from reports (for regeneration) plus our own VMs.
    fn known_vms(&self) -> Vec<VmId> {
        let mut v: Vec<VmId> = self.hosted().iter().map(|h| u32::from(h.ip)).collect();
        let s = self.state();
        for entries in s.reports.values() {
            v.extend(entries.iter().map(|e| e.vm));
        }
        if let Some(b) = &s.backup {
            v.extend(b.entries().iter().map(|e| e.id));
        }
        v
    }

    /// A watcher's time-out: regenerate if no lower watcher is alive.
    async fn maybe_regenerate(&self, policy: &mut dyn TokenPolicy) {
        if !self.cfg.is_watcher() || self.state().last_seen.elapsed() < self.cfg.peer.token_timeout
        {
            return;
        }
        let me = self.net.me();
        for w in self.cfg.watchers.clone() {
            if w >= me {
                break;
            }
            if self.ask_capacity(w, 0).await.is_some() {
                debug!(watcher = %w, "a lower watcher is alive; it regenerates");
                self.saw_token();
                return;
            }
        }
        let members = self.known_vms();
        if members.is_empty() {
            // Nothing to circulate yet: wait, without burning an epoch.
            self.saw_token();
            return;
        }
        let epoch = self.epoch() + 1;
        self.adopt_epoch(epoch);
        let backup = self.state().backup.clone();
        let mut token = Token::new(epoch, members);
        if let Some(b) = backup {
            for e in b.entries() {
                if let Some(t) = token.get_mut(e.id) {
                    t.level = e.level;
                    t.load = e.load;
                }
            }
            token.round = b.round;
        }
        {
            let mut s = self.state();
            s.regenerated.push(epoch);
            s.last_seen = Instant::now();
        }
        self.metrics.token_regenerated();
        info!(epoch, vms = token.len(), "token regenerated");
        self.tell_watchers(&seen_message(0, &token, me), epoch)
            .await;
        self.hand_on(policy, token, None).await;
    }

    /// Every hosted VM's flows, to the watchers and the coordinator.
    async fn report(&self, report_id: u64) {
        let hosted = self.hosted();
        let mut entries = Vec::new();
        {
            let flows = self.collector.flows();
            for vm in &hosted {
                // A VM with no traffic still reports itself: it is a member.
                entries.push(FlowEntry {
                    vm: u32::from(vm.ip),
                    peer: u32::from(vm.ip),
                    rate: 0.0,
                });
                for (z, rate) in flows.peers_of(vm.ip) {
                    entries.push(FlowEntry {
                        vm: u32::from(vm.ip),
                        peer: u32::from(z),
                        rate,
                    });
                }
            }
        }
        let Some(parts) = FlowReport::split(report_id, &entries) else {
            return;
        };
        let mut to: Vec<Ipv4Addr> = self.cfg.watchers.clone();
        if let Some(c) = self.cfg.peer.coordinator {
            to.push(c);
        }
        to.sort();
        to.dedup();
        for host in to {
            if host == self.net.me() {
                self.state().reports.insert(host, entries.clone());
                continue;
            }
            for p in &parts {
                let _ = self
                    .net
                    .send(host, self.epoch(), &Message::FlowReport(p.clone()))
                    .await;
            }
        }
    }

    /// The coordinator: ranks every VM by the saving of its best move, from
    /// all hosts' reports (score-core's `order_from_reports`, which the
    /// protocol's `Node` shares), and sends the order to every host.
    async fn coordinate(&self, order_id: u64) {
        let n = &self.cfg.node;
        let shape = HostShape {
            vm_slots: n.vm_slots,
            memory_mib: n.memory_mib,
            vm_memory_mib: n.vm_memory_mib,
        };
        let order = {
            let s = self.state();
            order_from_reports(
                &self.cfg.topology,
                s.reports.iter().map(|(h, e)| (*h, e.as_slice())),
                self.cfg.policy.rule,
                self.cfg.migration_cost,
                shape,
            )
        };
        if order.is_empty() {
            return;
        }
        let Some(parts) = TokenOrder::split(order_id, &order) else {
            return;
        };
        debug!(vms = order.len(), "global order sent");
        for host in self.cfg.hosts().collect::<Vec<_>>() {
            if host == self.net.me() {
                self.state().order = Some(order.clone());
                continue;
            }
            for p in &parts {
                let _ = self
                    .net
                    .send(host, self.epoch(), &Message::TokenOrder(p.clone()))
                    .await;
            }
        }
    }
}

/// The decider's view of an acceptance.
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

/// The sign of life of `token`, held on `host`, being handed to `holder`.
fn seen_message(holder: VmId, token: &Token, host: Ipv4Addr) -> Message {
    Message::TokenSeen {
        holder,
        round: token.round,
        visited: token.entries().iter().filter(|e| e.visited).count() as u32,
        host,
    }
}

fn rand_transfer() -> u64 {
    // Unique enough per sender: the wall clock in ns, as sequence numbers.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Starts the protocol's tasks; they stop when `cancel` fires. `advisory`:
/// the backend behind `migrate` moves nothing. `incarnation`: this run's,
/// from [`incarnation::next`], raised at `started_ms` (wall clock).
#[expect(
    clippy::too_many_arguments,
    reason = "the daemon's parts, handed over once; the peer's shell over score-core's Node will take them as one"
)]
pub async fn start(
    cfg: Arc<ClusterSettings>,
    collector: Arc<Collector>,
    metrics: Arc<dyn PeerMetrics>,
    migrate: Migrator,
    advisory: bool,
    control: ControlReader,
    cancel: CancellationToken,
    incarnation: u32,
    started_ms: u64,
) -> std::io::Result<(Arc<Peer>, Vec<tokio::task::JoinHandle<()>>)> {
    let hosts = cfg.topology.host_count() as usize;
    let until = net::wall_ms().saturating_add(cfg.peer.previous_keys_for.as_millis() as u64);
    let keys = cfg
        .previous_keys
        .iter()
        .fold(KeyRing::new(cfg.key.clone()), |ring, k| {
            ring.accepting(k.clone(), until)
        });
    let key_count = keys.len();
    let identity = net::Identity {
        keys,
        incarnation,
        started_ms,
        max_age: cfg.peer.max_datagram_age,
    };
    let net = Net::bind(cfg.node.address, cfg.peer.port, identity, hosts).await?;
    // Logged once the socket is bound: from here on datagrams are heard.
    info!(incarnation, keys = key_count, "peer listening");
    let (tx, rx) = mpsc::channel(16);
    let peer = Arc::new(Peer {
        cfg: cfg.clone(),
        net,
        collector,
        metrics,
        migrate,
        advisory,
        epoch: AtomicU64::new(0),
        state: Mutex::new(State {
            reasm: Reassembler::default(),
            locations: HashMap::new(),
            backup: None,
            reports: BTreeMap::new(),
            report_parts: PartsAssembler::default(),
            order: None,
            order_parts: PartsAssembler::default(),
            migrated_at: HashMap::new(),
            last_seen: Instant::now(),
            last_decisions: Vec::new(),
            regenerated: Vec::new(),
            swaps: swap::Reservations::default(),
        }),
        tokens: tx,
    });
    let mut tasks = Vec::new();

    // Datagrams to the host address.
    let (p, c) = (peer.clone(), cancel.clone());
    tasks.push(tokio::spawn(async move {
        let mut buf = vec![0u8; 2048];
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                r = p.net.recv(&mut buf) => if let Ok((n, _)) = r {
                    p.handle(&buf[..n], Via::Host).await;
                },
            }
        }
    }));

    // Datagrams to hosted VMs, intercepted by the classifier.
    let (p, c) = (peer.clone(), cancel.clone());
    // SAFETY: the reader owns the ring's fd and the AsyncFd owns the reader.
    let mut ring = unsafe { tokio::io::unix::AsyncFd::register(control) }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    tasks.push(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                g = ring.readable_mut() => {
                    let Ok(mut g) = g else { return };
                    let items = g.get_inner_mut().drain();
                    g.clear_ready();
                    for item in items {
                        p.handle(&item.payload, Via::Vm(item.vm)).await;
                    }
                }
            }
        }
    }));

    // The token holder and the watcher's time-out.
    let (p, c) = (peer.clone(), cancel.clone());
    tasks.push(tokio::spawn(token_loop(p, rx, c)));

    // Flow reports and, on the coordinator, the global order.
    let (p, c) = (peer.clone(), cancel.clone());
    tasks.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(p.cfg.peer.report_interval);
        let mut n = 0u64;
        loop {
            tokio::select! {
                _ = c.cancelled() => return,
                _ = tick.tick() => {
                    // Receivers drop a list id below the newest they saw
                    // from this host: ids must grow across restarts too.
                    n = rand_transfer().max(n + 1);
                    p.report(n).await;
                    if p.cfg.coordinator {
                        p.coordinate(n).await;
                    }
                }
            }
        }
    }));
    Ok((peer, tasks))
}

async fn token_loop(
    p: Arc<Peer>,
    mut rx: mpsc::Receiver<(Header, Token, Ipv4Addr)>,
    cancel: CancellationToken,
) {
    let mut policy = p.cfg.policy.kind.build();
    let check = (p.cfg.peer.token_timeout / 4).max(Duration::from_millis(100));
    loop {
        let got = tokio::select! {
            _ = cancel.cancelled() => return,
            got = tokio::time::timeout(check, rx.recv()) => got,
        };
        match got {
            Ok(Some((h, mut token, vm))) => {
                if token.epoch < p.epoch() {
                    p.metrics.rejected(RejectReason::StaleEpoch);
                    continue;
                }
                p.metrics.token_received();
                p.metrics.set_token_epoch(token.epoch);
                // Every holder exports the round, not only the one that
                // completed it.
                p.metrics.set_token_round(u64::from(token.round));
                let span = info_span!("token", vm = %vm, epoch = token.epoch, round = token.round);
                let _enter = span.enter();
                info!(from = %h.sender, "token received");
                let hosted = p.hosted();
                // Hold the token a little: rates need time, the paper passes
                // it every few seconds at most. Shutdown may cut the hold
                // and the hand-off (the watchers then regenerate the token),
                // never a migration under way: that runs to its end, bounded
                // by the backend's own time-out.
                drop(_enter);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(p.cfg.policy.token_hold) => {}
                }
                let seen = seen_message(u32::from(vm), &token, p.net.me());
                let epoch = token.epoch;
                let decide = async {
                    p.tell_watchers(&seen, epoch).await;
                    if let Some(u) = hosted.iter().find(|x| x.ip == vm) {
                        let (level, load) = p.decide_for(u).await;
                        token.update(u32::from(vm), level, load);
                    }
                }
                .instrument(span.clone());
                // A live migration (two for a swap) may outlast the token
                // time-out: the holder keeps telling the watchers, and
                // itself, that the token is alive, or one of them would
                // regenerate it meanwhile.
                let keepalive = async {
                    let period = (p.cfg.peer.token_timeout / 3).max(Duration::from_millis(100));
                    let mut tick =
                        tokio::time::interval_at(tokio::time::Instant::now() + period, period);
                    loop {
                        tick.tick().await;
                        p.saw_token();
                        p.tell_watchers(&seen, epoch).await;
                    }
                };
                tokio::select! {
                    _ = decide => {}
                    _ = keepalive => {}
                }
                p.saw_token();
                // VMs started here since the token last came are added.
                for x in &hosted {
                    token.insert(u32::from(x.ip));
                }
                if token.epoch < p.epoch() {
                    info!(parent: &span, "a newer token exists; this one ends here");
                    continue;
                }
                let pass = p
                    .hand_on(policy.as_mut(), token, Some(u32::from(vm)))
                    .instrument(span);
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = pass => {}
                }
            }
            Ok(None) => return,
            Err(_) => tokio::select! {
                _ = cancel.cancelled() => return,
                _ = p.maybe_regenerate(policy.as_mut()) => {}
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use score_core::{decision::StayReason, swap::Swap};

    use super::*;

    /// /status shows each decision with its kind: the paper's decisions as
    /// before (under `decision`), swaps with both VMs.
    #[test]
    fn decision_records_serialise_for_status() {
        let stay = DecisionRecord {
            vm: Ipv4Addr::new(10, 0, 0, 1),
            epoch: 3,
            decision: Step::Single(Decision::Stay {
                vm: 1,
                host: 0,
                cost_before: 2.0,
                level: 1,
                reason: StayReason::NoPeers,
            }),
            outcome: None,
        };
        let v = serde_json::to_value(&stay).unwrap();
        assert_eq!(v["decision"]["step"], "single");
        assert_eq!(v["decision"]["decision"], "stay");
        assert_eq!(v["decision"]["reason"]["reason"], "no-peers");
        let swap = DecisionRecord {
            decision: Step::Swap(Swap {
                vm: 1,
                from: 0,
                to: 2,
                partner: 4,
                cost_before: 10.0,
                cost_after: 0.0,
                partner_cost_before: 5.0,
                partner_cost_after: 0.0,
                benefit: 30.0,
                c_m: 0.0,
                level_after: 0,
                partner_level_after: 0,
                asked: 2,
            }),
            outcome: Some("swap done".into()),
            ..stay
        };
        let v = serde_json::to_value(&swap).unwrap();
        assert_eq!(v["decision"]["step"], "swap");
        assert_eq!(v["decision"]["partner"], 4);
        assert_eq!(v["outcome"], "swap done");
    }

    #[test]
    fn offers_carry_the_acceptance_numbers() {
        let a = SwapAcceptance {
            in_reply_to: 9,
            vm: 1,
            partner: 4,
            partner_gain: 7.0,
            partner_cost_before: 3.5,
            partner_cost_after: 0.25,
            benefit: 11.0,
            c_m: 2.0,
            partner_level_after: 1,
            order: SwapOrder::PartnerFirst,
        };
        let o = offer_of(&a);
        assert_eq!(
            (o.partner, o.partner_gain, o.partner_cost_before),
            (4, 7.0, 3.5)
        );
        assert_eq!(
            (
                o.partner_cost_after,
                o.benefit,
                o.c_m,
                o.partner_level_after
            ),
            (0.25, 11.0, 2.0, 1)
        );
    }
}
