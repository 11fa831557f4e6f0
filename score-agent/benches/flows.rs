//! `cargo xtask bench flows`: what score's per-VM-pair accounting costs, in
//! three parts, all measured against a baseline taken side by side in the
//! same run (never timed assertions; the numbers go to docs/BENCHMARKS.md):
//!
//! 1. `packet`: per-frame cost of the classifiers with BPF_PROG_TEST_RUN,
//!    against the empty classifier `score_bench_empty`; existing-pair and
//!    new-pair (insert) paths.
//! 2. `drain`: time to drain 1k, 10k and 100k pairs from the kernel map into
//!    the flow table (`Datapath::snapshot`, `FlowTable::update`, both).
//! 3. `agent`: CPU and RSS of the real `score-agent run` daemon on 16 vifs
//!    carrying 16 VMs x 100 peers x 2 directions of real frames, against the
//!    same daemon on the same vifs with no traffic (paper §IV-D).
//!
//! Needs root (BPF, network namespaces, bpffs). Everything it creates
//! (namespaces, the bpffs mount, the agent process, files) is removed by
//! `Drop` guards, also when a part fails. Arguments after `--`: part names
//! to run only those, `--quick` for short runs while developing.

mod common;

use common::{in_netns, machine, quiet, sh};
use std::{
    alloc::{GlobalAlloc, Layout, System},
    collections::BTreeMap,
    io::{BufRead, BufReader},
    net::Ipv4Addr,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use aya::programs::{TestRun, TestRunOptions};
use score_agent::{
    collector::monotonic_ns,
    datapath::{Datapath, LoadOptions},
    flows::{FlowTable, Pair},
};
use score_common::{PROG_BENCH_EMPTY, PROG_EGRESS, PROG_INGRESS, PairCounters};

/// Frame size of the per-packet benchmark and of the agent's traffic.
const FRAME_LEN: usize = 128;
/// TC_ACT_OK: what every score classifier returns.
const TC_ACT_OK: u32 = 0;
const SEC: u64 = 1_000_000_000;
/// The peer protocol's default port (`[cluster]`), for the interception
/// check at egress.
const PEER_PORT: u16 = 7760;

/// score-ebpf's bench object: the production classifiers plus the
/// `score_bench_*` programs (the agent's own object carries neither).
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/score-tc-bench"));

/// How long each part runs; `--quick` shrinks everything.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// BPF_PROG_TEST_RUN rounds, and repeats per round.
    rounds: usize,
    repeat: u32,
    /// Single-shot runs per round for the new-pair path.
    singles: usize,
    /// Timed drains per map size.
    drains: usize,
    /// Agent warm-up (the flow table fills its 30 s window) and measurement.
    agent_warmup: Duration,
    agent_measure: Duration,
}

const FULL: Plan = Plan {
    rounds: 10,
    repeat: 1_000_000,
    singles: 10_000,
    drains: 11,
    agent_warmup: Duration::from_secs(35),
    agent_measure: Duration::from_secs(60),
};

const QUICK: Plan = Plan {
    rounds: 3,
    repeat: 100_000,
    singles: 1_000,
    drains: 3,
    agent_warmup: Duration::from_secs(3),
    agent_measure: Duration::from_secs(5),
};

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!(
            "flows bench: needs root (it loads eBPF programs, creates network namespaces and \
             mounts a bpffs); run `cargo xtask bench flows` as root"
        );
        return ExitCode::from(2);
    }
    if !score_agent::datapath::has_program() {
        eprintln!(
            "flows bench: this build carries no eBPF program; run `cargo xtask setup` and rebuild"
        );
        return ExitCode::from(2);
    }
    // cargo passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let plan = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let parts: Vec<&str> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || args[i - 1] != "--drain-interval"))
        .map(|(_, a)| a.as_str())
        .collect();
    // `profile` runs only when named.
    let wants = |p: &str| (parts.is_empty() && p != "profile") || parts.contains(&p);

    println!("score flows bench ({plan:?})");
    println!("machine: {}", machine());
    let mut failed = false;
    for (name, run) in [
        ("packet", packet as fn(&Plan) -> Result<()>),
        ("drain", drain),
        ("agent", agent),
        ("profile", profile),
    ] {
        if !wants(name) {
            continue;
        }
        println!("\n== {name} ==");
        if let Err(e) = run(&plan) {
            eprintln!("flows bench: part {name} failed: {e:#}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

// ---------------------------------------------------------------- summaries

/// Median and spread of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
    p10: f64,
    p90: f64,
    n: usize,
}

fn summarize(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let at = |q: f64| {
        if v.is_empty() {
            f64::NAN
        } else {
            v[((v.len() - 1) as f64 * q).round() as usize]
        }
    };
    Summary {
        median: at(0.5),
        min: at(0.0),
        max: at(1.0),
        p10: at(0.1),
        p90: at(0.9),
        n: v.len(),
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(1);
        write!(
            f,
            "{:.p$} (min {:.p$}, max {:.p$}, n={})",
            self.median, self.min, self.max, self.n
        )
    }
}

// ------------------------------------------------------------------- frames

/// A 128-byte Ethernet + IPv4 + UDP frame from `src` to `dst`.
fn udp_frame(src: Ipv4Addr, dst: Ipv4Addr, src_mac: [u8; 6], dst_mac: [u8; 6]) -> Vec<u8> {
    let mut f = vec![0u8; FRAME_LEN];
    f[0..6].copy_from_slice(&dst_mac);
    f[6..12].copy_from_slice(&src_mac);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (FRAME_LEN - 14) as u16;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40; // don't fragment
        ip[8] = 64;
        ip[9] = 17; // UDP
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let mut sum: u32 = ip
            .chunks(2)
            .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    }
    let udp = &mut f[34..42];
    udp[0..2].copy_from_slice(&40_000u16.to_be_bytes());
    udp[2..4].copy_from_slice(&9u16.to_be_bytes()); // discard
    udp[4..6].copy_from_slice(&((FRAME_LEN - 34) as u16).to_be_bytes());
    f
}

const VM_MAC: [u8; 6] = [0x02, 0x5c, 0, 0, 1, 1];
const PEER_MAC: [u8; 6] = [0x02, 0x5c, 0, 0, 2, 1];

/// `n` distinct host-order pairs from one VM-like source to many peers.
fn pairs(n: usize) -> Vec<Pair> {
    (0..n)
        .map(|i| {
            let i = i as u32;
            (
                Ipv4Addr::new(198, 18, 0, 1 + (i % 200) as u8),
                Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i / 200),
            )
        })
        .collect()
}

