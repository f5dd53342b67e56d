//! `X-KeyID` and `X-Client-State` parsing (spec §1.2, errors K1–K7) and the `fxa_kid` format.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// Why the key-id headers were refused, in the order they are checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum KeyIdError {
    /// K1: no `X-KeyID`.
    #[error("missing X-KeyID header")]
    Missing,
    /// K2: `X-KeyID` is not visible ASCII.
    #[error("invalid X-KeyID header")]
    NotVisibleAscii,
    /// K3: no `-` in `X-KeyID`.
    #[error("X-KeyID has no separator")]
    NoSeparator,
    /// K4: the client-state part is not unpadded URL-safe base64.
    #[error("X-KeyID client state is not base64")]
    BadClientState,
    /// K5: `X-Client-State` fails `^[a-zA-Z0-9._-]{1,32}$`.
    #[error("invalid X-Client-State value")]
    BadClientStateHeader,
    /// K6: `X-Client-State` differs from the state in `X-KeyID`.
    #[error("X-Client-State does not match X-KeyID")]
    ClientStateMismatch,
    /// K7: the keys_changed_at part is not an `i64`.
    #[error("X-KeyID keys_changed_at is not an integer")]
    BadKeysChangedAt,
}

/// What the key-id headers say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyId {
    /// `None` when absent or zero (zero means absent on input).
    pub keys_changed_at: Option<i64>,
    /// Lowercase hex of the client-state bytes; possibly empty.
    pub client_state: String,
}

/// True for bytes 0x20..=0x7e; header values outside that are "not visible ASCII".
pub fn is_visible_ascii(bytes: &[u8]) -> bool {
    bytes.iter().all(|b| (0x20..=0x7e).contains(b))
}

