//! Beyond the paper (docs/EVALUATION.md): ejection chains of length 3. u on x goes to
//! a full host y; y makes room by sending one of its VMs, w, on: back to x
//! (that is a swap, [`crate::swap`]) or to a third host z with room.
//!
//! The holder of u proposes exactly as for a swap (a
//! [`SwapRequest`]: u's gain on y, its c_m, its memory, its peers on y);
//! the asked host y chooses w and z with what it knows
//! ([`choose_ejection`]): its own VMs' peers and rates and where it
//! believes they live, and the capacity answers of the hosts it asks (the
//! paper's capacity request). z is x, or one of w's candidates in the
//! candidate set `set` ([`plan_with`]) that has room.
//!
//! The benefit is exact: u's gain (computed with w still on y), w's gain
//! of moving from y to z (computed with u still on x), corrected for the
//! u–w pair, whose level goes from ℓ(x, y) to ℓ(y, z) and not what either
//! gain assumed (u's: to 0; w's: to ℓ(z, x)). Each side's share of the
//! correction uses its own measured rate. A chain is two migrations: it
//! must beat c_m(u) + c_m(w), by more than a rounding margin.

use serde::Serialize;

use crate::cost::Placement;
use crate::decision::{Capacity, MigrationCost, Peer, Plan, usable_peers};
use crate::swap::{CandidateSet, LocalVm, SwapRequest, plan_with};
use crate::token::VmId;
use crate::topology::{HostId, Topology};

/// Most full candidates a holder asks for an ejection chain (score-sim's
/// engine and the protocol's [`Node`](crate::proto::Node) both ask this
/// many).
pub const MAX_EJECT_ASKS: u32 = 4;

/// The level `vm` would have on `host`, with its peers `peers` where
/// they are (what a holder writes in the token after a chain).
pub(crate) fn level_at(topo: &Topology, vm: VmId, peers: &[Peer], host: HostId) -> u8 {
    let usable = usable_peers(topo, vm, peers);
    crate::decision::level_sums(topo, &usable)
        .0
        .cost_at(topo, host)
        .1
}

/// What the asked host y answers: the VM it ejects and where to.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct EjectionOffer {
    /// The ejected VM w (on y now).
    pub partner: VmId,
    /// Where w goes: u's host x (a swap) or a third host z with room.
    pub partner_to: HostId,
    /// The chain's benefit: the drop of the equation 1 total.
    pub benefit: f64,
    /// The threshold it exceeds: c_m(u) + c_m(w).
    pub c_m: f64,
    /// Capacity requests y asked.
    pub asked: u32,
}

/// A decided chain: u goes to `to`, w from `to` to `partner_to`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Chain {
    /// The proposing VM u.
    pub vm: VmId,
    /// u's host now.
    pub from: HostId,
    /// u's host after (w's now).
    pub to: HostId,
    /// The ejected VM w.
    pub partner: VmId,
    /// w's host after.
    pub partner_to: HostId,
    /// The drop of the equation 1 total.
    pub benefit: f64,
    /// c_m(u) + c_m(w).
    pub c_m: f64,
    /// Requests asked, by the holder and by the asked hosts.
    pub asked: u32,
}

impl Chain {
    /// Live migrations it takes: two.
    pub fn migrations(&self) -> u32 {
        2
    }

    /// Applies it to a placement whose VM indices are the VM IDs (the
    /// simulator's convention). Panics if a VM or host is out of range.
    pub fn apply(&self, p: &mut Placement) {
        p.move_vm(self.vm, self.to);
        p.move_vm(self.partner, self.partner_to);
    }
}

