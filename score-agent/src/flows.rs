//! The agent's flow table: the kernel's cumulative per-pair counters,
//! sampled at every drain, turned into rates averaged over a window (the
//! paper's λ, §III-F and §IV-B), with idle pairs evicted.
//!
//! Time is CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns`
//! reads, so the kernel's stamps and drain times compare directly. Callers
//! pass the time in; nothing here reads a clock. The classifiers stamp only
//! a pair's creation, not every frame: a pair is active at the drains that
//! see its counters move, and idle eviction counts from the last of those.
//!
//! # What "rate over the window" means here
//!
//! The table keeps a few samples: the times of recent drains, in one ring
//! of [`WINDOW_BUCKETS`] + 2 slots shared by every pair, and per pair its
//! cumulative bytes at the newest and the bytes sent between each two of
//! them (as `f32`: 40 bytes). Time is cut into buckets of
//! `window / WINDOW_BUCKETS` (rounded up); the ring holds the latest drain
//! of each bucket, and the anchor: the newest drain at or before
//! `now - window`. A pair's rate is the bytes between the anchor and the
//! newest sample divided by the time between them. So:
//!
//! - once a pair is older than the window, the rate averages over a span of
//!   at least `window` and less than `window` + one bucket + one drain
//!   interval (the anchor is the last drain of its bucket);
//! - when the drain interval is at least one bucket (e.g. 1 s drains with
//!   a window of 8 s or less), every drain is its own bucket and the span is
//!   exactly what a full list of samples would give: the newest drain at or
//!   before `now - window`;
//! - a pair born while the agent watched had zero bytes before its first
//!   frame (kernel first-seen stamp). Once the agent has watched a whole
//!   window, that zero sits at the anchor, as every other pair's bytes
//!   do: a new pair's rate ramps up over one window, as the paper's
//!   average over the window does. Before that (the first window after
//!   a start, and always for `watch`, whose window is endless) it counts
//!   from its first frame, so the first drains give rates at all. Counting
//!   from the first frame for good made a migrated VM's new pairs read
//!   several times their rate for a second: the frames its peers queued
//!   while it moved (neighbour resolution) arrive at once, just after the
//!   first-seen stamp, and a VM could be sent straight back
//!   (docs/EVALUATION.md, "A migrated VM's new pairs read too high");
//! - a pair that predates the agent (pinned counters of an earlier run)
//!   has a rate from its second sample in a later bucket (so does one
//!   whose counters restarted);
//! - a pair missing from a drain (its kernel entry gone) adds no sample
//!   there; if it comes back, the drains it missed count as drains without
//!   traffic. Once its samples have left the window, its rate is 0.
//!
//! Every drain samples every pair at the same time, so the times are kept
//! once for the table, not once per pair.
//!
//! # Layout: one sorted array, no hashing per drain
//!
//! The pairs sit in one `Vec`, sorted by a [`PairOrder`]: the pair's group
//! of candidate counter slots in the kernel's slot array, then its key. The
//! datapath hands a drain over in that same order (it reads the slots in
//! memory order), so a drain is a merge of two sorted sequences: each
//! pair's entry is the next one, or close to it, and the table is walked
//! once, front to back, with no hash lookup. Looking one pair up
//! ([`FlowTable::rate`]) is a binary search. A pair's entry is 88 bytes
//! ([`FlowTable::ENTRY_BYTES`]) and the table keeps nothing else per pair
//! (docs/BENCHMARKS.md, "The agent's memory per pair").
//!
//! This replaced a hash map of 200-byte entries, each with its own ring of
//! `(time, bytes)` samples (before that, a `VecDeque` of every drain's
//! sample: 0.5-1 KiB per pair).

use std::{collections::HashMap, net::Ipv4Addr};

use score_common::{PairKey, SLOT_WAYS, slot_index};
use serde::Serialize;

/// Buckets the rate window is cut into: the ring keeps one sample per
/// bucket, so the averaging span is the window plus at most one bucket
/// (12.5%) and one drain interval.
pub const WINDOW_BUCKETS: u64 = 8;

/// Slots of the ring of sample times: one per bucket the window touches
/// (the window spans at most `WINDOW_BUCKETS` + 1 buckets) plus the anchor.
const RING: usize = WINDOW_BUCKETS as usize + 2;

/// A pair's `birth_ns` when it has no first-frame anchor.
const NO_BIRTH: u64 = u64::MAX;

/// One directed VM pair, host-order addresses.
pub type Pair = (Ipv4Addr, Ipv4Addr);

/// The kernel's key of a pair: both addresses in network order.
pub fn pair_key(pair: &Pair) -> PairKey {
    PairKey {
        src: u32::from(pair.0).to_be(),
        dst: u32::from(pair.1).to_be(),
    }
}

/// Cumulative counters of one directed pair, summed over CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    /// Bytes counted (Ethernet header + IP packet).
    pub bytes: u64,
    /// Frames counted.
    pub packets: u64,
    /// Monotonic ns of the first frame (0: unknown).
    pub first_seen_ns: u64,
    /// Monotonic ns of the latest frame.
    pub last_seen_ns: u64,
}

impl Totals {
    /// Folds per-CPU values into one: sums, earliest first, latest last.
    pub fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a score_common::PairCounters>) -> Self {
        let mut t = Totals::default();
        for c in per_cpu {
            t.bytes += c.bytes;
            t.packets += c.packets;
            if c.first_seen_ns != 0 && (t.first_seen_ns == 0 || c.first_seen_ns < t.first_seen_ns) {
                t.first_seen_ns = c.first_seen_ns;
            }
            t.last_seen_ns = t.last_seen_ns.max(c.last_seen_ns);
        }
        t
    }
}

/// A pair as the rest of the agent sees it.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct FlowView {
    /// Source VM address.
    pub src: Ipv4Addr,
    /// Destination VM address.
    pub dst: Ipv4Addr,
    /// Bytes counted since the kernel first saw the pair.
    pub bytes: u64,
    /// Frames counted since the kernel first saw the pair.
    pub packets: u64,
    /// Average rate over the window, bytes per second.
    pub rate_bps: f64,
}

