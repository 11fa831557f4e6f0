//! The datagram frame: a fixed 44-byte header, the payload and an
//! HMAC-SHA256 over both. [`seal`] builds a frame, [`Frame::check`] is the
//! first decoding step (structure, then MAC); the body is parsed afterwards.
//!
//! ```text
//! offset size field
//!  0     4    magic "SCOR"
//!  4     1    version (2)
//!  5     1    kind
//!  6     2    payload length, big-endian, <= MAX_PAYLOAD
//!  8     4    sender host IPv4 address, network order
//! 12     4    destination IPv4 address (host or VM), network order
//! 16     4    sender incarnation, big-endian
//! 20     8    sent at, ms since the Unix epoch (sender's clock), big-endian
//! 28     8    epoch, big-endian
//! 36     8    sequence number, big-endian
//! 44     len  payload
//! 44+len 32   HMAC-SHA256(cluster key, bytes 0 .. 44+len)
//! ```
//!
//! Destination, incarnation and send time are inside the MAC: a captured
//! datagram cannot be redirected to another address, and a receiver can
//! tell an old one from a fresh one even after either side restarted
//! (see [`replay`](super::replay)).

use std::net::Ipv4Addr;

use bytes::{BufMut, BytesMut};

use super::auth::{ClusterKey, MAC_LEN, Verifier};
use super::{Kind, WireError};

/// First four bytes of every datagram. Lets the eBPF side tell an S-CORE
/// control datagram from guest traffic with one 32-bit compare.
pub const MAGIC: [u8; 4] = *b"SCOR";

/// Version of the wire format this build speaks. Version 2 added the
/// destination, the incarnation and the send time to the header.
pub const VERSION: u8 = 2;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 44;

/// Largest payload of one datagram. With header and MAC a datagram is at
/// most [`MAX_DATAGRAM`] = 1276 bytes: within the 1280 bytes of UDP payload
/// the eBPF classifier copies out for the agent, and with IPv4 and UDP
/// headers (1304) on every Ethernet path without fragmentation.
pub const MAX_PAYLOAD: usize = 1200;

/// Largest datagram this format produces or accepts: header, payload, MAC.
pub const MAX_DATAGRAM: usize = HEADER_LEN + MAX_PAYLOAD + MAC_LEN;

/// Offset of the payload length field.
const LEN_OFFSET: usize = 6;

/// The header fields a sender chooses (magic, version, kind and length are
/// set by the encoder).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Header {
    /// The sending host's address (a hypervisor host, not a VM).
    pub sender: Ipv4Addr,
    /// The address the datagram is sent to: a host, or a VM whose host
    /// intercepts it. The receiver checks it against the address the
    /// datagram really arrived on ([`Header::check_destination`]).
    pub destination: Ipv4Addr,
    /// The sender's incarnation: a counter its daemon persists and raises
    /// at every start, so sequence numbers may start over after a restart.
    pub incarnation: u32,
    /// When the sender sealed the datagram, in milliseconds since the Unix
    /// epoch by its own clock; receivers refuse datagrams older than their
    /// freshness window.
    pub sent_at_ms: u64,
    /// The sender's current token epoch.
    pub epoch: u64,
    /// The sender's sequence number, strictly increasing per sender (see
    /// [`SeqCounter`](super::SeqCounter)); receivers drop replays with a
    /// [`ReplayWindow`](super::ReplayWindow).
    pub seq: u64,
}

impl Default for Header {
    fn default() -> Self {
        Header {
            sender: Ipv4Addr::UNSPECIFIED,
            destination: Ipv4Addr::UNSPECIFIED,
            incarnation: 0,
            sent_at_ms: 0,
            epoch: 0,
            seq: 0,
        }
    }
}

impl Header {
    /// Rejects a datagram that was sealed for another address than
    /// `received_on` (the host address it came in on, or the VM whose
    /// traffic it was intercepted from): a datagram captured on its way to
    /// one VM and sent again to another is refused.
    pub fn check_destination(&self, received_on: Ipv4Addr) -> Result<(), WireError> {
        if self.destination == received_on {
            Ok(())
        } else {
            Err(WireError::WrongDestination {
                sealed_for: self.destination,
                received_on,
            })
        }
    }

    /// Rejects a datagram from an epoch older than `current` (a lost token
    /// was regenerated since, so anything about the old one is void).
    pub fn check_epoch(&self, current: u64) -> Result<(), WireError> {
        if self.epoch < current {
            Err(WireError::StaleEpoch {
                got: self.epoch,
                current,
            })
        } else {
            Ok(())
        }
    }
}

/// A checked frame: its MAC verified, its body not yet parsed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    /// The message kind.
    pub kind: Kind,
    /// Sender, epoch and sequence number.
    pub header: Header,
    /// The payload, exactly as long as the header declared.
    pub payload: &'a [u8],
}

