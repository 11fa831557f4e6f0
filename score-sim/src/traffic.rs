//! Synthetic data-centre traffic, modelled on the measurement studies the
//! paper cites (Kandula et al., IMC'09; Benson et al., IMC'10): VMs belong to
//! tenants (applications) of very unequal size and talk mostly inside them;
//! most VMs have one to a few peers, a few "hub" VMs (front ends, masters,
//! databases) talk to many; per-pair rates are heavy-tailed (log-normal); a
//! small share of traffic crosses tenants towards shared services. Optionally,
//! batches of new flows appear during the run (the spikes of the paper's
//! Fig. 2b). The model and its defaults are described in docs/EVALUATION.md.
//!
//! Everything is drawn from one seeded ChaCha stream, and every collection is
//! produced in a fixed order, so a seed gives the same traffic on every run.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

/// Errors from checking traffic parameters.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TrafficError {
    /// A parameter is out of its range.
    #[error("traffic parameter {name} = {value}: {why}")]
    BadParam {
        /// The parameter's name in the scenario file.
        name: &'static str,
        /// The value given.
        value: f64,
        /// What the range is.
        why: &'static str,
    },
}

/// Parameters of the traffic model (the `[traffic]` table of a scenario).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrafficParams {
    /// Smallest tenant, in VMs.
    pub tenant_min: u32,
    /// Largest tenant, in VMs.
    pub tenant_max: u32,
    /// Tail index of the (bounded Pareto) tenant size: smaller is heavier.
    /// Benson et al. find most applications small and a few very large.
    pub tenant_alpha: f64,
    /// Share of a tenant's VMs that are hubs (at least one per tenant).
    pub hub_fraction: f64,
    /// Mean number of extra intra-tenant peers of a worker VM besides its hub
    /// (geometric): most VMs talk to a handful of others (Kandula et al.).
    pub extra_peers_mean: f64,
    /// Probability that a VM also talks to a hub of another tenant (shared
    /// services); the rest of the traffic stays inside tenants.
    pub inter_tenant_prob: f64,
    /// Rate factor of inter-tenant flows relative to intra-tenant ones.
    pub inter_tenant_rate: f64,
    /// Median rate of a pair, bytes per second.
    pub rate_median: f64,
    /// Log-normal sigma of per-pair rates (heavy tail of flow volumes).
    pub rate_sigma: f64,
    /// Log-normal sigma of a tenant's intensity (busy and idle tenants).
    pub tenant_sigma: f64,
    /// Rate factor of worker-to-hub pairs (hubs are the busy VMs).
    pub hub_rate: f64,
    /// Dynamic traffic: new flows appearing during the run.
    pub dynamic: DynamicParams,
}

impl Default for TrafficParams {
    fn default() -> Self {
        TrafficParams {
            tenant_min: 2,
            tenant_max: 200,
            tenant_alpha: 1.2,
            hub_fraction: 0.1,
            extra_peers_mean: 1.0,
            inter_tenant_prob: 0.1,
            inter_tenant_rate: 0.3,
            rate_median: 1.0e6,
            rate_sigma: 1.5,
            tenant_sigma: 1.0,
            hub_rate: 3.0,
            dynamic: DynamicParams::default(),
        }
    }
}

/// New flows that appear while the token circulates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DynamicParams {
    /// Number of batches of new flows (0: static traffic).
    pub batches: u32,
    /// Hand-offs between batches, as a fraction of a round (one hand-off
    /// per VM); the first batch comes after one interval.
    pub every_rounds: f64,
    /// New flows per batch, as a fraction of the initial number of pairs.
    pub flows_fraction: f64,
}

impl Default for DynamicParams {
    fn default() -> Self {
        DynamicParams {
            batches: 6,
            every_rounds: 0.5,
            flows_fraction: 0.02,
        }
    }
}

