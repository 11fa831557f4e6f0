//! Compact encoding of the token (the paper's baseline is 5 bytes per VM:
//! 32-bit ID and 8-bit level). IDs are sorted, so only the gaps between
//! them are written, Rice-coded with a parameter the encoder picks per token;
//! levels take only the bits the deepest level needs; visited flags and
//! loads are written only when some entry has one. A dense address block
//! costs about 1 bit per ID; random sparse IDs cost about log2(span/n) + 2
//! bits. Layout and measured sizes are in `docs/WIRE.md`.
//!
//! ```text
//! byte 0   format (1)
//! byte 1   flags: bit 0 loads present, bit 1 holder present,
//!                 bit 2 visited flags present; other bits zero
//! byte 2   params: bits 0-4 Rice parameter k (0..=31),
//!                  bits 5-7 level width w (0..=4)
//! varint   epoch (LEB128, u64)
//! varint   round (LEB128, u32)
//! [4]      holder VM ID, big-endian (if flag)
//! varint   number of entries n
//! bits     n entries, LSB-first bit stream, zero-padded to a byte:
//!            ID: first entry 32 raw bits; then gap g = id - prev - 1 as
//!                q = g >> k in unary (q ones, one zero) and k low bits,
//!                or, if q >= 16, sixteen ones and g in 32 raw bits
//!            level: w bits; visited: 1 bit (if flag); load: 8 bits (if flag)
//! ```

use bytes::{BufMut, BytesMut};

use crate::token::{Load, MAX_LEVEL, Token, TokenEntry, VmId};

/// Format byte of the token encoding.
pub const TOKEN_FORMAT: u8 = 1;

const FLAG_LOADS: u8 = 1;
const FLAG_HOLDER: u8 = 2;
const FLAG_VISITED: u8 = 4;
const FLAGS_KNOWN: u8 = FLAG_LOADS | FLAG_HOLDER | FLAG_VISITED;

/// A gap whose Rice quotient reaches this many ones is written raw instead,
/// so one large gap in an otherwise dense block costs 48 bits, not thousands.
const ESCAPE: u32 = 16;

/// Largest level width: [`MAX_LEVEL`] = 15 fits four bits.
const MAX_LEVEL_BITS: u32 = 4;

/// Entries reserved up front when decoding; a longer token grows the vector
/// as entries are actually decoded, so a claimed count costs no memory
/// until the bytes back it.
const PREALLOC_ENTRIES: usize = 1 << 16;

/// Why a token could not be encoded or decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TokenCodecError {
    /// An entry's level exceeds [`MAX_LEVEL`] (encoding).
    #[error("vm {vm} has level {level}, above the maximum {MAX_LEVEL}")]
    LevelTooHigh {
        /// The VM.
        vm: VmId,
        /// Its level.
        level: u8,
    },
    /// Entry IDs are not strictly increasing (encoding; an ID was changed
    /// in place through `Token::get_mut`).
    #[error("token entries not strictly increasing at vm {vm}")]
    NotSorted {
        /// The first out-of-order ID.
        vm: VmId,
    },
    /// The encoding ends before its last field.
    #[error("token encoding truncated")]
    Truncated,
    /// The format byte is not [`TOKEN_FORMAT`].
    #[error("unknown token format {0}")]
    BadFormat(u8),
    /// Flag bits this format does not define are set.
    #[error("reserved token flag bits set: {0:#04x}")]
    ReservedFlags(u8),
    /// The level width is above 4 bits.
    #[error("token level width {0} exceeds 4 bits")]
    BadLevelWidth(u8),
    /// A varint is longer than its type allows or overflows it.
    #[error("malformed varint in token {0}")]
    BadVarint(&'static str),
    /// The entry count cannot fit in the bytes that follow it.
    #[error("token claims {claimed} entries, the bytes hold at most {max}")]
    CountTooLarge {
        /// Count in the encoding.
        claimed: u64,
        /// Most entries the remaining bytes could hold.
        max: u64,
    },
    /// A gap takes an ID past 255.255.255.255.
    #[error("token vm id overflows 32 bits")]
    IdOverflow,
    /// Bytes, or non-zero padding bits, after the last entry.
    #[error("trailing data after the last token entry")]
    TrailingData,
    /// The encoding is larger than a token transfer may be.
    #[error("token encoding of {len} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// Largest allowed.
        max: usize,
    },
}