/// The global allocator, counting live heap bytes so that the flow
/// table's memory can be measured rather than estimated.
struct CountingAlloc;

static HEAP_LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; only
// a counter is kept beside it.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on as is.
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        }
        p
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) };
        HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if !p.is_null() {
            HEAP_LIVE.fetch_add(new_size, Ordering::Relaxed);
            HEAP_LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        }
        p
    }
}

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

// ------------------------------------------------------------ part 1: packet

/// What one row of the per-packet table runs: label, index of the datapath,
/// program, frame, the interface the frame entered the host by (its
/// `ingress_ifindex`; 0: none, a frame of the host's own), and the pair
/// the frame is counted under.
type Subject<'a> = (&'a str, usize, &'a str, &'a [u8], u32, Option<Pair>);

/// Loopback's ifindex: BPF_PROG_TEST_RUN runs a classifier on it, so the
/// ingress runs learn their sender on this interface.
const LOOPBACK: u32 = 1;

/// One BPF_PROG_TEST_RUN call: (kernel's per-repeat ns, wall ns per repeat).
fn test_run(dp: &mut Datapath, prog: &str, frame: &[u8], repeat: u32) -> Result<(f64, f64)> {
    test_run_from(dp, prog, frame, 0, repeat)
}

/// [`test_run`] of a frame that entered the host by interface `iif`.
fn test_run_from(
    dp: &mut Datapath,
    prog: &str,
    frame: &[u8],
    iif: u32,
    repeat: u32,
) -> Result<(f64, f64)> {
    // The leading fields of `struct __sk_buff`, up to `ifindex`: the
    // kernel takes `ingress_ifindex` (offset 36) from the context passed
    // in, and wants every field it does not take zero.
    let mut ctx = [0u8; 44];
    ctx[36..40].copy_from_slice(&iif.to_ne_bytes());
    let p = dp.program_mut(prog)?;
    let started = Instant::now();
    let r = p
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: (iif != 0).then_some(&ctx[..]),
            repeat,
            ..Default::default()
        })
        .with_context(|| format!("BPF_PROG_TEST_RUN of {prog}"))?;
    let wall = started.elapsed().as_nanos() as f64 / f64::from(repeat);
    ensure!(
        r.return_value == TC_ACT_OK,
        "{prog} returned {} instead of TC_ACT_OK",
        r.return_value
    );
    Ok((r.duration.as_nanos() as f64, wall))
}

fn packets_of(dp: &Datapath, pair: Pair) -> Result<(u64, u64)> {
    Ok(dp
        .snapshot()?
        .into_iter()
        .find(|(p, _)| *p == pair)
        .map_or((0, 0), |(_, t)| (t.packets, t.bytes)))
}

