//! score-agent in each dom0 of the Xen rig ([`crate::xen`]) in cluster
//! mode: the token protocol between the two dom0s, the xl backend in each
//! dom0 making real `xl migrate`s, and two chatty PV guests that start on
//! different hosts. [`bring_together`] is the scenario of `cargo xtask xen
//! demo` and of the Xen test of an agent-driven migration
//! (score-agent/tests/xen.rs): the agents decide by equation 2 and move
//! one guest live, so that both end on one host.
//!
//! The cost is the paper's equation 1 over what the agents measure (their
//! `GET /flows`, read inside each dom0, as [`crate::measure`] does for the
//! emulated data centre) and where `xl list` says each guest runs; the
//! agents' own figures are their /metrics (`score_migration_benefit`, each
//! VM's `score_vm_communication_cost` as the token last saw it).

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use score_core::{
    cost::{Placement, Traffic},
    topology::Topology,
};

use crate::{
    measure,
    metrics::value,
    xen::{Guest, Host, NET, Status, hosts, shell_quote},
};

/// Where each dom0's agent serves /metrics and /flows (inside the dom0).
pub const AGENT_HTTP: &str = "127.0.0.1:9464";
/// The shell line that stops a dom0's agent, if one runs (waits for it).
pub const STOP_AGENT: &str = "if [ -f /run/score-agent.pid ]; then p=$(cat /run/score-agent.pid); \
     kill -INT $p 2>/dev/null; i=0; while kill -0 $p 2>/dev/null && [ $i -lt 300 ]; do \
     i=$((i+1)); sleep 0.1; done; kill -9 $p 2>/dev/null; rm -f /run/score-agent.pid; fi";
/// Each guest's sending rate to its peer, iperf3's `-b` (bits per second
/// of UDP payload): small, the hosts' link also carries the migration.
pub const RATE: &str = "400K";

/// The two chatty guests: g1 starts on xen1, g2 on xen2.
pub const GUESTS: [Guest; 2] = [
    Guest {
        name: "g1",
        ip: Ipv4Addr::new(10, 77, 0, 101),
        mac: [0x00, 0x16, 0x3e, 0x77, 0x00, 0x65],
    },
    Guest {
        name: "g2",
        ip: Ipv4Addr::new(10, 77, 0, 102),
        mac: [0x00, 0x16, 0x3e, 0x77, 0x00, 0x66],
    },
];

/// One rack of the rig's hosts: traffic between them crosses one link
/// (weight 1), traffic inside a host none.
pub fn topology_toml() -> String {
    let list: Vec<String> = hosts()
        .iter()
        .map(|h| format!("\"{}\"", h.addr()))
        .collect();
    format!(
        "# The Xen rig of `cargo xtask xen`: its hosts in one rack.\n\
         weights = [1.0]\nname = \"xen-rack\"\nhosts = [{}]\n",
        list.join(", ")
    )
}

/// The agent's configuration in `host`'s dom0. The peer protocol's
/// time-outs are the defaults stretched for dom0s that TCG runs on a
/// loaded machine; `max_datagram_age` is the default (30 s), since the
/// rig sets each dom0's clock from this machine's ([`Host::set_clock`],
/// at boot and at every [`Host::reset`]). A VM migrates at most once per
/// 10 minutes: one move per run.
pub fn agent_config(host: &Host) -> String {
    format!(
        "# score-agent in {name}'s dom0, written by score-testbed's xen_cluster.\n\
         interfaces = [\"vif*\"]\n\
         drain_interval = \"1s\"\n\
         rate_window = \"10s\"\n\
         idle_timeout = \"2m\"\n\
         pin_path = \"/sys/fs/bpf/score\"\n\
         attach = \"auto\"\n\
         http_listen = \"{AGENT_HTTP}\"\n\
         \n[node]\n\
         address = \"{addr}\"\n\
         vm_slots = 2\n\
         memory_mib = 256\n\
         vm_memory_mib = 128\n\
         \n[topology]\n\
         file = \"/etc/score/topology.toml\"\n\
         \n[peer]\n\
         key_file = \"/etc/score/cluster.key\"\n\
         hop_timeout = \"2s\"\n\
         request_timeout = \"3s\"\n\
         token_timeout = \"30s\"\n\
         state_dir = \"/var/lib/score-agent\"\n\
         \n[policy]\n\
         kind = \"distributed\"\n\
         token_hold = \"2s\"\n\
         hold_down = \"10m\"\n\
         \n[backend]\n\
         kind = \"xl\"\n\
         xl_path = \"/usr/lib/xen-4.17/bin/xl\"\n\
         migrate_options = [\"-s\", \"score-xl-send\"]\n\
         timeout = \"10m\"\n",
        name = host.name(),
        addr = host.addr(),
    )
}

