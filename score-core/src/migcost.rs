//! c_m from what migrations really cost: the bytes a live migration sends,
//! learnt from the migrations already made, priced in the paper's unit.
//!
//! The paper's c_m is one constant in the unit of the benefit of eq. 2,
//! a rate times a path weight. A live migration is a one-off transfer: a
//! pre-copy migration sends the VM's touched memory, then again the pages
//! dirtied meanwhile, and so on until the rest is small enough to send
//! while the VM is paused. Sending `bytes` over the path from x to y costs
//! `bytes × W(ℓ(x, y))` once. A move whose benefit is a rate repays that
//! after `bytes × W / benefit` seconds, so "repaid within a horizon H" is
//! eq. 2 with c_m = `bytes × W(ℓ(x, y)) / H`: [`MigrationCost::Traffic`].
//! H is the operator's: how long a placement is expected to stay useful
//! (docs/EVALUATION.md, "A migration cost from measurements").
//!
//! [`Estimator`] learns `bytes` per VM from its own migrations: the bytes
//! sent where the hypervisor reports them (QEMU does), else the duration
//! times the migration's link rate (xl reports only the time). It keeps the
//! ratio of bytes sent to the VM's memory, per VM and for the whole fleet,
//! so a VM never migrated yet gets the fleet's ratio, and a fleet with no
//! migration yet gets the prior. [`precopy`] is the model of a pre-copy
//! migration that score-sim uses, and that the real-guest measurements of
//! docs/BENCHMARKS.md fix.

use std::collections::HashMap;

use crate::decision::MigrationCost;
use crate::token::VmId;

/// What one finished migration tells.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observation {
    /// The VM's memory, bytes.
    pub memory_bytes: u64,
    /// Bytes the migration sent, when the hypervisor reports them.
    pub sent_bytes: Option<u64>,
    /// How long the migration took, seconds.
    pub duration_s: f64,
}

/// Why an observation was not taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MigCostError {
    /// The VM's memory is 0.
    #[error("a migration of a VM without memory tells nothing")]
    NoMemory,
    /// Neither a byte count nor a usable duration.
    #[error("a migration needs its bytes sent or a finite duration > 0 (got {0} s)")]
    NoMeasure(f64),
}

/// How an [`Estimator`] weighs what it sees.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EstimatorConfig {
    /// The ratio of bytes sent to memory before any migration was seen.
    pub prior_ratio: f64,
    /// The weight of a VM's newest migration in its running ratio (0..=1).
    pub smoothing: f64,
    /// The migration stream's rate, bytes per second, to turn a duration
    /// into bytes when the hypervisor does not report them.
    pub link_bytes_per_s: f64,
}

impl Default for EstimatorConfig {
    /// A prior of 1 (the whole memory once: the idle 256 MiB guest of
    /// docs/BENCHMARKS.md sent 0.42 of it, a busy one sends more), a new
    /// migration weighing a third, and a 1 Gbit/s link.
    fn default() -> Self {
        EstimatorConfig {
            prior_ratio: 1.0,
            smoothing: 1.0 / 3.0,
            link_bytes_per_s: 125_000_000.0,
        }
    }
}

/// The bytes a VM's next migration will send, learnt from the past ones.
#[derive(Debug, Clone)]
pub struct Estimator {
    cfg: EstimatorConfig,
    per_vm: HashMap<VmId, f64>,
    fleet_sum: f64,
    fleet_n: u64,
}

impl Estimator {
    /// An estimator that has seen nothing yet.
    pub fn new(cfg: EstimatorConfig) -> Estimator {
        Estimator {
            cfg,
            per_vm: HashMap::new(),
            fleet_sum: 0.0,
            fleet_n: 0,
        }
    }

