//! The message bodies: one [`Message`] variant per kind, each with a fixed
//! big-endian layout (see `docs/WIRE.md`). [`Message::parse`] is the second
//! decoding step, after [`Frame::check`](super::Frame::check): it checks
//! every field and that the body has no bytes left over.

use std::net::Ipv4Addr;

use bytes::{BufMut, Bytes, BytesMut};

use super::auth::ClusterKey;
use super::chunk::{ChunkBitmap, MAX_CHUNKS, chunk_count, chunk_data_len};
use super::frame::{self, Header, MAX_PAYLOAD};
use super::{Kind, WireError};
use crate::token::VmId;

/// Size of a flow report's or token order's fixed fields (id, part, parts,
/// entry count).
const LIST_HEADER_LEN: usize = 8 + 2 + 2 + 2;

/// Bytes per flow entry: VM, peer, rate.
const FLOW_ENTRY_LEN: usize = 4 + 4 + 8;

/// Most flow entries in one [`FlowReport`] datagram (74).
pub const MAX_FLOW_ENTRIES: usize = (MAX_PAYLOAD - LIST_HEADER_LEN) / FLOW_ENTRY_LEN;

/// Most VM IDs in one [`TokenOrder`] datagram (296).
pub const MAX_ORDER_VMS: usize = (MAX_PAYLOAD - LIST_HEADER_LEN) / 4;

/// Most VM IDs in one [`Message::Members`] datagram (a count, then IDs).
pub const MAX_MEMBER_VMS: usize = (MAX_PAYLOAD - 2) / 4;

/// Most VMs in one [`Message::GroupReserve`] or [`Message::GroupRelease`]:
/// score-core's `group::GroupLimits` default (a group move's members).
pub const MAX_GROUP_VMS: usize = 32;

/// One chunk of an encoded token (see [`token_chunks`](super::token_chunks)).
/// Every chunk but the last carries exactly
/// [`CHUNK_DATA_LEN`](super::CHUNK_DATA_LEN) bytes, so index, count and
/// length check each other.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenChunk {
    /// Identifies the transfer, unique per sender (e.g. a counter).
    pub transfer: u64,
    /// Position of this chunk, `0..count`.
    pub index: u16,
    /// Number of chunks of the transfer, `1..=MAX_CHUNKS`.
    pub count: u16,
    /// Length of the whole encoded token.
    pub total_len: u32,
    /// This chunk's bytes of the encoded token.
    pub data: Bytes,
}

impl TokenChunk {
    /// Checks index, count, total length and data length against each other.
    pub fn validate(&self) -> Result<(), WireError> {
        let bad = |field| {
            Err(WireError::InvalidField {
                kind: Kind::TokenChunk,
                field,
            })
        };
        let Some(count) = chunk_count(self.total_len) else {
            return bad("total_len");
        };
        if self.count != count {
            return bad("count");
        }
        if self.index >= self.count {
            return bad("index");
        }
        if self.data.len() != chunk_data_len(self.total_len, self.index) {
            return bad("data length");
        }
        Ok(())
    }
}

/// Acknowledges the chunks of a token transfer received so far; a full
/// bitmap acknowledges the hop. The sender retransmits the missing ones.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HopAck {
    /// The transfer acknowledged.
    pub transfer: u64,
    /// Which of its chunks have arrived.
    pub received: ChunkBitmap,
}

/// One measured flow of a VM hosted by the reporting host.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FlowEntry {
    /// The hosted VM.
    pub vm: VmId,
    /// The VM it exchanges traffic with.
    pub peer: VmId,
    /// λ(vm, peer): both directions summed, bytes per second; finite, >= 0.
    pub rate: f64,
}

/// A host's measured flows, sent to the global policy's coordinator. A
/// host's report for one window is split into `parts` datagrams; each part
/// is self-contained, so the coordinator merges the parts it has.
#[derive(Clone, Debug, PartialEq)]
pub struct FlowReport {
    /// Identifies the report (e.g. the measurement window), per sender.
    pub report: u64,
    /// Index of this part, `0..parts`.
    pub part: u16,
    /// Number of parts of the report, at least 1.
    pub parts: u16,
    /// At most [`MAX_FLOW_ENTRIES`] flows.
    pub entries: Vec<FlowEntry>,
}

impl FlowReport {
    /// Splits a host's flows into as few parts as fit in datagrams. An
    /// empty list gives one empty part, so the coordinator learns the host
    /// has nothing to report. `None` if it would take more than 65535 parts.
    pub fn split(report: u64, entries: &[FlowEntry]) -> Option<Vec<FlowReport>> {
        split_list(entries, MAX_FLOW_ENTRIES, |part, parts, chunk| FlowReport {
            report,
            part,
            parts,
            entries: chunk.to_vec(),
        })
    }
}

/// The global policy's token order, sent by the coordinator: the VMs in the
/// order the token should visit them, split into parts like a flow report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenOrder {
    /// Identifies the order (e.g. the coordinator's round).
    pub order: u64,
    /// Index of this part, `0..parts`; parts concatenate in index order.
    pub part: u16,
    /// Number of parts, at least 1.
    pub parts: u16,
    /// At most [`MAX_ORDER_VMS`] VM IDs.
    pub vms: Vec<VmId>,
}

impl TokenOrder {
    /// Splits an order into as few parts as fit in datagrams; `None` if it
    /// would take more than 65535 parts.
    pub fn split(order: u64, vms: &[VmId]) -> Option<Vec<TokenOrder>> {
        split_list(vms, MAX_ORDER_VMS, |part, parts, chunk| TokenOrder {
            order,
            part,
            parts,
            vms: chunk.to_vec(),
        })
    }
}

/// Fixed fields of a [`SwapProposal`] before its peer list.
const SWAP_PROPOSE_FIXED_LEN: usize = 4 + 4 + 4 + 8 + 8 + 8 + 8 + 8 + 1 + 2;

/// Bytes per peer of a [`SwapProposal`]: VM, rate.
const SWAP_PEER_LEN: usize = 4 + 8;

/// Most peers a [`SwapProposal`] carries (95).
pub const MAX_SWAP_PEERS: usize = (MAX_PAYLOAD - SWAP_PROPOSE_FIXED_LEN) / SWAP_PEER_LEN;

/// "Take my VM `vm`, and send me one of yours in exchange" (docs/EVALUATION.md, "Beyond the paper"): what
/// the holder of the token for `vm` sends a full candidate host. It
/// carries what the asked host needs to evaluate the swap with only its
/// own measurements (score-core's `swap::SwapRequest`, with addresses).
#[derive(Clone, Debug, PartialEq)]
pub struct SwapProposal {
    /// The proposing VM u.
    pub vm: VmId,
    /// u's host x (where the partner would go); the sender.
    pub from: Ipv4Addr,
    /// The asked host y (where u would go).
    pub to: Ipv4Addr,
    /// u's benefit of moving to y alone (finite).
    pub gain: f64,
    /// C(u) now (finite, >= 0).
    pub cost_before: f64,
    /// u's share of the threshold, c_m for u (finite, >= 0).
    pub c_m: f64,
    /// u's memory, MiB.
    pub mem_mib: u64,
    /// Free memory on x now, MiB.
    pub from_free_mem_mib: u64,
    /// Whether x can hold one VM more than its slots for the time of the
    /// swap (its migration headroom), so the partner may move first.
    pub from_headroom: bool,
    /// u's peers on y with λ(u, w) as x measures it, at most
    /// [`MAX_SWAP_PEERS`], rates finite and >= 0.
    pub peers_on_target: Vec<(VmId, f64)>,
}

/// Fixed fields of a [`RotationProposal`]: round, c_m, free memory, legs.
const ROTATE_PROPOSE_FIXED_LEN: usize = 4 + 8 + 8 + 1;

/// Fixed fields of a [`RotationLeg`] before its peer list.
const ROTATION_LEG_FIXED_LEN: usize = 4 + 4 + 4 + 8 + 8 + 2;

/// Bytes per peer of a [`RotationLeg`]: VM, host, rate.
const ROTATION_PEER_LEN: usize = 4 + 4 + 8;

