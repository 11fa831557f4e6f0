//! The address plan of the emulated data centre: its shape ([`Sizes`]),
//! the names and addresses of its switches, hosts and VMs, the `ip -batch`
//! lines that build each namespace, and the topology file the agents read.
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

use std::{
    net::Ipv4Addr,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::state::DIR;

/// Where every agent serves /flows and /metrics, inside its host namespace.
pub const AGENT_HTTP: &str = "127.0.0.1:9464";

/// Prefix of VM namespace names; the rest is the VM's IPv4 address (the
/// agent's netns backend finds a VM's namespace this way).
pub const VM_NETNS_PREFIX: &str = "dcvm-";

/// First address of the hosts (host i is `HOST_BASE + i`, i from 1).
pub const HOST_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);

/// First address of the VMs (VM k is `VM_BASE + k`, k from 1).
pub const VM_BASE: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 0);

/// Prefix length of the one flat network (198.18.0.0/15, RFC 2544's
/// benchmarking range, only inside our namespaces).
pub const PREFIX_LEN: u8 = 15;

/// Link weights c_1..c_3 of the tree: the paper's e^0, e^1, e^3 truncated to
/// our depth of 3, as score-core writes them.
pub const WEIGHTS: [f64; 3] = [
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

    pub fn validate(&self) -> Result<()> {
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

/// The namespaces of one data centre, before any is made.
pub(crate) struct Blueprint {
    pub(crate) switches: Vec<Switch>,
    pub(crate) hosts: Vec<Host>,
    pub(crate) vms: Vec<Vm>,
    /// Every link between switches and hosts: (parent namespace, name of
    /// the veth end on the parent's side, child namespace). The child's end
    /// is always `uplink`.
    pub(crate) links: Vec<(String, String, String)>,
}

pub(crate) fn blueprint(s: &Sizes) -> Blueprint {
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
pub(crate) fn batches(bp: &Blueprint, vm_namespaces: bool) -> Vec<(String, Vec<String>)> {
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
pub(crate) fn topology_toml(bp: &Blueprint) -> Result<String> {
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

/// Every namespace name this testbed uses, whatever the state file says:
/// what `down` sweeps when the state is lost.
pub fn is_ours(ns: &str) -> bool {
    ns == "dc-core"
        || ns.starts_with(VM_NETNS_PREFIX)
        || ["dc-p", "dc-r", "dc-h"]
            .iter()
            .any(|p| ns.strip_prefix(p).is_some_and(|n| n.parse::<u32>().is_ok()))
}

/// The topology of a state's blueprint, without reading the file.
pub fn topology_of(state: &crate::state::State) -> Result<score_core::topology::Topology> {
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
    fn our_namespace_names() {
        for n in ["dc-core", "dc-p1", "dc-r12", "dc-h3", "dcvm-198.18.1.4"] {
            assert!(is_ours(n), "{n}");
        }
        for n in ["dc-hx", "dc-", "score-test", "dc-p"] {
            assert!(!is_ours(n), "{n}");
        }
    }
}
