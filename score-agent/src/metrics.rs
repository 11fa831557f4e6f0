//! The agent's Prometheus metrics, all declared in this one module: per
//! hosted VM traffic and cost, host cost, the top-K pairs by rate, token and
//! decision events, rejected datagrams, and the health of the BPF maps. They
//! live in the agent's own [`Registry`] (not the process-global one) and are
//! served as text at `GET /metrics`. docs/METRICS.md lists every metric.
//!
//! Label cardinality is bounded by construction: `vm` labels exist only for
//! the VMs hosted here and are removed when a VM leaves, pair labels only
//! for the K busiest pairs (reset at every drain), and `reason` / `outcome`
//! labels come from fixed enums.

use std::{
    collections::{BTreeSet, HashMap},
    hash::{BuildHasherDefault, Hasher},
    net::Ipv4Addr,
    sync::{Mutex, MutexGuard},
    time::Duration,
};

use prometheus::{
    Encoder, Gauge, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;
use tracing::warn;

use crate::{
    datapath::DatapathStats,
    flows::{Pair, Totals},
};

/// Default number of pairs exported by `score_top_pair_*`.
pub(crate) const DEFAULT_TOP_K: usize = 10;

/// Largest `top_k` the configuration accepts: each pair is two series.
pub(crate) const MAX_TOP_K: usize = 1000;

/// The `[metrics]` table of the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// How many of the busiest directed pairs (by windowed rate) to export
    /// with `src`/`dst` labels; 0 exports none. At most [`MAX_TOP_K`].
    #[serde(default = "default_top_k")]
    pub top_k: usize,
}

fn default_top_k() -> usize {
    DEFAULT_TOP_K
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            top_k: DEFAULT_TOP_K,
        }
    }
}

/// What became of a migration the decision asked for
/// (`score_migrations_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MigrationOutcome {
    /// The hypervisor moved the VM.
    Done,
    /// The hypervisor failed; the VM stayed where it was.
    Failed,
    /// Advisory mode: the migration was decided and reported, not made.
    Advisory,
}

impl MigrationOutcome {
    /// Every outcome, in label order.
    pub const ALL: [MigrationOutcome; 3] = [Self::Done, Self::Failed, Self::Advisory];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Advisory => "advisory",
        }
    }
}

/// What became of a swap this host proposed and the other host accepted
/// (`score_swaps_total{outcome}`, counted by the proposer).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SwapOutcome {
    /// Both VMs moved: they exchanged hosts.
    Done,
    /// The first migration was made, the second failed (or its end was
    /// never heard of): both VMs run, on the first one's target.
    Partial,
    /// The first migration failed: nothing moved, the partner was released.
    Failed,
    /// Advisory mode: the swap was agreed and reported, not made.
    Advisory,
}

impl SwapOutcome {
    /// Every outcome, in label order.
    pub const ALL: [SwapOutcome; 4] = [Self::Done, Self::Partial, Self::Failed, Self::Advisory];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Done => "done",
            Self::Partial => "partial",
            Self::Failed => "failed",
            Self::Advisory => "advisory",
        }
    }

    /// The outcome named by `label`, if any.
    pub fn from_label(label: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|o| o.label() == label)
    }
}

/// Answers this host gave to swap proposals
/// (`score_swap_requests_total{answer}`): `accepted`, or the refusal's
/// name from score-core's `SwapRefusal` (a fixed set).
pub(crate) const SWAP_ANSWERS: [&str; 6] = [
    "accepted",
    "disabled",
    "no_partner",
    "no_headroom",
    "busy",
    "invalid",
];

/// Why a peer datagram was dropped (`score_datagrams_rejected_total{reason}`):
/// score-core's fixed set, shared with the protocol's state machine.
pub(crate) use score_core::wire::RejectReason;

/// One directed pair as seen at a drain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PairSample {
    /// Source and destination addresses.
    pub pair: Pair,
    /// The kernel's cumulative counters for the pair.
    pub totals: Totals,
    /// Its windowed rate, bytes per second.
    pub rate_bps: f64,
    /// The pair's bytes at the drain before (what the flow table had for
    /// it); None at first sight. Turns the kernel's totals into counter
    /// increments: no table of its own per pair here.
    pub previous: Option<u64>,
}

/// A hasher for IPv4 addresses (one multiply): the per-VM sums of a drain
/// are looked up twice per pair, and SipHash cost more than the rest of a
/// pair's share of the metrics.
#[derive(Clone, Copy, Debug, Default)]
struct AddrHasher(u64);