/// Most peers the (at most two) legs of a [`RotationProposal`] carry
/// together (69).
pub const MAX_ROTATION_PEERS: usize =
    (MAX_PAYLOAD - ROTATE_PROPOSE_FIXED_LEN - 2 * ROTATION_LEG_FIXED_LEN) / ROTATION_PEER_LEN;

/// One VM of a rotation being built, with what its host measured of it
/// (score-core's `cycle::Leg`, with addresses).
#[derive(Clone, Debug, PartialEq)]
pub struct RotationLeg {
    /// The VM.
    pub vm: VmId,
    /// Its host now.
    pub from: Ipv4Addr,
    /// Its host after the rotation.
    pub to: Ipv4Addr,
    /// Its cost now, C(vm) (finite, >= 0).
    pub cost_before: f64,
    /// Its memory, MiB.
    pub mem_mib: u64,
    /// Its peers with their hosts and λ as its host measures them (the
    /// largest rates, if they must be cut; finite, >= 0).
    pub peers: Vec<(VmId, Ipv4Addr, f64)>,
}

/// "Take my VM, and let the cycle close" (docs/PROTOCOL.md, "Rotations"):
/// from the holder of the token for u to a full candidate host y (one
/// leg, u: x → y), or from y to a full third host z (two legs, then w:
/// y → z), which would send one of its VMs to x. Answered with
/// [`Message::RotateAccept`] or [`Message::SwapRefuse`].
#[derive(Clone, Debug, PartialEq)]
pub struct RotationProposal {
    /// The holder's token round (each host prices its VM's share of c_m
    /// with it).
    pub round: u32,
    /// The legs' c_m so far (finite, >= 0).
    pub c_m: f64,
    /// Free memory on x now, MiB.
    pub home_free_mem_mib: u64,
    /// One or two legs, u's first.
    pub legs: Vec<RotationLeg>,
}

/// A closed rotation, from the host that closed it (z) to the host that
/// asked it (y), and from y to the holder: u x → y, w y → z, v z → x.
/// y and z have reserved w and v for it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RotationAcceptance {
    /// Sequence number of the proposal answered.
    pub in_reply_to: u64,
    /// u, w and v.
    pub vms: [VmId; 3],
    /// x, y and z: each VM's host now.
    pub hosts: [Ipv4Addr; 3],
    /// The drop of the equation 1 total with the three moves made
    /// (finite).
    pub benefit: f64,
    /// The threshold it exceeds, c_m(u) + c_m(w) + c_m(v) (finite, >= 0).
    pub c_m: f64,
}

/// Which of the two live migrations of a swap goes first: the one into
/// the host that has headroom for a VM more than its slots.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum SwapOrder {
    /// u moves x -> y first (y has the headroom), then w y -> x.
    ProposerFirst = 0,
    /// w moves y -> x first (x has the headroom), then u x -> y.
    PartnerFirst = 1,
}

impl SwapOrder {
    fn from_u8(b: u8) -> Option<Self> {
        match b {
            0 => Some(Self::ProposerFirst),
            1 => Some(Self::PartnerFirst),
            _ => None,
        }
    }
}

/// The asked host accepts: it gives `partner` (chosen from its own VMs
/// with its own measurements) and has reserved it for this swap.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SwapAcceptance {
    /// Sequence number of the proposal answered.
    pub in_reply_to: u64,
    /// The proposing VM u.
    pub vm: VmId,
    /// The partner w (on y, would go to x).
    pub partner: VmId,
    /// w's benefit of moving to x with u still there (finite).
    pub partner_gain: f64,
    /// C(w) now (finite, >= 0).
    pub partner_cost_before: f64,
    /// C(w) on x after the swap (finite, >= 0).
    pub partner_cost_after: f64,
    /// The swap's benefit: the drop of the equation 1 total (finite).
    pub benefit: f64,
    /// The threshold it exceeds, c_m(u) + c_m(w) (finite, >= 0).
    pub c_m: f64,
    /// w's communication level on x after the swap.
    pub partner_level_after: u8,
    /// Which migration goes first.
    pub order: SwapOrder,
}

/// The asked host accepts an ejection chain (docs/EVALUATION.md, "Beyond
/// the paper"): it gives `partner` (chosen from its own VMs with its own
/// measurements, score-core's `chain::choose_ejection`), sends it to
/// `partner_to` (the proposer's host: a swap; or a third host that had
/// room) and has reserved it for this chain.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EjectAcceptance {
    /// Sequence number of the proposal answered.
    pub in_reply_to: u64,
    /// The proposing VM u.
    pub vm: VmId,
    /// The ejected VM w (on the asked host).
    pub partner: VmId,
    /// Where w goes.
    pub partner_to: Ipv4Addr,
    /// The chain's benefit: the drop of the equation 1 total (finite).
    pub benefit: f64,
    /// The threshold it exceeds, c_m(u) + c_m(w) (finite, >= 0).
    pub c_m: f64,
    /// w's communication level on `partner_to` after the chain.
    pub partner_level_after: u8,
    /// Which migration goes first: into a third host, always the
    /// partner's (it needs no headroom); back to the proposer, as for a
    /// swap.
    pub order: SwapOrder,
}

/// Why an asked host refused a swap.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SwapRefusal {
    /// Swaps are off on the asked host (the paper's rule).
    Disabled = 1,
    /// No VM of the asked host makes the swap worth two migrations.
    NoPartner = 2,
    /// Neither host may hold a VM more than its slots for the time of the
    /// swap (both migration headrooms are used or 0).
    NoHeadroom = 3,
    /// A swap is already in progress there, or the partner moved recently.
    Busy = 4,
    /// The proposal does not make sense to the asked host (it is not `to`,
    /// or `vm` is hosted there).
    Invalid = 5,
}

impl SwapRefusal {
    /// Every reason, in wire-value order.
    pub const ALL: [SwapRefusal; 5] = [
        Self::Disabled,
        Self::NoPartner,
        Self::NoHeadroom,
        Self::Busy,
        Self::Invalid,
    ];

    /// A short lowercase name, for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Self::Disabled => "disabled",
            Self::NoPartner => "no_partner",
            Self::NoHeadroom => "no_headroom",
            Self::Busy => "busy",
            Self::Invalid => "invalid",
        }
    }

    fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == b)
    }
}

/// What became of the asked host's part of a swap (its partner's
/// migration), in answer to a [`Message::SwapCommit`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SwapResult {
    /// The partner runs on the proposer's host now.
    Done = 1,
    /// The partner's migration failed; it still runs on the asked host.
    Failed = 2,
    /// The partner's migration failed and where it runs is not known.
    Undefined = 3,
    /// Advisory mode on the asked host: nothing moved.
    Advisory = 4,
    /// The reservation was released (the answer to a cancel).
    Cancelled = 5,
    /// The asked host knows no such swap (expired or never accepted).
    Unknown = 6,
}

impl SwapResult {
    /// Every result, in wire-value order.
    pub const ALL: [SwapResult; 6] = [
        Self::Done,
        Self::Failed,
        Self::Undefined,
        Self::Advisory,
        Self::Cancelled,
        Self::Unknown,
    ];

    fn from_u8(b: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == b)
    }
}

fn split_list<T, M>(
    items: &[T],
    per_part: usize,
    make: impl Fn(u16, u16, &[T]) -> M,
) -> Option<Vec<M>> {
    let parts = items.len().div_ceil(per_part).max(1);
    let parts16 = u16::try_from(parts).ok()?;
    if items.is_empty() {
        return Some(vec![make(0, 1, &[])]);
    }
    Some(
        items
            .chunks(per_part)
            .enumerate()
            .map(|(i, c)| make(i as u16, parts16, c))
            .collect(),
    )
}

