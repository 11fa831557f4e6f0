//! c_m from what a migration costs (docs/EVALUATION.md, "A migration cost
//! from measurements"): the paper's data centre run with c_m = 0 and with
//! score-core's `MigrationCost::Traffic` for several horizons, and what
//! each run's migrations cost in traffic of their own.
//!
//! A migration sends the bytes that score-core's pre-copy model
//! ([`score_core::migcost::precopy`]) gives for the scenario's VM memory:
//! the touched share of it and the pages dirtied while it is sent, over a
//! 1 Gbit/s stream, with the touched share fixed by the real-guest figures
//! of docs/BENCHMARKS.md. The migrations' own traffic is that many bytes
//! times the path weight each migration crossed, in the unit in which the
//! communication cost is a rate, so a run's saving after t seconds is
//! `(initial − final cost) × t − migration traffic` (the migrations taken
//! as made at once).

use std::path::PathBuf;

use score_core::migcost::{Precopy, precopy};
use score_core::policy::PolicyKind;
use serde::Serialize;

use crate::engine::{RunOptions, run_policy};
use crate::experiment::ExperimentError;
use crate::plot::{self, SweepLine};
use crate::scenario::{MigrationCostSpec, Scenario};
use crate::world::Setup;

/// The share of its memory that the idle 256 MiB guest of
/// docs/BENCHMARKS.md sent in a migration (113 MB): pages it had touched.
pub const MEASURED_TOUCHED_SHARE: f64 = 113e6 / (256.0 * 1048576.0);

/// What to run.
#[derive(Debug, Clone)]
pub struct MigCostOptions {
    /// Output folder (created if missing).
    pub out: PathBuf,
    /// Horizons in seconds (c_m = 0 is always run first).
    pub horizons: Vec<f64>,
    /// Policies.
    pub policies: Vec<PolicyKind>,
    /// Pages a VM dirties per second while it migrates, bytes.
    pub dirty_bytes_per_s: f64,
    /// The migration stream's rate, bytes per second.
    pub link_bytes_per_s: f64,
    /// Most token rounds per run.
    pub rounds: u32,
    /// Draw the figure.
    pub plots: bool,
}

/// One run.
#[derive(Debug, Clone, Serialize)]
pub struct MigCostRow {
    /// The policy.
    pub policy: PolicyKind,
    /// The horizon, seconds; `None` for c_m = 0.
    pub horizon_s: Option<f64>,
    /// c_m of a move across the core, in cost units (0 for c_m = 0).
    pub c_m_core: f64,
    /// Live migrations made.
    pub migrations: u64,
    /// Cost reduction, percent of the initial cost.
    pub reduction_pct: f64,
    /// The cost the run removed, per second (cost units).
    pub saving_rate: f64,
    /// The migrations' own traffic, bytes × weight.
    pub migration_traffic: f64,
    /// Seconds until the saving repays the migrations' traffic.
    pub payback_s: f64,
    /// The migrations' traffic in seconds of the initial cost: the data
    /// centre's own traffic cost of that many seconds before any move.
    pub traffic_s: f64,
    /// Net saving after one hour, percent of the initial cost of an hour.
    pub net_1h_pct: f64,
}

/// Everything a run wrote.
#[derive(Debug, Clone, Serialize)]
pub struct MigCostSummary {
    /// VMs.
    pub vms: u32,
    /// A VM's memory, bytes.
    pub memory_bytes: f64,
    /// The initial cost (eq. 1), cost units.
    pub initial_cost: f64,
    /// The modelled migration of one VM.
    pub precopy: PrecopyRow,
    /// The runs.
    pub rows: Vec<MigCostRow>,
}

/// [`Precopy`] as written out.
#[derive(Debug, Clone, Serialize)]
pub struct PrecopyRow {
    /// Bytes sent.
    pub sent_bytes: f64,
    /// Seconds.
    pub total_s: f64,
    /// Seconds paused.
    pub downtime_s: f64,
}

impl From<Precopy> for PrecopyRow {
    fn from(p: Precopy) -> Self {
        PrecopyRow {
            sent_bytes: p.sent_bytes,
            total_s: p.total_s,
            downtime_s: p.downtime_s,
        }
    }
}

