//! Test bed for the privileged tests, from the one lab (score-testbed):
//! network namespaces standing in for hosts and VMs, veth pairs standing in
//! for vifs, the agent binary run inside them, a real Prometheus.
//! Everything a test creates is removed in `Drop`, also when the test
//! fails. Only what adapts the lab to a test lives here.
#![allow(dead_code, unused_imports)]

pub(crate) mod guest;

pub(crate) use score_testbed::{
    agents::Agent,
    http::url_encode,
    lab::{
        BpfFs, Lab, PING_FRAME, address_host, bridge_link, new_score_programs, ping,
        score_program_ids, udp, udp_frame,
    },
    process::must_sh as sh,
    prometheus::{PROMETHEUS_BIN, Prometheus},
    traffic::{Sink, sink},
};

/// Runs `f` on a thread that has entered network namespace `ns`.
pub(crate) fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    score_testbed::netns::in_netns(ns, move || Ok(f())).unwrap_or_else(|e| panic!("{e:#}"))
}

/// `GET path` on `addr` (`host:port`) from inside `ns`; the body of a 200
/// answer.
pub(crate) fn http_get(ns: &str, addr: &str, path: &str) -> Option<String> {
    let addr = addr.parse().expect("a host:port address");
    score_testbed::http::get(ns, addr, path).unwrap_or_else(|e| panic!("{e:#}"))
}