/// Every peer message.
#[derive(Clone, Debug, PartialEq)]
pub enum Message {
    /// One chunk of a token being passed to the next holder.
    TokenChunk(TokenChunk),
    /// Acknowledgement of a token transfer's chunks.
    HopAck(HopAck),
    /// "Who hosts VM `vm`?", sent to `vm`'s address and intercepted on its
    /// host (the guest never sees it).
    LocationRequest {
        /// The VM asked about.
        vm: VmId,
    },
    /// The host of `vm` answers with its address.
    LocationResponse {
        /// Sequence number of the request answered.
        in_reply_to: u64,
        /// The VM asked about.
        vm: VmId,
        /// The host it runs on.
        host: Ipv4Addr,
    },
    /// Asks a candidate host for its free capacity, before moving `vm` there.
    CapacityRequest {
        /// The VM the requester considers moving.
        vm: VmId,
    },
    /// A host's free capacity.
    CapacityResponse {
        /// Sequence number of the request answered.
        in_reply_to: u64,
        /// VM slots still free.
        free_slots: u32,
        /// Free memory, MiB.
        free_memory_mib: u64,
    },
    /// `vm` has moved from `from` to `to`: location caches drop its entry.
    MigrationNotice {
        /// The VM that moved.
        vm: VmId,
        /// Its old host.
        from: Ipv4Addr,
        /// Its new host.
        to: Ipv4Addr,
    },
    /// Part of a host's flow report, for the global coordinator.
    FlowReport(FlowReport),
    /// Part of the coordinator's token order.
    TokenOrder(TokenOrder),
    /// "The token is alive": sent by a holder to the watchers at every hop
    /// (its header carries the epoch), by a watcher that regenerated the
    /// token to the other watchers, and by a watcher to the holder of a
    /// copy that another copy of the same epoch has overtaken (the
    /// duplicate-token rule of docs/PROTOCOL.md). With `round`, `visited`
    /// and `host` it names one copy of the token and how far it has come.
    TokenSeen {
        /// The VM the token is being handed to (0: none yet).
        holder: VmId,
        /// The token's round.
        round: u32,
        /// VMs visited in this round, the holder's own included.
        visited: u32,
        /// The host that holds this copy.
        host: Ipv4Addr,
    },
    /// VMs that hosts reported lately and the token lacks (a VM skipped
    /// while its host was unreachable leaves the token): a watcher sends
    /// them to a holder, which adds them (docs/PROTOCOL.md, "Membership").
    Members {
        /// At most [`MAX_MEMBER_VMS`] VMs, none 0.
        vms: Vec<VmId>,
    },
    /// A swap proposal, from the holder of the token for its VM to a full
    /// candidate host.
    SwapPropose(SwapProposal),
    /// The asked host accepts a swap and names the partner.
    SwapAccept(SwapAcceptance),
    /// The asked host refuses a swap.
    SwapRefuse {
        /// Sequence number of the proposal answered.
        in_reply_to: u64,
        /// The proposing VM.
        vm: VmId,
        /// Why.
        reason: SwapRefusal,
    },
    /// From the proposer to the asked host, for an accepted swap: move the
    /// partner now (`go`), or release it (the swap will not happen).
    SwapCommit {
        /// The proposing VM.
        vm: VmId,
        /// The partner the asked host gave.
        partner: VmId,
        /// true: migrate the partner to the proposer's host now; false:
        /// cancel.
        go: bool,
    },
    /// An ejection chain proposal, from the holder of the token for its VM
    /// to a full candidate host: take the VM, and make room by sending one
    /// of yours to me or to a third host with room. Refused with
    /// [`Message::SwapRefuse`]; an accepted chain is committed, released
    /// and answered with the swap messages.
    EjectPropose {
        /// The holder's token round (the asked host prices its own VM's
        /// share of c_m with it).
        round: u32,
        /// The proposal, as for a swap.
        proposal: SwapProposal,
    },
    /// The asked host accepts a chain and names the VM it ejects and
    /// where to.
    EjectAccept(EjectAcceptance),
    /// A rotation proposal (to the asked host, or from it to the host
    /// that would close the cycle).
    RotatePropose(RotationProposal),
    /// A rotation closed and reserved.
    RotateAccept(RotationAcceptance),
    /// The asked host's answer to a [`Message::SwapCommit`], once its part
    /// has ended.
    SwapDone {
        /// Sequence number of the commit answered.
        in_reply_to: u64,
        /// The proposing VM.
        vm: VmId,
        /// The partner.
        partner: VmId,
        /// What became of the partner's migration.
        result: SwapResult,
    },
    /// From the holder of a group move to one of its destination hosts:
    /// reserve a slot for each of these VMs, all of them or none. Answered
    /// with a [`Message::CapacityResponse`] whose free slots are counted
    /// before the reservation: the reservation was made if and only if
    /// they are at least the number of VMs (docs/PROTOCOL.md, "Group
    /// moves").
    GroupReserve {
        /// The members bound for that host: 1 to [`MAX_GROUP_VMS`], none 0.
        vms: Vec<VmId>,
    },
    /// From the holder of a group move to a destination host: the slots
    /// reserved for these VMs are not needed (the move stopped, or will
    /// not happen). Not answered; if lost, the reservations expire.
    GroupRelease {
        /// As in [`Message::GroupReserve`].
        vms: Vec<VmId>,
    },
}

impl Message {
    /// The kind byte this message is sent with.
    pub fn kind(&self) -> Kind {
        match self {
            Message::TokenChunk(_) => Kind::TokenChunk,
            Message::HopAck(_) => Kind::HopAck,
            Message::LocationRequest { .. } => Kind::LocationRequest,
            Message::LocationResponse { .. } => Kind::LocationResponse,
            Message::CapacityRequest { .. } => Kind::CapacityRequest,
            Message::CapacityResponse { .. } => Kind::CapacityResponse,
            Message::MigrationNotice { .. } => Kind::MigrationNotice,
            Message::FlowReport(_) => Kind::FlowReport,
            Message::TokenOrder(_) => Kind::TokenOrder,
            Message::TokenSeen { .. } => Kind::TokenSeen,
            Message::SwapPropose(_) => Kind::SwapPropose,
            Message::SwapAccept(_) => Kind::SwapAccept,
            Message::SwapRefuse { .. } => Kind::SwapRefuse,
            Message::SwapCommit { .. } => Kind::SwapCommit,
            Message::SwapDone { .. } => Kind::SwapDone,
            Message::Members { .. } => Kind::Members,
            Message::EjectPropose { .. } => Kind::EjectPropose,
            Message::EjectAccept(_) => Kind::EjectAccept,
            Message::RotatePropose(_) => Kind::RotatePropose,
            Message::RotateAccept(_) => Kind::RotateAccept,
            Message::GroupReserve { .. } => Kind::GroupReserve,
            Message::GroupRelease { .. } => Kind::GroupRelease,
        }
    }

    /// Appends one sealed datagram (header, body, MAC) to `buf`. Fails if a
    /// field is invalid (the checks [`Message::parse`] makes) or the body
    /// exceeds [`MAX_PAYLOAD`]; `buf` is then left as it was.
    pub fn encode(
        &self,
        header: &Header,
        key: &ClusterKey,
        buf: &mut BytesMut,
    ) -> Result<(), WireError> {
        self.validate()?;
        let start = frame::begin(self.kind() as u8, header, buf);
        self.put_body(buf);
        frame::finish(start, key, buf)
    }

    fn validate(&self) -> Result<(), WireError> {
        match self {
            Message::TokenChunk(c) => c.validate(),
            Message::HopAck(a) => {
                if a.received.count() == 0 || usize::from(a.received.count()) > MAX_CHUNKS {
                    return Err(WireError::InvalidField {
                        kind: Kind::HopAck,
                        field: "count",
                    });
                }
                Ok(())
            }
            Message::FlowReport(r) => {
                check_list(
                    Kind::FlowReport,
                    r.part,
                    r.parts,
                    r.entries.len(),
                    MAX_FLOW_ENTRIES,
                )?;
                if r.entries.iter().any(|e| !valid_rate(e.rate)) {
                    return Err(WireError::InvalidField {
                        kind: Kind::FlowReport,
                        field: "rate",
                    });
                }
                Ok(())
            }
            Message::TokenOrder(o) => check_list(
                Kind::TokenOrder,
                o.part,
                o.parts,
                o.vms.len(),
                MAX_ORDER_VMS,
            ),
            Message::SwapPropose(p) => p.check(),
            Message::SwapAccept(a) => a.check(),
            Message::EjectPropose { proposal, .. } => proposal.check_as(Kind::EjectPropose),
            Message::EjectAccept(a) => a.check(),
            Message::RotatePropose(p) => p.check(),
            Message::RotateAccept(a) => a.check(),
            Message::Members { vms } => check_members(vms),
            Message::GroupReserve { vms } => check_group(Kind::GroupReserve, vms),
            Message::GroupRelease { vms } => check_group(Kind::GroupRelease, vms),
            _ => Ok(()),
        }
    }

