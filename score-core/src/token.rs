//! The token that circulates among the VMs (paper §II, §III-D): for every VM
//! its 32-bit ID (its IPv4 address), its 8-bit communication level and, for
//! the load-aware policy, a compact aggregate load. The holder of the token
//! for VM u decides for u, updates u's entry, and hands the token on.

mod index;

use std::fmt;
use std::net::Ipv4Addr;
use std::sync::OnceLock;

use index::MaxTree;
pub(crate) use index::Order;

/// A VM's identity: its IPv4 address as a host-order `u32` (paper §III-D).
pub type VmId = u32;

/// Converts a VM ID to the address it stands for.
pub fn vm_addr(id: VmId) -> Ipv4Addr {
    Ipv4Addr::from(id)
}

/// Highest communication level a token entry can carry. Four bits are kept
/// for the level on the wire; trees deeper than 15 levels are not supported.
pub const MAX_LEVEL: u8 = 15;

/// Aggregate load (all of a VM's traffic, in and out) squeezed into one byte
/// on a logarithmic scale: `q = round(8 * log2(1 + bytes_per_second))`,
/// saturating at 255. Steps are about 9% apart, which is all the load-aware
/// policy needs to break ties between VMs at the same level, and the range
/// reaches 2^31 B/s (about 17 Gbit/s) before saturating.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Load(pub u8);

impl Load {
    /// Quantises a rate in bytes per second. Negative and NaN rates are zero.
    pub fn from_rate(bytes_per_second: f64) -> Self {
        if bytes_per_second.is_nan() || bytes_per_second <= 0.0 {
            return Load(0);
        }
        let q = (8.0 * (1.0 + bytes_per_second).log2()).round();
        Load(if q >= 255.0 { 255 } else { q as u8 })
    }

    /// The rate at the centre of this step, in bytes per second.
    pub fn rate(self) -> f64 {
        (f64::from(self.0) / 8.0).exp2() - 1.0
    }
}

/// One VM's entry in the token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenEntry {
    /// The VM's ID (IPv4 address, host order).
    pub id: VmId,
    /// Highest level any of the VM's traffic crosses (0: all its peers are
    /// on its own host, or it has none). At most [`MAX_LEVEL`].
    pub level: u8,
    /// Aggregate load, used by the load-aware policy.
    pub load: Load,
    /// Whether the VM has held the token in the current round. Policies that
    /// order by level need it so that every VM is visited once per round.
    pub visited: bool,
}

impl TokenEntry {
    /// A fresh entry: level 0, no load, not visited.
    pub fn new(id: VmId) -> Self {
        TokenEntry {
            id,
            level: 0,
            load: Load(0),
            visited: false,
        }
    }
}

/// The token: its epoch (a regenerated token has a higher one, and any older
/// one is dropped), the round it is in, and one entry per VM sorted by ID.
///
/// Beside the entries it keeps derived bookkeeping that never travels on
/// the wire and takes no part in equality: the number of visited entries
/// (so [`Token::round_complete`] is O(1)) and, once the same token has been
/// handed on twice, an order index per policy (so a policy picks the next
/// holder in O(log n)). A token decoded for a single hop is scanned once,
/// as cheaply as before; a token that keeps circulating in one process (the
/// simulator) builds the index on its second hand-off.
#[derive(Clone)]
pub struct Token {
    /// Generation of the token; bumped each time a lost token is regenerated.
    pub epoch: u64,
    /// Number of completed rounds (every VM held the token once).
    pub round: u32,
    /// The VM that holds the token now, if any.
    pub holder: Option<VmId>,
    entries: Vec<TokenEntry>,
    derived: Derived,
}

/// What the token derives from its entries (see [`Token`]).
#[derive(Clone, Debug)]
struct Derived {
    /// Visited entries, not counting the one lent out.
    visited: usize,
    /// Position of the entry last handed out by [`Token::get_mut`]: the
    /// caller may have changed anything in it, so it is left out of the
    /// count and the trees until the next `&mut self` call re-reads it.
    lent: Option<usize>,
    /// Whether IDs are strictly ascending. Only an ID edited in place
    /// through [`Token::get_mut`] breaks it; the trees assume it, so the
    /// token then falls back to plain scans.
    sorted: bool,
    /// Hand-offs made with this token value ([`Token::note_handoff`]).
    handoffs: u32,
    /// One lazily built tree per [`Order`].
    trees: [OnceLock<MaxTree>; Order::COUNT],
}

