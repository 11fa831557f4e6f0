//! score-sim: a data-centre-scale simulator of S-CORE. It generates traffic
//! and a network-agnostic initial placement, then drives score-core's own
//! decision and token-policy code hand-off by hand-off (the same functions
//! the agent calls), runs centralised baselines, and writes the paper's
//! figures.

pub mod baseline;
pub mod engine;
pub mod experiment;
pub mod plot;
pub mod report;
pub mod scenario;
pub mod traffic;
pub mod world;