impl Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u32(&mut self, v: u32) {
        self.0 = (self.0 ^ u64::from(v)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type AddrMap<V> = HashMap<u32, V, BuildHasherDefault<AddrHasher>>;

/// Most pairs a drain keeps aside for addresses that were not hosted at
/// the drain before ([`DrainPairs`]); past this, it sums for every
/// address instead. The paper's workload puts 3,200 pairs aside (each has
/// a peer elsewhere), 75 KiB.
const STRAYS_MAX: usize = 4_096;

/// A pair's share of the sums, kept aside because its sending or its
/// receiving address was not hosted at the drain before.
#[derive(Clone, Copy, Debug)]
struct Stray {
    src: u32,
    dst: u32,
    delta: u64,
    rate: f64,
}

/// The per-pair part of one drain, folded in pair by pair as the flow table
/// takes the drain ([`Metrics::drain_pairs`]): per-address sums, the
/// busiest pairs, the count. No list of every pair is kept.
///
/// Only the hosted VMs' sums are exported, so only they are summed: the
/// tables start with the VMs hosted at the drain before, and a pair's
/// share for an address not among them (a peer elsewhere, mostly) is put
/// aside instead, in a list written in order. A VM hosted now but not
/// then (learnt since, even while this drain ran) is summed from that
/// list at the end, so its bytes of this drain are counted. Summing for
/// every address cost a third of the loaded daemon's CPU, in cache misses
/// on tables that held every peer (docs/BENCHMARKS.md). Past
/// [`STRAYS_MAX`] pairs put aside, the drain sums for every address.
#[derive(Debug)]
pub struct DrainPairs {
    since_ns: u64,
    top_k: usize,
    /// Candidates for the top K: cut back to K whenever 2K are held.
    top: Vec<PairSample>,
    /// Bytes since the last drain and summed rate, by sending address and
    /// by receiving address: the VMs of `seeded`, or every address once
    /// `spilled` (filtered to the hosted VMs at the end).
    tx: AddrMap<(u64, f64)>,
    rx: AddrMap<(u64, f64)>,
    /// The VMs hosted at the drain before, sorted.
    seeded: Vec<u32>,
    /// Shares for addresses not in `seeded`, while not `spilled`.
    strays: Vec<Stray>,
    strays_max: usize,
    spilled: bool,
    pairs: usize,
    /// The K-th busiest of the candidates at the last cut: a pair that is
    /// not busier can never be among the K, and costs one comparison.
    floor: Option<PairSample>,
}

/// The per-drain buffers of [`DrainPairs`], kept from one drain to the
/// next: a drain's sums fill a table as large as the last one's without
/// growing it step by step.
#[derive(Debug, Default)]
struct DrainBuffers {
    tx: AddrMap<(u64, f64)>,
    rx: AddrMap<(u64, f64)>,
    top: Vec<PairSample>,
    seeded: Vec<u32>,
    strays: Vec<Stray>,
}

/// The top-K order: highest rate first, then most bytes, then lowest
/// (src, dst).
fn busiest_first(a: &PairSample, b: &PairSample) -> std::cmp::Ordering {
    b.rate_bps
        .total_cmp(&a.rate_bps)
        .then(b.totals.bytes.cmp(&a.totals.bytes))
        .then(a.pair.cmp(&b.pair))
}

impl DrainPairs {
    /// Folds one pair in.
    pub fn add(&mut self, p: PairSample) {
        self.pairs += 1;
        let bytes = p.totals.bytes;
        let before = match p.previous {
            // Fewer bytes than last time: the entry was deleted and
            // created again, so everything in it is new.
            Some(b) if b <= bytes => b,
            Some(_) => 0,
            // First sight: bytes from before this agent counted are a
            // baseline, not traffic of this run.
            None if p.totals.first_seen_ns < self.since_ns => bytes,
            None => 0,
        };
        let delta = bytes - before;
        let (src, dst) = p.pair;
        // Self traffic is ignored (docs/METRICS.md, "Conventions"); a pair
        // that adds nothing to a sum needs no entry (an absent address
        // sums to zero).
        if src != dst && (delta != 0 || p.rate_bps != 0.0) {
            self.sum(u32::from(src), u32::from(dst), delta, p.rate_bps);
        }
        if self.top_k > 0
            && self
                .floor
                .as_ref()
                .is_none_or(|f| busiest_first(&p, f).is_lt())
        {
            self.top.push(p);
            if self.top.len() >= 2 * self.top_k {
                self.cut_top();
            }
        }
    }

    /// Adds a pair's share to the sums of its addresses that are summed,
    /// and puts it aside if either is not. Inlined, with the share as
    /// four values rather than a `Stray`: one built on the stack and then
    /// copied into the list was where the profile found each pair
    /// waiting (docs/BENCHMARKS.md, "Prefetch in bursts, top pairs made
    /// when scraped").
    #[inline(always)]
    fn sum(&mut self, src: u32, dst: u32, delta: u64, rate: f64) {
        if self.spilled {
            for (sums, vm) in [(&mut self.tx, src), (&mut self.rx, dst)] {
                let t = sums.entry(vm).or_default();
                t.0 += delta;
                t.1 += rate;
            }
            return;
        }
        let mut aside = false;
        for (sums, vm) in [(&mut self.tx, src), (&mut self.rx, dst)] {
            match sums.get_mut(&vm) {
                Some(t) => {
                    t.0 += delta;
                    t.1 += rate;
                }
                None => aside = true,
            }
        }
        if !aside {
            return;
        }
        if self.strays.len() < self.strays_max {
            self.strays.push(Stray {
                src,
                dst,
                delta,
                rate,
            });
            return;
        }
        let s = Stray {
            src,
            dst,
            delta,
            rate,
        };
        // Too many to keep aside: sum for every address from here on,
        // starting with the shares put aside (this one included).
        self.spilled = true;
        let strays = std::mem::take(&mut self.strays);
        for s in strays.iter().chain([&s]) {
            for (sums, vm) in [(&mut self.tx, s.src), (&mut self.rx, s.dst)] {
                if self.seeded.binary_search(&vm).is_err() {
                    let t = sums.entry(vm).or_default();
                    t.0 += s.delta;
                    t.1 += s.rate;
                }
            }
        }
        self.strays = strays;
        self.strays.clear();
    }

    /// Sums the shares put aside for the VMs of `hosted` that were not
    /// summed during the pass (hosted now, not at the drain before).
    fn sum_new(&mut self, hosted: &BTreeSet<Ipv4Addr>) {
        if self.spilled {
            return;
        }
        let new: Vec<u32> = hosted
            .iter()
            .map(|&vm| u32::from(vm))
            .filter(|vm| self.seeded.binary_search(vm).is_err())
            .collect();
        if new.is_empty() {
            return;
        }
        for s in &self.strays {
            for (sums, vm) in [(&mut self.tx, s.src), (&mut self.rx, s.dst)] {
                if new.contains(&vm) {
                    let t = sums.entry(vm).or_default();
                    t.0 += s.delta;
                    t.1 += s.rate;
                }
            }
        }
    }

    /// Cuts the candidates to the K busiest (linear-time selection), and
    /// remembers the K-th as the floor for the pairs still to come.
    fn cut_top(&mut self) {
        let k = self.top_k;
        if k > 0 && k < self.top.len() {
            self.top.select_nth_unstable_by(k - 1, busiest_first);
            self.top.truncate(k);
            self.floor = Some(self.top[k - 1]);
        }
    }

    /// Cuts the candidates to the K busiest, sorted.
    fn keep_top(&mut self) {
        self.cut_top();
        self.top.sort_unstable_by(busiest_first);
    }
}

/// Everything one drain of the kernel maps tells the metrics.
#[derive(Clone, Copy, Debug)]
pub struct DrainSample<'a> {
    /// Every pair in the kernel map at this drain.
    pub pairs: &'a [PairSample],
    /// The VMs hosted here now (seen sending on an attached interface).
    pub hosted: &'a [Ipv4Addr],
    /// The datapath's own counters at this drain.
    pub stats: DatapathStats,
    /// Interfaces the classifiers are attached to.
    pub attached: usize,
    /// CLOCK_MONOTONIC ns at which this agent started counting: the bytes a
    /// pair had before (counters pinned by an earlier run) are not new
    /// traffic, so they are not added to this process's counters.
    pub since_ns: u64,
}

#[derive(Debug, Default)]
struct DrainState {
    /// The datapath's counters at the last drain (`None` before the first).
    last_stats: Option<DatapathStats>,
    /// VMs that have `vm` labels now.
    labelled: BTreeSet<Ipv4Addr>,
    /// The traffic series of the hosted VMs, as every drain updates them:
    /// looked up by label (an address formatted, two hashes) once per VM,
    /// not once per drain. Dropped whenever the VM's series are removed,
    /// so that no update goes to a series the registry no longer has.
    traffic: HashMap<Ipv4Addr, VmTraffic>,
    /// The communication cost last set for each hosted VM; the host cost
    /// is their sum.
    costs: HashMap<Ipv4Addr, f64>,
}

/// One hosted VM's traffic series.
#[derive(Debug)]
struct VmTraffic {
    transmit_bytes: IntCounter,
    transmit_rate: Gauge,
    receive_bytes: IntCounter,
    receive_rate: Gauge,
}

impl DrainState {
    fn host_cost(&self) -> f64 {
        self.costs.values().sum()
    }
}

/// The agent's metrics. Cheap to update from any thread; share it in an
/// `Arc`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    top_k: usize,
    /// Held while a drain updates the drain-derived metrics and while
    /// rendering, so that a scrape never sees a half-updated top-K set.
    state: Mutex<DrainState>,
    /// The buffers of the last drain's [`DrainPairs`], for the next.
    buffers: Mutex<DrainBuffers>,

    vm_transmit_bytes: IntCounterVec,
    vm_receive_bytes: IntCounterVec,
    vm_transmit_rate: GaugeVec,
    vm_receive_rate: GaugeVec,
    vm_cost: GaugeVec,
    vm_level: IntGaugeVec,
    vms_hosted: IntGauge,
    host_cost: Gauge,
    top_pairs: TopPairs,

    token_received: IntCounter,
    token_passed: IntCounter,
    token_retransmitted: IntCounter,
    token_lost: IntCounter,
    token_regenerated: IntCounter,
    token_epoch: IntGauge,
    token_round: IntGauge,

    decisions: IntCounter,
    migrations: IntCounterVec,
    migration_benefit: Histogram,
    migration_duration: Histogram,
    migration_cost_bytes: Gauge,
    swaps: IntCounterVec,
    chains: IntCounterVec,
    rotations: IntCounterVec,
    group_moves: IntCounterVec,
    swap_requests: IntCounterVec,
    rejected: IntCounterVec,

    flow_map_entries: IntGauge,
    flow_map_capacity: IntGauge,
    flow_map_full: IntCounter,
    vm_map_full: IntCounter,
    uncounted_frames: IntCounterVec,
    control_intercepted: IntCounter,
    control_ring_full: IntCounter,
    attached_interfaces: IntGauge,
    drain_duration: Histogram,
    drain_failures: IntCounter,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Registers a metric built from constant names and help texts. These
/// cannot fail at run time (names are valid and unique, which the unit
/// tests prove by constructing [`Metrics`]), so a failure is a bug here.
fn reg<C: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    made: prometheus::Result<C>,
) -> C {
    let c = made.expect("metric definition is valid");
    registry
        .register(Box::new(c.clone()))
        .expect("metric names are unique");
    c
}

fn clamp_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(DEFAULT_TOP_K)
    }
}

