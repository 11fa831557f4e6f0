//! The advisory backend: for an operator who does not trust score yet. It
//! moves nothing; the agent still logs and exports every migration it
//! would have made.

use std::time::Duration;

use super::{BackendError, HostRef, MigrationReport, VmRef, format_mac};

/// Answers every migration with "advisory: nothing moved".
#[derive(Clone, Copy, Debug, Default)]
pub struct AdvisoryBackend;

impl AdvisoryBackend {
    /// Logs the migration it would make and reports `advisory = true`.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        tracing::info!(
            vm = %vm.ip,
            mac = %format_mac(&vm.mac),
            vif = %vm.vif,
            to = %to.addr,
            "advisory: would migrate"
        );
        Ok(MigrationReport {
            duration: Duration::ZERO,
            advisory: true,
        })
    }
}
