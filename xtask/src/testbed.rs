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
    collections::HashMap,
    fs,
    io::Write as _,
    net::{Ipv4Addr, SocketAddr},
    os::unix::{fs::OpenOptionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::netns;

/// Directory of everything the testbed writes (configs, key, logs, bpffs).
pub const DIR: &str = "/run/score-testbed";
/// The state file: JSON of [`State`].
pub const STATE_FILE: &str = "/run/score-testbed/state.json";
/// Where every agent serves /flows and /metrics, inside its host namespace.
pub const AGENT_HTTP: &str = "127.0.0.1:9464";
/// UDP port of the peer protocol between agents.
pub const PEER_PORT: u16 = 7946;
/// Prefix of VM namespace names; the rest is the VM's IPv4 address (the
/// agent's netns backend finds a VM's namespace this way).
pub const VM_NETNS_PREFIX: &str = "dcvm-";
/// Memory of one VM as announced to the agents (their capacity answers).
pub const VM_MEMORY_MIB: u32 = 512;
/// Memory of one real guest (`--guests qemu`): what the launcher gives
/// QEMU and what the agents announce.
pub const GUEST_MEMORY_MIB: u32 = 256;
/// Where the real guests' monitors, PID files and consoles live, one
/// directory per host (`qemu/dc-h1/198.18.1.1.qmp`).
pub const QEMU_DIR: &str = "/run/score-testbed/qemu";
/// The launcher and incoming helper of the real guests, relative to the
/// workspace root.
const LAUNCHER: &str = "score-agent/tests/fixtures/qemu-vm";
/// How long every real guest together may take to boot and answer.
const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Longest time the agents' qemu backend lets one migration take: about
/// 1-3 s on an idle machine here, but TCG on two loaded cores is slow.
const QEMU_MIGRATION_TIMEOUT: &str = "90s";

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
/// First address of the hosts (host i is `HOST_BASE + i`, i from 1).
const HOST_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
/// First address of the VMs (VM k is `VM_BASE + k`, k from 1).
const VM_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);
/// Prefix length of the one flat network (198.18.0.0/15, RFC 2544's
/// benchmarking range, only inside our namespaces).
const PREFIX_LEN: u8 = 15;
/// Link weights c_1..c_3 of the tree: the paper's e^0, e^1, e^3 truncated to
/// our depth of 3, as score-core writes them.
const WEIGHTS: [f64; 3] = [
    score_core::topology::PAPER_WEIGHTS[0],
    score_core::topology::PAPER_WEIGHTS[1],
    score_core::topology::PAPER_WEIGHTS[2],
];

/// The shape of the data centre.
#[derive(clap::Args, Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Sizes {
    /// Pods under the core bridge.
    #[arg(long, default_value_t = 2)]
    pub pods: u32,
    /// Racks (ToR bridges) per pod.
    #[arg(long, default_value_t = 2)]
    pub racks_per_pod: u32,
    /// Hosts per rack.
    #[arg(long, default_value_t = 2)]
    pub hosts_per_rack: u32,
    /// VMs started on each host.
    #[arg(long, default_value_t = 2)]
    pub vms_per_host: u32,
    /// VM slots of each host (room to move: more than vms-per-host).
    #[arg(long, default_value_t = 4)]
    pub slots: u32,
}

impl Sizes {
    /// Number of hosts.
    pub fn hosts(&self) -> u32 {
        self.pods * self.racks_per_pod * self.hosts_per_rack
    }

    /// Number of VMs.
    pub fn vms(&self) -> u32 {
        self.hosts() * self.vms_per_host
    }

    fn validate(&self) -> Result<()> {
        for (v, name) in [
            (self.pods, "--pods"),
            (self.racks_per_pod, "--racks-per-pod"),
            (self.hosts_per_rack, "--hosts-per-rack"),
            (self.vms_per_host, "--vms-per-host"),
            (self.slots, "--slots"),
        ] {
            if v == 0 {
                bail!("{name} must be at least 1");
            }
        }
        if self.vms_per_host > self.slots {
            bail!(
                "--vms-per-host {} does not fit --slots {}",
                self.vms_per_host,
                self.slots
            );
        }
        // Host addresses are 198.18.0.1..=254; VM namespaces cost about
        // 0.3 MiB each and set-up grows faster than linearly (TESTBED.md).
        if self.hosts() > 254 {
            bail!(
                "at most 254 hosts (198.18.0.1-254), asked for {}",
                self.hosts()
            );
        }
        if self.vms() > 4000 {
            bail!("at most 4000 VMs, asked for {}", self.vms());
        }
        Ok(())
    }
}