/// `printf` lines that write `text` to `path` in a dom0.
fn write_file(path: &str, text: &str) -> String {
    let lines: Vec<String> = text.lines().map(shell_quote).collect();
    format!("printf '%s\\n' {} > {path}", lines.join(" "))
}

/// Writes the key, topology and configuration into each dom0 and starts
/// its agent (`score-agent run`, log in `/var/log/score-agent.log`), then
/// waits until both serve /healthz.
pub fn start_agents() -> Result<()> {
    let mut key = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut key))
        .context("reading a cluster key from /dev/urandom")?;
    let key: String = key.iter().map(|b| format!("{b:02x}")).collect();
    for h in hosts() {
        let line = format!(
            "{STOP_AGENT}; mkdir -p /etc/score /var/lib/score-agent && rm -rf /sys/fs/bpf/score && \
             (umask 077 && printf '%s' {key} > /etc/score/cluster.key) && {} && {} || exit 1; \
             RUST_LOG=info,netlink_packet_route=error setsid score-agent run --config \
             /etc/score/agent.toml </dev/null >/var/log/score-agent.log 2>&1 & \
             echo $! > /run/score-agent.pid",
            write_file("/etc/score/topology.toml", &topology_toml()),
            write_file("/etc/score/agent.toml", &agent_config(&h)),
        );
        h.exec_ok(&line, Duration::from_secs(120))?;
    }
    // The agent loads and attaches its programs in a TCG dom0: seconds to
    // minutes on a loaded machine.
    let deadline = Instant::now() + Duration::from_secs(300);
    for h in hosts() {
        while agent_get(&h, "/healthz")?.is_none() {
            let alive = h.exec(
                "kill -0 $(cat /run/score-agent.pid)",
                Duration::from_secs(60),
            )?;
            if alive.code != 0 || Instant::now() > deadline {
                bail!(
                    "the agent in {} did not serve /healthz ({}); its log:\n{}",
                    h.name(),
                    if alive.code != 0 { "exited" } else { "300 s" },
                    agent_log(&h, 30)
                );
            }
            std::thread::sleep(Duration::from_secs(2));
        }
    }
    Ok(())
}

/// Stops both dom0s' agents.
pub fn stop_agents() -> Result<()> {
    for h in hosts() {
        h.exec_ok(STOP_AGENT, Duration::from_secs(120))?;
    }
    Ok(())
}

/// The last `lines` lines of the agent's log in `host`'s dom0.
pub fn agent_log(host: &Host, lines: usize) -> String {
    host.exec_ok(
        &format!("tail -n {lines} /var/log/score-agent.log"),
        Duration::from_secs(60),
    )
    .unwrap_or_else(|e| format!("(no log: {e:#})"))
}

/// `GET path` of `host`'s agent, from inside its dom0; `None` if it does
/// not answer.
pub fn agent_get(host: &Host, path: &str) -> Result<Option<String>> {
    let r = host.exec(
        &format!("wget -q -O - http://{AGENT_HTTP}{path}"),
        Duration::from_secs(120),
    )?;
    Ok((r.code == 0).then(|| String::from_utf8_lossy(&r.stdout).into_owned()))
}

/// One look at the rig: where each guest runs, what the agents measure,
/// and equation 1 over it.
#[derive(Clone, Debug)]
pub struct Look {
    /// The host (1-based index) each of [`GUESTS`] runs on; 0 while it is
    /// on none (arriving).
    pub at: [usize; 2],
    /// Domains arriving somewhere (`NAME--incoming`).
    pub incoming: usize,
    /// Equation 1 of the measured traffic and this placement (bytes/s
    /// times link weight, each pair counted twice).
    pub cost: f64,
    /// The measured traffic between the guests, both directions, bytes/s.
    pub rate: f64,
    /// Each host's /metrics, if its agent answered.
    pub metrics: Vec<Option<String>>,
    /// Each host's /flows, if its agent answered.
    pub flows: Vec<Option<String>>,
}

