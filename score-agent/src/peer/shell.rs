//! The thin I/O shell over score-core's protocol state machine
//! (`proto::Node`, the quinn / quinn-proto split): one task owns the node
//! and feeds it the UDP socket (datagrams to this host), the eBPF ring
//! buffer (datagrams to hosted VMs, intercepted by the classifier), its
//! timer (`poll_timeout`), the collector's published facts and the
//! outcomes of the migrations it asked for; it sends what the node says
//! to send, starts the migrations on the backend, writes the state to
//! keep, and hands every typed event to [`super::events`].
//!
//! It never takes the datapath's lock: the facts come from the snapshot
//! the collector publishes at each drain, and the ring is read through
//! its own file descriptor.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    sync::Arc,
    time::{Duration, Instant},
};

use score_core::{
    proto::{MigrationOutcome, Node, Output, Persisted},
    token::VmId,
};
use tokio::{net::UdpSocket, sync::watch, task::JoinSet};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::{
    MigrationResult, Migrator, PeerMetrics, events::Events, migcost, net, node_config, persist,
};
use crate::{
    cluster::ClusterSettings,
    datapath::{ControlReader, HostedVm},
    facts::HostSnapshot,
};

/// Wall-clock nanoseconds since the Unix epoch: the node's time.
pub fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// The shell's parts.
pub struct Shell {
    node: Node,
    sock: UdpSocket,
    me: Ipv4Addr,
    port: u16,
    migrate: Migrator,
    /// The latest facts' VMs, for the backend's calls.
    hosted: HashMap<VmId, HostedVm>,
    moving: JoinSet<(VmId, Ipv4Addr, MigrationResult)>,
    persist: persist::StateFile,
    events: Events,
    /// A traffic c_m's estimate, learnt from the migrations done here.
    learner: Option<migcost::Learner>,
}

impl Shell {
    /// Binds the protocol port and builds the node.
    pub async fn bind(
        node: Node,
        port: u16,
        migrate: Migrator,
        persist: persist::StateFile,
        events: Events,
        learner: Option<migcost::Learner>,
    ) -> std::io::Result<Shell> {
        let me = node.me();
        let sock = UdpSocket::bind(SocketAddrV4::new(me, port)).await?;
        let rcvbuf = net::raise_receive_buffer(&sock, net::RECEIVE_BUFFER_BYTES)?;
        debug!(bytes = rcvbuf, "socket receive buffer");
        Ok(Shell {
            node,
            sock,
            me,
            port,
            migrate,
            hosted: HashMap::new(),
            moving: JoinSet::new(),
            persist,
            events,
            learner,
        })
    }

    /// Runs the node until `cancel`. A migration under way is not cut: the
    /// backend bounds it, and its task ends with the runtime.
    pub async fn run(
        mut self,
        control: ControlReader,
        mut facts: watch::Receiver<Arc<HostSnapshot>>,
        cancel: CancellationToken,
    ) -> std::io::Result<()> {
        // SAFETY: the reader owns the ring's fd and the AsyncFd owns the
        // reader.
        let mut ring = unsafe { tokio::io::unix::AsyncFd::register(control) }?;
        let mut buf = vec![0u8; 2048];
        let snapshot = facts.borrow_and_update().clone();
        self.set_facts(&snapshot);
        self.flush().await;
        loop {
            let wake = self.node.poll_timeout().map(|t| {
                let now = wall_ns();
                tokio::time::Instant::now() + Duration::from_nanos(t.saturating_sub(now))
            });
            tokio::select! {
                _ = cancel.cancelled() => {
                    // A migration under way runs to its end (the backend
                    // bounds it); dropping the set would cut it.
                    self.moving.detach_all();
                    return Ok(());
                }
                r = self.sock.recv_from(&mut buf) => match r {
                    Ok((n, _)) => self.node.handle_datagram(wall_ns(), self.me, &buf[..n]),
                    Err(e) => debug!(error = %e, "protocol socket read failed"),
                },
                g = ring.readable_mut() => {
                    let mut g = g?;
                    let items = g.get_inner_mut().drain();
                    g.clear_ready();
                    for item in items {
                        self.node.handle_datagram(wall_ns(), item.vm, &item.payload);
                    }
                }
                () = sleep_until(wake) => self.node.handle_timeout(wall_ns()),
                changed = facts.changed() => {
                    if changed.is_err() {
                        return Ok(());
                    }
                    let snapshot = facts.borrow_and_update().clone();
                    self.set_facts(&snapshot);
                }
                Some(done) = self.moving.join_next() => {
                    if let Ok((vm, to, result)) = done {
                        self.migration_ended(vm, to, &result);
                    }
                }
            }
            self.flush().await;
        }
    }

    fn set_facts(&mut self, snapshot: &HostSnapshot) {
        self.hosted = snapshot
            .vms
            .iter()
            .map(|v| (u32::from(v.ip), v.clone()))
            .collect();
        self.node.set_facts(wall_ns(), &snapshot.facts());
    }

