//! Beyond the paper (docs/EVALUATION.md): the token policies in capacity-tight data
//! centres, with the paper's rule and with swaps and wider candidate sets
//! (score-core's [`score_core::swap`]).
//!
//! For each fill (the paper scenario's VM count, then 80%, 90%, 95% of the
//! slots; same traffic model, seed and topology), every policy runs from the
//! same random placement with each [`Scope`], and is measured against the
//! best centralised baseline (greedy + local search, [`search::run`]): the
//! fraction of its cost reduction, the migrations (a swap is two) against
//! the VMs the baseline moves, the rounds. Two references frame the
//! numbers: the same centralised local search with moves and swaps run from
//! the *initial* placement (what moves and swaps of one or two VMs can reach
//! from there, with global knowledge), and, on instances small enough to
//! enumerate, the exact optimum ([`score_core::optimum::optimum`]).
//!
//! A [`Variant`] is a rule, a [`Scope`], whether group moves are made
//! ([`GroupMode`], score-core's [`score_core::group`]) and c_m: the
//! scenario's (0), or a schedule in fractions of the mean VM cost that
//! starts high and decays each round to a floor ([`CmSchedule`]), so that
//! the large gains are made first and the many small moves are not made.

use std::path::PathBuf;
use std::time::Instant;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use score_core::cost::{CostError, Placement, VmIdx};
use score_core::decision::Rule;
use score_core::optimum::{OptimumError, optimum};
use score_core::policy::PolicyKind;
use score_core::swap::{CandidateSet, Scope, SwapError};
use score_core::topology::{LinkWeights, Topology};
use serde::{Deserialize, Serialize};

use crate::baseline::search;
use crate::engine::{GroupMode, RunOptions, run_policy};
use crate::experiment::ExperimentError;
use crate::plot::{self, SweepLine};
use crate::report::ReportError;
use crate::scenario::{MigrationCostSpec, Scenario};
use crate::traffic::Workload;
use crate::world::{HostShape, Setup, WorldError};

/// What to run.
#[derive(Debug, Clone)]
pub struct CapacityOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Fills to run, as fractions of the slots; `None` stands for the
    /// scenario's own VM count.
    pub fills: Vec<Option<f64>>,
    /// Policies.
    pub policies: Vec<PolicyKind>,
    /// Decision variants.
    pub variants: Vec<Variant>,
    /// Seeds of the small brute-force instances per case (0: none).
    pub small_seeds: u32,
    /// Draw the figure.
    pub plots: bool,
}

impl CapacityOptions {
    /// The runs of docs/EVALUATION.md: the paper's fill, 80%, 90%, 95%;
    /// every policy; the paper's rule alone, with swaps, and with swaps
    /// over the peers' racks; 30 seeds of each small case.
    pub fn standard(out: PathBuf) -> Self {
        CapacityOptions {
            out,
            fills: vec![None, Some(0.80), Some(0.90), Some(0.95)],
            policies: PolicyKind::ALL.to_vec(),
            variants: vec![
                Variant::scope(Scope::PAPER),
                Variant::scope(Scope::swaps(CandidateSet::Paper)),
                Variant::scope(Scope::swaps(CandidateSet::PeerRacks)),
            ],
            small_seeds: 30,
            plots: true,
        }
    }
}

/// c_m decaying over the rounds: round r uses `start` × max(`decay`^r,
/// `floor`) times the mean VM cost at the start (C^A / |V|).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CmSchedule {
    /// c_m of the first round, in mean VM costs.
    pub start: f64,
    /// Factor per round.
    pub decay: f64,
    /// The floor, a fraction of `start`.
    pub floor: f64,
}