/// The order the flow table keeps its pairs in, and the order the datapath
/// hands a drain over in: first the pair's group of adjacent slots in the
/// kernel's slot array (`score_common::slot_index` of its key divided by
/// `SLOT_WAYS`: a pair sits in one of the group's slots), then its key as
/// one word. A pure
/// function of the pair and the slot array's size, so the two sides agree
/// without telling each other anything per pair. With a mask of 0 (the
/// default) it is the keys' order.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairOrder {
    mask: u32,
}

impl PairOrder {
    /// The order of a slot array of `mask + 1` slots.
    pub fn new(mask: u32) -> Self {
        PairOrder { mask }
    }

    /// Where `pair` sorts.
    pub fn of(&self, pair: &Pair) -> u128 {
        self.of_key(&pair_key(pair))
    }

    /// Where the pair of kernel key `key` sorts.
    pub fn of_key(&self, key: &PairKey) -> u128 {
        let group = slot_index(key, self.mask) / SLOT_WAYS;
        (u128::from(group) << 64) | u128::from(key.word())
    }
}

/// One pair's state: 88 bytes, inline in the table's array.
#[derive(Clone, Copy, Debug)]
struct Entry {
    pair: Pair,
    packets: u64,
    /// Cumulative bytes at the newest sample (`last`), exact: what the
    /// next drain's counters are compared with.
    bytes: u64,
    /// When the pair was last known to send: the drain that saw its bytes
    /// move (the classifiers do not stamp every frame), or the kernel's
    /// stamp if later.
    active_ns: u64,
    /// The kernel's first-frame stamp, before which the pair had zero
    /// bytes (see [`FlowTable::birth_anchor`]); [`NO_BIRTH`]: none.
    birth_ns: u64,
    /// Generations (drain numbers) of the pair's first and newest samples:
    /// the samples are valid for every `g` from `first` (or
    /// `last - RING + 1`) to `last`.
    first: u32,
    last: u32,
    /// Bytes sent since the sample before, at `g % RING` for each valid
    /// sample `g` but the oldest: an older sample is `bytes` less the steps
    /// after it. As `f32`, half the size of a cumulative `u64`: a step is
    /// exact up to 16 MiB and within 6e-8 of itself above, far inside what
    /// a rate averaged over the window needs, and the steps are never
    /// negative (a counter that went back restarts the history).
    steps: [f32; RING],
}

impl Entry {
    const EMPTY: Entry = Entry {
        pair: (Ipv4Addr::UNSPECIFIED, Ipv4Addr::UNSPECIFIED),
        packets: 0,
        bytes: 0,
        active_ns: 0,
        birth_ns: NO_BIRTH,
        first: 0,
        last: 0,
        steps: [0.0; RING],
    };

    fn newest_bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes sent between sample `g` (valid) and the newest: the steps
    /// of samples `g + 1` to `last`, summed in that order. (Walked along
    /// the ring rather than with one division per step: a drain computes
    /// this for every pair.)
    fn sent_since(&self, g: u32) -> f64 {
        let mut at = (g as usize + 1) % RING;
        let mut sent = 0.0;
        for _ in g..self.last {
            sent += f64::from(self.steps[at]);
            at += 1;
            if at == RING {
                at = 0;
            }
        }
        sent
    }
}

/// The time between two samples in seconds, as last computed: the same
/// expression for the same times, so a rate is the same to the bit.
#[derive(Clone, Copy, Debug, Default)]
struct Span {
    t0: u64,
    t1: u64,
    seconds: f64,
}

impl Span {
    /// `(t1 - t0)` ns in seconds; `t1 > t0`.
    fn seconds(&mut self, t0: u64, t1: u64) -> f64 {
        if (self.t0, self.t1) != (t0, t1) {
            *self = Span {
                t0,
                t1,
                seconds: (t1 - t0) as f64 / 1e9,
            };
        }
        self.seconds
    }
}

/// Windowed rates per directed pair.
#[derive(Debug)]
pub struct FlowTable {
    window_ns: u64,
    bucket_ns: u64,
    idle_ns: u64,
    started_ns: u64,
    order: PairOrder,
    /// Every pair, sorted by `order`.
    entries: Vec<Entry>,
    /// Drain times by generation, at `generation % RING`: valid from
    /// `head` to `newest`.
    times: [u64; RING],
    /// The oldest generation still needed (the anchor) and the newest; 0
    /// before the first drain.
    head: u32,
    newest: u32,
    /// `now - window` at the newest drain.
    horizon: u64,
    /// Pairs new at a drain that sort before pairs already there, merged
    /// into `entries` when the drain ends.
    fresh: Vec<Entry>,
}

impl FlowTable {
    /// A table averaging over `window_ns` and evicting pairs idle for
    /// `idle_ns`; `now_ns` is when the agent started counting. Pairs are
    /// kept in the keys' order until [`FlowTable::set_order`].
    pub fn new(window_ns: u64, idle_ns: u64, now_ns: u64) -> Self {
        FlowTable {
            window_ns,
            bucket_ns: window_ns.div_ceil(WINDOW_BUCKETS).max(1),
            idle_ns,
            started_ns: now_ns,
            order: PairOrder::default(),
            entries: Vec::new(),
            times: [0; RING],
            head: 0,
            newest: 0,
            horizon: 0,
            fresh: Vec::new(),
        }
    }

    /// Keeps the pairs in `order` from now on: the order the datapath's
    /// drains come in ([`crate::datapath::Datapath::pair_order`]), so that
    /// a drain walks the table once with no lookups.
    pub fn set_order(&mut self, order: PairOrder) {
        self.order = order;
        self.entries.sort_by_cached_key(|e| order.of(&e.pair));
    }

    /// The order the pairs are kept in.
    pub fn order(&self) -> PairOrder {
        self.order
    }

    /// Folds one drain of the kernel map, taken at `now_ns`, into the table.
    pub fn update(&mut self, now_ns: u64, snapshot: impl IntoIterator<Item = (Pair, Totals)>) {
        self.update_each(now_ns, snapshot, |_, _, _, _| {});
    }

