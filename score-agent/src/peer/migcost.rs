//! c_m from this host's own migrations (`policy.migration_cost =
//! "traffic/H"`): each migration done tells score-core's
//! [`Estimator`] how many bytes it sent (its duration times
//! `policy.migration_link_bytes_per_second`: the backends report only the
//! time), and the node prices its next decisions with the bytes a VM's
//! migration is now expected to send, repaid within the horizon H
//! (docs/EVALUATION.md, "A migration cost from measurements").
//!
//! The estimate is the fleet's, as this host saw it: a VM that migrated
//! away is rarely decided for here again, so its own ratio would seldom be
//! used.

use std::time::Duration;

use score_core::{
    decision::MigrationCost,
    migcost::{Estimator, EstimatorConfig, Observation},
    token::VmId,
};
use tracing::debug;

/// What the host learnt so far, and how to price it.
#[derive(Debug)]
pub struct Learner {
    estimator: Estimator,
    memory_bytes: u64,
    horizon_s: f64,
}

impl Learner {
    /// A learner for a traffic c_m (`None` for any other c_m: nothing to
    /// learn).
    pub fn new(cm: MigrationCost, vm_memory_mib: u64, link_bytes_per_s: f64) -> Option<Learner> {
        let MigrationCost::Traffic { horizon_s, .. } = cm else {
            return None;
        };
        Some(Learner {
            estimator: Estimator::new(EstimatorConfig {
                link_bytes_per_s,
                ..EstimatorConfig::default()
            }),
            memory_bytes: vm_memory_mib.saturating_mul(1 << 20),
            horizon_s,
        })
    }

    /// c_m as of what was seen: the bytes a VM's next migration is expected
    /// to send, repaid within the horizon.
    pub fn cost(&self) -> MigrationCost {
        MigrationCost::Traffic {
            bytes: self.estimator.fleet_ratio() * self.memory_bytes as f64,
            horizon_s: self.horizon_s,
        }
    }

    /// A migration of `vm` was done in `took`; the new c_m, if it could
    /// be learnt from.
    pub fn migrated(&mut self, vm: VmId, took: Duration) -> Option<MigrationCost> {
        let obs = Observation {
            memory_bytes: self.memory_bytes,
            sent_bytes: None,
            duration_s: took.as_secs_f64(),
        };
        match self.estimator.observe(vm, obs) {
            Ok(()) => Some(self.cost()),
            Err(e) => {
                debug!(error = %e, "a migration that tells nothing of c_m");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(cm: MigrationCost) -> f64 {
        match cm {
            MigrationCost::Traffic { bytes, .. } => bytes,
            other => panic!("{other:?}"),
        }
    }

    /// Only a traffic c_m learns; it starts from the whole memory sent once
    /// and follows the mean of the migrations seen.
    #[test]
    fn the_cost_follows_the_migrations_made() {
        assert!(Learner::new(MigrationCost::Absolute(1.0), 256, 125e6).is_none());
        let mib = 1_048_576.0;
        let traffic = MigrationCost::Traffic {
            bytes: 256.0 * mib,
            horizon_s: 600.0,
        };
        let mut l = Learner::new(traffic, 256, 100.0 * mib).unwrap();
        assert_eq!(l.cost(), traffic);
        // 1 s at 100 MiB/s: 100 of 256 MiB.
        let cm = l.migrated(1, Duration::from_secs(1)).unwrap();
        assert!((bytes(cm) - 100.0 * mib).abs() < 1.0, "{cm:?}");
        // 3 s: 300 MiB; the mean of the two is 200 MiB.
        let cm = l.migrated(2, Duration::from_secs(3)).unwrap();
        assert!((bytes(cm) - 200.0 * mib).abs() < 1.0, "{cm:?}");
        assert!(matches!(cm, MigrationCost::Traffic { horizon_s, .. } if horizon_s == 600.0));
        // A migration that took no time tells nothing.
        assert!(l.migrated(3, Duration::ZERO).is_none());
        assert_eq!(l.cost(), cm);
    }
}