    fn put_body(&self, buf: &mut BytesMut) {
        match self {
            Message::TokenChunk(c) => {
                buf.put_u64(c.transfer);
                buf.put_u16(c.index);
                buf.put_u16(c.count);
                buf.put_u32(c.total_len);
                buf.put_slice(&c.data);
            }
            Message::HopAck(a) => {
                buf.put_u64(a.transfer);
                buf.put_u16(a.received.count());
                buf.put_slice(a.received.as_bytes());
            }
            Message::LocationRequest { vm } => buf.put_u32(*vm),
            Message::LocationResponse {
                in_reply_to,
                vm,
                host,
            } => {
                buf.put_u64(*in_reply_to);
                buf.put_u32(*vm);
                buf.put_slice(&host.octets());
            }
            Message::CapacityRequest { vm } => buf.put_u32(*vm),
            Message::CapacityResponse {
                in_reply_to,
                free_slots,
                free_memory_mib,
            } => {
                buf.put_u64(*in_reply_to);
                buf.put_u32(*free_slots);
                buf.put_u64(*free_memory_mib);
            }
            Message::MigrationNotice { vm, from, to } => {
                buf.put_u32(*vm);
                buf.put_slice(&from.octets());
                buf.put_slice(&to.octets());
            }
            Message::FlowReport(r) => {
                buf.put_u64(r.report);
                buf.put_u16(r.part);
                buf.put_u16(r.parts);
                buf.put_u16(r.entries.len() as u16); // <= MAX_FLOW_ENTRIES
                for e in &r.entries {
                    buf.put_u32(e.vm);
                    buf.put_u32(e.peer);
                    buf.put_u64(e.rate.to_bits());
                }
            }
            Message::TokenOrder(o) => {
                buf.put_u64(o.order);
                buf.put_u16(o.part);
                buf.put_u16(o.parts);
                buf.put_u16(o.vms.len() as u16); // <= MAX_ORDER_VMS
                for v in &o.vms {
                    buf.put_u32(*v);
                }
            }
            Message::TokenSeen {
                holder,
                round,
                visited,
                host,
            } => {
                buf.put_u32(*holder);
                buf.put_u32(*round);
                buf.put_u32(*visited);
                buf.put_slice(&host.octets());
            }
            Message::SwapAccept(a) => {
                buf.put_u64(a.in_reply_to);
                buf.put_u32(a.vm);
                buf.put_u32(a.partner);
                buf.put_u64(a.partner_gain.to_bits());
                buf.put_u64(a.partner_cost_before.to_bits());
                buf.put_u64(a.partner_cost_after.to_bits());
                buf.put_u64(a.benefit.to_bits());
                buf.put_u64(a.c_m.to_bits());
                buf.put_u8(a.partner_level_after);
                buf.put_u8(a.order as u8);
            }
            Message::SwapRefuse {
                in_reply_to,
                vm,
                reason,
            } => {
                buf.put_u64(*in_reply_to);
                buf.put_u32(*vm);
                buf.put_u8(*reason as u8);
            }
            Message::SwapCommit { vm, partner, go } => {
                buf.put_u32(*vm);
                buf.put_u32(*partner);
                buf.put_u8(u8::from(*go));
            }
            Message::SwapDone {
                in_reply_to,
                vm,
                partner,
                result,
            } => {
                buf.put_u64(*in_reply_to);
                buf.put_u32(*vm);
                buf.put_u32(*partner);
                buf.put_u8(*result as u8);
            }
            Message::SwapPropose(p) => p.put(buf),
            Message::EjectPropose { round, proposal } => {
                buf.put_u32(*round);
                proposal.put(buf);
            }
            Message::EjectAccept(a) => {
                buf.put_u64(a.in_reply_to);
                buf.put_u32(a.vm);
                buf.put_u32(a.partner);
                buf.put_slice(&a.partner_to.octets());
                buf.put_u64(a.benefit.to_bits());
                buf.put_u64(a.c_m.to_bits());
                buf.put_u8(a.partner_level_after);
                buf.put_u8(a.order as u8);
            }
            Message::RotatePropose(p) => {
                buf.put_u32(p.round);
                buf.put_u64(p.c_m.to_bits());
                buf.put_u64(p.home_free_mem_mib);
                buf.put_u8(p.legs.len() as u8); // 1 or 2
                for l in &p.legs {
                    buf.put_u32(l.vm);
                    buf.put_slice(&l.from.octets());
                    buf.put_slice(&l.to.octets());
                    buf.put_u64(l.cost_before.to_bits());
                    buf.put_u64(l.mem_mib);
                    buf.put_u16(l.peers.len() as u16); // <= MAX_ROTATION_PEERS
                    for &(vm, host, rate) in &l.peers {
                        buf.put_u32(vm);
                        buf.put_slice(&host.octets());
                        buf.put_u64(rate.to_bits());
                    }
                }
            }
            Message::RotateAccept(a) => {
                buf.put_u64(a.in_reply_to);
                for vm in a.vms {
                    buf.put_u32(vm);
                }
                for h in a.hosts {
                    buf.put_slice(&h.octets());
                }
                buf.put_u64(a.benefit.to_bits());
                buf.put_u64(a.c_m.to_bits());
            }
            Message::Members { vms } => {
                buf.put_u16(vms.len() as u16); // <= MAX_MEMBER_VMS
                for vm in vms {
                    buf.put_u32(*vm);
                }
            }
            Message::GroupReserve { vms } | Message::GroupRelease { vms } => {
                buf.put_u8(vms.len() as u8); // <= MAX_GROUP_VMS
                for vm in vms {
                    buf.put_u32(*vm);
                }
            }
        }
    }
}

impl SwapProposal {
    fn put(&self, buf: &mut BytesMut) {
        let p = self;
        {
            {
                buf.put_u32(p.vm);
                buf.put_slice(&p.from.octets());
                buf.put_slice(&p.to.octets());
                buf.put_u64(p.gain.to_bits());
                buf.put_u64(p.cost_before.to_bits());
                buf.put_u64(p.c_m.to_bits());
                buf.put_u64(p.mem_mib);
                buf.put_u64(p.from_free_mem_mib);
                buf.put_u8(u8::from(p.from_headroom));
                buf.put_u16(p.peers_on_target.len() as u16); // <= MAX_SWAP_PEERS
                for &(vm, rate) in &p.peers_on_target {
                    buf.put_u32(vm);
                    buf.put_u64(rate.to_bits());
                }
            }
        }
    }
}

