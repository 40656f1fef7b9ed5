//! API keys: the config holds only base64(SHA-256(key)). A presented key is hashed and looked
//! up by its digest in a hash map, so the cost does not grow with the number of keys and no
//! comparison walks the configured secrets; the final equality check of the digests is
//! constant-time anyway, so even the map's own key comparison cannot become a timing oracle.

use super::{AuthMethod, Identity};
use crate::authz::Policy;
use crate::prehashed::PrehashedMap;
use base64::Engine as _;
use std::sync::Arc;

/// The longest key accepted (longer input is refused before hashing).
pub const MAX_KEY_LEN: usize = 512;

#[derive(Debug)]
struct Entry {
    digest: [u8; 32],
    identity: Identity,
}

/// The compiled key table.
#[derive(Debug, Default)]
pub struct ApiKeys {
    /// Digests are SHA-256 outputs: the map uses their bits as they are.
    by_digest: PrehashedMap<[u8; 32], Entry>,
}

/// Decodes a `key_hash` value.
pub fn decode_hash(b64: &str) -> Option<[u8; 32]> {
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .ok()?;
    bytes.try_into().ok()
}

fn digest(key: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Equality that takes the same time wherever the first difference is.
fn constant_time_eq(a: &[u8; 32], b: &[u8; 32]) -> bool {
    let mut diff = 0u8;
    for (x, y) in a.iter().zip(b) {
        diff |= x ^ y;
    }
    std::hint::black_box(diff) == 0
}

impl ApiKeys {
    /// Adds a key; `false` if the same hash is already present.
    pub fn insert(&mut self, id: &str, digest: [u8; 32], policy: Arc<Policy>) -> bool {
        if self.by_digest.contains_key(&digest) {
            return false;
        }
        let id: Arc<str> = Arc::from(id);
        self.by_digest.insert(
            digest,
            Entry {
                digest,
                identity: Identity {
                    id,
                    method: AuthMethod::ApiKey,
                    policy,
                },
            },
        );
        true
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.by_digest.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.by_digest.is_empty()
    }

    /// The identity a presented key stands for.
    pub fn lookup(&self, key: &str) -> Option<&super::Identity> {
        if key.len() > MAX_KEY_LEN {
            return None;
        }
        let d = digest(key);
        let entry = self.by_digest.get(&d)?;
        constant_time_eq(&entry.digest, &d).then_some(&entry.identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_finds_the_key_by_its_hash_only() {
        let mut keys = ApiKeys::default();
        let hash = crate::cli::hash_key("secret-key");
        assert!(keys.insert(
            "ci",
            decode_hash(&hash).unwrap(),
            Arc::new(Policy::default())
        ));
        assert_eq!(&*keys.lookup("secret-key").unwrap().id, "ci");
        assert!(keys.lookup("secret-kez").is_none());
        assert!(keys.lookup(&"x".repeat(10_000)).is_none());
        assert!(!keys.insert(
            "dup",
            decode_hash(&hash).unwrap(),
            Arc::new(Policy::default())
        ));
    }

    #[test]
    fn bad_hashes_do_not_decode() {
        assert!(decode_hash("not base64!").is_none());
        assert!(decode_hash("c2hvcnQ=").is_none());
    }
}
