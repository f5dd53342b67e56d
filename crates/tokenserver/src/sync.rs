//! The Sync token flow (spec §1.3): credentials → identity → assignment → rules → write → token.
//!
//! Order of checks, which decides which error wins: `Authorization` (A1–A4), OAuth verification
//! (A5/A6), `X-KeyID`/`X-Client-State` (K1–K7), application (P1/P2), get-or-create of the user's
//! assignment (U1–U3), query string (Q1), consistency rules (V1–V8), then the write and the token.
//! No database connection is held while the identity provider or RSA verification runs, and every
//! read-modify-write is one atomic store call that fails with `Conflict` if another request got
//! there first, in which case the flow re-reads and decides again.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokenserver_auth::{AuthError, Identity, TokenVerifier};
use tokenserver_core::clock;
use tokenserver_core::sync::consistency::{plan_change, validate, Change, Claimed, Stored, Violation};
use tokenserver_core::sync::hashes::{metrics_hashes, MetricsHashes};
use tokenserver_core::sync::keyid::{fxa_kid, is_visible_ascii, parse_key_id, KeyId, KeyIdError};
use tokenserver_core::sync::tokenlib::{mint_bytes, random_salt, signing_key, TokenPayload};
use tokenserver_core::sync::users::{resolve, Status, UserRow};
use tokenserver_core::Secret;
use tokenserver_store::sync::{Allocate, UserChange};
use tokenserver_store::{StoreError, SyncStore};

use crate::config::{Application, Config};

/// Longest bearer token we will try to verify; FxA access tokens are far shorter.
const MAX_BEARER_LEN: usize = 16 * 1024;
/// How often one request re-reads after losing a race before giving up with a 503. Each lost race
/// means another request's write went through, so this bounds the wait under heavy contention
/// for a single user rather than guarding against a livelock.
const MAX_ATTEMPTS: usize = 32;
/// `client_state` and `email` column widths.
const MAX_CLIENT_STATE_HEX: usize = 32;
const MAX_EMAIL: usize = 255;

/// Why no token was issued, in the order the flow checks (the HTTP layer renders each as its
/// catalogue entry, `http::error`).
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// A1–A3: no usable `Authorization` header.
    #[error("no usable Authorization header")]
    Unauthorized,
    /// A4: a scheme other than `Bearer`.
    #[error("the authorization scheme is not Bearer")]
    UnsupportedScheme,
    /// A5 and the bounds on what a credential names: the credentials are not acceptable.
    #[error("invalid credentials: {0}")]
    InvalidCredentials(&'static str),
    /// A6: the identity provider could not be asked (unreachable, slow, or as many calls under
    /// way as allowed).
    #[error("the identity provider is unavailable")]
    IdentityUnavailable,
    /// K1–K7.
    #[error(transparent)]
    KeyId(#[from] KeyIdError),
    /// P1.
    #[error("unsupported application")]
    UnsupportedApplication,
    /// P2, with the version asked for.
    #[error("unsupported application version {0:?}")]
    UnsupportedVersion(String),
    /// U1.
    #[error("new users are not allowed")]
    NewUsersDisabled,
    /// Q1.
    #[error("invalid query string")]
    InvalidQuery,
    /// V1–V8.
    #[error("consistency rule: {0:?}")]
    Consistency(Violation),
    /// The database (U2 is `NoNodeAvailable`, T1 is `Timeout`).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Every attempt lost a race with another request for the same user.
    #[error("gave up after repeated concurrent updates of one user")]
    Contended,
    /// A new-user allocation limit refused (503 with `Retry-After`).
    #[error("new-user allocation limit reached")]
    NewUsersThrottled(crate::admission::Throttled),
    /// As many token requests are doing database work as allowed: shed at once (503).
    #[error("too many requests waiting for the database")]
    Overloaded,
    /// The user's row is retired and has no node (U3-like; Mozilla answers 500).
    #[error("the user is retired")]
    Retired,
    /// A stored row that cannot be (no node) or a token that cannot be encoded.
    #[error("internal: {0}")]
    Internal(&'static str),
}

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
    new_users: crate::admission::NewUserLimiter,
    in_flight: tokio::sync::Semaphore,
    max_in_flight: usize,
    buckets: Option<i64>,
}

fn now_ms() -> i64 {
    i64::try_from(clock::now_ms()).unwrap_or(i64::MAX)
}

/// Parses `Authorization: Bearer <token>` (A1–A4): scheme case-insensitive, split at the first
/// space, everything after it is the token.
pub fn bearer_token(header: Option<&[u8]>) -> Result<&str, IssueError> {
    let raw = header.ok_or(IssueError::Unauthorized)?;
    if !is_visible_ascii(raw) {
        return Err(IssueError::Unauthorized);
    }
    let text = std::str::from_utf8(raw).map_err(|_| IssueError::Unauthorized)?;
    let (scheme, token) = text.split_once(' ').ok_or(IssueError::Unauthorized)?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(IssueError::UnsupportedScheme);
    }
    Ok(token)
}