impl Message {
    /// Second decoding step: parses the body of a checked frame. Every
    /// field is validated and the body must be consumed exactly. Lists are
    /// allocated only after their length is checked against the body.
    pub fn parse(kind: Kind, body: &[u8]) -> Result<Message, WireError> {
        let mut r = Reader { kind, body, pos: 0 };
        let msg = match kind {
            Kind::TokenChunk => {
                let transfer = r.u64()?;
                let index = r.u16()?;
                let count = r.u16()?;
                let total_len = r.u32()?;
                let data = Bytes::copy_from_slice(r.rest());
                let c = TokenChunk {
                    transfer,
                    index,
                    count,
                    total_len,
                    data,
                };
                c.validate()?;
                Message::TokenChunk(c)
            }
            Kind::HopAck => {
                let transfer = r.u64()?;
                let count = r.u16()?;
                if count == 0 || usize::from(count) > MAX_CHUNKS {
                    return Err(r.invalid("count"));
                }
                let bits = r.take(usize::from(count).div_ceil(8))?;
                let received =
                    ChunkBitmap::from_bytes(count, bits).ok_or(r.invalid("bitmap padding"))?;
                Message::HopAck(HopAck { transfer, received })
            }
            Kind::LocationRequest => Message::LocationRequest { vm: r.u32()? },
            Kind::LocationResponse => Message::LocationResponse {
                in_reply_to: r.u64()?,
                vm: r.u32()?,
                host: r.ip()?,
            },
            Kind::CapacityRequest => Message::CapacityRequest { vm: r.u32()? },
            Kind::CapacityResponse => Message::CapacityResponse {
                in_reply_to: r.u64()?,
                free_slots: r.u32()?,
                free_memory_mib: r.u64()?,
            },
            Kind::MigrationNotice => Message::MigrationNotice {
                vm: r.u32()?,
                from: r.ip()?,
                to: r.ip()?,
            },
            Kind::FlowReport => {
                let report = r.u64()?;
                let part = r.u16()?;
                let parts = r.u16()?;
                let n = usize::from(r.u16()?);
                check_list(kind, part, parts, n, MAX_FLOW_ENTRIES)?;
                r.expect_exactly(n * FLOW_ENTRY_LEN)?;
                let mut entries = Vec::with_capacity(n);
                for _ in 0..n {
                    let vm = r.u32()?;
                    let peer = r.u32()?;
                    let rate = f64::from_bits(r.u64()?);
                    if !valid_rate(rate) {
                        return Err(r.invalid("rate"));
                    }
                    entries.push(FlowEntry { vm, peer, rate });
                }
                Message::FlowReport(FlowReport {
                    report,
                    part,
                    parts,
                    entries,
                })
            }
            Kind::TokenOrder => {
                let order = r.u64()?;
                let part = r.u16()?;
                let parts = r.u16()?;
                let n = usize::from(r.u16()?);
                check_list(kind, part, parts, n, MAX_ORDER_VMS)?;
                r.expect_exactly(n * 4)?;
                let mut vms = Vec::with_capacity(n);
                for _ in 0..n {
                    vms.push(r.u32()?);
                }
                Message::TokenOrder(TokenOrder {
                    order,
                    part,
                    parts,
                    vms,
                })
            }
            Kind::TokenSeen => Message::TokenSeen {
                holder: r.u32()?,
                round: r.u32()?,
                visited: r.u32()?,
                host: r.ip()?,
            },
            Kind::SwapPropose => Message::SwapPropose(SwapProposal::read(&mut r)?),
            Kind::EjectPropose => Message::EjectPropose {
                round: r.u32()?,
                proposal: SwapProposal::read(&mut r)?,
            },
            Kind::EjectAccept => {
                let a = EjectAcceptance {
                    in_reply_to: r.u64()?,
                    vm: r.u32()?,
                    partner: r.u32()?,
                    partner_to: r.ip()?,
                    benefit: r.f64()?,
                    c_m: r.f64()?,
                    partner_level_after: r.u8()?,
                    order: SwapOrder::from_u8(r.u8()?).ok_or(r.invalid("order"))?,
                };
                a.check()?;
                Message::EjectAccept(a)
            }
            Kind::RotatePropose => {
                let round = r.u32()?;
                let c_m = r.f64()?;
                let home_free_mem_mib = r.u64()?;
                let n = r.u8()?;
                if !(1..=2).contains(&n) {
                    return Err(r.invalid("leg count"));
                }
                let mut legs = Vec::with_capacity(usize::from(n));
                let mut peers_left = MAX_ROTATION_PEERS;
                for _ in 0..n {
                    let vm = r.u32()?;
                    let from = r.ip()?;
                    let to = r.ip()?;
                    let cost_before = r.f64()?;
                    let mem_mib = r.u64()?;
                    let k = usize::from(r.u16()?);
                    if k > peers_left {
                        return Err(r.invalid("peer count"));
                    }
                    peers_left -= k;
                    let mut peers = Vec::with_capacity(k);
                    for _ in 0..k {
                        peers.push((r.u32()?, r.ip()?, r.f64()?));
                    }
                    legs.push(RotationLeg {
                        vm,
                        from,
                        to,
                        cost_before,
                        mem_mib,
                        peers,
                    });
                }
                let p = RotationProposal {
                    round,
                    c_m,
                    home_free_mem_mib,
                    legs,
                };
                p.check()?;
                Message::RotatePropose(p)
            }
            Kind::RotateAccept => {
                let a = RotationAcceptance {
                    in_reply_to: r.u64()?,
                    vms: [r.u32()?, r.u32()?, r.u32()?],
                    hosts: [r.ip()?, r.ip()?, r.ip()?],
                    benefit: r.f64()?,
                    c_m: r.f64()?,
                };
                a.check()?;
                Message::RotateAccept(a)
            }
            Kind::SwapAccept => {
                let a = SwapAcceptance {
                    in_reply_to: r.u64()?,
                    vm: r.u32()?,
                    partner: r.u32()?,
                    partner_gain: r.f64()?,
                    partner_cost_before: r.f64()?,
                    partner_cost_after: r.f64()?,
                    benefit: r.f64()?,
                    c_m: r.f64()?,
                    partner_level_after: r.u8()?,
                    order: SwapOrder::from_u8(r.u8()?).ok_or(r.invalid("order"))?,
                };
                a.check()?;
                Message::SwapAccept(a)
            }
            Kind::SwapRefuse => Message::SwapRefuse {
                in_reply_to: r.u64()?,
                vm: r.u32()?,
                reason: SwapRefusal::from_u8(r.u8()?).ok_or(r.invalid("reason"))?,
            },
            Kind::SwapCommit => Message::SwapCommit {
                vm: r.u32()?,
                partner: r.u32()?,
                go: r.flag("go")?,
            },
            Kind::SwapDone => Message::SwapDone {
                in_reply_to: r.u64()?,
                vm: r.u32()?,
                partner: r.u32()?,
                result: SwapResult::from_u8(r.u8()?).ok_or(r.invalid("result"))?,
            },
            Kind::Members => {
                let n = usize::from(r.u16()?);
                if n > MAX_MEMBER_VMS {
                    return Err(r.invalid("count"));
                }
                r.expect_exactly(n * 4)?;
                let vms = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
                check_members(&vms)?;
                Message::Members { vms }
            }
            kind @ (Kind::GroupReserve | Kind::GroupRelease) => {
                let n = usize::from(r.u8()?);
                if n == 0 || n > MAX_GROUP_VMS {
                    return Err(r.invalid("count"));
                }
                r.expect_exactly(n * 4)?;
                let vms = (0..n).map(|_| r.u32()).collect::<Result<Vec<_>, _>>()?;
                check_group(kind, &vms)?;
                if kind == Kind::GroupReserve {
                    Message::GroupReserve { vms }
                } else {
                    Message::GroupRelease { vms }
                }
            }
        };
        r.end()?;
        Ok(msg)
    }
}

/// A group's VMs: 1 to [`MAX_GROUP_VMS`], none 0, none twice (a slot
/// per VM).
fn check_group(kind: Kind, vms: &[VmId]) -> Result<(), WireError> {
    let bad = |field| Err(WireError::InvalidField { kind, field });
    if vms.is_empty() || vms.len() > MAX_GROUP_VMS {
        return bad("count");
    }
    if vms.contains(&0) {
        return bad("vm");
    }
    if vms.iter().enumerate().any(|(i, v)| vms[..i].contains(v)) {
        return bad("vm");
    }
    Ok(())
}

/// A members list: not empty, at most [`MAX_MEMBER_VMS`], no VM 0.
fn check_members(vms: &[VmId]) -> Result<(), WireError> {
    let bad = |field| {
        Err(WireError::InvalidField {
            kind: Kind::Members,
            field,
        })
    };
    if vms.is_empty() || vms.len() > MAX_MEMBER_VMS {
        return bad("count");
    }
    if vms.contains(&0) {
        return bad("vm");
    }
    Ok(())
}

/// A decoded datagram: who sent it, in which epoch, with which sequence
/// number, and what it says.
#[derive(Clone, Debug, PartialEq)]
pub struct Datagram {
    /// Sender, epoch, sequence number.
    pub header: Header,
    /// The message.
    pub message: Message,
}

