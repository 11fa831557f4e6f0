//! Centralised baselines: placements computed with global knowledge of the
//! traffic and every host's room, to measure the token policies against.
//! The paper approximated the optimum with a genetic algorithm ([`ga`]); the
//! stronger one here is a greedy placement polished by local search with
//! moves and swaps ([`search`]). Both use score-core's cost model, so their
//! costs are comparable to the policies' to the last bit.

pub mod ga;
pub mod search;

use score_core::cost::Placement;
use serde::Serialize;

/// What a baseline produced.
#[derive(Debug, Clone)]
pub struct BaselineRun {
    /// Name used in files and plots.
    pub name: &'static str,
    /// Equation 1 total of its placement (initial traffic).
    pub cost: f64,
    /// Its placement (within every host's capacity).
    pub placement: Placement,
    /// Wall-clock time, seconds.
    pub elapsed_s: f64,
    /// Counters worth reporting (generations, passes, moves, swaps...).
    pub stats: BaselineStats,
}

/// Counters of a baseline's work.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BaselineStats {
    /// GA: generations run.
    pub generations: u32,
    /// GA: children evaluated.
    pub evaluations: u64,
    /// Search: passes of local search.
    pub passes: u32,
    /// Search: improving moves applied.
    pub moves: u64,
    /// Search: improving swaps applied.
    pub swaps: u64,
    /// Search: cost of the greedy placement before local search.
    pub greedy_cost: f64,
}
