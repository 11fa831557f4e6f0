//! `cargo xtask bench compare` and `cargo xtask bench scale`: score's
//! per-pair accounting against what a user would pick instead, and the
//! agent's own cost as the work grows. Numbers go to docs/BENCHMARKS.md.
//!
//! `compare` sends the same frames through three counters in a row: a VM
//! namespace's veth into the host namespace, where score's classifiers
//! count at the vif (TC ingress) and the real `score-agent` daemon drains
//! them; the vif is a port of an Open vSwitch bridge with the userspace
//! datapath (this kernel has no openvswitch module), megaflows off, polled
//! with `ovs-appctl dpctl/dump-flows` as the paper did; OVS floods the
//! frames out of an uplink into a Linux bridge whose nftables bridge table
//! counts each pair in a dynamic set. Pairs grow 100 -> 1k -> 10k -> 30k;
//! at each size every poller is timed several times, interleaved, and the
//! three tables are checked to agree byte for byte after converting what
//! each counts. Then the kernel program's CPU under a fixed packet rate,
//! with the program attached and detached.
//!
//! `live` is the live-path curve: real frames through a veth into an
//! attached classifier, the kernel's own run time per run (bpf_stats)
//! against an empty classifier attached the same way in the same round,
//! for 10 to 100k live pairs, for score's ingress classifier and for the
//! bare count on other map types and layouts (score-ebpf's bench object).
//!
//! `scale` pre-fills the flow map with 1k..1M pairs and measures the
//! daemon's drain and RSS, and times token processing (decode, policy
//! advance, encode) for data centres of 1k, 100k and 1M VMs.
//!
//! Needs root. Everything created (namespaces `scb-cmp-*`, OVS processes
//! and their database, the nft table, the bpffs mount, the sysctl
//! `kernel.bpf_stats_enabled`) is removed or restored by `Drop` guards,
//! also when a step fails. Arguments after `--`: `compare`, `live` and/or
//! `scale` (default all three), `--quick` for short runs, `--max-pairs N`.

mod common;

use common::{in_netns, machine, quiet, sh};
use std::{
    collections::HashMap,
    io::Write,
    net::Ipv4Addr,
    os::{
        fd::{AsRawFd, FromRawFd, OwnedFd},
        unix::process::CommandExt,
    },
    path::{Path, PathBuf},
    process::{Child, Command, ExitCode, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use bytes::BytesMut;
use score_agent::{
    collector::{Collector, monotonic_ns},
    config::IfacePatterns,
    datapath::{Datapath, LoadOptions},
    flows::{FlowTable, Pair, Totals},
};
use score_common::{PROG_BENCH_EMPTY, PROG_INGRESS, PairCounters};
use score_core::{
    policy::{PolicyKind, advance},
    token::{Load, Token, TokenEntry},
    wire::{decode_token, encode_token},
};

const SEC: u64 = 1_000_000_000;
const NS_HOST: &str = "scb-cmp-host";
const NS_VMS: &str = "scb-cmp-vms";
const NS_BRIDGE: &str = "scb-cmp-br";
const NS_SCALE: &str = "scb-cmp-scale";
const NS_LIVE: &str = "scb-cmp-live";
const BPFFS: &str = "/run/scb-cmp-bpf";
const OVS_DIR: &str = "/run/scb-cmp-ovs";
const NFT_TABLE: &str = "scb_cmp";
/// Frames sent per pair: the first one of each pair is OVS's upcall.
const FRAMES_PER_PAIR: u64 = 3;
/// Ethernet header: score and OVS count it, nftables' bridge hooks do not.
const ETH_HLEN: u64 = 14;
const AGENT_HTTP: &str = "127.0.0.1:9464";
/// Drains after which a pair's sample window (30 s at 1 s drains) is full.
const STEADY_DRAINS: u64 = 35;

#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Timed polls per size and poller.
    polls: usize,
    /// Frames per second while filling (OVS reads its ports through
    /// AF_PACKET sockets: faster bursts overflow them on a loaded machine).
    fill_rate: u64,
    /// Fixed rate and window of the CPU measurement.
    cpu_rate: u64,
    cpu_window: Duration,
    cpu_rounds: usize,
    /// Token hops timed per data-centre size.
    token_hops: [usize; 3],
    /// Live path: frames per timed window, rate, and rounds.
    live_frames: usize,
    live_rate: u64,
    live_rounds: usize,
}

const FULL: Plan = Plan {
    polls: 9,
    fill_rate: 6_000,
    cpu_rate: 20_000,
    cpu_window: Duration::from_secs(5),
    cpu_rounds: 3,
    token_hops: [400, 40, 9],
    live_frames: 100_000,
    live_rate: 50_000,
    live_rounds: 3,
};

const QUICK: Plan = Plan {
    polls: 3,
    fill_rate: 12_000,
    cpu_rate: 20_000,
    cpu_window: Duration::from_secs(2),
    cpu_rounds: 1,
    token_hops: [50, 5, 3],
    live_frames: 20_000,
    live_rate: 50_000,
    live_rounds: 1,
};

fn main() -> ExitCode {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("compare bench: needs root (eBPF, namespaces, OVS, nftables)");
        return ExitCode::from(2);
    }
    if !score_agent::datapath::has_program() {
        eprintln!("compare bench: this build carries no eBPF program; run `cargo xtask setup`");
        return ExitCode::from(2);
    }
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let plan = if args.iter().any(|a| a == "--quick") {
        QUICK
    } else {
        FULL
    };
    let max_pairs = args
        .iter()
        .position(|a| a == "--max-pairs")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(30_000);
    let parts: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| matches!(*a, "compare" | "live" | "scale"))
        .collect();
    let wants = |p: &str| parts.is_empty() || parts.contains(&p);
    println!("score compare/scale bench ({plan:?})");
    println!("machine: {}", machine());
    let mut failed = false;
    if wants("compare") {
        println!("\n== compare ==");
        if let Err(e) = compare(&plan, max_pairs) {
            eprintln!("compare bench: compare failed: {e:#}");
            failed = true;
        }
    }
    if wants("live") {
        println!("\n== live ==");
        if let Err(e) = live(&plan) {
            eprintln!("compare bench: live failed: {e:#}");
            failed = true;
        }
    }
    if wants("scale") {
        println!("\n== scale ==");
        if let Err(e) = scale(&plan) {
            eprintln!("compare bench: scale failed: {e:#}");
            failed = true;
        }
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

// ---------------------------------------------------------------- summaries

/// Median and spread of repeated measurements.
#[derive(Clone, Copy, Debug)]
struct Summary {
    median: f64,
    min: f64,
    max: f64,
}

fn summarize(values: &[f64]) -> Summary {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return Summary {
            median: f64::NAN,
            min: f64::NAN,
            max: f64::NAN,
        };
    }
    // Upper median for an even count: never flatters.
    Summary {
        median: v[v.len() / 2],
        min: v[0],
        max: v[v.len() - 1],
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = f.precision().unwrap_or(2);
        write!(f, "{:.p$} [{:.p$}-{:.p$}]", self.median, self.min, self.max)
    }
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid timespec to write into.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as u64 * SEC + ts.tv_nsec as u64
}

// ------------------------------------------------------------ the test bed

/// Everything the bench creates; dropped in reverse: processes, then
/// namespaces (their nft tables and links go with them), the bpffs mount,
/// directories, and the sysctl put back.
#[derive(Default)]
struct Bed {
    children: Vec<(String, Child)>,
    namespaces: Vec<String>,
    mount: Option<PathBuf>,
    dirs: Vec<PathBuf>,
    bpf_stats_was: Option<String>,
}

