//! Ties the datapath to the host's interfaces and to the flow table: attach
//! to every interface that matches the patterns, now and as they come and
//! go, and drain the kernel counters into the flow table on an interval.
//! Shared by `watch` and `run`.

use std::{
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use tokio::io::unix::AsyncFd;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::IfacePatterns,
    datapath::{Datapath, DatapathError, DatapathStats},
    facts::HostSnapshot,
    flows::{FlowTable, Pair, Totals},
    links::{LinkEvent, LinkMonitor, current_links},
    metrics::{Metrics, PairSample},
};

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns`.
pub fn monotonic_ns() -> u64 {
    let ts = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// What the collector shares with the rest of the agent.
#[derive(Debug)]
pub struct Collector {
    datapath: Mutex<Datapath>,
    flows: Mutex<FlowTable>,
    stats: Mutex<DatapathStats>,
    patterns: IfacePatterns,
    evict: bool,
    metrics: Arc<Metrics>,
    /// When this collector started: pinned counters older than this are
    /// not this run's traffic (see [`Metrics::drain_pairs`]).
    started_ns: u64,
    /// Buffers every drain fills, kept from one drain to the next. None
    /// holds a slotted pair: those go from the slot array straight into
    /// the flow table and the metrics.
    scratch: Mutex<Scratch>,
    /// The host's facts as of the last drain, for the peer protocol.
    facts: tokio::sync::watch::Sender<Arc<HostSnapshot>>,
}

#[derive(Debug, Default)]
struct Scratch {
    /// The pairs read from the kernel's hash map (new since the last
    /// drain, or without a free slot).
    fresh: Vec<(Pair, Totals)>,
    hosted: Vec<std::net::Ipv4Addr>,
    /// The pairs with a rate, for the facts.
    rates: Vec<(Pair, f64)>,
}

impl Scratch {
    /// Gives memory back after a burst of new pairs, keeping room for
    /// growth.
    fn trim(&mut self) {
        let v = &mut self.fresh;
        if v.capacity() > 4 * v.len() + 1024 {
            v.shrink_to(2 * v.len());
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding the lock leaves plain data behind; keep going.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Collector {
    /// Wraps a loaded datapath. `evict` removes idle pairs from the kernel
    /// map too (the daemon); `watch` keeps everything it counted. Every
    /// drain is folded into `metrics`.
    pub fn new(
        datapath: Datapath,
        flows: FlowTable,
        patterns: IfacePatterns,
        evict: bool,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        let mut flows = flows;
        // The order drains come in: each drain walks the table once.
        flows.set_order(datapath.pair_order());
        Arc::new(Collector {
            datapath: Mutex::new(datapath),
            flows: Mutex::new(flows),
            stats: Mutex::new(DatapathStats::default()),
            patterns,
            evict,
            metrics,
            started_ns: monotonic_ns(),
            scratch: Mutex::new(Scratch::default()),
            facts: tokio::sync::watch::Sender::new(Arc::new(HostSnapshot::default())),
        })
    }

    /// [`Collector::new`] with metrics of the default size: for the
    /// benches, which time the daemon's own drain on their own handle of
    /// the maps.
    pub fn with_default_metrics(
        datapath: Datapath,
        flows: FlowTable,
        patterns: IfacePatterns,
        evict: bool,
    ) -> Arc<Self> {
        let metrics = Arc::new(Metrics::new(crate::metrics::DEFAULT_TOP_K));
        Self::new(datapath, flows, patterns, evict, metrics)
    }

    /// Attaches to every matching interface that exists now.
    pub fn attach_existing(&self) -> std::io::Result<usize> {
        let mut n = 0;
        for (name, index) in current_links()? {
            if self.on_event(&LinkEvent::Up { name, index }) {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Applies one link event; true if it attached a new interface.
    pub fn on_event(&self, ev: &LinkEvent) -> bool {
        match ev {
            LinkEvent::Up { name, index } if self.patterns.matches(name) => {
                match lock(&self.datapath).attach(name, *index) {
                    Ok(true) => {
                        info!(iface = %name, ifindex = index, "attached");
                        true
                    }
                    Ok(false) => false,
                    // The interface may vanish between event and attach; log
                    // and carry on: the agent must outlive any one VM.
                    Err(e) => {
                        warn!(iface = %name, error = %e, "attach failed");
                        false
                    }
                }
            }
            LinkEvent::Gone { name, .. } => {
                if lock(&self.datapath).forget(name).is_some() {
                    info!(iface = %name, "interface gone, detached");
                }
                false
            }
            LinkEvent::Up { .. } => false,
        }
    }

    /// Follows link events until cancelled.
    pub async fn follow(self: Arc<Self>, mut monitor: LinkMonitor, cancel: CancellationToken) {
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                batch = monitor.next() => match batch {
                    Ok(events) => for ev in &events { self.on_event(ev); },
                    Err(e) => {
                        // ENOBUFS: events were lost; rescan to catch up.
                        warn!(error = %e, "link monitor read failed; rescanning interfaces");
                        let _ = self.attach_existing();
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        }
    }

    /// One drain: snapshot the kernel map into the flow table, evict idle
    /// pairs, refresh the datapath statistics and the metrics. Blocking
    /// (map syscalls).
    pub fn drain(&self) -> Result<(), DatapathError> {
        let result = self.drain_once();
        if result.is_err() {
            self.metrics.drain_failed();
        }
        result
    }

    fn drain_once(&self) -> Result<(), DatapathError> {
        let started = std::time::Instant::now();
        let mut scratch = lock(&self.scratch);
        let Scratch {
            fresh,
            hosted,
            rates,
        } = &mut *scratch;
        // The pairs with a rate, for the protocol's facts (which keep only
        // those touching a hosted VM); an idle pair weighs nothing in
        // equation 1. A lone agent (no peer protocol) collects none.
        let want_facts = self.facts.receiver_count() > 0;
        rates.clear();
        let mut pairs = self.metrics.drain_pairs(self.started_ns);
        // The pairs go from the kernel's maps into the flow table and the
        // metrics one by one, in the table's order (no list of them); the
        // VM table is read after the pairs, so that every VM whose frames
        // were counted is already known as hosted.
        let (stats, attached, evicted, vms) = {
            let mut dp = lock(&self.datapath);
            // Moving pairs into slots waits for running classifiers: not
            // while holding the flow table, which readers want meanwhile.
            let stats = dp.drain_fresh(fresh)?;
            let mut flows = lock(&self.flows);
            let now = monotonic_ns();
            {
                let mut drain = flows.drain(now);
                dp.hand_over(fresh, |pair, totals| {
                    let (rate_bps, previous) = drain.push(pair, totals);
                    if want_facts && rate_bps > 0.0 {
                        rates.push((pair, rate_bps));
                    }
                    pairs.add(PairSample {
                        pair,
                        totals,
                        rate_bps,
                        previous,
                    });
                });
            }
            // Rates as of this drain were taken above, before eviction
            // forgets idle pairs.
            let evicted = if self.evict {
                flows.evict_idle(now)
            } else {
                Vec::new()
            };
            drop(flows);
            // One read of the VM table (none if no VM was learnt or
            // forgotten since the last), and one list made of it, serve
            // the metrics and the facts: the two name the same VMs, those
            // behind an attached interface (an entry pinned by an earlier
            // run for a vif gone since is not hosted here).
            let vms = dp.drain_hosted_vms()?;
            hosted.clear();
            hosted.extend(vms.iter().map(|v| v.ip));
            let vms = if want_facts { vms } else { Vec::new() };
            (stats, dp.attached_count(), evicted, vms)
        };
        if !evicted.is_empty() {
            let n = lock(&self.datapath).remove_pairs(&evicted)?;
            debug!(evicted = n, "idle pairs removed from the kernel map");
        }
        if want_facts {
            self.facts
                .send_replace(Arc::new(HostSnapshot::new(vms, rates, attached)));
        }
        let previous = std::mem::replace(&mut *lock(&self.stats), stats);
        if stats.flows_map_full > previous.flows_map_full {
            warn!(
                failed_updates = stats.flows_map_full,
                "flow map full: new pairs are not being counted (raise flows_max)"
            );
        }
        let took = started.elapsed();
        self.metrics
            .observe_drain_pairs(pairs, hosted, stats, attached, took);
        scratch.trim();
        debug!(elapsed_us = took.as_micros() as u64, "drained");
        Ok(())
    }

    /// The metrics every drain updates.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Drains every `interval` until cancelled, on a thread of its own that
    /// lives as long as the loop (map syscalls block) and keeps the time
    /// itself: one wake-up per drain. (Ticking in tokio and handing each
    /// drain to the thread took three: the timer, the thread, the reply.)
    /// Not tokio's blocking pool: its threads end after 10 s idle, so every
    /// drain of an interval longer than that would start and end a thread.
    pub async fn drain_loop(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        // Dropped when cancelled: the thread stops at its next wait.
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let me = self.clone();
        let worker = std::thread::Builder::new()
            .name("score-drain".into())
            .spawn(move || {
                let mut next = std::time::Instant::now();
                loop {
                    let wait = next.saturating_duration_since(std::time::Instant::now());
                    match stopped.recv_timeout(wait) {
                        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    // A panic is reported and the thread carries on with
                    // the next drain.
                    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| me.drain())) {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "drain failed"),
                        Err(_) => warn!("the drain panicked"),
                    }
                    // One drain per interval; a late one delays the next
                    // (no burst to catch up).
                    next += interval;
                    let now = std::time::Instant::now();
                    if next < now {
                        next = now + interval;
                    }
                }
            });
        if let Err(e) = worker {
            warn!(error = %e, "cannot start the drain thread; draining on tokio's blocking pool");
            return self.drain_pooled(interval, cancel).await;
        }
        cancel.cancelled().await;
        drop(stop);
    }

    /// [`Collector::drain_loop`] on tokio's blocking pool, where no thread
    /// of its own could be started.
    async fn drain_pooled(self: Arc<Self>, interval: Duration, cancel: CancellationToken) {
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let me = self.clone();
                    match tokio::task::spawn_blocking(move || me.drain()).await {
                        Ok(Ok(())) => {}
                        Ok(Err(e)) => warn!(error = %e, "drain failed"),
                        Err(e) => warn!(error = %e, "drain task failed"),
                    }
                }
            }
        }
    }

    /// The host's facts, republished at every drain (the peer protocol
    /// reads them without a lock).
    pub fn facts(&self) -> tokio::sync::watch::Receiver<Arc<HostSnapshot>> {
        self.facts.subscribe()
    }

    /// The flow table, for reading.
    pub fn flows(&self) -> MutexGuard<'_, FlowTable> {
        lock(&self.flows)
    }

    /// The datapath statistics as of the last drain.
    pub fn stats(&self) -> DatapathStats {
        *lock(&self.stats)
    }

    /// Runs `f` on the datapath, under its lock (blocking map syscalls:
    /// keep it short, or call from a blocking thread).
    pub fn with_datapath<R>(&self, f: impl FnOnce(&mut Datapath) -> R) -> R {
        f(&mut lock(&self.datapath))
    }

    /// Interfaces attached now.
    pub fn attached(&self) -> Vec<String> {
        lock(&self.datapath).attached()
    }

    /// Detaches from everything (clean shutdown).
    pub fn detach_all(&self) {
        lock(&self.datapath).detach_all();
    }

    /// Forwards the kernel's aya-log records into tracing until cancelled.
    pub fn forward_kernel_logs(&self, cancel: CancellationToken) {
        let Some(logger) = lock(&self.datapath).take_logger() else {
            debug!("the eBPF object carries no log ring");
            return;
        };
        // SAFETY: the logger owns the ring's fd, and the AsyncFd owns the
        // logger, so the fd stays open and the same for the AsyncFd's life.
        let mut fd = match unsafe { AsyncFd::register(logger) } {
            Ok(fd) => fd,
            Err(e) => {
                warn!(error = %e, "cannot poll the kernel log ring");
                return;
            }
        };
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    guard = fd.readable_mut() => match guard {
                        Ok(mut g) => {
                            g.get_inner_mut().flush();
                            g.clear_ready();
                        }
                        Err(_) => return,
                    },
                }
            }
        });
    }
}
