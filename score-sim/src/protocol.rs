//! Deterministic simulation of the real peer protocol: one score-core
//! [`Node`] per host, over a simulated network and clock, with seeded
//! delay, loss, duplication, reordering, healing partitions, crashes with
//! restart (only [`Persisted`] survives) and migrations that take time,
//! fail or end undefined. The invariants of docs/PROTOCOL.md are checked
//! after every event; a run is a function of its [`SimConfig`] (seed
//! included), so a failing seed replays byte for byte ([`Report::trace`]
//! hashes every datagram delivered).
//!
//! The world is either a small random one (the seeded fault runs) or a
//! score-sim [`Setup`] (tree, traffic model, placement, host capacity), the
//! world the decision-only [`crate::engine`] runs on: [`compare`] runs both
//! on one world and reports whether they made the same decisions
//! (docs/PROTOCOL.md, "The protocol decides as the engine does").

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::Arc;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use score_core::cost::{CostModel, Placement, Traffic, VmIdx};
use score_core::decision::{CmDecay, Decision, MigrationCost, Rule};
use score_core::policy::PolicyKind;
use score_core::proto::{
    Config, Event, HostFacts, MigrationOutcome, Node, Output, Persisted, SwapOutcome, VmFacts,
};
use score_core::swap::{CandidateSet, Scope};
use score_core::token::VmId;
use score_core::topology::{HostId, LinkWeights, Topology};
use score_core::wire::{ClusterKey, KeyRing, Kind, RejectReason};

use crate::engine::{self, RunOptions};
use crate::plot::{self, PlotError};
use crate::scenario::{MigrationCostSpec, Scenario, TokenInit};
use crate::world::{HostLists, Setup, WorldError};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// The simulated clock starts at a plausible wall-clock time, so the
/// datagrams' send times look like the daemon's.
const CLOCK_BASE: u64 = 1_750_000_000 * SEC;

/// The watchers: the first hosts.
const WATCHERS: usize = 2;

/// Faults injected during the first `window_ns` of a run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Faults {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Probability that a datagram is delivered twice.
    pub duplicate: f64,
    /// Network delay, uniform in [min, max] ns (wide: reordering).
    pub delay_min_ns: u64,
    /// See `delay_min_ns`.
    pub delay_max_ns: u64,
    /// Partitions (a random half of the hosts cut off), each healing.
    pub partitions: u32,
    /// Host crashes, each followed by a restart.
    pub crashes: u32,
    /// Probability that a migration fails (the VM stays).
    pub migration_fail: f64,
    /// Probability that a migration ends undefined.
    pub migration_undefined: f64,
    /// Probability that a hop acknowledgement is lost (on top of `loss`):
    /// the receiver holds the token, the sender never hears it.
    pub ack_loss: f64,
    /// Probability that an attacker who captured a token chunk sends it
    /// again to another VM's address.
    pub replay_attack: f64,
    /// When faults stop (the network stays as delayed, but loses nothing).
    pub window_ns: u64,
}

impl Faults {
    /// No fault at all (delays of a quiet LAN).
    pub fn none() -> Self {
        Faults {
            loss: 0.0,
            duplicate: 0.0,
            delay_min_ns: 100_000,
            delay_max_ns: 500_000,
            partitions: 0,
            crashes: 0,
            migration_fail: 0.0,
            migration_undefined: 0.0,
            ack_loss: 0.0,
            replay_attack: 0.0,
            window_ns: 0,
        }
    }

    /// A mix drawn from `rng`: what the seeded fault runs use.
    pub fn random(rng: &mut impl Rng, window_ns: u64) -> Self {
        Faults {
            loss: rng.random_range(0.0..0.2),
            duplicate: rng.random_range(0.0..0.1),
            delay_min_ns: 50_000,
            delay_max_ns: rng.random_range(1..200) * MS,
            partitions: rng.random_range(0..3),
            crashes: rng.random_range(0..3),
            migration_fail: rng.random_range(0.0..0.2),
            migration_undefined: rng.random_range(0.0..0.05),
            ack_loss: rng.random_range(0.0..0.3),
            replay_attack: rng.random_range(0.0..0.1),
            window_ns,
        }
    }
}

/// One simulated data centre and how long it runs.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// The seed of everything random.
    pub seed: u64,
    /// A score-sim world (tree, traffic, placement, capacity) instead of
    /// the random one of `fanout`, `vms_per_host` and `peers_per_vm`.
    pub world: Option<Arc<Setup>>,
    /// Fan-out of the regular tree (hosts per rack first).
    pub fanout: Vec<u32>,
    /// VMs per host at the start.
    pub vms_per_host: u32,
    /// VM slots per host.
    pub vm_slots: u32,
    /// Whether a full candidate host is asked for a swap.
    pub swaps: bool,
    /// VMs a host may run beyond its slots during a swap.
    pub migration_headroom: u32,
    /// Ejection chains when a VM would stay (beyond the paper).
    pub chains: bool,
    /// Rotations when a VM would still stay (beyond the paper).
    pub rotations: bool,
    /// Group moves when a VM would still stay (beyond the paper).
    pub groups: bool,
    /// Slots left free in the random world: `vms_per_host` on every host
    /// but this many fewer VMs in all (so a chain's third host has room).
    pub spare_slots: u32,
    /// Peers per VM (random, symmetric rates).
    pub peers_per_vm: u32,
    /// Token policy.
    pub policy: PolicyKind,
    /// Simulated time.
    pub duration_ns: u64,
    /// The faults.
    pub faults: Faults,
    /// Migration time, uniform in [min, max] ns.
    pub migration_min_ns: u64,
    /// See `migration_min_ns`.
    pub migration_max_ns: u64,
    /// The nodes' token time-out.
    pub token_timeout_ns: u64,
    /// The nodes' hold time.
    pub token_hold_ns: u64,
    /// Largest clock skew between hosts, ns.
    pub max_skew_ns: u64,
    /// Check the invariants after every this many events (1: every event;
    /// more only for the scale runs, where a full check per event costs
    /// more than the protocol).
    pub check_every: u64,
    /// Stop once the token completed this many rounds.
    pub stop_after_rounds: Option<u32>,
    /// How often each host reports its VMs to the watchers.
    pub report_interval_ns: u64,
    /// Print every node's events to standard error (to read a failing
    /// seed's run).
    pub trace: bool,
    /// The first watcher starts at 0; every other host within this time
    /// after 1 s (0: every host at 0). A cluster's hosts never start at one
    /// instant; see [`SimConfig::paper`] for why it matters.
    pub start_spread_ns: u64,
    /// The nodes' hold-down (a VM migrates at most once per this time).
    pub hold_down_ns: u64,
    /// How long a node trusts a location it learnt.
    pub location_ttl_ns: u64,
    /// Keep every decision and the cost after it ([`Report::decisions`],
    /// [`Report::step_costs`]).
    pub record: bool,
    /// c_m of the first round, read as score-sim's engine reads it
    /// (resolved against the world's initial cost).
    pub cm: MigrationCostSpec,
    /// How c_m decays over the rounds (constant by default, the paper's).
    pub cm_decay: CmDecay,
    /// Stop after a round without migration once c_m has reached its
    /// floor (the engine's convergence: no later round would move a VM).
    pub stop_when_settled: bool,
}

