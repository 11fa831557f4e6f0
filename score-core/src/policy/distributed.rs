//! Distributed token policy (paper §II): VMs whose traffic crosses the
//! highest (most costly) level get the token first, since they are the most
//! likely to migrate.

use super::TokenPolicy;
use crate::token::{Order, Token, VmId};

/// The unvisited VM with the highest level in the token, ties to the lower
/// ID. Levels are those the token carries, written by each holder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Distributed;

impl TokenPolicy for Distributed {
    fn name(&self) -> &'static str {
        "distributed"
    }

    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId> {
        token.best_unvisited(Order::Level, current)
    }
}
