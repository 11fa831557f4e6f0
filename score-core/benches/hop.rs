//! Time of one token hand-off, two ways:
//!
//! - agent hop: the token arrives as bytes, is decoded, the holder records
//!   its VM, the policy picks the next holder ([`advance`]) and the token is
//!   encoded again (a fresh `Token` value every hop, as in the agent);
//! - resident hop: the same `Token` value stays in memory and is handed on
//!   again and again (as in the simulator): update, then [`advance`].
//!
//! Plain timing (median of many hops, and the minimum, which is the figure
//! least disturbed by other load on a shared machine) rather than
//! criterion, to print one table. Run: `cargo bench -p score-core --bench
//! hop`; after `--`, `agent` or `resident` picks one part and a number
//! (1000, 100000, 1000000) one size.

use std::hint::black_box;
use std::time::Instant;

use bytes::BytesMut;
use score_core::policy::{PolicyKind, advance};
use score_core::token::{Load, Token, TokenEntry};
use score_core::wire::{decode_token, encode_token};

/// A data centre's token: `n` VMs in 10.0.0.0/8, 40 per host in a /26 per
/// host, levels 0-3 and loads spread by a fixed xorshift, about half visited.
fn token(n: usize) -> Token {
    let mut x = 0x853c_49e6_748f_ea9bu64;
    let entries = (0..n as u32)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            TokenEntry {
                id: 0x0a00_0000 + (i / 40) * 64 + i % 40,
                level: (x & 3) as u8,
                load: Load((x >> 8) as u8),
                visited: (x >> 20) & 1 == 1,
            }
        })
        .collect();
    Token::from_entries(1, 0, None, entries)
}

/// Median, min and max in milliseconds.
fn stats(v: &mut [f64]) -> (f64, f64, f64) {
    v.sort_by(f64::total_cmp);
    (v[v.len() / 2], v[0], v[v.len() - 1])
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let only = args.iter().find_map(|a| a.parse::<usize>().ok());
    let picked = |p: &str| args.iter().any(|a| a == p);
    let all = !picked("agent") && !picked("resident");
    if all || picked("agent") {
        agent_hops(only);
    }
    if all || picked("resident") {
        resident_hops(only);
    }
}

const SIZES: [usize; 3] = [1_000, 100_000, 1_000_000];

fn agent_hops(only: Option<usize>) {
    println!("agent hop: decode + update + advance + encode, fresh Token per hop (ms)");
    println!("| VMs | policy | decode | advance | encode | total | total min | ns per VM |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|");
    for &n in SIZES.iter().filter(|&&n| only.is_none_or(|o| o == n)) {
        let hops = if n >= 1_000_000 { 60 } else { 200 };
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::Distributed,
            PolicyKind::LoadAware,
        ] {
            let t = token(n);
            let mut holder = t.entries()[n / 2].id;
            let mut buf = BytesMut::new();
            encode_token(&t, &mut buf).expect("encode");
            let mut bytes = buf.to_vec();
            let mut policy = kind.build();
            let (mut dec, mut adv, mut enc, mut tot) = (vec![], vec![], vec![], vec![]);
            for hop in 0..hops {
                let t0 = Instant::now();
                let mut t = decode_token(&bytes).expect("decode");
                let t1 = Instant::now();
                t.update(holder, (hop % 4) as u8, Load(100));
                let next = advance(policy.as_mut(), &mut t, Some(holder)).expect("non-empty");
                let t2 = Instant::now();
                let mut out = BytesMut::with_capacity(bytes.len() + 64);
                encode_token(&t, &mut out).expect("encode");
                let t3 = Instant::now();
                let ms = |a: Instant, b: Instant| (b - a).as_secs_f64() * 1e3;
                dec.push(ms(t0, t1));
                adv.push(ms(t1, t2));
                enc.push(ms(t2, t3));
                tot.push(ms(t0, t3));
                bytes = out.to_vec();
                holder = next;
            }
            let (total, total_min, _) = stats(&mut tot);
            println!(
                "| {n} | {} | {:.3} | {:.3} | {:.3} | {total:.3} | {total_min:.3} | {:.1} |",
                kind.name(),
                stats(&mut dec).0,
                stats(&mut adv).0,
                stats(&mut enc).0,
                total * 1e6 / n as f64
            );
        }
    }
}

fn resident_hops(only: Option<usize>) {
    println!("\nresident hop: update + advance on one Token value (us per hand-off)");
    println!("| VMs | policy | hand-offs | median | min | max |");
    println!("|---:|---|---:|---:|---:|---:|");
    for &n in SIZES.iter().filter(|&&n| only.is_none_or(|o| o == n)) {
        let hops = if n >= 1_000_000 { 2_000 } else { 20_000 };
        for kind in [
            PolicyKind::RoundRobin,
            PolicyKind::Distributed,
            PolicyKind::LoadAware,
        ] {
            let mut t = token(n);
            let mut policy = kind.build();
            let mut holder = advance(policy.as_mut(), &mut t, None);
            let mut us = Vec::with_capacity(hops);
            for hop in 0..hops {
                let vm = holder.expect("non-empty");
                let t0 = Instant::now();
                t.update(vm, (hop % 4) as u8, Load((hop % 200) as u8));
                holder = advance(policy.as_mut(), &mut t, Some(vm));
                us.push(t0.elapsed().as_secs_f64() * 1e6);
            }
            black_box(&t);
            let (median, min, max) = stats(&mut us);
            println!(
                "| {n} | {} | {hops} | {median:.2} | {min:.2} | {max:.1} |",
                kind.name()
            );
        }
    }
}
