//! Token policies (paper §II): who gets the token next.
//!
//! Each policy is a type behind [`TokenPolicy`], in its own file, so a new
//! policy is one new file and one [`PolicyKind`] variant:
//!
//! - [`RoundRobin`]: ascending VM ID after the current holder, wrapping.
//! - [`Distributed`]: the VM whose traffic crosses the highest level first.
//! - [`LoadAware`]: highest level first, then the higher aggregate load.
//! - [`GlobalPolicy`]: the VM whose move saves the most, which needs global
//!   knowledge of traffic and placement: its owner (the simulator, or the
//!   agent's coordinator) computes the ranking with [`rank_by_saving`] after
//!   every move and feeds it in with [`TokenPolicy::feed_ranking`].
//!
//! Policies read only what the token carries (IDs, levels, loads, visited
//! flags), never an oracle's view, except global, whose ranking is fed in.
//!
//! # Cost
//!
//! A token that stays in memory across hand-offs (the simulator) keeps an
//! order index of its unvisited entries, so a choice is O(log n) and a
//! round O(n log n); a token decoded for one hop (the agent) is scanned
//! once, O(n), like its decoding. Both give the same choice: the tests
//! check every policy against the plain scans it was first written as.
//!
//! # Rounds
//!
//! A round ends when every VM in the token has held it once. Round-robin,
//! distributed and load-aware pick among the VMs not yet visited in the
//! round; the current holder is chosen only if it is the only one left, so
//! the token moves on whenever it can. Global ignores the visited flags (it
//! always follows the ranking), so with it a round is counted only when
//! every VM happens to have held the token.
//!
//! The holder hands the token on with [`advance`], which does the
//! bookkeeping: it marks the current VM visited (the holder normally did it
//! already with [`Token::update`]), and when that completes the round it is
//! the holder that clears the flags and counts the round
//! ([`Token::start_round`]) before asking the policy. So whoever calls
//! [`advance`] never sees a policy return `None` for a non-empty token, and
//! both the simulator and the agent run the same loop:
//!
//! ```
//! use score_core::policy::{advance, PolicyKind};
//! use score_core::token::{Load, Token};
//!
//! let mut token = Token::new(0, [1, 2, 3]);
//! let mut policy = PolicyKind::Distributed.build();
//! let mut holder = advance(policy.as_mut(), &mut token, None);
//! for _ in 0..6 {
//!     let vm = holder.unwrap();
//!     // ... decide for `vm`, then record what the holder learnt:
//!     token.update(vm, 1, Load(0));
//!     holder = advance(policy.as_mut(), &mut token, Some(vm));
//! }
//! assert_eq!(token.round, 2);
//! ```

mod distributed;
mod global;
mod load_aware;
mod round_robin;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::token::{Token, VmId};

pub use distributed::Distributed;
pub use global::{
    GlobalPolicy, HostShape, Ranked, best_move, order_from_reports, rank_by_saving, ranking_ids,
};
pub use load_aware::LoadAware;
pub use round_robin::RoundRobin;

/// Chooses the next holder of the token.
pub trait TokenPolicy: fmt::Debug + Send {
    /// The policy's name, as in [`PolicyKind`].
    fn name(&self) -> &'static str;

    /// The VM that should hold the token after `current` (`None`: the token
    /// is fresh). Returns `None` when the token is empty, or when no VM is
    /// left to visit in this round (use [`advance`], which then starts the
    /// next round).
    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId>;

    /// Whether the policy needs a ranking computed from global knowledge
    /// before every hand-off ([`GlobalPolicy`]).
    fn needs_global_knowledge(&self) -> bool {
        false
    }

    /// Gives the policy a ranking of VMs, best first, for its next choice.
    /// Ignored by policies that do not need one.
    fn feed_ranking(&mut self, ranking: Vec<VmId>) {
        let _ = ranking;
    }
}

