//! Each token policy's order on a small crafted token, against the paper's
//! definitions (§II), and the round bookkeeping of `advance`.

use std::net::Ipv4Addr;

use proptest::prelude::*;
use score_core::cost::{CostModel, Placement, Traffic};
use score_core::decision::{Capacity, MigrationCost, Rule};
use score_core::policy::{
    GlobalPolicy, PolicyKind, TokenPolicy, advance, rank_by_saving, ranking_ids,
};
use score_core::token::{Load, Token, TokenEntry};
use score_core::topology::{LinkWeights, Topology};

/// Five VMs: (id, level, load).
///   10: level 1, load 50
///   20: level 3, load 10
///   30: level 3, load 90
///   40: level 2, load 200
///   50: level 3, load 90
fn crafted() -> Token {
    let e = |id, level, load| TokenEntry {
        id,
        level,
        load: Load(load),
        visited: false,
    };
    Token::from_entries(
        1,
        0,
        None,
        vec![
            e(50, 3, 90),
            e(10, 1, 50),
            e(30, 3, 90),
            e(20, 3, 10),
            e(40, 2, 200),
        ],
    )
}

/// The holders of one full round through `advance`, starting fresh.
fn one_round(kind: PolicyKind) -> Vec<u32> {
    let mut token = crafted();
    let mut policy = kind.build();
    let mut order = Vec::new();
    let mut holder = advance(policy.as_mut(), &mut token, None);
    while token.round == 0 {
        let vm = holder.unwrap();
        order.push(vm);
        holder = advance(policy.as_mut(), &mut token, Some(vm));
    }
    order
}

#[test]
fn round_robin_ascending_and_wrapping() {
    assert_eq!(one_round(PolicyKind::RoundRobin), [10, 20, 30, 40, 50]);
    // From 30 the order goes on upwards and wraps.
    let mut p = PolicyKind::RoundRobin.build();
    assert_eq!(p.next(&crafted(), Some(30)), Some(40));
    assert_eq!(p.next(&crafted(), Some(50)), Some(10));
    // An ID between entries (a VM that left) continues after it.
    assert_eq!(p.next(&crafted(), Some(35)), Some(40));
    // Never the current one, unless it is alone.
    let alone = Token::new(0, [7]);
    assert_eq!(p.next(&alone, Some(7)), Some(7));
}

#[test]
fn distributed_highest_level_first_ties_to_lower_id() {
    // Level 3: 20, 30, 50 (by ID), then level 2: 40, then level 1: 10.
    assert_eq!(one_round(PolicyKind::Distributed), [20, 30, 50, 40, 10]);
}

#[test]
fn load_aware_level_then_load_then_id() {
    // Level 3: 30 and 50 (load 90, 30 has the lower ID), then 20 (load 10);
    // level 2: 40 (its load 200 does not beat a higher level); level 1: 10.
    assert_eq!(one_round(PolicyKind::LoadAware), [30, 50, 20, 40, 10]);
}

#[test]
fn level_policies_read_the_levels_the_token_carries() {
    // The holder of 40 learns its level is now 4: distributed picks it
    // next in the following round, before the level-3 VMs.
    let mut token = crafted();
    let mut p = PolicyKind::Distributed.build();
    for vm in [20, 30, 50, 40, 10] {
        token.update(vm, token.get(vm).unwrap().level, Load(0));
    }
    token.update(40, 4, Load(0));
    token.start_round();
    assert_eq!(p.next(&token, Some(10)), Some(40));
}

#[test]
fn global_follows_the_fed_ranking_once() {
    let token = crafted();
    let mut p = GlobalPolicy::new();
    assert!(p.needs_global_knowledge());
    p.feed_ranking(vec![30, 99, 10]);
    assert!(p.has_ranking());
    // 30 is the current holder, 99 is not in the token: 10.
    assert_eq!(p.next(&token, Some(30)), Some(10));
    // The ranking is used up: round-robin fallback.
    assert!(!p.has_ranking());
    assert_eq!(p.next(&token, Some(30)), Some(40));
}

#[test]
fn advance_counts_rounds_and_clears_flags() {
    let mut token = Token::new(0, [1, 2, 3]);
    let mut p = PolicyKind::RoundRobin.build();
    let mut holder = advance(p.as_mut(), &mut token, None);
    assert_eq!(holder, Some(1));
    assert_eq!(token.holder, Some(1));
    let mut seen = Vec::new();
    for _ in 0..7 {
        let vm = holder.unwrap();
        seen.push(vm);
        holder = advance(p.as_mut(), &mut token, Some(vm));
    }
    assert_eq!(seen, [1, 2, 3, 1, 2, 3, 1]);
    assert_eq!(token.round, 2);
    // Empty token: nobody.
    let mut empty = Token::new(0, []);
    assert_eq!(advance(p.as_mut(), &mut empty, None), None);
}

