//! Token transfers larger than one datagram: [`token_chunks`] encodes a
//! token once and cuts it into [`TokenChunk`]s; a [`Reassembler`] on the
//! receiving side collects the chunks of each transfer (in any order, with
//! duplicates), rejects inconsistent ones, bounds its memory and yields the
//! token when the last chunk arrives. A [`ChunkBitmap`] tells the sender
//! which chunks arrived ([`HopAck`]).

use std::net::Ipv4Addr;

use bytes::BytesMut;

use super::WireError;
use super::frame::{Header, MAX_PAYLOAD};
use super::message::{HopAck, TokenChunk};
use super::token_codec::{TokenCodecError, decode_token, encode_token};
use crate::token::Token;

/// Bytes of a token chunk body before its data: transfer (8), index (2),
/// count (2), total length (4).
pub const CHUNK_HEADER_LEN: usize = 16;

/// Token bytes in every chunk but the last (1184).
pub const CHUNK_DATA_LEN: usize = MAX_PAYLOAD - CHUNK_HEADER_LEN;

/// Most chunks in one transfer. Chosen so that a [`HopAck`] bitmap of every
/// chunk (1 KiB) fits one datagram.
pub const MAX_CHUNKS: usize = 8192;

/// Largest encoded token (9.7 MB: about 6 million VMs of a dense address
/// block with loads at 1.5 bytes each, or 3 million random sparse ones with
/// loads at 3.1 bytes each; see `docs/WIRE.md`).
pub const MAX_TOKEN_BYTES: usize = MAX_CHUNKS * CHUNK_DATA_LEN;

/// Number of chunks a token of `total_len` bytes takes; `None` if that
/// length is zero or above [`MAX_TOKEN_BYTES`].
pub(crate) fn chunk_count(total_len: u32) -> Option<u16> {
    let len = usize::try_from(total_len).ok()?;
    if len == 0 || len > MAX_TOKEN_BYTES {
        return None;
    }
    u16::try_from(len.div_ceil(CHUNK_DATA_LEN)).ok()
}

/// Data length of chunk `index` of a token of `total_len` bytes (0 if the
/// index is past the end).
pub(crate) fn chunk_data_len(total_len: u32, index: u16) -> usize {
    let start = usize::from(index) * CHUNK_DATA_LEN;
    (total_len as usize)
        .saturating_sub(start)
        .min(CHUNK_DATA_LEN)
}

/// Encodes `token` once and cuts the encoding into chunks for transfer
/// `transfer`; the chunks share one buffer. Fails if the token cannot be
/// encoded or its encoding exceeds [`MAX_TOKEN_BYTES`].
pub fn token_chunks(token: &Token, transfer: u64) -> Result<Vec<TokenChunk>, WireError> {
    let mut buf = BytesMut::new();
    encode_token(token, &mut buf)?;
    let too_large = TokenCodecError::TooLarge {
        len: buf.len(),
        max: MAX_TOKEN_BYTES,
    };
    let total_len = u32::try_from(buf.len()).map_err(|_| too_large.clone())?;
    let count = chunk_count(total_len).ok_or(too_large)?;
    let all = buf.freeze();
    Ok((0..count)
        .map(|index| {
            let start = usize::from(index) * CHUNK_DATA_LEN;
            let end = start + chunk_data_len(total_len, index);
            TokenChunk {
                transfer,
                index,
                count,
                total_len,
                data: all.slice(start..end),
            }
        })
        .collect())
}

/// Which chunks of a transfer have arrived: one bit per chunk, LSB first
/// within each byte, unused bits of the last byte zero.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ChunkBitmap {
    count: u16,
    bits: Vec<u8>,
}

impl ChunkBitmap {
    /// An empty bitmap for `count` chunks.
    pub fn new(count: u16) -> Self {
        ChunkBitmap {
            count,
            bits: vec![0; usize::from(count).div_ceil(8)],
        }
    }

    /// A full bitmap: every one of `count` chunks received.
    pub fn full(count: u16) -> Self {
        let mut b = ChunkBitmap::new(count);
        for i in 0..count {
            b.set(i);
        }
        b
    }

