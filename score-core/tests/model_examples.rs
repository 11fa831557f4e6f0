//! Equations 1 and 2 on a small tree, computed by hand (the arithmetic is in
//! the comments), through the public API.

use std::net::Ipv4Addr;

use score_core::cost::{CostModel, Placement, Traffic};
use score_core::decision::{Capacity, Decision, MigrationCost, Peer, Rule, StayReason, plan};
use score_core::topology::{LinkWeights, PAPER_WEIGHTS, Topology};

/// 8 hosts: racks {0,1} {2,3} {4,5} {6,7}, pods {0..3} {4..7}, one core.
/// Weights c = 1, 2, 4, so W(0..=3) = 0, 1, 3, 7.
fn tree() -> Topology {
    Topology::regular(
        &[2, 2, 2],
        LinkWeights::new(vec![1.0, 2.0, 4.0]).unwrap(),
        Ipv4Addr::new(10, 0, 0, 1),
    )
    .unwrap()
}

/// VMs a=0 (host 0), b=1 (host 1), c=2 (host 2), d=3 (host 4), e=4 (host 0).
/// λ(a,b) = 6 + 4 = 10 (given in both directions), λ(a,c) = 5, λ(a,d) = 2,
/// λ(c,d) = 4, λ(a,e) = 8, and c's self traffic is ignored.
fn scenario() -> (Traffic, Placement) {
    let traffic = Traffic::from_triples(
        5,
        [
            (0, 1, 6.0),
            (1, 0, 4.0),
            (0, 2, 5.0),
            (3, 0, 2.0),
            (2, 3, 4.0),
            (0, 4, 8.0),
            (2, 2, 100.0),
        ],
    )
    .unwrap();
    let placement = Placement::new(8, vec![0, 1, 2, 4, 0]).unwrap();
    (traffic, placement)
}

fn all_room(_: u32) -> Option<Capacity> {
    Some(Capacity {
        free_slots: 4,
        free_mem_mb: 4096,
    })
}

#[test]
fn equation_1_by_hand() {
    let topo = tree();
    let (traffic, p) = scenario();
    let m = CostModel::new(&topo, &traffic);
    assert_eq!(traffic.rate(0, 1), 10.0);
    assert_eq!(traffic.rate(1, 0), 10.0);
    assert_eq!(traffic.rate(2, 2), 0.0);
    // Levels: a-b hosts 0,1 same rack -> 1; a-c hosts 0,2 same pod -> 2;
    // a-d hosts 0,4 -> 3; c-d hosts 2,4 -> 3; a-e same host -> 0.
    // C(a) = 10*W(1) + 5*W(2) + 2*W(3) + 8*W(0) = 10*1 + 5*3 + 2*7 + 0 = 39
    assert_eq!(m.vm_cost(&p, 0), 39.0);
    // C(b) = 10*1 = 10
    assert_eq!(m.vm_cost(&p, 1), 10.0);
    // C(c) = 5*3 + 4*7 = 15 + 28 = 43
    assert_eq!(m.vm_cost(&p, 2), 43.0);
    // C(d) = 2*7 + 4*7 = 14 + 28 = 42
    assert_eq!(m.vm_cost(&p, 3), 42.0);
    // C(e) = 8*0 = 0
    assert_eq!(m.vm_cost(&p, 4), 0.0);
    // Eq. 1 literally: 39 + 10 + 43 + 42 + 0 = 134, every pair twice;
    // per pair: 10 + 15 + 14 + 28 + 0 = 67 = 134 / 2.
    assert_eq!(m.total_cost(&p), 134.0);
    assert_eq!(m.total_cost_pairs(&p), 67.0);
    // Levels the token would carry: a 3, b 1, c 3, d 3, e 0.
    let levels: Vec<u8> = (0..5).map(|u| m.vm_level(&p, u)).collect();
    assert_eq!(levels, [3, 1, 3, 3, 0]);
    // Aggregate loads: a 10+5+2+8 = 25, c 5+4 = 9.
    assert_eq!(m.vm_load(0), 25.0);
    assert_eq!(m.vm_load(2), 9.0);
    // Rate per level, pairs once: level 0: 8, 1: 10, 2: 5, 3: 2 + 4 = 6.
    assert_eq!(m.rate_by_level(&p), [8.0, 10.0, 5.0, 6.0]);
}

