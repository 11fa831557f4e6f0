//! A simulation scenario: the data centre (topology, host capacity), the VMs,
//! the traffic model, the migration rule and cost, the policies to run, the
//! baselines and the seed. Read from TOML (every field has the paper's
//! default, unknown fields are refused) and checked before anything runs.

use std::net::Ipv4Addr;

use score_core::decision::{MigrationCost, Rule};
use score_core::policy::PolicyKind;
use score_core::swap::Scope;
use score_core::topology::{PAPER_FANOUT, RegularSpec, Topology, TopologyError, TopologySpec};
use serde::{Deserialize, Serialize};

use crate::traffic::{TrafficError, TrafficParams};

/// Errors from reading or checking a scenario.
#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    /// The TOML text is not a valid scenario.
    #[error("cannot parse scenario: {0}")]
    Parse(String),
    /// The topology is invalid.
    #[error("bad topology: {0}")]
    Topology(#[from] TopologyError),
    /// The traffic parameters are invalid.
    #[error("bad traffic model: {0}")]
    Traffic(#[from] TrafficError),
    /// More VMs than the hosts can hold (slots or memory).
    #[error(
        "{vms} VMs of {vm_mem_mb} MB do not fit {hosts} hosts of {slots} slots and {host_mem_mb} MB"
    )]
    TooManyVms {
        /// VMs asked for.
        vms: u32,
        /// Memory of one VM.
        vm_mem_mb: u64,
        /// Hosts in the topology.
        hosts: u32,
        /// VM slots per host.
        slots: u32,
        /// Memory per host.
        host_mem_mb: u64,
    },
    /// A numeric field is out of range.
    #[error("{name} = {value}: {why}")]
    BadValue {
        /// Field name.
        name: &'static str,
        /// Value given.
        value: f64,
        /// The allowed range.
        why: &'static str,
    },
    /// No policy to run.
    #[error("no policy to run: list at least one in `policies`")]
    NoPolicy,
}

/// What c_m is measured in.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind", content = "value")]
pub enum MigrationCostSpec {
    /// An absolute threshold, in cost units (rate x weight).
    Absolute(f64),
    /// A fraction of the deciding VM's own current cost C(u) (eq. 1's inner
    /// sum for u). This is how the paper's Fig. 2c percentages are read; see
    /// docs/EVALUATION.md.
    VmFraction(f64),
    /// A fraction of the whole data centre's initial cost C^A, fixed when
    /// the run starts: the literal reading of "c_m = 10% of overall
    /// communication cost".
    TotalFraction(f64),
    /// A fraction of the mean VM cost C^A / |V| at the start, fixed when the
    /// run starts.
    MeanVmFraction(f64),
    /// The migration's own traffic repaid within a horizon (score-core's
    /// `MigrationCost::Traffic`): `bytes` sent per migration, `horizon_s`
    /// seconds; the value of a sweep is the horizon.
    Traffic {
        /// Bytes one migration sends.
        bytes: f64,
        /// Seconds within which a move must repay them.
        horizon_s: f64,
    },
}

impl MigrationCostSpec {
    /// The fraction or absolute value given.
    pub fn value(self) -> f64 {
        match self {
            MigrationCostSpec::Absolute(v)
            | MigrationCostSpec::VmFraction(v)
            | MigrationCostSpec::TotalFraction(v)
            | MigrationCostSpec::MeanVmFraction(v) => v,
            MigrationCostSpec::Traffic { horizon_s, .. } => horizon_s,
        }
    }

    /// The same reading with another value.
    pub fn with_value(self, v: f64) -> Self {
        match self {
            MigrationCostSpec::Absolute(_) => MigrationCostSpec::Absolute(v),
            MigrationCostSpec::VmFraction(_) => MigrationCostSpec::VmFraction(v),
            MigrationCostSpec::TotalFraction(_) => MigrationCostSpec::TotalFraction(v),
            MigrationCostSpec::MeanVmFraction(_) => MigrationCostSpec::MeanVmFraction(v),
            MigrationCostSpec::Traffic { bytes, .. } => MigrationCostSpec::Traffic {
                bytes,
                horizon_s: v,
            },
        }
    }

