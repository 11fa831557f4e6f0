//! The distributed half of the configuration: this host's identity and
//! capacity (`[node]`), the data-centre tree (`[topology]`), the peer
//! protocol (`[peer]`) and the token policy and decision rule (`[policy]`).
//! Validated, with the topology and the cluster key read and checked, before
//! anything is bound: a bad file or a key readable by others ends the agent
//! with one line.

use std::{
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use score_core::{
    decision::{MigrationCost, Rule},
    migcost::EstimatorConfig,
    policy::PolicyKind,
    swap::{CandidateSet, Scope},
    topology::{HostId, Topology},
    wire::ClusterKey,
};
use serde::Deserialize;

use crate::config::ConfigError;

fn invalid(key: &str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        reason: reason.into(),
    }
}

/// `[node]`: this hypervisor host.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeConfig {
    /// This host's address (its dom0 address); must be a host of the topology.
    pub address: Ipv4Addr,
    /// How many VMs this host can run.
    pub vm_slots: u32,
    /// Memory for VMs, MiB.
    pub memory_mib: u64,
    /// Memory of one VM, MiB (the paper's VMs are 1 GB).
    #[serde(default = "defaults::vm_memory_mib")]
    pub vm_memory_mib: u64,
    /// VMs this host may run above `vm_slots` while a swap is under way
    /// (docs/EVALUATION.md). A live migration reserves the incoming VM's memory on
    /// the target before the source lets go of it, so when two full hosts
    /// exchange VMs, one of them holds both for the time of a migration:
    /// `memory_mib` must have room for `vm_slots + migration_headroom` VMs.
    /// 0 (the default) never overcommits; a swap then needs the other host
    /// to have the headroom.
    #[serde(default)]
    pub migration_headroom: u32,
}

/// `[topology]`: where the data-centre tree is described.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopologyConfig {
    /// A score-core topology file (TOML, or JSON if it ends in `.json`).
    pub file: PathBuf,
}

/// `[peer]`: the peer protocol.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerConfig {
    /// UDP port of the protocol, on every host and (intercepted) every VM.
    #[serde(default = "defaults::port")]
    pub port: u16,
    /// File holding the cluster key (at least 16 bytes); must not be
    /// readable or writable by group or others. Datagrams are sealed with it.
    pub key_file: PathBuf,
    /// Files of other cluster keys, still accepted (never used to send)
    /// for `previous_keys_for` after the agent starts: a cluster rotates
    /// its key without a stop by restarting each agent with the new key
    /// here, then each again with the new `key_file` and the old key here
    /// (docs/WIRE.md, "Keys and their rotation").
    #[serde(default)]
    pub previous_key_files: Vec<PathBuf>,
    /// How long after the start the previous keys are accepted.
    #[serde(default = "defaults::previous_keys_for", with = "humantime_serde")]
    pub previous_keys_for: Duration,
    /// Oldest datagram accepted (by the send time it carries), and the
    /// largest clock lead of a sender tolerated: must cover the clock skew
    /// between hosts and the network delay.
    #[serde(default = "defaults::max_datagram_age", with = "humantime_serde")]
    pub max_datagram_age: Duration,
    /// Directory for the state that must survive a restart: this host's
    /// incarnation counter (one file per host address).
    #[serde(default = "defaults::state_dir")]
    pub state_dir: PathBuf,
    /// How long to wait for a hop acknowledgement before resending.
    #[serde(default = "defaults::hop_timeout", with = "humantime_serde")]
    pub hop_timeout: Duration,
    /// Resends of a token hop before its VM is skipped.
    #[serde(default = "defaults::hop_retries")]
    pub hop_retries: u32,
    /// How long to wait for a location or capacity answer.
    #[serde(default = "defaults::request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// With no sign of the token for this long, it is taken as lost.
    #[serde(default = "defaults::token_timeout", with = "humantime_serde")]
    pub token_timeout: Duration,
    /// The lowest-addressed hosts of the topology that watch for token loss
    /// and regenerate it (the lowest one still answering does).
    #[serde(default = "defaults::watchers")]
    pub watchers: u32,
    /// How often this host reports its VMs' flows to the watchers (and the
    /// coordinator).
    #[serde(default = "defaults::report_interval", with = "humantime_serde")]
    pub report_interval: Duration,
    /// The global policy's coordinator: the host at this address collects
    /// every host's flow reports and sends the token order (the same value
    /// on every host; `score-agent run --coordinator` on a host without it
    /// makes that host the coordinator). Needed by the global policy.
    #[serde(default)]
    pub coordinator: Option<Ipv4Addr>,
}

