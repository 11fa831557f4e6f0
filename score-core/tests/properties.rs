//! Properties of the cost model and the decision over random trees, traffic
//! and placements (proptest).

use std::collections::{HashMap, HashSet};
use std::net::Ipv4Addr;

use proptest::prelude::*;
use score_core::cost::{CostModel, Placement, Traffic};
use score_core::decision::{Capacity, Decision, MigrationCost, Rule, plan};
use score_core::topology::{LinkWeights, Topology};

/// A random scenario: a regular tree, VMs placed on its hosts, traffic.
#[derive(Debug, Clone)]
struct Scenario {
    topo: Topology,
    traffic: Traffic,
    placement: Placement,
}

/// Rates are either small integers (exact sums, many exact ties) or floats.
fn rate() -> impl Strategy<Value = f64> {
    prop_oneof![(1u32..6).prop_map(f64::from), 0.01f64..1000.0]
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (prop::collection::vec(1u32..4, 1..=4), 2u32..24)
        .prop_flat_map(|(fanout, n_vms)| {
            let depth = fanout.len();
            let hosts: u32 = fanout.iter().product();
            (
                Just(fanout),
                prop::collection::vec(0.1f64..50.0, depth),
                prop::collection::vec(0..hosts, n_vms as usize),
                prop::collection::vec((0..n_vms, 0..n_vms, rate()), 0..60),
            )
        })
        .prop_map(|(fanout, weights, host_of, triples)| {
            let topo = Topology::regular(
                &fanout,
                LinkWeights::new(weights).unwrap(),
                Ipv4Addr::new(10, 0, 0, 1),
            )
            .unwrap();
            let n = host_of.len() as u32;
            Scenario {
                traffic: Traffic::from_triples(n, triples).unwrap(),
                placement: Placement::new(topo.host_count(), host_of).unwrap(),
                topo,
            }
        })
}

