//! Wire format of every peer message (paper §III-D/F; docs/PROTOCOL.md): a versioned binary datagram authenticated with the cluster key.
//!
//! Layout, byte order and the reasons behind them are in `docs/WIRE.md`.
//! Decoding is done in two steps: [`Frame::check`] validates the frame and
//! its MAC, then [`Message::parse`] parses the body; [`decode`] does both.
//! Nothing here panics on input bytes, and nothing allocates in proportion to
//! a length an attacker claims before that length is checked against the
//! bytes actually received.
//!
//! - [`auth`]: the cluster key, the key ring of a rotation, HMAC-SHA256.
//! - [`frame`]: the datagram header, sealing and checking a frame.
//! - [`message`]: the message bodies (the swap messages too:
//!   propose, accept or refuse, commit, done; and an ejection chain's
//!   propose and accept).
//! - [`token_codec`]: the compact token encoding.
//! - [`chunk`]: splitting an encoded token into datagrams, and reassembly.
//! - [`parts`]: reassembly of flow reports and token orders sent in parts.
//! - [`replay`]: freshness by send time, incarnation and per-sender replay
//!   windows over sequence numbers.

pub mod auth;
pub mod chunk;
pub mod frame;
pub mod message;
pub mod parts;
pub mod replay;
pub mod token_codec;

use std::net::Ipv4Addr;

pub use auth::{ClusterKey, KeyError, KeyRing, MAC_LEN, MIN_KEY_LEN, Verifier};
pub use chunk::{
    CHUNK_DATA_LEN, CHUNK_HEADER_LEN, ChunkBitmap, ChunkOutcome, MAX_CHUNKS, MAX_TOKEN_BYTES,
    Reassembler, ReassemblyError, ReassemblyLimits, token_chunks,
};
pub use frame::{Frame, HEADER_LEN, Header, MAGIC, MAX_DATAGRAM, MAX_PAYLOAD, VERSION, seal};
pub use message::{
    Datagram, EjectAcceptance, FlowEntry, FlowReport, HopAck, MAX_FLOW_ENTRIES, MAX_GROUP_VMS,
    MAX_MEMBER_VMS, MAX_ORDER_VMS, MAX_ROTATION_PEERS, MAX_SWAP_PEERS, Message, RotationAcceptance,
    RotationLeg, RotationProposal, SwapAcceptance, SwapOrder, SwapProposal, SwapRefusal,
    SwapResult, TokenChunk, TokenOrder,
};
pub use parts::{PartsAssembler, PartsError, PartsLimits, PartsOutcome};
pub use replay::{Freshness, REPLAY_WINDOW, ReplayTable, ReplayWindow, SeqCounter};
pub use token_codec::{TOKEN_FORMAT, TokenCodecError, decode_token, encode_token};

/// The kind byte of a datagram: which message its payload holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum Kind {
    /// One chunk of an encoded token.
    TokenChunk = 1,
    /// Acknowledgement of the chunks of a token transfer.
    HopAck = 2,
    /// "Who hosts VM v?", sent to v's own address.
    LocationRequest = 3,
    /// The answer: the host of VM v.
    LocationResponse = 4,
    /// "How much room do you have?", sent to a candidate host.
    CapacityRequest = 5,
    /// The answer: free VM slots and free memory.
    CapacityResponse = 6,
    /// A VM moved from one host to another (invalidates location caches).
    MigrationNotice = 7,
    /// A host's measured flows, for the global policy's coordinator.
    FlowReport = 8,
    /// The coordinator's token order for the global policy.
    TokenOrder = 9,
    /// The token is alive (holder to watchers) or was regenerated.
    TokenSeen = 10,
    /// A swap proposal to a full candidate host.
    SwapPropose = 11,
    /// The asked host accepts a swap and names the partner.
    SwapAccept = 12,
    /// The asked host refuses a swap.
    SwapRefuse = 13,
    /// Move the partner of an accepted swap now, or release it.
    SwapCommit = 14,
    /// The asked host's part of a swap has ended.
    SwapDone = 15,
    /// VMs the token lacks: a watcher to the holder.
    Members = 16,
    /// An ejection chain proposal to a full candidate host.
    EjectPropose = 17,
    /// The asked host accepts a chain: the VM it ejects and where to.
    EjectAccept = 18,
    /// A rotation proposal: to a full candidate host, or from it to a
    /// third full host that would close the cycle.
    RotatePropose = 19,
    /// A rotation is closed: its three VMs, their hosts and its benefit.
    RotateAccept = 20,
    /// A group move's slots: reserve one for each VM named, all or none.
    GroupReserve = 21,
    /// Release the slots a group reservation made.
    GroupRelease = 22,
}

