//! Access tokens: opaque tokens an external authorization server registers, each mapping
//! (service, token) to an application and optionally a user, with an optional expiry (3scale
//! apisonator's "native OAuth" tokens). The rules here are the ones every API and store shares:
//! what a token, an id and a TTL may be, and who a request is once a token is resolved.
//!
//! Decisions where apisonator was loose (its reference §11), taken here once for both APIs:
//! * a token is 1..=`max_bytes` bytes of UTF-8 without control characters and without leading or
//!   trailing whitespace (apisonator accepted `" abc "` at creation and stripped it when
//!   authorizing, so such a token could never be used);
//! * a TTL is plain decimal seconds, `0` meaning permanent, at most `max_ttl` (apisonator took
//!   Ruby's `Integer()`: hex, octal, underscores, no upper bound); absent means the default
//!   (86,400 s, apisonator's since v2.84.0, not "never expires" as its document said);
//! * service, application and user ids are 1..=[`MAX_ID_BYTES`] bytes of the same characters.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};

/// Random bytes in a generated token (256 bits).
pub const GENERATED_RANDOM_BYTES: usize = 32;
/// Bytes of a generated token's issue time (milliseconds since the epoch, big-endian).
const ISSUED_BYTES: usize = 6;
/// Bytes of a generated token's check value (the start of the SHA-256 of the bytes before it).
const CHECK_BYTES: usize = 4;
/// Bytes of a generated token before base64url.
const GENERATED_BYTES: usize = ISSUED_BYTES + GENERATED_RANDOM_BYTES + CHECK_BYTES;
/// Characters of a generated token.
pub const GENERATED_TOKEN_CHARS: usize = GENERATED_BYTES * 4 / 3;
/// Longest service, application or user id, bytes.
pub const MAX_ID_BYTES: usize = 256;
/// apisonator's default token size limit, bytes (`CONFIG_OAUTH_MAX_TOKEN_SIZE`).
pub const DEFAULT_MAX_TOKEN_BYTES: usize = 3584;
/// apisonator's TTL when none is given, seconds.
pub const DEFAULT_TTL_S: u64 = 86_400;

/// Why a token's or an id's text is refused (`access_token_format_invalid`, `invalid_id`). The
/// messages do not name what was checked: the caller's message does ("app_id is not acceptable:
/// it is empty").
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// Empty.
    #[error("it is empty")]
    Empty,
    /// Longer than allowed.
    #[error("it is longer than {max} bytes")]
    TooLong {
        /// The limit.
        max: usize,
    },
    /// Starts or ends with whitespace.
    #[error("it starts or ends with whitespace")]
    Padded,
    /// Holds a control character.
    #[error("it holds a control character")]
    Control,
}

/// Checks a token's text.
pub fn check_token(token: &str, max_bytes: usize) -> Result<(), FormatError> {
    check_text(token, max_bytes)
}

fn check_text(text: &str, max_bytes: usize) -> Result<(), FormatError> {
    if text.is_empty() {
        return Err(FormatError::Empty);
    }
    if text.len() > max_bytes {
        return Err(FormatError::TooLong { max: max_bytes });
    }
    if text.trim() != text {
        return Err(FormatError::Padded);
    }
    if text.chars().any(char::is_control) {
        return Err(FormatError::Control);
    }
    Ok(())
}

/// Checks a service, application or user id.
pub fn check_id(id: &str) -> Result<(), FormatError> {
    check_text(id, MAX_ID_BYTES)
}

/// A new token issued at `now_ms`: its issue time (6 bytes), 256 bits from a CSPRNG seeded by the
/// operating system, and 4 check bytes (the start of the SHA-256 of the 38 before), base64url
/// without padding: 56 characters.
///
/// The issue time leads so that the SQL stores, keyed by [`token_key`], write tokens generated
/// together next to each other (one page at the right edge of a B-tree for a batch of creates,
/// instead of one random page each). The check bytes let [`generated_at`] tell these tokens from
/// any other text: a token that merely has their length is keyed by its hash alone.
pub fn generate_token(now_ms: u64) -> String {
    let mut bytes = [0u8; GENERATED_BYTES];
    bytes[..ISSUED_BYTES].copy_from_slice(&now_ms.to_be_bytes()[8 - ISSUED_BYTES..]);
    rand::fill(&mut bytes[ISSUED_BYTES..ISSUED_BYTES + GENERATED_RANDOM_BYTES]);
    let check = Sha256::digest(&bytes[..ISSUED_BYTES + GENERATED_RANDOM_BYTES]);
    bytes[ISSUED_BYTES + GENERATED_RANDOM_BYTES..].copy_from_slice(&check[..CHECK_BYTES]);
    URL_SAFE_NO_PAD.encode(bytes)
}

