//! Replay protection of authenticated datagrams. A captured datagram keeps
//! a valid MAC, so an attacker could send it again (an old token, a stale
//! capacity answer). Three checks, all on fields under the MAC:
//!
//! - **freshness**: a datagram sealed more than the window before the
//!   receiver's now, or before the receiver started, is refused. This is
//!   what survives a *receiver's* restart: its windows are gone, but
//!   everything captured before it started is too old;
//! - **incarnation**: per sender, only the newest incarnation seen is
//!   accepted; a *sender's* restart raises it, so its old datagrams die;
//! - **sequence**: per (sender, incarnation) a sliding window, as IPsec
//!   does (RFC 4303 §3.4.3), drops a repeat while tolerating reordering.
//!
//! Pure state: the receiver passes the time and calls it after
//! [`Frame::check`](super::Frame::check) succeeded.

use std::collections::HashMap;
use std::net::Ipv4Addr;

use super::WireError;
use super::frame::Header;

/// Width of the window, in sequence numbers: a datagram up to this far
/// behind the newest one from its sender is still accepted once. A token
/// of 1M VMs is about 2000 chunks sent back to back; 1024 leaves room for
/// reordering within such a burst at 128 bytes per sender.
pub const REPLAY_WINDOW: u64 = 1024;

const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// The sequence numbers seen from one sender: the newest, and which of
/// the [`REPLAY_WINDOW`] before it were seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplayWindow {
    newest: Option<u64>,
    /// Bit `s % REPLAY_WINDOW` is set if `s` (within the window) was seen.
    seen: [u64; WORDS],
}

impl ReplayWindow {
    /// A window that has seen nothing.
    pub fn new() -> Self {
        Self::default()
    }

    /// The newest sequence number accepted, if any.
    pub fn newest(&self) -> Option<u64> {
        self.newest
    }

    /// Whether `seq` would be accepted, without recording it.
    pub fn check(&self, seq: u64) -> Result<(), WireError> {
        let Some(newest) = self.newest else {
            return Ok(());
        };
        if seq > newest {
            return Ok(());
        }
        if newest - seq >= REPLAY_WINDOW || self.is_seen(seq) {
            return Err(WireError::Replayed { seq });
        }
        Ok(())
    }

    /// Accepts `seq` once: records it, or rejects it as a replay (or as too
    /// far behind the newest to tell).
    pub fn accept(&mut self, seq: u64) -> Result<(), WireError> {
        self.check(seq)?;
        match self.newest {
            Some(newest) if seq <= newest => {}
            Some(newest) => {
                // Slide: forget the numbers that fall out of the window.
                if seq - newest >= REPLAY_WINDOW {
                    self.seen = [0; WORDS];
                } else {
                    for s in newest + 1..seq {
                        self.clear(s);
                    }
                }
                self.newest = Some(seq);
            }
            None => {
                self.seen = [0; WORDS];
                self.newest = Some(seq);
            }
        }
        self.mark(seq);
        Ok(())
    }

    fn slot(seq: u64) -> (usize, u64) {
        let bit = seq % REPLAY_WINDOW;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    fn is_seen(&self, seq: u64) -> bool {
        let (w, m) = Self::slot(seq);
        self.seen[w] & m != 0
    }

    fn mark(&mut self, seq: u64) {
        let (w, m) = Self::slot(seq);
        self.seen[w] |= m;
    }

    fn clear(&mut self, seq: u64) {
        let (w, m) = Self::slot(seq);
        self.seen[w] &= !m;
    }
}

/// How old a datagram may be, and since when the receiver runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Freshness {
    /// The receiver's start, ms since the Unix epoch: anything sealed
    /// before it is refused, since its replay windows were lost with the
    /// previous run. Less the clock skew tolerated, if any.
    pub started_ms: u64,
    /// Largest age (now minus send time), and largest lead of a sender's
    /// clock, in ms. It bounds how long a datagram can be replayed to a
    /// receiver that forgot its window, and must cover clock skew and
    /// network delay.
    pub max_age_ms: u64,
}

impl Freshness {
    /// Default window: 30 s, above the skew of NTP-synchronised hosts and
    /// any delay a datagram survives in a data centre.
    pub const DEFAULT_MAX_AGE_MS: u64 = 30_000;

    /// Refuses a datagram sealed at `sent_at_ms` when the receiver's clock
    /// reads `now_ms`.
    pub fn check(&self, sent_at_ms: u64, now_ms: u64) -> Result<(), WireError> {
        let floor = self.started_ms.max(now_ms.saturating_sub(self.max_age_ms));
        if sent_at_ms < floor || sent_at_ms > now_ms.saturating_add(self.max_age_ms) {
            return Err(WireError::NotFresh {
                sent_at_ms,
                now_ms,
                floor_ms: floor,
            });
        }
        Ok(())
    }
}

