//! score-agent: the S-CORE daemon of one hypervisor host. It loads the
//! eBPF counters onto the VM backend interfaces, keeps a flow table of
//! per-pair rates, and (with the peer protocol) takes part in the token
//! ring. The binary is a thin shell over this library.

pub mod backend;
pub mod caps;
// Exempt until cluster.rs's next change: its serde default functions are
// `pub` inside a private module.
#[allow(unreachable_pub)]
pub mod cluster;
pub mod collector;
pub mod config;
pub mod daemon;
pub mod datapath;
pub mod distributed;
pub mod facts;
pub mod flows;
pub(crate) mod http;
pub(crate) mod links;
pub(crate) mod metrics;
pub mod peer;
pub mod status;
pub mod watch;

/// Everything that can stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Bad configuration (exit code 2).
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The kernel side failed.
    #[error(transparent)]
    Datapath(#[from] datapath::DatapathError),
    /// The netlink socket for link events failed.
    #[error("netlink: {0}")]
    Netlink(std::io::Error),
    /// The HTTP address could not be bound.
    #[error("binding {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The state directory (the incarnation counter) cannot be written.
    #[error("state directory {}: {source}", path.display())]
    State {
        /// The directory.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The hypervisor backend cannot run here.
    #[error(transparent)]
    Backend(backend::BackendConfigError),
    /// A background task died.
    #[error("task failed: {0}")]
    Task(String),
}
