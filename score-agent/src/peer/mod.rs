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

pub mod net;

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
    cost::{CostModel, Placement, Traffic},
    decision::{self, Capacity, Decision, plan},
    policy::{self, TokenPolicy, rank_by_saving},
    token::{Load, Token, VmId},
    wire::{
        ChunkBitmap, ChunkOutcome, FlowEntry, FlowReport, Header, HopAck, Message, Reassembler,
        TokenOrder, token_chunks,
    },
};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::{
    cluster::ClusterSettings,
    collector::Collector,
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
    /// The benefit of a migration about to be made.
    fn observe_benefit(&self, _benefit: f64) {}
    /// A hosted VM's communication cost and level, as of its last decision.
    fn set_vm_cost(&self, _vm: &str, _cost: f64, _level: u8) {}
    /// A datagram was dropped, for `reason`.
    fn rejected(&self, _reason: &str) {}
    /// A hosted VM migrated away: its series go now.
    fn vm_left(&self, _vm: &str) {}
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
    /// score-core's decision, with its numbers.
    pub decision: Decision,
    /// What the backend did, if asked.
    pub outcome: Option<String>,
}

struct State {
    reasm: Reassembler,
    locations: HashMap<VmId, Ipv4Addr>,
    /// Watchers: the latest copy of the token.
    backup: Option<Token>,
    /// Watchers and coordinator: VM -> (host, its flows) from reports.
    reports: HashMap<Ipv4Addr, BTreeMap<u16, Vec<FlowEntry>>>,
    /// Global policy: the coordinator's latest order, by parts.
    order: (u64, BTreeMap<u16, Vec<VmId>>, u16),
    migrated_at: HashMap<VmId, Instant>,
    last_seen: Instant,
    last_decisions: Vec<DecisionRecord>,
    /// Epochs this agent created, to prove one token per epoch.
    regenerated: Vec<u64>,
}

