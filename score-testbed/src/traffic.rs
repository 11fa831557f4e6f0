//! Traffic for the emulated data centre: the pattern (which VM sends how
//! much to which) and the generator that runs inside each VM namespace
//! (`xtask traffic`, started through `ip netns exec`); and for a test's
//! own data centre, a [`Stream`] sent from a thread inside a VM and a
//! [`Sink`] that swallows it.
//!
//! The pattern makes the placement matter: every VM has one chatty partner
//! that starts in another pod (or rack, or host, for smaller trees), plus
//! light background traffic to a couple of others. Rates are in bytes per
//! second of whole frames as the agent counts them (14 + 20 + 8 + payload
//! for a UDP datagram), so the measured λ can be checked against the plan.

use std::{
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket},
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    str::FromStr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{netns, plan::Vm, state::State};

/// The UDP port every generator listens on (and sends to).
pub const PORT: u16 = 2000;
/// Bytes the agent counts per frame beyond the UDP payload.
const FRAME_OVERHEAD: u64 = 14 + 20 + 8;
/// UDP payload of one datagram.
const PAYLOAD: u64 = 1200;

/// One directed stream of the plan.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    /// Sending VM.
    pub src: Ipv4Addr,
    /// Receiving VM.
    pub dst: Ipv4Addr,
    /// Frame bytes per second, as the agent counts them.
    pub rate: u64,
}

/// Which VMs talk a lot.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pattern {
    /// Chatty pairs, each split across pods at the start.
    Pairs,
    /// Groups of `--group-size` VMs talking all to all (tenants), each
    /// spread over both pods at the start.
    Groups,
}

/// The pattern and its rates.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Rates {
    /// Which VMs talk a lot: chatty pairs or all-to-all groups.
    #[arg(long, value_enum, default_value_t = Pattern::Pairs)]
    pub pattern: Pattern,
    /// VMs per group (`--pattern groups`).
    #[arg(long, default_value_t = 4)]
    pub group_size: u32,
    /// Frame bytes/s of each chatty pair, one way (the way back is half);
    /// with groups, what each member sends to the rest of its group in all.
    #[arg(long, default_value_t = 200_000)]
    pub chatty: u64,
    /// Frame bytes/s of each background stream.
    #[arg(long, default_value_t = 10_000)]
    pub background: u64,
    /// Background streams per VM.
    #[arg(long, default_value_t = 2)]
    pub background_peers: u32,
}

/// The pattern for the testbed in `state` (VMs at their initial hosts).
///
/// Chatty pairs: VMs in address order, each unpaired VM takes the first
/// unpaired VM after it that starts in another pod (else another rack, else
/// another host). Background: VM k sends to VMs k+3, k+7, ... (mod n), a
/// spread that crosses every level.
pub fn plan(state: &State, rates: &Rates) -> Vec<Flow> {
    if rates.pattern == Pattern::Groups {
        return plan_groups(state, rates);
    }
    let host_of = |vm: &Vm| {
        state
            .hosts
            .iter()
            .find(|h| h.name == vm.initial_host)
            .cloned()
    };
    let n = state.vms.len();
    let mut partner: Vec<Option<usize>> = vec![None; n];
    for a in 0..n {
        if partner[a].is_some() {
            continue;
        }
        let ha = host_of(&state.vms[a]);
        // Farthest first: another pod, then another rack, then another host.
        let distance = |b: usize| {
            let hb = host_of(&state.vms[b]);
            match (&ha, &hb) {
                (Some(x), Some(y)) if x.pod != y.pod => 3,
                (Some(x), Some(y)) if x.rack != y.rack => 2,
                (Some(x), Some(y)) if x.name != y.name => 1,
                _ => 0,
            }
        };
        let best = (a + 1..n)
            .filter(|&b| partner[b].is_none())
            .max_by_key(|&b| (distance(b), std::cmp::Reverse(b)));
        if let Some(b) = best {
            partner[a] = Some(b);
            partner[b] = Some(a);
        }
    }
    let mut flows = Vec::new();
    for (a, p) in partner.iter().enumerate() {
        if let Some(b) = *p
            && a < b
        {
            flows.push(Flow {
                src: state.vms[a].address,
                dst: state.vms[b].address,
                rate: rates.chatty,
            });
            flows.push(Flow {
                src: state.vms[b].address,
                dst: state.vms[a].address,
                rate: rates.chatty / 2,
            });
        }
    }
    if rates.background > 0 && n > 2 {
        for (a, pa) in partner.iter().enumerate() {
            for j in 0..rates.background_peers as usize {
                let b = (a + 3 + 4 * j) % n;
                if b != a && Some(b) != *pa {
                    flows.push(Flow {
                        src: state.vms[a].address,
                        dst: state.vms[b].address,
                        rate: rates.background,
                    });
                }
            }
        }
    }
    flows
}

