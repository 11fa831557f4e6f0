//! The token policies as the simulator runs them: they never raise the
//! cost on static traffic, the same seed gives the same result, and the
//! simulator's hand-offs are exactly score-core's own loop (plan, decide,
//! update, advance), which is what the agent runs.

mod common;

use score_core::cost::{CostModel, Placement};
use score_core::decision::{Decision, MigrationCost, Rule, plan};
use score_core::policy::{PolicyKind, advance};
use score_core::token::{Load, Token};
use score_sim::engine::{RunOptions, run_policy};
use score_sim::experiment::{ExperimentOptions, run_scenario};
use score_sim::scenario::{MigrationCostSpec, TokenInit};
use score_sim::world::Setup;

fn checked(cm: MigrationCostSpec, rule: Rule) -> RunOptions {
    RunOptions {
        rule,
        cm,
        max_rounds: 4,
        self_check: true,
        trace: true,
        ..RunOptions::default()
    }
}

#[test]
fn policies_never_raise_the_cost() {
    let s = common::small_scenario(200, 11);
    let setup = Setup::build(&s).unwrap();
    for cm in [
        MigrationCostSpec::Absolute(0.0),
        MigrationCostSpec::VmFraction(0.1),
    ] {
        for rule in [Rule::PaperFirst, Rule::BestBenefit] {
            for kind in PolicyKind::ALL {
                let run = run_policy(&setup, kind, &checked(cm, rule), |_| {}).unwrap();
                let mut last = run.initial_cost;
                for &c in &run.step_costs {
                    assert!(c <= last + 1e-9 * last, "{kind}: cost rose {last} -> {c}");
                    last = c;
                }
                assert!(run.final_cost < run.initial_cost, "{kind}: nothing gained");
                assert!(setup.fits(&run.final_placement));
                assert!(run.migrations > 0);
                let mut moved = vec![false; setup.vms() as usize];
                for &(vm, to) in &run.trace {
                    if to.is_some() {
                        moved[vm as usize] = true;
                    }
                }
                let unmoved = moved.iter().filter(|&&m| !m).count();
                assert_eq!(run.never_moved as usize, unmoved);
            }
        }
    }
}

#[test]
fn same_seed_same_result() {
    let s = common::small_scenario(300, 5);
    let a = Setup::build(&s).unwrap();
    let b = Setup::build(&s).unwrap();
    assert_eq!(a.placement, b.placement);
    for kind in PolicyKind::ALL {
        let o = RunOptions {
            trace: true,
            ..RunOptions::default()
        };
        let ra = run_policy(&a, kind, &o, |_| {}).unwrap();
        let rb = run_policy(&b, kind, &o, |_| {}).unwrap();
        assert_eq!(ra.trace, rb.trace);
        assert_eq!(ra.step_costs, rb.step_costs);
        assert_eq!(ra.final_placement, rb.final_placement);
    }
    let mut other = s.clone();
    other.seed = 6;
    let c = Setup::build(&other).unwrap();
    assert_ne!(a.placement, c.placement);
}