impl Bed {
    fn new() -> Bed {
        // Leftovers of a run killed before its guards ran.
        for ns in [NS_HOST, NS_VMS, NS_BRIDGE, NS_SCALE, NS_LIVE] {
            let _ = quiet(Command::new("ip").args(["netns", "del", ns]));
        }
        for pidfile in ["ovs-vswitchd.pid", "ovsdb-server.pid"] {
            if let Some(pid) = std::fs::read_to_string(Path::new(OVS_DIR).join(pidfile))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
            {
                // SAFETY: kill(2); the pid file is our own harness's.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let _ = std::fs::remove_dir_all(OVS_DIR);
        let _ = quiet(Command::new("umount").arg(BPFFS));
        Bed::default()
    }

    fn netns(&mut self, name: &str) -> Result<()> {
        sh(&["ip", "netns", "add", name])?;
        self.namespaces.push(name.to_owned());
        sh(&["ip", "-n", name, "link", "set", "lo", "up"])?;
        // No IPv6 chatter: the only frames are the ones this bench sends.
        for key in [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ] {
            sh(&["ip", "netns", "exec", name, "sysctl", "-qw", key])?;
        }
        Ok(())
    }

    fn mount_bpffs(&mut self) -> Result<PathBuf> {
        std::fs::create_dir_all(BPFFS)?;
        sh(&["mount", "-t", "bpf", "bpf", BPFFS])?;
        self.mount = Some(PathBuf::from(BPFFS));
        Ok(Path::new(BPFFS).join("score"))
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Result<u32> {
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let pid = child.id();
        self.children.push((name.to_owned(), child));
        Ok(pid)
    }

    /// Turns on the kernel's per-program run time accounting, restoring
    /// the previous value on drop (it is machine-wide).
    fn bpf_stats(&mut self) -> Result<()> {
        let path = "/proc/sys/kernel/bpf_stats_enabled";
        let was = std::fs::read_to_string(path)?.trim().to_owned();
        std::fs::write(path, "1")?;
        self.bpf_stats_was = Some(was);
        Ok(())
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        for (_, mut c) in self.children.drain(..).rev() {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = quiet(Command::new("ip").args(["netns", "del", &ns]));
        }
        if let Some(m) = self.mount.take() {
            let _ = quiet(Command::new("umount").arg(&m));
            let _ = std::fs::remove_dir(&m);
        }
        for d in self.dirs.drain(..) {
            let _ = std::fs::remove_dir_all(d);
        }
        if let Some(was) = self.bpf_stats_was.take() {
            let _ = std::fs::write("/proc/sys/kernel/bpf_stats_enabled", was);
        }
    }
}

/// A command that runs inside network namespace `ns`, entered between fork
/// and exec (cheaper than `ip netns exec`, which also remounts /sys: the
/// pollers' times should be theirs, not ours).
fn command_in(ns: &str, program: &str) -> Result<Command> {
    let file = std::fs::File::open(format!("/var/run/netns/{ns}"))?;
    let mut cmd = Command::new(program);
    // SAFETY: setns(2) is async-signal-safe; the fd outlives the fork.
    unsafe {
        cmd.pre_exec(move || {
            if libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    Ok(cmd)
}

/// VmRSS of `pid`, KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    status_kib(pid, "VmRSS")
}

/// One `... kB` field of /proc/PID/status, KiB.
fn status_kib(pid: u32, field: &str) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("{field} of {pid}"))
}

// ------------------------------------------------------------------- agent

/// The real daemon, in a namespace; SIGTERM on `stop` (it detaches its
/// classifiers), SIGKILL on drop if still running.
struct Agent {
    child: Option<Child>,
    ns: &'static str,
    log: PathBuf,
}

impl Agent {
    fn start(ns: &'static str, config: &Path) -> Result<Agent> {
        let log = config.with_extension("log");
        let file = std::fs::File::create(&log)?;
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(common::agent_bin())
            .arg("run")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .context("starting score-agent")?;
        let mut agent = Agent {
            child: Some(child),
            ns,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&agent.log).unwrap_or_default();
            if text.contains("score-agent running") {
                return Ok(agent);
            }
            if let Some(c) = agent.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                bail!("score-agent exited ({status}):\n{text}");
            }
            ensure!(Instant::now() < deadline, "score-agent not ready:\n{text}");
            thread::sleep(Duration::from_millis(50));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The daemon's Prometheus text.
    fn metrics(&self) -> Result<String> {
        score_testbed::http::get(self.ns, AGENT_HTTP.parse()?, "/metrics")?
            .context("the agent did not answer /metrics")
    }

    /// (sum of seconds, count) of the daemon's drain-duration histogram.
    fn drains(&self) -> Result<(f64, u64)> {
        let text = self.metrics()?;
        let get = |name: &str| {
            score_testbed::metrics::select(&text, name)
                .first()
                .copied()
                .with_context(|| format!("{name} in /metrics"))
        };
        Ok((
            get("score_drain_duration_seconds_sum")?,
            get("score_drain_duration_seconds_count")? as u64,
        ))
    }

    /// Waits until the daemon has finished `n` more drains.
    fn wait_drains(&self, n: u64, timeout: Duration) -> Result<(f64, u64)> {
        let (_, c0) = self.drains()?;
        let deadline = Instant::now() + timeout;
        loop {
            let (s, c) = self.drains()?;
            if c >= c0 + n {
                return Ok((s, c));
            }
            ensure!(
                Instant::now() < deadline,
                "daemon drained {} of {n}",
                c - c0
            );
            thread::sleep(Duration::from_millis(200));
        }
    }

    fn stop(mut self) -> Result<()> {
        match self.child.take() {
            Some(child) => common::stop_agent(child, Duration::from_secs(15)),
            None => Ok(()),
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

fn agent_config(dir: &Path, interfaces: &str, pins: &Path, flows_max: u32) -> Result<PathBuf> {
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "interfaces = [\"{interfaces}\"]\ndrain_interval = \"1s\"\nrate_window = \"30s\"\n\
             idle_timeout = \"1h\"\npin_path = \"{}\"\nflows_max = {flows_max}\n\
             http_listen = \"{AGENT_HTTP}\"\n",
            pins.display()
        ),
    )?;
    Ok(path)
}

/// Wall ms and CPU ms of each drain, and the last snapshot.
type Drains = (Vec<f64>, Vec<f64>, Vec<(Pair, Totals)>);

/// A baseline's per-pair (packets, bytes), ms in its tool, ms parsing.
type Polled = (HashMap<Pair, (u64, u64)>, f64, f64);

/// Time to drain the map into a flow table, as the daemon does at each
/// tick: wall ms and this thread's CPU ms per drain. Also returns the
/// last snapshot, for the byte check.
fn time_drains(
    dp: &Datapath,
    table: &mut FlowTable,
    clock: &mut u64,
    polls: usize,
) -> Result<Drains> {
    let (mut wall, mut cpu) = (Vec::new(), Vec::new());
    let mut last = Vec::new();
    for _ in 0..polls {
        *clock += SEC;
        let (t0, c0) = (Instant::now(), thread_cpu_ns());
        let snap = dp.snapshot()?;
        last.clone_from(&snap);
        table.update(*clock, snap);
        wall.push(t0.elapsed().as_secs_f64() * 1e3);
        cpu.push((thread_cpu_ns() - c0) as f64 / 1e6);
    }
    Ok((wall, cpu, last))
}

// -------------------------------------------------------------- traffic

/// Pair `i` of the compare traffic: 200 source VMs behind the one vif
/// (score remembers up to 4,096 hosted addresses), each talking to
/// up to 150+ peers.
fn pair(i: usize) -> Pair {
    let i = i as u32;
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 1)) + i % 200),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i / 200),
    )
}

/// Frame length of pair `i` (Ethernet header included, no FCS): sizes
/// differ between pairs, so a counter that mixed pairs up would show.
fn frame_len(i: usize) -> u64 {
    96 + (i as u64 % 16) * 64
}

