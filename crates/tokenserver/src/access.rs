//! The access-token flows shared by apisonator's routes, the v1 API and the CLI: validate with
//! `tokenserver-core`'s rules, call the store once, count outcomes. Every surface is a rendering
//! of these results (`http/error.rs` maps [`AccessError`]).

use crate::telemetry::OpCounters;
use std::sync::Arc;

use tokenserver_core::access::{
    authorize, check_id, check_token, decode_apisonator_value, expires_at, generate_token, AuthorizeError, Authorized,
    FormatError, Named, TtlError,
};
use tokenserver_core::clock::now_ms;
use tokenserver_store::access::{AccessToken, Listing, NewToken, TokenPage};
use tokenserver_store::redis::apisonator::ForeignToken;
use tokenserver_store::{AccessStore, StoreError};

use crate::config::AccessConfig;

/// Most tokens one page of a listing holds.
pub const MAX_PAGE: usize = 1000;
/// Tokens on a page when the caller names no limit.
pub const DEFAULT_PAGE: usize = 100;

/// Why an access-token call failed.
#[derive(Debug, thiserror::Error)]
pub enum AccessError {
    /// The token's text is not acceptable (`access_token_format_invalid`).
    #[error("token is either too big or has an invalid format: {0}")]
    Format(FormatError),
    /// A service, application or user id is not acceptable.
    #[error("{which} is not acceptable: {error}")]
    Id {
        /// Which id.
        which: &'static str,
        /// Why.
        error: FormatError,
    },
    /// The TTL is not acceptable (`access_token_invalid_ttl`).
    #[error(transparent)]
    Ttl(#[from] TtlError),
    /// A live token with this text exists in the service.
    #[error("token \"{0}\" already exists")]
    AlreadyExists(String),
    /// No live token with this text (`access_token_invalid`).
    #[error("token \"{0}\" is invalid: expired or never defined")]
    NotFound(String),
    /// The call names nobody.
    #[error(transparent)]
    Authorize(#[from] AuthorizeError),
    /// A page size outside 1..=[`MAX_PAGE`].
    #[error("limit must be between 1 and {MAX_PAGE}")]
    InvalidLimit,
    /// The store failed (or refused a cursor it did not make: `InvalidInput`).
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Every `(op, outcome)` pair of `tokenserver_access_operations_total`.
const OUTCOMES: &[(&str, &[&str])] = &[
    ("create", &["ok", "exists", "rejected", "error"]),
    ("authorize", &["token", "explicit", "refused", "error"]),
    ("get", &["ok", "unknown", "error"]),
    ("delete", &["ok", "unknown", "error"]),
];

fn id(which: &'static str, value: &str) -> Result<(), AccessError> {
    check_id(value).map_err(|error| AccessError::Id { which, error })
}

/// Whether every one of `ids` could name something stored. An id [`check_id`] refuses was refused
/// at creation, so it names no token; reads and revocations answer so without asking the store
/// (some stores cannot even take it as a parameter: PostgreSQL's text refuses NUL).
fn nameable(ids: &[Option<&str>]) -> bool {
    ids.iter().flatten().all(|id| check_id(id).is_ok())
}

/// A token to create, as the caller wrote it.
#[derive(Debug, Clone, Copy, Default)]
pub struct CreateRequest<'a> {
    /// The token; generated when absent.
    pub token: Option<&'a str>,
    /// Application id.
    pub app_id: &'a str,
    /// User id.
    pub user_id: Option<&'a str>,
    /// Lifetime, seconds: absent means `access.default_ttl`, 0 permanent.
    pub ttl_s: Option<u64>,
}

/// The access-token service.
#[derive(Debug)]
pub struct AccessTokens {
    store: Arc<dyn AccessStore>,
    config: AccessConfig,
    counters: OpCounters,
}

impl AccessTokens {
    /// The service over `store`, opened for `config`'s URL.
    pub fn new(store: Arc<dyn AccessStore>, config: &AccessConfig) -> Self {
        Self {
            store,
            config: config.clone(),
            counters: OpCounters::register("tokenserver_access_operations_total", OUTCOMES),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &AccessConfig {
        &self.config
    }

    /// The store (health checks, tests).
    pub fn store(&self) -> &Arc<dyn AccessStore> {
        &self.store
    }

    /// Checks a token's text against the configured limit.
    pub fn check_token(&self, token: &str) -> Result<(), AccessError> {
        check_token(token, self.config.max_token_bytes).map_err(AccessError::Format)
    }

    /// Creates a token in `service`; returns it as stored.
    pub async fn create(&self, service: &str, req: &CreateRequest<'_>) -> Result<AccessToken, AccessError> {
        let checked = (|| {
            id("service id", service)?;
            id("app_id", req.app_id)?;
            if let Some(user) = req.user_id {
                id("user_id", user)?;
            }
            if let Some(token) = req.token {
                self.check_token(token)?;
            }
            let now = now_ms();
            let expires = expires_at(req.ttl_s, now, self.config.default_ttl_s, self.config.max_ttl_s)?;
            Ok::<_, AccessError>((now, expires))
        })();
        let (now, expires) = checked.inspect_err(|_| self.counters.count("create", "rejected"))?;
        let generated;
        let token = match req.token {
            Some(t) => t,
            None => {
                generated = generate_token(now);
                &generated
            }
        };
        let new = NewToken { service, token, app_id: req.app_id, user_id: req.user_id, expires_at: expires, now };
        let created = self.store.create(&new).await.map(|()| new.stored()).map_err(|e| match e {
            StoreError::AlreadyExists(_) => AccessError::AlreadyExists(token.to_string()),
            e => e.into(),
        });
        self.tally("create", created)
    }

    /// The live token `token` of `service`.
    pub async fn get(&self, service: &str, token: &str) -> Result<AccessToken, AccessError> {
        let found = match nameable(&[Some(service)]) {
            true => self.store.get(service, token, now_ms()).await.map_err(AccessError::from),
            false => Ok(None),
        };
        self.tally("get", found.and_then(|t| t.ok_or_else(|| AccessError::NotFound(token.to_string()))))
    }

    /// Deletes the live token `token` of `service`.
    pub async fn delete(&self, service: &str, token: &str) -> Result<(), AccessError> {
        let deleted = match nameable(&[Some(service)]) {
            true => self.store.delete(service, token, now_ms()).await.map_err(AccessError::from),
            false => Ok(false),
        };
        self.tally(
            "delete",
            deleted.and_then(|gone| gone.then_some(()).ok_or_else(|| AccessError::NotFound(token.to_string()))),
        )
    }

    /// Counts `op` under the outcome `result` stands for, and passes it on.
    fn tally<T>(&self, op: &'static str, result: Result<T, AccessError>) -> Result<T, AccessError> {
        let outcome = match &result {
            Ok(_) => "ok",
            Err(AccessError::AlreadyExists(_)) => "exists",
            Err(AccessError::NotFound(_)) => "unknown",
            Err(_) => "error",
        };
        self.counters.count(op, outcome);
        result
    }

    /// A page of an application's (or one of its users') tokens.
    pub async fn list(
        &self,
        service: &str,
        app_id: &str,
        user_id: Option<&str>,
        cursor: Option<&str>,
        limit: Option<usize>,
    ) -> Result<TokenPage, AccessError> {
        let limit = limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(AccessError::InvalidLimit);
        }
        if !nameable(&[Some(service), Some(app_id), user_id]) {
            return Ok(TokenPage::default());
        }
        let listing = Listing { service, app_id, user_id, after: cursor, limit, now: now_ms() };
        Ok(self.store.list(&listing).await?)
    }

    /// Deletes every live token of an application; returns how many.
    pub async fn revoke_app(&self, service: &str, app_id: &str) -> Result<u64, AccessError> {
        if !nameable(&[Some(service), Some(app_id)]) {
            return Ok(0);
        }
        Ok(self.store.revoke_app(service, app_id, now_ms()).await?)
    }

    /// Deletes every live token of a service; returns how many.
    pub async fn revoke_service(&self, service: &str) -> Result<u64, AccessError> {
        if !nameable(&[Some(service)]) {
            return Ok(0);
        }
        Ok(self.store.revoke_service(service, now_ms()).await?)
    }

    /// Who a call naming `named` in `service` is (the precedence rule of
    /// [`tokenserver_core::access::authorize`]).
    pub async fn authorize(&self, service: &str, named: &Named<'_>) -> Result<Authorized, AccessError> {
        let found = match named.lookup().filter(|_| nameable(&[Some(service)])) {
            Some(token) => match self.store.get(service, token, now_ms()).await {
                Ok(found) => found,
                Err(e) => {
                    self.counters.count("authorize", "error");
                    return Err(e.into());
                }
            },
            None => None,
        };
        let outcome = authorize(named, found.as_ref().map(|t| &t.grant));
        let counted = match (&outcome, &found) {
            (Err(_), _) => "refused",
            (Ok(_), Some(_)) => "token",
            (Ok(_), None) => "explicit",
        };
        self.counters.count("authorize", counted);
        Ok(outcome?)
    }

    /// Copies one of apisonator's tokens in, keeping its expiry (`max_ttl` does not apply: the
    /// token was already issued). `Ok(false)`: a live token with this text is already here, and
    /// is left as it is.
    pub async fn import(&self, t: &ForeignToken, now: u64) -> Result<bool, AccessError> {
        let (app_id, user_id) = decode_apisonator_value(&t.value);
        id("service id", &t.service)?;
        id("app_id", app_id)?;
        if let Some(user) = user_id {
            id("user_id", user)?;
        }
        self.check_token(&t.token)?;
        let expires_at = t.ttl_ms.map(|left| now.saturating_add(left));
        let new = NewToken { service: &t.service, token: &t.token, app_id, user_id, expires_at, now };
        match self.store.create(&new).await {
            Ok(()) => Ok(true),
            Err(StoreError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Reclaims expired tokens every `access.purge_interval` until the service is dropped.
    pub fn spawn_purge(self: &Arc<Self>, jobs: &crate::jobs::Jobs) {
        crate::jobs::spawn_purge(jobs, self, self.config.purge_interval, "access_tokens", |a| async move {
            a.store.purge(now_ms()).await
        });
    }
}