#[test]
fn equation_2_by_hand() {
    let topo = tree();
    let (traffic, mut p) = scenario();
    let m = CostModel::new(&topo, &traffic);
    // VM c (2) on host 2: peers a on host 0 (λ 5, level 2, cost 5*3 = 15)
    // and d on host 4 (λ 4, level 3, cost 4*7 = 28).
    let pl = plan(&topo, 2, 2, &m.peers(&p, 2));
    assert_eq!(pl.cost_before, 43.0);
    assert_eq!(pl.level, 3);
    assert_eq!(pl.load, 9.0);
    // Candidates, most costly peer first: host 4 (d, 28), then host 0 (a, 15).
    let hosts: Vec<u32> = pl.candidates.iter().map(|c| c.host).collect();
    assert_eq!(hosts, [4, 0]);
    assert_eq!(pl.candidates[0].peer, 3);
    assert_eq!(pl.candidates[0].peer_cost, 28.0);
    assert_eq!(pl.candidates[1].peer_cost, 15.0);
    // On host 4: a is at level 3 (7*5 = 35), d on the same host (0):
    // cost 35, benefit 2*(43 - 35) = 16, level 3.
    assert_eq!(pl.candidates[0].cost_after, 35.0);
    assert_eq!(pl.candidates[0].benefit, 16.0);
    assert_eq!(pl.candidates[0].level_after, 3);
    // On host 0: a on the same host (0), d at level 3 (4*7 = 28):
    // cost 28, benefit 2*(43 - 28) = 30.
    assert_eq!(pl.candidates[1].cost_after, 28.0);
    assert_eq!(pl.candidates[1].benefit, 30.0);

    // Paper's rule, c_m = 0: the first candidate that improves, host 4.
    let d = pl.decide(
        Rule::PaperFirst,
        MigrationCost::Absolute(0.0),
        1024,
        all_room,
    );
    assert_eq!(d.target(), Some(4));
    assert_eq!(d.benefit(), 16.0);
    // Best benefit: host 0 (30 > 16).
    let d = pl.decide(
        Rule::BestBenefit,
        MigrationCost::Absolute(0.0),
        1024,
        all_room,
    );
    assert_eq!(d.target(), Some(0));
    // c_m = 20: host 4 (16) is not worth it, host 0 (30) is.
    let d = pl.decide(
        Rule::PaperFirst,
        MigrationCost::Absolute(20.0),
        1024,
        all_room,
    );
    assert_eq!(d.target(), Some(0));
    // c_m = 30: strict, 30 is not > 30; the best was host 0 with 30.
    let d = pl.decide(
        Rule::PaperFirst,
        MigrationCost::Absolute(30.0),
        1024,
        all_room,
    );
    assert_eq!(
        d,
        Decision::Stay {
            vm: 2,
            host: 2,
            cost_before: 43.0,
            level: 3,
            reason: StayReason::NotWorthIt {
                best_benefit: 30.0,
                best_host: 0,
                c_m: 30.0
            }
        }
    );
    // c_m as a fraction of C(c) = 43: 0.5 * 43 = 21.5, only host 0 qualifies.
    let d = pl.decide(
        Rule::PaperFirst,
        MigrationCost::FractionOfVmCost(0.5),
        1024,
        all_room,
    );
    assert_eq!(d.target(), Some(0));
    if let Decision::Migrate { c_m, .. } = d {
        assert_eq!(c_m, 21.5);
    }
    // Host 4 full: the paper's rule skips it and goes on to host 0.
    let d = pl.decide(Rule::PaperFirst, MigrationCost::Absolute(0.0), 1024, |h| {
        if h == 4 {
            Some(Capacity::default())
        } else {
            all_room(h)
        }
    });
    assert_eq!(d.target(), Some(0));
    // Host 0 lacks memory for a 2048 MiB VM: best-benefit falls back to host 4.
    let d = pl.decide(Rule::BestBenefit, MigrationCost::Absolute(0.0), 2048, |h| {
        Some(Capacity {
            free_slots: 1,
            free_mem_mb: if h == 0 { 1024 } else { 4096 },
        })
    });
    assert_eq!(d.target(), Some(4));

    // The benefit is exactly the drop of the eq. 1 total: move c to host 0.
    // New costs: C(a) = 10*1 + 5*0 + 2*7 = 24, C(b) = 10, C(c) = 28,
    // C(d) = 2*7 + 4*7 = 42, C(e) = 0; total 104 = 134 - 30.
    assert_eq!(m.move_delta(&p, 2, 0), -30.0);
    p.move_vm(2, 0);
    assert_eq!(m.total_cost(&p), 104.0);
}

