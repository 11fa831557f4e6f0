//! Types shared byte for byte by score's eBPF classifiers (score-ebpf) and the
//! agent that reads their maps (score-agent).
//!
//! Every type is `#[repr(C)]`, made of fixed-width integers with explicit
//! padding, and checked for size at compile time: the kernel writes these
//! bytes and user space reads them back, so a silent layout change would be
//! a silent miscount. The `user` feature adds `aya::Pod` for the agent.
#![no_std]

/// Name of the per-CPU hash map of byte and packet counters per VM pair.
pub const FLOWS_MAP: &str = "SCORE_FLOWS";
/// Name of the array of counter slots, in [`SlotCell`]s: where an
/// existing pair is counted, found by [`slot_index`] without a hash-map
/// walk. The agent assigns slots; [`FLOWS_MAP`] counts a pair only until
/// it has one. Slot `i` is the cells `i * cells .. (i + 1) * cells`, with
/// `cells` = [`SLOT_CELLS_GLOBAL`]: cell 0 holds the key and the first-seen
/// stamp, cell 1 the counts the agent moved in, cell `2 + c` what CPU `c`
/// counted. One writer per cell, so plain adds are exact: the classifier
/// on CPU `c` (preemption off) writes only cell `2 + c`, the agent only
/// cells 0 and 1. Shared atomic adds cost more than the hash walk they
/// replaced on the machine measured (docs/BENCHMARKS.md).
pub const SLOTS_MAP: &str = "SCORE_SLOTS";
/// Name of the global that holds the number of slots of [`SLOTS_MAP`]
/// minus one (a power of two minus one): the mask [`slot_index`] takes.
pub const SLOT_MASK_GLOBAL: &str = "SCORE_SLOT_MASK";
/// Name of the global that holds the cells per slot: 2 + possible CPUs.
pub const SLOT_CELLS_GLOBAL: &str = "SCORE_SLOT_CELLS";
/// `BPF_F_MMAPABLE`: the agent reads and writes [`SLOTS_MAP`] through a
/// shared mapping, with no syscall per drain.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Name of the hash map from a hosted VM's IPv4 address to its MAC address
/// (the paper's IP->MAC lookup, §III-C/E).
pub const VM_MACS_MAP: &str = "SCORE_VM_MACS";
/// Name of the per-CPU array of datapath statistics (see [`Stat`]).
pub const STATS_MAP: &str = "SCORE_STATS";
/// Name of the array that remembers, per vif, the last sender learnt into
/// [`VM_MACS_MAP`] there (see [`VifSeen`]): the classifier's way to skip
/// the hash lookup of MAC learning for a sender it already knows, and
/// egress's way to know a hosted VM's frame by the vif it entered by.
pub const VIF_SEEN_MAP: &str = "SCORE_VIF_SEEN";
/// Slots of [`VIF_SEEN_MAP`], indexed by `ifindex % VIF_SEEN_SLOTS`; two
/// vifs sharing a slot only cost each other a hash lookup.
pub const VIF_SEEN_SLOTS: u32 = 1024;

/// Name of the array that filters egress's "is the sender a hosted VM"
/// question: cell [`hosted_cell`]`(ip)` holds how many addresses in
/// [`VM_MACS_MAP`] fall in that cell. A zero cell proves the sender is not
/// hosted without the hash lookup (the frames egress counts, from peers
/// elsewhere, nearly always find zero); any other value sends the question
/// on to [`VM_MACS_MAP`]. The cell may count more than the map holds, never
/// fewer: the classifier adds one before it inserts an address (and takes
/// it back if the insert fails), the agent takes one off after it deletes
/// one. Both write through atomic adds; the agent through a shared mapping.
pub const HOSTED_FILTER_MAP: &str = "SCORE_HOSTED_FILTER";
/// Cells of [`HOSTED_FILTER_MAP`], each a `u64` (the eBPF target's one
/// width of atomic add): 64 KiB, so that with 16 hosted VMs a peer
/// elsewhere shares a cell with one of them about once in 500.
pub const HOSTED_FILTER_CELLS: u32 = 8_192;

/// The cell of [`HOSTED_FILTER_MAP`] for an IPv4 address in network byte
/// order (as [`PairKey`] holds it): a multiplicative hash whose top bits
/// are the cell, so that every octet of the address moves it.
#[inline(always)]
pub fn hosted_cell(ip: u32) -> u32 {
    const SHIFT: u32 = 32 - HOSTED_FILTER_CELLS.trailing_zeros();
    ip.wrapping_mul(0x9e37_79b1) >> SHIFT
}