    fn migration_ended(&mut self, vm: VmId, to: Ipv4Addr, result: &MigrationResult) {
        let outcome = match result {
            MigrationResult::Done(_) => MigrationOutcome::Done,
            MigrationResult::Advisory => MigrationOutcome::Advisory,
            MigrationResult::Failed(_) => MigrationOutcome::Failed,
            MigrationResult::Undefined(_) => MigrationOutcome::Undefined,
        };
        self.events.migration_result(vm, to, result);
        if let (MigrationResult::Done(took), Some(l)) = (result, self.learner.as_mut())
            && let Some(cm) = l.migrated(vm, *took)
        {
            self.node.set_migration_cost(cm);
            self.events.migration_cost(cm);
        }
        self.node.migration_done(wall_ns(), vm, outcome);
    }

    /// Carries out everything the node asked for, in order: a state to
    /// keep is written before anything after it is sent.
    async fn flush(&mut self) {
        while let Some(o) = self.node.poll_output() {
            match o {
                Output::Send { to, bytes } => {
                    if let Err(e) = self
                        .sock
                        .send_to(&bytes, SocketAddrV4::new(to, self.port))
                        .await
                    {
                        debug!(to = %to, error = %e, "send failed");
                    }
                }
                Output::Migrate { vm, to } => match self.hosted.get(&vm).cloned() {
                    Some(h) => {
                        info!(vm = %h.ip, to = %to, "migrating");
                        let migrate = self.migrate.clone();
                        self.moving.spawn(async move {
                            let started = Instant::now();
                            let r = migrate(h, to).await;
                            debug!(
                                seconds = started.elapsed().as_secs_f64(),
                                "backend returned"
                            );
                            (vm, to, r)
                        });
                    }
                    None => {
                        warn!(vm = %Ipv4Addr::from(vm), "the VM to migrate is no longer here");
                        self.node
                            .migration_done(wall_ns(), vm, MigrationOutcome::Failed);
                    }
                },
                Output::Persist(p) => write_state(self.persist.clone(), p).await,
            }
            while let Some(e) = self.node.poll_event() {
                self.events.on(&e, &self.node);
            }
        }
        while let Some(e) = self.node.poll_event() {
            self.events.on(&e, &self.node);
        }
    }
}

/// Writes the state to keep: a small file and an fsync, off the async
/// threads.
async fn write_state(file: persist::StateFile, p: Persisted) {
    match tokio::task::spawn_blocking(move || file.write(p)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %e, "could not keep the protocol state"),
        Err(e) => warn!(error = %e, "state writer failed"),
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// What the shell is given at its start, besides the configuration.
pub struct Parts {
    /// Where the events' numbers go.
    pub metrics: Arc<dyn PeerMetrics>,
    /// The backend.
    pub migrate: Migrator,
    /// The backend only advises.
    pub advisory: bool,
    /// The ring buffer of intercepted datagrams.
    pub control: ControlReader,
    /// The collector's published facts.
    pub facts: watch::Receiver<Arc<HostSnapshot>>,
    /// This run's incarnation, raised and kept at `started_ms`.
    pub incarnation: u32,
    /// Wall-clock ms of the run's start, before the classifiers attached.
    pub started_ms: u64,
}

/// Starts the protocol for this run: binds the port, builds the node from
/// `cfg` with the epoch kept in the state directory, and spawns the
/// shell's task. Returns the `/status` view and the task.
pub async fn start(
    cfg: &ClusterSettings,
    parts: Parts,
    cancel: CancellationToken,
) -> std::io::Result<(super::events::Seen, tokio::task::JoinHandle<()>)> {
    let Parts {
        metrics,
        migrate,
        advisory,
        control,
        facts,
        incarnation,
        started_ms,
    } = parts;
    let state = persist::StateFile::new(&cfg.peer.state_dir, cfg.node.address);
    let persisted = Persisted {
        // The node raises it again: the run's own is the one on disk.
        incarnation: incarnation.wrapping_sub(1),
        epoch: state.epoch()?,
    };
    let node_cfg = node_config::node_config(cfg, advisory, started_ms);
    let keys = node_cfg.keys.len();
    // The freshness floor is the run's start, not now: datagrams the
    // classifiers queued since are this run's.
    let node = Node::new(node_cfg, persisted, started_ms.saturating_mul(1_000_000));
    let events = Events::new(metrics);
    let view = events.view();
    let learner = migcost::Learner::new(
        cfg.migration_cost,
        cfg.node.vm_memory_mib,
        cfg.policy.migration_link_bytes_per_second,
    );
    if let Some(l) = &learner {
        events.migration_cost(l.cost());
    }
    let shell = Shell::bind(node, cfg.peer.port, migrate, state, events, learner).await?;
    info!(incarnation, keys, "peer listening");
    let task = tokio::spawn(async move {
        if let Err(e) = shell.run(control, facts, cancel).await {
            warn!(error = %e, "the peer protocol stopped");
        }
    });
    Ok((view, task))
}
