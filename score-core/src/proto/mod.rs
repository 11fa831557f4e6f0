//! The peer protocol as a deterministic state machine, one [`Node`] per
//! host (the sans-IO design of quinn-proto and rustls): datagrams received,
//! time, the host's facts and migration outcomes go in; datagrams to send,
//! migrations to start, a wake-up time and typed [`Event`]s come out. No
//! sockets, no clock, no threads, no randomness: the daemon, the simulator
//! (`score-sim protocol`) and the tests drive the same code.
//!
//! It lives in score-core rather than a crate of its own because it is
//! made of score-core's parts (wire format, token, policies, decision) and
//! shares its rule: pure, synchronous, no I/O. A separate crate would only
//! add a dependency edge that every driver already has.
//!
//! The messages, states, time-outs, the duplicate-token rule and the
//! safety argument are in docs/PROTOCOL.md.

mod node;
pub mod swap;

pub use node::{
    Config, Event, HostFacts, MigrationOutcome, NoDecision, Node, Output, Persisted, SwapOutcome,
    TokenStamp, VmFacts,
};