impl SimConfig {
    /// A small data centre (`hosts` in racks of 4, two levels) with random
    /// faults drawn from `seed`.
    /// Every other triple of seeds runs with swaps, full hosts and one VM
    /// of headroom (each policy once with and once without swaps in six
    /// consecutive seeds).
    pub fn seeded(seed: u64, hosts: u32) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let racks = hosts.div_ceil(4).max(1);
        let window = 600 * SEC;
        let swaps = (seed / 3) % 2 == 1;
        SimConfig {
            seed,
            world: None,
            fanout: vec![4, racks],
            // Full hosts with swaps: a single migration has nowhere to go.
            vms_per_host: if swaps { 4 } else { 3 },
            vm_slots: 4,
            swaps,
            migration_headroom: u32::from(swaps),
            chains: false,
            rotations: false,
            groups: false,
            spare_slots: 0,
            peers_per_vm: 2,
            policy: [
                PolicyKind::Distributed,
                PolicyKind::RoundRobin,
                PolicyKind::LoadAware,
            ][(seed % 3) as usize],
            duration_ns: 3600 * SEC,
            faults: Faults::random(&mut rng, window),
            migration_min_ns: 500 * MS,
            migration_max_ns: 5 * SEC,
            token_timeout_ns: 15 * SEC,
            token_hold_ns: SEC,
            max_skew_ns: 100 * MS,
            check_every: 1,
            stop_after_rounds: None,
            report_interval_ns: 2 * SEC,
            trace: false,
            start_spread_ns: 0,
            hold_down_ns: 60 * SEC,
            location_ttl_ns: 30 * SEC,
            record: false,
            cm: MigrationCostSpec::Absolute(0.0),
            cm_decay: CmDecay::CONSTANT,
            stop_when_settled: false,
        }
    }

    /// Turns ejection chains on for a seeded run: on the seeds with swaps
    /// (full hosts) half the hosts get one VM fewer, so a chain's third
    /// host has room and single migrations have somewhere to go too.
    pub fn with_chains(mut self) -> Self {
        self.chains = true;
        if self.swaps && self.world.is_none() {
            let hosts: u32 = self.fanout.iter().product();
            self.spare_slots = hosts / 2;
        }
        self
    }

    /// Turns group moves on for a seeded run: half the hosts get one VM
    /// fewer (on the seeds with swaps, whose hosts are full), so a group
    /// has somewhere to go.
    pub fn with_groups(mut self) -> Self {
        self.groups = true;
        if self.swaps && self.world.is_none() {
            let hosts: u32 = self.fanout.iter().product();
            self.spare_slots = self.spare_slots.max(hosts / 2);
        }
        self
    }

    /// Turns rotations on for a seeded run (on the seeds with swaps every
    /// host is full, with one VM of headroom: what a rotation needs).
    pub fn with_rotations(mut self) -> Self {
        self.rotations = true;
        self
    }

    /// A fault-free run on a score-sim world: its tree, traffic,
    /// placement and capacity; the nodes' defaults otherwise, with a
    /// 10 ms hold (what is measured is the protocol's own time) and
    /// reports every 600 s (every 2 s, 2,560 hosts would send the
    /// watchers 2,560 datagrams per simulated second, most of the events
    /// of a round that lasts hours).
    ///
    /// Hosts start over 10 s after the first watcher. With every host started
    /// at one instant, a host whose clock ran behind a watcher's sealed its
    /// first report before that watcher's start, which the watcher refuses
    /// (the freshness floor, docs/WIRE.md); with reports every 600 s the
    /// watcher regenerated the first token without those hosts' VMs, and
    /// the first round visited 12,876 of the paper's 30,720 VMs. A real
    /// cluster reports every 2 s and regenerates after 15 s of silence, so
    /// a refused first report is repaired before the token exists.
    pub fn on_world(seed: u64, world: Arc<Setup>) -> Self {
        let mut c = SimConfig::seeded(seed, 4);
        c.vm_slots = world.shape.max_vms();
        c.swaps = false;
        c.migration_headroom = 0;
        c.fanout = Vec::new();
        c.vms_per_host = 0;
        c.peers_per_vm = 0;
        c.world = Some(world);
        c.policy = PolicyKind::Distributed;
        c.faults = Faults::none();
        c.token_hold_ns = 10 * MS;
        c.duration_ns = 30 * 24 * 3600 * SEC;
        c.check_every = 1000;
        c.report_interval_ns = 600 * SEC;
        c.start_spread_ns = 10 * SEC;
        c
    }

    /// The paper's data centre as score-sim builds it (`score-sim
    /// scenario`, seed `seed`): 2,560 hosts (fan-out 20, 8, 4, 4), 30,720
    /// VMs placed at random in 16 slots each, score-sim's traffic model;
    /// then as [`SimConfig::on_world`].
    pub fn paper(seed: u64) -> Result<Self, WorldError> {
        let s = Scenario {
            seed,
            ..Scenario::default()
        };
        Ok(SimConfig::on_world(seed, Arc::new(Setup::build(&s)?)))
    }
}

/// A broken invariant, with when and what.
#[derive(Clone, Debug, PartialEq)]
pub struct Violation {
    /// Simulated time, ns from the start.
    pub at_ns: u64,
    /// Which invariant.
    pub invariant: &'static str,
    /// The details.
    pub detail: String,
}

/// What a run did.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// The seed.
    pub seed: u64,
    /// Simulated time, ns.
    pub simulated_ns: u64,
    /// Events processed.
    pub events: u64,
    /// Datagrams sent and their bytes.
    pub datagrams: u64,
    /// See `datagrams`.
    pub bytes: u64,
    /// Datagrams the nodes rejected, and of those, the ones sealed for
    /// another address (replays to another VM).
    pub rejected: u64,
    /// See `rejected`.
    pub wrong_destination: u64,
    /// Datagrams the faults dropped or duplicated.
    pub lost: u64,
    /// See `lost`.
    pub duplicated: u64,
    /// Crashes and partitions injected.
    pub crashes: u32,
    /// See `crashes`.
    pub partitions: u32,
    /// Hops received, skipped, regenerations, superseded copies.
    pub hops: u64,
    /// See `hops`.
    pub skips: u64,
    /// See `hops`.
    pub regenerations: u64,
    /// See `hops`.
    pub superseded: u64,
    /// Rounds completed (the highest round any node reported).
    pub rounds: u32,
    /// Migrations done, failed, undefined.
    pub migrations: u64,
    /// See `migrations`.
    pub migrations_failed: u64,
    /// See `migrations`.
    pub migrations_undefined: u64,
    /// Swaps agreed, and of those, done (both VMs moved).
    pub swaps_agreed: u64,
    /// See `swaps_agreed`.
    pub swaps_done: u64,
    /// Ejection chains agreed, done (both VMs moved), and half done (one
    /// moved).
    pub chains_agreed: u64,
    /// See `chains_agreed`.
    pub chains_done: u64,
    /// See `chains_agreed`.
    pub chains_partial: u64,
    /// Chains agreed whose ejected VM goes to a third host (not to the
    /// proposer's: those are swaps found as chains).
    pub chains_third_host: u64,
    /// Rotations agreed, done (all three VMs moved), and partly done
    /// (one or two moved).
    pub rotations_agreed: u64,
    /// See `rotations_agreed`.
    pub rotations_done: u64,
    /// See `rotations_agreed`.
    pub rotations_partial: u64,
    /// Group moves agreed, done (every member moved), and partly done
    /// (some moved).
    pub groups_agreed: u64,
    /// See `groups_agreed`.
    pub groups_done: u64,
    /// See `groups_agreed`.
    pub groups_partial: u64,
    /// Members of the group moves agreed (each one migration).
    pub group_members: u64,
    /// Every group move agreed (with [`SimConfig::record`]): its benefit
    /// as the holder computed it, the drop of the equation 1 total
    /// recomputed on the placement of the moment with its moves made, and
    /// its threshold.
    pub group_benefits: Vec<(f64, f64, f64)>,
    /// Every rotation agreed (with [`SimConfig::record`]): its benefit as
    /// the hosts computed it, the drop of the equation 1 total recomputed
    /// on the placement of the moment with its three moves made, and its
    /// threshold.
    pub rotation_benefits: Vec<(f64, f64, f64)>,
    /// Every chain agreed (with [`SimConfig::record`]): its benefit as the
    /// hosts computed it, the drop of the equation 1 total recomputed on
    /// the placement of the moment with both moves made, and its
    /// threshold c_m(u) + c_m(w).
    pub chain_benefits: Vec<(f64, f64, f64)>,
    /// Total cost (eq. 1) at the start and at the end.
    pub cost_start: f64,
    /// See `cost_start`.
    pub cost_end: f64,
    /// When the token had visited every VM after the last fault (ns from
    /// the start), if it did.
    pub covered_at_ns: Option<u64>,
    /// Hash of every datagram delivered, in order: equal for equal seeds.
    pub trace: u64,
    /// (simulated ns, datagrams, bytes, total cost) when each round
    /// completed.
    pub rounds_at: Vec<(u64, u64, u64, f64)>,
    /// Every decision in order (with [`SimConfig::record`]): the VM (its
    /// index in the world) and the host it was sent to, if any.
    pub decisions: Vec<(VmIdx, Option<HostId>)>,
    /// The total cost (eq. 1) after each decision's outcome (with
    /// [`SimConfig::record`]).
    pub step_costs: Vec<f64>,
    /// Every VM's host at the end.
    pub final_hosts: Vec<HostId>,
    /// Invariants broken.
    pub violations: Vec<Violation>,
}

#[derive(Debug)]
enum Ev {
    Deliver {
        to: Ipv4Addr,
        from: usize,
        bytes: Vec<u8>,
    },
    Wake {
        host: usize,
    },
    MigrationEnd {
        vm: usize,
        from: usize,
        to: usize,
        incarnation: u32,
        outcome: MigrationOutcome,
    },
    Crash {
        host: usize,
    },
    Restart {
        host: usize,
    },
    Partition {
        side: Vec<bool>,
    },
    Heal,
    Start {
        host: usize,
    },
}