impl<'a> Frame<'a> {
    /// First decoding step: checks length, magic, version, kind and declared
    /// length, in that order, then the MAC in constant time. The checks
    /// before the MAC are cheap and leak nothing the datagram does not show.
    pub fn check<K: Verifier + ?Sized>(bytes: &'a [u8], key: &K) -> Result<Self, WireError> {
        let min = HEADER_LEN + MAC_LEN;
        if bytes.len() < min {
            return Err(WireError::Truncated {
                len: bytes.len(),
                needed: min,
            });
        }
        if bytes[0..4] != MAGIC {
            return Err(WireError::BadMagic);
        }
        if bytes[4] != VERSION {
            return Err(WireError::BadVersion(bytes[4]));
        }
        let kind = Kind::from_u8(bytes[5]).ok_or(WireError::UnknownKind(bytes[5]))?;
        let declared = usize::from(u16::from_be_bytes([bytes[6], bytes[7]]));
        let actual = bytes.len() - min;
        if declared > MAX_PAYLOAD || declared < actual {
            return Err(WireError::BadLength { declared, actual });
        }
        if declared > actual {
            return Err(WireError::Truncated {
                len: bytes.len(),
                needed: min + declared,
            });
        }
        let signed = HEADER_LEN + declared;
        if !key.verify_tag(&bytes[..signed], &bytes[signed..]) {
            return Err(WireError::BadMac);
        }
        let header = Header {
            sender: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            destination: Ipv4Addr::new(bytes[12], bytes[13], bytes[14], bytes[15]),
            incarnation: u32::from_be_bytes([bytes[16], bytes[17], bytes[18], bytes[19]]),
            sent_at_ms: be_u64(&bytes[20..28]),
            epoch: be_u64(&bytes[28..36]),
            seq: be_u64(&bytes[36..44]),
        };
        Ok(Frame {
            kind,
            header,
            payload: &bytes[HEADER_LEN..signed],
        })
    }
}

fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

/// Appends a sealed datagram to `buf`: header, `payload`, MAC. `kind` is a
/// raw byte so that tests can seal kinds a receiver does not know; normal
/// senders use [`Message::encode`](super::Message::encode). On error `buf`
/// is left as it was.
pub fn seal(
    kind: u8,
    header: &Header,
    payload: &[u8],
    key: &ClusterKey,
    buf: &mut BytesMut,
) -> Result<(), WireError> {
    let start = begin(kind, header, buf);
    buf.put_slice(payload);
    finish(start, key, buf)
}

/// Writes a header with a zero length at the end of `buf`; returns where
/// the datagram starts. The body is then appended and [`finish`] called.
pub(crate) fn begin(kind: u8, header: &Header, buf: &mut BytesMut) -> usize {
    let start = buf.len();
    buf.reserve(MAX_DATAGRAM);
    buf.put_slice(&MAGIC);
    buf.put_u8(VERSION);
    buf.put_u8(kind);
    buf.put_u16(0);
    buf.put_slice(&header.sender.octets());
    buf.put_slice(&header.destination.octets());
    buf.put_u32(header.incarnation);
    buf.put_u64(header.sent_at_ms);
    buf.put_u64(header.epoch);
    buf.put_u64(header.seq);
    start
}