/// Appends the compact encoding of `token` to `out`. Fails only if an entry
/// was edited in place (through `Token::get_mut`) to a level above
/// [`MAX_LEVEL`] or to an ID out of order; `out` is then left as it was.
///
/// The agent encodes the whole token at every hop (30,720 VMs in the
/// paper's data centre), so this is written for speed: one pass to check
/// the entries, one to price the Rice parameters, then the exact size is
/// reserved and the bits are written 32 at a time.
pub fn encode_token(token: &Token, out: &mut BytesMut) -> Result<(), TokenCodecError> {
    let entries = token.entries();
    let mut max_level = 0u8;
    let mut loads = false;
    let mut visited = false;
    let mut prev: Option<VmId> = None;
    for e in entries {
        // `Token::get_mut` hands out `&mut TokenEntry`, so an ID may have
        // been changed in place; the gap code needs them strictly rising.
        if prev.is_some_and(|p| p >= e.id) {
            return Err(TokenCodecError::NotSorted { vm: e.id });
        }
        prev = Some(e.id);
        if e.level > MAX_LEVEL {
            return Err(TokenCodecError::LevelTooHigh {
                vm: e.id,
                level: e.level,
            });
        }
        max_level = max_level.max(e.level);
        loads |= e.load.0 != 0;
        visited |= e.visited;
    }
    let w = u32::from(u8::BITS as u8 - max_level.leading_zeros() as u8);
    let (k, gap_bits) = choose_rice_parameter(entries);
    let field_bits = w + u32::from(visited) + if loads { 8 } else { 0 };

    let mut flags = 0u8;
    if loads {
        flags |= FLAG_LOADS;
    }
    if token.holder.is_some() {
        flags |= FLAG_HOLDER;
    }
    if visited {
        flags |= FLAG_VISITED;
    }
    let stream_bits = if entries.is_empty() {
        0
    } else {
        32 + gap_bits + entries.len() as u64 * u64::from(field_bits)
    };
    // Header (3), two varints (at most 10 + 5), holder (4), count (at most
    // 10), then the bit stream and the 4-byte flushes' slack.
    out.reserve(32 + stream_bits.div_ceil(8) as usize + 4);
    out.put_u8(TOKEN_FORMAT);
    out.put_u8(flags);
    out.put_u8((k as u8) | ((w as u8) << 5));
    put_varint(out, token.epoch);
    put_varint(out, u64::from(token.round));
    if let Some(h) = token.holder {
        out.put_u32(h);
    }
    put_varint(out, entries.len() as u64);

    let mut bits = BitWriter::new(out, stream_bits);
    let low_k = (1u64 << k) - 1;
    let mut prev: Option<VmId> = None;
    for e in entries {
        // Level, visited flag and load, packed LSB first as the format
        // writes them one after the other.
        let mut fields = u64::from(e.level);
        let mut at = w;
        if visited {
            fields |= u64::from(e.visited) << at;
            at += 1;
        }
        if loads {
            fields |= u64::from(e.load.0) << at;
        }
        match prev {
            None => {
                bits.put(u64::from(e.id), 32);
                bits.put(fields, field_bits);
            }
            Some(p) => {
                // Entries are strictly increasing (checked above).
                let gap = e.id - p - 1;
                let q = gap >> k;
                if q < ESCAPE {
                    // q ones, the terminating zero, k low bits of the gap
                    // and the fields: at most 15 + 1 + 31 + 13 = 60 bits.
                    let code = ((1u64 << q) - 1)
                        | ((u64::from(gap) & low_k) << (q + 1))
                        | (fields << (q + 1 + k));
                    let len = q + 1 + k + field_bits;
                    if len <= 32 {
                        bits.put(code, len);
                    } else {
                        bits.put(code, 32);
                        bits.put(code >> 32, len - 32);
                    }
                } else {
                    bits.put((1u64 << ESCAPE) - 1, ESCAPE);
                    bits.put(u64::from(gap), 32);
                    bits.put(fields, field_bits);
                }
            }
        }
        prev = Some(e.id);
    }
    bits.finish();
    Ok(())
}