/// The migration cost c_m as written in the file: a number (absolute, in
/// rate × weight units), a percentage of the VM's current cost ("10%"), or
/// the migration's own traffic repaid within a horizon ("traffic/10m",
/// docs/EVALUATION.md "A migration cost from measurements"), learnt from
/// the migrations this host makes.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum MigrationCostSetting {
    /// Absolute c_m.
    Absolute(f64),
    /// "N%" of the deciding VM's cost.
    Text(String),
}

impl Default for MigrationCostSetting {
    fn default() -> Self {
        MigrationCostSetting::Absolute(0.0)
    }
}

impl MigrationCostSetting {
    /// c_m before any migration was seen; a traffic c_m starts from a VM's
    /// whole memory (`vm_memory_mib`) sent once.
    fn resolve(&self, vm_memory_mib: u64) -> Result<MigrationCost, ConfigError> {
        match self {
            MigrationCostSetting::Absolute(a) if a.is_finite() && *a >= 0.0 => {
                Ok(MigrationCost::Absolute(*a))
            }
            MigrationCostSetting::Absolute(a) => Err(invalid(
                "policy.migration_cost",
                format!("{a} is not a finite number >= 0"),
            )),
            MigrationCostSetting::Text(t) if t.starts_with("traffic/") => {
                let horizon = humantime::parse_duration(&t["traffic/".len()..])
                    .ok()
                    .filter(|h| !h.is_zero())
                    .ok_or_else(|| {
                        invalid(
                            "policy.migration_cost",
                            format!("{t:?}: expected \"traffic/\" and a horizon above 0 (\"traffic/10m\")"),
                        )
                    })?;
                Ok(MigrationCost::Traffic {
                    bytes: EstimatorConfig::default().prior_ratio
                        * (vm_memory_mib as f64)
                        * 1_048_576.0,
                    horizon_s: horizon.as_secs_f64(),
                })
            }
            MigrationCostSetting::Text(t) => {
                let pct = t
                    .strip_suffix('%')
                    .and_then(|n| n.trim().parse::<f64>().ok())
                    .filter(|p| p.is_finite() && *p >= 0.0)
                    .ok_or_else(|| {
                        invalid(
                            "policy.migration_cost",
                            format!("{t:?}: expected a number, \"N%\" or \"traffic/HORIZON\""),
                        )
                    })?;
                Ok(MigrationCost::FractionOfVmCost(pct / 100.0))
            }
        }
    }
}