#[test]
fn equation_2_with_the_papers_weights() {
    // Paper tree: 20 hosts per rack, 8 racks per pod, ... W(1) = 1,
    // W(2) = 1 + e, W(3) = 1 + e + e^3, W(4) = 1 + e + e^3 + e^5.
    let topo = Topology::paper();
    let w1 = PAPER_WEIGHTS[0];
    let w2 = w1 + PAPER_WEIGHTS[1];
    let w3 = w2 + PAPER_WEIGHTS[2];
    let w4 = w3 + PAPER_WEIGHTS[3];
    // u on host 0; z1 on host 1 (same rack) λ 3, z2 on host 20 (next rack,
    // same pod) λ 1, z3 on host 2559 (other core group) λ 1.
    let peers = [
        Peer {
            id: 11,
            host: 1,
            rate: 3.0,
        },
        Peer {
            id: 12,
            host: 20,
            rate: 1.0,
        },
        Peer {
            id: 13,
            host: 2559,
            rate: 1.0,
        },
    ];
    let pl = plan(&topo, 10, 0, &peers);
    // C(u) = 3*W(1) + 1*W(2) + 1*W(4)
    assert_eq!(pl.cost_before, 3.0 * w1 + w2 + w4);
    // Order: z3 (W(4)), z2 (W(2) = 3.72), z1 (3*W(1) = 3).
    let hosts: Vec<u32> = pl.candidates.iter().map(|c| c.host).collect();
    assert_eq!(hosts, [2559, 20, 1]);
    // On host 2559: z1 and z2 at level 4, z3 local: 4*W(4); benefit
    // 2*(3 + W(2) + W(4) - 4 W(4)) < 0.
    assert!(pl.candidates[0].benefit < 0.0);
    // On host 20: z1 at level 2, z2 local, z3 at level 4: 3 W(2) + W(4);
    // benefit 2*(3 + W(2) - 3 W(2)) = 2*(3 - 2 W(2)) = 2*(3 - 7.44) < 0.
    assert!(pl.candidates[1].benefit < 0.0);
    // On host 1: z1 local, z2 at level 2, z3 at level 4: W(2) + W(4);
    // benefit 2 * 3 = 6.
    assert!((pl.candidates[2].benefit - 6.0).abs() < 1e-12);
    let d = pl.decide(
        Rule::PaperFirst,
        MigrationCost::Absolute(0.0),
        1024,
        all_room,
    );
    assert_eq!(d.target(), Some(1));
}

#[test]
fn stay_reasons() {
    let topo = tree();
    // No peers at all.
    let d = plan(&topo, 1, 0, &[]).decide(Rule::PaperFirst, MigrationCost::default(), 0, all_room);
    assert!(d.is_noop());
    assert!(matches!(
        d,
        Decision::Stay {
            reason: StayReason::NoPeers,
            ..
        }
    ));
    // Only peers on its own host.
    let local = [Peer {
        id: 2,
        host: 0,
        rate: 5.0,
    }];
    let d =
        plan(&topo, 1, 0, &local).decide(Rule::PaperFirst, MigrationCost::default(), 0, all_room);
    assert!(
        matches!(d, Decision::Stay { reason: StayReason::AllPeersLocal, cost_before, .. } if cost_before == 0.0)
    );
    // An improving candidate that is full.
    let far = [Peer {
        id: 2,
        host: 7,
        rate: 5.0,
    }];
    let mut asked = Vec::new();
    let d = plan(&topo, 1, 0, &far).decide(Rule::PaperFirst, MigrationCost::default(), 0, |h| {
        asked.push(h);
        None
    });
    assert_eq!(asked, [7]);
    assert!(matches!(
        d,
        Decision::Stay {
            reason: StayReason::NoRoom { asked: 1, .. },
            level: 3,
            ..
        }
    ));
}