/// The full host `me` (free memory `free_mem_mb` now) answers a chain
/// request: among its VMs `local` (as it knows them) and, for each, the
/// destinations x = `req.from` and w's candidates in `set` that have room
/// (`capacity`, asked once per host; `None`: no answer, no room), the
/// chain with the largest benefit net of c_m(u) + c_m(w) (ties to the
/// lower VM, then the earlier destination), if above the threshold and
/// every host has the memory. `cm` is this host's c_m setting, for w.
// The arguments are what the asked host has at hand; a struct would only
// rename them.
#[allow(clippy::too_many_arguments)]
pub fn choose_ejection(
    topo: &Topology,
    me: HostId,
    free_mem_mb: u64,
    local: &[LocalVm],
    req: &SwapRequest,
    cm: MigrationCost,
    set: CandidateSet,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
) -> Option<EjectionOffer> {
    let n_hosts = topo.host_count();
    if me >= n_hosts || req.from >= n_hosts || req.from == me {
        return None;
    }
    let w_of = |a: HostId, b: HostId| topo.weights().cumulative(topo.level(a, b));
    let x = req.from;
    let w_xy = w_of(x, me);
    let mut answers: Vec<(HostId, Option<Capacity>)> = Vec::new();
    let mut asked = 0u32;
    let mut best: Option<(f64, EjectionOffer)> = None;
    let mut peers: Vec<Peer> = Vec::new();
    for w in local {
        if w.id == req.vm {
            continue;
        }
        // y gives w's memory back and takes u's.
        if free_mem_mb.saturating_add(w.mem_mb) < req.mem_mb {
            continue;
        }
        peers.clear();
        peers.extend(w.peers.iter().map(|z| Peer {
            host: if z.id == req.vm { x } else { z.host },
            ..*z
        }));
        let plan: Plan = plan_with(topo, w.id, me, &peers, set);
        let usable = usable_peers(topo, w.id, &peers);
        let r_w: f64 = usable
            .iter()
            .filter(|z| z.id == req.vm)
            .map(|z| z.rate)
            .sum();
        let r_u: f64 = req
            .peers_on_target
            .iter()
            .filter(|&&(id, _)| id == w.id)
            .map(|&(_, r)| r)
            .sum();
        let cost_now = plan.cost_before;
        let margin = crate::decision::noise_margin(req.cost_before.abs() + cost_now.abs());
        // x first (a swap: u's slot and memory free it), then w's
        // candidates with room.
        let (x_cost, _) = crate::decision::level_sums(topo, &usable)
            .0
            .cost_at(topo, x);
        let mut dests: Vec<(HostId, f64)> = vec![(x, crate::decision::price(cost_now, x_cost).1)];
        dests.extend(
            plan.candidates
                .iter()
                .filter(|c| c.host != x && c.host != me)
                .map(|c| (c.host, c.benefit)),
        );
        for (z, gain_w) in dests {
            // u's share and w's own, for w's move to z.
            let c_m = req.c_m + cm.threshold(cost_now, w_of(me, z));
            let may_clear = req.gain + gain_w > c_m;
            if !may_clear && r_w == 0.0 && r_u == 0.0 {
                // Without the pair's correction nothing can clear it.
                continue;
            }
            let fits = if z == x {
                req.from_free_mem_mb.saturating_add(req.mem_mb) >= w.mem_mb
            } else {
                let cap = match answers.iter().find(|(h, _)| *h == z) {
                    Some(&(_, c)) => c,
                    None => {
                        asked += 1;
                        let c = capacity(z);
                        answers.push((z, c));
                        c
                    }
                };
                cap.is_some_and(|c| c.fits(w.mem_mb))
            };
            if !fits {
                continue;
            }
            let (w_yz, w_zx) = (w_of(me, z), w_of(z, x));
            let fix = -r_u * (w_xy + w_yz) + r_w * (2.0 * w_zx - w_xy - w_yz);
            let benefit = req.gain + gain_w + fix;
            // NaN anywhere refuses.
            let clears = benefit > c_m + margin;
            if !clears {
                continue;
            }
            let net = benefit - c_m;
            if best
                .as_ref()
                .is_none_or(|(b, o)| net > *b || (net == *b && w.id < o.partner))
            {
                best = Some((
                    net,
                    EjectionOffer {
                        partner: w.id,
                        partner_to: z,
                        benefit,
                        c_m,
                        asked: 0,
                    },
                ));
            }
        }
    }
    best.map(|(_, o)| EjectionOffer { asked, ..o })
}