/// Groups: VM i (from 0, address order) starts on host i mod hosts (slot
/// i / hosts there). When the hosts divide into `size` equal strides, a
/// group is one slot on hosts r, r + stride, r + 2·stride, ...: every
/// member on a host of its own, spread evenly over racks and pods. (Taking
/// group i mod (n / size) put a whole group on one host whenever there are
/// as many groups as hosts.) Otherwise VM i joins group i mod (n / size).
/// Each member sends `chatty / (size - 1)` to every other member;
/// background as for pairs, to VMs outside the group.
fn plan_groups(state: &State, rates: &Rates) -> Vec<Flow> {
    let n = state.vms.len();
    let size = (rates.group_size.max(2) as usize).min(n.max(1));
    let hosts = state.hosts.len().max(1);
    let groups = (n / size).max(1);
    let stride = hosts / size;
    let group = |i: usize| {
        if stride > 0 && hosts.is_multiple_of(size) {
            let (h, slot) = (i % hosts, i / hosts);
            h % stride + stride * slot
        } else {
            i % groups
        }
    };
    let mut flows = Vec::new();
    let per_peer = rates.chatty / (size as u64 - 1).max(1);
    for a in 0..n {
        for b in (0..n).filter(|&b| b != a && group(b) == group(a)) {
            flows.push(Flow {
                src: state.vms[a].address,
                dst: state.vms[b].address,
                rate: per_peer,
            });
        }
    }
    if rates.background > 0 && n > 2 {
        for a in 0..n {
            for j in 0..rates.background_peers as usize {
                let b = (a + 3 + 4 * j) % n;
                if b != a && group(b) != group(a) {
                    flows.push(Flow {
                        src: state.vms[a].address,
                        dst: state.vms[b].address,
                        rate: rates.background,
                    });
                }
            }
        }
    }
    flows
}

/// Starts one generator per VM (inside its namespace) for `flows`, and
/// records the PIDs in the state. Every VM gets one, even one that sends
/// nothing, so that it listens on [`PORT`] and answers no datagram with an
/// ICMP "port unreachable". `generator` is a program whose `traffic`
/// subcommand runs [`generate`] (xtask).
pub fn start(state: &mut State, flows: &[Flow], generator: &Path) -> Result<()> {
    for vm in &mut state.vms {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &vm.name])
            .arg(generator)
            .args(["traffic", "--listen"])
            .arg(SocketAddrV4::new(vm.address, PORT).to_string());
        for f in flows.iter().filter(|f| f.src == vm.address) {
            cmd.arg("--to").arg(format!("{}:{PORT}:{}", f.dst, f.rate));
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting traffic in {}", vm.name))?;
        vm.traffic_pid = Some(child.id());
    }
    state.traffic = flows.to_vec();
    state.save()
}

/// A `--to ADDR:PORT:RATE` target of the generator.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Target {
    /// Where to send.
    pub addr: SocketAddr,
    /// Frame bytes per second.
    pub rate: u64,
}

impl FromStr for Target {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (addr, rate) = s
            .rsplit_once(':')
            .ok_or_else(|| format!("{s:?}: expected ADDR:PORT:BYTES_PER_SECOND"))?;
        Ok(Target {
            addr: addr.parse().map_err(|e| format!("{addr:?}: {e}"))?,
            rate: rate.parse().map_err(|e| format!("{rate:?}: {e}"))?,
        })
    }
}

