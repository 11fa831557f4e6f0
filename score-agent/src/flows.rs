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
//! A pair keeps a few `(time, cumulative bytes)` samples, stored inline in
//! a fixed ring (no allocation per pair, [`WINDOW_BUCKETS`] + 2 slots, 160
//! bytes). Time is cut into buckets of `window / WINDOW_BUCKETS` (rounded
//! up); the ring holds the latest sample of each bucket, and the anchor:
//! the newest sample taken at or before `now - window`. The rate is the
//! bytes between the anchor and the newest sample divided by the time
//! between them. So:
//!
//! - once a pair is older than the window, the rate averages over a span of
//!   at least `window` and less than `window` + one bucket + one drain
//!   interval (the anchor is the last drain of its bucket);
//! - when the drain interval is at least one bucket (e.g. 1 s drains with
//!   a window of 8 s or less), every drain is its own bucket and the span is
//!   exactly what a full list of samples would give: the newest drain at or
//!   before `now - window`;
//! - a pair born while the agent watched counts from its first frame
//!   (kernel first-seen stamp, zero bytes); one that predates the agent
//!   (pinned counters of an earlier run) has a rate from its second sample.
//!
//! This replaced a `VecDeque` of every drain's sample (32 samples at 1 s
//! drains and a 30 s window, 0.5-1 KiB per pair on the heap); the ring is
//! what bounds the agent's memory per pair (docs/BENCHMARKS.md).

use std::{collections::HashMap, net::Ipv4Addr};

use serde::Serialize;

/// Buckets the rate window is cut into: the ring keeps one sample per
/// bucket, so the averaging span is the window plus at most one bucket
/// (12.5%) and one drain interval.
pub const WINDOW_BUCKETS: u64 = 8;

/// Slots of a pair's ring: one per bucket the window touches (the window
/// spans at most `WINDOW_BUCKETS` + 1 buckets) plus the anchor.
const RING: usize = WINDOW_BUCKETS as usize + 2;

/// One directed VM pair, host-order addresses.
pub type Pair = (Ipv4Addr, Ipv4Addr);

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

/// A pair's samples: `(time, cumulative bytes)`, oldest first, in a ring
/// stored inline. See the module documentation for what it keeps.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    /// `(time, bytes)` side by side: a drain touches one cache line per
    /// sample it reads or writes, not two.
    samples: [(u64, u64); RING],
    head: u8,
    len: u8,
}

impl Window {
    fn slot(&self, i: usize) -> usize {
        (usize::from(self.head) + i) % RING
    }

    fn get(&self, i: usize) -> (u64, u64) {
        self.samples[self.slot(i)]
    }

    fn clear(&mut self) {
        self.head = 0;
        self.len = 0;
    }

    fn pop_front(&mut self) {
        if self.len > 0 {
            self.head = ((usize::from(self.head) + 1) % RING) as u8;
            self.len -= 1;
        }
    }

    fn push_back(&mut self, time: u64, bytes: u64) {
        if usize::from(self.len) == RING {
            // Only reachable if time went backwards: keep the newest.
            self.pop_front();
        }
        let s = self.slot(usize::from(self.len));
        self.samples[s] = (time, bytes);
        self.len += 1;
    }

    /// Adds the sample of a drain at `now`: drops anchors older than
    /// needed, then either replaces the newest sample (same bucket, and it
    /// is not the anchor) or appends.
    fn record(&mut self, now: u64, bytes: u64, window_ns: u64, bucket_ns: u64) {
        let horizon = now.saturating_sub(window_ns);
        while self.len > 1 && self.get(1).0 <= horizon {
            self.pop_front();
        }
        if self.len >= 2 {
            let last = self.slot(usize::from(self.len) - 1);
            if self.samples[last].0 / bucket_ns == now / bucket_ns {
                self.samples[last] = (now, bytes);
                return;
            }
        }
        self.push_back(now, bytes);
    }

    /// Bytes per second between the oldest and the newest sample.
    fn rate(&self) -> f64 {
        if self.len < 2 {
            return 0.0;
        }
        let (t0, b0) = self.get(0);
        let (t1, b1) = self.get(usize::from(self.len) - 1);
        if t1 > t0 {
            b1.saturating_sub(b0) as f64 / ((t1 - t0) as f64 / 1e9)
        } else {
            0.0
        }
    }
}

#[derive(Debug)]
struct PairState {
    bytes: u64,
    packets: u64,
    /// When the pair was last known to send: the drain that saw its bytes
    /// move (the classifiers do not stamp every frame), or the kernel's
    /// stamp if later.
    active_ns: u64,
    window: Window,
}

/// Windowed rates per directed pair.
#[derive(Debug)]
pub struct FlowTable {
    window_ns: u64,
    bucket_ns: u64,
    idle_ns: u64,
    started_ns: u64,
    pairs: HashMap<Pair, PairState>,
}

impl FlowTable {
    /// A table averaging over `window_ns` and evicting pairs idle for
    /// `idle_ns`; `now_ns` is when the agent started counting.
    pub fn new(window_ns: u64, idle_ns: u64, now_ns: u64) -> Self {
        FlowTable {
            window_ns,
            bucket_ns: window_ns.div_ceil(WINDOW_BUCKETS).max(1),
            idle_ns,
            started_ns: now_ns,
            pairs: HashMap::new(),
        }
    }

    /// Folds one drain of the kernel map, taken at `now_ns`, into the table.
    pub fn update(&mut self, now_ns: u64, snapshot: impl IntoIterator<Item = (Pair, Totals)>) {
        self.update_each(now_ns, snapshot, |_, _, _| {});
    }