#[test]
fn whole_scenario_is_deterministic() {
    let mut s = common::small_scenario(200, 2);
    s.traffic.dynamic.batches = 2;
    s.cm_sweep = vec![0.0, 0.1];
    let dir = std::env::temp_dir().join(format!("score-sim-det-{}", std::process::id()));
    let opts = |sub: &str| ExperimentOptions {
        out: dir.join(sub),
        progress: false,
        step_csv: true,
        plots: false,
    };
    let x = run_scenario(&s, &opts("a")).unwrap();
    let y = run_scenario(&s, &opts("b")).unwrap();
    let key = |sum: &score_sim::report::Summary| {
        (
            sum.policies
                .iter()
                .map(|p| (p.final_cost, p.migrations))
                .collect::<Vec<_>>(),
            sum.dynamic_policies
                .iter()
                .map(|p| (p.final_cost, p.migrations))
                .collect::<Vec<_>>(),
            sum.baselines
                .iter()
                .map(|b| b.final_cost)
                .collect::<Vec<_>>(),
            sum.cm_sweep
                .iter()
                .map(|p| p.final_cost)
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(key(&x), key(&y));
    let ca = std::fs::read_to_string(dir.join("a/costs.csv")).unwrap();
    let cb = std::fs::read_to_string(dir.join("b/costs.csv")).unwrap();
    assert_eq!(ca, cb);
    assert!(dir.join("a/summary.json").exists());
    assert!(dir.join("a/rounds-dynamic.csv").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Replays a run with nothing but score-core's public functions, in the
/// loop the agent runs (see `score_core::policy`'s documentation), and
/// checks that the simulator made exactly the same hand-offs and moves.
#[test]
fn simulator_runs_score_cores_own_loop() {
    let s = common::small_scenario(250, 9);
    let setup = Setup::build(&s).unwrap();
    for kind in [
        PolicyKind::RoundRobin,
        PolicyKind::Distributed,
        PolicyKind::LoadAware,
    ] {
        let o = RunOptions {
            max_rounds: 4,
            trace: true,
            token_init: TokenInit::Blank,
            ..RunOptions::default()
        };
        let run = run_policy(&setup, kind, &o, |_| {}).unwrap();

        let model = CostModel::new(&setup.topo, &setup.traffic);
        let mut p: Placement = setup.placement.clone();
        let mut token = Token::new(0, 0..setup.vms());
        let mut policy = kind.build();
        let mut holder = advance(policy.as_mut(), &mut token, None);
        let mut replay = Vec::new();
        while let Some(u) = holder {
            if replay.len() == run.trace.len() {
                break;
            }
            let peers = model.peers(&p, u);
            let pl = plan(&setup.topo, u, p.host(u), &peers);
            let d = pl.decide(Rule::PaperFirst, MigrationCost::Absolute(0.0), 1024, |h| {
                Some(setup.shape.capacity(p.count(h)))
            });
            if let Decision::Migrate { to, .. } = d {
                p.move_vm(u, to);
            }
            token.update(u, d.level_after(), Load::from_rate(pl.load));
            replay.push((u, d.target()));
            holder = advance(policy.as_mut(), &mut token, Some(u));
        }
        assert_eq!(replay, run.trace, "{kind}");
        assert_eq!(p, run.final_placement);
    }
}

#[test]
fn global_index_matches_rank_by_saving() {
    // self_check compares the incremental ranking with score-core's full
    // rank_by_saving after every hand-off, also with new flows appearing.
    // 200 VMs in 512 slots, and 480 (94% full, so hosts keep filling up
    // and freeing room).
    for vms in [200, 480] {
        let mut s = common::small_scenario(vms, 4);
        s.traffic.dynamic.batches = 3;
        s.traffic.dynamic.every_rounds = 0.05;
        let setup = Setup::build(&s).unwrap();
        for cm in [
            MigrationCostSpec::Absolute(0.0),
            MigrationCostSpec::VmFraction(0.2),
        ] {
            let o = RunOptions {
                cm,
                max_rounds: 3,
                dynamic: true,
                self_check: true,
                ..RunOptions::default()
            };
            let run = run_policy(&setup, PolicyKind::Global, &o, |_| {}).unwrap();
            assert!(run.migrations > 0);
        }
    }
}

#[test]
fn migration_cost_holds_moves_back() {
    let s = common::small_scenario(300, 8);
    let setup = Setup::build(&s).unwrap();
    let run = |cm| {
        run_policy(
            &setup,
            PolicyKind::Distributed,
            &RunOptions {
                cm,
                ..RunOptions::default()
            },
            |_| {},
        )
        .unwrap()
    };
    let free = run(MigrationCostSpec::Absolute(0.0));
    let dear = run(MigrationCostSpec::MeanVmFraction(0.5));
    let never = run(MigrationCostSpec::TotalFraction(1.0));
    assert!(dear.migrations < free.migrations);
    assert_eq!(never.migrations, 0);
    assert_eq!(never.final_cost, never.initial_cost);
}

#[test]
fn shipped_scenarios_parse_and_paper_toml_is_the_default() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
    let paper = std::fs::read_to_string(dir.join("paper.toml")).unwrap();
    let s = score_sim::scenario::Scenario::from_toml_str(&paper).unwrap();
    assert_eq!(s, score_sim::scenario::Scenario::default());
    let dense = std::fs::read_to_string(dir.join("dense-cm.toml")).unwrap();
    let d = score_sim::scenario::Scenario::from_toml_str(&dense).unwrap();
    d.validate().unwrap();
    assert_eq!(d.policies, vec![PolicyKind::Distributed]);
}
