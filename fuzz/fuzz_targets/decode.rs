//! Fuzz target for every decoder of score-core's wire format: whole
//! datagrams, each message body (also sealed with a valid MAC, so the fuzzer
//! gets past authentication), the token decoder, the token reassembler and
//! the token-order parts assembler, and the replay table (freshness,
//! incarnations, sequence windows). Any
//! panic is a bug; so is a value that decodes but does not re-encode to the
//! same thing.

#![no_main]

use std::net::Ipv4Addr;

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use score_core::wire::{
    ChunkOutcome, ClusterKey, Header, Kind, Message, PartsAssembler, PartsLimits, Reassembler,
    ReassemblyLimits, decode, decode_token, encode_token, seal,
};
use score_core::wire::{Freshness, ReplayTable};

fuzz_target!(|data: &[u8]| {
    let key = ClusterKey::new(b"fuzzing cluster key 0123456789").expect("valid key");
    let header = Header {
        sender: Ipv4Addr::new(10, 0, 0, 1),
        epoch: 1,
        seq: 1,
        ..Header::default()
    };

    // 1. Raw bytes as a datagram: almost always a MAC failure, never a panic.
    if let Ok(d) = decode(data, &key) {
        let mut b = BytesMut::new();
        d.encode(&key, &mut b).expect("decoded datagram re-encodes");
        assert_eq!(&b[..], data);
    }

    // 2. Raw bytes as each kind's body; what parses must re-encode to the
    //    same bytes (every body has one encoding).
    for kind in Kind::ALL {
        if let Ok(m) = Message::parse(kind, data) {
            let mut b = BytesMut::new();
            m.encode(&header, &key, &mut b)
                .expect("parsed body re-encodes");
            assert_eq!(&b[28..b.len() - 32], data);
            assert_eq!(decode(&b, &key).expect("round trip").message, m);
        }
    }

    // 3. The same bytes sealed with a valid MAC, the kind taken from the
    //    first byte: exercises everything after authentication.
    if let Some((&kind, body)) = data.split_first() {
        let mut b = BytesMut::new();
        if seal(kind, &header, body, &key, &mut b).is_ok() {
            let _ = decode(&b, &key);
        }
    }

    // 4. The token decoder: a token that decodes re-encodes and decodes to
    //    itself.
    if let Ok(t) = decode_token(data) {
        let mut b = BytesMut::new();
        encode_token(&t, &mut b).expect("decoded token re-encodes");
        assert_eq!(decode_token(&b).expect("re-decodes"), t);
    }

    // 5. The reassembler, fed records [len: u16 LE][epoch: u8][chunk body]
    //    (u16 lengths so that full 1200-byte chunks, hence transfers of
    //    several chunks, can be built).
    let mut r = Reassembler::new(ReassemblyLimits {
        max_transfers: 3,
        max_bytes: 64 * 1024,
        remember_completed: 4,
    });
    let mut orders: PartsAssembler<u32> = PartsAssembler::new(PartsLimits {
        max_lists: 2,
        max_items: 1000,
    });
    let mut rest = data;
    while let [lo, hi, epoch, tail @ ..] = rest {
        let n = usize::from(u16::from_le_bytes([*lo, *hi])).min(tail.len());
        let (body, next) = tail.split_at(n);
        rest = next;
        if let Ok(Message::TokenChunk(c)) = Message::parse(Kind::TokenChunk, body) {
            let h = Header {
                epoch: u64::from(*epoch),
                ..header
            };
            if let Ok(ChunkOutcome::Complete(t)) = r.insert(&h, &c) {
                assert_eq!(t.epoch, h.epoch);
            }
            assert!(r.in_progress() <= 3);
            assert!(r.buffered_bytes() <= 64 * 1024);
        }
        // The same records as parts of token orders, the epoch byte naming
        // the sender.
        if let Ok(Message::TokenOrder(o)) = Message::parse(Kind::TokenOrder, body) {
            let _ = orders.insert_token_order(Ipv4Addr::new(10, 0, 0, *epoch), o);
            assert!(orders.in_progress() <= 2);
            assert!(orders.buffered_items() <= 1000);
        }
    }

    // 5. Raw bytes as a stream of (sender, incarnation, age, seq) headers:
    //    each (sender, incarnation, seq) is accepted at most once, and never
    //    one from an incarnation older than one accepted from that sender.
    let now = 1_000_000u64;
    // Room for all 8 senders: nothing is evicted, so nothing may pass twice.
    let mut table = ReplayTable::new(
        8,
        Freshness {
            started_ms: now - 50_000,
            max_age_ms: 30_000,
        },
    );
    let mut accepted = std::collections::HashSet::new();
    let mut newest = std::collections::HashMap::new();
    for rec in data.chunks_exact(5) {
        let h = Header {
            sender: Ipv4Addr::new(10, 0, 0, rec[0] & 7),
            incarnation: u32::from(rec[1] & 3),
            sent_at_ms: now - u64::from(rec[2]) * 200,
            seq: u64::from(u16::from_le_bytes([rec[3], rec[4]])),
            ..header
        };
        if table.accept(&h, now).is_ok() {
            assert!(accepted.insert((h.sender, h.incarnation, h.seq)));
            let n = newest.entry(h.sender).or_insert(h.incarnation);
            assert!(h.incarnation >= *n);
            *n = h.incarnation;
        }
    }
});
