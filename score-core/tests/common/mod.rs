//! What the property tests of the decisions beyond the paper (swap.rs,
//! chain.rs, group.rs) share: a random data centre whose hosts have a
//! capacity, many of them full, and the strategies they draw settings from.

// Each test file compiles this module on its own and uses part of it.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use proptest::prelude::*;
use score_core::cost::{CostModel, Placement, Traffic, VmIdx};
use score_core::decision::{Capacity, MigrationCost};
use score_core::swap::CandidateSet;
use score_core::topology::{HostId, LinkWeights, Topology};

/// A random data centre whose hosts hold at most `cap[h]` VMs.
#[derive(Debug, Clone)]
pub(crate) struct World {
    pub topo: Topology,
    pub traffic: Traffic,
    pub placement: Placement,
    pub cap: Vec<u32>,
}

impl World {
    pub(crate) fn model(&self) -> CostModel<'_> {
        CostModel::new(&self.topo, &self.traffic)
    }

    /// What host `h` answers a capacity request with in placement `p`
    /// (memory never binds here: only slots do).
    pub(crate) fn capacity(&self, p: &Placement, h: HostId) -> Option<Capacity> {
        Some(Capacity {
            free_slots: self.cap[h as usize].saturating_sub(p.count(h)),
            free_mem_mb: 1 << 30,
        })
    }

    /// The VMs on host `x` in placement `p`.
    pub(crate) fn on(&self, p: &Placement, x: HostId) -> Vec<VmIdx> {
        (0..p.vm_count()).filter(|&v| p.host(v) == x).collect()
    }
}

/// How large the drawn data centres are (upper bounds, exclusive).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Shape {
    /// VMs: from 2 up to this.
    pub vms: u32,
    /// Free slots a host with room has at most (also exclusive, from 1).
    pub spare: u32,
    /// Traffic triples at most.
    pub pairs: usize,
    /// The per-host draw of extra slots is `0..extra`: a draw of 0 leaves
    /// the host full, so about 1/extra of the hosts are.
    pub extra: u32,
}

pub(crate) fn rate() -> impl Strategy<Value = f64> {
    prop_oneof![(1u32..6).prop_map(f64::from), 0.01f64..1000.0]
}

pub(crate) fn world(shape: Shape) -> impl Strategy<Value = World> {
    (
        prop::collection::vec(1u32..4, 1..=3),
        2u32..shape.vms,
        1u32..shape.spare,
    )
        .prop_flat_map(move |(fanout, n_vms, spare)| {
            let depth = fanout.len();
            let hosts: u32 = fanout.iter().product();
            (
                Just(fanout),
                Just(spare),
                prop::collection::vec(0.1f64..50.0, depth),
                prop::collection::vec(0..hosts, n_vms as usize),
                prop::collection::vec((0..n_vms, 0..n_vms, rate()), 0..shape.pairs),
                prop::collection::vec(0u32..shape.extra, hosts as usize),
            )
        })
        .prop_map(|(fanout, spare, weights, host_of, triples, extra)| {
            let topo = Topology::regular(
                &fanout,
                LinkWeights::new(weights).unwrap(),
                Ipv4Addr::new(10, 0, 0, 1),
            )
            .unwrap();
            let n = host_of.len() as u32;
            let placement = Placement::new(topo.host_count(), host_of).unwrap();
            let cap = placement
                .counts()
                .iter()
                .zip(&extra)
                .map(|(&c, &e)| c + e.min(spare))
                .collect();
            World {
                traffic: Traffic::from_triples(n, triples).unwrap(),
                placement,
                topo,
                cap,
            }
        })
}

pub(crate) fn cm() -> impl Strategy<Value = MigrationCost> {
    prop_oneof![
        Just(MigrationCost::Absolute(0.0)),
        (0.0f64..0.5).prop_map(MigrationCost::FractionOfVmCost),
        (0.0f64..20.0).prop_map(MigrationCost::Absolute),
        (0.0f64..20.0, 1.0f64..4.0)
            .prop_map(|(bytes, horizon_s)| MigrationCost::Traffic { bytes, horizon_s }),
    ]
}

pub(crate) fn set() -> impl Strategy<Value = CandidateSet> {
    prop::sample::select(CandidateSet::ALL.to_vec())
}

/// Equal up to rounding, relative to `scale`.
pub(crate) fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * scale.abs().max(1.0)
}