/// Patches the payload length of the datagram that starts at `start` and
/// appends its MAC; truncates `buf` back to `start` if the payload is too
/// large.
pub(crate) fn finish(start: usize, key: &ClusterKey, buf: &mut BytesMut) -> Result<(), WireError> {
    let len = buf.len() - start - HEADER_LEN;
    let Ok(len16) = u16::try_from(len) else {
        buf.truncate(start);
        return Err(WireError::PayloadTooLarge { len });
    };
    if len > MAX_PAYLOAD {
        buf.truncate(start);
        return Err(WireError::PayloadTooLarge { len });
    }
    buf[start + LEN_OFFSET..start + LEN_OFFSET + 2].copy_from_slice(&len16.to_be_bytes());
    let mac = key.sign(&buf[start..]);
    buf.put_slice(&mac);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> ClusterKey {
        ClusterKey::new(b"frame test key 0123456789").unwrap()
    }

    fn header() -> Header {
        Header {
            sender: Ipv4Addr::new(10, 0, 1, 2),
            destination: Ipv4Addr::new(10, 0, 9, 8),
            incarnation: 0x0a0b_0c0d,
            sent_at_ms: 0x1112_1314_1516_1718,
            epoch: 7,
            seq: 0x0102_0304_0506_0708,
        }
    }

    #[test]
    fn header_layout_matches_the_doc() {
        let mut buf = BytesMut::new();
        seal(3, &header(), &[0xaa, 0xbb], &key(), &mut buf).unwrap();
        assert_eq!(buf.len(), HEADER_LEN + 2 + MAC_LEN);
        assert_eq!(&buf[0..4], b"SCOR");
        assert_eq!(buf[4], 2);
        assert_eq!(buf[5], 3);
        assert_eq!(&buf[6..8], &[0, 2]);
        assert_eq!(&buf[8..12], &[10, 0, 1, 2]);
        assert_eq!(&buf[12..16], &[10, 0, 9, 8]);
        assert_eq!(&buf[16..20], &[0x0a, 0x0b, 0x0c, 0x0d]);
        assert_eq!(
            &buf[20..28],
            &[0x11, 0x12, 0x13, 0x14, 0x15, 0x16, 0x17, 0x18]
        );
        assert_eq!(&buf[28..36], &[0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(&buf[36..44], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[44..46], &[0xaa, 0xbb]);
        assert_eq!(&buf[46..], &key().sign(&buf[..46]));
    }

    #[test]
    fn check_accepts_what_seal_wrote() {
        let mut buf = BytesMut::new();
        seal(3, &header(), &[1, 2, 3], &key(), &mut buf).unwrap();
        let f = Frame::check(&buf, &key()).unwrap();
        assert_eq!(f.kind, Kind::LocationRequest);
        assert_eq!(f.header, header());
        assert_eq!(f.payload, &[1, 2, 3]);
    }

    #[test]
    fn each_check_has_its_error() {
        let k = key();
        let mut good = BytesMut::new();
        seal(3, &header(), &[1, 2, 3, 4], &k, &mut good).unwrap();

        assert!(matches!(
            Frame::check(&good[..75], &k),
            Err(WireError::Truncated {
                len: 75,
                needed: 76
            })
        ));
        assert!(matches!(
            Frame::check(&good[..good.len() - 1], &k),
            Err(WireError::Truncated { .. })
        ));
        let mut b = good.clone();
        b[0] = b'X';
        assert_eq!(Frame::check(&b, &k), Err(WireError::BadMagic));
        let mut b = good.clone();
        b[4] = 1;
        assert_eq!(Frame::check(&b, &k), Err(WireError::BadVersion(1)));
        let mut b = good.clone();
        b[5] = 0;
        assert_eq!(Frame::check(&b, &k), Err(WireError::UnknownKind(0)));
        let mut b = good.clone();
        b.put_u8(0);
        assert_eq!(
            Frame::check(&b, &k),
            Err(WireError::BadLength {
                declared: 4,
                actual: 5
            })
        );
        let mut b = good.clone();
        b[6] = 0xff;
        assert!(matches!(
            Frame::check(&b, &k),
            Err(WireError::BadLength { .. })
        ));
        let mut b = good.clone();
        b[46] ^= 1;
        assert_eq!(Frame::check(&b, &k), Err(WireError::BadMac));
        // Every header field is under the MAC: the destination, the
        // incarnation and the send time cannot be edited.
        for at in [12, 16, 20, 28, 36] {
            let mut b = good.clone();
            b[at] ^= 1;
            assert_eq!(Frame::check(&b, &k), Err(WireError::BadMac), "byte {at}");
        }
        let other = ClusterKey::new(b"another key, same length!").unwrap();
        assert_eq!(Frame::check(&good, &other), Err(WireError::BadMac));
    }

    #[test]
    fn oversized_payload_is_refused_and_buf_untouched() {
        let mut buf = BytesMut::from(&b"prefix"[..]);
        let err = seal(3, &header(), &[0; MAX_PAYLOAD + 1], &key(), &mut buf).unwrap_err();
        assert_eq!(
            err,
            WireError::PayloadTooLarge {
                len: MAX_PAYLOAD + 1
            }
        );
        assert_eq!(&buf[..], b"prefix");
        seal(3, &header(), &[0; MAX_PAYLOAD], &key(), &mut buf).unwrap();
        assert_eq!(buf.len(), 6 + MAX_DATAGRAM);
    }

    #[test]
    fn destination_must_be_where_it_arrived() {
        let h = header();
        assert!(h.check_destination(Ipv4Addr::new(10, 0, 9, 8)).is_ok());
        assert_eq!(
            h.check_destination(Ipv4Addr::new(10, 0, 9, 9)),
            Err(WireError::WrongDestination {
                sealed_for: Ipv4Addr::new(10, 0, 9, 8),
                received_on: Ipv4Addr::new(10, 0, 9, 9),
            })
        );
    }

    #[test]
    fn stale_epoch_is_flagged() {
        let h = header();
        assert!(h.check_epoch(7).is_ok());
        assert!(h.check_epoch(3).is_ok());
        assert_eq!(
            h.check_epoch(8),
            Err(WireError::StaleEpoch { got: 7, current: 8 })
        );
    }
}