fn packet(plan: &Plan) -> Result<()> {
    let load = |control_port| -> Result<Datapath> {
        let mut dp = Datapath::load_object(
            BENCH_OBJECT,
            &LoadOptions {
                flows_max: score_common::DEFAULT_FLOWS_MAX,
                pin_dir: None,
                control_port,
            },
        )?;
        dp.program_mut(PROG_BENCH_EMPTY)?
            .load()
            .context("loading the empty classifier")?;
        // The paper's per-host worst case already in the map, so the hash
        // lookups run in a populated table.
        let now = monotonic_ns();
        let background = PairCounters {
            bytes: 1000,
            packets: 10,
            first_seen_ns: now,
            last_seen_ns: now,
        };
        dp.insert_pairs(pairs(3200), background)?;
        Ok(dp)
    };
    // Interception of control datagrams off (`watch`, a daemon without
    // [cluster]) and on (the distributed agent: every frame at egress is
    // first checked for the peer protocol's port); the third and fourth as
    // those two, with their pairs moved into slots as the first drain does
    // (the steady state of every pair after its first drain interval).
    let mut dps = [
        load(None)?,
        load(Some(PEER_PORT))?,
        load(None)?,
        load(Some(PEER_PORT))?,
    ];

    let vm = Ipv4Addr::new(198, 18, 200, 1);
    let peer = Ipv4Addr::new(198, 19, 200, 1);
    // Ingress sees the VM's frames; egress those delivered to it from a
    // peer that is not hosted here (a hosted sender's frames are skipped at
    // egress, having been counted at the sender's ingress).
    let out = udp_frame(vm, peer, VM_MAC, PEER_MAC);
    let inb = udp_frame(peer, vm, PEER_MAC, VM_MAC);
    // (label, datapath, program, frame, pair it counts)
    // The hosted sender's own frames at egress (delivered to another VM
    // of this host) are skipped there, having been counted at its ingress:
    // a double count would show in the ingress row's exact count.
    let progs: [Subject; 10] = [
        ("empty", 0, PROG_BENCH_EMPTY, &out, 0, None),
        ("ingress", 0, PROG_INGRESS, &out, 0, Some((vm, peer))),
        ("egress", 0, PROG_EGRESS, &inb, 0, Some((peer, vm))),
        (
            "egress+intercept",
            1,
            PROG_EGRESS,
            &inb,
            0,
            Some((peer, vm)),
        ),
        ("egress, hosted sender", 0, PROG_EGRESS, &out, 0, None),
        ("egress, by its vif", 0, PROG_EGRESS, &out, LOOPBACK, None),
        ("slot: ingress", 2, PROG_INGRESS, &out, 0, Some((vm, peer))),
        ("slot: egress", 2, PROG_EGRESS, &inb, 0, Some((peer, vm))),
        (
            "slot: egress+intercept",
            3,
            PROG_EGRESS,
            &inb,
            0,
            Some((peer, vm)),
        ),
        ("slot: egress+skip", 2, PROG_EGRESS, &out, LOOPBACK, None),
    ];
    // The pair is created by the first run; the timed runs then take the
    // existing-pair path.
    for (_, d, prog, frame, iif, _) in &progs {
        test_run_from(&mut dps[*d], prog, frame, *iif, 1000)?;
    }
    let mut drained = Vec::new();
    for dp in &mut dps[2..] {
        dp.snapshot_into(&mut drained)?;
        ensure!(
            dp.slotted_pairs() == drained.len() && drained.len() > 3200,
            "{} of {} pairs in slots",
            dp.slotted_pairs(),
            drained.len()
        );
    }
    let before: Vec<(u64, u64)> = progs
        .iter()
        .map(|(_, d, _, _, _, p)| p.map_or(Ok((0, 0)), |p| packets_of(&dps[*d], p)))
        .collect::<Result<_>>()?;

    // Interleaved rounds, so drift (other work on this shared machine)
    // affects the programs alike; differences are taken within a round.
    let mut kernel: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut wall: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut extra: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..plan.rounds {
        let mut base = 0.0;
        for (label, d, prog, frame, iif, _) in &progs {
            let (k, w) = test_run_from(&mut dps[*d], prog, frame, *iif, plan.repeat)?;
            kernel.entry(label).or_default().push(k);
            wall.entry(label).or_default().push(w);
            // The kernel's timer stops while the test loop is rescheduled,
            // so its figure, unlike the wall clock, ignores other load.
            if *prog == PROG_BENCH_EMPTY {
                base = k;
            } else {
                extra.entry(label).or_default().push(k - base);
            }
        }
    }
    // The runs really counted: every repeat is one frame of FRAME_LEN bytes.
    let runs = plan.rounds as u64 * u64::from(plan.repeat);
    for ((label, d, _, _, _, pair), (p0, b0)) in progs.iter().zip(before) {
        if let Some(pair) = pair {
            let (p1, b1) = packets_of(&dps[*d], *pair)?;
            let (p, b) = (p1.saturating_sub(p0), b1.saturating_sub(b0));
            ensure!(
                p == runs && b == runs * FRAME_LEN as u64,
                "{label} counted {p} frames / {b} bytes for {runs} runs"
            );
        }
    }
    println!(
        "existing pair, {} rounds x {} repeats, {FRAME_LEN}-byte frame, 3,200 pairs in the map",
        plan.rounds, plan.repeat
    );
    println!("  ns per frame: kernel's average (integer ns) | wall clock / repeats");
    for (label, ..) in &progs {
        println!(
            "  {label:<22} kernel {:.0} | wall {:.2}",
            summarize(&kernel[label]),
            summarize(&wall[label])
        );
    }
    for (label, ..) in &progs[1..] {
        println!(
            "  {label:<22} minus empty (kernel, same round): {:.0} ns",
            summarize(&extra[label])
        );
    }
    breakdown(&mut dps[0], plan)?;
    let dp = &mut dps[0];

    // New pair (first frame: lookup miss + insert) against the existing
    // pair, one frame per call, side by side: for each fresh frame, the
    // empty program, then the classifier twice (the first run inserts the
    // pair, the second finds it). One-shot runs see cold caches and the
    // timer's own overhead, hence the paired differences.
    let (mut empty, mut first, mut again) = (Vec::new(), Vec::new(), Vec::new());
    let (mut d_first, mut d_again, mut d_insert) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..plan.rounds {
        let frames: Vec<(Pair, Vec<u8>)> = (0..plan.singles)
            .map(|i| {
                let dst = Ipv4Addr::from(
                    u32::from(Ipv4Addr::new(198, 20, 0, 0)) + (round * plan.singles + i) as u32,
                );
                ((vm, dst), udp_frame(vm, dst, VM_MAC, PEER_MAC))
            })
            .collect();
        for (_, f) in &frames {
            let e = test_run(dp, PROG_BENCH_EMPTY, f, 1)?.0;
            let n = test_run(dp, PROG_INGRESS, f, 1)?.0;
            let x = test_run(dp, PROG_INGRESS, f, 1)?.0;
            empty.push(e);
            first.push(n);
            again.push(x);
            d_first.push(n - e);
            d_again.push(x - e);
            d_insert.push(n - x);
        }
        // Back to 3,200 pairs, so that every round inserts into the same fill.
        let fresh: Vec<Pair> = frames.iter().map(|(p, _)| *p).collect();
        let removed = dp.remove_pairs(&fresh)?;
        ensure!(
            removed == fresh.len(),
            "only {removed} of {} new pairs were inserted",
            fresh.len()
        );
    }
    println!(
        "one frame per call, ingress (kernel's ns, {} fresh pairs; includes the test \
         timer's overhead): median (min, max) [p10, p90]",
        first.len()
    );
    for (what, v) in [
        ("empty", &empty),
        ("new pair", &first),
        ("existing pair", &again),
        ("new - empty", &d_first),
        ("existing - empty", &d_again),
        ("new - existing", &d_insert),
    ] {
        let s = summarize(v);
        println!("  {what:<18} {s:.0} [{:.0}, {:.0}]", s.p10, s.p90);
    }
    Ok(())
}

