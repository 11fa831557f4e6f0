//! Helpers the privileged benchmarks share, from the one lab
//! (score-testbed): running commands, entering a network namespace,
//! stopping an agent, naming the machine a result came from.
#![allow(unused_imports)]

pub(crate) use score_testbed::{
    netns::in_netns,
    process::{machine, quiet, sh, terminate as stop_agent},
};