/// Runs every policy with c_m = 0 and with each horizon on the scenario's
/// world; `progress` is told each finished run.
pub fn run(
    s: &Scenario,
    opts: &MigCostOptions,
    mut progress: impl FnMut(&MigCostRow),
) -> Result<MigCostSummary, ExperimentError> {
    let setup = Setup::build(s)?;
    let memory_bytes = s.vms.mem_mb as f64 * 1048576.0;
    let model = precopy(
        MEASURED_TOUCHED_SHARE * memory_bytes,
        opts.dirty_bytes_per_s,
        opts.link_bytes_per_s,
        0.3,
        30,
    )
    .ok_or_else(|| ExperimentError::Invalid("the link rate must be > 0".into()))?;
    let bytes = model.sent_bytes;
    let initial = setup.initial_cost();
    let w_core = setup.topo.weights().cumulative(setup.topo.depth());
    let mut rows = Vec::new();
    for &policy in &opts.policies {
        let horizons = std::iter::once(None).chain(opts.horizons.iter().copied().map(Some));
        for horizon_s in horizons {
            let cm = match horizon_s {
                None => MigrationCostSpec::Absolute(0.0),
                Some(h) => MigrationCostSpec::Traffic {
                    bytes,
                    horizon_s: h,
                },
            };
            let run_opts = RunOptions {
                cm,
                max_rounds: opts.rounds,
                record_steps: false,
                ..RunOptions::default()
            };
            let r = run_policy(&setup, policy, &run_opts, |_| {})?;
            let saving_rate = r.initial_cost - r.final_cost;
            let migration_traffic = bytes * r.migration_path_weight;
            let row = MigCostRow {
                policy,
                horizon_s,
                c_m_core: horizon_s.map_or(0.0, |h| bytes * w_core / h),
                migrations: r.migrations,
                reduction_pct: r.reduction_pct(),
                saving_rate,
                migration_traffic,
                payback_s: if saving_rate > 0.0 {
                    migration_traffic / saving_rate
                } else {
                    f64::INFINITY
                },
                traffic_s: migration_traffic / initial,
                net_1h_pct: 100.0 * (saving_rate * 3600.0 - migration_traffic) / (initial * 3600.0),
            };
            progress(&row);
            rows.push(row);
        }
    }
    let summary = MigCostSummary {
        vms: setup.vms(),
        memory_bytes,
        initial_cost: initial,
        precopy: model.into(),
        rows,
    };
    std::fs::create_dir_all(&opts.out).map_err(|source| ExperimentError::OutDir {
        path: opts.out.display().to_string(),
        source,
    })?;
    crate::report::write_json(&opts.out.join("migcost.json"), &summary)?;
    if opts.plots {
        let title = "c_m = 0, then repaid within ".to_string()
            + &opts
                .horizons
                .iter()
                .map(|&h| hours(h))
                .collect::<Vec<_>>()
                .join(", ");
        plot::migrations_vs_reduction(
            &opts.out.join("migcost"),
            &title,
            &tradeoff_lines(&summary),
        )?;
    }
    Ok(summary)
}

/// One line per policy through its runs, c_m = 0 first: (thousands of
/// migrations, cost reduction in %).
fn tradeoff_lines(s: &MigCostSummary) -> Vec<SweepLine> {
    let mut lines: Vec<SweepLine> = Vec::new();
    for r in &s.rows {
        let name = r.policy.name().to_string();
        let p = (r.migrations as f64 / 1000.0, r.reduction_pct);
        match lines.iter_mut().find(|l| l.name == name) {
            Some(l) => l.points.push(p),
            None => lines.push(SweepLine {
                name,
                points: vec![p],
            }),
        }
    }
    lines
}

/// A horizon as people say it.
pub fn hours(s: f64) -> String {
    if s >= 86400.0 && s % 86400.0 == 0.0 {
        format!("{} d", s / 86400.0)
    } else if s >= 3600.0 && s % 3600.0 == 0.0 {
        format!("{} h", s / 3600.0)
    } else if s >= 60.0 && s % 60.0 == 0.0 {
        format!("{} min", s / 60.0)
    } else {
        format!("{s} s")
    }
}

/// The markdown table of a summary.
pub fn table(s: &MigCostSummary) -> String {
    let mut t = String::from(
        "| policy | c_m | c_m across the core | migrations | cost reduction | migrations' traffic (s of the initial cost) | repaid after | net saving in the first hour |\n|---|---|---|---|---|---|---|---|\n",
    );
    for r in &s.rows {
        let cm = r
            .horizon_s
            .map_or("0".to_string(), |h| format!("repaid within {}", hours(h)));
        t.push_str(&format!(
            "| {} | {} | {:.3e} | {} | {:.1}% | {:.0} | {} | {:.1}% |\n",
            r.policy.name(),
            cm,
            r.c_m_core,
            r.migrations,
            r.reduction_pct,
            r.traffic_s,
            if r.payback_s.is_finite() {
                format!("{:.0} s", r.payback_s)
            } else {
                "never".to_string()
            },
            r.net_1h_pct,
        ));
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_horizon_reads_as_people_say_it() {
        assert_eq!(hours(60.0), "1 min");
        assert_eq!(hours(7200.0), "2 h");
        assert_eq!(hours(86400.0), "1 d");
        assert_eq!(hours(90.0), "90 s");
    }

    #[test]
    fn a_shorter_horizon_migrates_less_and_repays_sooner() {
        // 64 hosts of 8 slots (all four weights), 300 VMs, static traffic.
        let mut s = Scenario::default();
        if let Some(r) = s.topology.regular.as_mut() {
            r.fanout = vec![4, 4, 2, 2];
        }
        s.host.slots = 8;
        s.host.mem_mb = 8 * 1024;
        s.vms.count = 300;
        s.traffic.tenant_max = 40;
        s.traffic.dynamic.batches = 0;
        let opts = MigCostOptions {
            out: std::env::temp_dir().join(format!("score-migcost-{}", std::process::id())),
            horizons: vec![86400.0, 600.0],
            policies: vec![PolicyKind::Distributed],
            dirty_bytes_per_s: 20e6,
            link_bytes_per_s: 125e6,
            rounds: 5,
            plots: false,
        };
        let sum = run(&s, &opts, |_| {}).unwrap();
        std::fs::remove_dir_all(&opts.out).ok();
        let [free, day, ten_min] = &sum.rows[..] else {
            panic!("three runs: {:?}", sum.rows);
        };
        assert_eq!(free.c_m_core, 0.0);
        assert!(ten_min.c_m_core > day.c_m_core);
        assert!(free.migrations >= day.migrations && day.migrations >= ten_min.migrations);
        assert!(free.migrations > ten_min.migrations, "{:?}", sum.rows);
        assert!(ten_min.payback_s <= free.payback_s);
        // Each kept move repays its own traffic within the horizon, so a
        // run's traffic is repaid within it too.
        assert!(ten_min.payback_s <= 600.0, "{ten_min:?}");
    }
}