impl Datagram {
    /// Appends this datagram, sealed with `key`, to `buf`.
    pub fn encode(&self, key: &ClusterKey, buf: &mut BytesMut) -> Result<(), WireError> {
        self.message.encode(&self.header, key, buf)
    }

    /// Decodes a datagram; same as [`decode`](super::decode).
    pub fn decode<K: super::Verifier + ?Sized>(
        bytes: &[u8],
        key: &K,
    ) -> Result<Datagram, WireError> {
        super::decode(bytes, key)
    }
}

/// Rates are measured byte counts over a window: finite and not negative.
fn valid_rate(rate: f64) -> bool {
    rate.is_finite() && rate >= 0.0
}

impl SwapProposal {
    /// Reads a proposal's body (a swap's, or the tail of a chain's) and
    /// checks it.
    fn read(r: &mut Reader<'_>) -> Result<SwapProposal, WireError> {
        let kind = r.kind;
        let vm = r.u32()?;
        let from = r.ip()?;
        let to = r.ip()?;
        let gain = r.f64()?;
        let cost_before = r.f64()?;
        let c_m = r.f64()?;
        let mem_mib = r.u64()?;
        let from_free_mem_mib = r.u64()?;
        let from_headroom = r.flag("from_headroom")?;
        let n = usize::from(r.u16()?);
        if n > MAX_SWAP_PEERS {
            return Err(r.invalid("peer count"));
        }
        r.expect_exactly(n * SWAP_PEER_LEN)?;
        let mut peers_on_target = Vec::with_capacity(n);
        for _ in 0..n {
            peers_on_target.push((r.u32()?, r.f64()?));
        }
        let p = SwapProposal {
            vm,
            from,
            to,
            gain,
            cost_before,
            c_m,
            mem_mib,
            from_free_mem_mib,
            from_headroom,
            peers_on_target,
        };
        p.check_as(kind)?;
        Ok(p)
    }

    /// The checks [`Message::parse`] makes: finite numbers, costs and
    /// rates not negative, at most [`MAX_SWAP_PEERS`] peers.
    fn check(&self) -> Result<(), WireError> {
        self.check_as(Kind::SwapPropose)
    }

    /// [`SwapProposal::check`], its errors naming `kind`.
    fn check_as(&self, kind: Kind) -> Result<(), WireError> {
        let bad = |field| Err(WireError::InvalidField { kind, field });
        if !self.gain.is_finite() {
            return bad("gain");
        }
        if !valid_rate(self.cost_before) {
            return bad("cost_before");
        }
        if !valid_rate(self.c_m) {
            return bad("c_m");
        }
        if self.peers_on_target.len() > MAX_SWAP_PEERS {
            return bad("peer count");
        }
        if self.peers_on_target.iter().any(|&(_, r)| !valid_rate(r)) {
            return bad("rate");
        }
        Ok(())
    }
}

/// An acceptance's numbers (of a `kind`): a finite benefit, a finite
/// threshold not negative.
fn check_benefit(kind: Kind, benefit: f64, c_m: f64) -> Result<(), WireError> {
    let bad = |field| Err(WireError::InvalidField { kind, field });
    if !benefit.is_finite() {
        return bad("benefit");
    }
    if !valid_rate(c_m) {
        return bad("c_m");
    }
    Ok(())
}

impl EjectAcceptance {
    /// The checks [`Message::parse`] makes: a finite benefit, a finite
    /// threshold not negative.
    fn check(&self) -> Result<(), WireError> {
        check_benefit(Kind::EjectAccept, self.benefit, self.c_m)
    }
}

impl RotationProposal {
    /// The checks [`Message::parse`] makes: one or two legs, at most
    /// [`MAX_ROTATION_PEERS`] peers in all, finite numbers, costs, rates
    /// and the threshold not negative.
    fn check(&self) -> Result<(), WireError> {
        let bad = |field| {
            Err(WireError::InvalidField {
                kind: Kind::RotatePropose,
                field,
            })
        };
        if !(1..=2).contains(&self.legs.len()) {
            return bad("leg count");
        }
        if self.legs.iter().map(|l| l.peers.len()).sum::<usize>() > MAX_ROTATION_PEERS {
            return bad("peer count");
        }
        if !valid_rate(self.c_m) {
            return bad("c_m");
        }
        if self.legs.iter().any(|l| !valid_rate(l.cost_before)) {
            return bad("cost_before");
        }
        if self
            .legs
            .iter()
            .any(|l| l.peers.iter().any(|&(_, _, r)| !valid_rate(r)))
        {
            return bad("rate");
        }
        Ok(())
    }
}

impl RotationAcceptance {
    /// The checks [`Message::parse`] makes: a finite benefit, a finite
    /// threshold not negative.
    fn check(&self) -> Result<(), WireError> {
        check_benefit(Kind::RotateAccept, self.benefit, self.c_m)
    }
}

impl SwapAcceptance {
    /// The checks [`Message::parse`] makes: finite numbers, costs and the
    /// threshold not negative.
    fn check(&self) -> Result<(), WireError> {
        let bad = |field| {
            Err(WireError::InvalidField {
                kind: Kind::SwapAccept,
                field,
            })
        };
        if !self.partner_gain.is_finite() {
            return bad("partner_gain");
        }
        if !self.benefit.is_finite() {
            return bad("benefit");
        }
        if !valid_rate(self.partner_cost_before) {
            return bad("partner_cost_before");
        }
        if !valid_rate(self.partner_cost_after) {
            return bad("partner_cost_after");
        }
        if !valid_rate(self.c_m) {
            return bad("c_m");
        }
        Ok(())
    }
}

fn check_list(kind: Kind, part: u16, parts: u16, n: usize, max: usize) -> Result<(), WireError> {
    let field = if parts == 0 {
        "parts"
    } else if part >= parts {
        "part"
    } else if n > max {
        "entry count"
    } else {
        return Ok(());
    };
    Err(WireError::InvalidField { kind, field })
}

