//! Session ids handed to clients: `<payload>.<mac>`, both base64url.
//!
//! The payload is what routing needs (the upstream's own session id, or the stdio hub's
//! session key); the MAC covers the payload and the binding (the identity that created the
//! session), so any worker can check a session id without a shared table, and a session id
//! presented by anyone else, or edited, is simply unknown (404).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

/// The longest session id accepted from a client.
pub const MAX_SESSION_ID_LEN: usize = 1024;

/// The process's session-id key.
pub struct SessionCodec {
    key: hmac::Key,
}

impl SessionCodec {
    /// A codec with a fresh random key (sessions do not survive a restart, and need not:
    /// a client seeing 404 starts a new session, as the transport spec prescribes).
    pub fn random() -> Self {
        let mut bytes = [0u8; 32];
        // The OS RNG failing is not something the gateway can run without.
        SystemRandom::new()
            .fill(&mut bytes)
            .expect("the operating system's random number generator failed");
        Self::from_key(&bytes)
    }

    /// A codec with a given key.
    pub fn from_key(key: &[u8]) -> Self {
        Self {
            key: hmac::Key::new(hmac::HMAC_SHA256, key),
        }
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
        let tag = hmac::sign(&self.key, &Self::mac_input(identity, route, payload));
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
        // Constant-time comparison inside ring.
        hmac::verify(&self.key, &Self::mac_input(identity, route, &payload), &tag).ok()?;
        Some(payload)
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
}
