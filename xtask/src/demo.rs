//! `cargo xtask demo`: S-CORE on the emulated data centre, from nothing.
//! Installs what is missing, builds score-agent, builds the data centre,
//! starts one agent per host and the traffic, and then reports the paper's
//! communication cost (equation 1) as the agents MEASURE it, at the start
//! and after each token round, the migrations as they happen, where every
//! VM ended, and the best centralised answer for the same traffic. Tears
//! everything down at the end, on error, and on Ctrl-C.

use std::{
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    measure::{self, Snapshot},
    optimum,
    testbed::{self, AGENT_HTTP, AgentOptions, Sizes, State},
    traffic::{self, Rates},
};

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    #[command(flatten)]
    sizes: Sizes,
    #[command(flatten)]
    rates: Rates,
    /// Seconds the agents run with traffic after the warm-up.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Token policy: round-robin, global, distributed or load-aware.
    #[arg(long, default_value = "distributed")]
    policy: String,
    /// How long a host holds the token for one VM.
    #[arg(long, default_value = "1s")]
    token_hold: String,
    /// Seconds between cost reports when the agents export no token round.
    #[arg(long, default_value_t = 15)]
    period: u64,
    /// Build and run the release agent (slower to build, faster to run).
    #[arg(long)]
    release: bool,
    /// Leave the data centre up at the end (`cargo xtask testbed down`).
    #[arg(long)]
    keep: bool,
}

/// Set by SIGINT/SIGTERM; the demo checks it between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`] instead of killing xtask,
/// so that the teardown runs.
pub fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// Sleeps up to `d`, waking early on a signal; false if interrupted.
fn sleep(d: Duration) -> bool {
    let end = Instant::now() + d;
    while Instant::now() < end {
        if interrupted() {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(end - Instant::now()));
    }
    !interrupted()
}

/// Builds score-agent with cargo and returns the binary's path.
pub fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = crate::cargo();
    cmd.args(["build", "--locked", "-p", "score-agent"]);
    if release {
        cmd.arg("--release");
    }
    crate::run(&mut cmd).context("building score-agent")?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target"));
    let bin = target
        .join(if release { "release" } else { "debug" })
        .join("score-agent");
    let bin = std::fs::canonicalize(&bin).with_context(|| format!("{}", bin.display()))?;
    Ok(bin)
}

/// Tears the testbed down when dropped (end, error, Ctrl-C), unless kept.
struct Teardown {
    keep: bool,
}

impl Drop for Teardown {
    fn drop(&mut self) {
        if self.keep {
            println!(
                "demo: the testbed stays up: `cargo xtask testbed status`, `cargo xtask testbed down`"
            );
            return;
        }
        println!("demo: tearing down");
        match testbed::down() {
            Ok(r) => println!(
                "demo: removed {} namespaces and stopped {} processes in {:.2} s",
                r.namespaces, r.processes, r.seconds
            ),
            Err(e) => eprintln!("demo: teardown failed: {e:#} (run `cargo xtask testbed down`)"),
        }
    }
}

fn mb(x: f64) -> String {
    format!("{:.3}", x / 1e6)
}