impl Look {
    /// Whether both guests run on one host and nothing is arriving.
    pub fn together(&self) -> bool {
        self.incoming == 0 && self.at[0] != 0 && self.at[0] == self.at[1]
    }

    /// A metric summed over both agents.
    pub fn sum(&self, sel: &str) -> f64 {
        self.metrics.iter().flatten().map(|t| value(t, sel)).sum()
    }
}

/// Takes a [`Look`]; `previous` places a guest that is on no host.
pub fn look(previous: Option<&Look>) -> Result<Look> {
    let all = hosts();
    let mut at = [0usize; 2];
    let mut incoming = 0;
    let mut metrics = Vec::new();
    let mut flows = Vec::new();
    let index: HashMap<Ipv4Addr, u32> = GUESTS
        .iter()
        .enumerate()
        .map(|(i, g)| (g.ip, i as u32))
        .collect();
    let mut rates = HashMap::new();
    for h in &all {
        for d in h.domains()? {
            if d.ends_with("--incoming") {
                incoming += 1;
            } else if let Some(i) = GUESTS.iter().position(|g| g.name == d) {
                at[i] = h.index;
            }
        }
        let f = agent_get(h, "/flows")?;
        if let Some(body) = &f {
            measure::add_pair_rates(body, &index, &mut rates)
                .with_context(|| format!("parsing /flows of {}", h.name()))?;
        }
        flows.push(f);
        metrics.push(agent_get(h, "/metrics")?);
    }
    let topo = Topology::from_toml_str(&topology_toml()).context("the rig's topology")?;
    let rate = rates.values().sum();
    let traffic = Traffic::from_triples(2, rates.into_iter().map(|((u, v), r)| (u, v, r)))?;
    let placed: Vec<u32> = (0..2)
        .map(|i| {
            let h = match (at[i], previous) {
                (0, Some(p)) => p.at[i],
                (h, _) => h,
            };
            h.max(1) as u32 - 1
        })
        .collect();
    let placement = Placement::new(all.len() as u32, placed)?;
    let cost = measure::cost(&topo, &traffic, &placement).total;
    Ok(Look {
        at,
        incoming,
        cost,
        rate,
        metrics,
        flows,
    })
}

/// What [`bring_together`] saw.
#[derive(Clone, Debug)]
pub struct Report {
    /// Before the move: both guests running apart, traffic measured.
    pub before: Look,
    /// After it: both on one host, the token past both guests again.
    pub after: Look,
    /// The guest that moved (index into [`GUESTS`]), from and to (hosts,
    /// 1-based).
    pub moved: usize,
    /// Its host before.
    pub from: usize,
    /// Its host after.
    pub to: usize,
    /// Its status before, and on the target after.
    pub status_before: Status,
    /// On the target.
    pub status_after: Status,
    /// The vif it has on the target, and the bytes the target's agent
    /// counted from it to its peer at two looks 10 s apart.
    pub vif: String,
    /// Those two counts.
    pub counted: (u64, u64),
    /// Wall time from the agents' start to the guest running at the
    /// target.
    pub decided_after: Duration,
    /// Each dom0's clock minus this machine's at the end, s (set at the
    /// start, then left to run).
    pub clocks: Vec<f64>,
}

/// The bytes of the directed pair `src -> dst` in a /flows body.
pub fn pair_bytes(flows: &str, src: Ipv4Addr, dst: Ipv4Addr) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(flows).ok()?;
    v["pairs"].as_array()?.iter().find_map(|p| {
        (p["src"] == src.to_string() && p["dst"] == dst.to_string())
            .then(|| p["bytes"].as_u64())
            .flatten()
    })
}

/// The interfaces a /flows body says the classifiers are attached to.
pub fn attached(flows: &str) -> Vec<String> {
    serde_json::from_str::<serde_json::Value>(flows)
        .ok()
        .and_then(|v| {
            v["interfaces"].as_array().map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_owned))
                    .collect()
            })
        })
        .unwrap_or_default()
}

