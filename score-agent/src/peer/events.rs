//! The protocol's typed events (score-core's `proto::Event`) turned into
//! what operators read: the metrics ([`PeerMetrics`]), the log lines, and
//! the protocol's side of `/status` (recent decisions with their outcome,
//! regenerated epochs, the last sighting of the token).

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::Instant,
};

use score_core::{
    decision::{Decision, MigrationCost},
    proto::{Event, MigrationOutcome, NoDecision, Node, SwapOutcome},
    swap::Step,
    token::VmId,
};
use tracing::{debug, info, warn};

use super::{DecisionRecord, MigrationResult, PeerMetrics};
use crate::status::{ProtocolStatus, ProtocolView};

/// Decisions kept for `/status`.
const DECISIONS_KEPT: usize = 32;

#[derive(Debug)]
struct Board {
    epoch: u64,
    last_seen: Instant,
    decisions: Vec<DecisionRecord>,
    regenerated: Vec<u64>,
}

/// The protocol's view for `/status`, fed by [`Events`].
#[derive(Debug, Clone)]
pub struct Seen(Arc<Mutex<Board>>);

impl Seen {
    fn board(&self) -> std::sync::MutexGuard<'_, Board> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl ProtocolView for Seen {
    fn protocol_status(&self) -> ProtocolStatus {
        let b = self.board();
        ProtocolStatus {
            epoch: b.epoch,
            token_seen_seconds_ago: b.last_seen.elapsed().as_secs_f64(),
            regenerated: b.regenerated.clone(),
            decisions: b
                .decisions
                .iter()
                .filter_map(|d| serde_json::to_value(d).ok())
                .collect(),
        }
    }
}

/// Where the events go.
pub struct Events {
    metrics: Arc<dyn PeerMetrics>,
    seen: Seen,
}

fn ip(vm: VmId) -> Ipv4Addr {
    Ipv4Addr::from(vm)
}

impl Events {
    /// Events feeding `metrics`; [`Events::view`] is the `/status` side.
    pub fn new(metrics: Arc<dyn PeerMetrics>) -> Self {
        Events {
            metrics,
            seen: Seen(Arc::new(Mutex::new(Board {
                epoch: 0,
                last_seen: Instant::now(),
                decisions: Vec::new(),
                regenerated: Vec::new(),
            }))),
        }
    }

    /// The protocol's side of `/status`.
    pub fn view(&self) -> Seen {
        self.seen.clone()
    }

    fn record(&self, vm: VmId, epoch: u64, decision: Step) {
        let mut b = self.seen.board();
        b.decisions.push(DecisionRecord {
            vm: ip(vm),
            epoch,
            decision,
            outcome: None,
        });
        if b.decisions.len() > DECISIONS_KEPT {
            b.decisions.remove(0);
        }
    }

    fn outcome(&self, vm: VmId, outcome: String) {
        let mut b = self.seen.board();
        if let Some(d) = b.decisions.iter_mut().rev().find(|d| d.vm == ip(vm)) {
            d.outcome = Some(outcome);
        }
    }