impl Kind {
    /// Every kind, in wire-value order.
    pub const ALL: [Kind; 22] = [
        Kind::TokenChunk,
        Kind::HopAck,
        Kind::LocationRequest,
        Kind::LocationResponse,
        Kind::CapacityRequest,
        Kind::CapacityResponse,
        Kind::MigrationNotice,
        Kind::FlowReport,
        Kind::TokenOrder,
        Kind::TokenSeen,
        Kind::SwapPropose,
        Kind::SwapAccept,
        Kind::SwapRefuse,
        Kind::SwapCommit,
        Kind::SwapDone,
        Kind::Members,
        Kind::EjectPropose,
        Kind::EjectAccept,
        Kind::RotatePropose,
        Kind::RotateAccept,
        Kind::GroupReserve,
        Kind::GroupRelease,
    ];

    /// The kind a wire byte stands for, if any.
    pub fn from_u8(b: u8) -> Option<Kind> {
        Kind::ALL.get(usize::from(b).wrapping_sub(1)).copied()
    }

    /// A short lowercase name, for metrics labels and logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::TokenChunk => "token_chunk",
            Kind::HopAck => "hop_ack",
            Kind::LocationRequest => "location_request",
            Kind::LocationResponse => "location_response",
            Kind::CapacityRequest => "capacity_request",
            Kind::CapacityResponse => "capacity_response",
            Kind::MigrationNotice => "migration_notice",
            Kind::FlowReport => "flow_report",
            Kind::TokenOrder => "token_order",
            Kind::TokenSeen => "token_seen",
            Kind::SwapPropose => "swap_propose",
            Kind::SwapAccept => "swap_accept",
            Kind::SwapRefuse => "swap_refuse",
            Kind::SwapCommit => "swap_commit",
            Kind::SwapDone => "swap_done",
            Kind::Members => "members",
            Kind::EjectPropose => "eject_propose",
            Kind::EjectAccept => "eject_accept",
            Kind::RotatePropose => "rotate_propose",
            Kind::RotateAccept => "rotate_accept",
            Kind::GroupReserve => "group_reserve",
            Kind::GroupRelease => "group_release",
        }
    }
}

