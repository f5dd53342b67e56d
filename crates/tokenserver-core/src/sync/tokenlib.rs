//! The Sync token (`id`) and its derived Hawk secret (`key`), byte-compatible with Python
//! `tokenlib` 2.0.0 (spec §3.1–§3.3).
//!
//! `id = base64url_padded(payload_json || HMAC-SHA256(sig_key, payload_json))`, where
//! `sig_key = HKDF(master, no salt, "services.mozilla.com/tokenlib/v1/signing")`.
//! `key = base64url_padded(HKDF(master, salt = payload.salt, info = DERIVE_INFO || id))`.

use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine;
use serde::Serialize;
use serde_json::{Map, Value};

use super::crypto::{hkdf_sha256_32, hmac_sha256, hmac_sha256_verify};

const HKDF_INFO_SIGNING: &[u8] = b"services.mozilla.com/tokenlib/v1/signing";
const HKDF_INFO_DERIVE: &[u8] = b"services.mozilla.com/tokenlib/v1/derive/";
const SIG_LEN: usize = 32;

/// The payload the server signs, in the field order of Mozilla's native Rust server.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenPayload {
    /// The storage node URL.
    pub node: String,
    /// `<13-digit keys_changed_at or generation>-<b64url client state>`.
    pub fxa_kid: String,
    /// The FxA uid.
    pub fxa_uid: String,
    /// 32 hex chars.
    pub hashed_device_id: String,
    /// 32 hex chars.
    pub hashed_fxa_uid: String,
    /// Expiry, whole seconds since the epoch.
    pub expires: u64,
    /// The `users.uid` of the assignment.
    pub uid: i64,
    /// Always `"rust"`: storage nodes treat a missing value as `"python"`.
    pub tokenserver_origin: &'static str,
    /// 6 lowercase hex chars (3 random bytes); the HKDF salt of the derived secret.
    pub salt: String,
}

/// A freshly minted token and its derived secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintedToken {
    /// The signed token, URL-safe base64 with padding.
    pub id: String,
    /// The derived Hawk secret, URL-safe base64 with padding (44 chars).
    pub key: String,
}

/// Why a token could not be parsed or verified.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not base64, too short, or its payload is not a JSON object.
    #[error("token is malformed")]
    Malformed,
    /// No master secret produced this signature.
    #[error("token has invalid signature")]
    InvalidSignature,
    /// `expires` is in the past (or missing).
    #[error("token has expired")]
    Expired,
}

/// A verified token.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedToken {
    /// The JSON payload, as signed.
    pub payload: Map<String, Value>,
    /// The derived secret, computed with the secret that verified the signature.
    pub key: String,
    /// Index into the secrets passed to [`parse_token`] of the one that verified.
    pub secret_index: usize,
    /// True when `expires` is in the past.
    pub expired: bool,
}

/// The HKDF signing key for a master secret (§3.2).
pub fn signing_key(master: &[u8]) -> [u8; 32] {
    hkdf_sha256_32(master, None, &[HKDF_INFO_SIGNING])
}

/// Random 6-hex-char salt, as tokenlib makes it.
pub fn random_salt() -> String {
    hex::encode(rand::random::<[u8; 3]>())
}

/// Signs `payload` with `master` and derives its secret.
pub fn mint(payload: &TokenPayload, master: &[u8]) -> MintedToken {
    // Serializing a struct of strings and integers cannot fail.
    let bytes = serde_json::to_vec(payload).unwrap_or_default();
    mint_bytes(&bytes, &payload.salt, &signing_key(master), master)
}

/// Signs already-serialized payload bytes; `sig_key` is [`signing_key`] of `master`, passed in so
/// the server computes it once at startup.
pub fn mint_bytes(payload: &[u8], salt: &str, sig_key: &[u8; 32], master: &[u8]) -> MintedToken {
    let sig = hmac_sha256(sig_key, &[payload]);
    let mut raw = Vec::with_capacity(payload.len() + SIG_LEN);
    raw.extend_from_slice(payload);
    raw.extend_from_slice(&sig);
    let id = URL_SAFE.encode(raw);
    let key = derived_secret_with_salt(&id, salt, master);
    MintedToken { id, key }
}

/// `key` for a token whose salt is known (§3.3).
pub fn derived_secret_with_salt(id: &str, salt: &str, master: &[u8]) -> String {
    let key = hkdf_sha256_32(master, Some(salt.as_bytes()), &[HKDF_INFO_DERIVE, id.as_bytes()]);
    URL_SAFE.encode(key)
}

