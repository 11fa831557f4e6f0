//! score's bench object, `score-tc-bench`: the production classifiers and
//! maps of `score-tc` (the same source, `classifiers.rs`), plus programs
//! that run single pieces of the counting path, or the same count on other
//! map types, for `cargo xtask bench flows`. The agent never loads this
//! object; only the benches do.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF atomic add of the hosted-VM filter (`classifiers::filter_add`).
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod classifiers;

#[cfg(target_arch = "bpf")]
mod pieces {
    use aya_ebpf::{
        bindings::TC_ACT_OK,
        helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns, bpf_ktime_get_ns},
        macros::{classifier, map},
        maps::{Array, HashMap, LruPerCpuHashMap, PerCpuArray, PerCpuHashMap},
        programs::TcContext,
    };
    use score_common::{PairCounters, PairKey, SLOT_WAYS, SlotCell, Stat, slot_candidate};

    use crate::classifiers::{
        FLOWS, Headers, SCORE_SLOT_MASK, VM_MACS, bump, headers, ifindex, is_unicast, learn_mac,
        remember_mac,
    };

    /// Does nothing: the baseline every other program is measured against,
    /// by BPF_PROG_TEST_RUN and attached to a live interface alike.
    #[classifier]
    pub fn score_bench_empty(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    /// Headers of a unicast IPv4 frame (None for anything the counting
    /// path passes uncounted), without touching the statistics.
    #[inline(always)]
    fn unicast(ctx: &TcContext) -> Option<Headers> {
        headers(ctx).filter(is_unicast)
    }

    /// Parsing and the unicast checks only.
    #[classifier]
    pub fn score_bench_parse(ctx: TcContext) -> i32 {
        match unicast(&ctx) {
            Some(_) => TC_ACT_OK,
            None => TC_ACT_OK + 1,
        }
    }

    /// Parsing + `bpf_ktime_get_ns`.
    #[classifier]
    pub fn score_bench_ktime(ctx: TcContext) -> i32 {
        // SAFETY: a helper without arguments or preconditions.
        match unicast(&ctx) {
            Some(_) if unsafe { bpf_ktime_get_ns() } != 0 => TC_ACT_OK,
            _ => TC_ACT_OK + 1,
        }
    }

    /// Parsing + `bpf_ktime_get_coarse_ns`.
    #[classifier]
    pub fn score_bench_coarse(ctx: TcContext) -> i32 {
        // SAFETY: a helper without arguments or preconditions.
        match unicast(&ctx) {
            Some(_) if unsafe { bpf_ktime_get_coarse_ns() } != 0 => TC_ACT_OK,
            _ => TC_ACT_OK + 1,
        }
    }

    /// Parsing + MAC learning by hash lookup (a VM already known): what
    /// ingress did per frame before the `VIF_SEEN` slot.
    #[classifier]
    pub fn score_bench_mac(ctx: TcContext) -> i32 {
        if let Some(h) = unicast(&ctx) {
            learn_mac(h.src, h.mac, ifindex(&ctx));
        }
        TC_ACT_OK
    }

    /// Parsing + MAC learning as ingress does it now (the vif's slot).
    #[classifier]
    pub fn score_bench_mac_slot(ctx: TcContext) -> i32 {
        if let Some(h) = unicast(&ctx) {
            remember_mac(&ctx, h.src, h.mac);
        }
        TC_ACT_OK
    }

    /// Parsing + the hosted-sender check of egress (a miss: remote sender).
    #[classifier]
    pub fn score_bench_hosted(ctx: TcContext) -> i32 {
        match unicast(&ctx) {
            Some(h) if VM_MACS.get_ptr(h.src).is_some() => TC_ACT_OK + 1,
            _ => TC_ACT_OK,
        }
    }

    /// Adds one frame to a counter.
    ///
    /// # Safety
    ///
    /// `c` points at a live map value that no other CPU writes meanwhile
    /// (a per-CPU slot, or a shared value in a single-sender bench).
    #[inline(always)]
    unsafe fn add(c: *mut PairCounters, len: u64) {
        // SAFETY: the caller's contract.
        unsafe {
            (*c).bytes += len;
            (*c).packets += 1;
        }
    }

    /// The key and length of a frame the counting path would count.
    #[inline(always)]
    fn keyed(ctx: &TcContext) -> Option<(PairKey, u64)> {
        let h = unicast(ctx)?;
        Some((
            PairKey {
                src: h.src,
                dst: h.dst,
            },
            u64::from(ctx.len()),
        ))
    }

    /// Parsing + lookup-and-add in a hash map of some type, inserting the
    /// pair on a miss: the count of `score_vif_ingress` without MAC
    /// learning or time stamp, one program per map type and layout.
    macro_rules! count_in {
        ($(#[$doc:meta])* $name:ident, $map:expr, $key:expr) => {
            $(#[$doc])*
            #[classifier]
            pub fn $name(ctx: TcContext) -> i32 {
                if let Some((k, len)) = keyed(&ctx) {
                    let key = ($key)(k, &ctx);
                    match $map.get_ptr_mut(&key) {
                        // SAFETY: a live value of the map; per-CPU, or
                        // shared but written by this bench's one sender.
                        Some(c) => unsafe { add(c, len) },
                        None => {
                            let fresh = PairCounters {
                                bytes: len,
                                packets: 1,
                                first_seen_ns: 0,
                                last_seen_ns: 0,
                            };
                            // Counted as score's classifiers count an
                            // insert, so that a drain walks the flow map
                            // after `score_bench_count` added to it.
                            if $map.insert(&key, &fresh, 0).is_ok() {
                                bump(Stat::FlowsInserted);
                            }
                        }
                    }
                }
                TC_ACT_OK
            }
        };
    }

    /// Room for the live bench's largest set of pairs (100k) in every
    /// variant map, preallocated as the kernel does for hash maps.
    const VARIANT_MAX: u32 = 131_072;

    #[map(name = "BENCH_HASH")]
    static HASH: HashMap<PairKey, PairCounters> = HashMap::with_max_entries(VARIANT_MAX, 0);
    #[map(name = "BENCH_LRU_PCPU")]
    static LRU_PCPU: LruPerCpuHashMap<PairKey, PairCounters> =
        LruPerCpuHashMap::with_max_entries(VARIANT_MAX, 0);
    #[map(name = "BENCH_PCPU_KEY16")]
    static PCPU_KEY16: PerCpuHashMap<WideKey, PairCounters> =
        PerCpuHashMap::with_max_entries(VARIANT_MAX, 0);
    #[map(name = "BENCH_ARRAY")]
    static ARRAY: PerCpuArray<PairCounters> = PerCpuArray::with_max_entries(VARIANT_MAX, 0);

    /// A 16-byte key: the pair plus the vif's ifindex and explicit padding
    /// (what a key that also told vifs apart would cost).
    #[repr(C)]
    #[derive(Clone, Copy)]
    pub struct WideKey {
        pair: PairKey,
        ifindex: u32,
        pad: u32,
    }

    count_in!(
        /// The flow map itself (per-CPU hash, 8-byte key): the bare count.
        score_bench_count,
        FLOWS,
        |k: PairKey, _: &TcContext| k
    );
    count_in!(
        /// A shared (not per-CPU) hash. Plain adds: the bench has one
        /// sender; the agent would need atomic adds here.
        score_bench_count_hash,
        HASH,
        |k: PairKey, _: &TcContext| k
    );
    count_in!(
        /// A per-CPU LRU hash (evicts silently when full).
        score_bench_count_lru,
        LRU_PCPU,
        |k: PairKey, _: &TcContext| k
    );
    count_in!(
        /// The per-CPU hash with a 16-byte key.
        score_bench_count_key16,
        PCPU_KEY16,
        |k: PairKey, ctx: &TcContext| WideKey {
            pair: k,
            ifindex: ifindex(ctx),
            pad: 0,
        }
    );

    /// Parsing + add into a per-CPU array at the pair's slot: the cost of
    /// counting when a slot is already known (here the destination's low
    /// bits stand for a slot the agent assigned), no hash at all.
    #[classifier]
    pub fn score_bench_count_array(ctx: TcContext) -> i32 {
        if let Some((k, len)) = keyed(&ctx) {
            let slot = u32::from_be(k.dst) % VARIANT_MAX;
            if let Some(c) = ARRAY.get_ptr_mut(slot) {
                // SAFETY: this CPU's slot of a per-CPU array, preemption
                // off: nothing else writes it meanwhile.
                unsafe { add(c, len) }
            }
        }
        TC_ACT_OK
    }

    /// The same array at a slot spread by score's slot hash over all of
    /// it, as the agent's slots are: against `score_bench_count_array`,
    /// what scattering the live pairs over the whole array costs, with
    /// the rest of the count the same.
    #[classifier]
    pub fn score_bench_count_array_hashed(ctx: TcContext) -> i32 {
        if let Some((k, len)) = keyed(&ctx) {
            let slot = score_common::slot_index(&k, VARIANT_MAX - 1);
            if let Some(c) = ARRAY.get_ptr_mut(slot) {
                // SAFETY: this CPU's slot of a per-CPU array, preemption
                // off: nothing else writes it meanwhile.
                unsafe { add(c, len) }
            }
        }
        TC_ACT_OK
    }

    /// A denser slot layout, as a cost probe: the slot hash picks a group
    /// of four entries in a small index of slot numbers (4 bytes each; as
    /// many as the object's slots, `SCORE_SLOT_MASK` + 1, at most
    /// 131,072: 512 KiB), and the slots themselves (key cell, agent cell, a cell
    /// per CPU: 64 bytes, as in `SCORE_SLOTS` on 2 CPUs) are handed out in
    /// the order pairs are first seen, so that live pairs share pages
    /// instead of being spread over the whole array. The first frame of a
    /// pair hands its slot out here (the agent would, at a drain); a pair
    /// whose group is full is not counted (a probe of the cost, not a
    /// counter).
    #[map(name = "BENCH_INDEX")]
    static INDEX: Array<u32> = Array::with_max_entries(VARIANT_MAX, 0);
    #[map(name = "BENCH_DENSE")]
    static DENSE: Array<[SlotCell; 4]> = Array::with_max_entries(VARIANT_MAX, 0);
    /// Slots handed out so far.
    #[map(name = "BENCH_NEXT")]
    static NEXT: Array<u32> = Array::with_max_entries(1, 0);

    #[classifier]
    pub fn score_bench_count_dense(ctx: TcContext) -> i32 {
        if let Some((k, len)) = keyed(&ctx) {
            let word = k.word();
            let mask = SCORE_SLOT_MASK.load() & (VARIANT_MAX - 1);
            let first = score_common::slot_index(&k, mask);
            for j in 0..SLOT_WAYS {
                let Some(e) = INDEX.get_ptr_mut(slot_candidate(first, j)) else {
                    break;
                };
                // SAFETY: a valid element of the index; a race with
                // another CPU can only mis-hand a slot of this probe.
                let mut at = unsafe { *e };
                if at == 0 {
                    let Some(n) = NEXT.get_ptr_mut(0) else {
                        break;
                    };
                    // SAFETY: valid elements (as above).
                    unsafe {
                        *n += 1;
                        at = *n;
                        *e = at;
                    }
                    if let Some(s) = DENSE.get_ptr_mut(at.wrapping_sub(1)) {
                        // SAFETY: a valid element of the slots.
                        unsafe { (*s)[0].a = word };
                    }
                }
                let Some(s) = DENSE.get_ptr_mut(at.wrapping_sub(1)) else {
                    break;
                };
                // SAFETY: a valid element of the slots, 64 bytes; the key
                // cell is read as one word, as the classifiers do.
                if unsafe { core::ptr::read_volatile(&raw const (*s)[0].a) } != word {
                    continue;
                }
                // SAFETY: a helper without arguments or preconditions.
                let cpu = unsafe { bpf_get_smp_processor_id() } & 1;
                // SAFETY: cell 2 or 3 of the slot, this CPU's (preemption
                // off): in bounds of the 64-byte element.
                unsafe {
                    let c = (s as *mut SlotCell).add(2 + cpu as usize);
                    (*c).a += len;
                    (*c).b += 1;
                }
                break;
            }
        }
        TC_ACT_OK
    }
}

#[cfg(all(target_arch = "bpf", not(test)))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