/// Decodes a token encoded by [`encode_token`], validating every field:
/// known format and flags, level width at most 4 bits (so levels <= 15),
/// IDs strictly increasing within 32 bits, an entry count the bytes can
/// back, zero padding and nothing after the last entry.
pub fn decode_token(bytes: &[u8]) -> Result<Token, TokenCodecError> {
    let mut r = ByteReader {
        data: bytes,
        pos: 0,
    };
    let format = r.u8()?;
    if format != TOKEN_FORMAT {
        return Err(TokenCodecError::BadFormat(format));
    }
    let flags = r.u8()?;
    if flags & !FLAGS_KNOWN != 0 {
        return Err(TokenCodecError::ReservedFlags(flags & !FLAGS_KNOWN));
    }
    let params = r.u8()?;
    let k = u32::from(params & 0x1f);
    let w_raw = params >> 5;
    let w = u32::from(w_raw);
    if w > MAX_LEVEL_BITS {
        return Err(TokenCodecError::BadLevelWidth(w_raw));
    }
    let epoch = r.varint("epoch")?;
    let round =
        u32::try_from(r.varint("round")?).map_err(|_| TokenCodecError::BadVarint("round"))?;
    let holder = if flags & FLAG_HOLDER != 0 {
        Some(r.u32()?)
    } else {
        None
    };
    let claimed = r.varint("count")?;
    let has_loads = flags & FLAG_LOADS != 0;
    let has_visited = flags & FLAG_VISITED != 0;

    // Every entry after the first takes at least 1 + k bits of ID, plus its
    // level, visited and load bits; the first takes 32 bits of ID instead.
    let fields = w + u32::from(has_visited) + if has_loads { 8 } else { 0 };
    let rest_bits = (bytes.len() - r.pos) as u64 * 8;
    let max = if rest_bits < u64::from(32 + fields) {
        0
    } else {
        1 + (rest_bits - u64::from(32 + fields)) / u64::from(1 + k + fields)
    };
    if claimed > max {
        return Err(TokenCodecError::CountTooLarge { claimed, max });
    }
    let n = claimed as usize; // claimed <= max <= 8 * bytes.len()

    let mut entries = Vec::with_capacity(n.min(PREALLOC_ENTRIES));
    let mut bits = BitReader::new(&bytes[r.pos..]);
    let mut prev: Option<u64> = None;
    let low_k = (1u64 << k) - 1;
    let field_mask = (1u64 << fields) - 1;
    let level_mask = (1u64 << w) - 1;
    let load_at = w + u32::from(has_visited);
    for _ in 0..n {
        // The usual entry (a gap below the escape) in one step: its code
        // (q ones, a zero, k bits) and its fields read from the buffer at
        // once. Anything else, or too few bits buffered, field by field.
        if let Some(p) = prev {
            // Topped up only now and then: an entry takes 14 bits in a
            // dense block with loads, and a refill per entry cost a third
            // of the decoding.
            if bits.n < 48 {
                bits.refill();
            }
            let q = bits.acc.trailing_ones();
            let used = q + 1 + k + fields;
            if q < ESCAPE && used <= bits.n {
                let gap = (u64::from(q) << k) | ((bits.acc >> (q + 1)) & low_k);
                let f = (bits.acc >> (q + 1 + k)) & field_mask;
                bits.acc >>= used;
                bits.n -= used;
                let id = VmId::try_from(p + gap + 1).map_err(|_| TokenCodecError::IdOverflow)?;
                prev = Some(u64::from(id));
                entries.push(TokenEntry {
                    id,
                    level: (f & level_mask) as u8,
                    load: Load(if has_loads { (f >> load_at) as u8 } else { 0 }),
                    visited: has_visited && (f >> w) & 1 == 1,
                });
                continue;
            }
        }
        let id = match prev {
            None => u64::from(bits.get(32)?),
            Some(p) => {
                let q = bits.unary(ESCAPE)?;
                let gap = if q == ESCAPE {
                    u64::from(bits.get(32)?)
                } else {
                    (u64::from(q) << k) | u64::from(bits.get(k)?)
                };
                p + gap + 1
            }
        };
        let id = VmId::try_from(id).map_err(|_| TokenCodecError::IdOverflow)?;
        prev = Some(u64::from(id));
        let level = bits.get(w)? as u8;
        let visited = has_visited && bits.get(1)? == 1;
        let load = if has_loads {
            Load(bits.get(8)? as u8)
        } else {
            Load(0)
        };
        entries.push(TokenEntry {
            id,
            level,
            load,
            visited,
        });
    }
    bits.finish()?;
    Ok(Token::from_entries(epoch, round, holder, entries))
}