/// One way of deciding: rule, scope, group moves, c_m.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Variant {
    /// The rule among candidates.
    pub rule: Rule,
    /// Candidates and swaps.
    pub scope: Scope,
    /// Group moves.
    pub group: GroupMode,
    /// Ejection chains when u would stay.
    pub chain: bool,
    /// Rotations of three VMs when u would stay.
    pub cycle: bool,
    /// Group swaps when u would stay.
    pub gswap: bool,
    /// c_m schedule; `None`: the scenario's c_m, constant.
    pub cm: Option<CmSchedule>,
}

impl Variant {
    /// The paper's rule with this scope, no group moves, the scenario's c_m.
    pub fn scope(scope: Scope) -> Self {
        Variant {
            rule: Rule::PaperFirst,
            scope,
            group: GroupMode::Off,
            chain: false,
            cycle: false,
            gswap: false,
            cm: None,
        }
    }

    /// Its name in reports and on the command line: the scope's label,
    /// `+chain` if ejection chains are on, `+cycle` if rotations are,
    /// `+gswap` if group swaps are, `+group` or `+group-best`, then `@start/decay/floor` if c_m has a
    /// schedule (e.g. `swap+chain+cycle+group@10/0.5/0.003`).
    pub fn label(&self) -> String {
        let chain = if self.chain { "+chain" } else { "" };
        let cycle = if self.cycle { "+cycle" } else { "" };
        let gswap = if self.gswap { "+gswap" } else { "" };
        let mut l = format!(
            "{}{chain}{cycle}{gswap}{}",
            self.scope.label(),
            self.group.suffix()
        );
        if let Some(c) = self.cm {
            l.push_str(&format!("@{}/{}/{}", c.start, c.decay, c.floor));
        }
        l
    }

    /// Run options for the scenario `s`.
    pub fn options(&self, s: &Scenario, max_rounds: u32) -> RunOptions {
        let (cm, cm_decay, cm_floor) = match self.cm {
            None => (s.migration_cost, 1.0, 0.0),
            Some(c) => (MigrationCostSpec::MeanVmFraction(c.start), c.decay, c.floor),
        };
        RunOptions {
            rule: self.rule,
            scope: self.scope,
            group: self.group,
            chain: self.chain,
            cycle: self.cycle,
            gswap: self.gswap,
            cm,
            cm_decay,
            cm_floor,
            max_rounds,
            token_init: s.token_init,
            record_steps: false,
            ..RunOptions::default()
        }
    }
}

impl std::str::FromStr for Variant {
    type Err = SwapError;

    /// Parses [`Variant::label`]'s form, with the paper's rule.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || SwapError::UnknownScope(s.to_string());
        let (head, cm) = match s.split_once('@') {
            None => (s, None),
            Some((h, c)) => {
                let xs: Vec<f64> = c
                    .split('/')
                    .map(|x| x.parse::<f64>().map_err(|_| bad()))
                    .collect::<Result<_, _>>()?;
                let ok = |x: f64| x.is_finite() && x >= 0.0;
                match xs[..] {
                    [start, decay, floor] if ok(start) && ok(decay) && ok(floor) => (
                        h,
                        Some(CmSchedule {
                            start,
                            decay,
                            floor,
                        }),
                    ),
                    [start] if ok(start) => (
                        h,
                        Some(CmSchedule {
                            start,
                            decay: 1.0,
                            floor: 0.0,
                        }),
                    ),
                    _ => return Err(bad()),
                }
            }
        };
        let (scope, group) = if let Some(h) = head.strip_suffix("+group-best") {
            (h, GroupMode::Best)
        } else if let Some(h) = head.strip_suffix("+group") {
            (h, GroupMode::WhenStuck)
        } else {
            (head, GroupMode::Off)
        };
        let (scope, gswap) = match scope.strip_suffix("+gswap") {
            Some(s) => (s, true),
            None => (scope, false),
        };
        let (scope, cycle) = match scope.strip_suffix("+cycle") {
            Some(s) => (s, true),
            None => (scope, false),
        };
        let (scope, chain) = match scope.strip_suffix("+chain") {
            Some(s) => (s, true),
            None => (scope, false),
        };
        Ok(Variant {
            rule: Rule::PaperFirst,
            scope: scope.parse().map_err(|_| bad())?,
            group,
            chain,
            cycle,
            gswap,
            cm,
        })
    }
}