    /// Short name of the reading, for files and plots.
    pub fn reading(self) -> &'static str {
        match self {
            MigrationCostSpec::Absolute(_) => "absolute",
            MigrationCostSpec::VmFraction(_) => "vm-fraction",
            MigrationCostSpec::TotalFraction(_) => "total-fraction",
            MigrationCostSpec::MeanVmFraction(_) => "mean-vm-fraction",
            MigrationCostSpec::Traffic { .. } => "traffic",
        }
    }

    /// score-core's c_m for a run whose initial total cost (eq. 1) is
    /// `initial_total` over `vms` VMs.
    pub fn resolve(self, initial_total: f64, vms: u32) -> MigrationCost {
        match self {
            MigrationCostSpec::Absolute(v) => MigrationCost::Absolute(v),
            MigrationCostSpec::VmFraction(f) => MigrationCost::FractionOfVmCost(f),
            MigrationCostSpec::TotalFraction(f) => MigrationCost::Absolute(f * initial_total),
            MigrationCostSpec::MeanVmFraction(f) => {
                MigrationCost::Absolute(f * initial_total / f64::from(vms.max(1)))
            }
            MigrationCostSpec::Traffic { bytes, horizon_s } => {
                MigrationCost::Traffic { bytes, horizon_s }
            }
        }
    }
}

impl Default for MigrationCostSpec {
    fn default() -> Self {
        MigrationCostSpec::Absolute(0.0)
    }
}

/// What the token carries before its first round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TokenInit {
    /// Each host fills its VMs' entries (level and load, which it knows
    /// locally) when the token is created; afterwards only holders update.
    Measured,
    /// Every entry starts at level 0 and load 0: the first round of the
    /// distributed and load-aware policies is then in ID order.
    Blank,
}

/// Capacity of every host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HostParams {
    /// VM slots per host (paper: 16, two VMs per core).
    pub slots: u32,
    /// Memory for VMs per host, MB (paper: 16 VMs of 1 GB).
    pub mem_mb: u64,
}

impl Default for HostParams {
    fn default() -> Self {
        HostParams {
            slots: 16,
            mem_mb: 16 * 1024,
        }
    }
}

/// The VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VmParams {
    /// Number of VMs. Default 30720: 12 per host on average, 75% of the
    /// paper's 40960 slots, so that hosts have room to receive VMs.
    pub count: u32,
    /// Memory of each VM, MB (paper: 1 GB).
    pub mem_mb: u64,
}

impl Default for VmParams {
    fn default() -> Self {
        VmParams {
            count: 30_720,
            mem_mb: 1024,
        }
    }
}

/// The genetic algorithm baseline (see `baseline::ga`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GaParams {
    /// Individuals per generation.
    pub population: u32,
    /// Generations.
    pub generations: u32,
    /// Individuals kept unchanged into the next generation.
    pub elite: u32,
    /// Tournament size of parent selection.
    pub tournament: u32,
    /// Probability that a child is made by crossover (else it is a copy of
    /// its first parent) before mutation.
    pub crossover_prob: f64,
    /// Mutations per child, as a fraction of the VM count.
    pub mutation_rate: f64,
}

impl Default for GaParams {
    fn default() -> Self {
        GaParams {
            population: 24,
            generations: 300,
            elite: 2,
            tournament: 3,
            crossover_prob: 0.7,
            mutation_rate: 0.02,
        }
    }
}

/// The greedy plus local-search baseline (see `baseline::search`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SearchParams {
    /// Most passes of local search over all VMs.
    pub max_passes: u32,
    /// Whether swaps (two VMs exchange hosts) are tried besides moves.
    pub swaps: bool,
    /// Data centres with at most this many hosts try every host as a
    /// destination (not only the hosts of a VM's peers and their racks).
    pub all_hosts_below: u32,
    /// Extra local searches from random placements (multi-start), run only
    /// when there are at most `restart_max_vms` VMs.
    pub restarts: u32,
    /// Largest VM count for which the random restarts are made.
    pub restart_max_vms: u32,
}

impl Default for SearchParams {
    fn default() -> Self {
        SearchParams {
            max_passes: 30,
            swaps: true,
            all_hosts_below: 64,
            restarts: 16,
            restart_max_vms: 2000,
        }
    }
}

/// Centralised baselines.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineParams {
    /// Whether to run the baselines at all.
    pub enabled: bool,
    /// The genetic algorithm.
    pub ga: GaParams,
    /// Greedy plus local search.
    pub search: SearchParams,
}

