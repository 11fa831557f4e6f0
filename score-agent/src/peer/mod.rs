//! The S-CORE peer protocol (paper §III-D/F) between agents, over UDP: a
//! thin shell ([`shell`]) over score-core's deterministic state machine
//! (`proto::Node`, docs/PROTOCOL.md), which does the token passing with
//! per-hop acknowledgements and chunking, token loss detection and
//! regeneration by epoch, the duplicate-token rule, membership, location
//! and capacity requests, flow reports, the global policy's coordinator
//! and swaps.
//!
//! A token for VM u is sent to u's own address; the eBPF program on u's vif
//! intercepts it (the guest never sees it) and this agent, u's host, holds
//! the token for u. The node decides; the shell asks the backend to
//! migrate, and reports the outcome back.
//!
//! One concern per file: [`shell`] (the task: socket, ring buffer, timer,
//! facts, backend), [`events`] (typed events to metrics, logs and
//! `/status`), [`node_config`] (the agent's configuration as the node's),
//! [`persist`] (the epoch kept across restarts), [`incarnation`] (the
//! incarnation kept across restarts), [`net`] (wall clock and socket
//! buffer), [`migcost`] (a traffic c_m learnt from the migrations made).

pub mod events;
pub mod incarnation;
pub mod migcost;
pub mod net;
pub mod node_config;
pub mod persist;
pub mod shell;

use std::{future::Future, net::Ipv4Addr, pin::Pin, sync::Arc, time::Duration};

use score_core::{
    proto::{MigrationOutcome, SwapOutcome},
    swap::Step,
    wire::{RejectReason, SwapRefusal},
};
use serde::Serialize;

use crate::datapath::HostedVm;

/// What the protocol reports as it runs; the agent's Prometheus metrics
/// implement it, tests use [`NoMetrics`].
pub trait PeerMetrics: Send + Sync {
    /// A token arrived for a hosted VM.
    fn token_received(&self) {}
    /// A token hop was acknowledged.
    fn token_passed(&self) {}
    /// A token hop was resent.
    fn token_retransmitted(&self) {}
    /// A hop was never acknowledged (its VM was skipped).
    fn token_lost(&self) {}
    /// This agent regenerated the token.
    fn token_regenerated(&self) {}
    /// The token epoch this agent is in.
    fn set_token_epoch(&self, _epoch: u64) {}
    /// The token's round.
    fn set_token_round(&self, _round: u64) {}
    /// A decision was evaluated for a hosted VM.
    fn decision_evaluated(&self) {}
    /// A migration ended with `outcome` (undefined counts as failed).
    fn migration(&self, _outcome: MigrationOutcome) {}
    /// A migration was done and took this long (reported with
    /// `migration("done")`, swap halves included).
    fn migration_duration(&self, _took: Duration) {}
    /// The bytes a VM's next migration is expected to send, as learnt (a
    /// traffic c_m only).
    fn migration_cost_bytes(&self, _bytes: f64) {}
    /// The benefit of a migration about to be made.
    fn observe_benefit(&self, _benefit: f64) {}
    /// A hosted VM's communication cost and level, as of its last decision.
    fn set_vm_cost(&self, _vm: Ipv4Addr, _cost: f64, _level: u8) {}
    /// A datagram was dropped, for `reason`.
    fn rejected(&self, _reason: RejectReason) {}
    /// A hosted VM migrated away: its series go now.
    fn vm_left(&self, _vm: Ipv4Addr) {}
    /// A swap this host proposed, and the other accepted, ended with
    /// `outcome`.
    fn swap(&self, _outcome: SwapOutcome) {}
    /// An ejection chain this host proposed, and the asked host accepted,
    /// ended with `outcome`.
    fn chain(&self, _outcome: SwapOutcome) {}
    /// A rotation this host proposed, and the asked hosts closed, ended
    /// with `outcome`.
    fn rotation(&self, _outcome: SwapOutcome) {}
    /// A group move this host agreed (every destination reserved) ended
    /// with `outcome`.
    fn group_move(&self, _outcome: SwapOutcome) {}
    /// This host answered a swap proposal: accepted (`None`), or refused.
    fn swap_request(&self, _refused: Option<SwapRefusal>) {}
}

/// Metrics that go nowhere.
#[derive(Debug, Default)]
pub struct NoMetrics;

impl PeerMetrics for NoMetrics {}

/// What a migration attempt came to.
#[derive(Clone, Debug, PartialEq)]
pub enum MigrationResult {
    /// The VM runs on the target now.
    Done(Duration),
    /// Advisory mode: nothing moved.
    Advisory,
    /// It failed and the VM still runs at the source.
    Failed(String),
    /// It failed and where the VM runs is not known: reported, not retried.
    Undefined(String),
}

/// The hypervisor, as the protocol sees it: move this VM to that host.
pub type Migrator = Arc<
    dyn Fn(HostedVm, Ipv4Addr) -> Pin<Box<dyn Future<Output = MigrationResult> + Send>>
        + Send
        + Sync,
>;

/// The last decision this agent made, for /status and logs.
#[derive(Clone, Debug, Serialize)]
pub struct DecisionRecord {
    /// The VM decided for.
    pub vm: Ipv4Addr,
    /// The token epoch.
    pub epoch: u64,
    /// score-core's decision (a migration, a stay or a swap), with its
    /// numbers.
    pub decision: Step,
    /// What the backend did, if asked.
    pub outcome: Option<String>,
}

#[cfg(test)]
mod tests {
    use score_core::{
        decision::{Decision, StayReason},
        swap::Swap,
    };

    use super::*;

    /// /status shows each decision with its kind: the paper's decisions as
    /// before (under `decision`), swaps with both VMs.
    #[test]
    fn decision_records_serialise_for_status() {
        let stay = DecisionRecord {
            vm: Ipv4Addr::new(10, 0, 0, 1),
            epoch: 3,
            decision: Step::Single(Decision::Stay {
                vm: 1,
                host: 0,
                cost_before: 2.0,
                level: 1,
                reason: StayReason::NoPeers,
            }),
            outcome: None,
        };
        let v = serde_json::to_value(&stay).unwrap();
        assert_eq!(v["decision"]["step"], "single");
        assert_eq!(v["decision"]["decision"], "stay");
        assert_eq!(v["decision"]["reason"]["reason"], "no-peers");
        let swap = DecisionRecord {
            decision: Step::Swap(Swap {
                vm: 1,
                from: 0,
                to: 2,
                partner: 4,
                cost_before: 10.0,
                cost_after: 0.0,
                partner_cost_before: 5.0,
                partner_cost_after: 0.0,
                benefit: 30.0,
                c_m: 0.0,
                level_after: 0,
                partner_level_after: 0,
                asked: 2,
            }),
            outcome: Some("swap done".into()),
            ..stay
        };
        let v = serde_json::to_value(&swap).unwrap();
        assert_eq!(v["decision"]["step"], "swap");
        assert_eq!(v["decision"]["partner"], 4);
        assert_eq!(v["outcome"], "swap done");
    }
}
