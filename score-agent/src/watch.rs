//! `score-agent watch`: the operator's first tool and the tests' window on
//! the datapath. Attaches private (unpinned) maps to the matching
//! interfaces, follows them as they come and go, and at the end reports
//! every pair's bytes, frames and average rate over the watch.

use std::{future::Future, time::Instant};

use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::{
    AgentError,
    collector::{Collector, monotonic_ns},
    config::IfacePatterns,
    datapath::{AttachMode, Datapath, DatapathStats, LoadOptions},
    flows::FlowTable,
    links::LinkMonitor,
    metrics::Metrics,
};

/// One pair in the report (the JSON object of `watch --json`).
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct WatchedPair {
    /// Source IPv4 address.
    pub src: std::net::Ipv4Addr,
    /// Destination IPv4 address.
    pub dst: std::net::Ipv4Addr,
    /// Bytes: Ethernet header + IP packet of every frame.
    pub bytes: u64,
    /// Frames.
    pub packets: u64,
    /// Bytes divided by the length of the watch, per second.
    pub rate_bps: f64,
}

/// What a watch saw.
#[derive(Debug)]
pub struct WatchReport {
    /// Every pair, sorted by (src, dst).
    pub pairs: Vec<WatchedPair>,
    /// Datapath counters, including updates lost to a full map.
    pub stats: DatapathStats,
    /// Length of the watch in seconds.
    pub seconds: f64,
}

/// Watches until `stop` completes, attaching as `attach` says.
pub async fn watch(
    patterns: &[String],
    flows_max: u32,
    attach: AttachMode,
    stop: impl Future<Output = ()>,
) -> Result<WatchReport, AgentError> {
    let patterns = IfacePatterns::new(patterns)?;
    let mut datapath = Datapath::load(&LoadOptions {
        flows_max,
        pin_dir: None,
        control_port: None,
    })?;
    datapath.set_attach_mode(attach);
    let flows = FlowTable::new(u64::MAX, u64::MAX, monotonic_ns());
    // watch serves no metrics; the collector updates a private set.
    let metrics = std::sync::Arc::new(Metrics::new(0));
    let collector = Collector::new(datapath, flows, patterns, false, metrics);
    let cancel = CancellationToken::new();
    collector.forward_kernel_logs(cancel.clone());
    let monitor = LinkMonitor::open().map_err(AgentError::Netlink)?;
    let n = collector.attach_existing().map_err(AgentError::Netlink)?;
    let started = Instant::now();
    info!(interfaces = n, "watching");
    let follower = tokio::spawn(collector.clone().follow(monitor, cancel.clone()));

    stop.await;
    let seconds = started.elapsed().as_secs_f64();
    cancel.cancel();
    let _ = follower.await;
    let c = collector.clone();
    tokio::task::spawn_blocking(move || c.drain())
        .await
        .map_err(|e| AgentError::Task(e.to_string()))??;
    collector.detach_all();
    let pairs = collector
        .flows()
        .views()
        .into_iter()
        .map(|f| WatchedPair {
            src: f.src,
            dst: f.dst,
            bytes: f.bytes,
            packets: f.packets,
            rate_bps: if seconds > 0.0 {
                f.bytes as f64 / seconds
            } else {
                0.0
            },
        })
        .collect();
    Ok(WatchReport {
        pairs,
        stats: collector.stats(),
        seconds,
    })
}