    /// Takes a finished migration of `vm` into account.
    pub fn observe(&mut self, vm: VmId, obs: Observation) -> Result<(), MigCostError> {
        if obs.memory_bytes == 0 {
            return Err(MigCostError::NoMemory);
        }
        let sent = match obs.sent_bytes {
            Some(b) => b as f64,
            None if obs.duration_s.is_finite() && obs.duration_s > 0.0 => {
                obs.duration_s * self.cfg.link_bytes_per_s
            }
            None => return Err(MigCostError::NoMeasure(obs.duration_s)),
        };
        let ratio = sent / obs.memory_bytes as f64;
        let a = self.cfg.smoothing.clamp(0.0, 1.0);
        self.per_vm
            .entry(vm)
            .and_modify(|r| *r = (1.0 - a) * *r + a * ratio)
            .or_insert(ratio);
        self.fleet_sum += ratio;
        self.fleet_n += 1;
        Ok(())
    }

    /// Forgets a VM (it left the data centre).
    pub fn forget(&mut self, vm: VmId) {
        self.per_vm.remove(&vm);
    }

    /// The ratio of bytes sent to memory expected for `vm`: its own, else
    /// the fleet's.
    pub fn ratio(&self, vm: VmId) -> f64 {
        self.per_vm
            .get(&vm)
            .copied()
            .unwrap_or_else(|| self.fleet_ratio())
    }

    /// The ratio expected for a VM never migrated yet: the mean of every
    /// migration seen, else the prior.
    pub fn fleet_ratio(&self) -> f64 {
        if self.fleet_n > 0 {
            self.fleet_sum / self.fleet_n as f64
        } else {
            self.cfg.prior_ratio
        }
    }

    /// How many migrations it has seen.
    pub fn seen(&self) -> u64 {
        self.fleet_n
    }

    /// The bytes `vm`'s next migration is expected to send.
    pub fn bytes(&self, vm: VmId, memory_bytes: u64) -> f64 {
        self.ratio(vm) * memory_bytes as f64
    }

    /// c_m for `vm`: its expected bytes, to be repaid within `horizon_s`.
    pub fn cost(&self, vm: VmId, memory_bytes: u64, horizon_s: f64) -> MigrationCost {
        MigrationCost::Traffic {
            bytes: self.bytes(vm, memory_bytes),
            horizon_s,
        }
    }
}

/// One pre-copy migration, as [`precopy`] models it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Precopy {
    /// Bytes sent in all.
    pub sent_bytes: f64,
    /// From the first page sent to the VM running on the target, seconds.
    pub total_s: f64,
    /// The pause: the last round sent with the VM stopped, seconds.
    pub downtime_s: f64,
    /// Copy rounds before the pause.
    pub rounds: u32,
}

