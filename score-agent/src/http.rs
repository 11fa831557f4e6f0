//! The agent's HTTP face: `/flows` (the flow table and datapath health, as
//! JSON) and `/healthz`. Bound only after the configuration is validated and
//! the datapath is loaded; served until shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::{Json, Router, extract::State, routing::get};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{collector::Collector, datapath::DatapathStats, flows::FlowView};

/// The body of `GET /flows`.
#[derive(Debug, Serialize)]
pub struct FlowsReply {
    /// Interfaces the classifiers are attached to.
    pub interfaces: Vec<String>,
    /// Datapath counters (map-full failures and the like).
    pub stats: DatapathStats,
    /// Every directed pair in the flow table.
    pub pairs: Vec<FlowView>,
}

async fn flows(State(c): State<Arc<Collector>>) -> Json<FlowsReply> {
    let pairs = c.flows().views();
    Json(FlowsReply {
        interfaces: c.attached(),
        stats: c.stats(),
        pairs,
    })
}

/// Binds `addr`; the listener is returned so that bind errors surface
/// before anything else starts.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    collector: Arc<Collector>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/flows", get(flows))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(collector);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}
