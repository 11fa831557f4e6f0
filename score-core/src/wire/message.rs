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
    /// (its header carries the epoch), and by a watcher that regenerated
    /// the token to the other watchers.
    TokenSeen {
        /// The VM the token is being handed to (0: none yet).
        holder: VmId,
        /// The token's round.
        round: u32,
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
            Message::TokenSeen { holder, round } => {
                buf.put_u32(*holder);
                buf.put_u32(*round);
            }
        }
    }

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
            },
        };
        r.end()?;
        Ok(msg)
    }
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
    pub fn decode(bytes: &[u8], key: &ClusterKey) -> Result<Datagram, WireError> {
        super::decode(bytes, key)
    }
}

/// Rates are measured byte counts over a window: finite and not negative.
fn valid_rate(rate: f64) -> bool {
    rate.is_finite() && rate >= 0.0
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
    use crate::wire::{decode, seal};

    fn key() -> ClusterKey {
        ClusterKey::new(b"message test key 0123456789").unwrap()
    }

    fn header() -> Header {
        Header {
            sender: Ipv4Addr::new(10, 1, 0, 1),
            epoch: 2,
            seq: 99,
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
        let h = 28 + 32;
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

    #[test]
    fn location_request_body_layout() {
        let mut b = BytesMut::new();
        Message::LocationRequest { vm: 0x0a01_0203 }
            .encode(&header(), &key(), &mut b)
            .unwrap();
        assert_eq!(b[5], Kind::LocationRequest as u8);
        assert_eq!(&b[28..32], &[10, 1, 2, 3]);
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
