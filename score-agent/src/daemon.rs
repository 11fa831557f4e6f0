//! `score-agent run`: the daemon. Loads and pins the datapath, follows the
//! VM interfaces, drains the counters into the flow table, serves it, and on
//! shutdown detaches from every interface, leaving the pinned maps (and so
//! the counters) for the next run.

use std::{future::Future, sync::Arc};

use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    AgentError,
    collector::{Collector, monotonic_ns},
    config::{Config, IfacePatterns},
    datapath::{Datapath, LoadOptions},
    flows::FlowTable,
    http,
    links::LinkMonitor,
    metrics::Metrics,
};

/// Runs the daemon until `shutdown` completes. The configuration must
/// already be validated ([`Config::load`] does it).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let patterns = IfacePatterns::new(&config.interfaces)?;
    let datapath = Datapath::load(&LoadOptions {
        flows_max: config.flows_max,
        pin_dir: Some(config.pin_path.clone()),
        control_port: None,
    })?;
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
    let collector = Collector::new(datapath, flows, patterns, true, metrics);
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

    let tasks = [
        tokio::spawn(collector.clone().follow(monitor, cancel.clone())),
        tokio::spawn(
            collector
                .clone()
                .drain_loop(config.drain_interval, cancel.clone()),
        ),
    ];
    let server = tokio::spawn(http::serve(
        listener,
        http::AppState::new(collector.clone()),
        cancel.clone(),
    ));

    shutdown.await;
    info!("shutting down");
    cancel.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let _ = server.await;
    collector.detach_all();
    info!("detached from every interface; maps stay pinned");
    Ok(())
}