/// One agent's side of the protocol.
pub struct Peer {
    cfg: Arc<ClusterSettings>,
    net: Arc<Net>,
    collector: Arc<Collector>,
    metrics: Arc<dyn PeerMetrics>,
    migrate: Migrator,
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
        let d = match self.net.open(bytes) {
            Ok(d) => d,
            Err(e) => {
                debug!(error = %e, ?via, "datagram rejected");
                self.metrics.rejected(e.reason());
                return;
            }
        };
        let h = d.header;
        let token_kind = matches!(
            d.message,
            Message::TokenChunk(_) | Message::TokenSeen { .. }
        );
        if token_kind {
            if let Err(e) = h.check_epoch(self.epoch()) {
                self.metrics.rejected(e.reason());
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
                        self.metrics.rejected("other");
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
            | Message::CapacityResponse { in_reply_to, .. } => {
                self.net.answer(in_reply_to, d.message);
            }
            Message::MigrationNotice { vm, to, .. } => {
                self.state().locations.insert(vm, to);
            }
            Message::FlowReport(r) => {
                let mut s = self.state();
                let parts = s.reports.entry(h.sender).or_default();
                if r.part == 0 {
                    parts.clear();
                }
                parts.insert(r.part, r.entries);
            }
            Message::TokenOrder(o) => {
                let mut s = self.state();
                if o.order != s.order.0 {
                    s.order = (o.order, BTreeMap::new(), o.parts);
                }
                s.order.1.insert(o.part, o.vms);
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

    /// Holds the token for hosted VM `u`: decide, maybe migrate, and
    /// return u's level and load for its token entry.
    async fn decide_for(&self, u: &HostedVm) -> (u8, Load) {
        let topo = &self.cfg.topology;
        let peers_rates = self.collector.flows().peers_of(u.ip);
        let load: f64 = peers_rates.iter().map(|(_, r)| r).sum();
        let mut peers = Vec::new();
        for (z, rate) in peers_rates {
            if rate <= self.cfg.policy.min_rate {
                continue;
            }
            let Some(host) = self.locate(z).await else {
                debug!(peer = %z, "peer not located; left out");
                continue;
            };
            if let Some(hid) = topo.host_by_addr(host) {
                peers.push(decision::Peer {
                    id: u32::from(z),
                    host: hid,
                    rate,
                });
            }
        }
        let p = plan(topo, u32::from(u.ip), self.cfg.me, &peers);
        let mut decider = p.decider(
            self.cfg.policy.rule,
            self.cfg.migration_cost,
            self.cfg.node.vm_memory_mib,
        );
        while let Some(h) = decider.next_host() {
            let c = self.ask_capacity(topo.host_addr(h), u32::from(u.ip)).await;
            decider.answer(c);
        }
        let decision = decider.finish();
        self.metrics.decision_evaluated();
        let mut level = match decision {
            Decision::Stay { level, .. } => level,
            Decision::Migrate { .. } => p.level,
        };
        self.metrics
            .set_vm_cost(&u.ip.to_string(), decision.cost_before(), level);
        let mut outcome = None;
        if let Decision::Migrate {
            to,
            benefit,
            level_after,
            ..
        } = decision
        {
            let target = topo.host_addr(to);
            let held = self
                .state()
                .migrated_at
                .get(&u32::from(u.ip))
                .is_some_and(|t| t.elapsed() < self.cfg.policy.hold_down);
            if held {
                info!(vm = %u.ip, "migration worth it but the VM moved recently: held down");
                outcome = Some("held-down".to_owned());
            } else {
                info!(vm = %u.ip, to = %target, benefit, "migrating");
                self.metrics.observe_benefit(benefit);
                let result = (self.migrate)(u.clone(), target).await;
                outcome = Some(format!("{result:?}"));
                match result {
                    MigrationResult::Done(took) => {
                        info!(vm = %u.ip, to = %target, seconds = took.as_secs_f64(), "migration done");
                        self.metrics.migration("done");
                        level = level_after;
                        self.state()
                            .migrated_at
                            .insert(u32::from(u.ip), Instant::now());
                        self.announce_move(u.ip, target).await;
                    }
                    MigrationResult::Advisory => {
                        info!(vm = %u.ip, to = %target, benefit, "advisory: would migrate");
                        self.metrics.migration("advisory");
                    }
                    MigrationResult::Failed(e) => {
                        warn!(vm = %u.ip, to = %target, error = %e, "migration failed; VM stays");
                        self.metrics.migration("failed");
                    }
                    MigrationResult::Undefined(e) => {
                        warn!(vm = %u.ip, to = %target, error = %e, "migration outcome unknown; not retried");
                        self.metrics.migration("failed");
                        self.state()
                            .migrated_at
                            .insert(u32::from(u.ip), Instant::now());
                    }
                }
            }
        }
        let mut s = self.state();
        s.last_decisions.push(DecisionRecord {
            vm: u.ip,
            epoch: self.epoch(),
            decision,
            outcome,
        });
        if s.last_decisions.len() > 32 {
            s.last_decisions.remove(0);
        }
        (level, Load::from_rate(load))
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
            let seen = Message::TokenSeen {
                holder: next,
                round: token.round,
            };
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
        let s = self.state();
        let (_, parts, count) = &s.order;
        if parts.len() == usize::from(*count) && *count > 0 {
            policy.feed_ranking(parts.values().flatten().copied().collect());
        }
    }

    /// Members known from reports (for regeneration) plus our own VMs.
    fn known_vms(&self) -> Vec<VmId> {
        let mut v: Vec<VmId> = self.hosted().iter().map(|h| u32::from(h.ip)).collect();
        let s = self.state();
        for parts in s.reports.values() {
            for e in parts.values().flatten() {
                v.push(e.vm);
            }
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
        self.tell_watchers(
            &Message::TokenSeen {
                holder: 0,
                round: token.round,
            },
            epoch,
        )
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
            for p in &parts {
                if host == self.net.me() {
                    let mut s = self.state();
                    let e = s.reports.entry(host).or_default();
                    if p.part == 0 {
                        e.clear();
                    }
                    e.insert(p.part, p.entries.clone());
                } else {
                    let _ = self
                        .net
                        .send(host, self.epoch(), &Message::FlowReport(p.clone()))
                        .await;
                }
            }
        }
    }

    /// The coordinator: ranks every VM by the saving of its best move, from
    /// all hosts' reports, and sends the order to every host.
    async fn coordinate(&self, order_id: u64) {
        let topo = &self.cfg.topology;
        let (ids, triples, host_of) = {
            let s = self.state();
            let mut ids: BTreeMap<VmId, u32> = BTreeMap::new();
            let mut host_of: HashMap<VmId, Ipv4Addr> = HashMap::new();
            let mut triples = Vec::new();
            for (host, parts) in &s.reports {
                for e in parts.values().flatten() {
                    host_of.insert(e.vm, *host);
                    let n = ids.len() as u32;
                    ids.entry(e.vm).or_insert(n);
                    if e.peer != e.vm {
                        let n = ids.len() as u32;
                        ids.entry(e.peer).or_insert(n);
                        triples.push((e.vm, e.peer, e.rate));
                    }
                }
            }
            (ids, triples, host_of)
        };
        if ids.is_empty() {
            return;
        }
        // Dense indices in VM ID order; peers whose host never reported are
        // left out (their place is unknown).
        let located: Vec<VmId> = ids
            .keys()
            .copied()
            .filter(|v| host_of.contains_key(v))
            .collect();
        let index: HashMap<VmId, u32> = located
            .iter()
            .enumerate()
            .map(|(i, v)| (*v, i as u32))
            .collect();
        // Each report gives λ from one side: halve when both sides reported.
        let mut lam: HashMap<(u32, u32), (f64, u32)> = HashMap::new();
        for (a, b, r) in triples {
            let (Some(&i), Some(&j)) = (index.get(&a), index.get(&b)) else {
                continue;
            };
            let k = if i < j { (i, j) } else { (j, i) };
            let e = lam.entry(k).or_default();
            e.0 += r;
            e.1 += 1;
        }
        let triples: Vec<(u32, u32, f64)> = lam
            .into_iter()
            .map(|((i, j), (r, n))| (i, j, r / f64::from(n)))
            .collect();
        let Ok(traffic) = Traffic::from_triples(located.len() as u32, triples) else {
            return;
        };
        let hosts: Vec<u32> = located
            .iter()
            .map(|v| {
                host_of
                    .get(v)
                    .and_then(|h| topo.host_by_addr(*h))
                    .unwrap_or(0)
            })
            .collect();
        let Ok(placement) = Placement::new(topo.host_count(), hosts) else {
            return;
        };
        let model = CostModel::new(topo, &traffic);
        let n = &self.cfg.node;
        let ranking = rank_by_saving(
            &model,
            &placement,
            self.cfg.policy.rule,
            self.cfg.migration_cost,
            |_| n.vm_memory_mib,
            |h| {
                let used = u64::from(placement.count(h));
                Some(Capacity {
                    free_slots: u64::from(n.vm_slots).saturating_sub(used) as u32,
                    free_mem_mb: n.memory_mib.saturating_sub(used * n.vm_memory_mib),
                })
            },
        );
        let mut order: Vec<VmId> = ranking.iter().map(|r| located[r.vm as usize]).collect();
        // VMs with no saving follow in ID order, so every VM is visited.
        for v in &located {
            if !order.contains(v) {
                order.push(*v);
            }
        }
        let Some(parts) = TokenOrder::split(order_id, &order) else {
            return;
        };
        debug!(
            vms = order.len(),
            movers = ranking.len(),
            "global order sent"
        );
        for host in self.cfg.hosts().collect::<Vec<_>>() {
            for p in &parts {
                if host == self.net.me() {
                    let mut s = self.state();
                    if s.order.0 != p.order {
                        s.order = (p.order, BTreeMap::new(), p.parts);
                    }
                    s.order.1.insert(p.part, p.vms.clone());
                } else {
                    let _ = self
                        .net
                        .send(host, self.epoch(), &Message::TokenOrder(p.clone()))
                        .await;
                }
            }
        }
    }
}

fn rand_transfer() -> u64 {
    // Unique enough per sender: the wall clock in ns, as sequence numbers.
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Starts the protocol's tasks; they stop when `cancel` fires.
pub async fn start(
    cfg: Arc<ClusterSettings>,
    collector: Arc<Collector>,
    metrics: Arc<dyn PeerMetrics>,
    migrate: Migrator,
    control: ControlReader,
    cancel: CancellationToken,
) -> std::io::Result<(Arc<Peer>, Vec<tokio::task::JoinHandle<()>>)> {
    let hosts = cfg.topology.host_count() as usize;
    let net = Net::bind(cfg.node.address, cfg.peer.port, cfg.key.clone(), hosts).await?;
    let (tx, rx) = mpsc::channel(16);
    let peer = Arc::new(Peer {
        cfg: cfg.clone(),
        net,
        collector,
        metrics,
        migrate,
        epoch: AtomicU64::new(0),
        state: Mutex::new(State {
            reasm: Reassembler::default(),
            locations: HashMap::new(),
            backup: None,
            reports: HashMap::new(),
            order: (0, BTreeMap::new(), 0),
            migrated_at: HashMap::new(),
            last_seen: Instant::now(),
            last_decisions: Vec::new(),
            regenerated: Vec::new(),
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
                    n += 1;
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
                    p.metrics.rejected("stale_epoch");
                    continue;
                }
                p.metrics.token_received();
                p.metrics.set_token_epoch(token.epoch);
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
                let decide = async {
                    let seen = Message::TokenSeen {
                        holder: u32::from(vm),
                        round: token.round,
                    };
                    p.tell_watchers(&seen, token.epoch).await;
                    if let Some(u) = hosted.iter().find(|x| x.ip == vm) {
                        let (level, load) = p.decide_for(u).await;
                        token.update(u32::from(vm), level, load);
                    }
                }
                .instrument(span.clone());
                decide.await;
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