/// Name of the ring buffer that carries intercepted S-CORE control
/// datagrams (addressed to a hosted VM) from the classifier to the agent.
pub const CONTROL_RING: &str = "SCORE_CONTROL";
/// Name of the global that holds the UDP port of the S-CORE peer protocol
/// (host order); 0, the default, turns interception off.
pub const CONTROL_PORT_GLOBAL: &str = "SCORE_CONTROL_PORT";
/// Size of [`CONTROL_RING`] in bytes (a power of two, page multiple): room
/// for about 200 datagrams in flight to the agent.
pub const CONTROL_RING_BYTES: u32 = 256 * 1024;
/// First four bytes of every S-CORE datagram (docs/WIRE.md): the
/// classifier intercepts a datagram to the control port only if its
/// payload starts with them, and lets anything else reach the guest.
pub const CONTROL_MAGIC: [u8; 4] = *b"SCOR";
/// Largest control payload the classifier hands over; longer datagrams are
/// not S-CORE's (its datagrams are at most 1,260 bytes) and pass untouched.
pub const CONTROL_MAX_PAYLOAD: usize = 1_280;

/// Names of the two classifiers, as the agent looks them up in the object.
pub const PROG_INGRESS: &str = "score_vif_ingress";
/// See [`PROG_INGRESS`].
pub const PROG_EGRESS: &str = "score_vif_egress";

/// An empty classifier, the baseline of the per-packet cost benchmarks.
/// It is in the bench object (`score-tc-bench`) only, with the other
/// `score_bench_*` programs; the agent's object does not carry it.
pub const PROG_BENCH_EMPTY: &str = "score_bench_empty";

/// Default capacity of [`FLOWS_MAP`]: 16 VMs x 100 peers x 2 directions is
/// 3,200 pairs (the paper's worst case per host, §IV-D); 65,536 leaves room
/// for busy hosts and for pairs not yet evicted. The agent may override it.
pub const DEFAULT_FLOWS_MAX: u32 = 65_536;
/// Capacity of [`VM_MACS_MAP`]: far more VMs than one hypervisor runs.
pub const VM_MACS_MAX: u32 = 4_096;

/// Key of [`FLOWS_MAP`]: one direction of a VM pair.
///
/// Both addresses are stored exactly as they appear in the IPv4 header, that
/// is in network byte order; `u32::from_be(src)` gives the host-order value.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PairKey {
    /// Source IPv4 address, network byte order.
    pub src: u32,
    /// Destination IPv4 address, network byte order.
    pub dst: u32,
}

/// Value of [`FLOWS_MAP`], per CPU: user space sums `bytes` and `packets`
/// over CPUs, and takes the smallest `first_seen_ns` and largest
/// `last_seen_ns` that are not zero.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PairCounters {
    /// Bytes of the frames counted: `skb->len` at the classifier, i.e. the
    /// Ethernet header (14 bytes) plus the whole IP packet, no FCS.
    pub bytes: u64,
    /// Frames counted.
    pub packets: u64,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) of the pair's first frame,
    /// in the slot of the CPU that created the entry (0 on the others).
    pub first_seen_ns: u64,
    /// `bpf_ktime_get_ns()` when this CPU's slot was written with a time:
    /// the entry's creation. The classifiers do not stamp every frame (a
    /// clock read per frame was the largest piece of their cost): the agent
    /// tells an active pair from its counters changing between drains. Kept
    /// so that maps pinned by an earlier agent keep their layout.
    pub last_seen_ns: u64,
}

/// Element of [`SLOTS_MAP`], 16 bytes. In a slot's cell 0: `a` is the
/// [`PairKey`] as one word ([`PairKey::word`]; 0: empty slot, since a
/// source of 0.0.0.0 is never counted) and `b` the pair's first-seen stamp
/// (`bpf_ktime_get_ns()`); in the other cells `a` is bytes and `b` frames
/// (see [`PairCounters`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SlotCell {
    /// The key (cell 0), or bytes.
    pub a: u64,
    /// The first-seen stamp (cell 0), or frames.
    pub b: u64,
}

impl PairKey {
    /// The key's eight bytes as one native-order word: what a slot's cell 0
    /// holds, read and written as one, so a torn key can never match. Never 0 for a counted pair (its source is
    /// not 0.0.0.0).
    #[inline(always)]
    pub fn word(&self) -> u64 {
        // src first in memory, as in the struct, on either byte order.
        if cfg!(target_endian = "little") {
            u64::from(self.src) | (u64::from(self.dst) << 32)
        } else {
            (u64::from(self.src) << 32) | u64::from(self.dst)
        }
    }
}

/// Slots a pair may sit in: its first slot ([`slot_index`]) and the
/// others of its aligned group of this many adjacent slots
/// ([`slot_candidate`]). Four instead of two: at the load the agent sizes
/// the array for (up to 0.8 pairs per slot) about 89% of random pairs find
/// a slot instead of 81%, and at 0.5 about 97% instead of 90%; a pair
/// without a slot is counted through the hash map, which costs the
/// classifier a hash walk per frame and the drain a batched read. The
/// group is four adjacent slots, so the probes stay within 256 bytes.
pub const SLOT_WAYS: u32 = 4;

