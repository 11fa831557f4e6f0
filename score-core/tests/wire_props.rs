//! Properties of the wire format: every message round-trips, arbitrary bytes
//! never panic the decoders, any altered or forged datagram is refused, and
//! token chunks reassemble in any order with duplicates.

use std::net::Ipv4Addr;

use bytes::BytesMut;
use proptest::prelude::*;
use score_core::token::{Load, Token, TokenEntry};
use score_core::wire::{
    ChunkBitmap, ChunkOutcome, ClusterKey, EjectAcceptance, FlowEntry, FlowReport, HEADER_LEN,
    Header, HopAck, Kind, MAC_LEN, MAX_FLOW_ENTRIES, MAX_GROUP_VMS, MAX_ORDER_VMS,
    MAX_ROTATION_PEERS, MAX_SWAP_PEERS, Message, PartsAssembler, PartsOutcome, Reassembler,
    RotationAcceptance, RotationLeg, RotationProposal, SwapAcceptance, SwapOrder, SwapProposal,
    SwapRefusal, SwapResult, TokenChunk, TokenOrder, WireError, decode, decode_token, encode_token,
    seal, token_chunks,
};
use score_core::wire::{Freshness, KeyRing, ReplayTable};

fn key_strategy() -> impl Strategy<Value = ClusterKey> {
    proptest::collection::vec(any::<u8>(), 16..80)
        .prop_filter_map("degenerate key", |b| ClusterKey::new(&b).ok())
}

fn header_strategy() -> impl Strategy<Value = Header> {
    (
        any::<u32>(),
        any::<u32>(),
        any::<u32>(),
        any::<u64>(),
        any::<u64>(),
        any::<u64>(),
    )
        .prop_map(|(a, d, incarnation, sent_at_ms, epoch, seq)| Header {
            sender: Ipv4Addr::from(a),
            destination: Ipv4Addr::from(d),
            incarnation,
            sent_at_ms,
            epoch,
            seq,
        })
}

fn entry_strategy() -> impl Strategy<Value = TokenEntry> {
    (any::<u32>(), 0u8..=15, any::<u8>(), any::<bool>()).prop_map(|(id, level, load, visited)| {
        TokenEntry {
            id,
            level,
            load: Load(load),
            visited,
        }
    })
}

/// Tokens of three shapes: random sparse IDs, a dense block with gaps, and
/// small clustered sets near the top of the address space.
fn token_strategy(max: usize) -> impl Strategy<Value = Token> {
    let sparse = proptest::collection::vec(entry_strategy(), 0..max).boxed();
    let dense = (
        any::<u32>(),
        proptest::collection::vec((1u32..4, 0u8..=3, any::<bool>()), 0..max),
    )
        .prop_map(|(base, steps)| {
            let mut id = base;
            let mut out = Vec::new();
            for (step, level, visited) in steps {
                out.push(TokenEntry {
                    id,
                    level,
                    load: Load(0),
                    visited,
                });
                match id.checked_add(step) {
                    Some(n) => id = n,
                    None => break,
                }
            }
            out
        })
        .boxed();
    let top = proptest::collection::vec(entry_strategy(), 0..20)
        .prop_map(|v| {
            v.into_iter()
                .map(|mut e| {
                    e.id = u32::MAX - (e.id % 64);
                    e
                })
                .collect()
        })
        .boxed();
    (
        prop_oneof![sparse, dense, top],
        any::<u64>(),
        any::<u32>(),
        proptest::option::of(any::<u32>()),
    )
        .prop_map(|(entries, epoch, round, holder)| {
            Token::from_entries(epoch, round, holder, entries)
        })
}

fn rate_strategy() -> impl Strategy<Value = f64> {
    prop_oneof![
        Just(0.0),
        0.0f64..1e12,
        any::<u64>().prop_map(|v| v as f64),
        Just(f64::MAX),
    ]
}

