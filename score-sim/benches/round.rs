//! Time of one full token round (every VM holds the token once) at the
//! paper's scale and at ten times the hosts. Plain timing (no criterion):
//! one round at 10x takes too long for criterion's repeated sampling.
//!
//! Run: `cargo bench -p score-sim --bench round`

use std::time::Instant;

use score_core::policy::PolicyKind;
use score_sim::engine::{RunOptions, run_policy};
use score_sim::scenario::Scenario;
use score_sim::world::Setup;

fn main() {
    let scales: &[(&str, Vec<u32>, u32)] = &[
        ("paper (2560 hosts, 30720 VMs)", vec![20, 8, 4, 4], 30_720),
        (
            "10x hosts (25600 hosts, 307200 VMs)",
            vec![20, 8, 4, 40],
            307_200,
        ),
    ];
    let only_paper = std::env::args().any(|a| a == "--paper-only");
    for (label, fanout, vms) in scales {
        if only_paper && *vms > 30_720 {
            continue;
        }
        let mut s = Scenario::default();
        if let Some(r) = s.topology.regular.as_mut() {
            r.fanout = fanout.clone();
        }
        s.vms.count = *vms;
        let t = Instant::now();
        let setup = Setup::build(&s).expect("scenario");
        println!("{label}: setup {:.2} s", t.elapsed().as_secs_f64());
        for kind in PolicyKind::ALL {
            let opts = RunOptions {
                max_rounds: 1,
                record_steps: false,
                ..RunOptions::default()
            };
            let run = run_policy(&setup, kind, &opts, |_| {}).expect("run");
            println!(
                "  {:<12} one round: {:>8.3} s  ({} hand-offs, {} migrations, {:.1}% reduction)",
                kind.name(),
                run.elapsed_s,
                run.handoffs,
                run.migrations,
                run.reduction_pct()
            );
        }
    }
}
