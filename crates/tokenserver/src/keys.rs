//! The keys the internal listener answers to, and where each came from.
//!
//! Every admin route needs `internal.admin_key`, every session route `sessions.api_key` and every
//! v1 access-token route `access.api_key` (unless the operator opted out on a loopback-only
//! listener; apisonator's routes authenticate with their per-service keys instead). A key not configured is
//! generated on first start and kept in the database beside the generated master secret, when
//! the database can keep it (SQLite); `tokenserver keys` shows it. Where it cannot (PostgreSQL,
//! MySQL), the routes it guards answer 403 until one is configured.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokenserver_core::Secret;
use tokenserver_store::{StoreError, SyncStore};

use crate::config::Config;

/// A bearer key, held as its SHA-256: comparing digests takes the same time whatever the length
/// of the key presented, so a guess learns nothing of the key's length either.
#[derive(Clone)]
pub struct BearerKey([u8; 32]);

impl std::fmt::Debug for BearerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BearerKey(…)")
    }
}

impl BearerKey {
    /// The key `key`.
    pub fn new(key: &str) -> Self {
        Self(Sha256::digest(key.as_bytes()).into())
    }

    /// True when `Authorization: Bearer <key>` carries this key.
    pub fn matches(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        let digest: [u8; 32] = Sha256::digest(presented.as_bytes()).into();
        bool::from(digest.ct_eq(&self.0))
    }
}

/// Where a key in force came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Set in the configuration.
    Configured,
    /// Generated and kept in the database; `created`: on this start.
    Generated {
        /// Made just now.
        created: bool,
    },
    /// Neither: the routes it guards are off.
    Missing,
    /// Not needed (session routes opened explicitly, or sessions disabled).
    NotRequired,
}

/// A key and its origin. The value is kept only for `tokenserver keys`.
#[derive(Debug, Clone)]
pub struct KeyInForce {
    /// The configuration key that sets it.
    pub setting: &'static str,
    /// The key, when there is one.
    pub value: Option<Secret<String>>,
    /// Where it came from.
    pub origin: Origin,
}

impl KeyInForce {
    /// The key's digest, for the routes it guards.
    pub fn bearer(&self) -> Option<BearerKey> {
        self.value.as_ref().map(|v| BearerKey::new(v.expose()))
    }
}

/// How a family's routes (sessions, access tokens) are guarded.
#[derive(Debug, Clone)]
pub enum RouteAccess {
    /// By this key.
    Key(BearerKey),
    /// Not at all: the operator opted out (loopback-only listener).
    Open,
    /// No key could be had: the routes answer 403.
    Off,
}

impl RouteAccess {
    /// From the key in force.
    pub fn of(key: &KeyInForce) -> Self {
        match (key.origin, key.bearer()) {
            (Origin::NotRequired, _) => RouteAccess::Open,
            (_, Some(bearer)) => RouteAccess::Key(bearer),
            (_, None) => RouteAccess::Off,
        }
    }
}

/// A random 32-byte secret, hex-encoded.
pub fn generate_secret() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

/// Name of the generated admin key in the database.
const GENERATED_ADMIN_KEY: &str = "admin_key";
/// Name of the generated session API key in the database.
const GENERATED_SESSIONS_KEY: &str = "sessions_api_key";
/// Name of the generated access-token API key in the database.
const GENERATED_ACCESS_KEY: &str = "access_api_key";

async fn key_in_force(
    setting: &'static str,
    configured: Option<&Secret<String>>,
    generated_name: &str,
    store: Option<&dyn SyncStore>,
) -> Result<KeyInForce, StoreError> {
    if let Some(key) = configured {
        return Ok(KeyInForce { setting, value: Some(key.clone()), origin: Origin::Configured });
    }
    // Generated keys live in the Sync database: with the Sync family off there is none.
    let Some(store) = store else {
        return Ok(KeyInForce { setting, value: None, origin: Origin::Missing });
    };
    Ok(match store.generated_secret(generated_name, &generate_secret).await? {
        Some((value, created)) => {
            KeyInForce { setting, value: Some(Secret::new(value)), origin: Origin::Generated { created } }
        }
        None => KeyInForce { setting, value: None, origin: Origin::Missing },
    })
}

/// The admin key in force.
pub async fn admin_key(config: &Config, store: Option<&dyn SyncStore>) -> Result<KeyInForce, StoreError> {
    key_in_force("internal.admin_key", config.admin_key.as_ref(), GENERATED_ADMIN_KEY, store).await
}

/// The session API key in force.
pub async fn sessions_api_key(config: &Config, store: Option<&dyn SyncStore>) -> Result<KeyInForce, StoreError> {
    let setting = "sessions.api_key";
    match &config.sessions {
        // A configured key is always enforced; without one, the operator may open the routes.
        Some(s) if s.api_key.is_some() || s.require_api_key => {
            key_in_force(setting, s.api_key.as_ref(), GENERATED_SESSIONS_KEY, store).await
        }
        _ => Ok(KeyInForce { setting, value: None, origin: Origin::NotRequired }),
    }
}

/// The access-token API key in force.
pub async fn access_api_key(config: &Config, store: Option<&dyn SyncStore>) -> Result<KeyInForce, StoreError> {
    let setting = "access.api_key";
    match &config.access {
        Some(a) if a.api_key.is_some() || a.require_api_key => {
            key_in_force(setting, a.api_key.as_ref(), GENERATED_ACCESS_KEY, store).await
        }
        _ => Ok(KeyInForce { setting, value: None, origin: Origin::NotRequired }),
    }
}

/// Says at startup how each key guards its routes (never the key itself).
pub fn log_origin(key: &KeyInForce, routes: &str) {
    match key.origin {
        Origin::Configured | Origin::NotRequired => {}
        Origin::Generated { created } => tracing::warn!(
            setting = key.setting,
            "{routes} need a key and none is configured: {} one kept in the database; `tokenserver keys` shows it",
            if created { "generated" } else { "using the generated" }
        ),
        Origin::Missing => tracing::warn!(
            setting = key.setting,
            "{routes} are off (403) until {} is set: no database here can keep a generated key",
            key.setting
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(header::AUTHORIZATION, auth.parse().unwrap());
        h
    }

    #[test]
    fn keys_match_by_digest_whatever_the_length_presented() {
        let key = BearerKey::new("s3cret");
        assert!(key.matches(&headers("Bearer s3cret")));
        for wrong in ["Bearer s3cre", "Bearer s3crett", "Bearer ", "bearer s3cret", "s3cret", "Basic s3cret"] {
            assert!(!key.matches(&headers(wrong)), "{wrong}");
        }
        assert!(!key.matches(&HeaderMap::new()));
        assert_eq!(format!("{key:?}"), "BearerKey(…)");
    }
}
