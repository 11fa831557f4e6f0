//! Order index of a token's unvisited entries, so that a policy finds the
//! next holder in O(log n) instead of scanning the whole token at every
//! hand-off (which made one round O(VMs²): 3 s at the paper's scale, 5 min
//! at ten times it; docs/EVALUATION.md).
//!
//! One max-tree (segment tree over the entries' positions) per policy order.
//! Each leaf holds the entry's key in that order, or 0 for a visited entry;
//! a range maximum is then the best unvisited entry of that range. The index
//! is derived from the entries and never travels on the wire.

use super::{TokenEntry, VmId};

/// Set in the key of every unvisited entry, so that any such entry beats 0
/// (a visited entry, or no entry at all).
const PRESENT: u64 = 1 << 63;

/// The orders the policies choose unvisited VMs in. Every key is unique per
/// ID, so the best entry does not depend on the order of a scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Order {
    /// Lowest ID first (round-robin, within a range of positions).
    Id,
    /// Highest level, then lowest ID (distributed).
    Level,
    /// Highest level, then highest load, then lowest ID (load-aware).
    LevelLoad,
}

impl Order {
    /// Number of orders, the number of trees a token may keep.
    pub(crate) const COUNT: usize = 3;

    /// Every order, in the slot order of [`Order::slot`].
    pub(crate) const ALL: [Order; Order::COUNT] = [Order::Id, Order::Level, Order::LevelLoad];

    /// Where this order's tree sits in a token's array of trees.
    pub(crate) fn slot(self) -> usize {
        match self {
            Order::Id => 0,
            Order::Level => 1,
            Order::LevelLoad => 2,
        }
    }

    /// The entry's key: 0 if visited; otherwise greater is better. The
    /// inverted ID in the low 32 bits makes the lower ID win ties, the
    /// level (bits 40-47) and load (bits 32-39) rank above it, exactly as
    /// the tuples `(level, Reverse(id))` and `(level, load, Reverse(id))`.
    pub(crate) fn key(self, e: &TokenEntry) -> u64 {
        if e.visited {
            return 0;
        }
        let id = u64::from(!e.id);
        PRESENT
            | match self {
                Order::Id => id,
                Order::Level => (u64::from(e.level) << 40) | id,
                Order::LevelLoad => (u64::from(e.level) << 40) | (u64::from(e.load.0) << 32) | id,
            }
    }

    /// The VM of a non-zero key.
    pub(crate) fn id_of(key: u64) -> VmId {
        // The low 32 bits are the inverted ID; truncation is the point.
        !(key as u32)
    }
}

/// A max segment tree over positions `0..n`: leaves at `n..2n`, node `i`
/// the maximum of `2i` and `2i+1`. Maximum is commutative, so the compact
/// bottom-up layout works for any `n`, not only powers of two.
#[derive(Debug, Clone)]
pub(crate) struct MaxTree {
    n: usize,
    nodes: Vec<u64>,
}

impl MaxTree {
    /// The tree of `order` over `entries`, with the entry at `skip` (one
    /// lent out for editing, whose content is not known) left out.
    pub(crate) fn build(entries: &[TokenEntry], order: Order, skip: Option<usize>) -> Self {
        let n = entries.len();
        let mut nodes = vec![0u64; 2 * n];
        for (leaf, e) in nodes[n..].iter_mut().zip(entries) {
            *leaf = order.key(e);
        }
        if let Some(p) = skip.filter(|&p| p < n) {
            nodes[n + p] = 0;
        }
        for i in (1..n).rev() {
            nodes[i] = nodes[2 * i].max(nodes[2 * i + 1]);
        }
        MaxTree { n, nodes }
    }

    /// Sets the key at position `pos` (ignored if out of range).
    pub(crate) fn set(&mut self, pos: usize, key: u64) {
        if pos >= self.n {
            return;
        }
        let mut i = pos + self.n;
        self.nodes[i] = key;
        while i > 1 {
            i /= 2;
            let m = self.nodes[2 * i].max(self.nodes[2 * i + 1]);
            if self.nodes[i] == m {
                // Every ancestor above already agrees.
                break;
            }
            self.nodes[i] = m;
        }
    }

