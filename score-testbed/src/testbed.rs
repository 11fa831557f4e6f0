//! The emulated data centre (`cargo xtask testbed up|down|status|migrate`):
//! network namespaces stand in for the switches, hosts and VMs of a
//! three-level tree (core, pods, racks), all in one flat L2/IPv4 network,
//! with one score-agent per host namespace.
//!
//! ```text
//!                          dc-core (br0)
//!                     pod1 /          \ pod2          veth pairs between
//!               dc-p1 (br0)            dc-p2 (br0)    switch namespaces
//!             rack1 /    \ rack2      ...
//!        dc-r1 (br0)    dc-r2 (br0)
//!      host1 /   \ host2
//!  dc-h1 (br0 198.18.0.1)  dc-h2 (br0 198.18.0.2)     one agent per host
//!   vif1.0 |  vif9.0 |
//!  dcvm-198.18.1.1  dcvm-198.18.1.9                   VM: eth0 198.18.1.k
//! ```
//!
//! With `--guests qemu` the VMs are real guests instead of namespaces: one
//! QEMU (TCG) per VM running the tiny guest of `cargo xtask guest`, inside
//! its host's namespace, its NIC a tap named like the vif it replaces
//! (`vif<k>.0`) on that host's br0, and the agents use the `qemu` backend,
//! whose incoming helper is the test bed's launcher
//! (`score-agent/tests/fixtures/qemu-vm`, see [`QemuGuests`]).
//!
//! Everything the testbed makes is recorded in a state file
//! ([`STATE_FILE`]) that `status`, `down`, the demo and tests read. Set-up
//! runs one `ip -batch` per namespace, top-down, so each namespace's uplink
//! end already exists when its own batch attaches it.

use std::{
    fs,
    io::Write as _,
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{
    guests::{GuestKind, QEMU_DIR, qemu_guests, qemu_processes},
    netns,
    plan::{Sizes, batches, blueprint, is_ours, topology_toml},
    process::{alive, is_root, run, stop_pids},
    state::{DIR, STATE_FILE, State},
    status::locate,
    sysctl::{self, Setting},
};

/// Whether the process runs as root.
pub fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, bpffs, eBPF)");
    }
    Ok(())
}

/// Writes a file readable by root alone.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

fn is_bpffs(path: &Path) -> bool {
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs fills a plain struct; the path is NUL-terminated.
    unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        // BPF_FS_MAGIC from linux/magic.h.
        libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == 0xcafe_4a11
    }
}

/// Builds the data centre with VM namespaces: [`up_with`] for
/// [`GuestKind::Netns`].
pub fn up(sizes: &Sizes) -> Result<State> {
    up_with(sizes, GuestKind::Netns)
}

