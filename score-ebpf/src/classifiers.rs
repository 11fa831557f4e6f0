//! The two production classifiers, their maps and the helpers they share.
//! Both objects include this module: `score-tc` (what the agent loads) and
//! `score-tc-bench` (the same programs plus the `score_bench_*` pieces the
//! flows bench times). See `main.rs` for what the classifiers do and why.

use aya_ebpf::{
    Global,
    bindings::{BPF_EXIST, BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_smp_processor_id, bpf_ktime_get_ns, bpf_skb_load_bytes},
    macros::{classifier, map},
    maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
    programs::TcContext,
};
use aya_log_ebpf::warn;
use score_common::{
    BPF_F_MMAPABLE, CONTROL_MAGIC, CONTROL_MAX_PAYLOAD, CONTROL_RING_BYTES, ControlFrame,
    DEFAULT_FLOWS_MAX, HOSTED_FILTER_CELLS, PairCounters, PairKey, SLOT_WAYS, STATS_LEN, SlotCell,
    Stat, VIF_SEEN_SLOTS, VM_MACS_MAX, VifSeen, VmMac, hosted_cell, slot_candidate, slot_index,
};

#[map(name = "SCORE_CONTROL")]
static CONTROL: RingBuf = RingBuf::with_byte_size(CONTROL_RING_BYTES, 0);

#[unsafe(no_mangle)]
static SCORE_CONTROL_PORT: Global<u16> = Global::new(0);

#[map(name = "SCORE_FLOWS")]
pub(crate) static FLOWS: PerCpuHashMap<PairKey, PairCounters> =
    PerCpuHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

/// Counter slots the agent assigns (see `count_in_slot` and score-common's
/// `SLOTS_MAP`); sized by the agent.
#[map(name = "SCORE_SLOTS")]
pub(crate) static SLOTS: Array<SlotCell> =
    Array::with_max_entries(DEFAULT_FLOWS_MAX, BPF_F_MMAPABLE);

/// Slots of `SCORE_SLOTS` minus one; set by the agent at load time.
#[unsafe(no_mangle)]
pub(crate) static SCORE_SLOT_MASK: Global<u32> = Global::new(0);
/// Cells per slot (2 + possible CPUs); set by the agent at load time.
#[unsafe(no_mangle)]
static SCORE_SLOT_CELLS: Global<u32> = Global::new(0);

#[map(name = "SCORE_VM_MACS")]
pub(crate) static VM_MACS: HashMap<u32, VmMac> = HashMap::with_max_entries(VM_MACS_MAX, 0);

/// How many of `VM_MACS`' addresses fall in each cell (score-common's
/// `HOSTED_FILTER_MAP`): egress's way to skip the hash lookup for a
/// sender no hosted VM shares a cell with.
#[map(name = "SCORE_HOSTED_FILTER")]
pub(crate) static HOSTED_FILTER: Array<u64> =
    Array::with_max_entries(HOSTED_FILTER_CELLS, BPF_F_MMAPABLE);

#[map(name = "SCORE_VIF_SEEN")]
static VIF_SEEN: Array<VifSeen> = Array::with_max_entries(VIF_SEEN_SLOTS, 0);

#[map(name = "SCORE_STATS")]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPPROTO_UDP: u8 = 17;
/// -E2BIG: what the kernel returns when a hash map is full.
const E2BIG: i32 = -7;

#[classifier]
pub fn score_vif_ingress(ctx: TcContext) -> i32 {
    if let Some(h) = headers(&ctx) {
        let _ = count(&ctx, &h, true);
    }
    TC_ACT_OK
}

#[classifier]
pub fn score_vif_egress(ctx: TcContext) -> i32 {
    // One parse for both questions: is it ours, and whose traffic is it.
    let Some(h) = headers(&ctx) else {
        return TC_ACT_OK;
    };
    if h.proto == IPPROTO_UDP && intercept(&ctx, &h) {
        return TC_ACT_SHOT;
    }
    let _ = count(&ctx, &h, false);
    TC_ACT_OK
}