fn close(a: f64, b: f64, scale: f64) -> bool {
    (a - b).abs() <= 1e-9 * scale.max(1.0)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    /// move_delta equals the change of the fully recomputed total, and a
    /// chain of moves tracked by deltas stays equal to the recomputation.
    #[test]
    fn incremental_delta_equals_recomputation(
        s in scenario(),
        moves in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>()), 1..20),
    ) {
        let m = CostModel::new(&s.topo, &s.traffic);
        let mut p = s.placement.clone();
        let mut tracked = m.total_cost(&p);
        for (vi, hi) in moves {
            let u = vi.index(p.vm_count() as usize) as u32;
            let to = hi.index(s.topo.host_count() as usize) as u32;
            let before = m.total_cost(&p);
            let delta = m.move_delta(&p, u, to);
            p.move_vm(u, to);
            let after = m.total_cost(&p);
            prop_assert!(close(after - before, delta, before), "{} vs {}", after - before, delta);
            tracked += delta;
            prop_assert!(close(tracked, after, before));
            // Eq. 1 counts every pair twice.
            prop_assert!(close(after, 2.0 * m.total_cost_pairs(&p), after));
        }
    }

    /// Every candidate's cost and benefit match the cost model after the
    /// move; a decision that migrates lowers the total by its benefit.
    #[test]
    fn migrating_never_increases_total_cost(
        s in scenario(),
        rule in prop::sample::select(Rule::ALL.to_vec()),
        cm in prop_oneof![
            Just(MigrationCost::Absolute(0.0)),
            (0.0f64..100.0).prop_map(MigrationCost::Absolute),
            (0.0f64..1.0).prop_map(MigrationCost::FractionOfVmCost),
            (-5.0f64..0.0).prop_map(MigrationCost::Absolute),
            (0.0f64..100.0, 0.5f64..4.0)
                .prop_map(|(bytes, horizon_s)| MigrationCost::Traffic { bytes, horizon_s }),
        ],
        full in prop::collection::vec(any::<bool>(), 64),
    ) {
        let m = CostModel::new(&s.topo, &s.traffic);
        let mut p = s.placement.clone();
        for u in 0..p.vm_count() {
            let pl = plan(&s.topo, u, p.host(u), &m.peers(&p, u));
            let vm_cost = m.vm_cost(&p, u);
            prop_assert!(close(pl.cost_before, vm_cost, vm_cost));
            prop_assert_eq!(pl.level, m.vm_level(&p, u));
            for c in &pl.candidates {
                let delta = m.move_delta(&p, u, c.host);
                prop_assert!(close(c.benefit, -delta, vm_cost), "{} vs {}", c.benefit, -delta);
                let mut q = p.clone();
                q.move_vm(u, c.host);
                prop_assert!(close(c.cost_after, m.vm_cost(&q, u), vm_cost));
                prop_assert_eq!(c.level_after, m.vm_level(&q, u));
            }
            let d = pl.decide(rule, cm, 1, |h| {
                Some(Capacity { free_slots: u32::from(!full[h as usize % full.len()]), free_mem_mb: 8 })
            });
            if let Decision::Migrate { to, benefit, c_m, .. } = d {
                prop_assert!(benefit > c_m && c_m >= 0.0);
                prop_assert!(!full[to as usize % full.len()]);
                let before = m.total_cost(&p);
                p.move_vm(u, to);
                let after = m.total_cost(&p);
                prop_assert!(after < before + 1e-9 * before.max(1.0), "{} -> {}", before, after);
                prop_assert!(close(before - after, benefit, before));
            }
        }
    }

    /// Candidates are the peers' hosts other than u's, each once, ranked by
    /// the cost of the most costly peer living there (then lower peer ID).
    #[test]
    fn candidate_order_is_the_papers(s in scenario()) {
        let m = CostModel::new(&s.topo, &s.traffic);
        let p = &s.placement;
        let w = s.topo.weights();
        for u in 0..p.vm_count() {
            let x = p.host(u);
            let peers = m.peers(p, u);
            let pl = plan(&s.topo, u, x, &peers);
            // The expected key of every host: the best (cost, -id) of its peers.
            let mut best: HashMap<u32, (f64, u32)> = HashMap::new();
            for z in peers.iter().filter(|z| z.host != x) {
                let c = z.rate * w.cumulative(s.topo.level(x, z.host));
                let e = best.entry(z.host).or_insert((c, z.id));
                if c > e.0 || (c == e.0 && z.id < e.1) {
                    *e = (c, z.id);
                }
            }
            let hosts: HashSet<u32> = pl.candidates.iter().map(|c| c.host).collect();
            prop_assert_eq!(hosts.len(), pl.candidates.len());
            prop_assert_eq!(&hosts, &best.keys().copied().collect::<HashSet<_>>());
            for c in &pl.candidates {
                prop_assert_eq!((c.peer_cost, c.peer), best[&c.host]);
            }
            for pair in pl.candidates.windows(2) {
                let (a, b) = (&pair[0], &pair[1]);
                prop_assert!(a.peer_cost > b.peer_cost || (a.peer_cost == b.peer_cost && a.peer < b.peer));
            }
        }
    }

    /// The paper's rule takes the first candidate in order with benefit > c_m
    /// and room, asking only improving candidates, in order, up to it;
    /// best-benefit takes the largest benefit with room.
    #[test]
    fn rules_choose_as_documented(
        s in scenario(),
        cm in prop_oneof![
            (0.0f64..20.0).prop_map(MigrationCost::Absolute),
            (0.0f64..20.0, 0.5f64..4.0)
                .prop_map(|(bytes, horizon_s)| MigrationCost::Traffic { bytes, horizon_s }),
        ],
        full in prop::collection::vec(any::<bool>(), 64),
    ) {
        let m = CostModel::new(&s.topo, &s.traffic);
        let p = &s.placement;
        let has_room = |h: u32| !full[h as usize % full.len()];
        let cap = |h: u32| Some(Capacity { free_slots: u32::from(has_room(h)), free_mem_mb: 1 });
        for u in 0..p.vm_count() {
            let pl = plan(&s.topo, u, p.host(u), &m.peers(p, u));
            let worthy: Vec<_> = pl
                .candidates
                .iter()
                .filter(|c| c.benefit > cm.threshold(pl.cost_before, c.path_weight))
                .collect();

            let mut asked = Vec::new();
            let d = pl.decide(Rule::PaperFirst, cm, 1, |h| { asked.push(h); cap(h) });
            let first = worthy.iter().find(|c| has_room(c.host));
            prop_assert_eq!(d.target(), first.map(|c| c.host));
            let expect_asked: Vec<u32> = match first {
                Some(f) => worthy.iter().map(|c| c.host).take_while(|&h| h != f.host).chain([f.host]).collect(),
                None => worthy.iter().map(|c| c.host).collect(),
            };
            prop_assert_eq!(asked, expect_asked);

            let d = pl.decide(Rule::BestBenefit, cm, 1, cap);
            let best = worthy.iter().filter(|c| has_room(c.host)).map(|c| c.benefit).fold(None, |acc: Option<f64>, b| Some(acc.map_or(b, |a| a.max(b))));
            prop_assert_eq!(d.target().is_some(), best.is_some());
            if let Some(b) = best {
                prop_assert_eq!(d.benefit(), b);
            }
        }
    }
}