/// The pieces of the counting path, each on its own (score-ebpf's
/// `score_bench_*` programs: parsing, then parsing plus one piece), against
/// the empty program in the same round: what each piece costs per frame.
fn breakdown(dp: &mut Datapath, plan: &Plan) -> Result<()> {
    // A pair of its own, so the exact-count checks above are not disturbed.
    let vm = Ipv4Addr::new(198, 18, 201, 1);
    let peer = Ipv4Addr::new(198, 19, 201, 1);
    let out = udp_frame(vm, peer, VM_MAC, PEER_MAC);
    let inb = udp_frame(peer, vm, PEER_MAC, VM_MAC);
    let now = monotonic_ns();
    dp.insert_pairs(
        [(vm, peer)],
        PairCounters {
            bytes: 0,
            packets: 0,
            first_seen_ns: now,
            last_seen_ns: now,
        },
    )?;
    let pieces: [(&str, &str, &[u8]); 8] = [
        ("empty", PROG_BENCH_EMPTY, &out),
        ("parse", "score_bench_parse", &out),
        ("parse+ktime", "score_bench_ktime", &out),
        ("parse+coarse ktime", "score_bench_coarse", &out),
        ("parse+MAC (hash)", "score_bench_mac", &out),
        ("parse+MAC (vif slot)", "score_bench_mac_slot", &out),
        ("parse+hosted check", "score_bench_hosted", &inb),
        ("parse+count", "score_bench_count", &out),
    ];
    for (_, prog, frame) in &pieces {
        if *prog != PROG_BENCH_EMPTY {
            dp.program_mut(prog)?
                .load()
                .with_context(|| format!("loading {prog}"))?;
        }
        test_run(dp, prog, frame, 1000)?;
    }
    let mut kernel: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut extra: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    for _ in 0..plan.rounds {
        let mut base = 0.0;
        for (label, prog, frame) in &pieces {
            let (k, _) = test_run(dp, prog, frame, plan.repeat)?;
            kernel.entry(label).or_default().push(k);
            if *prog == PROG_BENCH_EMPTY {
                base = k;
            } else {
                extra.entry(label).or_default().push(k - base);
            }
        }
    }
    println!("breakdown: each piece alone, kernel ns per frame, median (min-max)");
    for (label, ..) in &pieces {
        let minus = extra
            .get(label)
            .map(|v| format!(" | minus empty {:.1}", summarize(v)))
            .unwrap_or_default();
        println!("  {label:<20} {:.1}{minus}", summarize(&kernel[label]));
    }
    Ok(())
}

// ------------------------------------------------------------- part 2: drain

fn drain(plan: &Plan) -> Result<()> {
    println!(
        "{} drains per size after warm-up; ms, median (min, max); wall clock, and this \
         thread's CPU time (what the drain costs when other work shares the cores)",
        plan.drains
    );
    // The flow map is pinned here so that the bench can reopen it for the
    // batched read below; unmounted (and the pins gone) on drop.
    let mount = BpfMount::new(Path::new(DRAIN_BPFFS))?;
    for n in [1_000usize, 10_000, 100_000] {
        let pins = mount.0.join(format!("n{n}"));
        let mut dp = Datapath::load(&LoadOptions {
            // Room for 100k pairs; a prealloc'd hash at 77% fill at most.
            flows_max: 131_072,
            pin_dir: Some(pins.clone()),
            control_port: None,
        })?;
        let now = monotonic_ns();
        let counters = PairCounters {
            bytes: 128_000,
            packets: 1000,
            first_seen_ns: now.saturating_sub(SEC),
            last_seen_ns: now,
        };
        let inserted = dp.insert_pairs(pairs(n), counters)?;
        ensure!(inserted == n, "inserted {inserted} of {n} pairs");

        // A table in steady state: 30 s window, 1 s drains, so every pair
        // already holds a full window of samples and each drain adds one
        // and drops one, as in the daemon.
        let window = 30 * SEC;
        let warm = dp.snapshot()?;
        ensure!(warm.len() == n, "snapshot saw {} of {n} pairs", warm.len());
        let heap_before = HEAP_LIVE.load(Ordering::Relaxed);
        let mut table = FlowTable::new(window, 120 * SEC, 0);
        // The order the datapath hands pairs over in, as the daemon keeps it.
        table.set_order(dp.pair_order());
        let mut clock = now;
        for _ in 0..31 {
            clock += SEC;
            table.update(clock, warm.iter().copied());
        }
        // The table's own heap at steady state, the daemon's largest
        // user-space cost per pair.
        let table_heap = HEAP_LIVE
            .load(Ordering::Relaxed)
            .saturating_sub(heap_before);
        let mut first_sight = Times::default();
        for _ in 0..plan.drains {
            let mut t = FlowTable::new(window, 120 * SEC, 0);
            t.set_order(dp.pair_order());
            let t0 = Stamp::now();
            t.update(clock, warm.iter().copied());
            first_sight.push(t0, Stamp::now());
        }

        let (mut snap, mut upd, mut both) = (Times::default(), Times::default(), Times::default());
        for _ in 0..plan.drains {
            clock += SEC;
            let t0 = Stamp::now();
            let s = dp.snapshot()?;
            let t1 = Stamp::now();
            let len = s.len();
            table.update(clock, s);
            let t2 = Stamp::now();
            ensure!(len == n, "snapshot saw {len} of {n} pairs");
            snap.push(t0, t1);
            upd.push(t1, t2);
            both.push(t0, t2);
        }
        ensure!(table.len() == n, "flow table holds {} of {n}", table.len());
        let table_heap_end = HEAP_LIVE
            .load(Ordering::Relaxed)
            .saturating_sub(heap_before);

        // The agent's snapshot reads the map with BPF_MAP_LOOKUP_BATCH; the
        // same read pair by pair (two syscalls per pair, its fallback) is
        // what batching saves.
        let mut batch = Times::default();
        let mut expected = dp.snapshot()?;
        expected.sort_by_key(|(p, _)| *p);
        for _ in 0..plan.drains {
            let t0 = Stamp::now();
            let mut got = dp.snapshot_per_pair()?;
            batch.push(t0, Stamp::now());
            got.sort_by_key(|(p, _)| *p);
            ensure!(
                got == expected,
                "the per-pair read disagrees with snapshot()"
            );
        }
        println!(
            "  {n} pairs: flow table heap at steady state {} KiB ({} B per pair; {} B per \
             pair after the timed drains)",
            table_heap / 1024,
            table_heap / n,
            table_heap_end / n
        );
        for (what, t) in [
            ("snapshot", &snap),
            ("update (steady state)", &upd),
            ("snapshot + update", &both),
            ("update (first sight)", &first_sight),
            ("per-pair read (old)", &batch),
        ] {
            let (w, c) = (summarize(&t.wall), summarize(&t.cpu));
            println!(
                "    {what:<22} wall {w:.3} | cpu {c:.3} | cpu {:.0} ns/pair",
                c.median * 1e6 / n as f64
            );
        }
    }
    Ok(())
}

