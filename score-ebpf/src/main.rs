//! score's kernel side: two TC classifiers on every watched VM backend
//! interface (Xen's `vifD.N`, a tap, the host end of a veth) that count the
//! bytes and frames of each VM pair, and remember each hosted VM's MAC.
//!
//! Direction on a vif is seen from the host: TC *ingress* carries the frames
//! the VM sends, TC *egress* the frames delivered to it.
//!
//! Counting each frame once: a frame between two VMs on the same host passes
//! the sender's vif (ingress) and then the receiver's vif (egress). Ingress
//! always counts, and records the sender as a hosted VM in `SCORE_VM_MACS`;
//! egress counts only frames whose source is *not* a hosted VM. Because the
//! sender's ingress runs before the receiver's egress for the same frame, a
//! local pair is counted once, at the sender, and a remote peer's frames are
//! counted once, at the receiver.
//!
//! Maps are declared unpinned; the daemon pins them by path at load time
//! (`score-agent run`), `watch` keeps them private to its run.
//!
//! The flow map is a plain per-CPU hash, not an LRU: an LRU would evict a
//! live pair's counters without a trace when full, while a plain hash refuses
//! the insert, which we count in `SCORE_STATS` for the agent to report. The
//! agent evicts idle pairs itself. Per-CPU values need no atomics (the BPF
//! target has no 64-bit fetch-add on every CPU level) and do not bounce cache
//! lines between cores; the agent sums them.
//!
//! Interception (the paper's NAT redirect of §III-D, without iptables): at
//! egress, a UDP datagram to the S-CORE port of a hosted VM is an S-CORE
//! control message (a token hop, a location request). It is copied into the
//! `SCORE_CONTROL` ring buffer for the agent and dropped, so the guest never
//! sees it, and it is not counted as VM traffic. The port comes from the
//! `SCORE_CONTROL_PORT` global, set at load time; 0 turns interception off.
//!
//! The per-frame path of an existing pair is kept to parsing, one per-CPU
//! hash update and, at ingress, an array read (the vif's last learnt sender
//! in `SCORE_VIF_SEEN`, which spares the `SCORE_VM_MACS` lookup), or at
//! egress the hosted-sender lookup. No clock is read per frame (on a
//! virtual machine it cost more than the rest): only a new pair's entry is
//! stamped, and the agent sees activity from the counters moving.
//! `score_bench_*` classifiers run single pieces of this path for the
//! per-frame cost breakdown of the flows bench; the agent never loads them.
//!
//! Every error path passes the packet (`TC_ACT_OK`): counting must never
//! drop traffic. Nothing is logged per packet; the one log line is the first
//! time, per CPU, that the flow map is found full.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod kernel {
    use aya_ebpf::{
        Global,
        bindings::{BPF_NOEXIST, TC_ACT_OK, TC_ACT_SHOT},
        helpers::{bpf_ktime_get_coarse_ns, bpf_ktime_get_ns, bpf_skb_load_bytes},
        macros::{classifier, map},
        maps::{Array, HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
        programs::TcContext,
    };
    use aya_log_ebpf::warn;
    use score_common::{
        CONTROL_MAX_PAYLOAD, CONTROL_RING_BYTES, ControlFrame, DEFAULT_FLOWS_MAX, PairCounters,
        PairKey, STATS_LEN, Stat, VIF_SEEN_SLOTS, VM_MACS_MAX, VifSeen, VmMac,
    };

    #[map(name = "SCORE_CONTROL")]
    static CONTROL: RingBuf = RingBuf::with_byte_size(CONTROL_RING_BYTES, 0);

    #[unsafe(no_mangle)]
    static SCORE_CONTROL_PORT: Global<u16> = Global::new(0);

    #[map(name = "SCORE_FLOWS")]
    static FLOWS: PerCpuHashMap<PairKey, PairCounters> =
        PerCpuHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

    #[map(name = "SCORE_VM_MACS")]
    static VM_MACS: HashMap<u32, VmMac> = HashMap::with_max_entries(VM_MACS_MAX, 0);

    #[map(name = "SCORE_VIF_SEEN")]
    static VIF_SEEN: Array<VifSeen> = Array::with_max_entries(VIF_SEEN_SLOTS, 0);

    #[map(name = "SCORE_STATS")]
    static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STATS_LEN, 0);

    const ETH_HDR_LEN: usize = 14;
    const ETH_P_IP: u16 = 0x0800;
    /// -E2BIG: what the kernel returns when a hash map is full.
    const E2BIG: i32 = -7;

    #[classifier]
    pub fn score_vif_ingress(ctx: TcContext) -> i32 {
        let _ = count(&ctx, true);
        TC_ACT_OK
    }

    #[classifier]
    pub fn score_vif_egress(ctx: TcContext) -> i32 {
        if intercept(&ctx) {
            return TC_ACT_SHOT;
        }
        let _ = count(&ctx, false);
        TC_ACT_OK
    }

    const IPPROTO_UDP: u8 = 17;

    /// Hands an S-CORE control datagram to the agent; true if it did, and
    /// the frame must then be kept from the guest.
    #[inline(always)]
    fn intercept(ctx: &TcContext) -> bool {
        let port = SCORE_CONTROL_PORT.load();
        if port == 0 {
            return false;
        }
        // Direct packet access only: the agent's datagrams are small and
        // sit in the linear part; anything else passes to the guest.
        let data = ctx.data();
        let end = ctx.data_end();
        if data + ETH_HDR_LEN + 20 > end {
            return false;
        }
        let p = data as *const u8;
        // SAFETY: every read below is inside the bounds checked before it.
        let (ethertype, ver_ihl, proto, frag, src, dst) = unsafe {
            (
                u16::from_be(core::ptr::read_unaligned(p.add(12) as *const u16)),
                *p.add(ETH_HDR_LEN),
                *p.add(ETH_HDR_LEN + 9),
                u16::from_be(core::ptr::read_unaligned(
                    p.add(ETH_HDR_LEN + 6) as *const u16
                )),
                core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 12) as *const u32),
                core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 16) as *const u32),
            )
        };
        // Fragments (MF set or an offset) carry no whole UDP datagram.
        if ethertype != ETH_P_IP || proto != IPPROTO_UDP || ver_ihl >> 4 != 4 || frag & 0x3fff != 0
        {
            return false;
        }
        let l4 = ETH_HDR_LEN + usize::from(ver_ihl & 0x0f) * 4;
        if data + l4 + 8 > end {
            return false;
        }
        // SAFETY: l4 + 8 bytes are inside the packet (checked above).
        let (sport, dport, udp_len) = unsafe {
            let u = p.add(l4);
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
        if udp_len <= 8 || udp_len - 8 > CONTROL_MAX_PAYLOAD {
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
        unsafe {
            (*frame).src = src;
            (*frame).dst = dst;
            (*frame).sport = u16::from_be(sport);
            (*frame).len = n as u16;
            (*frame).ifindex = (*ctx.skb.skb).ifindex;
        }
        entry.submit(0);
        bump(Stat::ControlIntercepted);
        true
    }

    /// Does nothing: the baseline the counting classifiers are measured
    /// against with BPF_PROG_TEST_RUN (`cargo xtask bench flows`).
    #[classifier]
    pub fn score_bench_empty(_ctx: TcContext) -> i32 {
        TC_ACT_OK
    }

    // Pieces of the counting path on their own, for the per-frame cost
    // breakdown of the flows bench (loaded only by the bench; the agent
    // loads the two classifiers above and `score_bench_empty`). Each one
    // runs the header parsing and checks of `count` plus one piece.

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
        match unicast(&ctx) {
            Some(_) if unsafe { bpf_ktime_get_ns() } != 0 => TC_ACT_OK,
            _ => TC_ACT_OK + 1,
        }
    }

    /// Parsing + `bpf_ktime_get_coarse_ns`.
    #[classifier]
    pub fn score_bench_coarse(ctx: TcContext) -> i32 {
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
            let ifindex = unsafe { (*ctx.skb.skb).ifindex };
            learn_mac(h.src, h.mac, ifindex);
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

    /// Parsing + the per-CPU hash lookup and add, no time stamp: the bare
    /// counter of TOOLCHAIN.md.
    #[classifier]
    pub fn score_bench_count(ctx: TcContext) -> i32 {
        if let Some(h) = unicast(&ctx) {
            let key = PairKey {
                src: h.src,
                dst: h.dst,
            };
            if let Some(c) = FLOWS.get_ptr_mut(&key) {
                unsafe {
                    (*c).bytes += u64::from(ctx.len());
                    (*c).packets += 1;
                }
            }
        }
        TC_ACT_OK
    }

    /// Headers of a unicast IPv4 frame (None for anything `count` passes
    /// uncounted), without touching the statistics.
    #[inline(always)]
    fn unicast(ctx: &TcContext) -> Option<Headers> {
        let h = headers(ctx)?;
        let dst_host = u32::from_be(h.dst);
        if h.ethertype != ETH_P_IP || h.src == 0 || dst_host >> 28 == 0xe || dst_host == u32::MAX {
            return None;
        }
        Some(h)
    }

    #[inline(always)]
    fn bump(stat: Stat) -> u64 {
        match STATS.get_ptr_mut(stat as u32) {
            Some(p) => unsafe {
                *p += 1;
                *p
            },
            None => 0,
        }
    }

    /// What the counting path needs of a frame's headers.
    struct Headers {
        /// EtherType, host order.
        ethertype: u16,
        /// IPv4 source and destination, network order (meaningless unless
        /// `ethertype` is IPv4).
        src: u32,
        dst: u32,
        /// Source MAC.
        mac: [u8; 6],
    }

    /// Reads the headers by direct packet access when the linear part of
    /// the skb holds them (the usual case: no helper call at all), and with
    /// `bpf_skb_load_bytes` otherwise.
    #[inline(always)]
    fn headers(ctx: &TcContext) -> Option<Headers> {
        let data = ctx.data();
        let end = ctx.data_end();
        if data + ETH_HDR_LEN + 20 <= end {
            // SAFETY: the bounds check above covers every byte read, and
            // the verifier checks it again.
            unsafe {
                let p = data as *const u8;
                return Some(Headers {
                    ethertype: u16::from_be(core::ptr::read_unaligned(p.add(12) as *const u16)),
                    src: core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 12) as *const u32),
                    dst: core::ptr::read_unaligned(p.add(ETH_HDR_LEN + 16) as *const u32),
                    mac: core::ptr::read_unaligned(p.add(6) as *const [u8; 6]),
                });
            }
        }
        let ethertype = u16::from_be(ctx.load::<u16>(12).ok()?);
        if ethertype != ETH_P_IP {
            return Some(Headers {
                ethertype,
                src: 0,
                dst: 0,
                mac: [0; 6],
            });
        }
        Some(Headers {
            ethertype,
            src: ctx.load(ETH_HDR_LEN + 12).ok()?,
            dst: ctx.load(ETH_HDR_LEN + 16).ok()?,
            mac: ctx.load(6).ok()?,
        })
    }

    #[inline(always)]
    fn count(ctx: &TcContext, from_vm: bool) -> Result<(), ()> {
        let h = headers(ctx).ok_or(())?;
        if h.ethertype != ETH_P_IP {
            bump(Stat::NotIpv4);
            return Ok(());
        }
        // Addresses stay in network order, as PairKey documents.
        let (src, dst) = (h.src, h.dst);
        // Only unicast traffic is traffic between two VMs: multicast and
        // broadcast (IGMP reports, DHCP, ...) name no peer.
        let dst_host = u32::from_be(dst);
        if src == 0 || dst_host >> 28 == 0xe || dst_host == u32::MAX {
            bump(Stat::NotUnicast);
            return Ok(());
        }

        if from_vm {
            remember_mac(ctx, src, h.mac);
        } else if VM_MACS.get_ptr(src).is_some() {
            // Sent by a VM on this host: already counted at its own vif.
            return Ok(());
        }

        let key = PairKey { src, dst };
        let len = u64::from(ctx.len());
        if let Some(c) = FLOWS.get_ptr_mut(&key) {
            // Per-CPU value, and TC runs with preemption off: plain adds.
            // No time stamp: the agent sees the pair active from its
            // counters moving, and a clock read per frame cost more than
            // the rest of the count (docs/BENCHMARKS.md).
            unsafe {
                (*c).bytes += len;
                (*c).packets += 1;
            }
            return Ok(());
        }
        let now = unsafe { bpf_ktime_get_ns() };
        let fresh = PairCounters {
            bytes: len,
            packets: 1,
            first_seen_ns: now,
            last_seen_ns: now,
        };
        match FLOWS.insert(&key, &fresh, u64::from(BPF_NOEXIST)) {
            Ok(()) => {}
            Err(E2BIG) => {
                if bump(Stat::FlowsMapFull) == 1 {
                    warn!(ctx, "score: flow map full, new pairs go uncounted");
                }
            }
            // -EEXIST: another CPU inserted the pair between our lookup and
            // insert; count this frame into our CPU's slot of it.
            Err(_) => {
                if let Some(c) = FLOWS.get_ptr_mut(&key) {
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

    /// Records the sending VM's MAC and vif, writing only when it changed so
    /// that the shared (not per-CPU) map is not written on every frame. The
    /// vif's slot in `VIF_SEEN` (an array: the verifier inlines its lookup)
    /// remembers the last sender learnt there, so that a known sender costs
    /// no hash lookup at all.
    #[inline(always)]
    fn remember_mac(ctx: &TcContext, src: u32, mac: [u8; 6]) {
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        let slot = VIF_SEEN.get_ptr_mut(ifindex % VIF_SEEN_SLOTS);
        if let Some(seen) = slot {
            let seen = unsafe { &*seen };
            if seen.ifindex == ifindex && seen.ip == src && seen.mac == mac {
                return;
            }
        }
        if !learn_mac(src, mac, ifindex) {
            return;
        }
        if let Some(seen) = slot {
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

    /// The MAC learning itself: `VM_MACS[src] = (mac, ifindex)` unless it
    /// already says so. True if the map holds the entry afterwards.
    #[inline(always)]
    fn learn_mac(src: u32, mac: [u8; 6], ifindex: u32) -> bool {
        if let Some(known) = VM_MACS.get_ptr(src) {
            let known = unsafe { &*known };
            if known.mac == mac && known.ifindex == ifindex {
                return true;
            }
        }
        let entry = VmMac {
            mac,
            _pad: [0; 2],
            ifindex,
        };
        match VM_MACS.insert(&src, &entry, 0) {
            Ok(()) => true,
            Err(e) => {
                if e == E2BIG {
                    bump(Stat::MacsMapFull);
                }
                false
            }
        }
    }

    #[cfg(not(test))]
    #[panic_handler]
    fn panic(_info: &core::panic::PanicInfo) -> ! {
        loop {}
    }
}

#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {}