/// The scenario: both hosts emptied, g1 created on xen1 and g2 on xen2,
/// each sending to the other at [`RATE`]; the agents started; then it
/// waits until the agents have moved one guest live so that both run on
/// one host, and until the token has been past both again. `progress` is
/// told what happens. The rig must be up with the agent
/// (`cargo xtask xen up --agent-bin ...`); the agents are left running.
pub fn bring_together(progress: &mut dyn FnMut(&str)) -> Result<Report> {
    let all = hosts();
    for h in &all {
        h.reset()?;
    }
    progress(&format!(
        "creating g1 on xen1 and g2 on xen2 ({}.101 <-> {}.102, {RATE}bit/s each way)",
        NET, NET
    ));
    let started = Instant::now();
    let statuses: Vec<Result<Status>> = std::thread::scope(|s| {
        let handles: Vec<_> = GUESTS
            .iter()
            .zip(&all)
            .enumerate()
            .map(|(i, (g, h))| {
                let peer = &GUESTS[1 - i];
                s.spawn(move || g.create(h, &format!("{}:{RATE}", peer.ip)))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("guest creation panicked"))
            .collect()
    });
    let statuses: Vec<Status> = statuses.into_iter().collect::<Result<_>>()?;
    progress(&format!(
        "both guests answer ({:.0} s); dom0 clocks {} (set at the reset); starting the agents",
        started.elapsed().as_secs_f64(),
        clock_offsets(&all)?
    ));
    let agents_started = Instant::now();
    start_agents()?;
    progress("agents up in both dom0s (xl backend, distributed policy)");

    // Before: each agent hosts its guest and the traffic between them is
    // measured (a full rate window).
    let deadline = Instant::now() + Duration::from_secs(600);
    let before = loop {
        let l = look(None)?;
        if l.at == [1, 2] && l.sum("score_vms_hosted") >= 2.0 && l.cost > 0.0 {
            break l;
        }
        if l.at != [1, 2] {
            bail!("a guest moved before the traffic was measured: {:?}", l.at);
        }
        if Instant::now() > deadline {
            bail!(
                "the agents did not measure the guests' traffic within 600 s (hosted {}, \
                 rate {:.0} B/s); xen1's log:\n{}",
                l.sum("score_vms_hosted"),
                l.rate,
                agent_log(&all[0], 30)
            );
        }
        std::thread::sleep(Duration::from_secs(5));
    };
    progress(&format!(
        "before: g1 on xen1, g2 on xen2, {:.0} B/s between them, cost (eq. 1) {:.0}",
        before.rate, before.cost
    ));

    // The move: both guests on one host, made by an agent.
    let deadline = Instant::now() + Duration::from_secs(1200);
    let mut last = before.clone();
    let mut said = String::new();
    let moved_look = loop {
        let l = look(Some(&last))?;
        let line = format!(
            "tokens received {:.0}, decisions {:.0}, migrations done {:.0} failed {:.0}, \
             g1 on {}, g2 on {}{}",
            l.sum("score_token_received_total"),
            l.sum("score_decisions_evaluated_total"),
            l.sum("score_migrations_total{outcome=\"done\"}"),
            l.sum("score_migrations_total{outcome=\"failed\"}"),
            host_name(l.at[0]),
            host_name(l.at[1]),
            if l.incoming > 0 {
                " (one arriving)"
            } else {
                ""
            }
        );
        if line != said {
            progress(&line);
            said = line;
        }
        if l.together() && l.sum("score_migrations_total{outcome=\"done\"}") >= 1.0 {
            break l;
        }
        if l.sum("score_migrations_total{outcome=\"failed\"}") > 0.0 {
            bail!(
                "an agent's migration failed; logs:\nxen1:\n{}\nxen2:\n{}",
                agent_log(&all[0], 30),
                agent_log(&all[1], 30)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the guests were not brought together within 1200 s; logs:\nxen1:\n{}\nxen2:\n{}",
                agent_log(&all[0], 30),
                agent_log(&all[1], 30)
            );
        }
        last = l;
        std::thread::sleep(Duration::from_secs(3));
    };
    let decided_after = agents_started.elapsed();
    let moved = if moved_look.at[0] != 1 { 0 } else { 1 };
    let (from, to) = (before.at[moved], moved_look.at[moved]);
    let (guest, peer) = (&GUESTS[moved], &GUESTS[1 - moved]);
    let target = &all[to - 1];
    progress(&format!(
        "{} moved live from {} to {} ({:.0} s after the agents started)",
        guest.name,
        host_name(from),
        host_name(to),
        decided_after.as_secs_f64()
    ));
    let status_after = guest
        .status(target)
        .with_context(|| format!("{} does not answer on {}", guest.name, target.name()))?;

    // Its vif on the target is attached and counted by the agent there.
    let vif = guest.vif(target)?;
    let deadline = Instant::now() + Duration::from_secs(300);
    let first = loop {
        let f = agent_get(target, "/flows")?.unwrap_or_default();
        if attached(&f).contains(&vif)
            && let Some(b) = pair_bytes(&f, guest.ip, peer.ip)
        {
            break b;
        }
        if Instant::now() > deadline {
            bail!(
                "{}'s agent did not count {} on {vif} within 300 s: {f}",
                target.name(),
                guest.name
            );
        }
        std::thread::sleep(Duration::from_secs(2));
    };
    std::thread::sleep(Duration::from_secs(10));
    let f = agent_get(target, "/flows")?.unwrap_or_default();
    let second = pair_bytes(&f, guest.ip, peer.ip).unwrap_or(0);
    progress(&format!(
        "{}'s agent counts {} on {vif}: {} -> {} bytes to {} in 10 s",
        target.name(),
        guest.name,
        first,
        second,
        peer.name
    ));

    // After: the token has been past both guests on their shared host,
    // each decision's cost 0.
    let deadline = Instant::now() + Duration::from_secs(600);
    let after = loop {
        let l = look(Some(&moved_look))?;
        let costs: Vec<Vec<f64>> = GUESTS
            .iter()
            .map(|g| {
                crate::metrics::select(
                    l.metrics[to - 1].as_deref().unwrap_or(""),
                    &format!("score_vm_communication_cost{{vm=\"{}\"}}", g.ip),
                )
            })
            .collect();
        if costs.iter().all(|c| c == &[0.0]) && l.together() {
            break l;
        }
        if !l.together() {
            bail!("the guests parted again: {:?}", l.at);
        }
        if Instant::now() > deadline {
            bail!(
                "the token did not visit both guests on {} within 600 s (costs {costs:?}); log:\n{}",
                target.name(),
                agent_log(target, 30)
            );
        }
        std::thread::sleep(Duration::from_secs(3));
    };
    progress(&format!(
        "after: both on {}, {:.0} B/s between them, cost (eq. 1) {:.0} (was {:.0}); \
         the agents' own: host cost {:.0}, benefit of the move {:.0}",
        host_name(to),
        after.rate,
        after.cost,
        before.cost,
        after.sum("score_host_communication_cost"),
        after.sum("score_migration_benefit_sum"),
    ));
    let clocks = all
        .iter()
        .map(Host::clock_offset)
        .collect::<Result<Vec<f64>>>()?;
    progress(&format!(
        "dom0 clocks at the end {}; datagrams the agents rejected as not fresh: {:.0}",
        describe_offsets(&clocks),
        after.sum("score_datagrams_rejected_total{reason=\"not_fresh\"}")
    ));
    Ok(Report {
        before,
        after,
        moved,
        from,
        to,
        status_before: statuses[moved].clone(),
        status_after,
        vif,
        counted: (first, second),
        decided_after,
        clocks,
    })
}

/// Each host's clock offset from this machine's, as words.
fn clock_offsets(all: &[Host]) -> Result<String> {
    let offsets = all
        .iter()
        .map(Host::clock_offset)
        .collect::<Result<Vec<f64>>>()?;
    Ok(describe_offsets(&offsets))
}

fn describe_offsets(offsets: &[f64]) -> String {
    let each: Vec<String> = offsets
        .iter()
        .enumerate()
        .map(|(i, o)| format!("xen{} {o:+.2} s", i + 1))
        .collect();
    format!("{} from this machine's", each.join(", "))
}

/// One live migration of g1 measured by [`migration_times`].
#[derive(Clone, Debug)]
pub struct Sample {
    /// Whether g1 and g2 sent to each other meanwhile.
    pub loaded: bool,
    /// From and to (hosts, 1-based).
    pub from: usize,
    /// To.
    pub to: usize,
    /// `xl migrate`'s wall time in the source dom0 (its uptime clock), s.
    pub seconds: f64,
    /// The source dom0's pings to g1: sent, answered, and the interval
    /// they really went out at (s).
    pub pings: (u32, u32, f64),
    /// The longest gap between two answered pings (sequence numbers apart
    /// times the interval), s: the downtime a client sees, to within one
    /// interval.
    pub gap: f64,
}

/// The sequence numbers of the answered pings in busybox ping's output,
/// and what it says it sent.
pub fn parse_ping(out: &str) -> (Vec<u32>, Option<u32>) {
    let seqs = out
        .lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("seq="))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    let sent = out.lines().find_map(|l| {
        l.split_once(" packets transmitted")
            .and_then(|(n, _)| n.trim().parse().ok())
    });
    (seqs, sent)
}