const DRAIN_BPFFS: &str = "/run/score-bench-drain-bpf";

/// A bpffs mounted by the bench, unmounted and removed on drop.
struct BpfMount(PathBuf);

impl BpfMount {
    fn new(path: &Path) -> Result<BpfMount> {
        let _ = quiet(Command::new("umount").arg(path)); // a killed run's
        std::fs::create_dir_all(path)?;
        sh(&["mount", "-t", "bpf", "bpf", &path.to_string_lossy()])?;
        Ok(BpfMount(path.to_owned()))
    }
}

impl Drop for BpfMount {
    fn drop(&mut self) {
        let _ = quiet(Command::new("umount").arg(&self.0));
        let _ = std::fs::remove_dir(&self.0);
    }
}

/// Wall clock and the calling thread's CPU time at one instant.
#[derive(Clone, Copy)]
struct Stamp {
    wall: Instant,
    cpu_ns: u64,
}

impl Stamp {
    fn now() -> Stamp {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: ts is a valid timespec to write into.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        Stamp {
            wall: Instant::now(),
            cpu_ns: ts.tv_sec as u64 * SEC + ts.tv_nsec as u64,
        }
    }
}

/// Intervals in ms, wall and CPU.
#[derive(Default)]
struct Times {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

impl Times {
    fn push(&mut self, from: Stamp, to: Stamp) {
        self.wall.push((to.wall - from.wall).as_secs_f64() * 1e3);
        self.cpu
            .push(to.cpu_ns.saturating_sub(from.cpu_ns) as f64 / 1e6);
    }
}

// ------------------------------------------------------------- part 3: agent

const HOST_NS: &str = "scbench-host";
const VMS_NS: &str = "scbench-vms";
const BPFFS: &str = "/run/score-bench-bpf";
const VMS: usize = 16;
const PEERS: usize = 100;

/// Namespaces, the bpffs mount and files of the agent part; all removed on
/// drop, whatever happened in between.
struct Bed {
    namespaces: Vec<String>,
    mounted: bool,
    files: Vec<PathBuf>,
}

impl Bed {
    fn new() -> Bed {
        // Leftovers of a run that was killed before its guards ran.
        for ns in [HOST_NS, VMS_NS] {
            let _ = quiet(Command::new("ip").args(["netns", "del", ns]));
        }
        let _ = quiet(Command::new("umount").arg(BPFFS));
        Bed {
            namespaces: Vec::new(),
            mounted: false,
            files: Vec::new(),
        }
    }

    fn netns(&mut self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        // No IPv6 chatter (router solicitations, MLD) on the vifs: the only
        // frames are the ones this bench sends.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            sh(&["ip", "netns", "exec", name, "sysctl", "-qw", key])?;
        }
        Ok(())
    }

    fn mount_bpffs(&mut self) -> Result<()> {
        std::fs::create_dir_all(BPFFS)?;
        sh(&["mount", "-t", "bpf", "bpf", BPFFS])?;
        self.mounted = true;
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for ns in self.namespaces.drain(..).rev() {
            let _ = quiet(Command::new("ip").args(["netns", "del", &ns]));
        }
        if self.mounted {
            let _ = quiet(Command::new("umount").arg(BPFFS));
            let _ = std::fs::remove_dir(BPFFS);
        }
        for f in self.files.drain(..) {
            let _ = std::fs::remove_file(f);
        }
    }
}

/// Raw packet sockets on the named interfaces of the calling thread's
/// namespace: what they send leaves through the interface's TC egress.
fn packet_sockets(names: &[String]) -> Result<Vec<OwnedFd>> {
    names
        .iter()
        .map(|name| {
            let cname = std::ffi::CString::new(name.as_str())?;
            // SAFETY: a valid NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
            ensure!(ifindex != 0, "no interface {name}");
            // Protocol 0: send only, never receive.
            // SAFETY: plain socket(2).
            let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
            ensure!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a fresh socket we own.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; all-zero is valid.
            let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sa.sll_family = libc::AF_PACKET as u16;
            sa.sll_protocol = 0x0800u16.to_be();
            sa.sll_ifindex = ifindex as i32;
            // SAFETY: sa is a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&raw const sa).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            ensure!(
                rc == 0,
                "bind to {name}: {}",
                std::io::Error::last_os_error()
            );
            Ok(fd)
        })
        .collect()
}

/// 16 VMs x 100 peers, both directions, one 128-byte frame per directed
/// pair per second: VM frames enter vif i from the VM side (TC ingress),
/// peer frames leave through vif i towards the VM (TC egress). Both are
/// addressed to MACs nobody owns, so each side's stack drops them at once.
struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    thread: Option<thread::JoinHandle<()>>,
}

fn vm_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 1, 1 + i as u8)
}
fn peer_ip(i: usize, j: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 19, i as u8, 1 + j as u8)
}