/// The generator: binds `listen` and discards what arrives there, and sends
/// UDP datagrams of [`PAYLOAD`] bytes to every target at its rate, paced
/// every 5 ms, until killed. Send errors (the link flaps while the VM
/// moves, ARP is not resolved yet) are counted, not fatal.
pub fn generate(listen: SocketAddr, targets: &[Target], duration: Option<f64>) -> Result<()> {
    let sink = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    thread::spawn(move || {
        let mut buf = [0u8; 2048];
        loop {
            // Nothing to do with the data: only absorb it.
            if sink.recv(&mut buf).is_err() {
                thread::sleep(Duration::from_millis(10));
            }
        }
    });
    if targets.is_empty() && duration.is_none() {
        loop {
            thread::park();
        }
    }
    let sock = UdpSocket::bind(SocketAddr::new(listen.ip(), 0)).context("binding the sender")?;
    let frame = PAYLOAD + FRAME_OVERHEAD;
    let buf = vec![0x5a_u8; PAYLOAD as usize];
    let started = Instant::now();
    let mut sent = vec![0u64; targets.len()];
    let mut errors = 0u64;
    loop {
        let elapsed = started.elapsed().as_secs_f64();
        if duration.is_some_and(|d| elapsed >= d) {
            break;
        }
        for (t, sent) in targets.iter().zip(&mut sent) {
            // Frames owed by now; never more than a 100 ms burst at once,
            // so a stall (a migration) is not followed by a flood.
            let owed = (t.rate as f64 * elapsed / frame as f64) as u64;
            let burst = (t.rate / frame / 10).max(1);
            if owed > *sent + burst {
                *sent = owed - burst;
            }
            while *sent < owed {
                if sock.send_to(&buf, t.addr).is_err() {
                    errors += 1;
                }
                *sent += 1;
            }
        }
        thread::sleep(Duration::from_millis(5));
    }
    if errors > 0 {
        eprintln!("traffic: {errors} send errors");
    }
    Ok(())
}

/// Checks generator arguments before anything is bound.
pub fn check(targets: &[Target]) -> Result<()> {
    for t in targets {
        if t.rate > 100_000_000 {
            bail!(
                "{}: {} B/s is more than this generator is for",
                t.addr,
                t.rate
            );
        }
    }
    Ok(())
}

// ------------------------------------------------- streams inside a test