fn udp_frame(i: usize) -> Vec<u8> {
    let (src, dst) = pair(i);
    let len = frame_len(i) as usize;
    let mut f = vec![0u8; len];
    // Destination MAC nobody owns: OVS's NORMAL action floods it to the
    // uplink, and the Linux bridge floods it to its sink port.
    f[0..6].copy_from_slice(&[0x02, 0x5c, 0xee, 0, 0, 1]);
    let s = src.octets();
    f[6..12].copy_from_slice(&[0x02, 0x5c, 0x01, s[1], s[2], s[3]]);
    f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    {
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 17;
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
    udp[2..4].copy_from_slice(&9u16.to_be_bytes());
    udp[4..6].copy_from_slice(&((len - 34) as u16).to_be_bytes());
    f
}

/// A raw packet socket on `iface` of namespace `ns`: what it sends enters
/// the veth's peer through its TC ingress.
fn packet_socket(ns: &str, iface: &str) -> Result<OwnedFd> {
    let iface = iface.to_owned();
    in_netns(ns, move || {
        let cname = std::ffi::CString::new(iface.as_str())?;
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(cname.as_ptr()) };
        ensure!(ifindex != 0, "no interface {iface}");
        // SAFETY: plain socket(2); protocol 0: send only.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) };
        ensure!(fd >= 0, "AF_PACKET: {}", std::io::Error::last_os_error());
        // SAFETY: a fresh fd we own.
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
        ensure!(rc == 0, "bind: {}", std::io::Error::last_os_error());
        Ok(fd)
    })
}

/// Sends `frames` in order at `rate` frames per second (bursts of 16);
/// returns (sent, failed, this thread's CPU ns).
fn send_paced(fd: &OwnedFd, frames: &[&[u8]], rate: u64) -> (u64, u64, u64) {
    let started = Instant::now();
    let c0 = thread_cpu_ns();
    let (mut ok, mut bad) = (0u64, 0u64);
    for (n, f) in frames.iter().enumerate() {
        // SAFETY: f is a valid buffer of f.len() bytes.
        let rc = unsafe { libc::send(fd.as_raw_fd(), f.as_ptr().cast(), f.len(), 0) };
        if rc == f.len() as isize {
            ok += 1;
        } else {
            bad += 1;
        }
        if n % 16 == 15 {
            let due = Duration::from_secs_f64((n + 1) as f64 / rate as f64);
            if let Some(d) = due.checked_sub(started.elapsed()) {
                thread::sleep(d);
            }
        }
    }
    (ok, bad, thread_cpu_ns() - c0)
}

// -------------------------------------------------------------- baselines

/// Open vSwitch run by hand: ovsdb-server, and ovs-vswitchd in the host
/// namespace, all files under OVS_DIR. The processes belong to the bed.
struct Ovs {
    ctl: PathBuf,
    vswitchd: u32,
}

fn ovs_vsctl(args: &[&str]) -> Result<String> {
    let db = format!("--db=unix:{OVS_DIR}/db.sock");
    let mut all = vec!["ovs-vsctl", db.as_str(), "--timeout=60"];
    all.extend_from_slice(args);
    sh(&all)
}

fn start_ovs(bed: &mut Bed, ports: &[&str]) -> Result<Ovs> {
    let dir = Path::new(OVS_DIR);
    std::fs::create_dir_all(dir)?;
    bed.dirs.push(dir.to_owned());
    let db = dir.join("conf.db");
    sh(&[
        "ovsdb-tool",
        "create",
        &db.to_string_lossy(),
        "/usr/share/openvswitch/vswitch.ovsschema",
    ])?;
    let p = |name: &str| format!("{}", dir.join(name).display());
    bed.spawn(
        "ovsdb-server",
        Command::new("ovsdb-server")
            .env("OVS_RUNDIR", OVS_DIR)
            .arg(&db)
            .arg(format!("--remote=punix:{}", p("db.sock")))
            .arg(format!("--unixctl={}", p("ovsdb-server.ctl")))
            .arg(format!("--pidfile={}", p("ovsdb-server.pid")))
            .arg(format!("--log-file={}", p("ovsdb-server.log"))),
    )?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dir.join("db.sock").exists() {
        ensure!(Instant::now() < deadline, "ovsdb-server did not come up");
        thread::sleep(Duration::from_millis(20));
    }
    ovs_vsctl(&["--no-wait", "init"])?;
    // `ip netns exec` execs in place: the child's pid is vswitchd's.
    let vswitchd = bed.spawn(
        "ovs-vswitchd",
        Command::new("ip")
            .env("OVS_RUNDIR", OVS_DIR)
            .args(["netns", "exec", NS_HOST, "ovs-vswitchd"])
            .arg(format!("unix:{}", p("db.sock")))
            .arg(format!("--unixctl={}", p("ovs-vswitchd.ctl")))
            .arg(format!("--pidfile={}", p("ovs-vswitchd.pid")))
            .arg(format!("--log-file={}", p("ovs-vswitchd.log"))),
    )?;
    let ctl = dir.join("ovs-vswitchd.ctl");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ctl.exists() {
        ensure!(Instant::now() < deadline, "ovs-vswitchd did not come up");
        thread::sleep(Duration::from_millis(20));
    }
    let mut args = vec![
        "add-br",
        "br-cmp",
        "--",
        "set",
        "bridge",
        "br-cmp",
        "datapath_type=netdev",
    ];
    for port in ports {
        args.extend_from_slice(&["--", "add-port", "br-cmp", port]);
    }
    // Idle flows stay for an hour (default 10 s) and the flow limit is far
    // above our pair counts, so every pair keeps its datapath flow.
    args.extend_from_slice(&[
        "--",
        "set",
        "Open_vSwitch",
        ".",
        "other_config:max-idle=3600000",
        "other_config:flow-limit=1000000",
    ]);
    ovs_vsctl(&args)?;
    let ovs = Ovs { ctl, vswitchd };
    // Exact-match datapath flows, one per microflow, as the paper's OVS
    // (before megaflows) kept them.
    ovs.appctl(&["upcall/disable-megaflows"])?;
    Ok(ovs)
}

impl Ovs {
    fn appctl(&self, args: &[&str]) -> Result<String> {
        let ctl = self.ctl.to_string_lossy().into_owned();
        let mut all = vec!["ovs-appctl", "-t", ctl.as_str()];
        all.extend_from_slice(args);
        sh(&all)
    }

    /// One poll as the paper's collector did it: dump the datapath flows,
    /// parse them into per-pair (packets, bytes). Returns the table and
    /// the ms spent in ovs-appctl and in parsing.
    fn poll(&self) -> Result<Polled> {
        let t0 = Instant::now();
        let text = self.appctl(&["dpctl/dump-flows"])?;
        let t1 = Instant::now();
        let table = parse_ovs(&text);
        Ok((
            table,
            (t1 - t0).as_secs_f64() * 1e3,
            t1.elapsed().as_secs_f64() * 1e3,
        ))
    }
}

/// `ipv4(src=A,dst=B,...)` and `packets:P, bytes:B` of each flow line.
fn parse_ovs(text: &str) -> HashMap<Pair, (u64, u64)> {
    let mut table: HashMap<Pair, (u64, u64)> = HashMap::new();
    let field = |line: &str, key: &str, end: char| -> Option<String> {
        let at = line.find(key)? + key.len();
        let rest = &line[at..];
        Some(rest[..rest.find(end).unwrap_or(rest.len())].to_owned())
    };
    for line in text.lines() {
        let Some(ipv4) = field(line, "ipv4(src=", ')') else {
            continue;
        };
        let src = ipv4.split(',').next().and_then(|s| s.parse().ok());
        let dst = field(&ipv4, "dst=", ',').and_then(|s| s.parse().ok());
        let packets = field(line, "packets:", ',').and_then(|s| s.parse::<u64>().ok());
        let bytes = field(line, "bytes:", ',').and_then(|s| s.parse::<u64>().ok());
        if let (Some(s), Some(d), Some(p), Some(b)) = (src, dst, packets, bytes) {
            let e = table.entry((s, d)).or_default();
            e.0 += p;
            e.1 += b;
        }
    }
    table
}

const NFT_RULES: &str = "table bridge scb_cmp {
  set pairs {
    type ipv4_addr . ipv4_addr
    size 1048576
    flags dynamic
  }
  chain count_pairs {
    type filter hook forward priority 0; policy accept;
    ether type ip update @pairs { ip saddr . ip daddr counter }
  }
}
";