/// Per sender host: the newest incarnation and its [`ReplayWindow`],
/// bounded in number: when full, the sender heard from least recently is
/// forgotten. Size it above the number of hosts in the cluster; only
/// authenticated senders reach it, so an outsider cannot fill it. A
/// forgotten sender's datagrams are still bounded by the freshness window.
#[derive(Clone, Debug)]
pub struct ReplayTable {
    windows: HashMap<Ipv4Addr, SenderState>,
    max_senders: usize,
    tick: u64,
    freshness: Freshness,
}

#[derive(Clone, Debug)]
struct SenderState {
    incarnation: u32,
    window: ReplayWindow,
    last: u64,
}

impl ReplayTable {
    /// A table for at most `max_senders` senders (at least one), refusing
    /// datagrams that are not fresh by `freshness`.
    pub fn new(max_senders: usize, freshness: Freshness) -> Self {
        ReplayTable {
            windows: HashMap::new(),
            max_senders: max_senders.max(1),
            tick: 0,
            freshness,
        }
    }

    /// Accepts the datagram with this header once: it must be fresh at
    /// `now_ms`, of the sender's newest incarnation, and its sequence
    /// number new in that incarnation. Call it only after the MAC verified.
    /// Nothing is recorded when it is refused.
    pub fn accept(&mut self, header: &Header, now_ms: u64) -> Result<(), WireError> {
        self.freshness.check(header.sent_at_ms, now_ms)?;
        self.tick += 1;
        if let Some(s) = self.windows.get_mut(&header.sender) {
            if header.incarnation < s.incarnation {
                return Err(WireError::OldIncarnation {
                    got: header.incarnation,
                    current: s.incarnation,
                });
            }
            if header.incarnation > s.incarnation {
                // The sender restarted: its numbering starts over.
                let mut w = ReplayWindow::new();
                w.accept(header.seq)?;
                s.incarnation = header.incarnation;
                s.window = w;
            } else {
                s.window.accept(header.seq)?;
            }
            s.last = self.tick;
            return Ok(());
        }
        if self.windows.len() >= self.max_senders {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(_, s)| s.last)
                .map(|(a, _)| *a);
            if let Some(a) = oldest {
                self.windows.remove(&a);
            }
        }
        let mut window = ReplayWindow::new();
        window.accept(header.seq)?;
        self.windows.insert(
            header.sender,
            SenderState {
                incarnation: header.incarnation,
                window,
                last: self.tick,
            },
        );
        Ok(())
    }

    /// The newest incarnation accepted from `sender`, if it is tracked.
    pub fn incarnation_of(&self, sender: Ipv4Addr) -> Option<u32> {
        self.windows.get(&sender).map(|s| s.incarnation)
    }

    /// Number of senders tracked.
    pub fn len(&self) -> usize {
        self.windows.len()
    }

    /// Whether no sender is tracked.
    pub fn is_empty(&self) -> bool {
        self.windows.is_empty()
    }
}

/// A sender's sequence numbers within one incarnation. A restarted agent
/// runs a new, higher incarnation, so it may start again from 1.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SeqCounter {
    next: u64,
}

impl SeqCounter {
    /// A counter whose first number is `first`.
    pub fn starting_at(first: u64) -> Self {
        SeqCounter { next: first }
    }