/// Picks the Rice parameter that makes the ID gaps smallest, and the bits
/// the gaps then take. The optimum for geometric gaps sits near log2(mean
/// gap); the exact cost of the five parameters around it is computed and
/// the cheapest kept (the lowest on a tie).
///
/// The costs come from one pass that counts the gaps by `g >> lo` (lo the
/// smallest parameter tried), up to 256: for a parameter k of the five,
/// a gap's quotient is that count's index shifted by k - lo, and a gap
/// whose index reaches 256 escapes under all five (256 >> 4 = 16).
fn choose_rice_parameter(entries: &[TokenEntry]) -> (u32, u64) {
    if entries.len() < 2 {
        return (0, 0);
    }
    let gaps = || entries.windows(2).map(|p| p[1].id - p[0].id - 1);
    let sum: u64 = gaps().map(u64::from).sum();
    let mean = sum / (entries.len() as u64 - 1);
    let guess = 64 - (mean + 1).leading_zeros(); // bit length of mean + 1
    let lo = guess.saturating_sub(3);
    let hi = (guess + 1).min(31);
    const ALWAYS_ESCAPES: usize = (ESCAPE as usize) << 4;
    // Four tallies, each gap to the next, so that runs of equal gaps (a
    // dense block: all zero) do not wait on one counter's last store.
    let mut tally = [[0u32; ALWAYS_ESCAPES + 1]; 4];
    let bucket = |g: u32| ((g >> lo) as usize).min(ALWAYS_ESCAPES);
    let mut quads = entries.windows(5).step_by(4);
    let mut done = 0;
    for w in &mut quads {
        for i in 0..4 {
            tally[i][bucket(w[i + 1].id - w[i].id - 1)] += 1;
        }
        done += 4;
    }
    for g in gaps().skip(done) {
        tally[0][bucket(g)] += 1;
    }
    let mut count = [0u64; ALWAYS_ESCAPES + 1];
    for t in &tally {
        for (c, &x) in count.iter_mut().zip(t) {
            *c += u64::from(x);
        }
    }
    let mut best = (u64::MAX, 0);
    for k in lo..=hi {
        let shift = k - lo;
        let mut cost = count[ALWAYS_ESCAPES] * u64::from(ESCAPE + 32);
        for (v, &c) in count[..ALWAYS_ESCAPES].iter().enumerate() {
            let q = (v as u32) >> shift;
            cost += c * if q < ESCAPE {
                u64::from(q + 1 + k)
            } else {
                u64::from(ESCAPE + 32)
            };
        }
        if cost < best.0 {
            best = (cost, k);
        }
    }
    (best.1, best.0)
}

fn put_varint(out: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        out.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    out.put_u8(v as u8);
}

/// Reads the byte-aligned fields before the bit stream.
struct ByteReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl ByteReader<'_> {
    fn u8(&mut self) -> Result<u8, TokenCodecError> {
        let b = *self.data.get(self.pos).ok_or(TokenCodecError::Truncated)?;
        self.pos += 1;
        Ok(b)
    }

    fn u32(&mut self) -> Result<u32, TokenCodecError> {
        let s = self
            .data
            .get(self.pos..self.pos + 4)
            .ok_or(TokenCodecError::Truncated)?;
        self.pos += 4;
        Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
    }

    /// LEB128, at most 10 bytes, no overflow past 64 bits, no redundant
    /// trailing zero byte (so each value has one encoding).
    fn varint(&mut self, what: &'static str) -> Result<u64, TokenCodecError> {
        let mut v = 0u64;
        for i in 0..10 {
            let b = self.u8()?;
            let part = u64::from(b & 0x7f);
            if i == 9 && b > 1 {
                return Err(TokenCodecError::BadVarint(what));
            }
            v |= part << (7 * i);
            if b & 0x80 == 0 {
                if b == 0 && i > 0 {
                    return Err(TokenCodecError::BadVarint(what));
                }
                return Ok(v);
            }
        }
        Err(TokenCodecError::BadVarint(what))
    }
}

/// LSB-first bit writer: bits gather in a 64-bit word and leave 32 at a
/// time (as four little-endian bytes, the same bytes as one at a time).
struct BitWriter<'a> {
    out: &'a mut BytesMut,
    /// The stream so far: a plain vector, whose appends inline better than
    /// the buffer's, moved to `out` once at the end.
    bytes: Vec<u8>,
    acc: u64,
    n: u32,
}

