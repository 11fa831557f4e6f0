//! The protocol's `Node` on a tiny lossless network driven here (the
//! seeded fault runs are score-sim's): what the agent needs of it besides
//! the token ring, advisory mode and the global policy's coordinator.

use std::collections::{BTreeMap, VecDeque};
use std::net::Ipv4Addr;
use std::sync::Arc;

use score_core::decision::{Decision, Rule};
use score_core::policy::PolicyKind;
use score_core::proto::{
    Config, Event, HostFacts, MigrationOutcome, Node, Output, Persisted, SwapOutcome, VmFacts,
};
use score_core::swap::{CandidateSet, Scope};
use score_core::token::VmId;
use score_core::topology::{LinkWeights, Topology};
use score_core::wire::{ClusterKey, Datagram, Header, KeyRing, Kind, Message, RejectReason};

const SEC: u64 = 1_000_000_000;
const MS: u64 = 1_000_000;
/// A plausible wall-clock start, as the daemon's clock gives.
const T0: u64 = 1_750_000_000 * SEC;

fn vm(i: u8) -> VmId {
    u32::from(Ipv4Addr::new(10, 1, 0, i))
}

/// Four hosts, two racks of two: 10.0.0.1-2 | 10.0.0.3-4.
fn topology() -> Arc<Topology> {
    Arc::new(
        Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap(),
    )
}

/// Something a test does to the data centre mid-run.
type Hook = fn(&mut Dc);

/// Four hosts, two racks of two (10.0.0.1-2 | 10.0.0.3-4), every node
/// driven in one thread; datagrams arrive 1 ms after they are sent, in
/// order; migrations end `migration_ns` after they start, with the
/// outcome `outcome` gives (a done one moves the VM).
struct Dc {
    topo: Arc<Topology>,
    nodes: Vec<Node>,
    /// Where each VM runs.
    at: BTreeMap<VmId, usize>,
    /// Rates between VM pairs, bytes/s.
    traffic: Vec<(VmId, VmId, f64)>,
    now: u64,
    wire: VecDeque<(u64, usize, Ipv4Addr, Vec<u8>)>,
    moves: VecDeque<(u64, usize, VmId, usize)>,
    outcome: fn(VmId) -> MigrationOutcome,
    migration_ns: u64,
    events: Vec<(usize, Event)>,
    /// Every datagram sent: (sender index, address, bytes).
    sent: Vec<(usize, Ipv4Addr, Vec<u8>)>,
    /// Datagrams of this kind are lost.
    drop_kind: Option<Kind>,
    /// Before the first datagram of this kind is delivered, this is done.
    before_kind: Option<(Kind, Hook)>,
    /// The most VMs any host ran at once.
    peak: usize,
}

impl Dc {
    fn new(
        placement: &[(VmId, usize)],
        traffic: &[(VmId, VmId, f64)],
        cfg: impl Fn(&mut Config),
    ) -> Dc {
        let topo = topology();
        let key = ClusterKey::new(b"the tests' cluster key, 32 bytes").unwrap();
        let watchers = vec![topo.host_addr(0), topo.host_addr(1)];
        let nodes = (0..4)
            .map(|h| {
                let mut c = Config::new(
                    topo.host_addr(h),
                    topo.clone(),
                    KeyRing::new(key.clone()),
                    watchers.clone(),
                );
                c.vm_slots = 2;
                c.token_hold_ns = 100 * MS;
                c.token_timeout_ns = 2 * SEC;
                c.report_interval_ns = SEC;
                c.hold_down_ns = 30 * SEC;
                c.rule = Rule::PaperFirst;
                cfg(&mut c);
                Node::new(c, Persisted::default(), T0 + u64::from(h) * MS)
            })
            .collect();
        let mut dc = Dc {
            topo,
            nodes,
            at: placement.iter().copied().collect(),
            traffic: traffic.to_vec(),
            now: T0,
            wire: VecDeque::new(),
            moves: VecDeque::new(),
            outcome: |_| MigrationOutcome::Done,
            migration_ns: 500 * MS,
            events: Vec::new(),
            sent: Vec::new(),
            drop_kind: None,
            before_kind: None,
            peak: 0,
        };
        for h in 0..4 {
            dc.refresh(h);
        }
        dc
    }

