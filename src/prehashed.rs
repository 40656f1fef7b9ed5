//! A map hasher for keys that are already uniformly distributed hashes: rate-limit bucket keys
//! (two keyed SipHashes, see `ratelimit::bucket_key`) and SHA-256 digests of API keys.
//!
//! Hashing such a key again with SipHash (std's default) cost a few hundred instructions per
//! lookup on every request. Nobody can steer these keys into one bucket without breaking the
//! hash that made them (a keyed hash with process-random keys, or SHA-256), so the map may
//! use their bits as they are.

use std::hash::{BuildHasherDefault, Hasher};

/// A `HashMap` whose keys are uniform hashes.
pub type PrehashedMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<Prehashed>>;

/// Folds the key's bytes into 64 bits without mixing them further.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            // Rotating before each fold keeps equal words at different offsets from cancelling.
            self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(word);
        }
    }

    fn write_u128(&mut self, v: u128) {
        // Truncation intended: both halves are folded in.
        #[allow(clippy::cast_possible_truncation)]
        let (low, high) = (v as u64, (v >> 64) as u64);
        self.0 = self.0.rotate_left(5) ^ low ^ high.rotate_left(32);
    }

    fn write_usize(&mut self, v: usize) {
        // A slice's length prefix: the same for every key of a fixed-size type.
        self.0 ^= v as u64;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distinct_keys_land_apart_and_lookups_find_them() {
        let key = |i: u32| (u128::from(i) << 64) | u128::from(i.wrapping_mul(2_654_435_761));
        let mut m: PrehashedMap<u128, u32> = PrehashedMap::default();
        for i in 0..1000u32 {
            m.insert(key(i), i);
        }
        assert_eq!(m.len(), 1000);
        assert!((0..1000u32).all(|i| m.get(&key(i)) == Some(&i)));
        assert_eq!(m.get(&key(1000)), None);
        let mut d: PrehashedMap<[u8; 32], u8> = PrehashedMap::default();
        d.insert([1; 32], 1);
        d.insert([2; 32], 2);
        assert_eq!(d.get(&[2; 32]), Some(&2));
        assert_eq!(d.get(&[3; 32]), None);
    }
}
