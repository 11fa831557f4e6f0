//! Privileged tests: real eBPF on real veths in network namespaces, real
//! traffic. They need root and are `#[ignore]`d under plain `cargo test`;
//! `cargo xtask test` runs them one at a time (they share the kernel).

mod support;

use std::{collections::HashMap, time::Duration};

use serde_json::Value;
use support::*;

const IGNORE: &str = "privileged: needs root, BPF and netns; run by `cargo xtask test`";

type Counts = HashMap<(String, String), (u64, u64)>;

fn counts(pairs: &Value) -> Counts {
    pairs
        .as_array()
        .expect("array of pairs")
        .iter()
        .map(|p| {
            (
                (
                    p["src"].as_str().unwrap().to_owned(),
                    p["dst"].as_str().unwrap().to_owned(),
                ),
                (p["bytes"].as_u64().unwrap(), p["packets"].as_u64().unwrap()),
            )
        })
        .collect()
}

fn pair(c: &Counts, src: &str, dst: &str) -> (u64, u64) {
    c.get(&(src.to_owned(), dst.to_owned()))
        .copied()
        .unwrap_or((0, 0))
}

const A: &str = "198.18.1.1";
const B: &str = "198.18.1.2";
const C: &str = "198.18.1.3";
const X: &str = "198.18.9.1";

#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn watch_counts_every_pair_exactly_once() {
    let _ = IGNORE;
    let mut lab = Lab::new("sct-exact-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    // A peer outside this host, behind an uplink the agent does not watch.
    let x = lab.vm(&h, "up0", "x", X);
    let _sinks = [sink(&a, A), sink(&b, B), sink(&x, X)];

    let programs_before = score_program_ids();
    let agent = Agent::start(&h, &["watch", "--iface", "vif*", "--json"]);
    agent.wait_for(
        &["iface=vif1.0", "iface=vif2.0", "watching"],
        Duration::from_secs(20),
    );

    // VM to VM on the same host: crosses vif1.0 and vif2.0, counted once.
    ping(&a, B);
    udp(&a, A, B, 50, 200);
    udp(&b, B, A, 30, 1000);
    // VM to a peer outside the host.
    ping(&a, X);
    udp(&a, A, X, 40, 100);
    udp(&x, X, A, 20, 500);

    let (code, out, err) = agent.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "{err}");
    let c = counts(&serde_json::from_str(&out).expect("watch --json output"));
    assert_eq!(
        pair(&c, A, B),
        (PING_FRAME + 50 * udp_frame(200), 51),
        "{c:?}"
    );
    assert_eq!(
        pair(&c, B, A),
        (PING_FRAME + 30 * udp_frame(1000), 31),
        "{c:?}"
    );
    assert_eq!(
        pair(&c, A, X),
        (PING_FRAME + 40 * udp_frame(100), 41),
        "{c:?}"
    );
    assert_eq!(
        pair(&c, X, A),
        (PING_FRAME + 20 * udp_frame(500), 21),
        "{c:?}"
    );
    assert_eq!(c.len(), 4, "no other pair may appear: {c:?}");
    let v: Value = serde_json::from_str(&out).unwrap();
    for p in v.as_array().unwrap() {
        assert!(p["rate_bps"].as_f64().unwrap() > 0.0);
    }
    let left = new_score_programs(&programs_before);
    assert!(
        left.is_empty(),
        "classifiers left loaded after exit: {left:?}"
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn watch_follows_interfaces_that_come_and_go() {
    let mut lab = Lab::new("sct-follow-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let x = lab.vm(&h, "up0", "x", X);
    let _sink_x = sink(&x, X);

    let agent = Agent::start(&h, &["watch", "--iface", "vif*", "--json"]);
    agent.wait_for(&["iface=vif1.0", "watching"], Duration::from_secs(20));

    ping(&a, X);
    // A VM starts after the agent did: its vif must be picked up.
    let c_ns = lab.vm(&h, "vif3.0", "c", C);
    agent.wait_for(&["iface=vif3.0"], Duration::from_secs(10));
    let _sink_c = sink(&c_ns, C);
    ping(&c_ns, X);
    udp(&c_ns, C, X, 25, 300);
    // A VM stops: its vif disappears and the agent carries on.
    lab.unplug(&h, "vif1.0");
    agent.wait_for(&["iface=vif1.0", "interface gone"], Duration::from_secs(10));
    udp(&x, X, C, 10, 700);

    let (code, out, err) = agent.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "{err}");
    let c = counts(&serde_json::from_str(&out).unwrap());
    assert_eq!(pair(&c, A, X), (PING_FRAME, 1), "{c:?}");
    assert_eq!(
        pair(&c, C, X),
        (PING_FRAME + 25 * udp_frame(300), 26),
        "{c:?}"
    );
    assert_eq!(
        pair(&c, X, C),
        (PING_FRAME + 10 * udp_frame(700), 11),
        "{c:?}"
    );
}

#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn watch_counts_updates_lost_to_a_full_map() {
    let mut lab = Lab::new("sct-full-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _x = lab.vm(&h, "up0", "x", X);
    let _sink_b = sink(&b, B);

    // Room for two directed pairs; the traffic below makes four.
    let agent = Agent::start(
        &h,
        &["watch", "--iface", "vif*", "--json", "--flows-max", "2"],
    );
    agent.wait_for(&["watching"], Duration::from_secs(20));
    ping(&a, B);
    ping(&a, X);
    ping(&b, X);
    udp(&a, A, B, 10, 100);

    let (code, out, err) = agent.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "the agent must keep running: {err}");
    let c = counts(&serde_json::from_str(&out).unwrap());
    assert_eq!(c.len(), 2, "{c:?}");
    let failed: u64 = err
        .split("updates lost to a full flow map: ")
        .nth(1)
        .and_then(|s| s.split(';').next())
        .and_then(|n| n.parse().ok())
        .expect("failure count reported");
    assert!(
        failed >= 4,
        "every refused frame is counted, got {failed}: {err}"
    );
    // The kernel's own one-time log line reaches the agent's log.
    assert!(err.contains("new pairs go uncounted"), "{err}");
}

