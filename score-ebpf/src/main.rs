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
//! Every error path passes the packet (`TC_ACT_OK`): counting must never
//! drop traffic. Nothing is logged per packet; the one log line is the first
//! time, per CPU, that the flow map is found full.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod kernel {
    use aya_ebpf::{
        bindings::{BPF_NOEXIST, TC_ACT_OK},
        helpers::bpf_ktime_get_ns,
        macros::{classifier, map},
        maps::{HashMap, PerCpuArray, PerCpuHashMap},
        programs::TcContext,
    };
    use aya_log_ebpf::warn;
    use score_common::{
        DEFAULT_FLOWS_MAX, PairCounters, PairKey, STATS_LEN, Stat, VM_MACS_MAX, VmMac,
    };

    #[map(name = "SCORE_FLOWS")]
    static FLOWS: PerCpuHashMap<PairKey, PairCounters> =
        PerCpuHashMap::with_max_entries(DEFAULT_FLOWS_MAX, 0);

    #[map(name = "SCORE_VM_MACS")]
    static VM_MACS: HashMap<u32, VmMac> = HashMap::with_max_entries(VM_MACS_MAX, 0);

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
        let _ = count(&ctx, false);
        TC_ACT_OK
    }

    /// Does nothing: the baseline the counting classifiers are measured
    /// against with BPF_PROG_TEST_RUN (`cargo xtask bench flows`).
    #[classifier]
    pub fn score_bench_empty(_ctx: TcContext) -> i32 {
        TC_ACT_OK
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

    #[inline(always)]
    fn count(ctx: &TcContext, from_vm: bool) -> Result<(), ()> {
        let ethertype = u16::from_be(ctx.load::<u16>(12).map_err(|_| ())?);
        if ethertype != ETH_P_IP {
            bump(Stat::NotIpv4);
            return Ok(());
        }
        // Addresses stay in network order, as PairKey documents.
        let src: u32 = ctx.load(ETH_HDR_LEN + 12).map_err(|_| ())?;
        let dst: u32 = ctx.load(ETH_HDR_LEN + 16).map_err(|_| ())?;
        // Only unicast traffic is traffic between two VMs: multicast and
        // broadcast (IGMP reports, DHCP, ...) name no peer.
        let dst_host = u32::from_be(dst);
        if src == 0 || dst_host >> 28 == 0xe || dst_host == u32::MAX {
            bump(Stat::NotUnicast);
            return Ok(());
        }

        if from_vm {
            remember_mac(ctx, src);
        } else if VM_MACS.get_ptr(src).is_some() {
            // Sent by a VM on this host: already counted at its own vif.
            return Ok(());
        }

        let key = PairKey { src, dst };
        let len = u64::from(ctx.len());
        let now = unsafe { bpf_ktime_get_ns() };
        if let Some(c) = FLOWS.get_ptr_mut(&key) {
            // Per-CPU value, and TC runs with preemption off: plain adds.
            unsafe {
                (*c).bytes += len;
                (*c).packets += 1;
                (*c).last_seen_ns = now;
            }
            return Ok(());
        }
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
    /// that the shared (not per-CPU) map is not written on every frame.
    #[inline(always)]
    fn remember_mac(ctx: &TcContext, src: u32) {
        // Source MAC at offset 6; a fixed-size load keeps the verifier happy
        // where `load_bytes` into a slice would need a bounded length.
        let Ok(mac) = ctx.load::<[u8; 6]>(6) else {
            return;
        };
        let ifindex = unsafe { (*ctx.skb.skb).ifindex };
        if let Some(known) = VM_MACS.get_ptr(src) {
            let known = unsafe { &*known };
            if known.mac == mac && known.ifindex == ifindex {
                return;
            }
        }
        let entry = VmMac {
            mac,
            _pad: [0; 2],
            ifindex,
        };
        if VM_MACS.insert(&src, &entry, 0) == Err(E2BIG) {
            bump(Stat::MacsMapFull);
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