/// Hands an S-CORE control datagram to the agent; true if it did, and the
/// frame must then be kept from the guest. Only a datagram to the control
/// port whose payload starts with the S-CORE magic (docs/WIRE.md) is
/// taken: anything else to that port is the guest's own traffic.
#[inline(always)]
fn intercept(ctx: &TcContext, h: &Headers) -> bool {
    let port = SCORE_CONTROL_PORT.load();
    if port == 0 {
        return false;
    }
    // Fragments (MF set or an offset) carry no whole UDP datagram.
    if h.ethertype != ETH_P_IP || h.ver_ihl >> 4 != 4 || h.frag & 0x3fff != 0 {
        return false;
    }
    // Direct packet access only: the agent's datagrams are small and sit
    // in the linear part; anything else passes to the guest.
    let data = ctx.data();
    let end = ctx.data_end();
    let l4 = ETH_HDR_LEN + usize::from(h.ver_ihl & 0x0f) * 4;
    // The bounds check and the reads use the one pointer, so the verifier
    // ties the two together.
    let udp = data + l4;
    if udp + 8 > end {
        return false;
    }
    let u = udp as *const u8;
    // SAFETY: the 8 bytes of the UDP header at `udp` are inside the packet
    // (checked above; the verifier checks it again).
    let (sport, dport, udp_len) = unsafe {
        (
            core::ptr::read_unaligned(u as *const u16),
            u16::from_be(core::ptr::read_unaligned(u.add(2) as *const u16)),
            u16::from_be(core::ptr::read_unaligned(u.add(4) as *const u16)),
        )
    };
    if dport != port {
        return false;
    }
    let udp_len = usize::from(udp_len);
    if udp_len < 8 + CONTROL_MAGIC.len() || udp_len - 8 > CONTROL_MAX_PAYLOAD {
        return false;
    }
    if !has_magic(ctx, l4 + 8) {
        return false;
    }
    let len = udp_len - 8;
    let Some(mut entry) = CONTROL.reserve::<ControlFrame>(0) else {
        bump(Stat::ControlRingFull);
        return false;
    };
    let frame = entry.as_mut_ptr();
    // The verifier needs the copy length visibly inside [1, MAX].
    let n = (len as u32) & 0x7ff;
    if n == 0 || n as usize > CONTROL_MAX_PAYLOAD {
        entry.discard(0);
        return false;
    }
    // SAFETY: the skb pointer is the live context of this run; the
    // destination is the reserved record's `data`, CONTROL_MAX_PAYLOAD
    // bytes, and n is at most that (checked above).
    let copied = unsafe {
        bpf_skb_load_bytes(
            ctx.skb.skb as *const _,
            (l4 + 8) as u32,
            (*frame).data.as_mut_ptr() as *mut _,
            n,
        )
    };
    if copied != 0 {
        entry.discard(0);
        return false;
    }
    // SAFETY: `frame` points at the ring record reserved above, ours alone
    // until submitted; the skb pointer is this run's live context.
    unsafe {
        (*frame).src = h.src;
        (*frame).dst = h.dst;
        (*frame).sport = u16::from_be(sport);
        (*frame).len = n as u16;
        (*frame).ifindex = (*ctx.skb.skb).ifindex;
    }
    entry.submit(0);
    bump(Stat::ControlIntercepted);
    true
}

/// Whether the UDP payload at `off` starts with [`CONTROL_MAGIC`]: read
/// directly when the linear part holds it, with a helper otherwise.
#[inline(always)]
fn has_magic(ctx: &TcContext, off: usize) -> bool {
    let at = ctx.data() + off;
    if at + CONTROL_MAGIC.len() <= ctx.data_end() {
        // SAFETY: the four bytes at `at` are inside the packet (checked
        // just above; the verifier checks it again).
        let magic = unsafe { core::ptr::read_unaligned(at as *const [u8; 4]) };
        return magic == CONTROL_MAGIC;
    }
    ctx.load::<[u8; 4]>(off) == Ok(CONTROL_MAGIC)
}

#[inline(always)]
pub(crate) fn bump(stat: Stat) -> u64 {
    match STATS.get_ptr_mut(stat as u32) {
        // SAFETY: a per-CPU slot, and TC programs run with preemption off,
        // so nothing else writes it while we do.
        Some(p) => unsafe {
            *p += 1;
            *p
        },
        None => 0,
    }
}

/// What the counting and interception paths need of a frame's headers.
pub(crate) struct Headers {
    /// EtherType, host order.
    pub(crate) ethertype: u16,
    /// IPv4 source and destination, network order (meaningless unless
    /// `ethertype` is IPv4).
    pub(crate) src: u32,
    pub(crate) dst: u32,
    /// Source MAC.
    pub(crate) mac: [u8; 6],
    /// IPv4 version and header length, protocol, and flags with fragment
    /// offset (host order). Read only by direct packet access: zero when
    /// the headers had to be copied out, so nothing is intercepted then.
    pub(crate) ver_ihl: u8,
    pub(crate) proto: u8,
    pub(crate) frag: u16,
}

