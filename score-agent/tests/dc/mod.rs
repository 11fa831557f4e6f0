//! A small emulated data centre for the distributed agent's privileged
//! tests: the lab's (score-testbed's `dc`), with its metric reader.
#![allow(unused_imports)]

pub(crate) use score_testbed::dc::{Dc, HTTP, Host, Options, PORT, RunAs, Tree, Vm};
pub(crate) use score_testbed::metrics::value as metric_value;