fn nft_load() -> Result<()> {
    let mut child = command_in(NS_BRIDGE, "nft")?
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("nft")?;
    child
        .stdin
        .take()
        .context("nft stdin")?
        .write_all(NFT_RULES.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "nft -f: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// One poll of the nftables set: list it and parse every element's
/// counter. Returns the table and ms in nft and in parsing.
fn nft_poll() -> Result<Polled> {
    let t0 = Instant::now();
    let out = command_in(NS_BRIDGE, "nft")?
        .args(["list", "set", "bridge", NFT_TABLE, "pairs"])
        .output()?;
    ensure!(
        out.status.success(),
        "nft list: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let t1 = Instant::now();
    let table = parse_nft(&String::from_utf8_lossy(&out.stdout));
    Ok((
        table,
        (t1 - t0).as_secs_f64() * 1e3,
        t1.elapsed().as_secs_f64() * 1e3,
    ))
}

/// Elements as nft prints them: `A . B counter packets P bytes N,`.
fn parse_nft(text: &str) -> HashMap<Pair, (u64, u64)> {
    let tokens: Vec<&str> = text
        .split_whitespace()
        .map(|t| t.trim_matches(|c| c == ',' || c == '{' || c == '}'))
        .filter(|t| !t.is_empty())
        .collect();
    let mut table = HashMap::new();
    for w in tokens.windows(8) {
        if w[1] != "." || w[3] != "counter" || w[4] != "packets" || w[6] != "bytes" {
            continue;
        }
        if let (Ok(s), Ok(d), Ok(p), Ok(b)) = (
            w[0].parse::<Ipv4Addr>(),
            w[2].parse::<Ipv4Addr>(),
            w[5].parse::<u64>(),
            w[7].parse::<u64>(),
        ) {
            table.insert((s, d), (p, b));
        }
    }
    table
}

// ------------------------------------------------------------------- live

/// score-ebpf's bench object: the production classifiers plus the
/// `score_bench_*` programs (the agent's own object carries neither).
static BENCH_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/score-tc-bench"));

/// Live pairs of the curve.
const LIVE_PAIRS: [usize; 5] = [10, 100, 1_000, 10_000, 100_000];

/// What the curve attaches, one at a time, to the same interface: label,
/// program. Each `count:` program parses like score's ingress and adds to
/// one map, inserting the pair on a miss, without MAC learning. score's
/// ingress runs twice per round: with every pair in the flow map (as
/// before the slot array: no drain has given them slots; the slot check
/// misses), then after a drain gave them slots (`LIVE_SLOTTED`); and once
/// more at the end on the same frames in trains (`LIVE_TRAINS`).
const LIVE_PROGS: [(&str, &str); 13] = [
    ("empty", PROG_BENCH_EMPTY),
    ("score ingress, flow map", PROG_INGRESS),
    ("score ingress, slots", PROG_INGRESS),
    ("score ingress, small array", PROG_INGRESS),
    ("count: per-CPU hash", "score_bench_count"),
    ("count: hash", "score_bench_count_hash"),
    ("count: per-CPU LRU", "score_bench_count_lru"),
    ("count: 16-byte key", "score_bench_count_key16"),
    ("count: array slot", "score_bench_count_array"),
    ("count: array, hashed", "score_bench_count_array_hashed"),
    ("count: index, slots in order", "score_bench_count_dense"),
    ("count: small index, in order", "score_bench_count_dense"),
    ("score ingress, slots, trains", PROG_INGRESS),
];

/// Index in [`LIVE_PROGS`] of score's ingress with slots given.
const LIVE_SLOTTED: usize = 2;
/// Index in [`LIVE_PROGS`] of score's ingress with the flow map only.
const LIVE_UNSLOTTED: usize = 1;
/// Index in [`LIVE_PROGS`] of score's ingress with slots, loaded a second
/// time with a slot array sized for twice the live pairs instead of the
/// curve's largest size (131,072 slots, 8 MiB on 2 CPUs): the same code
/// over a smaller array, to tell the array's size from the rest.
const LIVE_SMALL: usize = 3;
/// Index in [`LIVE_PROGS`] of the denser-layout probe run on the object
/// loaded for twice the live pairs (as [`LIVE_SMALL`]): its index of slot
/// numbers is as small as that object's slot mask.
const LIVE_SMALL_INDEX: usize = 11;
/// The first of the bench object's `count:` programs in [`LIVE_PROGS`].
const LIVE_BENCH_PROGS: usize = 4;
/// Index in [`LIVE_PROGS`] of score's ingress with slots given, timed on
/// the same frames in trains of [`LIVE_TRAIN`] per pair instead of one
/// frame per pair in turn: a pair's frames come in bursts on a real vif
/// (a TCP window, a request and its reply), and the round robin, the
/// curve's headline, is the worst case for any cache.
const LIVE_TRAINS: usize = 12;
/// Frames per pair in a row in the [`LIVE_TRAINS`] window.
const LIVE_TRAIN: usize = 16;

/// A 128-byte UDP frame from one VM (198.18.0.1) to its `i`-th peer: a
/// vif carries one VM's frames, to many peers.
fn live_frame(i: usize) -> Vec<u8> {
    let mut f = udp_frame(0);
    f.resize(128, 0);
    let dst = Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i as u32);
    let ip = &mut f[14..34];
    ip[2..4].copy_from_slice(&(128u16 - 14).to_be_bytes());
    ip[16..20].copy_from_slice(&dst.octets());
    ip[10..12].fill(0);
    let mut sum: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    f[38..40].copy_from_slice(&(128u16 - 34).to_be_bytes());
    f
}

/// One timed window of one program: (ns per run by bpf_stats, runs,
/// sender thread's CPU ns per frame).
fn live_window(
    dp: &mut Datapath,
    prog: &str,
    sock: &OwnedFd,
    frames: &[&[u8]],
    rate: u64,
) -> Result<(f64, u64, f64)> {
    let p = dp.program_mut(prog)?;
    let link = p
        .attach("lv0", aya::programs::TcAttachType::Ingress)
        .with_context(|| format!("attaching {prog}"))?;
    let before = p.info()?;
    let (sent, failed, sender_ns) = send_paced(sock, frames, rate);
    let after = p.info()?;
    p.detach(link)?;
    ensure!(failed == 0, "{failed} frames failed");
    let runs = after.run_count() - before.run_count();
    let ns = (after.run_time() - before.run_time()).as_nanos() as f64;
    ensure!(
        runs == sent,
        "{prog} ran {runs} times for {sent} frames (bpf_stats off?)"
    );
    Ok((
        ns / runs.max(1) as f64,
        runs,
        sender_ns as f64 / sent as f64,
    ))
}

fn live(plan: &Plan) -> Result<()> {
    let mut bed = Bed::new();
    bed.netns(NS_LIVE)?;
    bed.bpf_stats()?;
    sh(&[
        "ip", "-n", NS_LIVE, "link", "add", "lv0", "type", "veth", "peer", "name", "lv1",
    ])?;
    for l in ["lv0", "lv1"] {
        sh(&["ip", "-n", NS_LIVE, "link", "set", l, "up"])?;
    }
    println!(
        "frames sent into lv1 arrive at lv0's TC ingress, where one program at a time is \
         attached; {} frames per window at {}/s cycling over the live pairs, {} round(s); \
         ns per run by bpf_stats, median [min-max]; minus empty: same round",
        plan.live_frames, plan.live_rate, plan.live_rounds
    );
    let plan = *plan;
    in_netns(NS_LIVE, move || {
        let sock = packet_socket(NS_LIVE, "lv1")?;
        for n in LIVE_PAIRS {
            let mut dp = Datapath::load_object(
                BENCH_OBJECT,
                &LoadOptions {
                    flows_max: 131_072,
                    pin_dir: None,
                    control_port: Some(7760),
                },
            )?;
            // Each program once (the denser-layout probe is listed twice).
            for (_, prog) in &LIVE_PROGS[LIVE_BENCH_PROGS..LIVE_SMALL_INDEX] {
                dp.program_mut(prog)?
                    .load()
                    .with_context(|| format!("loading {prog}"))?;
            }
            dp.program_mut(PROG_BENCH_EMPTY)?.load()?;
            let mut small = Datapath::load_object(
                BENCH_OBJECT,
                &LoadOptions {
                    flows_max: (2 * n) as u32,
                    pin_dir: None,
                    control_port: Some(7760),
                },
            )?;
            small
                .program_mut(LIVE_PROGS[LIVE_SMALL_INDEX].1)?
                .load()
                .context("loading the denser-layout probe")?;
            let owned: Vec<Vec<u8>> = (0..n).map(live_frame).collect();
            let frames: Vec<&[u8]> = (0..plan.live_frames.max(n))
                .map(|i| owned[i % n].as_slice())
                .collect();
            // Warm-up: every pair once through every program, so the
            // timed windows see existing pairs only.
            for (i, (_, prog)) in LIVE_PROGS.iter().enumerate() {
                let d = if matches!(i, LIVE_SMALL | LIVE_SMALL_INDEX) {
                    &mut small
                } else {
                    &mut dp
                };
                live_window(d, prog, &sock, &frames[..n], plan.live_rate)?;
            }
            let mut drained = Vec::new();
            small.snapshot_into(&mut drained)?;
            let small_slotted = small.slotted_pairs();
            let timed = &frames[..plan.live_frames];
            let trains: Vec<&[u8]> = (0..plan.live_frames)
                .map(|i| owned[(i / LIVE_TRAIN) % n].as_slice())
                .collect();
            let mut per: Vec<Vec<(f64, f64)>> = vec![Vec::new(); LIVE_PROGS.len()];
            let mut minus: Vec<Vec<(f64, f64)>> = vec![Vec::new(); LIVE_PROGS.len()];
            let ours: Vec<_> = (0..n)
                .map(|i| {
                    (
                        Ipv4Addr::new(198, 18, 0, 1),
                        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i as u32),
                    )
                })
                .collect();
            let mut slotted = 0;
            for _ in 0..plan.live_rounds {
                let mut base = (0.0, 0.0);
                for (i, (_, prog)) in LIVE_PROGS.iter().enumerate() {
                    if i == LIVE_UNSLOTTED && dp.slotted_pairs() > 0 {
                        // Back to the flow map: free the slots, then every
                        // pair once (untimed) so that it exists there again.
                        dp.remove_pairs(&ours)?;
                        live_window(&mut dp, prog, &sock, &frames[..n], plan.live_rate)?;
                    }
                    if i == LIVE_SLOTTED {
                        // What the agent's drain does: pairs get slots.
                        dp.snapshot_into(&mut drained)?;
                        slotted = dp.slotted_pairs();
                    }
                    let d = if matches!(i, LIVE_SMALL | LIVE_SMALL_INDEX) {
                        &mut small
                    } else {
                        &mut dp
                    };
                    let order = if i == LIVE_TRAINS { &trains } else { timed };
                    let (ns, _, sender) = live_window(d, prog, &sock, order, plan.live_rate)?;
                    per[i].push((ns, sender));
                    if i == 0 {
                        base = (ns, sender);
                    } else {
                        minus[i].push((ns - base.0, sender - base.1));
                    }
                }
            }
            // Distinct pairs: `score_bench_count` adds to the flow map
            // too, so a pair with a slot may also have an entry there.
            let counted = dp
                .snapshot()?
                .iter()
                .filter(|(p, _)| p.0 == Ipv4Addr::new(198, 18, 0, 1))
                .map(|(p, _)| *p)
                .collect::<std::collections::HashSet<_>>()
                .len();
            ensure!(counted == n, "score ingress holds {counted} pairs, not {n}");
            let small_counted = small.snapshot()?.len();
            ensure!(
                small_counted == n,
                "score ingress with the small array holds {small_counted} pairs, not {n}"
            );
            println!(
                "{n} live pairs, {slotted} of them in slots after a drain; {small_slotted} in \
                 the small array's {} slots (load {}):",
                score_agent::datapath::slot_count((2 * n) as u32),
                loadavg()
            );
            for (i, (label, _)) in LIVE_PROGS.iter().enumerate() {
                let run = summarize(&per[i].iter().map(|v| v.0).collect::<Vec<_>>());
                let snd = summarize(&per[i].iter().map(|v| v.1).collect::<Vec<_>>());
                if i == 0 {
                    println!("  {label:<22} {run:.1} ns/run | sender {snd:.0} ns/frame");
                } else {
                    let d = summarize(&minus[i].iter().map(|v| v.0).collect::<Vec<_>>());
                    let ds = summarize(&minus[i].iter().map(|v| v.1).collect::<Vec<_>>());
                    println!(
                        "  {label:<22} {run:.1} ns/run, minus empty {d:.1} | sender {snd:.0}, \
                         minus empty {ds:.0} ns/frame"
                    );
                }
            }
        }
        Ok(())
    })
}

// ---------------------------------------------------------------- compare

/// Ids of the BPF programs `pid` holds open, from its fdinfo.
fn prog_ids(pid: u32) -> Vec<u32> {
    let mut ids = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return ids;
    };
    for e in dir.flatten() {
        if let Ok(text) = std::fs::read_to_string(e.path())
            && let Some(id) = text
                .lines()
                .find_map(|l| l.strip_prefix("prog_id:"))
                .and_then(|v| v.trim().parse().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// (run_time_ns, run_cnt) summed over the programs, from the kernel's
/// per-program accounting (kernel.bpf_stats_enabled).
fn prog_runtime(ids: &[u32]) -> Result<(u64, u64)> {
    let (mut ns, mut cnt) = (0, 0);
    for id in ids {
        let out = sh(&["bpftool", "prog", "show", "id", &id.to_string(), "-j"])?;
        let v: serde_json::Value = serde_json::from_str(&out)?;
        ns += v["run_time_ns"].as_u64().unwrap_or(0);
        cnt += v["run_cnt"].as_u64().unwrap_or(0);
    }
    Ok((ns, cnt))
}

/// System and softirq time of all CPUs (/proc/stat, in USER_HZ ticks).
fn proc_stat_sys_softirq() -> Result<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/stat")?;
    let cpu = text.lines().next().context("/proc/stat")?;
    let f: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq
    Ok((*f.get(2).context("system")?, *f.get(6).context("softirq")?))
}

struct Row {
    pairs: usize,
    score: Summary,
    score_cpu: Summary,
    daemon_drain_ms: f64,
    agent_rss: u64,
    ovs: Summary,
    ovs_cpu: Summary,
    nft_cpu: Summary,
    ovs_parse: Summary,
    ovs_rss: u64,
    nft: Summary,
    nft_parse: Summary,
    load: String,
}

fn compare(plan: &Plan, max_pairs: usize) -> Result<()> {
    let mut bed = Bed::new();
    for ns in [NS_HOST, NS_VMS, NS_BRIDGE] {
        bed.netns(ns)?;
    }
    // VM side -> vif0 (score, OVS port) ... up0 (OVS port) -> up1 (Linux
    // bridge port, nftables) -> br0 -> sink0 (the bridge floods there).
    sh(&[
        "ip", "-n", NS_HOST, "link", "add", "vif0", "type", "veth", "peer", "name", "eth0",
        "netns", NS_VMS,
    ])?;
    sh(&[
        "ip", "-n", NS_HOST, "link", "add", "up0", "type", "veth", "peer", "name", "up1", "netns",
        NS_BRIDGE,
    ])?;
    sh(&[
        "ip", "-n", NS_BRIDGE, "link", "add", "br0", "type", "bridge",
    ])?;
    sh(&[
        "ip", "-n", NS_BRIDGE, "link", "add", "sink0", "type", "veth", "peer", "name", "sink1",
    ])?;
    for port in ["up1", "sink0"] {
        sh(&["ip", "-n", NS_BRIDGE, "link", "set", port, "master", "br0"])?;
    }
    for (ns, link) in [
        (NS_HOST, "vif0"),
        (NS_HOST, "up0"),
        (NS_VMS, "eth0"),
        (NS_BRIDGE, "up1"),
        (NS_BRIDGE, "br0"),
        (NS_BRIDGE, "sink0"),
        (NS_BRIDGE, "sink1"),
    ] {
        sh(&["ip", "-n", ns, "link", "set", link, "up"])?;
    }
    nft_load()?;
    let ovs = start_ovs(&mut bed, &["vif0", "up0"])?;
    let pins = bed.mount_bpffs()?;
    bed.bpf_stats()?;
    let work = PathBuf::from("/run/scb-cmp-work");
    std::fs::create_dir_all(&work)?;
    bed.dirs.push(work.clone());
    let flows_max = 65_536u32;
    let config = agent_config(&work, "vif*", &pins, flows_max)?;
    let agent = Agent::start(NS_HOST, &config)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while !agent.log_text().contains(" attached") {
        ensure!(
            Instant::now() < deadline,
            "the agent did not attach to vif0:\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(50));
    }
    // The bench's own handle on the daemon's pinned maps: its drains time
    // the same map iteration and flow-table update the daemon runs.
    let mut dp = Datapath::load(&LoadOptions {
        flows_max,
        pin_dir: Some(pins.clone()),
        control_port: None,
    })?;
    let sock = packet_socket(NS_VMS, "eth0")?;
    println!(
        "path: {NS_VMS}/eth0 -> vif0 [score TC ingress, daemon drains 1/s] -> OVS br-cmp \
         (userspace datapath: this kernel has no openvswitch module; megaflows off) -> up0 -> \
         Linux bridge br0 [nft bridge set, forward hook] -> sink0"
    );
    println!(
        "{FRAMES_PER_PAIR} UDP frames per pair, {}-{} B, sent at {} frames/s; {} polls per size",
        frame_len(0),
        frame_len(15),
        plan.fill_rate,
        plan.polls
    );

    let mut sizes: Vec<usize> = [100, 1_000, 10_000, 30_000, 50_000]
        .into_iter()
        .filter(|&n| n <= max_pairs)
        .collect();
    if !sizes.contains(&max_pairs) && max_pairs > 100 {
        sizes.push(max_pairs);
    }
    let mut table = FlowTable::new(30 * SEC, 3600 * SEC, 0);
    // The order the datapath hands pairs over in, as the daemon keeps it.
    table.set_order(dp.pair_order());
    let mut clock = monotonic_ns();
    let mut rows = Vec::new();
    let mut done = 0usize;
    let frames: Vec<Vec<u8>> = (0..*sizes.last().unwrap_or(&0)).map(udp_frame).collect();
    for &n in &sizes {
        // The new pairs, FRAMES_PER_PAIR rounds over them (the first round
        // makes OVS's upcalls and the set's new elements).
        let batch: Vec<&[u8]> = (0..FRAMES_PER_PAIR)
            .flat_map(|_| frames[done..n].iter().map(Vec::as_slice))
            .collect();
        let (_, failed, _) = send_paced(&sock, &batch, plan.fill_rate);
        ensure!(failed == 0, "{failed} frames failed to send");
        done = n;
        // Let OVS and the daemon catch up.
        thread::sleep(Duration::from_millis(1500));
        let _ = agent.wait_drains(1, Duration::from_secs(30))?;
        // The daemon's own drains (map iteration, flow table, metrics),
        // from its histogram over three of them.
        let (ds0, dc0) = agent.drains()?;
        let (ds1, dc1) = agent.wait_drains(3, Duration::from_secs(30))?;
        let daemon_drain_ms = (ds1 - ds0) / (dc1 - dc0) as f64 * 1e3;

        let (mut sw, mut sc, mut ow, mut op, mut nw, mut np) =
            (vec![], vec![], vec![], vec![], vec![], vec![]);
        let (mut oc, mut nc) = (vec![], vec![]);
        let (mut snap, mut ovs_t, mut nft_t) = (Vec::new(), HashMap::new(), HashMap::new());
        // Interleaved, so drift on this shared machine hits all three.
        // The daemon gives pairs slots: see them (untimed).
        dp.adopt_slots();
        for _ in 0..plan.polls {
            let (w, c, s) = time_drains(&dp, &mut table, &mut clock, 1)?;
            sw.extend(w);
            sc.extend(c);
            snap = s;
            // CPU of a poll: the dump is served by vswitchd's threads,
            // printed by ovs-appctl (a child), parsed by this thread.
            let (v0, k0, c0) = (
                proc_cpu_ns(ovs.vswitchd),
                children_cpu_ns(),
                thread_cpu_ns(),
            );
            let (t, e, p) = ovs.poll()?;
            oc.push(
                (proc_cpu_ns(ovs.vswitchd).saturating_sub(v0)
                    + children_cpu_ns().saturating_sub(k0)
                    + thread_cpu_ns().saturating_sub(c0)) as f64
                    / 1e6,
            );
            ow.push(e + p);
            op.push(p);
            ovs_t = t;
            // nft's own CPU includes the kernel's netlink dump (its
            // system time).
            let (k0, c0) = (children_cpu_ns(), thread_cpu_ns());
            let (t, e, p) = nft_poll()?;
            nc.push(
                (children_cpu_ns().saturating_sub(k0) + thread_cpu_ns().saturating_sub(c0)) as f64
                    / 1e6,
            );
            nw.push(e + p);
            np.push(p);
            nft_t = t;
        }
        check_agreement(n, &snap, &ovs_t, &nft_t)?;
        let row = Row {
            pairs: n,
            score: summarize(&sw),
            score_cpu: summarize(&sc),
            daemon_drain_ms,
            agent_rss: rss_kib(agent.pid())?,
            ovs: summarize(&ow),
            ovs_cpu: summarize(&oc),
            nft_cpu: summarize(&nc),
            ovs_parse: summarize(&op),
            ovs_rss: rss_kib(ovs.vswitchd)?,
            nft: summarize(&nw),
            nft_parse: summarize(&np),
            load: loadavg(),
        };
        println!(
            "{n} pairs: score drain {:.3} ms (cpu {:.3}, daemon's own mean {:.3}); OVS dump {:.2} ms \
             (parse {:.2}); nft list {:.2} ms (parse {:.2}); agent RSS {} KiB, vswitchd RSS {} KiB; load {}",
            row.score,
            row.score_cpu,
            row.daemon_drain_ms,
            row.ovs,
            row.ovs_parse,
            row.nft,
            row.nft_parse,
            row.agent_rss,
            row.ovs_rss,
            row.load
        );
        rows.push(row);
    }
    print_table(&rows);
    let stats = dp.stats()?;
    println!(
        "score datapath: flows_map_full {}, macs_map_full {}, not_ipv4 {}, not_unicast {}",
        stats.flows_map_full, stats.macs_map_full, stats.not_ipv4, stats.not_unicast
    );
    println!(
        "OVS: {}",
        ovs.appctl(&["dpctl/show"])?
            .lines()
            .nth(1)
            .unwrap_or("")
            .trim()
    );

    // Kernel program CPU under a fixed rate, over the pairs already known
    // (no new entries): attached (daemon up) and detached (daemon
    // stopped, which detaches the classifiers), alternating.
    let known: Vec<&[u8]> = frames[..done.min(10_000)]
        .iter()
        .map(Vec::as_slice)
        .collect();
    let window_frames = (plan.cpu_rate as f64 * plan.cpu_window.as_secs_f64()) as usize;
    let load: Vec<&[u8]> = known.iter().cycle().take(window_frames).copied().collect();
    let mut agent = Some(agent);
    let mut att: Vec<CpuWindow> = Vec::new();
    let mut det: Vec<CpuWindow> = Vec::new();
    for round in 0..plan.cpu_rounds * 2 {
        let attached = round % 2 == 0;
        if attached && agent.is_none() {
            let a = Agent::start(NS_HOST, &config)?;
            let deadline = Instant::now() + Duration::from_secs(20);
            while !a.log_text().contains(" attached") {
                ensure!(Instant::now() < deadline, "agent did not re-attach");
                thread::sleep(Duration::from_millis(50));
            }
            agent = Some(a);
        } else if !attached && let Some(a) = agent.take() {
            a.stop()?;
        }
        let ids = agent
            .as_ref()
            .map(|a| prog_ids(a.pid()))
            .unwrap_or_default();
        let w = cpu_window(&sock, &load, plan.cpu_rate, &ids)?;
        if attached { att.push(w) } else { det.push(w) }
    }
    report_cpu(&att, &det, known.len(), plan);
    if let Some(a) = agent.take() {
        a.stop()?;
    }
    drop(dp);
    Ok(())
}

struct CpuWindow {
    frames: u64,
    sender_ns: u64,
    sys_ticks: u64,
    softirq_ticks: u64,
    prog_ns: u64,
    prog_runs: u64,
}

fn cpu_window(sock: &OwnedFd, load: &[&[u8]], rate: u64, ids: &[u32]) -> Result<CpuWindow> {
    let (p0, r0) = prog_runtime(ids)?;
    let (s0, q0) = proc_stat_sys_softirq()?;
    let (sent, failed, sender_ns) = send_paced(sock, load, rate);
    ensure!(failed == 0, "{failed} frames failed");
    let (s1, q1) = proc_stat_sys_softirq()?;
    let (p1, r1) = prog_runtime(ids)?;
    Ok(CpuWindow {
        frames: sent,
        sender_ns,
        sys_ticks: s1 - s0,
        softirq_ticks: q1 - q0,
        prog_ns: p1 - p0,
        prog_runs: r1 - r0,
    })
}

fn report_cpu(att: &[CpuWindow], det: &[CpuWindow], pairs: usize, plan: &Plan) {
    let hz = 100.0; // USER_HZ
    let per = |ws: &[CpuWindow], f: &dyn Fn(&CpuWindow) -> f64| {
        summarize(&ws.iter().map(f).collect::<Vec<_>>())
    };
    let sender = |w: &CpuWindow| w.sender_ns as f64 / w.frames as f64;
    let sys = |w: &CpuWindow| (w.sys_ticks + w.softirq_ticks) as f64 / hz * 1e9 / w.frames as f64;
    let soft = |w: &CpuWindow| w.softirq_ticks as f64 / hz * 1e9 / w.frames as f64;
    println!(
        "\nkernel program CPU at {} frames/s over {pairs} known pairs, {} windows of {:?} each way \
         (median [min-max], ns per frame):",
        plan.cpu_rate,
        att.len(),
        plan.cpu_window
    );
    println!(
        "  bpf_stats (kernel's own run time of score's programs, attached): {:.1} ns/run, {} runs for {} frames",
        per(att, &|w| w.prog_ns as f64 / w.prog_runs.max(1) as f64),
        att.iter().map(|w| w.prog_runs).sum::<u64>(),
        att.iter().map(|w| w.frames).sum::<u64>()
    );
    println!(
        "  sender thread CPU (send syscall + veth + TC, softirq often runs inline): attached {:.0}, detached {:.0}",
        per(att, &sender),
        per(det, &sender)
    );
    println!(
        "  whole machine system+softirq (/proc/stat; other engineers share it): attached {:.0}, detached {:.0}; softirq alone {:.0} vs {:.0}",
        per(att, &sys),
        per(det, &sys),
        per(att, &soft),
        per(det, &soft)
    );
    println!("  load average now: {}", loadavg());
}

/// The three tables must agree on the traffic: score counts frames with
/// their Ethernet header (skb->len at TC); OVS counts the same bytes but
/// not the first frame of each flow (it went up as an upcall and was
/// executed outside the new datapath flow); nftables' bridge hooks see
/// the frame without its Ethernet header. Frames OVS never read (its
/// AF_PACKET socket overflowed) reach neither OVS's counters nor the
/// bridge behind it: such a pair is consistent when score saw every frame
/// and nft saw exactly what OVS forwarded; they are counted as OVS losses.
fn check_agreement(
    n: usize,
    score: &[(Pair, Totals)],
    ovs: &HashMap<Pair, (u64, u64)>,
    nft: &HashMap<Pair, (u64, u64)>,
) -> Result<()> {
    let score: HashMap<Pair, (u64, u64)> = score
        .iter()
        .map(|(p, t)| (*p, (t.packets, t.bytes)))
        .collect();
    let (mut exact, mut lossy, mut lost_frames) = (0usize, 0usize, 0u64);
    let (mut sum_s, mut sum_o, mut sum_n, mut expect) = (0u64, 0u64, 0u64, 0u64);
    let mut bad: Vec<String> = Vec::new();
    for i in 0..n {
        let p = pair(i);
        let len = frame_len(i);
        let want = FRAMES_PER_PAIR * len;
        expect += want;
        let s = score.get(&p).copied().unwrap_or_default();
        let o = ovs.get(&p).copied().unwrap_or_default();
        let f = nft.get(&p).copied().unwrap_or_default();
        // Converted to score's unit (L2 bytes of every frame).
        let (o_frames, o_conv) = if o.0 > 0 {
            (o.0 + 1, o.1 + len)
        } else {
            (0, 0)
        };
        let f_conv = f.1 + f.0 * ETH_HLEN;
        sum_s += s.1;
        sum_o += o_conv;
        sum_n += f_conv;
        let score_ok = s == (FRAMES_PER_PAIR, want);
        let chain_ok = o_frames == f.0 && o_conv == f_conv && o_conv == o_frames * len;
        if score_ok && chain_ok && o_conv == want {
            exact += 1;
        } else if score_ok && chain_ok && o_frames < FRAMES_PER_PAIR {
            lossy += 1;
            lost_frames += FRAMES_PER_PAIR - o_frames;
        } else if bad.len() < 5 {
            bad.push(format!(
                "{}->{}: want {want} B; score {:?}, OVS {:?}, nft {:?}",
                p.0, p.1, s, o, f
            ));
        }
    }
    println!(
        "  bytes check over {n} pairs (L2 bytes; OVS + its upcall frame, nft + 14 B per frame): \
         sent {expect}, score {sum_s}, OVS {sum_o}, nft {sum_n}; pairs exact in all three: {exact}; \
         pairs where OVS lost frames before counting (nft behind it agrees with OVS): {lossy} \
         ({lost_frames} frames)"
    );
    for b in &bad {
        println!("    mismatch: {b}");
    }
    ensure!(
        exact + lossy == n,
        "the counters disagree on {} pairs beyond OVS's losses: the comparison would be void",
        n - exact - lossy
    );
    Ok(())
}

fn print_table(rows: &[Row]) {
    println!("\nwall clock, ms, median [min-max]:");
    println!(
        "| pairs | score drain | OVS dump-flows | nft list | OVS / score | nft / score | score-agent RSS MiB | ovs-vswitchd RSS MiB | load avg |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1}x | {:.1}x | {:.1} | {:.1} | {} |",
            r.pairs,
            r.score,
            r.ovs,
            r.nft,
            r.ovs.median / r.score.median,
            r.nft.median / r.score.median,
            r.agent_rss as f64 / 1024.0,
            r.ovs_rss as f64 / 1024.0,
            r.load
        );
    }
    println!(
        "\nCPU time per poll, ms, median [min-max] (score: the draining thread; OVS: vswitchd's threads + ovs-appctl + parsing; nft: the nft process, kernel dump included, + parsing):"
    );
    println!("| pairs | score drain | OVS dump-flows | nft list | OVS / score | nft / score |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {:.2} | {:.1} | {:.1} | {:.1}x | {:.1}x |",
            r.pairs,
            r.score_cpu,
            r.ovs_cpu,
            r.nft_cpu,
            r.ovs_cpu.median / r.score_cpu.median,
            r.nft_cpu.median / r.score_cpu.median,
        );
    }
}

/// CPU time of every thread of `pid`, ns (scheduler accounting).
fn proc_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
        .filter_map(|t| {
            t.split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        })
        .sum()
}