/// Reads the headers by direct packet access when the linear part of the
/// skb holds them (the usual case: no helper call at all), and with
/// `bpf_skb_load_bytes` otherwise.
#[inline(always)]
pub(crate) fn headers(ctx: &TcContext) -> Option<Headers> {
    let data = ctx.data();
    let end = ctx.data_end();
    if data + ETH_HDR_LEN + 20 <= end {
        let p = data as *const u8;
        // SAFETY: the bounds check above covers every byte read, and the
        // verifier checks it again.
        unsafe {
            return Some(Headers {
                ethertype: u16::from_be(core::ptr::read_unaligned(p.add(12) as *const u16)),
                src: core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 12) as *const u32),
                dst: core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 16) as *const u32),
                mac: core::ptr::read_unaligned(p.add(6) as *const [u8; 6]),
                ver_ihl: *p.add(ETH_HDR_LEN),
                proto: *p.add(ETH_HDR_LEN + 9),
                frag: u16::from_be(core::ptr::read_unaligned(
                    p.add(ETH_HDR_LEN + 6) as *const u16
                )),
            });
        }
    }
    let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
    let (src, dst, mac) = if ethertype == ETH_P_IP {
        (
            ctx.load(ETH_HDR_LEN + 12).ok()?,
            ctx.load(ETH_HDR_LEN + 16).ok()?,
            ctx.load(6).ok()?,
        )
    } else {
        (0, 0, [0; 6])
    };
    Some(Headers {
        ethertype,
        src,
        dst,
        mac,
        ver_ihl: 0,
        proto: 0,
        frag: 0,
    })
}

/// Whether a frame is one `count` would count: unicast IPv4 between two
/// addresses (None otherwise), without touching the statistics.
#[inline(always)]
pub(crate) fn is_unicast(h: &Headers) -> bool {
    let dst_host = u32::from_be(h.dst);
    h.ethertype == ETH_P_IP && h.src != 0 && dst_host >> 28 != 0xe && dst_host != u32::MAX
}

#[inline(always)]
fn count(ctx: &TcContext, h: &Headers, from_vm: bool) -> Result<(), ()> {
    if h.ethertype != ETH_P_IP {
        bump(Stat::NotIpv4);
        return Ok(());
    }
    // Addresses stay in network order, as PairKey documents.
    let (src, dst) = (h.src, h.dst);
    // Only unicast traffic is traffic between two VMs: multicast and
    // broadcast (IGMP reports, DHCP, ...) name no peer.
    if !is_unicast(h) {
        bump(Stat::NotUnicast);
        return Ok(());
    }

    if from_vm {
        remember_mac(ctx, src, h.mac);
    } else if sent_by_hosted_vm(ctx, src) {
        // Already counted at the sender's own vif.
        return Ok(());
    }

    let key = PairKey { src, dst };
    let len = u64::from(ctx.len());
    if count_in_slot(&key, len) {
        return Ok(());
    }
    if let Some(c) = FLOWS.get_ptr_mut(&key) {
        // SAFETY: this CPU's slot of a per-CPU value, and TC runs with
        // preemption off: nothing else writes it meanwhile. No time stamp:
        // the agent sees the pair active from its counters moving, and a
        // clock read per frame cost more than the rest of the count
        // (docs/BENCHMARKS.md).
        unsafe {
            (*c).bytes += len;
            (*c).packets += 1;
        }
        return Ok(());
    }
    // SAFETY: a helper without arguments or preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    let fresh = PairCounters {
        bytes: len,
        packets: 1,
        first_seen_ns: now,
        last_seen_ns: now,
    };
    match FLOWS.insert(&key, &fresh, u64::from(BPF_NOEXIST)) {
        // After the insert: an agent that sees the count move finds the
        // entry in its next walk of the map.
        Ok(()) => {
            bump(Stat::FlowsInserted);
        }
        Err(E2BIG) => {
            if bump(Stat::FlowsMapFull) == 1 {
                warn!(ctx, "score: flow map full, new pairs go uncounted");
            }
        }
        // -EEXIST: another CPU inserted the pair between our lookup and
        // insert; count this frame into our CPU's slot of it.
        Err(_) => {
            if let Some(c) = FLOWS.get_ptr_mut(&key) {
                // SAFETY: this CPU's slot, preemption off (as above).
                unsafe {
                    (*c).bytes += len;
                    (*c).packets += 1;
                    if (*c).first_seen_ns == 0 {
                        (*c).first_seen_ns = now;
                    }
                    (*c).last_seen_ns = now;
                }
            }
        }
    }
    Ok(())
}