#[test]
fn policy_kind_names() {
    for k in PolicyKind::ALL {
        assert_eq!(k.name().parse::<PolicyKind>().unwrap(), k);
        assert_eq!(k.build().name(), k.name());
        assert_eq!(k.to_string(), k.name());
        assert_eq!(
            k.needs_global_knowledge(),
            k.build().needs_global_knowledge()
        );
    }
    assert!("roundrobin".parse::<PolicyKind>().is_err());
    let k: PolicyKind = serde_json::from_str("\"load-aware\"").unwrap();
    assert_eq!(k, PolicyKind::LoadAware);
}

#[test]
fn global_ranking_by_saving() {
    // 4 hosts in 2 racks (W(1) = 1, W(2) = 1 + e); three VMs.
    // VM 0 on host 0 talks to VM 1 on host 2 (λ 5) and VM 2 on host 3 (λ 1).
    let topo = Topology::regular(
        &[2, 2],
        LinkWeights::paper_truncated(2),
        Ipv4Addr::new(10, 0, 0, 1),
    )
    .unwrap();
    let traffic = Traffic::from_triples(3, [(0, 1, 5.0), (0, 2, 1.0)]).unwrap();
    let placement = Placement::new(4, vec![0, 2, 3]).unwrap();
    let m = CostModel::new(&topo, &traffic);
    let room = |_| {
        Some(Capacity {
            free_slots: 1,
            free_mem_mb: 1,
        })
    };
    let r = rank_by_saving(
        &m,
        &placement,
        Rule::BestBenefit,
        MigrationCost::default(),
        |_| 1,
        room,
    );
    // VM 0 to host 2: saves 2*(5 W2 + W2 - (0 + W1)) = 2*(6 W2 - 1).
    // VM 1 to host 0: saves 2*5*(W2 - 0) = 10 W2.
    // VM 2 to host 0: saves 2*1*W2 = 2 W2.
    let w2 = topo.weights().cumulative(2);
    let ids = ranking_ids(&r);
    assert_eq!(ids, [0, 1, 2]);
    assert!((r[0].saving - 2.0 * (6.0 * w2 - 1.0)).abs() < 1e-9);
    assert_eq!(r[0].to, 2);
    assert!((r[1].saving - 10.0 * w2).abs() < 1e-9);
    assert!((r[2].saving - 2.0 * w2).abs() < 1e-9);
    // Hosts 2 and 0 full: VM 0 can still go to host 3 (saving 2*(6 W2 - 5)),
    // VM 1 and VM 2 have nowhere to go (their only candidate is host 0).
    let r = rank_by_saving(
        &m,
        &placement,
        Rule::BestBenefit,
        MigrationCost::default(),
        |_| 1,
        |h| {
            (h != 0 && h != 2).then_some(Capacity {
                free_slots: 1,
                free_mem_mb: 1,
            })
        },
    );
    assert_eq!(ranking_ids(&r), [0]);
    assert_eq!(r[0].to, 3);
}

proptest! {
    /// Through `advance`, every policy gives every VM the token exactly
    /// once per round, whatever the levels and loads.
    #[test]
    fn every_vm_once_per_round(
        entries in prop::collection::vec((any::<u32>(), 0u8..5, any::<u8>()), 1..30),
        kind in prop::sample::select(PolicyKind::ALL.to_vec()),
    ) {
        let entries: Vec<TokenEntry> = entries
            .into_iter()
            .map(|(id, level, load)| TokenEntry { id, level, load: Load(load), visited: false })
            .collect();
        let mut token = Token::from_entries(0, 0, None, entries);
        let n = token.len();
        let mut p = kind.build();
        let mut holder = advance(p.as_mut(), &mut token, None);
        for round in 0..3u32 {
            let mut seen = Vec::new();
            while token.round == round {
                let vm = holder.unwrap();
                seen.push(vm);
                prop_assert!(seen.len() <= n);
                holder = advance(p.as_mut(), &mut token, Some(vm));
            }
            seen.sort_unstable();
            seen.dedup();
            prop_assert_eq!(seen.len(), n);
        }
    }
}