fn message_strategy() -> impl Strategy<Value = Message> {
    let ip = any::<u32>().prop_map(Ipv4Addr::from);
    let chunk = (
        token_strategy(400),
        any::<u64>(),
        any::<prop::sample::Index>(),
    )
        .prop_map(|(t, transfer, i)| {
            let chunks = token_chunks(&t, transfer).unwrap();
            let c = chunks[i.index(chunks.len())].clone();
            Message::TokenChunk(c)
        });
    let ack = (
        any::<u64>(),
        1u16..=8192,
        proptest::collection::vec(any::<u16>(), 0..64),
    )
        .prop_map(|(transfer, count, marks)| {
            let mut received = ChunkBitmap::new(count);
            for m in marks {
                received.set(m % count);
            }
            Message::HopAck(HopAck { transfer, received })
        });
    let flows =
        (
            any::<u64>(),
            proptest::collection::vec(
                (any::<u32>(), any::<u32>(), rate_strategy())
                    .prop_map(|(vm, peer, rate)| FlowEntry { vm, peer, rate }),
                0..=MAX_FLOW_ENTRIES,
            ),
            1u16..=u16::MAX,
            any::<prop::sample::Index>(),
        )
            .prop_map(|(report, entries, parts, i)| {
                Message::FlowReport(FlowReport {
                    report,
                    part: i.index(usize::from(parts)) as u16,
                    parts,
                    entries,
                })
            });
    let order = (
        any::<u64>(),
        proptest::collection::vec(any::<u32>(), 0..=MAX_ORDER_VMS),
        1u16..=u16::MAX,
        any::<prop::sample::Index>(),
    )
        .prop_map(|(order, vms, parts, i)| {
            Message::TokenOrder(TokenOrder {
                order,
                part: i.index(usize::from(parts)) as u16,
                parts,
                vms,
            })
        });
    prop_oneof![
        chunk,
        ack,
        any::<u32>().prop_map(|vm| Message::LocationRequest { vm }),
        (any::<u64>(), any::<u32>(), ip.clone()).prop_map(|(in_reply_to, vm, host)| {
            Message::LocationResponse {
                in_reply_to,
                vm,
                host,
            }
        }),
        any::<u32>().prop_map(|vm| Message::CapacityRequest { vm }),
        (any::<u64>(), any::<u32>(), any::<u64>()).prop_map(
            |(in_reply_to, free_slots, free_memory_mib)| Message::CapacityResponse {
                in_reply_to,
                free_slots,
                free_memory_mib,
            }
        ),
        (any::<u32>(), ip.clone(), ip).prop_map(|(vm, from, to)| Message::MigrationNotice {
            vm,
            from,
            to
        }),
        flows,
        order,
        ((any::<u32>(), any::<u32>()), (any::<u32>(), any::<u32>())).prop_map(
            |((holder, round), (visited, host))| Message::TokenSeen {
                holder,
                round,
                visited,
                host: Ipv4Addr::from(host)
            }
        ),
        swap_strategy(),
        rotation_strategy(),
        group_strategy(),
    ]
}

/// The group move messages (WIRE.md, "Group moves"): 1 to
/// `MAX_GROUP_VMS` distinct VMs, none 0.
fn group_strategy() -> impl Strategy<Value = Message> {
    let vms = || {
        proptest::collection::btree_set(1u32.., 1..=MAX_GROUP_VMS)
            .prop_map(|s| s.into_iter().collect::<Vec<_>>())
    };
    prop_oneof![
        vms().prop_map(|vms| Message::GroupReserve { vms }),
        vms().prop_map(|vms| Message::GroupRelease { vms }),
    ]
}