/// When `token` was issued, if [`generate_token`] made it (its length, alphabet and check
/// bytes say so); `None` for any other text.
pub fn generated_at(token: &str) -> Option<u64> {
    let bytes = generated_bytes(token)?;
    let mut issued = [0u8; 8];
    issued[8 - ISSUED_BYTES..].copy_from_slice(&bytes[..ISSUED_BYTES]);
    Some(u64::from_be_bytes(issued))
}

/// The bytes of a token [`generate_token`] made, check bytes verified.
fn generated_bytes(token: &str) -> Option<[u8; GENERATED_BYTES]> {
    if token.len() != GENERATED_TOKEN_CHARS {
        return None;
    }
    let mut bytes = [0u8; GENERATED_BYTES];
    let n = URL_SAFE_NO_PAD.decode_slice(token, &mut bytes).ok()?;
    let check = Sha256::digest(&bytes[..ISSUED_BYTES + GENERATED_RANDOM_BYTES]);
    (n == GENERATED_BYTES && check[..CHECK_BYTES] == bytes[ISSUED_BYTES + GENERATED_RANDOM_BYTES..]).then_some(bytes)
}

/// What the SQL stores key a token by within its service: its SHA-256; for a token
/// [`generate_token`] made, its issue time followed by the first 26 bytes of that hash, so that
/// tokens sort by when they were made. Either way 32 bytes, a function of the text alone (a read
/// finds the key a create wrote), and unique per text.
pub fn token_key(token: &str) -> [u8; 32] {
    let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let Some(bytes) = generated_bytes(token) else { return digest };
    let mut key = [0u8; 32];
    key[..ISSUED_BYTES].copy_from_slice(&bytes[..ISSUED_BYTES]);
    key[ISSUED_BYTES..].copy_from_slice(&digest[..32 - ISSUED_BYTES]);
    key
}

/// Why a TTL is refused (`access_token_invalid_ttl`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TtlError {
    /// Not plain decimal seconds.
    #[error("the TTL must be a whole number of seconds, 0 for a permanent token")]
    NotANumber,
    /// Above the configured maximum.
    #[error("the TTL must be at most {max} seconds")]
    TooLong {
        /// The limit, seconds.
        max: u64,
    },
}

/// A TTL as written in a form (apisonator's `ttl` parameter): `None` when absent, else plain
/// decimal seconds with optional surrounding whitespace and an optional `+`.
pub fn parse_ttl(text: Option<&str>) -> Result<Option<u64>, TtlError> {
    let Some(text) = text else { return Ok(None) };
    let digits = text.trim();
    let digits = digits.strip_prefix('+').unwrap_or(digits);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(TtlError::NotANumber);
    }
    digits.parse().map(Some).map_err(|_| TtlError::NotANumber)
}

/// When a token created at `now_ms` with `ttl_s` (`None`: the default) expires, in ms since the
/// epoch; `None` for a permanent token (`ttl_s == 0`).
pub fn expires_at(ttl_s: Option<u64>, now_ms: u64, default_s: u64, max_s: u64) -> Result<Option<u64>, TtlError> {
    let ttl = ttl_s.unwrap_or(default_s);
    if ttl > max_s {
        return Err(TtlError::TooLong { max: max_s });
    }
    Ok((ttl > 0).then(|| now_ms.saturating_add(ttl.saturating_mul(1000))))
}

/// A stored token as the rules see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The application.
    pub app_id: String,
    /// The user, for a user's token.
    pub user_id: Option<String>,
    /// Expiry, ms since the epoch; `None`: permanent.
    pub expires_at: Option<u64>,
}

impl Grant {
    /// Live at `now` (an expired token is invisible at once, whether or not its storage has been
    /// reclaimed yet).
    pub fn live(&self, now_ms: u64) -> bool {
        self.expires_at.is_none_or(|e| now_ms < e)
    }
}

/// What an authorization call names, after normalisation (trimmed; empty means absent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Named<'a> {
    /// `access_token`.
    pub access_token: Option<&'a str>,
    /// `app_id`.
    pub app_id: Option<&'a str>,
    /// `user_id`.
    pub user_id: Option<&'a str>,
}