impl TrafficParams {
    /// Checks every parameter's range.
    pub fn validate(&self) -> Result<(), TrafficError> {
        let bad = |name, value: f64, why| Err(TrafficError::BadParam { name, value, why });
        if self.tenant_min < 1 {
            return bad("tenant_min", f64::from(self.tenant_min), "must be >= 1");
        }
        if self.tenant_max < self.tenant_min {
            return bad(
                "tenant_max",
                f64::from(self.tenant_max),
                "must be >= tenant_min",
            );
        }
        let checks: [(&'static str, f64, bool, &'static str); 10] = [
            (
                "tenant_alpha",
                self.tenant_alpha,
                self.tenant_alpha > 0.0,
                "must be > 0",
            ),
            (
                "hub_fraction",
                self.hub_fraction,
                (0.0..=1.0).contains(&self.hub_fraction),
                "must be in [0, 1]",
            ),
            (
                "extra_peers_mean",
                self.extra_peers_mean,
                self.extra_peers_mean >= 0.0,
                "must be >= 0",
            ),
            (
                "inter_tenant_prob",
                self.inter_tenant_prob,
                (0.0..=1.0).contains(&self.inter_tenant_prob),
                "must be in [0, 1]",
            ),
            (
                "inter_tenant_rate",
                self.inter_tenant_rate,
                self.inter_tenant_rate > 0.0,
                "must be > 0",
            ),
            (
                "rate_median",
                self.rate_median,
                self.rate_median > 0.0,
                "must be > 0",
            ),
            (
                "rate_sigma",
                self.rate_sigma,
                self.rate_sigma >= 0.0,
                "must be >= 0",
            ),
            (
                "tenant_sigma",
                self.tenant_sigma,
                self.tenant_sigma >= 0.0,
                "must be >= 0",
            ),
            (
                "hub_rate",
                self.hub_rate,
                self.hub_rate > 0.0,
                "must be > 0",
            ),
            (
                "dynamic.every_rounds",
                self.dynamic.every_rounds,
                self.dynamic.every_rounds > 0.0,
                "must be > 0",
            ),
        ];
        for (name, v, ok, why) in checks {
            // `ok` is false for NaN too.
            if !ok || !v.is_finite() {
                return bad(name, v, why);
            }
        }
        if !(self.dynamic.flows_fraction >= 0.0 && self.dynamic.flows_fraction.is_finite()) {
            return bad(
                "dynamic.flows_fraction",
                self.dynamic.flows_fraction,
                "must be >= 0",
            );
        }
        Ok(())
    }
}

/// One VM pair's traffic: dense VM indices `a < b` and λ(a, b) in bytes per
/// second, both directions summed.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Flow {
    /// The lower VM index.
    pub a: u32,
    /// The higher VM index.
    pub b: u32,
    /// Rate of the pair, bytes per second.
    pub rate: f64,
}

/// A flow that starts during the run, after `at` hand-offs (counted from the
/// start of the run, the same for every policy). If the pair already talks,
/// its rate grows by `flow.rate`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct FlowEvent {
    /// Hand-offs done before the flow appears.
    pub at: u64,
    /// The new traffic.
    pub flow: Flow,
}

/// The traffic of a scenario: tenants, the initial flows and the flows that
/// appear later.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Number of VMs (dense indices `0..vms`).
    pub vms: u32,
    /// Tenant of each VM.
    pub tenant_of: Vec<u32>,
    /// The VMs of each tenant, hubs first.
    pub tenants: Vec<Vec<u32>>,
    /// Number of hubs at the front of each tenant's list.
    pub hubs: Vec<u32>,
    /// Initial flows, sorted by `(a, b)`, one per pair.
    pub flows: Vec<Flow>,
    /// Flows appearing during the run, sorted by `at`.
    pub events: Vec<FlowEvent>,
}

