//! Access-token storage: the [`AccessStore`] trait, and what its backends (`sqlite`,
//! `postgres`, `mysql`, `redis`, each in its backend's folder) share.
//!
//! A token is unique per service and maps to an application and optionally a user, with an
//! optional expiry. Every call is atomic: two creates of one token, one wins; a delete removes a
//! token and its index entries together. An expired token is invisible at once (every read
//! compares its expiry with `now`) and its storage is reclaimed by [`AccessStore::purge`] (the SQL
//! backends, and the Redis indexes) or natively (the Redis token keys).
//!
//! Listing walks an application's tokens in a fixed order (the SQL backends: the token's key;
//! Redis: the token's bytes) from an opaque cursor, so a token that lives through a whole listing
//! is returned exactly once, and each page costs the same however many tokens the application has.

use async_trait::async_trait;
use tokenserver_core::access::Grant;

use crate::StoreError;

/// Result of an access-token storage call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Tokens one revocation statement removes at most (keeps each database turn short and memory
/// bounded however many tokens an application or a service has).
pub const REVOKE_BATCH: u64 = 1_000;

/// A stored token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessToken {
    /// The token itself (listing returns it, as apisonator's did).
    pub token: String,
    /// What it grants.
    pub grant: Grant,
    /// When it was created, ms since the epoch.
    pub created_at: u64,
}

/// A token to create.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewToken<'a> {
    /// Service id.
    pub service: &'a str,
    /// The token.
    pub token: &'a str,
    /// Application id.
    pub app_id: &'a str,
    /// User id, for a user's token.
    pub user_id: Option<&'a str>,
    /// Expiry, ms since the epoch; `None`: permanent.
    pub expires_at: Option<u64>,
    /// Now, ms since the epoch: a token that expired by then is replaced.
    pub now: u64,
}

impl NewToken<'_> {
    /// The stored form.
    pub fn stored(&self) -> AccessToken {
        AccessToken {
            token: self.token.to_string(),
            grant: Grant {
                app_id: self.app_id.to_string(),
                user_id: self.user_id.map(str::to_string),
                expires_at: self.expires_at,
            },
            created_at: self.now,
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TokenPage {
    /// Live tokens, at most the limit asked for.
    pub tokens: Vec<AccessToken>,
    /// Where the next page starts; `None` on the last page. Opaque, backend-specific.
    pub next: Option<String>,
}

/// What a listing covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listing<'a> {
    /// Service id.
    pub service: &'a str,
    /// Application id.
    pub app_id: &'a str,
    /// Only this user's tokens, when given.
    pub user_id: Option<&'a str>,
    /// The cursor of the page before ([`TokenPage::next`]); `None` for the first page.
    pub after: Option<&'a str>,
    /// Most tokens on the page (at least 1).
    pub limit: usize,
    /// Now, ms since the epoch.
    pub now: u64,
}

/// Access-token storage. Each method is atomic on its own.
#[async_trait]
pub trait AccessStore: Send + Sync + std::fmt::Debug {
    /// Backend name for logs and metrics.
    fn backend(&self) -> &'static str;
    /// Stores `token`; [`StoreError::AlreadyExists`] when a live token with that text exists in
    /// the service (an expired one is replaced).
    async fn create(&self, token: &NewToken<'_>) -> Result<()>;
    /// The live token `token` of `service`.
    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>>;
    /// Deletes the live token `token` of `service`; false when there is none.
    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool>;
    /// A page of an application's (or one of its users') live tokens;
    /// [`StoreError::InvalidInput`] for a cursor this backend did not make.
    async fn list(&self, listing: &Listing<'_>) -> Result<TokenPage>;
    /// Deletes up to `max` live tokens of an application; returns how many.
    async fn revoke_app_batch(&self, service: &str, app_id: &str, now: u64, max: u64) -> Result<u64>;
    /// Deletes up to `max` live tokens of a service; returns how many.
    async fn revoke_service_batch(&self, service: &str, now: u64, max: u64) -> Result<u64>;
    /// Reclaims up to `max` expired tokens (and their index entries); returns how many.
    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64>;
    /// Reachability (health checks).
    async fn check(&self) -> Result<()>;

    /// Deletes every live token of an application, [`REVOKE_BATCH`] at a time.
    async fn revoke_app(&self, service: &str, app_id: &str, now: u64) -> Result<u64> {
        crate::in_batches(REVOKE_BATCH, |max| self.revoke_app_batch(service, app_id, now, max)).await
    }

    /// Deletes every live token of a service, [`REVOKE_BATCH`] at a time.
    async fn revoke_service(&self, service: &str, now: u64) -> Result<u64> {
        crate::in_batches(REVOKE_BATCH, |max| self.revoke_service_batch(service, now, max)).await
    }

    /// Reclaims every expired token, [`crate::session::PURGE_BATCH`] at a time.
    async fn purge(&self, now: u64) -> Result<u64> {
        crate::in_batches(crate::session::PURGE_BATCH, |max| self.purge_batch(now, max)).await
    }
}

/// A token's key in the SQL backends (tokens may be longer than an index allows): its SHA-256,
/// led by its issue time for a token tokenserver generated ([`tokenserver_core::access::token_key`]).
pub(crate) fn token_hash(token: &str) -> [u8; 32] {
    tokenserver_core::access::token_key(token)
}
