//! Session tokens: what a client holds, what a store keeps.
//!
//! A token is 36 bytes, written as 48 characters of unpadded base64url:
//!
//! * a 12-byte session id from the operating system's CSPRNG, drawn when the session is created
//!   and shared by every successor: it keeps a session's tokens together (one lock shard, one Redis
//!   Cluster slot) without a lookup;
//! * 6 bytes: when the token was issued, in milliseconds since the UNIX epoch (big-endian);
//! * 18 bytes (144 bits) from the CSPRNG, drawn afresh for each token: what makes it unguessable.
//!
//! Stores keep only a [`TokenHash`]: the issue time followed by 26 bytes of the token's SHA-256.
//! Leading with the issue time makes tokens issued together sort together, so a B-tree store
//! writes a batch of new tokens, and the recently issued tokens they replace, on a few pages at
//! the right edge of its index instead of on one random page per token.
//!
//! Tokens of the first format (32 bytes, 43 characters: the session id and 20 fresh bytes, keyed
//! by their whole SHA-256) are still accepted, so sessions stored before an upgrade keep working;
//! their successors are of the current format.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::sync::crypto::hmac_sha256;

/// Bytes of the session (chain) id at the start of every token.
pub const CHAIN_BYTES: usize = 12;
/// Bytes of the issue time that follows it.
const ISSUED_BYTES: usize = 6;
/// Bytes of a token of the current format.
pub const TOKEN_BYTES: usize = 36;
/// Characters of a token's text form.
pub const TOKEN_CHARS: usize = 48;
/// Bytes of a token of the first format (still accepted, no longer issued).
pub const FIRST_FORMAT_BYTES: usize = 32;
/// Characters of a first-format token.
pub const FIRST_FORMAT_CHARS: usize = 43;

/// A session token (secret: never logged, never stored in clear).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken {
    /// The token; a first-format token uses the first [`FIRST_FORMAT_BYTES`] (the rest are zero).
    bytes: [u8; TOKEN_BYTES],
    /// 36, or 32 for a first-format token.
    len: u8,
}

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionToken(chain {}, ***)", self.chain())
    }
}

/// The session id shared by a token and all its successors.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChainId(pub [u8; CHAIN_BYTES]);

impl std::fmt::Display for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&URL_SAFE_NO_PAD.encode(self.0))
    }
}

impl std::fmt::Debug for ChainId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChainId({self})")
    }
}

/// What a store keeps of a token, and keys it by: the issue time, then 26 bytes of the token's
/// SHA-256 (a first-format token: its whole SHA-256). Bytes 16.. are hash output in both forms.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", hex::encode(&self.0[24..]))
    }
}

impl TokenHash {
    /// Hex form (Redis keys).
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        self.push_hex(&mut out);
        out
    }

    /// Appends the hex form to `out` (`hex::encode` goes through a `char` iterator, several
    /// times slower on the rotation path, which writes three of these).
    pub fn push_hex(&self, out: &mut String) {
        let mut buf = [0u8; 64];
        // 32 bytes always fit 64 hex digits; the digits are ASCII.
        if hex::encode_to_slice(self.0, &mut buf).is_ok() {
            out.push_str(std::str::from_utf8(&buf).unwrap_or_default());
        }
    }

    /// From a 32-byte slice read back from a store.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

/// The successor token, encrypted so that only a holder of its predecessor can read it back
/// (for a retry inside the grace window) while the store still holds no usable token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealedSuccessor {
    bytes: [u8; TOKEN_BYTES],
    /// As [`SessionToken`]'s (a byte, not a `usize`: every rotated record holds one).
    len: u8,
}

impl std::fmt::Debug for SealedSuccessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedSuccessor(***)")
    }
}

impl SealedSuccessor {
    /// The stored form.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// From a store's bytes: a sealed token of either format.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        let (bytes, len) = token_bytes(bytes)?;
        Some(Self { bytes, len })
    }
}

