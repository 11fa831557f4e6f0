//! The agent's HTTP face: `/metrics` (Prometheus text format), `/flows`
//! (the flow table and datapath health, as JSON), `/status` (what
//! `score-agent status` prints, as JSON) and `/healthz`. Bound only
//! after the configuration is validated and the datapath is loaded; served
//! until shutdown.

use std::{net::SocketAddr, sync::Arc};

use axum::{
    Json, Router, extract::State, http::header::CONTENT_TYPE, response::IntoResponse, routing::get,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::{
    collector::Collector,
    datapath::DatapathStats,
    flows::FlowView,
    metrics::Metrics,
    status::{self, StatusBoard},
};

/// What the handlers share.
#[derive(Clone, Debug)]
pub(crate) struct AppState {
    /// The flow table and datapath.
    pub collector: Arc<Collector>,
    /// The agent's metrics.
    pub metrics: Arc<Metrics>,
    /// The protocol's view and the migrations in flight, for `/status`.
    pub board: Arc<StatusBoard>,
}

impl AppState {
    /// The collector, the metrics it updates, and the status board.
    pub(crate) fn new(collector: Arc<Collector>, board: Arc<StatusBoard>) -> Self {
        AppState {
            metrics: collector.metrics().clone(),
            collector,
            board,
        }
    }
}

/// The body of `GET /flows`.
#[derive(Debug, Serialize)]
pub(crate) struct FlowsReply {
    /// Interfaces the classifiers are attached to.
    pub interfaces: Vec<String>,
    /// Datapath counters (map-full failures and the like).
    pub stats: DatapathStats,
    /// Every directed pair in the flow table.
    pub pairs: Vec<FlowView>,
}

async fn flows(State(state): State<AppState>) -> Json<FlowsReply> {
    let c = &state.collector;
    let pairs = c.flows().views();
    Json(FlowsReply {
        interfaces: c.attached(),
        stats: c.stats(),
        pairs,
    })
}

async fn status(State(state): State<AppState>) -> Json<status::Status> {
    // Reading the maps is a syscall per map: off the async threads.
    let s =
        tokio::task::spawn_blocking(move || status::snapshot(&state.collector, &state.board)).await;
    match s {
        Ok(s) => Json(s),
        // The snapshot only reads; a panic in it is a bug worth a crash
        // report rather than a half answer.
        Err(e) => std::panic::resume_unwind(e.into_panic()),
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let m = &state.metrics;
    ([(CONTENT_TYPE, m.content_type())], m.render())
}

/// Binds `addr`; the listener is returned so that bind errors surface
/// before anything else starts.
pub(crate) async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}

/// Serves until `cancel` fires.
pub(crate) async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route("/metrics", get(metrics))
        .route("/flows", get(flows))
        .route("/status", get(status))
        .route("/healthz", get(|| async { "ok\n" }))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}
