//! The Sync token flow (spec §1.3): credentials → identity → assignment → rules → write → token.
//!
//! Order of checks, which decides which error wins: `Authorization` (A1–A4), OAuth verification
//! (A5/A6), `X-KeyID`/`X-Client-State` (K1–K7), application (P1/P2), get-or-create of the user's
//! assignment (U1–U3), query string (Q1), consistency rules (V1–V8), then the write and the token.
//! No database connection is held while the identity provider or RSA verification runs, and every
//! read-modify-write is one atomic store call that fails with `Conflict` if another request got
//! there first, in which case the flow re-reads and decides again.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokenserver_auth::{AuthError, TokenVerifier};
use tokenserver_core::sync::consistency::{plan_change, validate, Change, Claimed, Stored};
use tokenserver_core::sync::hashes::metrics_hashes;
use tokenserver_core::sync::keyid::{fxa_kid, is_visible_ascii, parse_key_id, KeyIdError};
use tokenserver_core::sync::tokenlib::{mint_bytes, random_salt, signing_key, TokenPayload};
use tokenserver_core::sync::users::{resolve, Status, UserRow};
use tokenserver_core::Secret;
use tokenserver_store::sync::{Allocate, UserChange};
use tokenserver_store::{StoreError, SyncStore};

use crate::config::{Application, Config};
use crate::http::error::SyncError;

/// Longest bearer token we will try to verify; FxA access tokens are far shorter.
const MAX_BEARER_LEN: usize = 16 * 1024;
/// How often one request re-reads after losing a race before giving up with a 503. Each lost race
/// means another request's write went through, so this bounds the wait under heavy contention
/// for a single user rather than guarding against a livelock.
const MAX_ATTEMPTS: usize = 32;
/// `client_state` and `email` column widths.
const MAX_CLIENT_STATE_HEX: usize = 32;
const MAX_EMAIL: usize = 255;

/// The raw request parts the flow needs.
#[derive(Debug, Clone, Copy)]
pub struct TokenRequest<'a> {
    /// `Authorization` header bytes.
    pub authorization: Option<&'a [u8]>,
    /// `X-KeyID` header bytes.
    pub key_id: Option<&'a [u8]>,
    /// `X-Client-State` header bytes.
    pub client_state: Option<&'a [u8]>,
    /// `{application}` path segment.
    pub application: &'a str,
    /// `{version}` path segment.
    pub version: &'a str,
    /// Raw query string.
    pub query: Option<&'a str>,
}

/// The 200 body, in Mozilla's field order.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TokenResponse {
    /// Signed token.
    pub id: String,
    /// Derived Hawk secret.
    pub key: String,
    /// `users.uid`.
    pub uid: i64,
    /// Storage endpoint.
    pub api_endpoint: String,
    /// Token lifetime, seconds.
    pub duration: u64,
    /// 32 hex chars.
    pub hashed_fxa_uid: String,
    /// `"sha256"`.
    pub hashalg: String,
    /// `mysql` / `postgres` / `spanner`.
    pub node_type: String,
}

/// A token and what the request log wants to know about it.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The response body.
    pub response: TokenResponse,
    /// Unix seconds of issue (`X-Timestamp`).
    pub timestamp: u64,
    /// Full 64-hex metrics hash, logged as `uid`.
    pub metrics_uid_full: String,
    /// `created_at` of the user's oldest row.
    pub first_seen_at: i64,
}

/// The signing material derived once from the newest master secret.
struct Signer {
    master: Secret<Vec<u8>>,
    sig_key: Secret<[u8; 32]>,
}

/// Issues Sync tokens.
pub struct SyncTokens {
    store: Arc<dyn SyncStore>,
    verifier: Arc<dyn TokenVerifier>,
    applications: Vec<Application>,
    signer: Signer,
    metrics_secret: Secret<String>,
    email_domain: String,
    allow_new_users: bool,
    release_rate: f64,
    db_timeout: Option<Duration>,
}