    /// The greatest key at positions `lo..hi` (0 if none is unvisited).
    pub(crate) fn max_in(&self, lo: usize, hi: usize) -> u64 {
        let (mut l, mut r) = (lo.min(self.n) + self.n, hi.min(self.n) + self.n);
        let mut best = 0;
        while l < r {
            if l & 1 == 1 {
                best = best.max(self.nodes[l]);
                l += 1;
            }
            if r & 1 == 1 {
                r -= 1;
                best = best.max(self.nodes[r]);
            }
            l /= 2;
            r /= 2;
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Load;
    use proptest::prelude::*;
    use std::cmp::Reverse;

    fn entry(id: VmId, level: u8, load: u8, visited: bool) -> TokenEntry {
        TokenEntry {
            id,
            level,
            load: Load(load),
            visited,
        }
    }

    #[test]
    fn keys_order_like_the_policy_tuples() {
        let a = entry(5, 2, 9, false);
        let b = entry(3, 2, 1, false);
        let c = entry(9, 3, 0, false);
        // Same level: the lower ID wins for Level, the higher load for LevelLoad.
        assert!(Order::Level.key(&b) > Order::Level.key(&a));
        assert!(Order::LevelLoad.key(&a) > Order::LevelLoad.key(&b));
        // A higher level beats any load and ID.
        assert!(Order::LevelLoad.key(&c) > Order::LevelLoad.key(&a));
        assert!(Order::Id.key(&b) > Order::Id.key(&a));
        assert_eq!(Order::Level.key(&entry(5, 2, 0, true)), 0);
        for o in Order::ALL {
            assert_eq!(Order::id_of(o.key(&a)), 5);
            assert_eq!(
                Order::id_of(o.key(&entry(u32::MAX, 15, 255, false))),
                u32::MAX
            );
            assert_eq!(Order::id_of(o.key(&entry(0, 0, 0, false))), 0);
            assert!(o.key(&entry(u32::MAX, 0, 0, false)) > 0);
        }
    }

    proptest! {
        /// Keys compare exactly as the tuples the policies were written with.
        #[test]
        fn key_order_is_tuple_order(
            a in (any::<u32>(), 0u8..=15, any::<u8>()),
            b in (any::<u32>(), 0u8..=15, any::<u8>()),
        ) {
            let (ea, eb) = (entry(a.0, a.1, a.2, false), entry(b.0, b.1, b.2, false));
            let t = |e: &TokenEntry| (e.level, Reverse(e.id));
            let tl = |e: &TokenEntry| (e.level, e.load, Reverse(e.id));
            prop_assert_eq!(Order::Level.key(&ea).cmp(&Order::Level.key(&eb)), t(&ea).cmp(&t(&eb)));
            prop_assert_eq!(
                Order::LevelLoad.key(&ea).cmp(&Order::LevelLoad.key(&eb)),
                tl(&ea).cmp(&tl(&eb))
            );
            prop_assert_eq!(
                Order::Id.key(&ea).cmp(&Order::Id.key(&eb)),
                Reverse(ea.id).cmp(&Reverse(eb.id))
            );
        }

        /// Range maxima after any edits equal a plain scan of the leaves.
        #[test]
        fn range_max_matches_a_scan(
            keys in prop::collection::vec(any::<u64>(), 0..70),
            edits in prop::collection::vec((any::<usize>(), any::<u64>()), 0..20),
            ranges in prop::collection::vec((any::<usize>(), any::<usize>()), 1..20),
        ) {
            let entries: Vec<TokenEntry> = (0..keys.len() as u32).map(|i| entry(i, 0, 0, true)).collect();
            let mut tree = MaxTree::build(&entries, Order::Id, None);
            let mut leaves = vec![0u64; keys.len()];
            for (i, &k) in keys.iter().enumerate() {
                tree.set(i, k);
                leaves[i] = k;
            }
            for (p, k) in edits {
                if !leaves.is_empty() {
                    let p = p % leaves.len();
                    tree.set(p, k);
                    leaves[p] = k;
                }
            }
            let n = leaves.len() + 1;
            for (lo, hi) in ranges {
                let (lo, hi) = (lo % n, hi % n);
                let want = leaves.get(lo..hi).map_or(0, |s| s.iter().copied().max().unwrap_or(0));
                prop_assert_eq!(tree.max_in(lo, hi), want);
            }
        }
    }
}
