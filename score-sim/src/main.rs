//! The `score-sim` command: parses arguments, loads or builds the scenario,
//! and hands it to the library ([`score_sim::experiment::run_scenario`]).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use score_core::decision::Rule;
use score_core::policy::PolicyKind;
use score_sim::capacity::{CapacityOptions, Variant, outputs, read_summary, run_capacity};
use score_sim::experiment::{ExperimentOptions, run_scenario};
use score_sim::migcost::{self, MigCostOptions};
use score_sim::scenario::Scenario;

/// Data-centre-scale simulator of S-CORE: replays the paper's evaluation
/// on score-core's own decision and token-policy code.
#[derive(Debug, Parser)]
#[command(name = "score-sim", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run the whole paper reproduction (defaults of every scenario field).
    Paper {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        o: Overrides,
    },
    /// Run one scenario file.
    Run {
        /// Scenario TOML file (missing fields take the paper's defaults).
        #[arg(long)]
        scenario: PathBuf,
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        #[command(flatten)]
        o: Overrides,
    },
    /// Print the default (paper) scenario as TOML, a template for `run`.
    Scenario,
    /// The real peer protocol (score-core's `Node`, one per host) over a
    /// simulated network under seeded faults; invariants are checked after
    /// every event. A failing seed is printed and replays exactly.
    Protocol {
        /// First seed.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Number of seeds (runs).
        #[arg(long, default_value_t = 100)]
        seeds: u64,
        /// Hosts, in racks of 4.
        #[arg(long, default_value_t = 8)]
        hosts: u32,
        /// Simulated seconds per run.
        #[arg(long, default_value_t = 3600)]
        seconds: u64,
        /// No faults at all.
        #[arg(long)]
        quiet: bool,
        /// Print every node's events to standard error (to read a failing
        /// seed's run: `--seed N --seeds 1 --trace`).
        #[arg(long)]
        trace: bool,
        /// Instead: the paper's data centre (2,560 hosts, 30,720 VMs)
        /// without faults, until the token completed this many rounds;
        /// prints the time, datagrams and bytes of each round.
        #[arg(long)]
        paper_rounds: Option<u32>,
        /// With --paper-rounds: also run score-sim's decision-only engine
        /// on the same world, check that both made the same decisions, and
        /// draw both cost curves into STEM.png and STEM.svg.
        #[arg(long, value_name = "STEM")]
        plot: Option<PathBuf>,
        /// Seeded runs: ejection chains on every seed (beyond the paper);
        /// on the seeds with swaps, half the hosts get one VM fewer so a
        /// chain's third host has room.
        #[arg(long)]
        chains: bool,
        /// Seeded runs: rotations on every seed (beyond the paper); on the
        /// seeds with swaps every host is full, with one VM of headroom.
        #[arg(long)]
        rotations: bool,
        /// Seeded runs: group moves on every seed (beyond the paper); on
        /// the seeds with swaps, half the hosts get one VM fewer so a group
        /// has somewhere to go.
        #[arg(long)]
        groups: bool,
        /// Seeded runs: c_m as START/DECAY/FLOOR, START in mean VM costs
        /// (C^A / |V| at the start), decayed each round to FLOOR x START
        /// (the capacity variants' `@start/decay/floor`).
        #[arg(long, value_name = "START/DECAY/FLOOR")]
        cm: Option<String>,
        /// Instead: the paper scenario (or --fanout's tree) filled to each
        /// of these fractions of the slots, without faults, each
        /// --variant through the protocol until a quiet round with c_m at
        /// its floor, beside the decision-only engine and the best
        /// centralised baseline (greedy + local search).
        #[arg(long, value_delimiter = ',')]
        fill: Vec<f64>,
        /// With --fill: fan-out of the regular tree instead of the
        /// paper's 20,8,4,4 (20,8,2,2: a quarter of the hosts).
        #[arg(long, value_delimiter = ',')]
        fanout: Vec<u32>,
        /// With --fill: variants as `score-sim capacity` names them, of
        /// what the protocol's node has: `paper` or `swap`, then `+chain`,
        /// then `+cycle` (rotations), then `+group` (group moves when u
        /// would stay), then `@start/decay/floor` (default
        /// swap+chain@10/0.5/0.003).
        #[arg(long, value_delimiter = ',')]
        variant: Vec<Variant>,
        /// With --fill: the token policy.
        #[arg(long, default_value = "distributed")]
        policy: PolicyKind,
        /// With --fill: most rounds per run.
        #[arg(long, default_value_t = 30)]
        max_rounds: u32,
    },
    /// c_m from what a migration costs (docs/EVALUATION.md, "A migration
    /// cost from measurements"): the paper's data centre with c_m = 0 and
    /// with each migration's own traffic (pre-copy model) to be repaid
    /// within each horizon; prints the table, writes OUT/migcost.json and a
    /// figure (migcost.png/.svg).
    MigrationCost(MigCostArgs),
    /// Beyond the paper (docs/EVALUATION.md): the paper scenario at 80%, 90% and 95%
    /// fill, every policy with the paper's rule, with swaps, and with swaps
    /// over the peers' racks; small instances against the exact optimum.
    Capacity {
        /// Output folder.
        #[arg(long)]
        out: PathBuf,
        /// Fills as fractions of the slots (default: the paper's VM count,
        /// 0.8, 0.9, 0.95).
        #[arg(long, value_delimiter = ',')]
        fill: Vec<f64>,
        /// Policies (default: all four).
        #[arg(long, value_delimiter = ',')]
        policy: Vec<PolicyKind>,
        /// Decision variants, each `paper`, `swap`, `swap+<set>` or a
        /// candidate set (peer-racks, peer-pods, all), all with the paper's
        /// rule (default: paper, swap, swap+peer-racks); then `+chain`
        /// (ejection chains when u would stay); then `+cycle` (rotations of
        /// three VMs on full hosts when u would stay); then `+gswap` (group
        /// swaps when u would stay); then `+group`
        /// (group moves when u would stay) or `+group-best` (when better);
        /// then `@start/decay/floor`: c_m of round r = start × max(decay^r,
        /// floor) mean VM costs (e.g. `swap+group@1/0.5/0.03`).
        #[arg(long, value_delimiter = ',')]
        variant: Vec<Variant>,
        /// Fan-out of the regular tree instead of the paper's 20,8,4,4
        /// (e.g. 20,8,2,2: a quarter of the paper's hosts).
        #[arg(long, value_delimiter = ',')]
        fanout: Vec<u32>,
        /// Seeds per small brute-force case (0: skip them).
        #[arg(long, default_value_t = 30)]
        small_seeds: u32,
        /// Most token rounds per run.
        #[arg(long, default_value_t = 30)]
        rounds: u32,
        /// Do not draw the figure.
        #[arg(long)]
        no_plots: bool,
        /// Only redraw the tables and the figure from OUT/capacity.json.
        #[arg(long)]
        replot: bool,
        /// Worker threads (default: all cores).
        #[arg(long)]
        threads: Option<usize>,
    },
}

