//! The kernel side as the agent sees it: loads score-ebpf's classifiers,
//! attaches them to VM backend interfaces (TCX on kernels >= 6.6, so no
//! qdisc is ever added and closing the link detaches it; a clsact qdisc and
//! netlink filters on older kernels, such as Debian 12's 6.1 Xen dom0),
//! and reads and
//! trims the maps. Map iteration is a series of blocking syscalls: async
//! callers run these methods on a blocking thread.

use std::{
    collections::HashMap,
    net::Ipv4Addr,
    os::fd::AsFd,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuHashMap},
    programs::{
        LinkOrder, SchedClassifier, TcAttachType,
        tc::{self, NlOptions, SchedClassifierLinkId, TcAttachOptions},
    },
    util::KernelVersion,
};
use score_common::{
    FLOWS_MAP, HOSTED_FILTER_CELLS, HOSTED_FILTER_MAP, PROG_EGRESS, PROG_INGRESS, PairCounters,
    PairKey, SLOT_CELLS_GLOBAL, SLOT_MASK_GLOBAL, SLOT_WAYS, SLOTS_MAP, STATS_MAP, SlotCell, Stat,
    VIF_SEEN_MAP, VIF_SEEN_SLOTS, VM_MACS_MAP, VifSeen, VmMac, hosted_cell, slot_candidate,
    slot_index,
};
use serde::Serialize;

use crate::flows::{Pair, PairOrder, Totals};

/// The eBPF object built by build.rs (empty when built without bpf-linker).
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/score-tc"));

/// What went wrong in the kernel side.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    /// The binary carries no eBPF program.
    #[error(
        "this score-agent was built without its eBPF program (bpf-linker or the pinned nightly \
         was missing at build time); run `cargo xtask setup` and rebuild"
    )]
    NoProgram,
    /// The object failed to load (verifier, permissions, map pinning).
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    /// A program failed to load or attach.
    #[error("eBPF program {name}: {source}")]
    Program {
        /// Program or interface concerned.
        name: String,
        /// The kernel's answer.
        source: aya::programs::ProgramError,
    },
    /// A map is missing from the object or has the wrong type.
    #[error("eBPF map {0} missing or of the wrong type")]
    Map(&'static str),
    /// A map operation failed.
    #[error("eBPF map operation: {0}")]
    MapOp(#[from] aya::maps::MapError),
    /// Per-CPU values could not be built (CPU count unknown).
    #[error("per-CPU map values: {0}")]
    PerCpu(String),
    /// The counter slots could not be mapped, or the wait for running
    /// classifiers failed.
    #[error("counter slots: {0}")]
    Slots(std::io::Error),
    /// The hosted-VM filter (`SCORE_HOSTED_FILTER`) could not be mapped.
    #[error("hosted-VM filter: {0}")]
    Filter(std::io::Error),
    /// bpffs could not be prepared for pinning.
    #[error("preparing bpffs at {path}: {reason}")]
    Bpffs {
        /// The pin directory.
        path: PathBuf,
        /// Why it failed.
        reason: String,
    },
}

/// Counters the classifiers keep instead of logging.
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct DatapathStats {
    /// New pairs refused because the flow map was full.
    pub flows_map_full: u64,
    /// VM MACs not recorded because their map was full.
    pub macs_map_full: u64,
    /// Non-IPv4 frames passed uncounted.
    pub not_ipv4: u64,
    /// Multicast, broadcast or unspecified-source frames passed uncounted.
    pub not_unicast: u64,
    /// Control datagrams handed to the agent.
    pub control_intercepted: u64,
    /// Control datagrams let through to the guest: the ring was full.
    pub control_ring_full: u64,
}

/// A VM running on this host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostedVm {
    /// Its address (its ID in the token).
    pub ip: Ipv4Addr,
    /// Its MAC, as learnt from its frames.
    pub mac: [u8; 6],
    /// Its backend interface on this host.
    pub vif: String,
}

/// How to load the datapath.
#[derive(Clone, Debug)]
pub struct LoadOptions {
    /// Capacity of the flow map.
    pub flows_max: u32,
    /// Pin the maps in this bpffs directory (reusing maps already there),
    /// or keep them private to this process.
    pub pin_dir: Option<PathBuf>,
    /// Intercept UDP datagrams to this port of a hosted VM (the peer
    /// protocol's port) and hand them to the agent; None: pass them on.
    pub control_port: Option<u16>,
}

/// How the classifiers are attached to an interface.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AttachMode {
    /// TCX where the kernel has it (>= 6.6), else clsact.
    #[default]
    Auto,
    /// TCX links (kernel >= 6.6).
    Tcx,
    /// A clsact qdisc (added if missing) and netlink TC filters: what
    /// kernels before 6.6 have. The qdisc stays when the agent exits.
    Clsact,
}

impl AttachMode {
    /// The mode `Auto` stands for on this kernel.
    pub fn resolve(self) -> AttachMode {
        match self {
            AttachMode::Auto
                if KernelVersion::current().is_ok_and(|v| v >= KernelVersion::new(6, 6, 0)) =>
            {
                AttachMode::Tcx
            }
            AttachMode::Auto => AttachMode::Clsact,
            m => m,
        }
    }
}

/// A control datagram caught on its way to a hosted VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Intercepted {
    /// Who sent it.
    pub src: std::net::SocketAddrV4,
    /// The hosted VM it was addressed to.
    pub vm: Ipv4Addr,
    /// Its UDP payload.
    pub payload: Vec<u8>,
}

/// Reads intercepted control datagrams out of the ring buffer.
pub struct ControlReader {
    ring: aya::maps::RingBuf<aya::maps::MapData>,
}

impl std::fmt::Debug for ControlReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlReader")
    }
}

impl std::os::fd::AsRawFd for ControlReader {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.ring.as_raw_fd()
    }
}

impl ControlReader {
    /// Takes every datagram waiting in the ring.
    pub fn drain(&mut self) -> Vec<Intercepted> {
        let mut out = Vec::new();
        while let Some(item) = self.ring.next() {
            if item.len() < std::mem::size_of::<score_common::ControlFrame>() {
                continue;
            }
            // SAFETY: the ring record holds one ControlFrame (a Pod type), written by
            // the classifier; read_unaligned copes with any alignment.
            let frame: score_common::ControlFrame =
                unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
            let len = usize::from(frame.len).min(frame.data.len());
            out.push(Intercepted {
                src: std::net::SocketAddrV4::new(
                    Ipv4Addr::from(u32::from_be(frame.src)),
                    frame.sport,
                ),
                vm: Ipv4Addr::from(u32::from_be(frame.dst)),
                payload: frame.data[..len].to_vec(),
            });
        }
        out
    }
}

/// The loaded classifiers and their maps.
pub struct Datapath {
    bpf: Ebpf,
    attached: HashMap<String, Attached>,
    /// TCX or clsact, resolved.
    mode: AttachMode,
    /// Buffers of the batched map read, kept from one drain to the next.
    batch: BatchBuffers,
    /// `SCORE_SLOTS` as mapped into this process, and which slots hold a
    /// pair.
    slots: Slots,
    /// When a drain may skip the walk of `SCORE_FLOWS`.
    walk: FlowsWalk,
    /// `SCORE_VM_MACS` as the last drain read it.
    vms: VmTable,
    /// `SCORE_HOSTED_FILTER`, mapped.
    filter: HostedFilter,
}

/// The VM table (`SCORE_VM_MACS`) as last read, and what tells a drain
/// that it has not changed since, so that it skips the batched read,
/// which walks all of the map's buckets (4,096) however few VMs there
/// are. Only the classifiers write the table, and they count every write
/// (`Stat::VmsLearnt`); only this agent deletes from it
/// ([`Datapath::forget`]), and then forgets what it read.
#[derive(Debug, Default)]
struct VmTable {
    /// The entries as last read.
    macs: Vec<(Ipv4Addr, VmMac)>,
    /// The write count, summed over CPUs, read just before `macs`; None
    /// when `macs` may be stale (never read, or entries deleted since).
    learnt: Option<u64>,
    /// Whether the statistics map has room for the count: a map pinned by
    /// an agent without it is shorter, and then every drain reads the
    /// table.
    counted: bool,
    /// Reads of the table so far, for tests and benches.
    reads: u64,
}