/// A token's bytes, when `bytes` has the length of either format.
fn token_bytes(bytes: &[u8]) -> Option<([u8; TOKEN_BYTES], u8)> {
    if bytes.len() != TOKEN_BYTES && bytes.len() != FIRST_FORMAT_BYTES {
        return None;
    }
    let mut out = [0u8; TOKEN_BYTES];
    out[..bytes.len()].copy_from_slice(bytes);
    Some((out, bytes.len() as u8))
}

const SEAL_LABEL: &[u8] = b"tokenserver session successor v1";
/// Labels the pad's bytes beyond the first 32 (the first 32 are the first format's whole pad).
const SEAL_TAIL_LABEL: &[u8] = b" tail";

/// Milliseconds since the UNIX epoch, as a token's 6 issue-time bytes.
fn issued_now() -> [u8; ISSUED_BYTES] {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64);
    let be = ms.unwrap_or(0).to_be_bytes();
    let mut out = [0u8; ISSUED_BYTES];
    out.copy_from_slice(&be[8 - ISSUED_BYTES..]);
    out
}

impl SessionToken {
    /// A new session: fresh session id, fresh secret part.
    pub fn new_session() -> Self {
        let mut bytes: [u8; TOKEN_BYTES] = rand::random();
        bytes[CHAIN_BYTES..CHAIN_BYTES + ISSUED_BYTES].copy_from_slice(&issued_now());
        Self { bytes, len: TOKEN_BYTES as u8 }
    }

    /// The next token of the same session: same session id, fresh secret part.
    pub fn successor(&self) -> Self {
        let mut next = Self::new_session();
        next.bytes[..CHAIN_BYTES].copy_from_slice(&self.bytes[..CHAIN_BYTES]);
        next
    }

