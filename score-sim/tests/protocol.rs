//! Without faults, the peer protocol (one score-core `Node` per host, over
//! the simulated network) makes the same decisions as score-sim's
//! decision-only engine on the same world: the same VM at every hand-off,
//! sent to the same host or kept where it is, and so the same placement and
//! cost after every hand-off (docs/PROTOCOL.md, "The protocol decides as
//! the engine does").

use std::net::Ipv4Addr;
use std::sync::Arc;

use score_core::decision::CmDecay;
use score_core::policy::PolicyKind;
use score_core::topology::{RegularSpec, TopologySpec};
use score_sim::protocol::{Comparison, SimConfig, compare};
use score_sim::scenario::MigrationCostSpec;
use score_sim::scenario::Scenario;
use score_sim::world::Setup;

/// A data centre of score-sim's traffic model: 32 hosts (fan-out 4, 4, 2),
/// `vms` VMs placed at random in 16 slots.
fn world(seed: u64, vms: u32) -> Arc<Setup> {
    let mut s = Scenario {
        seed,
        topology: TopologySpec {
            regular: Some(RegularSpec {
                fanout: vec![4, 4, 2],
                first_host: Ipv4Addr::new(10, 0, 0, 1),
            }),
            ..TopologySpec::default()
        },
        ..Scenario::default()
    };
    s.vms.count = vms;
    Arc::new(Setup::build(&s).expect("world"))
}

/// The protocol's configuration for the check: the world's, with no
/// hold-down and no cached locations, the two things by which a node
/// knows less than the engine (docs/PROTOCOL.md).
fn config(seed: u64, vms: u32, policy: PolicyKind) -> SimConfig {
    let mut c = SimConfig::on_world(seed, world(seed, vms));
    c.policy = policy;
    c.hold_down_ns = 0;
    c.location_ttl_ns = 0;
    c.check_every = 1;
    c
}

fn assert_same(seed: u64, vms: u32, policy: PolicyKind, rounds: u32) {
    assert_same_with(&config(seed, vms, policy), rounds);
}

fn assert_same_with(c: &SimConfig, rounds: u32) -> Comparison {
    let (seed, policy) = (c.seed, c.policy);
    let cmp = compare(c, rounds).expect("runs");
    let p = &cmp.protocol;
    assert!(p.violations.is_empty(), "{:?}", p.violations);
    assert_eq!(p.skips, 0, "a fault-free run skips nothing");
    assert!(
        cmp.engine.migrations > 0,
        "the world gives the decisions something to do"
    );
    assert_eq!(
        cmp.first_difference,
        None,
        "seed {seed}, {policy:?}: protocol {} decisions, engine {}",
        p.decisions.len(),
        cmp.engine.handoffs
    );
    assert_eq!(p.migrations, cmp.engine.migrations);
    // The cost after every hand-off: the protocol's running total (each
    // migration's exact change) against the engine's.
    for (i, (a, b)) in p.step_costs.iter().zip(&cmp.engine.step_costs).enumerate() {
        assert!(
            (a - b).abs() <= 1e-9 * b.abs().max(1.0),
            "hand-off {i}: {a} vs {b}"
        );
    }
    assert!((p.cost_end - cmp.engine.final_cost).abs() <= 1e-9 * p.cost_end.max(1.0));
    cmp
}

#[test]
fn the_protocol_decides_as_the_engine_does_distributed() {
    assert_same(1, 256, PolicyKind::Distributed, 3);
}

#[test]
fn the_protocol_decides_as_the_engine_does_round_robin() {
    assert_same(2, 256, PolicyKind::RoundRobin, 3);
}

#[test]
fn the_protocol_decides_as_the_engine_does_load_aware() {
    assert_same(3, 384, PolicyKind::LoadAware, 3);
}

/// With a c_m that decays over the rounds (the engine's `@start/decay/floor`
/// variants), every holder prices with its token's round: the protocol
/// still makes the engine's decisions, and the schedule holds the first
/// rounds back.
#[test]
fn with_a_decaying_c_m_the_protocol_decides_as_the_engine_does() {
    let mut c = config(4, 320, PolicyKind::Distributed);
    c.cm = MigrationCostSpec::MeanVmFraction(2.0);
    c.cm_decay = CmDecay {
        decay: 0.5,
        floor: 0.01,
    };
    let cmp = assert_same_with(&c, 5);
    let flat = compare(&config(4, 320, PolicyKind::Distributed), 1).expect("runs");
    let first = |r: &[u64]| r.first().copied().unwrap_or(0);
    assert!(
        first(&cmp.engine.round_migrations) < first(&flat.engine.round_migrations),
        "the first round's high c_m moves fewer VMs: {:?} vs {:?}",
        cmp.engine.round_migrations,
        flat.engine.round_migrations
    );
}

/// The whole repertoire the node has (swaps, ejection chains, a decaying
/// c_m) on a full data centre of score-sim's traffic model: the protocol
/// reduces the cost about as far as the decision-only engine with the
/// same variant, with no invariant broken, and chains are made.
#[test]
fn the_repertoire_through_the_protocol_tracks_the_engine() {
    let mut s = Scenario::default();
    if let Some(r) = s.topology.regular.as_mut() {
        r.fanout = vec![4, 2, 2];
    }
    let v = "swap+chain@10/0.5/0.003".parse().expect("variant");
    let r = score_sim::protocol::versus_baseline(&s, 0.9, &v, PolicyKind::Distributed, 30)
        .expect("runs");
    let p = &r.protocol;
    assert!(p.violations.is_empty(), "{:?}", p.violations);
    assert!(p.chains_done > 0 && p.swaps_done > 0, "{p:?}");
    assert!(r.protocol_pct > 0.0 && r.protocol_pct <= r.baseline_pct + 1e-9);
    assert!(
        (r.protocol_pct - r.engine.reduction_pct()).abs() < 0.05 * r.baseline_pct,
        "protocol {} %, engine {} %",
        r.protocol_pct,
        r.engine.reduction_pct()
    );
}