    /// [`FlowTable::update`], calling `seen(pair, totals, rate, previous)`
    /// for each pair with its new rate and the bytes the table had for it
    /// before this drain (None: a pair new to the table). Fastest when the
    /// snapshot comes in the table's order ([`FlowTable::order`]); any
    /// other order costs a binary search per pair out of order.
    pub fn update_each<I, F>(&mut self, now_ns: u64, snapshot: I, mut seen: F)
    where
        I: IntoIterator<Item = (Pair, Totals)>,
        F: FnMut(Pair, Totals, f64, Option<u64>),
    {
        let mut drain = self.drain(now_ns);
        for (pair, totals) in snapshot {
            let (rate, previous) = drain.push(pair, totals);
            seen(pair, totals, rate, previous);
        }
    }

    /// Starts the drain taken at `now_ns`: push each pair's counters into
    /// the returned [`Drain`]; the drain ends when it is dropped.
    pub fn drain(&mut self, now_ns: u64) -> Drain<'_> {
        let generation = self.advance(now_ns);
        let fresh = std::mem::take(&mut self.fresh);
        Drain {
            table: self,
            now_ns,
            generation,
            cursor: 0,
            cursor_order: None,
            last_order: None,
            fresh,
            span: Span::default(),
        }
    }

    /// Moves the ring of sample times to a drain at `now`: drops anchors
    /// older than needed, then either replaces the newest sample (same
    /// bucket) or starts a new one. Returns the generation this drain's
    /// samples go to.
    fn advance(&mut self, now: u64) -> u32 {
        self.horizon = now.saturating_sub(self.window_ns);
        if self.newest == 0 {
            (self.head, self.newest) = (1, 1);
            self.times[1] = now;
            return 1;
        }
        while self.head < self.newest && self.time(self.head + 1) <= self.horizon {
            self.head += 1;
        }
        // The newest sample is replaced even when it is the only one: a
        // pair's own first-frame anchor comes before it, so for every pair
        // born while the agent watched it is not the anchor.
        if self.time(self.newest) / self.bucket_ns == now / self.bucket_ns {
            self.times[self.newest as usize % RING] = now;
            return self.newest;
        }
        self.newest += 1;
        // Only reachable if time went backwards: keep the newest.
        self.head = self.head.max(self.newest.saturating_sub(RING as u32 - 1));
        self.times[self.newest as usize % RING] = now;
        self.newest
    }

    fn time(&self, generation: u32) -> u64 {
        self.times[generation as usize % RING]
    }

    /// When a pair born since the agent started had zero bytes, if its
    /// first sample is newer than the window's start (see the module
    /// documentation): the anchor drain once the agent has watched a whole
    /// window, else the pair's first frame.
    fn birth_anchor(&self, e: &Entry) -> Option<u64> {
        if e.birth_ns == NO_BIRTH || e.first < self.head || self.time(e.first) <= self.horizon {
            return None;
        }
        let anchor = self.time(self.head);
        Some(if anchor <= self.horizon {
            e.birth_ns.min(anchor)
        } else {
            e.birth_ns
        })
    }

    /// Bytes per second between the pair's oldest and newest sample in the
    /// window.
    fn rate_of(&self, e: &Entry) -> f64 {
        self.rate_in(e, &mut Span::default())
    }

    /// [`FlowTable::rate_of`], reusing the span in seconds of the pair
    /// before when it had the same two sample times (most pairs of a drain
    /// do): one division per pair instead of two.
    fn rate_in(&self, e: &Entry, span: &mut Span) -> f64 {
        let lo = e.first.max(self.head);
        if e.last < lo {
            return 0.0;
        }
        let t1 = self.time(e.last);
        let (t0, sent) = if let Some(t) = self.birth_anchor(e) {
            (t, e.newest_bytes() as f64)
        } else {
            (self.time(lo), e.sent_since(lo))
        };
        if t1 > t0 {
            sent / span.seconds(t0, t1)
        } else {
            0.0
        }
    }

    fn find(&self, pair: &Pair) -> Option<usize> {
        let want = self.order.of(pair);
        self.entries
            .binary_search_by(|e| self.order.of(&e.pair).cmp(&want))
            .ok()
    }

    /// Merges the pairs new at the last drain into the sorted array, in
    /// place from the back (no second copy of the table).
    fn merge_fresh(&mut self, mut fresh: Vec<Entry>) {
        if !fresh.is_empty() {
            let order = self.order;
            fresh.sort_by_cached_key(|e| order.of(&e.pair));
            let (n, k) = (self.entries.len(), fresh.len());
            self.entries.resize(n + k, Entry::EMPTY);
            let (mut i, mut j) = (n, k);
            for w in (0..n + k).rev() {
                if j == 0 {
                    break;
                }
                let take_old =
                    i > 0 && order.of(&self.entries[i - 1].pair) > order.of(&fresh[j - 1].pair);
                self.entries[w] = if take_old {
                    i -= 1;
                    self.entries[i]
                } else {
                    j -= 1;
                    fresh[j]
                };
            }
            fresh.clear();
        }
        // A burst of new pairs (an agent adopting a full map) leaves a large
        // buffer behind: give it back.
        if fresh.capacity() > 4096 {
            fresh = Vec::new();
        }
        self.fresh = fresh;
    }

    /// Removes pairs idle for longer than the idle time-out and returns
    /// them, so that the caller can free their kernel slots. A pair's last
    /// activity is the drain that saw its counters move (or the kernel's
    /// creation stamp), so it goes at most one drain interval later than
    /// its last frame would say.
    pub fn evict_idle(&mut self, now_ns: u64) -> Vec<Pair> {
        let idle_ns = self.idle_ns;
        let mut gone = Vec::new();
        self.entries.retain(|e| {
            let keep = now_ns.saturating_sub(e.active_ns) <= idle_ns;
            if !keep {
                gone.push(e.pair);
            }
            keep
        });
        if self.entries.capacity() > 2 * self.entries.len() + 1024 {
            self.entries
                .shrink_to(self.entries.len() + self.entries.len() / 4);
        }
        gone
    }

    /// Forgets a pair (its kernel entry is gone).
    pub fn remove(&mut self, pair: &Pair) {
        if let Some(i) = self.find(pair) {
            self.entries.remove(i);
        }
    }

    /// Rate of one directed pair over the window, bytes per second.
    pub fn rate(&self, pair: &Pair) -> f64 {
        self.find(pair)
            .map_or(0.0, |i| self.rate_of(&self.entries[i]))
    }

    /// λ(u, v): both directions summed, as the cost model wants.
    pub fn lambda(&self, u: Ipv4Addr, v: Ipv4Addr) -> f64 {
        self.rate(&(u, v)) + self.rate(&(v, u))
    }

    /// Every peer of `vm` with λ(vm, peer), in no particular order.
    pub fn peers_of(&self, vm: Ipv4Addr) -> Vec<(Ipv4Addr, f64)> {
        let mut acc: HashMap<Ipv4Addr, f64> = HashMap::new();
        for e in &self.entries {
            let (src, dst) = e.pair;
            let peer = if src == vm && dst != vm {
                dst
            } else if dst == vm && src != vm {
                src
            } else {
                continue;
            };
            *acc.entry(peer).or_default() += self.rate_of(e);
        }
        acc.into_iter().collect()
    }

    /// Number of directed pairs in the table.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every pair with its counters and rate, sorted by (src, dst).
    pub fn views(&self) -> Vec<FlowView> {
        let mut v: Vec<FlowView> = self
            .entries
            .iter()
            .map(|e| FlowView {
                src: e.pair.0,
                dst: e.pair.1,
                bytes: e.newest_bytes(),
                packets: e.packets,
                rate_bps: self.rate_of(e),
            })
            .collect();
        v.sort_by_key(|f| (f.src, f.dst));
        v
    }

    /// The samples the rate of `pair` is computed from, oldest first:
    /// `(time, cumulative bytes)`.
    #[cfg(test)]
    fn samples(&self, pair: &Pair) -> Vec<(u64, u64)> {
        let Some(e) = self.find(pair).map(|i| &self.entries[i]) else {
            return Vec::new();
        };
        let lo = e.first.max(self.head);
        let mut v = Vec::new();
        if e.last < lo {
            return v;
        }
        if let Some(t) = self.birth_anchor(e) {
            v.push((t, 0));
        }
        v.extend((lo..=e.last).map(|g| (self.time(g), e.newest_bytes() - e.sent_since(g) as u64)));
        v
    }

    /// Bytes one pair takes in the table: its entry, inline in the sorted
    /// array (the table keeps no other memory per pair; the array's spare
    /// capacity comes on top).
    pub const ENTRY_BYTES: usize = std::mem::size_of::<Entry>();
}

