//! What a scenario's runs write into the output folder: `summary.json`
//! (the numbers of every policy, baseline and c_m sweep point), CSV files
//! of cost per hand-off and per round, the rack matrices, and the figures.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use serde::Serialize;

use crate::baseline::{BaselineRun, BaselineStats};
use crate::engine::PolicyRun;

/// Errors from writing the outputs.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// A file could not be written.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The summary could not be serialised.
    #[error("cannot serialise the summary: {0}")]
    Json(#[from] serde_json::Error),
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ReportError + '_ {
    move |source| ReportError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// The data centre and traffic of a scenario, as summarised.
#[derive(Debug, Clone, Serialize)]
pub struct SetupSummary {
    /// Scenario name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Hosts.
    pub hosts: u32,
    /// Racks (level-1 groups).
    pub racks: u32,
    /// Fan-out per level (hosts per rack, racks per pod, ...), when regular.
    pub fanout: Option<Vec<u32>>,
    /// Link weights c_1..c_k.
    pub weights: Vec<f64>,
    /// VM slots per host (after memory).
    pub slots_per_host: u32,
    /// VMs.
    pub vms: u32,
    /// VMs / slots.
    pub fill: f64,
    /// Tenants.
    pub tenants: usize,
    /// Largest tenant.
    pub largest_tenant: usize,
    /// Communicating VM pairs.
    pub pairs: usize,
    /// Mean peers per VM.
    pub mean_peers: f64,
    /// Median peers per VM.
    pub median_peers: u32,
    /// Most peers of one VM.
    pub max_peers: u32,
    /// Share of the rate that stays within tenants.
    pub intra_tenant_share: f64,
    /// Share of the rate carried by the busiest 10% of pairs.
    pub top10pct_pairs_share: f64,
    /// New flows appearing during dynamic runs.
    pub dynamic_flows: usize,
    /// Equation 1 total of the initial placement (each pair twice).
    pub initial_cost: f64,
    /// Share of the initial rate at each level (0 same host .. k).
    pub initial_rate_by_level: Vec<f64>,
    /// Decision rule.
    pub rule: String,
    /// c_m as given.
    pub migration_cost: String,
}

/// One policy's results.
#[derive(Debug, Clone, Serialize)]
pub struct PolicySummary {
    /// Policy name.
    pub policy: String,
    /// c_m as score-core applied it.
    pub c_m: String,
    /// Cost at the start.
    pub initial_cost: f64,
    /// Cost at the end.
    pub final_cost: f64,
    /// What the unmoved initial placement costs under the final traffic.
    pub final_cost_unmoved: f64,
    /// Reduction in percent (of `final_cost_unmoved`).
    pub reduction_pct: f64,
    /// This reduction divided by the best baseline's (static runs only).
    pub fraction_of_best_baseline: Option<f64>,
    /// Migrations.
    pub migrations: u64,
    /// Hand-offs.
    pub handoffs: u64,
    /// Completed rounds.
    pub rounds: u32,
    /// Rounds until the last one that moved a VM.
    pub rounds_to_converge: u32,
    /// Whether a quiet round was reached.
    pub converged: bool,
    /// VMs that never moved.
    pub never_moved: u32,
    /// Hand-offs needed to reach 50%, 70% and 75% reduction of the
    /// initial cost (speed of the policy); `None` if never reached.
    pub handoffs_to_reduction: Vec<(f64, Option<u64>)>,
    /// Cost after every completed round.
    pub round_costs: Vec<f64>,
    /// Migrations per round.
    pub round_migrations: Vec<u64>,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
}

impl PolicySummary {
    /// Summarises a run; `best_baseline_reduction` in percent.
    pub fn of(run: &PolicyRun, best_baseline_reduction: Option<f64>) -> Self {
        let red = run.reduction_pct();
        PolicySummary {
            policy: run.policy.name().to_string(),
            c_m: format!("{:?}", run.c_m),
            initial_cost: run.initial_cost,
            final_cost: run.final_cost,
            final_cost_unmoved: run.final_cost_unmoved,
            reduction_pct: red,
            fraction_of_best_baseline: best_baseline_reduction
                .filter(|&b| b > 0.0)
                .map(|b| red / b),
            migrations: run.migrations,
            handoffs: run.handoffs,
            rounds: run.rounds,
            rounds_to_converge: run.rounds_to_converge,
            converged: run.converged,
            never_moved: run.never_moved,
            handoffs_to_reduction: [50.0, 70.0, 75.0]
                .iter()
                .map(|&pct| {
                    let target = run.initial_cost * (1.0 - pct / 100.0);
                    let at = run
                        .step_costs
                        .iter()
                        .position(|&c| c <= target)
                        .map(|i| i as u64 + 1);
                    (pct, at)
                })
                .collect(),
            round_costs: run.round_costs.clone(),
            round_migrations: run.round_migrations.clone(),
            elapsed_s: run.elapsed_s,
        }
    }
}

/// One baseline's results.
#[derive(Debug, Clone, Serialize)]
pub struct BaselineSummary {
    /// Baseline name.
    pub name: String,
    /// Cost of its placement (initial traffic).
    pub final_cost: f64,
    /// Reduction in percent of the initial cost.
    pub reduction_pct: f64,
    /// Wall-clock seconds.
    pub elapsed_s: f64,
    /// Counters.
    pub stats: BaselineStats,
}

impl BaselineSummary {
    /// Summarises a baseline run against the initial cost.
    pub fn of(b: &BaselineRun, initial: f64) -> Self {
        BaselineSummary {
            name: b.name.to_string(),
            final_cost: b.cost,
            reduction_pct: if initial > 0.0 {
                100.0 * (1.0 - b.cost / initial)
            } else {
                0.0
            },
            elapsed_s: b.elapsed_s,
            stats: b.stats.clone(),
        }
    }
}

/// One point of the c_m sweep.
#[derive(Debug, Clone, Serialize)]
pub struct SweepPoint {
    /// Reading of c_m (vm-fraction, mean-vm-fraction, total-fraction).
    pub reading: String,
    /// c_m as a fraction (0.1 = 10%).
    pub fraction: f64,
    /// c_m as score-core applied it.
    pub c_m: String,
    /// Policy swept.
    pub policy: String,
    /// Final cost.
    pub final_cost: f64,
    /// Reduction in percent.
    pub reduction_pct: f64,
    /// Reduction / reduction at c_m = 0 (Fig. 2c's ratio).
    pub ratio: f64,
    /// Migrations.
    pub migrations: u64,
    /// Rounds run.
    pub rounds: u32,
}

/// Everything `summary.json` holds.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    /// The data centre and traffic.
    pub setup: SetupSummary,
    /// Policies on static traffic.
    pub policies: Vec<PolicySummary>,
    /// Policies with new flows appearing during the run (empty if none).
    pub dynamic_policies: Vec<PolicySummary>,
    /// Centralised baselines (initial traffic).
    pub baselines: Vec<BaselineSummary>,
    /// Name of the best baseline.
    pub best_baseline: Option<String>,
    /// c_m sweep (Fig. 2c).
    pub cm_sweep: Vec<SweepPoint>,
    /// Wall-clock seconds of the whole scenario.
    pub elapsed_s: f64,
    /// Worker threads used.
    pub threads: usize,
}