impl Metrics {
    /// Declares every metric in a new registry; `top_k` busiest pairs are
    /// exported at each drain.
    pub fn new(top_k: usize) -> Metrics {
        let r = Registry::new();
        let counter = |name: &str, help: &str| reg(&r, IntCounter::new(name, help));
        let int_gauge = |name: &str, help: &str| reg(&r, IntGauge::new(name, help));
        let vm = &["vm"];

        let m = Metrics {
            top_k: top_k.min(MAX_TOP_K),
            state: Mutex::new(DrainState::default()),
            buffers: Mutex::new(DrainBuffers::default()),
            vm_transmit_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_vm_transmit_bytes_total",
                        "Bytes sent by a hosted VM (Ethernet header + IP packet), counted by the eBPF classifiers since this agent started.",
                    ),
                    vm,
                ),
            ),
            vm_receive_bytes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_vm_receive_bytes_total",
                        "Bytes received by a hosted VM (Ethernet header + IP packet), counted by the eBPF classifiers since this agent started.",
                    ),
                    vm,
                ),
            ),
            vm_transmit_rate: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "score_vm_transmit_bytes_per_second",
                        "Rate at which a hosted VM sends, averaged over the rate window (sum over its peers).",
                    ),
                    vm,
                ),
            ),
            vm_receive_rate: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "score_vm_receive_bytes_per_second",
                        "Rate at which a hosted VM receives, averaged over the rate window (sum over its peers).",
                    ),
                    vm,
                ),
            ),
            vm_cost: reg(
                &r,
                GaugeVec::new(
                    Opts::new(
                        "score_vm_communication_cost",
                        "Communication cost of a hosted VM as of its last decision: sum over its peers of lambda times the cumulative link weight W(level) (bytes per second x weight).",
                    ),
                    vm,
                ),
            ),
            vm_level: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "score_vm_communication_level",
                        "Communication level of a hosted VM: the highest tree level its traffic crosses (0: all peers on this host).",
                    ),
                    vm,
                ),
            ),
            vms_hosted: int_gauge(
                "score_vms_hosted",
                "VMs hosted here (seen sending on an attached interface).",
            ),
            host_cost: reg(
                &r,
                Gauge::new(
                    "score_host_communication_cost",
                    "Sum of score_vm_communication_cost over the VMs hosted here.",
                ),
            ),
            top_pairs: reg(
                &r,
                TopPairs::new(
                    Opts::new(
                        "score_top_pair_bytes_per_second",
                        "Windowed rate of one of the top-K directed pairs by rate; the set is replaced at every drain.",
                    ),
                    Opts::new(
                        "score_top_pair_bytes",
                        "Bytes counted by the kernel for one of the top-K directed pairs by rate, since its map entry was created; the set is replaced at every drain.",
                    ),
                ),
            ),
            token_received: counter(
                "score_token_received_total",
                "Tokens received (complete, authenticated, current epoch).",
            ),
            token_passed: counter(
                "score_token_passed_total",
                "Tokens passed on to the next holder and acknowledged.",
            ),
            token_retransmitted: counter(
                "score_token_retransmitted_total",
                "Token datagrams sent again after an acknowledgement time-out.",
            ),
            token_lost: counter(
                "score_token_lost_total",
                "Times the token was declared lost (no token seen within the time-out, or retries exhausted).",
            ),
            token_regenerated: counter(
                "score_token_regenerated_total",
                "Tokens regenerated by this agent with a higher epoch.",
            ),
            token_epoch: int_gauge(
                "score_token_epoch",
                "The newest token epoch this agent has accepted.",
            ),
            token_round: int_gauge(
                "score_token_round",
                "Rounds the token has completed (every VM held it once), as of the last round this agent saw end.",
            ),
            decisions: counter(
                "score_decisions_evaluated_total",
                "Migration decisions evaluated (one per token hold for a hosted VM).",
            ),
            migrations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_migrations_total",
                        "Migrations decided, by outcome: done, failed (the VM stayed), advisory (reported, not made).",
                    ),
                    &["outcome"],
                ),
            ),
            migration_benefit: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "score_migration_benefit",
                        "Benefit (equation 2: drop of the equation 1 total, bytes per second x weight) of each migration decided.",
                    )
                    .buckets(
                        prometheus::exponential_buckets(1.0, 10.0, 13)
                            .expect("constant bucket layout"),
                    ),
                ),
            ),
            // Unlabelled, done only: a failed migration may end anywhere
            // from an immediate refusal to the time-out, and an advisory
            // one takes no time, so mixing them in would hide the figure
            // an operator wants (how long a VM that moved took); its
            // `_count` equals score_migrations_total{outcome="done"}.
            migration_cost_bytes: reg(
                &r,
                Gauge::new(
                    "score_migration_cost_bytes",
                    "Bytes a VM's next migration from this host is expected to send, learnt from the migrations it made (policy.migration_cost = \"traffic/H\"; 0 otherwise).",
                ),
            ),
            migration_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "score_migration_duration_seconds",
                        "Wall-clock time of each migration done (the VM moved), as the backend measured it: from its first command to the VM running at the target.",
                    )
                    // Live migrations of real VMs take 1 to 60 s; the
                    // namespace backend's moves take milliseconds.
                    .buckets(vec![
                        0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
                    ]),
                ),
            ),
            swaps: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_swaps_total",
                        "Swaps this host proposed and the other host accepted, by outcome: done (both VMs exchanged hosts), partial (the first migration made, the second failed), failed (nothing moved), advisory (reported, not made).",
                    ),
                    &["outcome"],
                ),
            ),
            chains: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_chains_total",
                        "Ejection chains this host proposed and the asked host accepted, by outcome: done (both VMs moved), partial (one moved, the other did not), failed (nothing moved), advisory (reported, not made).",
                    ),
                    &["outcome"],
                ),
            ),
            rotations: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_rotations_total",
                        "Rotations this host proposed and the asked hosts closed, by outcome: done (all three VMs moved), partial (one or two moved), failed (nothing moved), advisory (reported, not made).",
                    ),
                    &["outcome"],
                ),
            ),
            group_moves: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_group_moves_total",
                        "Group moves this host agreed (every destination reserved its members' slots), by outcome: done (every member moved), partial (some moved), failed (none moved), advisory (reported, not made).",
                    ),
                    &["outcome"],
                ),
            ),
            swap_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_swap_requests_total",
                        "Swap proposals this host answered, by answer: accepted, or why it refused (disabled, no_partner, no_headroom, busy, invalid).",
                    ),
                    &["answer"],
                ),
            ),
            rejected: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_datagrams_rejected_total",
                        "Peer datagrams dropped, by reason.",
                    ),
                    &["reason"],
                ),
            ),
            flow_map_entries: int_gauge(
                "score_bpf_flow_map_entries",
                "Directed pairs in the kernel flow map at the last drain.",
            ),
            flow_map_capacity: int_gauge(
                "score_bpf_flow_map_capacity",
                "Capacity of the kernel flow map (flows_max), in directed pairs.",
            ),
            flow_map_full: counter(
                "score_bpf_flow_map_full_total",
                "Kernel flow map updates that failed because the map was full: frames of new pairs left uncounted.",
            ),
            vm_map_full: counter(
                "score_bpf_vm_map_full_total",
                "VM MAC records that failed because the VM map was full.",
            ),
            uncounted_frames: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "score_bpf_uncounted_frames_total",
                        "Frames the classifiers passed without counting, by reason: not_ipv4, not_unicast.",
                    ),
                    &["reason"],
                ),
            ),
            control_intercepted: counter(
                "score_bpf_control_intercepted_total",
                "S-CORE control datagrams intercepted by the classifiers and handed to the agent.",
            ),
            control_ring_full: counter(
                "score_bpf_control_ring_full_total",
                "S-CORE control datagrams let through to the guest because the ring to the agent was full.",
            ),
            attached_interfaces: int_gauge(
                "score_bpf_attached_interfaces",
                "VM interfaces the classifiers are attached to.",
            ),
            drain_duration: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "score_drain_duration_seconds",
                        "Time to drain the kernel maps into the flow table (map iteration, rates, eviction).",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                        0.25, 0.5, 1.0, 2.5,
                    ]),
                ),
            ),
            drain_failures: counter(
                "score_drain_failures_total",
                "Drains that failed (a map could not be read).",
            ),
            registry: r,
        };
        // Series of fixed label sets exist from the start at 0, so that
        // `rate()` and alerts see the first event.
        for o in MigrationOutcome::ALL {
            m.migrations.with_label_values(&[o.label()]);
        }
        for reason in RejectReason::ALL {
            m.rejected.with_label_values(&[reason.label()]);
        }
        for o in SwapOutcome::ALL {
            m.swaps.with_label_values(&[o.label()]);
            m.chains.with_label_values(&[o.label()]);
            m.rotations.with_label_values(&[o.label()]);
            m.group_moves.with_label_values(&[o.label()]);
        }
        for a in SWAP_ANSWERS {
            m.swap_requests.with_label_values(&[a]);
        }
        for reason in ["not_ipv4", "not_unicast"] {
            m.uncounted_frames.with_label_values(&[reason]);
        }
        m
    }

    /// The registry, for `/status`, which reads the same numbers.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// How many pairs `score_top_pair_*` exports.
    pub fn top_k(&self) -> usize {
        self.top_k
    }

    /// Every metric in the Prometheus text exposition format (0.0.4).
    pub fn render(&self) -> String {
        let _state = lock(&self.state);
        let families = self.registry.gather();
        let mut out = String::new();
        if let Err(e) = TextEncoder::new().encode_utf8(&families, &mut out) {
            warn!(error = %e, "encoding metrics failed");
        }
        out
    }

    /// The content type of [`Metrics::render`]'s output.
    pub fn content_type(&self) -> String {
        TextEncoder::new().format_type().to_owned()
    }

    // ---- token ------------------------------------------------------------

    /// A token was received (complete, authenticated, current epoch).
    pub fn token_received(&self) {
        self.token_received.inc();
    }

    /// The token was passed on and acknowledged.
    pub fn token_passed(&self) {
        self.token_passed.inc();
    }

    /// A token datagram was sent again after a time-out.
    pub fn token_retransmitted(&self) {
        self.token_retransmitted.inc();
    }

    /// The token was declared lost.
    pub fn token_lost(&self) {
        self.token_lost.inc();
    }

    /// This agent regenerated the token.
    pub fn token_regenerated(&self) {
        self.token_regenerated.inc();
    }

    /// The newest epoch accepted.
    pub fn set_token_epoch(&self, epoch: u64) {
        self.token_epoch.set(clamp_i64(epoch));
    }

    /// The token completed `round` rounds.
    pub fn set_token_round(&self, round: u64) {
        self.token_round.set(clamp_i64(round));
    }

    // ---- decisions --------------------------------------------------------

    /// A migration decision was evaluated.
    pub fn decision_evaluated(&self) {
        self.decisions.inc();
    }

    /// A decided migration ended with `outcome`.
    pub fn migration(&self, outcome: MigrationOutcome) {
        self.migrations.with_label_values(&[outcome.label()]).inc();
    }

    /// The benefit of a migration decided (whatever its outcome).
    pub fn observe_benefit(&self, benefit: f64) {
        if benefit.is_finite() {
            self.migration_benefit.observe(benefit);
        }
    }

    /// A migration was done (the VM moved) and took `took`; count it with
    /// [`Metrics::migration`] too.
    /// The bytes a VM's next migration is expected to send (a traffic c_m).
    pub fn set_migration_cost_bytes(&self, bytes: f64) {
        self.migration_cost_bytes.set(bytes);
    }

    pub fn observe_migration_duration(&self, took: Duration) {
        self.migration_duration.observe(took.as_secs_f64());
    }

    /// A swap this host proposed ended with `outcome`.
    pub fn swap(&self, outcome: SwapOutcome) {
        self.swaps.with_label_values(&[outcome.label()]).inc();
    }

    /// An ejection chain this host proposed, and the asked host accepted,
    /// ended with `outcome` (the swaps' outcomes: a chain is two moves too).
    pub fn chain(&self, outcome: SwapOutcome) {
        self.chains.with_label_values(&[outcome.label()]).inc();
    }

    /// A rotation this host proposed, and the asked hosts closed, ended
    /// with `outcome` (the swaps' outcomes; partial: one or two of its
    /// three moves made).
    pub fn rotation(&self, outcome: SwapOutcome) {
        self.rotations.with_label_values(&[outcome.label()]).inc();
    }

    /// A group move this host agreed ended with `outcome` (the swaps'
    /// outcomes; partial: some of its members moved).
    pub fn group_move(&self, outcome: SwapOutcome) {
        self.group_moves.with_label_values(&[outcome.label()]).inc();
    }

    /// This host answered a swap proposal; answers outside
    /// [`SWAP_ANSWERS`] are not counted (the label set stays fixed).
    pub fn swap_request(&self, answer: &str) {
        if SWAP_ANSWERS.contains(&answer) {
            self.swap_requests.with_label_values(&[answer]).inc();
        }
    }

    /// A peer datagram was dropped.
    pub fn rejected(&self, reason: RejectReason) {
        self.rejected.with_label_values(&[reason.label()]).inc();
    }

    // ---- cost -------------------------------------------------------------

    /// The communication cost and level of hosted VM `vm`; the host cost
    /// becomes the sum of the hosted VMs' costs. The series are removed
    /// at the next drain if `vm` is no longer hosted here.
    pub fn set_vm_cost(&self, vm: Ipv4Addr, cost: f64, level: u8) {
        let mut state = lock(&self.state);
        let l = vm.to_string();
        self.vm_cost.with_label_values(&[&l]).set(cost);
        self.vm_level.with_label_values(&[&l]).set(i64::from(level));
        state.labelled.insert(vm);
        state.costs.insert(vm, cost);
        self.host_cost.set(state.host_cost());
    }

    /// Overrides the host's total cost (normally the sum that
    /// [`Metrics::set_vm_cost`] keeps) until the next VM cost or drain.
    pub fn set_host_cost(&self, cost: f64) {
        self.host_cost.set(cost);
    }

    /// Removes every series of `vm` now (it migrated away).
    pub fn forget_vm(&self, vm: Ipv4Addr) {
        let mut state = lock(&self.state);
        self.remove_vm_series(vm);
        state.traffic.remove(&vm);
        state.labelled.remove(&vm);
        state.costs.remove(&vm);
        self.host_cost.set(state.host_cost());
    }

    /// The traffic series of `vm`, made if absent.
    fn vm_traffic(&self, vm: Ipv4Addr) -> VmTraffic {
        let l = [vm.to_string()];
        VmTraffic {
            transmit_bytes: self.vm_transmit_bytes.with_label_values(&l),
            transmit_rate: self.vm_transmit_rate.with_label_values(&l),
            receive_bytes: self.vm_receive_bytes.with_label_values(&l),
            receive_rate: self.vm_receive_rate.with_label_values(&l),
        }
    }

    /// Removes the series of `vm` from the registry; the caller forgets
    /// its cached [`VmTraffic`] too.
    fn remove_vm_series(&self, vm: Ipv4Addr) {
        let l = [vm.to_string()];
        // Absent series are fine: a VM may have traffic but no cost yet.
        let _ = self.vm_transmit_bytes.remove_label_values(&l);
        let _ = self.vm_receive_bytes.remove_label_values(&l);
        let _ = self.vm_transmit_rate.remove_label_values(&l);
        let _ = self.vm_receive_rate.remove_label_values(&l);
        let _ = self.vm_cost.remove_label_values(&l);
        let _ = self.vm_level.remove_label_values(&l);
    }

    // ---- datapath ---------------------------------------------------------

    /// The capacity of the kernel flow map.
    pub fn set_flow_map_capacity(&self, flows_max: u32) {
        self.flow_map_capacity.set(i64::from(flows_max));
    }

    /// A drain failed.
    pub fn drain_failed(&self) {
        self.drain_failures.inc();
    }

    /// Starts folding one drain's pairs in (see [`DrainPairs`]); pairs
    /// whose first frame came before `since_ns` (CLOCK_MONOTONIC, when this
    /// agent started counting) are a baseline at first sight.
    pub fn drain_pairs(&self, since_ns: u64) -> DrainPairs {
        self.drain_pairs_aside(since_ns, STRAYS_MAX)
    }

    /// [`Metrics::drain_pairs`] putting at most `strays_max` pairs aside.
    fn drain_pairs_aside(&self, since_ns: u64, strays_max: usize) -> DrainPairs {
        let DrainBuffers {
            mut tx,
            mut rx,
            top,
            mut seeded,
            strays,
        } = std::mem::take(&mut *lock(&self.buffers));
        // The VMs hosted at the last drain (in order: the set is sorted).
        seeded.clear();
        seeded.extend(lock(&self.state).labelled.iter().map(|&vm| u32::from(vm)));
        for &vm in &seeded {
            tx.insert(vm, (0, 0.0));
            rx.insert(vm, (0, 0.0));
        }
        DrainPairs {
            since_ns,
            top_k: self.top_k,
            top,
            tx,
            rx,
            seeded,
            strays,
            strays_max,
            spilled: false,
            pairs: 0,
            floor: None,
        }
    }

    /// Folds one drain into the metrics: per-VM bytes and rates, the top-K
    /// pairs, the BPF counters, and how long the drain took.
    pub fn observe_drain(&self, sample: &DrainSample<'_>, took: Duration) {
        let mut pairs = self.drain_pairs(sample.since_ns);
        for p in sample.pairs {
            pairs.add(*p);
        }
        self.observe_drain_pairs(pairs, sample.hosted, sample.stats, sample.attached, took);
    }

    /// [`Metrics::observe_drain`] with the pairs folded in already.
    pub fn observe_drain_pairs(
        &self,
        mut pairs: DrainPairs,
        hosted: &[Ipv4Addr],
        stats: DatapathStats,
        attached: usize,
        took: Duration,
    ) {
        let mut state = lock(&self.state);
        let hosted: BTreeSet<Ipv4Addr> = hosted.iter().copied().collect();
        pairs.sum_new(&hosted);
        // Per hosted VM: the increments of its pairs since the last drain,
        // and the sum of their rates.
        let of = |sums: &AddrMap<(u64, f64)>, vm: &Ipv4Addr| {
            (*vm, sums.get(&u32::from(*vm)).copied().unwrap_or_default())
        };
        let gone: Vec<Ipv4Addr> = state.labelled.difference(&hosted).copied().collect();
        for vm in gone {
            self.remove_vm_series(vm);
            state.traffic.remove(&vm);
            state.costs.remove(&vm);
        }
        for vm in &hosted {
            let (_, (sent, sent_rate)) = of(&pairs.tx, vm);
            let (_, (received, received_rate)) = of(&pairs.rx, vm);
            let series = state
                .traffic
                .entry(*vm)
                .or_insert_with(|| self.vm_traffic(*vm));
            series.transmit_bytes.inc_by(sent);
            series.transmit_rate.set(sent_rate);
            series.receive_bytes.inc_by(received);
            series.receive_rate.set(received_rate);
        }
        state.labelled = hosted;
        self.host_cost.set(state.host_cost());
        self.vms_hosted.set(clamp_i64(state.labelled.len() as u64));

        pairs.keep_top();
        self.export_top_pairs(&pairs.top);

        // Kernel counters: increments since the last drain. The first
        // drain is the baseline (counters pinned by an earlier run are not
        // this run's events).
        let now = stats;
        let prev = state.last_stats.unwrap_or(now);
        let inc = |c: &IntCounter, new: u64, old: u64| {
            // A smaller value: the map was created again; all of it is new.
            c.inc_by(if new >= old { new - old } else { new });
        };
        inc(&self.flow_map_full, now.flows_map_full, prev.flows_map_full);
        inc(&self.vm_map_full, now.macs_map_full, prev.macs_map_full);
        inc(
            &self.uncounted_frames.with_label_values(&["not_ipv4"]),
            now.not_ipv4,
            prev.not_ipv4,
        );
        inc(
            &self.uncounted_frames.with_label_values(&["not_unicast"]),
            now.not_unicast,
            prev.not_unicast,
        );
        inc(
            &self.control_intercepted,
            now.control_intercepted,
            prev.control_intercepted,
        );
        inc(
            &self.control_ring_full,
            now.control_ring_full,
            prev.control_ring_full,
        );
        state.last_stats = Some(now);

        self.flow_map_entries.set(clamp_i64(pairs.pairs as u64));
        self.attached_interfaces.set(clamp_i64(attached as u64));
        self.drain_duration.observe(took.as_secs_f64());
        drop(state);

        // Keep the buffers for the next drain, unless a burst of
        // addresses left them far larger than this drain needed.
        let DrainPairs {
            mut tx,
            mut rx,
            mut top,
            seeded,
            mut strays,
            ..
        } = pairs;
        for sums in [&mut tx, &mut rx] {
            let used = sums.len();
            sums.clear();
            if sums.capacity() > 4 * used + 1024 {
                sums.shrink_to(2 * used);
            }
        }
        top.clear();
        strays.clear();
        *lock(&self.buffers) = DrainBuffers {
            tx,
            rx,
            top,
            seeded,
            strays,
        };
    }

    /// Replaces the top-K pairs with `top`, the busiest pairs in order
    /// (highest rate first, then most bytes, then lowest (src, dst)).
    fn export_top_pairs(&self, top: &[PairSample]) {
        let mut kept = lock(&self.top_pairs.top);
        kept.clear();
        kept.extend_from_slice(top);
    }
}