/// Whether `src` is a VM on this host, whose frames its own vif's ingress
/// counted: the answer of a lookup in `VM_MACS`, reached by the cheapest
/// of three reads. A frame that entered the host through the vif whose
/// last learnt sender is `src` (`ingress_ifindex` is the interface the
/// kernel received it on, which bridging and forwarding keep) was sent by
/// that hosted VM: the vif's `VIF_SEEN` slot says so, an array read. A
/// sender whose `HOSTED_FILTER` cell is zero is in no entry of `VM_MACS`:
/// another array read, and the usual answer for the frames egress counts.
/// Only a sender sharing a cell with a hosted VM is looked up.
#[inline(always)]
pub(crate) fn sent_by_hosted_vm(ctx: &TcContext, src: u32) -> bool {
    // SAFETY: the skb pointer is this run's live context.
    let iif = unsafe { (*ctx.skb.skb).ingress_ifindex };
    if iif != 0
        && let Some(seen) = VIF_SEEN.get_ptr(iif % VIF_SEEN_SLOTS)
    {
        // SAFETY: a valid array element. A torn copy (see `remember_mac`)
        // can only pair fields that were each written after `VM_MACS`
        // held their sender.
        let (head, _) = unsafe { seen_words(seen) };
        if head == seen_head(iif, src) {
            return true;
        }
    }
    match HOSTED_FILTER.get_ptr(hosted_cell(src)) {
        // SAFETY: a valid array element, written only with atomic adds.
        Some(cell) if unsafe { core::ptr::read_volatile(cell) } == 0 => false,
        _ => VM_MACS.get_ptr(src).is_some(),
    }
}

/// Adds `delta` (1, or -1 as its two's complement) to `src`'s cell of
/// `HOSTED_FILTER` as one BPF atomic add (`lock *(u64 *)p += delta`): the
/// classifiers on every CPU and the agent write the cells. core's
/// `AtomicU64::fetch_add` is not offered on the BPF target; the intrinsic
/// with its result unused is the instruction itself.
#[inline(always)]
fn filter_add(src: u32, delta: u64) {
    if let Some(cell) = HOSTED_FILTER.get_ptr_mut(hosted_cell(src)) {
        // SAFETY: a valid, 8-byte aligned u64 of the array, alive for the
        // map's life.
        unsafe {
            core::intrinsics::atomic_xadd::<u64, u64, { core::intrinsics::AtomicOrdering::Relaxed }>(
                cell, delta,
            );
        }
    }
}

/// Counts a frame at the pair's slot, if the agent gave it one: a pair
/// has four candidate slots in one aligned group (score-common's
/// `SLOT_WAYS`), tried from its first, each an inlined array access (the
/// key cell, then this CPU's cell, usually in the same cache line),
/// instead of a hash-map walk. False if the pair has no slot yet: the caller counts it
/// in `SCORE_FLOWS`.
#[inline(always)]
pub(crate) fn count_in_slot(key: &PairKey, len: u64) -> bool {
    let cells = SCORE_SLOT_CELLS.load();
    if cells == 0 {
        return false;
    }
    let word = key.word();
    let first = slot_index(key, SCORE_SLOT_MASK.load());
    for j in 0..SLOT_WAYS {
        let base = slot_candidate(first, j).wrapping_mul(cells);
        let Some(k) = SLOTS.get_ptr(base) else {
            continue;
        };
        // SAFETY: a valid element of the array map, alive for the map's
        // life. The key is one aligned 8-byte load (the agent writes it as
        // one), so a key being rewritten can never match by halves.
        if unsafe { core::ptr::read_volatile(&raw const (*k).a) } != word {
            continue;
        }
        // SAFETY: a helper without arguments or preconditions.
        let cpu = unsafe { bpf_get_smp_processor_id() };
        let Some(c) = SLOTS.get_ptr_mut(base.wrapping_add(2).wrapping_add(cpu)) else {
            return false;
        };
        // SAFETY: this CPU's cell of the slot: only programs on this CPU
        // write it, and TC runs with preemption off, so a plain add is
        // exact. The agent frees a slot only after clearing its key and
        // waiting until no program can still be here (docs/BENCHMARKS.md).
        unsafe {
            (*c).a += len;
            (*c).b += 1;
        }
        return true;
    }
    false
}

/// The interface a frame passes: the vif's ifindex.
#[inline(always)]
pub(crate) fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: the skb pointer is this run's live context, readable for the
    // whole run.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// Records the sending VM's MAC and vif, writing only when it changed so
