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

use crate::{
    netns,
    testbed::{AGENT_HTTP, State, locate},
};

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
        match netns::http_get(&h.name, addr, "/flows")? {
            Some(body) => {
                let reply: FlowsReply = serde_json::from_str(&body)
                    .with_context(|| format!("parsing /flows of {}", h.name))?;
                // Only VM-to-VM traffic of this data centre counts.
                for p in reply.pairs {
                    if let (Some(&u), Some(&v)) = (index.get(&p.src), index.get(&p.dst))
                        && p.rate_bps.is_finite()
                        && p.rate_bps > 0.0
                    {
                        let r = rates.entry((u, v)).or_insert(0.0);
                        *r = r.max(p.rate_bps);
                    }
                }
            }
            None => silent.push(h.name.clone()),
        }
        metrics.push(netns::http_get(&h.name, addr, "/metrics")?);
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
/// --cost`), in bytes per second times link weight.
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

/// Measures the cost now (see [`CostReport`]).
pub fn cost_report(state: &State) -> Result<CostReport> {
    let topo = state.topology()?;
    let s = snapshot(state, None)?;
    let c = cost(&topo, &s.traffic, &s.placement);
    let initial = Placement::new(
        state.hosts.len() as u32,
        state
            .vms
            .iter()
            .map(|v| state.host_index(&v.initial_host).unwrap_or(0) as HostId)
            .collect(),
    )?;
    let best = crate::optimum::optimum(
        &topo,
        &s.traffic,
        state.sizes.slots,
        &s.placement,
        crate::optimum::NODE_LIMIT,
    )?;
    Ok(CostReport {
        measured: c.total,
        by_level: c.by_level,
        initial: cost(&topo, &s.traffic, &initial).total,
        optimum: best.cost,
        proven: best.proven,
        optimum_lower_bound: best.lower_bound,
        search_nodes: best.nodes,
        silent: s.silent,
    })
}

/// Prints a [`CostReport`] for people.
pub fn print_cost(state: &State) -> Result<()> {
    let r = cost_report(state)?;
    if !r.silent.is_empty() {
        println!("agents not answering: {}", r.silent.join(" "));
    }
    println!(
        "measured cost now (eq. 1, each pair twice): {:.0} B/s x W (initial placement: {:.0}); \
         traffic by level (host, rack, pod, core): {:?} B/s",
        r.measured,
        r.initial,
        r.by_level.iter().map(|x| x.round()).collect::<Vec<_>>()
    );
    println!(
        "best centralised placement for this traffic: {:.0} ({} in {} search nodes{})",
        r.optimum,
        if r.proven { "optimal" } else { "best found" },
        r.search_nodes,
        if r.proven {
            String::new()
        } else {
            format!("; the optimum is at least {:.0}", r.optimum_lower_bound)
        }
    );
    Ok(())
}

/// The largest value of metric `name` (any labels) over every agent's
/// /metrics, if any agent exports it.
pub fn metric_max(metrics: &[Option<String>], name: &str) -> Option<f64> {
    metric_values(metrics, name).reduce(f64::max)
}

/// The sum of metric `name` whose labels contain `label` (e.g.
/// `outcome="done"`, or "" for all) over every agent.
pub fn metric_sum(metrics: &[Option<String>], name: &str, label: &str) -> Option<f64> {
    let mut found = false;
    let mut sum = 0.0;
    for text in metrics.iter().flatten() {
        for (n, labels, v) in samples(text) {
            if n == name && labels.contains(label) {
                found = true;
                sum += v;
            }
        }
    }
    found.then_some(sum)
}

fn metric_values<'a>(
    metrics: &'a [Option<String>],
    name: &'a str,
) -> impl Iterator<Item = f64> + 'a {
    metrics
        .iter()
        .flatten()
        .flat_map(move |t| samples(t).filter(move |(n, _, _)| *n == name).map(|s| s.2))
}

/// Samples of a Prometheus text exposition: (name, labels, value).
fn samples(text: &str) -> impl Iterator<Item = (&str, &str, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.trim().parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            Some((name.trim(), labels, value))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_samples() {
        let text = "# HELP x y\n# TYPE score_token_round gauge\nscore_token_round 7\n\
                    score_migrations_total{outcome=\"done\"} 3\n\
                    score_migrations_total{outcome=\"failed\"} 1\n";
        let m = vec![
            Some(text.to_string()),
            None,
            Some("score_token_round 9\n".into()),
        ];
        assert_eq!(metric_max(&m, "score_token_round"), Some(9.0));
        assert_eq!(
            metric_sum(&m, "score_migrations_total", "outcome=\"done\""),
            Some(3.0)
        );
        assert_eq!(metric_sum(&m, "score_migrations_total", ""), Some(4.0));
        assert_eq!(metric_max(&m, "score_nothing"), None);
    }
}