/// What tells a drain that `SCORE_FLOWS` holds nothing to read, so that it
/// skips the batched walk, which visits every bucket of the map, empty or
/// not (with 65,536 buckets, most of an idle drain's cost). The map holds
/// pairs only between their first frame and the drain that gives them a
/// slot, and the classifiers count every insert (`Stat::FlowsInserted`).
/// The count is read before the walk, so a pair inserted after the read
/// moves it past what the drain remembers, and the next drain walks.
#[derive(Debug)]
struct FlowsWalk {
    /// Whether the map may hold pairs no drain moved out: at load (pinned
    /// entries of an earlier agent), and after a drain that left pairs
    /// there (no free slot, or more than one drain moves).
    left: bool,
    /// The insert count, summed over CPUs, at the last walk; None before
    /// the first.
    inserted: Option<u64>,
    /// Whether the statistics map has room for the count: a map pinned by
    /// an agent without it is shorter, and then every drain walks.
    counted: bool,
}

/// The counter slots (`SCORE_SLOTS`, see score-common's `SLOTS_MAP`) as
/// the agent keeps them. Why counts stay exact through every step:
///
/// - A frame is counted in exactly one place: the classifier adds it to
///   its CPU's cell of the pair's slot if the slot's key names the pair,
///   else to the pair's entry in `SCORE_FLOWS`. Each cell has one writer
///   (a CPU's classifier runs, which do not preempt each other, or the
///   agent), so plain adds lose nothing. The agent reads the cells through
///   its mapping, no syscall.
/// - Giving a pair a slot ([`Datapath::snapshot_into`]): the slot is empty
///   and all its cells zero; the agent writes the first-seen stamp, then
///   the key. From then on new frames go to the slot. It then waits until
///   every classifier run that may have read the slot before the key was
///   written has finished (`membarrier(MEMBARRIER_CMD_GLOBAL)`, which is
///   `synchronize_rcu()`; TC programs run inside RCU read-side sections).
///   After that the pair's `SCORE_FLOWS` entry can no longer change: the
///   agent reads it, writes it into the slot's agent cell and deletes it.
/// - Freeing a slot ([`Datapath::remove_pairs`], idle pairs): the agent
///   clears the key, waits the same way, and reads the slot once more:
///   frames counted between the drain that found the pair idle and the
///   clear are kept as a residual and added to the pair's next reading
///   (its frames after the clear go to `SCORE_FLOWS` as a new entry).
///   Only then are the slot's cells zeroed and the slot free.
struct Slots {
    /// The shared mapping of the array.
    mem: SlotMem,
    /// Slots minus one, as the classifiers have it.
    mask: u32,
    /// Slots that hold a pair, sorted by index (the drain reads them in
    /// memory order), with the counters the last drain read there.
    owned: Vec<Owned>,
    /// Counts read from freed slots after the drain that saw them last,
    /// keyed by pair: reported with the pair until it is removed again.
    carry: HashMap<PairKey, Totals>,
}

#[derive(Clone, Copy, Debug)]
struct Owned {
    idx: u32,
    bytes: u64,
    packets: u64,
}

/// A read-write mapping of an eBPF array map created with
/// `BPF_F_MMAPABLE`, seen as 64-bit words: the agent reads and writes the
/// classifiers' memory without a syscall.
struct Mapping {
    ptr: std::ptr::NonNull<u64>,
    /// Words mapped.
    words: usize,
    /// Bytes mapped (a whole number of pages).
    len: usize,
}

// SAFETY: the mapping is plain shared memory, valid until Drop; every
// access to a word goes through atomics (see `Mapping::word`).
unsafe impl Send for Mapping {}
// SAFETY: as above.
unsafe impl Sync for Mapping {}

impl Mapping {
    /// Maps the first `bytes` of the map behind `fd` (rounded up to a page).
    fn shared(fd: std::os::fd::BorrowedFd<'_>, bytes: usize) -> std::io::Result<Self> {
        use std::os::fd::AsRawFd;
        Self::new(bytes, libc::MAP_SHARED, fd.as_raw_fd())
    }

    /// Zeroed private memory laid out as a mapped map, for unit tests.
    #[cfg(test)]
    fn anonymous(bytes: usize) -> Self {
        Self::new(bytes, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1).expect("anonymous mapping")
    }