    fn facts(&self, h: usize) -> HostFacts {
        let vms = self
            .at
            .iter()
            .filter(|&(_, &at)| at == h)
            .map(|(&id, _)| VmFacts {
                id,
                peers: self
                    .traffic
                    .iter()
                    .filter_map(|&(a, b, r)| match (a == id, b == id) {
                        (true, false) => Some((b, r)),
                        (false, true) => Some((a, r)),
                        _ => None,
                    })
                    .collect(),
                undefined: false,
            })
            .collect();
        HostFacts { vms, unnamed: 0 }
    }

    fn refresh(&mut self, h: usize) {
        let f = self.facts(h);
        self.nodes[h].set_facts(self.now, &f);
    }

    fn host_index(&self, a: Ipv4Addr) -> Option<usize> {
        self.topo.host_by_addr(a).map(|h| h as usize)
    }

    /// Takes every node's outputs and events.
    fn collect(&mut self) {
        for h in 0..self.nodes.len() {
            while let Some(o) = self.nodes[h].poll_output() {
                match o {
                    Output::Send { to, bytes } => {
                        self.sent.push((h, to, bytes.clone()));
                        let dest = self
                            .host_index(to)
                            .or_else(|| self.at.get(&u32::from(to)).copied());
                        if let Some(d) = dest {
                            self.wire.push_back((self.now + MS, d, to, bytes));
                        }
                    }
                    Output::Migrate { vm, to } => {
                        let to = self.host_index(to).unwrap();
                        self.moves
                            .push_back((self.now + self.migration_ns, h, vm, to));
                    }
                    Output::Persist(_) => {}
                }
            }
            while let Some(e) = self.nodes[h].poll_event() {
                self.events.push((h, e));
            }
        }
    }

    /// Runs until `until` (ns after the start).
    fn run(&mut self, until: u64) {
        let end = T0 + until;
        loop {
            self.collect();
            let wake = (0..self.nodes.len())
                .filter_map(|h| self.nodes[h].poll_timeout())
                .min();
            let next = [
                self.wire.front().map(|w| w.0),
                self.moves.front().map(|m| m.0),
                wake,
            ]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(end);
            if next > end {
                return;
            }
            self.now = self.now.max(next);
            let now = self.now;
            if self.wire.front().is_some_and(|w| w.0 <= now) {
                let (_, d, on, bytes) = self.wire.pop_front().unwrap();
                let kind = bytes.get(5).and_then(|&k| Kind::from_u8(k));
                if kind.is_some() && kind == self.drop_kind {
                    continue;
                }
                if let Some((k, f)) = self.before_kind
                    && kind == Some(k)
                {
                    self.before_kind = None;
                    f(self);
                }
                self.nodes[d].handle_datagram(now, on, &bytes);
            } else if self.moves.front().is_some_and(|m| m.0 <= now) {
                let (_, from, vm, to) = self.moves.pop_front().unwrap();
                let outcome = (self.outcome)(vm);
                if outcome == MigrationOutcome::Done {
                    self.at.insert(vm, to);
                    self.refresh(from);
                    self.refresh(to);
                    let here = self.at.values().filter(|&&h| h == to).count();
                    self.peak = self.peak.max(here);
                }
                self.nodes[from].migration_done(now, vm, outcome);
            } else {
                for h in 0..self.nodes.len() {
                    if self.nodes[h].poll_timeout().is_some_and(|t| t <= now) {
                        self.nodes[h].handle_timeout(now);
                    }
                }
            }
        }
    }

    fn count(&self, f: impl Fn(&Event) -> bool) -> usize {
        self.events.iter().filter(|(_, e)| f(e)).count()
    }
}

/// An advisory host moves nothing: the driver answers every migration
/// with `Advisory`, the VM stays, the token goes on, and the VM is not
/// held down (nothing happened to it), so its next visit advises again.
#[test]
fn advisory_migrations_move_nothing_and_are_asked_again() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = Dc::new(&[(a, 0), (b, 2)], &[(a, b, 1000.0)], |c| {
        c.advisory = true;
        c.policy = PolicyKind::RoundRobin;
    });
    dc.outcome = |_| MigrationOutcome::Advisory;
    dc.run(20 * SEC);
    let advised = dc.count(|e| {
        matches!(
            e,
            Event::MigrationFinished {
                outcome: MigrationOutcome::Advisory,
                ..
            }
        )
    });
    assert!(advised >= 4, "advised again at later visits: {advised}");
    assert_eq!(dc.at[&a], 0);
    assert_eq!(dc.at[&b], 2);
    assert!(dc.count(|e| matches!(e, Event::TokenPassed { .. })) >= 8);
    assert_eq!(dc.count(|e| matches!(e, Event::TokenRegenerated { .. })), 1);
}

