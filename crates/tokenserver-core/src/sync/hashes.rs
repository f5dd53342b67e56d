//! Metrics hashes of the FxA uid (§3.4): HMAC-SHA256 keyed by `fxa_metrics_hash_secret`.

use super::crypto::hmac_sha256;

fn hmac_hex(key: &[u8], msg: &[u8]) -> String {
    hex::encode(hmac_sha256(key, &[msg]))
}

/// The hashes derived from one FxA uid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricsHashes {
    /// 64 hex chars; logged as `uid`.
    pub full: String,
    /// The first 32 hex chars of `full`: `hashed_fxa_uid` in the response and token.
    pub hashed_fxa_uid: String,
    /// `HMAC(secret, hashed_fxa_uid + "none")[..32]`; OAuth has no device id, hence `none`.
    pub hashed_device_id: String,
}

/// Computes `hashed_fxa_uid` (and its full form) and `hashed_device_id` for `fxa_uid`.
pub fn metrics_hashes(secret: &str, fxa_uid: &str) -> MetricsHashes {
    let full = hmac_hex(secret.as_bytes(), fxa_uid.as_bytes());
    let hashed_fxa_uid = full[..32].to_string();
    let device_input = format!("{hashed_fxa_uid}none");
    let hashed_device_id = hmac_hex(secret.as_bytes(), device_input.as_bytes())[..32].to_string();
    MetricsHashes { full, hashed_fxa_uid, hashed_device_id }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_extractor_vector() {
        let h = metrics_hashes("", "test123");
        assert_eq!(h.full, "4d00ecae64b98dd7dc7dea68d0dd615da3d4ed3bd64f6b4645a22d12d39bd895");
        assert_eq!(h.hashed_fxa_uid, "4d00ecae64b98dd7dc7dea68d0dd615d");
        assert_eq!(h.hashed_device_id, "3a41cccbdd666ebc4199f1f9d1249d44");
    }

    #[test]
    fn native_token_vector_hashes() {
        let h = metrics_hashes("secret0", "319b98f9961ff1dbdd07313cd6ba925a");
        assert_eq!(h.hashed_fxa_uid, "ae343f5057b91944a948f4ba023420af");
        assert!(h.full.ends_with("e0ffb44c1d0de8c904e5b49aaa2ec351"));
        assert_eq!(h.hashed_device_id, "2dc9850538605587e7e95ec7516d4c15");
    }

    #[test]
    fn python_metrics_vector() {
        let h = metrics_hashes("super-sekrit", "test1");
        assert_eq!(h.full, "c4c367807c7236ad240b70857d406a4763e5b7f9fdd9340a84106b164603809a");
        assert_eq!(h.hashed_fxa_uid, "c4c367807c7236ad240b70857d406a47");
        assert_eq!(h.hashed_device_id, "086c9eb1c67cd92664ab91bb3e3c8c01");
    }
}
