//! The state file of a test bed that is up: everything `up` made (the
//! namespaces, the plan, the topology, key and bpffs, the agents and
//! traffic started since), which `status`, `down`, the demo and tests read.

use std::{fs, path::PathBuf};

use anyhow::{Context as _, Result};
use score_core::{cost::Placement, topology::HostId};
use serde::{Deserialize, Serialize};

use crate::{
    config::AgentOptions,
    guests::{QemuGuests, VM_MEMORY_MIB},
    plan::{Host, Sizes, Switch, Vm, blueprint},
    sysctl::Setting,
};

/// Directory of everything the testbed writes (configs, key, logs, bpffs).
pub const DIR: &str = "/run/score-testbed";

/// The state file: JSON of [`State`].
pub const STATE_FILE: &str = "/run/score-testbed/state.json";

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
    /// The host's settings `up` raised (neighbour-table limits), which
    /// `down` puts back.
    #[serde(default)]
    pub settings: Vec<Setting>,
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

    /// Where every VM was set up (VM i on its initial host), as score-core
    /// places them (host index = position in `hosts` = topology host ID).
    pub fn initial_placement(&self) -> Result<Placement> {
        let hosts = self
            .vms
            .iter()
            .map(|v| self.host_index(&v.initial_host).unwrap_or(0) as HostId)
            .collect();
        Ok(Placement::new(self.hosts.len() as u32, hosts)?)
    }

    /// Memory of one VM as the agents announce it.
    pub fn vm_memory_mib(&self) -> u32 {
        self.guests.as_ref().map_or(VM_MEMORY_MIB, |g| g.memory_mib)
    }
}

/// A state as `up` would write it, without making anything.
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
        settings: Vec::new(),
    }
}