    /// One event of `node`.
    pub fn on(&self, e: &Event, node: &Node) {
        let m = &self.metrics;
        match e {
            Event::Rejected { reason } => {
                debug!(reason = reason.label(), "datagram rejected");
                m.rejected(*reason);
            }
            Event::TokenReceived { vm, stamp } => {
                m.token_received();
                m.set_token_epoch(stamp.epoch);
                m.set_token_round(u64::from(stamp.round));
                self.seen.board().last_seen = Instant::now();
                info!(
                    vm = %ip(*vm),
                    epoch = stamp.epoch,
                    round = stamp.round,
                    visited = stamp.visited,
                    "token received"
                );
            }
            Event::TokenPassed { to, epoch } => {
                m.token_passed();
                debug!(to = %ip(*to), epoch, "token passed");
            }
            Event::TokenRetransmitted => m.token_retransmitted(),
            Event::HopSkipped { vm, epoch } => {
                m.token_lost();
                warn!(vm = %ip(*vm), epoch, "no host acknowledged the token for this VM; skipping it");
            }
            Event::TokenDropped { epoch } => {
                warn!(
                    epoch,
                    "no VM's host acknowledged the token; it will be regenerated"
                );
            }
            Event::TokenRegenerated { epoch, vms } => {
                m.token_regenerated();
                let mut b = self.seen.board();
                b.regenerated.push(*epoch);
                b.last_seen = Instant::now();
                info!(epoch, vms, "token regenerated");
            }
            Event::TokenSuperseded { mine } => {
                info!(
                    epoch = mine.epoch,
                    round = mine.round,
                    "a newer copy of the token exists; this one ends here"
                );
            }
            Event::RoundComplete { epoch, round } => {
                m.set_token_round(u64::from(*round));
                info!(epoch, round, "token round complete");
            }
            Event::EpochAdopted { epoch } => {
                m.set_token_epoch(*epoch);
                self.seen.board().epoch = *epoch;
                info!(epoch, "adopted a newer token epoch");
            }
            Event::Decided { decision } => {
                m.decision_evaluated();
                let (Decision::Migrate { vm, .. } | Decision::Stay { vm, .. }) = *decision;
                let level = match decision {
                    Decision::Stay { level, .. } => *level,
                    Decision::Migrate { level_after, .. } => *level_after,
                };
                m.set_vm_cost(ip(vm), decision.cost_before(), level);
                if let Decision::Migrate { benefit, .. } = decision {
                    m.observe_benefit(*benefit);
                }
                self.record(vm, node.epoch(), Step::Single(*decision));
            }
            Event::NotDecided { vm, why } => {
                // The earlier peer evaluated a held-down VM's decision and
                // reported it held down: count it as evaluated still.
                if *why == NoDecision::HeldDown {
                    m.decision_evaluated();
                    info!(vm = %ip(*vm), "held down: the VM moved recently; no decision");
                } else {
                    debug!(vm = %ip(*vm), ?why, "no decision");
                }
            }
            Event::SwapAgreed { swap, order } => {
                m.decision_evaluated();
                m.observe_benefit(swap.benefit);
                info!(vm = %ip(swap.vm), partner = %ip(swap.partner), benefit = swap.benefit, c_m = swap.c_m, ?order, "swapping");
                self.record(swap.vm, node.epoch(), Step::Swap(*swap));
            }
            Event::SwapFinished {
                vm,
                partner,
                outcome,
            } => {
                let name = match outcome {
                    SwapOutcome::Done => "done",
                    SwapOutcome::Partial => "partial",
                    SwapOutcome::Failed => "failed",
                    SwapOutcome::Advisory => "advisory",
                };
                if *outcome == SwapOutcome::Partial {
                    warn!(vm = %ip(*vm), partner = %ip(*partner), "swap half done");
                }
                info!(vm = %ip(*vm), partner = %ip(*partner), outcome = name, "swap {name}");
                m.swap(*outcome);
                self.outcome(*vm, format!("swap {name}"));
            }
            // Ejection chains (off by default, `proto::Config::chains`):
            // logged, kept for /status, counted by `score_chains_total`.
            Event::ChainAgreed { chain, order } => {
                m.decision_evaluated();
                m.observe_benefit(chain.benefit);
                info!(vm = %ip(chain.vm), partner = %ip(chain.partner), benefit = chain.benefit, c_m = chain.c_m, ?order, "ejection chain");
            }
            Event::ChainFinished {
                vm,
                partner,
                outcome,
            } => {
                if *outcome == SwapOutcome::Partial {
                    warn!(vm = %ip(*vm), partner = %ip(*partner), "ejection chain half done");
                }
                info!(vm = %ip(*vm), partner = %ip(*partner), ?outcome, "ejection chain ended");
                m.chain(*outcome);
                self.outcome(*vm, format!("chain {outcome:?}").to_lowercase());
            }
            // Rotations (off by default, `proto::Config::rotations`):
            // logged, kept for /status, counted by `score_rotations_total`.
            Event::RotationAgreed { rotation } => {
                m.decision_evaluated();
                m.observe_benefit(rotation.benefit);
                let [(u, ..), (w, ..), (v, ..)] = rotation.moves;
                info!(vm = %ip(u), partner = %ip(w), third = %ip(v), benefit = rotation.benefit, c_m = rotation.c_m, "rotation");
            }
            Event::RotationFinished { vm, outcome } => {
                if *outcome == SwapOutcome::Partial {
                    warn!(vm = %ip(*vm), "rotation partly done");
                }
                info!(vm = %ip(*vm), ?outcome, "rotation ended");
                m.rotation(*outcome);
                self.outcome(*vm, format!("rotation {outcome:?}").to_lowercase());
            }
            // Group moves (off by default, `proto::Config::groups`):
            // logged, kept for /status, counted by
            // `score_group_moves_total`.
            Event::GroupAgreed { group } => {
                m.decision_evaluated();
                m.observe_benefit(group.benefit);
                let to: Vec<String> = group
                    .moves
                    .iter()
                    .map(|&(v, h)| format!("{}->host#{h}", ip(v)))
                    .collect();
                info!(vm = %ip(group.vm), members = group.moves.len(), moves = ?to, benefit = group.benefit, c_m = group.c_m, "group move");
            }
            Event::GroupFinished { vm, moved, outcome } => {
                if *outcome == SwapOutcome::Partial {
                    warn!(vm = %ip(*vm), moved, "group move partly done");
                }
                info!(vm = %ip(*vm), moved, ?outcome, "group move ended");
                m.group_move(*outcome);
                self.outcome(*vm, format!("group {outcome:?}").to_lowercase());
            }
            Event::SwapRefused { vm, by, reason } => {
                info!(vm = %ip(*vm), host = %by, reason = reason.name(), "swap refused");
            }
            Event::SwapAnswered { vm, answer } => match answer {
                Ok(partner) => {
                    info!(vm = %ip(*vm), partner = %ip(*partner), "swap proposal accepted; partner reserved");
                    m.swap_request(None);
                }
                Err(reason) => {
                    info!(vm = %ip(*vm), reason = reason.name(), "swap proposal refused");
                    m.swap_request(Some(*reason));
                }
            },
            Event::OrderReceived { vms } => debug!(vms, "global order"),
            Event::MigrationStarted { .. } => {}
            Event::MigrationFinished { vm, outcome } => {
                if *outcome == MigrationOutcome::Done {
                    m.vm_left(ip(*vm));
                }
            }
        }
    }