/// One policy run in one fill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VariantRun {
    /// Policy.
    pub policy: String,
    /// Rule.
    pub rule: String,
    /// Scope label (`paper`, `swap`, `swap+peer-racks`, ...).
    pub scope: String,
    /// Cost reduction, percent of the initial cost.
    pub reduction_pct: f64,
    /// That reduction over the best baseline's.
    pub fraction_of_best_baseline: f64,
    /// Live migrations (a swap counts two).
    pub migrations: u64,
    /// Swaps among them.
    pub swaps: u64,
    /// Group moves among them (each one migration per member).
    #[serde(default)]
    pub groups: u64,
    /// Ejection chains among them (each two migrations).
    #[serde(default)]
    pub chains: u64,
    /// Rotations among them (each three migrations).
    #[serde(default)]
    pub rotations: u64,
    /// Group swaps among them (one migration per moving VM).
    #[serde(default)]
    pub group_swaps: u64,
    /// Steps (migrations, swaps, chains, group moves) whose exact change
    /// of the total was zero: moves on rounding noise (0 expected).
    #[serde(default)]
    pub zero_change_steps: u64,
    /// Completed rounds.
    pub rounds: u32,
    /// Rounds until the last that moved a VM.
    pub rounds_to_converge: u32,
    /// Whether a quiet round was reached within the round limit.
    pub converged: bool,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
}

/// One fill.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FillResult {
    /// VMs over slots.
    pub fill: f64,
    /// VMs.
    pub vms: u32,
    /// The best baseline's reduction, percent (greedy + local search).
    pub baseline_reduction_pct: f64,
    /// VMs whose host differs between the initial and the baseline's
    /// placement: the fewest migrations that reach it.
    pub baseline_moved_vms: u64,
    /// The same local search (moves and swaps) from the initial placement:
    /// reduction, percent.
    pub local_search_from_initial_pct: f64,
    /// VMs it moved.
    pub local_search_from_initial_moved_vms: u64,
    /// The policy runs.
    pub runs: Vec<VariantRun>,
}

/// One policy and variant over the small instances of one case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmallRow {
    /// Policy.
    pub policy: String,
    /// Scope label.
    pub scope: String,
    /// Mean of (reduction / optimum's reduction).
    pub mean_fraction: f64,
    /// Its minimum.
    pub min_fraction: f64,
    /// Instances where it is >= 0.95.
    pub at_least_95: u32,
}

/// One small case: a tree, slots per host, VMs, pair probability.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SmallCase {
    /// Fan-out of the tree.
    pub fanout: Vec<u32>,
    /// Slots per host.
    pub slots: u32,
    /// VMs.
    pub vms: u32,
    /// Probability that a pair talks.
    pub pair_prob: f64,
    /// Instances with something to gain (the others are left out).
    pub instances: u32,
    /// Rows per policy and variant.
    pub rows: Vec<SmallRow>,
}

/// Everything [`run_capacity`] measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CapacitySummary {
    /// The scenario's name.
    pub scenario: String,
    /// Per fill.
    pub fills: Vec<FillResult>,
    /// Small instances against the exact optimum.
    pub small: Vec<SmallCase>,
    /// Wall-clock seconds of the whole run.
    pub elapsed_s: f64,
}