/// User + system time of this process's waited-for children, ns.
fn children_cpu_ns() -> u64 {
    // SAFETY: rusage is plain data; getrusage writes into it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: a valid rusage to write into.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as u64 * SEC + t.tv_usec as u64 * 1000;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

// ------------------------------------------------------------------ scale

/// Pair `i` of the pre-filled maps: 1,000 sources x up to 1,000 peers.
fn scale_pair(i: usize) -> Pair {
    let i = i as u32;
    (
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 18, 0, 0)) + i % 1000),
        Ipv4Addr::from(u32::from(Ipv4Addr::new(198, 19, 0, 0)) + i / 1000),
    )
}

fn scale(plan: &Plan) -> Result<()> {
    let mut bed = Bed::new();
    bed.netns(NS_SCALE)?;
    let pins = bed.mount_bpffs()?;
    let work = PathBuf::from("/run/scb-cmp-work");
    std::fs::create_dir_all(&work)?;
    bed.dirs.push(work.clone());
    println!(
        "drain and RSS with a pre-filled map ({} polls each; the daemon drains every 1 s, \
         RSS read after {STEADY_DRAINS} drains: the 30 s window full)",
        plan.polls
    );
    println!(
        "| pairs | before: flow map only, drain ms CPU | after: slots, drain ms (wall) | drain ms (CPU) | ns per pair | pairs in slots | the daemon's drain (Collector::drain), ms CPU | daemon's mean drain ms | daemon RSS MiB (anon / file / shmem) | kernel maps MiB | load avg |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    for n in [1_000usize, 10_000, 100_000, 1_000_000] {
        if pins.exists() {
            for e in std::fs::read_dir(&pins)? {
                std::fs::remove_file(e?.path())?;
            }
        }
        let flows_max = (n + n / 4) as u32;
        let mut dp = Datapath::load(&LoadOptions {
            flows_max,
            pin_dir: Some(pins.clone()),
            control_port: None,
        })?;
        let now = monotonic_ns();
        let inserted = dp.insert_pairs(
            (0..n).map(scale_pair),
            PairCounters {
                bytes: 128_000,
                packets: 1000,
                first_seen_ns: now.saturating_sub(SEC),
                last_seen_ns: now,
            },
        )?;
        ensure!(inserted == n, "inserted {inserted} of {n}");
        // Before: every pair in the flow map, as before the slot array
        // (batched hash-map reads), with a table in steady state.
        let mut table = FlowTable::new(30 * SEC, 3600 * SEC, 0);
        // The order the datapath hands pairs over in, as the daemon keeps it.
        table.set_order(dp.pair_order());
        let mut clock = monotonic_ns();
        let warm = dp.snapshot()?;
        for _ in 0..STEADY_DRAINS {
            clock += SEC;
            table.update(clock, warm.iter().copied());
        }
        drop(warm);
        let (_, before_cpu, last) = time_drains(&dp, &mut table, &mut clock, plan.polls)?;
        ensure!(last.len() == n, "snapshot saw {} of {n}", last.len());
        let before_cpu = summarize(&before_cpu);

        // The daemon adopts the pinned maps and gives the pairs slots.
        let config = agent_config(&work, "scbnone*", &pins, flows_max)?;
        let agent = Agent::start(NS_SCALE, &config)?;
        // Steady state: the flow table keeps one sample per drain over its
        // 30 s window, so its memory is only full after 31 drains; and a
        // drain moves at most 16,384 new pairs into slots (the datapath's
        // MOVES_PER_DRAIN), so a million pairs take about 60 drains.
        let steady = STEADY_DRAINS.max(n as u64 / 16_384 + 5);
        agent.wait_drains(steady, Duration::from_secs(900))?;
        let (s0, c0) = agent.drains()?;
        let (s1, c1) = agent.wait_drains(3, Duration::from_secs(300))?;
        let daemon_ms = (s1 - s0) / (c1 - c0) as f64 * 1e3;
        let rss = rss_kib(agent.pid())?;
        // What the RSS is made of: the heap (anonymous), the binary's pages
        // (file), and the slot array the daemon maps (shared memory).
        let parts = ["RssAnon", "RssFile", "RssShmem"]
            .map(|f| status_kib(agent.pid(), f).unwrap_or(0) as f64 / 1024.0);
        let map_kib = map_kib(agent.pid());
        agent.stop()?;

        // After: the same reads with the pairs in the slots the daemon
        // gave (read through the mapping).
        dp.adopt_slots();
        let (w, c, last) = time_drains(&dp, &mut table, &mut clock, plan.polls)?;
        ensure!(last.len() == n, "snapshot saw {} of {n}", last.len());
        let (w, c) = (summarize(&w), summarize(&c));
        let slotted = dp.slotted_pairs();
        // The daemon's own drain (slots read through the mapping, the flow
        // table, the metrics: `Collector::drain`), on this handle of the
        // pinned maps, timed on this thread: two drains to bring the table
        // to its steady state, then the timed ones.
        let collector = Collector::with_default_metrics(
            dp,
            FlowTable::new(30 * SEC, 3600 * SEC, monotonic_ns()),
            IfacePatterns::new(&["scbnone*".to_owned()])?,
            false,
        );
        let mut daemon_cpu = Vec::new();
        for i in 0..plan.polls + 2 {
            let c0 = thread_cpu_ns();
            collector.drain()?;
            if i >= 2 {
                daemon_cpu.push((thread_cpu_ns() - c0) as f64 / 1e6);
            }
        }
        ensure!(
            collector.flows().len() == n,
            "the drain saw {} of {n}",
            collector.flows().len()
        );
        let daemon_cpu = summarize(&daemon_cpu);
        println!(
            "| {n} | {before_cpu:.2} | {w:.2} | {c:.2} | {:.0} | {slotted} | {daemon_cpu:.2} | {daemon_ms:.2} | {:.1} ({:.1} / {:.1} / {:.1}) | {:.1} | {} |",
            c.median * 1e6 / n as f64,
            rss as f64 / 1024.0,
            parts[0],
            parts[1],
            parts[2],
            map_kib as f64 / 1024.0,
            loadavg()
        );
    }
    drop(bed);
    tokens(plan)
}