fn now() -> (u64, i64) {
    let d = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    (d.as_secs(), i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Parses `Authorization: Bearer <token>` (A1–A4): scheme case-insensitive, split at the first
/// space, everything after it is the token.
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, SyncError> {
    let raw = header.ok_or(SyncError::unauthorized())?;
    if !is_visible_ascii(raw) {
        return Err(SyncError::unauthorized());
    }
    let text = std::str::from_utf8(raw).map_err(|_| SyncError::unauthorized())?;
    let (scheme, token) = text.split_once(' ').ok_or(SyncError::unauthorized())?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(SyncError::unsupported());
    }
    Ok(token)
}

fn key_id_error(e: KeyIdError) -> SyncError {
    match e {
        KeyIdError::Missing => SyncError::missing_key_id(),
        KeyIdError::NotVisibleAscii => SyncError::invalid_key_id(),
        KeyIdError::NoSeparator | KeyIdError::BadClientState | KeyIdError::BadKeysChangedAt => {
            SyncError::invalid_credentials()
        }
        KeyIdError::BadClientStateHeader => SyncError::invalid_client_state_header(),
        KeyIdError::ClientStateMismatch => SyncError::client_state_mismatch(),
    }
}

/// Maps a store failure to the catalogue; the detail goes to the log only.
pub fn store_error(e: &StoreError) -> SyncError {
    match e {
        StoreError::NoNodeAvailable => {
            tracing::warn!("no node can take a new user: add capacity with `tokenserver node add`");
            SyncError::unavailable()
        }
        StoreError::Unavailable(detail) => {
            tracing::error!(error = %detail, "database unavailable");
            SyncError::unavailable()
        }
        StoreError::Conflict => SyncError::unavailable(),
        other => {
            tracing::error!(error = %other, "database error");
            SyncError::internal()
        }
    }
}

#[derive(Deserialize)]
struct Query {
    duration: Option<String>,
}

/// Parses the query string; `Err` is Q1 (e.g. `duration` given twice).
fn parse_duration(query: Option<&str>, max: u64) -> Result<u64, SyncError> {
    let q: Query = serde_urlencoded::from_str(query.unwrap_or("")).map_err(|_| SyncError::invalid_query())?;
    Ok(q.duration.and_then(|d| d.parse::<u64>().ok()).filter(|d| *d <= max).unwrap_or(max))
}

impl SyncTokens {
    /// Builds the flow. `master_secrets` must not be empty (newest last).
    pub fn new(
        config: &Config,
        master_secrets: &[Secret<String>],
        store: Arc<dyn SyncStore>,
        verifier: Arc<dyn TokenVerifier>,
    ) -> Result<Self, String> {
        let newest = master_secrets.last().ok_or("no master secret")?;
        let master = newest.expose().as_bytes().to_vec();
        let sig_key = signing_key(&master);
        Ok(Self {
            store,
            verifier,
            applications: config.sync.applications.clone(),
            signer: Signer { master: Secret::new(master), sig_key: Secret::new(sig_key) },
            metrics_secret: config.sync.metrics_hash_secret.clone(),
            email_domain: config.sync.email_domain.clone(),
            allow_new_users: config.sync.allow_new_users,
            release_rate: config.sync.release_rate,
            db_timeout: config.database.request_timeout,
        })
    }

    /// Runs a store call under the per-request database timeout (T1).
    async fn db<T>(&self, fut: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match self.db_timeout {
            Some(limit) => tokio::time::timeout(limit, fut).await.unwrap_or(Err(StoreError::Timeout)),
            None => fut.await,
        }
    }

    fn map_db(e: &StoreError) -> SyncError {
        match e {
            StoreError::Timeout => SyncError::elapsed(),
            other => store_error(other),
        }
    }

    /// Issues a token, or the catalogue error that applies.
    pub async fn issue(&self, req: TokenRequest<'_>) -> Result<Issued, SyncError> {
        let bearer = bearer_token(req.authorization)?;
        if bearer.len() > MAX_BEARER_LEN {
            return Err(SyncError::invalid_credentials());
        }
        let identity = self.verifier.verify(bearer).await.map_err(|e| match e {
            AuthError::Invalid(why) => {
                tracing::debug!(reason = why, "OAuth token refused");
                metrics::counter!("tokenserver_token_verification_failures_total", "reason" => "invalid").increment(1);
                SyncError::invalid_credentials()
            }
            AuthError::Unavailable(why) => {
                tracing::warn!(reason = %why, "FxA unavailable");
                metrics::counter!("tokenserver_token_verification_failures_total", "reason" => "unavailable")
                    .increment(1);
                SyncError::resource_unavailable()
            }
            AuthError::Busy => {
                metrics::counter!("tokenserver_token_verification_failures_total", "reason" => "busy").increment(1);
                SyncError::resource_unavailable()
            }
        })?;
        let key_id = parse_key_id(req.key_id, req.client_state).map_err(key_id_error)?;
        if key_id.client_state.len() > MAX_CLIENT_STATE_HEX {
            return Err(SyncError::invalid_credentials());
        }
        let email = format!("{}@{}", identity.fxa_uid, self.email_domain);
        if email.len() > MAX_EMAIL {
            return Err(SyncError::invalid_credentials());
        }
        let hashes = metrics_hashes(self.metrics_secret.expose(), &identity.fxa_uid);
        let app = self.application(req.application, req.version)?;
        let claimed = Claimed {
            generation: identity.generation,
            keys_changed_at: key_id.keys_changed_at,
            client_state: &key_id.client_state,
        };
        let duration = parse_duration(req.query, app.token_duration);

        for _ in 0..MAX_ATTEMPTS {
            let (user, old_client_states, first_seen_at) = match self.assignment(&app.service, &email, &claimed).await?
            {
                Some(found) => found,
                None => continue,
            };
            let duration = duration.clone()?;
            let stored = Stored {
                generation: user.generation,
                keys_changed_at: user.keys_changed_at,
                client_state: &user.client_state,
                old_client_states: &old_client_states,
            };
            if let Err(v) = validate(&claimed, &stored) {
                metrics::counter!("tokenserver_consistency_rejections_total", "rule" => format!("{v:?}")).increment(1);
                return Err(v.into());
            }
            let change = plan_change(&claimed, &stored);
            let (now_s, now_ms) = now();
            let (uid, generation, keys_changed_at, client_state) = match &change {
                Change::None => (user.uid, user.generation, user.keys_changed_at, user.client_state.as_str()),
                Change::Update { generation, keys_changed_at } => {
                    let ch = UserChange::Update { generation: *generation, keys_changed_at: *keys_changed_at };
                    match self.db(self.store.change_user(&app.service, &email, user.uid, &ch, now_ms)).await {
                        Ok(uid) => (uid, *generation, *keys_changed_at, user.client_state.as_str()),
                        Err(StoreError::Conflict) => continue,
                        Err(e) => return Err(Self::map_db(&e)),
                    }
                }
                Change::NewClientState { generation, keys_changed_at, client_state } => {
                    let node_id = user.node_id.ok_or_else(SyncError::internal)?;
                    let ch = UserChange::NewClientState {
                        generation: *generation,
                        keys_changed_at: *keys_changed_at,
                        client_state,
                        node_id,
                    };
                    match self.db(self.store.change_user(&app.service, &email, user.uid, &ch, now_ms)).await {
                        Ok(uid) => (uid, *generation, *keys_changed_at, client_state.as_str()),
                        Err(StoreError::Conflict) => continue,
                        Err(e) => return Err(Self::map_db(&e)),
                    }
                }
            };
            let node = user.node.as_deref().ok_or_else(SyncError::internal)?;
            let payload = TokenPayload {
                node: node.to_string(),
                fxa_kid: fxa_kid(keys_changed_at, generation, client_state),
                fxa_uid: identity.fxa_uid.clone(),
                hashed_device_id: hashes.hashed_device_id.clone(),
                hashed_fxa_uid: hashes.hashed_fxa_uid.clone(),
                expires: now_s + duration,
                uid,
                tokenserver_origin: "rust",
                salt: random_salt(),
            };
            let bytes = serde_json::to_vec(&payload).map_err(|_| SyncError::internal())?;
            let minted = mint_bytes(&bytes, &payload.salt, self.signer.sig_key.expose(), self.signer.master.expose());
            let api_endpoint = app
                .pattern
                .replace("{node}", node)
                .replace("{uid}", &uid.to_string())
                .replace("{service}", &app.service);
            return Ok(Issued {
                response: TokenResponse {
                    id: minted.id,
                    key: minted.key,
                    uid,
                    api_endpoint,
                    duration,
                    hashed_fxa_uid: hashes.hashed_fxa_uid,
                    hashalg: "sha256".into(),
                    node_type: app.node_type.clone(),
                },
                timestamp: now_s,
                metrics_uid_full: hashes.full,
                first_seen_at,
            });
        }
        tracing::warn!("gave up after repeated concurrent updates of one user");
        Err(SyncError::unavailable())
    }

    fn application(&self, name: &str, version: &str) -> Result<&Application, SyncError> {
        let mut known_name = false;
        for app in &self.applications {
            if app.name == name {
                known_name = true;
                if app.version == version {
                    return Ok(app);
                }
            }
        }
        Err(if known_name { SyncError::unsupported_version(version) } else { SyncError::unsupported_application() })
    }

    /// Mozilla's `get_or_create_user` (§4.6), made atomic. `Ok(None)` means another request
    /// changed the user first: re-read.
    async fn assignment(
        &self,
        service: &str,
        email: &str,
        claimed: &Claimed<'_>,
    ) -> Result<Option<(UserRow, Vec<String>, i64)>, SyncError> {
        let rows = self.db(self.store.user_rows(service, email)).await.map_err(|e| Self::map_db(&e))?;
        let (_, now_ms) = now();
        let Some(resolved) = resolve(&rows) else {
            if !self.allow_new_users {
                return Err(SyncError::new_users_disabled());
            }
            let req = Allocate {
                service,
                email,
                generation: claimed.generation.unwrap_or(0),
                client_state: claimed.client_state,
                keys_changed_at: claimed.keys_changed_at,
                expected_current: None,
                now_ms,
                release_rate: self.release_rate,
            };
            return match self.db(self.store.allocate_user(&req)).await {
                Ok(row) => {
                    metrics::counter!("tokenserver_users_allocated_total", "kind" => "new").increment(1);
                    let first_seen = row.created_at;
                    Ok(Some((row, Vec::new(), first_seen)))
                }
                Err(StoreError::Conflict) => Ok(None),
                Err(e) => Err(Self::map_db(&e)),
            };
        };
        if !resolved.unreplaced_uids.is_empty() {
            // Race recovery: older rows left live by a concurrent writer (ours never do).
            self.db(self.store.replace_rows(service, &resolved.unreplaced_uids, resolved.current.created_at))
                .await
                .map_err(|e| Self::map_db(&e))?;
        }
        match resolved.status {
            Status::Assigned => Ok(Some((resolved.current, resolved.old_client_states, resolved.first_seen_at))),
            Status::RetiredWithoutNode => {
                tracing::error!("Tokenserver user retired");
                Err(SyncError::internal())
            }
            Status::NeedsNode => {
                let current = &resolved.current;
                let req = Allocate {
                    service,
                    email,
                    generation: current.generation,
                    client_state: &current.client_state,
                    keys_changed_at: current.keys_changed_at,
                    expected_current: Some(current.uid),
                    now_ms,
                    release_rate: self.release_rate,
                };
                match self.db(self.store.allocate_user(&req)).await {
                    Ok(row) => {
                        metrics::counter!("tokenserver_users_allocated_total", "kind" => "reassigned").increment(1);
                        Ok(Some((row, resolved.old_client_states, resolved.first_seen_at)))
                    }
                    Err(StoreError::Conflict) => Ok(None),
                    Err(e) => Err(Self::map_db(&e)),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn authorization_parsing() {
        assert_eq!(bearer_token(None), Err(SyncError::unauthorized()));
        assert_eq!(bearer_token(Some(b"Bearer\x01 x")), Err(SyncError::unauthorized()));
        assert_eq!(bearer_token(Some(b"Bearer")), Err(SyncError::unauthorized()));
        assert_eq!(bearer_token(Some(b"BrowserID abc")), Err(SyncError::unsupported()));
        assert_eq!(bearer_token(Some(b"bEaReR abc def")), Ok("abc def"));
        assert_eq!(bearer_token(Some(b"Bearer ")), Ok(""));
    }

    #[test]
    fn duration_rules() {
        assert_eq!(parse_duration(None, 3600), Ok(3600));
        assert_eq!(parse_duration(Some("duration=12"), 3600), Ok(12));
        assert_eq!(parse_duration(Some("duration=0"), 3600), Ok(0));
        assert_eq!(parse_duration(Some("duration=4000"), 3600), Ok(3600));
        assert_eq!(parse_duration(Some("duration=lolwut"), 3600), Ok(3600));
        assert_eq!(parse_duration(Some("duration=-1"), 3600), Ok(3600));
        assert_eq!(parse_duration(Some("other=1&duration=5"), 3600), Ok(5));
        assert_eq!(parse_duration(Some("duration=1&duration=2"), 3600), Err(SyncError::invalid_query()));
    }
}