/// Options of `score-sim migration-cost`.
#[derive(Debug, Args)]
struct MigCostArgs {
    /// Output folder.
    #[arg(long)]
    out: PathBuf,
    /// Horizons within which a migration's traffic must be repaid, seconds.
    #[arg(long, value_delimiter = ',', default_values_t = [3600.0, 600.0, 60.0, 10.0])]
    horizon: Vec<f64>,
    /// Policies (default: all four).
    #[arg(long, value_delimiter = ',')]
    policy: Vec<PolicyKind>,
    /// Memory a VM dirties per second while it migrates, MB/s.
    #[arg(long, default_value_t = 20.0)]
    dirty_mb_s: f64,
    /// The migration stream's rate, Mbit/s.
    #[arg(long, default_value_t = 1000.0)]
    link_mbit: f64,
    /// Most token rounds per run.
    #[arg(long, default_value_t = 30)]
    rounds: u32,
    /// Do not draw the figures.
    #[arg(long)]
    no_plots: bool,
}

/// Command-line overrides of scenario fields.
#[derive(Debug, Args)]
struct Overrides {
    /// Seed of traffic, placement and baselines.
    #[arg(long)]
    seed: Option<u64>,
    /// Number of VMs.
    #[arg(long)]
    vms: Option<u32>,
    /// Most token rounds per policy.
    #[arg(long)]
    rounds: Option<u32>,
    /// Policies to run (repeat or comma-separate): round-robin, global,
    /// distributed, load-aware.
    #[arg(long, value_delimiter = ',')]
    policy: Vec<PolicyKind>,
    /// Decision rule: paper-first or best-benefit.
    #[arg(long)]
    rule: Option<Rule>,
    /// c_m as a fraction of the deciding VM's own cost (0.1 = 10%).
    #[arg(long)]
    cm: Option<f64>,
    /// Batches of new flows during the run (0: static traffic only).
    #[arg(long)]
    dynamic_batches: Option<u32>,
    /// Generations of the genetic algorithm.
    #[arg(long)]
    ga_generations: Option<u32>,
    /// Skip the centralised baselines.
    #[arg(long)]
    no_baselines: bool,
    /// Skip the c_m sweep (Fig. 2c).
    #[arg(long)]
    no_sweep: bool,
    /// Do not write the per-hand-off CSV files.
    #[arg(long)]
    no_step_csv: bool,
    /// Do not draw figures.
    #[arg(long)]
    no_plots: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
    /// Worker threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
}