    /// Rebuilds a bitmap from its wire bytes; `None` if the length is not
    /// `ceil(count / 8)` or a bit past `count` is set.
    pub fn from_bytes(count: u16, bits: &[u8]) -> Option<Self> {
        if bits.len() != usize::from(count).div_ceil(8) {
            return None;
        }
        let tail = count % 8;
        if tail != 0 && bits.last().is_some_and(|&b| b >> tail != 0) {
            return None;
        }
        Some(ChunkBitmap {
            count,
            bits: bits.to_vec(),
        })
    }

    /// The wire bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    /// Number of chunks the bitmap covers.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Whether chunk `i` is marked.
    pub fn contains(&self, i: u16) -> bool {
        i < self.count && self.bits[usize::from(i / 8)] & (1 << (i % 8)) != 0
    }

    /// Marks chunk `i`; returns whether it was newly marked (false if it
    /// already was or is out of range).
    pub fn set(&mut self, i: u16) -> bool {
        if i >= self.count || self.contains(i) {
            return false;
        }
        self.bits[usize::from(i / 8)] |= 1 << (i % 8);
        true
    }

    /// Number of chunks marked.
    pub fn received(&self) -> u16 {
        self.bits.iter().map(|b| b.count_ones() as u16).sum()
    }

    /// Whether every chunk is marked.
    pub fn is_complete(&self) -> bool {
        self.received() == self.count
    }

    /// The chunks not marked, ascending: what the sender must resend.
    pub fn missing(&self) -> impl Iterator<Item = u16> + '_ {
        (0..self.count).filter(|&i| !self.contains(i))
    }
}

/// Bounds on what a [`Reassembler`] holds at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReassemblyLimits {
    /// Transfers in progress at once; the least recently touched one is
    /// dropped to make room.
    pub max_transfers: usize,
    /// Total bytes of token buffers in progress; a transfer larger than
    /// this on its own is refused.
    pub max_bytes: usize,
    /// Completed transfers remembered, so late duplicates are recognised
    /// (and re-acknowledged) instead of starting a new transfer.
    pub remember_completed: usize,
}

impl Default for ReassemblyLimits {
    /// A few transfers at once, up to two maximum-size tokens in memory.
    fn default() -> Self {
        ReassemblyLimits {
            max_transfers: 8,
            max_bytes: 2 * MAX_TOKEN_BYTES,
            remember_completed: 64,
        }
    }
}

/// What a chunk did to its transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChunkOutcome {
    /// The chunk was new; the transfer still misses some.
    Incomplete {
        /// Chunks received so far.
        received: u16,
        /// Chunks in the transfer.
        count: u16,
    },
    /// The chunk had already arrived (same bytes); nothing changed.
    Duplicate,
    /// A chunk of a transfer that already completed; acknowledge it again
    /// with [`ChunkBitmap::full`], do not pass the token on twice.
    AlreadyComplete,
    /// This chunk completed the transfer: the decoded token.
    Complete(Token),
}

/// Why a chunk was refused by the reassembler.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum ReassemblyError {
    /// The chunk is malformed on its own (index, count or lengths).
    #[error("invalid chunk: {0}")]
    Invalid(WireError),
    /// The chunk disagrees with earlier chunks of its transfer (`field`:
    /// total length, count, epoch or the bytes of a duplicate).
    #[error("chunk inconsistent with its transfer: {field}")]
    Inconsistent {
        /// What differs.
        field: &'static str,
    },
    /// The transfer alone exceeds the reassembler's byte limit.
    #[error("token transfer of {len} bytes exceeds the limit of {max}")]
    TooLarge {
        /// Total length of the transfer.
        len: usize,
        /// The configured limit.
        max: usize,
    },
    /// All chunks arrived but the token does not decode; the transfer is
    /// dropped.
    #[error("reassembled token does not decode: {0}")]
    Token(TokenCodecError),
    /// The token decoded, but its epoch is not the epoch its chunks were
    /// sent in; the transfer is dropped.
    #[error("token epoch {token} differs from its datagrams' epoch {datagram}")]
    EpochMismatch {
        /// Epoch inside the token.
        token: u64,
        /// Epoch in the chunks' headers.
        datagram: u64,
    },
}

struct Partial {
    sender: Ipv4Addr,
    transfer: u64,
    epoch: u64,
    total_len: u32,
    received: ChunkBitmap,
    buf: Vec<u8>,
    touched: u64,
}

