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

use score_testbed::{
    agents,
    config::AgentOptions,
    guests,
    guests::GuestKind,
    measure::{self, Snapshot},
    metrics,
    plan::{AGENT_HTTP, Sizes},
    process,
    state::{self, State},
    status, testbed,
    traffic::{self, Rates},
};

use crate::optimum;

/// Options of `cargo xtask demo`.
#[derive(clap::Args, Debug)]
pub(crate) struct DemoArgs {
    #[command(flatten)]
    sizes: Sizes,
    #[command(flatten)]
    rates: Rates,
    /// What stands in for the VMs: network namespaces, or real QEMU guests
    /// that the agents live-migrate (slow under TCG: use a small data
    /// centre, see docs/TESTBED.md).
    #[arg(long, value_enum, default_value_t = GuestKind::Netns)]
    guests: GuestKind,
    /// Seconds the agents run with traffic after the warm-up.
    #[arg(long, default_value_t = 120)]
    duration: u64,
    /// Token policy: round-robin, global, distributed or load-aware.
    #[arg(long, default_value = "distributed")]
    policy: String,
    /// How long a host holds the token for one VM.
    #[arg(long, default_value = "1s")]
    token_hold: String,
    /// Candidate hosts of a decision: paper, peer-racks, peer-pods or all
    /// (docs/EVALUATION.md, "Beyond the paper").
    #[arg(long, default_value = "paper")]
    candidates: String,
    /// Swaps with full hosts (each host gets one VM of headroom for them).
    #[arg(long)]
    swaps: bool,
    /// Ejection chains when a VM would stay: it goes to a full host, which
    /// sends one of its VMs on to a host with room (docs/PROTOCOL.md).
    #[arg(long)]
    chains: bool,
    /// Three-VM rotations between full hosts when a VM would stay (each
    /// host gets one VM of headroom; docs/PROTOCOL.md, "Rotations").
    #[arg(long)]
    rotations: bool,
    /// Group moves when a VM would stay: the VMs it talks to on its host
    /// move with it, into a rack near their peers (docs/PROTOCOL.md,
    /// "Group moves").
    #[arg(long)]
    groups: bool,
    /// Seconds between cost reports when the agents export no token round.
    #[arg(long, default_value_t = 15)]
    period: u64,
    /// Build and run the release agent (slower to build, faster to run).
    #[arg(long)]
    release: bool,
    /// Leave the data centre up at the end (`cargo xtask testbed down`).
    #[arg(long)]
    keep: bool,
    /// Run this score-agent binary instead of building one.
    #[arg(long)]
    agent_bin: Option<PathBuf>,
}

