//! Real QEMU guests as the VMs (`testbed up --guests qemu`, and the qemu
//! and libvirt backends' tests): preparing and booting them, asking one
//! for its status (a live migration keeps its boot id), finding their
//! QEMUs, and skipping (or failing, under `cargo xtask test`) where QEMU
//! or the guest is missing.

use std::{
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

pub use crate::image::GUEST_DIR;
use crate::{
    http,
    plan::Vm,
    process::{alive, close_inherited_fds, stop_pids},
    state::State,
    traffic::Flow,
};

/// Memory of one VM as announced to the agents (their capacity answers).
pub const VM_MEMORY_MIB: u32 = 512;

/// Memory of one real guest (`--guests qemu`): what the launcher gives
/// QEMU and what the agents announce.
pub const GUEST_MEMORY_MIB: u32 = 256;

/// Where the real guests' monitors, PID files and consoles live, one
/// directory per host (`qemu/dc-h1/198.18.1.1.qmp`).
pub const QEMU_DIR: &str = "/run/score-testbed/qemu";

/// The launcher and incoming helper of the real guests, in the workspace.
const LAUNCHER: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../score-agent/tests/fixtures/qemu-vm"
);

/// How long every real guest together may take to boot and answer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

/// Longest time the agents' qemu backend lets one migration take: about
/// 1-3 s on an idle machine here, but TCG on two loaded cores is slow.
pub(crate) const QEMU_MIGRATION_TIMEOUT: &str = "90s";

/// What stands in for the VMs.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum GuestKind {
    /// Network namespaces behind veths (moved by relinking).
    #[default]
    Netns,
    /// Real QEMU guests behind taps (live-migrated by QEMU).
    Qemu,
}

/// The real guests of a `--guests qemu` testbed.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct QemuGuests {
    /// [`QEMU_DIR`]: per host `IP.qmp`, `IP.pid`, `IP.log` (console);
    /// `vms/IP.env` the device model the launcher repeats on a move.
    pub dir: PathBuf,
    /// The launcher (`qemu-vm`): `start` boots a guest, `incoming` (the
    /// agents' incoming helper) starts its copy on a target host.
    pub launcher: PathBuf,
    /// Memory of each guest.
    pub memory_mib: u32,
    /// Seconds from the first launch until every guest answered.
    pub boot_seconds: f64,
}

/// Prepares the real guests of a `--guests qemu` testbed: QEMU and the
/// tiny guest (`cargo xtask guest`, cached), the launcher, an empty
/// [`QEMU_DIR`].
pub(crate) fn qemu_guests() -> Result<QemuGuests> {
    crate::image::guest(false).context("preparing the real guest (cargo xtask guest)")?;
    let launcher =
        fs::canonicalize(LAUNCHER).with_context(|| format!("finding the launcher {LAUNCHER}"))?;
    let dir = PathBuf::from(QEMU_DIR);
    // QEMUs of a run that died without `down` would keep running, their
    // PID files gone with the directory: stop them first.
    let stale: Vec<u32> = qemu_processes(&dir).iter().map(|g| g.pid).collect();
    stop_pids(&stale, Duration::from_secs(5));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).with_context(|| format!("creating {QEMU_DIR}"))?;
    Ok(QemuGuests {
        dir,
        launcher,
        memory_mib: GUEST_MEMORY_MIB,
        boot_seconds: 0.0,
    })
}

/// The iperf3 rate (payload bits/s of 1400-byte datagrams, what the guest
/// is given) that puts `frame_rate` frame bytes/s on the wire as the agent
/// counts them (each datagram is a 1442-byte frame).
pub fn guest_rate(frame_rate: u64) -> u64 {
    frame_rate * 8 * 1400 / 1442
}

/// The kernel argument telling a guest what to send: `score.peers=` each
/// destination of `flows` from `vm` with its [`guest_rate`].
pub(crate) fn peers_arg(vm: Ipv4Addr, flows: &[Flow]) -> Option<String> {
    let peers: Vec<String> = flows
        .iter()
        .filter(|f| f.src == vm && f.rate > 0)
        .map(|f| format!("{}:{}", f.dst, guest_rate(f.rate)))
        .collect();
    (!peers.is_empty()).then(|| format!("score.peers={}", peers.join(",")))
}

