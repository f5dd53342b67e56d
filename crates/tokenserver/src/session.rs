//! The session-token flows shared by HaKr's routes and the v1 API: draw tokens, apply the
//! configured lifetimes and limits, call the store once, count outcomes. Both HTTP surfaces are
//! thin renderings of these results.

use crate::telemetry::OpCounters;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};
use tokenserver_core::clock::now_ms;
use tokenserver_core::session::RotateOutcome;
use tokenserver_core::session::{meta, Invalid, MetaError, MetaUpdate, RotateRequest, SessionRecord, SessionToken};
use tokenserver_store::session::DumpPage;
use tokenserver_store::{SessionStore, StoreError};

use crate::config::SessionsConfig;

/// Why a session call failed.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// Metadata breaks a limit (nothing stored or changed).
    #[error(transparent)]
    Meta(#[from] MetaError),
    /// `ttl` outside 1 s ..= the maximum age.
    #[error("ttl must be between 1 and {max} seconds")]
    InvalidTtl {
        /// Upper bound, seconds.
        max: u64,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A token handed out, with its record.
#[derive(Debug, Clone)]
pub struct Issued {
    /// The token.
    pub token: SessionToken,
    /// Its record (metadata, expiry, deadline).
    pub record: SessionRecord,
}

/// Held while a dump runs.
#[derive(Debug)]
pub struct DumpSlot {
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// Session-token service.
#[derive(Debug)]
pub struct Sessions {
    store: Arc<dyn SessionStore>,
    config: SessionsConfig,
    counters: OpCounters,
    dumps: Arc<tokio::sync::Semaphore>,
}

/// Every `(op, outcome)` pair of `tokenserver_session_operations_total`.
const OUTCOMES: &[(&str, &[&str])] = &[
    ("create", &["ok", "rejected", "error"]),
    ("rotate", &["rotated", "replayed", "unknown", "expired", "successor_gone", "rejected", "revoked", "error"]),
    ("end", &["ended", "unknown", "error"]),
];

impl Sessions {
    /// The service over `store`, opened for `config`'s URL.
    pub fn new(store: Arc<dyn SessionStore>, config: &SessionsConfig) -> Self {
        Self {
            store,
            config: config.clone(),
            counters: OpCounters::register("tokenserver_session_operations_total", OUTCOMES),
            dumps: Arc::new(tokio::sync::Semaphore::new(1)),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &SessionsConfig {
        &self.config
    }

    fn count(&self, op: &'static str, outcome: &'static str) {
        self.counters.count(op, outcome);
    }

    /// The store (health checks, tests).
    pub fn store(&self) -> &Arc<dyn SessionStore> {
        &self.store
    }

    /// Starts a session with `meta`, idle lifetime `ttl` (default: `token_lifetime`).
    pub async fn create(&self, meta: Map<String, Value>, ttl: Option<Duration>) -> Result<Issued, SessionError> {
        let max_age = self.config.max_age;
        let ttl = match ttl {
            Some(t) if t < Duration::from_secs(1) || t > max_age => {
                return Err(SessionError::InvalidTtl { max: max_age.as_secs() })
            }
            Some(t) => t,
            None => self.config.token_lifetime,
        };
        let meta =
            meta::canonical(meta, &self.config.policy.limits).inspect_err(|_| self.count("create", "rejected"))?;
        let record = SessionRecord::new(meta, now_ms(), ttl.as_millis() as u64, max_age.as_millis() as u64);
        let token = SessionToken::new_session();
        self.store.create(&token, &record).await.inspect_err(|_| self.count("create", "error"))?;
        self.count("create", "ok");
        Ok(Issued { token, record })
    }

    /// Exchanges the token written `token` for its successor, applying `update`.
    pub async fn rotate(&self, token: &str, update: Option<MetaUpdate>) -> Result<RotateOutcome, SessionError> {
        let Some(presented) = SessionToken::parse(token) else {
            self.count("rotate", "unknown");
            return Ok(RotateOutcome::Refused(Invalid::Unknown));
        };
        let req = RotateRequest { successor: presented.successor(), presented, update, now: now_ms() };
        let outcome =
            self.store.rotate(&req, &self.config.policy).await.inspect_err(|_| self.count("rotate", "error"))?;
        match &outcome {
            RotateOutcome::Rotated { .. } => self.count("rotate", "rotated"),
            RotateOutcome::Replayed { .. } => self.count("rotate", "replayed"),
            RotateOutcome::Refused(Invalid::Unknown) => self.count("rotate", "unknown"),
            RotateOutcome::Refused(Invalid::Expired) => self.count("rotate", "expired"),
            RotateOutcome::Refused(Invalid::SuccessorGone) => self.count("rotate", "successor_gone"),
            RotateOutcome::Rejected(_) => self.count("rotate", "rejected"),
            RotateOutcome::Revoked => {
                self.count("rotate", "revoked");
                // The chain id is not secret (the token's unguessable part is not logged).
                tracing::warn!(session = %req.presented.chain(), "rotated session token reused after the grace period: session revoked");
            }
        }
        Ok(outcome)
    }

    /// Ends the session of `token`; false when the token is unknown or expired.
    pub async fn end(&self, token: &str) -> Result<bool, SessionError> {
        let Some(token) = SessionToken::parse(token) else {
            self.count("end", "unknown");
            return Ok(false);
        };
        let ended = self.store.end(&token, now_ms()).await.inspect_err(|_| self.count("end", "error"))?;
        self.count("end", if ended { "ended" } else { "unknown" });
        Ok(ended)
    }

    /// A page of up to `limit` live sessions after the cursor `after`. One dump runs at a time
    /// (the guard from [`Sessions::dump_slot`]).
    pub async fn dump(&self, _slot: &DumpSlot, after: Option<&str>, limit: usize) -> Result<DumpPage, SessionError> {
        Ok(self.store.dump(now_ms(), after, limit).await?)
    }

    /// The right to run a dump, while no other runs (`None`: one does). Dumps read every
    /// session's metadata; one at a time bounds what they cost the store and the process.
    pub fn dump_slot(&self) -> Option<DumpSlot> {
        self.dumps.clone().try_acquire_owned().ok().map(|permit| DumpSlot { _permit: permit })
    }

    /// Removes expired sessions every `purge_interval` until the service is dropped.
    pub fn spawn_purge(self: &Arc<Self>, jobs: &crate::jobs::Jobs) {
        crate::jobs::spawn_purge(jobs, self, self.config.purge_interval, "sessions", |s| async move {
            s.store.purge(now_ms()).await
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_dump_at_a_time() {
        let vars = [("TOKENSERVER_SESSIONS__URL".to_string(), "memory:".to_string())];
        let config = crate::config::load(None, &vars).unwrap();
        let cfg = config.sessions.as_ref().unwrap();
        let store = tokenserver_store::open_sessions(cfg.url.expose(), &Default::default()).await.unwrap();
        let sessions = Sessions::new(store, cfg);
        let first = sessions.dump_slot().expect("free");
        assert!(sessions.dump_slot().is_none(), "taken while the first runs");
        let page = sessions.dump(&first, None, 10).await.unwrap();
        assert!(page.entries.is_empty() && page.next.is_none());
        drop(first);
        assert!(sessions.dump_slot().is_some(), "free again");
    }
}