// The memory bound the layout exists for: pair, counters, first-frame
// anchor, and the pair's bytes at each of the ring's drains.
const _: () = assert!(FlowTable::ENTRY_BYTES <= 88);

/// One drain being folded into the table ([`FlowTable::drain`]): pairs
/// pushed in the table's order cost a step along the sorted array, others
/// a binary search. Ends (new pairs merged in) when dropped.
#[derive(Debug)]
pub struct Drain<'a> {
    table: &'a mut FlowTable,
    now_ns: u64,
    generation: u32,
    /// The first entry not yet passed, and its order.
    cursor: usize,
    cursor_order: Option<u128>,
    /// The largest order pushed so far.
    last_order: Option<u128>,
    /// Pairs new to the table that sort before its end.
    fresh: Vec<Entry>,
    /// The span of the last rate computed.
    span: Span,
}

impl Drain<'_> {
    /// Folds one pair's counters in; returns its new rate and the bytes
    /// the table had for it before this drain (None: new pair).
    pub fn push(&mut self, pair: Pair, totals: Totals) -> (f64, Option<u64>) {
        let order = self.table.order.of(&pair);
        let in_order = self.last_order.is_none_or(|o| order >= o);
        if in_order {
            self.last_order = Some(order);
            let entries = &self.table.entries;
            // A steady drain hands over the pairs the table holds, in its
            // order: the pair is the entry after the last one found (or
            // that one again). Compared by pair, no order computed.
            for i in [self.cursor + 1, self.cursor] {
                if entries.get(i).is_some_and(|e| e.pair == pair) {
                    self.cursor = i;
                    self.cursor_order = Some(order);
                    return self.update(Slot::Table(i), totals);
                }
            }
            loop {
                let at = match self.cursor_order {
                    Some(o) => o,
                    None if self.cursor < entries.len() => {
                        let o = self.table.order.of(&entries[self.cursor].pair);
                        self.cursor_order = Some(o);
                        o
                    }
                    None => break,
                };
                if at >= order {
                    break;
                }
                self.cursor += 1;
                self.cursor_order = None;
            }
            if self.cursor_order == Some(order) {
                let i = self.cursor;
                return self.update(Slot::Table(i), totals);
            }
            if self.cursor == self.table.entries.len() {
                // Past the end: append in place, in order.
                self.table.entries.push(self.born(pair, totals));
                self.cursor_order = Some(order);
                let rate = self
                    .table
                    .rate_in(&self.table.entries[self.cursor], &mut self.span);
                return (rate, None);
            }
            // In order, the same pair twice comes twice in a row.
            if self.fresh.last().is_some_and(|e| e.pair == pair) {
                return self.update(Slot::Fresh(self.fresh.len() - 1), totals);
            }
        } else if let Some(i) = self.table.find(&pair) {
            return self.update(Slot::Table(i), totals);
        } else if let Some(j) = self.fresh.iter().rposition(|e| e.pair == pair) {
            return self.update(Slot::Fresh(j), totals);
        }
        let e = self.born(pair, totals);
        let rate = self.table.rate_in(&e, &mut self.span);
        self.fresh.push(e);
        (rate, None)
    }

    /// A pair's entry at its first drain.
    fn born(&self, pair: Pair, totals: Totals) -> Entry {
        let (g, now) = (self.generation, self.now_ns);
        Entry {
            pair,
            packets: totals.packets,
            // The kernel stamps the entry's creation; without a stamp,
            // count the pair as active now.
            active_ns: if totals.last_seen_ns == 0 {
                now
            } else {
                totals.last_seen_ns
            },
            // A pair born while we watched started from zero bytes at its
            // first frame; one that predates us (pinned counters from an
            // earlier run) has no known start and waits for two samples.
            birth_ns: if totals.first_seen_ns >= self.table.started_ns
                && totals.first_seen_ns <= now
            {
                totals.first_seen_ns
            } else {
                NO_BIRTH
            },
            first: g,
            last: g,
            bytes: totals.bytes,
            steps: [0.0; RING],
        }
    }

    fn update(&mut self, at: Slot, totals: Totals) -> (f64, Option<u64>) {
        let (g, now) = (self.generation, self.now_ns);
        let e = match at {
            Slot::Table(i) => &mut self.table.entries[i],
            Slot::Fresh(j) => &mut self.fresh[j],
        };
        let previous = e.newest_bytes();
        let step = &mut e.steps[g as usize % RING];
        if totals.bytes < previous {
            // The kernel entry was deleted and recreated (eviction race,
            // map reset): restart the history rather than go negative.
            e.first = g;
            e.birth_ns = NO_BIRTH;
            *step = 0.0;
        } else if e.last < g {
            *step = (totals.bytes - previous) as f32;
            // Drains the pair missed (absent from the kernel map) count as
            // drains without traffic.
            let from = (e.last + 1).max(g.saturating_sub(RING as u32 - 1));
            for missed in from..g {
                e.steps[missed as usize % RING] = 0.0;
            }
        } else {
            // The same drain's bucket again: the newest sample moves on.
            *step = (f64::from(*step) + (totals.bytes - previous) as f64) as f32;
        }
        if totals.bytes != previous || totals.packets != e.packets {
            // Frames since the last drain: the latest was at most one
            // drain interval ago.
            e.active_ns = now;
        }
        e.active_ns = e.active_ns.max(totals.last_seen_ns);
        e.packets = totals.packets;
        e.bytes = totals.bytes;
        e.last = g;
        // Read back in place: a copy of the entry just written would load
        // its fields across the stores of them (a stall per pair).
        let e = match at {
            Slot::Table(i) => &self.table.entries[i],
            Slot::Fresh(j) => &self.fresh[j],
        };
        (self.table.rate_in(e, &mut self.span), Some(previous))
    }
}

