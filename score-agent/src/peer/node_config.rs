//! The protocol state machine's configuration from the agent's: one
//! mapping from `[node]`, `[peer]` and `[policy]` to score-core's
//! `proto::Config`, so that the shell and its tests build the same node.

use std::time::Duration;

use score_core::{decision::CmDecay, proto::Config, wire::KeyRing};

use crate::cluster::ClusterSettings;

fn ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The key ring: the current key seals, the previous ones are accepted
/// until `now_ms + previous_keys_for` (wall-clock ms).
pub fn key_ring(cfg: &ClusterSettings, now_ms: u64) -> KeyRing {
    let until = now_ms
        .saturating_add(u64::try_from(cfg.peer.previous_keys_for.as_millis()).unwrap_or(u64::MAX));
    cfg.previous_keys
        .iter()
        .fold(KeyRing::new(cfg.key.clone()), |ring, k| {
            ring.accepting(k.clone(), until)
        })
}

/// The node of this agent. `advisory`: the backend moves nothing.
pub fn node_config(cfg: &ClusterSettings, advisory: bool, now_ms: u64) -> Config {
    let mut c = Config::new(
        cfg.node.address,
        cfg.topology.clone(),
        key_ring(cfg, now_ms),
        cfg.watchers.clone(),
    );
    c.policy = cfg.policy.kind;
    c.rule = cfg.policy.rule;
    c.migration_cost = cfg.migration_cost;
    c.vm_slots = cfg.node.vm_slots;
    c.vm_memory_mib = cfg.node.vm_memory_mib;
    c.memory_mib = cfg.node.memory_mib;
    c.min_rate = cfg.policy.min_rate;
    c.token_hold_ns = ns(cfg.policy.token_hold);
    c.hop_timeout_ns = ns(cfg.peer.hop_timeout);
    c.hop_retries = cfg.peer.hop_retries;
    c.request_timeout_ns = ns(cfg.peer.request_timeout);
    c.token_timeout_ns = ns(cfg.peer.token_timeout);
    c.hold_down_ns = ns(cfg.policy.hold_down);
    c.report_interval_ns = ns(cfg.peer.report_interval);
    c.max_age_ms = u64::try_from(cfg.peer.max_datagram_age.as_millis()).unwrap_or(u64::MAX);
    c.scope = cfg.policy.scope();
    c.migration_headroom = cfg.node.migration_headroom;
    c.swap_timeout_ns = ns(cfg.policy.swap_timeout);
    c.chains = cfg.policy.chains;
    c.rotations = cfg.policy.rotations;
    c.groups = cfg.policy.groups;
    c.cm_decay = CmDecay {
        decay: cfg.policy.cm_decay,
        floor: cfg.policy.cm_floor,
    };
    // A promised slot outlives any migration: the swap time-out is the
    // agent's bound on one.
    c.reservation_ns = c.swap_timeout_ns.max(c.reservation_ns);
    c.advisory = advisory;
    // The host at `[peer] coordinator` computes the order and every host
    // takes it; `--coordinator` alone makes this host the coordinator.
    c.coordinator = cfg
        .peer
        .coordinator
        .or(cfg.coordinator.then_some(cfg.node.address));
    c
}
