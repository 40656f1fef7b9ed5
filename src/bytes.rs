//! Equality of the short byte strings the filters compare many times per answer (tool names
//! against an allow list's names and glob pieces, member names against `name`): inline word
//! compares instead of a call into libc's `memcmp`, which cost more than the compare itself
//! when a 100-tool `tools/list` answer asks the policy ten questions per tool.

/// `a == b`.
#[inline(always)]
pub fn eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && same(a, b)
}

/// `hay.starts_with(prefix)`.
#[inline(always)]
pub fn starts_with(hay: &[u8], prefix: &[u8]) -> bool {
    hay.get(..prefix.len()).is_some_and(|h| same(h, prefix))
}

/// `hay.ends_with(suffix)`.
#[inline(always)]
pub fn ends_with(hay: &[u8], suffix: &[u8]) -> bool {
    hay.len()
        .checked_sub(suffix.len())
        .is_some_and(|at| same(&hay[at..], suffix))
}

/// Equality of two slices of the same length: up to 16 bytes as two overlapping words of
/// each (so every byte is compared at least once), longer ones by the standard compare.
#[inline(always)]
fn same(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n > 16 || n != b.len() {
        return a == b;
    }
    if n >= 8 {
        word::<8>(a, 0) == word::<8>(b, 0) && word::<8>(a, n - 8) == word::<8>(b, n - 8)
    } else if n >= 4 {
        word::<4>(a, 0) == word::<4>(b, 0) && word::<4>(a, n - 4) == word::<4>(b, n - 4)
    } else {
        a.iter().zip(b).all(|(x, y)| x == y)
    }
}

/// The `N` bytes of `s` at `at` as an integer (the callers keep `at + N` within `s`).
#[inline(always)]
fn word<const N: usize>(s: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w[..N].copy_from_slice(&s[at..at + N]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agrees_with_the_standard_compares_at_every_length_and_position() {
        let base: Vec<u8> = (0..40u8).map(|i| b'a' + i % 26).collect();
        for n in 0..=40 {
            let a = &base[..n];
            assert!(eq(a, a), "{n}");
            // One differing byte anywhere is seen.
            for at in 0..n {
                let mut b = a.to_vec();
                b[at] ^= 0x20;
                assert!(!eq(a, &b), "{n} {at}");
                assert_eq!(starts_with(&base, &b), base.starts_with(&b), "{n} {at}");
                assert_eq!(ends_with(&base, &b), base.ends_with(&b), "{n} {at}");
            }
            assert!(starts_with(&base, a));
            assert!(ends_with(&base, &base[40 - n..]));
            assert!(!eq(a, &base[..n.saturating_sub(1)]) || n == 0);
        }
        assert!(!starts_with(b"ab", b"abc"));
        assert!(!ends_with(b"bc", b"abc"));
        assert!(eq(b"", b""));
    }
}
