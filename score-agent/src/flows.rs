//! The agent's flow table: the kernel's cumulative per-pair counters,
//! sampled at every drain, turned into rates averaged over a window (the
//! paper's λ, §III-F and §IV-B), with idle pairs evicted.
//!
//! Time is CLOCK_MONOTONIC in nanoseconds, the clock `bpf_ktime_get_ns`
//! reads, so kernel first/last-seen stamps and drain times compare directly.
//! Callers pass the time in; nothing here reads a clock.

use std::{
    collections::{HashMap, VecDeque},
    net::Ipv4Addr,
};

use serde::Serialize;

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

#[derive(Debug)]
struct PairState {
    totals: Totals,
    /// (time, cumulative bytes) at each drain inside the window, plus the
    /// newest one just before it, which anchors the oldest difference.
    samples: VecDeque<(u64, u64)>,
}

/// Windowed rates per directed pair.
#[derive(Debug)]
pub struct FlowTable {
    window_ns: u64,
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
            idle_ns,
            started_ns: now_ns,
            pairs: HashMap::new(),
        }
    }

    /// Folds one drain of the kernel map, taken at `now_ns`, into the table.
    pub fn update(&mut self, now_ns: u64, snapshot: impl IntoIterator<Item = (Pair, Totals)>) {
        for (pair, totals) in snapshot {
            let state = self.pairs.entry(pair).or_insert_with(|| {
                let mut samples = VecDeque::new();
                // A pair born while we watched started from zero bytes at its
                // first frame; one that predates us (pinned counters from an
                // earlier run) has no known start and waits for two samples.
                if totals.first_seen_ns >= self.started_ns && totals.first_seen_ns <= now_ns {
                    samples.push_back((totals.first_seen_ns, 0));
                }
                PairState { totals, samples }
            });
            if totals.bytes < state.totals.bytes {
                // The kernel entry was deleted and recreated (eviction race,
                // map reset): restart the history rather than go negative.
                state.samples.clear();
            }
            state.totals = totals;
            state.samples.push_back((now_ns, totals.bytes));
            let horizon = now_ns.saturating_sub(self.window_ns);
            while state.samples.len() > 2 && state.samples[1].0 <= horizon {
                state.samples.pop_front();
            }
        }
    }

    /// Removes pairs whose last frame is older than the idle time-out and
    /// returns them, so that the caller can free their kernel slots.
    pub fn evict_idle(&mut self, now_ns: u64) -> Vec<Pair> {
        let idle_ns = self.idle_ns;
        let mut gone = Vec::new();
        self.pairs.retain(|pair, s| {
            let keep = now_ns.saturating_sub(s.totals.last_seen_ns) <= idle_ns;
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
        self.pairs
            .get(pair)
            .map_or(0.0, |s| window_rate(&s.samples))
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
            *acc.entry(peer).or_default() += window_rate(&s.samples);
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
                bytes: s.totals.bytes,
                packets: s.totals.packets,
                rate_bps: window_rate(&s.samples),
            })
            .collect();
        v.sort_by_key(|f| (f.src, f.dst));
        v
    }
}

fn window_rate(samples: &VecDeque<(u64, u64)>) -> f64 {
    match (samples.front(), samples.back()) {
        (Some(&(t0, b0)), Some(&(t1, b1))) if t1 > t0 => {
            (b1.saturating_sub(b0)) as f64 / ((t1 - t0) as f64 / 1e9)
        }
        _ => 0.0,
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

    #[test]
    fn rate_is_averaged_over_the_window() {
        let mut t = FlowTable::new(10 * S, 60 * S, 0);
        let p = (ip(1), ip(2));
        // 1000 B/s for 20 s, then 3000 B/s for 10 s: the 10 s window sees
        // only the second part.
        let mut bytes = 0;
        for sec in 1..=30u64 {
            bytes += if sec <= 20 { 1000 } else { 3000 };
            t.update(sec * S, [(p, tot(bytes, S / 2, sec * S))]);
        }
        assert!((t.rate(&p) - 3000.0).abs() < 1e-6, "{}", t.rate(&p));
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