impl Workload {
    /// Generates the traffic of `vms` VMs with the given parameters and seed.
    /// `vms` = 0 gives no tenants and no flows.
    pub fn generate(vms: u32, p: &TrafficParams, seed: u64) -> Result<Workload, TrafficError> {
        p.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Tenant sizes, truncated so that they add up to exactly `vms`.
        let mut sizes = Vec::new();
        let mut left = vms;
        while left > 0 {
            let s = bounded_pareto(&mut rng, p.tenant_min, p.tenant_max, p.tenant_alpha).min(left);
            sizes.push(s);
            left -= s;
        }
        // Tenants get scattered VM indices: VM IDs (addresses) are handed out
        // with no regard to tenants, so the round-robin order is not a tenant
        // order. Membership is a shuffled permutation.
        let mut perm: Vec<u32> = (0..vms).collect();
        perm.shuffle(&mut rng);
        let mut tenants = Vec::with_capacity(sizes.len());
        let mut tenant_of = vec![0u32; vms as usize];
        let mut hubs = Vec::with_capacity(sizes.len());
        let mut pos = 0usize;
        for (t, &s) in sizes.iter().enumerate() {
            let members: Vec<u32> = perm[pos..pos + s as usize].to_vec();
            pos += s as usize;
            for &v in &members {
                tenant_of[v as usize] = t as u32;
            }
            let h = ((f64::from(s) * p.hub_fraction).round() as u32).clamp(1, s);
            hubs.push(h);
            tenants.push(members);
        }
        let dists = Gen::new(p)?;
        let intensity: Vec<f64> = (0..tenants.len())
            .map(|_| dists.tenant.sample(&mut rng))
            .collect();
        let mut pairs: HashMap<(u32, u32), f64> = HashMap::new();
        let mut add = |a: u32, b: u32, r: f64| {
            if a != b {
                *pairs.entry((a.min(b), a.max(b))).or_insert(0.0) += r;
            }
        };
        let all_hubs: Vec<u32> = tenants
            .iter()
            .zip(&hubs)
            .flat_map(|(m, &h)| m[..h as usize].iter().copied())
            .collect();
        for (t, members) in tenants.iter().enumerate() {
            let h = hubs[t] as usize;
            let k = intensity[t];
            // Hubs of a tenant talk to each other.
            for i in 0..h {
                for j in i + 1..h {
                    add(
                        members[i],
                        members[j],
                        k * p.hub_rate * dists.pair(&mut rng),
                    );
                }
            }
            for (i, &w) in members.iter().enumerate() {
                if i >= h {
                    // Each worker talks to one hub of its tenant...
                    let hub = members[rng.random_range(0..h)];
                    add(w, hub, k * p.hub_rate * dists.pair(&mut rng));
                    // ... and to a few other members.
                    let extra = geometric(&mut rng, p.extra_peers_mean);
                    for _ in 0..extra {
                        if members.len() > 1 {
                            let z = members[rng.random_range(0..members.len())];
                            add(w, z, k * dists.pair(&mut rng));
                        }
                    }
                }
                // Some VMs use a shared service: a hub of another tenant.
                if tenants.len() > 1 && rng.random_bool(p.inter_tenant_prob) {
                    let z = all_hubs[rng.random_range(0..all_hubs.len())];
                    add(w, z, k * p.inter_tenant_rate * dists.pair(&mut rng));
                }
            }
        }
        let mut flows: Vec<Flow> = pairs
            .into_iter()
            .map(|((a, b), rate)| Flow { a, b, rate })
            .collect();
        // HashMap order is random per process: sort for determinism.
        flows.sort_by_key(|f| (f.a, f.b));

        let mut events = Vec::new();
        let d = &p.dynamic;
        if vms > 1 && d.batches > 0 {
            let per_batch = ((flows.len() as f64) * d.flows_fraction).ceil() as usize;
            let every = ((f64::from(vms) * d.every_rounds).round() as u64).max(1);
            for batch in 0..u64::from(d.batches) {
                let at = every * (batch + 1);
                for _ in 0..per_batch {
                    let u = rng.random_range(0..vms);
                    let t = tenant_of[u as usize] as usize;
                    let members = &tenants[t];
                    let intra = members.len() > 1 && rng.random_bool(1.0 - p.inter_tenant_prob);
                    let (z, scale) = if intra {
                        (members[rng.random_range(0..members.len())], 1.0)
                    } else {
                        (
                            all_hubs[rng.random_range(0..all_hubs.len())],
                            p.inter_tenant_rate,
                        )
                    };
                    if z == u {
                        continue;
                    }
                    let rate = intensity[t] * scale * dists.pair(&mut rng);
                    events.push(FlowEvent {
                        at,
                        flow: Flow {
                            a: u.min(z),
                            b: u.max(z),
                            rate,
                        },
                    });
                }
            }
        }
        Ok(Workload {
            vms,
            tenant_of,
            tenants,
            hubs,
            flows,
            events,
        })
    }

