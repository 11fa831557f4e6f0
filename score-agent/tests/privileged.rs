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

/// The interface index of `vif` in host `h`.
fn ifindex(h: &str, vif: &str) -> u32 {
    sh(&[
        "ip",
        "netns",
        "exec",
        h,
        "cat",
        &format!("/sys/class/net/{vif}/ifindex"),
    ])
    .trim()
    .parse()
    .unwrap()
}

/// The classifiers loaded with `opts` and attached to vif1.0 and vif2.0 of
/// host `h`, from inside it (interface names resolve in the attaching
/// thread's namespace).
fn datapath_on(
    h: &str,
    opts: score_agent::datapath::LoadOptions,
) -> score_agent::datapath::Datapath {
    let (i1, i2) = (ifindex(h, "vif1.0"), ifindex(h, "vif2.0"));
    in_netns(h, move || {
        let mut dp = score_agent::datapath::Datapath::load(&opts).expect("load the classifiers");
        dp.attach("vif1.0", i1).expect("attach vif1.0");
        dp.attach("vif2.0", i2).expect("attach vif2.0");
        dp
    })
}

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

/// The attach path of kernels without TCX (a clsact qdisc and netlink
/// filters, as on Debian 12's 6.1 Xen dom0), forced on this kernel: the
/// same exact counts, and nothing of the agent's left loaded after it.
#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn watch_counts_exactly_through_a_clsact_qdisc() {
    let _ = IGNORE;
    let mut lab = Lab::new("sct-clsact-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sinks = [sink(&a, A), sink(&b, B)];

    let programs_before = score_program_ids();
    let agent = Agent::start(
        &h,
        &["watch", "--iface", "vif*", "--json", "--attach", "clsact"],
    );
    agent.wait_for(
        &["iface=vif1.0", "iface=vif2.0", "watching"],
        Duration::from_secs(20),
    );
    let qdiscs = sh(&[
        "ip", "netns", "exec", &h, "tc", "qdisc", "show", "dev", "vif1.0",
    ]);
    assert!(qdiscs.contains("clsact"), "{qdiscs}");
    let filters = sh(&[
        "ip", "netns", "exec", &h, "tc", "filter", "show", "dev", "vif1.0", "ingress",
    ]);
    assert!(filters.contains("bpf"), "{filters}");

    ping(&a, B);
    udp(&a, A, B, 50, 200);
    udp(&b, B, A, 30, 1000);

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
    assert_eq!(c.len(), 2, "no other pair may appear: {c:?}");
    let filters = sh(&[
        "ip", "netns", "exec", &h, "tc", "filter", "show", "dev", "vif1.0", "ingress",
    ]);
    assert!(
        !filters.contains("bpf"),
        "filters left after exit: {filters}"
    );
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

/// A UDP socket on `port` inside a VM that keeps every payload it gets,
/// as a guest's own service on the control port would.
struct Listener {
    got: std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &str, ip: &str, port: u16) -> Listener {
        let addr: std::net::SocketAddr = format!("{ip}:{port}").parse().unwrap();
        let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (g, s, ns) = (got.clone(), stop.clone(), ns.to_owned());
        let thread = std::thread::spawn(move || {
            in_netns(&ns, move || {
                let sock = std::net::UdpSocket::bind(addr).expect("bind listener");
                sock.set_read_timeout(Some(Duration::from_millis(50)))
                    .unwrap();
                ready_tx.send(()).unwrap();
                let mut buf = [0u8; 2048];
                while !s.load(std::sync::atomic::Ordering::Relaxed) {
                    if let Ok(n) = sock.recv(&mut buf) {
                        g.lock().unwrap().push(buf[..n].to_vec());
                    }
                }
            })
        });
        ready_rx.recv().expect("listener bound");
        Listener {
            got,
            stop,
            thread: Some(thread),
        }
    }

    /// Waits (generously: a loaded machine) until `n` datagrams arrived.
    fn wait_for(&self, n: usize) -> Vec<Vec<u8>> {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = self.got.lock().unwrap().clone();
            if got.len() >= n || std::time::Instant::now() > deadline {
                return got;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Sends each payload as one datagram from `src` in `ns` to `dst:port`.
fn send_to_port(ns: &str, src: &str, dst: &str, port: u16, payloads: Vec<Vec<u8>>) {
    let src: std::net::SocketAddr = format!("{src}:0").parse().unwrap();
    let dst: std::net::SocketAddr = format!("{dst}:{port}").parse().unwrap();
    in_netns(ns, move || {
        let sock = std::net::UdpSocket::bind(src).expect("bind");
        for (i, p) in payloads.iter().enumerate() {
            sock.send_to(p, dst).expect("send");
            if i % 20 == 19 {
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    });
}

#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn a_guests_own_datagrams_to_the_control_port_reach_it() {
    use score_agent::datapath::LoadOptions;
    const PORT: u16 = 7760;
    let mut lab = Lab::new("sct-ctl-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    // A peer outside this host (a VM elsewhere, or a host's agent).
    let x = lab.vm(&h, "up0", "x", X);
    // b runs a service of its own on the control port.
    let listener = Listener::start(&b, B, PORT);

    // The kernel side with interception on, attached from inside the host
    // (interface names resolve in the attaching thread's namespace).
    let mut dp = datapath_on(
        &h,
        LoadOptions {
            flows_max: 1024,
            pin_dir: None,
            control_port: Some(PORT),
        },
    );
    let mut ring = dp.take_control_reader().expect("control ring");

    // ARP first, and a's MAC learnt as a hosted VM's.
    ping(&a, B);
    ping(&x, B);
    let base = dp.snapshot().expect("read the flow map");
    let before = |s: &str, d: &str| {
        base.iter()
            .find(|((ps, pd), _)| ps.to_string() == s && pd.to_string() == d)
            .map_or((0, 0), |(_, t)| (t.bytes, t.packets))
    };
    let (ab0, xb0) = (before(A, B), before(X, B));

    // Datagrams to the control port without the magic: from a VM on the
    // same host and from a peer elsewhere. Each starts with bytes close to
    // the magic, so only the full four-byte compare tells them apart.
    let plain = |n: usize, len: usize, first: &[u8]| -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                let mut p = vec![0x5a; len];
                p[..first.len()].copy_from_slice(first);
                p
            })
            .collect()
    };
    send_to_port(&a, A, B, PORT, plain(30, 200, b"SCOX"));
    send_to_port(&x, X, B, PORT, plain(20, 120, b"XCOR"));
    // And real S-CORE datagrams (the magic, then anything: the classifier
    // cannot check the MAC), from the peer elsewhere: for the agent.
    let ours = plain(5, 100, &score_common::CONTROL_MAGIC);
    send_to_port(&x, X, B, PORT, ours.clone());

    let got = listener.wait_for(50);
    assert_eq!(got.len(), 50, "every plain datagram reaches the guest");
    assert!(
        got.iter()
            .all(|p| !p.starts_with(&score_common::CONTROL_MAGIC)),
        "a datagram with the magic reached the guest"
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let mut caught = Vec::new();
    while caught.len() < 5 && std::time::Instant::now() < deadline {
        caught.extend(ring.drain());
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(caught.len(), 5, "the magic datagrams go to the agent");
    for c in &caught {
        assert_eq!(c.src.ip().to_string(), X);
        assert_eq!(c.vm.to_string(), B);
        assert_eq!(c.payload, ours[0]);
    }
    // Nothing else came late: the guest still has exactly the 50.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(listener.got.lock().unwrap().len(), 50);

    // The guest's datagrams are its traffic, counted exactly; the agent's
    // are not.
    let now = dp.snapshot().expect("read the flow map");
    let after = |s: &str, d: &str| {
        now.iter()
            .find(|((ps, pd), _)| ps.to_string() == s && pd.to_string() == d)
            .map_or((0, 0), |(_, t)| (t.bytes, t.packets))
    };
    let (ab1, xb1) = (after(A, B), after(X, B));
    assert_eq!(
        (ab1.0 - ab0.0, ab1.1 - ab0.1),
        (30 * udp_frame(200), 30),
        "a -> b on the control port"
    );
    assert_eq!(
        (xb1.0 - xb0.0, xb1.1 - xb0.1),
        (20 * udp_frame(120), 20),
        "x -> b on the control port, the agent's 5 datagrams not counted"
    );
    let stats = dp.stats().expect("datapath statistics");
    assert_eq!(stats.control_intercepted, 5, "{stats:?}");
    assert_eq!(stats.control_ring_full, 0, "{stats:?}");
}

/// Counts through the slot array stay exact: frames counted in the flow
/// map before a pair gets its slot, at the slot after, through a second
/// move, and after the pair's slot is freed as idle (a new life of the
/// pair, from zero). Both counting paths: a hosted sender (ingress) and a
/// remote one (egress).
#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn slotted_pairs_count_exactly_through_slot_moves_and_eviction() {
    use score_agent::{
        datapath::{Datapath, LoadOptions},
        flows::{Pair, Totals},
    };
    let mut lab = Lab::new("sct-slot-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let x = lab.vm(&h, "up0", "x", X);
    let _sinks = [sink(&a, A), sink(&b, B), sink(&x, X)];
    let mut dp = datapath_on(
        &h,
        LoadOptions {
            flows_max: 1024,
            pin_dir: None,
            control_port: None,
        },
    );
    let mut snap: Vec<(Pair, Totals)> = Vec::new();
    // Drains (each may move pairs into slots) until the pair reads
    // `want`, then checks that it stays there: exact, not at least.
    let mut expect = |dp: &mut Datapath, s: &str, d: &str, want: (u64, u64)| {
        let read = |snap: &Vec<(Pair, Totals)>| {
            let found: Vec<_> = snap
                .iter()
                .filter(|((ps, pd), _)| ps.to_string() == s && pd.to_string() == d)
                .map(|(_, t)| (t.bytes, t.packets))
                .collect();
            assert!(found.len() <= 1, "{s} -> {d} listed twice: {snap:?}");
            found.first().copied().unwrap_or((0, 0))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            dp.snapshot_into(&mut snap).expect("drain");
            let got = read(&snap);
            if got == want || std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        std::thread::sleep(Duration::from_millis(200));
        dp.snapshot_into(&mut snap).expect("drain");
        assert_eq!(read(&snap), want, "{s} -> {d}: {snap:?}");
    };

    ping(&a, B);
    udp(&a, A, B, 10, 100);
    expect(&mut dp, A, B, (PING_FRAME + 10 * udp_frame(100), 11));
    expect(&mut dp, B, A, (PING_FRAME, 1));
    assert!(dp.slotted_pairs() >= 2, "a -> b and b -> a hold slots");
    udp(&a, A, B, 20, 100);
    udp(&x, X, B, 7, 300);
    expect(&mut dp, A, B, (PING_FRAME + 30 * udp_frame(100), 31));
    expect(&mut dp, X, B, (7 * udp_frame(300), 7));
    udp(&x, X, B, 3, 300);
    expect(&mut dp, X, B, (10 * udp_frame(300), 10));
    let slotted = dp.slotted_pairs();

    // Evicted: its slot is freed; later frames start a new life.
    let ab: Pair = (A.parse().unwrap(), B.parse().unwrap());
    assert_eq!(dp.remove_pairs(&[ab]).expect("evict"), 1);
    assert_eq!(dp.slotted_pairs(), slotted - 1);
    expect(&mut dp, A, B, (0, 0));
    udp(&a, A, B, 5, 100);
    expect(&mut dp, A, B, (5 * udp_frame(100), 5));
    expect(&mut dp, X, B, (10 * udp_frame(300), 10));
    expect(&mut dp, B, A, (PING_FRAME, 1));
}

/// A drain reads the VM table only when a classifier learnt a VM (or a
/// VM's MAC or vif changed) or the agent forgot one since its last read,
/// and the hosted VMs it gives are those of a fresh read every time.
#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn a_drain_reads_the_vm_table_only_when_a_vm_was_learnt_or_forgotten() {
    use score_agent::datapath::{Datapath, LoadOptions};
    let mut lab = Lab::new("sct-vmt-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sinks = [sink(&a, A), sink(&b, B)];
    let mut dp = datapath_on(
        &h,
        LoadOptions {
            flows_max: 1024,
            pin_dir: None,
            control_port: None,
        },
    );
    let hosted = |dp: &mut Datapath| -> Vec<String> {
        dp.drain_hosted_vms()
            .expect("read the hosted VMs")
            .into_iter()
            .map(|v| v.ip.to_string())
            .collect()
    };
    // Drains until the hosted VMs are `want`, then checks that two more
    // drains give the same without reading the table.
    let expect = |dp: &mut Datapath, want: &[&str]| {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while hosted(dp) != want && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(hosted(dp), want);
        let reads = dp.vm_table_reads();
        assert_eq!(hosted(dp), want);
        assert_eq!(hosted(dp), want);
        assert_eq!(dp.vm_table_reads(), reads, "nothing changed: no read");
    };

    expect(&mut dp, &[]);
    assert_eq!(dp.vm_table_reads(), 1, "the first drain reads the table");
    // a sends (b only answers ARP, which teaches nothing): a is learnt.
    udp(&a, A, B, 3, 100);
    expect(&mut dp, &[A]);
    let reads = dp.vm_table_reads();
    // The same sender again: no write into the table, no read.
    udp(&a, A, B, 3, 100);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(hosted(&mut dp), [A]);
    assert_eq!(dp.vm_table_reads(), reads);
    udp(&b, B, A, 2, 100);
    expect(&mut dp, &[A, B]);
    // Forgetting b's vif deletes b's entry: the next drain reads again.
    let reads = dp.vm_table_reads();
    assert_eq!(dp.forget("vif2.0"), Some(ifindex(&h, "vif2.0")));
    assert_eq!(hosted(&mut dp), [A]);
    assert_eq!(dp.vm_table_reads(), reads + 1);
    expect(&mut dp, &[A]);
}

/// A statistics map pinned by an agent from before the VM table's write
/// count (seven slots instead of eight) is reused as it is: the
/// classifiers load and count exactly, the bump of the missing slot finds
/// none, and every drain reads the VM table.
#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn a_statistics_map_pinned_without_the_vm_count_still_serves() {
    use score_agent::datapath::LoadOptions;
    // The old map is made with bpftool (`cargo xtask setup` installs it).
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no bpftool on this machine to pin an old statistics map with");
        return;
    }
    let mut lab = Lab::new("sct-old-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let _sinks = [sink(&a, A), sink(&b, B)];
    let bpffs = BpfFs::mount(&format!("/run/score-test-bpf-old-{}", std::process::id()));
    let pins = std::path::PathBuf::from(&bpffs.path).join("score");
    std::fs::create_dir_all(&pins).unwrap();
    let stats = pins.join(score_common::STATS_MAP);
    sh(&[
        "bpftool",
        "map",
        "create",
        stats.to_str().unwrap(),
        "type",
        "percpu_array",
        "key",
        "4",
        "value",
        "8",
        "entries",
        &(score_common::Stat::VmsLearnt as u32).to_string(),
        "name",
        score_common::STATS_MAP,
    ]);
    let mut dp = datapath_on(
        &h,
        LoadOptions {
            flows_max: 1024,
            pin_dir: Some(pins.clone()),
            control_port: None,
        },
    );
    udp(&a, A, B, 4, 100);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut snap = Vec::new();
    let ab = |snap: &Vec<(score_agent::flows::Pair, score_agent::flows::Totals)>| {
        snap.iter()
            .find(|((s, d), _)| s.to_string() == A && d.to_string() == B)
            .map(|(_, t)| (t.bytes, t.packets))
    };
    loop {
        dp.snapshot_into(&mut snap).expect("drain");
        if ab(&snap) == Some((4 * udp_frame(100), 4)) || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(ab(&snap), Some((4 * udp_frame(100), 4)), "{snap:?}");
    let reads = dp.vm_table_reads();
    for n in 1..=3 {
        let hosted: Vec<String> = dp
            .drain_hosted_vms()
            .expect("read the hosted VMs")
            .into_iter()
            .map(|v| v.ip.to_string())
            .collect();
        assert_eq!(hosted, [A]);
        assert_eq!(
            dp.vm_table_reads(),
            reads + n,
            "no count: every drain reads"
        );
    }
    drop(dp);
    assert!(stats.exists(), "the old map stays pinned");
}

/// Egress counts the frames of a peer elsewhere and skips a hosted VM's
/// (counted at its own vif), whichever of its three reads decides: the
/// receiving vif's slot for a sender that entered through its own vif,
/// the hosted-VM filter's zero cell for a peer elsewhere, and the VM
/// table for a peer elsewhere that shares a hosted VM's filter cell. The
/// filter follows the table: one per hosted address, taken off when a vif
/// is forgotten, and counted from a table pinned without it.
#[test]
#[ignore = "privileged: needs root, BPF and netns; run by `cargo xtask test`"]
fn egress_counts_a_peer_elsewhere_once_whatever_its_filter_cell() {
    use score_agent::datapath::LoadOptions;
    use score_common::hosted_cell;
    use std::net::Ipv4Addr;
    let cell = |ip: &str| hosted_cell(u32::from(ip.parse::<Ipv4Addr>().unwrap()).to_be());
    // A peer elsewhere whose address falls in a's filter cell.
    let y = (2..=u32::from(u16::MAX))
        .map(|i| Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i).to_string())
        .find(|y| cell(y) == cell(A) && ![A, B, X].contains(&y.as_str()))
        .expect("an address of the /16 in a's cell");
    let y = y.as_str();
    assert_ne!(cell(X), cell(A));
    assert_ne!(cell(X), cell(B));
    assert_ne!(cell(A), cell(B));

    let mut lab = Lab::new("sct-filter-");
    let h = lab.host("h");
    let a = lab.vm(&h, "vif1.0", "a", A);
    let b = lab.vm(&h, "vif2.0", "b", B);
    let x = lab.vm(&h, "up0", "x", X);
    let yn = lab.vm(&h, "up1", "y", y);
    let _sinks = [sink(&a, A), sink(&b, B), sink(&x, X), sink(&yn, y)];
    let bpffs = BpfFs::mount(&format!(
        "/run/score-test-bpf-filter-{}",
        std::process::id()
    ));
    let pins = std::path::PathBuf::from(&bpffs.path).join("score");
    let opts = || LoadOptions {
        flows_max: 1024,
        pin_dir: Some(pins.clone()),
        control_port: None,
    };
    let mut dp = datapath_on(&h, opts());
    assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 0);

    udp(&a, A, B, 3, 100);
    udp(&b, B, A, 2, 200);
    udp(&x, X, A, 4, 300);
    udp(&yn, y, A, 5, 400);
    udp(&a, A, y, 6, 500);
    let want = [
        ((A, B), (3, 100)),
        ((B, A), (2, 200)),
        ((X, A), (4, 300)),
        ((y, A), (5, 400)),
        ((A, y), (6, 500)),
    ];
    let mut snap = Vec::new();
    let got = |snap: &Vec<(score_agent::flows::Pair, score_agent::flows::Totals)>| -> Counts {
        snap.iter()
            .map(|((s, d), t)| ((s.to_string(), d.to_string()), (t.bytes, t.packets)))
            .collect()
    };
    let expected: Counts = want
        .iter()
        .map(|((s, d), (n, len))| {
            (
                (s.to_string(), d.to_string()),
                (*n as u64 * udp_frame(*len), *n as u64),
            )
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        dp.snapshot_into(&mut snap).expect("drain");
        if got(&snap) == expected || std::time::Instant::now() > deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(got(&snap), expected, "each frame counted once");
    assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 1);
    assert_eq!(dp.hosted_filter_cell(B.parse().unwrap()), 1);
    assert_eq!(dp.hosted_filter_cell(y.parse().unwrap()), 1, "a's cell");
    assert_eq!(dp.hosted_filter_cell(X.parse().unwrap()), 0);

    // b's vif forgotten: b's address leaves the table, then the filter.
    assert!(dp.forget("vif2.0").is_some());
    assert_eq!(dp.hosted_filter_cell(B.parse().unwrap()), 0);
    assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 1);
    drop(dp);

    // The next agent keeps the pinned filter as it is; one that finds the
    // table pinned without a filter counts the table's addresses into it.
    let dp = datapath_on(&h, opts());
    assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 1);
    assert_eq!(dp.hosted_filter_cell(B.parse().unwrap()), 0);
    drop(dp);
    let filter = pins.join(score_common::HOSTED_FILTER_MAP);
    std::fs::remove_file(&filter).unwrap();
    let dp = datapath_on(&h, opts());
    assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 1);
    assert_eq!(dp.hosted_filter_cell(X.parse().unwrap()), 0);
    drop(dp);
    // A pinned filter that counts too few (an older agent learnt without
    // it meanwhile) is raised to the table's count at load.
    if std::process::Command::new("bpftool")
        .arg("version")
        .output()
        .is_ok()
    {
        let mut args = vec!["bpftool", "map", "update", "pinned"];
        args.push(filter.to_str().unwrap());
        let key = cell(A).to_ne_bytes().map(|b| b.to_string());
        args.push("key");
        args.extend(key.iter().map(String::as_str));
        args.push("value");
        args.extend(["0"; 8]);
        sh(&args);
        let dp = datapath_on(&h, opts());
        assert_eq!(dp.hosted_filter_cell(A.parse().unwrap()), 1);
    }
}