impl Default for BaselineParams {
    fn default() -> Self {
        BaselineParams {
            enabled: true,
            ga: GaParams::default(),
            search: SearchParams::default(),
        }
    }
}

/// A whole scenario. Defaults reproduce the paper's §IV-A set-up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Scenario {
    /// Label, written into the outputs.
    pub name: String,
    /// Seed of the traffic, the initial placement and the baselines.
    pub seed: u64,
    /// The data-centre tree (score-core's topology document). Default: the
    /// paper's 2560 hosts, 20 per rack, 8 racks per pod, 4 pods per core
    /// group, 4 core groups; weights e^0, e^1, e^3, e^5.
    pub topology: TopologySpec,
    /// Host capacity.
    pub host: HostParams,
    /// The VMs.
    pub vms: VmParams,
    /// The traffic model.
    pub traffic: TrafficParams,
    /// Policies to run, each from the same placement and traffic.
    pub policies: Vec<PolicyKind>,
    /// Decision rule: `paper-first` (the paper's: first candidate, in order
    /// of peer cost, with room and a benefit above c_m) or `best-benefit`.
    pub rule: Rule,
    /// Beyond the paper (docs/EVALUATION.md): candidate set and swaps; the default is
    /// the paper's (hosts of the VM's peers, no swaps).
    pub scope: Scope,
    /// c_m (the paper's simulation uses 0).
    pub migration_cost: MigrationCostSpec,
    /// Most token rounds per policy; a run stops earlier after a round with
    /// no migration once all dynamic flows have appeared.
    pub rounds: u32,
    /// Centralised baselines.
    pub baselines: BaselineParams,
    /// c_m values for the Fig. 2c sweep, as fractions (empty: no sweep).
    pub cm_sweep: Vec<f64>,
    /// Readings of c_m swept for Fig. 2c (their values are ignored; the
    /// first is the headline one).
    pub cm_sweep_readings: Vec<MigrationCostSpec>,
    /// Policy of the c_m sweep (the paper's Fig. 2c uses distributed).
    pub cm_sweep_policy: PolicyKind,
    /// What the token knows before its first round.
    pub token_init: TokenInit,
    /// Heat map "after" is taken after this many rounds (paper: 5th).
    pub heatmap_round: u32,
}

impl Default for Scenario {
    fn default() -> Self {
        Scenario {
            name: "paper".to_string(),
            seed: 1,
            topology: TopologySpec {
                regular: Some(RegularSpec {
                    fanout: PAPER_FANOUT.to_vec(),
                    first_host: Ipv4Addr::new(10, 0, 0, 1),
                }),
                ..TopologySpec::default()
            },
            host: HostParams::default(),
            vms: VmParams::default(),
            traffic: TrafficParams::default(),
            policies: PolicyKind::ALL.to_vec(),
            rule: Rule::PaperFirst,
            scope: Scope::PAPER,
            migration_cost: MigrationCostSpec::default(),
            rounds: 10,
            baselines: BaselineParams::default(),
            cm_sweep: vec![0.0, 0.05, 0.10, 0.20, 0.30],
            cm_sweep_readings: vec![
                MigrationCostSpec::VmFraction(0.0),
                MigrationCostSpec::MeanVmFraction(0.0),
                MigrationCostSpec::TotalFraction(0.0),
            ],
            cm_sweep_policy: PolicyKind::Distributed,
            token_init: TokenInit::Measured,
            heatmap_round: 5,
        }
    }
}

impl Scenario {
    /// Parses a scenario from TOML; missing fields take their defaults.
    pub fn from_toml_str(text: &str) -> Result<Scenario, ScenarioError> {
        let s: Scenario = toml::from_str(text).map_err(|e| ScenarioError::Parse(e.to_string()))?;
        Ok(s)
    }

    /// The scenario as TOML (a template for a scenario file).
    pub fn to_toml_string(&self) -> String {
        // Serialising plain data to TOML cannot fail for these types.
        toml::to_string_pretty(self).unwrap_or_default()
    }

