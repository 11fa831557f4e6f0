//! Round-robin token policy (paper §II): the token goes to the VMs in
//! ascending order of ID, wrapping from the highest to the lowest.

use super::TokenPolicy;
use crate::token::{Token, VmId};

/// Ascending ID after the current holder, wrapping; skips VMs already
/// visited in this round (a VM that joined mid-round is visited when the
/// order reaches it). Never returns the current VM unless it is the only one.
#[derive(Debug, Clone, Copy, Default)]
pub struct RoundRobin;

impl TokenPolicy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId> {
        next_in_order(token, current)
    }
}

/// The first unvisited VM after `current` in ascending ID order, wrapping,
/// with `current` itself last (O(log n) once the token keeps an index).
pub(crate) fn next_in_order(token: &Token, current: Option<VmId>) -> Option<VmId> {
    token.next_unvisited_after(current)
}