/// Candidate `j` (0 to [`SLOT_WAYS`] - 1) of a pair whose first slot is
/// `first`: the slots of `first`'s aligned group, starting at `first`.
/// Candidate 0 is `first`; `first ^ 1`, where an earlier agent placed a
/// pair when a group was two slots, is one of them.
#[inline(always)]
pub fn slot_candidate(first: u32, j: u32) -> u32 {
    (first & !(SLOT_WAYS - 1)) | (first.wrapping_add(j) & (SLOT_WAYS - 1))
}

/// The first of the slots where a pair may sit in [`SLOTS_MAP`] of
/// `mask + 1` slots (see [`SLOT_WAYS`]), the same in the kernel and the
/// agent: MurmurHash3's 64-bit finaliser (xor-shift, multiply,
/// twice) so that every bit of both addresses reaches the low bits the
/// mask keeps. Anything less spread real address patterns badly: a bare
/// multiply never carries the top byte (the last octet of the
/// destination) down, and one round of the finaliser let the last octets
/// of source and destination cancel out (1,000 sources x 100 peers filled
/// 4,096 of 131,072 slots).
#[inline(always)]
pub fn slot_index(key: &PairKey, mask: u32) -> u32 {
    let mut h = key.word();
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^= h >> 33;
    (h as u32) & mask
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;

    fn key(src: [u8; 4], dst: [u8; 4]) -> PairKey {
        PairKey {
            src: u32::from_ne_bytes(src),
            dst: u32::from_ne_bytes(dst),
        }
    }

    /// Pairs placed as the agent places them (first free of the
    /// candidates) in slots for 1.25x as many pairs, rounded up to a
    /// power of two, as the agent sizes them.
    fn placed(pairs: impl Iterator<Item = PairKey>, slots: usize) -> usize {
        let mut used = vec![false; slots];
        let mut n = 0;
        for k in pairs {
            let i = slot_index(&k, slots as u32 - 1);
            if let Some(j) = (0..SLOT_WAYS)
                .map(|j| slot_candidate(i, j) as usize)
                .find(|&j| !used[j])
            {
                used[j] = true;
                n += 1;
            }
        }
        n
    }

    #[test]
    fn hosted_cells_are_in_range_and_spread_a_subnet() {
        assert!(HOSTED_FILTER_CELLS.is_power_of_two());
        let mut used = vec![false; HOSTED_FILTER_CELLS as usize];
        // The 256 addresses of one /24, as a host's VMs often are.
        for last in 0..=255u8 {
            let c = hosted_cell(u32::from_ne_bytes([10, 1, 2, last]));
            assert!(c < HOSTED_FILTER_CELLS);
            used[c as usize] = true;
        }
        let cells = used.iter().filter(|&&u| u).count();
        assert!(cells >= 250, "256 addresses in only {cells} cells");
        // And the first octets move the cell too.
        assert_ne!(
            hosted_cell(u32::from_ne_bytes([10, 1, 2, 3])),
            hosted_cell(u32::from_ne_bytes([11, 1, 2, 3]))
        );
    }

    #[test]
    fn candidates_are_the_aligned_group_from_the_first() {
        assert_eq!(
            (0..SLOT_WAYS)
                .map(|j| slot_candidate(6, j))
                .collect::<vec::Vec<_>>(),
            vec![6, 7, 4, 5]
        );
        for first in 0..64 {
            let c: vec::Vec<u32> = (0..SLOT_WAYS).map(|j| slot_candidate(first, j)).collect();
            assert_eq!(c[0], first);
            assert!(c.contains(&(first ^ 1)));
            assert!(c.iter().all(|&i| i / SLOT_WAYS == first / SLOT_WAYS));
        }
    }

    /// One VM's 10,000 peers in a /16 (the live bench's pattern), and
    /// 1,000 sources x 10 peers (the scale bench's): both get a slot for
    /// about as many pairs as random keys would (about 94% at this load).
    #[test]
    fn address_patterns_spread_over_the_slots() {
        let one_vm = (0..10_000u32).map(|i| {
            let d = 0xc613_0000u32 + i;
            key([198, 18, 0, 1], d.to_be_bytes())
        });
        let many = (0..10_000u32).map(|i| {
            let (s, d) = (0xc612_0000u32 + i % 1000, 0xc613_0000u32 + i / 1000);
            key(s.to_be_bytes(), d.to_be_bytes())
        });
        for (name, n) in [
            ("one VM", placed(one_vm, 16_384)),
            ("1,000 VMs", placed(many, 16_384)),
        ] {
            assert!(n > 9_200, "{name}: {n} of 10,000 pairs got a slot");
        }
    }
}