/// The holder's chain decision for the plan's VM u (planned with
/// [`plan_with`] on `peers`): the full candidates where u gains, by
/// decreasing gain (stable: plan order on ties), at most `max_asks` of
/// them, are asked for an ejection (`ask`: normally [`choose_ejection`]
/// on the asked host; `capacity` tells which are full); the chain with the
/// largest benefit net of its threshold wins. `cm` is c_m, `mem_need_mb`
/// u's memory, `home_free_mem_mb` the free memory on u's host now.
/// [`ChainDecider`] is the same walk one question at a time.
// As for choose_ejection: the holder's own state, one argument each.
#[allow(clippy::too_many_arguments)]
pub fn decide_chain(
    plan: &Plan,
    peers: &[Peer],
    cm: MigrationCost,
    mem_need_mb: u64,
    home_free_mem_mb: u64,
    max_asks: u32,
    mut capacity: impl FnMut(HostId) -> Option<Capacity>,
    mut ask: impl FnMut(&SwapRequest) -> Option<EjectionOffer>,
) -> Option<Chain> {
    let mut d = ChainDecider::new(plan, peers, cm, mem_need_mb, home_free_mem_mb, max_asks);
    while let Some(q) = d.next_query() {
        match q {
            ChainQuery::Capacity(h) => d.answer_capacity(capacity(h)),
            ChainQuery::Eject(r) => d.answer_eject(ask(&r)),
        }
    }
    d.finish()
}

/// A question of a [`ChainDecider`].
#[derive(Debug, Clone, PartialEq)]
pub enum ChainQuery {
    /// Is this candidate full? (a capacity request that reserves nothing:
    /// a host with room is the paper's business, not a chain's).
    Capacity(HostId),
    /// Ask the full candidate `request.to` for an ejection; answered with
    /// [`choose_ejection`]'s result there.
    Eject(SwapRequest),
}

/// [`decide_chain`] one question at a time, for a holder that asks over
/// the network (the protocol's [`Node`](crate::proto::Node)):
/// [`next_query`](Self::next_query), then
/// [`answer_capacity`](Self::answer_capacity) or
/// [`answer_eject`](Self::answer_eject) by the question, until
/// `next_query` is `None`; then [`finish`](Self::finish).
#[derive(Debug, Clone)]
pub struct ChainDecider<'p> {
    plan: &'p Plan,
    peers: &'p [Peer],
    cm: MigrationCost,
    mem_need_mb: u64,
    home_free_mem_mb: u64,
    max_asks: u32,
    order: Vec<usize>,
    pos: usize,
    pending: Option<ChainQuery>,
    asked: u32,
    asks: u32,
    best: Option<(f64, Chain)>,
}

impl<'p> ChainDecider<'p> {
    /// Starts the walk (arguments as for [`decide_chain`]).
    pub fn new(
        plan: &'p Plan,
        peers: &'p [Peer],
        cm: MigrationCost,
        mem_need_mb: u64,
        home_free_mem_mb: u64,
        max_asks: u32,
    ) -> Self {
        let order = if cm.threshold(plan.cost_before, 0.0).is_nan() {
            Vec::new()
        } else {
            plan.gaining_best_first()
        };
        let mut d = ChainDecider {
            plan,
            peers,
            cm,
            mem_need_mb,
            home_free_mem_mb,
            max_asks,
            order,
            pos: 0,
            pending: None,
            asked: 0,
            asks: 0,
            best: None,
        };
        d.advance();
        d
    }

    fn advance(&mut self) {
        self.pending = match self.order.get(self.pos) {
            Some(&i) if self.asks < self.max_asks => {
                Some(ChainQuery::Capacity(self.plan.candidates[i].host))
            }
            _ => None,
        };
    }

    /// The question to ask now; `None` once decided.
    pub fn next_query(&self) -> Option<ChainQuery> {
        self.pending.clone()
    }

    /// The answer to a [`ChainQuery::Capacity`] (`None`: no answer, taken
    /// as full). Ignored if that is not the pending question.
    pub fn answer_capacity(&mut self, capacity: Option<Capacity>) {
        let Some(ChainQuery::Capacity(_)) = self.pending else {
            return;
        };
        self.asked += 1;
        if capacity.is_some_and(|cap| cap.fits(self.mem_need_mb)) {
            // Room: a plain migration, the paper's business.
            self.pos += 1;
            return self.advance();
        }
        self.asks += 1;
        self.asked += 1;
        let i = self.order[self.pos];
        let c_m = self
            .cm
            .threshold(self.plan.cost_before, self.plan.candidates[i].path_weight);
        let req = SwapRequest::for_candidate(
            self.plan,
            i,
            self.peers,
            c_m,
            self.mem_need_mb,
            self.home_free_mem_mb,
        );
        self.pending = Some(ChainQuery::Eject(req));
    }