/// Builds the data centre (namespaces, topology, key, agent configs, bpffs)
/// and writes the state file. Fails if a testbed is already up; on failure,
/// removes what it made. With [`GuestKind::Qemu`] the hosts are left
/// without VMs: [`boot_guests`] starts them (after the traffic plan is
/// known, since a guest takes its peers from its kernel command line).
pub fn up_with(sizes: &Sizes, kind: GuestKind) -> Result<State> {
    require_root("testbed up")?;
    sizes.validate()?;
    let guests = match kind {
        GuestKind::Netns => None,
        GuestKind::Qemu => Some(qemu_guests()?),
    };
    if State::load()?.is_some() {
        bail!("a testbed is already up ({STATE_FILE}): `cargo xtask testbed down` first");
    }
    if let Some(ns) = netns::list().into_iter().find(|n| is_ours(n)) {
        bail!("namespace {ns} already exists: `cargo xtask testbed down` first");
    }
    let started = Instant::now();
    let dir = Path::new(DIR);
    // Logs outlive `down` for a post-mortem; a new testbed starts afresh.
    let _ = fs::remove_dir_all(dir.join("logs"));
    for sub in ["agents", "logs", "bpf"] {
        fs::create_dir_all(dir.join(sub))?;
    }
    let bp = blueprint(sizes);
    let mut namespaces: Vec<String> = bp.switches.iter().map(|s| s.name.clone()).collect();
    namespaces.extend(bp.hosts.iter().map(|h| h.name.clone()));
    if guests.is_none() {
        namespaces.extend(bp.vms.iter().map(|v| v.name.clone()));
    }
    let mut state = State {
        version: 1,
        sizes: *sizes,
        topology_file: dir.join("topology.toml"),
        key_file: dir.join("cluster.key"),
        bpffs: dir.join("bpf"),
        namespaces: namespaces.clone(),
        switches: bp.switches.clone(),
        hosts: bp.hosts.clone(),
        vms: bp.vms.clone(),
        agents: None,
        agent_mode: None,
        traffic: Vec::new(),
        setup_seconds: 0.0,
        guests,
        settings: Vec::new(),
    };
    // The host's neighbour tables, shared by every namespace, sized for
    // this data centre before any namespace speaks (see `sysctl`).
    state.settings = sysctl::wanted(sizes)?;
    sysctl::raise(&state.settings).context("raising the host's neighbour-table limits")?;
    // Save first: a failure half-way leaves a state that `down` can use.
    state.save()?;
    let built = (|| -> Result<()> {
        let adds: Vec<String> = namespaces
            .iter()
            .map(|n| format!("netns add {n}"))
            .collect();
        netns::ip_batch(None, &adds).context("creating the namespaces")?;
        for (ns, lines) in batches(&bp, state.guests.is_none()) {
            netns::ip_batch(Some(&ns), &lines)?;
        }
        fs::write(&state.topology_file, topology_toml(&bp)?)?;
        let mut key = [0u8; 32];
        fs::File::open("/dev/urandom")
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
            .context("reading /dev/urandom")?;
        write_private(&state.key_file, &key)?;
        // One bpffs in the root mount namespace: `ip netns exec` gives each
        // agent a private /sys, so pins under /sys/fs/bpf would not outlive
        // the agent, while /run is shared.
        if !is_bpffs(&state.bpffs) {
            run(Command::new("mount")
                .args(["-t", "bpf", "bpf"])
                .arg(&state.bpffs))?;
        }
        Ok(())
    })();
    state.setup_seconds = started.elapsed().as_secs_f64();
    state.save()?;
    if let Err(e) = built {
        let _ = down();
        return Err(e.context("building the testbed (removed what was made)"));
    }
    Ok(state)
}