/// A small case: (fan-out, slots per host, VMs, pair probability).
pub type SmallSpec = (&'static [u32], u32, u32, f64);

/// The small cases: 67% to 81% of the slots filled, as many VMs as
/// enumeration allows in seconds.
pub const SMALL_CASES: [SmallSpec; 3] = [
    (&[3, 2], 2, 8, 0.4),
    (&[2, 3], 2, 10, 0.3),
    (&[2, 2, 2], 2, 13, 0.25),
];

/// A small instance: random traffic (each pair talks with probability `p`
/// at a rate 1..100) and a random placement within capacity.
pub fn small_setup(
    fanout: &[u32],
    slots: u32,
    vms: u32,
    p: f64,
    seed: u64,
) -> Result<Setup, WorldError> {
    let topo = Topology::regular(
        fanout,
        LinkWeights::paper_truncated(fanout.len()),
        std::net::Ipv4Addr::new(10, 0, 0, 1),
    )
    .map_err(|e| WorldError::Scenario(crate::scenario::ScenarioError::Topology(e)))?;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut flows = Vec::new();
    for a in 0..vms {
        for b in a + 1..vms {
            if rng.random_bool(p) {
                flows.push((a, b, f64::from(rng.random_range(1u32..100))));
            }
        }
    }
    let shape = HostShape {
        slots,
        mem_mb: u64::from(slots) * 1024,
        vm_mem_mb: 1024,
    };
    Setup::from_parts(topo, Workload::from_flows(vms, flows), shape, seed)
}

fn write(path: &std::path::Path, text: String) -> Result<(), ReportError> {
    std::fs::write(path, text).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })
}

fn moved(a: &Placement, b: &Placement) -> u64 {
    (0..a.vm_count())
        .filter(|&u: &VmIdx| a.host(u) != b.host(u))
        .count() as u64
}

fn reduction(initial: f64, cost: f64) -> f64 {
    if initial > 0.0 {
        100.0 * (1.0 - cost / initial)
    } else {
        0.0
    }
}

/// The scenario `s` with static traffic and, with `fill`, that fraction of
/// the slots taken by VMs; its slots in all.
pub fn at_fill(s: &Scenario, fill: Option<f64>) -> Result<(Scenario, u64), WorldError> {
    let mut sc = s.clone();
    sc.traffic.dynamic.batches = 0;
    // Hosts from the tree alone: the scenario's VM count may not fit it.
    let hosts = Topology::from_spec(&sc.topology)
        .map_err(|e| WorldError::Scenario(crate::scenario::ScenarioError::Topology(e)))?
        .host_count();
    let slots = u64::from(sc.slots_per_host()) * u64::from(hosts);
    if let Some(f) = fill {
        sc.vms.count = (f * slots as f64).round() as u32;
    }
    Ok((sc, slots))
}

/// The best centralised baseline (greedy + local search) on `setup`: its
/// cost reduction in percent and the VMs it moves.
pub fn best_baseline(setup: &Setup, sc: &Scenario) -> (f64, u64) {
    let base = search::run(setup, &sc.baselines.search, sc.seed);
    (
        reduction(setup.initial_cost(), base.cost),
        moved(&setup.placement, &base.placement),
    )
}

/// Runs one fill: baseline, local search from the initial placement, and
/// every policy with every variant (in parallel).
fn run_fill(
    s: &Scenario,
    fill: Option<f64>,
    opts: &CapacityOptions,
) -> Result<FillResult, ExperimentError> {
    let (sc, slots) = at_fill(s, fill)?;
    let setup = Setup::build(&sc)?;
    let model = setup.model();
    let initial = setup.initial_cost();
    let (base_red, base_moved) = best_baseline(&setup, &sc);
    let mut ls = setup.placement.clone();
    search::local_search(&model, &mut ls, setup.shape.max_vms(), &sc.baselines.search);
    let ls_red = reduction(initial, model.total_cost(&ls));
    let jobs: Vec<(PolicyKind, Variant)> = opts
        .policies
        .iter()
        .flat_map(|&k| opts.variants.iter().map(move |&v| (k, v)))
        .collect();
    let runs: Result<Vec<VariantRun>, CostError> = jobs
        .par_iter()
        .map(|&(kind, v)| {
            let o = v.options(&sc, sc.rounds);
            let r = run_policy(&setup, kind, &o, |_| {})?;
            let red = r.reduction_pct();
            Ok(VariantRun {
                policy: kind.name().to_string(),
                rule: v.rule.name().to_string(),
                scope: v.label(),
                reduction_pct: red,
                fraction_of_best_baseline: if base_red > 0.0 { red / base_red } else { 0.0 },
                migrations: r.migrations,
                swaps: r.swaps,
                groups: r.groups,
                chains: r.chains,
                rotations: r.rotations,
                group_swaps: r.group_swaps,
                zero_change_steps: r.zero_change_steps,
                rounds: r.rounds,
                rounds_to_converge: r.rounds_to_converge,
                converged: r.converged,
                elapsed_s: r.elapsed_s,
            })
        })
        .collect();
    Ok(FillResult {
        fill: f64::from(setup.vms()) / slots as f64,
        vms: setup.vms(),
        baseline_reduction_pct: base_red,
        baseline_moved_vms: base_moved,
        local_search_from_initial_pct: ls_red,
        local_search_from_initial_moved_vms: moved(&setup.placement, &ls),
        runs: runs?,
    })
}

