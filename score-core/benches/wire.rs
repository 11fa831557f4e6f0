//! Wire-format benchmarks: token encode/decode time and size at 1k, 100k
//! and 1M VMs for three address layouts, and sealing/verifying a small
//! datagram. Run with
//! `cargo bench -p score-core --bench wire`; the bytes-per-VM table is
//! printed before the timings.

use std::hint::black_box;
use std::net::Ipv4Addr;

use bytes::BytesMut;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use score_core::token::{Load, Token, TokenEntry};
use score_core::wire::{ClusterKey, Header, Message, decode, decode_token, encode_token};

/// How VM addresses are laid out.
#[derive(Clone, Copy)]
enum Layout {
    /// One block from 10.0.0.0 up, 90% of addresses in use.
    Dense,
    /// One /24 per rack from 10.0.0.0, each using 100-250 random addresses
    /// of .1-.254.
    Subnets,
    /// Distinct uniformly random 32-bit IDs: the worst case.
    Sparse,
}

impl Layout {
    fn name(self) -> &'static str {
        match self {
            Layout::Dense => "dense",
            Layout::Subnets => "subnets",
            Layout::Sparse => "sparse",
        }
    }
}

fn ids(layout: Layout, n: usize, rng: &mut StdRng) -> Vec<u32> {
    let base = u32::from(Ipv4Addr::new(10, 0, 0, 0));
    let mut out = Vec::with_capacity(n);
    match layout {
        Layout::Dense => {
            let mut a = base;
            while out.len() < n {
                if rng.random_bool(0.9) {
                    out.push(a);
                }
                a += 1;
            }
        }
        Layout::Subnets => {
            let mut net = base;
            while out.len() < n {
                let used = rng.random_range(100..=250usize);
                let mut hosts: Vec<u32> = (1..=254).collect();
                for i in 0..used {
                    let j = rng.random_range(i..hosts.len());
                    hosts.swap(i, j);
                }
                let mut pick = hosts[..used].to_vec();
                pick.sort_unstable();
                out.extend(pick.into_iter().map(|h| net + h).take(n - out.len()));
                net += 256;
            }
        }
        Layout::Sparse => {
            let mut set = std::collections::HashSet::with_capacity(n);
            while set.len() < n {
                set.insert(rng.random::<u32>());
            }
            out.extend(set);
        }
    }
    out
}

/// A token mid-round: levels 0-3 (a three-tier tree), half the VMs
/// visited, and loads on every VM if `loads`.
fn token(layout: Layout, n: usize, loads: bool, seed: u64) -> Token {
    let mut rng = StdRng::seed_from_u64(seed);
    let entries = ids(layout, n, &mut rng)
        .into_iter()
        .map(|id| TokenEntry {
            id,
            level: rng.random_range(0..=3),
            load: Load(if loads { rng.random_range(1..=255) } else { 0 }),
            visited: rng.random_bool(0.5),
        })
        .collect();
    Token::from_entries(7, 3, Some(base_holder()), entries)
}

fn base_holder() -> u32 {
    u32::from(Ipv4Addr::new(10, 0, 0, 1))
}

fn encoded_len(t: &Token) -> usize {
    let mut b = BytesMut::new();
    encode_token(t, &mut b).expect("encodes");
    b.len()
}

const SIZES: [(usize, &str); 3] = [(1_000, "1k"), (100_000, "100k"), (1_000_000, "1M")];

fn print_sizes() {
    println!("token bytes per VM (paper baseline: 5; levels 0-3, half visited)");
    println!(
        "{:<8} {:>6} {:>12} {:>12}",
        "layout", "VMs", "no loads", "with loads"
    );
    for layout in [Layout::Dense, Layout::Subnets, Layout::Sparse] {
        for (n, label) in SIZES {
            let a = encoded_len(&token(layout, n, false, 1)) as f64 / n as f64;
            let b = encoded_len(&token(layout, n, true, 1)) as f64 / n as f64;
            println!("{:<8} {:>6} {:>12.3} {:>12.3}", layout.name(), label, a, b);
        }
    }
}

fn token_codec(c: &mut Criterion) {
    print_sizes();
    for layout in [Layout::Dense, Layout::Sparse] {
        let mut g = c.benchmark_group(format!("token_{}_loads", layout.name()));
        g.sample_size(10);
        for (n, label) in SIZES {
            let t = token(layout, n, true, 2);
            let mut buf = BytesMut::with_capacity(8 * n);
            encode_token(&t, &mut buf).expect("encodes");
            let encoded = buf.clone().freeze();
            g.throughput(Throughput::Elements(n as u64));
            g.bench_with_input(BenchmarkId::new("encode", label), &t, |b, t| {
                b.iter(|| {
                    buf.clear();
                    encode_token(black_box(t), &mut buf).expect("encodes");
                })
            });
            g.bench_with_input(BenchmarkId::new("decode", label), &encoded, |b, e| {
                b.iter(|| decode_token(black_box(e)).expect("decodes"))
            });
        }
        g.finish();
    }
}

fn datagram(c: &mut Criterion) {
    let key = ClusterKey::new(b"benchmark cluster key, 32 bytes!").expect("key");
    let header = Header {
        sender: Ipv4Addr::new(10, 0, 0, 1),
        epoch: 3,
        seq: 12345,
        ..Header::default()
    };
    let small = Message::CapacityResponse {
        in_reply_to: 12344,
        free_slots: 4,
        free_memory_mib: 32_768,
    };
    let chunk = {
        let t = token(Layout::Sparse, 2_000, true, 3);
        let cs = score_core::wire::token_chunks(&t, 1).expect("chunks");
        Message::TokenChunk(cs[0].clone())
    };
    let mut g = c.benchmark_group("datagram");
    for (name, m) in [("capacity_response", &small), ("token_chunk_full", &chunk)] {
        let mut buf = BytesMut::with_capacity(2048);
        m.encode(&header, &key, &mut buf).expect("encodes");
        let sealed = buf.clone().freeze();
        g.throughput(Throughput::Bytes(sealed.len() as u64));
        g.bench_function(BenchmarkId::new("encode_mac", name), |b| {
            b.iter(|| {
                buf.clear();
                black_box(m)
                    .encode(&header, &key, &mut buf)
                    .expect("encodes");
            })
        });
        g.bench_function(BenchmarkId::new("decode_verify", name), |b| {
            b.iter(|| decode(black_box(&sealed), &key).expect("decodes"))
        });
    }
    g.finish();
}

criterion_group!(benches, token_codec, datagram);
criterion_main!(benches);
