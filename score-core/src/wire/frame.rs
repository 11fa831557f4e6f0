//! The datagram frame: a fixed 28-byte header, the payload and an
//! HMAC-SHA256 over both. [`seal`] builds a frame, [`Frame::check`] is the
//! first decoding step (structure, then MAC); the body is parsed afterwards.
//!
//! ```text
//! offset size field
//!  0     4    magic "SCOR"
//!  4     1    version (1)
//!  5     1    kind
//!  6     2    payload length, big-endian, <= MAX_PAYLOAD
//!  8     4    sender host IPv4 address, network order
//! 12     8    epoch, big-endian
//! 20     8    sequence number, big-endian
//! 28     len  payload
//! 28+len 32   HMAC-SHA256(cluster key, bytes 0 .. 28+len)
//! ```

use std::net::Ipv4Addr;

use bytes::{BufMut, BytesMut};

use super::auth::{ClusterKey, MAC_LEN};
use super::{Kind, WireError};

/// First four bytes of every datagram. Lets the eBPF side tell an S-CORE
/// control datagram from guest traffic with one 32-bit compare.
pub const MAGIC: [u8; 4] = *b"SCOR";

/// Version of the wire format this build speaks.
pub const VERSION: u8 = 1;

/// Length of the fixed header.
pub const HEADER_LEN: usize = 28;

/// Largest payload of one datagram. With header and MAC a datagram is at
/// most [`MAX_DATAGRAM`] = 1260 bytes, which fits the IPv6 minimum MTU of
/// 1280 less IP/UDP headers on IPv4 and every Ethernet path without
/// fragmentation.
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
    /// The sender's current token epoch.
    pub epoch: u64,
    /// The sender's sequence number, strictly increasing per sender (see
    /// [`SeqCounter`](super::SeqCounter)); receivers drop replays with a
    /// [`ReplayWindow`](super::ReplayWindow).
    pub seq: u64,
}

impl Header {
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
    pub fn check(bytes: &'a [u8], key: &ClusterKey) -> Result<Self, WireError> {
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
        if !key.verify(&bytes[..signed], &bytes[signed..]) {
            return Err(WireError::BadMac);
        }
        let header = Header {
            sender: Ipv4Addr::new(bytes[8], bytes[9], bytes[10], bytes[11]),
            epoch: be_u64(&bytes[12..20]),
            seq: be_u64(&bytes[20..28]),
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
        assert_eq!(buf[4], 1);
        assert_eq!(buf[5], 3);
        assert_eq!(&buf[6..8], &[0, 2]);
        assert_eq!(&buf[8..12], &[10, 0, 1, 2]);
        assert_eq!(&buf[12..20], &[0, 0, 0, 0, 0, 0, 0, 7]);
        assert_eq!(&buf[20..28], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&buf[28..30], &[0xaa, 0xbb]);
        assert_eq!(&buf[30..], &key().sign(&buf[..30]));
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
            Frame::check(&good[..59], &k),
            Err(WireError::Truncated {
                len: 59,
                needed: 60
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
        b[4] = 2;
        assert_eq!(Frame::check(&b, &k), Err(WireError::BadVersion(2)));
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
        b[30] ^= 1;
        assert_eq!(Frame::check(&b, &k), Err(WireError::BadMac));
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