/// A random tree of depth 1..=4 with uneven fan-out (1..=3 children, 1..=4
/// hosts per rack), with each host's path of child indices from the root.
fn uneven_tree(seed: u64) -> (Topology, Vec<Vec<usize>>) {
    use rand::{Rng, SeedableRng, rngs::StdRng};
    use score_core::topology::{NodeSpec, TopologySpec};

    fn node(
        rng: &mut StdRng,
        level: usize,
        path: &mut Vec<usize>,
        next: &mut u32,
        paths: &mut Vec<Vec<usize>>,
    ) -> NodeSpec {
        let mut n = NodeSpec::default();
        if level == 1 {
            for i in 0..rng.random_range(1..=4) {
                path.push(i);
                paths.push(path.clone());
                path.pop();
                n.hosts.push(Ipv4Addr::from(0x0a00_0000 + *next));
                *next += 1;
            }
        } else {
            for i in 0..rng.random_range(1..=3) {
                path.push(i);
                n.children.push(node(rng, level - 1, path, next, paths));
                path.pop();
            }
        }
        n
    }

    let mut rng = StdRng::seed_from_u64(seed);
    let depth = rng.random_range(1..=4usize);
    let mut paths = Vec::new();
    let root = node(&mut rng, depth, &mut Vec::new(), &mut 0, &mut paths);
    let spec = TopologySpec {
        weights: Some((0..depth).map(|_| rng.random_range(0.5..20.0)).collect()),
        hosts: root.hosts,
        children: root.children,
        ..TopologySpec::default()
    };
    (Topology::from_spec(&spec).unwrap(), paths)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(300))]

    /// On trees with uneven fan-out, level() is depth minus the common
    /// prefix of the two hosts' paths, and the plan's per-level sums agree
    /// with the cost model computed peer by peer.
    #[test]
    fn uneven_trees_levels_and_plans(
        seed in any::<u64>(),
        vms in prop::collection::vec(any::<prop::sample::Index>(), 2..16),
        triples in prop::collection::vec((any::<prop::sample::Index>(), any::<prop::sample::Index>(), rate()), 0..40),
    ) {
        let (topo, paths) = uneven_tree(seed);
        let n = topo.host_count();
        prop_assert_eq!(n as usize, paths.len());
        let depth = usize::from(topo.depth());
        for a in 0..n {
            for b in 0..n {
                let (pa, pb) = (&paths[a as usize], &paths[b as usize]);
                let common = pa.iter().zip(pb).take_while(|(x, y)| x == y).count();
                prop_assert_eq!(usize::from(topo.level(a, b)), depth - common);
            }
        }
        let host_of: Vec<u32> = vms.iter().map(|i| i.index(n as usize) as u32).collect();
        let k = host_of.len();
        let traffic = Traffic::from_triples(
            k as u32,
            triples.iter().map(|(a, b, r)| (a.index(k) as u32, b.index(k) as u32, *r)),
        ).unwrap();
        let p = Placement::new(n, host_of).unwrap();
        let m = CostModel::new(&topo, &traffic);
        for u in 0..k as u32 {
            let pl = plan(&topo, u, p.host(u), &m.peers(&p, u));
            let c = m.vm_cost(&p, u);
            prop_assert!(close(pl.cost_before, c, c));
            prop_assert_eq!(pl.level, m.vm_level(&p, u));
            for cand in &pl.candidates {
                let mut q = p.clone();
                q.move_vm(u, cand.host);
                prop_assert!(close(cand.cost_after, m.vm_cost(&q, u), c));
                prop_assert_eq!(cand.level_after, m.vm_level(&q, u));
            }
        }
    }
}
