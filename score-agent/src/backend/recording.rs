//! A fake backend for tests of the decision loop: it records every call
//! and answers with the results a test queued, so that failure handling
//! (still at source, undefined, time-outs) is testable without root.

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use super::{BackendError, HostRef, MigrationReport, VmRef};

/// One call made to a [`RecordingBackend`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationCall {
    /// The VM asked to move.
    pub vm: VmRef,
    /// Where to.
    pub to: HostRef,
}

#[derive(Debug, Default)]
struct State {
    calls: Vec<MigrationCall>,
    queued: VecDeque<Result<MigrationReport, BackendError>>,
}

/// Records calls; answers each with the next queued result, or with a
/// success when the queue is empty. Optionally takes `delay` per call
/// (a `tokio::time::sleep`, so paused test clocks drive it). Clones share
/// the record and the queue: a test keeps one and gives the agent
/// `Backend::Recording(fake.clone())`.
#[derive(Clone, Debug, Default)]
pub struct RecordingBackend {
    state: Arc<Mutex<State>>,
    delay: Duration,
}

impl RecordingBackend {
    /// A fake whose calls succeed at once.
    pub fn new() -> Self {
        Self::default()
    }

    /// A fake whose every call takes `delay` before answering.
    pub fn with_delay(delay: Duration) -> Self {
        RecordingBackend {
            state: Arc::default(),
            delay,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding the lock has already failed;
        // the data is still fine to read.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues the answer to a later call (first queued, first answered).
    pub fn push_result(&self, result: Result<MigrationReport, BackendError>) {
        self.state().queued.push_back(result);
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<MigrationCall> {
        self.state().calls.clone()
    }

    /// Records the call and answers it.
    pub async fn migrate(&self, vm: &VmRef, to: &HostRef) -> Result<MigrationReport, BackendError> {
        let answer = {
            let mut s = self.state();
            s.calls.push(MigrationCall {
                vm: vm.clone(),
                to: *to,
            });
            s.queued.pop_front()
        };
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        answer.unwrap_or(Ok(MigrationReport {
            duration: self.delay,
            advisory: false,
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;
    use crate::backend::{Backend, Placement};

    fn vm() -> VmRef {
        VmRef {
            ip: Ipv4Addr::new(198, 18, 1, 5),
            mac: [0, 0x16, 0x3e, 0, 1, 5],
            vif: "vif5.0".into(),
        }
    }

    #[tokio::test]
    async fn records_calls_and_replays_queued_results() {
        let to = HostRef {
            addr: Ipv4Addr::new(198, 18, 0, 12),
        };
        let fake = RecordingBackend::new();
        let backend = Backend::Recording(fake.clone());
        fake.push_result(Err(BackendError::TimedOut {
            vm: vm().ip,
            to: to.addr,
            after: Duration::from_secs(1),
            placement: Placement::Unknown,
        }));
        let first = backend.migrate(&vm(), &to).await.unwrap_err();
        assert!(first.is_undefined());
        let second = backend.migrate(&vm(), &to).await.unwrap();
        assert!(!second.advisory);
        assert_eq!(
            fake.calls(),
            vec![
                MigrationCall { vm: vm(), to },
                MigrationCall { vm: vm(), to }
            ]
        );
    }

    #[tokio::test]
    async fn delay_is_taken_and_reported() {
        let fake = RecordingBackend::with_delay(Duration::from_millis(50));
        let start = std::time::Instant::now();
        let to = HostRef {
            addr: Ipv4Addr::new(198, 18, 0, 12),
        };
        let r = fake.migrate(&vm(), &to).await.unwrap();
        assert_eq!(r.duration, Duration::from_millis(50));
        assert!(start.elapsed() >= Duration::from_millis(50));
    }
}
