//! The cluster key and the HMAC-SHA256 that authenticates every datagram.
//! Every agent of a cluster holds the same key; a datagram whose MAC does not
//! verify under it is dropped before its body is looked at. A [`KeyRing`]
//! lets a cluster rotate its key without a stop: agents send with the
//! current key and still accept the previous ones until a deadline.

use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Length of the MAC that ends every datagram (HMAC-SHA256, untruncated).
pub const MAC_LEN: usize = 32;

/// Shortest cluster key accepted, in bytes. 128 bits is the floor for an
/// HMAC key guessed offline from captured datagrams.
pub const MIN_KEY_LEN: usize = 16;

/// Why a cluster key was refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The key is shorter than [`MIN_KEY_LEN`] bytes.
    #[error("cluster key is {len} bytes, at least {MIN_KEY_LEN} are required")]
    TooShort {
        /// Length of the key given.
        len: usize,
    },
    /// Every byte of the key is the same (an unset or zeroed key file).
    #[error("cluster key of {len} bytes is one byte repeated")]
    Degenerate {
        /// Length of the key given.
        len: usize,
    },
}

/// The cluster key, kept as a keyed HMAC state so that signing a datagram
/// does not re-derive the key pads each time. Its `Debug` shows no key bytes.
#[derive(Clone)]
pub struct ClusterKey {
    mac: HmacSha256,
}

impl ClusterKey {
    /// Builds the key from its raw bytes (e.g. the contents of the key file).
    pub fn new(bytes: &[u8]) -> Result<Self, KeyError> {
        let len = bytes.len();
        if len < MIN_KEY_LEN {
            return Err(KeyError::TooShort { len });
        }
        if bytes.iter().all(|&b| b == bytes[0]) {
            return Err(KeyError::Degenerate { len });
        }
        // HMAC takes keys of any length; the error arm cannot happen.
        let mac = HmacSha256::new_from_slice(bytes).map_err(|_| KeyError::TooShort { len })?;
        Ok(ClusterKey { mac })
    }

    /// The MAC of `data` under this key.
    pub fn sign(&self, data: &[u8]) -> [u8; MAC_LEN] {
        let mut m = self.mac.clone();
        m.update(data);
        m.finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC of `data`, compared in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        let mut m = self.mac.clone();
        m.update(data);
        m.verify_slice(tag).is_ok()
    }
}

/// What checks a datagram's MAC: one key, or a [`KeyRing`].
pub trait Verifier {
    /// Whether `tag` is the MAC of `data` under an accepted key.
    fn verify_tag(&self, data: &[u8], tag: &[u8]) -> bool;
}

impl Verifier for ClusterKey {
    fn verify_tag(&self, data: &[u8], tag: &[u8]) -> bool {
        self.verify(data, tag)
    }
}

/// The keys an agent accepts: the current one (used to send) first, then
/// older ones, each accepted until its own deadline (milliseconds since
/// the Unix epoch; the ring has no clock: [`KeyRing::expire`] is told the
/// time). To rotate, each agent is restarted with the new key as current
/// and the old one accepted until a deadline: agents restarted at
/// different times understand each other until then, and by then every
/// agent must run the new key.
#[derive(Clone, Debug)]
pub struct KeyRing {
    current: ClusterKey,
    older: Vec<(ClusterKey, u64)>,
}

impl KeyRing {
    /// A ring of one key.
    pub fn new(current: ClusterKey) -> Self {
        KeyRing {
            current,
            older: Vec::new(),
        }
    }

    /// Also accepts `key` until `until_ms` (ms since the Unix epoch).
    pub fn accepting(mut self, key: ClusterKey, until_ms: u64) -> Self {
        self.older.push((key, until_ms));
        self
    }

    /// The key datagrams are sealed with.
    pub fn current(&self) -> &ClusterKey {
        &self.current
    }

    /// Forgets the older keys whose deadline is before `now_ms`.
    pub fn expire(&mut self, now_ms: u64) {
        self.older.retain(|(_, until)| *until >= now_ms);
    }

    /// How many keys are accepted (the current one included).
    pub fn len(&self) -> usize {
        1 + self.older.len()
    }

    /// Always false: a ring holds at least its current key.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl From<ClusterKey> for KeyRing {
    fn from(k: ClusterKey) -> Self {
        KeyRing::new(k)
    }
}

impl Verifier for KeyRing {
    fn verify_tag(&self, data: &[u8], tag: &[u8]) -> bool {
        // The current key first: every datagram of a settled cluster
        // verifies on the first try.
        self.current.verify(data, tag) || self.older.iter().any(|(k, _)| k.verify(data, tag))
    }
}

impl fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClusterKey(<redacted>)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_degenerate_keys_are_refused() {
        assert_eq!(
            ClusterKey::new(b"short").unwrap_err(),
            KeyError::TooShort { len: 5 }
        );
        assert_eq!(
            ClusterKey::new(&[0u8; 32]).unwrap_err(),
            KeyError::Degenerate { len: 32 }
        );
        assert!(ClusterKey::new(b"0123456789abcdef").is_ok());
    }

    #[test]
    fn matches_rfc4231_test_case_4() {
        // RFC 4231 test case 4: key 0x01..=0x19 (25 bytes), data 0xcd x 50.
        let key: Vec<u8> = (1u8..=0x19).collect();
        let k = ClusterKey::new(&key).unwrap();
        let tag = k.sign(&[0xcd; 50]);
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "82558a389a443c0ea4cc819899f2083a85f0faa3e578f8077a2e3ff46729665b"
        );
        assert!(k.verify(&[0xcd; 50], &tag));
        assert!(!k.verify(&[0xcd; 49], &tag));
        assert!(!k.verify(&[0xcd; 50], &tag[..31]));
    }

    #[test]
    fn ring_accepts_older_keys_until_their_deadline() {
        let old = ClusterKey::new(b"the old cluster key, 32 bytes!!").unwrap();
        let new = ClusterKey::new(b"the new cluster key, 32 bytes!!").unwrap();
        let other = ClusterKey::new(b"nobody's cluster key, 32 bytes!").unwrap();
        let mut ring = KeyRing::new(new.clone()).accepting(old.clone(), 1_000);
        assert_eq!(ring.len(), 2);
        let by_old = old.sign(b"data");
        let by_new = new.sign(b"data");
        assert!(ring.verify_tag(b"data", &by_new));
        assert!(ring.verify_tag(b"data", &by_old));
        assert!(!ring.verify_tag(b"data", &other.sign(b"data")));
        ring.expire(1_000);
        assert!(ring.verify_tag(b"data", &by_old));
        ring.expire(1_001);
        assert_eq!(ring.len(), 1);
        assert!(!ring.verify_tag(b"data", &by_old));
        assert!(ring.verify_tag(b"data", &by_new));
        assert_eq!(ring.current().sign(b"data"), by_new);
    }

    #[test]
    fn debug_hides_the_key() {
        let k = ClusterKey::new(b"super secret key material").unwrap();
        assert_eq!(format!("{k:?}"), "ClusterKey(<redacted>)");
    }
}
