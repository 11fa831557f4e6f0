//! `score-agent run`: the daemon. Loads and pins the datapath, follows the
//! VM interfaces, drains the counters into the flow table, serves it, and on
//! shutdown detaches from every interface, leaving the pinned maps (and so
//! the counters) for the next run.

use std::{future::Future, sync::Arc};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    AgentError,
    backend::Backend,
    cluster::ClusterSettings,
    collector::{Collector, monotonic_ns},
    config::{Config, IfacePatterns},
    datapath::{Datapath, LoadOptions},
    flows::FlowTable,
    http,
    links::LinkMonitor,
    metrics::Metrics,
};

/// Runs the daemon until `shutdown` completes. The configuration must
/// already be validated ([`Config::load`] does it), and `cluster` resolved
/// from it ([`Config::cluster`]): with it the agent takes part in the
/// token ring, without it the agent only counts.
pub async fn run(
    config: Config,
    cluster: Option<ClusterSettings>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), AgentError> {
    let patterns = IfacePatterns::new(&config.interfaces)?;
    heap::large_buffers_apart();
    let backend = match &cluster {
        Some(_) => Some(Backend::from_config(&config.backend).map_err(AgentError::Backend)?),
        None => None,
    };
    // Before the classifiers attach: they queue datagrams for this run.
    let run = match &cluster {
        Some(c) => Some(crate::distributed::Run::begin(c)?),
        None => None,
    };
    let mut datapath = Datapath::load(&LoadOptions {
        flows_max: config.flows_max,
        pin_dir: Some(config.pin_path.clone()),
        control_port: cluster.as_ref().map(|c| c.peer.port),
    })?;
    datapath.set_attach_mode(config.attach);
    let control = match &cluster {
        Some(_) => Some(datapath.take_control_reader()?),
        None => None,
    };
    let listener = http::bind(config.http_listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: config.http_listen,
            source,
        })?;
    let flows = FlowTable::new(
        config.rate_window.as_nanos() as u64,
        config.idle_timeout.as_nanos() as u64,
        monotonic_ns(),
    );
    let metrics = Arc::new(Metrics::new(config.metrics.top_k));
    metrics.set_flow_map_capacity(config.flows_max);
    let collector = Collector::new(datapath, flows, patterns, true, metrics.clone());
    // Loading parsed the eBPF object (a few MiB at the peak, all freed).
    heap::give_back();
    let cancel = CancellationToken::new();
    collector.forward_kernel_logs(cancel.clone());

    // Subscribe before listing, so an interface born in between is seen.
    let monitor = LinkMonitor::open().map_err(AgentError::Netlink)?;
    let n = collector.attach_existing().map_err(AgentError::Netlink)?;
    info!(
        interfaces = n,
        pin_path = %config.pin_path.display(),
        listen = %config.http_listen,
        "score-agent running"
    );

    let mut tasks = vec![
        tokio::spawn(collector.clone().follow(monitor, cancel.clone())),
        tokio::spawn(
            collector
                .clone()
                .drain_loop(config.drain_interval, cancel.clone()),
        ),
    ];
    let board = crate::status::StatusBoard::new();
    let server = tokio::spawn(http::serve(
        listener,
        http::AppState::new(collector.clone(), board.clone()),
        cancel.clone(),
    ));

    if let (Some(cluster), Some(backend), Some(control), Some(run)) =
        (cluster, backend, control, run)
    {
        info!(
            address = %cluster.node.address,
            port = cluster.peer.port,
            policy = %cluster.policy.kind,
            backend = backend.kind(),
            coordinator = cluster.coordinator,
            "joining the token ring"
        );
        let (p, peer_tasks) = crate::distributed::start(
            cluster,
            backend,
            collector.clone(),
            metrics.clone(),
            control,
            &board,
            run,
            cancel.clone(),
        )
        .await?;
        board.set_protocol(p.clone());
        tasks.extend(peer_tasks);
    }

    shutdown.await;
    info!("shutting down");
    cancel.cancel();
    // Every task watches `cancel`; the grace period bounds a slow syscall.
    for t in tasks {
        let abort = t.abort_handle();
        if tokio::time::timeout(std::time::Duration::from_secs(2), t)
            .await
            .is_err()
        {
            abort.abort();
        }
    }
    let _ = server.await;
    collector.detach_all();
    info!("detached from every interface; maps stay pinned");
    Ok(())
}

/// The allocator's settings for a long-lived daemon whose large buffers
/// (the flow table's array, a drain's scratch) grow and shrink with the
/// number of pairs (docs/BENCHMARKS.md, "The agent's memory per pair").
mod heap {
    /// Allocations of 256 KiB and more each get a mapping of their own,
    /// returned to the system when freed. glibc's default raises that
    /// threshold to the largest block freed so far (up to 32 MiB), after
    /// which a grown array's old buffer stays in the heap, resident.
    pub(super) fn large_buffers_apart() {
        #[cfg(target_env = "gnu")]
        // SAFETY: mallopt only changes the allocator's settings.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        }
    }

    /// Returns the heap's free pages to the system.
    pub(super) fn give_back() {
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only releases memory the allocator holds free.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