#[derive(Clone, Copy)]
enum Slot {
    Table(usize),
    Fresh(usize),
}

impl Drop for Drain<'_> {
    fn drop(&mut self) {
        let fresh = std::mem::take(&mut self.fresh);
        self.table.merge_fresh(fresh);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;
    fn ip(last: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, last)
    }
    fn tot(bytes: u64, first: u64, last: u64) -> Totals {
        Totals {
            bytes,
            packets: bytes / 100,
            first_seen_ns: first,
            last_seen_ns: last,
        }
    }

    /// The ring as each pair kept it before the table shared its times:
    /// the reference the shared ring must agree with for every pair that
    /// is in every drain from its first. It samples a pair at every drain
    /// of the table, with zero bytes before the pair's first frame.
    #[derive(Default)]
    struct Reference {
        samples: Vec<(u64, u64)>,
        /// The pair's first frame, once seen.
        birth: Option<u64>,
    }

    impl Reference {
        fn record(&mut self, now: u64, bytes: u64, window_ns: u64, bucket_ns: u64) {
            let horizon = now.saturating_sub(window_ns);
            while self.samples.len() > 1 && self.samples[1].0 <= horizon {
                self.samples.remove(0);
            }
            if let Some(last) = self.samples.last_mut()
                && last.0 / bucket_ns == now / bucket_ns
            {
                *last = (now, bytes);
                return;
            }
            self.samples.push((now, bytes));
        }

        /// Over the window from its oldest sample; while no sample is as
        /// old as the window (the table's first window), a pair born since
        /// counts from its first frame.
        fn rate(&self, now: u64, window_ns: u64) -> f64 {
            let (Some(&first), Some(&(t1, b1))) = (self.samples.first(), self.samples.last())
            else {
                return 0.0;
            };
            let (t0, b0) = match self.birth {
                Some(birth) if first.0 > now.saturating_sub(window_ns) => (birth, 0),
                _ => first,
            };
            if t1 > t0 {
                (b1 - b0) as f64 / ((t1 - t0) as f64 / 1e9)
            } else {
                0.0
            }
        }
    }

    /// Pairs arriving over time, fed in drain order (the datapath's) to one
    /// table and in reverse to another: both agree with each other, with
    /// the per-pair reference, and keep their array sorted.
    #[test]
    fn drain_order_and_any_order_agree_with_the_per_pair_ring() {
        let order = PairOrder::new(255);
        for (window, drains) in [(8 * S, 40u64), (16 * S, 40), (30 * S, 90)] {
            let bucket = window.div_ceil(WINDOW_BUCKETS);
            let mut fast = FlowTable::new(window, 600 * S, 0);
            fast.set_order(order);
            let mut slow = FlowTable::new(window, 600 * S, 0);
            let pairs: Vec<Pair> = (0..200u8)
                .map(|i| (ip(i % 13), Ipv4Addr::new(10, 0, i / 13, i)))
                .collect();
            let mut reference: HashMap<Pair, Reference> = HashMap::new();
            for sec in 1..=drains {
                let now = sec * S;
                // Pair i arrives at second i % 25 + 1 (first frame half a
                // second before), then sends i + 1 bytes a second, and 7
                // more every third second.
                let mut snap: Vec<(Pair, Totals)> = pairs
                    .iter()
                    .enumerate()
                    .filter(|&(i, _)| sec > i as u64 % 25)
                    .map(|(i, p)| {
                        let born = i as u64 % 25 + 1;
                        let bytes = (sec - born + 1) * (i as u64 + 1) + sec / 3 * 7;
                        (*p, tot(bytes, born * S - S / 2, now))
                    })
                    .collect();
                snap.sort_by_key(|(p, _)| order.of(p));
                let mut seen = 0;
                fast.update_each(now, snap.iter().copied(), |_, _, _, _| seen += 1);
                assert_eq!(seen, snap.len());
                slow.update(now, snap.iter().rev().copied());
                for p in &pairs {
                    let r = reference.entry(*p).or_default();
                    let t = snap.iter().find(|(q, _)| q == p).map(|(_, t)| *t);
                    if let Some(t) = t {
                        r.birth.get_or_insert(t.first_seen_ns);
                    }
                    r.record(now, t.map_or(0, |t| t.bytes), window, bucket);
                }
                assert!(
                    fast.entries
                        .windows(2)
                        .all(|w| order.of(&w[0].pair) < order.of(&w[1].pair))
                );
                assert_eq!(fast.len(), snap.len());
                for (p, _) in &snap {
                    let want = reference[p].rate(now, window);
                    assert!(
                        (fast.rate(p) - want).abs() < 1e-9,
                        "{p:?} at {sec}, window {window}: {} vs {want}; {:?} vs {:?}",
                        fast.rate(p),
                        fast.samples(p),
                        reference[p].samples
                    );
                    assert!((slow.rate(p) - want).abs() < 1e-9, "{p:?} at {sec}");
                }
                let (mut a, mut b) = (fast.views(), slow.views());
                a.iter_mut()
                    .chain(b.iter_mut())
                    .for_each(|v| v.rate_bps = v.rate_bps.round());
                assert_eq!(a, b);
            }
        }
    }

    #[test]
    fn a_pair_that_misses_drains_counts_them_as_silent() {
        // 8 s window, 1 s buckets. The pair sends 1000 B/s, misses the
        // drains at 11-13 s (its kernel entry gone), and is back at 14 s
        // with 1000 B more: those drains count as drains without traffic.
        let mut t = FlowTable::new(8 * S, 60 * S, 0);
        let (p, q) = ((ip(1), ip(2)), (ip(3), ip(4)));
        for sec in 1..=10u64 {
            t.update(
                sec * S,
                [
                    (p, tot(sec * 1000, S / 2, sec * S)),
                    (q, tot(sec, S / 2, sec * S)),
                ],
            );
        }
        for sec in 11..=13u64 {
            t.update(sec * S, [(q, tot(sec, S / 2, sec * S))]);
        }
        // Absent: no sample, the rate of its samples still in the window.
        assert!((t.rate(&p) - 1000.0).abs() < 1e-9, "{}", t.rate(&p));
        t.update(
            14 * S,
            [(p, tot(11_000, S / 2, 14 * S)), (q, tot(14, S / 2, 14 * S))],
        );
        // 6..14 s: 5000 B (6-10 s), nothing at 11-13, 1000 B at 14.
        assert_eq!(t.samples(&p)[0], (6 * S, 6_000));
        assert!((t.rate(&p) - 5000.0 / 8.0).abs() < 1e-9, "{}", t.rate(&p));
        // Gone for longer than the window: no sample left, rate 0.
        for sec in 15..=30u64 {
            t.update(sec * S, [(q, tot(sec, S / 2, sec * S))]);
        }
        assert_eq!(t.rate(&p), 0.0);
        assert_eq!(t.len(), 2);
    }

    #[test]
    fn per_cpu_values_fold() {
        use score_common::PairCounters as C;
        let cpus = [
            C {
                bytes: 10,
                packets: 1,
                first_seen_ns: 50,
                last_seen_ns: 60,
            },
            C::default(),
            C {
                bytes: 5,
                packets: 2,
                first_seen_ns: 40,
                last_seen_ns: 55,
            },
        ];
        assert_eq!(
            Totals::sum(&cpus),
            Totals {
                bytes: 15,
                packets: 3,
                first_seen_ns: 40,
                last_seen_ns: 60
            }
        );
    }

    /// Drains every second from 1 s to `until` s; 1000 B/s up to 20 s,
    /// 3000 B/s after. Returns the bytes at each second, index = second.
    fn step_traffic(t: &mut FlowTable, p: Pair, from: u64, until: u64) -> Vec<u64> {
        let mut cum = vec![0u64; (until + 1) as usize];
        let mut bytes = 0;
        for sec in 1..=until {
            if sec > from {
                bytes += if sec - from <= 20 { 1000 } else { 3000 };
            }
            cum[sec as usize] = bytes;
            if sec > from {
                t.update(sec * S, [(p, tot(bytes, from * S + S / 2, sec * S))]);
            }
        }
        cum
    }

    #[test]
    fn drains_as_long_as_a_bucket_give_the_exact_window() {
        // 8 s window: 1 s buckets, one per drain. 1000 B/s for 20 s, then
        // 3000 B/s: at 30 s the window (22-30 s) sees only the second part.
        let mut t = FlowTable::new(8 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        step_traffic(&mut t, p, 0, 30);
        assert_eq!(t.rate(&p), 3000.0);
    }

    #[test]
    fn coarse_buckets_average_over_the_window_and_at_most_one_bucket_more() {
        // 16 s window: 2 s buckets, two drains each; the ring keeps the last
        // drain of each bucket. At 30 s the horizon is 14 s; 14 s was
        // replaced by 15 s (same bucket), so the anchor is 13 s: the rate is
        // the average over 13-30 s, 17 s = window + one drain.
        let mut t = FlowTable::new(16 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        let cum = step_traffic(&mut t, p, 0, 30);
        let want = (cum[30] - cum[13]) as f64 / 17.0;
        assert_eq!(want, 37_000.0 / 17.0);
        assert!((t.rate(&p) - want).abs() < 1e-9, "{} vs {want}", t.rate(&p));
        // At 31 s the horizon is 15 s, the last drain of its bucket: the
        // span is exactly the window, 15-31 s (5 s at 1000 B/s, 11 at 3000).
        t.update(31 * S, [(p, tot(cum[30] + 3000, S / 2, 31 * S))]);
        assert!(
            (t.rate(&p) - 38_000.0 / 16.0).abs() < 1e-9,
            "{}",
            t.rate(&p)
        );
    }

    #[test]
    fn the_ring_wraps_around_and_keeps_giving_the_same_rates() {
        // The same traffic after 1,000 s of an idle-free steady 500 B/s,
        // on the same 2 s grid: hundreds of wraps of the 10-slot ring.
        let mut t = FlowTable::new(16 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        let mut bytes = 0;
        for sec in 1..=1000u64 {
            bytes += 500;
            t.update(sec * S, [(p, tot(bytes, S / 2, sec * S))]);
            if sec > 20 {
                assert!((t.rate(&p) - 500.0).abs() < 1e-9, "{sec}: {}", t.rate(&p));
            }
            // The shared ring, plus the pair's first-frame anchor.
            assert!(t.samples(&p).len() <= RING + 1);
        }
        // Then the step of the test above, shifted by 1,000 s.
        for sec in 1001..=1030u64 {
            bytes += if sec <= 1020 { 1000 } else { 3000 };
            t.update(sec * S, [(p, tot(bytes, S / 2, sec * S))]);
        }
        assert!(
            (t.rate(&p) - 37_000.0 / 17.0).abs() < 1e-9,
            "{}",
            t.rate(&p)
        );
    }

    #[test]
    fn irregular_drains_stay_within_the_documented_span() {
        // Drains at uneven times over a 30 s window (3.75 s buckets): the
        // span between anchor and newest sample is at least the window and
        // less than window + bucket + the longest gap between drains.
        let window = 30 * S;
        let mut t = FlowTable::new(window, 600 * S, 0);
        let p = (ip(1), ip(2));
        let (mut now, mut bytes) = (0u64, 0u64);
        let gaps = [
            S,
            333_333_000,
            2 * S,
            700_000_000,
            S,
            1_300_000_000,
            90_000_000,
        ];
        for i in 0..400 {
            let gap = gaps[i % gaps.len()];
            now += gap;
            bytes += gap / 1000; // 1 MB/s
            t.update(now, [(p, tot(bytes, 0, now))]);
            let w = t.samples(&p);
            let span = w[w.len() - 1].0 - w[0].0;
            if now > window + 2 * S {
                assert!(span >= window, "span {span} at {now}");
                assert!(span < window + t.bucket_ns + 2 * S, "span {span} at {now}");
            }
            assert!((t.rate(&p) - 1e6).abs() < 1e-3, "{}", t.rate(&p));
        }
    }

    #[test]
    fn watch_averages_since_the_first_frame() {
        // `watch` passes an endless window: the rate is the average since
        // the pair's first frame, however many drains.
        let mut t = FlowTable::new(u64::MAX, u64::MAX, 0);
        let p = (ip(1), ip(2));
        let mut bytes = 0;
        for sec in 1..=200u64 {
            bytes += if sec <= 100 { 100 } else { 300 };
            t.update(sec * S, [(p, tot(bytes, S, sec * S))]);
        }
        assert!((t.rate(&p) - bytes as f64 / 199.0).abs() < 1e-9);
    }

    #[test]
    fn update_each_reports_the_rates_rate_gives() {
        let mut t = FlowTable::new(4 * S, 60 * S, 0);
        let (a, b) = ((ip(1), ip(2)), (ip(2), ip(1)));
        t.update(S, [(a, tot(100, S / 2, S)), (b, tot(10, S / 2, S))]);
        let mut seen = Vec::new();
        t.update_each(
            2 * S,
            [(a, tot(1100, S / 2, 2 * S)), (b, tot(30, S / 2, 2 * S))],
            |p, tot, r, _| seen.push((p, tot.bytes, r)),
        );
        assert_eq!(
            seen,
            vec![(a, 1100, t.rate(&a)), (b, 30, t.rate(&b))],
            "{seen:?}"
        );
        assert!((t.rate(&a) - 1100.0 / 1.5).abs() < 1e-9);
    }

    /// A drain computes the span in seconds once for the pairs that share
    /// their two sample times; pairs of one drain whose spans differ (born
    /// at different frames, first sampled at different drains, back after
    /// a gap) each still get their own rate, to the bit.
    #[test]
    fn a_drains_rates_are_each_pairs_own_to_the_bit() {
        let mut t = FlowTable::new(4 * S, 600 * S, S / 4);
        // a predates the agent; b and c are born at different frames; d
        // predates the agent and is first seen later; e misses drains.
        let pairs: Vec<Pair> = (1..=5).map(|i| (ip(i), ip(10 + i))).collect();
        let mut checked = 0;
        for sec in 1..=14u64 {
            let now = sec * S;
            let snap: Vec<(Pair, Totals)> = pairs
                .iter()
                .enumerate()
                .filter(|&(i, _)| match i {
                    2 => sec >= 3,
                    3 => sec >= 5,
                    4 => sec % 4 != 2,
                    _ => true,
                })
                .map(|(i, p)| {
                    let first = [0, S + S / 3, 2 * S + 7 * S / 10, 0, S / 8][i];
                    let bytes = (sec + i as u64) * 1000 * (i as u64 + 1) + sec * sec;
                    (*p, tot(bytes, first, now))
                })
                .collect();
            let mut seen = Vec::new();
            t.update_each(now, snap.iter().copied(), |p, _, r, _| seen.push((p, r)));
            for (p, r) in seen {
                assert_eq!(r.to_bits(), t.rate(&p).to_bits(), "{p:?} at {sec} s");
                checked += 1;
            }
        }
        assert!(checked > 50);
    }

    #[test]
    fn a_new_pair_counts_from_its_first_frame() {
        let mut t = FlowTable::new(10 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        // First frame at 4 s, 2000 bytes by the drain at 5 s.
        t.update(5 * S, [(p, tot(2000, 4 * S, 5 * S))]);
        assert!((t.rate(&p) - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn a_pair_older_than_the_agent_waits_for_two_samples() {
        let mut t = FlowTable::new(10 * S, 60 * S, 100 * S);
        let p = (ip(1), ip(2));
        t.update(101 * S, [(p, tot(1_000_000, 3 * S, 101 * S))]);
        assert_eq!(t.rate(&p), 0.0);
        t.update(102 * S, [(p, tot(1_000_500, 3 * S, 102 * S))]);
        assert!((t.rate(&p) - 500.0).abs() < 1e-6);
    }

    #[test]
    fn lambda_sums_both_directions_and_peers_are_found() {
        let mut t = FlowTable::new(10 * S, 60 * S, 0);
        t.update(
            2 * S,
            [
                ((ip(1), ip(2)), tot(100, S, 2 * S)),
                ((ip(2), ip(1)), tot(300, S, 2 * S)),
                ((ip(3), ip(1)), tot(50, S, 2 * S)),
                ((ip(3), ip(4)), tot(50, S, 2 * S)),
            ],
        );
        assert!((t.lambda(ip(1), ip(2)) - 400.0).abs() < 1e-9);
        assert_eq!(t.lambda(ip(1), ip(2)), t.lambda(ip(2), ip(1)));
        let mut peers = t.peers_of(ip(1));
        peers.sort_by_key(|p| p.0);
        assert_eq!(peers, vec![(ip(2), 400.0), (ip(3), 50.0)]);
    }

    #[test]
    fn idle_pairs_are_evicted() {
        let mut t = FlowTable::new(10 * S, 30 * S, 0);
        t.update(
            5 * S,
            [
                ((ip(1), ip(2)), tot(1, S, S)),
                ((ip(2), ip(1)), tot(1, S, 5 * S)),
            ],
        );
        // (1,2) last sent at 1 s: idle exactly 30 s at 31 s is not yet over.
        assert!(t.evict_idle(31 * S).is_empty());
        assert_eq!(t.evict_idle(32 * S), vec![(ip(1), ip(2))]);
        assert_eq!(t.len(), 1);
        assert_eq!(t.rate(&(ip(1), ip(2))), 0.0);
        // A pair that comes back after eviction starts a new history from
        // its new kernel entry, with zero bytes at the anchor (the drain at
        // 5 s, the newest at or before 40 - 10 s).
        t.update(40 * S, [((ip(1), ip(2)), tot(500, 39 * S, 40 * S))]);
        assert!((t.rate(&(ip(1), ip(2))) - 500.0 / 35.0).abs() < 1e-9);
    }

    #[test]
    fn a_burst_at_a_new_pairs_start_weighs_over_the_window() {
        // A VM arrives at 20.5 s, when the agent has watched more than a
        // window: its peer's frames queued while it moved come at once
        // (40 kB), then 10 kB a second. Over the 10 s window that is
        // (40 + 10 x 1.5) kB / 10 s, not 55 kB / 1.5 s.
        let mut t = FlowTable::new(10 * S, 60 * S, 0);
        let old = (ip(1), ip(2));
        for sec in 1..=20u64 {
            t.update(sec * S, [(old, tot(sec * 1000, S / 2, sec * S))]);
        }
        let new = (ip(3), ip(2));
        for (sec, bytes) in [(21u64, 45_000u64), (22, 55_000)] {
            let now = sec * S;
            t.update(
                now,
                [
                    (old, tot(sec * 1000, S / 2, now)),
                    (new, tot(bytes, 20 * S + S / 2, now)),
                ],
            );
        }
        assert!(
            (t.rate(&new) - 55_000.0 / 10.0).abs() < 1e-6,
            "{}",
            t.rate(&new)
        );
        assert!((t.rate(&old) - 1000.0).abs() < 1e-6);
    }

    #[test]
    fn activity_is_seen_from_moving_counters_without_kernel_stamps() {
        // The classifiers stamp only an entry's creation: a pair whose
        // counters keep moving is active, one whose counters stand still is
        // idle from the last drain that saw them move.
        let mut t = FlowTable::new(10 * S, 30 * S, 0);
        let (busy, quiet) = ((ip(1), ip(2)), (ip(3), ip(4)));
        for sec in 1..=100u64 {
            let q = if sec <= 20 { sec * 10 } else { 200 };
            t.update(
                sec * S,
                [
                    (busy, tot(sec * 100, S / 2, S / 2)),
                    (quiet, tot(q, S / 2, S / 2)),
                ],
            );
            let gone = t.evict_idle(sec * S);
            if sec <= 50 {
                // quiet last moved at 20 s: idle for exactly 30 s at 50 s.
                assert!(gone.is_empty(), "{sec}: {gone:?}");
            } else if sec == 51 {
                assert_eq!(gone, vec![quiet]);
            }
        }
        assert_eq!(t.len(), 1);
        assert!((t.rate(&busy) - 100.0).abs() < 1e-9);
    }

    #[test]
    fn a_reset_counter_restarts_the_history() {
        let mut t = FlowTable::new(10 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        t.update(S, [(p, tot(5000, S / 2, S))]);
        t.update(2 * S, [(p, tot(100, 2 * S - 1, 2 * S))]);
        assert!(t.rate(&p) >= 0.0);
        assert_eq!(t.views()[0].bytes, 100);
    }

    /// The steps between samples are `f32`: a pair at 40 Gbit/s with a
    /// few odd bytes (steps far above the 16 MiB `f32` holds exactly) keeps
    /// its rate within 1e-6 of the exact one, its bytes exact, and the
    /// same drain's bucket replaced many times adds no drift.
    #[test]
    fn large_steps_keep_the_rate_within_a_millionth() {
        let window = 30 * S;
        let bucket = window.div_ceil(WINDOW_BUCKETS);
        let mut t = FlowTable::new(window, 600 * S, 0);
        let p = (ip(1), ip(2));
        let mut reference = Reference {
            samples: Vec::new(),
            birth: Some(S / 2),
        };
        let mut bytes = 0u64;
        for ms in (1..=120_000u64).step_by(250) {
            let now = ms * 1_000_000 + S;
            bytes += 5_000_000_000 / 4 + ms % 7;
            t.update(now, [(p, tot(bytes, S / 2, now))]);
            reference.record(now, bytes, window, bucket);
            let want = reference.rate(now, window);
            assert!(
                (t.rate(&p) - want).abs() <= want * 1e-6,
                "at {ms} ms: {} vs {want}",
                t.rate(&p)
            );
        }
        assert_eq!(t.views()[0].bytes, bytes);
    }
}