/// `[policy]`: who gets the token next and how a holder decides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// round-robin, global, distributed or load-aware (paper §II).
    #[serde(default = "defaults::policy")]
    pub kind: PolicyKind,
    /// paper-first (the paper's rule) or best-benefit.
    #[serde(default)]
    pub rule: Rule,
    /// c_m of equation 2.
    #[serde(default)]
    pub migration_cost: MigrationCostSetting,
    /// With a traffic c_m: the rate a migration streams at, bytes/s, to
    /// turn a migration's duration into the bytes it sent (the backends
    /// report only the time).
    #[serde(default = "defaults::migration_link_bytes_per_second")]
    pub migration_link_bytes_per_second: f64,
    /// A VM migrates at most once per this time (no oscillation).
    #[serde(default = "defaults::hold_down", with = "humantime_serde")]
    pub hold_down: Duration,
    /// The least time a holder keeps the token (the paper: seconds to hours).
    #[serde(default = "defaults::token_hold", with = "humantime_serde")]
    pub token_hold: Duration,
    /// Peers exchanging less than this (bytes/s, both directions) are ignored.
    #[serde(default)]
    pub min_rate: f64,
    /// Candidate destinations (docs/EVALUATION.md): paper (the hosts of the VM's
    /// peers), peer-racks, peer-pods or all.
    #[serde(default)]
    pub candidates: CandidateSet,
    /// Whether a full candidate is asked to exchange a VM (docs/EVALUATION.md); off,
    /// this host neither proposes nor accepts swaps: the paper's rule.
    #[serde(default)]
    pub swaps: bool,
    /// Most swap proposals in one decision (absent: one per candidate).
    #[serde(default)]
    pub max_swap_asks: Option<u32>,
    /// How long the proposer of an accepted swap waits for the partner's
    /// migration to end before reporting the swap half done; bound it by
    /// the backend's own migration time-out.
    #[serde(default = "defaults::swap_timeout", with = "humantime_serde")]
    pub swap_timeout: Duration,
    /// Ejection chains when the decision lets a VM stay (docs/PROTOCOL.md);
    /// off, this host neither proposes nor accepts them: the paper's rule.
    #[serde(default)]
    pub chains: bool,
    /// Rotations when a VM would still stay (docs/PROTOCOL.md,
    /// "Rotations"): three VMs on three full hosts move in a cycle; off,
    /// this host neither proposes nor accepts them: the paper's rule.
    /// The two asked hosts each need `node.migration_headroom`.
    #[serde(default)]
    pub rotations: bool,
    /// Group moves when a VM would still stay (docs/PROTOCOL.md, "Group
    /// moves"): the VM and the VMs it talks to on this host move together
    /// into a rack near their peers, each destination reserving their
    /// slots first. Off, this host proposes none (it still reserves slots
    /// for another host's group move, as it answers capacity requests).
    #[serde(default)]
    pub groups: bool,
    /// c_m's factor per token round (docs/PROTOCOL.md, "A c_m that decays
    /// over the rounds"); 1: constant, the paper's.
    #[serde(default = "defaults::cm_decay")]
    pub cm_decay: f64,
    /// The decay's floor, a fraction of the first round's c_m.
    #[serde(default)]
    pub cm_floor: f64,
}

impl PolicyConfig {
    /// Candidates and swaps, as score-core takes them.
    pub fn scope(&self) -> Scope {
        Scope {
            candidates: self.candidates,
            swaps: self.swaps,
            max_swap_asks: self.max_swap_asks,
        }
    }
}

impl Default for PolicyConfig {
    fn default() -> Self {
        PolicyConfig {
            kind: defaults::policy(),
            rule: Rule::default(),
            migration_cost: MigrationCostSetting::default(),
            migration_link_bytes_per_second: defaults::migration_link_bytes_per_second(),
            hold_down: defaults::hold_down(),
            token_hold: defaults::token_hold(),
            min_rate: 0.0,
            candidates: CandidateSet::default(),
            swaps: false,
            max_swap_asks: None,
            swap_timeout: defaults::swap_timeout(),
            chains: false,
            rotations: false,
            groups: false,
            cm_decay: defaults::cm_decay(),
            cm_floor: 0.0,
        }
    }
}

mod defaults {
    use std::time::Duration;

    use score_core::policy::PolicyKind;

