//! `cargo xtask testbed check`: proves the emulated data centre does what
//! docs/TESTBED.md says, on a fresh default testbed (no agents): every VM
//! reaches every other across the tree, traffic between pods really
//! crosses the core bridge, a UDP stream to a VM keeps arriving when the VM
//! moves (with the loss measured), and `down` leaves nothing behind.

use std::{
    net::{SocketAddr, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{
    netns,
    plan::{Sizes, VM_NETNS_PREFIX},
    state::State,
    status, sysctl, testbed,
};

/// Bytes of `name`'s counters in namespace `ns`: (rx, tx).
fn link_bytes(ns: &str, name: &str) -> Result<(u64, u64)> {
    let out = netns::ip_output(&["-n", ns, "-j", "-s", "link", "show", "dev", name])?;
    let v: serde_json::Value = serde_json::from_str(&out).context("parsing ip -j")?;
    let s = &v[0]["stats64"];
    let get = |dir: &str| s[dir]["bytes"].as_u64().context("no byte counter");
    Ok((get("rx")?, get("tx")?))
}

/// A UDP receiver inside a namespace that counts datagrams until stopped.
struct Receiver {
    count: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<Result<()>>>,
}

impl Receiver {
    fn start(ns: &str, addr: SocketAddr) -> Result<Receiver> {
        let count = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (c, s) = (count.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let ns = ns.to_owned();
        let thread = thread::spawn(move || {
            netns::in_netns(&ns, move || {
                let sock = UdpSocket::bind(addr)?;
                sock.set_read_timeout(Some(Duration::from_millis(50)))?;
                let _ = ready_tx.send(());
                let mut buf = [0u8; 2048];
                while !s.load(Ordering::Relaxed) {
                    if sock.recv(&mut buf).is_ok() {
                        c.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        });
        ready_rx
            .recv_timeout(Duration::from_secs(2))
            .context("receiver did not bind")?;
        Ok(Receiver {
            count,
            stop,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.count.load(Ordering::Relaxed)
    }
}

/// Sends `count` datagrams of `payload` bytes from namespace `ns` to
/// `dst`, one every `gap`; returns how many the kernel accepted.
fn send(ns: &str, dst: SocketAddr, count: u64, payload: usize, gap: Duration) -> Result<u64> {
    netns::in_netns(ns, move || {
        let sock = UdpSocket::bind("0.0.0.0:0")?;
        let buf = vec![0x42u8; payload];
        let start = Instant::now();
        let mut ok = 0;
        for i in 0..count {
            if sock.send_to(&buf, dst).is_ok() {
                ok += 1;
            }
            // Paced against the clock, so a slow moment does not stretch
            // the stream.
            let due = start + gap * u32::try_from(i + 1).unwrap_or(u32::MAX);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                thread::sleep(wait);
            }
        }
        Ok(ok)
    })
}

/// Runs every check on a fresh default testbed, then removes it.
pub fn check() -> Result<()> {
    testbed::require_root("testbed check")?;
    if State::load()?.is_some() {
        bail!("a testbed is already up: `cargo xtask testbed down` first");
    }
    let sizes = Sizes {
        pods: 2,
        racks_per_pod: 2,
        hosts_per_rack: 2,
        vms_per_host: 2,
        slots: 4,
    };
    let limits_before = sysctl::neighbour_limits_now()?;
    let result = run_checks(&sizes);
    let down = testbed::down();
    let result = result.and_then(|()| {
        let d = down?;
        let limits_after = sysctl::neighbour_limits_now()?;
        ensure!(
            limits_after == limits_before,
            "down did not put the neighbour-table limits back: {limits_before:?} before up, \
             {limits_after:?} after down"
        );
        let left: Vec<String> = netns::list()
            .into_iter()
            .filter(|n| n.starts_with("dc-") || n.starts_with(VM_NETNS_PREFIX))
            .collect();
        ensure!(left.is_empty(), "namespaces left after down: {left:?}");
        ensure!(
            State::load()?.is_none(),
            "the state file is still there after down"
        );
        println!(
            "check: down removed {} namespaces in {:.2} s, nothing left; {} host settings put back",
            d.namespaces, d.seconds, d.settings_restored
        );
        Ok(())
    });
    match &result {
        Ok(()) => println!("check: the testbed works"),
        Err(e) => println!("check: FAILED: {e:#}"),
    }
    result
}

fn run_checks(sizes: &Sizes) -> Result<()> {
    let state = testbed::up(sizes)?;
    println!(
        "check: up, {} namespaces in {:.2} s",
        state.namespaces.len(),
        state.setup_seconds
    );
    if let Some((path, now, need)) = sysctl::short_of(sizes)? {
        bail!("up left {path} at {now}, this data centre needs {need}");
    }
    println!(
        "check: the host's neighbour-table limits fit {} entries ({} raised by up)",
        sysctl::neighbours_needed(sizes),
        state.settings.len()
    );
    // Every VM answers, from a host of the other pod for half of them.
    let answered = status::reachable(&state);
    let silent = status::silent(&state, &answered);
    ensure!(silent.is_empty(), "VMs not answering ping: {silent:?}");
    println!(
        "check: all {} VMs answer ping from {}",
        answered.len(),
        state.hosts[0].name
    );

    // Between pods, frames cross the core: VM 1 (pod 1) to VM 5 (pod 2).
    let (src, dst) = (&state.vms[0], &state.vms[4]);
    let src_host = state
        .hosts
        .iter()
        .find(|h| h.name == src.initial_host)
        .context("no host")?;
    let dst_host = state
        .hosts
        .iter()
        .find(|h| h.name == dst.initial_host)
        .context("no host")?;
    ensure!(src_host.pod != dst_host.pod, "the two VMs share a pod");
    let core_port = format!("pod{}", dst_host.pod.trim_start_matches("dc-p"));
    let to = SocketAddr::new(dst.address.into(), 9);
    let rx = Receiver::start(&dst.name, to)?;
    // Warm the ARP caches first so that the counted burst is only ours.
    send(&src.name, to, 5, 10, Duration::from_millis(5))?;
    thread::sleep(Duration::from_millis(100));
    let (_, before) = link_bytes("dc-core", &core_port)?;
    let n = 2000u64;
    let payload = 1000usize;
    send(&src.name, to, n, payload, Duration::from_micros(200))?;
    thread::sleep(Duration::from_millis(200));
    let (_, after) = link_bytes("dc-core", &core_port)?;
    let got = rx.finish();
    // A frame on a veth: Ethernet 14 + IPv4 20 + UDP 8 + payload.
    let want = n * (14 + 20 + 8 + payload as u64);
    ensure!(
        after - before >= want,
        "the core's {core_port} carried {} bytes, expected at least {want}",
        after - before
    );
    ensure!(
        got >= 5 + n * 99 / 100,
        "{got} of {} datagrams arrived",
        n + 5
    );
    println!(
        "check: {n} datagrams VM {} -> VM {} crossed dc-core ({} bytes out of port {core_port}), {got} arrived",
        src.address,
        dst.address,
        after - before
    );

    // A stream to a VM survives its move: 1 datagram per ms for 3 s, the
    // VM moves after 1 s to a host of the other pod.
    let to = SocketAddr::new(dst.address.into(), 10);
    let rx = Receiver::start(&dst.name, to)?;
    let target = state.hosts[1].name.clone();
    let sender = {
        let ns = src.name.clone();
        thread::spawn(move || send(&ns, to, 3000, 100, Duration::from_millis(1)))
    };
    thread::sleep(Duration::from_secs(1));
    let relink = testbed::migrate(&state, &dst.address.to_string(), &target)?;
    let sent = sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    thread::sleep(Duration::from_millis(100));
    let got = rx.finish();
    let at = status::locate(&state)?;
    ensure!(
        at.get(&dst.vif).map(|&i| state.hosts[i].name.as_str()) == Some(target.as_str()),
        "{} is not on {target} after the move",
        dst.vif
    );
    let lost = sent.saturating_sub(got);
    ensure!(
        lost < 500,
        "{lost} of {sent} datagrams lost around the move: the stream did not recover"
    );
    println!(
        "check: VM {} moved {} -> {target} (relink {:.1} ms) under a 1/ms UDP stream: {got} of {sent} arrived, {lost} lost (~{lost} ms)",
        dst.address,
        dst_host.name,
        relink.as_secs_f64() * 1e3
    );
    Ok(())
}