/// The rotation messages (WIRE.md, "Rotations").
fn rotation_strategy() -> impl Strategy<Value = Message> {
    let ip = || any::<u32>().prop_map(Ipv4Addr::from);
    let leg = |peers: usize| {
        (
            (any::<u32>(), ip(), ip()),
            (rate_strategy(), any::<u64>()),
            proptest::collection::vec((any::<u32>(), ip(), rate_strategy()), 0..=peers),
        )
            .prop_map(
                |((vm, from, to), (cost_before, mem_mib), peers)| RotationLeg {
                    vm,
                    from,
                    to,
                    cost_before,
                    mem_mib,
                    peers,
                },
            )
    };
    let half = MAX_ROTATION_PEERS / 2;
    let propose = (
        (any::<u32>(), rate_strategy(), any::<u64>()),
        proptest::collection::vec(leg(half), 1..=2),
    )
        .prop_map(|((round, c_m, home_free_mem_mib), legs)| {
            Message::RotatePropose(RotationProposal {
                round,
                c_m,
                home_free_mem_mib,
                legs,
            })
        });
    let accept = (
        (any::<u64>(), any::<[u32; 3]>(), (ip(), ip(), ip())),
        (-1e12f64..1e12, rate_strategy()),
    )
        .prop_map(|((in_reply_to, vms, (x, y, z)), (benefit, c_m))| {
            Message::RotateAccept(RotationAcceptance {
                in_reply_to,
                vms,
                hosts: [x, y, z],
                benefit,
                c_m,
            })
        });
    prop_oneof![propose, accept]
}

/// The swap messages (WIRE.md, "Swaps").
fn swap_strategy() -> impl Strategy<Value = Message> {
    let ip = any::<u32>().prop_map(Ipv4Addr::from);
    let finite = prop_oneof![
        -1e12f64..1e12,
        Just(0.0),
        Just(-0.0),
        Just(f64::MAX),
        Just(f64::MIN)
    ];
    let finite_again = finite.clone();
    let propose = (
        (any::<u32>(), ip.clone(), ip),
        (finite.clone(), rate_strategy(), rate_strategy()),
        (any::<u64>(), any::<u64>(), any::<bool>()),
        proptest::collection::vec((any::<u32>(), rate_strategy()), 0..=MAX_SWAP_PEERS),
    )
        .prop_map(
            |(
                (vm, from, to),
                (gain, cost_before, c_m),
                (mem_mib, from_free_mem_mib, from_headroom),
                peers_on_target,
            )| {
                Message::SwapPropose(SwapProposal {
                    vm,
                    from,
                    to,
                    gain,
                    cost_before,
                    c_m,
                    mem_mib,
                    from_free_mem_mib,
                    from_headroom,
                    peers_on_target,
                })
            },
        )
        .boxed();
    let accept = (
        (any::<u64>(), any::<u32>(), any::<u32>()),
        (finite.clone(), rate_strategy(), rate_strategy()),
        (finite, rate_strategy(), any::<u8>(), any::<bool>()),
    )
        .prop_map(
            |(
                (in_reply_to, vm, partner),
                (partner_gain, partner_cost_before, partner_cost_after),
                (benefit, c_m, partner_level_after, first),
            )| {
                Message::SwapAccept(SwapAcceptance {
                    in_reply_to,
                    vm,
                    partner,
                    partner_gain,
                    partner_cost_before,
                    partner_cost_after,
                    benefit,
                    c_m,
                    partner_level_after,
                    order: if first {
                        SwapOrder::PartnerFirst
                    } else {
                        SwapOrder::ProposerFirst
                    },
                })
            },
        );
    let eject_propose = (any::<u32>(), propose.clone()).prop_map(|(round, m)| match m {
        Message::SwapPropose(proposal) => Message::EjectPropose { round, proposal },
        other => other,
    });
    let eject_accept = (
        (any::<u64>(), any::<u32>(), any::<u32>(), any::<u32>()),
        (finite_again, rate_strategy(), any::<u8>(), any::<bool>()),
    )
        .prop_map(
            |((in_reply_to, vm, partner, to), (benefit, c_m, partner_level_after, first))| {
                Message::EjectAccept(EjectAcceptance {
                    in_reply_to,
                    vm,
                    partner,
                    partner_to: Ipv4Addr::from(to),
                    benefit,
                    c_m,
                    partner_level_after,
                    order: if first {
                        SwapOrder::PartnerFirst
                    } else {
                        SwapOrder::ProposerFirst
                    },
                })
            },
        );
    prop_oneof![
        propose,
        accept,
        eject_propose,
        eject_accept,
        (
            any::<u64>(),
            any::<u32>(),
            prop::sample::select(SwapRefusal::ALL.to_vec())
        )
            .prop_map(|(in_reply_to, vm, reason)| Message::SwapRefuse {
                in_reply_to,
                vm,
                reason
            }),
        (any::<u32>(), any::<u32>(), any::<bool>())
            .prop_map(|(vm, partner, go)| Message::SwapCommit { vm, partner, go }),
        (
            any::<u64>(),
            any::<u32>(),
            any::<u32>(),
            prop::sample::select(SwapResult::ALL.to_vec())
        )
            .prop_map(|(in_reply_to, vm, partner, result)| Message::SwapDone {
                in_reply_to,
                vm,
                partner,
                result
            }),
    ]
}