/// Without advisory mode the same world moves one VM to the other, and
/// the hold-down keeps it from moving again.
#[test]
fn a_real_migration_moves_the_vm_once() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = Dc::new(&[(a, 0), (b, 2)], &[(a, b, 1000.0)], |c| {
        c.policy = PolicyKind::RoundRobin;
    });
    dc.run(20 * SEC);
    assert_eq!(dc.at[&a], dc.at[&b], "together");
    let done = dc.count(|e| {
        matches!(
            e,
            Event::MigrationFinished {
                outcome: MigrationOutcome::Done,
                ..
            }
        )
    });
    assert_eq!(done, 1);
}

/// c_m may change while the node runs (the agent learns it from the
/// migrations it makes): a move the configured c_m forbids is made once a
/// lower one is set.
#[test]
fn a_learnt_migration_cost_prices_the_next_decisions() {
    use score_core::decision::MigrationCost;
    let (a, b) = (vm(1), vm(2));
    let mut dc = Dc::new(&[(a, 0), (b, 2)], &[(a, b, 1000.0)], |c| {
        c.policy = PolicyKind::RoundRobin;
        // A whole terabyte to repay within a second.
        c.migration_cost = MigrationCost::Traffic {
            bytes: 1e12,
            horizon_s: 1.0,
        };
    });
    dc.run(10 * SEC);
    assert_ne!(dc.at[&a], dc.at[&b], "too dear to move");
    assert!(
        dc.count(|e| matches!(
            e,
            Event::Decided {
                decision: Decision::Stay { .. }
            }
        )) >= 2
    );
    for n in &mut dc.nodes {
        n.set_migration_cost(MigrationCost::Traffic {
            bytes: 1.0,
            horizon_s: 600.0,
        });
    }
    dc.run(20 * SEC);
    assert_eq!(dc.at[&a], dc.at[&b], "together once it is cheap");
}

/// After a migration the source tells the hosts of the VM's peers where it
/// went (they would otherwise price against its old place until their
/// cached location expires) and the destination (which counts the VM only
/// from its next drain on), and no other host.
#[test]
fn the_hosts_of_a_moved_vms_peers_are_told_where_it_went() {
    let (a, b, c) = (vm(1), vm(2), vm(3));
    // a (host 0) talks most to b (host 2), a little to c (host 3); host 1
    // runs nothing a talks to.
    let mut dc = Dc::new(
        &[(a, 0), (b, 2), (c, 3)],
        &[(a, b, 1000.0), (a, c, 10.0)],
        |c| c.policy = PolicyKind::RoundRobin,
    );
    dc.run(20 * SEC);
    assert_eq!(dc.at[&a], 2, "a went to b's host");
    let key = KeyRing::new(ClusterKey::new(b"the tests' cluster key, 32 bytes").unwrap());
    let notices: Vec<(usize, Ipv4Addr, Message)> = dc
        .sent
        .iter()
        .filter_map(|(h, to, bytes)| {
            let d = Datagram::decode(bytes, &key).ok()?;
            matches!(d.message, Message::MigrationNotice { .. }).then_some((*h, *to, d.message))
        })
        .collect();
    let notice = Message::MigrationNotice {
        vm: a,
        from: Ipv4Addr::new(10, 0, 0, 1),
        to: Ipv4Addr::new(10, 0, 0, 3),
    };
    assert_eq!(
        notices,
        vec![
            (0, Ipv4Addr::new(10, 0, 0, 3), notice.clone()),
            (0, Ipv4Addr::new(10, 0, 0, 4), notice),
        ]
    );
}