/// `score_top_pair_bytes_per_second` and `score_top_pair_bytes`: the
/// busiest pairs of the last drain, kept as a list and made into series
/// only when the metrics are gathered. The set changes at nearly every
/// drain, and making a series (its descriptor, label pairs and two
/// formatted addresses) cost more than the rest of a drain's metrics
/// together; a drain runs every few seconds, a scrape every 15 s or
/// never.
#[derive(Clone, Debug)]
struct TopPairs {
    rate: Opts,
    bytes: Opts,
    /// The two families' descriptors, for the registry.
    descs: Vec<prometheus::core::Desc>,
    top: std::sync::Arc<Mutex<Vec<PairSample>>>,
}

/// The labels of a top pair's series.
const PAIR_LABELS: [&str; 2] = ["src", "dst"];

impl TopPairs {
    fn new(rate: Opts, bytes: Opts) -> prometheus::Result<Self> {
        let mut descs = Vec::new();
        for opts in [&rate, &bytes] {
            let opts = opts
                .clone()
                .variable_labels(PAIR_LABELS.iter().map(|&l| l.to_owned()).collect());
            descs.push(prometheus::core::Describer::describe(&opts)?);
        }
        Ok(TopPairs {
            rate,
            bytes,
            descs,
            top: Default::default(),
        })
    }
}