/// Runs the small cases against the exact optimum: `seeds` instances each;
/// instances where the optimum saves nothing are left out. Also checks
/// that no run beats the optimum (which would be a bug in one of them).
pub fn run_small(
    cases: &[SmallSpec],
    seeds: u32,
    policies: &[PolicyKind],
    variants: &[Variant],
) -> Result<Vec<SmallCase>, ExperimentError> {
    let scenario = Scenario::default();
    let mut out = Vec::new();
    for (k, &(fanout, slots, vms, p)) in cases.iter().enumerate() {
        let per_seed: Vec<Option<Vec<f64>>> = (0..u64::from(seeds))
            .into_par_iter()
            .map(|seed| -> Result<Option<Vec<f64>>, ExperimentError> {
                let setup = small_setup(fanout, slots, vms, p, 1000 * k as u64 + seed)?;
                let model = setup.model();
                let cap = vec![setup.shape.max_vms(); setup.topo.host_count() as usize];
                let opt = match optimum(&model, &cap, Some(&setup.placement), 5_000_000_000) {
                    Ok(o) if o.proven => o,
                    Err(OptimumError::Cost(e)) => return Err(e.into()),
                    // Over budget or unfit: not an instance we can judge.
                    _ => return Ok(None),
                };
                let initial = setup.initial_cost();
                let gain = initial - opt.cost;
                if gain <= 1e-9 * initial.max(1.0) {
                    return Ok(None);
                }
                let mut fr = Vec::new();
                for &kind in policies {
                    for v in variants {
                        let o = RunOptions {
                            token_init: crate::scenario::TokenInit::Measured,
                            ..v.options(&scenario, 50)
                        };
                        let r = run_policy(&setup, kind, &o, |_| {})?;
                        assert!(
                            r.final_cost >= opt.cost - 1e-9 * initial,
                            "a run beat the exact optimum: {} < {}",
                            r.final_cost,
                            opt.cost
                        );
                        fr.push((initial - r.final_cost) / gain);
                    }
                }
                Ok(Some(fr))
            })
            .collect::<Result<_, _>>()?;
        let inst: Vec<&Vec<f64>> = per_seed.iter().flatten().collect();
        let mut rows = Vec::new();
        let mut i = 0;
        for &kind in policies {
            for v in variants {
                let xs: Vec<f64> = inst.iter().map(|v| v[i]).collect();
                let n = xs.len().max(1) as f64;
                rows.push(SmallRow {
                    policy: kind.name().to_string(),
                    scope: v.label(),
                    mean_fraction: xs.iter().sum::<f64>() / n,
                    min_fraction: xs.iter().copied().fold(f64::INFINITY, f64::min),
                    at_least_95: xs.iter().filter(|&&x| x >= 0.95 - 1e-9).count() as u32,
                });
                i += 1;
            }
        }
        out.push(SmallCase {
            fanout: fanout.to_vec(),
            slots,
            vms,
            pair_prob: p,
            instances: inst.len() as u32,
            rows,
        });
    }
    Ok(out)
}