/// Writes `summary.json`.
pub fn write_summary(path: &Path, s: &Summary) -> Result<(), ReportError> {
    write_json(path, s)
}

/// Writes any summary as pretty JSON.
pub fn write_json(path: &Path, s: &impl serde::Serialize) -> Result<(), ReportError> {
    let text = serde_json::to_string_pretty(s)?;
    std::fs::write(path, text + "\n").map_err(io_err(path))
}

/// Writes the cost after every hand-off of each run, long format:
/// `policy,handoff,round,cost` (round = hand-offs / VMs).
pub fn write_step_csv(path: &Path, runs: &[&PolicyRun], vms: u32) -> Result<(), ReportError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(f);
    let e = io_err(path);
    writeln!(w, "policy,handoff,round,cost").map_err(&e)?;
    for r in runs {
        writeln!(w, "{},0,0,{}", r.policy.name(), r.initial_cost).map_err(&e)?;
        for (i, c) in r.step_costs.iter().enumerate() {
            let h = i + 1;
            writeln!(
                w,
                "{},{},{:.5},{}",
                r.policy.name(),
                h,
                h as f64 / f64::from(vms.max(1)),
                c
            )
            .map_err(&e)?;
        }
    }
    w.flush().map_err(&e)
}

/// Writes the cost and migrations after each round: `policy,round,cost,migrations`.
pub fn write_round_csv(path: &Path, runs: &[&PolicyRun]) -> Result<(), ReportError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(f);
    let e = io_err(path);
    writeln!(w, "policy,round,cost,migrations").map_err(&e)?;
    for r in runs {
        for (i, c) in r.round_costs.iter().enumerate() {
            let m = if i == 0 {
                0
            } else {
                r.round_migrations.get(i - 1).copied().unwrap_or(0)
            };
            writeln!(w, "{},{},{},{}", r.policy.name(), i, c, m).map_err(&e)?;
        }
    }
    w.flush().map_err(&e)
}

/// Writes the c_m sweep as CSV.
pub fn write_sweep_csv(path: &Path, pts: &[SweepPoint]) -> Result<(), ReportError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(f);
    let e = io_err(path);
    writeln!(
        w,
        "reading,fraction,policy,final_cost,reduction_pct,ratio,migrations,rounds"
    )
    .map_err(&e)?;
    for p in pts {
        writeln!(
            w,
            "{},{},{},{},{:.4},{:.4},{},{}",
            p.reading,
            p.fraction,
            p.policy,
            p.final_cost,
            p.reduction_pct,
            p.ratio,
            p.migrations,
            p.rounds
        )
        .map_err(&e)?;
    }
    w.flush().map_err(&e)
}

/// Writes a rack-to-rack matrix as CSV (one row per rack).
pub fn write_matrix_csv(path: &Path, m: &[Vec<f64>]) -> Result<(), ReportError> {
    let f = File::create(path).map_err(io_err(path))?;
    let mut w = BufWriter::new(f);
    let e = io_err(path);
    for row in m {
        let line: Vec<String> = row.iter().map(|v| format!("{v:.6e}")).collect();
        writeln!(w, "{}", line.join(",")).map_err(&e)?;
    }
    w.flush().map_err(&e)
}
