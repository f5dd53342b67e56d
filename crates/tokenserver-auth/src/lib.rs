//! Identity verifiers for tokenserver.
//!
//! [`fxa::FxaVerifier`] checks Firefox Accounts OAuth access tokens: RS256 JWTs locally against
//! configured JWKs or a cached JWKS, anything else through FxA's `POST /v1/verify`, with a bounded
//! cache of verified tokens. It also checks FxA security event tokens (the webhook).
//! No request ever waits on more than one outbound call, and every outbound call has a timeout.

pub mod fxa;
pub mod jwks;

use async_trait::async_trait;

/// Who a verified bearer token says the caller is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The FxA uid (`sub` / `user`).
    pub fxa_uid: String,
    /// `fxa-generation` / `generation`, ms; `None` when absent, null or 0.
    pub generation: Option<i64>,
    /// Who vouched for the identity: the token's `iss`, or the verifying server's origin.
    pub issuer: String,
}

/// Why a bearer token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// The token is not valid (bad signature, expired, wrong type or scope, rejected by FxA).
    #[error("invalid credentials: {0}")]
    Invalid(&'static str),
    /// The identity provider could not be asked in time (timeout, unreachable, 5xx).
    #[error("identity provider unavailable: {0}")]
    Unavailable(String),
    /// As many calls to the identity provider as allowed are under way: come back later.
    #[error("too many identity provider calls under way")]
    Busy,
}

/// Verifies an OAuth bearer token.
#[async_trait]
pub trait TokenVerifier: Send + Sync + 'static {
    /// Verifies `token` and returns the identity it carries.
    async fn verify(&self, token: &str) -> Result<Identity, AuthError>;
}