fn sealed(m: &Message, h: &Header, k: &ClusterKey) -> Vec<u8> {
    let mut b = BytesMut::new();
    m.encode(h, k, &mut b).unwrap();
    b.to_vec()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips(m in message_strategy(), h in header_strategy(), k in key_strategy()) {
        let b = sealed(&m, &h, &k);
        prop_assert!(b.len() <= score_core::wire::MAX_DATAGRAM);
        let d = decode(&b, &k).unwrap();
        prop_assert_eq!(d.header, h);
        prop_assert_eq!(d.message.kind(), m.kind());
        prop_assert_eq!(d.message, m);
    }

    #[test]
    fn any_flipped_byte_is_refused(
        m in message_strategy(),
        h in header_strategy(),
        k in key_strategy(),
        pos in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut b = sealed(&m, &h, &k);
        let i = pos.index(b.len());
        b[i] ^= flip;
        let err = decode(&b, &k).unwrap_err();
        // Bytes 0..8 (magic, version, kind, length) are checked before the
        // MAC and may fail on structure; anything else must fail the MAC,
        // as must a change of kind to another known kind.
        let structural = i < 8
            && !(i == 5 && Kind::from_u8(b[5]).is_some());
        if structural {
            prop_assert!(err != WireError::BadMac, "{:?} at {}", err, i);
        } else {
            prop_assert_eq!(err, WireError::BadMac);
        }
    }

    #[test]
    fn a_wrong_key_fails_the_mac(m in message_strategy(), h in header_strategy(), k in key_strategy(), other in key_strategy()) {
        let b = sealed(&m, &h, &k);
        prop_assume!(k.sign(b"probe") != other.sign(b"probe"));
        prop_assert_eq!(decode(&b, &other).unwrap_err(), WireError::BadMac);
    }

    /// A datagram is accepted only on the address it was sealed for: a
    /// captured one sent on to any other VM or host is refused, whatever
    /// the rest of the header says.
    #[test]
    fn a_datagram_is_only_good_where_it_was_sent(m in message_strategy(), h in header_strategy(), k in key_strategy(), elsewhere in any::<u32>()) {
        let b = sealed(&m, &h, &k);
        let d = decode(&b, &k).unwrap();
        prop_assert!(d.header.check_destination(h.destination).is_ok());
        let other = Ipv4Addr::from(elsewhere);
        prop_assume!(other != h.destination);
        let refused = matches!(
            d.header.check_destination(other),
            Err(WireError::WrongDestination { .. })
        );
        prop_assert!(refused);
        // Rewriting the destination in the bytes breaks the MAC.
        let mut moved = b.clone();
        moved[12..16].copy_from_slice(&other.octets());
        prop_assert_eq!(decode(&moved, &k).unwrap_err(), WireError::BadMac);
    }

    /// During a rotation a ring accepts datagrams sealed with the current
    /// or an older key until the older key's deadline, and never one sealed
    /// with a key it does not hold.
    #[test]
    fn a_key_ring_rotates(m in message_strategy(), h in header_strategy(), new in key_strategy(), old in key_strategy(), stranger in key_strategy(), until in 1u64..u64::MAX) {
        prop_assume!(new.sign(b"probe") != old.sign(b"probe"));
        prop_assume!(stranger.sign(b"probe") != old.sign(b"probe"));
        prop_assume!(stranger.sign(b"probe") != new.sign(b"probe"));
        let mut ring = KeyRing::new(new.clone()).accepting(old.clone(), until);
        let by_new = sealed(&m, &h, &new);
        let by_old = sealed(&m, &h, &old);
        prop_assert!(decode(&by_new, &ring).is_ok());
        prop_assert!(decode(&by_old, &ring).is_ok());
        prop_assert_eq!(decode(&sealed(&m, &h, &stranger), &ring).unwrap_err(), WireError::BadMac);
        ring.expire(until);
        prop_assert!(decode(&by_old, &ring).is_ok());
        ring.expire(until + 1);
        prop_assert_eq!(decode(&by_old, &ring).unwrap_err(), WireError::BadMac);
        prop_assert!(decode(&by_new, &ring).is_ok());
    }

    /// Whatever the order datagrams of one sender arrive in, each (sender,
    /// incarnation, sequence number) is accepted at most once, and nothing
    /// of an incarnation older than one accepted is.
    #[test]
    fn each_datagram_is_accepted_at_most_once(seq in proptest::collection::vec((0u32..3, 0u64..40), 1..200)) {
        let now = 10_000_000u64;
        let mut t = ReplayTable::new(4, Freshness { started_ms: 0, max_age_ms: 1000 });
        let mut accepted = std::collections::HashSet::new();
        let mut newest = 0u32;
        for (inc, s) in seq {
            let h = Header { sender: Ipv4Addr::new(10, 0, 0, 1), incarnation: inc, sent_at_ms: now, seq: s, ..Header::default() };
            if t.accept(&h, now).is_ok() {
                prop_assert!(accepted.insert((inc, s)), "accepted twice: {:?}", (inc, s));
                prop_assert!(inc >= newest);
                newest = inc;
            }
        }
    }

    #[test]
    fn truncated_or_extended_datagrams_are_refused(m in message_strategy(), h in header_strategy(), k in key_strategy(), cut in any::<prop::sample::Index>(), extra in proptest::collection::vec(any::<u8>(), 1..16)) {
        let b = sealed(&m, &h, &k);
        let n = cut.index(b.len());
        prop_assert!(decode(&b[..n], &k).is_err());
        let mut longer = b.clone();
        longer.extend_from_slice(&extra);
        prop_assert!(decode(&longer, &k).is_err());
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..1400), k in key_strategy()) {
        let _ = decode(&bytes, &k);
        let _ = decode_token(&bytes);
        for kind in Kind::ALL {
            let _ = Message::parse(kind, &bytes);
        }
    }

    #[test]
    fn arbitrary_bodies_behind_a_valid_mac_never_panic(
        kind in any::<u8>(),
        body in proptest::collection::vec(any::<u8>(), 0..1200),
        h in header_strategy(),
        k in key_strategy(),
    ) {
        let mut b = BytesMut::new();
        seal(kind, &h, &body, &k, &mut b).unwrap();
        match decode(&b, &k) {
            Ok(d) => {
                // What decodes re-encodes to the very same datagram.
                prop_assert_eq!(sealed(&d.message, &d.header, &k), b.to_vec());
            }
            Err(e) => prop_assert!(e != WireError::BadMac),
        }
    }

    #[test]
    fn a_datagram_header_valid_prefix_with_random_tail_never_panics(
        h in header_strategy(),
        k in key_strategy(),
        kind in 0u8..12,
        len in any::<u16>(),
        tail in proptest::collection::vec(any::<u8>(), 0..1400),
    ) {
        // Structurally plausible frames reach the length and MAC checks.
        let mut b = b"SCOR\x01".to_vec();
        b.push(kind);
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(&h.sender.octets());
        b.extend_from_slice(&h.epoch.to_be_bytes());
        b.extend_from_slice(&h.seq.to_be_bytes());
        b.extend_from_slice(&tail);
        let r = decode(&b, &k);
        prop_assert!(r.is_err());
        if b.len() < HEADER_LEN + MAC_LEN {
            let is_truncated = matches!(r, Err(WireError::Truncated { .. }));
            prop_assert!(is_truncated);
        }
    }

    #[test]
    fn tokens_round_trip(t in token_strategy(3000)) {
        let mut b = BytesMut::new();
        encode_token(&t, &mut b).unwrap();
        prop_assert_eq!(decode_token(&b).unwrap(), t);
    }

    #[test]
    fn altered_tokens_never_panic(t in token_strategy(300), pos in any::<prop::sample::Index>(), flip in 1u8..=255) {
        let mut b = BytesMut::new();
        encode_token(&t, &mut b).unwrap();
        let i = pos.index(b.len());
        b[i] ^= flip;
        if let Ok(u) = decode_token(&b) {
            // Whatever decodes is a valid token that round-trips itself.
            let mut c = BytesMut::new();
            encode_token(&u, &mut c).unwrap();
            prop_assert_eq!(decode_token(&c).unwrap(), u);
        }
    }

    #[test]
    fn chunks_reassemble_in_any_order_with_duplicates(
        t in token_strategy(3000),
        transfer in any::<u64>(),
        order_keys in proptest::collection::vec(any::<u32>(), 64),
        dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..16),
    ) {
        let chunks = token_chunks(&t, transfer).unwrap();
        let n = chunks.len();
        // A permutation of the chunks, then duplicates sprinkled in.
        let mut seq: Vec<usize> = (0..n).collect();
        seq.sort_by_key(|&i| (order_keys[i % order_keys.len()], i));
        for (j, d) in dups.iter().enumerate() {
            let at = (j * 7) % (seq.len() + 1);
            seq.insert(at, d.index(n));
        }
        let h = Header { sender: Ipv4Addr::new(10, 9, 8, 7), epoch: t.epoch, seq: 0, ..Header::default() };
        let mut r = Reassembler::default();
        let mut got = None;
        let mut seen = std::collections::HashSet::new();
        for &i in &seq {
            let c: &TokenChunk = &chunks[i];
            let out = r.insert(&h, c).unwrap();
            let first = seen.insert(i);
            match out {
                ChunkOutcome::Complete(tok) => {
                    prop_assert!(first && seen.len() == n && got.is_none());
                    got = Some(tok);
                }
                ChunkOutcome::Incomplete { received, count } => {
                    prop_assert!(first);
                    prop_assert_eq!(usize::from(received), seen.len());
                    prop_assert_eq!(usize::from(count), n);
                }
                ChunkOutcome::Duplicate => prop_assert!(!first),
                ChunkOutcome::AlreadyComplete => prop_assert!(got.is_some()),
            }
        }
        prop_assert_eq!(got, Some(t));
        prop_assert_eq!(r.in_progress(), 0);
        prop_assert!(r.ack(h.sender, transfer).unwrap().received.is_complete());
    }

    #[test]
    fn token_orders_assemble_in_any_order_with_duplicates(
        vms in proptest::collection::vec(any::<u32>(), 0..3000),
        order_keys in proptest::collection::vec(any::<u32>(), 16),
        dups in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let parts = TokenOrder::split(3, &vms).unwrap();
        let n = parts.len();
        let mut seq: Vec<usize> = (0..n).collect();
        seq.sort_by_key(|&i| (order_keys[i % order_keys.len()], i));
        for (j, d) in dups.iter().enumerate() {
            seq.insert((j * 5) % (seq.len() + 1), d.index(n));
        }
        let mut a: PartsAssembler<u32> = PartsAssembler::default();
        let mut done = None;
        for &i in &seq {
            let from = Ipv4Addr::new(10, 0, 0, 1);
            match a.insert_token_order(from, parts[i].clone()).unwrap() {
                PartsOutcome::Complete(v) => {
                    prop_assert!(done.is_none());
                    done = Some(v);
                }
                PartsOutcome::Superseded => prop_assert!(done.is_some()),
                PartsOutcome::Duplicate | PartsOutcome::Incomplete { .. } => {}
            }
        }
        prop_assert_eq!(done, Some(vms));
    }
}