struct Sim {
    cfg: SimConfig,
    rng: ChaCha8Rng,
    topo: Arc<Topology>,
    host_addrs: Vec<Ipv4Addr>,
    host_by_addr: BTreeMap<Ipv4Addr, usize>,
    vm_ids: Vec<VmId>,
    vm_by_id: BTreeMap<VmId, usize>,
    placement: Placement,
    lists: HostLists,
    traffic: Traffic,
    /// Equation 1's total now, kept by each migration's exact change and
    /// recomputed at every round's end.
    total: f64,
    /// c_m of the first round, resolved against the initial total.
    cm0: MigrationCost,
    undefined: Vec<bool>,
    nodes: Vec<Option<Node>>,
    persisted: Vec<Persisted>,
    wake_at: Vec<Option<u64>>,
    skew: Vec<i64>,
    last_epoch: Vec<u64>,
    migrating: BTreeSet<usize>,
    side: Option<Vec<bool>>,
    queue: BTreeMap<(u64, u64), Ev>,
    next_seq: u64,
    now: u64,
    stable_at: u64,
    visited_after_stable: Vec<bool>,
    /// VMs neither visited since `stable_at` nor undefined: a count, so
    /// that checking coverage after every event costs nothing at scale.
    uncovered: usize,
    dup_since: Option<u64>,
    /// VMs whose decision sent them away and whose migration has not ended
    /// (the cost after that decision is recorded when it does).
    recording: BTreeSet<usize>,
    /// Migrations done when the current round began.
    round_started_migrations: u64,
    /// A quiet round with c_m at its floor ended the run
    /// ([`SimConfig::stop_when_settled`]).
    settled: bool,
    report: Report,
}