    fn new(bytes: usize, flags: libc::c_int, fd: libc::c_int) -> std::io::Result<Self> {
        let page = 4096;
        let len = bytes.div_ceil(page) * page;
        // SAFETY: a fresh mapping of `len` bytes (of the map's fd, created
        // with BPF_F_MMAPABLE, or anonymous), unmapped once in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: std::ptr::NonNull::new(ptr.cast()).ok_or_else(std::io::Error::last_os_error)?,
            words: bytes / 8,
            len,
        })
    }

    /// Word `at`, as an atomic: the classifiers write the same memory.
    fn word(&self, at: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(at < self.words);
        // SAFETY: `at` is in bounds (checked), the mapping is page aligned
        // and lives as long as self.
        unsafe { std::sync::atomic::AtomicU64::from_ptr(self.ptr.as_ptr().add(at)) }
    }

    /// Asks the CPU to start loading the cache line of word `at`.
    #[inline(always)]
    fn prefetch(&self, at: usize) {
        if at >= self.words {
            return;
        }
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `at` is within the mapping; a prefetch reads nothing
            // the program sees and cannot fault.
            unsafe {
                let p = self.ptr.as_ptr().add(at);
                std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(
                    p.cast::<i8>(),
                );
            }
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// `SCORE_SLOTS` as mapped into this process: `slots` slots of `cells`
/// cells.
struct SlotMem {
    mem: Mapping,
    slots: u32,
    cells: u32,
}

/// Words per cell of `SCORE_SLOTS` ([`SlotCell`]: `a`, then `b`).
const CELL_WORDS: usize = std::mem::size_of::<SlotCell>() / 8;

impl SlotMem {
    fn map(fd: std::os::fd::BorrowedFd<'_>, slots: u32, cells: u32) -> std::io::Result<Self> {
        let bytes = slots as usize * cells as usize * std::mem::size_of::<SlotCell>();
        Ok(SlotMem {
            mem: Mapping::shared(fd, bytes)?,
            slots,
            cells,
        })
    }

    /// Word `half` (0: `a`, 1: `b`) of cell `cell` of slot `idx`, as an
    /// atomic: the classifiers write the same memory.
    fn word(&self, idx: u32, cell: u32, half: usize) -> &std::sync::atomic::AtomicU64 {
        assert!(idx < self.slots && cell < self.cells && half < CELL_WORDS);
        let at = idx as usize * self.cells as usize + cell as usize;
        self.mem.word(at * CELL_WORDS + half)
    }

    /// Asks the CPU to start loading slot `idx`'s first cache line: the
    /// drain reads slots spread over the array, each a cache (and TLB)
    /// miss when read cold; started a few slots ahead, the misses overlap.
    #[inline(always)]
    fn prefetch(&self, idx: u32) {
        if idx < self.slots {
            self.mem
                .prefetch(idx as usize * self.cells as usize * CELL_WORDS);
        }
    }

    fn key(&self, idx: u32) -> u64 {
        self.word(idx, 0, 0)
            .load(std::sync::atomic::Ordering::Acquire)
    }

    /// Every slot that holds a pair, as owned with nothing reported yet
    /// (one pass over the whole array).
    fn occupied(&self) -> Vec<Owned> {
        (0..self.slots)
            .filter(|&i| self.key(i) != 0)
            .map(|idx| Owned {
                idx,
                bytes: 0,
                packets: 0,
            })
            .collect()
    }

    /// The slot's counts: the agent's cell and every CPU's, summed.
    fn totals(&self, idx: u32) -> Totals {
        use std::sync::atomic::Ordering::Relaxed;
        let first = self.word(idx, 0, 1).load(Relaxed);
        let mut t = Totals {
            first_seen_ns: first,
            last_seen_ns: first,
            ..Totals::default()
        };
        for cell in 1..self.cells {
            t.bytes += self.word(idx, cell, 0).load(Relaxed);
            t.packets += self.word(idx, cell, 1).load(Relaxed);
        }
        t
    }

    /// Zeroes every cell of a slot no classifier can reach any more.
    fn clear(&self, idx: u32) {
        for cell in 0..self.cells {
            for half in 0..2 {
                self.word(idx, cell, half)
                    .store(0, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }
}

/// `SCORE_HOSTED_FILTER` as mapped into this process (score-common's
/// `HOSTED_FILTER_MAP`): per cell, how many addresses of `SCORE_VM_MACS`
/// fall in it, or more, never fewer. The classifiers add before they
/// insert; this agent, the only one to delete, takes off after it deletes.
struct HostedFilter {
    mem: Mapping,
}

impl HostedFilter {
    fn open(bpf: &Ebpf) -> Result<Self, DatapathError> {
        let Some(aya::maps::Map::Array(md)) = bpf.map(HOSTED_FILTER_MAP) else {
            return Err(DatapathError::Map(HOSTED_FILTER_MAP));
        };
        let info = md.info()?;
        if info.max_entries() != HOSTED_FILTER_CELLS || info.value_size() != 8 {
            return Err(DatapathError::Map(HOSTED_FILTER_MAP));
        }
        let bytes = HOSTED_FILTER_CELLS as usize * 8;
        Ok(HostedFilter {
            mem: Mapping::shared(md.fd().as_fd(), bytes).map_err(DatapathError::Filter)?,
        })
    }

    /// `ip`'s cell (network order, as the classifiers see it).
    fn cell(&self, ip: u32) -> &std::sync::atomic::AtomicU64 {
        self.mem.word(hosted_cell(ip) as usize)
    }

    /// Raises every cell to at least the number of `table`'s addresses
    /// that fall in it, at load: a filter pinned with a table it does not
    /// count (new beside a table pinned by an agent from before it, or
    /// left behind while an older agent ran) then counts it. A cell is
    /// never lowered, so a classifier adding meanwhile loses nothing; a
    /// cell left too high only costs its senders the table lookup.
    fn cover(&self, table: &[(Ipv4Addr, VmMac)]) {
        let mut counts: HashMap<u32, u64> = HashMap::new();
        for (ip, _) in table {
            *counts
                .entry(hosted_cell(u32::from(*ip).to_be()))
                .or_default() += 1;
        }
        for (cell, n) in counts {
            self.mem
                .word(cell as usize)
                .fetch_max(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
}

/// Waits until every BPF program run that started before now has ended:
/// `membarrier(MEMBARRIER_CMD_GLOBAL)` is the kernel's `synchronize_rcu()`.
fn wait_for_running_programs() -> std::io::Result<()> {
    const MEMBARRIER_CMD_GLOBAL: libc::c_long = 1;
    // SAFETY: a syscall with integer arguments only.
    let rc = unsafe { libc::syscall(libc::SYS_membarrier, MEMBARRIER_CMD_GLOBAL, 0, 0) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn key_of(pair: &Pair) -> PairKey {
    PairKey {
        src: u32::from(pair.0).to_be(),
        dst: u32::from(pair.1).to_be(),
    }
}

fn key_of_word(word: u64) -> PairKey {
    let b = word.to_ne_bytes();
    PairKey {
        src: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        dst: u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
    }
}

impl Slots {
    fn open(bpf: &Ebpf, slots: u32, cells: u32) -> Result<Self, DatapathError> {
        let Some(aya::maps::Map::Array(md)) = bpf.map(SLOTS_MAP) else {
            return Err(DatapathError::Map(SLOTS_MAP));
        };
        let info = md.info()?;
        // A pinned array of another size (another flows_max or CPU count)
        // does not match what the classifiers were told.
        if u64::from(info.max_entries()) != u64::from(slots) * u64::from(cells)
            || info.value_size() as usize != std::mem::size_of::<SlotCell>()
        {
            return Err(DatapathError::Map(SLOTS_MAP));
        }
        let mem = SlotMem::map(md.fd().as_fd(), slots, cells).map_err(DatapathError::Slots)?;
        // Slots pinned by an earlier run keep their pairs: adopt them
        // (one pass over the array, at load only).
        let owned = mem.occupied();
        Ok(Slots {
            mem,
            mask: slots - 1,
            owned,
            carry: HashMap::new(),
        })
    }

    /// The candidate slots of `key`, in the order the classifiers try
    /// them (score-common's `SLOT_WAYS`).
    fn candidates(&self, key: &PairKey) -> impl Iterator<Item = u32> + use<> {
        let (first, slots) = (slot_index(key, self.mask), self.mem.slots);
        (0..SLOT_WAYS)
            .map(move |j| slot_candidate(first, j))
            .filter(move |&i| i < slots)
    }

    /// The slot holding `key`, if any.
    fn find(&self, key: &PairKey) -> Option<u32> {
        let word = key.word();
        self.candidates(key).find(|&i| self.mem.key(i) == word)
    }

    /// An empty slot where `key` may go, if any: the first free candidate,
    /// so that a pair is found at its first probe where it can be.
    fn free_for(&self, key: &PairKey) -> Option<u32> {
        self.candidates(key).find(|&i| self.mem.key(i) == 0)
    }
}

/// Keys and per-CPU values of one `BPF_MAP_LOOKUP_BATCH` call (about 290
/// KiB on 2 CPUs): allocated once, not once per drain.
#[derive(Default)]
struct BatchBuffers {
    keys: Vec<PairKey>,
    values: Vec<PairCounters>,
}

struct Attached {
    ifindex: u32,
    ingress: SchedClassifierLinkId,
    egress: SchedClassifierLinkId,
}

impl std::fmt::Debug for Datapath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Datapath")
            .field("attached", &self.attached.keys())
            .finish()
    }
}

/// Whether this binary carries its eBPF program.
pub fn has_program() -> bool {
    !OBJECT.is_empty()
}

impl Datapath {
    /// Loads the object and both classifiers; attaches nothing yet.
    pub fn load(opts: &LoadOptions) -> Result<Self, DatapathError> {
        Self::load_object(OBJECT, opts)
    }

    /// [`Datapath::load`] from another build of score-ebpf's classifiers:
    /// the benches pass the bench object (`score-tc-bench` in this crate's
    /// `OUT_DIR`), whose extra programs they load themselves. `object` must
    /// be 8-byte aligned (`aya::include_bytes_aligned!`).
    pub fn load_object(object: &[u8], opts: &LoadOptions) -> Result<Self, DatapathError> {
        if object.is_empty() {
            return Err(DatapathError::NoProgram);
        }
        let mut loader = EbpfLoader::new();
        loader.map_max_entries(FLOWS_MAP, opts.flows_max);
        let slots = slot_count(opts.flows_max);
        let mask = slots - 1;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::PerCpu(e.to_string()))?;
        let cells = 2 + cpus as u32;
        let total = slots
            .checked_mul(cells)
            .ok_or(DatapathError::Map(SLOTS_MAP))?;
        loader.map_max_entries(SLOTS_MAP, total);
        loader.override_global(SLOT_MASK_GLOBAL, &mask, true);
        loader.override_global(SLOT_CELLS_GLOBAL, &cells, true);
        let port = opts.control_port.unwrap_or(0);
        loader.override_global(score_common::CONTROL_PORT_GLOBAL, &port, true);
        let pins: Vec<(&'static str, PathBuf)>;
        if let Some(dir) = &opts.pin_dir {
            prepare_bpffs(dir)?;
            pins = [
                FLOWS_MAP,
                SLOTS_MAP,
                VM_MACS_MAP,
                STATS_MAP,
                HOSTED_FILTER_MAP,
            ]
            .map(|m| (m, dir.join(m)))
            .to_vec();
            for (name, path) in &pins {
                loader.map_pin_path(name, path.as_path());
            }
        }
        let mut bpf = loader.load(object)?;
        for name in [PROG_INGRESS, PROG_EGRESS] {
            classifier(&mut bpf, name)?
                .load()
                .map_err(|source| DatapathError::Program {
                    name: name.into(),
                    source,
                })?;
        }
        let slots = Slots::open(&bpf, slots, cells)?;
        // A statistics map pinned by an earlier agent keeps its length:
        // the counts appended since are missing from it.
        let stats_len = match bpf.map(STATS_MAP) {
            Some(aya::maps::Map::PerCpuArray(md)) => md.info()?.max_entries(),
            _ => 0,
        };
        let filter = HostedFilter::open(&bpf)?;
        let dp = Datapath {
            bpf,
            attached: HashMap::new(),
            mode: AttachMode::Auto.resolve(),
            batch: BatchBuffers::default(),
            slots,
            walk: FlowsWalk {
                left: true,
                inserted: None,
                counted: stats_len > Stat::FlowsInserted as u32,
            },
            vms: VmTable {
                counted: stats_len > Stat::VmsLearnt as u32,
                ..VmTable::default()
            },
            filter,
        };
        dp.filter.cover(&dp.vm_macs()?);
        Ok(dp)
    }

    /// Hands the object's aya-log ring to the caller, who forwards its
    /// records to `log` (and so to tracing). None if the object logs nothing.
    pub fn take_logger(&mut self) -> Option<aya_log::EbpfLogger<&'static dyn log::Log>> {
        aya_log::EbpfLogger::init(&mut self.bpf).ok()
    }

    /// Hands the ring of intercepted control datagrams to the caller (once).
    pub fn take_control_reader(&mut self) -> Result<ControlReader, DatapathError> {
        let map = self
            .bpf
            .take_map(score_common::CONTROL_RING)
            .ok_or(DatapathError::Map(score_common::CONTROL_RING))?;
        Ok(ControlReader {
            ring: aya::maps::RingBuf::try_from(map)?,
        })
    }

    /// Chooses how later attachments are made.
    pub fn set_attach_mode(&mut self, mode: AttachMode) {
        self.mode = mode.resolve();
    }

    /// How attachments are made now (TCX or clsact).
    pub fn attach_mode(&self) -> AttachMode {
        self.mode
    }

    /// Attaches both classifiers to an interface; a no-op if already done.
    pub fn attach(&mut self, iface: &str, ifindex: u32) -> Result<bool, DatapathError> {
        if let Some(a) = self.attached.get(iface) {
            if a.ifindex == ifindex {
                return Ok(false);
            }
            // Same name, new interface (a VM restarted): the old links went
            // with the old device.
            self.forget(iface);
        }
        let err = |source| DatapathError::Program {
            name: iface.to_string(),
            source,
        };
        let options = || match self.mode {
            AttachMode::Clsact => TcAttachOptions::Netlink(NlOptions::default()),
            _ => TcAttachOptions::TcxOrder(LinkOrder::default()),
        };
        if self.mode == AttachMode::Clsact {
            // Netlink filters hang off a clsact qdisc; one already there
            // (an earlier run's) is fine.
            if let Err(e) = tc::qdisc_add_clsact(iface)
                && !matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            {
                return Err(DatapathError::Program {
                    name: iface.to_string(),
                    source: e.into(),
                });
            }
        }
        let ingress = classifier(&mut self.bpf, PROG_INGRESS)?
            .attach_with_options(iface, TcAttachType::Ingress, options())
            .map_err(err)?;
        let egress = match classifier(&mut self.bpf, PROG_EGRESS)?.attach_with_options(
            iface,
            TcAttachType::Egress,
            options(),
        ) {
            Ok(id) => id,
            Err(e) => {
                let _ = classifier(&mut self.bpf, PROG_INGRESS).map(|p| p.detach(ingress));
                return Err(err(e));
            }
        };
        self.attached.insert(
            iface.to_owned(),
            Attached {
                ifindex,
                ingress,
                egress,
            },
        );
        Ok(true)
    }

    /// Detaches from an interface that still exists.
    pub fn detach(&mut self, iface: &str) {
        if let Some(a) = self.attached.remove(iface) {
            if let Ok(p) = classifier(&mut self.bpf, PROG_INGRESS) {
                let _ = p.detach(a.ingress);
            }
            if let Ok(p) = classifier(&mut self.bpf, PROG_EGRESS) {
                let _ = p.detach(a.egress);
            }
        }
    }

    /// Forgets an interface that has gone (its links went with it), and
    /// drops the MAC entries of VMs that were behind it.
    pub fn forget(&mut self, iface: &str) -> Option<u32> {
        let ifindex = self.attached.get(iface)?.ifindex;
        self.detach(iface);
        let _ = self.drop_vm_macs_on(ifindex);
        Some(ifindex)
    }

    /// Detaches from every interface.
    pub fn detach_all(&mut self) {
        let names: Vec<String> = self.attached.keys().cloned().collect();
        for n in names {
            self.detach(&n);
        }
    }

    /// Interfaces attached now, sorted.
    pub fn attached(&self) -> Vec<String> {
        let mut v: Vec<String> = self.attached.keys().cloned().collect();
        v.sort();
        v
    }

    /// The order in which drains hand the pairs over ([`PairOrder`] of this
    /// slot array): the order a [`crate::flows::FlowTable`] should keep
    /// them in, so that a drain walks it once without lookups.
    pub fn pair_order(&self) -> PairOrder {
        PairOrder::new(self.slots.mask)
    }

    /// Reads every pair's counters: the slotted pairs' through the shared
    /// mapping of `SCORE_SLOTS` (no syscall), the others' from
    /// `SCORE_FLOWS`, summed over CPUs, in batches of 4,096 entries per
    /// syscall (BPF_MAP_LOOKUP_BATCH), or pair by pair where the kernel
    /// refuses the batch; in [`Datapath::pair_order`]. Gives no pair a
    /// slot: see [`Datapath::drain_each`].
    pub fn snapshot(&self) -> Result<Vec<(Pair, Totals)>, DatapathError> {
        let mut fresh = Vec::new();
        let mut buffers = BatchBuffers::default();
        self.read_flows(&mut buffers, &mut fresh)?;
        let mut owned = self.slots.owned.clone();
        let mut out = Vec::with_capacity(fresh.len() + owned.len());
        emit_pairs(
            &self.slots.mem,
            self.pair_order(),
            &mut owned,
            &mut fresh,
            &self.slots.carry,
            |p, t| out.push((p, t)),
        );
        Ok(out)
    }

    /// [`Datapath::drain_each`] into `out` (cleared first).
    pub fn snapshot_into(&mut self, out: &mut Vec<(Pair, Totals)>) -> Result<(), DatapathError> {
        let mut fresh = Vec::new();
        let mut pairs = std::mem::take(out);
        pairs.clear();
        let result = self.drain_each(&mut fresh, |p, t| pairs.push((p, t)));
        *out = pairs;
        result
    }

    /// What the collector calls at every drain: gives each pair that is
    /// still counted in `SCORE_FLOWS` a slot where one of its two is free
    /// (from then on its frames cost an array access, not a hash walk),
    /// then hands every pair's counters to `each`, in
    /// [`Datapath::pair_order`]: the slotted pairs' read through the
    /// mapping in memory order, merged with the others'. `fresh` is a
    /// buffer for the pairs read from `SCORE_FLOWS`, kept by the caller
    /// from one drain to the next; nothing is allocated per slotted pair.
    /// The walk of `SCORE_FLOWS` is skipped when no pair can be there (see
    /// [`FlowsWalk`]).
    pub fn drain_each(
        &mut self,
        fresh: &mut Vec<(Pair, Totals)>,
        each: impl FnMut(Pair, Totals),
    ) -> Result<(), DatapathError> {
        self.drain_fresh(fresh)?;
        self.hand_over(fresh, each);
        Ok(())
    }

    /// The first half of [`Datapath::drain_each`]: reads the pairs counted
    /// in `SCORE_FLOWS` into `fresh` and gives those it can a slot (which
    /// waits for running classifiers: no other lock should be held).
    /// Returns the datapath's statistics as read at its start (one read
    /// of `SCORE_STATS` serves both).
    pub fn drain_fresh(
        &mut self,
        fresh: &mut Vec<(Pair, Totals)>,
    ) -> Result<DatapathStats, DatapathError> {
        let sums = self.stat_sums()?;
        let inserted = self
            .walk
            .counted
            .then_some(sums[Stat::FlowsInserted as usize]);
        let walk = self.walk.left || inserted.is_none() || inserted != self.walk.inserted;
        if walk {
            let mut buffers = std::mem::take(&mut self.batch);
            let result = self.read_flows(&mut buffers, fresh);
            self.batch = buffers;
            result?;
        } else {
            fresh.clear();
        }
        // Until the moves below succeed, the map may hold what was read.
        self.walk.left = true;
        self.give_slots(fresh)?;
        // What is still in `fresh` stays in the map: no free slot, or past
        // this drain's moves.
        self.walk.left = !fresh.is_empty();
        if walk {
            self.walk.inserted = inserted;
        }
        Ok(stats_of(&sums))
    }

    /// The second half of [`Datapath::drain_each`]: hands every pair's
    /// counters to `each`, the slotted pairs' and those `fresh` holds
    /// after [`Datapath::drain_fresh`], in [`Datapath::pair_order`].
    pub fn hand_over(&mut self, fresh: &mut [(Pair, Totals)], each: impl FnMut(Pair, Totals)) {
        let order = self.pair_order();
        let Slots {
            mem, owned, carry, ..
        } = &mut self.slots;
        emit_pairs(mem, order, owned, fresh, carry, each);
    }

    /// Moves the pairs of `fresh` (read from `SCORE_FLOWS`) that find a
    /// free slot into it, exactly (see [`Slots`]), and drops them from
    /// `fresh`: the slots' reading follows.
    fn give_slots(&mut self, fresh: &mut Vec<(Pair, Totals)>) -> Result<(), DatapathError> {
        use std::sync::atomic::Ordering::{Relaxed, Release};
        let mut moved = Vec::new();
        let mut keep = Vec::with_capacity(fresh.len());
        for (pair, t) in fresh.iter() {
            let key = key_of(pair);
            // Two syscalls per pair moved: bound what one drain spends; the
            // rest move at the next drains.
            let slot = if moved.len() < MOVES_PER_DRAIN {
                self.slots.free_for(&key)
            } else {
                None
            };
            keep.push(slot.is_none());
            if let Some(idx) = slot {
                let mem = &self.slots.mem;
                mem.word(idx, 0, 1).store(t.first_seen_ns, Relaxed);
                mem.word(idx, 0, 0).store(key.word(), Release);
                moved.push((key, idx));
            }
        }
        if moved.is_empty() {
            return Ok(());
        }
        wait_for_running_programs().map_err(DatapathError::Slots)?;
        let mut map: PerCpuHashMap<&mut MapData, PairKey, PairCounters> = PerCpuHashMap::try_from(
            self.bpf
                .map_mut(FLOWS_MAP)
                .ok_or(DatapathError::Map(FLOWS_MAP))?,
        )?;
        for &(key, idx) in &moved {
            // The entry is final now: nothing can add to it any more.
            let mut t = match map.get(&key, 0) {
                Ok(values) => Totals::sum(values.iter()),
                Err(aya::maps::MapError::KeyNotFound) => Totals::default(),
                Err(e) => return Err(e.into()),
            };
            if let Some(c) = self.slots.carry.remove(&key) {
                t.bytes += c.bytes;
                t.packets += c.packets;
            }
            // The agent's cell: no classifier writes it.
            let mem = &self.slots.mem;
            mem.word(idx, 1, 0).store(t.bytes, Relaxed);
            mem.word(idx, 1, 1).store(t.packets, Relaxed);
            match map.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(e.into()),
            }
            self.slots.owned.push(Owned {
                idx,
                bytes: 0,
                packets: 0,
            });
        }
        self.slots.owned.sort_unstable_by_key(|o| o.idx);
        let mut keep = keep.into_iter();
        fresh.retain(|_| keep.next().unwrap_or(true));
        Ok(())
    }

    /// Rebuilds the list of slots that hold a pair from the array itself
    /// (one pass over every slot): for a second handle on pinned maps
    /// whose slots another process (the daemon) gives, such as a bench's.
    pub fn adopt_slots(&mut self) {
        self.slots.owned = self.slots.mem.occupied();
    }

    /// Slots that hold a pair now (the rest of the pairs are counted in
    /// `SCORE_FLOWS`).
    pub fn slotted_pairs(&self) -> usize {
        self.slots.owned.len()
    }

    fn read_flows(
        &self,
        buffers: &mut BatchBuffers,
        out: &mut Vec<(Pair, Totals)>,
    ) -> Result<(), DatapathError> {
        out.clear();
        let data = self
            .bpf
            .map(FLOWS_MAP)
            .ok_or(DatapathError::Map(FLOWS_MAP))?;
        if let (aya::maps::Map::PerCpuHashMap(md), Ok(cpus)) = (data, aya::util::nr_cpus()) {
            if batch_read(md.fd().as_fd(), cpus, buffers, out).is_ok() {
                return Ok(());
            }
            out.clear();
        }
        *out = self.snapshot_per_pair()?;
        Ok(())
    }

    /// [`Datapath::snapshot`] the slow way: two syscalls per pair. The
    /// fallback, and the baseline of the drain benchmark.
    pub fn snapshot_per_pair(&self) -> Result<Vec<(Pair, Totals)>, DatapathError> {
        let data = self
            .bpf
            .map(FLOWS_MAP)
            .ok_or(DatapathError::Map(FLOWS_MAP))?;
        let map: PerCpuHashMap<&MapData, PairKey, PairCounters> = PerCpuHashMap::try_from(data)?;
        let mut out = Vec::new();
        for item in map.iter() {
            // An entry deleted between get_next_key and lookup is skipped.
            let Ok((key, values)) = item else { continue };
            out.push((pair_of(&key), Totals::sum(values.iter())));
        }
        Ok(out)
    }

    /// Forgets pairs evicted as idle: frees their slots (exactly, see
    /// [`Slots`]) and deletes their `SCORE_FLOWS` entries.
    pub fn remove_pairs(&mut self, pairs: &[Pair]) -> Result<usize, DatapathError> {
        use std::sync::atomic::Ordering::Release;
        let mut freed = Vec::new();
        for pair in pairs {
            let key = key_of(pair);
            self.slots.carry.remove(&key);
            if let Some(idx) = self.slots.find(&key) {
                self.slots.mem.word(idx, 0, 0).store(0, Release);
                freed.push((key, idx));
            }
        }
        if !freed.is_empty() {
            wait_for_running_programs().map_err(DatapathError::Slots)?;
            freed.sort_unstable_by_key(|&(_, idx)| idx);
            let owned = std::mem::take(&mut self.slots.owned);
            let mut gone = freed.iter().peekable();
            for o in owned {
                while gone.next_if(|&&(_, idx)| idx < o.idx).is_some() {}
                let Some(&(key, _)) = gone.next_if(|&&(_, idx)| idx == o.idx) else {
                    self.slots.owned.push(o);
                    continue;
                };
                let mem = &self.slots.mem;
                let t = mem.totals(o.idx);
                if t.packets > o.packets {
                    self.slots.carry.insert(
                        key,
                        Totals {
                            bytes: t.bytes - o.bytes,
                            packets: t.packets - o.packets,
                            first_seen_ns: 0,
                            last_seen_ns: 0,
                        },
                    );
                }
                mem.clear(o.idx);
            }
        }
        let mut map: PerCpuHashMap<&mut MapData, PairKey, PairCounters> = PerCpuHashMap::try_from(
            self.bpf
                .map_mut(FLOWS_MAP)
                .ok_or(DatapathError::Map(FLOWS_MAP))?,
        )?;
        let mut n = freed.len();
        let slotted: std::collections::HashSet<PairKey> = freed.iter().map(|&(k, _)| k).collect();
        for pair in pairs {
            let key = key_of(pair);
            // A slotted pair's frames since its key was cleared are in a
            // new entry: a new life of the pair, not to be deleted.
            if slotted.contains(&key) {
                continue;
            }
            if map.remove(&key).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// The datapath's own counters, summed over CPUs.
    pub fn stats(&self) -> Result<DatapathStats, DatapathError> {
        Ok(stats_of(&self.stat_sums()?))
    }

    /// Every slot of `SCORE_STATS`, summed over CPUs (0 where a pinned
    /// map of an earlier agent is shorter).
    fn stat_sums(&self) -> Result<[u64; score_common::STATS_LEN as usize], DatapathError> {
        let data = self
            .bpf
            .map(STATS_MAP)
            .ok_or(DatapathError::Map(STATS_MAP))?;
        // One batched syscall for every slot (six otherwise).
        let mut sums = [0u64; score_common::STATS_LEN as usize];
        let batched = match (data, aya::util::nr_cpus()) {
            (aya::maps::Map::PerCpuArray(md), Ok(cpus)) => {
                let (mut keys, mut values) = (Vec::<u32>::new(), Vec::<u64>::new());
                // Room for one more than the array holds: the kernel
                // then ends the walk (ENOENT) in the same syscall.
                batch_lookup(
                    md.fd().as_fd(),
                    cpus,
                    score_common::STATS_LEN as usize + 1,
                    &mut keys,
                    &mut values,
                    |k, v| {
                        if let Some(s) = sums.get_mut(*k as usize) {
                            *s = v.iter().sum();
                        }
                    },
                )
                .is_ok()
            }
            _ => false,
        };
        if !batched {
            let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(data)?;
            let len = map.len() as usize;
            for (i, s) in sums.iter_mut().enumerate().take(len) {
                *s = map.get(&(i as u32), 0)?.iter().sum();
            }
        }
        Ok(sums)
    }

    /// `ip`'s cell of the hosted-VM filter (score-common's
    /// `HOSTED_FILTER_MAP`): how many hosted VMs' addresses fall in it, or
    /// more while a classifier is learning one.
    pub fn hosted_filter_cell(&self, ip: Ipv4Addr) -> u64 {
        self.filter
            .cell(u32::from(ip).to_be())
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Hosted VMs seen sending: address, MAC and the interface behind them.
    pub fn vm_macs(&self) -> Result<Vec<(Ipv4Addr, VmMac)>, DatapathError> {
        let data = self
            .bpf
            .map(VM_MACS_MAP)
            .ok_or(DatapathError::Map(VM_MACS_MAP))?;
        let mut out = Vec::new();
        if let aya::maps::Map::HashMap(md) = data {
            let (mut keys, mut values) = (Vec::<u32>::new(), Vec::<VmMac>::new());
            // One syscall for up to 4,096 VMs (two per VM otherwise).
            let read = batch_lookup(md.fd().as_fd(), 1, 4096, &mut keys, &mut values, |k, v| {
                out.push((Ipv4Addr::from(u32::from_be(*k)), v[0]));
            });
            if read.is_ok() {
                return Ok(out);
            }
            out.clear();
        }
        let map: BpfHashMap<&MapData, u32, VmMac> = BpfHashMap::try_from(data)?;
        Ok(map
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (Ipv4Addr::from(u32::from_be(k)), v))
            .collect())
    }

    /// The VMs behind the attached interfaces, as seen sending: address,
    /// MAC and vif name. A VM that has sent nothing yet is not listed.
    pub fn hosted_vms(&self) -> Result<Vec<HostedVm>, DatapathError> {
        Ok(self.hosted_vms_of(&self.vm_macs()?))
    }

    /// [`Datapath::hosted_vms`] from a read of [`Datapath::vm_macs`]
    /// already made: a drain derives both of its views of the hosted VMs
    /// (the metrics' and the peer protocol's) from one read.
    pub fn hosted_vms_of(&self, macs: &[(Ipv4Addr, VmMac)]) -> Vec<HostedVm> {
        hosted_behind(macs, |ifindex| {
            self.attached
                .iter()
                .find(|(_, a)| a.ifindex == ifindex)
                .map(|(name, _)| name.as_str())
        })
    }

    /// [`Datapath::hosted_vms`] as a drain needs them, called after the
    /// pairs are read (so that every VM whose frames were counted is known):
    /// reads the VM table only if a classifier wrote into it
    /// (`Stat::VmsLearnt` moved) or this agent deleted from it since the
    /// last read, and otherwise costs one lookup of that count. A classifier
    /// counts a frame after learning its sender, so a VM whose frames the
    /// pairs hold has moved the count before they were read.
    pub fn drain_hosted_vms(&mut self) -> Result<Vec<HostedVm>, DatapathError> {
        let learnt = if self.vms.counted {
            Some(self.learnt_count()?)
        } else {
            None
        };
        if learnt.is_none() || learnt != self.vms.learnt {
            // The count before the table: a write after the count was read
            // moves it past what is kept, and the next drain reads again.
            self.vms.macs = self.vm_macs()?;
            self.vms.learnt = learnt;
            self.vms.reads += 1;
        }
        Ok(self.hosted_vms_of(&self.vms.macs))
    }

    /// How many times [`Datapath::drain_hosted_vms`] read the VM table:
    /// the drains less those that skipped it.
    pub fn vm_table_reads(&self) -> u64 {
        self.vms.reads
    }

    /// `Stat::VmsLearnt`, summed over CPUs: one lookup of one slot.
    fn learnt_count(&self) -> Result<u64, DatapathError> {
        let data = self
            .bpf
            .map(STATS_MAP)
            .ok_or(DatapathError::Map(STATS_MAP))?;
        let map: PerCpuArray<&MapData, u64> = PerCpuArray::try_from(data)?;
        Ok(map.get(&(Stat::VmsLearnt as u32), 0)?.iter().sum())
    }

    /// Number of attached interfaces: each is one VM's vif.
    pub fn attached_count(&self) -> usize {
        self.attached.len()
    }

    fn drop_vm_macs_on(&mut self, ifindex: u32) -> Result<(), DatapathError> {
        // Whatever is deleted below, the table read last may name it.
        self.vms.learnt = None;
        let gone: Vec<u32> = self
            .vm_macs()?
            .into_iter()
            .filter(|(_, m)| m.ifindex == ifindex)
            .map(|(ip, _)| u32::from(ip).to_be())
            .collect();
        let mut map: BpfHashMap<&mut MapData, u32, VmMac> = BpfHashMap::try_from(
            self.bpf
                .map_mut(VM_MACS_MAP)
                .ok_or(DatapathError::Map(VM_MACS_MAP))?,
        )?;
        for k in gone {
            // Taken off the filter only once gone from the table, so that a
            // cell never counts fewer addresses than the table holds.
            if map.remove(&k).is_ok() {
                self.filter
                    .cell(k)
                    .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            }
        }
        // Then the vif's slot of remembered senders, so that a sender seen
        // on this ifindex again is learnt again (the classifier skips MAC
        // learning for the sender its slot names).
        let mut seen: aya::maps::Array<&mut MapData, VifSeen> = aya::maps::Array::try_from(
            self.bpf
                .map_mut(VIF_SEEN_MAP)
                .ok_or(DatapathError::Map(VIF_SEEN_MAP))?,
        )?;
        let slot = ifindex % VIF_SEEN_SLOTS;
        if seen.get(&slot, 0)?.ifindex == ifindex {
            seen.set(slot, VifSeen::default(), 0)?;
        }
        Ok(())
    }

    /// Writes pairs straight into the flow map, as if the classifiers had
    /// counted them (benchmarks pre-fill the map this way). Each pair gets
    /// `counters` on CPU 0 and zeros elsewhere.
    pub fn insert_pairs(
        &mut self,
        pairs: impl IntoIterator<Item = Pair>,
        counters: PairCounters,
    ) -> Result<usize, DatapathError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| DatapathError::PerCpu(e.to_string()))?;
        let mut map: PerCpuHashMap<&mut MapData, PairKey, PairCounters> = PerCpuHashMap::try_from(
            self.bpf
                .map_mut(FLOWS_MAP)
                .ok_or(DatapathError::Map(FLOWS_MAP))?,
        )?;
        let mut values = vec![PairCounters::default(); cpus];
        values[0] = counters;
        // Not counted as the classifiers' inserts are: the next drain walks.
        self.walk.left = true;
        let mut n = 0;
        for (src, dst) in pairs {
            let key = PairKey {
                src: u32::from(src).to_be(),
                dst: u32::from(dst).to_be(),
            };
            let per_cpu = aya::maps::PerCpuValues::try_from(values.clone())
                .map_err(|e| DatapathError::PerCpu(e.to_string()))?;
            map.insert(key, per_cpu, 0)?;
            n += 1;
        }
        Ok(n)
    }

    /// The loaded program of one classifier, for BPF_PROG_TEST_RUN benches.
    pub fn program_mut(&mut self, name: &str) -> Result<&mut SchedClassifier, DatapathError> {
        classifier(&mut self.bpf, name)
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        self.detach_all();
    }
}

fn classifier<'a>(bpf: &'a mut Ebpf, name: &str) -> Result<&'a mut SchedClassifier, DatapathError> {
    bpf.program_mut(name)
        .and_then(|p| p.try_into().ok())
        .ok_or_else(|| DatapathError::Program {
            name: name.into(),
            source: aya::programs::ProgramError::UnexpectedProgramType,
        })
}

/// Hands every pair's counters to `each` in `order`: the slotted pairs
/// (`owned`, sorted by slot, read through the mapping and remembered
/// there), the pairs of `fresh` (read from `SCORE_FLOWS`; sorted here) and
/// the residuals of freed slots (`carry`), merged, with the counts of one
/// pair found in more than one of them summed. A slot's group (its
/// `SLOT_WAYS` adjacent candidates) is the order's first key, so the slots
/// are read in memory order and only those of one group need sorting.
fn emit_pairs(
    mem: &SlotMem,
    order: PairOrder,
    owned: &mut [Owned],
    fresh: &mut [(Pair, Totals)],
    carry: &HashMap<PairKey, Totals>,
    mut each: impl FnMut(Pair, Totals),
) {
    fresh.sort_unstable_by_key(|(p, _)| order.of(p));
    let mut carried: Vec<(u128, Pair, Totals)> = carry
        .iter()
        .map(|(k, t)| (order.of_key(k), pair_of(k), *t))
        .collect();
    carried.sort_unstable_by_key(|c| c.0);
    let mut others = Others {
        fresh: fresh.iter().map(|(p, t)| (order.of(p), *p, *t)).peekable(),
        carry: carried.into_iter().peekable(),
    };
    // The slots are prefetched (see `SlotMem::prefetch`) in bursts: when
    // fewer than PREFETCH_BURST prefetched slots are left ahead, the next
    // ones up to twice that are asked for, back to back. Each slot of a
    // sparse array is on a page of its own more often than not, and a
    // prefetch waits for its page's translation, so the misses of a burst
    // overlap where prefetches spread between the reads (eight slots
    // ahead, one at a time) waited for one page walk after another
    // (docs/BENCHMARKS.md, "Prefetch in bursts, top pairs made when scraped").
    let mut prefetched = 0;
    let mut i = 0;
    while i < owned.len() {
        if prefetched < i + PREFETCH_BURST {
            let to = (i + 2 * PREFETCH_BURST).min(owned.len());
            for o in &owned[prefetched.max(i)..to] {
                mem.prefetch(o.idx);
            }
            prefetched = to;
        }
        let group = owned[i].idx / SLOT_WAYS;
        let n = owned[i..]
            .iter()
            .take(SLOT_WAYS as usize)
            .take_while(|o| o.idx / SLOT_WAYS == group)
            .count();
        let mut read = [(0u128, key_of_word(0), Totals::default()); SLOT_WAYS as usize];
        for (k, o) in owned[i..i + n].iter_mut().enumerate() {
            let key = key_of_word(mem.key(o.idx));
            let t = mem.totals(o.idx);
            (o.bytes, o.packets) = (t.bytes, t.packets);
            read[k] = (order.of_key(&key), key, t);
        }
        read[..n].sort_unstable_by_key(|r| r.0);
        for &(at, key, mut t) in &read[..n] {
            others.before(at, &mut each);
            others.fold_into(at, &mut t);
            each(pair_of(&key), t);
        }
        i += n;
    }
    // Every order is below u128::MAX: a group is at most 31 bits.
    others.before(u128::MAX, &mut each);
}

/// The pairs of a drain that are not in slots, in order, with their
/// orders: those read from `SCORE_FLOWS` and the residuals of freed slots.
struct Others<F, C>
where
    F: Iterator<Item = (u128, Pair, Totals)>,
    C: Iterator<Item = (u128, Pair, Totals)>,
{
    fresh: std::iter::Peekable<F>,
    carry: std::iter::Peekable<C>,
}

impl<F, C> Others<F, C>
where
    F: Iterator<Item = (u128, Pair, Totals)>,
    C: Iterator<Item = (u128, Pair, Totals)>,
{
    /// Hands on every pair that sorts before `bound`, one pair's counts
    /// from both sources summed.
    fn before(&mut self, bound: u128, each: &mut impl FnMut(Pair, Totals)) {
        loop {
            let f = self.fresh.peek().map(|x| x.0).filter(|&o| o < bound);
            let c = self.carry.peek().map(|x| x.0).filter(|&o| o < bound);
            let at = match (f, c) {
                (None, None) => return,
                (Some(a), Some(b)) => a.min(b),
                (Some(a), None) | (None, Some(a)) => a,
            };
            let mut t = Totals::default();
            let mut pair = None;
            while let Some((_, p, x)) = self.fresh.next_if(|x| x.0 == at) {
                add_totals(&mut t, &x);
                pair = Some(p);
            }
            while let Some((_, p, x)) = self.carry.next_if(|x| x.0 == at) {
                add_totals(&mut t, &x);
                pair = Some(p);
            }
            if let Some(p) = pair {
                each(p, t);
            }
        }
    }

    /// Adds the counts of the pair at `at` in either source to `t`.
    fn fold_into(&mut self, at: u128, t: &mut Totals) {
        while let Some((_, _, x)) = self.fresh.next_if(|x| x.0 == at) {
            add_totals(t, &x);
        }
        while let Some((_, _, x)) = self.carry.next_if(|x| x.0 == at) {
            add_totals(t, &x);
        }
    }
}

/// One pair's counts from two places, as one.
fn add_totals(t: &mut Totals, x: &Totals) {
    t.bytes += x.bytes;
    t.packets += x.packets;
    if x.first_seen_ns != 0 && (t.first_seen_ns == 0 || x.first_seen_ns < t.first_seen_ns) {
        t.first_seen_ns = x.first_seen_ns;
    }
    t.last_seen_ns = t.last_seen_ns.max(x.last_seen_ns);
}

/// Every entry of the per-CPU flow map, 4,096 per syscall, appended to
/// `out`. Fails (and the caller falls back) on kernels without batch
/// support or when a hash bucket holds more entries than fit the buffer
/// (ENOSPC).
fn batch_read(
    fd: std::os::fd::BorrowedFd<'_>,
    cpus: usize,
    buffers: &mut BatchBuffers,
    out: &mut Vec<(Pair, Totals)>,
) -> std::io::Result<()> {
    let BatchBuffers { keys, values } = buffers;
    batch_lookup(fd, cpus, 4096, keys, values, |k, v| {
        out.push((pair_of(k), Totals::sum(v)));
    })
}

/// Every entry of a map, `chunk` entries per `BPF_MAP_LOOKUP_BATCH`
/// syscall (aya 0.14 has no batch API, so this is the raw syscall), handed
/// to `each` with its `per_key` values (the CPU count for per-CPU maps, 1
/// otherwise). `keys` and `values` are the buffers, grown as needed and
/// kept by the caller. `K` and `V` must be the map's key and value types,
/// and for per-CPU maps `V` a multiple of 8 bytes (the kernel's stride).
fn batch_lookup<K: Copy + Default, V: Copy + Default>(
    fd: std::os::fd::BorrowedFd<'_>,
    per_key: usize,
    chunk: usize,
    keys: &mut Vec<K>,
    values: &mut Vec<V>,
    mut each: impl FnMut(&K, &[V]),
) -> std::io::Result<()> {
    use aya_obj::generated::{bpf_attr, bpf_cmd};
    use std::os::fd::AsRawFd;
    keys.resize(chunk, K::default());
    values.resize(chunk * per_key, V::default());
    // For hash maps and arrays alike the batch cursor is a u32.
    let (mut cursor_in, mut cursor_out) = (0u32, 0u32);
    let mut started = false;
    loop {
        // The kernel's own `union bpf_attr` (aya-obj's bindings): all
        // zero, then the batch command's fields.
        // SAFETY: bpf_attr is a union of plain integer structs; all-zero
        // bytes are a valid value of each.
        let mut attr: bpf_attr = unsafe { std::mem::zeroed() };
        // The union's `batch` member, the one BPF_MAP_LOOKUP_BATCH reads.
        attr.batch.in_batch = if started {
            (&raw const cursor_in) as u64
        } else {
            0
        };
        attr.batch.out_batch = (&raw mut cursor_out) as u64;
        attr.batch.keys = keys.as_mut_ptr() as u64;
        attr.batch.values = values.as_mut_ptr() as u64;
        attr.batch.count = chunk as u32;
        attr.batch.map_fd = fd.as_raw_fd() as u32;
        // SAFETY: attr points at buffers of `chunk` keys and `chunk` x
        // `per_key` values, and at two u32 cursors, all alive across the
        // call; the kernel writes at most `count` entries.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                bpf_cmd::BPF_MAP_LOOKUP_BATCH as libc::c_long,
                &raw mut attr,
                std::mem::size_of::<bpf_attr>(),
            )
        };
        let err = (rc < 0).then(std::io::Error::last_os_error);
        if let Some(e) = &err
            && e.raw_os_error() != Some(libc::ENOENT)
        {
            return Err(std::io::Error::new(e.kind(), e.to_string()));
        }
        // SAFETY: the kernel wrote the count back into the same member.
        let n = (unsafe { attr.batch.count } as usize).min(chunk);
        for (k, v) in keys[..n].iter().zip(values.chunks_exact(per_key.max(1))) {
            each(k, v);
        }
        if err.is_some() {
            // ENOENT: that was the last batch.
            return Ok(());
        }
        cursor_in = cursor_out;
        started = true;
    }
}

/// The statistics in `SCORE_STATS`' slots, summed over CPUs.
fn stats_of(sums: &[u64; score_common::STATS_LEN as usize]) -> DatapathStats {
    let get = |s: Stat| sums[s as usize];
    DatapathStats {
        flows_map_full: get(Stat::FlowsMapFull),
        macs_map_full: get(Stat::MacsMapFull),
        not_ipv4: get(Stat::NotIpv4),
        not_unicast: get(Stat::NotUnicast),
        control_intercepted: get(Stat::ControlIntercepted),
        control_ring_full: get(Stat::ControlRingFull),
    }
}

/// Slots [`emit_pairs`] prefetches at a time (see there): 16 to 32 read a
/// sparse array's slots fastest on the machine of docs/BENCHMARKS.md;
/// fewer waited for page walks one after another, more did not help.
const PREFETCH_BURST: usize = 16;

/// Pairs one drain moves into slots at most: each costs a read and a
/// delete of its hash-map entry (two syscalls), so a drain that finds a
/// million new pairs (an agent adopting a full pinned map) spends a
/// bounded time, about 16,384 x 2 syscalls, and the rest follow.
const MOVES_PER_DRAIN: usize = 16_384;

/// Slots of `SCORE_SLOTS` for a flow map of `flows_max` pairs: the next
/// power of two (the classifiers mask the hash), at least one group of
/// candidates (`SLOT_WAYS`).
pub fn slot_count(flows_max: u32) -> u32 {
    flows_max
        .max(SLOT_WAYS)
        .checked_next_power_of_two()
        .unwrap_or(1 << 31)
}

/// The VMs of `macs` behind an interface `vif_of` names, by address.
fn hosted_behind<'a>(
    macs: &[(Ipv4Addr, VmMac)],
    vif_of: impl Fn(u32) -> Option<&'a str>,
) -> Vec<HostedVm> {
    let mut out: Vec<HostedVm> = macs
        .iter()
        .filter_map(|&(ip, m)| {
            Some(HostedVm {
                ip,
                mac: m.mac,
                vif: vif_of(m.ifindex)?.to_owned(),
            })
        })
        .collect();
    out.sort_by_key(|v| v.ip);
    out
}

