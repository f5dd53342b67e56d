//! Session tokens: what a client holds, what a store keeps.
//!
//! A token is 32 bytes from the operating system's CSPRNG, written as 43 characters of unpadded
//! base64url: a 12-byte chain id (drawn when the session is created, shared by every successor)
//! followed by 20 bytes (160 bits) drawn afresh for each token. The chain id lets a store keep a
//! session's tokens together (one lock shard, one Redis Cluster slot) without a lookup; the
//! fresh part is what makes a token unguessable. Stores keep only [`TokenHash`]es.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::sync::crypto::hmac_sha256;

/// Bytes of the chain id at the start of every token.
pub const CHAIN_BYTES: usize = 12;
/// Bytes of a whole token.
pub const TOKEN_BYTES: usize = 32;
/// Characters of a token's text form.
pub const TOKEN_CHARS: usize = 43;

/// A session token (secret: never logged, never stored in clear).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionToken([u8; TOKEN_BYTES]);

impl std::fmt::Debug for SessionToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionToken(chain {}, ***)", self.chain())
    }
}

/// The id shared by all tokens of one session (not secret).
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

/// SHA-256 of a token: the only form a store keeps.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TokenHash(pub [u8; 32]);

impl std::fmt::Debug for TokenHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TokenHash({})", hex::encode(&self.0[..8]))
    }
}

impl TokenHash {
    /// Hex form (Redis keys).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// From a 32-byte slice read back from a store.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        Some(Self(bytes.try_into().ok()?))
    }
}

/// The successor token, encrypted so that only a holder of its predecessor can read it back
/// (for a retry inside the grace window) while the store still holds no usable token.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct SealedSuccessor(pub [u8; TOKEN_BYTES]);

impl std::fmt::Debug for SealedSuccessor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SealedSuccessor(***)")
    }
}

const SEAL_LABEL: &[u8] = b"tokenserver session successor v1";

impl SessionToken {
    /// A new session: fresh chain id, fresh secret part.
    pub fn new_session() -> Self {
        Self(rand::random())
    }

    /// The next token of the same session: same chain id, fresh secret part.
    pub fn successor(&self) -> Self {
        let mut bytes: [u8; TOKEN_BYTES] = rand::random();
        bytes[..CHAIN_BYTES].copy_from_slice(&self.0[..CHAIN_BYTES]);
        Self(bytes)
    }

    /// Parses the text form; anything else (wrong length, alphabet, padding) is `None`.
    pub fn parse(text: &str) -> Option<Self> {
        if text.len() != TOKEN_CHARS {
            return None;
        }
        let mut out = [0u8; TOKEN_BYTES];
        let n = URL_SAFE_NO_PAD.decode_slice(text.as_bytes(), &mut out).ok()?;
        (n == TOKEN_BYTES).then_some(Self(out))
    }

    /// The text form handed to clients.
    pub fn encode(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.0)
    }

    /// The session this token belongs to.
    pub fn chain(&self) -> ChainId {
        let mut c = [0u8; CHAIN_BYTES];
        c.copy_from_slice(&self.0[..CHAIN_BYTES]);
        ChainId(c)
    }

    /// What a store keys this token by.
    pub fn hash(&self) -> TokenHash {
        TokenHash(Sha256::digest(self.0).into())
    }

    fn pad(&self) -> [u8; 32] {
        hmac_sha256(&self.0, &[SEAL_LABEL])
    }

    /// Encrypts `successor` under this token: a one-time pad derived from this (random,
    /// single-use) token with HMAC-SHA256.
    pub fn seal(&self, successor: &SessionToken) -> SealedSuccessor {
        let pad = self.pad();
        let mut out = successor.0;
        for (o, p) in out.iter_mut().zip(pad) {
            *o ^= p;
        }
        SealedSuccessor(out)
    }

    /// Reads back a successor sealed under this token, checking it against the stored hash (in
    /// constant time); `None` when it does not match.
    pub fn unseal(&self, sealed: &SealedSuccessor, expected: &TokenHash) -> Option<SessionToken> {
        let pad = self.pad();
        let mut out = sealed.0;
        for (o, p) in out.iter_mut().zip(pad) {
            *o ^= p;
        }
        let token = SessionToken(out);
        bool::from(token.hash().0.ct_eq(&expected.0)).then_some(token)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_form_round_trips_and_is_43_url_safe_characters() {
        let t = SessionToken::new_session();
        let text = t.encode();
        assert_eq!(text.len(), TOKEN_CHARS);
        assert!(text.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        assert_eq!(SessionToken::parse(&text), Some(t));
    }

    #[test]
    fn malformed_text_is_refused() {
        let good = SessionToken::new_session().encode();
        for bad in [
            "",
            "87b3d203-252a-4202-a352-2ce800049715",
            &good[..42],
            &format!("{good}A"),
            &format!("{}=", &good[..42]),
            &format!("{}+", &good[..42]),
            &good.replace(|c: char| c.is_ascii_alphanumeric(), "é")[..],
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
        assert_ne!(t.0[CHAIN_BYTES..], s.0[CHAIN_BYTES..]);
    }

    #[test]
    fn hash_is_sha256_of_the_raw_bytes() {
        let t = SessionToken([7u8; 32]);
        assert_eq!(t.hash().to_hex(), hex::encode(Sha256::digest([7u8; 32])),);
    }

    #[test]
    fn only_the_predecessor_unseals_its_successor() {
        let t = SessionToken::new_session();
        let s = t.successor();
        let sealed = t.seal(&s);
        assert_ne!(sealed.0, s.0, "the sealed form is not the token");
        assert_eq!(t.unseal(&sealed, &s.hash()), Some(s.clone()));
        let other = t.successor();
        assert_eq!(other.unseal(&sealed, &s.hash()), None);
        let mut tampered = sealed;
        tampered.0[5] ^= 1;
        assert_eq!(t.unseal(&tampered, &s.hash()), None);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let t = SessionToken::new_session();
        let shown = format!("{t:?}");
        assert!(!shown.contains(&t.encode()[12..]));
    }
}