/// Hands the token on from `current`: marks `current` visited, starts a new
/// round when every VM has been visited, asks the policy, and records the
/// new holder in the token. `None` only for an empty token.
pub fn advance(
    policy: &mut dyn TokenPolicy,
    token: &mut Token,
    current: Option<VmId>,
) -> Option<VmId> {
    token.note_handoff();
    if let Some(c) = current {
        token.mark_visited(c);
    }
    if !token.is_empty() && token.round_complete() {
        token.start_round();
    }
    let mut next = policy.next(token, current);
    if next.is_none() && !token.is_empty() {
        // Only reachable if a policy disagrees with the flags; start afresh
        // rather than lose the token.
        token.start_round();
        next = policy.next(token, current);
    }
    token.holder = next;
    next
}

/// The names of the policies, for configuration and the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PolicyKind {
    /// [`RoundRobin`].
    RoundRobin,
    /// [`GlobalPolicy`].
    Global,
    /// [`Distributed`].
    Distributed,
    /// [`LoadAware`].
    LoadAware,
}

/// Error parsing a [`PolicyKind`] name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The name is not one of the policies.
    #[error("unknown token policy {0:?} (expected round-robin, global, distributed or load-aware)")]
    UnknownPolicy(String),
}

impl PolicyKind {
    /// Every policy, in the paper's order.
    pub const ALL: [PolicyKind; 4] = [
        PolicyKind::RoundRobin,
        PolicyKind::Global,
        PolicyKind::Distributed,
        PolicyKind::LoadAware,
    ];

    /// The policy's name: `round-robin`, `global`, `distributed`, `load-aware`.
    pub fn name(self) -> &'static str {
        match self {
            PolicyKind::RoundRobin => "round-robin",
            PolicyKind::Global => "global",
            PolicyKind::Distributed => "distributed",
            PolicyKind::LoadAware => "load-aware",
        }
    }

    /// A fresh policy of this kind.
    pub fn build(self) -> Box<dyn TokenPolicy> {
        match self {
            PolicyKind::RoundRobin => Box::new(RoundRobin),
            PolicyKind::Global => Box::new(GlobalPolicy::default()),
            PolicyKind::Distributed => Box::new(Distributed),
            PolicyKind::LoadAware => Box::new(LoadAware),
        }
    }

    /// Whether the policy needs global knowledge (only global).
    pub fn needs_global_knowledge(self) -> bool {
        self == PolicyKind::Global
    }
}

impl fmt::Display for PolicyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for PolicyKind {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        PolicyKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| PolicyError::UnknownPolicy(s.to_string()))
    }
}

#[cfg(test)]
mod oracle;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Load;

    #[test]
    fn pick_prefers_others_over_current() {
        let mut t = Token::new(0, [1, 2]);
        t.update(2, 3, Load(0));
        t.get_mut(2).unwrap().visited = false;
        // 2 has the higher level but is the current holder: 1 goes first.
        assert_eq!(Distributed.next(&t, Some(2)), Some(1));
        // 1 visited: only 2 is left, so 2 it is.
        t.get_mut(1).unwrap().visited = true;
        assert_eq!(Distributed.next(&t, Some(2)), Some(2));
        // Both visited: the round is over for the policy.
        t.get_mut(2).unwrap().visited = true;
        assert_eq!(Distributed.next(&t, Some(2)), None);
        assert_eq!(RoundRobin.next(&t, Some(2)), None);
    }

    #[test]
    fn advance_marks_and_rolls_over() {
        let mut t = Token::new(5, [4, 8]);
        let mut p = RoundRobin;
        assert_eq!(advance(&mut p, &mut t, Some(4)), Some(8));
        assert!(t.get(4).unwrap().visited);
        assert_eq!(t.round, 0);
        // Marking 8 completes the round: flags cleared, round counted, and
        // the new round starts after 8.
        assert_eq!(advance(&mut p, &mut t, Some(8)), Some(4));
        assert_eq!(t.round, 1);
        assert!(t.entries().iter().all(|e| !e.visited));
        assert_eq!(t.holder, Some(4));
        assert_eq!(t.epoch, 5);
    }
}
