//! Test oracle: the policies and `advance` as first written, plain scans of
//! the whole token per hand-off (O(n) each), kept to prove that the indexed
//! token (O(log n) per hand-off) hands the token to exactly the same VMs.

use std::cmp::Reverse;

use proptest::prelude::*;

use super::{PolicyKind, advance};
use crate::token::{Load, Token, TokenEntry, VmId};

/// The unvisited entry with the greatest `key`, other than `current`; the
/// current VM only if it is the only unvisited one (the original scan).
fn pick_unvisited<K: Ord>(
    token: &Token,
    current: Option<VmId>,
    key: impl Fn(&TokenEntry) -> K,
) -> Option<VmId> {
    let best = token
        .entries()
        .iter()
        .filter(|e| !e.visited && Some(e.id) != current)
        .max_by_key(|e| key(e))
        .map(|e| e.id);
    best.or_else(|| current.filter(|&c| token.get(c).is_some_and(|e| !e.visited)))
}

/// The first unvisited VM after `current` in ascending ID order, wrapping,
/// with `current` itself last (the original scan).
fn next_in_order(token: &Token, current: Option<VmId>) -> Option<VmId> {
    let entries = token.entries();
    let start = match current {
        Some(c) => entries.partition_point(|e| e.id <= c),
        None => 0,
    };
    let (head, tail) = entries.split_at(start);
    tail.iter()
        .chain(head.iter())
        .find(|e| !e.visited)
        .map(|e| e.id)
}

/// Whether every entry is visited (the original scan).
fn round_complete(token: &Token) -> bool {
    token.entries().iter().all(|e| e.visited)
}

/// The four policies as first written.
#[derive(Debug)]
struct Naive {
    kind: PolicyKind,
    ranking: Option<Vec<VmId>>,
}

impl Naive {
    fn new(kind: PolicyKind) -> Self {
        Naive {
            kind,
            ranking: None,
        }
    }

    fn next(&mut self, token: &Token, current: Option<VmId>) -> Option<VmId> {
        match self.kind {
            PolicyKind::RoundRobin => next_in_order(token, current),
            PolicyKind::Distributed => pick_unvisited(token, current, |e| (e.level, Reverse(e.id))),
            PolicyKind::LoadAware => {
                pick_unvisited(token, current, |e| (e.level, e.load, Reverse(e.id)))
            }
            PolicyKind::Global => {
                let ranked = self.ranking.take().and_then(|r| {
                    r.into_iter()
                        .find(|&id| Some(id) != current && token.get(id).is_some())
                });
                ranked.or_else(|| next_in_order(token, current))
            }
        }
    }

    /// `advance` as first written.
    fn advance(&mut self, token: &mut Token, current: Option<VmId>) -> Option<VmId> {
        if let Some(e) = current.and_then(|c| token.get_mut(c)) {
            e.visited = true;
        }
        if !token.is_empty() && round_complete(token) {
            token.start_round();
        }
        let mut next = self.next(token, current);
        if next.is_none() && !token.is_empty() {
            token.start_round();
            next = self.next(token, current);
        }
        token.holder = next;
        next
    }
}

/// One step applied to both tokens.
#[derive(Debug, Clone)]
enum Op {
    /// Hand the token on from the holder.
    Advance,
    /// The holder (or the VM at this index) records a level and load.
    Update(usize, u8, u8),
    /// Edit an entry in place through `get_mut`.
    Edit(usize, u8, u8, bool),
    /// Edit an entry in place, then ask the policy directly, with the edited
    /// entry not yet read back by the token.
    EditThenPeek(usize, u8, u8, bool, Option<usize>),
    /// Change an ID in place (breaks the order; the token must cope).
    EditId(usize, VmId),
    /// A VM starts.
    Insert(VmId),
    /// A VM stops.
    Remove(usize),
    /// Clear the flags and count a round.
    StartRound,
    /// Ask the policy directly, from the VM at this index (or from none).
    Peek(Option<usize>),
    /// Feed a ranking (IDs by index) to the global policy.
    Feed(Vec<usize>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        12 => Just(Op::Advance),
        4 => (any::<usize>(), 0u8..5, 0u8..4).prop_map(|(i, l, w)| Op::Update(i, l, w)),
        3 => (any::<usize>(), 0u8..5, 0u8..4, any::<bool>())
            .prop_map(|(i, l, w, v)| Op::Edit(i, l, w, v)),
        3 => (any::<usize>(), 0u8..5, 0u8..4, any::<bool>(), any::<Option<usize>>())
            .prop_map(|(i, l, w, v, c)| Op::EditThenPeek(i, l, w, v, c)),
        1 => (any::<usize>(), 0u32..80).prop_map(|(i, id)| Op::EditId(i, id)),
        2 => (0u32..80).prop_map(Op::Insert),
        2 => any::<usize>().prop_map(Op::Remove),
        1 => Just(Op::StartRound),
        2 => any::<Option<usize>>().prop_map(Op::Peek),
        2 => prop::collection::vec(any::<usize>(), 0..4).prop_map(Op::Feed),
    ]
}

/// The ID at index `i` (modulo the length), if the token has any.
fn id_at(token: &Token, i: usize) -> Option<VmId> {
    let n = token.len();
    (n > 0).then(|| token.entries()[i % n].id)
}

