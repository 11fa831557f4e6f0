//! Load-aware token policy (paper §II): the distributed policy, with VMs at
//! the same level ordered by their aggregate load (in and out), higher first.

use super::TokenPolicy;
use crate::token::{Order, Token, VmId};

/// The unvisited VM with the highest level, then the higher load (the
/// token's one-byte [`Load`](crate::token::Load)), then the lower ID.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadAware;

impl TokenPolicy for LoadAware {
    fn name(&self) -> &'static str {
        "load-aware"
    }

    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId> {
        token.best_unvisited(Order::LevelLoad, current)
    }
}