/// How the agents are run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentOptions {
    /// The score-agent binary.
    pub binary: PathBuf,
    /// Token policy: round-robin, global, distributed or load-aware.
    pub policy: String,
    /// How long a host holds the token for one VM.
    pub token_hold: String,
}

/// A switch namespace (core, pod or rack bridge).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Switch {
    /// Namespace name (`dc-core`, `dc-p<i>`, `dc-r<i>`).
    pub name: String,
    /// Tree level of the links below it: 1 rack, 2 pod, 3 core.
    pub level: u8,
    /// The switch above, if any.
    pub parent: Option<String>,
}

/// A hypervisor host namespace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Host {
    /// Namespace name, `dc-h<i>`.
    pub name: String,
    /// Address of its br0.
    pub address: Ipv4Addr,
    /// Its rack namespace.
    pub rack: String,
    /// Its pod namespace.
    pub pod: String,
    /// Its agent's configuration file.
    pub config: PathBuf,
    /// Its agent's log.
    pub log: PathBuf,
    /// PID of its agent, when one was started.
    pub agent_pid: Option<u32>,
}

/// A VM namespace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Vm {
    /// Namespace name: `dcvm-<address>`.
    pub name: String,
    /// Address of its eth0.
    pub address: Ipv4Addr,
    /// MAC of its eth0 (02:00 followed by the address bytes).
    pub mac: String,
    /// The host end of its veth, unique in the data centre (it moves).
    pub vif: String,
    /// The host it was started on (see [`locate`] for where it is now).
    pub initial_host: String,
    /// PID of its traffic generator, when one runs.
    pub traffic_pid: Option<u32>,
    /// A real guest's boot id as it first answered: the same id later
    /// means it was live-migrated, never rebooted.
    #[serde(default)]
    pub boot_id: Option<String>,
}

/// Everything the testbed made, as written to [`STATE_FILE`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    /// Format version of this file.
    pub version: u32,
    /// The shape of the data centre.
    pub sizes: Sizes,
    /// Topology file (score-core's TOML format).
    pub topology_file: PathBuf,
    /// Cluster key file (32 random bytes, mode 0600).
    pub key_file: PathBuf,
    /// The bpffs mounted for the agents' pinned maps.
    pub bpffs: PathBuf,
    /// Every namespace, in creation order.
    pub namespaces: Vec<String>,
    /// Core, pod and rack switches.
    pub switches: Vec<Switch>,
    /// Hosts in tree order (host i of the topology is `hosts[i]`).
    pub hosts: Vec<Host>,
    /// VMs in address order.
    pub vms: Vec<Vm>,
    /// How the agents run, once started.
    pub agents: Option<AgentOptions>,
    /// Whether the agents run with the full (S-CORE) configuration or only
    /// the flow-counting part of it (an agent that predates the peer
    /// protocol rejects the [node]/[peer]/... tables).
    pub agent_mode: Option<String>,
    /// The traffic the generators were told to send.
    pub traffic: Vec<crate::traffic::Flow>,
    /// Seconds the namespaces took to set up.
    pub setup_seconds: f64,
    /// Real guests instead of VM namespaces (`--guests qemu`).
    #[serde(default)]
    pub guests: Option<QemuGuests>,
}