/// Kernel memory of the maps held by `pid` (fdinfo memlock, summed: the
/// flow map and the slot array dominate), KiB.
fn map_kib(pid: u32) -> u64 {
    let mut best = 0;
    if let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) {
        for e in dir.flatten() {
            if let Ok(text) = std::fs::read_to_string(e.path())
                && let Some(m) = text
                    .lines()
                    .find_map(|l| l.strip_prefix("memlock:"))
                    .and_then(|v| v.trim().parse::<u64>().ok())
            {
                best += m;
            }
        }
    }
    best / 1024
}

/// A data centre's token: `n` VMs, 40 per host in a /26 per host, levels
/// and loads spread deterministically, half visited.
fn dc_token(n: usize) -> Token {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let entries = (0..n as u32)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            TokenEntry {
                id: base + (i / 40) * 64 + i % 40,
                level: (x % 4) as u8,
                load: Load((x >> 8) as u8),
                visited: (x >> 16) & 1 == 1,
            }
        })
        .collect();
    Token::from_entries(7, 3, None, entries)
}

fn tokens(plan: &Plan) -> Result<()> {
    println!(
        "\ntoken processing per hop: decode + update + policy advance + encode (ms, median [min-max])"
    );
    println!(
        "| VMs | policy | encoded KiB | decode | advance | encode | total | ns per VM | load avg |"
    );
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---|");
    for (k, n) in [1_000usize, 100_000, 1_000_000].into_iter().enumerate() {
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::Distributed,
            PolicyKind::LoadAware,
        ] {
            let token = dc_token(n);
            let mut policy = kind.build();
            let mut buf = BytesMut::new();
            encode_token(&token, &mut buf)?;
            let mut bytes = buf.to_vec();
            let mut holder = token.entries()[n / 2].id;
            let size = bytes.len();
            let (mut dec, mut adv, mut enc, mut tot) = (vec![], vec![], vec![], vec![]);
            for hop in 0..plan.token_hops[k] {
                let t0 = Instant::now();
                let mut t = decode_token(&bytes)?;
                let t1 = Instant::now();
                t.update(holder, (hop % 4) as u8, Load(100));
                let next = advance(policy.as_mut(), &mut t, Some(holder))
                    .context("advance on a non-empty token")?;
                let t2 = Instant::now();
                let mut out = BytesMut::with_capacity(size + 64);
                encode_token(&t, &mut out)?;
                let t3 = Instant::now();
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                dec.push(ms(t0, t1));
                adv.push(ms(t1, t2));
                enc.push(ms(t2, t3));
                tot.push(ms(t0, t3));
                bytes = out.to_vec();
                holder = next;
            }
            let total = summarize(&tot);
            println!(
                "| {n} | {} | {:.1} | {:.3} | {:.3} | {:.3} | {total:.3} | {:.0} | {} |",
                kind.name(),
                size as f64 / 1024.0,
                summarize(&dec),
                summarize(&adv),
                summarize(&enc),
                total.median * 1e6 / n as f64,
                loadavg()
            );
        }
    }
    Ok(())
}
