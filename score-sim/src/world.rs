//! The simulated data centre: the tree, the traffic matrix, where every VM
//! runs and what each host can still take. Costs, levels and move deltas all
//! come from score-core's [`CostModel`]; this module only keeps the state and
//! answers the capacity requests a real host would answer.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use score_core::cost::{CostError, CostModel, Placement, Traffic, VmIdx};
use score_core::decision::Capacity;
use score_core::topology::{HostId, Topology};

use crate::scenario::{Scenario, ScenarioError};
use crate::traffic::{Flow, Workload};

/// Errors from building a world.
#[derive(Debug, thiserror::Error)]
pub enum WorldError {
    /// The scenario is invalid.
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    /// The traffic or placement was refused by score-core.
    #[error("cost model: {0}")]
    Cost(#[from] CostError),
    /// The VMs do not fit the hosts.
    #[error("{vms} VMs do not fit {hosts} hosts of {slots} slots")]
    NoRoom {
        /// VMs to place.
        vms: u32,
        /// Hosts.
        hosts: u32,
        /// Slots per host.
        slots: u32,
    },
}

/// Capacity of every host, in slots and memory (all VMs have the same size).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HostShape {
    /// VM slots per host.
    pub slots: u32,
    /// Memory per host for VMs, MB.
    pub mem_mb: u64,
    /// Memory of one VM, MB.
    pub vm_mem_mb: u64,
}

impl HostShape {
    /// How many VMs a host can hold (slots and memory).
    pub fn max_vms(&self) -> u32 {
        let by_mem = self.mem_mb / self.vm_mem_mb.max(1);
        self.slots.min(u32::try_from(by_mem).unwrap_or(u32::MAX))
    }

    /// The capacity answer of a host that runs `count` VMs.
    pub fn capacity(&self, count: u32) -> Capacity {
        Capacity {
            free_slots: self.slots.saturating_sub(count),
            free_mem_mb: self
                .mem_mb
                .saturating_sub(u64::from(count) * self.vm_mem_mb),
        }
    }
}

/// A network-agnostic initial placement: each VM, in index order, on a host
/// drawn uniformly among those with room (the state of a data centre whose
/// scheduler ignores traffic).
pub fn random_placement(
    hosts: u32,
    max_per_host: u32,
    vms: u32,
    rng: &mut ChaCha8Rng,
) -> Result<Vec<HostId>, WorldError> {
    if u64::from(vms) > u64::from(hosts) * u64::from(max_per_host) {
        return Err(WorldError::NoRoom {
            vms,
            hosts,
            slots: max_per_host,
        });
    }
    let mut open: Vec<HostId> = (0..hosts).collect();
    let mut count = vec![0u32; hosts as usize];
    let mut out = Vec::with_capacity(vms as usize);
    for _ in 0..vms {
        let i = rng.random_range(0..open.len());
        let h = open[i];
        out.push(h);
        count[h as usize] += 1;
        if count[h as usize] >= max_per_host {
            open.swap_remove(i);
        }
    }
    Ok(out)
}

/// Builds score-core's traffic matrix from flows.
pub fn core_traffic(vms: u32, flows: &[Flow]) -> Result<Traffic, CostError> {
    Traffic::from_triples(vms, flows.iter().map(|f| (f.a, f.b, f.rate)))
}

/// Everything a run starts from: the topology, the workload, the initial
/// traffic matrix and placement, host capacity. Every policy and baseline
/// starts from the same `Setup`.
#[derive(Debug, Clone)]
pub struct Setup {
    /// The data-centre tree.
    pub topo: Topology,
    /// Tenants, flows and dynamic flow events.
    pub workload: Workload,
    /// The initial traffic matrix (score-core's).
    pub traffic: Traffic,
    /// The initial placement.
    pub placement: Placement,
    /// Host capacity.
    pub shape: HostShape,
}

impl Setup {
    /// Generates the traffic and the initial placement of a scenario. The
    /// traffic and the placement draw from separate seeded streams.
    pub fn build(s: &Scenario) -> Result<Setup, WorldError> {
        let topo = s.validate()?;
        let workload =
            Workload::generate(s.vms.count, &s.traffic, s.seed).map_err(ScenarioError::from)?;
        Self::from_parts(topo, workload, s.shape(), s.seed)
    }