/// The largest step between consecutive sequence numbers (1 when none
/// was lost).
pub fn longest_step(seqs: &[u32]) -> u32 {
    seqs.windows(2)
        .map(|w| w[1].saturating_sub(w[0]))
        .max()
        .unwrap_or(0)
}

/// The interval of the measuring pings, s.
const PING_INTERVAL: &str = "0.05";

/// Paper Fig. 4 on the rig: `reps` live migrations of g1 (128 MiB PV)
/// back and forth between the hosts with `xl migrate -s score-xl-send` in
/// the source dom0, idle, then `reps` more while g1 and g2 (on the other
/// host) send to each other at `rate` (iperf3 UDP, `-b`). The source dom0
/// pings g1 every 50 ms from 2 s before each migration to 3 s after it.
/// No agents run. The rig must be up.
pub fn migration_times(
    reps: usize,
    rate: &str,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<Sample>> {
    let all = hosts();
    let (g1, g2) = (&GUESTS[0], &GUESTS[1]);
    let mut samples = Vec::new();
    for loaded in [false, true] {
        for h in &all {
            h.reset()?;
        }
        let peer_of = |g: &Guest| {
            if loaded {
                format!("{}:{rate}", g.ip)
            } else {
                String::new()
            }
        };
        let first = g1.create(&all[0], &peer_of(g2))?;
        if loaded {
            g2.create(&all[1], &peer_of(g1))?;
        }
        progress(&format!(
            "g1 up on xen1{}",
            if loaded {
                format!(", g2 on xen2, {rate}bit/s each way between them")
            } else {
                String::new()
            }
        ));
        let mut from = 1;
        for _ in 0..reps {
            let to = 3 - from;
            let (src, dst) = (&all[from - 1], &all[to - 1]);
            src.exec_ok(
                &format!(
                    "rm -f /tmp/mping.*; cut -d' ' -f1 /proc/uptime > /tmp/mping.t0; \
                     (ping -i {PING_INTERVAL} {} > /tmp/mping.log 2>&1 </dev/null & \
                     echo $! > /tmp/mping.pid); sleep 2",
                    g1.ip
                ),
                Duration::from_secs(120),
            )?;
            let out = src.exec_ok(
                &format!(
                    "a=$(cut -d' ' -f1 /proc/uptime); xl migrate -s score-xl-send g1 {} \
                     2>/tmp/mig.err; rc=$?; b=$(cut -d' ' -f1 /proc/uptime); echo $rc $a $b; \
                     [ $rc = 0 ] || cat /tmp/mig.err",
                    dst.addr()
                ),
                Duration::from_secs(1800),
            )?;
            let fields: Vec<&str> = out.split_whitespace().collect();
            let (rc, a, b) = match fields.as_slice() {
                [rc, a, b, ..] => (*rc, a.parse::<f64>()?, b.parse::<f64>()?),
                _ => bail!("unexpected timing output {out:?}"),
            };
            if rc != "0" {
                bail!("xl migrate xen{from} -> xen{to} failed: {out}");
            }
            let ping = src.exec_ok(
                "sleep 3; kill -INT $(cat /tmp/mping.pid); sleep 1; \
                 cut -d' ' -f1 /proc/uptime; cat /tmp/mping.t0 /tmp/mping.log",
                Duration::from_secs(120),
            )?;
            let mut lines = ping.lines();
            let t1: f64 = lines.next().unwrap_or("").parse().unwrap_or(0.0);
            let t0: f64 = lines.next().unwrap_or("").parse().unwrap_or(0.0);
            let (seqs, sent) = parse_ping(&ping);
            let sent = sent.unwrap_or_else(|| seqs.last().map_or(0, |s| s + 1));
            let interval = if sent > 0 {
                (t1 - t0 - 1.0) / f64::from(sent)
            } else {
                0.0
            };
            let s = Sample {
                loaded,
                from,
                to,
                seconds: b - a,
                pings: (sent, seqs.len() as u32, interval),
                gap: f64::from(longest_step(&seqs)) * interval,
            };
            let now = g1
                .status(dst)
                .with_context(|| format!("g1 does not answer on xen{to}"))?;
            if now.boot_id != first.boot_id {
                bail!("g1 rebooted: boot id {} -> {}", first.boot_id, now.boot_id);
            }
            progress(&format!(
                "{}: xen{from} -> xen{to} in {:.1} s, longest ping gap {:.2} s \
                 ({} of {} answered, every {:.3} s)",
                if loaded { "loaded" } else { "idle" },
                s.seconds,
                s.gap,
                s.pings.1,
                s.pings.0,
                s.pings.2
            ));
            samples.push(s);
            from = to;
        }
    }
    Ok(samples)
}

fn host_name(index: usize) -> String {
    if index == 0 {
        "none".into()
    } else {
        format!("xen{index}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rigs_topology_and_agent_config_parse() {
        let t = Topology::from_toml_str(&topology_toml()).unwrap();
        assert_eq!(t.host_count(), 2);
        let c = agent_config(&hosts()[1]);
        assert!(c.contains("address = \"10.77.0.2\""), "{c}");
        assert!(c.contains("kind = \"xl\""), "{c}");
        let v: toml::Value = toml::from_str(&c).unwrap();
        assert_eq!(
            v["backend"]["migrate_options"][1].as_str(),
            Some("score-xl-send")
        );
        assert_eq!(
            write_file("/f", "a = \"b\"\nc"),
            "printf '%s\\n' 'a = \"b\"' c > /f"
        );
    }

    #[test]
    fn busybox_ping_output_gives_the_gaps() {
        let out = "PING 10.77.0.101 (10.77.0.101): 56 data bytes\n\
                   64 bytes from 10.77.0.101: seq=0 ttl=64 time=1.2 ms\n\
                   64 bytes from 10.77.0.101: seq=1 ttl=64 time=1.0 ms\n\
                   64 bytes from 10.77.0.101: seq=7 ttl=64 time=9.0 ms\n\
                   \n--- 10.77.0.101 ping statistics ---\n\
                   9 packets transmitted, 3 packets received, 66% packet loss\n";
        let (seqs, sent) = parse_ping(out);
        assert_eq!(seqs, [0, 1, 7]);
        assert_eq!(sent, Some(9));
        assert_eq!(longest_step(&seqs), 6);
        assert_eq!(longest_step(&[3]), 0);
    }

    #[test]
    fn flows_bodies_give_bytes_and_interfaces() {
        let f = r#"{"interfaces": ["vif3.0"], "stats": {}, "pairs": [
            {"src": "10.77.0.101", "dst": "10.77.0.102", "bytes": 42, "packets": 1, "rate_bps": 4.0}]}"#;
        assert_eq!(attached(f), ["vif3.0"]);
        assert_eq!(pair_bytes(f, GUESTS[0].ip, GUESTS[1].ip), Some(42));
        assert_eq!(pair_bytes(f, GUESTS[1].ip, GUESTS[0].ip), None);
        let mut rates = HashMap::new();
        let index = HashMap::from([(GUESTS[0].ip, 0), (GUESTS[1].ip, 1)]);
        measure::add_pair_rates(f, &index, &mut rates).unwrap();
        assert_eq!(rates[&(0, 1)], 4.0);
    }
}