impl Overrides {
    fn apply(&self, s: &mut Scenario) {
        if let Some(v) = self.seed {
            s.seed = v;
        }
        if let Some(v) = self.vms {
            s.vms.count = v;
        }
        if let Some(v) = self.rounds {
            s.rounds = v;
        }
        if !self.policy.is_empty() {
            s.policies = self.policy.clone();
        }
        if let Some(v) = self.rule {
            s.rule = v;
        }
        if let Some(v) = self.cm {
            s.migration_cost = score_sim::scenario::MigrationCostSpec::VmFraction(v);
        }
        if let Some(v) = self.dynamic_batches {
            s.traffic.dynamic.batches = v;
        }
        if let Some(v) = self.ga_generations {
            s.baselines.ga.generations = v;
        }
        if self.no_baselines {
            s.baselines.enabled = false;
        }
        if self.no_sweep {
            s.cm_sweep.clear();
        }
    }
}

fn run(mut s: Scenario, out: &Path, o: &Overrides) -> anyhow::Result<()> {
    o.apply(&mut s);
    s.validate().context("invalid scenario")?;
    if let Some(t) = o.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot start the worker threads")?;
    }
    let opts = ExperimentOptions {
        out: out.to_path_buf(),
        progress: !o.quiet,
        step_csv: !o.no_step_csv,
        plots: !o.no_plots,
    };
    let sum = run_scenario(&s, &opts)?;
    println!(
        "{}: {} hosts, {} VMs, initial cost {:.4e} (eq. 1, each pair twice)",
        s.name, sum.setup.hosts, sum.setup.vms, sum.setup.initial_cost
    );
    for b in &sum.baselines {
        println!(
            "  baseline {:<22} reduction {:6.2}%  ({:.1} s)",
            b.name, b.reduction_pct, b.elapsed_s
        );
    }
    for p in &sum.policies {
        println!(
            "  policy   {:<22} reduction {:6.2}%  of best baseline {:>6}  migrations {:>7}  rounds {:>2}  never moved {:>6}  ({:.1} s)",
            p.policy,
            p.reduction_pct,
            p.fraction_of_best_baseline
                .map(|f| format!("{:.1}%", f * 100.0))
                .unwrap_or_else(|| "-".into()),
            p.migrations,
            p.rounds_to_converge,
            p.never_moved,
            p.elapsed_s
        );
    }
    for p in &sum.dynamic_policies {
        println!(
            "  dynamic  {:<22} reduction {:6.2}%  migrations {:>7}  ({:.1} s)",
            p.policy, p.reduction_pct, p.migrations, p.elapsed_s
        );
    }
    for p in &sum.cm_sweep {
        println!(
            "  c_m {:>16} {:>4.0}%  reduction {:6.2}%  ratio {:.3}  migrations {}",
            p.reading,
            p.fraction * 100.0,
            p.reduction_pct,
            p.ratio,
            p.migrations
        );
    }
    println!("outputs in {}; total {:.1} s", out.display(), sum.elapsed_s);
    Ok(())
}