impl<'a> Named<'a> {
    /// Normalises raw parameters as apisonator did: surrounding whitespace is stripped and an
    /// empty value counts as absent.
    pub fn new(access_token: Option<&'a str>, app_id: Option<&'a str>, user_id: Option<&'a str>) -> Self {
        let clean = |v: Option<&'a str>| v.map(str::trim).filter(|v| !v.is_empty());
        Self { access_token: clean(access_token), app_id: clean(app_id), user_id: clean(user_id) }
    }

    /// The token to look up, if the answer needs one: a token is consulted only when an
    /// identifier is missing (identifiers given explicitly always win).
    pub fn lookup(&self) -> Option<&'a str> {
        if self.app_id.is_some() && self.user_id.is_some() {
            return None;
        }
        self.access_token
    }
}

/// Who an authorization call is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Authorized {
    /// The application.
    pub app_id: String,
    /// The user, when one was named or the token carries one.
    pub user_id: Option<String>,
}

/// Why an authorization call names nobody.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthorizeError {
    /// No application was named and no token given (`application_not_found`, id `""`).
    #[error("application with id=\"\" was not found")]
    NoApplication,
    /// The token is unknown or expired and no application was named (`access_token_invalid`).
    #[error("token \"{0}\" is invalid: expired or never defined")]
    InvalidToken(String),
}

/// The precedence rule (apisonator's, reference §7.2 and, for users, §7.3): each identifier given
/// explicitly wins over the token's; the token fills only what is missing; an unknown or expired
/// token is an error only when it had to supply the application. `found` is the lookup of
/// [`Named::lookup`]'s token (`None` when nothing was looked up or nothing live was found).
pub fn authorize(named: &Named<'_>, found: Option<&Grant>) -> Result<Authorized, AuthorizeError> {
    let named_user = named.user_id.map(str::to_string);
    match (named.app_id, found) {
        (Some(app), found) => Ok(Authorized {
            app_id: app.to_string(),
            user_id: named_user.or_else(|| found.and_then(|g| g.user_id.clone())),
        }),
        (None, Some(grant)) => {
            Ok(Authorized { app_id: grant.app_id.clone(), user_id: named_user.or_else(|| grant.user_id.clone()) })
        }
        (None, None) => match named.access_token {
            None => Err(AuthorizeError::NoApplication),
            Some(token) => Err(AuthorizeError::InvalidToken(token.to_string())),
        },
    }
}