/// Collects token chunks per (sender, transfer) until a token is complete.
/// Pure state, no clock: the agent drops stale transfers with
/// [`Reassembler::discard_below_epoch`] or [`Reassembler::remove`] on its
/// own time-outs.
pub struct Reassembler {
    limits: ReassemblyLimits,
    partials: Vec<Partial>,
    bytes: usize,
    completed: std::collections::VecDeque<(Ipv4Addr, u64, u16)>,
    tick: u64,
}

impl Default for Reassembler {
    fn default() -> Self {
        Reassembler::new(ReassemblyLimits::default())
    }
}

impl Reassembler {
    /// An empty reassembler with the given bounds.
    pub fn new(limits: ReassemblyLimits) -> Self {
        Reassembler {
            limits,
            partials: Vec::new(),
            bytes: 0,
            completed: std::collections::VecDeque::new(),
            tick: 0,
        }
    }

    /// Adds a chunk received in a datagram with `header` (already checked:
    /// MAC, epoch, replay). Chunks of one transfer may come in any order and
    /// more than once.
    pub fn insert(
        &mut self,
        header: &Header,
        chunk: &TokenChunk,
    ) -> Result<ChunkOutcome, ReassemblyError> {
        chunk.validate().map_err(ReassemblyError::Invalid)?;
        let key = (header.sender, chunk.transfer);
        if self.completed.iter().any(|&(s, t, _)| (s, t) == key) {
            return Ok(ChunkOutcome::AlreadyComplete);
        }
        self.tick += 1;
        let at = match self.find(key) {
            Some(i) => i,
            None => self.start(header, chunk)?,
        };
        let p = &mut self.partials[at];
        p.touched = self.tick;
        if p.total_len != chunk.total_len {
            return Err(ReassemblyError::Inconsistent {
                field: "total length",
            });
        }
        if p.received.count() != chunk.count {
            return Err(ReassemblyError::Inconsistent { field: "count" });
        }
        if p.epoch != header.epoch {
            return Err(ReassemblyError::Inconsistent { field: "epoch" });
        }
        let start = usize::from(chunk.index) * super::CHUNK_DATA_LEN;
        let range = start..start + chunk.data.len();
        if p.received.contains(chunk.index) {
            return if p.buf[range] == chunk.data[..] {
                Ok(ChunkOutcome::Duplicate)
            } else {
                Err(ReassemblyError::Inconsistent { field: "data" })
            };
        }
        p.buf[range].copy_from_slice(&chunk.data);
        p.received.set(chunk.index);
        if !p.received.is_complete() {
            return Ok(ChunkOutcome::Incomplete {
                received: p.received.received(),
                count: p.received.count(),
            });
        }
        let p = self.take(at);
        let token = decode_token(&p.buf).map_err(ReassemblyError::Token)?;
        if token.epoch != p.epoch {
            return Err(ReassemblyError::EpochMismatch {
                token: token.epoch,
                datagram: p.epoch,
            });
        }
        if self.limits.remember_completed > 0 {
            if self.completed.len() >= self.limits.remember_completed {
                self.completed.pop_front();
            }
            self.completed
                .push_back((p.sender, p.transfer, p.received.count()));
        }
        Ok(ChunkOutcome::Complete(token))
    }

    /// The acknowledgement to send for a transfer: its bitmap so far, a full
    /// one if it completed recently, `None` if it is unknown.
    pub fn ack(&self, sender: Ipv4Addr, transfer: u64) -> Option<HopAck> {
        if let Some(&(_, _, count)) = self
            .completed
            .iter()
            .find(|&&(s, t, _)| (s, t) == (sender, transfer))
        {
            return Some(HopAck {
                transfer,
                received: ChunkBitmap::full(count),
            });
        }
        let i = self.find((sender, transfer))?;
        Some(HopAck {
            transfer,
            received: self.partials[i].received.clone(),
        })
    }

    /// Drops a transfer in progress (e.g. on the agent's time-out); returns
    /// whether there was one.
    pub fn remove(&mut self, sender: Ipv4Addr, transfer: u64) -> bool {
        match self.find((sender, transfer)) {
            Some(i) => {
                self.take(i);
                true
            }
            None => false,
        }
    }

