//! The bookkeeping of swaps (docs/WIRE.md, "Swaps"): whether a host may
//! hold one VM more than its slots for the time of a swap, the order of a
//! swap's two live migrations, and the asked host's reservations of the
//! partners it gave. Pure, with time as the caller's nanoseconds, so the
//! [`Node`](super::Node) and its tests share it.
//!
//! A swap's two migrations are ordered so that no host ever runs more VMs
//! than `vm_slots + migration_headroom`: the first migration goes into the
//! host that has headroom (the asked host if it has, else the proposer),
//! the second one then brings that host back to its count. A host asked
//! for a swap gives one partner at a time and keeps it reserved until the
//! proposer commits (move it now) or cancels, or the reservation expires;
//! a repeated commit is answered with the first one's result, so a
//! partner never moves twice for one swap. An ejection chain (u to the
//! asked host y, y's partner w to a third host z) is kept the same way
//! ([`Reservations::reserve_to`]); its partner goes first, to z, into a
//! slot z promised for it, so it needs no headroom anywhere.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::token::VmId;
use crate::wire::{SwapOrder, SwapRefusal, SwapResult};

/// The order of a swap's migrations, decided by the asked host: into its
/// own headroom first if it has some (`here`), else into the proposer's
/// (`there`, what the proposal says); neither: refused. An `advisory`
/// asked host moves nothing, so its partner "goes" first: the proposer
/// hears "advisory" before it moves anything (headroom is not needed).
pub fn order(advisory: bool, here: bool, there: bool) -> Result<SwapOrder, SwapRefusal> {
    match (advisory, here, there) {
        (true, _, _) => Ok(SwapOrder::PartnerFirst),
        (false, true, _) => Ok(SwapOrder::ProposerFirst),
        (false, false, true) => Ok(SwapOrder::PartnerFirst),
        (false, false, false) => Err(SwapRefusal::NoHeadroom),
    }
}

/// What the asked host does with a commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommitAction {
    /// Answer at once with this result.
    Reply(SwapResult),
    /// Migrate this partner to the proposer now; answer when it ends.
    Migrate(VmId),
    /// The partner is moving: the answer goes out when it ends (to this
    /// latest commit).
    Wait,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Reserved,
    Moving { reply_to: u64 },
    Ended(SwapResult),
}

#[derive(Clone, Copy, Debug)]
struct Reservation {
    partner: VmId,
    proposer: Ipv4Addr,
    /// Where the partner goes: the proposer (a swap) or a third host (an
    /// ejection chain).
    to: Ipv4Addr,
    order: SwapOrder,
    expires: u64,
    status: Status,
    /// A rotation's: `to` promised the partner a place (its headroom), so
    /// the partner goes there at the commit without asking.
    placed: bool,
    /// Who else may release it: the host that asked this one to close a
    /// rotation (it may choose another host's offer).
    releaser: Option<Ipv4Addr>,
}

/// The asked host's swaps, keyed by the proposing VM.
#[derive(Debug, Default)]
pub struct Reservations {
    map: BTreeMap<VmId, Reservation>,
}

impl Reservations {
    /// Forgets reservations past their time. A partner still moving is
    /// kept: its migration ends on its own (bounded by the backend).
    pub fn expire(&mut self, now: u64) {
        self.map
            .retain(|_, r| matches!(r.status, Status::Moving { .. }) || r.expires > now);
    }

    /// Whether a swap is reserved or under way here (one at a time).
    pub fn busy(&self) -> bool {
        self.map
            .values()
            .any(|r| matches!(r.status, Status::Reserved | Status::Moving { .. }))
    }

    /// Whether a swap reserved or under way here brings its proposing VM
    /// in before the partner leaves: this host's headroom is taken.
    pub fn incoming_first(&self) -> bool {
        self.map.values().any(|r| {
            r.order == SwapOrder::ProposerFirst
                && matches!(r.status, Status::Reserved | Status::Moving { .. })
        })
    }

    /// Whether `vm` is the partner of a swap reserved or under way here:
    /// it must not move for another reason meanwhile.
    pub fn holds(&self, vm: VmId) -> bool {
        self.map.values().any(|r| {
            r.partner == vm && matches!(r.status, Status::Reserved | Status::Moving { .. })
        })
    }

    /// Reserves `partner` for the swap with `vm` from `proposer`, in
    /// `order`, until `until`; false (refuse: busy) if another swap is
    /// reserved or under way.
    pub fn reserve(
        &mut self,
        vm: VmId,
        partner: VmId,
        proposer: Ipv4Addr,
        order: SwapOrder,
        until: u64,
    ) -> bool {
        self.reserve_to(vm, partner, proposer, proposer, order, until)
    }

