//! The S-CORE algorithm as pure, synchronous Rust: the data-centre tree and
//! its cost model (paper eq. 1), the migration decision (eq. 2), the token and
//! its policies, and the wire format of every peer message. No I/O, no clock,
//! no randomness that is not passed in: the agent and the simulator drive the
//! same functions.

pub mod chain;
pub mod cost;
pub mod cycle;
pub mod decision;
pub mod group;
pub mod migcost;
pub mod optimum;
pub mod policy;
pub mod proto;
pub mod swap;
pub mod token;
pub mod topology;
pub mod wire;