impl prometheus::core::Collector for TopPairs {
    fn desc(&self) -> Vec<&prometheus::core::Desc> {
        self.descs.iter().collect()
    }

    /// The same families two labelled vectors filled at the drain would
    /// give: they are made here, from the list.
    fn collect(&self) -> Vec<prometheus::proto::MetricFamily> {
        let top = lock(&self.top).clone();
        let (Ok(rate), Ok(bytes)) = (
            GaugeVec::new(self.rate.clone(), &PAIR_LABELS),
            IntGaugeVec::new(self.bytes.clone(), &PAIR_LABELS),
        ) else {
            return Vec::new();
        };
        for p in &top {
            let l = [p.pair.0.to_string(), p.pair.1.to_string()];
            rate.with_label_values(&l).set(p.rate_bps);
            bytes.with_label_values(&l).set(clamp_i64(p.totals.bytes));
        }
        let mut families = prometheus::core::Collector::collect(&rate);
        families.extend(prometheus::core::Collector::collect(&bytes));
        families
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }

    fn pair(src: u8, dst: u8, bytes: u64, rate: f64) -> PairSample {
        PairSample {
            pair: (ip(src), ip(dst)),
            totals: Totals {
                bytes,
                packets: 1,
                first_seen_ns: 2_000,
                last_seen_ns: 3_000,
            },
            rate_bps: rate,
            previous: None,
        }
    }

    thread_local! {
        /// What a flow table would have had for each pair at the drain
        /// before, per `Metrics` (by address): pairs absent from a drain
        /// are forgotten, as the daemon's table evicts them.
        static PREVIOUS: std::cell::RefCell<HashMap<(usize, Pair), u64>> =
            std::cell::RefCell::new(HashMap::new());
    }