/// FNV-1a's multiply over eight bytes at a time: a run's fingerprint, not
/// a hash anyone else must reproduce (a byte at a time it cost 5 % of a
/// paper-scale run).
fn fnv(h: u64, bytes: &[u8]) -> u64 {
    let mut h = h;
    let mut words = bytes.chunks_exact(8);
    for w in &mut words {
        h ^= u64::from_le_bytes(w.try_into().expect("8 bytes"));
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    for b in words.remainder() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

impl Sim {
    fn schedule(&mut self, at: u64, ev: Ev) {
        self.next_seq += 1;
        self.queue.insert((at, self.next_seq), ev);
    }

    fn clock(&self, host: usize) -> u64 {
        (CLOCK_BASE + self.now).saturating_add_signed(self.skew[host])
    }

    fn node_config(&self, host: usize) -> Config {
        let key = ClusterKey::new(b"simulated cluster key, 32 bytes").expect("key");
        let watchers = self.host_addrs.iter().take(WATCHERS).copied().collect();
        let mut c = Config::new(
            self.host_addrs[host],
            self.topo.clone(),
            KeyRing::new(key),
            watchers,
        );
        c.policy = self.cfg.policy;
        c.vm_slots = self.cfg.vm_slots;
        c.token_timeout_ns = self.cfg.token_timeout_ns;
        c.token_hold_ns = self.cfg.token_hold_ns;
        c.rule = Rule::PaperFirst;
        c.migration_cost = self.cm0;
        c.cm_decay = self.cfg.cm_decay;
        if let Some(w) = &self.cfg.world {
            c.vm_memory_mib = w.shape.vm_mem_mb;
        }
        // Longer than any migration: a promised slot stays promised.
        c.reservation_ns = self.cfg.migration_max_ns * 4 + 60 * SEC;
        c.hold_down_ns = self.cfg.hold_down_ns;
        c.location_ttl_ns = self.cfg.location_ttl_ns;
        c.report_interval_ns = self.cfg.report_interval_ns;
        if self.cfg.swaps {
            c.scope = Scope::swaps(CandidateSet::Paper);
        }
        c.chains = self.cfg.chains;
        c.rotations = self.cfg.rotations;
        c.groups = self.cfg.groups;
        c.migration_headroom = self.cfg.migration_headroom;
        c.swap_timeout_ns = c.reservation_ns;
        c
    }

    /// What `host` measures: its VMs and their peers, in the traffic
    /// matrix's order (the engine's, so both sum rates alike).
    fn facts(&self, host: usize) -> HostFacts {
        HostFacts {
            vms: self
                .lists
                .on(host as HostId)
                .iter()
                .map(|&v| VmFacts {
                    id: self.vm_ids[v as usize],
                    peers: self
                        .traffic
                        .neighbours(v)
                        .iter()
                        .map(|z| (self.vm_ids[z.vm as usize], z.rate))
                        .collect(),
                    undefined: self.undefined[v as usize],
                })
                .collect(),
            unnamed: 0,
        }
    }

    fn host_of(&self, vm: usize) -> usize {
        self.placement.host(vm as VmIdx) as usize
    }

    fn cost(&self) -> f64 {
        CostModel::new(&self.topo, &self.traffic).total_cost(&self.placement)
    }

    fn violate(&mut self, invariant: &'static str, detail: String) {
        self.report.violations.push(Violation {
            at_ns: self.now,
            invariant,
            detail,
        });
    }

    /// Drains a node's outputs and events, and re-arms its wake-up.
    fn pump(&mut self, host: usize) {
        loop {
            let Some(node) = self.nodes[host].as_mut() else {
                return;
            };
            let out = node.poll_output();
            let ev = node.poll_event();
            if out.is_none() && ev.is_none() {
                break;
            }
            if let Some(o) = out {
                self.output(host, o);
            }
            if let Some(e) = ev {
                if self.cfg.trace {
                    eprintln!("{:>12.3} h{host:<3} {e:?}", self.now as f64 / 1e9);
                }
                self.event(&e);
            }
        }
        let t = self.nodes[host]
            .as_ref()
            .and_then(|n| n.poll_timeout())
            .map(|t| {
                t.saturating_sub(CLOCK_BASE)
                    .saturating_add_signed(-self.skew[host])
            });
        if let Some(t) = t {
            let t = t.max(self.now);
            if self.wake_at[host] != Some(t) {
                self.wake_at[host] = Some(t);
                self.schedule(t, Ev::Wake { host });
            }
        }
    }

    fn output(&mut self, host: usize, o: Output) {
        match o {
            Output::Send { to, bytes } => {
                self.report.datagrams += 1;
                self.report.bytes += bytes.len() as u64;
                let f = self.cfg.faults;
                let faulty = self.now < f.window_ns;
                let kind = bytes.get(5).copied();
                if faulty && self.rng.random_bool(f.loss) {
                    self.report.lost += 1;
                    return;
                }
                if faulty && kind == Some(Kind::HopAck as u8) && self.rng.random_bool(f.ack_loss) {
                    self.report.lost += 1;
                    return;
                }
                if faulty
                    && kind == Some(Kind::TokenChunk as u8)
                    && self.rng.random_bool(f.replay_attack)
                {
                    let v = self.rng.random_range(0..self.vm_ids.len());
                    let elsewhere = Ipv4Addr::from(self.vm_ids[v]);
                    let d = self.rng.random_range(f.delay_min_ns..=f.delay_max_ns);
                    self.schedule(
                        self.now + d,
                        Ev::Deliver {
                            to: elsewhere,
                            from: host,
                            bytes: bytes.clone(),
                        },
                    );
                }
                let copies = if faulty && self.rng.random_bool(f.duplicate) {
                    self.report.duplicated += 1;
                    2
                } else {
                    1
                };
                for _ in 0..copies {
                    let d = self.rng.random_range(f.delay_min_ns..=f.delay_max_ns);
                    self.schedule(
                        self.now + d,
                        Ev::Deliver {
                            to,
                            from: host,
                            bytes: bytes.clone(),
                        },
                    );
                }
            }
            Output::Migrate { vm, to } => {
                let Some(&v) = self.vm_by_id.get(&vm) else {
                    return;
                };
                let Some(&t) = self.host_by_addr.get(&to) else {
                    return;
                };
                if self.host_of(v) != host || self.migrating.contains(&v) || self.undefined[v] {
                    self.violate(
                        "migration",
                        format!("host {host} migrates VM {v} it does not run"),
                    );
                    return;
                }
                let f = self.cfg.faults;
                let faulty = self.now < f.window_ns;
                let r: f64 = self.rng.random();
                let outcome = if faulty && r < f.migration_undefined {
                    MigrationOutcome::Undefined
                } else if faulty && r < f.migration_undefined + f.migration_fail {
                    MigrationOutcome::Failed
                } else {
                    MigrationOutcome::Done
                };
                let d = self
                    .rng
                    .random_range(self.cfg.migration_min_ns..=self.cfg.migration_max_ns);
                self.migrating.insert(v);
                let incarnation = self.persisted[host].incarnation;
                self.schedule(
                    self.now + d,
                    Ev::MigrationEnd {
                        vm: v,
                        from: host,
                        to: t,
                        incarnation,
                        outcome,
                    },
                );
            }
            Output::Persist(p) => self.persisted[host] = p,
        }
    }

    fn event(&mut self, e: &Event) {
        match e {
            Event::TokenReceived { vm, stamp } => {
                self.report.hops += 1;
                self.report.rounds = self.report.rounds.max(stamp.round);
                if self.now >= self.stable_at
                    && let Some(&v) = self.vm_by_id.get(vm)
                    && !self.visited_after_stable[v]
                {
                    self.visited_after_stable[v] = true;
                    if !self.undefined[v] {
                        self.uncovered -= 1;
                    }
                }
            }
            Event::HopSkipped { .. } => self.report.skips += 1,
            Event::Rejected { reason } => {
                self.report.rejected += 1;
                if *reason == RejectReason::WrongDestination {
                    self.report.wrong_destination += 1;
                }
            }
            Event::TokenRegenerated { .. } => self.report.regenerations += 1,
            Event::SwapAgreed { .. } => self.report.swaps_agreed += 1,
            Event::ChainAgreed { chain, .. } => {
                self.report.chains_agreed += 1;
                if chain.partner_to != chain.from {
                    self.report.chains_third_host += 1;
                }
                if self.cfg.record
                    && let (Some(&u), Some(&w)) = (
                        self.vm_by_id.get(&chain.vm),
                        self.vm_by_id.get(&chain.partner),
                    )
                {
                    let model = CostModel::new(&self.topo, &self.traffic);
                    let mut after = self.placement.clone();
                    after.move_vm(u as VmIdx, chain.to);
                    after.move_vm(w as VmIdx, chain.partner_to);
                    let drop = model.total_cost(&self.placement) - model.total_cost(&after);
                    self.report
                        .chain_benefits
                        .push((chain.benefit, drop, chain.c_m));
                }
            }
            Event::RotationAgreed { rotation } => {
                self.report.rotations_agreed += 1;
                let vms: Option<Vec<usize>> = rotation
                    .moves
                    .iter()
                    .map(|(v, _, _)| self.vm_by_id.get(v).copied())
                    .collect();
                if self.cfg.record
                    && let Some(vms) = vms
                {
                    let model = CostModel::new(&self.topo, &self.traffic);
                    let mut after = self.placement.clone();
                    for (&v, &(_, _, to)) in vms.iter().zip(&rotation.moves) {
                        after.move_vm(v as VmIdx, to);
                    }
                    let drop = model.total_cost(&self.placement) - model.total_cost(&after);
                    self.report
                        .rotation_benefits
                        .push((rotation.benefit, drop, rotation.c_m));
                }
            }
            Event::GroupAgreed { group } => {
                self.report.groups_agreed += 1;
                self.report.group_members += group.moves.len() as u64;
                let vms: Option<Vec<usize>> = group
                    .moves
                    .iter()
                    .map(|(v, _)| self.vm_by_id.get(v).copied())
                    .collect();
                if self.cfg.record
                    && let Some(vms) = vms
                {
                    let model = CostModel::new(&self.topo, &self.traffic);
                    let mut after = self.placement.clone();
                    for (&v, &(_, to)) in vms.iter().zip(&group.moves) {
                        after.move_vm(v as VmIdx, to);
                    }
                    let drop = model.total_cost(&self.placement) - model.total_cost(&after);
                    self.report
                        .group_benefits
                        .push((group.benefit, drop, group.c_m));
                }
            }
            Event::GroupFinished { outcome, .. } => match outcome {
                SwapOutcome::Done => self.report.groups_done += 1,
                SwapOutcome::Partial => self.report.groups_partial += 1,
                _ => {}
            },
            Event::RotationFinished { outcome, .. } => match outcome {
                SwapOutcome::Done => self.report.rotations_done += 1,
                SwapOutcome::Partial => self.report.rotations_partial += 1,
                _ => {}
            },
            Event::ChainFinished { outcome, .. } => match outcome {
                SwapOutcome::Done => self.report.chains_done += 1,
                SwapOutcome::Partial => self.report.chains_partial += 1,
                _ => {}
            },
            Event::SwapFinished {
                outcome: SwapOutcome::Done,
                ..
            } => self.report.swaps_done += 1,
            Event::TokenSuperseded { .. } => self.report.superseded += 1,
            Event::Decided { decision } if self.cfg.record => {
                let (Decision::Migrate { vm, .. } | Decision::Stay { vm, .. }) = *decision;
                let v = self.vm_by_id.get(&vm).copied();
                if let Some(v) = v {
                    self.report.decisions.push((v as VmIdx, decision.target()));
                    if decision.target().is_some() {
                        self.recording.insert(v);
                    } else {
                        self.report.step_costs.push(self.total);
                    }
                }
            }
            Event::RoundComplete { round, .. } => {
                if *round > self.report.rounds {
                    let moved = self.report.migrations - self.round_started_migrations;
                    self.round_started_migrations = self.report.migrations;
                    if self.cfg.stop_when_settled
                        && moved == 0
                        && self.migrating.is_empty()
                        && self.cfg.cm_decay.settled(*round)
                    {
                        self.settled = true;
                    }
                    // Resynchronise the running total (no drift).
                    self.total = self.cost();
                    let cost = self.total;
                    self.report.rounds_at.push((
                        self.now,
                        self.report.datagrams,
                        self.report.bytes,
                        cost,
                    ));
                }
                self.report.rounds = self.report.rounds.max(*round)
            }
            _ => {}
        }
    }

    fn route(&self, to: Ipv4Addr) -> Option<usize> {
        if let Some(&h) = self.host_by_addr.get(&to) {
            return Some(h);
        }
        let v = *self.vm_by_id.get(&u32::from(to))?;
        if self.undefined[v] {
            return None;
        }
        Some(self.host_of(v))
    }

    fn step(&mut self, ev: Ev) {
        match ev {
            Ev::Deliver { to, from, bytes } => {
                let Some(h) = self.route(to) else { return };
                if let Some(side) = &self.side
                    && side[h] != side[from]
                {
                    self.report.lost += 1;
                    return;
                }
                self.report.trace = fnv(fnv(self.report.trace, &to.octets()), &bytes);
                let now = self.clock(h);
                if let Some(n) = self.nodes[h].as_mut() {
                    n.handle_datagram(now, to, &bytes);
                    self.pump(h);
                }
            }
            Ev::Wake { host } => {
                if self.wake_at[host] != Some(self.now) {
                    return;
                }
                self.wake_at[host] = None;
                let now = self.clock(host);
                if let Some(n) = self.nodes[host].as_mut() {
                    n.handle_timeout(now);
                }
                self.pump(host);
            }
            Ev::MigrationEnd {
                vm,
                from,
                to,
                incarnation,
                outcome,
            } => {
                self.migrating.remove(&vm);
                match outcome {
                    MigrationOutcome::Done => {
                        let model = CostModel::new(&self.topo, &self.traffic);
                        self.total += model.move_delta(&self.placement, vm as VmIdx, to as HostId);
                        self.placement.move_vm(vm as VmIdx, to as HostId);
                        self.lists.moved(vm as VmIdx, from as HostId, to as HostId);
                        self.report.migrations += 1;
                    }
                    MigrationOutcome::Failed => self.report.migrations_failed += 1,
                    // The simulated hypervisor is never advisory.
                    MigrationOutcome::Advisory => {}
                    MigrationOutcome::Undefined => {
                        if !self.undefined[vm] && !self.visited_after_stable[vm] {
                            self.uncovered -= 1;
                        }
                        self.undefined[vm] = true;
                        self.report.migrations_undefined += 1;
                    }
                }
                if self.recording.remove(&vm) {
                    self.report.step_costs.push(self.total);
                }
                for h in [from, to] {
                    let facts = self.facts(h);
                    let now = self.clock(h);
                    if let Some(n) = self.nodes[h].as_mut() {
                        n.set_facts(now, &facts);
                    }
                }
                let now = self.clock(from);
                if self.persisted[from].incarnation == incarnation
                    && let Some(n) = self.nodes[from].as_mut()
                {
                    n.migration_done(now, self.vm_ids[vm], outcome);
                }
                self.pump(from);
                self.pump(to);
            }
            Ev::Crash { host } => {
                if self.nodes[host].take().is_some() {
                    self.report.crashes += 1;
                    self.wake_at[host] = None;
                }
            }
            Ev::Restart { host } | Ev::Start { host } => {
                if self.nodes[host].is_none() {
                    self.start_node(host);
                }
            }
            Ev::Partition { side } => {
                self.report.partitions += 1;
                self.side = Some(side);
            }
            Ev::Heal => self.side = None,
        }
    }

    fn start_node(&mut self, host: usize) {
        let now = self.clock(host);
        let mut n = Node::new(self.node_config(host), self.persisted[host], now);
        n.set_facts(now, &self.facts(host));
        self.nodes[host] = Some(n);
        self.wake_at[host] = None;
        self.pump(host);
    }

    fn check(&mut self) {
        // Every VM on exactly one host: the facts handed to the nodes are
        // built from one placement, so check the capacity and the count.
        let hosts = self.host_addrs.len();
        let count = self.placement.counts();
        let placed = count.iter().sum::<u32>();
        let over: Vec<(usize, u32)> = count
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > self.cfg.vm_slots + self.cfg.migration_headroom)
            .map(|(h, &c)| (h, c))
            .collect();
        if placed != self.placement.vm_count() {
            self.violate("placement", "a VM is on no host or on two".into());
        }
        for (h, c) in over {
            self.violate(
                "capacity",
                format!(
                    "host {h} runs {c} VMs, {} slots + {} headroom",
                    self.cfg.vm_slots, self.cfg.migration_headroom
                ),
            );
        }
        // Epochs never decrease at any node, restarts included.
        for h in 0..hosts {
            if let Some(n) = &self.nodes[h] {
                let e = n.epoch();
                if e < self.last_epoch[h] {
                    let last = self.last_epoch[h];
                    self.violate("epoch", format!("host {h}: epoch {e} after {last}"));
                }
                self.last_epoch[h] = e;
            }
        }
        // Duplicates: two live copies (held, not superseded) never last
        // longer than the bound; after the faults, never more than one.
        let holders: Vec<usize> = (0..hosts)
            .filter(|&h| {
                self.nodes[h]
                    .as_ref()
                    .is_some_and(|n| n.holding().is_some())
            })
            .collect();
        if holders.len() > 1 {
            let since = *self.dup_since.get_or_insert(self.now);
            // A superseded copy ends when its migration does; a swap's
            // when both did, or when its proposer stops waiting for the
            // partner (the swap time-out, the sim's reservation time).
            let held = if self.cfg.swaps || self.cfg.chains || self.cfg.rotations || self.cfg.groups
            {
                // A rotation's third migration after its second.
                let third = if self.cfg.rotations {
                    self.cfg.migration_max_ns + 2 * SEC
                } else {
                    0
                };
                self.cfg.migration_max_ns * 5 + 60 * SEC + self.cfg.migration_max_ns + third
            } else {
                self.cfg.migration_max_ns
            };
            let bound = held + 3 * self.cfg.token_timeout_ns;
            if self.now - since > bound {
                self.violate(
                    "duplicate",
                    format!("copies on hosts {holders:?} since {since} ns"),
                );
                self.dup_since = Some(self.now);
            }
        } else {
            self.dup_since = None;
        }
    }
}

/// The liveness bound after the last fault: regeneration by the last
/// watcher, then one visit per VM, each at most a hold, the location and
/// capacity questions, a migration and a hop with every retry.
/// With swaps, a visit may also ask each candidate for a swap (up to four
/// request time-outs each), and make two migrations with a commit between.
pub fn liveness_bound_ns(cfg: &SimConfig, vms: u64) -> u64 {
    let hop = 300 * MS * 6;
    let mut asks = 500 * MS * u64::from(2 * cfg.peers_per_vm + 2);
    let mut migrations = cfg.migration_max_ns;
    if cfg.swaps || cfg.chains {
        asks += 4 * 500 * MS * u64::from(2 * cfg.peers_per_vm + 2);
        migrations = 2 * cfg.migration_max_ns + 4 * 500 * MS;
    }
    if cfg.chains {
        // Up to four full candidates asked whether full, then for a chain;
        // the partner's slot asked on the third host.
        asks += 4 * (500 * MS + 4 * 500 * MS) + 500 * MS;
    }
    if cfg.rotations {
        // Up to four full candidates asked whether full, then for a
        // rotation (five request time-outs each); a third migration and
        // its commit.
        asks += 4 * (500 * MS + 5 * 500 * MS);
        migrations += cfg.migration_max_ns + 4 * 500 * MS;
    }
    if cfg.groups {
        // The members' peers located with u's; up to four target racks
        // asked (a rack at once; with pods, its pod's other racks each
        // at once too), then the reservations; the members' migrations
        // at once.
        let racks_per_pod = cfg.fanout.get(1).copied().unwrap_or(1).max(1);
        let per_rack = if cfg.fanout.len() >= 3 {
            u64::from(racks_per_pod)
        } else {
            1
        };
        asks += 500 * MS * u64::from(2 * cfg.peers_per_vm) * u64::from(cfg.vm_slots);
        asks += 4 * per_rack * 500 * MS + 500 * MS;
        migrations += cfg.migration_max_ns;
    }
    4 * cfg.token_timeout_ns + vms * (cfg.token_hold_ns + asks + migrations + hop)
}

/// The random world of the seeded fault runs: a regular tree of
/// `fanout`, `vms_per_host` VMs on every host in a shuffled order, and
/// `peers_per_vm` random peers per VM at 1-999 kB/s.
fn random_world(cfg: &SimConfig, rng: &mut ChaCha8Rng) -> (Arc<Topology>, Placement, Traffic) {
    let weights = LinkWeights::paper_truncated(cfg.fanout.len());
    let topo =
        Topology::regular(&cfg.fanout, weights, Ipv4Addr::new(10, 0, 0, 1)).expect("topology");
    let hosts = topo.host_count() as usize;
    let n_vms = (hosts * cfg.vms_per_host as usize).saturating_sub(cfg.spare_slots as usize);
    let mut place: Vec<HostId> = (0..n_vms).map(|v| (v % hosts) as HostId).collect();
    // Shuffle the placement: the network-agnostic start.
    for i in (1..n_vms).rev() {
        let j = rng.random_range(0..=i);
        place.swap(i, j);
    }
    let mut peers: Vec<Vec<usize>> = vec![Vec::new(); n_vms];
    let mut triples = Vec::new();
    for u in 0..n_vms {
        for _ in 0..cfg.peers_per_vm {
            let v = rng.random_range(0..n_vms);
            if v == u || peers[u].contains(&v) {
                continue;
            }
            let r = f64::from(rng.random_range(1u32..1000)) * 1000.0;
            peers[u].push(v);
            peers[v].push(u);
            triples.push((u as VmIdx, v as VmIdx, r));
        }
    }
    let placement = Placement::new(hosts as u32, place).expect("placement");
    let traffic = Traffic::from_triples(n_vms as u32, triples).expect("traffic");
    (Arc::new(topo), placement, traffic)
}

/// Runs one simulation.
pub fn run(cfg: &SimConfig) -> Report {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let (topo, placement, traffic) = match &cfg.world {
        Some(w) => (
            Arc::new(w.topo.clone()),
            w.placement.clone(),
            w.traffic.clone(),
        ),
        None => random_world(cfg, &mut rng),
    };
    let hosts = topo.host_count() as usize;
    let host_addrs: Vec<Ipv4Addr> = (0..hosts as u32).map(|h| topo.host_addr(h)).collect();
    let n_vms = placement.vm_count() as usize;
    // VM addresses rise with their index, so the token's order of IDs is
    // the world's order of VMs (the engine's token uses the indices).
    let vm_ids: Vec<VmId> = (0..n_vms as u32)
        .map(|i| u32::from(Ipv4Addr::new(10, 128, 0, 1)) + i)
        .collect();
    let vm_by_id = vm_ids.iter().enumerate().map(|(i, v)| (*v, i)).collect();
    let skew = (0..hosts)
        .map(|_| {
            let s = cfg.max_skew_ns as i64;
            if s == 0 { 0 } else { rng.random_range(-s..=s) }
        })
        .collect();
    let mut sim = Sim {
        cfg: cfg.clone(),
        rng,
        topo,
        host_by_addr: host_addrs
            .iter()
            .enumerate()
            .map(|(i, a)| (*a, i))
            .collect(),
        host_addrs,
        vm_ids,
        vm_by_id,
        lists: HostLists::new(&placement),
        placement,
        traffic,
        total: 0.0,
        cm0: MigrationCost::Absolute(0.0),
        undefined: vec![false; n_vms],
        nodes: (0..hosts).map(|_| None).collect(),
        persisted: vec![Persisted::default(); hosts],
        wake_at: vec![None; hosts],
        skew,
        last_epoch: vec![0; hosts],
        migrating: BTreeSet::new(),
        side: None,
        queue: BTreeMap::new(),
        next_seq: 0,
        now: 0,
        stable_at: 0,
        visited_after_stable: vec![false; n_vms],
        uncovered: n_vms,
        dup_since: None,
        recording: BTreeSet::new(),
        round_started_migrations: 0,
        settled: false,
        report: Report {
            seed: cfg.seed,
            ..Report::default()
        },
    };
    sim.total = sim.cost();
    sim.report.cost_start = sim.total;
    sim.cm0 = cfg.cm.resolve(sim.total, n_vms as u32);
    // Faults: crashes and partitions at random times within the window.
    let f = cfg.faults;
    let mut last_fault = f.window_ns;
    for _ in 0..f.crashes {
        let h = sim.rng.random_range(0..hosts);
        let at = sim.rng.random_range(0..f.window_ns.max(1));
        let down = sim.rng.random_range(SEC..60 * SEC);
        sim.schedule(at, Ev::Crash { host: h });
        sim.schedule(at + down, Ev::Restart { host: h });
        last_fault = last_fault.max(at + down);
    }
    for _ in 0..f.partitions {
        let at = sim.rng.random_range(0..f.window_ns.max(1));
        let len = sim.rng.random_range(SEC..90 * SEC);
        let side = (0..hosts).map(|_| sim.rng.random_bool(0.5)).collect();
        sim.schedule(at, Ev::Partition { side });
        sim.schedule(at + len, Ev::Heal);
        last_fault = last_fault.max(at + len);
    }
    // After the last fault and every migration it may have started.
    sim.stable_at = last_fault + cfg.migration_max_ns + cfg.token_timeout_ns;
    // The first watcher starts first; the others, if spread, over
    // `start_spread_ns` from 1 s on (more than any clock skew, so their
    // first reports are sealed after its start).
    let mut later = Vec::new();
    for h in 0..hosts {
        if cfg.start_spread_ns == 0 || h == 0 {
            sim.start_node(h);
        } else {
            later.push((h, SEC + sim.rng.random_range(0..cfg.start_spread_ns)));
        }
    }
    for (host, at) in later {
        sim.schedule(at, Ev::Start { host });
        sim.stable_at = sim.stable_at.max(at + cfg.token_timeout_ns);
    }
    while let Some(((at, _), ev)) = sim.queue.pop_first() {
        if at > cfg.duration_ns {
            break;
        }
        sim.now = at;
        sim.report.events += 1;
        sim.step(ev);
        if sim.report.events.is_multiple_of(cfg.check_every.max(1)) {
            sim.check();
        }
        if sim.settled
            || cfg
                .stop_after_rounds
                .is_some_and(|n| sim.report.rounds >= n)
        {
            break;
        }
        if sim.report.covered_at_ns.is_none() && sim.now >= sim.stable_at && sim.uncovered == 0 {
            sim.report.covered_at_ns = Some(sim.now);
        }
    }
    let stopped = sim.settled
        || cfg
            .stop_after_rounds
            .is_some_and(|n| sim.report.rounds >= n);
    if !stopped {
        sim.now = cfg.duration_ns;
    }
    let bound = liveness_bound_ns(cfg, n_vms as u64);
    if !stopped && sim.report.covered_at_ns.is_none() && cfg.duration_ns >= sim.stable_at + bound {
        let missing = sim
            .visited_after_stable
            .iter()
            .zip(&sim.undefined)
            .filter(|(v, u)| !**v && !**u)
            .count();
        sim.violate(
            "liveness",
            format!(
                "{missing} VMs not visited within {} s of the last fault",
                bound / SEC
            ),
        );
    }
    sim.report.simulated_ns = sim.now;
    sim.report.cost_end = sim.cost();
    sim.report.final_hosts = sim.placement.hosts().to_vec();
    sim.report
}

/// One hand-off's decision: the VM (its index in the world) and the host
/// it was sent to, if any.
pub type Step = (VmIdx, Option<HostId>);

/// The protocol beside the decision-only engine on one world.
#[derive(Debug)]
pub struct Comparison {
    /// The protocol's run (with its decisions recorded).
    pub protocol: Report,
    /// The engine's run (with its trace).
    pub engine: engine::PolicyRun,
    /// The first hand-off at which the two differ: its index, the
    /// protocol's step and the engine's (`None`: one run made fewer
    /// hand-offs than the other).
    pub first_difference: Option<(usize, Option<Step>, Option<Step>)>,
}

impl Comparison {
    /// Whether both made the same decisions in the same order and ended on
    /// the same placement (docs/PROTOCOL.md, "The protocol decides as the
    /// engine does").
    pub fn same(&self) -> bool {
        self.first_difference.is_none()
    }
}

/// Runs `cfg` (on its [`SimConfig::world`], which it must have) through
/// the protocol for `rounds` rounds and score-sim's decision-only engine on
/// the same world with the same policy, rule (the paper's), c_m and its
/// decay (`cfg`'s) and a blank first token (what a watcher regenerates), and compares their
/// decisions hand-off by hand-off. The engine stops early after a round
/// without migration; the protocol's later hand-offs must then all keep
/// their VM where it is.
pub fn compare(cfg: &SimConfig, rounds: u32) -> Result<Comparison, score_core::cost::CostError> {
    let world = cfg.world.clone().expect("compare needs a score-sim world");
    let mut c = cfg.clone();
    c.record = true;
    c.stop_after_rounds = Some(rounds);
    let protocol = run(&c);
    let opts = RunOptions {
        rule: Rule::PaperFirst,
        cm: cfg.cm,
        cm_decay: cfg.cm_decay.decay,
        cm_floor: cfg.cm_decay.floor,
        max_rounds: rounds,
        token_init: TokenInit::Blank,
        record_steps: true,
        trace: true,
        ..RunOptions::default()
    };
    let engine = engine::run_policy(&world, cfg.policy, &opts, |_| {})?;
    let ours = &protocol.decisions;
    let theirs: Vec<Step> = engine.trace.iter().map(|&(vm, to)| (vm, to)).collect();
    let mut first_difference = (0..ours.len().max(theirs.len())).find_map(|i| {
        let (a, b) = (ours.get(i).copied(), theirs.get(i).copied());
        let after_convergence = engine.converged && b.is_none() && a.is_some_and(|s| s.1.is_none());
        (a != b && !after_convergence).then_some((i, a, b))
    });
    if first_difference.is_none() && protocol.final_hosts != engine.final_placement.hosts() {
        // The same steps must leave the same placement: a check on the
        // simulator's own bookkeeping of migrations.
        first_difference = Some((ours.len(), None, None));
    }
    Ok(Comparison {
        protocol,
        engine,
        first_difference,
    })
}

/// The protocol beside the best centralised baseline on a data centre
/// filled to `fill` (docs/PROTOCOL.md, "The whole repertoire beside the
/// best baseline").
#[derive(Debug)]
pub struct Versus {
    /// VMs over slots.
    pub fill: f64,
    /// VMs.
    pub vms: u32,
    /// Hosts.
    pub hosts: u32,
    /// The best baseline's cost reduction, percent, and the VMs it moves.
    pub baseline_pct: f64,
    /// See `baseline_pct`.
    pub baseline_moved: u64,
    /// The protocol's run (no faults).
    pub protocol: Report,
    /// Its cost reduction, percent.
    pub protocol_pct: f64,
    /// The decision-only engine's run of the same variant.
    pub engine: engine::PolicyRun,
    /// Wall-clock seconds of the protocol's run.
    pub protocol_wall_s: f64,
}

/// Runs `variant` (swaps over the paper's candidates, ejection chains,
/// rotations, group moves when u would stay, a c_m schedule: what the
/// `Node` has)
/// through the protocol, without faults, on scenario `s` filled to
/// `fill`, until a quiet round with c_m at its floor or `max_rounds`;
/// beside the engine's run of the same variant and the best baseline.
pub fn versus_baseline(
    s: &Scenario,
    fill: f64,
    variant: &crate::capacity::Variant,
    policy: PolicyKind,
    max_rounds: u32,
) -> Result<Versus, crate::experiment::ExperimentError> {
    let (sc, slots) = crate::capacity::at_fill(s, Some(fill))?;
    let setup = Arc::new(Setup::build(&sc)?);
    let (baseline_pct, baseline_moved) = crate::capacity::best_baseline(&setup, &sc);
    let opts = variant.options(&sc, max_rounds);
    let mut c = SimConfig::on_world(sc.seed, setup.clone());
    c.policy = policy;
    c.swaps = variant.scope.swaps;
    // A swap's two migrations need one VM of room beyond the slots on
    // one of its hosts; the engine's swaps are instantaneous.
    // A rotation's likewise on its asked hosts.
    c.migration_headroom = u32::from(variant.scope.swaps || variant.cycle);
    c.chains = variant.chain;
    c.rotations = variant.cycle;
    c.groups = variant.group != crate::engine::GroupMode::Off;
    c.cm = opts.cm;
    c.cm_decay = CmDecay {
        decay: opts.cm_decay,
        floor: opts.cm_floor,
    };
    c.stop_after_rounds = Some(max_rounds);
    c.stop_when_settled = true;
    let started = std::time::Instant::now();
    let protocol = run(&c);
    let protocol_wall_s = started.elapsed().as_secs_f64();
    let engine = engine::run_policy(&setup, policy, &opts, |_| {})?;
    let protocol_pct = if protocol.cost_start > 0.0 {
        100.0 * (1.0 - protocol.cost_end / protocol.cost_start)
    } else {
        0.0
    };
    Ok(Versus {
        fill: f64::from(setup.vms()) / slots as f64,
        vms: setup.vms(),
        hosts: setup.topo.host_count(),
        baseline_pct,
        baseline_moved,
        protocol,
        protocol_pct,
        engine,
        protocol_wall_s,
    })
}

/// Draws a [`Comparison`]'s two cost curves into `stem.png` and
/// `stem.svg`.
pub fn plot_comparison(cmp: &Comparison, stem: &std::path::Path) -> Result<(), PlotError> {
    let vms = cmp.protocol.final_hosts.len();
    let hosts = cmp.engine.final_placement.host_count();
    let verdict = if cmp.same() {
        "same decisions"
    } else {
        "decisions differ"
    };
    let title = format!(
        "{hosts} hosts, {vms} VMs, {} policy: protocol beside engine ({verdict})",
        cmp.engine.policy.name()
    );
    plot::protocol_beside_engine(
        stem,
        &title,
        cmp.engine.initial_cost,
        &cmp.protocol.step_costs,
        &cmp.engine.step_costs,
        vms as u64,
    )
}

/// What many seeded runs did, in all.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Summary {
    /// Runs made.
    pub runs: u64,
    /// Simulated time, ns.
    pub simulated_ns: u64,
    /// Datagrams lost and duplicated by the faults.
    pub lost: u64,
    /// See `lost`.
    pub duplicated: u64,
    /// Crashes and partitions.
    pub crashes: u64,
    /// See `crashes`.
    pub partitions: u64,
    /// Migrations done, failed, undefined.
    pub migrations: u64,
    /// See `migrations`.
    pub migrations_failed: u64,
    /// See `migrations`.
    pub migrations_undefined: u64,
    /// Swaps agreed, and done.
    pub swaps_agreed: u64,
    /// See `swaps_agreed`.
    pub swaps_done: u64,
    /// Ejection chains agreed, done and half done.
    pub chains_agreed: u64,
    /// See `chains_agreed`.
    pub chains_done: u64,
    /// See `chains_agreed`.
    pub chains_partial: u64,
    /// Rotations agreed, done and partly done.
    pub rotations_agreed: u64,
    /// See `rotations_agreed`.
    pub rotations_done: u64,
    /// See `rotations_agreed`.
    pub rotations_partial: u64,
    /// Group moves agreed, done and partly done.
    pub groups_agreed: u64,
    /// See `groups_agreed`.
    pub groups_done: u64,
    /// See `groups_agreed`.
    pub groups_partial: u64,
    /// Hops skipped, tokens regenerated, copies superseded.
    pub skips: u64,
    /// See `skips`.
    pub regenerations: u64,
    /// See `skips`.
    pub superseded: u64,
    /// Invariant violations, and the seeds that had any.
    pub violations: u64,
    /// See `violations`.
    pub failing_seeds: Vec<u64>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "runs {}, simulated {:.1} h",
            self.runs,
            self.simulated_ns as f64 / 3600e9
        )?;
        writeln!(
            f,
            "faults: {} datagrams lost, {} duplicated, {} crashes, {} partitions, \
             {} migrations failed, {} undefined ({} done, {} swaps agreed, {} done)",
            self.lost,
            self.duplicated,
            self.crashes,
            self.partitions,
            self.migrations_failed,
            self.migrations_undefined,
            self.migrations,
            self.swaps_agreed,
            self.swaps_done
        )?;
        if self.chains_agreed > 0 {
            writeln!(
                f,
                "chains: {} agreed, {} done, {} half done",
                self.chains_agreed, self.chains_done, self.chains_partial
            )?;
        }
        if self.rotations_agreed > 0 {
            writeln!(
                f,
                "rotations: {} agreed, {} done, {} partly done",
                self.rotations_agreed, self.rotations_done, self.rotations_partial
            )?;
        }
        if self.groups_agreed > 0 {
            writeln!(
                f,
                "group moves: {} agreed, {} done, {} partly done",
                self.groups_agreed, self.groups_done, self.groups_partial
            )?;
        }
        writeln!(
            f,
            "protocol: {} hops skipped, {} regenerations, {} copies superseded",
            self.skips, self.regenerations, self.superseded
        )?;
        write!(
            f,
            "violations: {} (seeds {:?})",
            self.violations, self.failing_seeds
        )
    }
}

