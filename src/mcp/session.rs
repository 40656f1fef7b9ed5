//! Session ids handed to clients: `<payload>.<mac>`, both base64url.
//!
//! The payload is what routing needs (the upstream's own session id, or the stdio hub's
//! session key); the MAC covers the payload and the binding (the identity that created the
//! session), so any worker can check a session id without a shared table, and a session id
//! presented by anyone else, or edited, is simply unknown (404).
//!
//! The keys come from the configuration (`server.session_keys` / `session_key_file`), so that
//! every replica behind a load balancer and every restart accept the same ids; the first key
//! signs, every key verifies (rotation). Without configured keys the process draws one at start,
//! kept across reloads.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The longest session id accepted from a client.
pub const MAX_SESSION_ID_LEN: usize = 1024;

/// Session-id keys: the first signs new ids, each verifies.
pub struct SessionCodec {
    keys: Vec<hmac::Key>,
    /// Distinguishes codecs (caches of verified ids belong to one codec: a key removed by a
    /// reload must stop verifying at once).
    generation: u64,
}

impl std::fmt::Debug for SessionCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys.
        f.debug_struct("SessionCodec")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// The fewest bytes a configured session key must hold.
pub const MIN_SESSION_KEY_BYTES: usize = 32;

impl SessionCodec {
    /// A codec with a fresh random key (sessions do not survive a restart, and need not:
    /// a client seeing 404 starts a new session, as the transport spec prescribes).
    pub fn random() -> Self {
        Self::from_key(&random_bytes::<32>())
    }

    /// The codec of a process without configured keys: one random key drawn at first use and
    /// kept for the life of the process, so a reload does not end every session.
    pub fn process_random() -> Self {
        static KEY: std::sync::OnceLock<[u8; 32]> = std::sync::OnceLock::new();
        Self::from_key(KEY.get_or_init(random_bytes::<32>))
    }

    /// A codec with a given key.
    pub fn from_key(key: &[u8]) -> Self {
        Self::from_keys(&[key])
    }

    /// A codec whose first key signs and every key verifies.
    pub fn from_keys<K: AsRef<[u8]>>(keys: &[K]) -> Self {
        static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Self {
            keys: keys
                .iter()
                .map(|k| hmac::Key::new(hmac::HMAC_SHA256, k.as_ref()))
                .collect(),
            generation: GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    /// This codec's identity for caches of ids it verified.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the MAC covers: each binding part length-prefixed (so no two different pairs read
    /// the same), then the payload.
    fn mac_input(identity: &str, route: &str, payload: &[u8]) -> Vec<u8> {
        let mut input = Vec::with_capacity(16 + identity.len() + route.len() + payload.len());
        for part in [identity, route] {
            input.extend_from_slice(&(part.len() as u64).to_be_bytes());
            input.extend_from_slice(part.as_bytes());
        }
        input.extend_from_slice(payload);
        input
    }

    /// The client-facing id for `payload`, bound to `binding`.
    pub fn encode(&self, binding: &str, payload: &[u8]) -> String {
        self.encode_for(binding, "", payload)
    }

    /// The client-facing id for `payload`, bound to `identity` and the server `route` (empty
    /// for the default upstream): an id minted at one server is unknown at another.
    pub fn encode_for(&self, identity: &str, route: &str, payload: &[u8]) -> String {
        let tag = hmac::sign(&self.keys[0], &Self::mac_input(identity, route, payload));
        let mut s = B64.encode(payload);
        s.push('.');
        s.push_str(&B64.encode(tag.as_ref()));
        s
    }

    /// The payload of a client-presented id, if it is one of ours for `binding`.
    pub fn decode(&self, binding: &str, id: &str) -> Option<Vec<u8>> {
        self.decode_for(binding, "", id)
    }

    /// The payload of a client-presented id, if it is one of ours for `identity` at `route`.
    pub fn decode_for(&self, identity: &str, route: &str, id: &str) -> Option<Vec<u8>> {
        if id.len() > MAX_SESSION_ID_LEN {
            return None;
        }
        let (p, t) = id.split_once('.')?;
        let payload = B64.decode(p).ok()?;
        let tag = B64.decode(t).ok()?;
        let input = Self::mac_input(identity, route, &payload);
        // Constant-time comparison inside ring, against each key in turn.
        self.keys
            .iter()
            .any(|k| hmac::verify(k, &input, &tag).is_ok())
            .then_some(payload)
    }
}

/// Fresh random bytes (stdio session keys, request ids).
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .expect("the operating system's random number generator failed");
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_binding() {
        let c = SessionCodec::from_key(b"k");
        let id = c.encode("alice", b"upstream-session-1");
        assert!(id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
        assert_eq!(c.decode("alice", &id).unwrap(), b"upstream-session-1");
        assert!(c.decode("bob", &id).is_none(), "bound to its identity");
    }

    #[test]
    fn tampered_or_foreign_ids_are_unknown() {
        let c = SessionCodec::from_key(b"k");
        let id = c.encode("", b"abc");
        let mut bad = id.clone().into_bytes();
        bad[0] ^= 1;
        assert!(c.decode("", std::str::from_utf8(&bad).unwrap()).is_none());
        assert!(SessionCodec::from_key(b"other").decode("", &id).is_none());
        assert!(c.decode("", "no-dot").is_none());
    }

    #[test]
    fn rotation_first_key_signs_every_key_verifies() {
        let old = SessionCodec::from_key(b"old key");
        let rotated = SessionCodec::from_keys(&[b"new key", b"old key"]);
        let minted_before = old.encode("alice", b"s1");
        assert_eq!(rotated.decode("alice", &minted_before).unwrap(), b"s1");
        let minted_after = rotated.encode("alice", b"s2");
        assert!(
            old.decode("alice", &minted_after).is_none(),
            "signed by the new key"
        );
        let retired = SessionCodec::from_key(b"new key");
        assert!(retired.decode("alice", &minted_before).is_none());
        assert_eq!(retired.decode("alice", &minted_after).unwrap(), b"s2");
        assert_ne!(old.generation(), rotated.generation());
    }

    #[test]
    fn process_key_is_stable() {
        let a = SessionCodec::process_random();
        let b = SessionCodec::process_random();
        assert_eq!(b.decode("x", &a.encode("x", b"p")).unwrap(), b"p");
    }
}
