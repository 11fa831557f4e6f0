//! A whole scenario: every policy from the same placement and traffic (on
//! static traffic, and again with new flows appearing if the scenario has
//! any), the centralised baselines, the c_m sweep, then the summary, CSV
//! files and figures in the output folder. Independent runs go in parallel
//! (rayon); each run is itself sequential and deterministic, so the results
//! do not depend on the number of threads.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;
use score_core::cost::CostError;
use score_core::policy::PolicyKind;

use crate::baseline::{self, BaselineRun};
use crate::engine::{PolicyRun, RunOptions, run_policy};
use crate::plot::{self, Curve, PlotError, SweepLine};
use crate::report::{
    self, BaselineSummary, PolicySummary, ReportError, SetupSummary, Summary, SweepPoint,
};
use crate::scenario::{MigrationCostSpec, Scenario};
use crate::world::{Setup, WorldError};

/// Errors of a scenario run.
#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    /// The scenario or its world could not be built.
    #[error(transparent)]
    World(#[from] WorldError),
    /// score-core refused the traffic.
    #[error("cost model: {0}")]
    Cost(#[from] CostError),
    /// An output could not be written.
    #[error(transparent)]
    Report(#[from] ReportError),
    /// A figure could not be drawn.
    #[error(transparent)]
    Plot(#[from] PlotError),
    /// An option is out of range.
    #[error("{0}")]
    Invalid(String),
    /// The output folder could not be created.
    #[error("cannot create output folder {path}: {source}")]
    OutDir {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How to run a scenario.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Show progress bars on stderr (when it is a terminal).
    pub progress: bool,
    /// Write the per-hand-off CSV files (large at the paper's scale).
    pub step_csv: bool,
    /// Draw the figures.
    pub plots: bool,
}

/// One unit of parallel work.
#[derive(Debug, Clone)]
enum Job {
    Policy { kind: PolicyKind, dynamic: bool },
    Ga,
    Search,
    Sweep { cm: MigrationCostSpec },
}

enum JobOut {
    Policy {
        dynamic: bool,
        run: Box<PolicyRun>,
    },
    Baseline(Box<BaselineRun>),
    Sweep {
        cm: MigrationCostSpec,
        run: Box<PolicyRun>,
    },
}

fn bar(mp: &MultiProgress, len: u64, label: String, enabled: bool) -> ProgressBar {
    if !enabled {
        return ProgressBar::hidden();
    }
    let pb = mp.add(ProgressBar::new(len));
    pb.set_style(
        ProgressStyle::with_template("{prefix:>28} [{bar:30}] {pos:>8}/{len:8} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    pb.set_prefix(label);
    pb
}

/// Runs a scenario and writes its outputs; returns the summary.
pub fn run_scenario(s: &Scenario, opts: &ExperimentOptions) -> Result<Summary, ExperimentError> {
    let started = Instant::now();
    std::fs::create_dir_all(&opts.out).map_err(|source| ExperimentError::OutDir {
        path: opts.out.display().to_string(),
        source,
    })?;
    let setup = Setup::build(s)?;
    let n = setup.vms();
    let initial = setup.initial_cost();

    let mut jobs = Vec::new();
    if s.baselines.enabled {
        jobs.push(Job::Ga);
        jobs.push(Job::Search);
    }
    let dynamic = !setup.workload.events.is_empty();
    for &kind in &s.policies {
        jobs.push(Job::Policy {
            kind,
            dynamic: false,
        });
        if dynamic {
            jobs.push(Job::Policy {
                kind,
                dynamic: true,
            });
        }
    }
    // c_m = 0 is the same run whatever the reading: run it once.
    let mut sweep_zero_done = false;
    for reading in &s.cm_sweep_readings {
        for &f in &s.cm_sweep {
            if f == 0.0 {
                if sweep_zero_done {
                    continue;
                }
                sweep_zero_done = true;
            }
            jobs.push(Job::Sweep {
                cm: reading.with_value(f),
            });
        }
    }

    let mp = MultiProgress::with_draw_target(if opts.progress {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let base = RunOptions {
        rule: s.rule,
        scope: s.scope,
        cm: s.migration_cost,
        max_rounds: s.rounds,
        token_init: s.token_init,
        snapshot_round: None,
        dynamic: false,
        record_steps: true,
        trace: false,
        self_check: false,
        ..RunOptions::default()
    };
    let max_handoffs = u64::from(s.rounds) * u64::from(n);
    let bars: Vec<ProgressBar> = jobs
        .iter()
        .map(|j| {
            let (len, label) = match j {
                Job::Ga => (
                    u64::from(s.baselines.ga.generations),
                    "GA generations".to_string(),
                ),
                Job::Search => (1, "greedy+local search".to_string()),
                Job::Policy { kind, dynamic } => (
                    max_handoffs,
                    format!(
                        "{}{}",
                        kind.name(),
                        if *dynamic { " (dynamic)" } else { "" }
                    ),
                ),
                Job::Sweep { cm } => (
                    max_handoffs,
                    format!("c_m {} {:.0}%", cm.reading(), cm.value() * 100.0),
                ),
            };
            bar(&mp, len, label, opts.progress)
        })
        .collect();

    let outs: Vec<Result<JobOut, ExperimentError>> = jobs
        .par_iter()
        .zip(bars.par_iter())
        .map(|(job, pb)| {
            pb.enable_steady_tick(Duration::from_millis(250));
            let tick = |h: u64| {
                if h.is_multiple_of(1024) {
                    pb.set_position(h);
                }
            };
            let out = match job {
                Job::Ga => JobOut::Baseline(Box::new(baseline::ga::run(
                    &setup,
                    &s.baselines.ga,
                    s.seed,
                    |g| pb.set_position(u64::from(g)),
                ))),
                Job::Search => JobOut::Baseline(Box::new(baseline::search::run(
                    &setup,
                    &s.baselines.search,
                    s.seed,
                ))),
                Job::Policy { kind, dynamic } => {
                    let o = RunOptions {
                        dynamic: *dynamic,
                        snapshot_round: (!*dynamic && *kind == s.cm_sweep_policy)
                            .then_some(s.heatmap_round),
                        ..base
                    };
                    JobOut::Policy {
                        dynamic: *dynamic,
                        run: Box::new(run_policy(&setup, *kind, &o, tick)?),
                    }
                }
                Job::Sweep { cm } => {
                    let o = RunOptions {
                        cm: *cm,
                        record_steps: false,
                        ..base
                    };
                    JobOut::Sweep {
                        cm: *cm,
                        run: Box::new(run_policy(&setup, s.cm_sweep_policy, &o, tick)?),
                    }
                }
            };
            // Runs end early when they converge: show the bar as done.
            if let Some(len) = pb.length() {
                pb.set_position(len);
            }
            pb.finish_with_message("done");
            Ok(out)
        })
        .collect();
    let _ = mp.clear();

    let mut static_runs = Vec::new();
    let mut dynamic_runs = Vec::new();
    let mut baselines = Vec::new();
    let mut sweep = Vec::new();
    for o in outs {
        match o? {
            JobOut::Policy {
                dynamic: false,
                run,
            } => static_runs.push(*run),
            JobOut::Policy { dynamic: true, run } => dynamic_runs.push(*run),
            JobOut::Baseline(b) => baselines.push(*b),
            JobOut::Sweep { cm, run } => sweep.push((cm, *run)),
        }
    }

    // Summaries.
    let best = baselines
        .iter()
        .min_by(|a, b| a.cost.total_cmp(&b.cost))
        .map(|b| (b.name.to_string(), 100.0 * (1.0 - b.cost / initial)));
    let best_red = best.as_ref().map(|b| b.1);
    let policies: Vec<PolicySummary> = static_runs
        .iter()
        .map(|r| PolicySummary::of(r, best_red))
        .collect();
    let dynamic_policies: Vec<PolicySummary> = dynamic_runs
        .iter()
        .map(|r| PolicySummary::of(r, None))
        .collect();
    let baseline_summaries: Vec<BaselineSummary> = baselines
        .iter()
        .map(|b| BaselineSummary::of(b, initial))
        .collect();
    let zero = sweep
        .iter()
        .find(|(cm, _)| cm.value() == 0.0)
        .map(|(_, r)| r.reduction_pct());
    let mut cm_sweep = Vec::new();
    for reading in &s.cm_sweep_readings {
        for &f in &s.cm_sweep {
            let found = sweep
                .iter()
                .find(|(cm, _)| cm.value() == f && (f == 0.0 || cm.reading() == reading.reading()));
            if let Some((_, r)) = found {
                let red = r.reduction_pct();
                cm_sweep.push(SweepPoint {
                    reading: reading.reading().to_string(),
                    fraction: f,
                    c_m: format!("{:?}", r.c_m),
                    policy: s.cm_sweep_policy.name().to_string(),
                    final_cost: r.final_cost,
                    reduction_pct: red,
                    ratio: match zero {
                        Some(z) if z > 0.0 => red / z,
                        _ => 0.0,
                    },
                    migrations: r.migrations,
                    rounds: r.rounds,
                });
            }
        }
    }
    let summary = Summary {
        setup: setup_summary(s, &setup, initial),
        policies,
        dynamic_policies,
        baselines: baseline_summaries,
        best_baseline: best.map(|b| b.0),
        cm_sweep,
        elapsed_s: 0.0,
        threads: rayon::current_num_threads(),
    };

    // Files.
    let out = &opts.out;
    let st: Vec<&PolicyRun> = static_runs.iter().collect();
    let dy: Vec<&PolicyRun> = dynamic_runs.iter().collect();
    report::write_round_csv(&out.join("rounds.csv"), &st)?;
    if !dy.is_empty() {
        report::write_round_csv(&out.join("rounds-dynamic.csv"), &dy)?;
    }
    if opts.step_csv {
        report::write_step_csv(&out.join("costs.csv"), &st, n)?;
        if !dy.is_empty() {
            report::write_step_csv(&out.join("costs-dynamic.csv"), &dy, n)?;
        }
    }
    if !summary.cm_sweep.is_empty() {
        report::write_sweep_csv(&out.join("cm-sweep.csv"), &summary.cm_sweep)?;
    }
    let before = inter_rack(setup.rack_matrix(&setup.placement));
    let after_run = static_runs
        .iter()
        .find(|r| r.policy == s.cm_sweep_policy)
        .or(static_runs.first());
    let after = after_run.map(|r| {
        let p = r.snapshot.as_ref().unwrap_or(&r.final_placement);
        inter_rack(setup.rack_matrix(p))
    });
    report::write_matrix_csv(&out.join("tm-before.csv"), &before)?;
    if let Some(a) = &after {
        report::write_matrix_csv(&out.join("tm-after.csv"), a)?;
    }

    if opts.plots {
        let bl: Vec<(&str, f64)> = baselines.iter().map(|b| (b.name, b.cost)).collect();
        let curves = |runs: &[PolicyRun]| -> Vec<(String, Vec<f64>)> {
            runs.iter()
                .map(|r| (r.policy.name().to_string(), r.step_costs.clone()))
                .collect()
        };
        let cs = curves(&static_runs);
        let cv: Vec<Curve<'_>> = cs
            .iter()
            .map(|(name, c)| Curve { name, costs: c })
            .collect();
        plot::cost_vs_handoffs(
            &out.join("cost-vs-handoffs"),
            "Total communication cost vs token hand-offs (static traffic)",
            initial,
            &cv,
            &bl,
            u64::from(n),
        )?;
        if !dynamic_runs.is_empty() {
            let cd = curves(&dynamic_runs);
            let cv: Vec<Curve<'_>> = cd
                .iter()
                .map(|(name, c)| Curve { name, costs: c })
                .collect();
            plot::cost_vs_handoffs(
                &out.join("cost-vs-handoffs-dynamic"),
                "Total communication cost vs token hand-offs (new flows appear)",
                initial,
                &cv,
                &bl,
                u64::from(n),
            )?;
        }
        if !summary.cm_sweep.is_empty() {
            let lines: Vec<SweepLine> = s
                .cm_sweep_readings
                .iter()
                .map(|rd| SweepLine {
                    name: format!("c_m as {}", reading_label(rd)),
                    points: summary
                        .cm_sweep
                        .iter()
                        .filter(|p| p.reading == rd.reading())
                        .map(|p| (p.fraction * 100.0, p.ratio))
                        .collect(),
                })
                .collect();
            plot::cm_sweep(
                &out.join("cm-sweep"),
                &format!(
                    "Cost reduction vs c_m ({} policy)",
                    s.cm_sweep_policy.name()
                ),
                &lines,
            )?;
        }
        let vmax = before.iter().flatten().copied().fold(0.0, f64::max);
        let total: f64 = before.iter().flatten().sum::<f64>();
        plot::heatmap(
            &out.join("tm-before"),
            &format!(
                "Inter-rack traffic, initial placement (sum {:.3e} B/s)",
                total / 2.0
            ),
            &before,
            vmax,
        )?;
        if let (Some(a), Some(r)) = (&after, after_run) {
            let ta: f64 = a.iter().flatten().sum::<f64>();
            let when = match r.snapshot {
                Some(_) => format!("after round {}", s.heatmap_round.min(r.rounds)),
                None => "at the end".to_string(),
            };
            plot::heatmap(
                &out.join("tm-after"),
                &format!(
                    "Inter-rack traffic, {} {} (sum {:.3e})",
                    r.policy.name(),
                    when,
                    ta / 2.0
                ),
                a,
                vmax,
            )?;
        }
    }
    let mut summary = summary;
    summary.elapsed_s = started.elapsed().as_secs_f64();
    report::write_summary(&out.join("summary.json"), &summary)?;
    Ok(summary)
}

/// Zeroes the diagonal: traffic that stays inside a rack crosses no ToR
/// uplink, and the paper's ToR traffic matrix shows traffic between racks.
fn inter_rack(mut m: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
    for (i, row) in m.iter_mut().enumerate() {
        row[i] = 0.0;
    }
    m
}

fn reading_label(cm: &MigrationCostSpec) -> &'static str {
    match cm {
        MigrationCostSpec::VmFraction(_) => "% of the VM's own cost C(u)",
        MigrationCostSpec::MeanVmFraction(_) => "% of the mean VM cost C/|V|",
        MigrationCostSpec::TotalFraction(_) => "% of the total cost C (literal)",
        MigrationCostSpec::Absolute(_) => "absolute",
        MigrationCostSpec::Traffic { .. } => "s to repay the migration's traffic",
    }
}

fn setup_summary(s: &Scenario, setup: &Setup, initial: f64) -> SetupSummary {
    let w = &setup.workload;
    let mut deg = w.degrees();
    deg.sort_unstable();
    let mut rates: Vec<f64> = w.flows.iter().map(|f| f.rate).collect();
    rates.sort_by(|a, b| b.total_cmp(a));
    let total_rate: f64 = rates.iter().sum();
    let top = rates[..rates.len() / 10].iter().sum::<f64>();
    let by_level = setup.model().rate_by_level(&setup.placement);
    SetupSummary {
        name: s.name.clone(),
        seed: s.seed,
        hosts: setup.topo.host_count(),
        racks: setup.topo.group_count(1),
        fanout: s.topology.regular.as_ref().map(|r| r.fanout.clone()),
        weights: setup.topo.weights().weights().to_vec(),
        slots_per_host: setup.shape.max_vms(),
        vms: setup.vms(),
        fill: f64::from(setup.vms())
            / (f64::from(setup.topo.host_count()) * f64::from(setup.shape.max_vms().max(1))),
        tenants: w.tenants.len(),
        largest_tenant: w.tenants.iter().map(Vec::len).max().unwrap_or(0),
        pairs: w.flows.len(),
        mean_peers: if deg.is_empty() {
            0.0
        } else {
            deg.iter().map(|&d| f64::from(d)).sum::<f64>() / deg.len() as f64
        },
        median_peers: deg.get(deg.len() / 2).copied().unwrap_or(0),
        max_peers: deg.last().copied().unwrap_or(0),
        intra_tenant_share: w.intra_tenant_share(),
        top10pct_pairs_share: if total_rate > 0.0 {
            top / total_rate
        } else {
            0.0
        },
        dynamic_flows: w.events.len(),
        initial_cost: initial,
        initial_rate_by_level: by_level
            .iter()
            .map(|r| {
                if total_rate > 0.0 {
                    r / total_rate
                } else {
                    0.0
                }
            })
            .collect(),
        rule: s.rule.name().to_string(),
        migration_cost: format!("{:?}", s.migration_cost),
    }
}