/// UDP from one VM to another at a fixed rate, from a thread inside the
/// sending VM's namespace; it keeps sending wherever the VM moves.
pub struct Stream {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Stream {
    /// Starts sending `rate` bytes/s of UDP payload from `src` (in namespace
    /// `ns`) to port 9 of `dst`.
    pub fn start(ns: &str, src: Ipv4Addr, dst: Ipv4Addr, rate: u64) -> Stream {
        let ns = ns.to_owned();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = thread::spawn(move || {
            netns::enter(&ns).unwrap_or_else(|e| panic!("{e:#}"));
            let sock = UdpSocket::bind(SocketAddr::from((src, 0))).unwrap();
            let payload = vec![0u8; 1000];
            let per_tick = (rate / 50).max(1000) as usize;
            let started = Instant::now();
            let mut sent = 0usize;
            while !flag.load(Ordering::Relaxed) {
                let due = (started.elapsed().as_secs_f64() * rate as f64) as usize;
                while sent + payload.len() <= due.min(sent + per_tick) {
                    // Errors (no route while the VM's link flaps) are fine.
                    let _ = sock.send_to(&payload, SocketAddr::from((dst, 9)));
                    sent += payload.len();
                }
                thread::sleep(Duration::from_millis(20));
            }
        });
        Stream {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A UDP socket on port 9 inside a VM that swallows what the tests send,
/// so that the VM's kernel answers no datagram with an ICMP "port
/// unreachable" (which would be real, but unplanned, traffic).
pub struct Sink {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

/// Starts a [`Sink`] on `ip`:9 inside namespace `ns`.
pub fn sink(ns: &str, ip: &str) -> Sink {
    let ns = ns.to_owned();
    let addr: SocketAddr = format!("{ip}:9").parse().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let thread = thread::spawn(move || {
        netns::enter(&ns).unwrap_or_else(|e| panic!("{e:#}"));
        let sock = UdpSocket::bind(addr).expect("bind sink");
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = [0u8; 2048];
        while !flag.load(Ordering::Relaxed) {
            let _ = sock.recv(&mut buf);
        }
    });
    ready_rx.recv().expect("sink bound");
    Sink {
        stop,
        thread: Some(thread),
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sizes() -> crate::plan::Sizes {
        crate::plan::Sizes {
            pods: 2,
            racks_per_pod: 2,
            hosts_per_rack: 2,
            vms_per_host: 2,
            slots: 4,
        }
    }

    fn rates(pattern: Pattern) -> Rates {
        Rates {
            pattern,
            group_size: 4,
            chatty: 300,
            background: 10,
            background_peers: 2,
        }
    }

    #[test]
    fn every_vm_has_one_chatty_partner_in_the_other_pod() {
        let state = crate::state::planned_state(&sizes());
        let flows = plan(&state, &rates(Pattern::Pairs));
        let pod = |a: Ipv4Addr| {
            let vm = state.vms.iter().find(|v| v.address == a).unwrap();
            let h = state
                .hosts
                .iter()
                .find(|h| h.name == vm.initial_host)
                .unwrap();
            h.pod.clone()
        };
        for vm in &state.vms {
            let out: Vec<&Flow> = flows
                .iter()
                .filter(|f| f.src == vm.address && f.rate >= 150)
                .collect();
            assert_eq!(out.len(), 1, "{}", vm.address);
            assert_ne!(pod(out[0].src), pod(out[0].dst));
            // The way back runs at half the rate.
            assert!(
                flows
                    .iter()
                    .any(|f| f.src == out[0].dst && f.dst == vm.address && f.rate >= 150)
            );
        }
        // Background: two streams out of every VM, none to itself.
        let light = flows.iter().filter(|f| f.rate == 10).count();
        assert_eq!(light, 32);
        assert!(flows.iter().all(|f| f.src != f.dst));
    }

    #[test]
    fn groups_talk_all_to_all_across_pods() {
        let state = crate::state::planned_state(&sizes());
        let flows = plan(&state, &rates(Pattern::Groups));
        // 4 groups of 4: 12 directed streams each at 300 / 3.
        let heavy: Vec<&Flow> = flows.iter().filter(|f| f.rate == 100).collect();
        assert_eq!(heavy.len(), 4 * 12);
        let first = state.vms[0].address;
        let peers: Vec<Ipv4Addr> = heavy
            .iter()
            .filter(|f| f.src == first)
            .map(|f| f.dst)
            .collect();
        assert_eq!(peers.len(), 3);
        // Members 0, 2, 4, 6 start on hosts 1, 3, 5, 7: a host each, both
        // pods.
        let hosts: Vec<&str> = [0, 2, 4, 6]
            .iter()
            .map(|&i| state.vms[i].initial_host.as_str())
            .collect();
        assert_eq!(hosts, ["dc-h1", "dc-h3", "dc-h5", "dc-h7"]);
        for i in [2, 4, 6] {
            assert!(peers.contains(&state.vms[i].address));
        }
    }

    #[test]
    fn groups_never_start_on_one_host_when_there_are_as_many_as_hosts() {
        // 8 hosts of 4 VMs, groups of 4: 8 groups.
        let state = crate::state::planned_state(&crate::plan::Sizes {
            vms_per_host: 4,
            ..sizes()
        });
        let flows = plan(&state, &rates(Pattern::Groups));
        let host_of = |a: Ipv4Addr| {
            let v = state.vms.iter().find(|v| v.address == a).unwrap();
            v.initial_host.clone()
        };
        let heavy: Vec<&Flow> = flows.iter().filter(|f| f.rate == 100).collect();
        assert_eq!(heavy.len(), 8 * 12);
        assert!(heavy.iter().all(|f| host_of(f.src) != host_of(f.dst)));
    }

    #[test]
    fn target_parses() {
        let t: Target = "198.18.1.9:2000:300000".parse().unwrap();
        assert_eq!(t.addr, "198.18.1.9:2000".parse().unwrap());
        assert_eq!(t.rate, 300_000);
        assert!("198.18.1.9:2000".parse::<Target>().is_err());
        assert!("x:1:2".parse::<Target>().is_err());
    }

    #[test]
    fn generator_sends_at_its_rate() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let to = rx.local_addr().unwrap();
        let rate = 124_200; // 100 frames of 1242 bytes per second
        let h = thread::spawn(move || {
            generate(
                "127.0.0.1:0".parse().unwrap(),
                &[Target { addr: to, rate }],
                Some(1.0),
            )
        });
        let mut n = 0u64;
        let mut buf = [0u8; 2048];
        while let Ok(len) = rx.recv(&mut buf) {
            assert_eq!(len as u64, PAYLOAD);
            n += 1;
        }
        h.join().unwrap().unwrap();
        assert!((90..=101).contains(&n), "{n} datagrams in 1 s at 100/s");
    }
}