/// Boots every real guest of a `--guests qemu` testbed at its initial host
/// (the launcher's `start`, with its tap named like its vif), each sending
/// its part of `flows` from inside the guest, and waits until each answers
/// its status page from the first host. Records the plan and boot time.
pub fn boot_guests(state: &mut State, flows: &[Flow]) -> Result<()> {
    let mut g = state
        .guests
        .clone()
        .context("this testbed has no real guests (`testbed up --guests qemu`)")?;
    let started = Instant::now();
    for vm in &state.vms {
        let mut cmd = Command::new(&g.launcher);
        cmd.arg("--dir")
            .arg(&g.dir)
            .args(["--mem", &g.memory_mib.to_string(), "start"])
            .args([&vm.initial_host, &vm.address.to_string(), &vm.mac, &vm.vif])
            .args(peers_arg(vm.address, flows))
            .stdin(Stdio::null());
        // QEMU daemonizes: it must not keep a lock the caller holds.
        close_inherited_fds(&mut cmd);
        let out = cmd
            .output()
            .with_context(|| format!("running {}", g.launcher.display()))?;
        if !out.status.success() {
            bail!(
                "booting guest {} on {}: {}",
                vm.address,
                vm.initial_host,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
    }
    let from = state.hosts[0].name.clone();
    let mut waiting: Vec<&mut Vm> = state.vms.iter_mut().collect();
    let deadline = started + BOOT_TIMEOUT;
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for vm in waiting {
            match status(&from, vm.address)? {
                Some(s) => vm.boot_id = Some(s.boot_id),
                None => still.push(vm),
            }
        }
        waiting = still;
        if waiting.is_empty() {
            break;
        }
        if Instant::now() > deadline {
            let silent: Vec<String> = waiting.iter().map(|v| v.address.to_string()).collect();
            bail!(
                "guests {} did not answer within {BOOT_TIMEOUT:?} (consoles: {}/HOST/ADDRESS.log)",
                silent.join(" "),
                g.dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    g.boot_seconds = started.elapsed().as_secs_f64();
    state.guests = Some(g);
    state.traffic = flows.to_vec();
    state.save()
}

/// What a real guest's status page says (`GET /cgi-bin/status`, written by
/// the guest's own init: see [`crate::image`]).
#[derive(Clone, Debug, PartialEq)]
pub struct Status {
    /// `/proc/sys/kernel/random/boot_id`: new at every boot.
    pub boot_id: String,
    /// Seconds since boot.
    pub uptime: f64,
    /// The guest's own seconds counter, kept in RAM: it goes on counting
    /// across a live migration and restarts from 0 on a reboot.
    pub counter: u64,
}

/// Asks guest `vm` for its status from namespace `from`; `None` when it
/// does not answer (within a few seconds) or says something else.
pub fn status(from: &str, vm: Ipv4Addr) -> Result<Option<Status>> {
    let Some(body) = http::get(from, SocketAddr::new(vm.into(), 80), "/cgi-bin/status")? else {
        return Ok(None);
    };
    let field = |k: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
    };
    let parsed = || {
        Some(Status {
            boot_id: field("boot_id").filter(|b| !b.is_empty())?.to_owned(),
            uptime: field("uptime")?.parse().ok()?,
            counter: field("counter")?.parse().ok()?,
        })
    };
    Ok(parsed())
}

/// [`status`] for tests: panics if `from` cannot be entered.
pub fn status_of(from: &str, vm: Ipv4Addr) -> Option<Status> {
    status(from, vm).unwrap_or_else(|e| panic!("{e:#}"))
}

/// The status of guest `vm` as asked from `ns`, waiting for an answer: a
/// TCG guest on a loaded machine may take seconds to serve one.
pub fn wait_status_of(ns: &str, vm: Ipv4Addr, timeout: Duration) -> Status {
    wait_until(
        timeout,
        &format!("guest {vm} answering from {ns}"),
        || status_of(ns, vm),
        String::new,
    )
}

/// Polls `probe` every 200 ms until it gives a value; panics after
/// `timeout` naming `what`, with `context()` (agent logs, say).
pub fn wait_until<T>(
    timeout: Duration,
    what: &str,
    mut probe: impl FnMut() -> Option<T>,
    context: impl Fn() -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "no {what} within {timeout:?}\n{}",
            context()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Set by `cargo xtask test` for the privileged tests: a real-guest test
/// that finds no QEMU or no guest fails instead of skipping.
pub const REQUIRE_GUESTS_ENV: &str = "SCORE_REQUIRE_GUESTS";

/// Why a real guest cannot run here, if it cannot: no QEMU or no guest.
pub fn skip_reason() -> Option<String> {
    let qemu = Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !qemu {
        return Some("no qemu-system-x86_64: run `cargo xtask guest` (installs it)".into());
    }
    for f in ["vmlinuz", "initrd.img"] {
        if !Path::new(GUEST_DIR).join(f).exists() {
            return Some(format!("no {GUEST_DIR}/{f}: run `cargo xtask guest`"));
        }
    }
    None
}

/// Prints why a test is skipped, or fails instead under `cargo xtask
/// test`, which prepares QEMU, libvirt and the guest and sets
/// [`REQUIRE_GUESTS_ENV`], so that CI cannot pass by skipping. Returns
/// whether the caller should skip.
pub fn skip(why: Option<String>) -> bool {
    let Some(why) = why else { return false };
    assert!(
        std::env::var_os(REQUIRE_GUESTS_ENV).is_none(),
        "{REQUIRE_GUESTS_ENV} is set but {why}"
    );
    eprintln!("SKIPPED: {why}");
    true
}

/// A running real guest: its QEMU.
#[derive(Clone, Debug, Serialize)]
pub struct GuestProcess {
    /// The host namespace it runs in (by its monitor's directory).
    pub host: String,
    /// The guest's address.
    pub address: Ipv4Addr,
    /// QEMU's PID.
    pub pid: u32,
}

/// Every QEMU under `dir` that still runs, by its PID file
/// (`dir/HOST/IP.pid`). A guest mid-migration has two.
pub fn qemu_processes(dir: &Path) -> Vec<GuestProcess> {
    let mut found = Vec::new();
    let Ok(hosts) = fs::read_dir(dir) else {
        return found;
    };
    for host in hosts.flatten() {
        let Ok(files) = fs::read_dir(host.path()) else {
            continue;
        };
        for f in files.flatten() {
            let path = f.path();
            if path.extension().is_none_or(|e| e != "pid") {
                continue;
            }
            let address = path
                .file_stem()
                .and_then(|s| s.to_str())
                .and_then(|s| s.parse().ok());
            let pid = fs::read_to_string(&path)
                .ok()
                .and_then(|p| p.trim().parse().ok());
            if let (Some(address), Some(pid)) = (address, pid)
                && alive(pid)
            {
                found.push(GuestProcess {
                    host: host.file_name().to_string_lossy().into_owned(),
                    address,
                    pid,
                });
            }
        }
    }
    found.sort_by_key(|g| (g.address, g.pid));
    found
}