/// The whole experiment: every fill, the small cases, then
/// `capacity.json`, `capacity.md` (the tables of docs/EVALUATION.md) and
/// the figures `capacity-fraction.{png,svg}` and
/// `capacity-migrations.{png,svg}` in the output folder.
pub fn run_capacity(
    s: &Scenario,
    opts: &CapacityOptions,
) -> Result<CapacitySummary, ExperimentError> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|e| ExperimentError::OutDir {
        path: opts.out.display().to_string(),
        source: e,
    })?;
    let mut fills = Vec::new();
    for &f in &opts.fills {
        fills.push(run_fill(s, f, opts)?);
    }
    let small = if opts.small_seeds > 0 {
        run_small(
            &SMALL_CASES,
            opts.small_seeds,
            &opts.policies,
            &opts.variants,
        )?
    } else {
        Vec::new()
    };
    let summary = CapacitySummary {
        scenario: s.name.clone(),
        fills,
        small,
        elapsed_s: started.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&summary).map_err(ReportError::from)?;
    write(&opts.out.join("capacity.json"), json + "\n")?;
    outputs(&summary, opts)?;
    Ok(summary)
}

/// Writes `capacity.md` and the figures of a summary.
pub fn outputs(summary: &CapacitySummary, opts: &CapacityOptions) -> Result<(), ExperimentError> {
    write(&opts.out.join("capacity.md"), markdown(summary))?;
    if opts.plots && !summary.fills.is_empty() {
        plot::fill_lines(
            &opts.out.join("capacity-fraction"),
            "Cost reduction / best centralised baseline's, against fill",
            &lines(summary),
        )?;
        plot::fill_migration_lines(
            &opts.out.join("capacity-migrations"),
            "Live migrations / VMs the best baseline moves, against fill",
            &migration_lines(summary),
        )?;
    }
    Ok(())
}

/// Figure lines of migrations: per variant, the most migrations among the
/// distributed policies over the VMs the best baseline moves; the target
/// (1).
fn migration_lines(s: &CapacitySummary) -> Vec<SweepLine> {
    let mut variants: Vec<String> = Vec::new();
    for r in s.fills.iter().flat_map(|f| &f.runs) {
        if !variants.contains(&r.scope) {
            variants.push(r.scope.clone());
        }
    }
    let mut out = Vec::new();
    let xs: Vec<f64> = s.fills.iter().map(|f| 100.0 * f.fill).collect();
    if let (Some(&a), Some(&b)) = (xs.first(), xs.last()) {
        out.push(SweepLine {
            name: "target: at most the baseline's moves".to_string(),
            points: vec![(a, 1.0), (b, 1.0)],
        });
    }
    for v in &variants {
        let points = s
            .fills
            .iter()
            .filter_map(|f| {
                f.runs
                    .iter()
                    .filter(|r| &r.scope == v && r.policy != "global")
                    .map(|r| r.migrations as f64 / f.baseline_moved_vms.max(1) as f64)
                    .reduce(f64::max)
                    .map(|y| (100.0 * f.fill, y))
            })
            .collect();
        out.push(SweepLine {
            name: format!("{v}: most among distributed policies"),
            points,
        });
    }
    out
}