/// that the shared (not per-CPU) map is not written on every frame. The
/// vif's slot in `VIF_SEEN` (an array: the verifier inlines its lookup)
/// remembers the last sender learnt there, so that a known sender costs no
/// hash lookup at all.
#[inline(always)]
pub(crate) fn remember_mac(ctx: &TcContext, src: u32, mac: [u8; 6]) {
    let ifindex = ifindex(ctx);
    let slot = VIF_SEEN.get_ptr_mut(ifindex % VIF_SEEN_SLOTS);
    if let Some(seen) = slot {
        // SAFETY: a valid array element, shared by every CPU; another CPU
        // may be rewriting it (another sender on this vif, or a vif whose
        // ifindex shares the slot), so the copy may be torn. Each field it
        // can hold was written after VM_MACS held that sender, so a torn
        // copy can at worst delay learning a changed MAC or vif to a later
        // frame, and egress's reading of the slot (`sent_by_hosted_vm`)
        // finds a sender VM_MACS holds.
        let (head, tail) = unsafe { seen_words(seen) };
        if head == seen_head(ifindex, src) && tail == seen_tail(mac) {
            return;
        }
    }
    if !learn_mac(src, mac, ifindex) {
        return;
    }
    if let Some(seen) = slot {
        // SAFETY: a valid array element; a concurrent writer on another
        // CPU can only leave another learnt sender's fields (see the read).
        // Only after VM_MACS holds the entry: the slot never claims a
        // sender the map does not know.
        unsafe {
            *seen = VifSeen {
                ifindex,
                ip: src,
                mac,
                _pad: [0; 2],
            };
        }
    }
}

/// A `VIF_SEEN` element as two aligned 8-byte loads (the array's elements
/// are 16 bytes, 8-aligned): (ifindex, ip) and (mac, zero padding), in the
/// layout of score-common's `VifSeen`. Field by field, the compiler reads
/// the MAC a byte at a time.
///
/// # Safety
///
/// `seen` points at a live element of `VIF_SEEN`.
#[inline(always)]
unsafe fn seen_words(seen: *const VifSeen) -> (u64, u64) {
    let w = seen.cast::<u64>();
    // SAFETY: the caller's contract; both words are inside the element.
    unsafe {
        (
            core::ptr::read_volatile(w),
            core::ptr::read_volatile(w.add(1)),
        )
    }
}

/// The first word of a `VifSeen` holding `ifindex` and `ip`.
#[inline(always)]
fn seen_head(ifindex: u32, ip: u32) -> u64 {
    // What one load of the two u32s gives (byte arrays do not fold).
    if cfg!(target_endian = "little") {
        u64::from(ifindex) | (u64::from(ip) << 32)
    } else {
        (u64::from(ifindex) << 32) | u64::from(ip)
    }
}

/// The second word of a `VifSeen` holding `mac` (its padding is zero).
#[inline(always)]
fn seen_tail(mac: [u8; 6]) -> u64 {
    u64::from_ne_bytes([mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], 0, 0])
}

/// The MAC learning itself: `VM_MACS[src] = (mac, ifindex)` unless it
/// already says so. True if the map holds the entry afterwards.
#[inline(always)]
pub(crate) fn learn_mac(src: u32, mac: [u8; 6], ifindex: u32) -> bool {
    let known = match VM_MACS.get_ptr(src) {
        Some(known) => {
            // SAFETY: a valid value of the shared hash; the agent deletes
            // entries only for a vif that is gone, and the kernel keeps a
            // looked-up element readable for this RCU-protected run.
            let known = unsafe { &*known };
            if known.mac == mac && known.ifindex == ifindex {
                return true;
            }
            true
        }
        None => false,
    };
    let entry = VmMac {
        mac,
        _pad: [0; 2],
        ifindex,
    };
    // A new address is counted in its filter cell before it can be found
    // in the table, so that a cell never counts fewer addresses than the
    // table holds (see `sent_by_hosted_vm`).
    if !known {
        filter_add(src, 1);
    }
    let flags = if known { BPF_EXIST } else { BPF_NOEXIST };
    match VM_MACS.insert(&src, &entry, u64::from(flags)) {
        // After the insert: an agent that sees the count move reads the
        // table again and finds the entry.
        Ok(()) => {
            bump(Stat::VmsLearnt);
            true
        }
        Err(e) => {
            if !known {
                filter_add(src, u64::MAX);
            }
            if e == E2BIG {
                bump(Stat::MacsMapFull);
            }
            // Otherwise -EEXIST (another CPU learnt the address first) or
            // -ENOENT (the agent deleted it meanwhile): the sender's next
            // frame learns it.
            false
        }
    }
}
