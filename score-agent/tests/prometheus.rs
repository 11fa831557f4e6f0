//! Privileged test: a real Prometheus server (Debian's package) scrapes a
//! real `score-agent run` counting real traffic with real eBPF, and PromQL
//! answers with the exact byte counts the frames add up to. Needs root;
//! `#[ignore]`d under plain `cargo test`, run by `cargo xtask test`.

mod support;

use std::time::Duration;

use support::*;

const A: &str = "198.18.2.1";
const B: &str = "198.18.2.2";
const X: &str = "198.18.9.1";
/// Where the agent serves /metrics, inside the host namespace.
const AGENT: &str = "127.0.0.1:9464";
/// Where Prometheus listens, inside the host namespace.
const PROM: &str = "127.0.0.1:9090";

#[test]
#[ignore = "privileged: needs root, BPF, netns and prometheus; run by cargo xtask test"]
fn prometheus_reads_exact_vm_and_pair_bytes() {
    let mut lab = Lab::new("sct-prom-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    // A peer elsewhere, behind an uplink the agent does not watch: its
    // traffic with A counts for A, and X gets no `vm` label.
    let x = lab.vm(&h, "up0", "x", X);
    let _sinks = [sink(&a, A), sink(&b, B), sink(&x, X)];

    let bpffs = BpfFs::mount(&format!("/run/score-test-prom-{}", std::process::id()));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    // A 60 s window keeps every pair's rate above zero for the test's
    // length; top_k = 1 exports the busiest pair only.
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"vif*\"]\ndrain_interval = \"100ms\"\nrate_window = \"60s\"\n\
             pin_path = \"{}/score\"\nhttp_listen = \"{AGENT}\"\n[metrics]\ntop_k = 1\n",
            bpffs.path
        ),
    )
    .unwrap();
    let agent = Agent::start(&h, &["run", "--config", config.to_str().unwrap()]);
    agent.wait_for(&["score-agent running"], Duration::from_secs(20));

    // Prometheus first: its targets take ~5 s to apply, traffic meanwhile.
    let mut prom = Prometheus::start(&h, PROM, &[AGENT]);
    prom.wait_ready(Duration::from_secs(10));

    // A <-> X first, then the much bigger A -> B: A -> B is the youngest
    // pair with the most bytes, so its windowed rate (bytes since its first
    // frame) stays the highest of all pairs.
    ping(&a, X);
    udp(&a, A, X, 25, 300);
    ping(&a, B);
    udp(&b, B, A, 10, 500);
    udp(&a, A, B, 200, 1000);

    let a_to_x = PING_FRAME + 25 * udp_frame(300);
    let a_to_b = PING_FRAME + 200 * udp_frame(1000);
    let b_to_a = PING_FRAME + 10 * udp_frame(500);
    let x_to_a = PING_FRAME;
    let wait = Duration::from_secs(40);

    let _on_failure = Guard(&h);
    prom.wait_for_value(
        &format!("score_vm_transmit_bytes_total{{vm=\"{A}\"}}"),
        (a_to_x + a_to_b) as f64,
        wait,
    );
    prom.wait_for_value(
        &format!("score_vm_receive_bytes_total{{vm=\"{A}\"}}"),
        (b_to_a + x_to_a) as f64,
        wait,
    );
    prom.wait_for_value(
        &format!("score_vm_receive_bytes_total{{vm=\"{B}\"}}"),
        a_to_b as f64,
        wait,
    );
    prom.wait_for_value(
        &format!("score_top_pair_bytes{{src=\"{A}\",dst=\"{B}\"}}"),
        a_to_b as f64,
        wait,
    );
    // Bounded labels: one top pair, and `vm` labels for the two hosted
    // VMs only (X is not hosted here).
    prom.wait_for_value("count(score_top_pair_bytes)", 1.0, wait);
    prom.wait_for_value("count(score_vm_transmit_bytes_total)", 2.0, wait);
    prom.wait_for_value("score_bpf_attached_interfaces", 2.0, wait);
    prom.wait_for_value("score_bpf_flow_map_entries", 4.0, wait);
    // The rate is a live gauge: positive while the window holds traffic.
    let rate = prom
        .query(&format!("score_vm_transmit_bytes_per_second{{vm=\"{A}\"}}"))
        .expect("rate query");
    assert!(rate.len() == 1 && rate[0].1 > 0.0, "{rate:?}");
    // Drains were timed: the histogram has samples.
    let drains = prom
        .query("score_drain_duration_seconds_count")
        .expect("drain query");
    assert!(drains.len() == 1 && drains[0].1 >= 1.0, "{drains:?}");

    drop(prom);
    let (code, _, err) = agent.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "{err}");
}

/// Prints the agent's own /metrics if the test fails, to tell an agent
/// bug from a scraping one.
struct Guard<'a>(&'a str);

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "agent /metrics at failure:\n{}",
                http_get(self.0, AGENT, "/metrics").unwrap_or_default()
            );
        }
    }
}