impl<'a> BitWriter<'a> {
    /// A writer for a stream of about `bits` bits.
    fn new(out: &'a mut BytesMut, bits: u64) -> Self {
        BitWriter {
            out,
            bytes: Vec::with_capacity(bits.div_ceil(8) as usize + 4),
            acc: 0,
            n: 0,
        }
    }

    /// Writes the low `bits` (<= 32) bits of `v`.
    #[inline(always)]
    fn put(&mut self, v: u64, bits: u32) {
        debug_assert!(bits <= 32);
        let v = v & ((1u64 << bits) - 1);
        // n < 32 here, so n + bits < 64.
        self.acc |= v << self.n;
        self.n += bits;
        if self.n >= 32 {
            self.bytes
                .extend_from_slice(&(self.acc as u32).to_le_bytes());
            self.acc >>= 32;
            self.n -= 32;
        }
    }

    /// Writes `count` (<= 32) one bits.
    #[cfg(test)]
    fn put_ones(&mut self, count: u32) {
        self.put(u64::from(u32::MAX), count);
    }

    fn finish(mut self) {
        let tail = self.n.div_ceil(8) as usize;
        self.bytes
            .extend_from_slice(&self.acc.to_le_bytes()[..tail]);
        self.out.put_slice(&self.bytes);
    }
}

