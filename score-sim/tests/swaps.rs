//! Beyond the paper (EVALUATION.md, "Beyond the paper"): the simulator's runs with swaps and wider
//! candidate sets keep its invariants, the scoped decision path equals the
//! paper's when it adds nothing, and on small instances the runs are
//! measured against the exact optimum.

mod common;

use score_core::decision::Rule;
use score_core::policy::PolicyKind;
use score_core::swap::{CandidateSet, Scope};
use score_sim::capacity::{SMALL_CASES, Variant, run_small};
use score_sim::engine::{GroupMode, RunOptions, run_policy};
use score_sim::scenario::MigrationCostSpec;
use score_sim::world::Setup;

fn scopes() -> [Scope; 3] {
    [
        Scope::swaps(CandidateSet::Paper),
        Scope::swaps(CandidateSet::PeerRacks),
        Scope {
            candidates: CandidateSet::PeerPods,
            swaps: false,
            max_swap_asks: None,
        },
    ]
}

#[test]
fn the_scoped_path_with_nothing_added_is_the_papers() {
    let setup = Setup::build(&common::small_scenario(400, 3)).unwrap();
    for kind in PolicyKind::ALL {
        for rule in Rule::ALL {
            let base = RunOptions {
                rule,
                max_rounds: 4,
                trace: true,
                ..RunOptions::default()
            };
            // Not Scope::PAPER (so the engine takes the scoped path), but
            // the same decisions: the paper's candidates, no swaps.
            let scoped = RunOptions {
                scope: Scope {
                    max_swap_asks: Some(3),
                    ..Scope::PAPER
                },
                ..base
            };
            let a = run_policy(&setup, kind, &base, |_| {}).unwrap();
            let b = run_policy(&setup, kind, &scoped, |_| {}).unwrap();
            assert_eq!(a.trace, b.trace, "{kind} {rule}");
            assert_eq!(a.final_cost, b.final_cost);
            assert_eq!(b.swaps, 0);
        }
    }
}

#[test]
fn swaps_keep_the_running_total_exact_and_capacity() {
    // 92% of the slots: many candidate hosts are full.
    let setup = Setup::build(&common::small_scenario(470, 5)).unwrap();
    for kind in PolicyKind::ALL {
        for scope in scopes() {
            let o = RunOptions {
                scope,
                max_rounds: 3,
                self_check: true,
                ..RunOptions::default()
            };
            let r = run_policy(&setup, kind, &o, |_| {}).unwrap();
            assert!(setup.fits(&r.final_placement), "{kind} {}", scope.label());
            assert!(
                r.round_costs
                    .windows(2)
                    .all(|w| w[1] <= w[0] * (1.0 + 1e-12))
            );
            assert!(r.migrations >= 2 * r.swaps);
            if scope.swaps {
                assert!(r.swaps > 0, "{kind} {}: no swap at 92% fill", scope.label());
            }
        }
    }
}

#[test]
fn small_instances_against_the_exact_optimum() {
    let variants = [
        Variant::scope(Scope::PAPER),
        Variant::scope(Scope::swaps(CandidateSet::PeerRacks)),
    ];
    let policies = [PolicyKind::Distributed, PolicyKind::LoadAware];
    // run_small itself asserts that no run beats the optimum.
    let cases = run_small(&SMALL_CASES[..2], 10, &policies, &variants).unwrap();
    for c in &cases {
        assert!(c.instances >= 8);
        for pair in c.rows.chunks(2) {
            let (paper, swap) = (&pair[0], &pair[1]);
            assert_eq!(swap.scope, "swap+peer-racks");
            assert!(paper.mean_fraction <= 1.0 + 1e-9 && swap.mean_fraction <= 1.0 + 1e-9);
            // Measured (30 seeds, release): the paper's rule 0.40-0.49 of
            // the optimum's reduction, swaps over the peers' racks
            // 0.87-0.94. Guard the gain, not the exact figures.
            assert!(
                swap.mean_fraction > paper.mean_fraction + 0.2,
                "{:?}: swaps {} vs paper {}",
                c.fanout,
                swap.mean_fraction,
                paper.mean_fraction
            );
            assert!(
                swap.mean_fraction >= 0.8,
                "{:?}: {}",
                c.fanout,
                swap.mean_fraction
            );
        }
    }
}