/// The `capacity` command's arguments.
struct CapacityArgs {
    out: PathBuf,
    fill: Vec<f64>,
    policy: Vec<PolicyKind>,
    variant: Vec<Variant>,
    fanout: Vec<u32>,
    small_seeds: u32,
    rounds: u32,
    no_plots: bool,
    replot: bool,
    threads: Option<usize>,
}

fn migration_cost(a: MigCostArgs) -> anyhow::Result<()> {
    if let Some(h) = a.horizon.iter().find(|h| !(h.is_finite() && **h > 0.0)) {
        anyhow::bail!("--horizon {h}: a horizon is a number of seconds > 0");
    }
    if !(a.dirty_mb_s.is_finite() && a.dirty_mb_s >= 0.0) {
        anyhow::bail!("--dirty-mb-s {}: must be a number >= 0", a.dirty_mb_s);
    }
    if !(a.link_mbit.is_finite() && a.link_mbit > 0.0) {
        anyhow::bail!("--link-mbit {}: must be a number > 0", a.link_mbit);
    }
    let opts = MigCostOptions {
        out: a.out,
        horizons: a.horizon,
        policies: if a.policy.is_empty() {
            PolicyKind::ALL.to_vec()
        } else {
            a.policy
        },
        dirty_bytes_per_s: a.dirty_mb_s * 1e6,
        link_bytes_per_s: a.link_mbit * 1e6 / 8.0,
        rounds: a.rounds,
        plots: !a.no_plots,
    };
    let s = Scenario::default();
    let started = std::time::Instant::now();
    let summary = migcost::run(&s, &opts, |r| {
        eprintln!(
            "migration-cost: {} c_m {}: {} migrations, {:.1}% lower cost",
            r.policy.name(),
            r.horizon_s.map_or("0".to_string(), |h| format!(
                "repaid within {}",
                migcost::hours(h)
            )),
            r.migrations,
            r.reduction_pct
        );
    })?;
    println!(
        "one migration of a {} MiB VM: {:.0} MB sent in {:.2} s, {:.0} ms paused (pre-copy model)",
        summary.memory_bytes / 1048576.0,
        summary.precopy.sent_bytes / 1e6,
        summary.precopy.total_s,
        summary.precopy.downtime_s * 1e3
    );
    print!("{}", migcost::table(&summary));
    eprintln!(
        "migration-cost: done in {:.1} s; {}",
        started.elapsed().as_secs_f64(),
        opts.out.display()
    );
    Ok(())
}