/// Full hosts, swaps on, the asked host advisory: it orders the partner
/// first (its own move would not happen), answers the commit with
/// "advisory", and the proposer's swap ends advisory with nothing moved.
#[test]
fn an_advisory_swap_moves_nothing() {
    // a (host 0) talks to b (host 2); c (host 2) talks to d (host 0);
    // both hosts full (the paper's candidates are the peers' hosts, so
    // the empty ones are not asked): only a swap of a and c helps.
    let (a, b, c, d) = (vm(1), vm(2), vm(3), vm(4));
    let mut dc = Dc::new(
        &[(a, 0), (d, 0), (b, 2), (c, 2)],
        &[(a, b, 1000.0), (c, d, 1000.0)],
        |cfg| {
            cfg.advisory = true;
            cfg.policy = PolicyKind::RoundRobin;
            cfg.scope = Scope::swaps(CandidateSet::Paper);
            cfg.migration_headroom = 1;
        },
    );
    dc.outcome = |_| MigrationOutcome::Advisory;
    dc.run(30 * SEC);
    let advisory = dc.count(|e| {
        matches!(
            e,
            Event::SwapFinished {
                outcome: SwapOutcome::Advisory,
                ..
            }
        )
    });
    let agreed = dc.count(|e| matches!(e, Event::SwapAgreed { .. }));
    assert!(agreed >= 1, "{:?}", dc.events);
    assert!(advisory >= 1, "{:?}", dc.events);
    assert_eq!(
        (dc.at[&a], dc.at[&b], dc.at[&c], dc.at[&d]),
        (0, 2, 2, 0),
        "nothing moved"
    );
}

/// The global policy: every host reports its flows with their rates to
/// the coordinator (host 0), which sends every host the order; the
/// holders follow it, and the chatty pair ends on one host.
#[test]
fn the_coordinators_order_reaches_every_host_and_is_followed() {
    let (a, b, c) = (vm(1), vm(2), vm(3));
    let mut dc = Dc::new(&[(a, 0), (b, 2), (c, 3)], &[(a, b, 1000.0)], |cfg| {
        cfg.policy = PolicyKind::Global;
        cfg.coordinator = Some(Ipv4Addr::new(10, 0, 0, 1));
    });
    dc.run(20 * SEC);
    for h in 0..4 {
        assert!(
            dc.events
                .iter()
                .any(|(at, e)| *at == h && matches!(e, Event::OrderReceived { vms: 3 })),
            "host {h} has the order: {:?}",
            dc.events
        );
    }
    assert_eq!(dc.at[&a], dc.at[&b], "together");
    // The first decision to move was the first VM of an order: a or b.
    let first = dc.events.iter().find_map(|(_, e)| match e {
        Event::Decided {
            decision: Decision::Migrate { vm, .. },
        } => Some(*vm),
        _ => None,
    });
    assert!(first == Some(a) || first == Some(b), "{first:?}");
    // Only the datagrams sealed before their receiver started are refused
    // (the hosts start 1 ms apart).
    assert_eq!(
        dc.count(|e| matches!(e, Event::Rejected { reason } if *reason != RejectReason::NotFresh)),
        0
    );
}

/// An order from a host that is not the coordinator is refused.
#[test]
fn an_order_from_another_host_is_refused() {
    let (a, b) = (vm(1), vm(2));
    // Host 1 believes it coordinates; the others know host 0 does.
    let mut dc = Dc::new(&[(a, 0), (b, 2)], &[(a, b, 1000.0)], |cfg| {
        cfg.policy = PolicyKind::Global;
        cfg.coordinator = Some(if cfg.me == Ipv4Addr::new(10, 0, 0, 2) {
            cfg.me
        } else {
            Ipv4Addr::new(10, 0, 0, 1)
        });
    });
    dc.run(5 * SEC);
    assert!(
        dc.count(|e| matches!(
            e,
            Event::Rejected {
                reason: RejectReason::Other
            }
        )) > 0,
        "{:?}",
        dc.events
    );
}

/// One node at 10.0.0.2 (of `Dc`'s tree) with the keys `keys`, started at
/// `T0`, and a sealer speaking for 10.0.0.1.
fn lone_node(keys: KeyRing) -> Node {
    let topo = topology();
    let watchers = vec![topo.host_addr(0), topo.host_addr(1)];
    let cfg = Config::new(Ipv4Addr::new(10, 0, 0, 2), topo, keys, watchers);
    Node::new(cfg, Persisted::default(), T0)
}

/// A notice from 10.0.0.1 sealed with `key` at `sent_ns`, with sequence
/// number `seq`, for `destination`.
fn notice(key: &ClusterKey, seq: u64, sent_ns: u64, destination: Ipv4Addr) -> Vec<u8> {
    let d = Datagram {
        header: Header {
            sender: Ipv4Addr::new(10, 0, 0, 1),
            destination,
            incarnation: 1,
            sent_at_ms: sent_ns / MS,
            epoch: 0,
            seq,
        },
        message: Message::MigrationNotice {
            vm: vm(9),
            from: Ipv4Addr::new(10, 0, 0, 3),
            to: Ipv4Addr::new(10, 0, 0, 1),
        },
    };
    let mut buf = bytes::BytesMut::new();
    d.encode(key, &mut buf).unwrap();
    buf.to_vec()
}

