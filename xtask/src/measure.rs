//! The measured cost against the best centralised one (`testbed status
//! --cost`): what the agents measure (score-testbed's `measure`) beside
//! what xtask's optimum search finds for the same traffic.

use anyhow::Result;
use score_testbed::{
    measure::{CostReport, cost, snapshot},
    state::State,
};

/// Measures the cost now (see [`CostReport`]).
pub(crate) fn cost_report(state: &State) -> Result<CostReport> {
    let topo = state.topology()?;
    let s = snapshot(state, None)?;
    let c = cost(&topo, &s.traffic, &s.placement);
    let initial = state.initial_placement()?;
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
pub(crate) fn print_cost(state: &State) -> Result<()> {
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