/// Set by SIGINT/SIGTERM; the demo checks it between steps.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes SIGINT and SIGTERM to [`INTERRUPTED`] instead of killing xtask,
/// so that the teardown runs.
pub(crate) fn catch_signals() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Whether Ctrl-C (or SIGTERM) arrived.
pub(crate) fn interrupted() -> bool {
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

/// The traffic generator: this program's hidden `traffic` subcommand.
pub(crate) fn generator() -> Result<PathBuf> {
    std::env::current_exe().context("finding the xtask binary")
}

/// Builds score-agent with cargo and returns the binary's path.
pub(crate) fn build_agent(release: bool) -> Result<PathBuf> {
    let mut cmd = crate::cargo();
    // Quiet: aya-build relays the eBPF crate's whole build as warnings;
    // errors still show.
    cmd.args(["build", "--quiet", "--locked", "-p", "score-agent"]);
    if release {
        cmd.arg("--release");
    }
    process::run(&mut cmd).context("building score-agent")?;
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
        // writeln, not println: this may run while unwinding from a
        // println that failed (stdout closed), and a second panic would
        // abort before the teardown.
        use std::io::Write as _;
        let mut out = std::io::stderr();
        if self.keep {
            let _ = writeln!(
                out,
                "demo: the testbed stays up: `cargo xtask testbed status`, `cargo xtask testbed down`"
            );
            return;
        }
        let _ = writeln!(out, "demo: tearing down");
        let _ = match testbed::down() {
            Ok(r) => writeln!(
                out,
                "demo: removed {} namespaces and stopped {} processes in {:.2} s",
                r.namespaces, r.processes, r.seconds
            ),
            Err(e) => writeln!(
                out,
                "demo: teardown failed: {e:#} (run `cargo xtask testbed down`)"
            ),
        };
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

/// Where the token is: the agents' own round counter when they export one
/// (`score_token_round`), else token hops divided by the VM count.
#[derive(Clone, Copy, Debug)]
struct Round {
    n: f64,
    exact: bool,
}

impl Round {
    fn of(metrics: &[Option<String>], vms: usize) -> Option<Round> {
        if let Some(n) = metrics::max(metrics, "score_token_round") {
            return Some(Round { n, exact: true });
        }
        let hops = metrics::sum(metrics, "score_token_received_total")?;
        Some(Round {
            n: (hops / vms.max(1) as f64).floor(),
            exact: false,
        })
    }

    fn label(&self) -> String {
        if self.exact {
            format!("round {:.0}", self.n)
        } else {
            format!("~round {:.0} (token hops / VMs)", self.n)
        }
    }
}

/// Runs the demo.
pub(crate) fn demo(args: &DemoArgs) -> Result<()> {
    // Checked before anything is set up (the agents would refuse it later).
    args.candidates
        .parse::<score_core::swap::CandidateSet>()
        .map_err(|e| anyhow::anyhow!("--candidates: {e}"))?;
    testbed::require_root("the demo")?;
    catch_signals();
    let t0 = Instant::now();
    println!("demo: [1/5] setup (toolchain, bpf-linker, apt packages)");
    crate::setup::setup()?;
    let binary = match &args.agent_bin {
        Some(path) => {
            println!("demo: [2/5] using {}", path.display());
            std::fs::canonicalize(path)
                .with_context(|| format!("--agent-bin {}", path.display()))?
        }
        None => {
            println!("demo: [2/5] building score-agent");
            let started = Instant::now();
            let bin = build_agent(args.release)?;
            println!(
                "demo:       built in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            bin
        }
    };
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
        "demo: [3/5] building the data centre: {} pods x {} racks x {} hosts, {} {}, {} slots per host",
        s.pods,
        s.racks_per_pod,
        s.hosts_per_rack,
        s.vms(),
        match args.guests {
            GuestKind::Netns => "VMs (namespaces)",
            GuestKind::Qemu => "real QEMU guests",
        },
        s.slots
    );
    let mut state = testbed::up_with(s, args.guests)?;
    println!(
        "demo:       {} namespaces in {:.2} s",
        state.namespaces.len(),
        state.setup_seconds
    );
    let flows = traffic::plan(&state, &args.rates);
    if state.guests.is_some() {
        // The guests send their part of the plan from boot on (iperf3,
        // peers on their kernel command line).
        guests::boot_guests(&mut state, &flows)?;
        println!(
            "demo:       {} guests booted and answering in {:.1} s",
            state.vms.len(),
            state.guests.as_ref().map_or(0.0, |g| g.boot_seconds)
        );
    }
    println!(
        "demo: [4/5] starting {} agents ({}, policy {})",
        state.hosts.len(),
        binary.display(),
        args.policy
    );
    let opts = AgentOptions {
        candidates: args.candidates.clone(),
        swaps: args.swaps,
        chains: args.chains,
        rotations: args.rotations,
        groups: args.groups,
        ..AgentOptions::paper(binary, args.policy.clone(), args.token_hold.clone())
    };
    let started = Instant::now();
    agents::start_agents(&mut state, &opts)?;
    println!(
        "demo:       agents serving in {:.2} s ({} mode)",
        started.elapsed().as_secs_f64(),
        state.agent_mode.as_deref().unwrap_or("?")
    );
    if state.guests.is_none() {
        traffic::start(&mut state, &flows, &generator()?)?;
    }
    let planned: u64 = flows.iter().map(|f| f.rate).sum();
    println!(
        "demo: [5/5] traffic: {} streams, {} MB/s in all; {}",
        flows.len(),
        mb(planned as f64),
        match args.rates.pattern {
            traffic::Pattern::Pairs => "chatty pairs start in different pods".to_string(),
            traffic::Pattern::Groups => format!(
                "groups of {} talk all to all, each spread over the pods",
                args.rates.group_size
            ),
        }
    );
    let topo = state.topology()?;

    // The initial placement, as set up (VM i on its initial host).
    let initial = state.initial_placement()?;
    let slots = state.sizes.slots;
    let n_vms = state.vms.len();
    // One loop from the moment traffic starts: a snapshot every 2 s, moves
    // reported as seen. The start cost is the initial placement under the
    // traffic measured once the agents' 10 s rate window is full (the
    // traffic is steady, so this is the cost before any move, even if the
    // agents move VMs during the warm-up); then one cost line per token
    // round (or per --period seconds when the agents export no round).
    let warm = Duration::from_secs(12);
    let total = warm + Duration::from_secs(args.duration);
    let r0 = Instant::now();
    let mut last = initial.clone();
    let mut latest: Option<Snapshot> = None;
    let mut c0: Option<measure::Cost> = None;
    let mut moves: Vec<(f64, usize, usize, usize)> = Vec::new();
    let mut round: Option<Round> = None;
    let mut next_report = warm + Duration::from_secs(args.period);
    let mut interrupted_run = false;
    while r0.elapsed() < total {
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
        let r = Round::of(&s.metrics, n_vms);
        match &c0 {
            None if r0.elapsed() < warm => {
                let seen: f64 = s.traffic.pairs().map(|p| p.2).sum();
                println!(
                    "  {t:>6.1} s  warming up: measured {} of {} MB/s planned{}",
                    mb(seen),
                    mb(planned as f64),
                    if s.silent.is_empty() {
                        String::new()
                    } else {
                        format!(" (silent: {})", s.silent.join(" "))
                    }
                );
            }
            None => {
                let c = measure::cost(&topo, &s.traffic, &initial);
                let best =
                    optimum::optimum(&topo, &s.traffic, slots, &initial, optimum::NODE_LIMIT)?;
                println!();
                println!(
                    "cost at start (eq. 1, every pair counted twice, MB/s x W): {}   [{}]",
                    mb(c.total),
                    level_line(&measure::cost(&topo, &s.traffic, &initial))
                );
                println!(
                    "best centralised placement for this traffic: {} ({})",
                    mb(best.cost),
                    optimum::describe(&best)
                );
                println!();
                c0 = Some(c);
                round = r;
            }
            Some(start) => {
                // A new round; or, when the token does not move (or its
                // round is unknown), a line every --period seconds anyway
                // (every 3 periods while rounds are known).
                let advanced = match (r, round) {
                    (Some(now), Some(before)) => now.n > before.n,
                    (Some(_), None) => true,
                    _ => false,
                };
                let due = advanced || r0.elapsed() >= next_report;
                if due {
                    let c = measure::cost(&topo, &s.traffic, &s.placement);
                    let label = match r {
                        Some(r) => r.label(),
                        None => format!("{t:>6.1} s"),
                    };
                    println!(
                        "  {label}: cost {} ({:+.1}% from start), {} migrations so far   [{}]",
                        mb(c.total),
                        100.0 * (c.total - start.total) / start.total.max(f64::MIN_POSITIVE),
                        moves.len(),
                        level_line(&c)
                    );
                    round = r;
                    let every = if r.is_some() {
                        3 * args.period
                    } else {
                        args.period
                    };
                    next_report = r0.elapsed() + Duration::from_secs(every);
                }
            }
        }
        latest = Some(s);
    }
    let (Some(latest), Some(c0)) = (latest, c0) else {
        bail!("interrupted before the first measurement");
    };
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
    let best = optimum::optimum(topo, &s.traffic, slots, &s.placement, optimum::NODE_LIMIT)?;
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
        optimum::describe(&best)
    );
    // Against the optimum of the same (final) traffic from the same start:
    // the start's cost recomputed with it, so that traffic that changed
    // while the agents ran does not count as their gain.
    let start_now = measure::cost(topo, &s.traffic, &state.initial_placement()?).total;
    let possible = start_now - best.cost;
    if possible > 0.0 {
        println!(
            "reduction: {:.3} of the best placement's ({} of {} MB/s x W, the final traffic on the start placement)",
            (start_now - c.total) / possible,
            mb(start_now - c.total),
            mb(possible)
        );
    }
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
    let done = metrics::sum(&s.metrics, "score_migrations_total");
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
    let answered = status::reachable(state);
    let at = status::locate(state)?;
    let on_no_host = state
        .vms
        .iter()
        .filter(|v| !at.contains_key(&v.vif))
        .count();
    println!(
        "every VM still there: {} of {} answer ping at their address{}",
        answered.iter().filter(|&&ok| ok).count(),
        answered.len(),
        if on_no_host > 0 {
            format!(" ({on_no_host} on no host)")
        } else {
            String::new()
        }
    );
    if state.guests.is_some() {
        guests_report(state)?;
    }
    println!(
        "metrics: inside each host namespace at http://{AGENT_HTTP}/metrics, e.g. \
         `ip netns exec {} curl -s http://{AGENT_HTTP}/metrics`; logs in {}/logs",
        state.hosts[0].name,
        state::DIR
    );
    Ok(())
}

/// The real guests at the end of a `--guests qemu` demo: whether each
/// still runs the boot it started with (a live migration keeps it, a
/// reboot would not), and the migrations as the agents logged them (the
/// backend's duration, QEMU's own total time and downtime).
fn guests_report(state: &State) -> Result<()> {
    let from = &state.hosts[0].name;
    let mut same = 0;
    let mut uptimes = Vec::new();
    for v in &state.vms {
        if let Some(now) = guests::status(from, v.address)? {
            uptimes.push(now.uptime);
            if v.boot_id.as_deref() == Some(now.boot_id.as_str()) {
                same += 1;
            }
        }
    }
    uptimes.sort_by(f64::total_cmp);
    println!(
        "real guests: {same} of {} answer with the boot id they booted with (never rebooted){}",
        state.vms.len(),
        match (uptimes.first(), uptimes.last()) {
            (Some(lo), Some(hi)) => format!("; uptimes {lo:.0}-{hi:.0} s"),
            _ => String::new(),
        }
    );
    let logs: String = state
        .hosts
        .iter()
        .filter_map(|h| std::fs::read_to_string(&h.log).ok())
        .collect();
    let m = MigrationLog::parse(&logs);
    let spread = |v: &[f64], unit: &str| match median_range(v) {
        Some((m, lo, hi)) => format!("median {m:.0} {unit} ({lo:.0}-{hi:.0})"),
        None => "-".to_owned(),
    };
    println!(
        "live migrations in the agents' logs: {} done, {} failed; backend call {}; \
         QEMU total {}, downtime {}",
        m.done.len(),
        m.failed,
        spread(&m.done, "ms"),
        spread(&m.total_ms, "ms"),
        spread(&m.downtime_ms, "ms")
    );
    Ok(())
}

/// What the agents' logs say of their qemu migrations.
#[derive(Debug, Default, PartialEq)]
struct MigrationLog {
    /// Backend call of every migration done, in ms (`migration done ...
    /// seconds=S`).
    done: Vec<f64>,
    /// Migrations that failed (`migration failed`).
    failed: usize,
    /// QEMU's `total-time` of each completed migration, in ms.
    total_ms: Vec<f64>,
    /// QEMU's `downtime` of each completed migration, in ms.
    downtime_ms: Vec<f64>,
}

impl MigrationLog {
    fn parse(text: &str) -> MigrationLog {
        // `key=VALUE` or `key=Some(VALUE)` in a tracing line.
        let field = |line: &str, key: &str| -> Option<f64> {
            let rest = line.split(&format!(" {key}=")).nth(1)?;
            let value = rest.split_whitespace().next()?;
            let value = value
                .strip_prefix("Some(")
                .and_then(|v| v.strip_suffix(')'))
                .unwrap_or(value);
            value.parse().ok()
        };
        let mut m = MigrationLog::default();
        for line in text.lines() {
            if line.contains("migration done") {
                m.done.extend(field(line, "seconds").map(|s| s * 1000.0));
            } else if line.contains("migration failed") {
                m.failed += 1;
            } else if line.contains("qemu: migration completed") {
                m.total_ms.extend(field(line, "total_ms"));
                m.downtime_ms.extend(field(line, "downtime_ms"));
            }
        }
        m
    }
}

/// Median, minimum and maximum; `None` for no values.
fn median_range(v: &[f64]) -> Option<(f64, f64, f64)> {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    let median = match n {
        0 => return None,
        _ if n % 2 == 1 => s[n / 2],
        _ => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    };
    Some((median, s[0], s[n - 1]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_log_lines() {
        let log = "\
2026-11-25T16:21:17.382199Z  INFO token{vm=198.18.1.3}:migrate{vm=198.18.1.3}: score_agent::backend::qemu: qemu: migration completed total_ms=Some(2085) downtime_ms=Some(68) transferred=Some(114324102) duration=3.09301278s
2026-11-25T16:21:17.382331Z  INFO token{vm=198.18.1.3}: score_agent::peer: migration done vm=198.18.1.3 to=198.18.0.4 seconds=3.09301278
2026-11-25T16:20:39.328477Z  WARN token{vm=198.18.1.1}: score_agent::peer: migration failed; VM stays vm=198.18.1.1 to=198.18.0.3 error=timed out
2026-11-25T16:23:12.496871Z  INFO score_agent::backend::qemu: qemu: migration completed total_ms=None downtime_ms=Some(153) transferred=None duration=1.4s
";
        let m = MigrationLog::parse(log);
        assert_eq!(m.done.len(), 1);
        assert!((m.done[0] - 3093.01278).abs() < 1e-6);
        assert_eq!(m.failed, 1);
        assert_eq!(m.total_ms, vec![2085.0]);
        assert_eq!(m.downtime_ms, vec![68.0, 153.0]);
        assert_eq!(median_range(&[3.0, 1.0, 2.0, 10.0]), Some((2.5, 1.0, 10.0)));
        assert_eq!(median_range(&[]), None);
    }
}
