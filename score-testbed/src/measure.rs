//! What the agents measure, turned into the paper's cost: every host's
//! agent is asked for its flow table (`GET /flows` inside the host
//! namespace); a directed pair between VMs of two hosts may be in both
//! hosts' tables, so its rate is the largest any host reports (while a VM
//! moves, its old host's window fades and its new host's fills, but its
//! peer's host keeps counting); λ(u,v) = rate(u→v) + rate(v→u); every VM
//! is placed on the host that holds its vif now; and equation 1 is computed
//! with score-core.

use std::{collections::HashMap, net::Ipv4Addr, net::SocketAddr};

use anyhow::{Context as _, Result};
use score_core::cost::{CostModel, Placement, Traffic};
use score_core::topology::{HostId, Topology};
use serde::Deserialize;

use crate::{http, plan::AGENT_HTTP, state::State, status::locate};

#[derive(Deserialize)]
struct FlowsReply {
    pairs: Vec<PairView>,
}

#[derive(Deserialize)]
struct PairView {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    rate_bps: f64,
}

/// One look at the data centre: measured traffic and where every VM is.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// score-core's traffic matrix over the testbed's VMs (index = position
    /// in `state.vms`), bytes per second, both directions summed.
    pub traffic: Traffic,
    /// Where every VM is now (host index = position in `state.hosts`, which
    /// is also the topology's host ID). A VM on no host (mid-migration)
    /// keeps its previous host.
    pub placement: Placement,
    /// Hosts whose agent did not answer.
    pub silent: Vec<String>,
    /// The agents' /metrics text, by host, when served.
    pub metrics: Vec<Option<String>>,
}

/// Takes a [`Snapshot`]; `previous` gives the host of a VM found on none.
pub fn snapshot(state: &State, previous: Option<&Placement>) -> Result<Snapshot> {
    let addr: SocketAddr = AGENT_HTTP.parse()?;
    let index: HashMap<Ipv4Addr, u32> = state
        .vms
        .iter()
        .enumerate()
        .map(|(i, v)| (v.address, i as u32))
        .collect();
    let mut rates: HashMap<(u32, u32), f64> = HashMap::new();
    let mut silent = Vec::new();
    let mut metrics = Vec::new();
    for h in &state.hosts {
        match http::get(&h.name, addr, "/flows")? {
            Some(body) => add_pair_rates(&body, &index, &mut rates)
                .with_context(|| format!("parsing /flows of {}", h.name))?,
            None => silent.push(h.name.clone()),
        }
        metrics.push(http::get(&h.name, addr, "/metrics")?);
    }
    let n = state.vms.len() as u32;
    let traffic = Traffic::from_triples(n, rates.into_iter().map(|((u, v), r)| (u, v, r)))?;
    let at = locate(state)?;
    let hosts: Vec<HostId> = state
        .vms
        .iter()
        .enumerate()
        .map(|(i, v)| match at.get(&v.vif) {
            Some(&h) => h as HostId,
            None => previous
                .map(|p| p.host(i as u32))
                .or_else(|| state.host_index(&v.initial_host).map(|h| h as HostId))
                .unwrap_or(0),
        })
        .collect();
    let placement = Placement::new(state.hosts.len() as u32, hosts)?;
    Ok(Snapshot {
        traffic,
        placement,
        silent,
        metrics,
    })
}

/// Adds the pairs of one agent's `GET /flows` body between VMs of `index`
/// (address -> VM index) to `rates`, keeping the largest rate any agent
/// reports for a directed pair. Only VM-to-VM traffic of the data centre
/// counts.
pub fn add_pair_rates(
    body: &str,
    index: &HashMap<Ipv4Addr, u32>,
    rates: &mut HashMap<(u32, u32), f64>,
) -> Result<()> {
    let reply: FlowsReply = serde_json::from_str(body)?;
    for p in reply.pairs {
        if let (Some(&u), Some(&v)) = (index.get(&p.src), index.get(&p.dst))
            && p.rate_bps.is_finite()
            && p.rate_bps > 0.0
        {
            let r = rates.entry((u, v)).or_insert(0.0);
            *r = r.max(p.rate_bps);
        }
    }
    Ok(())
}

/// Equation 1 and the traffic per level for a snapshot.
#[derive(Debug, Clone)]
pub struct Cost {
    /// Equation 1 total (each pair counted twice), bytes/s times weight.
    pub total: f64,
    /// λ summed per level (0 same host .. 3 across pods), bytes/s.
    pub by_level: Vec<f64>,
}

/// The cost of `placement` under `traffic`.
pub fn cost(topo: &Topology, traffic: &Traffic, placement: &Placement) -> Cost {
    let m = CostModel::new(topo, traffic);
    Cost {
        total: m.total_cost(placement),
        by_level: m.rate_by_level(placement),
    }
}

/// The measured cost and the best centralised one (`testbed status
/// --cost`), in bytes per second times link weight. xtask fills it: the
/// best placement is its optimum search's.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CostReport {
    /// Equation 1 total of the placement now (each pair counted twice).
    pub measured: f64,
    /// λ per level now (0 same host .. 3 across pods), bytes/s.
    pub by_level: Vec<f64>,
    /// Equation 1 total of the initial placement under the same traffic.
    pub initial: f64,
    /// The best centralised placement's total for the same traffic.
    pub optimum: f64,
    /// Whether `optimum` is proven optimal (else the best found).
    pub proven: bool,
    /// A lower bound on the optimum (= `optimum` when proven).
    pub optimum_lower_bound: f64,
    /// Search nodes the optimum took.
    pub search_nodes: u64,
    /// Hosts whose agent did not answer /flows.
    pub silent: Vec<String>,
}