/// Why a datagram was rejected (or could not be built).
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum WireError {
    /// The datagram is shorter than a header and a MAC, or than the payload
    /// its header declares.
    #[error("datagram truncated: {len} bytes, at least {needed} needed")]
    Truncated {
        /// Bytes received.
        len: usize,
        /// Bytes the frame needs.
        needed: usize,
    },
    /// The first four bytes are not [`MAGIC`].
    #[error("bad magic")]
    BadMagic,
    /// The version byte is not one this build speaks.
    #[error("unsupported version {0} (this build speaks {VERSION})")]
    BadVersion(u8),
    /// The kind byte names no known message.
    #[error("unknown message kind {0}")]
    UnknownKind(u8),
    /// The declared payload length exceeds [`MAX_PAYLOAD`], or the datagram
    /// carries more bytes than header, payload and MAC.
    #[error("bad length: header declares {declared} payload bytes, datagram has {actual}")]
    BadLength {
        /// Payload length in the header.
        declared: usize,
        /// Payload bytes actually present (datagram minus header and MAC).
        actual: usize,
    },
    /// The MAC does not match: wrong key, forged or altered datagram.
    #[error("bad mac")]
    BadMac,
    /// The datagram is from an older token epoch than the current one.
    #[error("stale epoch {got}, current is {current}")]
    StaleEpoch {
        /// Epoch in the datagram.
        got: u64,
        /// The receiver's current epoch.
        current: u64,
    },
    /// The datagram was sealed for another address than the one it
    /// arrived on (a captured datagram sent on to another VM or host).
    #[error("datagram sealed for {sealed_for}, received on {received_on}")]
    WrongDestination {
        /// The destination in the header.
        sealed_for: Ipv4Addr,
        /// Where it arrived.
        received_on: Ipv4Addr,
    },
    /// The datagram was sealed too long ago, before the receiver started,
    /// or too far in the receiver's future.
    #[error(
        "datagram sealed at {sent_at_ms} ms is not fresh at {now_ms} ms (accepted: {floor_ms} ms on)"
    )]
    NotFresh {
        /// Send time in the header, ms since the Unix epoch.
        sent_at_ms: u64,
        /// The receiver's time.
        now_ms: u64,
        /// The oldest send time accepted then: the receiver's start, or
        /// `now_ms` less the greatest age, whichever is later.
        floor_ms: u64,
    },
    /// The sender has since restarted: its datagram is from an older
    /// incarnation than one already accepted.
    #[error("incarnation {got} of the sender is older than {current}")]
    OldIncarnation {
        /// Incarnation in the header.
        got: u32,
        /// The newest incarnation accepted from that sender.
        current: u32,
    },
    /// The sequence number was already accepted from this sender, or is too
    /// far behind the newest one to tell.
    #[error("replayed or too old sequence number {seq}")]
    Replayed {
        /// The rejected sequence number.
        seq: u64,
    },
    /// The body is shorter than its kind requires.
    #[error("{} body truncated", kind.name())]
    BodyTruncated {
        /// Kind of the message.
        kind: Kind,
    },
    /// The body has bytes left over after its last field.
    #[error("{} body has {extra} trailing bytes", kind.name())]
    TrailingBytes {
        /// Kind of the message.
        kind: Kind,
        /// Bytes left over.
        extra: usize,
    },
    /// A body field holds a value the protocol forbids.
    #[error("{} body: invalid {field}", kind.name())]
    InvalidField {
        /// Kind of the message.
        kind: Kind,
        /// Which field.
        field: &'static str,
    },
    /// Encoding: the body would not fit in [`MAX_PAYLOAD`] bytes.
    #[error("payload of {len} bytes exceeds the maximum of {MAX_PAYLOAD}")]
    PayloadTooLarge {
        /// Size of the body.
        len: usize,
    },
    /// Encoding a token failed, or its encoding exceeds [`MAX_TOKEN_BYTES`].
    #[error("token encoding: {0}")]
    Token(#[from] TokenCodecError),
}

impl WireError {
    /// A short lowercase reason, for a bounded metrics label
    /// (`score_datagrams_rejected_total{reason=...}`).
    pub fn reason(&self) -> &'static str {
        match self {
            WireError::Truncated { .. } => "truncated",
            WireError::BadMagic => "bad_magic",
            WireError::BadVersion(_) => "bad_version",
            WireError::UnknownKind(_) => "unknown_kind",
            WireError::BadLength { .. } => "bad_length",
            WireError::BadMac => "bad_mac",
            WireError::StaleEpoch { .. } => "stale_epoch",
            WireError::Replayed { .. } => "replayed",
            WireError::WrongDestination { .. } => "wrong_destination",
            WireError::NotFresh { .. } => "not_fresh",
            WireError::OldIncarnation { .. } => "old_incarnation",
            WireError::BodyTruncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::InvalidField { .. } => "bad_body",
            WireError::PayloadTooLarge { .. } => "too_large",
            WireError::Token(_) => "bad_token",
        }
    }

    /// The reason in the agent's bounded set ([`RejectReason`]): the
    /// malformed bodies, oversized payloads and bad tokens are `Other`.
    pub fn reject_reason(&self) -> RejectReason {
        match self {
            WireError::Truncated { .. } => RejectReason::Truncated,
            WireError::BadMagic => RejectReason::BadMagic,
            WireError::BadVersion(_) => RejectReason::BadVersion,
            WireError::UnknownKind(_) => RejectReason::UnknownKind,
            WireError::BadLength { .. } => RejectReason::BadLength,
            WireError::BadMac => RejectReason::BadMac,
            WireError::StaleEpoch { .. } => RejectReason::StaleEpoch,
            WireError::Replayed { .. } => RejectReason::Replayed,
            WireError::WrongDestination { .. } => RejectReason::WrongDestination,
            WireError::NotFresh { .. } => RejectReason::NotFresh,
            WireError::OldIncarnation { .. } => RejectReason::OldIncarnation,
            WireError::BodyTruncated { .. }
            | WireError::TrailingBytes { .. }
            | WireError::InvalidField { .. }
            | WireError::PayloadTooLarge { .. }
            | WireError::Token(_) => RejectReason::Other,
        }
    }
}