#[test]
fn group_moves_and_chains_keep_the_running_total_exact_and_capacity() {
    // 92% of the slots; c_m constant 0 and decaying from one mean VM cost.
    let setup = Setup::build(&common::small_scenario(470, 5)).unwrap();
    for kind in PolicyKind::ALL {
        for group in [GroupMode::WhenStuck, GroupMode::Best] {
            for (cm, cm_decay, cm_floor) in [
                (MigrationCostSpec::Absolute(0.0), 1.0, 0.0),
                (MigrationCostSpec::MeanVmFraction(1.0), 0.5, 0.03),
            ] {
                let o = RunOptions {
                    scope: Scope::swaps(CandidateSet::PeerRacks),
                    group,
                    chain: group == GroupMode::WhenStuck,
                    cm,
                    cm_decay,
                    cm_floor,
                    max_rounds: 4,
                    self_check: true,
                    ..RunOptions::default()
                };
                let r = run_policy(&setup, kind, &o, |_| {}).unwrap();
                assert!(setup.fits(&r.final_placement), "{kind} {group:?}");
                assert!(
                    r.round_costs
                        .windows(2)
                        .all(|w| w[1] <= w[0] * (1.0 + 1e-12))
                );
                assert!(r.migrations >= 2 * r.swaps + r.groups + 2 * r.chains);
                assert!(r.groups > 0, "{kind} {group:?}: no group move");
                if o.chain {
                    assert!(r.chains > 0, "{kind}: no chain at 92% fill");
                }
            }
        }
    }
}

#[test]
fn rotations_keep_the_running_total_exact_and_capacity_on_full_hosts() {
    // Every slot taken: no migration and no chain can happen, only swaps
    // and rotations.
    let setup = Setup::build(&common::small_scenario(512, 7)).unwrap();
    for kind in PolicyKind::ALL {
        let o = RunOptions {
            scope: Scope::swaps(CandidateSet::PeerRacks),
            chain: true,
            cycle: true,
            max_rounds: 4,
            self_check: true,
            ..RunOptions::default()
        };
        let r = run_policy(&setup, kind, &o, |_| {}).unwrap();
        assert!(setup.fits(&r.final_placement), "{kind}");
        assert!(
            r.round_costs
                .windows(2)
                .all(|w| w[1] <= w[0] * (1.0 + 1e-12))
        );
        assert_eq!(r.migrations, 2 * r.swaps + 3 * r.rotations, "{kind}");
        assert_eq!(r.chains, 0, "{kind}: a chain needs a host with room");
        assert!(r.rotations > 0, "{kind}: no rotation on full hosts");
        assert_eq!(r.zero_change_steps, 0, "{kind}");
    }
}

#[test]
fn group_swaps_keep_the_running_total_exact_and_capacity_on_full_hosts() {
    // Every slot taken: swaps, rotations and group swaps only.
    let setup = Setup::build(&common::small_scenario(512, 7)).unwrap();
    let mut made = 0;
    for kind in PolicyKind::ALL {
        let o = RunOptions {
            scope: Scope::swaps(CandidateSet::PeerRacks),
            cycle: true,
            gswap: true,
            max_rounds: 4,
            self_check: true,
            ..RunOptions::default()
        };
        let r = run_policy(&setup, kind, &o, |_| {}).unwrap();
        assert!(setup.fits(&r.final_placement), "{kind}");
        assert!(
            r.round_costs
                .windows(2)
                .all(|w| w[1] <= w[0] * (1.0 + 1e-12))
        );
        assert!(
            r.migrations >= 2 * r.swaps + 3 * r.rotations + 2 * r.group_swaps,
            "{kind}"
        );
        assert_eq!(r.zero_change_steps, 0, "{kind}");
        made += r.group_swaps;
    }
    assert!(made > 0, "no group swap on full hosts");
}

#[test]
fn group_moves_off_change_nothing() {
    let setup = Setup::build(&common::small_scenario(400, 3)).unwrap();
    for kind in PolicyKind::ALL {
        let base = RunOptions {
            scope: Scope::swaps(CandidateSet::PeerRacks),
            max_rounds: 3,
            trace: true,
            ..RunOptions::default()
        };
        // A decay of 1 and a floor keep c_m constant: the same run.
        let same = RunOptions {
            cm_floor: 0.5,
            ..base
        };
        let a = run_policy(&setup, kind, &base, |_| {}).unwrap();
        let b = run_policy(&setup, kind, &same, |_| {}).unwrap();
        assert_eq!(a.trace, b.trace, "{kind}");
        assert_eq!(a.groups, 0);
    }
}

#[test]
fn variants_parse_and_label() {
    for s in [
        "paper",
        "swap+peer-racks",
        "swap+group",
        "paper+group-best",
        "swap+peer-pods+group@1/0.5/0.03",
        "swap@0.1",
        "swap+peer-pods+chain+group",
        "swap+peer-pods+chain+cycle+gswap+group",
    ] {
        let v: Variant = s.parse().unwrap();
        let back = if s == "swap@0.1" { "swap@0.1/1/0" } else { s };
        assert_eq!(v.label(), back);
    }
    let v: Variant = "swap+group@1/0.5/0.03".parse().unwrap();
    assert_eq!(v.group, GroupMode::WhenStuck);
    assert_eq!(v.scope, Scope::swaps(CandidateSet::Paper));
    let c = v.cm.unwrap();
    assert_eq!((c.start, c.decay, c.floor), (1.0, 0.5, 0.03));
    for bad in [
        "swap+grp", "swap@", "swap@1/2", "swap@-1", "group", "swap@x",
    ] {
        assert!(bad.parse::<Variant>().is_err(), "{bad}");
    }
}