/// Applies `ops` to an indexed token through the real policy and to a copy
/// through the naive one; every answer and the tokens must agree.
fn agree(kind: PolicyKind, entries: Vec<TokenEntry>, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut fast = Token::from_entries(0, 0, None, entries);
    let mut slow = fast.clone();
    let mut policy = kind.build();
    let mut naive = Naive::new(kind);
    let mut holder = None;
    for op in ops {
        match op {
            Op::Advance => {
                let a = advance(policy.as_mut(), &mut fast, holder);
                let b = naive.advance(&mut slow, holder);
                prop_assert_eq!(a, b, "advance from {:?}", holder);
                holder = a;
            }
            Op::Update(i, level, load) => {
                if let Some(id) = holder.or_else(|| id_at(&slow, *i)) {
                    let a = fast.update(id, *level, Load(*load));
                    prop_assert_eq!(a, slow.update(id, *level, Load(*load)));
                }
            }
            Op::Edit(i, level, load, visited) | Op::EditThenPeek(i, level, load, visited, _) => {
                if let Some(id) = id_at(&slow, *i) {
                    // After an out-of-order ID edit a listed ID may not be
                    // found: both tokens must then agree on that too.
                    prop_assert_eq!(fast.get(id).is_some(), slow.get(id).is_some());
                    for t in [&mut fast, &mut slow] {
                        if let Some(e) = t.get_mut(id) {
                            e.level = *level;
                            e.load = Load(*load);
                            e.visited = *visited;
                        }
                    }
                }
                if let Op::EditThenPeek(.., c) = op {
                    let cur = c.and_then(|c| id_at(&slow, c));
                    prop_assert_eq!(policy.next(&fast, cur), naive.next(&slow, cur));
                    prop_assert_eq!(fast.round_complete(), round_complete(&slow));
                }
            }
            Op::EditId(i, id) => {
                if let Some(old) = id_at(&slow, *i) {
                    for t in [&mut fast, &mut slow] {
                        if let Some(e) = t.get_mut(old) {
                            e.id = *id;
                        }
                    }
                }
            }
            Op::Insert(id) => {
                fast.insert(*id);
                slow.insert(*id);
            }
            Op::Remove(i) => {
                if let Some(id) = id_at(&slow, *i) {
                    prop_assert_eq!(fast.remove(id), slow.remove(id));
                }
            }
            Op::StartRound => {
                fast.start_round();
                slow.start_round();
            }
            Op::Peek(c) => {
                let cur = c.and_then(|c| id_at(&slow, c));
                prop_assert_eq!(policy.next(&fast, cur), naive.next(&slow, cur));
            }
            Op::Feed(idx) => {
                let ids: Vec<VmId> = idx.iter().filter_map(|&i| id_at(&slow, i)).collect();
                policy.feed_ranking(ids.clone());
                naive.ranking = Some(ids);
            }
        }
        prop_assert_eq!(&fast, &slow);
        prop_assert_eq!(fast.round_complete(), round_complete(&slow));
    }
    Ok(())
}

fn entries() -> impl Strategy<Value = Vec<TokenEntry>> {
    prop::collection::vec((0u32..80, 0u8..5, 0u8..4, any::<bool>()), 0..40).prop_map(|v| {
        v.into_iter()
            .map(|(id, level, load, visited)| TokenEntry {
                id,
                level,
                load: Load(load),
                visited,
            })
            .collect()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    /// Same hand-offs, same answers, same token after any mix of hand-offs,
    /// updates, in-place edits, joins, leaves and rounds, for every policy.
    #[test]
    fn indexed_policies_choose_as_the_scans_did(
        kind in prop::sample::select(PolicyKind::ALL.to_vec()),
        entries in entries(),
        ops in prop::collection::vec(op(), 0..120),
    ) {
        agree(kind, entries, &ops)?;
    }
}

/// A larger token through many rounds of the simulator's loop (update, then
/// advance), levels and loads changing at every hand-off: the hand-off
/// sequences of the indexed and the plain token are identical.
#[test]
fn long_runs_hand_off_in_the_same_order() {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let ids: Vec<VmId> = (0..3000).map(|_| (rand() % 20_000) as VmId).collect();
    for kind in PolicyKind::ALL {
        let mut fast = Token::new(1, ids.iter().copied());
        let mut slow = fast.clone();
        let mut policy = kind.build();
        let mut naive = Naive::new(kind);
        let (mut a, mut b) = (None, None);
        for step in 0..4 * fast.len() {
            if let Some(h) = a {
                let (level, load) = ((rand() % 5) as u8, Load((rand() % 7) as u8));
                fast.update(h, level, load);
                slow.update(h, level, load);
            }
            if kind == PolicyKind::Global && step % 3 == 0 {
                let r: Vec<VmId> = (0..3).map(|_| ids[rand() as usize % ids.len()]).collect();
                policy.feed_ranking(r.clone());
                naive.ranking = Some(r);
            }
            a = advance(policy.as_mut(), &mut fast, a);
            b = naive.advance(&mut slow, b);
            assert_eq!(a, b, "{kind} step {step}");
        }
        assert_eq!(fast, slow);
        // Global follows its ranking, not the flags: fewer full rounds.
        if kind != PolicyKind::Global {
            assert!(fast.round >= 3, "{kind}: {} rounds", fast.round);
        }
    }
}