/// A pre-copy live migration of a VM that has touched `touched_bytes` of
/// its memory and dirties `dirty_bytes_per_s`, over a stream of
/// `link_bytes_per_s`: each round sends what the previous one left dirty,
/// until what is left can be sent within `max_downtime_s` (or after
/// `max_rounds`, when the VM dirties as fast as the link sends), and that
/// rest is sent with the VM paused. Returns `None` for a rate that is not
/// finite and > 0.
pub fn precopy(
    touched_bytes: f64,
    dirty_bytes_per_s: f64,
    link_bytes_per_s: f64,
    max_downtime_s: f64,
    max_rounds: u32,
) -> Option<Precopy> {
    if !(link_bytes_per_s.is_finite() && link_bytes_per_s > 0.0) {
        return None;
    }
    let dirty = dirty_bytes_per_s.max(0.0);
    let stop_at = max_downtime_s.max(0.0) * link_bytes_per_s;
    let mut left = touched_bytes.max(0.0);
    let (mut sent, mut time, mut rounds) = (0.0, 0.0, 0u32);
    while left > stop_at && rounds < max_rounds {
        let t = left / link_bytes_per_s;
        sent += left;
        time += t;
        rounds += 1;
        left = (dirty * t).min(touched_bytes.max(0.0));
    }
    let downtime = left / link_bytes_per_s;
    Some(Precopy {
        sent_bytes: sent + left,
        total_s: time + downtime,
        downtime_s: downtime,
        rounds,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_vm_learns_its_own_ratio_and_others_take_the_fleets() {
        let mut e = Estimator::new(EstimatorConfig::default());
        assert_eq!(e.ratio(1), 1.0);
        let obs = |sent| Observation {
            memory_bytes: 256 * MIB,
            sent_bytes: Some(sent),
            duration_s: 1.0,
        };
        e.observe(1, obs(128 * MIB)).unwrap();
        assert_eq!(e.ratio(1), 0.5);
        assert_eq!(e.ratio(2), 0.5);
        e.observe(1, obs(512 * MIB)).unwrap();
        // A third of the new ratio (2.0), two thirds of the old (0.5).
        assert!((e.ratio(1) - 1.0).abs() < 1e-12);
        assert!((e.ratio(2) - 1.25).abs() < 1e-12);
        assert_eq!(e.bytes(1, 1000), e.ratio(1) * 1000.0);
        e.forget(1);
        assert!((e.ratio(1) - 1.25).abs() < 1e-12);
    }

    #[test]
    fn a_duration_alone_counts_at_the_links_rate() {
        let mut e = Estimator::new(EstimatorConfig {
            link_bytes_per_s: 100.0 * MIB as f64,
            ..EstimatorConfig::default()
        });
        e.observe(
            7,
            Observation {
                memory_bytes: 128 * MIB,
                sent_bytes: None,
                duration_s: 2.56,
            },
        )
        .unwrap();
        assert!((e.ratio(7) - 2.0).abs() < 1e-12);
        let bad = |d| Observation {
            memory_bytes: MIB,
            sent_bytes: None,
            duration_s: d,
        };
        assert_eq!(e.observe(7, bad(0.0)), Err(MigCostError::NoMeasure(0.0)));
        assert!(matches!(
            e.observe(7, bad(f64::NAN)),
            Err(MigCostError::NoMeasure(_))
        ));
        let none = Observation {
            memory_bytes: 0,
            sent_bytes: Some(5),
            duration_s: 1.0,
        };
        assert_eq!(e.observe(7, none), Err(MigCostError::NoMemory));
        // Refused observations changed nothing.
        assert!((e.ratio(7) - 2.0).abs() < 1e-12);
    }

    #[test]
    fn the_cost_is_the_traffic_variant_priced_by_path() {
        let e = Estimator::new(EstimatorConfig::default());
        let cm = e.cost(3, 1000, 10.0);
        assert_eq!(
            cm,
            MigrationCost::Traffic {
                bytes: 1000.0,
                horizon_s: 10.0
            }
        );
        assert_eq!(cm.threshold(123.0, 2.0), 200.0);
    }

    #[test]
    fn precopy_matches_the_idle_guest_measured_on_a_gigabit_link() {
        // docs/BENCHMARKS.md: a 256 MiB idle guest sent 113 MB in 0.95 s
        // on a 1 Gbit/s link (QEMU's own limit 128 MiB/s).
        let p = precopy(113e6, 1e6, 125e6, 0.3, 30).unwrap();
        assert!(p.sent_bytes > 113e6 && p.sent_bytes < 115e6, "{p:?}");
        assert!((p.total_s - 0.91).abs() < 0.05, "{p:?}");
        // Half the link (TCP background at 500 Mbit/s): twice the time.
        let half = precopy(113e6, 1e6, 62.5e6, 0.3, 30).unwrap();
        assert!((half.total_s / p.total_s - 2.0).abs() < 0.05, "{half:?}");
    }

    #[test]
    fn precopy_stops_after_its_rounds_when_the_vm_dirties_faster_than_the_link() {
        let p = precopy(1e9, 200e6, 100e6, 0.3, 5).unwrap();
        assert_eq!(p.rounds, 5);
        // Every round resends the whole touched memory, then the pause.
        assert!((p.sent_bytes - 6e9).abs() < 1.0);
        assert!((p.downtime_s - 10.0).abs() < 1e-9);
        assert_eq!(precopy(1e9, 0.0, 0.0, 0.3, 5), None);
        let idle = precopy(1e9, 0.0, 100e6, 0.3, 5).unwrap();
        assert_eq!(
            (idle.rounds, idle.sent_bytes, idle.downtime_s),
            (1, 1e9, 0.0)
        );
    }
}
