//! What is up now: where every VM is (which host namespace holds its
//! vif), whether each answers a ping, whether each agent runs and serves,
//! as a table for people or a [`StatusReport`] for tools.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddr},
    process::Command,
};

use anyhow::Result;
use serde::Serialize;

use crate::{
    guests::qemu_processes,
    http,
    measure::CostReport,
    netns,
    plan::AGENT_HTTP,
    process::alive,
    state::{STATE_FILE, State},
    sysctl,
};

/// Where every VM is now: vif name -> index of the host namespace holding it.
pub fn locate(state: &State) -> Result<HashMap<String, usize>> {
    let mut at = HashMap::new();
    for (i, h) in state.hosts.iter().enumerate() {
        let out = netns::ip_output(&["-n", &h.name, "-o", "link", "show"])?;
        for line in out.lines() {
            // "12: vif3.0@if2: <BROADCAST,...": the name is the 2nd field.
            let Some(name) = line.split_whitespace().nth(1) else {
                continue;
            };
            let name = name.trim_end_matches(':');
            let name = name.split('@').next().unwrap_or(name);
            if name.starts_with("vif") {
                at.insert(name.to_owned(), i);
            }
        }
    }
    Ok(at)
}

/// Whether each VM answers one ping at its address, sent from the first
/// host's namespace (so across the tree for most VMs); all pings in
/// parallel, 1 s time-out each.
pub fn reachable(state: &State) -> Vec<bool> {
    let from = state.hosts[0].name.clone();
    let handles: Vec<_> = state
        .vms
        .iter()
        .map(|v| {
            let (from, to) = (from.clone(), v.address.to_string());
            std::thread::spawn(move || {
                Command::new("ip")
                    .args([
                        "netns", "exec", &from, "ping", "-c", "1", "-W", "1", "-q", &to,
                    ])
                    .output()
                    .is_ok_and(|o| o.status.success())
            })
        })
        .collect();
    handles
        .into_iter()
        .map(|h| h.join().unwrap_or(false))
        .collect()
}

/// The addresses of the VMs that did not answer, of [`reachable`]'s
/// answers.
pub fn silent(state: &State, answered: &[bool]) -> Vec<String> {
    state
        .vms
        .iter()
        .zip(answered)
        .filter(|(_, ok)| !**ok)
        .map(|(v, _)| v.address.to_string())
        .collect()
}

/// Machine-readable status (`testbed status --json`), for tests and tools.
#[derive(Debug, Serialize)]
pub struct StatusReport {
    /// The state file it was read from.
    pub state_file: &'static str,
    /// Every host and its agent.
    pub hosts: Vec<HostStatus>,
    /// Every VM and where it is now.
    pub vms: Vec<VmStatus>,
    /// The measured cost, when asked for.
    pub cost: Option<CostReport>,
}

/// A host in a [`StatusReport`].
#[derive(Debug, Serialize)]
pub struct HostStatus {
    /// Namespace.
    pub name: String,
    /// br0 address.
    pub address: Ipv4Addr,
    /// Agent PID, if one was started.
    pub agent_pid: Option<u32>,
    /// Whether that agent process runs.
    pub agent_alive: bool,
    /// Whether it answers GET /healthz.
    pub agent_serving: bool,
}

/// A VM in a [`StatusReport`].
#[derive(Debug, Serialize)]
pub struct VmStatus {
    /// Its address.
    pub address: Ipv4Addr,
    /// Its vif.
    pub vif: String,
    /// Where it started.
    pub initial_host: String,
    /// The host namespace holding its vif now (none while it moves).
    pub host: Option<String>,
    /// Whether its traffic generator runs (a real guest sends from inside:
    /// false).
    pub traffic_alive: bool,
    /// A real guest's running QEMUs, by PID (two while it migrates);
    /// `None` for a VM namespace.
    pub qemu_pids: Option<Vec<u32>>,
    /// Whether it answered a ping (with `--ping`).
    pub reachable: Option<bool>,
}

/// Builds a [`StatusReport`] of the testbed that is up, without the cost
/// (xtask adds it: the optimum is its search's).
pub fn status_report(state: &State, ping: bool) -> Result<StatusReport> {
    let at = locate(state)?;
    let pings = if ping {
        reachable(state).into_iter().map(Some).collect()
    } else {
        vec![None; state.vms.len()]
    };
    let addr: SocketAddr = AGENT_HTTP.parse()?;
    let qemus = state
        .guests
        .as_ref()
        .map(|g| qemu_processes(&g.dir))
        .unwrap_or_default();
    let mut hosts = Vec::new();
    for h in &state.hosts {
        let agent_alive = h.agent_pid.is_some_and(alive);
        hosts.push(HostStatus {
            name: h.name.clone(),
            address: h.address,
            agent_pid: h.agent_pid,
            agent_alive,
            agent_serving: agent_alive && http::get(&h.name, addr, "/healthz")?.is_some(),
        });
    }
    let vms = state
        .vms
        .iter()
        .zip(pings)
        .map(|(v, reachable)| VmStatus {
            address: v.address,
            vif: v.vif.clone(),
            initial_host: v.initial_host.clone(),
            host: at.get(&v.vif).map(|&i| state.hosts[i].name.clone()),
            traffic_alive: v.traffic_pid.is_some_and(alive),
            qemu_pids: state.guests.as_ref().map(|_| {
                qemus
                    .iter()
                    .filter(|q| q.address == v.address)
                    .map(|q| q.pid)
                    .collect()
            }),
            reachable,
        })
        .collect();
    Ok(StatusReport {
        state_file: STATE_FILE,
        hosts,
        vms,
        cost: None,
    })
}