impl Traffic {
    fn start() -> Result<Traffic> {
        let vm_side: Vec<String> = (0..VMS).map(|i| format!("eth{i}")).collect();
        let host_side: Vec<String> = (0..VMS).map(|i| format!("vif{i}.0")).collect();
        let vm_socks = in_netns(VMS_NS, move || packet_sockets(&vm_side))?;
        let host_socks = in_netns(HOST_NS, move || packet_sockets(&host_side))?;
        let mut batches = Vec::new();
        for i in 0..VMS {
            let mut mac = VM_MAC;
            mac[5] = 1 + i as u8;
            let out: Vec<Vec<u8>> = (0..PEERS)
                .map(|j| udp_frame(vm_ip(i), peer_ip(i, j), mac, PEER_MAC))
                .collect();
            let inb: Vec<Vec<u8>> = (0..PEERS)
                .map(|j| udp_frame(peer_ip(i, j), vm_ip(i), PEER_MAC, mac))
                .collect();
            batches.push((out, inb));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let (flag, ok, bad) = (stop.clone(), sent.clone(), failed.clone());
        let thread = thread::spawn(move || {
            let send = |fd: &OwnedFd, f: &[u8]| {
                // SAFETY: f is a valid buffer of f.len() bytes.
                let n = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
                if n == f.len() as isize {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    bad.fetch_add(1, Ordering::Relaxed);
                }
            };
            // One VM's 200 frames every 1/16 s: small bursts, far below
            // the veth backlog (netdev_max_backlog), so none is dropped
            // before the ingress classifier sees it.
            let slot = Duration::from_secs(1) / VMS as u32;
            let mut next = Instant::now();
            'outer: loop {
                for (i, (out, inb)) in batches.iter().enumerate() {
                    if flag.load(Ordering::Relaxed) {
                        break 'outer;
                    }
                    for (o, n) in out.iter().zip(inb) {
                        send(&vm_socks[i], o);
                        send(&host_socks[i], n);
                    }
                    next += slot;
                    if let Some(d) = next.checked_duration_since(Instant::now()) {
                        thread::sleep(d);
                    }
                }
            }
        });
        Ok(Traffic {
            stop,
            sent,
            failed,
            thread: Some(thread),
        })
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The daemon, started in the host namespace; killed on drop if still up.
struct AgentProc {
    child: Option<Child>,
    log: Arc<Mutex<String>>,
}

impl AgentProc {
    fn start(config: &Path) -> Result<AgentProc> {
        // `ip netns exec` execs the agent in place: the child's pid is the
        // agent's.
        let mut cmd = Command::new("ip");
        // If the bench dies without running its guards (SIGKILL), the agent
        // goes with it rather than run on in a namespace nobody owns.
        // SAFETY: prctl is async-signal-safe, and nothing else runs here.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(["netns", "exec", HOST_NS])
            .arg(common::agent_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting score-agent")?;
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().context("agent stderr")?;
        let sink = log.clone();
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                s.push_str(&line);
                s.push('\n');
            }
        });
        Ok(AgentProc {
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log(&self) -> String {
        self.log.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Fails with the agent's log if it has exited.
    fn alive(&mut self) -> Result<()> {
        let exited = match self.child.as_mut() {
            Some(c) => c.try_wait()?,
            None => None,
        };
        match exited {
            Some(status) => bail!("score-agent exited ({status}):\n{}", self.log()),
            None => Ok(()),
        }
    }

    /// Waits until the agent runs and has attached to every vif.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let log = self.log();
            if log.contains("score-agent running") && log.matches(" attached").count() >= VMS {
                return Ok(());
            }
            self.alive()?;
            ensure!(
                Instant::now() < deadline,
                "score-agent not ready after {timeout:?}:\n{log}"
            );
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM, then wait for the clean shutdown (detach from every vif).
    fn stop(mut self) -> Result<()> {
        match self.child.take() {
            Some(child) => common::stop_agent(child, Duration::from_secs(10)),
            None => Ok(()),
        }
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// CPU time of every live thread of `pid`, in ns (scheduler accounting,
/// exact, unlike the 10 ms ticks of /proc/PID/stat), by thread id, with
/// the thread's name.
fn cpu_ns(pid: u32) -> Result<BTreeMap<u32, (String, u64)>> {
    let mut threads = BTreeMap::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Ok(text) = std::fs::read_to_string(entry.path().join("schedstat")) else {
            continue; // the thread just exited
        };
        let ns: u64 = text
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .context("schedstat")?;
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        if let Some(tid) = entry.file_name().to_str().and_then(|s| s.parse().ok()) {
            threads.insert(tid, (name.trim().to_owned(), ns));
        }
    }
    Ok(threads)
}

/// The CPU each thread name spent between two [`cpu_ns`] readings, in ns
/// (a thread born in between counts from zero), and the threads of the
/// first reading gone by the second.
fn cpu_by_name(
    before: &BTreeMap<u32, (String, u64)>,
    after: &BTreeMap<u32, (String, u64)>,
) -> (BTreeMap<String, u64>, usize) {
    let mut by_name = BTreeMap::new();
    for (tid, (name, ns)) in after {
        let was = before.get(tid).map_or(0, |b| b.1);
        *by_name.entry(name.clone()).or_default() += ns.saturating_sub(was);
    }
    let lost = before.keys().filter(|t| !after.contains_key(t)).count();
    (by_name, lost)
}

/// utime + stime of `pid` in clock ticks (exited threads included).
fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15.
    let utime: u64 = f.get(11).context("utime")?.parse()?;
    let stime: u64 = f.get(12).context("stime")?.parse()?;
    Ok(utime + stime)
}

/// VmRSS, RssAnon, RssFile and VmHWM of `pid`, in KiB.
fn memory_kib(pid: u32) -> Result<[u64; 4]> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let get = |key: &str| -> Result<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{key} in /proc/{pid}/status"))
    };
    Ok([
        get("VmRSS:")?,
        get("RssAnon:")?,
        get("RssFile:")?,
        get("VmHWM:")?,
    ])
}

/// Kernel memory of the BPF maps `pid` holds (fdinfo `memlock`), by map:
/// (map_type, max_entries, bytes).
fn map_memory(pid: u32) -> Result<Vec<(u32, u32, u64)>> {
    let mut maps = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue;
        };
        let field = |k: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if let (Some(t), Some(max), Some(mem)) =
            (field("map_type:"), field("max_entries:"), field("memlock:"))
        {
            maps.push((t as u32, max as u32, mem));
        }
    }
    maps.sort();
    maps.dedup();
    Ok(maps)
}