/// Big-endian reader over a body; every short read is `BodyTruncated`.
struct Reader<'a> {
    kind: Kind,
    body: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.body.len());
        let Some(end) = end else {
            return Err(WireError::BodyTruncated { kind: self.kind });
        };
        let s = &self.body[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], WireError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    /// A boolean byte: 0 or 1, nothing else (one encoding per value).
    fn flag(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            _ => Err(self.invalid(field)),
        }
    }

    fn f64(&mut self) -> Result<f64, WireError> {
        Ok(f64::from_bits(self.u64()?))
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, WireError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn ip(&mut self) -> Result<Ipv4Addr, WireError> {
        Ok(Ipv4Addr::from(self.array::<4>()?))
    }

    fn rest(&mut self) -> &'a [u8] {
        let s = &self.body[self.pos..];
        self.pos = self.body.len();
        s
    }

    /// The remaining body must be exactly `n` bytes.
    fn expect_exactly(&self, n: usize) -> Result<(), WireError> {
        let left = self.body.len() - self.pos;
        if left < n {
            Err(WireError::BodyTruncated { kind: self.kind })
        } else if left > n {
            Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: left - n,
            })
        } else {
            Ok(())
        }
    }

    fn end(&self) -> Result<(), WireError> {
        self.expect_exactly(0)
    }

    fn invalid(&self, field: &'static str) -> WireError {
        WireError::InvalidField {
            kind: self.kind,
            field,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::{HEADER_LEN, decode, seal};

    fn key() -> ClusterKey {
        ClusterKey::new(b"message test key 0123456789").unwrap()
    }

    fn header() -> Header {
        Header {
            sender: Ipv4Addr::new(10, 1, 0, 1),
            epoch: 2,
            seq: 99,
            ..Header::default()
        }
    }

    fn round_trip(m: &Message) -> usize {
        let mut b = BytesMut::new();
        m.encode(&header(), &key(), &mut b).unwrap();
        let d = decode(&b, &key()).unwrap();
        assert_eq!(d.header, header());
        assert_eq!(&d.message, m);
        b.len()
    }

    #[test]
    fn fixed_size_messages_round_trip_with_their_sizes() {
        let h = HEADER_LEN + 32;
        assert_eq!(
            round_trip(&Message::LocationRequest { vm: 0x0a00_0005 }),
            h + 4
        );
        assert_eq!(
            round_trip(&Message::LocationResponse {
                in_reply_to: 98,
                vm: 0x0a00_0005,
                host: Ipv4Addr::new(192, 168, 0, 3)
            }),
            h + 16
        );
        assert_eq!(round_trip(&Message::CapacityRequest { vm: 7 }), h + 4);
        assert_eq!(
            round_trip(&Message::CapacityResponse {
                in_reply_to: 1,
                free_slots: 3,
                free_memory_mib: 65_536
            }),
            h + 20
        );
        assert_eq!(
            round_trip(&Message::MigrationNotice {
                vm: 9,
                from: Ipv4Addr::new(1, 2, 3, 4),
                to: Ipv4Addr::new(5, 6, 7, 8)
            }),
            h + 12
        );
    }

    fn proposal() -> SwapProposal {
        SwapProposal {
            vm: 0x0a00_0001,
            from: Ipv4Addr::new(10, 1, 0, 1),
            to: Ipv4Addr::new(10, 1, 0, 2),
            gain: 1234.5,
            cost_before: 800.0,
            c_m: 0.0,
            mem_mib: 1024,
            from_free_mem_mib: 0,
            from_headroom: true,
            peers_on_target: vec![(0x0a00_0003, 150_000.0), (0x0a00_0004, 0.5)],
        }
    }

    #[test]
    fn swap_messages_round_trip_with_their_sizes() {
        let h = HEADER_LEN + 32;
        let p = proposal();
        assert_eq!(
            round_trip(&Message::SwapPropose(p.clone())),
            h + SWAP_PROPOSE_FIXED_LEN + 2 * SWAP_PEER_LEN
        );
        assert_eq!(SWAP_PROPOSE_FIXED_LEN, 55);
        assert_eq!(MAX_SWAP_PEERS, 95);
        let full = SwapProposal {
            peers_on_target: (0..MAX_SWAP_PEERS as u32).map(|i| (i, 1.0)).collect(),
            ..p
        };
        assert!(round_trip(&Message::SwapPropose(full)) <= crate::wire::MAX_DATAGRAM);
        let accept = SwapAcceptance {
            in_reply_to: 77,
            vm: 1,
            partner: 4,
            partner_gain: 9.0,
            partner_cost_before: 4.5,
            partner_cost_after: 0.0,
            benefit: -0.0,
            c_m: 3.0,
            partner_level_after: 2,
            order: SwapOrder::PartnerFirst,
        };
        assert_eq!(round_trip(&Message::SwapAccept(accept)), h + 58);
        for reason in SwapRefusal::ALL {
            let m = Message::SwapRefuse {
                in_reply_to: 5,
                vm: 1,
                reason,
            };
            assert_eq!(round_trip(&m), h + 13);
        }
        for go in [false, true] {
            let m = Message::SwapCommit {
                vm: 1,
                partner: 4,
                go,
            };
            assert_eq!(round_trip(&m), h + 9);
        }
        for result in SwapResult::ALL {
            let m = Message::SwapDone {
                in_reply_to: 6,
                vm: 1,
                partner: 4,
                result,
            };
            assert_eq!(round_trip(&m), h + 17);
        }
    }

    #[test]
    fn group_reservations_round_trip_and_are_bounded() {
        for make in [
            (|vms| Message::GroupReserve { vms }) as fn(Vec<VmId>) -> Message,
            |vms| Message::GroupRelease { vms },
        ] {
            assert_eq!(round_trip(&make(vec![7])), HEADER_LEN + 1 + 4 + 32);
            let all: Vec<VmId> = (1..=MAX_GROUP_VMS as u32).collect();
            assert_eq!(
                round_trip(&make(all)),
                HEADER_LEN + 1 + 4 * MAX_GROUP_VMS + 32
            );
            let mut b = BytesMut::new();
            for bad in [
                vec![],
                vec![3, 0],
                vec![3, 4, 3],
                (1..=MAX_GROUP_VMS as u32 + 1).collect(),
            ] {
                assert!(make(bad).encode(&header(), &key(), &mut b).is_err());
            }
            assert!(b.is_empty());
        }
        // A body whose count is 0, above the bound, or not the IDs that
        // follow, or that names a VM twice, is refused.
        let k = key();
        for kind in [Kind::GroupReserve, Kind::GroupRelease] {
            for (body, field) in [
                (vec![0u8], Some("count")),
                (vec![33u8], Some("count")),
                (vec![2u8, 0, 0, 0, 5, 0, 0, 0, 5], Some("vm")),
                (vec![1u8, 0, 0, 0, 0], Some("vm")),
                (vec![2u8, 0, 0, 0, 5], None),
            ] {
                let mut b = BytesMut::new();
                seal(kind as u8, &header(), &body, &k, &mut b).unwrap();
                let got = decode(&b, &k);
                match field {
                    Some(field) => {
                        assert_eq!(
                            got,
                            Err(WireError::InvalidField { kind, field }),
                            "{body:?}"
                        )
                    }
                    None => assert!(got.is_err(), "{body:?}"),
                }
            }
        }
    }

    #[test]
    fn members_round_trip_and_are_bounded() {
        let vms: Vec<VmId> = (1..=MAX_MEMBER_VMS as u32).collect();
        let len = round_trip(&Message::Members { vms: vms.clone() });
        assert!(len <= HEADER_LEN + MAX_PAYLOAD + 32, "{len}");
        assert_eq!(
            round_trip(&Message::Members { vms: vec![7] }),
            HEADER_LEN + 2 + 4 + 32
        );
        let mut b = BytesMut::new();
        for bad in [
            vec![],
            vec![3, 0],
            (0..=MAX_MEMBER_VMS as u32).map(|v| v + 1).collect(),
        ] {
            assert!(
                Message::Members { vms: bad }
                    .encode(&header(), &key(), &mut b)
                    .is_err()
            );
        }
        assert!(b.is_empty());
    }

    #[test]
    fn swap_fields_are_checked_both_ways() {
        let k = key();
        let mut b = BytesMut::new();
        for (bad, field) in [
            (
                SwapProposal {
                    gain: f64::NAN,
                    ..proposal()
                },
                "gain",
            ),
            (
                SwapProposal {
                    cost_before: -1.0,
                    ..proposal()
                },
                "cost_before",
            ),
            (
                SwapProposal {
                    c_m: f64::INFINITY,
                    ..proposal()
                },
                "c_m",
            ),
            (
                SwapProposal {
                    peers_on_target: vec![(1, -2.0)],
                    ..proposal()
                },
                "rate",
            ),
        ] {
            let m = Message::SwapPropose(bad);
            assert!(matches!(
                m.encode(&header(), &k, &mut b),
                Err(WireError::InvalidField { field: f, .. }) if f == field
            ));
            assert!(b.is_empty());
            // Sealed by hand, the parser refuses it too.
            let mut body = BytesMut::new();
            m.put_body(&mut body);
            seal(Kind::SwapPropose as u8, &header(), &body, &k, &mut b).unwrap();
            assert!(matches!(
                decode(&b, &k),
                Err(WireError::InvalidField { field: f, .. }) if f == field
            ));
            b.clear();
        }
        // Enumerated bytes accept their values only.
        let mut body = BytesMut::new();
        Message::SwapCommit {
            vm: 1,
            partner: 2,
            go: true,
        }
        .put_body(&mut body);
        body[8] = 2;
        seal(Kind::SwapCommit as u8, &header(), &body, &k, &mut b).unwrap();
        assert!(matches!(
            decode(&b, &k),
            Err(WireError::InvalidField { field: "go", .. })
        ));
        for (kind, len, field) in [
            (Kind::SwapRefuse, 13, "reason"),
            (Kind::SwapDone, 17, "result"),
            (Kind::SwapAccept, 58, "order"),
        ] {
            for v in [0u8, 7, 255] {
                if kind == Kind::SwapAccept && v == 0 {
                    continue;
                }
                let mut body = vec![0u8; len];
                body[len - 1] = v;
                b.clear();
                seal(kind as u8, &header(), &body, &k, &mut b).unwrap();
                assert_eq!(
                    decode(&b, &k),
                    Err(WireError::InvalidField { kind, field }),
                    "{kind:?} {v}"
                );
            }
        }
        // A peer count past the maximum is refused before any allocation.
        let mut body = BytesMut::new();
        Message::SwapPropose(proposal()).put_body(&mut body);
        body[53..55].copy_from_slice(&(MAX_SWAP_PEERS as u16 + 1).to_be_bytes());
        b.clear();
        seal(Kind::SwapPropose as u8, &header(), &body, &k, &mut b).unwrap();
        assert!(matches!(
            decode(&b, &k),
            Err(WireError::InvalidField {
                field: "peer count",
                ..
            })
        ));
        // A peer count larger than the body holds is truncation.
        body[53..55].copy_from_slice(&3u16.to_be_bytes());
        b.clear();
        seal(Kind::SwapPropose as u8, &header(), &body, &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::BodyTruncated {
                kind: Kind::SwapPropose
            })
        );
    }

    #[test]
    fn chain_messages_round_trip_and_refuse_what_is_malformed() {
        let h = HEADER_LEN + 32;
        let p = proposal();
        let propose = Message::EjectPropose {
            round: 7,
            proposal: p.clone(),
        };
        assert_eq!(
            round_trip(&propose),
            h + 4 + SWAP_PROPOSE_FIXED_LEN + 2 * SWAP_PEER_LEN
        );
        let full = Message::EjectPropose {
            round: u32::MAX,
            proposal: SwapProposal {
                peers_on_target: (0..MAX_SWAP_PEERS as u32).map(|i| (i, 1.0)).collect(),
                ..p.clone()
            },
        };
        assert!(round_trip(&full) <= crate::wire::MAX_DATAGRAM);
        let accept = EjectAcceptance {
            in_reply_to: 77,
            vm: 1,
            partner: 4,
            partner_to: Ipv4Addr::new(10, 1, 0, 9),
            benefit: 12.5,
            c_m: 3.0,
            partner_level_after: 1,
            order: SwapOrder::PartnerFirst,
        };
        assert_eq!(round_trip(&Message::EjectAccept(accept)), h + 38);
        // Encoding refuses what decoding would, naming the chain's kind.
        let k = key();
        let mut b = BytesMut::new();
        for (m, field) in [
            (
                Message::EjectPropose {
                    round: 1,
                    proposal: SwapProposal {
                        c_m: f64::NAN,
                        ..p.clone()
                    },
                },
                "c_m",
            ),
            (
                Message::EjectAccept(EjectAcceptance {
                    benefit: f64::INFINITY,
                    ..accept
                }),
                "benefit",
            ),
            (
                Message::EjectAccept(EjectAcceptance {
                    c_m: -1.0,
                    ..accept
                }),
                "c_m",
            ),
        ] {
            let kind = m.kind();
            assert_eq!(
                m.encode(&header(), &k, &mut b),
                Err(WireError::InvalidField { kind, field })
            );
        }
        // Bodies behind a valid MAC: a bad order byte, a bad flag, a peer
        // count the body does not hold.
        let mut body = BytesMut::new();
        Message::EjectAccept(accept).put_body(&mut body);
        body[37] = 2;
        b.clear();
        seal(Kind::EjectAccept as u8, &header(), &body, &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::InvalidField {
                kind: Kind::EjectAccept,
                field: "order"
            })
        );
        let mut body = BytesMut::new();
        propose.put_body(&mut body);
        body[4 + 52] = 3;
        b.clear();
        seal(Kind::EjectPropose as u8, &header(), &body, &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::InvalidField {
                kind: Kind::EjectPropose,
                field: "from_headroom"
            })
        );
        body[4 + 52] = 1;
        body[4 + 53..4 + 55].copy_from_slice(&3u16.to_be_bytes());
        b.clear();
        seal(Kind::EjectPropose as u8, &header(), &body, &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::BodyTruncated {
                kind: Kind::EjectPropose
            })
        );
        // Too short for its round.
        b.clear();
        seal(Kind::EjectPropose as u8, &header(), &[0, 0], &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::BodyTruncated {
                kind: Kind::EjectPropose
            })
        );
    }

    #[test]
    fn location_request_body_layout() {
        let mut b = BytesMut::new();
        Message::LocationRequest { vm: 0x0a01_0203 }
            .encode(&header(), &key(), &mut b)
            .unwrap();
        assert_eq!(b[5], Kind::LocationRequest as u8);
        assert_eq!(&b[HEADER_LEN..HEADER_LEN + 4], &[10, 1, 2, 3]);
    }

    #[test]
    fn list_messages_round_trip_and_split() {
        let flows: Vec<FlowEntry> = (0..200)
            .map(|i| FlowEntry {
                vm: i,
                peer: i + 1000,
                rate: f64::from(i) * 1.5,
            })
            .collect();
        let parts = FlowReport::split(4, &flows).unwrap();
        assert_eq!(parts.len(), 3);
        assert_eq!(parts[0].entries.len(), MAX_FLOW_ENTRIES);
        let mut back = Vec::new();
        for p in parts {
            assert_eq!(p.parts, 3);
            back.extend_from_slice(&p.entries);
            assert!(round_trip(&Message::FlowReport(p)) <= crate::wire::MAX_DATAGRAM);
        }
        assert_eq!(back, flows);

        let empty = FlowReport::split(5, &[]).unwrap();
        assert_eq!(empty.len(), 1);
        assert_eq!((empty[0].part, empty[0].parts), (0, 1));
        round_trip(&Message::FlowReport(empty[0].clone()));

        let vms: Vec<VmId> = (0..1000).rev().collect();
        let parts = TokenOrder::split(1, &vms).unwrap();
        assert_eq!(parts.len(), 4);
        let back: Vec<VmId> = parts.iter().flat_map(|p| p.vms.clone()).collect();
        assert_eq!(back, vms);
        for p in parts {
            round_trip(&Message::TokenOrder(p));
        }
    }

    #[test]
    fn invalid_fields_are_refused_both_ways() {
        let bad_rate = Message::FlowReport(FlowReport {
            report: 0,
            part: 0,
            parts: 1,
            entries: vec![FlowEntry {
                vm: 1,
                peer: 2,
                rate: f64::NAN,
            }],
        });
        let mut b = BytesMut::new();
        assert!(matches!(
            bad_rate.encode(&header(), &key(), &mut b),
            Err(WireError::InvalidField { field: "rate", .. })
        ));
        assert!(b.is_empty());

        // The same body sealed by hand is refused by the parser.
        let mut body = BytesMut::new();
        bad_rate.put_body(&mut body);
        seal(Kind::FlowReport as u8, &header(), &body, &key(), &mut b).unwrap();
        assert!(matches!(
            decode(&b, &key()),
            Err(WireError::InvalidField { field: "rate", .. })
        ));

        let order = Message::TokenOrder(TokenOrder {
            order: 0,
            part: 2,
            parts: 2,
            vms: vec![],
        });
        assert!(matches!(
            order.encode(&header(), &key(), &mut b),
            Err(WireError::InvalidField { field: "part", .. })
        ));
    }

    #[test]
    fn short_and_long_bodies_are_refused() {
        let k = key();
        let mut b = BytesMut::new();
        seal(
            Kind::LocationRequest as u8,
            &header(),
            &[1, 2, 3],
            &k,
            &mut b,
        )
        .unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::BodyTruncated {
                kind: Kind::LocationRequest
            })
        );
        b.clear();
        seal(
            Kind::LocationRequest as u8,
            &header(),
            &[1, 2, 3, 4, 5],
            &k,
            &mut b,
        )
        .unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::TrailingBytes {
                kind: Kind::LocationRequest,
                extra: 1
            })
        );
        // A flow report claiming more entries than its body holds.
        b.clear();
        let body = [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 3, 0, 0, 0, 1];
        seal(Kind::FlowReport as u8, &header(), &body, &k, &mut b).unwrap();
        assert_eq!(
            decode(&b, &k),
            Err(WireError::BodyTruncated {
                kind: Kind::FlowReport
            })
        );
    }
}