fn level_line(c: &measure::Cost) -> String {
    let names = ["host", "rack", "pod", "core"];
    c.by_level
        .iter()
        .enumerate()
        .map(|(l, r)| format!("{} {} MB/s", names.get(l).unwrap_or(&"?"), mb(*r)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs the demo.
pub fn demo(args: &DemoArgs) -> Result<()> {
    testbed::require_root("the demo")?;
    catch_signals();
    let t0 = Instant::now();
    println!("demo: [1/5] setup (toolchain, bpf-linker, apt packages)");
    crate::setup::setup()?;
    println!("demo: [2/5] building score-agent");
    let binary = build_agent(args.release)?;
    if interrupted() {
        bail!("interrupted");
    }
    if State::load()?.is_some() {
        println!("demo: a testbed is already up: tearing it down first");
        testbed::down()?;
    }
    let _guard = Teardown { keep: args.keep };
    let s = &args.sizes;
    println!(
        "demo: [3/5] building the data centre: {} pods x {} racks x {} hosts, {} VMs, {} slots per host",
        s.pods,
        s.racks_per_pod,
        s.hosts_per_rack,
        s.vms(),
        s.slots
    );
    let mut state = testbed::up(s)?;
    println!(
        "demo:       {} namespaces in {:.2} s",
        state.namespaces.len(),
        state.setup_seconds
    );
    println!(
        "demo: [4/5] starting {} agents ({}, policy {})",
        state.hosts.len(),
        binary.display(),
        args.policy
    );
    let opts = AgentOptions {
        binary,
        policy: args.policy.clone(),
        token_hold: args.token_hold.clone(),
    };
    let started = Instant::now();
    testbed::start_agents(&mut state, &opts)?;
    println!(
        "demo:       agents serving in {:.2} s ({} mode)",
        started.elapsed().as_secs_f64(),
        state.agent_mode.as_deref().unwrap_or("?")
    );
    let flows = traffic::plan(&state, &args.rates);
    traffic::start(&mut state, &flows)?;
    let planned: u64 = flows.iter().map(|f| f.rate).sum();
    println!(
        "demo: [5/5] traffic: {} streams, {} MB/s in all; chatty pairs start in different pods",
        flows.len(),
        mb(planned as f64)
    );
    let topo = state.topology()?;

    // Warm-up: rates are averaged over the agents' 10 s window.
    let warm = Duration::from_secs(12);
    let w0 = Instant::now();
    let mut snap: Option<Snapshot> = None;
    while w0.elapsed() < warm {
        if !sleep(Duration::from_secs(2)) {
            bail!("interrupted");
        }
        let s = measure::snapshot(&state, None)?;
        let seen: f64 = s.traffic.pairs().map(|p| p.2).sum();
        println!(
            "demo:       warming up {:>4.1} s: measured {} of {} MB/s planned{}",
            w0.elapsed().as_secs_f64(),
            mb(seen),
            mb(planned as f64),
            if s.silent.is_empty() {
                String::new()
            } else {
                format!(" (silent: {})", s.silent.join(" "))
            }
        );
        snap = Some(s);
    }
    let first = snap.context("no measurement")?;
    let c0 = measure::cost(&topo, &first.traffic, &first.placement);
    let slots = state.sizes.slots;
    let best0 = optimum::optimum(&topo, &first.traffic, slots, &first.placement, 20_000_000)?;
    println!();
    println!(
        "cost at start (eq. 1, every pair counted twice, MB/s x W): {}   [{}]",
        mb(c0.total),
        level_line(&c0)
    );
    println!(
        "best centralised placement for this traffic: {} ({}, {} nodes)",
        mb(best0.cost),
        if best0.proven {
            "optimal"
        } else {
            "best found"
        },
        best0.nodes
    );
    println!();

    // The run: poll every 2 s, report moves as seen, cost per round.
    let mut last = first.placement.clone();
    let mut latest = first;
    let mut moves: Vec<(f64, usize, usize, usize)> = Vec::new();
    let mut round = measure::metric_max(&latest.metrics, "score_token_round");
    let mut next_report = Duration::from_secs(args.period);
    let r0 = Instant::now();
    let mut interrupted_run = false;
    while r0.elapsed() < Duration::from_secs(args.duration) {
        if !sleep(Duration::from_secs(2)) {
            interrupted_run = true;
            break;
        }
        let s = measure::snapshot(&state, Some(&last))?;
        let t = r0.elapsed().as_secs_f64();
        for (i, v) in state.vms.iter().enumerate() {
            let (a, b) = (last.host(i as u32), s.placement.host(i as u32));
            if a != b {
                moves.push((t, i, a as usize, b as usize));
                println!(
                    "  {t:>6.1} s  migration: {} {} -> {}",
                    v.address, state.hosts[a as usize].name, state.hosts[b as usize].name
                );
            }
        }
        last = s.placement.clone();
        let r = measure::metric_max(&s.metrics, "score_token_round");
        let due = match (r, round) {
            (Some(now), Some(before)) => now > before,
            (Some(_), None) => true,
            _ => r0.elapsed() >= next_report,
        };
        if due {
            let c = measure::cost(&topo, &s.traffic, &s.placement);
            let label = match r {
                Some(n) => format!("round {n:.0}"),
                None => format!("{t:>6.1} s"),
            };
            println!(
                "  {label}: cost {} ({:+.1}% from start), {} migrations so far   [{}]",
                mb(c.total),
                100.0 * (c.total - c0.total) / c0.total.max(f64::MIN_POSITIVE),
                moves.len(),
                level_line(&c)
            );
            round = r;
            next_report += Duration::from_secs(args.period);
        }
        latest = s;
    }
    report(&state, &topo, &latest, &c0, &moves, slots)?;
    if interrupted_run {
        println!("demo: interrupted");
    }
    println!("demo: total {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}

fn report(
    state: &State,
    topo: &score_core::topology::Topology,
    s: &Snapshot,
    c0: &measure::Cost,
    moves: &[(f64, usize, usize, usize)],
    slots: u32,
) -> Result<()> {
    let c = measure::cost(topo, &s.traffic, &s.placement);
    let best = optimum::optimum(topo, &s.traffic, slots, &s.placement, 20_000_000)?;
    println!();
    println!("== result ==");
    println!(
        "cost: start {}, end {} ({:+.1}%) MB/s x W (eq. 1, each pair twice)",
        mb(c0.total),
        mb(c.total),
        100.0 * (c.total - c0.total) / c0.total.max(f64::MIN_POSITIVE)
    );
    println!("traffic now by level: {}", level_line(&c));
    println!(
        "best centralised placement for the final measured traffic: {} ({})",
        mb(best.cost),
        if best.proven { "optimal" } else { "best found" }
    );
    let groups: Vec<String> = (0..topo.host_count())
        .filter(|&h| best.placement.count(h) > 0)
        .map(|h| {
            let vms: Vec<String> = state
                .vms
                .iter()
                .enumerate()
                .filter(|(i, _)| best.placement.host(*i as u32) == h)
                .map(|(_, v)| v.address.octets()[3].to_string())
                .collect();
            format!("{}: {}", state.hosts[h as usize].name, vms.join(","))
        })
        .collect();
    println!(
        "  one such placement (last address byte): {}",
        groups.join("  ")
    );
    let done = measure::metric_sum(&s.metrics, "score_migrations_total", "");
    println!(
        "migrations seen: {}{}",
        moves.len(),
        match done {
            Some(n) => format!(" (agents' score_migrations_total: {n:.0})"),
            None => String::new(),
        }
    );
    println!("where every VM ended:");
    for (h_i, h) in state.hosts.iter().enumerate() {
        let vms: Vec<String> = state
            .vms
            .iter()
            .enumerate()
            .filter(|(i, _)| s.placement.host(*i as u32) as usize == h_i)
            .map(|(_, v)| {
                let moved = if v.initial_host == h.name { "" } else { "*" };
                format!("{}{moved}", v.address)
            })
            .collect();
        println!(
            "  {:<6} {:<12} {}/{}: {:<6} {}",
            h.name,
            h.address,
            h.rack.trim_start_matches("dc-"),
            h.pod.trim_start_matches("dc-"),
            format!("{}/{}", vms.len(), slots),
            vms.join(" ")
        );
    }
    println!("  (* = moved)");
    println!(
        "metrics: inside each host namespace at http://{AGENT_HTTP}/metrics, e.g. \
         `ip netns exec {} curl -s http://{AGENT_HTTP}/metrics`; logs in {}/logs",
        state.hosts[0].name,
        testbed::DIR
    );
    Ok(())
}