fn capacity(a: CapacityArgs) -> anyhow::Result<()> {
    if let Some(t) = a.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build_global()
            .context("cannot start the worker threads")?;
    }
    let mut opts = CapacityOptions::standard(a.out.clone());
    if !a.fill.is_empty() {
        opts.fills = a.fill.iter().map(|&f| Some(f)).collect();
    }
    if !a.policy.is_empty() {
        opts.policies = a.policy;
    }
    if !a.variant.is_empty() {
        opts.variants = a.variant;
    }
    opts.small_seeds = a.small_seeds;
    opts.plots = !a.no_plots;
    let mut s = Scenario {
        rounds: a.rounds,
        ..Scenario::default()
    };
    if !a.fanout.is_empty() {
        if let Some(r) = s.topology.regular.as_mut() {
            r.fanout = a.fanout.clone();
        }
        s.name = format!("paper-fanout-{:?}", a.fanout);
        if opts.fills.contains(&None) {
            // The paper's VM count fits only the paper's tree: its fill.
            let d = Scenario::default();
            let hosts = d.validate().context("default scenario")?.host_count();
            let paper_fill = f64::from(d.vms.count) / f64::from(d.slots_per_host() * hosts);
            opts.fills = opts
                .fills
                .iter()
                .map(|f| Some(f.unwrap_or(paper_fill)))
                .collect();
        }
    }
    if a.replot {
        let sum = read_summary(&a.out.join("capacity.json"))?;
        outputs(&sum, &opts)?;
        println!("redrawn in {}", a.out.display());
        return Ok(());
    }
    let sum = run_capacity(&s, &opts)?;
    for f in &sum.fills {
        println!(
            "fill {:.0}% ({} VMs): baseline {:.2}% ({} VMs moved), local search from initial {:.2}%",
            100.0 * f.fill,
            f.vms,
            f.baseline_reduction_pct,
            f.baseline_moved_vms,
            f.local_search_from_initial_pct
        );
        for r in &f.runs {
            println!(
                "  {:<12} {:<12} {:<16} reduction {:6.2}%  of best {:.3}  migrations {:>6} (swaps {:>6})  rounds {:>2}{}  ({:.1} s)",
                r.policy,
                r.rule,
                r.scope,
                r.reduction_pct,
                r.fraction_of_best_baseline,
                r.migrations,
                r.swaps,
                r.rounds_to_converge,
                if r.converged { "" } else { "+" },
                r.elapsed_s
            );
        }
    }
    for c in &sum.small {
        println!(
            "small {:?} {} slots {} VMs: {} instances",
            c.fanout, c.slots, c.vms, c.instances
        );
        for r in &c.rows {
            println!(
                "  {:<12} {:<16} mean {:.3} min {:.3} >=95% {}/{}",
                r.policy, r.scope, r.mean_fraction, r.min_fraction, r.at_least_95, c.instances
            );
        }
    }
    println!(
        "outputs in {}; total {:.1} s",
        a.out.display(),
        sum.elapsed_s
    );
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let res = match cli.cmd {
        Cmd::Paper { out, o } => run(Scenario::default(), &out, &o),
        Cmd::Run { scenario, out, o } => std::fs::read_to_string(&scenario)
            .with_context(|| format!("cannot read {}", scenario.display()))
            .and_then(|text| Scenario::from_toml_str(&text).context("invalid scenario file"))
            .and_then(|s| run(s, &out, &o)),
        Cmd::Capacity {
            out,
            fill,
            policy,
            variant,
            fanout,
            small_seeds,
            rounds,
            no_plots,
            replot,
            threads,
        } => capacity(CapacityArgs {
            out,
            fill,
            policy,
            variant,
            fanout,
            small_seeds,
            rounds,
            no_plots,
            replot,
            threads,
        }),
        Cmd::MigrationCost(a) => migration_cost(a),
        Cmd::Scenario => {
            print!("{}", Scenario::default().to_toml_string());
            Ok(())
        }
        Cmd::Protocol {
            paper_rounds: None,
            fill,
            fanout,
            variant,
            policy,
            max_rounds,
            ..
        } if !fill.is_empty() => protocol_versus(&fill, &fanout, &variant, policy, max_rounds),
        Cmd::Protocol {
            seed,
            seeds,
            hosts,
            seconds,
            quiet,
            trace,
            paper_rounds: Some(rounds),
            plot,
            ..
        } => {
            let _ = (seeds, hosts, seconds, quiet);
            paper_protocol(seed, rounds, trace, plot.as_deref())
        }
        Cmd::Protocol {
            seed,
            seeds,
            hosts,
            seconds,
            quiet,
            trace,
            paper_rounds: None,
            chains,
            rotations,
            groups,
            cm,
            ..
        } => (|| {
            let cm = cm.map(|c| parse_cm(&c)).transpose()?;
            let tweak = |c: &mut score_sim::protocol::SimConfig| {
                if chains {
                    *c = c.clone().with_chains();
                }
                if rotations {
                    *c = c.clone().with_rotations();
                }
                if groups {
                    *c = c.clone().with_groups();
                }
                if let Some((spec, decay)) = cm {
                    c.cm = spec;
                    c.cm_decay = decay;
                }
            };
            let s = score_sim::protocol::soak_with(
                seed,
                seeds,
                hosts,
                seconds,
                quiet,
                trace,
                tweak,
                |r| {
                    if !r.violations.is_empty() {
                        eprintln!("seed {}: {:?}", r.seed, r.violations);
                    }
                },
            );
            println!("{s}");
            if s.violations == 0 {
                Ok(())
            } else {
                Err(anyhow::anyhow!(
                    "{} invariant violations in {} runs",
                    s.violations,
                    s.runs
                ))
            }
        })(),
    };
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("score-sim: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// `score-sim protocol --fill ...`: the protocol beside the engine and the
/// best baseline, one line per fill and variant.
fn protocol_versus(
    fills: &[f64],
    fanout: &[u32],
    variants: &[Variant],
    policy: PolicyKind,
    max_rounds: u32,
) -> anyhow::Result<()> {
    let mut s = Scenario::default();
    if !fanout.is_empty()
        && let Some(r) = s.topology.regular.as_mut()
    {
        r.fanout = fanout.to_vec();
    }
    let default = ["swap+chain@10/0.5/0.003".parse::<Variant>()?];
    let variants = if variants.is_empty() {
        &default[..]
    } else {
        variants
    };
    for v in variants {
        if v.group == score_sim::engine::GroupMode::Best
            || v.gswap
            || v.scope.candidates != score_core::swap::CandidateSet::Paper
        {
            anyhow::bail!(
                "variant {}: the protocol's node has swaps over the paper's candidates, \
                 chains, rotations, group moves when u would stay (+group) and a c_m schedule, \
                 not +group-best, group swaps or wider sets",
                v.label()
            );
        }
    }
    println!(
        "fill,vms,hosts,variant,policy,baseline_pct,baseline_moved,protocol_pct,protocol_of_best,\
         protocol_migrations,protocol_migrations_over_baseline,swaps_done,chains_done,chains_third_host,\
         chains_half_done,rotations_done,rotations_partly_done,groups_done,groups_partly_done,group_members,rounds,engine_pct,engine_of_best,engine_migrations,engine_rounds,\
         datagrams,protocol_wall_s,violations"
    );
    for &fill in fills {
        for v in variants {
            let r = score_sim::protocol::versus_baseline(&s, fill, v, policy, max_rounds)?;
            let p = &r.protocol;
            let e = &r.engine;
            let of = |x: f64| {
                if r.baseline_pct > 0.0 {
                    x / r.baseline_pct
                } else {
                    0.0
                }
            };
            println!(
                "{:.3},{},{},{},{},{:.3},{},{:.3},{:.4},{},{:.3},{},{},{},{},{},{},{},{},{},{},{:.3},{:.4},{},{},{},{:.1},{}",
                r.fill,
                r.vms,
                r.hosts,
                v.label(),
                policy.name(),
                r.baseline_pct,
                r.baseline_moved,
                r.protocol_pct,
                of(r.protocol_pct),
                p.migrations,
                p.migrations as f64 / r.baseline_moved.max(1) as f64,
                p.swaps_done,
                p.chains_done,
                p.chains_third_host,
                p.chains_partial,
                p.rotations_done,
                p.rotations_partial,
                p.groups_done,
                p.groups_partial,
                p.group_members,
                p.rounds,
                e.reduction_pct(),
                of(e.reduction_pct()),
                e.migrations,
                e.rounds,
                p.datagrams,
                r.protocol_wall_s,
                p.violations.len()
            );
        }
    }
    Ok(())
}

/// `START/DECAY/FLOOR` (START in mean VM costs) as the protocol
/// simulation's c_m and its decay.
fn parse_cm(
    s: &str,
) -> anyhow::Result<(
    score_sim::scenario::MigrationCostSpec,
    score_core::decision::CmDecay,
)> {
    let xs: Vec<f64> = s
        .split('/')
        .map(|x| x.parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| anyhow::anyhow!("--cm {s:?}: expected START/DECAY/FLOOR"))?;
    match xs[..] {
        [start, decay, floor]
            if [start, decay, floor]
                .iter()
                .all(|x| x.is_finite() && *x >= 0.0) =>
        {
            Ok((
                score_sim::scenario::MigrationCostSpec::MeanVmFraction(start),
                score_core::decision::CmDecay { decay, floor },
            ))
        }
        _ => Err(anyhow::anyhow!(
            "--cm {s:?}: expected START/DECAY/FLOOR, each finite and >= 0"
        )),
    }
}

/// Prints a paper-scale protocol run round by round.
fn print_paper_rounds(r: &score_sim::protocol::Report, hosts: u32, wall: f64) {
    println!("round,simulated_s,datagrams,bytes,datagrams_per_host,bytes_per_host,cost");
    let mut prev = (0u64, 0u64, 0u64);
    for (i, (at, d, b, cost)) in r.rounds_at.iter().enumerate() {
        println!(
            "{},{:.1},{},{},{:.1},{:.0},{cost:.6e}",
            i + 1,
            (at - prev.0) as f64 / 1e9,
            d - prev.1,
            b - prev.2,
            (d - prev.1) as f64 / f64::from(hosts),
            (b - prev.2) as f64 / f64::from(hosts),
        );
        prev = (*at, *d, *b);
    }
    println!(
        "cost {:.6e} -> {:.6e}; {} hops, {} migrations, {} events; wall clock {wall:.1} s \
         ({:.1} s per round); violations {:?}",
        r.cost_start,
        r.cost_end,
        r.hops,
        r.migrations,
        r.events,
        wall / f64::from(r.rounds.max(1)),
        r.violations
    );
}

/// `score-sim protocol --paper-rounds N [--plot STEM]`.
fn paper_protocol(
    seed: u64,
    rounds: u32,
    trace: bool,
    plot: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    let mut c = score_sim::protocol::SimConfig::paper(seed)?;
    c.stop_after_rounds = Some(rounds);
    c.trace = trace;
    let world = c.world.clone().expect("the paper's world");
    println!(
        "paper data centre: {} hosts, {} VMs, seed {seed} (world built in {:.1} s)",
        world.topo.host_count(),
        world.vms(),
        started.elapsed().as_secs_f64()
    );
    let started = std::time::Instant::now();
    let r = score_sim::protocol::run(&c);
    let wall = started.elapsed().as_secs_f64();
    print_paper_rounds(&r, world.topo.host_count(), wall);
    if let Some(stem) = plot {
        let started = std::time::Instant::now();
        let cmp = score_sim::protocol::compare(&c, rounds)?;
        let e = &cmp.engine;
        println!(
            "engine: cost {:.6e} -> {:.6e}; {} hand-offs, {} migrations; \
             protocol: {} decisions ({:.1} s for both, the protocol recording)",
            e.initial_cost,
            e.final_cost,
            e.handoffs,
            e.migrations,
            cmp.protocol.decisions.len(),
            started.elapsed().as_secs_f64()
        );
        match cmp.first_difference {
            None => println!(
                "same decisions: all {} hand-offs, same final placement",
                e.handoffs
            ),
            Some((i, ours, theirs)) => {
                println!("decisions differ at hand-off {i}: protocol {ours:?}, engine {theirs:?}")
            }
        }
        score_sim::protocol::plot_comparison(&cmp, stem)?;
        println!("wrote {}.png and .svg", stem.display());
    }
    Ok(())
}