    /// Drops every transfer in progress from an epoch below `epoch` (a
    /// newer token exists, the old one must not be completed).
    pub fn discard_below_epoch(&mut self, epoch: u64) {
        let mut i = 0;
        while i < self.partials.len() {
            if self.partials[i].epoch < epoch {
                self.take(i);
            } else {
                i += 1;
            }
        }
    }

    /// Transfers in progress.
    pub fn in_progress(&self) -> usize {
        self.partials.len()
    }

    /// Bytes of token buffers held by transfers in progress.
    pub fn buffered_bytes(&self) -> usize {
        self.bytes
    }

    fn find(&self, key: (Ipv4Addr, u64)) -> Option<usize> {
        self.partials
            .iter()
            .position(|p| (p.sender, p.transfer) == key)
    }

    fn take(&mut self, i: usize) -> Partial {
        let p = self.partials.swap_remove(i);
        self.bytes -= p.buf.len();
        p
    }

    /// Starts a transfer, evicting the least recently touched ones until it
    /// fits the limits. Its buffer is allocated only now, with a length
    /// already bounded by `MAX_TOKEN_BYTES` and by the limits.
    fn start(&mut self, header: &Header, chunk: &TokenChunk) -> Result<usize, ReassemblyError> {
        let len = chunk.total_len as usize; // validated <= MAX_TOKEN_BYTES
        if len > self.limits.max_bytes || self.limits.max_transfers == 0 {
            return Err(ReassemblyError::TooLarge {
                len,
                max: self.limits.max_bytes,
            });
        }
        while self.partials.len() >= self.limits.max_transfers
            || self.bytes + len > self.limits.max_bytes
        {
            let oldest = self
                .partials
                .iter()
                .enumerate()
                .min_by_key(|(_, p)| p.touched)
                .map(|(i, _)| i);
            match oldest {
                Some(i) => {
                    self.take(i);
                }
                None => break,
            }
        }
        self.partials.push(Partial {
            sender: header.sender,
            transfer: chunk.transfer,
            epoch: header.epoch,
            total_len: chunk.total_len,
            received: ChunkBitmap::new(chunk.count),
            buf: vec![0; len],
            touched: self.tick,
        });
        self.bytes += len;
        Ok(self.partials.len() - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::Load;

    fn header(epoch: u64) -> Header {
        Header {
            sender: Ipv4Addr::new(10, 0, 0, 1),
            epoch,
            seq: 0,
            ..Header::default()
        }
    }

    /// A token whose encoding needs several chunks: sparse IDs with loads.
    fn big_token(epoch: u64, n: u32) -> Token {
        let mut t = Token::new(epoch, (0..n).map(|i| i.wrapping_mul(2_654_435_761)));
        for (i, id) in t
            .entries()
            .iter()
            .map(|e| e.id)
            .collect::<Vec<_>>()
            .into_iter()
            .enumerate()
        {
            t.update(id, (i % 4) as u8, Load((i % 251) as u8));
        }
        t
    }

    #[test]
    fn chunk_arithmetic() {
        assert_eq!(chunk_count(0), None);
        assert_eq!(chunk_count(1), Some(1));
        assert_eq!(chunk_count(CHUNK_DATA_LEN as u32), Some(1));
        assert_eq!(chunk_count(CHUNK_DATA_LEN as u32 + 1), Some(2));
        assert_eq!(chunk_count(MAX_TOKEN_BYTES as u32), Some(MAX_CHUNKS as u16));
        assert_eq!(chunk_count(MAX_TOKEN_BYTES as u32 + 1), None);
        assert_eq!(chunk_data_len(CHUNK_DATA_LEN as u32 + 1, 1), 1);
        assert_eq!(chunk_data_len(10, 1), 0);
    }

    #[test]
    fn bitmap_tracks_chunks() {
        let mut b = ChunkBitmap::new(10);
        assert_eq!(b.as_bytes().len(), 2);
        assert!(b.set(9));
        assert!(!b.set(9));
        assert!(!b.set(10));
        assert_eq!(b.received(), 1);
        assert_eq!(b.missing().count(), 9);
        assert_eq!(ChunkBitmap::from_bytes(10, b.as_bytes()), Some(b.clone()));
        assert_eq!(ChunkBitmap::from_bytes(10, &[0, 0x04]), None);
        assert_eq!(ChunkBitmap::from_bytes(10, &[0]), None);
        assert!(ChunkBitmap::full(10).is_complete());
    }

    #[test]
    fn reassembles_in_reverse_with_duplicates() {
        let t = big_token(4, 5000);
        let chunks = token_chunks(&t, 77).unwrap();
        assert!(chunks.len() > 2, "{}", chunks.len());
        let mut r = Reassembler::default();
        let h = header(4);
        let n = chunks.len();
        for (i, c) in chunks.iter().rev().enumerate() {
            let out = r.insert(&h, c).unwrap();
            if i + 1 < n {
                assert_eq!(
                    out,
                    ChunkOutcome::Incomplete {
                        received: i as u16 + 1,
                        count: n as u16
                    }
                );
                assert_eq!(r.insert(&h, c).unwrap(), ChunkOutcome::Duplicate);
            } else {
                assert_eq!(out, ChunkOutcome::Complete(t.clone()));
            }
        }
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.buffered_bytes(), 0);
        assert_eq!(
            r.insert(&h, &chunks[0]).unwrap(),
            ChunkOutcome::AlreadyComplete
        );
        assert!(r.ack(h.sender, 77).unwrap().received.is_complete());
    }

    #[test]
    fn inconsistent_chunks_are_refused() {
        let chunks = token_chunks(&big_token(1, 5000), 1).unwrap();
        let mut r = Reassembler::default();
        r.insert(&header(1), &chunks[0]).unwrap();
        assert_eq!(
            r.insert(&header(2), &chunks[1]),
            Err(ReassemblyError::Inconsistent { field: "epoch" })
        );
        let mut forged = chunks[0].clone();
        let mut data = forged.data.to_vec();
        data[0] ^= 1;
        forged.data = data.into();
        assert_eq!(
            r.insert(&header(1), &forged),
            Err(ReassemblyError::Inconsistent { field: "data" })
        );
        let mut short = chunks[1].clone();
        short.data = short.data.slice(1..);
        assert!(matches!(
            r.insert(&header(1), &short),
            Err(ReassemblyError::Invalid(_))
        ));
        let ack = r.ack(header(1).sender, 1).unwrap();
        assert_eq!(ack.received.missing().next(), Some(1));
    }

    #[test]
    fn token_epoch_must_match_datagrams() {
        let chunks = token_chunks(&Token::new(3, [1, 2, 3]), 9).unwrap();
        assert_eq!(chunks.len(), 1);
        let mut r = Reassembler::default();
        assert_eq!(
            r.insert(&header(4), &chunks[0]),
            Err(ReassemblyError::EpochMismatch {
                token: 3,
                datagram: 4
            })
        );
    }

    #[test]
    fn memory_is_bounded_by_evicting_the_oldest() {
        let chunks = token_chunks(&big_token(1, 400), 0).unwrap();
        assert_eq!(chunks.len(), 2);
        let limits = ReassemblyLimits {
            max_transfers: 2,
            max_bytes: 5 * CHUNK_DATA_LEN,
            remember_completed: 4,
        };
        let mut r = Reassembler::new(limits);
        for transfer in 0..5u64 {
            let mut c = chunks[0].clone();
            c.transfer = transfer;
            assert!(matches!(
                r.insert(&header(1), &c),
                Ok(ChunkOutcome::Incomplete { .. })
            ));
            assert!(r.in_progress() <= 2);
            assert!(r.buffered_bytes() <= 5 * CHUNK_DATA_LEN);
        }
        // Transfers 3 and 4 are kept, the older ones were evicted.
        let s = header(1).sender;
        assert!(r.ack(s, 2).is_none());
        assert_eq!(r.ack(s, 3).unwrap().received.received(), 1);
        assert_eq!(r.ack(s, 4).unwrap().received.received(), 1);
        r.discard_below_epoch(2);
        assert_eq!(r.in_progress(), 0);
        assert_eq!(r.buffered_bytes(), 0);

        let mut tiny = Reassembler::new(ReassemblyLimits {
            max_bytes: CHUNK_DATA_LEN,
            ..limits
        });
        assert!(matches!(
            tiny.insert(&header(1), &chunks[0]),
            Err(ReassemblyError::TooLarge { .. })
        ));
    }
}