    pub fn vm_memory_mib() -> u64 {
        1024
    }
    pub fn port() -> u16 {
        7760
    }
    pub fn cm_decay() -> f64 {
        1.0
    }
    pub fn migration_link_bytes_per_second() -> f64 {
        score_core::migcost::EstimatorConfig::default().link_bytes_per_s
    }
    pub fn hop_timeout() -> Duration {
        Duration::from_millis(300)
    }
    pub fn hop_retries() -> u32 {
        5
    }
    pub fn request_timeout() -> Duration {
        Duration::from_millis(500)
    }
    pub fn token_timeout() -> Duration {
        Duration::from_secs(15)
    }
    pub fn watchers() -> u32 {
        2
    }
    pub fn report_interval() -> Duration {
        Duration::from_secs(2)
    }
    pub fn policy() -> PolicyKind {
        PolicyKind::Distributed
    }
    pub fn hold_down() -> Duration {
        Duration::from_secs(60)
    }
    pub fn token_hold() -> Duration {
        Duration::from_secs(1)
    }
    pub fn swap_timeout() -> Duration {
        Duration::from_secs(600)
    }
    pub fn previous_keys_for() -> Duration {
        Duration::from_secs(3600)
    }
    pub fn max_datagram_age() -> Duration {
        Duration::from_secs(30)
    }
    pub fn state_dir() -> std::path::PathBuf {
        "/var/lib/score-agent".into()
    }
}

/// Everything the peer protocol needs, checked and loaded.
#[derive(Debug)]
pub struct ClusterSettings {
    /// This host.
    pub node: NodeConfig,
    /// This host in the topology.
    pub me: HostId,
    /// The data-centre tree.
    pub topology: Arc<Topology>,
    /// The cluster key, to seal and verify.
    pub key: ClusterKey,
    /// Earlier keys, verified only, for `peer.previous_keys_for`.
    pub previous_keys: Vec<ClusterKey>,
    /// The peer protocol settings.
    pub peer: PeerConfig,
    /// The policy settings.
    pub policy: PolicyConfig,
    /// c_m, resolved.
    pub migration_cost: MigrationCost,
    /// The watcher hosts, lowest address first.
    pub watchers: Vec<Ipv4Addr>,
    /// Whether this agent is the global policy's coordinator (its address
    /// is `peer.coordinator`, or it was started with `--coordinator`).
    pub coordinator: bool,
}

/// Reads the key file, refusing one that group or others may read.
pub fn read_key(path: &Path) -> Result<ClusterKey, ConfigError> {
    read_key_for("peer.key_file", path)
}

/// [`read_key`], naming `field` in its errors.
fn read_key_for(field: &str, path: &Path) -> Result<ClusterKey, ConfigError> {
    let meta =
        std::fs::metadata(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        return Err(invalid(
            field,
            format!(
                "{} is accessible by group or others (mode {:o}); chmod 600 it",
                path.display(),
                mode & 0o777
            ),
        ));
    }
    let bytes =
        std::fs::read(path).map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
    ClusterKey::new(&bytes).map_err(|e| invalid(field, format!("{}: {e}", path.display())))
}

/// Reads and parses a topology file.
pub fn read_topology(path: &Path) -> Result<Topology, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| invalid("topology.file", format!("{}: {e}", path.display())))?;
    let parsed = if path.extension().is_some_and(|e| e == "json") {
        Topology::from_json_str(&text)
    } else {
        Topology::from_toml_str(&text)
    };
    parsed.map_err(|e| {
        invalid(
            "topology.file",
            format!("{}: {e}", path.display()).replace('\n', " "),
        )
    })
}

