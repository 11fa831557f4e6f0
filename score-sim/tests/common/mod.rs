//! Small worlds shared by the integration tests.

#![allow(dead_code)]

use std::net::Ipv4Addr;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use score_core::topology::{LinkWeights, Topology};
use score_sim::scenario::Scenario;
use score_sim::traffic::Workload;
use score_sim::world::{HostShape, Setup};

/// A regular tree with the first `fanout.len()` paper weights.
pub(crate) fn tree(fanout: &[u32]) -> Topology {
    Topology::regular(
        fanout,
        LinkWeights::paper_truncated(fanout.len()),
        Ipv4Addr::new(10, 0, 0, 1),
    )
    .unwrap()
}

/// Hosts of `slots` slots for 1 GB VMs.
pub(crate) fn shape(slots: u32) -> HostShape {
    HostShape {
        slots,
        mem_mb: u64::from(slots) * 1024,
        vm_mem_mb: 1024,
    }
}

/// Random traffic among `vms` VMs: each pair talks with probability `p`,
/// at a rate drawn uniformly from 1..100.
pub(crate) fn random_workload(vms: u32, p: f64, seed: u64) -> Workload {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut flows = Vec::new();
    for a in 0..vms {
        for b in a + 1..vms {
            if rng.random_bool(p) {
                flows.push((a, b, f64::from(rng.random_range(1u32..100))));
            }
        }
    }
    Workload::from_flows(vms, flows)
}

/// A tiny world with a random initial placement.
pub(crate) fn tiny(fanout: &[u32], slots: u32, vms: u32, p: f64, seed: u64) -> Setup {
    Setup::from_parts(
        tree(fanout),
        random_workload(vms, p, seed),
        shape(slots),
        seed,
    )
    .unwrap()
}

/// A scaled-down paper scenario: 4 hosts per rack, 4 racks per pod, 2 pods
/// per core group, 2 core groups (64 hosts, all four weights), 8 slots.
pub(crate) fn small_scenario(vms: u32, seed: u64) -> Scenario {
    let mut s = Scenario {
        name: "small".into(),
        seed,
        ..Scenario::default()
    };
    if let Some(r) = s.topology.regular.as_mut() {
        r.fanout = vec![4, 4, 2, 2];
    }
    s.host.slots = 8;
    s.host.mem_mb = 8 * 1024;
    s.vms.count = vms;
    s.traffic.tenant_max = 40;
    s.traffic.dynamic.batches = 0;
    s.baselines.ga.generations = 40;
    s.cm_sweep.clear();
    s
}
