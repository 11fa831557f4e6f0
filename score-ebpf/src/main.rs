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
        helpers::{bpf_ktime_get_ns, bpf_skb_load_bytes},
        macros::{classifier, map},
        maps::{HashMap, PerCpuArray, PerCpuHashMap, RingBuf},
        programs::TcContext,
    };
    use aya_log_ebpf::warn;
    use score_common::{
        CONTROL_MAX_PAYLOAD, CONTROL_RING_BYTES, ControlFrame, DEFAULT_FLOWS_MAX, PairCounters,
        PairKey, STATS_LEN, Stat, VM_MACS_MAX, VmMac,
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
    fn remember_mac(ctx: &TcContext, src: u32, mac: [u8; 6]) {
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
