//! The two primitives the token format is built from: HMAC-SHA256 and HKDF-SHA256 (RFC 5869).

use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// HMAC-SHA256 over the concatenation of `parts`.
pub fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC takes keys of any length; `new_from_slice` only fails for fixed-size-key MACs.
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA256 accepts any key length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time check of an HMAC-SHA256 tag.
pub fn hmac_sha256_verify(key: &[u8], msg: &[u8], tag: &[u8]) -> bool {
    #[allow(clippy::expect_used)]
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC-SHA256 accepts any key length");
    mac.update(msg);
    mac.verify_slice(tag).is_ok()
}

/// HKDF-SHA256 producing 32 bytes. `salt = None` means 32 zero bytes, as RFC 5869 says.
pub fn hkdf_sha256_32(ikm: &[u8], salt: Option<&[u8]>, info: &[&[u8]]) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::new(salt, ikm);
    let mut out = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's 8160-byte limit.
    #[allow(clippy::expect_used)]
    hk.expand_multi_info(info, &mut out).expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hkdf_rfc5869_case1_prefix() {
        // RFC 5869 A.1, truncated to our fixed 32-byte output.
        let ikm = [0x0bu8; 22];
        let salt = hex::decode("000102030405060708090a0b0c").unwrap_or_default();
        let info = hex::decode("f0f1f2f3f4f5f6f7f8f9").unwrap_or_default();
        let okm = hkdf_sha256_32(&ikm, Some(&salt), &[&info]);
        assert_eq!(hex::encode(okm), "3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf");
    }

    #[test]
    fn hmac_verify_rejects_a_changed_tag() {
        let tag = hmac_sha256(b"k", &[b"msg"]);
        assert!(hmac_sha256_verify(b"k", b"msg", &tag));
        let mut bad = tag;
        bad[31] ^= 1;
        assert!(!hmac_sha256_verify(b"k", b"msg", &bad));
        assert!(!hmac_sha256_verify(b"k", b"msg", &tag[..31]));
    }
}
