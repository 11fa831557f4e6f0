//! The token that circulates among the VMs (paper §II, §III-D): for every VM
//! its 32-bit ID (its IPv4 address), its 8-bit communication level and, for
//! the load-aware policy, a compact aggregate load. The holder of the token
//! for VM u decides for u, updates u's entry, and hands the token on.

use std::net::Ipv4Addr;

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
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Token {
    /// Generation of the token; bumped each time a lost token is regenerated.
    pub epoch: u64,
    /// Number of completed rounds (every VM held the token once).
    pub round: u32,
    /// The VM that holds the token now, if any.
    pub holder: Option<VmId>,
    entries: Vec<TokenEntry>,
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

    /// The entry of a VM.
    pub fn get(&self, id: VmId) -> Option<&TokenEntry> {
        self.entries
            .binary_search_by_key(&id, |e| e.id)
            .ok()
            .map(|i| &self.entries[i])
    }

    /// The entry of a VM, mutably.
    pub fn get_mut(&mut self, id: VmId) -> Option<&mut TokenEntry> {
        match self.entries.binary_search_by_key(&id, |e| e.id) {
            Ok(i) => Some(&mut self.entries[i]),
            Err(_) => None,
        }
    }

    /// Adds a VM (a new one started) or leaves an existing entry alone.
    pub fn insert(&mut self, id: VmId) {
        if let Err(i) = self.entries.binary_search_by_key(&id, |e| e.id) {
            self.entries.insert(i, TokenEntry::new(id));
        }
    }

    /// Removes a VM (it stopped); returns its entry.
    pub fn remove(&mut self, id: VmId) -> Option<TokenEntry> {
        match self.entries.binary_search_by_key(&id, |e| e.id) {
            Ok(i) => Some(self.entries.remove(i)),
            Err(_) => None,
        }
    }

    /// The holder records what it learnt about its VM after deciding: the
    /// VM's level and load now, and that it has held the token this round.
    /// Returns false if the VM is not in the token.
    pub fn update(&mut self, id: VmId, level: u8, load: Load) -> bool {
        match self.get_mut(id) {
            Some(e) => {
                e.level = level.min(MAX_LEVEL);
                e.load = load;
                e.visited = true;
                true
            }
            None => false,
        }
    }

    /// Whether every VM has held the token in this round.
    pub fn round_complete(&self) -> bool {
        self.entries.iter().all(|e| e.visited)
    }

    /// Starts the next round: clears every visited flag and counts the round.
    pub fn start_round(&mut self) {
        for e in &mut self.entries {
            e.visited = false;
        }
        self.round = self.round.wrapping_add(1);
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