    /// The next sequence number (saturates at `u64::MAX`, some 580 years of
    /// nanoseconds away).
    pub fn next_seq(&mut self) -> u64 {
        let s = self.next;
        self.next = self.next.saturating_add(1);
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_each_number_once_and_tolerates_reordering() {
        let mut w = ReplayWindow::new();
        w.accept(100).unwrap();
        assert_eq!(w.accept(100), Err(WireError::Replayed { seq: 100 }));
        w.accept(102).unwrap();
        w.accept(101).unwrap();
        assert!(w.accept(101).is_err());
        w.accept(50).unwrap(); // behind, but inside the window, never seen
        assert!(w.accept(50).is_err());
        assert_eq!(w.newest(), Some(102));
    }

    #[test]
    fn too_old_is_refused_and_sliding_clears_bits() {
        let mut w = ReplayWindow::new();
        w.accept(5).unwrap();
        w.accept(5 + REPLAY_WINDOW).unwrap();
        // 5 is now exactly a window behind: too old to tell, refused.
        assert!(w.check(5).is_err());
        // 6 .. 5 + W - 1 were never seen (their slots were cleared).
        w.accept(6).unwrap();
        w.accept(5 + REPLAY_WINDOW - 1).unwrap();
        // A jump of more than a window forgets everything before it.
        w.accept(10 * REPLAY_WINDOW).unwrap();
        w.accept(10 * REPLAY_WINDOW - 1).unwrap();
        assert!(w.accept(10 * REPLAY_WINDOW).is_err());
    }

    #[test]
    fn slot_reuse_does_not_leak_across_the_window() {
        // Sequence s and s + W share a slot; after sliding to s + W the old
        // mark of s must not make s + W look replayed, and vice versa.
        let mut w = ReplayWindow::new();
        for s in 0..REPLAY_WINDOW {
            w.accept(s).unwrap();
        }
        for s in REPLAY_WINDOW..2 * REPLAY_WINDOW {
            w.accept(s).unwrap();
        }
        for s in REPLAY_WINDOW..2 * REPLAY_WINDOW {
            assert!(w.check(s).is_err());
        }
    }

    const NOW: u64 = 1_000_000;

    fn fresh() -> Freshness {
        Freshness {
            started_ms: NOW - 100_000,
            max_age_ms: 30_000,
        }
    }

    fn h(a: u8, incarnation: u32, seq: u64) -> Header {
        Header {
            sender: Ipv4Addr::new(10, 0, 0, a),
            incarnation,
            sent_at_ms: NOW,
            seq,
            ..Header::default()
        }
    }

    #[test]
    fn table_is_per_sender_and_bounded() {
        let mut t = ReplayTable::new(2, fresh());
        t.accept(&h(1, 1, 1), NOW).unwrap();
        t.accept(&h(2, 1, 1), NOW).unwrap();
        assert!(t.accept(&h(1, 1, 1), NOW).is_err());
        t.accept(&h(1, 1, 2), NOW).unwrap();
        t.accept(&h(3, 1, 1), NOW).unwrap(); // evicts sender 2, heard from least recently
        assert_eq!(t.len(), 2);
        assert!(t.accept(&h(1, 1, 1), NOW).is_err());
        // Sender 2 was forgotten, so its old number passes again while it
        // is fresh: the reason to size the table above the host count.
        t.accept(&h(2, 1, 1), NOW).unwrap();
    }

    #[test]
    fn a_new_incarnation_starts_over_and_ends_the_old_one() {
        let mut t = ReplayTable::new(8, fresh());
        t.accept(&h(1, 4, 500), NOW).unwrap();
        // The sender restarted: incarnation 5 numbers from 1 again.
        t.accept(&h(1, 5, 1), NOW).unwrap();
        assert_eq!(t.incarnation_of(Ipv4Addr::new(10, 0, 0, 1)), Some(5));
        assert_eq!(
            t.accept(&h(1, 4, 501), NOW),
            Err(WireError::OldIncarnation { got: 4, current: 5 })
        );
        assert!(t.accept(&h(1, 5, 1), NOW).is_err());
        t.accept(&h(1, 5, 2), NOW).unwrap();
    }

    /// A receiver that restarted has lost its windows; what was captured
    /// before it started is refused by its send time (the second defect
    /// of the peer protocol's review: old datagrams accepted after a
    /// restart).
    #[test]
    fn a_restarted_receiver_refuses_what_was_sealed_before_it_started() {
        let captured = Header {
            sent_at_ms: NOW - 180_000,
            ..h(1, 1, 7)
        };
        // Before the restart the table saw it once.
        let mut before = ReplayTable::new(
            8,
            Freshness {
                started_ms: NOW - 600_000,
                max_age_ms: 30_000,
            },
        );
        before.accept(&captured, NOW - 180_000).unwrap();
        // After a restart at NOW - 1000, three minutes later: refused,
        // though the new table never saw it.
        let mut after = ReplayTable::new(
            8,
            Freshness {
                started_ms: NOW - 1_000,
                max_age_ms: 600_000,
            },
        );
        assert!(matches!(
            after.accept(&captured, NOW),
            Err(WireError::NotFresh { .. })
        ));
        // Nor is anything sealed before the start but within the age.
        let just_before = Header {
            sent_at_ms: NOW - 1_001,
            ..h(1, 1, 8)
        };
        assert!(after.accept(&just_before, NOW).is_err());
        // Fresh datagrams from the same sender are fine.
        after.accept(&h(1, 1, 9), NOW).unwrap();
    }

    #[test]
    fn too_old_and_too_far_ahead_are_refused() {
        let f = fresh();
        f.check(NOW - 30_000, NOW).unwrap();
        assert!(f.check(NOW - 30_001, NOW).is_err());
        f.check(NOW + 30_000, NOW).unwrap();
        assert!(f.check(NOW + 30_001, NOW).is_err());
        // Refused datagrams are not recorded.
        let mut t = ReplayTable::new(8, f);
        let old = Header {
            sent_at_ms: NOW - 40_000,
            ..h(1, 1, 1)
        };
        assert!(t.accept(&old, NOW).is_err());
        assert!(t.is_empty());
    }

    #[test]
    fn counter_counts() {
        let mut c = SeqCounter::starting_at(7);
        assert_eq!(c.next_seq(), 7);
        assert_eq!(c.next_seq(), 8);
        let mut c = SeqCounter::starting_at(u64::MAX);
        assert_eq!(c.next_seq(), u64::MAX);
        assert_eq!(c.next_seq(), u64::MAX);
    }
}