/// Runs `seeds` seeded fault runs from `first` on `hosts` hosts for
/// `seconds` simulated seconds each (`quiet`: without faults), calling
/// `each` with every report.
pub fn soak(
    first: u64,
    seeds: u64,
    hosts: u32,
    seconds: u64,
    quiet: bool,
    trace: bool,
    each: impl FnMut(&Report),
) -> Summary {
    soak_with(first, seeds, hosts, seconds, quiet, trace, |_| {}, each)
}

/// [`soak`], with each seed's configuration changed by `tweak` before it
/// runs (ejection chains, a decaying c_m).
// The soak's knobs, one argument each, as for `soak`.
#[allow(clippy::too_many_arguments)]
pub fn soak_with(
    first: u64,
    seeds: u64,
    hosts: u32,
    seconds: u64,
    quiet: bool,
    trace: bool,
    tweak: impl Fn(&mut SimConfig),
    mut each: impl FnMut(&Report),
) -> Summary {
    let mut s = Summary::default();
    for seed in first..first.saturating_add(seeds) {
        let mut c = SimConfig::seeded(seed, hosts);
        c.duration_ns = seconds.saturating_mul(SEC);
        if quiet {
            c.faults = Faults::none();
        }
        c.trace = trace;
        tweak(&mut c);
        let r = run(&c);
        each(&r);
        s.runs += 1;
        s.simulated_ns += r.simulated_ns;
        s.lost += r.lost;
        s.duplicated += r.duplicated;
        s.crashes += u64::from(r.crashes);
        s.partitions += u64::from(r.partitions);
        s.migrations += r.migrations;
        s.migrations_failed += r.migrations_failed;
        s.migrations_undefined += r.migrations_undefined;
        s.swaps_agreed += r.swaps_agreed;
        s.swaps_done += r.swaps_done;
        s.chains_agreed += r.chains_agreed;
        s.chains_done += r.chains_done;
        s.chains_partial += r.chains_partial;
        s.rotations_agreed += r.rotations_agreed;
        s.rotations_done += r.rotations_done;
        s.rotations_partial += r.rotations_partial;
        s.groups_agreed += r.groups_agreed;
        s.groups_done += r.groups_done;
        s.groups_partial += r.groups_partial;
        s.skips += r.skips;
        s.regenerations += r.regenerations;
        s.superseded += r.superseded;
        if !r.violations.is_empty() {
            s.violations += r.violations.len() as u64;
            s.failing_seeds.push(seed);
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_quiet_data_centre_circulates_the_token_and_lowers_its_cost() {
        let mut c = SimConfig::seeded(1, 8);
        c.faults = Faults::none();
        c.duration_ns = 900 * SEC;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{r:?}");
        assert!(r.rounds >= 2, "{r:?}");
        assert_eq!(r.skips, 0, "{r:?}");
        assert!(r.cost_end <= r.cost_start, "{r:?}");
        assert!(r.covered_at_ns.is_some());
    }

    fn quiet(seed: u64) -> SimConfig {
        let mut c = SimConfig::seeded(seed, 8);
        c.faults = Faults::none();
        c.faults.window_ns = 120 * SEC;
        c.duration_ns = 1200 * SEC;
        c
    }

    /// A token chunk captured on the wire and sent again to other VMs'
    /// addresses (the first defect of the review: it started a second
    /// token) is refused by its destination, and one token circulates.
    #[test]
    fn replayed_chunks_to_other_vms_start_no_second_token() {
        let mut c = quiet(11);
        // The world this test was written for: no swaps, room to move.
        (c.swaps, c.migration_headroom, c.vms_per_host) = (false, 0, 3);
        c.faults.replay_attack = 0.5;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{r:?}");
        assert!(r.wrong_destination > 10, "{r:?}");
        assert_eq!(r.regenerations, 1, "only the first token: {r:?}");
        assert!(r.covered_at_ns.is_some(), "{r:?}");
    }

    /// Lost hop acknowledgements (the third defect: the sender skipped,
    /// the receiver kept its copy, two tokens for good): the sender's
    /// copy continues under a new epoch, the receiver's ends.
    #[test]
    fn lost_acks_leave_one_token() {
        let mut c = quiet(12);
        c.faults.ack_loss = 0.7;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{r:?}");
        assert!(r.skips > 0, "acks were lost past every retry: {r:?}");
        assert!(r.superseded > 0, "a copy ended: {r:?}");
        assert!(r.covered_at_ns.is_some(), "{r:?}");
    }

    /// A partition once cut the watchers off (seed 42, before migrations
    /// were announced), and every VM of their hosts was skipped. Those
    /// hosts then never held the token again to add their VMs back (the
    /// liveness invariant failed) until the watchers sent the token's
    /// holders the members it lacked. Any change to the datagrams a node
    /// sends changes every seed's draws, so the test takes the first seeds
    /// whose runs have a partition and dozens of skips, rather than fixed
    /// ones.
    #[test]
    fn a_host_whose_vms_were_all_skipped_gets_them_back() {
        let mut hard = 0;
        for seed in 0..20 {
            let mut c = SimConfig::seeded(seed, 8);
            c.duration_ns = 1800 * SEC;
            let r = run(&c);
            if r.partitions == 0 || r.skips < 50 {
                continue;
            }
            assert!(r.violations.is_empty(), "{:?}", r.violations);
            assert!(r.covered_at_ns.is_some(), "{r:?}");
            hard += 1;
            if hard == 3 {
                return;
            }
        }
        panic!("only {hard} of the first 20 seeds had a partition and 50 skips");
    }

    /// Full hosts (4 VMs in 4 slots) with swaps: VMs only move by
    /// exchange, and no host ever runs more than its slots and its one VM
    /// of headroom (the capacity invariant, checked after every event).
    #[test]
    fn full_hosts_swap_within_their_headroom() {
        let c = quiet(3);
        assert!(c.swaps && c.migration_headroom == 1 && c.vms_per_host == c.vm_slots);
        let r = run(&c);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(r.swaps_done > 0, "{r:?}");
        assert_eq!(r.migrations, 2 * r.swaps_done, "only swaps move VMs: {r:?}");
        assert!(r.cost_end < r.cost_start, "{r:?}");
    }

    /// Without headroom on either host a swap would put one host over its
    /// slots between its two migrations: every proposal is refused.
    #[test]
    fn without_headroom_no_swap_is_made() {
        let mut c = quiet(3);
        c.migration_headroom = 0;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert_eq!((r.swaps_agreed, r.migrations), (0, 0), "{r:?}");
    }

    /// Ejection chains on hosts that are full or nearly (half the hosts
    /// one VM short), with no headroom anywhere: a chain's partner leaves
    /// first, into a slot its third host promised, so no host ever runs
    /// more than its slots (the capacity invariant, after every event).
    /// Every chain's benefit, as the asked hosts computed it from what
    /// they measure, is the drop of the equation 1 total recomputed on
    /// the placement with both moves made, and beats its threshold.
    #[test]
    fn chains_keep_every_host_within_its_slots_and_their_benefit_is_exact() {
        let mut third = 0;
        for seed in [3, 4, 5, 9, 10, 11] {
            let mut c = quiet(seed).with_chains();
            c.swaps = false;
            c.migration_headroom = 0;
            c.record = true;
            // Locations trusted only for the time of one decision, so
            // every host's view is exact (no VM moves meanwhile: the
            // token is serial without faults).
            (c.hold_down_ns, c.location_ttl_ns) = (0, SEC);
            let r = run(&c);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert_eq!(r.chains_agreed, r.chains_done, "seed {seed}: {r:?}");
            assert!(r.cost_end < r.cost_start, "{r:?}");
            assert_exact(seed, "chain", &r.chain_benefits);
            assert_eq!(r.chain_benefits.len() as u64, r.chains_agreed);
            third += r.chains_third_host;
        }
        assert!(third > 0, "some chain sends its VM to a third host");
    }

    /// Rotations on full hosts with one VM of headroom: every host stays
    /// within its slots and headroom (the run's invariants), every
    /// rotation agreed is done, and its benefit as the three hosts
    /// computed it is the drop of the equation 1 total recomputed with
    /// its three moves made.
    #[test]
    fn rotations_keep_every_host_within_its_slots_and_their_benefit_is_exact() {
        let mut agreed = 0;
        for seed in [3, 4, 5, 9, 10, 11] {
            agreed += rotations_are_exact(seed);
        }
        assert!(agreed > 0, "some rotation is agreed");
    }

    /// Every (benefit as the hosts computed it, drop recomputed,
    /// threshold) of seed `seed`'s `what`s: the benefit is the drop, and
    /// above the threshold.
    fn assert_exact(seed: u64, what: &str, benefits: &[(f64, f64, f64)]) {
        for &(claimed, drop, c_m) in benefits {
            assert!(
                (claimed - drop).abs() <= 1e-9 * drop.abs().max(1.0),
                "seed {seed}: {what} benefit {claimed}, recomputed {drop}"
            );
            assert!(claimed > c_m, "seed {seed}: {claimed} <= {c_m}");
        }
    }

    /// One quiet run with rotations (and swaps, on full hosts): its
    /// rotations are all done and exact; how many there were.
    fn rotations_are_exact(seed: u64) -> u64 {
        let mut c = quiet(seed).with_rotations();
        c.record = true;
        // Every host's view exact, as for chains.
        (c.hold_down_ns, c.location_ttl_ns) = (0, SEC);
        let r = run(&c);
        assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
        assert_eq!(r.rotations_agreed, r.rotations_done, "seed {seed}: {r:?}");
        assert_eq!(r.rotation_benefits.len() as u64, r.rotations_agreed);
        assert_exact(seed, "rotation", &r.rotation_benefits);
        r.rotations_agreed
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(6))]
        /// [`rotations_are_exact`] on worlds drawn at random (the seeds
        /// with full hosts and headroom).
        #[test]
        fn a_rotation_benefit_is_the_recomputed_drop(k in 2u64..5000, i in 0u64..3) {
            rotations_are_exact(6 * k + 3 + i);
        }
    }

    /// Twelve seeded fault runs of 1,800 s on 8 hosts, each configured by
    /// `with`: none breaks an invariant.
    fn under_faults(with: fn(SimConfig) -> SimConfig) -> Vec<Report> {
        (0..12)
            .map(|seed| {
                let mut c = with(SimConfig::seeded(seed, 8));
                c.duration_ns = 1800 * SEC;
                let r = run(&c);
                assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
                r
            })
            .collect()
    }

    /// Rotations under faults keep the invariants, and some end partly
    /// done (a host then holds one VM more, within its headroom).
    #[test]
    fn rotations_under_faults_keep_the_invariants() {
        let runs = under_faults(SimConfig::with_rotations);
        let agreed: u64 = runs.iter().map(|r| r.rotations_agreed).sum();
        let partial: u64 = runs.iter().map(|r| r.rotations_partial).sum();
        assert!(
            agreed > 0 && partial > 0,
            "{agreed} agreed, {partial} partly done"
        );
    }

    /// Group moves on quiet runs: every host stays within its slots (the
    /// run's invariants), every group move agreed is done, and its benefit
    /// as the holder computed it is the drop of the equation 1 total
    /// recomputed with all its moves made, above its threshold.
    #[test]
    fn group_moves_keep_every_host_within_its_slots_and_their_benefit_is_exact() {
        let mut agreed = 0;
        for seed in 0..12 {
            let mut c = quiet(seed).with_groups();
            c.record = true;
            // Every host's view exact, as for chains.
            (c.hold_down_ns, c.location_ttl_ns) = (0, SEC);
            let r = run(&c);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            assert_eq!(r.groups_agreed, r.groups_done, "seed {seed}: {r:?}");
            assert_eq!(r.group_benefits.len() as u64, r.groups_agreed);
            assert_exact(seed, "group", &r.group_benefits);
            agreed += r.groups_agreed;
        }
        assert!(agreed > 0, "some group move is agreed");
    }

    /// Group moves under faults keep the invariants, and some end partly
    /// done (each member where its own migration left it).
    #[test]
    fn group_moves_under_faults_keep_the_invariants() {
        let runs = under_faults(SimConfig::with_groups);
        let agreed: u64 = runs.iter().map(|r| r.groups_agreed).sum();
        let partial: u64 = runs.iter().map(|r| r.groups_partial).sum();
        assert!(
            agreed > 0 && partial > 0,
            "{agreed} agreed, {partial} partly done"
        );
    }

    /// Chains under faults (loss, duplication, delay, partitions, crashes,
    /// failing migrations): the invariants hold, and a chain whose second
    /// migration fails ends half done, reported, within capacity.
    #[test]
    fn chains_under_faults_keep_the_invariants() {
        let (mut agreed, mut partial) = (0, 0);
        for seed in 0..10 {
            let mut c = SimConfig::seeded(seed, 8).with_chains();
            c.duration_ns = 1800 * SEC;
            let r = run(&c);
            assert!(r.violations.is_empty(), "seed {seed}: {:?}", r.violations);
            agreed += r.chains_agreed;
            partial += r.chains_partial;
        }
        assert!(
            agreed > 0 && partial > 0,
            "{agreed} agreed, {partial} half done"
        );
    }

    /// Seed 364: the asked host of a swap whose partner went first had a
    /// free slot until the proposer's VM came, and let another swap's VM
    /// into it meanwhile (the capacity invariant: 6 VMs on a host of 4
    /// slots and 1 of headroom). The slot a swap's first migration frees
    /// is now promised to the VM its second one brings.
    #[test]
    fn a_swap_keeps_the_slot_its_first_migration_freed() {
        let mut c = SimConfig::seeded(364, 8);
        c.duration_ns = 1800 * SEC;
        let r = run(&c);
        assert!(r.violations.is_empty(), "{:?}", r.violations);
        assert!(r.swaps_done > 0, "{r:?}");
    }

    #[test]
    fn a_seed_replays_byte_for_byte() {
        let c = SimConfig::seeded(7, 8);
        assert_eq!(run(&c), run(&c));
    }
}