fn flows(ns: &str, addr: &str) -> Option<Counts> {
    let body = http_get(ns, addr, "/flows")?;
    let v: Value = serde_json::from_str(&body).ok()?;
    Some(counts(&v["pairs"]))
}

fn wait_flows(ns: &str, addr: &str, src: &str, dst: &str, want: (u64, u64)) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while std::time::Instant::now() < deadline {
        if let Some(c) = flows(ns, addr) {
            if pair(&c, src, dst) == want {
                return;
            }
            last = Some(c);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("flow table never showed {src}->{dst} = {want:?}; last: {last:?}");
}

#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn daemon_counters_survive_a_restart() {
    let mut lab = Lab::new("sct-pin-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sink_b = sink(&b, B);
    // `ip netns exec` gives the agent a private /sys, so /sys/fs/bpf would
    // be a fresh, empty bpffs each run; a bpffs mounted here, in our mount
    // namespace, is the one both runs see (as on a real host).
    let bpffs = BpfFs::mount(&format!("/run/score-test-bpf-{}", std::process::id()));
    let pin = format!("{}/score", bpffs.path);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    let listen = "127.0.0.1:9464";
    std::fs::write(
        &config,
        format!(
            "interfaces = [\"vif*\"]\ndrain_interval = \"100ms\"\nrate_window = \"2s\"\n\
             pin_path = \"{pin}\"\nhttp_listen = \"{listen}\"\n"
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    let programs_before = score_program_ids();
    let agent = Agent::start(&h, &["run", "--config", config]);
    agent.wait_for(&["score-agent running"], Duration::from_secs(20));
    ping(&a, B);
    udp(&a, A, B, 40, 400);
    let first = (PING_FRAME + 40 * udp_frame(400), 41);
    wait_flows(&h, listen, A, B, first);
    let (code, _, err) = agent.stop(libc::SIGTERM);
    assert_eq!(code, Some(0), "{err}");
    assert!(err.contains("detached from every interface"), "{err}");
    let left = new_score_programs(&programs_before);
    assert!(
        left.is_empty(),
        "classifiers left attached after shutdown: {left:?}"
    );
    assert!(
        std::path::Path::new(&pin).join("SCORE_FLOWS").exists(),
        "maps must stay pinned"
    );

    let agent = Agent::start(&h, &["run", "--config", config]);
    agent.wait_for(&["score-agent running"], Duration::from_secs(20));
    udp(&a, A, B, 15, 900);
    wait_flows(
        &h,
        listen,
        A,
        B,
        (first.0 + 15 * udp_frame(900), first.1 + 15),
    );
    let (code, _, err) = agent.stop(libc::SIGINT);
    assert_eq!(code, Some(0), "{err}");
}