/// Reads back the `capacity.json` of an earlier run (to redraw its outputs).
pub fn read_summary(path: &std::path::Path) -> Result<CapacitySummary, ExperimentError> {
    let text = std::fs::read_to_string(path).map_err(|source| ReportError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(serde_json::from_str(&text).map_err(ReportError::from)?)
}

/// Figure lines: per variant, the worst of the distributed policies
/// (round-robin, distributed, load-aware: the target is about every one of
/// them); the centralised local search from the initial placement; the
/// target.
fn lines(s: &CapacitySummary) -> Vec<SweepLine> {
    let mut variants: Vec<String> = Vec::new();
    for r in s.fills.iter().flat_map(|f| &f.runs) {
        if !variants.contains(&r.scope) {
            variants.push(r.scope.clone());
        }
    }
    // References first: the palette's first colours stay distinct.
    let mut out = vec![SweepLine {
        name: "centralised local search from the initial placement".to_string(),
        points: s
            .fills
            .iter()
            .map(|f| {
                (
                    100.0 * f.fill,
                    f.local_search_from_initial_pct / f.baseline_reduction_pct,
                )
            })
            .collect(),
    }];
    let xs: Vec<f64> = s.fills.iter().map(|f| 100.0 * f.fill).collect();
    if let (Some(&a), Some(&b)) = (xs.first(), xs.last()) {
        out.push(SweepLine {
            name: "target: 0.95".to_string(),
            points: vec![(a, 0.95), (b, 0.95)],
        });
    }
    for v in &variants {
        let points = s
            .fills
            .iter()
            .filter_map(|f| {
                f.runs
                    .iter()
                    .filter(|r| &r.scope == v && r.policy != "global")
                    .map(|r| r.fraction_of_best_baseline)
                    .reduce(f64::min)
                    .map(|y| (100.0 * f.fill, y))
            })
            .collect();
        out.push(SweepLine {
            name: format!("{v}: worst distributed policy"),
            points,
        });
    }
    out
}

/// The tables of docs/EVALUATION.md.
pub fn markdown(s: &CapacitySummary) -> String {
    let mut t = String::new();
    for f in &s.fills {
        t.push_str(&format!(
            "\n**Fill {:.0}% ({} VMs).** Best baseline (greedy + local search): {:.2}% reduction, \
             {} VMs moved. Local search from the initial placement: {:.2}% ({:.3} of the best), \
             {} VMs moved.\n\n",
            100.0 * f.fill,
            f.vms,
            f.baseline_reduction_pct,
            f.baseline_moved_vms,
            f.local_search_from_initial_pct,
            f.local_search_from_initial_pct / f.baseline_reduction_pct,
            f.local_search_from_initial_moved_vms,
        ));
        t.push_str("| policy | rule | variant | reduction | of best baseline | migrations (swaps, group moves, chains, rotations, group swaps) | of baseline's moves | rounds to converge | steps with zero exact change |\n");
        t.push_str("|---|---|---|---|---|---|---|---|---|\n");
        for r in &f.runs {
            t.push_str(&format!(
                "| {} | {} | {} | {:.2}% | {:.3} | {} ({}, {}, {}, {}, {}) | {:.2} | {}{} | {} |\n",
                r.policy,
                r.rule,
                r.scope,
                r.reduction_pct,
                r.fraction_of_best_baseline,
                r.migrations,
                r.swaps,
                r.groups,
                r.chains,
                r.rotations,
                r.group_swaps,
                r.migrations as f64 / f.baseline_moved_vms.max(1) as f64,
                r.rounds_to_converge,
                if r.converged { "" } else { " (not converged)" },
                r.zero_change_steps,
            ));
        }
    }
    for c in &s.small {
        t.push_str(&format!(
            "\n**Small case: fan-out {:?}, {} slots per host, {} VMs, pair probability {}** \
             ({} instances).\n\n",
            c.fanout, c.slots, c.vms, c.pair_prob, c.instances
        ));
        t.push_str("| policy | variant | mean of optimum's reduction | min | instances >= 95% |\n");
        t.push_str("|---|---|---|---|---|\n");
        for r in &c.rows {
            t.push_str(&format!(
                "| {} | {} | {:.3} | {:.3} | {}/{} |\n",
                r.policy, r.scope, r.mean_fraction, r.min_fraction, r.at_least_95, c.instances
            ));
        }
    }
    t
}