/// PIDs of the processes running inside namespace `ns`.
fn pids_in(ns: &str) -> Vec<u32> {
    netns::ip_output(&["netns", "pids", ns])
        .map(|s| {
            s.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What `down` removed.
#[derive(Debug, Default)]
pub struct DownReport {
    /// Processes stopped.
    pub processes: usize,
    /// Namespaces deleted.
    pub namespaces: usize,
    /// Seconds it took.
    pub seconds: f64,
    /// Host settings put back to their value before `up`.
    pub settings_restored: usize,
    /// Host settings left alone because someone changed them since `up`
    /// (their value now, if readable).
    pub settings_left: Vec<(Setting, Option<u64>)>,
}

/// Stops agents and traffic, deletes every namespace of the testbed,
/// unmounts the bpffs and removes the state. Idempotent: with nothing up it
/// does nothing; without a state file it still sweeps our namespace names.
pub fn down() -> Result<DownReport> {
    require_root("testbed down")?;
    let started = Instant::now();
    let state = State::load().unwrap_or(None);
    let mut names: Vec<String> = state
        .as_ref()
        .map(|s| s.namespaces.clone())
        .unwrap_or_default();
    for n in netns::list() {
        if is_ours(&n) && !names.contains(&n) {
            names.push(n);
        }
    }
    names.retain(|n| netns::exists(n));
    // Our own recorded processes first (agents get SIGTERM and detach
    // their classifiers), then whatever else still runs in our namespaces
    // (an arping of a migration, a generator whose PID was not saved).
    let mut pids: Vec<u32> = Vec::new();
    if let Some(s) = &state {
        pids.extend(s.hosts.iter().filter_map(|h| h.agent_pid));
        pids.extend(s.vms.iter().filter_map(|v| v.traffic_pid));
    }
    pids.retain(|&p| alive(p));
    stop_pids(&pids, Duration::from_secs(5));
    // Real guests: every QEMU with a PID file under the guests' directory
    // (SIGTERM makes QEMU quit; its tap goes with it), whatever the state
    // says, then the directory.
    let qemus: Vec<u32> = qemu_processes(Path::new(QEMU_DIR))
        .iter()
        .map(|g| g.pid)
        .collect();
    stop_pids(&qemus, Duration::from_secs(5));
    let _ = fs::remove_dir_all(QEMU_DIR);
    let mut stray: Vec<u32> = names.iter().flat_map(|n| pids_in(n)).collect();
    stray.sort_unstable();
    stray.dedup();
    stop_pids(&stray, Duration::from_secs(2));
    let dels: Vec<String> = names.iter().map(|n| format!("netns del {n}")).collect();
    if let Err(e) = netns::ip_batch(None, &dels) {
        // One at a time, so that one failure does not keep the rest.
        eprintln!("testbed: {e:#}; deleting one by one");
        for n in &names {
            let _ = netns::ip(&["netns", "del", n]);
        }
    }
    // The host's settings last: the namespaces that needed them are gone.
    let settings = state
        .as_ref()
        .map(|s| s.settings.clone())
        .unwrap_or_default();
    let settings_left = sysctl::restore(&settings);
    let bpffs = Path::new(DIR).join("bpf");
    if is_bpffs(&bpffs) {
        run(Command::new("umount").arg(&bpffs))?;
    }
    for p in ["bpf", "agents"] {
        let _ = fs::remove_dir_all(Path::new(DIR).join(p));
    }
    for f in [
        "topology.toml",
        "cluster.key",
        "state.json",
        "state.json.tmp",
    ] {
        let _ = fs::remove_file(Path::new(DIR).join(f));
    }
    Ok(DownReport {
        processes: pids.len() + qemus.len() + stray.len(),
        namespaces: names.len(),
        seconds: started.elapsed().as_secs_f64(),
        settings_restored: settings.len() - settings_left.len(),
        settings_left,
    })
}

/// Moves a VM to another host the way the agent's netns backend does: its
/// vif changes namespace and bridge, then the VM announces itself with a
/// gratuitous ARP so that the bridges learn its new port.
pub fn migrate(state: &State, vm: &str, to: &str) -> Result<Duration> {
    if state.guests.is_some() {
        bail!(
            "the VMs of this testbed are real guests: their agents' qemu backend live-migrates \
             them (a hand-made move is for VM namespaces only)"
        );
    }
    let v = state
        .vms
        .iter()
        .find(|v| v.address.to_string() == vm || v.name == vm || v.vif == vm)
        .with_context(|| format!("no VM {vm}"))?;
    let to_i = state
        .host_index(to)
        .or_else(|| state.hosts.iter().position(|h| h.address.to_string() == to))
        .with_context(|| format!("no host {to}"))?;
    let at = locate(state)?;
    let from_i = *at
        .get(&v.vif)
        .with_context(|| format!("{} is on no host", v.vif))?;
    if from_i == to_i {
        bail!("{} already runs on {}", v.address, state.hosts[to_i].name);
    }
    let (from, dest) = (&state.hosts[from_i].name, &state.hosts[to_i].name);
    let started = Instant::now();
    netns::ip(&["-n", from, "link", "set", &v.vif, "netns", dest])?;
    netns::ip(&["-n", dest, "link", "set", &v.vif, "master", "br0", "up"])?;
    let took = started.elapsed();
    // Unsolicited ARP from the VM; in the background, arping waits ~1 s.
    let _ = Command::new("ip")
        .args(["netns", "exec", &v.name, "arping", "-q", "-U", "-c", "1"])
        .args(["-i", "eth0", "-S"])
        .arg(v.address.to_string())
        .arg(v.address.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    Ok(took)
}