/// What the node made of the datagrams handled since the last call: `None`
/// if it took them, else why it refused the last.
fn verdict(node: &mut Node) -> Option<RejectReason> {
    let mut last = None;
    while let Some(e) = node.poll_event() {
        if let Event::Rejected { reason } = e {
            last = Some(reason);
        }
    }
    last
}

/// The guards a datagram passes before the node acts on it: a replay, a
/// foreign key, another destination, and one sealed before the node
/// started or too long ago are each refused with its reason; a genuine
/// one is taken.
#[test]
fn replays_foreign_keys_misaddressed_and_stale_datagrams_are_refused() {
    let key = ClusterKey::new(b"the tests' cluster key, 32 bytes").unwrap();
    let foreign = ClusterKey::new(b"somebody else's key of 32 bytes!").unwrap();
    let mut node = lone_node(KeyRing::new(key.clone()));
    let me = Ipv4Addr::new(10, 0, 0, 2);
    let now = T0 + SEC;
    let good = notice(&key, 1, now, me);
    node.handle_datagram(now, me, &good);
    assert_eq!(verdict(&mut node), None);
    node.handle_datagram(now + MS, me, &good);
    assert_eq!(verdict(&mut node), Some(RejectReason::Replayed));
    node.handle_datagram(now, me, &notice(&foreign, 2, now, me));
    assert_eq!(verdict(&mut node), Some(RejectReason::BadMac));
    // Captured on its way to 10.0.0.3 and sent here.
    let elsewhere = Ipv4Addr::new(10, 0, 0, 3);
    node.handle_datagram(now, me, &notice(&key, 3, now, elsewhere));
    assert_eq!(verdict(&mut node), Some(RejectReason::WrongDestination));
    // Sealed before this node started: from an earlier run of it.
    node.handle_datagram(now, me, &notice(&key, 4, T0 - SEC, me));
    assert_eq!(verdict(&mut node), Some(RejectReason::NotFresh));
    let later = now + 60 * SEC;
    node.handle_datagram(later, me, &notice(&key, 5, now, me));
    assert_eq!(verdict(&mut node), Some(RejectReason::NotFresh));
    node.handle_datagram(later, me, &notice(&key, 6, later, me));
    assert_eq!(verdict(&mut node), None);
}

/// A key being rotated out verifies until its deadline and not after;
/// the current key always does (docs/WIRE.md, "Keys and their rotation").
#[test]
fn a_previous_key_is_accepted_until_its_deadline() {
    let old = ClusterKey::new(b"the old cluster key, 32 bytes!!").unwrap();
    let new = ClusterKey::new(b"the new cluster key, 32 bytes!!").unwrap();
    let until = T0 + 10 * SEC;
    let mut node = lone_node(KeyRing::new(new.clone()).accepting(old.clone(), until / MS));
    let me = Ipv4Addr::new(10, 0, 0, 2);
    let t = T0 + SEC;
    node.handle_datagram(t, me, &notice(&old, 1, t, me));
    assert_eq!(verdict(&mut node), None);
    node.handle_datagram(t, me, &notice(&new, 2, t, me));
    assert_eq!(verdict(&mut node), None);
    let after = until + MS;
    node.handle_datagram(after, me, &notice(&old, 3, after, me));
    assert_eq!(verdict(&mut node), Some(RejectReason::BadMac));
    node.handle_datagram(after, me, &notice(&new, 4, after, me));
    assert_eq!(verdict(&mut node), None);
}

/// A group move's world: a and b talk most to each other on full host 0
/// (rack 0), a to c and b to d on full host 2 (rack 1); host 3 (rack 1)
/// is empty. The paper's candidates are the peers' hosts, all full, so no
/// single migration helps; a and b together on host 3 do.
fn group_world(cfg: impl Fn(&mut Config)) -> Dc {
    let (a, b, c, d) = (vm(1), vm(2), vm(3), vm(4));
    Dc::new(
        &[(a, 0), (b, 0), (c, 2), (d, 2)],
        &[(a, b, 4000.0), (a, c, 1000.0), (b, d, 1000.0)],
        |c| {
            c.policy = PolicyKind::RoundRobin;
            c.groups = true;
            cfg(c);
        },
    )
}