impl ClusterSettings {
    /// Checks the distributed tables together: all of `[node]`, `[topology]`
    /// and `[peer]` are needed; files are read here.
    pub fn resolve(
        node: &NodeConfig,
        topology: &TopologyConfig,
        peer: &PeerConfig,
        policy: &PolicyConfig,
        coordinator: bool,
    ) -> Result<Self, ConfigError> {
        if node.vm_slots == 0 {
            return Err(invalid("node.vm_slots", "must be at least 1"));
        }
        if node.vm_memory_mib == 0 || node.vm_memory_mib > node.memory_mib {
            return Err(invalid(
                "node.vm_memory_mib",
                "must be between 1 and node.memory_mib",
            ));
        }
        let with_headroom = u64::from(node.vm_slots) + u64::from(node.migration_headroom);
        if with_headroom.saturating_mul(node.vm_memory_mib) > node.memory_mib
            && node.migration_headroom > 0
        {
            return Err(invalid(
                "node.migration_headroom",
                format!(
                    "{} VMs above vm_slots need {} MiB in all, memory_mib is {}: the \
                     incoming VM's memory is reserved before the outgoing one leaves",
                    node.migration_headroom,
                    with_headroom.saturating_mul(node.vm_memory_mib),
                    node.memory_mib
                ),
            ));
        }
        if policy.swap_timeout.is_zero() {
            return Err(invalid("policy.swap_timeout", "must be greater than zero"));
        }
        if policy.max_swap_asks == Some(0) && policy.swaps {
            return Err(invalid(
                "policy.max_swap_asks",
                "0 with swaps = true asks no host: set swaps = false instead",
            ));
        }
        if peer.port == 0 {
            return Err(invalid("peer.port", "must not be 0"));
        }
        for (key, d) in [
            ("peer.hop_timeout", peer.hop_timeout),
            ("peer.request_timeout", peer.request_timeout),
            ("peer.token_timeout", peer.token_timeout),
            ("peer.report_interval", peer.report_interval),
            ("peer.max_datagram_age", peer.max_datagram_age),
        ] {
            if d.is_zero() {
                return Err(invalid(key, "must be greater than zero"));
            }
        }
        if peer.watchers == 0 {
            return Err(invalid(
                "peer.watchers",
                "at least one host must watch for token loss",
            ));
        }
        let worst_hop = peer.hop_timeout * (peer.hop_retries + 1);
        if peer.token_timeout <= policy.token_hold + worst_hop {
            return Err(invalid(
                "peer.token_timeout",
                format!(
                    "{:?} must exceed policy.token_hold plus a hop's retries ({:?})",
                    peer.token_timeout,
                    policy.token_hold + worst_hop
                ),
            ));
        }
        if !(policy.min_rate.is_finite() && policy.min_rate >= 0.0) {
            return Err(invalid("policy.min_rate", "must be a finite number >= 0"));
        }
        if !(policy.cm_decay.is_finite() && policy.cm_decay > 0.0 && policy.cm_decay <= 1.0) {
            return Err(invalid(
                "policy.cm_decay",
                format!("{} is not a factor in (0, 1]", policy.cm_decay),
            ));
        }
        if !(0.0..=1.0).contains(&policy.cm_floor) {
            return Err(invalid(
                "policy.cm_floor",
                format!("{} is not a fraction in [0, 1]", policy.cm_floor),
            ));
        }
        let migration_cost = policy.migration_cost.resolve(node.vm_memory_mib)?;
        let link = policy.migration_link_bytes_per_second;
        if !(link.is_finite() && link > 0.0) {
            return Err(invalid(
                "policy.migration_link_bytes_per_second",
                format!("{link} is not a finite rate above 0"),
            ));
        }
        let topo = read_topology(&topology.file)?;
        let me = topo.host_by_addr(node.address).ok_or_else(|| {
            invalid(
                "node.address",
                format!("{} is not a host of the topology", node.address),
            )
        })?;
        if policy.kind == PolicyKind::Global && peer.coordinator.is_none() && !coordinator {
            return Err(invalid(
                "peer.coordinator",
                "the global policy needs a coordinator address",
            ));
        }
        if let Some(c) = peer.coordinator
            && topo.host_by_addr(c).is_none()
        {
            return Err(invalid(
                "peer.coordinator",
                format!("{c} is not a host of the topology"),
            ));
        }
        // The coordinator is the host at `peer.coordinator`; `--coordinator`
        // names this host, so it must not contradict the file.
        if coordinator
            && let Some(c) = peer.coordinator
            && c != node.address
        {
            return Err(invalid(
                "peer.coordinator",
                format!(
                    "{c} is the coordinator, but this host ({}) was started with --coordinator",
                    node.address
                ),
            ));
        }
        let key = read_key(&peer.key_file)?;
        let previous_keys = peer
            .previous_key_files
            .iter()
            .map(|p| read_key_for("peer.previous_key_files", p))
            .collect::<Result<Vec<_>, _>>()?;
        let mut hosts: Vec<Ipv4Addr> = (0..topo.host_count()).map(|h| topo.host_addr(h)).collect();
        hosts.sort();
        let watchers = hosts.into_iter().take(peer.watchers as usize).collect();
        Ok(ClusterSettings {
            node: node.clone(),
            me,
            topology: Arc::new(topo),
            key,
            previous_keys,
            peer: peer.clone(),
            policy: policy.clone(),
            migration_cost,
            watchers,
            coordinator: coordinator || peer.coordinator == Some(node.address),
        })
    }