/// LSB-first bit reader with a 64-bit refill buffer. Bits of `acc` above
/// `n` are always zero.
struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
    acc: u64,
    n: u32,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        BitReader {
            data,
            pos: 0,
            acc: 0,
            n: 0,
        }
    }

    /// Tops the buffer up to at least 56 bits, or to the end of the data.
    #[inline(always)]
    fn refill(&mut self) {
        // Whole bytes that fit above the n bits held.
        let take = ((63 - self.n) / 8) as usize;
        if let Some(word) = self.data.get(self.pos..self.pos + 8) {
            let word = u64::from_le_bytes(word.try_into().expect("8 bytes"));
            // take <= 7, so the mask never needs a 64-bit shift.
            let fresh = word & ((1u64 << (take * 8)) - 1);
            self.acc |= fresh << self.n;
            self.n += take as u32 * 8;
            self.pos += take;
            return;
        }
        while self.n <= 56 {
            let Some(&b) = self.data.get(self.pos) else {
                return;
            };
            self.acc |= u64::from(b) << self.n;
            self.n += 8;
            self.pos += 1;
        }
    }

    /// Reads `bits` (<= 32) bits.
    #[inline]
    fn get(&mut self, bits: u32) -> Result<u32, TokenCodecError> {
        if self.n < bits {
            self.refill();
            if self.n < bits {
                return Err(TokenCodecError::Truncated);
            }
        }
        let v = self.acc & ((1u64 << bits) - 1);
        self.acc >>= bits;
        self.n -= bits;
        Ok(v as u32)
    }

    /// Reads a unary count of ones ended by a zero; stops at `cap` ones
    /// (`cap` < 56) without reading a terminator.
    #[inline]
    fn unary(&mut self, cap: u32) -> Result<u32, TokenCodecError> {
        if self.n <= cap {
            self.refill();
        }
        // Bits above `n` are zero, so the count never runs past the data.
        let ones = self.acc.trailing_ones();
        if ones >= cap && self.n >= cap {
            self.acc >>= cap;
            self.n -= cap;
            return Ok(cap);
        }
        if ones < self.n {
            self.acc >>= ones + 1;
            self.n -= ones + 1;
            return Ok(ones);
        }
        Err(TokenCodecError::Truncated)
    }

    /// Checks that only zero padding (less than a byte) is left.
    fn finish(self) -> Result<(), TokenCodecError> {
        if self.pos != self.data.len() || self.n >= 8 || self.acc != 0 {
            return Err(TokenCodecError::TrailingData);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: VmId, level: u8, load: u8, visited: bool) -> TokenEntry {
        TokenEntry {
            id,
            level,
            load: Load(load),
            visited,
        }
    }

    fn round_trip(t: &Token) -> usize {
        let mut b = BytesMut::new();
        encode_token(t, &mut b).unwrap();
        assert_eq!(&decode_token(&b).unwrap(), t);
        b.len()
    }

    /// The format written one field at a time, one bit at a time, straight
    /// from the layout in the module header: the fast encoder must give
    /// exactly these bytes (what goes on the wire does not change).
    fn reference_encoding(t: &Token) -> Vec<u8> {
        let e = t.entries();
        let w = e
            .iter()
            .map(|x| x.level)
            .max()
            .map_or(0, |m| 8 - m.leading_zeros());
        let loads = e.iter().any(|x| x.load.0 != 0);
        let visited = e.iter().any(|x| x.visited);
        let gaps: Vec<u32> = e.windows(2).map(|p| p[1].id - p[0].id - 1).collect();
        let bits_for = |k: u32| -> u64 {
            gaps.iter()
                .map(|&g| {
                    if g >> k < ESCAPE {
                        u64::from((g >> k) + 1 + k)
                    } else {
                        48
                    }
                })
                .sum()
        };
        let k = if gaps.is_empty() {
            0
        } else {
            let mean = gaps.iter().map(|&g| u64::from(g)).sum::<u64>() / gaps.len() as u64;
            let guess = 64 - (mean + 1).leading_zeros();
            (guess.saturating_sub(3)..=(guess + 1).min(31))
                .min_by_key(|&k| bits_for(k))
                .unwrap()
        };
        let mut out = vec![
            TOKEN_FORMAT,
            u8::from(loads) | (u8::from(t.holder.is_some()) << 1) | (u8::from(visited) << 2),
            k as u8 | ((w as u8) << 5),
        ];
        let varint = |out: &mut Vec<u8>, mut v: u64| loop {
            if v < 0x80 {
                out.push(v as u8);
                break;
            }
            out.push(v as u8 | 0x80);
            v >>= 7;
        };
        varint(&mut out, t.epoch);
        varint(&mut out, u64::from(t.round));
        if let Some(h) = t.holder {
            out.extend_from_slice(&h.to_be_bytes());
        }
        varint(&mut out, e.len() as u64);
        let mut stream: Vec<bool> = Vec::new();
        let mut put = |v: u64, n: u32| (0..n).for_each(|i| stream.push(v >> i & 1 == 1));
        for (i, x) in e.iter().enumerate() {
            if i == 0 {
                put(u64::from(x.id), 32);
            } else {
                let g = gaps[i - 1];
                if g >> k < ESCAPE {
                    (0..g >> k).for_each(|_| put(1, 1));
                    put(0, 1);
                    put(u64::from(g), k);
                } else {
                    put(0xffff, 16);
                    put(u64::from(g), 32);
                }
            }
            put(u64::from(x.level), w);
            if visited {
                put(u64::from(x.visited), 1);
            }
            if loads {
                put(u64::from(x.load.0), 8);
            }
        }
        for byte in stream.chunks(8) {
            out.push(byte.iter().rev().fold(0u8, |a, &b| a << 1 | u8::from(b)));
        }
        out
    }

    #[test]
    fn the_encoder_writes_the_reference_bytes() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for case in 0..400 {
            let n = [0, 1, 2, 3, 17, 200, 5000][case % 7];
            let spread: u32 = [1, 3, 100, 70_000, u32::MAX / 8][case % 5];
            let mut entries = Vec::new();
            let mut id = rng.random_range(0..1000u32);
            for _ in 0..n {
                let Some(next) = id.checked_add(rng.random_range(1..=spread)) else {
                    break;
                };
                id = next;
                entries.push(entry(
                    id,
                    if case % 3 == 0 {
                        0
                    } else {
                        rng.random_range(0..=MAX_LEVEL)
                    },
                    if case % 4 == 0 { rng.random() } else { 0 },
                    case % 2 == 0 && rng.random_bool(0.5),
                ));
            }
            let holder = (case % 6 == 0).then(|| rng.random());
            let t = Token::from_entries(rng.random(), rng.random(), holder, entries);
            let mut b = BytesMut::new();
            encode_token(&t, &mut b).unwrap();
            assert_eq!(&b[..], &reference_encoding(&t)[..], "case {case}");
            assert_eq!(decode_token(&b).unwrap(), t, "case {case}");
        }
    }

    #[test]
    fn empty_and_single_tokens_round_trip() {
        assert_eq!(round_trip(&Token::new(0, [])), 6);
        round_trip(&Token::new(u64::MAX, [u32::MAX]));
        round_trip(&Token::from_entries(
            3,
            u32::MAX,
            Some(0),
            vec![entry(0, 15, 255, true)],
        ));
    }

    #[test]
    fn hand_encoded_small_token() {
        // IDs 10.0.0.1, .2, .4; levels 0, 3, 1; nothing visited, no loads.
        let base = 0x0a00_0001;
        let mut t = Token::new(5, [base, base + 1, base + 3]);
        t.get_mut(base + 1).unwrap().level = 3;
        t.get_mut(base + 3).unwrap().level = 1;
        let mut b = BytesMut::new();
        encode_token(&t, &mut b).unwrap();
        // Gaps are 0 and 1: mean 0, so k = 0; max level 3 needs w = 2.
        // Header: format 1, flags 0, params k=0 | w=2<<5 = 0x40, epoch 5,
        // round 0, count 3.
        assert_eq!(&b[..6], &[1, 0, 0x40, 5, 0, 3]);
        // Bits, LSB first: id 32 bits (0x0a000001), level 0 (2 bits),
        // gap 0 = "0", level 3 = "11", gap 1 = "10", level 1 = "10" (LSB first).
        // After the 32 id bits: 00 | 0 | 11 | 1 0 | 1 0 -> bits
        //   b0..b1 = 0,0  b2 = 0  b3..b4 = 1,1  b5 = 1 b6 = 0  b7 = 1 b8 = 0
        //   byte = 0b1011_1000 = 0xb8, then one bit 0 -> 0x00.
        assert_eq!(&b[6..], &[0x01, 0x00, 0x00, 0x0a, 0xb8, 0x00]);
        assert_eq!(decode_token(&b).unwrap(), t);
    }

    #[test]
    fn large_gaps_escape() {
        let t = Token::from_entries(
            1,
            2,
            Some(7),
            vec![
                entry(1, 1, 0, false),
                entry(2, 2, 9, true),
                entry(3, 0, 0, false),
                entry(4_000_000_000, 4, 0, true),
                entry(u32::MAX, 15, 1, false),
            ],
        );
        round_trip(&t);
    }

    #[test]
    fn dense_block_is_small() {
        let t = Token::new(1, 0x0a00_0000..0x0a00_0000 + 10_000);
        let len = round_trip(&t);
        // k = 0, w = 0: one bit per ID.
        assert!(len < 10_000 / 8 + 16, "{len}");
    }

    #[test]
    fn level_above_max_is_refused() {
        let mut t = Token::new(0, [1, 2]);
        t.get_mut(2).unwrap().level = 16;
        let mut b = BytesMut::new();
        assert_eq!(
            encode_token(&t, &mut b),
            Err(TokenCodecError::LevelTooHigh { vm: 2, level: 16 })
        );
    }

    #[test]
    fn hostile_encodings_are_refused() {
        let t = Token::new(9, [1, 5, 9]);
        let mut b = BytesMut::new();
        encode_token(&t, &mut b).unwrap();
        let good = b.to_vec();

        let mut x = good.clone();
        x[0] = 2;
        assert_eq!(decode_token(&x), Err(TokenCodecError::BadFormat(2)));
        let mut x = good.clone();
        x[1] |= 0x80;
        assert_eq!(decode_token(&x), Err(TokenCodecError::ReservedFlags(0x80)));
        let mut x = good.clone();
        x[2] = 5 << 5;
        assert_eq!(decode_token(&x), Err(TokenCodecError::BadLevelWidth(5)));
        let mut x = good.clone();
        x.push(0);
        assert_eq!(decode_token(&x), Err(TokenCodecError::TrailingData));
        let x = &good[..good.len() - 1];
        assert!(decode_token(x).is_err());
        assert_eq!(decode_token(&[]), Err(TokenCodecError::Truncated));
        // An absurd entry count is refused before anything is allocated.
        let x = [1, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0x0f, 0, 0, 0, 0];
        assert!(matches!(
            decode_token(&x),
            Err(TokenCodecError::CountTooLarge { .. })
        ));
        // Overlong varint (epoch 0 written as 0x80 0x00).
        let x = [1, 0, 0, 0x80, 0x00, 0, 0];
        assert_eq!(decode_token(&x), Err(TokenCodecError::BadVarint("epoch")));
        // An escaped gap that runs past 2^32 - 1.
        let mut b = BytesMut::new();
        b.put_slice(&[1, 0, 0, 0, 0, 2]);
        let mut bits = BitWriter::new(&mut b, 0);
        bits.put(u64::from(u32::MAX - 1), 32);
        bits.put_ones(ESCAPE);
        bits.put(5, 32);
        bits.finish();
        assert_eq!(decode_token(&b), Err(TokenCodecError::IdOverflow));
    }
}
