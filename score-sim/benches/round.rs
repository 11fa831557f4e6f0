//! Time of one full token round (every VM holds the token once) for each
//! policy, at the paper's scale and at ten times the hosts (same fill, same
//! traffic model). Plain timing rather than criterion: one round at 10x
//! takes minutes, too long for repeated sampling. Both wall-clock time and
//! the CPU time of the running thread are printed: on a shared machine the
//! CPU time is the figure that does not depend on other load.
//!
//! Run: `cargo bench -p score-sim --bench round`; after `--`, `--paper-only`
//! or `--10x-only` picks one scale and `--policy NAME` (repeatable) picks
//! policies.

use std::time::Instant;

use score_core::policy::PolicyKind;
use score_sim::engine::{RunOptions, run_policy};
use score_sim::scenario::Scenario;
use score_sim::world::Setup;

/// CPU time of the calling thread in seconds, from /proc (Linux); `None`
/// elsewhere. schedstat counts nanoseconds; stat, the fallback, counts
/// ticks of 10 ms, too coarse once a round takes a few tens of ms.
fn thread_cpu_s() -> Option<f64> {
    if let Some(ns) = std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .filter(|&ns| ns > 0)
    {
        return Some(ns as f64 * 1e-9);
    }
    let stat = std::fs::read_to_string("/proc/thread-self/stat").ok()?;
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 here.
    let ticks: f64 = f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?;
    // Linux reports them in USER_HZ, 100 on every mainstream platform.
    Some(ticks / 100.0)
}

fn main() {
    let scales: &[(&str, Vec<u32>, u32)] = &[
        ("paper: 2560 hosts, 30720 VMs", vec![20, 8, 4, 4], 30_720),
        (
            "10x hosts: 25600 hosts, 307200 VMs",
            vec![20, 8, 4, 40],
            307_200,
        ),
    ];
    let args: Vec<String> = std::env::args().collect();
    let only_paper = args.iter().any(|a| a == "--paper-only");
    let only_10x = args.iter().any(|a| a == "--10x-only");
    // `--policy NAME` (repeatable) limits the policies timed.
    let wanted: Vec<PolicyKind> = args
        .windows(2)
        .filter(|w| w[0] == "--policy")
        .filter_map(|w| w[1].parse().ok())
        .collect();
    for (label, fanout, vms) in scales {
        if (only_paper && *vms > 30_720) || (only_10x && *vms <= 30_720) {
            continue;
        }
        let mut s = Scenario::default();
        if let Some(r) = s.topology.regular.as_mut() {
            r.fanout = fanout.clone();
        }
        s.vms.count = *vms;
        let t = Instant::now();
        let setup = Setup::build(&s).expect("scenario");
        println!("{label}: set-up {:.2} s", t.elapsed().as_secs_f64());
        for kind in PolicyKind::ALL {
            if !wanted.is_empty() && !wanted.contains(&kind) {
                continue;
            }
            let opts = RunOptions {
                max_rounds: 1,
                record_steps: false,
                ..RunOptions::default()
            };
            let cpu0 = thread_cpu_s();
            let run = run_policy(&setup, kind, &opts, |_| {}).expect("run");
            let cpu = match (cpu0, thread_cpu_s()) {
                (Some(a), Some(b)) => format!("{:8.3} s", b - a),
                _ => "        -".to_string(),
            };
            println!(
                "  {:<12} one round: wall {:8.2} s  cpu {cpu}  ({} hand-offs, {} migrations, {:.1}% reduction)",
                kind.name(),
                run.elapsed_s,
                run.handoffs,
                run.migrations,
                run.reduction_pct()
            );
        }
    }
}
