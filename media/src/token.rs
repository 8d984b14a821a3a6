//! Comparing a secret a client presents (publish/viewer tokens) with the
//! configured one without leaking, through timing, how much of it matched.

/// True when `given` equals `expected`. The time taken depends only on
/// `expected`'s length, never on where (or whether) the two differ, so a
/// client cannot guess a token byte by byte from response times.
pub fn matches(given: &str, expected: &str) -> bool {
    let (a, b) = (given.as_bytes(), expected.as_bytes());
    let mut diff = a.len() ^ b.len();
    for (i, x) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(0) ^ x);
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    // From rtc/src/http.rs and ingest/src/rtmp/mod.rs.
    #[test]
    fn compares() {
        assert!(matches("abc", "abc"));
        assert!(matches("", ""));
        assert!(!matches("abd", "abc"));
        assert!(!matches("ab", "abc"));
        assert!(!matches("abcd", "abc"));
        assert!(!matches("", "abc"));
        assert!(!matches("abc", ""));
        // A prefix padded with NULs is still a different token.
        assert!(!matches("ab\0", "ab"));
        assert!(!matches("ab", "ab\0"));
    }

    proptest! {
        #[test]
        fn agrees_with_eq(a in ".{0,8}", b in ".{0,8}") {
            prop_assert_eq!(matches(&a, &b), a == b);
            prop_assert!(matches(&a, &a));
        }
    }
}