    /// Every host address of the topology.
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + '_ {
        (0..self.topology.host_count()).map(|h| self.topology.host_addr(h))
    }

    /// Whether this host watches for token loss.
    pub fn is_watcher(&self) -> bool {
        self.watchers.contains(&self.node.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_cost_forms() {
        assert_eq!(
            MigrationCostSetting::Absolute(3.0).resolve(256).unwrap(),
            MigrationCost::Absolute(3.0)
        );
        assert_eq!(
            MigrationCostSetting::Text("10%".into())
                .resolve(256)
                .unwrap(),
            MigrationCost::FractionOfVmCost(0.1)
        );
        for bad in ["10", "x%", "-5%"] {
            let e = MigrationCostSetting::Text(bad.into())
                .resolve(256)
                .unwrap_err()
                .to_string();
            assert!(e.contains("policy.migration_cost"), "{e}");
        }
        assert!(
            MigrationCostSetting::Absolute(f64::NAN)
                .resolve(256)
                .is_err()
        );
        assert_eq!(
            MigrationCostSetting::Text("traffic/10m".into())
                .resolve(256)
                .unwrap(),
            MigrationCost::Traffic {
                bytes: 256.0 * 1_048_576.0,
                horizon_s: 600.0,
            }
        );
        for bad in ["traffic/", "traffic/0s", "traffic/soon"] {
            let e = MigrationCostSetting::Text(bad.into())
                .resolve(256)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("policy.migration_cost") && e.contains("traffic/10m"),
                "{e}"
            );
        }
    }

    fn tables(
        headroom: u32,
        policy: &str,
    ) -> (NodeConfig, TopologyConfig, PeerConfig, PolicyConfig) {
        let node: NodeConfig = toml::from_str(&format!(
            "address = \"10.0.0.1\"\nvm_slots = 2\nmemory_mib = 1024\nvm_memory_mib = 256\n\
             migration_headroom = {headroom}\n"
        ))
        .unwrap();
        let topo = TopologyConfig {
            file: "/nonexistent/topology.toml".into(),
        };
        let peer: PeerConfig = toml::from_str("key_file = \"/nonexistent/key\"\n").unwrap();
        let policy: PolicyConfig = toml::from_str(policy).unwrap();
        (node, topo, peer, policy)
    }

    fn resolve_error(headroom: u32, policy: &str) -> String {
        let (n, t, p, pol) = tables(headroom, policy);
        ClusterSettings::resolve(&n, &t, &p, &pol, false)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn swap_keys_default_to_the_paper_and_are_checked() {
        let (n, _, _, pol) = tables(0, "");
        assert_eq!(n.migration_headroom, 0);
        assert_eq!(pol.scope(), Scope::PAPER);
        assert_eq!(pol.swap_timeout, Duration::from_secs(600));
        let (_, _, _, pol) = tables(
            0,
            "candidates = \"peer-racks\"\nswaps = true\nmax_swap_asks = 3\nswap_timeout = \"2m\"\n",
        );
        assert_eq!(
            pol.scope(),
            Scope {
                candidates: CandidateSet::PeerRacks,
                swaps: true,
                max_swap_asks: Some(3),
            }
        );
        assert!(toml::from_str::<PolicyConfig>("candidates = \"racks\"\n").is_err());
        // Two slots of 256 MiB plus two of headroom fill 1024 MiB exactly;
        // a third is refused, with the reason.
        let e = resolve_error(2, "");
        assert!(e.contains("topology.file"), "headroom 2 fits: {e}");
        let e = resolve_error(3, "");
        assert!(
            e.contains("node.migration_headroom") && e.contains("reserved before"),
            "{e}"
        );
        let e = resolve_error(1, "swap_timeout = \"0s\"\n");
        assert!(e.contains("policy.swap_timeout"), "{e}");
        let e = resolve_error(1, "swaps = true\nmax_swap_asks = 0\n");
        assert!(e.contains("policy.max_swap_asks"), "{e}");
        // Chains and a decaying c_m: off and constant by default, checked.
        assert!(!pol.chains && !pol.rotations && !pol.groups);
        assert!(pol.cm_decay == 1.0 && pol.cm_floor == 0.0);
        let (_, _, _, pol) = tables(
            0,
            "chains = true\nrotations = true\ngroups = true\ncm_decay = 0.5\ncm_floor = 0.003\n",
        );
        assert!(pol.chains && pol.rotations && pol.groups);
        assert!(pol.cm_decay == 0.5 && pol.cm_floor == 0.003);
        let e = resolve_error(1, "cm_decay = 0.0\n");
        assert!(e.contains("policy.cm_decay"), "{e}");
        let e = resolve_error(1, "cm_floor = 2.0\n");
        assert!(e.contains("policy.cm_floor"), "{e}");
    }

    /// The coordinator is whoever `peer.coordinator` names; `--coordinator`
    /// names this host and must agree with the file.
    #[test]
    fn the_coordinator_follows_the_configured_address() {
        let dir = tempfile::tempdir().unwrap();
        let topo_file = dir.path().join("topology.toml");
        std::fs::write(
            &topo_file,
            "regular = { fanout = [2, 2], first_host = \"10.0.0.1\" }\n",
        )
        .unwrap();
        let key_file = dir.path().join("key");
        std::fs::write(&key_file, (1..=32u8).collect::<Vec<u8>>()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let (n, mut t, _, pol) = tables(0, "kind = \"global\"\n");
        t.file = topo_file;
        let peer = |c: &str| -> PeerConfig {
            toml::from_str(&format!("key_file = {key_file:?}\n{c}")).unwrap()
        };
        let resolve = |p: &PeerConfig, flag: bool| ClusterSettings::resolve(&n, &t, p, &pol, flag);
        let here = peer("coordinator = \"10.0.0.1\"\n");
        let there = peer("coordinator = \"10.0.0.2\"\n");
        let none = peer("");
        assert!(resolve(&here, false).unwrap().coordinator);
        assert!(resolve(&here, true).unwrap().coordinator);
        assert!(!resolve(&there, false).unwrap().coordinator);
        assert!(resolve(&none, true).unwrap().coordinator);
        let e = resolve(&there, true).unwrap_err().to_string();
        assert!(
            e.contains("peer.coordinator") && e.contains("--coordinator"),
            "{e}"
        );
        let e = resolve(&none, false).unwrap_err().to_string();
        assert!(e.contains("needs a coordinator"), "{e}");
    }

    #[test]
    fn key_file_must_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        std::fs::write(&path, (1..=32u8).collect::<Vec<u8>>()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_key(&path).unwrap_err().to_string();
        assert!(
            e.contains("peer.key_file") && e.contains("chmod 600"),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(read_key(&path).is_ok());
        std::fs::write(&path, [1u8, 2, 3, 4]).unwrap();
        assert!(read_key(&path).is_err(), "a 4-byte key is too short");
    }
}
