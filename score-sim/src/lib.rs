//! score-sim: a data-centre-scale simulator of S-CORE. It generates traffic
//! and a network-agnostic initial placement, then drives score-core's own
//! decision and token-policy code hand-off by hand-off (the same functions
//! the agent calls), runs centralised baselines, and writes the paper's
//! figures. Results and how they were made: docs/EVALUATION.md.
//!
//! - [`scenario`]: the TOML scenario (paper defaults) and its validation.
//! - [`traffic`]: the tenant-based traffic model and dynamic flows.
//! - [`world`]: topology, traffic matrix, placement and host capacity.
//! - [`engine`]: one policy's run: [`engine::decide`] (score-core's `plan`
//!   and `Plan::decide`), `Token::update`, `policy::advance`.
//! - [`baseline`]: the genetic algorithm and greedy + local search.
//! - [`capacity`]: beyond the paper (docs/EVALUATION.md): capacity-tight data
//!   centres, swaps and wider candidate sets, the exact optimum of small
//!   instances.
//! - [`experiment`]: a whole scenario in parallel, then [`report`] (JSON,
//!   CSV) and [`plot`] (PNG, SVG).
//!
//! Command line: `score-sim paper --out DIR` (the whole reproduction),
//! `score-sim run --scenario FILE --out DIR`, `score-sim scenario` (prints
//! the default scenario).

pub mod baseline;
pub mod capacity;
pub mod engine;
pub mod experiment;
pub mod migcost;
pub mod plot;
pub mod protocol;
pub mod report;
pub mod scenario;
pub mod traffic;
pub mod world;
