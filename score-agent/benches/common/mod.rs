//! Helpers the privileged benchmarks share, from the one lab
//! (score-testbed): running commands, entering a network namespace,
//! stopping an agent, naming the machine a result came from, and the
//! agent binary under test.
#![allow(unused_imports)]

pub(crate) use score_testbed::{
    netns::in_netns,
    process::{machine, quiet, sh, terminate as stop_agent},
};

/// The `score-agent` binary the benches run: `$SCORE_AGENT_BIN` if set (an
/// earlier build kept aside, to measure before and after in one run), else
/// the one cargo built with the bench.
pub(crate) fn agent_bin() -> std::ffi::OsString {
    std::env::var_os("SCORE_AGENT_BIN").unwrap_or_else(|| env!("CARGO_BIN_EXE_score-agent").into())
}