    /// Builds the topology and checks every field; returns the topology.
    pub fn validate(&self) -> Result<Topology, ScenarioError> {
        let topo = Topology::from_spec(&self.topology)?;
        self.traffic.validate()?;
        if self.policies.is_empty() {
            return Err(ScenarioError::NoPolicy);
        }
        let bad = |name, value: f64, why| Err(ScenarioError::BadValue { name, value, why });
        if self.host.slots == 0 {
            return bad("host.slots", 0.0, "must be >= 1");
        }
        if self.vms.mem_mb == 0 {
            return bad("vms.mem_mb", 0.0, "must be >= 1");
        }
        let by_mem = self.host.mem_mb / self.vms.mem_mb;
        let per_host = u64::from(self.host.slots).min(by_mem);
        if u64::from(self.vms.count) > per_host * u64::from(topo.host_count()) {
            return Err(ScenarioError::TooManyVms {
                vms: self.vms.count,
                vm_mem_mb: self.vms.mem_mb,
                hosts: topo.host_count(),
                slots: self.host.slots,
                host_mem_mb: self.host.mem_mb,
            });
        }
        let cm = self.migration_cost.value();
        if !(cm >= 0.0 && cm.is_finite()) {
            return bad("migration_cost.value", cm, "must be finite and >= 0");
        }
        for &f in &self.cm_sweep {
            if !(f >= 0.0 && f.is_finite()) {
                return bad("cm_sweep", f, "every value must be finite and >= 0");
            }
        }
        let g = &self.baselines.ga;
        if g.population < 2 {
            return bad(
                "baselines.ga.population",
                f64::from(g.population),
                "must be >= 2",
            );
        }
        if g.elite >= g.population {
            return bad(
                "baselines.ga.elite",
                f64::from(g.elite),
                "must be < population",
            );
        }
        if g.tournament == 0 {
            return bad("baselines.ga.tournament", 0.0, "must be >= 1");
        }
        if !(0.0..=1.0).contains(&g.crossover_prob) {
            return bad(
                "baselines.ga.crossover_prob",
                g.crossover_prob,
                "must be in [0, 1]",
            );
        }
        if !(0.0..=1.0).contains(&g.mutation_rate) {
            return bad(
                "baselines.ga.mutation_rate",
                g.mutation_rate,
                "must be in [0, 1]",
            );
        }
        Ok(topo)
    }

    /// VM slots a host offers, taking memory into account.
    pub fn slots_per_host(&self) -> u32 {
        let by_mem = self.host.mem_mb / self.vms.mem_mb.max(1);
        self.host
            .slots
            .min(u32::try_from(by_mem).unwrap_or(u32::MAX))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_the_paper() {
        let s = Scenario::default();
        let t = s.validate().unwrap();
        assert_eq!(t.host_count(), 2560);
        assert_eq!(t.group_count(1), 128);
        assert_eq!(t.depth(), 4);
        assert_eq!(s.slots_per_host(), 16);
        assert_eq!(s.vms.count, 30_720);
    }

    #[test]
    fn toml_round_trip_and_unknown_fields() {
        let s = Scenario::default();
        let text = s.to_toml_string();
        assert_eq!(Scenario::from_toml_str(&text).unwrap(), s);
        let partial = Scenario::from_toml_str("seed = 9\n[vms]\ncount = 100\n").unwrap();
        assert_eq!(partial.seed, 9);
        assert_eq!(partial.vms.count, 100);
        assert_eq!(partial.host.slots, 16);
        assert!(Scenario::from_toml_str("sed = 9\n").is_err());
        let cm =
            Scenario::from_toml_str("migration_cost = { kind = \"vm-fraction\", value = 0.1 }\n")
                .unwrap();
        assert_eq!(cm.migration_cost, MigrationCostSpec::VmFraction(0.1));
    }

    #[test]
    fn capacity_is_checked() {
        let mut s = Scenario::default();
        s.vms.count = 2560 * 16 + 1;
        assert!(matches!(
            s.validate(),
            Err(ScenarioError::TooManyVms { .. })
        ));
        s.vms.count = 2560 * 8 + 1;
        s.host.mem_mb = 8 * 1024;
        assert!(matches!(
            s.validate(),
            Err(ScenarioError::TooManyVms { .. })
        ));
        s.host.mem_mb = 16 * 1024;
        s.policies.clear();
        assert!(matches!(s.validate(), Err(ScenarioError::NoPolicy)));
    }
}