/// The (application, user) an apisonator token key's value names. Since 2.95 the value is the
/// bare application id; up to 2.94 a user was written `user_len:<N>/<user>/<app>`, N counting
/// characters (Unicode scalar values), and an application id that itself held `user_len:<d>/`
/// was written with an empty user (`user_len:0//<app>`). The marker is searched anywhere in the
/// value, as apisonator's unanchored pattern did; a value whose length does not fit is taken
/// whole as the application id.
pub fn decode_apisonator_value(value: &str) -> (&str, Option<&str>) {
    let mut search = 0;
    while let Some(found) = value[search..].find("user_len:") {
        let start = search + found + "user_len:".len();
        let digits = value[start..].bytes().take_while(u8::is_ascii_digit).count();
        let after = start + digits;
        if digits > 0 && value[after..].starts_with('/') {
            let Ok(chars) = value[start..after].parse::<usize>() else { return (value, None) };
            let rest = &value[after + 1..];
            let user_end = match rest.char_indices().nth(chars) {
                Some((i, _)) => i,
                None if rest.chars().count() == chars => rest.len(),
                None => return (value, None),
            };
            let (user, tail) = rest.split_at(user_end);
            // One separator, then the application id (apisonator skipped it unchecked).
            let app = tail.get(1..).unwrap_or("");
            return (app, (!user.is_empty()).then_some(user));
        }
        search = start;
    }
    (value, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_text_rules() {
        for ok in ["VALID-TOKEN", "foo bar", "_*-/9090", "?---$$$$", "6666", "hello.xml.xml", "ü/β"] {
            assert_eq!(check_token(ok, DEFAULT_MAX_TOKEN_BYTES), Ok(()), "{ok}");
        }
        assert_eq!(check_token("", 10), Err(FormatError::Empty));
        assert_eq!(check_token(" abc ", 10), Err(FormatError::Padded));
        assert_eq!(check_token("abc\n", 10), Err(FormatError::Padded));
        assert_eq!(check_token("a\u{7}b", 10), Err(FormatError::Control));
        // The limit is in bytes: 3583 characters and a two-byte one are 3585 bytes.
        let ascii = "A".repeat(3583);
        assert_eq!(check_token(&format!("{ascii}A"), 3584), Ok(()));
        assert_eq!(check_token(&format!("{ascii}AB"), 3584), Err(FormatError::TooLong { max: 3584 }));
        assert_eq!(check_token(&format!("{ascii}β"), 3584), Err(FormatError::TooLong { max: 3584 }));
        assert_eq!(check_id(&"x".repeat(257)), Err(FormatError::TooLong { max: MAX_ID_BYTES }));
    }

    #[test]
    fn generated_tokens_carry_their_issue_time_256_random_bits_and_a_check() {
        let now = 1_764_000_000_123;
        let (a, b) = (generate_token(now), generate_token(now));
        assert_eq!((a.len(), b.len()), (56, 56));
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_'));
        let bytes = URL_SAFE_NO_PAD.decode(&a).unwrap();
        assert_eq!(bytes.len(), 42);
        assert_eq!(&bytes[..6], &now.to_be_bytes()[2..]);
        assert_ne!(&bytes[6..38], &URL_SAFE_NO_PAD.decode(&b).unwrap()[6..38]);
        assert_eq!(&bytes[38..], &Sha256::digest(&bytes[..38])[..4]);
        assert_eq!((generated_at(&a), generated_at(&b)), (Some(now), Some(now)));
        assert_eq!(check_token(&a, DEFAULT_MAX_TOKEN_BYTES), Ok(()));
    }

    #[test]
    fn only_generated_tokens_are_keyed_by_their_issue_time() {
        let now = 1_764_000_000_123;
        let token = generate_token(now);
        let key = token_key(&token);
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        assert_eq!((&key[..6], &key[6..]), (&now.to_be_bytes()[2..], &digest[..26]));
        assert!(token_key(&generate_token(now + 1)) > key, "later tokens sort after");
        // One character changed: the check fails, and the text is keyed by its hash alone (so
        // are tokens of the first generated format, 43 characters, and any other text).
        let mut forged = token.clone().into_bytes();
        forged[20] = if forged[20] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).unwrap();
        for other in [forged.as_str(), &token[..43], "tok-alice-1", &"x".repeat(56), &format!("{}=", &token[..55])] {
            assert_eq!(generated_at(other), None, "{other}");
            assert_eq!(token_key(other), <[u8; 32]>::from(Sha256::digest(other.as_bytes())), "{other}");
        }
    }

    #[test]
    fn ttls_are_plain_decimal() {
        assert_eq!(parse_ttl(None), Ok(None));
        for (text, want) in [("0", 0), ("100", 100), (" 100 ", 100), ("+5", 5), ("08", 8), ("1000", 1000)] {
            assert_eq!(parse_ttl(Some(text)), Ok(Some(want)), "{text}");
        }
        // apisonator's invalid ones, and what Ruby's Integer() took that we do not.
        for bad in [
            "-666",
            "-1",
            "",
            " ",
            "80x",
            "x80",
            "adbc",
            "1.5",
            "1e3",
            "-0",
            "0x1A",
            "0b11",
            "0o17",
            "1_000",
            "99999999999999999999",
        ] {
            assert_eq!(parse_ttl(Some(bad)), Err(TtlError::NotANumber), "{bad:?}");
        }
    }

    #[test]
    fn expiry_from_ttl() {
        let now = 1_000_000;
        assert_eq!(expires_at(None, now, 86_400, 1_000_000), Ok(Some(now + 86_400_000)), "absent: the default");
        assert_eq!(expires_at(Some(0), now, 86_400, 1_000_000), Ok(None), "0: permanent");
        assert_eq!(expires_at(Some(10), now, 86_400, 1_000_000), Ok(Some(now + 10_000)));
        assert_eq!(expires_at(Some(1_000_001), now, 86_400, 1_000_000), Err(TtlError::TooLong { max: 1_000_000 }));
        let g = Grant { app_id: "a".into(), user_id: None, expires_at: Some(now) };
        assert!(g.live(now - 1) && !g.live(now), "expired at its expiry");
        assert!(Grant { expires_at: None, ..g }.live(u64::MAX));
    }

    fn grant(app: &str, user: Option<&str>) -> Grant {
        Grant { app_id: app.into(), user_id: user.map(String::from), expires_at: None }
    }

    fn ok(app: &str, user: Option<&str>) -> Result<Authorized, AuthorizeError> {
        Ok(Authorized { app_id: app.into(), user_id: user.map(String::from) })
    }

    #[test]
    fn parameters_are_trimmed_and_empty_ones_absent() {
        let n = Named::new(Some("  tok "), Some(""), Some("  "));
        assert_eq!(n, Named { access_token: Some("tok"), app_id: None, user_id: None });
    }

    #[test]
    fn identifiers_given_explicitly_win_over_the_tokens() {
        let app_token = grant("2001", None);
        let user_token = grant("2001", Some("alex"));
        // §7.2: the token supplies the application when none is named.
        let n = Named::new(Some("valid-token"), None, None);
        assert_eq!(n.lookup(), Some("valid-token"));
        assert_eq!(authorize(&n, Some(&app_token)), ok("2001", None));
        // §7.2 rule 4: a named application wins; an invalid token beside it is no error.
        let n = Named::new(Some("fake"), Some("3001"), None);
        assert_eq!(authorize(&n, None), ok("3001", None));
        assert_eq!(authorize(&n, Some(&app_token)), ok("3001", None));
        // §7.3: a user's token gives its user when none is named...
        let n = Named::new(Some("user-token"), None, None);
        assert_eq!(authorize(&n, Some(&user_token)), ok("2001", Some("alex")));
        // ...the same user named: the same answer...
        let n = Named::new(Some("user-token"), None, Some("alex"));
        assert_eq!(authorize(&n, Some(&user_token)), ok("2001", Some("alex")));
        // ...and a user named explicitly wins over the token's.
        let n = Named::new(Some("user-token"), None, Some("made-up"));
        assert_eq!(authorize(&n, Some(&user_token)), ok("2001", Some("made-up")));
        // Each fills only the gap: a named app keeps the token's user.
        let n = Named::new(Some("user-token"), Some("3001"), None);
        assert_eq!(authorize(&n, Some(&user_token)), ok("3001", Some("alex")));
        // Both named: the token is not even looked up.
        let n = Named::new(Some("user-token"), Some("3001"), Some("bob"));
        assert_eq!(n.lookup(), None);
        assert_eq!(authorize(&n, None), ok("3001", Some("bob")));
    }

    #[test]
    fn nobody_named_is_an_error_saying_why() {
        assert_eq!(authorize(&Named::new(None, None, None), None), Err(AuthorizeError::NoApplication));
        assert_eq!(
            authorize(&Named::new(Some("boo"), None, None), None),
            Err(AuthorizeError::InvalidToken("boo".into()))
        );
        assert_eq!(
            AuthorizeError::InvalidToken("boo".into()).to_string(),
            r#"token "boo" is invalid: expired or never defined"#
        );
        assert_eq!(AuthorizeError::NoApplication.to_string(), r#"application with id="" was not found"#);
        // A user alone names no application.
        assert_eq!(authorize(&Named::new(None, None, Some("alex")), None), Err(AuthorizeError::NoApplication));
    }

    #[test]
    fn apisonator_values_decode_as_r1_wrote_them() {
        // The reference's examples (§2.2), produced by R1's own encoder.
        assert_eq!(decode_apisonator_value("2001"), ("2001", None));
        assert_eq!(decode_apisonator_value("user_len:4/alex/2001"), ("2001", Some("alex")));
        assert_eq!(decode_apisonator_value("user_len:0//user_len:5/myapp"), ("user_len:5/myapp", None));
        assert_eq!(decode_apisonator_value("user_len:1/ü/a/b"), ("a/b", Some("ü")));
        assert_eq!(decode_apisonator_value("user_len:0//2001"), ("2001", None));
        // N counts characters, not bytes; the user may hold slashes.
        assert_eq!(decode_apisonator_value("user_len:3/a/β/app"), ("app", Some("a/β")));
        // No marker, or one that does not parse: the whole value is the application.
        assert_eq!(decode_apisonator_value("user_len:x/app"), ("user_len:x/app", None));
        assert_eq!(decode_apisonator_value("user_len:9/ab"), ("user_len:9/ab", None));
    }
}
