//! Replay protection over the sequence numbers of authenticated datagrams.
//! A captured datagram keeps a valid MAC, so an attacker could send it again
//! (an old token, a stale capacity answer); each sender's sequence numbers
//! are tracked in a sliding window, as IPsec does (RFC 4303 §3.4.3), so a
//! repeat is dropped while modest reordering is tolerated. Pure state: the
//! agent calls it after [`Frame::check`](super::Frame::check) succeeded.

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

/// One [`ReplayWindow`] per sender host, bounded in number: when full, the
/// sender heard from least recently is forgotten. Size it above the number
/// of hosts in the cluster; only authenticated senders reach it, so an
/// outsider cannot fill it.
#[derive(Clone, Debug)]
pub struct ReplayTable {
    windows: HashMap<Ipv4Addr, (ReplayWindow, u64)>,
    max_senders: usize,
    tick: u64,
}

impl ReplayTable {
    /// A table for at most `max_senders` senders (at least one).
    pub fn new(max_senders: usize) -> Self {
        ReplayTable {
            windows: HashMap::new(),
            max_senders: max_senders.max(1),
            tick: 0,
        }
    }

    /// Accepts the datagram with this header once per (sender, sequence
    /// number); call it only after the MAC verified.
    pub fn accept(&mut self, header: &Header) -> Result<(), WireError> {
        self.tick += 1;
        if let Some((w, last)) = self.windows.get_mut(&header.sender) {
            w.accept(header.seq)?;
            *last = self.tick;
            return Ok(());
        }
        if self.windows.len() >= self.max_senders {
            let oldest = self
                .windows
                .iter()
                .min_by_key(|(_, (_, last))| *last)
                .map(|(a, _)| *a);
            if let Some(a) = oldest {
                self.windows.remove(&a);
            }
        }
        let mut w = ReplayWindow::new();
        w.accept(header.seq)?;
        self.windows.insert(header.sender, (w, self.tick));
        Ok(())
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

/// A sender's sequence numbers. A restarted agent must not reuse numbers
/// its peers have seen, or they would drop it as a replay: start it from
/// a value that grows across restarts, such as the wall clock in
/// nanoseconds since the Unix epoch (the agent reads the clock; this type
/// does not).
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

    #[test]
    fn table_is_per_sender_and_bounded() {
        let h = |a: u8, seq| Header {
            sender: Ipv4Addr::new(10, 0, 0, a),
            epoch: 0,
            seq,
        };
        let mut t = ReplayTable::new(2);
        t.accept(&h(1, 1)).unwrap();
        t.accept(&h(2, 1)).unwrap();
        assert!(t.accept(&h(1, 1)).is_err());
        t.accept(&h(1, 2)).unwrap();
        t.accept(&h(3, 1)).unwrap(); // evicts sender 2, heard from least recently
        assert_eq!(t.len(), 2);
        assert!(t.accept(&h(1, 1)).is_err());
        // Sender 2 was forgotten, so its old number passes again: the reason
        // to size the table above the cluster's host count.
        t.accept(&h(2, 1)).unwrap();
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