    /// Builds traffic from explicit flows (tests, hand-made scenarios). Pairs
    /// given twice are summed; self pairs are dropped.
    pub fn from_flows(vms: u32, flows: impl IntoIterator<Item = (u32, u32, f64)>) -> Workload {
        let mut pairs: HashMap<(u32, u32), f64> = HashMap::new();
        for (a, b, r) in flows {
            if a != b && a < vms && b < vms {
                *pairs.entry((a.min(b), a.max(b))).or_insert(0.0) += r;
            }
        }
        let mut flows: Vec<Flow> = pairs
            .into_iter()
            .map(|((a, b), rate)| Flow { a, b, rate })
            .collect();
        flows.sort_by_key(|f| (f.a, f.b));
        Workload {
            vms,
            tenant_of: vec![0; vms as usize],
            tenants: vec![(0..vms).collect()],
            hubs: vec![vms.min(1)],
            flows,
            events: Vec::new(),
        }
    }

    /// Sum of the initial rates over all pairs, bytes per second.
    pub fn total_rate(&self) -> f64 {
        self.flows.iter().map(|f| f.rate).sum()
    }

    /// Share of the initial rate that stays inside tenants.
    pub fn intra_tenant_share(&self) -> f64 {
        let total = self.total_rate();
        if total <= 0.0 {
            return 0.0;
        }
        let intra: f64 = self
            .flows
            .iter()
            .filter(|f| self.tenant_of[f.a as usize] == self.tenant_of[f.b as usize])
            .map(|f| f.rate)
            .sum();
        intra / total
    }

    /// Number of peers of each VM in the initial traffic.
    pub fn degrees(&self) -> Vec<u32> {
        let mut d = vec![0u32; self.vms as usize];
        for f in &self.flows {
            d[f.a as usize] += 1;
            d[f.b as usize] += 1;
        }
        d
    }
}

/// The two log-normal distributions of the model.
struct Gen {
    pair: LogNormal<f64>,
    tenant: LogNormal<f64>,
}

impl Gen {
    fn new(p: &TrafficParams) -> Result<Gen, TrafficError> {
        let bad = |name, value| TrafficError::BadParam {
            name,
            value,
            why: "not a valid log-normal parameter",
        };
        Ok(Gen {
            pair: LogNormal::new(p.rate_median.ln(), p.rate_sigma)
                .map_err(|_| bad("rate_sigma", p.rate_sigma))?,
            // Intensity has median 1: it scales a tenant's pairs up or down.
            tenant: LogNormal::new(0.0, p.tenant_sigma)
                .map_err(|_| bad("tenant_sigma", p.tenant_sigma))?,
        })
    }

    fn pair(&self, rng: &mut ChaCha8Rng) -> f64 {
        self.pair.sample(rng)
    }
}

/// A bounded Pareto integer in `[min, max]` with tail index `alpha`
/// (inverse-CDF sampling).
fn bounded_pareto(rng: &mut ChaCha8Rng, min: u32, max: u32, alpha: f64) -> u32 {
    if min >= max {
        return min;
    }
    let (l, h) = (f64::from(min), f64::from(max) + 1.0);
    let u: f64 = rng.random();
    let ratio = (l / h).powf(alpha);
    let x = l * (1.0 - u * (1.0 - ratio)).powf(-1.0 / alpha);
    (x.floor() as u32).clamp(min, max)
}

