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
//! egress, a UDP datagram to the S-CORE port of a hosted VM whose payload
//! starts with the S-CORE magic (docs/WIRE.md) is an S-CORE control message
//! (a token hop, a location request). It is copied into the `SCORE_CONTROL`
//! ring buffer for the agent and dropped, so the guest never sees it, and it
//! is not counted as VM traffic. Any other datagram to that port is the
//! guest's own: it passes, and is counted. The port comes from the
//! `SCORE_CONTROL_PORT` global, set at load time; 0 turns interception off.
//!
//! Where a pair is counted: once the agent has given it a slot in the
//! `SCORE_SLOTS` array (at the drain after its first frame), its frames
//! are added to this CPU's cell of that slot, found by a hash of the key
//! computed in the program (four candidate slots in one aligned group,
//! each an inlined array access); until then, and where all four are
//! taken, in its
//! `SCORE_FLOWS` entry. A hash-map lookup walks a bucket, an element and
//! a per-CPU pointer, dependent cache misses on every frame when traffic
//! moves between many pairs; the slot is one or two lines. The agent reads
//! the slots through a shared mapping. score-agent's `datapath` module
//! says why counts stay exact when pairs move into slots and out.
//!
//! The per-frame path of an existing pair is kept to parsing, one slot
//! (or per-CPU hash) update and, at ingress, an array read (the vif's last learnt sender
//! in `SCORE_VIF_SEEN`, which spares the `SCORE_VM_MACS` lookup), or at
//! egress the question "is the sender hosted here", answered by array
//! reads where they can: the slot of the vif the frame entered by (a
//! hosted VM's frame names its sender there), else the sender's cell of
//! `SCORE_HOSTED_FILTER`, which counts the hosted addresses that fall in
//! it (zero for nearly every peer elsewhere). Only a sender sharing a cell
//! with a hosted VM is looked up in `SCORE_VM_MACS`. No clock is read per frame (on a
//! virtual machine it cost more than the rest): only a new pair's entry is
//! stamped, and the agent sees activity from the counters moving.
//! The `score_bench_*` classifiers that run single pieces of this path
//! for the flows bench live in a second object, `score-tc-bench`
//! (`bench.rs`), so the production object carries only what the agent
//! loads.
//!
//! Every error path passes the packet (`TC_ACT_OK`): counting must never
//! drop traffic. Nothing is logged per packet; the one log line is the first
//! time, per CPU, that the flow map is found full.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]
// The BPF atomic add of the hosted-VM filter (`classifiers::filter_add`).
#![cfg_attr(target_arch = "bpf", allow(internal_features))]
#![cfg_attr(target_arch = "bpf", feature(core_intrinsics))]

#[cfg(target_arch = "bpf")]
mod classifiers;

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