    /// [`Reservations::reserve`] for an ejection chain: the partner goes
    /// to `to` (a third host, or the proposer) when committed.
    pub fn reserve_to(
        &mut self,
        vm: VmId,
        partner: VmId,
        proposer: Ipv4Addr,
        to: Ipv4Addr,
        order: SwapOrder,
        until: u64,
    ) -> bool {
        if self.busy() {
            return false;
        }
        self.map.insert(
            vm,
            Reservation {
                partner,
                proposer,
                to,
                order,
                expires: until,
                status: Status::Reserved,
                placed: false,
                releaser: None,
            },
        );
        true
    }

    /// Reserves `partner` for a rotation (docs/PROTOCOL.md, "Rotations"):
    /// `vm` comes here first, from the holder's side, into this host's
    /// headroom; at `proposer`'s commit the partner goes on to `to`,
    /// whose headroom is promised to it. `releaser` may release it too.
    pub fn reserve_rotation(
        &mut self,
        vm: VmId,
        partner: VmId,
        proposer: Ipv4Addr,
        to: Ipv4Addr,
        releaser: Option<Ipv4Addr>,
        until: u64,
    ) -> bool {
        if !self.reserve_to(vm, partner, proposer, to, SwapOrder::ProposerFirst, until) {
            return false;
        }
        if let Some(r) = self.map.get_mut(&vm) {
            r.placed = true;
            r.releaser = releaser;
        }
        true
    }

    /// Whether `vm`'s partner has its place promised where it goes (a
    /// rotation's).
    pub fn placed(&self, vm: VmId) -> bool {
        self.map.get(&vm).is_some_and(|r| r.placed)
    }

    /// A commit (sequence number `seq`) from `proposer` for the swap of
    /// `vm` with `partner`: `go` moves the partner, otherwise the
    /// reservation is released. Ended swaps are remembered until `linger`.
    pub fn commit(
        &mut self,
        proposer: Ipv4Addr,
        vm: VmId,
        partner: VmId,
        go: bool,
        seq: u64,
        linger: u64,
    ) -> CommitAction {
        let Some(r) = self.map.get_mut(&vm) else {
            return CommitAction::Reply(SwapResult::Unknown);
        };
        let releases = !go && r.releaser == Some(proposer);
        if (r.proposer != proposer && !releases) || r.partner != partner {
            return CommitAction::Reply(SwapResult::Unknown);
        }
        match r.status {
            Status::Ended(result) => CommitAction::Reply(result),
            Status::Moving { .. } => {
                // A migration under way is not cancelled; the answer goes
                // to the newest commit, the one the proposer waits on.
                r.status = Status::Moving { reply_to: seq };
                CommitAction::Wait
            }
            Status::Reserved if go => {
                r.status = Status::Moving { reply_to: seq };
                CommitAction::Migrate(partner)
            }
            Status::Reserved => {
                r.status = Status::Ended(SwapResult::Cancelled);
                r.expires = linger;
                CommitAction::Reply(SwapResult::Cancelled)
            }
        }
    }

    /// Where the partner of `vm`'s swap or chain goes when committed.
    pub fn destination(&self, vm: VmId) -> Option<Ipv4Addr> {
        self.map.get(&vm).map(|r| r.to)
    }