impl Derived {
    fn of(entries: &[TokenEntry]) -> Self {
        Derived {
            visited: entries.iter().filter(|e| e.visited).count(),
            lent: None,
            sorted: true,
            handoffs: 0,
            trees: Default::default(),
        }
    }
}

/// The hand-off from which a token builds its order index: a token decoded
/// for one hop (the agent) is scanned once rather than indexed, which would
/// cost more than the scan; one that stays in memory gets the index.
const INDEX_AFTER_HANDOFFS: u32 = 2;

impl PartialEq for Token {
    fn eq(&self, other: &Self) -> bool {
        self.epoch == other.epoch
            && self.round == other.round
            && self.holder == other.holder
            && self.entries == other.entries
    }
}

impl Eq for Token {}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("epoch", &self.epoch)
            .field("round", &self.round)
            .field("holder", &self.holder)
            .field("entries", &self.entries)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// A token for the given VMs (duplicates are dropped), in round 0.
    pub fn new(epoch: u64, ids: impl IntoIterator<Item = VmId>) -> Self {
        let mut entries: Vec<TokenEntry> = ids.into_iter().map(TokenEntry::new).collect();
        entries.sort_unstable_by_key(|e| e.id);
        entries.dedup_by_key(|e| e.id);
        Token {
            epoch,
            round: 0,
            holder: None,
            derived: Derived::of(&entries),
            entries,
        }
    }

    /// Builds a token from entries; they are sorted by ID and the first of
    /// any duplicate ID is kept.
    pub fn from_entries(
        epoch: u64,
        round: u32,
        holder: Option<VmId>,
        mut entries: Vec<TokenEntry>,
    ) -> Self {
        entries.sort_by_key(|e| e.id);
        entries.dedup_by_key(|e| e.id);
        Token {
            epoch,
            round,
            holder,
            derived: Derived::of(&entries),
            entries,
        }
    }

    /// The entries, sorted by ascending ID.
    pub fn entries(&self) -> &[TokenEntry] {
        &self.entries
    }

    /// Number of VMs in the token.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the token lists no VM.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn position(&self, id: VmId) -> Option<usize> {
        self.entries.binary_search_by_key(&id, |e| e.id).ok()
    }

    /// The entry of a VM.
    pub fn get(&self, id: VmId) -> Option<&TokenEntry> {
        self.position(id).map(|i| &self.entries[i])
    }

    /// The entry of a VM, mutably. Any field may be changed; changing the
    /// ID out of order is allowed but makes the token unencodable and slow.
    pub fn get_mut(&mut self, id: VmId) -> Option<&mut TokenEntry> {
        self.settle();
        let i = self.position(id)?;
        // The caller may change anything: take the entry out of the count
        // and the trees until the next `&mut self` call reads it back.
        if self.entries[i].visited {
            self.derived.visited -= 1;
        }
        for tree in self.derived.trees.iter_mut().filter_map(OnceLock::get_mut) {
            tree.set(i, 0);
        }
        self.derived.lent = Some(i);
        Some(&mut self.entries[i])
    }

    /// Adds a VM (a new one started) or leaves an existing entry alone.
    pub fn insert(&mut self, id: VmId) {
        self.settle();
        if let Err(i) = self.entries.binary_search_by_key(&id, |e| e.id) {
            self.entries.insert(i, TokenEntry::new(id));
            // Positions moved: rebuild the trees when next needed.
            self.derived.trees = Default::default();
        }
    }

    /// Removes a VM (it stopped); returns its entry.
    pub fn remove(&mut self, id: VmId) -> Option<TokenEntry> {
        self.settle();
        let i = self.position(id)?;
        let e = self.entries.remove(i);
        if e.visited {
            self.derived.visited -= 1;
        }
        self.derived.trees = Default::default();
        Some(e)
    }

    /// The holder records what it learnt about its VM after deciding: the
    /// VM's level and load now, and that it has held the token this round.
    /// Returns false if the VM is not in the token.
    pub fn update(&mut self, id: VmId, level: u8, load: Load) -> bool {
        self.settle();
        let Some(i) = self.position(id) else {
            return false;
        };
        let e = &mut self.entries[i];
        if !e.visited {
            self.derived.visited += 1;
        }
        e.level = level.min(MAX_LEVEL);
        e.load = load;
        e.visited = true;
        // Visited: out of every tree.
        for tree in self.derived.trees.iter_mut().filter_map(OnceLock::get_mut) {
            tree.set(i, 0);
        }
        true
    }

    /// Whether every VM has held the token in this round.
    pub fn round_complete(&self) -> bool {
        let lent = self
            .derived
            .lent
            .is_some_and(|p| self.entries.get(p).is_some_and(|e| e.visited));
        self.derived.visited + usize::from(lent) == self.entries.len()
    }

    /// Starts the next round: clears every visited flag and counts the round.
    pub fn start_round(&mut self) {
        self.settle();
        for e in &mut self.entries {
            e.visited = false;
        }
        self.derived.visited = 0;
        // Every key changed: rebuild the trees when next needed.
        self.derived.trees = Default::default();
        self.round = self.round.wrapping_add(1);
    }

    /// Marks a VM visited (the hand-off bookkeeping of
    /// [`advance`](crate::policy::advance)).
    pub(crate) fn mark_visited(&mut self, id: VmId) {
        self.settle();
        if let Some(i) = self.position(id)
            && !self.entries[i].visited
        {
            self.entries[i].visited = true;
            self.derived.visited += 1;
            for tree in self.derived.trees.iter_mut().filter_map(OnceLock::get_mut) {
                tree.set(i, 0);
            }
        }
    }

    /// Counts a hand-off made with this token value (see [`Token`]).
    pub(crate) fn note_handoff(&mut self) {
        self.derived.handoffs = self.derived.handoffs.saturating_add(1);
    }

    /// Reads back the entry lent out by [`Token::get_mut`], if any.
    fn settle(&mut self) {
        let Some(p) = self.derived.lent.take() else {
            return;
        };
        let Some(e) = self.entries.get(p).copied() else {
            return;
        };
        if e.visited {
            self.derived.visited += 1;
        }
        if !self.in_order_at(p) {
            self.derived.sorted = false;
            self.derived.trees = Default::default();
        }
        if self.derived.sorted {
            for (order, tree) in Order::ALL.iter().zip(&mut self.derived.trees) {
                if let Some(tree) = tree.get_mut() {
                    tree.set(p, order.key(&e));
                }
            }
        }
    }

    /// Whether the ID at position `p` lies strictly between its neighbours'.
    fn in_order_at(&self, p: usize) -> bool {
        let Some(e) = self.entries.get(p) else {
            return true;
        };
        (p == 0 || self.entries[p - 1].id < e.id)
            && self.entries.get(p + 1).is_none_or(|next| e.id < next.id)
    }

    /// The tree of `order`, built now if the token has been handed on often
    /// enough; `None` means scan (also while the entry lent out has an ID
    /// out of order, which the trees cannot know of).
    fn tree(&self, order: Order) -> Option<&MaxTree> {
        if !self.derived.sorted || self.derived.lent.is_some_and(|p| !self.in_order_at(p)) {
            return None;
        }
        let cell = &self.derived.trees[order.slot()];
        if self.derived.handoffs < INDEX_AFTER_HANDOFFS {
            return cell.get();
        }
        Some(cell.get_or_init(|| MaxTree::build(&self.entries, order, self.derived.lent)))
    }

    /// The key in `order` of the lent entry if it lies in `lo..hi` and is
    /// not `current` (0 otherwise).
    fn lent_key(&self, order: Order, lo: usize, hi: usize, current: Option<VmId>) -> u64 {
        match self.derived.lent {
            Some(p) if (lo..hi).contains(&p) && Some(self.entries[p].id) != current => {
                order.key(&self.entries[p])
            }
            _ => 0,
        }
    }

    /// The unvisited VM other than `current` that comes first in `order`
    /// (greatest key); `current` itself only if it is the only unvisited
    /// VM. This is the choice of the distributed and load-aware policies.
    pub(crate) fn best_unvisited(&self, order: Order, current: Option<VmId>) -> Option<VmId> {
        let best = match self.tree(order) {
            Some(tree) => {
                let n = self.entries.len();
                let in_tree = match current.and_then(|c| self.position(c)) {
                    Some(p) => tree.max_in(0, p).max(tree.max_in(p + 1, n)),
                    None => tree.max_in(0, n),
                };
                let best = in_tree.max(self.lent_key(order, 0, n, current));
                (best != 0).then(|| Order::id_of(best))
            }
            None => self
                .entries
                .iter()
                .filter(|e| !e.visited && Some(e.id) != current)
                .max_by_key(|e| order.key(e))
                .map(|e| e.id),
        };
        best.or_else(|| current.filter(|&c| self.get(c).is_some_and(|e| !e.visited)))
    }

    /// The first unvisited VM after `current` in ascending ID order,
    /// wrapping, with `current` itself last: the round-robin choice.
    pub(crate) fn next_unvisited_after(&self, current: Option<VmId>) -> Option<VmId> {
        let entries = &self.entries;
        let start = match current {
            Some(c) => entries.partition_point(|e| e.id <= c),
            None => 0,
        };
        match self.tree(Order::Id) {
            Some(tree) => {
                let n = entries.len();
                // Greatest key in Id order is the lowest ID, the lowest
                // position: first the positions above current, then the wrap.
                let first = |lo, hi| {
                    tree.max_in(lo, hi)
                        .max(self.lent_key(Order::Id, lo, hi, None))
                };
                let k = match first(start, n) {
                    0 => first(0, start),
                    k => k,
                };
                (k != 0).then(|| Order::id_of(k))
            }
            None => {
                // `tail` is every ID above current, `head` wraps round to
                // current itself.
                let (head, tail) = entries.split_at(start);
                tail.iter()
                    .chain(head.iter())
                    .find(|e| !e.visited)
                    .map(|e| e.id)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_is_monotone_and_saturates() {
        assert_eq!(Load::from_rate(0.0), Load(0));
        assert_eq!(Load::from_rate(-3.0), Load(0));
        assert_eq!(Load::from_rate(f64::NAN), Load(0));
        // 1 B/s: 8 * log2(2) = 8.
        assert_eq!(Load::from_rate(1.0), Load(8));
        // 1023 B/s: 8 * log2(1024) = 80.
        assert_eq!(Load::from_rate(1023.0), Load(80));
        assert_eq!(Load::from_rate(1e300), Load(255));
        let mut last = Load(0);
        for k in 0..200 {
            let l = Load::from_rate(1.2f64.powi(k));
            assert!(l >= last);
            last = l;
        }
    }

    #[test]
    fn token_keeps_entries_sorted_and_unique() {
        let mut t = Token::new(3, [30, 10, 20, 10]);
        assert_eq!(
            t.entries().iter().map(|e| e.id).collect::<Vec<_>>(),
            [10, 20, 30]
        );
        t.insert(15);
        t.insert(20);
        assert_eq!(t.len(), 4);
        assert_eq!(t.remove(20).map(|e| e.id), Some(20));
        assert!(t.get(20).is_none());
        assert!(t.update(15, 200, Load(9)));
        assert_eq!(t.get(15).unwrap().level, MAX_LEVEL);
        assert!(!t.update(99, 1, Load(0)));
    }

    #[test]
    fn rounds_clear_visited_flags() {
        let mut t = Token::new(0, [1, 2]);
        t.update(1, 1, Load(0));
        assert!(!t.round_complete());
        t.update(2, 1, Load(0));
        assert!(t.round_complete());
        t.start_round();
        assert_eq!(t.round, 1);
        assert!(t.entries().iter().all(|e| !e.visited));
    }
}