/// `GET /flows` from the agent, inside its namespace.
fn flows_reply() -> Result<serde_json::Value> {
    let body = score_testbed::http::get(HOST_NS, "127.0.0.1:9464".parse()?, "/flows")?
        .context("the agent did not answer /flows")?;
    Ok(serde_json::from_str(&body)?)
}

/// `score_drain_duration_seconds`' sum and count from the agent's
/// `/metrics`, inside its namespace: the daemon's own timing of its drains
/// (wall clock).
fn drain_histogram() -> Result<(f64, u64)> {
    let body = score_testbed::http::get(HOST_NS, "127.0.0.1:9464".parse()?, "/metrics")?
        .context("the agent did not answer /metrics")?;
    let value = |name: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .with_context(|| format!("{name} in /metrics"))
    };
    Ok((
        value("score_drain_duration_seconds_sum")?,
        value("score_drain_duration_seconds_count")? as u64,
    ))
}

/// What one agent run measured.
#[derive(Debug)]
struct AgentRun {
    cpu_percent: f64,
    cpu_ms: f64,
    ticks: u64,
    rss: Summary,
    anon: Summary,
    file_kib: f64,
    hwm_kib: u64,
    maps: Vec<(u32, u32, u64)>,
    pairs: usize,
    median_rate: f64,
    threads_lost: usize,
    /// CPU by thread name over the window, ns.
    threads: BTreeMap<String, u64>,
    /// Drains in the window, and their wall-clock time as the daemon
    /// timed them (`score_drain_duration_seconds`).
    drains: u64,
    drain_wall_s: f64,
}

fn agent_run(plan: &Plan, config: &Path, traffic: bool) -> Result<AgentRun> {
    // Fresh, empty maps for each run: drop the pins of the previous one.
    let pins = Path::new(BPFFS).join("score");
    if pins.exists() {
        for e in std::fs::read_dir(&pins)? {
            std::fs::remove_file(e?.path())?;
        }
    }
    let mut agent = AgentProc::start(config)?;
    agent.wait_ready(Duration::from_secs(30))?;
    let pid = agent.pid();
    let load = if traffic {
        Some(Traffic::start()?)
    } else {
        None
    };
    thread::sleep(plan.agent_warmup);

    // Before the window: the scrape's own CPU is not counted.
    let drains0 = drain_histogram()?;
    let threads0 = cpu_ns(pid)?;
    let ticks0 = cpu_ticks(pid)?;
    let started = Instant::now();
    let mut samples = Vec::new();
    while started.elapsed() < plan.agent_measure {
        thread::sleep(Duration::from_secs(1));
        agent.alive()?;
        samples.push(memory_kib(pid)?);
    }
    let threads1 = cpu_ns(pid)?;
    let ticks1 = cpu_ticks(pid)?;
    let wall = started.elapsed();
    let maps = map_memory(pid)?;
    let drains1 = drain_histogram()?;

    // After the measured window, so the request costs the agent nothing
    // that was counted.
    let reply = flows_reply()?;
    let pairs = reply["pairs"].as_array().context("pairs")?;
    let mut rates: Vec<f64> = pairs
        .iter()
        .filter_map(|p| p["rate_bps"].as_f64())
        .collect();
    rates.sort_by(f64::total_cmp);
    let median_rate = rates.get(rates.len() / 2).copied().unwrap_or(0.0);
    let full = reply["stats"]["flows_map_full"].as_u64().unwrap_or(0);
    ensure!(full == 0, "the flow map overflowed ({full} failed inserts)");
    if let Some(t) = &load {
        println!(
            "  traffic: {} frames sent, {} failed",
            t.sent.load(Ordering::Relaxed),
            t.failed.load(Ordering::Relaxed)
        );
    }
    drop(load);
    agent.stop()?;

    let (threads, threads_lost) = cpu_by_name(&threads0, &threads1);
    let cpu = threads.values().sum::<u64>() as f64;
    Ok(AgentRun {
        cpu_percent: 100.0 * cpu / wall.as_nanos() as f64,
        cpu_ms: cpu / 1e6,
        ticks: ticks1 - ticks0,
        rss: summarize(&samples.iter().map(|s| s[0] as f64).collect::<Vec<_>>()),
        anon: summarize(&samples.iter().map(|s| s[1] as f64).collect::<Vec<_>>()),
        file_kib: samples.last().map_or(0.0, |s| s[2] as f64),
        hwm_kib: samples.last().map_or(0, |s| s[3]),
        maps,
        pairs: pairs.len(),
        median_rate,
        threads_lost,
        threads,
        drains: drains1.1 - drains0.1,
        drain_wall_s: drains1.0 - drains0.0,
    })
}

/// The drain interval the daemon runs with: `--drain-interval D` (humantime,
/// e.g. `4s`); None: the agent's default, which the config then leaves out.
fn drain_interval() -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == "--drain-interval")
        .and_then(|i| args.get(i + 1))
        .cloned()
}