    /// The partner's migration for `vm`'s swap ended with `result`;
    /// returns the commit to answer (its sequence number) and its sender.
    pub fn end(&mut self, vm: VmId, result: SwapResult, linger: u64) -> Option<(u64, Ipv4Addr)> {
        let r = self.map.get_mut(&vm)?;
        let Status::Moving { reply_to } = r.status else {
            return None;
        };
        r.status = Status::Ended(result);
        r.expires = linger;
        Some((reply_to, r.proposer))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    #[test]
    fn the_first_move_goes_where_the_headroom_is() {
        assert_eq!(order(false, true, true), Ok(SwapOrder::ProposerFirst));
        assert_eq!(order(false, true, false), Ok(SwapOrder::ProposerFirst));
        assert_eq!(order(false, false, true), Ok(SwapOrder::PartnerFirst));
        assert_eq!(order(false, false, false), Err(SwapRefusal::NoHeadroom));
        // Advisory: the side that moves nothing answers first.
        assert_eq!(order(true, false, false), Ok(SwapOrder::PartnerFirst));
        assert_eq!(order(true, true, true), Ok(SwapOrder::PartnerFirst));
    }

    #[test]
    fn a_partner_is_reserved_moved_once_and_answered() {
        let later = 60 * S;
        let x = Ipv4Addr::new(10, 0, 0, 1);
        let other = Ipv4Addr::new(10, 0, 0, 9);
        let mut r = Reservations::default();
        assert!(r.reserve(1, 4, x, SwapOrder::ProposerFirst, later));
        assert!(r.busy() && r.holds(4) && !r.holds(1) && r.incoming_first());
        assert!(
            !r.reserve(2, 5, x, SwapOrder::PartnerFirst, later),
            "one swap at a time"
        );
        // Only the proposer, for the partner it was given, commits.
        assert_eq!(
            r.commit(other, 1, 4, true, 10, later),
            CommitAction::Reply(SwapResult::Unknown)
        );
        assert_eq!(
            r.commit(x, 1, 5, true, 11, later),
            CommitAction::Reply(SwapResult::Unknown)
        );
        assert_eq!(r.commit(x, 1, 4, true, 12, later), CommitAction::Migrate(4));
        // Resent commits while it moves: no second migration, and the
        // answer goes to the newest; a cancel cannot stop it.
        assert_eq!(r.commit(x, 1, 4, true, 13, later), CommitAction::Wait);
        assert_eq!(r.commit(x, 1, 4, false, 14, later), CommitAction::Wait);
        r.expire(120 * S);
        assert!(r.holds(4), "a moving partner outlives its reservation");
        assert_eq!(r.end(1, SwapResult::Done, later), Some((14, x)));
        assert_eq!(r.end(1, SwapResult::Done, later), None);
        assert!(!r.busy() && !r.holds(4) && !r.incoming_first());
        assert_eq!(
            r.commit(x, 1, 4, true, 15, later),
            CommitAction::Reply(SwapResult::Done)
        );
        r.expire(later + S);
        assert_eq!(
            r.commit(x, 1, 4, true, 16, later),
            CommitAction::Reply(SwapResult::Unknown)
        );
    }

    #[test]
    fn a_cancel_or_a_time_out_releases_the_partner() {
        let later = 60 * S;
        let x = Ipv4Addr::new(10, 0, 0, 1);
        let mut r = Reservations::default();
        assert!(r.reserve(1, 4, x, SwapOrder::PartnerFirst, later));
        assert!(!r.incoming_first());
        assert_eq!(
            r.commit(x, 1, 4, false, 1, later),
            CommitAction::Reply(SwapResult::Cancelled)
        );
        assert!(!r.busy() && !r.holds(4));
        // A go after the cancel does not move it.
        assert_eq!(
            r.commit(x, 1, 4, true, 2, later),
            CommitAction::Reply(SwapResult::Cancelled)
        );
        assert!(r.reserve(2, 5, x, SwapOrder::PartnerFirst, later));
        r.expire(later + S);
        assert!(!r.busy(), "an unanswered reservation expires");
        assert!(r.reserve(3, 5, x, SwapOrder::PartnerFirst, later));
        assert_eq!(r.destination(3), Some(x));
        let z = Ipv4Addr::new(10, 0, 0, 3);
        r.expire(2 * later);
        assert!(r.reserve_to(4, 6, x, z, SwapOrder::PartnerFirst, 3 * later));
        assert_eq!(r.destination(4), Some(z));
        assert_eq!(
            r.commit(x, 4, 6, true, 3, 3 * later),
            CommitAction::Migrate(6)
        );
    }

    #[test]
    fn a_rotation_is_committed_by_the_holder_and_released_by_either() {
        let later = 60 * S;
        let (x, y, z) = (
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            Ipv4Addr::new(10, 0, 0, 3),
        );
        let mut r = Reservations::default();
        assert!(r.reserve_rotation(2, 3, x, x, Some(y), later));
        assert!(r.placed(2) && r.incoming_first() && r.holds(3));
        // The asking host may not move it, only release it.
        assert_eq!(
            r.commit(y, 2, 3, true, 1, later),
            CommitAction::Reply(SwapResult::Unknown)
        );
        assert_eq!(
            r.commit(y, 2, 3, false, 2, later),
            CommitAction::Reply(SwapResult::Cancelled)
        );
        assert!(!r.busy());
        assert!(r.reserve_rotation(1, 2, x, z, None, later));
        assert_eq!(r.destination(1), Some(z));
        assert_eq!(
            r.commit(y, 1, 2, false, 3, later),
            CommitAction::Reply(SwapResult::Unknown)
        );
        assert_eq!(r.commit(x, 1, 2, true, 4, later), CommitAction::Migrate(2));
    }
}