    /// How the backend's migration of `vm` to `to` ended (the shell times
    /// it, the node only hears the outcome).
    /// c_m is now `cm` (a traffic c_m, learnt from the migrations made).
    pub fn migration_cost(&self, cm: MigrationCost) {
        if let MigrationCost::Traffic { bytes, horizon_s } = cm {
            self.metrics.migration_cost_bytes(bytes);
            info!(
                expected_bytes = bytes as u64,
                horizon_s, "migration cost: a migration is expected to send"
            );
        }
    }

    pub fn migration_result(&self, vm: VmId, to: Ipv4Addr, result: &MigrationResult) {
        let m = &self.metrics;
        let vm_ip = ip(vm);
        match result {
            MigrationResult::Done(took) => {
                info!(vm = %vm_ip, to = %to, seconds = took.as_secs_f64(), "migration done");
                // The duration first: a scrape that sees the count sees it.
                m.migration_duration(*took);
                m.migration(MigrationOutcome::Done);
            }
            MigrationResult::Advisory => {
                info!(vm = %vm_ip, to = %to, "advisory: would migrate");
                m.migration(MigrationOutcome::Advisory);
            }
            MigrationResult::Failed(e) => {
                warn!(vm = %vm_ip, to = %to, error = %e, "migration failed; VM stays");
                m.migration(MigrationOutcome::Failed);
            }
            MigrationResult::Undefined(e) => {
                warn!(vm = %vm_ip, to = %to, error = %e, "migration outcome unknown; not retried");
                m.migration(MigrationOutcome::Undefined);
            }
        }
        self.outcome(vm, format!("{result:?}"));
    }
}