fn decode(id: &str) -> Result<(Vec<u8>, usize), TokenError> {
    let raw = URL_SAFE.decode(id).or_else(|_| URL_SAFE_NO_PAD.decode(id)).map_err(|_| TokenError::Malformed)?;
    if raw.len() <= SIG_LEN {
        return Err(TokenError::Malformed);
    }
    let split = raw.len() - SIG_LEN;
    Ok((raw, split))
}

fn payload_object(bytes: &[u8]) -> Result<Map<String, Value>, TokenError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err(TokenError::Malformed),
    }
}

/// `key` for a token, reading the salt from the (unverified) payload, like
/// `tokenlib.get_derived_secret`.
pub fn derived_secret(id: &str, master: &[u8]) -> Result<String, TokenError> {
    let (raw, split) = decode(id)?;
    let payload = payload_object(&raw[..split])?;
    let salt = payload.get("salt").and_then(Value::as_str).ok_or(TokenError::Malformed)?;
    Ok(derived_secret_with_salt(id, salt, master))
}

/// Verifies `id` against each secret in turn (what a storage node does), then checks expiry
/// against `now_s`. An expired token is reported in [`ParsedToken::expired`] when
/// `allow_expired`, else as [`TokenError::Expired`].
pub fn parse_token(id: &str, secrets: &[&[u8]], now_s: f64, allow_expired: bool) -> Result<ParsedToken, TokenError> {
    let (raw, split) = decode(id)?;
    let (payload_bytes, sig) = raw.split_at(split);
    let secret_index = secrets
        .iter()
        .position(|s| hmac_sha256_verify(&signing_key(s), payload_bytes, sig))
        .ok_or(TokenError::InvalidSignature)?;
    // The JSON is only looked at once the signature is known to be good.
    let payload = payload_object(payload_bytes)?;
    let expires = payload.get("expires").and_then(Value::as_f64);
    let expired = expires.is_none_or(|e| e <= now_s);
    if expired && !allow_expired {
        return Err(TokenError::Expired);
    }
    let salt = payload.get("salt").and_then(Value::as_str).ok_or(TokenError::Malformed)?;
    let key = derived_secret_with_salt(id, salt, secrets[secret_index]);
    Ok(ParsedToken { payload, key, secret_index, expired })
}

#[cfg(test)]
mod tests {
    use super::*;

    const NATIVE_ID: &str = "eyJub2RlIjoiaHR0cHM6Ly9leGFtcGxlLmNvbSIsImZ4YV9raWQiOiIwMDAwMDAwMDAxMjM0LXFxbyIsImZ4YV91aWQiOiIzMTliOThmOTk2MWZmMWRiZGQwNzMxM2NkNmJhOTI1YSIsImhhc2hlZF9kZXZpY2VfaWQiOiIyZGM5ODUwNTM4NjA1NTg3ZTdlOTVlYzc1MTZkNGMxNSIsImhhc2hlZF9meGFfdWlkIjoiYWUzNDNmNTA1N2I5MTk0NGE5NDhmNGJhMDIzNDIwYWYiLCJleHBpcmVzIjoxNzAwMDAzNjAwLCJ1aWQiOjQyLCJ0b2tlbnNlcnZlcl9vcmlnaW4iOiJydXN0Iiwic2FsdCI6ImExYjJjMyJ9WNJFd5LD3sosjQKXrtQ8xNubkMwHqCCfLkaNwOXo-kY=";
    const PY_ID: &str = "eyJ1aWQiOiA0MiwgIm5vZGUiOiAiaHR0cHM6Ly9leGFtcGxlLmNvbSIsICJleHBpcmVzIjogMjAwMDAwMDAwMCwgInNhbHQiOiAiMWMwMzNmIn1ZuPNh0s-1KLmQc4l0DLE2m9ZObLWn1xoM8-9Gpnzupg==";

    fn native_payload() -> TokenPayload {
        TokenPayload {
            node: "https://example.com".into(),
            fxa_kid: "0000000001234-qqo".into(),
            fxa_uid: "319b98f9961ff1dbdd07313cd6ba925a".into(),
            hashed_device_id: "2dc9850538605587e7e95ec7516d4c15".into(),
            hashed_fxa_uid: "ae343f5057b91944a948f4ba023420af".into(),
            expires: 1_700_003_600,
            uid: 42,
            tokenserver_origin: "rust",
            salt: "a1b2c3".into(),
        }
    }