/// The agent part's namespaces, 16 vifs, bpffs and config file.
fn agent_bed() -> Result<(Bed, PathBuf)> {
    let mut bed = Bed::new();
    bed.netns(HOST_NS)?;
    bed.netns(VMS_NS)?;
    for i in 0..VMS {
        let vif = format!("vif{i}.0");
        let eth = format!("eth{i}");
        sh(&[
            "ip", "-n", HOST_NS, "link", "add", &vif, "type", "veth", "peer", "name", &eth,
            "netns", VMS_NS,
        ])?;
        sh(&["ip", "-n", HOST_NS, "link", "set", &vif, "up"])?;
        sh(&["ip", "-n", VMS_NS, "link", "set", &eth, "up"])?;
    }
    bed.mount_bpffs()?;
    // A fixed name: a killed run's file is simply overwritten.
    let config = PathBuf::from("/run/score-bench-agent.toml");
    // Only what this bed needs; everything else (drain interval, rate
    // window, idle time-out, map size) is the agent's default, unless
    // `--drain-interval` says otherwise.
    let mut text = format!(
        "interfaces = [\"vif*\"]\npin_path = \"{BPFFS}/score\"\n\
         http_listen = \"127.0.0.1:9464\"\n"
    );
    if let Some(d) = drain_interval() {
        text.push_str(&format!("drain_interval = \"{d}\"\n"));
    }
    std::fs::write(&config, text)?;
    bed.files.push(config.clone());
    Ok((bed, config))
}

/// `profile`: the loaded daemon of the agent part under `perf record`
/// (call graphs from DWARF, 30 s after a 10 s warm-up), for finding where
/// its CPU goes; the data lands in `$SCORE_PROFILE_OUT` (default
/// /tmp/score-agent.perf.data), read it with `perf report -i`.
/// `$SCORE_PROFILE_FREQ` (samples per second, default 499) and
/// `$SCORE_PROFILE_SECS` (default 30) change the sampling: at the default
/// 4 s drains the daemon spends a few ms of CPU in 30 s, a handful of
/// samples at 499 Hz.
fn profile(_plan: &Plan) -> Result<()> {
    let (bed, config) = agent_bed()?;
    let out = std::env::var("SCORE_PROFILE_OUT")
        .unwrap_or_else(|_| "/tmp/score-agent.perf.data".to_owned());
    let env_or = |name: &str, default: u32| -> Result<String> {
        Ok(match std::env::var(name) {
            Ok(v) => v
                .parse::<u32>()
                .with_context(|| format!("{name}={v}: not a number"))?
                .to_string(),
            Err(_) => default.to_string(),
        })
    };
    let freq = env_or("SCORE_PROFILE_FREQ", 499)?;
    let secs = env_or("SCORE_PROFILE_SECS", 30)?;
    let mut agent = AgentProc::start(&config)?;
    agent.wait_ready(Duration::from_secs(30))?;
    let load = Traffic::start()?;
    thread::sleep(Duration::from_secs(10));
    let status = Command::new("perf")
        .args([
            "record",
            "-q",
            "-F",
            &freq,
            "--call-graph",
            "dwarf,32768",
            "-o",
        ])
        .arg(&out)
        .args(["-p", &agent.pid().to_string(), "--", "sleep", &secs])
        .status()
        .context("running perf record")?;
    ensure!(status.success(), "perf record failed: {status}");
    agent.alive()?;
    drop(load);
    agent.stop()?;
    drop(bed);
    println!("profile written to {out}");
    Ok(())
}

fn agent(plan: &Plan) -> Result<()> {
    let (_bed, config) = agent_bed()?;
    println!(
        "score-agent run: {VMS} vifs, drain interval {}, the rest of the configuration the \
         agent's defaults; warm-up {:?}, measured {:?}",
        drain_interval().unwrap_or_else(|| "default".into()),
        plan.agent_warmup,
        plan.agent_measure
    );

    println!("baseline: no traffic, empty map");
    let base = agent_run(plan, &config, false)?;
    report_run(&base);
    println!(
        "loaded: {VMS} VMs x {PEERS} peers x 2 directions, 1 frame of {FRAME_LEN} B per pair per s"
    );
    let loaded = agent_run(plan, &config, true)?;
    report_run(&loaded);
    ensure!(
        loaded.pairs == VMS * PEERS * 2,
        "the agent's flow table holds {} pairs, expected {}",
        loaded.pairs,
        VMS * PEERS * 2
    );

    let maps_kib = loaded.maps.iter().map(|m| m.2).sum::<u64>() as f64 / 1024.0;
    println!("summary:");
    println!(
        "  CPU: loaded {:.4}% of a core, baseline {:.4}%, difference {:.4}%",
        loaded.cpu_percent,
        base.cpu_percent,
        loaded.cpu_percent - base.cpu_percent
    );
    println!(
        "  RSS: loaded {:.0} KiB, baseline {:.0} KiB, difference {:.0} KiB (anon {:.0} KiB); \
         kernel maps {maps_kib:.0} KiB (not in RSS)",
        loaded.rss.median,
        base.rss.median,
        loaded.rss.median - base.rss.median,
        loaded.anon.median - base.anon.median
    );
    Ok(())
}

fn report_run(r: &AgentRun) {
    println!(
        "  CPU {:.4}% of a core ({:.1} ms over the window; utime+stime {} ticks){}",
        r.cpu_percent,
        r.cpu_ms,
        r.ticks,
        if r.threads_lost > 0 {
            format!(
                " [{} threads exited during the window: undercounted]",
                r.threads_lost
            )
        } else {
            String::new()
        }
    );
    let by_thread: Vec<String> = r
        .threads
        .iter()
        .filter(|(_, ns)| **ns > 0)
        .map(|(name, ns)| format!("{name} {:.2} ms", *ns as f64 / 1e6))
        .collect();
    println!("  of which, by thread: {}", by_thread.join(", "));
    println!(
        "  drains in the window: {}, {:.3} ms each (wall clock, the daemon's own timing)",
        r.drains,
        if r.drains > 0 {
            1e3 * r.drain_wall_s / r.drains as f64
        } else {
            0.0
        }
    );
    println!(
        "  VmRSS KiB {:.0}; RssAnon KiB {:.0}; RssFile {:.0} KiB; VmHWM {} KiB",
        r.rss, r.anon, r.file_kib, r.hwm_kib
    );
    println!(
        "  flow table: {} pairs, median rate {:.1} B/s",
        r.pairs, r.median_rate
    );
    for (t, max, mem) in &r.maps {
        println!("  map type {t}, max_entries {max}: {} KiB", mem / 1024);
    }
}