    /// [`FlowTable::update`], calling `seen(pair, totals, rate)` with each
    /// pair's new rate as it goes: one hash lookup per pair instead of two
    /// for a caller that wants every rate (the collector's metrics).
    pub fn update_each<I, F>(&mut self, now_ns: u64, snapshot: I, mut seen: F)
    where
        I: IntoIterator<Item = (Pair, Totals)>,
        F: FnMut(Pair, Totals, f64),
    {
        let (window_ns, bucket_ns, started_ns) = (self.window_ns, self.bucket_ns, self.started_ns);
        for (pair, totals) in snapshot {
            let state = self.pairs.entry(pair).or_insert_with(|| {
                let mut window = Window::default();
                // A pair born while we watched started from zero bytes at its
                // first frame; one that predates us (pinned counters from an
                // earlier run) has no known start and waits for two samples.
                if totals.first_seen_ns >= started_ns && totals.first_seen_ns <= now_ns {
                    window.push_back(totals.first_seen_ns, 0);
                }
                PairState {
                    bytes: totals.bytes,
                    packets: totals.packets,
                    // The kernel stamps the entry's creation; without a
                    // stamp, count the pair as active now.
                    active_ns: if totals.last_seen_ns == 0 {
                        now_ns
                    } else {
                        totals.last_seen_ns
                    },
                    window,
                }
            });
            if totals.bytes < state.bytes {
                // The kernel entry was deleted and recreated (eviction race,
                // map reset): restart the history rather than go negative.
                state.window.clear();
            }
            if totals.bytes != state.bytes || totals.packets != state.packets {
                // Frames since the last drain: the latest was at most one
                // drain interval ago.
                state.active_ns = now_ns;
            }
            state.active_ns = state.active_ns.max(totals.last_seen_ns);
            state.bytes = totals.bytes;
            state.packets = totals.packets;
            state
                .window
                .record(now_ns, totals.bytes, window_ns, bucket_ns);
            seen(pair, totals, state.window.rate());
        }
    }

    /// Removes pairs idle for longer than the idle time-out and returns
    /// them, so that the caller can free their kernel slots. A pair's last
    /// activity is the drain that saw its counters move (or the kernel's
    /// creation stamp), so it goes at most one drain interval later than
    /// its last frame would say.
    pub fn evict_idle(&mut self, now_ns: u64) -> Vec<Pair> {
        let idle_ns = self.idle_ns;
        let mut gone = Vec::new();
        self.pairs.retain(|pair, s| {
            let keep = now_ns.saturating_sub(s.active_ns) <= idle_ns;
            if !keep {
                gone.push(*pair);
            }
            keep
        });
        gone
    }

    /// Forgets a pair (its kernel entry is gone).
    pub fn remove(&mut self, pair: &Pair) {
        self.pairs.remove(pair);
    }

    /// Rate of one directed pair over the window, bytes per second.
    pub fn rate(&self, pair: &Pair) -> f64 {
        self.pairs.get(pair).map_or(0.0, |s| s.window.rate())
    }

    /// λ(u, v): both directions summed, as the cost model wants.
    pub fn lambda(&self, u: Ipv4Addr, v: Ipv4Addr) -> f64 {
        self.rate(&(u, v)) + self.rate(&(v, u))
    }

    /// Every peer of `vm` with λ(vm, peer), in no particular order.
    pub fn peers_of(&self, vm: Ipv4Addr) -> Vec<(Ipv4Addr, f64)> {
        let mut acc: HashMap<Ipv4Addr, f64> = HashMap::new();
        for (&(src, dst), s) in &self.pairs {
            let peer = if src == vm && dst != vm {
                dst
            } else if dst == vm && src != vm {
                src
            } else {
                continue;
            };
            *acc.entry(peer).or_default() += s.window.rate();
        }
        acc.into_iter().collect()
    }

    /// Number of directed pairs in the table.
    pub fn len(&self) -> usize {
        self.pairs.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Every pair with its counters and rate, sorted by (src, dst).
    pub fn views(&self) -> Vec<FlowView> {
        let mut v: Vec<FlowView> = self
            .pairs
            .iter()
            .map(|(&(src, dst), s)| FlowView {
                src,
                dst,
                bytes: s.bytes,
                packets: s.packets,
                rate_bps: s.window.rate(),
            })
            .collect();
        v.sort_by_key(|f| (f.src, f.dst));
        v
    }

    /// Bytes one pair's entry takes in the table, inline (the table keeps
    /// no other memory per pair; the hash map's own slack comes on top).
    pub const ENTRY_BYTES: usize = std::mem::size_of::<(Pair, PairState)>();
}

// The memory bound the window exists for: (pair, counters, 10-slot ring).
const _: () = assert!(FlowTable::ENTRY_BYTES <= 200);

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
            let w = &t.pairs[&p].window;
            assert!(usize::from(w.len) <= RING);
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
            let w = &t.pairs[&p].window;
            let span = w.get(usize::from(w.len) - 1).0 - w.get(0).0;
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
            |p, tot, r| seen.push((p, tot.bytes, r)),
        );
        assert_eq!(
            seen,
            vec![(a, 1100, t.rate(&a)), (b, 30, t.rate(&b))],
            "{seen:?}"
        );
        assert!((t.rate(&a) - 1100.0 / 1.5).abs() < 1e-9);
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
        // its new kernel entry's first frame.
        t.update(40 * S, [((ip(1), ip(2)), tot(500, 39 * S, 40 * S))]);
        assert!((t.rate(&(ip(1), ip(2))) - 500.0).abs() < 1e-9);
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
}