    /// The answer to a [`ChainQuery::Eject`] (`None`: refused or no
    /// answer). Ignored if that is not the pending question.
    pub fn answer_eject(&mut self, offer: Option<EjectionOffer>) {
        let Some(ChainQuery::Eject(req)) = &self.pending else {
            return;
        };
        let (to, c_m) = (req.to, req.c_m);
        if let Some(o) = offer {
            self.asked += o.asked;
            // Trust but check: the offer must clear u's own share as well.
            if o.benefit > o.c_m && o.c_m >= c_m {
                let net = o.benefit - o.c_m;
                if self.best.as_ref().is_none_or(|(b, _)| net > *b) {
                    self.best = Some((
                        net,
                        Chain {
                            vm: self.plan.vm,
                            from: self.plan.host,
                            to,
                            partner: o.partner,
                            partner_to: o.partner_to,
                            benefit: o.benefit,
                            c_m: o.c_m,
                            asked: 0,
                        },
                    ));
                }
            }
        }
        self.pos += 1;
        self.advance();
    }

    /// The chain with the largest benefit net of its threshold, if any.
    /// Called early, it decides with the answers so far.
    pub fn finish(self) -> Option<Chain> {
        let asked = self.asked;
        self.best.map(|(_, ch)| Chain { asked, ..ch })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cost::{CostModel, Traffic};
    use crate::swap::local_vms;
    use crate::topology::LinkWeights;
    use std::net::Ipv4Addr;

    /// Racks {0, 1} and {2, 3}, two slots per host. u=0 (with silent 4) on
    /// host 0 talks to v=1 on host 2, which is full with w=2; w talks to 3
    /// on host 3, which has a free slot; host 1 is full of silent VMs.
    #[test]
    fn the_ejected_vm_goes_to_its_own_peer() {
        let t = Topology::regular(
            &[2, 2],
            LinkWeights::paper_truncated(2),
            Ipv4Addr::new(10, 0, 0, 1),
        )
        .unwrap();
        let tr = Traffic::from_triples(7, [(0, 1, 10.0), (2, 3, 1.0)]).unwrap();
        let p = Placement::new(4, vec![0, 2, 2, 3, 0, 1, 1]).unwrap();
        let m = CostModel::new(&t, &tr);
        let cap = |h: HostId| {
            Some(Capacity {
                free_slots: 2 - p.count(h),
                free_mem_mb: 1 << 20,
            })
        };
        let peers = m.peers(&p, 0);
        let pl = plan_with(&t, 0, 0, &peers, CandidateSet::Paper);
        let ch = decide_chain(&pl, &peers, MigrationCost::default(), 0, 0, 4, cap, |r| {
            let on: Vec<u32> = (0..7).filter(|&v| p.host(v) == r.to).collect();
            let local = local_vms(&m, &p, &on, |_| 0);
            choose_ejection(
                &t,
                r.to,
                0,
                &local,
                r,
                MigrationCost::default(),
                CandidateSet::Paper,
                cap,
            )
        })
        .unwrap();
        // w goes to its peer's host 3, not to u's host 0 (a swap).
        assert_eq!((ch.vm, ch.to, ch.partner, ch.partner_to), (0, 2, 2, 3));
        let w = t.weights();
        assert_eq!(ch.benefit, 20.0 * w.cumulative(2) + 2.0 * w.cumulative(1));
        let mut q = p.clone();
        ch.apply(&mut q);
        assert_eq!(m.total_cost(&q), 0.0);
        assert_eq!(m.total_cost(&p) - m.total_cost(&q), ch.benefit);
        // Host 2 was asked, then host 3 by host 2.
        assert_eq!(ch.asked, 3);
    }
}
