//! Wiring of the distributed agent: the hypervisor backend behind the
//! protocol's [`Migrator`], the Prometheus metrics behind its
//! [`PeerMetrics`], and the start of the peer protocol's tasks.

use std::{
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use score_core::proto;
use tokio_util::sync::CancellationToken;

use crate::{
    AgentError,
    backend::{Backend, HostRef, VmRef},
    cluster::ClusterSettings,
    collector::Collector,
    datapath::{ControlReader, HostedVm},
    metrics::{Metrics, MigrationOutcome, SwapOutcome},
    peer::{self, MigrationResult, Migrator, PeerMetrics},
    status::{ProtocolView, StatusBoard},
};

impl PeerMetrics for Metrics {
    fn token_received(&self) {
        Metrics::token_received(self)
    }
    fn token_passed(&self) {
        Metrics::token_passed(self)
    }
    fn token_retransmitted(&self) {
        Metrics::token_retransmitted(self)
    }
    fn token_lost(&self) {
        Metrics::token_lost(self)
    }
    fn token_regenerated(&self) {
        Metrics::token_regenerated(self)
    }
    fn set_token_epoch(&self, epoch: u64) {
        Metrics::set_token_epoch(self, epoch)
    }
    fn set_token_round(&self, round: u64) {
        Metrics::set_token_round(self, round)
    }
    fn decision_evaluated(&self) {
        Metrics::decision_evaluated(self)
    }
    fn migration(&self, outcome: proto::MigrationOutcome) {
        let o = match outcome {
            proto::MigrationOutcome::Done => MigrationOutcome::Done,
            proto::MigrationOutcome::Advisory => MigrationOutcome::Advisory,
            proto::MigrationOutcome::Failed | proto::MigrationOutcome::Undefined => {
                MigrationOutcome::Failed
            }
        };
        Metrics::migration(self, o)
    }
    fn migration_duration(&self, took: Duration) {
        Metrics::observe_migration_duration(self, took)
    }
    fn migration_cost_bytes(&self, bytes: f64) {
        Metrics::set_migration_cost_bytes(self, bytes)
    }
    fn observe_benefit(&self, benefit: f64) {
        Metrics::observe_benefit(self, benefit)
    }
    fn set_vm_cost(&self, vm: Ipv4Addr, cost: f64, level: u8) {
        Metrics::set_vm_cost(self, vm, cost, level)
    }
    fn vm_left(&self, vm: Ipv4Addr) {
        Metrics::forget_vm(self, vm)
    }
    fn rejected(&self, reason: score_core::wire::RejectReason) {
        Metrics::rejected(self, reason)
    }
    fn swap(&self, outcome: proto::SwapOutcome) {
        Metrics::swap(self, swap_outcome(outcome))
    }
    fn chain(&self, outcome: proto::SwapOutcome) {
        Metrics::chain(self, swap_outcome(outcome))
    }
    fn rotation(&self, outcome: proto::SwapOutcome) {
        Metrics::rotation(self, swap_outcome(outcome))
    }
    fn group_move(&self, outcome: proto::SwapOutcome) {
        Metrics::group_move(self, swap_outcome(outcome))
    }
    fn swap_request(&self, refused: Option<score_core::wire::SwapRefusal>) {
        Metrics::swap_request(self, refused.map_or("accepted", |r| r.name()))
    }
}

/// The protocol's outcome of a swap, chain, rotation or group move, as
/// the metrics label it.
fn swap_outcome(outcome: proto::SwapOutcome) -> SwapOutcome {
    match outcome {
        proto::SwapOutcome::Done => SwapOutcome::Done,
        proto::SwapOutcome::Partial => SwapOutcome::Partial,
        proto::SwapOutcome::Failed => SwapOutcome::Failed,
        proto::SwapOutcome::Advisory => SwapOutcome::Advisory,
    }
}

/// The backend as the protocol calls it.
pub fn migrator(backend: Backend) -> Migrator {
    let backend = Arc::new(backend);
    Arc::new(move |vm: HostedVm, to: Ipv4Addr| {
        let b = backend.clone();
        Box::pin(async move {
            let vm = VmRef {
                ip: vm.ip,
                mac: vm.mac,
                vif: vm.vif,
            };
            let started = Instant::now();
            match b.migrate(&vm, &HostRef { addr: to }).await {
                Ok(r) if r.advisory => MigrationResult::Advisory,
                Ok(r) => MigrationResult::Done(r.duration),
                // Moved, though the backend complained afterwards (so it
                // gave no report): the time measured here, so that the
                // duration metric and the log still have the migration's.
                Err(e) if e.at_target() => MigrationResult::Done(started.elapsed()),
                Err(e) if e.still_at_source() => MigrationResult::Failed(e.to_string()),
                Err(e) => MigrationResult::Undefined(e.to_string()),
            }
        })
    })
}

/// This run on the wire: its incarnation and the freshness floor.
#[derive(Clone, Copy, Debug)]
pub struct Run {
    /// Raised and persisted by [`Run::begin`].
    pub incarnation: u32,
    /// Wall-clock ms just before the incarnation was raised: datagrams
    /// sealed earlier are refused.
    pub started_ms: u64,
}

impl Run {
    /// Raises this host's incarnation. Call it before the classifiers
    /// attach: from then on they queue the datagrams sent to hosted VMs
    /// for this run, and a peer's datagram queued before the floor was
    /// taken would be refused as older than the run that received it.
    pub fn begin(cluster: &ClusterSettings) -> Result<Run, AgentError> {
        let started_ms = peer::net::wall_ms();
        let incarnation = peer::incarnation::next(&cluster.peer.state_dir, cluster.node.address)
            .map_err(|source| AgentError::State {
                path: cluster.peer.state_dir.clone(),
                source,
            })?;
        Ok(Run {
            incarnation,
            started_ms,
        })
    }
}

/// Starts the peer protocol with the configured backend, for `run` (taken
/// with [`Run::begin`] before the classifiers attached): the shell over
/// score-core's protocol node, fed the collector's published facts.
#[allow(clippy::too_many_arguments)]
pub async fn start(
    cluster: ClusterSettings,
    backend: Backend,
    collector: Arc<Collector>,
    metrics: Arc<Metrics>,
    control: ControlReader,
    board: &Arc<StatusBoard>,
    run: Run,
    cancel: CancellationToken,
) -> Result<(Arc<dyn ProtocolView>, Vec<tokio::task::JoinHandle<()>>), AgentError> {
    let addr = std::net::SocketAddr::from((cluster.node.address, cluster.peer.port));
    let advisory = matches!(backend, Backend::Advisory(_));
    let Run {
        incarnation,
        started_ms,
    } = run;
    let parts = peer::shell::Parts {
        metrics,
        // Tracked, so that /status lists the migrations under way.
        migrate: board.track(migrator(backend)),
        advisory,
        control,
        facts: collector.facts(),
        incarnation,
        started_ms,
    };
    let (view, task) = peer::shell::start(&cluster, parts, cancel)
        .await
        .map_err(|source| AgentError::Bind { addr, source })?;
    Ok((Arc::new(view), vec![task]))
}
