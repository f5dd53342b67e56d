//! Bucketed assignment: users hash into a fixed number of buckets and each bucket is assigned to
//! one node, so that moving a bucket moves a known, stable slice of the users.

use sha2::{Digest, Sha256};

/// The bucket of `email` among `buckets` (≥ 1): the first 8 bytes of SHA-256(email), big-endian,
/// modulo `buckets`. Stable across processes, versions and backends.
pub fn bucket_of(email: &str, buckets: i64) -> i64 {
    let digest = Sha256::digest(email.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    let n = u64::try_from(buckets.max(1)).unwrap_or(1);
    // Below `buckets`, so it fits back in an i64.
    i64::try_from(u64::from_be_bytes(first) % n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_stable_and_spread() {
        // Pinned: a change here would move every user of every bucketed deployment.
        assert_eq!(bucket_of("a@example.com", 1), 0);
        let first = bucket_of("a@example.com", 1024);
        assert_eq!(first, bucket_of("a@example.com", 1024));
        let digest = Sha256::digest(b"a@example.com");
        let expected = u64::from_be_bytes([
            digest[0], digest[1], digest[2], digest[3], digest[4], digest[5], digest[6], digest[7],
        ]) % 1024;
        assert_eq!(first as u64, expected);
        let mut counts = [0u32; 16];
        for i in 0..16_000 {
            counts[bucket_of(&format!("user{i}@example.com"), 16) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
    }
}