/// A geometric count (0, 1, 2, ...) with the given mean.
fn geometric(rng: &mut ChaCha8Rng, mean: f64) -> u32 {
    if mean <= 0.0 {
        return 0;
    }
    // P(k) = (1 - q) q^k has mean q / (1 - q).
    let q = mean / (1.0 + mean);
    let mut k = 0;
    while k < 1000 && rng.random_bool(q) {
        k += 1;
    }
    k
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_traffic() {
        let p = TrafficParams::default();
        let a = Workload::generate(2000, &p, 7).unwrap();
        let b = Workload::generate(2000, &p, 7).unwrap();
        let c = Workload::generate(2000, &p, 8).unwrap();
        assert_eq!(a.flows, b.flows);
        assert_ne!(a.flows, c.flows);
    }

    #[test]
    fn tenants_cover_every_vm_once() {
        let t = Workload::generate(3000, &TrafficParams::default(), 1).unwrap();
        let mut seen = vec![false; 3000];
        for m in &t.tenants {
            for &v in m {
                assert!(!seen[v as usize]);
                seen[v as usize] = true;
            }
        }
        assert!(seen.iter().all(|&s| s));
        assert!(t.tenants.iter().all(|m| m.len() <= 200));
    }

    #[test]
    fn model_has_the_measured_shape() {
        let mut p = TrafficParams::default();
        p.dynamic.batches = 3;
        let t = Workload::generate(10_000, &p, 3).unwrap();
        // Mostly intra-tenant traffic.
        assert!(t.intra_tenant_share() > 0.8, "{}", t.intra_tenant_share());
        // Most VMs have few peers; a few are busy.
        let mut d = t.degrees();
        d.sort_unstable();
        let median = d[d.len() / 2];
        let max = d[d.len() - 1];
        assert!(median <= 4, "median degree {median}");
        assert!(max >= 10 * median.max(1), "max degree {max}");
        // Heavy-tailed rates: the top 10% of pairs carry most of the traffic.
        let mut r: Vec<f64> = t.flows.iter().map(|f| f.rate).collect();
        r.sort_by(|a, b| b.total_cmp(a));
        let top: f64 = r[..r.len() / 10].iter().sum();
        assert!(top / t.total_rate() > 0.5);
        // Pairs are normalised and unique.
        assert!(t.flows.iter().all(|f| f.a < f.b && f.rate > 0.0));
        assert!(
            t.flows
                .windows(2)
                .all(|w| (w[0].a, w[0].b) < (w[1].a, w[1].b))
        );
        // Dynamic events arrive in three batches, sorted.
        assert!(!t.events.is_empty());
        assert!(t.events.windows(2).all(|w| w[0].at <= w[1].at));
        assert_eq!(t.events.last().unwrap().at, 3 * 5000);
    }

    #[test]
    fn bad_params_are_refused() {
        let p = TrafficParams {
            hub_fraction: 1.5,
            ..TrafficParams::default()
        };
        assert!(Workload::generate(10, &p, 0).is_err());
        let p = TrafficParams {
            tenant_alpha: f64::NAN,
            ..TrafficParams::default()
        };
        assert!(Workload::generate(10, &p, 0).is_err());
    }

    #[test]
    fn explicit_flows_are_summed_and_sorted() {
        let t = Workload::from_flows(4, [(2, 1, 1.0), (1, 2, 2.0), (3, 3, 5.0), (0, 3, 1.0)]);
        assert_eq!(
            t.flows,
            vec![
                Flow {
                    a: 0,
                    b: 3,
                    rate: 1.0
                },
                Flow {
                    a: 1,
                    b: 2,
                    rate: 3.0
                }
            ]
        );
    }
}