/// The group moves: agreed once host 3 reserved both slots, both
/// migrations done, and no host ever ran more than its two slots. With
/// group moves off a and b stay.
#[test]
fn a_group_moves_into_the_rack_of_its_peers() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = group_world(|_| {});
    dc.run(30 * SEC);
    let agreed = dc.count(|e| matches!(e, Event::GroupAgreed { group } if group.moves.len() == 2));
    let done = dc.count(|e| {
        matches!(
            e,
            Event::GroupFinished {
                moved: 2,
                outcome: SwapOutcome::Done,
                ..
            }
        )
    });
    assert_eq!((agreed, done), (1, 1), "{:?}", dc.events);
    assert_eq!((dc.at[&a], dc.at[&b]), (3, 3));
    assert!(dc.peak <= 2, "a host ran {} VMs", dc.peak);

    let mut off = group_world(|c| c.groups = false);
    off.run(30 * SEC);
    assert_eq!((off.at[&a], off.at[&b]), (0, 0));
    assert_eq!(off.count(|e| matches!(e, Event::GroupAgreed { .. })), 0);
}

/// The target host's room went to another VM between its capacity answer
/// and the reservation: it refuses the reservation (all or none), the
/// group stays, and the decision is told as a stay.
#[test]
fn a_group_reservation_refused_for_lack_of_room_moves_nothing() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = group_world(|_| {});
    // A VM arrives on host 3 just before the first reservation: one slot
    // is left, not two. It talks to nobody, so it never moves.
    dc.before_kind = Some((Kind::GroupReserve, |dc| {
        dc.at.insert(vm(9), 3);
        dc.refresh(3);
    }));
    dc.run(4 * SEC);
    assert_eq!((dc.at[&a], dc.at[&b]), (0, 0));
    // (c and d, each a group of one, may go to the empty host 1.)
    let of_a_or_b = |e: &Event| matches!(e, Event::GroupAgreed { group } if group.moves.iter().any(|m| m.0 == a || m.0 == b));
    assert_eq!(dc.count(of_a_or_b), 0, "{:?}", dc.events);
    assert!(
        dc.count(|e| matches!(
            e,
            Event::Decided {
                decision: Decision::Stay { .. }
            }
        )) >= 1
    );
    assert!(dc.peak <= 2);
    assert!(
        dc.sent
            .iter()
            .any(|(_, _, b)| b[5] == Kind::GroupReserve as u8),
        "a reservation was asked"
    );
}

/// The destination never answers the reservation: after the request
/// time-out the holder releases it (it may have been made) and u stays.
#[test]
fn an_unanswered_group_reservation_is_released() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = group_world(|_| {});
    dc.drop_kind = Some(Kind::GroupReserve);
    dc.run(4 * SEC);
    assert_eq!((dc.at[&a], dc.at[&b]), (0, 0));
    assert_eq!(dc.count(|e| matches!(e, Event::GroupAgreed { .. })), 0);
    let released = dc.sent.iter().any(|(from, to, b)| {
        *from == 0 && *to == dc.topo.host_addr(3) && b[5] == Kind::GroupRelease as u8
    });
    assert!(released, "the holder released host 3's reservation");
}

/// b's migration fails: the group move ends partly done (a moved), is
/// told so, b's slot on host 3 is released, and no host exceeds its
/// slots.
#[test]
fn a_half_done_group_move_is_told_and_leaves_every_host_within_its_slots() {
    let (a, b) = (vm(1), vm(2));
    let mut dc = group_world(|_| {});
    dc.outcome = |v| {
        if v == vm(2) {
            MigrationOutcome::Failed
        } else {
            MigrationOutcome::Done
        }
    };
    dc.run(8 * SEC);
    let partial = dc.count(|e| {
        matches!(
            e,
            Event::GroupFinished {
                moved: 1,
                outcome: SwapOutcome::Partial,
                ..
            }
        )
    });
    assert!(partial >= 1, "{:?}", dc.events);
    // b stays (held down after its failed migration); a went on.
    assert_eq!(dc.at[&b], 0);
    assert_ne!(dc.at[&a], 0);
    assert!(dc.peak <= 2);
    let released = dc.sent.iter().any(|(from, to, b)| {
        *from == 0 && *to == dc.topo.host_addr(3) && b[5] == Kind::GroupRelease as u8
    });
    assert!(released, "b's slot on host 3 was released");
}