/// Why a datagram was dropped, as the agent counts it
/// (`score_datagrams_rejected_total{reason}`).
/// A fixed set, so that hostile input cannot grow the label space.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RejectReason {
    /// Shorter than a header and MAC, or than its declared payload.
    Truncated,
    /// Not an S-CORE datagram.
    BadMagic,
    /// A protocol version this build does not speak.
    BadVersion,
    /// A message kind this build does not know.
    UnknownKind,
    /// Declared and actual lengths disagree.
    BadLength,
    /// Authentication failed (wrong key, forged or altered).
    BadMac,
    /// From an older token epoch.
    StaleEpoch,
    /// A sequence number already seen (or too old to tell).
    Replayed,
    /// Sealed for another address than the one it arrived on.
    WrongDestination,
    /// Sealed too long ago, or before this agent started.
    NotFresh,
    /// From an incarnation of the sender older than one already heard.
    OldIncarnation,
    /// Anything else (a malformed body, for example).
    Other,
}

impl RejectReason {
    /// Every reason, in label order.
    pub const ALL: [RejectReason; 12] = [
        Self::Truncated,
        Self::BadMagic,
        Self::BadVersion,
        Self::UnknownKind,
        Self::BadLength,
        Self::BadMac,
        Self::StaleEpoch,
        Self::Replayed,
        Self::WrongDestination,
        Self::NotFresh,
        Self::OldIncarnation,
        Self::Other,
    ];

    /// The label value.
    pub fn label(self) -> &'static str {
        match self {
            Self::Truncated => "truncated",
            Self::BadMagic => "bad_magic",
            Self::BadVersion => "bad_version",
            Self::UnknownKind => "unknown_kind",
            Self::BadLength => "bad_length",
            Self::BadMac => "bad_mac",
            Self::StaleEpoch => "stale_epoch",
            Self::Replayed => "replayed",
            Self::WrongDestination => "wrong_destination",
            Self::NotFresh => "not_fresh",
            Self::OldIncarnation => "old_incarnation",
            Self::Other => "other",
        }
    }

    /// The reason named by `label` (for instance
    /// [`WireError::reason()`]); any label outside the fixed set is `Other`.
    pub fn from_label(label: &str) -> Self {
        Self::ALL
            .into_iter()
            .find(|r| r.label() == label)
            .unwrap_or(Self::Other)
    }
}

/// Decodes one datagram: checks the frame and its MAC with `key`, then
/// parses the body. Never panics, whatever the bytes.
pub fn decode<K: Verifier + ?Sized>(bytes: &[u8], key: &K) -> Result<Datagram, WireError> {
    let frame = Frame::check(bytes, key)?;
    let message = Message::parse(frame.kind, frame.payload)?;
    Ok(Datagram {
        header: frame.header,
        message,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_reject_reason_agrees_with_its_label() {
        use super::{RejectReason, WireError};
        let errors = [
            WireError::BadMagic,
            WireError::BadMac,
            WireError::BadVersion(9),
            WireError::UnknownKind(200),
        ];
        for e in errors {
            assert_eq!(e.reject_reason(), RejectReason::from_label(e.reason()));
        }
        for r in RejectReason::ALL {
            assert_eq!(RejectReason::from_label(r.label()), r);
        }
        assert_eq!(RejectReason::from_label("too_large"), RejectReason::Other);
    }
    use super::*;

    #[test]
    fn kind_bytes_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_u8(k as u8), Some(k));
        }
        assert_eq!(Kind::from_u8(0), None);
        assert_eq!(Kind::from_u8(15), Some(Kind::SwapDone));
        assert_eq!(Kind::from_u8(16), Some(Kind::Members));
        assert_eq!(Kind::from_u8(18), Some(Kind::EjectAccept));
        assert_eq!(Kind::from_u8(20), Some(Kind::RotateAccept));
        assert_eq!(Kind::from_u8(21), Some(Kind::GroupReserve));
        assert_eq!(Kind::from_u8(22), Some(Kind::GroupRelease));
        assert_eq!(Kind::from_u8(23), None);
        assert_eq!(Kind::from_u8(255), None);
    }
}