/// Prints hosts, where each VM is, and the agents' health; with `ping`,
/// whether every VM answers at its address.
pub fn status(ping: bool) -> Result<()> {
    let Some(state) = State::load()? else {
        println!("no testbed is up ({STATE_FILE} not found)");
        return Ok(());
    };
    let s = &state.sizes;
    println!(
        "testbed: {} pods x {} racks x {} hosts, {} VMs ({} per host, {} slots), set up in {:.2} s",
        s.pods,
        s.racks_per_pod,
        s.hosts_per_rack,
        s.vms(),
        s.vms_per_host,
        s.slots,
        state.setup_seconds
    );
    println!(
        "topology {}  key {}  bpffs {}",
        state.topology_file.display(),
        state.key_file.display(),
        state.bpffs.display()
    );
    if !state.settings.is_empty() {
        let raised: Vec<String> = state
            .settings
            .iter()
            .map(|s| {
                let name = s.path.trim_start_matches("/proc/sys/").replace('/', ".");
                format!("{name} {} -> {}", s.before, s.set)
            })
            .collect();
        println!(
            "host settings raised for this data centre (put back by down): {}",
            raised.join(", ")
        );
    }
    if let Ok(n) = sysctl::arp_table_fulls() {
        println!("host ARP table overflows since boot (table_fulls): {n}");
    }
    let at = locate(&state)?;
    let addr: SocketAddr = AGENT_HTTP.parse()?;
    println!(
        "{:<8} {:<12} {:<6} {:<6} {:<24} VMS",
        "HOST", "ADDRESS", "RACK", "POD", "AGENT"
    );
    for (i, h) in state.hosts.iter().enumerate() {
        let agent = match h.agent_pid {
            None => "-".to_string(),
            Some(p) if !alive(p) => format!("pid {p} DEAD"),
            Some(p) => {
                let ok = http::get(&h.name, addr, "/healthz")?.is_some();
                format!("pid {p} {}", if ok { "serving" } else { "not serving" })
            }
        };
        let vms: Vec<String> = state
            .vms
            .iter()
            .filter(|v| at.get(&v.vif) == Some(&i))
            .map(|v| {
                let moved = if v.initial_host == h.name { "" } else { "*" };
                format!("{}{moved}", v.address)
            })
            .collect();
        println!(
            "{:<8} {:<12} {:<6} {:<6} {:<24} {}",
            h.name,
            h.address,
            h.rack.trim_start_matches("dc-"),
            h.pod.trim_start_matches("dc-"),
            agent,
            vms.join(" ")
        );
    }
    let lost: Vec<&str> = state
        .vms
        .iter()
        .filter(|v| !at.contains_key(&v.vif))
        .map(|v| v.vif.as_str())
        .collect();
    if !lost.is_empty() {
        println!("VMs on no host: {}", lost.join(" "));
    }
    println!("(* = moved since set-up)");
    if let Some(g) = &state.guests {
        let qemus = qemu_processes(&g.dir);
        println!(
            "guests: {} real QEMU guests ({} MiB, TCG), all answering {:.1} s after launch; \
             {} QEMU processes running; monitors and consoles in {}/HOST/",
            state.vms.len(),
            g.memory_mib,
            g.boot_seconds,
            qemus.len(),
            g.dir.display()
        );
        let missing: Vec<String> = state
            .vms
            .iter()
            .filter(|v| !qemus.iter().any(|q| q.address == v.address))
            .map(|v| v.address.to_string())
            .collect();
        if !missing.is_empty() {
            println!("guests whose QEMU is gone: {}", missing.join(" "));
        }
    }
    if ping {
        let answered = reachable(&state);
        let silent = silent(&state, &answered);
        println!(
            "ping from {}: {} of {} VMs answer{}",
            state.hosts[0].name,
            answered.iter().filter(|&&ok| ok).count(),
            answered.len(),
            if silent.is_empty() {
                String::new()
            } else {
                format!("; silent: {}", silent.join(" "))
            }
        );
    }
    if let Some(a) = &state.agents {
        println!(
            "agents: {} ({}, policy {}), /flows and /metrics at http://{AGENT_HTTP} inside each host: \
             ip netns exec dc-h1 curl -s http://{AGENT_HTTP}/metrics",
            a.binary.display(),
            state.agent_mode.as_deref().unwrap_or("?"),
            a.policy
        );
    }
    let gens = state
        .vms
        .iter()
        .filter(|v| v.traffic_pid.is_some_and(alive))
        .count();
    if !state.traffic.is_empty() && state.guests.is_some() {
        println!(
            "traffic: {} flows, sent by the guests themselves (iperf3 UDP, from their kernel \
             command line)",
            state.traffic.len()
        );
    } else if !state.traffic.is_empty() {
        println!(
            "traffic: {} flows, {gens} of {} generators running",
            state.traffic.len(),
            state.vms.len()
        );
    }
    Ok(())
}