    /// Parses the text form of either format; anything else (length, alphabet, padding) is
    /// `None`.
    pub fn parse(text: &str) -> Option<Self> {
        let len = match text.len() {
            TOKEN_CHARS => TOKEN_BYTES,
            FIRST_FORMAT_CHARS => FIRST_FORMAT_BYTES,
            _ => return None,
        };
        let mut bytes = [0u8; TOKEN_BYTES];
        let n = URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut bytes).ok()?;
        (n == len).then_some(Self { bytes, len: len as u8 })
    }

    /// The text form handed to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.as_bytes())
    }

    fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// The session this token belongs to.
    pub fn chain(&self) -> ChainId {
        let mut c = [0u8; CHAIN_BYTES];
        c.copy_from_slice(&self.bytes[..CHAIN_BYTES]);
        ChainId(c)
    }

    /// When the token was issued (ms since the epoch); `None` for a first-format token, which
    /// does not say.
    pub fn issued_at(&self) -> Option<u64> {
        if usize::from(self.len) != TOKEN_BYTES {
            return None;
        }
        let mut be = [0u8; 8];
        be[8 - ISSUED_BYTES..].copy_from_slice(&self.bytes[CHAIN_BYTES..CHAIN_BYTES + ISSUED_BYTES]);
        Some(u64::from_be_bytes(be))
    }

    /// What a store keys this token by.
    pub fn hash(&self) -> TokenHash {
        let digest: [u8; 32] = Sha256::digest(self.as_bytes()).into();
        if usize::from(self.len) == FIRST_FORMAT_BYTES {
            return TokenHash(digest);
        }
        let mut out = [0u8; 32];
        out[..ISSUED_BYTES].copy_from_slice(&self.bytes[CHAIN_BYTES..CHAIN_BYTES + ISSUED_BYTES]);
        out[ISSUED_BYTES..].copy_from_slice(&digest[..32 - ISSUED_BYTES]);
        TokenHash(out)
    }

    /// XORs `bytes` with a one-time pad derived from this (random, single-use) token with
    /// HMAC-SHA256; the pad's second block is computed only for a current-format successor.
    fn apply_pad(&self, bytes: &mut [u8]) {
        let head = hmac_sha256(self.as_bytes(), &[SEAL_LABEL]);
        for (b, p) in bytes.iter_mut().zip(head) {
            *b ^= p;
        }
        if bytes.len() > head.len() {
            let tail = hmac_sha256(self.as_bytes(), &[SEAL_LABEL, SEAL_TAIL_LABEL]);
            for (b, p) in bytes[head.len()..].iter_mut().zip(tail) {
                *b ^= p;
            }
        }
    }

    /// Encrypts `successor` under this token.
    pub fn seal(&self, successor: &SessionToken) -> SealedSuccessor {
        let mut out = successor.bytes;
        self.apply_pad(&mut out[..usize::from(successor.len)]);
        SealedSuccessor { bytes: out, len: successor.len }
    }

    /// Reads back a successor sealed under this token, checking it against the stored hash (in
    /// constant time); `None` when it does not match.
    pub fn unseal(&self, sealed: &SealedSuccessor, expected: &TokenHash) -> Option<SessionToken> {
        let mut bytes = sealed.bytes;
        self.apply_pad(&mut bytes[..usize::from(sealed.len)]);
        let token = SessionToken { bytes, len: sealed.len };
        bool::from(token.hash().0.ct_eq(&expected.0)).then_some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_bytes(bytes: &[u8]) -> SessionToken {
        SessionToken::parse(&URL_SAFE_NO_PAD.encode(bytes)).unwrap()
    }

    #[test]
    fn text_form_round_trips_and_is_48_url_safe_characters() {
        let t = SessionToken::new_session();
        let text = t.encode();
        assert_eq!(text.len(), TOKEN_CHARS);
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(SessionToken::parse(&text), Some(t));
    }

    #[test]
    fn first_format_tokens_still_parse() {
        let text = URL_SAFE_NO_PAD.encode([9u8; FIRST_FORMAT_BYTES]);
        assert_eq!(text.len(), FIRST_FORMAT_CHARS);
        let t = SessionToken::parse(&text).unwrap();
        assert_eq!(t.encode(), text);
        assert_eq!(t.chain(), ChainId([9u8; CHAIN_BYTES]));
    }

    #[test]
    fn malformed_text_is_refused() {
        let good = SessionToken::new_session().encode();
        let first = URL_SAFE_NO_PAD.encode([9u8; FIRST_FORMAT_BYTES]);
        for bad in [
            "",
            "87b3d203-252a-4202-a352-2ce800049715",
            &good[..47],
            &good[..44],
            &format!("{good}A"),
            &format!("{}=", &good[..47]),
            &format!("{}+", &good[..47]),
            &good.replace(|c: char| c.is_ascii_alphanumeric(), "é")[..],
            &first[..42],
            &format!("{first}A"),
            &format!("{}=", &first[..42]),
            // 43 characters carry 258 bits; the last two must be zero.
            &format!("{}B", "A".repeat(42)),
        ] {
            assert_eq!(SessionToken::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn successors_share_the_chain_and_nothing_else() {
        let t = SessionToken::new_session();
        let s = t.successor();
        assert_eq!(t.chain(), s.chain());
        assert_ne!(t, s);
        assert_ne!(t.hash(), s.hash());
        assert_ne!(t.chain(), SessionToken::new_session().chain());
        assert_ne!(t.bytes[CHAIN_BYTES + ISSUED_BYTES..], s.bytes[CHAIN_BYTES + ISSUED_BYTES..]);
    }

    #[test]
    fn a_first_format_token_gets_a_current_format_successor() {
        let t = from_bytes(&[9u8; FIRST_FORMAT_BYTES]);
        let s = t.successor();
        assert_eq!(s.encode().len(), TOKEN_CHARS);
        assert_eq!(s.chain(), t.chain());
    }

    #[test]
    fn tokens_carry_their_issue_time() {
        let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let t = SessionToken::new_session();
        let issued = t.issued_at().unwrap();
        assert!(issued >= before && issued < before + 60_000, "{issued} vs {before}");
        assert_eq!(t.successor().issued_at().map(|s| s >= issued), Some(true));
        let mut first = [0u8; 32];
        first[..12].copy_from_slice(&t.bytes[..12]);
        assert_eq!(from_bytes(&first).issued_at(), None, "the first format carries no issue time");
    }

    #[test]
    fn current_format_hash_is_issue_time_then_sha256() {
        let bytes: Vec<u8> = (0..TOKEN_BYTES as u8).collect();
        let t = from_bytes(&bytes);
        let digest = Sha256::digest(&bytes);
        let h = t.hash().0;
        assert_eq!(h[..ISSUED_BYTES], bytes[CHAIN_BYTES..CHAIN_BYTES + ISSUED_BYTES]);
        assert_eq!(h[ISSUED_BYTES..], digest[..32 - ISSUED_BYTES]);
    }

    #[test]
    fn first_format_hash_is_sha256_of_the_raw_bytes() {
        let t = from_bytes(&[7u8; FIRST_FORMAT_BYTES]);
        assert_eq!(t.hash().to_hex(), hex::encode(Sha256::digest([7u8; 32])));
    }

    #[test]
    fn later_tokens_sort_after_earlier_ones() {
        let first = SessionToken::new_session();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let later = first.successor();
        let other_session = SessionToken::new_session();
        assert!(first.hash() < later.hash());
        assert!(first.hash() < other_session.hash());
    }

    #[test]
    fn only_the_predecessor_unseals_its_successor() {
        let first = from_bytes(&[5u8; FIRST_FORMAT_BYTES]);
        let t = SessionToken::new_session();
        for (pred, succ) in [(t.clone(), t.successor()), (first.clone(), first.successor()), (t.clone(), first.clone())]
        {
            let sealed = pred.seal(&succ);
            assert_eq!(sealed.as_bytes().len(), succ.as_bytes().len());
            assert_ne!(sealed.as_bytes(), succ.as_bytes(), "the sealed form is not the token");
            assert_eq!(pred.unseal(&sealed, &succ.hash()), Some(succ.clone()));
            let other = pred.successor();
            assert_eq!(other.unseal(&sealed, &succ.hash()), None);
            for i in [5, sealed.as_bytes().len() - 1] {
                let mut tampered = sealed;
                tampered.bytes[i] ^= 1;
                assert_eq!(pred.unseal(&tampered, &succ.hash()), None);
            }
        }
    }

    #[test]
    fn a_first_format_successor_is_sealed_as_the_first_format_did() {
        // Records stored before an upgrade hold successors sealed this way.
        let (pred, succ) = (from_bytes(&[1u8; FIRST_FORMAT_BYTES]), from_bytes(&[2u8; FIRST_FORMAT_BYTES]));
        let pad = hmac_sha256(&[1u8; FIRST_FORMAT_BYTES], &[SEAL_LABEL]);
        let want: Vec<u8> = pad.iter().map(|p| p ^ 2).collect();
        assert_eq!(pred.seal(&succ).as_bytes(), &want[..]);
    }

    #[test]
    fn sealed_successors_are_read_back_in_either_length() {
        let sealed = SessionToken::new_session().seal(&SessionToken::new_session());
        assert_eq!(SealedSuccessor::from_slice(sealed.as_bytes()), Some(sealed));
        assert!(SealedSuccessor::from_slice(&[0u8; FIRST_FORMAT_BYTES]).is_some());
        for len in [0, 31, 33, 35, 37] {
            assert_eq!(SealedSuccessor::from_slice(&vec![0u8; len]), None, "{len}");
        }
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = SessionToken::new_session();
        let shown = format!("{t:?}");
        assert!(!shown.contains(&t.encode()[16..]));
        assert!(!format!("{:?}", t.seal(&t.successor())).contains(&t.encode()[16..]));
    }
}