    fn drain(m: &Metrics, pairs: &[PairSample], hosted: &[Ipv4Addr], stats: DatapathStats) {
        let id = m as *const Metrics as usize;
        let pairs: Vec<PairSample> = PREVIOUS.with(|prev| {
            let mut prev = prev.borrow_mut();
            let pairs = pairs
                .iter()
                .map(|p| PairSample {
                    previous: prev.get(&(id, p.pair)).copied(),
                    ..*p
                })
                .collect();
            prev.retain(|(i, _), _| *i != id);
            for p in &pairs {
                let p: &PairSample = p;
                prev.insert((id, p.pair), p.totals.bytes);
            }
            pairs
        });
        let pairs = &pairs[..];
        m.observe_drain(
            &DrainSample {
                pairs,
                hosted,
                stats,
                attached: hosted.len(),
                since_ns: 1_000,
            },
            Duration::from_millis(3),
        );
    }

    /// The value of the sample line `series` (name and labels, exactly as
    /// rendered), if there is one.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.parse().unwrap())
    }

    #[test]
    fn names_follow_the_conventions() {
        let m = Metrics::new(3);
        let text = m.render();
        let mut types = 0;
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            types += 1;
            let mut it = line.split(' ').skip(2);
            let (name, kind) = (it.next().unwrap(), it.next().unwrap());
            assert!(name.starts_with("score_"), "{line}");
            assert_eq!(name.ends_with("_total"), kind == "counter", "{line}");
        }
        // Families without series yet (vector metrics with no label set)
        // are not rendered; the rest are.
        assert!(types >= 20, "{text}");
    }

    #[test]
    fn fixed_label_sets_start_at_zero() {
        let text = Metrics::new(3).render();
        for r in RejectReason::ALL {
            let s = format!("score_datagrams_rejected_total{{reason=\"{}\"}}", r.label());
            assert_eq!(value(&text, &s), Some(0.0), "{s}\n{text}");
        }
        for o in ["done", "failed", "advisory"] {
            let s = format!("score_migrations_total{{outcome=\"{o}\"}}");
            assert_eq!(value(&text, &s), Some(0.0), "{s}");
        }
        for o in ["done", "partial", "failed", "advisory"] {
            for name in [
                "score_swaps_total",
                "score_chains_total",
                "score_rotations_total",
                "score_group_moves_total",
            ] {
                let s = format!("{name}{{outcome=\"{o}\"}}");
                assert_eq!(value(&text, &s), Some(0.0), "{s}");
            }
        }
        for a in SWAP_ANSWERS {
            let s = format!("score_swap_requests_total{{answer=\"{a}\"}}");
            assert_eq!(value(&text, &s), Some(0.0), "{s}");
        }
    }

    #[test]
    fn swaps_are_counted_with_bounded_labels() {
        let m = Metrics::default();
        m.swap(SwapOutcome::Done);
        m.swap(SwapOutcome::from_label("partial").unwrap());
        m.chain(SwapOutcome::Failed);
        m.rotation(SwapOutcome::Partial);
        m.group_move(SwapOutcome::Done);
        assert_eq!(SwapOutcome::from_label("held"), None);
        for r in score_core::wire::SwapRefusal::ALL {
            assert!(SWAP_ANSWERS.contains(&r.name()), "{r:?}");
        }
        m.swap_request("accepted");
        m.swap_request("no_partner");
        m.swap_request("no_partner");
        m.swap_request("anything else");
        let t = m.render();
        assert_eq!(value(&t, "score_swaps_total{outcome=\"done\"}"), Some(1.0));
        assert_eq!(
            value(&t, "score_swaps_total{outcome=\"partial\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "score_chains_total{outcome=\"failed\"}"),
            Some(1.0)
        );
        assert_eq!(value(&t, "score_chains_total{outcome=\"done\"}"), Some(0.0));
        assert_eq!(
            value(&t, "score_rotations_total{outcome=\"partial\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "score_rotations_total{outcome=\"done\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "score_group_moves_total{outcome=\"done\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "score_swap_requests_total{answer=\"no_partner\"}"),
            Some(2.0)
        );
        assert_eq!(
            t.matches("score_swap_requests_total{").count(),
            SWAP_ANSWERS.len()
        );
    }

    #[test]
    fn token_and_decision_events_are_counted() {
        let m = Metrics::default();
        m.token_received();
        m.token_received();
        m.token_passed();
        m.token_retransmitted();
        m.token_retransmitted();
        m.token_retransmitted();
        m.token_lost();
        m.token_regenerated();
        m.set_token_epoch(7);
        m.set_token_round(3);
        m.decision_evaluated();
        m.migration(MigrationOutcome::Done);
        m.migration(MigrationOutcome::Advisory);
        m.migration(MigrationOutcome::Advisory);
        m.observe_benefit(2500.0);
        m.observe_benefit(f64::NAN);
        m.rejected(RejectReason::BadMac);
        m.rejected(RejectReason::from_label("replayed"));
        m.rejected(RejectReason::from_label("bad_body"));
        let t = m.render();
        assert_eq!(value(&t, "score_token_received_total"), Some(2.0));
        assert_eq!(value(&t, "score_token_passed_total"), Some(1.0));
        assert_eq!(value(&t, "score_token_retransmitted_total"), Some(3.0));
        assert_eq!(value(&t, "score_token_lost_total"), Some(1.0));
        assert_eq!(value(&t, "score_token_regenerated_total"), Some(1.0));
        assert_eq!(value(&t, "score_token_epoch"), Some(7.0));
        assert_eq!(value(&t, "score_token_round"), Some(3.0));
        assert_eq!(value(&t, "score_decisions_evaluated_total"), Some(1.0));
        assert_eq!(
            value(&t, "score_migrations_total{outcome=\"done\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&t, "score_migrations_total{outcome=\"advisory\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&t, "score_migrations_total{outcome=\"failed\"}"),
            Some(0.0)
        );
        // NaN is not observed: one observation, in the 1e4 bucket.
        assert_eq!(value(&t, "score_migration_benefit_count"), Some(1.0));
        assert_eq!(value(&t, "score_migration_benefit_sum"), Some(2500.0));
        assert_eq!(
            value(&t, "score_migration_benefit_bucket{le=\"1000\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "score_migration_benefit_bucket{le=\"10000\"}"),
            Some(1.0)
        );
        for (reason, n) in [("bad_mac", 1.0), ("replayed", 1.0), ("other", 1.0)] {
            let s = format!("score_datagrams_rejected_total{{reason=\"{reason}\"}}");
            assert_eq!(value(&t, &s), Some(n), "{s}");
        }
    }

    #[test]
    fn migration_durations_fill_their_buckets() {
        let m = Metrics::default();
        // Rendered before the first migration, so rate() sees the first.
        let t = m.render();
        assert_eq!(
            value(&t, "score_migration_duration_seconds_count"),
            Some(0.0)
        );
        // A namespace move, a fast and a slow live migration (all three
        // exact in binary, so the sum is exact).
        m.observe_migration_duration(Duration::from_micros(31_250));
        m.observe_migration_duration(Duration::from_millis(3_500));
        m.observe_migration_duration(Duration::from_secs(45));
        let t = m.render();
        assert_eq!(
            value(&t, "score_migration_duration_seconds_count"),
            Some(3.0)
        );
        assert_eq!(
            value(&t, "score_migration_duration_seconds_sum"),
            Some(48.53125)
        );
        for (le, n) in [
            ("0.05", 1.0),
            ("0.1", 1.0),
            ("2.5", 1.0),
            ("5", 2.0),
            ("30", 2.0),
            ("60", 3.0),
            ("120", 3.0),
            ("+Inf", 3.0),
        ] {
            let s = format!("score_migration_duration_seconds_bucket{{le=\"{le}\"}}");
            assert_eq!(value(&t, &s), Some(n), "{s}\n{t}");
        }
        // Counting an outcome does not observe a duration.
        m.migration(MigrationOutcome::Failed);
        assert_eq!(
            value(&m.render(), "score_migration_duration_seconds_count"),
            Some(3.0)
        );
    }

    #[test]
    fn vm_bytes_count_increments_of_hosted_vms_only() {
        let m = Metrics::new(10);
        let hosted = [ip(1), ip(2)];
        // 1 -> 2 both hosted; 1 -> 9 and 9 -> 2 with a peer elsewhere.
        drain(
            &m,
            &[
                pair(1, 2, 1000, 100.0),
                pair(1, 9, 300, 30.0),
                pair(9, 2, 50, 5.0),
            ],
            &hosted,
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}"),
            Some(1300.0)
        );
        assert_eq!(
            value(&t, "score_vm_receive_bytes_total{vm=\"198.18.0.2\"}"),
            Some(1050.0)
        );
        assert_eq!(
            value(&t, "score_vm_receive_bytes_total{vm=\"198.18.0.1\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_per_second{vm=\"198.18.0.1\"}"),
            Some(130.0)
        );
        assert!(!t.contains("vm=\"198.18.0.9\""), "{t}");
        assert_eq!(value(&t, "score_vms_hosted"), Some(2.0));

        // Next drain: 1 -> 2 grew by 500, 1 -> 9 was evicted and came back
        // with 40 bytes (all new), 9 -> 2 unchanged.
        drain(
            &m,
            &[
                pair(1, 2, 1500, 100.0),
                pair(1, 9, 40, 30.0),
                pair(9, 2, 50, 0.0),
            ],
            &hosted,
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}"),
            Some(1300.0 + 540.0)
        );
        assert_eq!(
            value(&t, "score_vm_receive_bytes_total{vm=\"198.18.0.2\"}"),
            Some(1550.0)
        );

        // 1 -> 9 evicted (absent from a drain), then back with 100 bytes:
        // all 100 are new.
        drain(
            &m,
            &[pair(1, 2, 1500, 0.0)],
            &hosted,
            DatapathStats::default(),
        );
        drain(
            &m,
            &[pair(1, 2, 1500, 0.0), pair(1, 9, 100, 1.0)],
            &hosted,
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}"),
            Some(1840.0 + 100.0)
        );
    }

    /// A VM learnt since the drain before (not among the sums the drain
    /// starts with) has its bytes of the drain that first sees it hosted
    /// counted, from the pairs put aside.
    #[test]
    fn a_vm_hosted_since_the_drain_before_counts_that_drains_bytes() {
        let m = Metrics::new(10);
        drain(
            &m,
            &[pair(1, 9, 100, 1.0), pair(2, 9, 40, 4.0)],
            &[ip(1)],
            DatapathStats::default(),
        );
        // 2 is hosted now: its 60 new bytes to 9, and 9's 25 to it.
        drain(
            &m,
            &[
                pair(1, 9, 100, 1.0),
                pair(2, 9, 100, 6.0),
                pair(9, 2, 25, 2.0),
            ],
            &[ip(1), ip(2)],
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.2\"}"),
            Some(60.0)
        );
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_per_second{vm=\"198.18.0.2\"}"),
            Some(6.0)
        );
        assert_eq!(
            value(&t, "score_vm_receive_bytes_total{vm=\"198.18.0.2\"}"),
            Some(25.0)
        );
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}"),
            Some(100.0)
        );
    }

    /// Summing for the VMs hosted at the drain before, with the rest put
    /// aside (or summed for every address past the limit), gives each VM
    /// hosted now the sums of summing every address: whichever VMs came
    /// or went, and wherever the limit falls.
    #[test]
    fn sums_of_hosted_vms_match_summing_every_address() {
        let addr = |i: u64| ip(1 + (i % 12) as u8);
        let mut x: u64 = 7;
        let mut next = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let samples: Vec<PairSample> = (0..200)
            .map(|_| {
                let (s, d) = (addr(next()), addr(next()));
                let mut p = pair(0, 0, 10 + next() % 1000, (next() % 50) as f64);
                p.pair = (s, d);
                p.previous = match next() % 3 {
                    0 => None,
                    _ => Some(next() % 500),
                };
                if next() % 4 == 0 {
                    p.rate_bps = 0.0;
                }
                p
            })
            .collect();
        let set = |v: &[u8]| -> Vec<Ipv4Addr> { v.iter().map(|&i| ip(i)).collect() };
        let cases = [
            (set(&[]), set(&[1, 2, 3])),
            (set(&[1, 2]), set(&[1, 2])),
            (set(&[1, 2]), set(&[1, 2, 5, 7])),
            (set(&[1, 2, 5, 7]), set(&[2, 7])),
            (set(&[3, 4]), set(&[8, 9, 12])),
        ];
        for strays_max in [0, 1, 17, 10_000] {
            for (before, now) in &cases {
                let m = Metrics::new(5);
                m.observe_drain_pairs(
                    m.drain_pairs(1_000),
                    before,
                    DatapathStats::default(),
                    0,
                    Duration::ZERO,
                );
                let mut d = m.drain_pairs_aside(1_000, strays_max);
                // Every address summed: the sums before this change.
                let mut want: HashMap<(bool, Ipv4Addr), (u64, f64)> = HashMap::new();
                for p in &samples {
                    let bytes = p.totals.bytes;
                    let delta = match p.previous {
                        Some(b) if b <= bytes => bytes - b,
                        Some(_) => bytes,
                        None => bytes,
                    };
                    if p.pair.0 != p.pair.1 && (delta != 0 || p.rate_bps != 0.0) {
                        for key in [(true, p.pair.0), (false, p.pair.1)] {
                            let w = want.entry(key).or_default();
                            w.0 += delta;
                            w.1 += p.rate_bps;
                        }
                    }
                    d.add(*p);
                }
                d.sum_new(&now.iter().copied().collect());
                for vm in now {
                    for (tx, sums) in [(true, &d.tx), (false, &d.rx)] {
                        assert_eq!(
                            sums.get(&u32::from(*vm)).copied().unwrap_or_default(),
                            want.get(&(tx, *vm)).copied().unwrap_or_default(),
                            "vm {vm} tx {tx}, before {before:?}, now {now:?}, at most {strays_max} aside"
                        );
                    }
                }
                // Both ways were taken: put aside, and past the limit.
                assert_eq!(d.spilled, strays_max < 10_000);
            }
        }
    }

    #[test]
    fn bytes_from_before_the_agent_started_are_a_baseline() {
        let m = Metrics::new(10);
        let mut old = pair(1, 2, 1_000_000, 0.0);
        old.totals.first_seen_ns = 10; // before since_ns = 1000
        drain(&m, &[old], &[ip(1)], DatapathStats::default());
        old.totals.bytes += 700;
        drain(&m, &[old], &[ip(1)], DatapathStats::default());
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}"),
            Some(700.0)
        );
        // The pair's own gauge shows the kernel's whole count.
        assert_eq!(
            value(
                &t,
                "score_top_pair_bytes{dst=\"198.18.0.2\",src=\"198.18.0.1\"}"
            ),
            Some(1_000_700.0)
        );
    }

    #[test]
    fn a_vm_that_leaves_loses_its_series() {
        let m = Metrics::new(10);
        m.set_vm_cost(ip(1), 42.5, 3);
        m.set_vm_cost(ip(2), 1.0, 1);
        m.set_vm_cost(ip(2), 1.5, 1); // a later decision replaces it
        drain(
            &m,
            &[pair(1, 2, 10, 1.0)],
            &[ip(1), ip(2)],
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(
            value(&t, "score_vm_communication_cost{vm=\"198.18.0.1\"}"),
            Some(42.5)
        );
        assert_eq!(
            value(&t, "score_vm_communication_level{vm=\"198.18.0.1\"}"),
            Some(3.0)
        );
        assert_eq!(value(&t, "score_host_communication_cost"), Some(44.0));
        // VM 2 migrated away: gone at the next drain, and from the sum.
        drain(
            &m,
            &[pair(1, 2, 20, 1.0)],
            &[ip(1)],
            DatapathStats::default(),
        );
        let t = m.render();
        assert!(!t.contains("vm=\"198.18.0.2\""), "{t}");
        assert!(t.contains("vm=\"198.18.0.1\""), "{t}");
        assert_eq!(value(&t, "score_host_communication_cost"), Some(42.5));
        // And forget_vm removes at once.
        m.forget_vm(ip(1));
        let t = m.render();
        assert!(!t.contains("vm=\"198.18.0.1\""), "{t}");
        assert_eq!(value(&t, "score_host_communication_cost"), Some(0.0));
        m.set_host_cost(7.0);
        assert_eq!(
            value(&m.render(), "score_host_communication_cost"),
            Some(7.0)
        );
    }

    /// A drain updates a hosted VM's traffic series through handles kept
    /// from the drain before; once the series are removed (the VM left, or
    /// was forgotten) the handles go too, and the VM's next drain counts
    /// into series the registry shows, from that drain's bytes.
    #[test]
    fn a_vm_whose_series_were_removed_counts_again_at_its_next_drain() {
        let m = Metrics::new(10);
        let tx = |m: &Metrics| {
            value(
                &m.render(),
                "score_vm_transmit_bytes_total{vm=\"198.18.0.1\"}",
            )
        };
        let both = [ip(1), ip(2)];
        let stats = DatapathStats::default();
        drain(&m, &[pair(1, 2, 1000, 10.0)], &both, stats);
        assert_eq!(tx(&m), Some(1000.0));
        // Forgotten (migrated away), then hosted again.
        m.forget_vm(ip(1));
        assert_eq!(tx(&m), None);
        drain(&m, &[pair(1, 2, 1500, 10.0)], &both, stats);
        assert_eq!(tx(&m), Some(500.0));
        // Not hosted at one drain, then hosted again.
        drain(&m, &[pair(1, 2, 1600, 10.0)], &[ip(2)], stats);
        assert_eq!(tx(&m), None);
        drain(&m, &[pair(1, 2, 1800, 10.0)], &both, stats);
        assert_eq!(tx(&m), Some(200.0));
        drain(&m, &[pair(1, 2, 1850, 10.0)], &both, stats);
        assert_eq!(tx(&m), Some(250.0));
    }

    /// The top pairs, kept as a list and made into series when gathered,
    /// render exactly as two labelled vectors filled at the drain did:
    /// names, help, type, labels, values (bytes clamped), order.
    #[test]
    fn top_pairs_render_as_labelled_vectors_filled_at_the_drain() {
        let rate_opts = Opts::new("score_top_pair_bytes_per_second", "Rate help.");
        let bytes_opts = Opts::new("score_top_pair_bytes", "Bytes help.");
        let sample = |src: u8, dst: u8, bytes: u64, rate: f64| PairSample {
            pair: (ip(src), ip(dst)),
            totals: Totals {
                bytes,
                ..Totals::default()
            },
            rate_bps: rate,
            previous: None,
        };
        let sets = [
            vec![],
            vec![sample(1, 2, 10, 0.5)],
            vec![
                sample(9, 2, 7, 1e9 / 3.0),
                sample(1, 20, u64::MAX, 2.25),
                sample(1, 3, 0, 0.0),
                sample(10, 1, 123_456_789, 1e-7),
            ],
        ];
        let text = |r: &Registry| {
            let mut out = String::new();
            TextEncoder::new()
                .encode_utf8(&r.gather(), &mut out)
                .unwrap();
            out
        };
        for top in sets {
            let ours = TopPairs::new(rate_opts.clone(), bytes_opts.clone()).unwrap();
            let r = Registry::new();
            r.register(Box::new(ours.clone())).unwrap();
            *lock(&ours.top) = top.clone();

            let rate = GaugeVec::new(rate_opts.clone(), &["src", "dst"]).unwrap();
            let bytes = IntGaugeVec::new(bytes_opts.clone(), &["src", "dst"]).unwrap();
            let want = Registry::new();
            want.register(Box::new(rate.clone())).unwrap();
            want.register(Box::new(bytes.clone())).unwrap();
            for p in &top {
                let l = [p.pair.0.to_string(), p.pair.1.to_string()];
                rate.with_label_values(&l).set(p.rate_bps);
                bytes.with_label_values(&l).set(clamp_i64(p.totals.bytes));
            }
            assert_eq!(text(&r), text(&want), "{top:?}");
            assert_eq!(text(&r).is_empty(), top.is_empty());
        }
    }

    #[test]
    fn top_k_pairs_are_the_busiest_and_replaced_each_drain() {
        let m = Metrics::new(2);
        let hosted = [ip(1)];
        drain(
            &m,
            &[
                pair(1, 2, 10, 5.0),
                pair(1, 3, 20, 50.0),
                pair(1, 4, 30, 500.0),
                pair(1, 5, 40, 50.0),
            ],
            &hosted,
            DatapathStats::default(),
        );
        let t = m.render();
        let s = |d: u8| {
            format!("score_top_pair_bytes_per_second{{dst=\"198.18.0.{d}\",src=\"198.18.0.1\"}}")
        };
        assert_eq!(value(&t, &s(4)), Some(500.0), "{t}");
        // Tie at 50 B/s broken by bytes: .5 (40 B) before .3 (20 B).
        assert_eq!(value(&t, &s(5)), Some(50.0), "{t}");
        assert_eq!(value(&t, &s(3)), None, "{t}");
        assert_eq!(value(&t, &s(2)), None, "{t}");
        assert_eq!(t.matches("score_top_pair_bytes{").count(), 2, "{t}");

        drain(
            &m,
            &[pair(1, 2, 11, 1.0)],
            &hosted,
            DatapathStats::default(),
        );
        let t = m.render();
        assert_eq!(value(&t, &s(2)), Some(1.0), "{t}");
        assert_eq!(value(&t, &s(4)), None, "{t}");

        let none = Metrics::new(0);
        drain(
            &none,
            &[pair(1, 2, 1, 1.0)],
            &hosted,
            DatapathStats::default(),
        );
        assert!(!none.render().contains("score_top_pair_bytes{"));
    }

    /// The candidates cut back to K with a floor as pairs come in keep
    /// exactly the K busiest of all, in order, with ties broken as a full
    /// sort breaks them.
    #[test]
    fn the_top_k_of_many_pairs_is_that_of_a_full_sort() {
        let m = Metrics::new(5);
        let all: Vec<PairSample> = (0..500u32)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761) % 97;
                PairSample {
                    pair: (ip(1 + (i % 7) as u8), ip(100 + (i % 150) as u8)),
                    totals: Totals {
                        bytes: u64::from(x % 5),
                        packets: 1,
                        first_seen_ns: 2_000,
                        last_seen_ns: 3_000,
                    },
                    rate_bps: f64::from(x / 3),
                    previous: None,
                }
            })
            .collect();
        let mut pairs = m.drain_pairs(1_000);
        for p in &all {
            pairs.add(*p);
        }
        pairs.keep_top();
        let mut want = all.clone();
        want.sort_by(busiest_first);
        want.truncate(5);
        assert_eq!(pairs.top, want);
    }

    #[test]
    fn kernel_counters_advance_by_increments_after_a_baseline() {
        let m = Metrics::new(1);
        let stats = |full: u64, ipv6: u64| DatapathStats {
            flows_map_full: full,
            not_ipv4: ipv6,
            ..Default::default()
        };
        m.set_flow_map_capacity(4096);
        // Pinned counters from an earlier run: a baseline, not events.
        drain(&m, &[pair(1, 2, 1, 1.0)], &[ip(1)], stats(100, 7));
        drain(&m, &[pair(1, 2, 1, 1.0)], &[ip(1)], stats(104, 9));
        // The map was recreated: its counter restarted at 3.
        drain(&m, &[pair(1, 2, 1, 1.0)], &[ip(1)], stats(3, 9));
        m.drain_failed();
        let t = m.render();
        assert_eq!(value(&t, "score_bpf_flow_map_full_total"), Some(7.0));
        assert_eq!(
            value(&t, "score_bpf_uncounted_frames_total{reason=\"not_ipv4\"}"),
            Some(2.0)
        );
        assert_eq!(value(&t, "score_bpf_flow_map_entries"), Some(1.0));
        assert_eq!(value(&t, "score_bpf_flow_map_capacity"), Some(4096.0));
        assert_eq!(value(&t, "score_bpf_attached_interfaces"), Some(1.0));
        assert_eq!(value(&t, "score_drain_duration_seconds_count"), Some(3.0));
        assert_eq!(
            value(&t, "score_drain_duration_seconds_bucket{le=\"0.0025\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&t, "score_drain_duration_seconds_bucket{le=\"0.005\"}"),
            Some(3.0)
        );
        assert_eq!(value(&t, "score_drain_failures_total"), Some(1.0));
    }

    #[test]
    fn config_defaults() {
        let c: MetricsConfig = toml::from_str("").unwrap();
        assert_eq!(c, MetricsConfig::default());
        assert_eq!(c.top_k, DEFAULT_TOP_K);
        assert!(toml::from_str::<MetricsConfig>("topk = 3").is_err());
    }
}