    #[test]
    fn signing_key_vectors() {
        assert_eq!(
            hex::encode(signing_key(b"Ted Koppel is a robot")),
            "ca50531355a39e0d3e20e0d998b389fde44fdb5ad41a300869dec7fdff788784"
        );
        assert_eq!(
            hex::encode(signing_key(b"secret0")),
            "d97f4804f510ebf3161e7c140bde92f3e988b59f5d90dd38e7bf5382ddddaf91"
        );
        assert_eq!(
            hex::encode(signing_key(b"ssshh-its-a-secret")),
            "cee52e4bf7663fe2d135fb67ba70ad59675e7cc34b08bb5a2f505a750ac35dfd"
        );
    }

    #[test]
    fn native_token_vector_is_reproduced_bit_for_bit() {
        let payload = native_payload();
        let expected_bytes = r#"{"node":"https://example.com","fxa_kid":"0000000001234-qqo","fxa_uid":"319b98f9961ff1dbdd07313cd6ba925a","hashed_device_id":"2dc9850538605587e7e95ec7516d4c15","hashed_fxa_uid":"ae343f5057b91944a948f4ba023420af","expires":1700003600,"uid":42,"tokenserver_origin":"rust","salt":"a1b2c3"}"#;
        assert_eq!(serde_json::to_string(&payload).unwrap_or_default(), expected_bytes);
        let minted = mint(&payload, b"secret0");
        assert_eq!(minted.id, NATIVE_ID);
        assert_eq!(minted.key, "K_BUaLM1k5OXq324QMZy2JMT6g4Iv5ZTN-8C59SxiEc=");
    }

    #[test]
    fn python_minted_token_parses_and_derives() {
        let parsed = parse_token(PY_ID, &[b"ssshh-its-a-secret"], 1_900_000_000.0, false);
        let parsed = parsed.unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(parsed.payload.get("uid"), Some(&Value::from(42)));
        assert_eq!(parsed.key, "ibTZhN6oBZbEXh35OIe3SE3OHbKfGePJzNE1OEjKLaQ=");
        assert_eq!(
            derived_secret(PY_ID, b"ssshh-its-a-secret").as_deref(),
            Ok("ibTZhN6oBZbEXh35OIe3SE3OHbKfGePJzNE1OEjKLaQ=")
        );
        // The HMAC of the payload is the token's last 32 bytes.
        let raw = URL_SAFE.decode(PY_ID).unwrap_or_default();
        assert_eq!(
            hex::encode(&raw[raw.len() - 32..]),
            "59b8f361d2cfb528b9907389740cb1369bd64e6cb5a7d71a0cf3ef46a67ceea6"
        );
    }

    #[test]
    fn every_secret_is_tried_and_the_matching_one_reported() {
        let secrets: [&[u8]; 3] = [b"old", b"older", b"secret0"];
        let parsed = parse_token(NATIVE_ID, &secrets, 1_700_000_000.0, false);
        let parsed = parsed.unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(parsed.secret_index, 2);
        assert_eq!(parsed.key, "K_BUaLM1k5OXq324QMZy2JMT6g4Iv5ZTN-8C59SxiEc=");
        assert!(!parsed.expired);
    }

    #[test]
    fn rejections() {
        let s: [&[u8]; 1] = [b"secret0"];
        assert_eq!(parse_token(NATIVE_ID, &[b"wrong"], 0.0, false), Err(TokenError::InvalidSignature));
        assert_eq!(parse_token(NATIVE_ID, &s, 1_700_003_600.0, false), Err(TokenError::Expired));
        let expired = parse_token(NATIVE_ID, &s, 1_800_000_000.0, true);
        assert!(expired.is_ok_and(|p| p.expired));
        assert_eq!(parse_token("@@@", &s, 0.0, false), Err(TokenError::Malformed));
        assert_eq!(parse_token("YWJj", &s, 0.0, false), Err(TokenError::Malformed));
        // Tampering with the payload breaks the signature.
        let mut raw = URL_SAFE.decode(NATIVE_ID).unwrap_or_default();
        raw[10] ^= 1;
        assert_eq!(parse_token(&URL_SAFE.encode(&raw), &s, 0.0, false), Err(TokenError::InvalidSignature));
        // A signed payload that is not a JSON object is malformed.
        let mut not_json = b"NOTJSON".to_vec();
        not_json.extend_from_slice(&hmac_sha256(&signing_key(b"secret0"), &[b"NOTJSON"]));
        assert_eq!(parse_token(&URL_SAFE.encode(&not_json), &s, 0.0, false), Err(TokenError::Malformed));
        assert_eq!(derived_secret(&URL_SAFE.encode(&not_json), b"secret0"), Err(TokenError::Malformed));
    }

    #[test]
    fn salts_are_six_hex_chars() {
        let s = random_salt();
        assert_eq!(s.len(), 6);
        assert!(s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
    }
}