#[derive(Deserialize)]
struct Query {
    duration: Option<String>,
}

/// Parses the query string; `Err` is Q1 (e.g. `duration` given twice).
fn parse_duration(query: Option<&str>, max: u64) -> Result<u64, IssueError> {
    let q: Query = serde_urlencoded::from_str(query.unwrap_or("")).map_err(|_| IssueError::InvalidQuery)?;
    Ok(q.duration.and_then(|d| d.parse::<u64>().ok()).filter(|d| *d <= max).unwrap_or(max))
}

/// Who the request is, once its credentials passed (A1–A6, K1–K7).
struct Caller {
    identity: Identity,
    key_id: KeyId,
    email: String,
    hashes: MetricsHashes,
}

/// The user's current row and what the rules changed in it: what the token will name.
struct Settled {
    user: UserRow,
    change: Change,
    /// The row now current (a new one after a client-state change).
    uid: i64,
    first_seen_at: i64,
}

impl Settled {
    /// (generation, keys_changed_at, client_state) as the row now stands.
    fn state(&self) -> (i64, Option<i64>, &str) {
        let user = &self.user;
        match &self.change {
            Change::None => (user.generation, user.keys_changed_at, &user.client_state),
            Change::Update { generation, keys_changed_at } => (*generation, *keys_changed_at, &user.client_state),
            Change::NewClientState { generation, keys_changed_at, client_state } => {
                (*generation, *keys_changed_at, client_state)
            }
        }
    }
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
            new_users: crate::admission::NewUserLimiter::new(&config.sync.new_users),
            in_flight: tokio::sync::Semaphore::new(config.sync.max_in_flight),
            max_in_flight: config.sync.max_in_flight,
            buckets: config.sync.buckets,
        })
    }

    /// The user's bucket, in bucketed mode.
    fn bucket_of(&self, email: &str) -> Option<i64> {
        self.buckets.map(|n| tokenserver_core::sync::buckets::bucket_of(email, n))
    }

    /// Token requests doing database work now.
    pub fn in_flight(&self) -> usize {
        self.max_in_flight.saturating_sub(self.in_flight.available_permits())
    }

    /// Runs a store call under the per-request database timeout (T1).
    async fn db<T>(&self, fut: impl std::future::Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
        match self.db_timeout {
            Some(limit) => tokio::time::timeout(limit, fut).await.unwrap_or(Err(StoreError::Timeout)),
            None => fut.await,
        }
    }

    /// Issues a token, or says which rule refused it.
    pub async fn issue(&self, req: TokenRequest<'_>) -> Result<Issued, IssueError> {
        let caller = self.authenticate(&req).await?;
        let app = self.application(req.application, req.version)?;
        let claimed = Claimed {
            generation: caller.identity.generation,
            keys_changed_at: caller.key_id.keys_changed_at,
            client_state: &caller.key_id.client_state,
        };
        let duration = parse_duration(req.query, app.token_duration);
        let Ok(_in_flight) = self.in_flight.try_acquire() else {
            metrics::counter!("tokenserver_requests_shed_total").increment(1);
            return Err(IssueError::Overloaded);
        };
        let query = duration.as_ref().map(|_| ()).map_err(|_| ());
        let settled = self.settle(app, &caller.email, &caller.identity.issuer, &claimed, query).await?;
        self.mint(app, &caller, settled, duration?)
    }

    /// The credentials (A1–A6) and the key id (K1–K7), each checked in the catalogue's order.
    async fn authenticate(&self, req: &TokenRequest<'_>) -> Result<Caller, IssueError> {
        let bearer = bearer_token(req.authorization)?;
        if bearer.len() > MAX_BEARER_LEN {
            return Err(IssueError::InvalidCredentials("bearer token too long"));
        }
        let identity = self.verifier.verify(bearer).await.map_err(|e| {
            let reason = match &e {
                AuthError::Invalid(why) => {
                    tracing::debug!(reason = why, "OAuth token refused");
                    "invalid"
                }
                AuthError::Unavailable(why) => {
                    tracing::warn!(reason = %why, "FxA unavailable");
                    "unavailable"
                }
                AuthError::Busy => "busy",
            };
            metrics::counter!("tokenserver_token_verification_failures_total", "reason" => reason).increment(1);
            match e {
                AuthError::Invalid(why) => IssueError::InvalidCredentials(why),
                AuthError::Unavailable(_) | AuthError::Busy => IssueError::IdentityUnavailable,
            }
        })?;
        let key_id = parse_key_id(req.key_id, req.client_state)?;
        if key_id.client_state.len() > MAX_CLIENT_STATE_HEX {
            return Err(IssueError::InvalidCredentials("client state too long"));
        }
        let email = format!("{}@{}", identity.fxa_uid, self.email_domain);
        if email.len() > MAX_EMAIL {
            return Err(IssueError::InvalidCredentials("user id too long"));
        }
        let hashes = metrics_hashes(self.metrics_secret.expose(), &identity.fxa_uid);
        Ok(Caller { identity, key_id, email, hashes })
    }

    /// Finds or allocates the user's assignment and applies what the consistency rules ask,
    /// again from a fresh read whenever another request changed the user first. `query` is the
    /// query string's verdict (Q1), which the catalogue checks after the assignment.
    async fn settle(
        &self,
        app: &Application,
        email: &str,
        issuer: &str,
        claimed: &Claimed<'_>,
        query: Result<(), ()>,
    ) -> Result<Settled, IssueError> {
        for _ in 0..MAX_ATTEMPTS {
            let Some((user, old_client_states, first_seen_at)) =
                self.assignment(&app.service, email, issuer, claimed).await?
            else {
                continue;
            };
            query.map_err(|()| IssueError::InvalidQuery)?;
            let stored = Stored {
                generation: user.generation,
                keys_changed_at: user.keys_changed_at,
                client_state: &user.client_state,
                old_client_states: &old_client_states,
            };
            if let Err(v) = validate(claimed, &stored) {
                metrics::counter!("tokenserver_consistency_rejections_total", "rule" => format!("{v:?}")).increment(1);
                return Err(IssueError::Consistency(v));
            }
            let change = plan_change(claimed, &stored);
            let written = match &change {
                Change::None => Some(user.uid),
                Change::Update { generation, keys_changed_at } => {
                    let ch = UserChange::Update { generation: *generation, keys_changed_at: *keys_changed_at };
                    self.change_user(&app.service, email, user.uid, &ch).await?
                }
                Change::NewClientState { generation, keys_changed_at, client_state } => {
                    let node_id = user.node_id.ok_or(IssueError::Internal("assigned row without a node"))?;
                    let ch = UserChange::NewClientState {
                        generation: *generation,
                        keys_changed_at: *keys_changed_at,
                        client_state,
                        node_id,
                    };
                    self.change_user(&app.service, email, user.uid, &ch).await?
                }
            };
            if let Some(uid) = written {
                return Ok(Settled { user, change, uid, first_seen_at });
            }
        }
        tracing::warn!("gave up after repeated concurrent updates of one user");
        Err(IssueError::Contended)
    }

    /// Applies `ch` to the user's row `uid`: the row now current, or `None` when another request
    /// changed the user first.
    async fn change_user(
        &self,
        service: &str,
        email: &str,
        uid: i64,
        ch: &UserChange<'_>,
    ) -> Result<Option<i64>, IssueError> {
        match self.db(self.store.change_user(service, email, uid, ch, now_ms())).await {
            Ok(uid) => Ok(Some(uid)),
            Err(StoreError::Conflict) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// The signed token and its derived secret, for the settled row.
    fn mint(&self, app: &Application, caller: &Caller, s: Settled, duration: u64) -> Result<Issued, IssueError> {
        let node = s.user.node.as_deref().ok_or(IssueError::Internal("assigned row without a node URL"))?;
        let now_s = clock::now_s();
        let (generation, keys_changed_at, client_state) = s.state();
        let payload = TokenPayload {
            node: node.to_string(),
            fxa_kid: fxa_kid(keys_changed_at, generation, client_state),
            fxa_uid: caller.identity.fxa_uid.clone(),
            hashed_device_id: caller.hashes.hashed_device_id.clone(),
            hashed_fxa_uid: caller.hashes.hashed_fxa_uid.clone(),
            expires: now_s + duration,
            uid: s.uid,
            tokenserver_origin: "rust",
            salt: random_salt(),
        };
        let bytes = serde_json::to_vec(&payload).map_err(|_| IssueError::Internal("token payload"))?;
        let minted = mint_bytes(&bytes, &payload.salt, self.signer.sig_key.expose(), self.signer.master.expose());
        let api_endpoint =
            app.pattern.replace("{node}", node).replace("{uid}", &s.uid.to_string()).replace("{service}", &app.service);
        Ok(Issued {
            response: TokenResponse {
                id: minted.id,
                key: minted.key,
                uid: s.uid,
                api_endpoint,
                duration,
                hashed_fxa_uid: caller.hashes.hashed_fxa_uid.clone(),
                hashalg: "sha256".into(),
                node_type: app.node_type.clone(),
            },
            timestamp: now_s,
            metrics_uid_full: caller.hashes.full.clone(),
            first_seen_at: s.first_seen_at,
        })
    }

    fn application(&self, name: &str, version: &str) -> Result<&Application, IssueError> {
        let mut known_name = false;
        for app in &self.applications {
            if app.name == name {
                known_name = true;
                if app.version == version {
                    return Ok(app);
                }
            }
        }
        Err(if known_name {
            IssueError::UnsupportedVersion(version.to_string())
        } else {
            IssueError::UnsupportedApplication
        })
    }

    /// Mozilla's `get_or_create_user` (§4.6), made atomic. `Ok(None)` means another request
    /// changed the user first: re-read.
    async fn assignment(
        &self,
        service: &str,
        email: &str,
        issuer: &str,
        claimed: &Claimed<'_>,
    ) -> Result<Option<(UserRow, Vec<String>, i64)>, IssueError> {
        let rows = self.db(self.store.user_rows(service, email)).await?;
        let now_ms = now_ms();
        let Some(resolved) = resolve(&rows) else {
            if !self.allow_new_users {
                return Err(IssueError::NewUsersDisabled);
            }
            if let Err(throttled) = self.new_users.admit(issuer) {
                metrics::counter!("tokenserver_new_users_throttled_total", "scope" => throttled.scope()).increment(1);
                return Err(IssueError::NewUsersThrottled(throttled));
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
                bucket: self.bucket_of(email),
            };
            return match self.db(self.store.allocate_user(&req)).await {
                Ok(row) => {
                    metrics::counter!("tokenserver_users_allocated_total", "kind" => "new").increment(1);
                    let first_seen = row.created_at;
                    Ok(Some((row, Vec::new(), first_seen)))
                }
                Err(StoreError::Conflict) => Ok(None),
                Err(e) => Err(e.into()),
            };
        };
        if !resolved.unreplaced_uids.is_empty() {
            // Race recovery: older rows left live by a concurrent writer (ours never do).
            self.db(self.store.replace_rows(service, &resolved.unreplaced_uids, resolved.current.created_at)).await?;
        }
        match resolved.status {
            Status::Assigned => Ok(Some((resolved.current, resolved.old_client_states, resolved.first_seen_at))),
            Status::RetiredWithoutNode => {
                tracing::error!("Tokenserver user retired");
                Err(IssueError::Retired)
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
                    bucket: self.bucket_of(email),
                };
                match self.db(self.store.allocate_user(&req)).await {
                    Ok(row) => {
                        metrics::counter!("tokenserver_users_allocated_total", "kind" => "reassigned").increment(1);
                        Ok(Some((row, resolved.old_client_states, resolved.first_seen_at)))
                    }
                    Err(StoreError::Conflict) => Ok(None),
                    Err(e) => Err(e.into()),
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
        assert!(matches!(bearer_token(None), Err(IssueError::Unauthorized)));
        assert!(matches!(bearer_token(Some(b"Bearer\x01 x")), Err(IssueError::Unauthorized)));
        assert!(matches!(bearer_token(Some(b"Bearer")), Err(IssueError::Unauthorized)));
        assert!(matches!(bearer_token(Some(b"BrowserID abc")), Err(IssueError::UnsupportedScheme)));
        assert_eq!(bearer_token(Some(b"bEaReR abc def")).ok(), Some("abc def"));
        assert_eq!(bearer_token(Some(b"Bearer ")).ok(), Some(""));
    }

    #[test]
    fn duration_rules() {
        assert_eq!(parse_duration(None, 3600).ok(), Some(3600));
        assert_eq!(parse_duration(Some("duration=12"), 3600).ok(), Some(12));
        assert_eq!(parse_duration(Some("duration=0"), 3600).ok(), Some(0));
        assert_eq!(parse_duration(Some("duration=4000"), 3600).ok(), Some(3600));
        assert_eq!(parse_duration(Some("duration=lolwut"), 3600).ok(), Some(3600));
        assert_eq!(parse_duration(Some("duration=-1"), 3600).ok(), Some(3600));
        assert_eq!(parse_duration(Some("other=1&duration=5"), 3600).ok(), Some(5));
        assert!(matches!(parse_duration(Some("duration=1&duration=2"), 3600), Err(IssueError::InvalidQuery)));
    }
}