impl State {
    /// Reads the state file, `None` when no testbed is up.
    pub fn load() -> Result<Option<State>> {
        match fs::read_to_string(STATE_FILE) {
            Ok(text) => Ok(Some(
                serde_json::from_str(&text).with_context(|| format!("parsing {STATE_FILE}"))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {STATE_FILE}")),
        }
    }

    /// Writes the state file atomically.
    pub fn save(&self) -> Result<()> {
        let tmp = format!("{STATE_FILE}.tmp");
        fs::write(&tmp, serde_json::to_string_pretty(self)?).context("writing state")?;
        fs::rename(&tmp, STATE_FILE).context("renaming state")?;
        Ok(())
    }

    /// The score-core topology of this data centre.
    pub fn topology(&self) -> Result<score_core::topology::Topology> {
        let text = fs::read_to_string(&self.topology_file)
            .with_context(|| format!("reading {}", self.topology_file.display()))?;
        score_core::topology::Topology::from_toml_str(&text)
            .with_context(|| format!("parsing {}", self.topology_file.display()))
    }

    /// Index of the host named `name`.
    pub fn host_index(&self, name: &str) -> Option<usize> {
        self.hosts.iter().position(|h| h.name == name)
    }

    /// Memory of one VM as the agents announce it.
    pub fn vm_memory_mib(&self) -> u32 {
        self.guests.as_ref().map_or(VM_MEMORY_MIB, |g| g.memory_mib)
    }
}

/// Whether the process runs as root.
pub fn require_root(what: &str) -> Result<()> {
    if !crate::is_root() {
        bail!("{what} needs root (network namespaces, bpffs, eBPF)");
    }
    Ok(())
}

/// The namespaces of one data centre, before any is made.
struct Blueprint {
    switches: Vec<Switch>,
    hosts: Vec<Host>,
    vms: Vec<Vm>,
    /// Every link between switches and hosts: (parent namespace, name of
    /// the veth end on the parent's side, child namespace). The child's end
    /// is always `uplink`.
    links: Vec<(String, String, String)>,
}

fn blueprint(s: &Sizes) -> Blueprint {
    let dir = Path::new(DIR);
    let mut switches = vec![Switch {
        name: "dc-core".into(),
        level: 3,
        parent: None,
    }];
    let mut hosts = Vec::new();
    // (parent namespace, parent-side veth name, child namespace)
    let mut links = Vec::new();
    for p in 0..s.pods {
        let pod = format!("dc-p{}", p + 1);
        switches.push(Switch {
            name: pod.clone(),
            level: 2,
            parent: Some("dc-core".into()),
        });
        links.push(("dc-core".into(), format!("pod{}", p + 1), pod.clone()));
        for r in 0..s.racks_per_pod {
            let ri = p * s.racks_per_pod + r + 1;
            let rack = format!("dc-r{ri}");
            switches.push(Switch {
                name: rack.clone(),
                level: 1,
                parent: Some(pod.clone()),
            });
            links.push((pod.clone(), format!("rack{ri}"), rack.clone()));
            for h in 0..s.hosts_per_rack {
                let hi = (ri - 1) * s.hosts_per_rack + h + 1;
                let name = format!("dc-h{hi}");
                links.push((rack.clone(), format!("host{hi}"), name.clone()));
                hosts.push(Host {
                    address: Ipv4Addr::from(u32::from(HOST_BASE) + hi),
                    rack: rack.clone(),
                    pod: pod.clone(),
                    config: dir.join("agents").join(format!("{name}.toml")),
                    log: dir.join("logs").join(format!("{name}.log")),
                    agent_pid: None,
                    name,
                });
            }
        }
    }
    // VM k (from 1) starts on host (k-1) mod hosts: consecutive VMs sit on
    // different hosts, so the traffic pattern can scatter its pairs.
    let n_hosts = hosts.len() as u32;
    let vms = (1..=s.vms())
        .map(|k| {
            let address = Ipv4Addr::from(u32::from(VM_BASE) + k);
            let o = address.octets();
            Vm {
                name: format!("{VM_NETNS_PREFIX}{address}"),
                address,
                mac: format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", o[0], o[1], o[2], o[3]),
                vif: format!("vif{k}.0"),
                initial_host: hosts[((k - 1) % n_hosts) as usize].name.clone(),
                traffic_pid: None,
                boot_id: None,
            }
        })
        .collect();
    Blueprint {
        switches,
        hosts,
        vms,
        links,
    }
}

/// The `ip -batch` lines of every namespace, in the order they must run.
/// With `vm_namespaces` false (real guests), hosts get no vifs and VMs no
/// namespaces: QEMU makes the taps when the guests boot.
fn batches(bp: &Blueprint, vm_namespaces: bool) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let bridge = |mac: Option<String>| {
        let mut v = vec!["link set lo up".to_string()];
        match mac {
            // A fixed bridge MAC: otherwise br0 takes the lowest MAC of its
            // ports, which changes as vifs come and go, and the host's
            // neighbours would hold a stale ARP entry.
            Some(m) => v.push(format!("link add br0 address {m} type bridge")),
            None => v.push("link add br0 type bridge".into()),
        }
        v
    };
    for sw in &bp.switches {
        let mut lines = bridge(None);
        if sw.parent.is_some() {
            lines.push("link set dev uplink master br0 up".into());
        }
        lines.push("link set br0 up".into());
        for (_, end, child) in bp.links.iter().filter(|l| l.0 == sw.name) {
            lines.push(format!(
                "link add {end} type veth peer name uplink netns {child}"
            ));
            lines.push(format!("link set {end} master br0 up"));
        }
        out.push((sw.name.clone(), lines));
    }
    for h in &bp.hosts {
        let o = h.address.octets();
        let mut lines = bridge(Some(format!(
            "02:01:{:02x}:{:02x}:{:02x}:{:02x}",
            o[0], o[1], o[2], o[3]
        )));
        lines.push("link set dev uplink master br0 up".into());
        lines.push(format!("addr add {}/{PREFIX_LEN} dev br0", h.address));
        lines.push("link set br0 up".into());
        for vm in bp
            .vms
            .iter()
            .filter(|v| vm_namespaces && v.initial_host == h.name)
        {
            lines.push(format!(
                "link add {} type veth peer name eth0 address {} netns {}",
                vm.vif, vm.mac, vm.name
            ));
            lines.push(format!("link set {} master br0 up", vm.vif));
        }
        out.push((h.name.clone(), lines));
    }
    for vm in bp.vms.iter().filter(|_| vm_namespaces) {
        out.push((
            vm.name.clone(),
            vec![
                "link set lo up".into(),
                format!("addr add {}/{PREFIX_LEN} dev eth0", vm.address),
                "link set eth0 up".into(),
            ],
        ));
    }
    out
}

/// The topology file of the data centre in score-core's format.
fn topology_toml(bp: &Blueprint) -> Result<String> {
    use score_core::topology::{NodeSpec, TopologySpec};
    let mut pods = Vec::new();
    for pod in bp.switches.iter().filter(|s| s.level == 2) {
        let racks = bp
            .switches
            .iter()
            .filter(|s| s.level == 1 && s.parent.as_deref() == Some(&pod.name))
            .map(|rack| NodeSpec {
                name: Some(rack.name.clone()),
                hosts: bp
                    .hosts
                    .iter()
                    .filter(|h| h.rack == rack.name)
                    .map(|h| h.address)
                    .collect(),
                children: Vec::new(),
            })
            .collect();
        pods.push(NodeSpec {
            name: Some(pod.name.clone()),
            hosts: Vec::new(),
            children: racks,
        });
    }
    let spec = TopologySpec {
        weights: Some(WEIGHTS.to_vec()),
        regular: None,
        name: Some("dc-core".into()),
        hosts: Vec::new(),
        children: pods,
    };
    let body = toml::to_string(&spec).context("writing the topology")?;
    let text = format!(
        "# The emulated data centre of `cargo xtask testbed`: pods > racks > hosts.\n\
         # Weights c_1..c_3 are the paper's e^0, e^1, e^3.\n{body}"
    );
    // What we write must be what score-core reads.
    score_core::topology::Topology::from_toml_str(&text)
        .context("the generated topology does not parse")?;
    Ok(text)
}

/// One agent's configuration: the full S-CORE one, or (`full == false`)
/// only its flow-counting part, for an agent that predates the rest.
pub fn agent_config(
    state: &State,
    host: &Host,
    policy: &str,
    token_hold: &str,
    full: bool,
) -> String {
    let pin = Path::new(&state.bpffs).join(&host.name);
    let mut s = format!(
        "# score-agent on {name} ({addr}), written by `cargo xtask testbed up`.\n\
         interfaces = [\"vif*\"]\n\
         drain_interval = \"500ms\"\n\
         rate_window = \"10s\"\n\
         idle_timeout = \"60s\"\n\
         pin_path = \"{pin}\"\n\
         http_listen = \"{AGENT_HTTP}\"\n",
        name = host.name,
        addr = host.address,
        pin = pin.display(),
    );
    if !full {
        return s;
    }
    let slots = state.sizes.slots;
    s.push_str(&format!(
        "\n[node]\n\
         address = \"{addr}\"\n\
         vm_slots = {slots}\n\
         memory_mib = {mem}\n\
         vm_memory_mib = {vm_mem}\n\
         \n[topology]\n\
         file = \"{topo}\"\n\
         \n[peer]\n\
         port = {PEER_PORT}\n\
         key_file = \"{key}\"\n\
         {coordinator}\
         \n[policy]\n\
         kind = \"{policy}\"\n\
         token_hold = \"{token_hold}\"\n\
         \n[backend]\n\
         {backend}\
         \n[backend.hosts]\n",
        addr = host.address,
        vm_mem = state.vm_memory_mib(),
        mem = slots * state.vm_memory_mib(),
        backend = backend_config(state, host),
        topo = state.topology_file.display(),
        key = state.key_file.display(),
        // The global policy's coordinator runs beside the first host's
        // agent (`score-agent run --coordinator`, see `spawn_agent`).
        coordinator = if policy == "global" {
            format!("coordinator = \"{}\"\n", state.hosts[0].address)
        } else {
            String::new()
        },
    ));
    for h in &state.hosts {
        s.push_str(&format!("\"{}\" = \"{}\"\n", h.address, h.name));
    }
    s
}

/// The `[backend]` keys of one agent: netns, or qemu for real guests (the
/// guests' monitors under [`QEMU_DIR`]/HOST, the launcher as incoming
/// helper).
fn backend_config(state: &State, host: &Host) -> String {
    match &state.guests {
        None => format!("kind = \"netns\"\nvm_netns_prefix = \"{VM_NETNS_PREFIX}\"\n"),
        Some(g) => format!(
            "kind = \"qemu\"\n\
             qmp_sockets = \"{dir}/{host}/*.qmp\"\n\
             incoming_helper = [\"{launcher}\", \"--dir\", \"{dir}\", \"incoming\"]\n\
             timeout = \"{QEMU_MIGRATION_TIMEOUT}\"\n",
            dir = g.dir.display(),
            host = host.name,
            launcher = g.launcher.display(),
        ),
    }
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

/// Every namespace name this testbed uses, whatever the state file says:
/// what `down` sweeps when the state is lost.
fn is_ours(ns: &str) -> bool {
    ns == "dc-core"
        || ns.starts_with(VM_NETNS_PREFIX)
        || ["dc-p", "dc-r", "dc-h"]
            .iter()
            .any(|p| ns.strip_prefix(p).is_some_and(|n| n.parse::<u32>().is_ok()))
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
    };
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
            crate::run(
                Command::new("mount")
                    .args(["-t", "bpf", "bpf"])
                    .arg(&state.bpffs),
            )?;
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

/// Prepares the real guests of a `--guests qemu` testbed: QEMU and the
/// tiny guest (`cargo xtask guest`, cached), the launcher, an empty
/// [`QEMU_DIR`].
fn qemu_guests() -> Result<QemuGuests> {
    crate::guest::guest(false).context("preparing the real guest (cargo xtask guest)")?;
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
fn peers_arg(vm: Ipv4Addr, flows: &[crate::traffic::Flow]) -> Option<String> {
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
pub fn boot_guests(state: &mut State, flows: &[crate::traffic::Flow]) -> Result<()> {
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
            match guest_status(&from, vm.address)? {
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
/// the guest's own init: see `guest.rs`).
#[derive(Clone, Debug, PartialEq)]
pub struct GuestStatus {
    /// `/proc/sys/kernel/random/boot_id`: new at every boot.
    pub boot_id: String,
    /// Seconds since boot.
    pub uptime: f64,
}

/// Asks guest `vm` for its status from host namespace `from`; `None` when
/// it does not answer (within about 2.5 s).
pub fn guest_status(from: &str, vm: Ipv4Addr) -> Result<Option<GuestStatus>> {
    let Some(body) = netns::http_get(from, SocketAddr::new(vm.into(), 80), "/cgi-bin/status")?
    else {
        return Ok(None);
    };
    let field = |k: &str| {
        body.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::trim)
    };
    Ok(match (field("boot_id"), field("uptime")) {
        (Some(b), Some(u)) if !b.is_empty() => u.parse().ok().map(|uptime| GuestStatus {
            boot_id: b.to_owned(),
            uptime,
        }),
        _ => None,
    })
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

/// Marks every file descriptor above stderr that `cmd`'s child would
/// inherit close-on-exec. A daemon we start (an agent, a QEMU) would
/// otherwise keep, for its whole life, whatever our parent left open: the
/// shared lock of `flock /work/PRIV.lock cargo xtask ...`, say.
pub fn close_inherited_fds(cmd: &mut Command) {
    // SAFETY: close_range(2) is async-signal-safe and touches nothing but
    // the child's descriptor table; CLOEXEC (not closing) keeps std's own
    // exec-error pipe working until exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
}

/// Starts one score-agent per host namespace with the given options, waits
/// until every one serves /healthz, and records the PIDs. If the agent
/// refuses the full configuration because it does not know the S-CORE
/// tables yet, falls back to the flow-counting part and says so.
pub fn start_agents(state: &mut State, opts: &AgentOptions) -> Result<()> {
    if !opts.binary.exists() {
        bail!("no score-agent binary at {}", opts.binary.display());
    }
    let mut full = true;
    for h in &state.hosts {
        fs::write(
            &h.config,
            agent_config(state, h, &opts.policy, &opts.token_hold, true),
        )?;
    }
    // Try the first host alone: a config refusal shows within a moment.
    let first = state.hosts[0].clone();
    let global = opts.policy == "global";
    let pid = spawn_agent(&first, &opts.binary, global)?;
    match wait_healthy(&first, pid, Duration::from_secs(20))? {
        Health::Up => state.hosts[0].agent_pid = Some(pid),
        Health::Exited(log) if log.contains("unknown field `node`") => {
            eprintln!(
                "testbed: this score-agent does not know the [node]/[peer]/[policy] tables yet: \
                 running it as a flow counter only (no token, no migrations)"
            );
            full = false;
            for h in &state.hosts {
                fs::write(
                    &h.config,
                    agent_config(state, h, &opts.policy, &opts.token_hold, false),
                )?;
            }
            let pid = spawn_agent(&first, &opts.binary, false)?;
            match wait_healthy(&first, pid, Duration::from_secs(20))? {
                Health::Up => state.hosts[0].agent_pid = Some(pid),
                Health::Exited(log) => bail!("agent on {} exited:\n{log}", first.name),
            }
        }
        Health::Exited(log) => bail!("agent on {} exited:\n{log}", first.name),
    }
    let mut pids = Vec::new();
    for h in &state.hosts[1..] {
        pids.push(spawn_agent(h, &opts.binary, false)?);
    }
    for (h, pid) in state.hosts[1..].iter_mut().zip(&pids) {
        h.agent_pid = Some(*pid);
    }
    state.agents = Some(opts.clone());
    state.agent_mode = Some(if full { "full" } else { "flows-only" }.into());
    state.save()?;
    for (h, pid) in state.hosts[1..].iter().zip(pids) {
        if let Health::Exited(log) = wait_healthy(h, pid, Duration::from_secs(20))? {
            bail!("agent on {} exited:\n{log}", h.name);
        }
    }
    Ok(())
}

/// Starts the agent of host `h`; `coordinator` adds `--coordinator` (the
/// global policy's central planner, on the first host).
fn spawn_agent(h: &Host, binary: &Path, coordinator: bool) -> Result<u32> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&h.log)
        .with_context(|| format!("opening {}", h.log.display()))?;
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &h.name])
        .arg(binary)
        .arg("run")
        .arg("--config")
        .arg(&h.config)
        .args(coordinator.then_some("--coordinator"))
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        // Its own process group: a Ctrl-C at the terminal reaches xtask,
        // which tears down in order, not every agent at once.
        .process_group(0);
    close_inherited_fds(&mut cmd);
    let child = cmd
        .spawn()
        .with_context(|| format!("starting the agent in {}", h.name))?;
    // `ip netns exec` execs the agent: this PID is the agent's.
    Ok(child.id())
}

enum Health {
    Up,
    /// The agent exited; the tail of its log.
    Exited(String),
}

fn wait_healthy(h: &Host, pid: u32, timeout: Duration) -> Result<Health> {
    let addr: SocketAddr = AGENT_HTTP.parse()?;
    let deadline = Instant::now() + timeout;
    loop {
        if !alive(pid) {
            let log = fs::read_to_string(&h.log).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(15).collect();
            return Ok(Health::Exited(
                tail.into_iter().rev().collect::<Vec<_>>().join("\n"),
            ));
        }
        if netns::http_get(&h.name, addr, "/healthz")?.is_some() {
            return Ok(Health::Up);
        }
        if Instant::now() > deadline {
            bail!(
                "agent on {} did not serve /healthz within {timeout:?} (log: {})",
                h.name,
                h.log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether process `pid` runs (a zombie does not count, and is reaped if it
/// is our child).
pub fn alive(pid: u32) -> bool {
    let Ok(pid_t) = libc::pid_t::try_from(pid) else {
        return false;
    };
    // SAFETY: waitpid on a PID that may or may not be our child; WNOHANG.
    unsafe {
        let mut status = 0;
        libc::waitpid(pid_t, &mut status, libc::WNOHANG);
    }
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Sends `signal` to `pid` (ignoring a process already gone).
fn signal(pid: u32, sig: i32) {
    if let Ok(p) = libc::pid_t::try_from(pid) {
        // SAFETY: plain kill(2) on a PID we started.
        unsafe { libc::kill(p, sig) };
    }
}

/// Stops processes: SIGTERM, up to `grace` to exit, then SIGKILL.
pub fn stop_pids(pids: &[u32], grace: Duration) {
    for &p in pids {
        signal(p, libc::SIGTERM);
    }
    let deadline = Instant::now() + grace;
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    for &p in pids.iter().filter(|&&p| alive(p)) {
        signal(p, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while pids.iter().any(|&p| alive(p)) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let bpffs = Path::new(DIR).join("bpf");
    if is_bpffs(&bpffs) {
        crate::run(Command::new("umount").arg(&bpffs))?;
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
    })
}

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
    pub cost: Option<crate::measure::CostReport>,
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

/// Builds a [`StatusReport`] of the testbed that is up.
pub fn status_report(state: &State, with_cost: bool, ping: bool) -> Result<StatusReport> {
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
            agent_serving: agent_alive && netns::http_get(&h.name, addr, "/healthz")?.is_some(),
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
    let cost = if with_cost {
        Some(crate::measure::cost_report(state)?)
    } else {
        None
    };
    Ok(StatusReport {
        state_file: STATE_FILE,
        hosts,
        vms,
        cost,
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
                let ok = netns::http_get(&h.name, addr, "/healthz")?.is_some();
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
        let silent: Vec<String> = state
            .vms
            .iter()
            .zip(&answered)
            .filter(|(_, ok)| !**ok)
            .map(|(v, _)| v.address.to_string())
            .collect();
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

/// The topology of a state's blueprint, without reading the file (tests).
#[cfg(test)]
pub fn topology_of(state: &State) -> Result<score_core::topology::Topology> {
    let bp = Blueprint {
        switches: state.switches.clone(),
        hosts: state.hosts.clone(),
        vms: state.vms.clone(),
        links: Vec::new(),
    };
    Ok(score_core::topology::Topology::from_toml_str(
        &topology_toml(&bp)?,
    )?)
}

/// A state as `up` would write it, without making anything (tests).
#[cfg(test)]
pub fn planned_state(sizes: &Sizes) -> State {
    let bp = blueprint(sizes);
    State {
        version: 1,
        sizes: *sizes,
        topology_file: PathBuf::from(DIR).join("topology.toml"),
        key_file: PathBuf::from(DIR).join("cluster.key"),
        bpffs: PathBuf::from(DIR).join("bpf"),
        namespaces: Vec::new(),
        switches: bp.switches,
        hosts: bp.hosts,
        vms: bp.vms,
        agents: None,
        agent_mode: None,
        traffic: Vec::new(),
        setup_seconds: 0.0,
        guests: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blueprint_names_and_addresses() {
        let s = Sizes {
            pods: 2,
            racks_per_pod: 2,
            hosts_per_rack: 2,
            vms_per_host: 2,
            slots: 4,
        };
        let bp = blueprint(&s);
        assert_eq!(bp.switches.len(), 1 + 2 + 4);
        assert_eq!(bp.hosts.len(), 8);
        assert_eq!(bp.vms.len(), 16);
        assert_eq!(bp.hosts[0].address, Ipv4Addr::new(198, 18, 0, 1));
        assert_eq!(bp.hosts[7].rack, "dc-r4");
        assert_eq!(bp.hosts[7].pod, "dc-p2");
        assert_eq!(bp.vms[2].name, "dcvm-198.18.1.3");
        assert_eq!(bp.vms[2].mac, "02:00:c6:12:01:03");
        assert_eq!(bp.vms[2].vif, "vif3.0");
        assert_eq!(bp.vms[8].initial_host, "dc-h1");
        // Every namespace but the core has one uplink.
        assert_eq!(bp.links.len(), 2 + 4 + 8);
    }

    #[test]
    fn topology_is_what_score_core_reads() {
        let s = Sizes {
            pods: 2,
            racks_per_pod: 3,
            hosts_per_rack: 2,
            vms_per_host: 1,
            slots: 2,
        };
        let bp = blueprint(&s);
        let t =
            score_core::topology::Topology::from_toml_str(&topology_toml(&bp).unwrap()).unwrap();
        assert_eq!(t.host_count(), 12);
        assert_eq!(t.depth(), 3);
        let id = |i: u8| t.host_by_addr(Ipv4Addr::new(198, 18, 0, i)).unwrap();
        assert_eq!(t.level(id(1), id(2)), 1);
        assert_eq!(t.level(id(1), id(3)), 2);
        assert_eq!(t.level(id(1), id(7)), 3);
        // Host i of the state is host i of the topology.
        assert_eq!(id(5), 4);
    }

    #[test]
    fn real_guests_rates_peers_and_agent_config() {
        // 1442-byte frames carry 1400 bytes of iperf3 payload.
        assert_eq!(guest_rate(1442 * 100), 1400 * 100 * 8);
        let s = Sizes {
            pods: 2,
            racks_per_pod: 1,
            hosts_per_rack: 2,
            vms_per_host: 2,
            slots: 4,
        };
        let mut state = planned_state(&s);
        let flows = crate::traffic::plan(
            &state,
            &crate::traffic::Rates {
                pattern: crate::traffic::Pattern::Pairs,
                group_size: 4,
                chatty: 200_000,
                background: 0,
                background_peers: 0,
            },
        );
        let v1 = state.vms[0].address;
        let arg = peers_arg(v1, &flows).unwrap();
        // VM 1 (dc-h1, pod 1) chats with VM 3 (dc-h3, pod 2).
        assert_eq!(
            arg,
            format!("score.peers=198.18.1.3:{}", guest_rate(200_000))
        );
        assert_eq!(peers_arg(v1, &[]), None);
        state.guests = Some(QemuGuests {
            dir: PathBuf::from(QEMU_DIR),
            launcher: PathBuf::from("/x/qemu-vm"),
            memory_mib: GUEST_MEMORY_MIB,
            boot_seconds: 0.0,
        });
        let c = agent_config(&state, &state.hosts[1], "distributed", "1s", true);
        for line in [
            "vm_memory_mib = 256",
            "memory_mib = 1024",
            "kind = \"qemu\"",
            "qmp_sockets = \"/run/score-testbed/qemu/dc-h2/*.qmp\"",
            "incoming_helper = [\"/x/qemu-vm\", \"--dir\", \"/run/score-testbed/qemu\", \"incoming\"]",
            "\"198.18.0.4\" = \"dc-h4\"",
        ] {
            assert!(c.lines().any(|l| l == line), "{line} missing:\n{c}");
        }
        assert!(!c.contains("netns"), "{c}");
        // The state file of a testbed without guests still reads.
        let mut json: serde_json::Value = serde_json::to_value(planned_state(&s)).unwrap();
        json.as_object_mut().unwrap().remove("guests");
        let old: State = serde_json::from_value(json).unwrap();
        assert!(old.guests.is_none());
        assert_eq!(old.vm_memory_mib(), VM_MEMORY_MIB);
    }

    #[test]
    fn our_namespace_names() {
        for n in ["dc-core", "dc-p1", "dc-r12", "dc-h3", "dcvm-198.18.1.4"] {
            assert!(is_ours(n), "{n}");
        }
        for n in ["dc-hx", "dc-", "score-test", "dc-p"] {
            assert!(!is_ours(n), "{n}");
        }
    }
}