/// Value of [`VM_MACS_MAP`]: where a hosted VM was last seen sending.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VmMac {
    /// The VM's MAC address, as on the wire.
    pub mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
    /// Interface index of the VM's backend interface (its vif).
    pub ifindex: u32,
}

/// Value of [`VIF_SEEN_MAP`]: the last sender the ingress classifier
/// learnt into [`VM_MACS_MAP`] on a vif. A frame from the same address and
/// MAC on the same vif needs no lookup in [`VM_MACS_MAP`]. The agent zeroes
/// a vif's slot when it deletes that vif's entries from [`VM_MACS_MAP`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VifSeen {
    /// Interface index of the vif (0: empty slot).
    pub ifindex: u32,
    /// The sender's IPv4 address, network byte order.
    pub ip: u32,
    /// The sender's MAC address.
    pub mac: [u8; 6],
    /// Explicit padding; always zero.
    pub _pad: [u8; 2],
}

/// One intercepted control datagram, as the classifier writes it into
/// [`CONTROL_RING`]: who sent it, which hosted VM it was addressed to, and
/// its UDP payload.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ControlFrame {
    /// Source IPv4 address, network byte order.
    pub src: u32,
    /// Destination IPv4 address (the hosted VM), network byte order.
    pub dst: u32,
    /// UDP source port, host order.
    pub sport: u16,
    /// Bytes of `data` that hold the payload.
    pub len: u16,
    /// Interface index of the vif it was caught on.
    pub ifindex: u32,
    /// The UDP payload; only the first `len` bytes are meaningful.
    pub data: [u8; CONTROL_MAX_PAYLOAD],
}

/// Indices into [`STATS_MAP`]: events the datapath counts instead of
/// logging, because a classifier must never log per packet.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stat {
    /// A new pair could not be inserted because [`FLOWS_MAP`] was full.
    FlowsMapFull = 0,
    /// A VM's MAC could not be recorded because [`VM_MACS_MAP`] was full.
    MacsMapFull = 1,
    /// Frames seen that were not IPv4 (ARP, IPv6, ...), passed uncounted.
    NotIpv4 = 2,
    /// IPv4 frames to a multicast or broadcast address, or from 0.0.0.0:
    /// they belong to no VM pair, and are passed uncounted.
    NotUnicast = 3,
    /// Control datagrams handed to the agent (and kept from the guest).
    ControlIntercepted = 4,
    /// Control datagrams passed on to the guest because the ring was full.
    ControlRingFull = 5,
    /// Pairs inserted into [`FLOWS_MAP`] (a pair's first frame while it has
    /// no slot). The agent walks the hash map only when this moved or it
    /// left entries there at the last drain: with every pair in a slot,
    /// a drain then costs no walk over the map's empty buckets.
    FlowsInserted = 6,
    /// Writes into [`VM_MACS_MAP`] by the classifiers (a VM learnt, or its
    /// MAC or vif changed). The agent reads the VM table again only when
    /// this moved (or it deleted entries itself) since its last read: the
    /// table's batched read walks all of its buckets, whatever the VMs.
    /// Appended last, so a statistics map pinned by an agent without it
    /// keeps its other slots; in such a map (one entry short) the
    /// classifier's bump finds no slot, and the agent reads the table at
    /// every drain, as before.
    VmsLearnt = 7,
}

/// Number of slots in [`STATS_MAP`].
pub const STATS_LEN: u32 = 8;

const _: () = assert!(core::mem::size_of::<PairKey>() == 8);
const _: () = assert!(core::mem::size_of::<PairCounters>() == 32);
const _: () = assert!(core::mem::size_of::<VmMac>() == 12);
const _: () = assert!(core::mem::size_of::<SlotCell>() == 16);
const _: () = assert!(core::mem::size_of::<VifSeen>() == 16);
// The classifiers read a `VifSeen` as two 8-byte words: (ifindex, ip) and
// (mac, padding).
const _: () = assert!(
    core::mem::offset_of!(VifSeen, ifindex) == 0
        && core::mem::offset_of!(VifSeen, ip) == 4
        && core::mem::offset_of!(VifSeen, mac) == 8
);
const _: () = assert!(core::mem::align_of::<PairCounters>() == 8);
const _: () = assert!(core::mem::size_of::<ControlFrame>() == 16 + CONTROL_MAX_PAYLOAD);

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all three are repr(C), made only of integers and byte arrays,
    // with explicit padding, so every bit pattern is a valid value.
    unsafe impl aya::Pod for super::PairKey {}
    unsafe impl aya::Pod for super::PairCounters {}
    unsafe impl aya::Pod for super::VmMac {}
    unsafe impl aya::Pod for super::SlotCell {}
    unsafe impl aya::Pod for super::VifSeen {}
    unsafe impl aya::Pod for super::ControlFrame {}
}