    /// A setup from a given topology and workload; the placement is drawn
    /// with `seed`.
    pub fn from_parts(
        topo: Topology,
        workload: Workload,
        shape: HostShape,
        seed: u64,
    ) -> Result<Setup, WorldError> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15);
        let hosts = random_placement(topo.host_count(), shape.max_vms(), workload.vms, &mut rng)?;
        Self::with_placement(topo, workload, shape, hosts)
    }

    /// A setup with an explicit placement.
    pub fn with_placement(
        topo: Topology,
        workload: Workload,
        shape: HostShape,
        hosts: Vec<HostId>,
    ) -> Result<Setup, WorldError> {
        let placement = Placement::new(topo.host_count(), hosts)?;
        let traffic = core_traffic(workload.vms, &workload.flows)?;
        Ok(Setup {
            topo,
            workload,
            traffic,
            placement,
            shape,
        })
    }

    /// score-core's cost model of the initial traffic.
    pub fn model(&self) -> CostModel<'_> {
        CostModel::new(&self.topo, &self.traffic)
    }

    /// Equation 1 total of the initial placement (each pair twice).
    pub fn initial_cost(&self) -> f64 {
        self.model().total_cost(&self.placement)
    }

    /// Number of VMs.
    pub fn vms(&self) -> u32 {
        self.workload.vms
    }

    /// Whether `p` respects every host's capacity.
    pub fn fits(&self, p: &Placement) -> bool {
        let max = self.shape.max_vms();
        p.counts().iter().all(|&c| c <= max)
    }

    /// Rack-to-rack traffic matrix of a placement (rack = level-1 group):
    /// entry `[r1][r2]` is the sum of λ over pairs with one VM in each rack,
    /// symmetric, intra-rack traffic on the diagonal.
    pub fn rack_matrix(&self, p: &Placement) -> Vec<Vec<f64>> {
        let racks = self.topo.group_count(1) as usize;
        let mut m = vec![vec![0.0; racks]; racks];
        for (u, v, r) in self.traffic.pairs() {
            let a = self.topo.group_of(p.host(u), 1) as usize;
            let b = self.topo.group_of(p.host(v), 1) as usize;
            m[a][b] += r;
            if a != b {
                m[b][a] += r;
            }
        }
        m
    }
}

impl Scenario {
    /// Host capacity of the scenario.
    pub fn shape(&self) -> HostShape {
        HostShape {
            slots: self.host.slots,
            mem_mb: self.host.mem_mb,
            vm_mem_mb: self.vms.mem_mb,
        }
    }
}

/// The VMs running on each host, kept in step with a [`Placement`] (the
/// baselines need it to find swap partners).
#[derive(Debug, Clone)]
pub struct HostLists {
    lists: Vec<Vec<VmIdx>>,
    pos: Vec<u32>,
}

impl HostLists {
    /// Lists for a placement.
    pub fn new(p: &Placement) -> Self {
        let mut lists = vec![Vec::new(); p.host_count() as usize];
        let mut pos = vec![0u32; p.vm_count() as usize];
        for (u, &h) in p.hosts().iter().enumerate() {
            pos[u] = lists[h as usize].len() as u32;
            lists[h as usize].push(u as VmIdx);
        }
        HostLists { lists, pos }
    }

    /// VMs on host `h`.
    pub fn on(&self, h: HostId) -> &[VmIdx] {
        &self.lists[h as usize]
    }

    /// Records that `u` moved from `from` to `to`.
    pub fn moved(&mut self, u: VmIdx, from: HostId, to: HostId) {
        let i = self.pos[u as usize] as usize;
        let list = &mut self.lists[from as usize];
        list.swap_remove(i);
        if let Some(&w) = list.get(i) {
            self.pos[w as usize] = i as u32;
        }
        self.pos[u as usize] = self.lists[to as usize].len() as u32;
        self.lists[to as usize].push(u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_placement_respects_capacity() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let p = random_placement(10, 3, 30, &mut rng).unwrap();
        let mut c = [0u32; 10];
        for h in p {
            c[h as usize] += 1;
        }
        assert!(c.iter().all(|&x| x == 3));
        assert!(random_placement(10, 3, 31, &mut rng).is_err());
    }

    #[test]
    fn host_lists_follow_moves() {
        let p = Placement::new(3, vec![0, 0, 1, 2, 0]).unwrap();
        let mut l = HostLists::new(&p);
        assert_eq!(l.on(0), &[0, 1, 4]);
        l.moved(0, 0, 2);
        let mut on0 = l.on(0).to_vec();
        on0.sort_unstable();
        assert_eq!(on0, vec![1, 4]);
        assert_eq!(l.on(2), &[3, 0]);
        l.moved(4, 0, 1);
        l.moved(1, 0, 1);
        assert!(l.on(0).is_empty());
        assert_eq!(l.on(1), &[2, 4, 1]);
    }

    #[test]
    fn paper_setup_is_within_capacity() {
        let mut s = Scenario::default();
        s.vms.count = 2000;
        let setup = Setup::build(&s).unwrap();
        assert!(setup.fits(&setup.placement));
        assert!(setup.initial_cost() > 0.0);
        let m = setup.rack_matrix(&setup.placement);
        let sum: f64 = (0..m.len())
            .flat_map(|i| (i..m.len()).map(move |j| (i, j)))
            .map(|(i, j)| m[i][j])
            .sum();
        assert!((sum - setup.workload.total_rate()).abs() < 1e-6 * sum);
    }
}