fn pair_of(key: &PairKey) -> Pair {
    (
        Ipv4Addr::from(u32::from_be(key.src)),
        Ipv4Addr::from(u32::from_be(key.dst)),
    )
}

/// Makes sure `dir` lives on a bpffs, mounting one at /sys/fs/bpf if the
/// system has none there yet, and creates the directory.
fn prepare_bpffs(dir: &Path) -> Result<(), DatapathError> {
    let fail = |reason: String| DatapathError::Bpffs {
        path: dir.to_owned(),
        reason,
    };
    // The word's width varies by architecture (rustix's FsWord).
    const BPF_FS_MAGIC: rustix::fs::FsWord = 0xcafe4a11;
    let is_bpffs =
        |p: &Path| -> bool { rustix::fs::statfs(p).is_ok_and(|st| st.f_type == BPF_FS_MAGIC) };
    let root = Path::new("/sys/fs/bpf");
    if dir.starts_with(root) && !is_bpffs(root) {
        std::fs::create_dir_all(root).map_err(|e| fail(e.to_string()))?;
        let status = std::process::Command::new("mount")
            .args(["-t", "bpf", "bpf", "/sys/fs/bpf"])
            .status()
            .map_err(|e| fail(format!("running mount: {e}")))?;
        if !status.success() {
            return Err(fail(format!("mount -t bpf failed: {status}")));
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    if !is_bpffs(dir) {
        return Err(fail("not on a bpf filesystem".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slot array in anonymous memory, laid out as the kernel's.
    fn anonymous(slots: u32, cells: u32) -> SlotMem {
        SlotMem {
            mem: Mapping::anonymous((slots * cells) as usize * std::mem::size_of::<SlotCell>()),
            slots,
            cells,
        }
    }

    #[test]
    fn the_filter_is_raised_to_the_tables_count_and_never_lowered() {
        let filter = HostedFilter {
            mem: Mapping::anonymous(HOSTED_FILTER_CELLS as usize * 8),
        };
        let ip = |s: &str| s.parse::<Ipv4Addr>().unwrap();
        let be = |s: &str| u32::from(ip(s)).to_be();
        let (a, b) = ("10.0.0.1", "10.0.0.2");
        // Another address of a's cell, and one of a cell of its own.
        let a2 = (3..=u32::from(u16::MAX))
            .map(|i| Ipv4Addr::from(0x0a00_0000 + i).to_string())
            .find(|x| hosted_cell(be(x)) == hosted_cell(be(a)))
            .unwrap();
        assert_ne!(hosted_cell(be(a)), hosted_cell(be(b)));
        let mac = VmMac::default();
        let load = |x: &str| {
            filter
                .cell(be(x))
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        filter.cover(&[(ip(a), mac), (ip(&a2), mac), (ip(b), mac)]);
        assert_eq!((load(a), load(b)), (2, 1));
        // A cell above the table's count (a classifier adding, or an
        // address deleted while no agent ran) stays as it is.
        filter
            .cell(be(b))
            .fetch_add(4, std::sync::atomic::Ordering::Relaxed);
        filter.cover(&[(ip(a), mac), (ip(b), mac)]);
        assert_eq!((load(a), load(b)), (2, 5));
    }

    fn pair(i: u32) -> Pair {
        (
            Ipv4Addr::from(0xc612_0000 + i % 7),
            Ipv4Addr::from(0xc613_0000 + i),
        )
    }

    fn totals(bytes: u64) -> Totals {
        Totals {
            bytes,
            packets: bytes / 10,
            first_seen_ns: 5,
            last_seen_ns: 5,
        }
    }

    /// The hosted VMs a drain publishes (to the metrics and the facts
    /// alike) are the VM table's entries behind an attached interface, by
    /// address: an entry for a vif not attached (pinned by an earlier run)
    /// is left out, and each VM keeps its own MAC and vif.
    #[test]
    fn hosted_vms_are_the_entries_behind_attached_vifs_by_address() {
        let vm = |last: u8, mac: u8, ifindex: u32| {
            (
                Ipv4Addr::new(198, 18, 0, last),
                VmMac {
                    mac: [2, 0, 0, 0, 0, mac],
                    _pad: [0; 2],
                    ifindex,
                },
            )
        };
        let macs = [vm(9, 1, 7), vm(3, 2, 8), vm(5, 3, 99), vm(4, 4, 7)];
        let vifs = |ifindex: u32| match ifindex {
            7 => Some("vif7.0"),
            8 => Some("vif8.0"),
            _ => None,
        };
        let got = hosted_behind(&macs, vifs);
        let want = |last: u8, mac: u8, vif: &str| HostedVm {
            ip: Ipv4Addr::new(198, 18, 0, last),
            mac: [2, 0, 0, 0, 0, mac],
            vif: vif.into(),
        };
        assert_eq!(
            got,
            vec![
                want(3, 2, "vif8.0"),
                want(4, 4, "vif7.0"),
                want(9, 1, "vif7.0")
            ]
        );
    }

    /// Slotted pairs, pairs from the hash map and residuals of freed
    /// slots come out once each, in the flow table's order, with one
    /// pair's counts from several places summed.
    #[test]
    fn a_drain_hands_every_pair_over_once_in_order() {
        use std::sync::atomic::Ordering::Relaxed;
        let (slots, cells) = (64u32, 4u32);
        let mem = anonymous(slots, cells);
        let mask = slots - 1;
        let order = PairOrder::new(mask);
        let mut owned = Vec::new();
        let mut fresh = Vec::new();
        let mut want: HashMap<Pair, Totals> = HashMap::new();
        for i in 0..60u32 {
            let p = pair(i);
            let key = key_of(&p);
            let first = slot_index(&key, mask);
            let free = (0..SLOT_WAYS)
                .map(|j| slot_candidate(first, j))
                .find(|&j| mem.key(j) == 0);
            let t = totals(u64::from(i + 1) * 100);
            match free {
                Some(idx) if i % 4 != 0 => {
                    mem.word(idx, 0, 1).store(5, Relaxed);
                    mem.word(idx, 0, 0).store(key.word(), Relaxed);
                    // Split between the agent's cell and two CPUs'.
                    for (cell, share) in [(1, 50), (2, 30), (3, 20)] {
                        mem.word(idx, cell, 0).store(t.bytes * share / 100, Relaxed);
                        mem.word(idx, cell, 1)
                            .store(t.packets * share / 100, Relaxed);
                    }
                    owned.push(Owned {
                        idx,
                        bytes: 0,
                        packets: 0,
                    });
                    want.insert(p, t);
                }
                _ => {
                    fresh.push((p, t));
                    want.insert(p, t);
                }
            }
        }
        owned.sort_unstable_by_key(|o| o.idx);
        // Residuals: one of a slotted pair, one of a pair in the hash map,
        // one of a pair counted nowhere else.
        let slotted = key_of_word(mem.key(owned[3].idx));
        let mut carry = HashMap::new();
        for (p, extra) in [(pair_of(&slotted), 7), (fresh[2].0, 9), (pair(99), 11)] {
            let r = Totals {
                bytes: extra,
                packets: 1,
                ..Totals::default()
            };
            carry.insert(key_of(&p), r);
            let w = want.entry(p).or_default();
            w.bytes += extra;
            w.packets += 1;
        }
        fresh.reverse();
        let mut got = Vec::new();
        emit_pairs(&mem, order, &mut owned, &mut fresh, &carry, |p, t| {
            got.push((p, t))
        });
        assert!(
            got.windows(2)
                .all(|w| order.of(&w[0].0) < order.of(&w[1].0)),
            "{got:?}"
        );
        assert_eq!(got.len(), want.len());
        for (p, t) in &got {
            assert_eq!(
                (t.bytes, t.packets),
                (want[p].bytes, want[p].packets),
                "{p:?}"
            );
        }
        // The slots' readings are remembered for a later eviction.
        for o in &owned {
            assert_eq!(o.bytes, mem.totals(o.idx).bytes);
        }
    }
}