fn client_state_header_ok(v: &str) -> bool {
    (1..=32).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Parses `X-KeyID` (raw header bytes, `None` if absent) and the optional `X-Client-State`.
///
/// An `X-Client-State` value that is not visible ASCII is treated as absent, as Mozilla does.
pub fn parse_key_id(key_id: Option<&[u8]>, client_state: Option<&[u8]>) -> Result<KeyId, KeyIdError> {
    let raw = key_id.ok_or(KeyIdError::Missing)?;
    if !is_visible_ascii(raw) {
        return Err(KeyIdError::NotVisibleAscii);
    }
    // Visible ASCII is valid UTF-8.
    let text = std::str::from_utf8(raw).map_err(|_| KeyIdError::NotVisibleAscii)?;
    let (kca_part, cs_part) = text.split_once('-').ok_or(KeyIdError::NoSeparator)?;
    let cs_bytes = URL_SAFE_NO_PAD.decode(cs_part).map_err(|_| KeyIdError::BadClientState)?;
    let derived = hex::encode(cs_bytes);

    let header = client_state.filter(|v| is_visible_ascii(v)).and_then(|v| std::str::from_utf8(v).ok());
    if let Some(header) = header {
        if !client_state_header_ok(header) {
            return Err(KeyIdError::BadClientStateHeader);
        }
        if header != derived {
            return Err(KeyIdError::ClientStateMismatch);
        }
    }
    let kca: i64 = kca_part.parse().map_err(|_| KeyIdError::BadKeysChangedAt)?;
    Ok(KeyId { keys_changed_at: (kca != 0).then_some(kca), client_state: derived })
}

/// `fxa_kid` for the token payload: `{:013}-{b64url_nopad(client_state bytes)}`, using
/// keys_changed_at when known, else the generation.
pub fn fxa_kid(keys_changed_at: Option<i64>, generation: i64, client_state_hex: &str) -> String {
    // Stored client states are lowercase hex (validated on input); anything else encodes as empty.
    let bytes = hex::decode(client_state_hex).unwrap_or_default();
    format!("{:013}-{}", keys_changed_at.unwrap_or(generation), URL_SAFE_NO_PAD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kid: &str, cs: Option<&str>) -> Result<KeyId, KeyIdError> {
        parse_key_id(Some(kid.as_bytes()), cs.map(str::as_bytes))
    }

    fn ok(kca: Option<i64>, cs: &str) -> Result<KeyId, KeyIdError> {
        Ok(KeyId { keys_changed_at: kca, client_state: cs.to_string() })
    }

    #[test]
    fn decodings() {
        assert_eq!(parse("0000000001234-qqo", None), ok(Some(1234), "aaaa"));
        assert_eq!(parse("1234-qqo", None), ok(Some(1234), "aaaa"));
        assert_eq!(parse("2345-u7s", None), ok(Some(2345), "bbbb"));
        assert_eq!(parse("1-ASNFZ4mrze8BI0VniavN7w", None), ok(Some(1), "0123456789abcdef0123456789abcdef"));
        assert_eq!(parse("1234-", None), ok(Some(1234), ""));
        assert_eq!(parse("0-qqo", None), ok(None, "aaaa"));
        assert_eq!(parse("+7-YWFh", None), ok(Some(7), "616161"));
        // Split at the first '-': the rest is the client state.
        assert_eq!(parse("12-qq-o", None), ok(Some(12), "aaafa8"));
    }

    #[test]
    fn errors_in_order() {
        assert_eq!(parse_key_id(None, None), Err(KeyIdError::Missing));
        assert_eq!(parse_key_id(Some(b"12\x01-qqo"), None), Err(KeyIdError::NotVisibleAscii));
        assert_eq!(parse_key_id(Some("12-qqé".as_bytes()), None), Err(KeyIdError::NotVisibleAscii));
        assert_eq!(parse("1234qqo", None), Err(KeyIdError::NoSeparator));
        assert_eq!(parse("1234-state!", None), Err(KeyIdError::BadClientState));
        assert_eq!(parse("1234-qqo=", None), Err(KeyIdError::BadClientState));
        // Non-canonical trailing bits.
        assert_eq!(parse("1234-qqp", None), Err(KeyIdError::BadClientState));
        assert_eq!(parse("1234-qqo", Some("state!")), Err(KeyIdError::BadClientStateHeader));
        assert_eq!(parse("1234-qqo", Some("")), Err(KeyIdError::BadClientStateHeader));
        assert_eq!(parse("1234-qqo", Some(&"a".repeat(33))), Err(KeyIdError::BadClientStateHeader));
        assert_eq!(parse("1234-qqo", Some("bbbb")), Err(KeyIdError::ClientStateMismatch));
        assert_eq!(parse("1234-qqo", Some("AAAA")), Err(KeyIdError::ClientStateMismatch));
        assert_eq!(parse("1234-qqo", Some("aaaa")), ok(Some(1234), "aaaa"));
        // A non-visible X-Client-State is ignored.
        assert_eq!(parse_key_id(Some(b"1234-qqo"), Some(b"\x01")), ok(Some(1234), "aaaa"));
        // K7 comes after the client-state checks.
        assert_eq!(parse("None-qqo", Some("bbbb")), Err(KeyIdError::ClientStateMismatch));
        assert_eq!(parse("None-qqo", None), Err(KeyIdError::BadKeysChangedAt));
        assert_eq!(parse("-5-qqo", None), Err(KeyIdError::BadClientState));
        assert_eq!(parse("-qqo", None), Err(KeyIdError::BadKeysChangedAt));
        assert_eq!(parse(" 12-qqo", None), Err(KeyIdError::BadKeysChangedAt));
        assert_eq!(parse("99999999999999999999-qqo", None), Err(KeyIdError::BadKeysChangedAt));
    }

    #[test]
    fn fxa_kid_vectors() {
        assert_eq!(fxa_kid(Some(1234), 1, "aaaa"), "0000000001234-qqo");
        assert_eq!(fxa_kid(Some(2345), 1, "bbbb"), "0000000002345-u7s");
        assert_eq!(fxa_kid(Some(1234), 0, "616161"), "0000000001234-YWFh");
        assert_eq!(fxa_kid(Some(4567), 0, "636363"), "0000000004567-Y2Nj");
        assert_eq!(fxa_kid(None, 12, "616161"), "0000000000012-YWFh");
        assert_eq!(fxa_kid(Some(450), 0, "bb"), "0000000000450-uw");
        assert_eq!(fxa_kid(Some(123), 0, "aa"), "0000000000123-qg");
        // A stored 0 is used as is; only NULL falls back to the generation.
        assert_eq!(fxa_kid(Some(0), 77, "aaaa"), "0000000000000-qqo");
        assert_eq!(fxa_kid(None, 7, ""), "0000000000007-");
    }
}
