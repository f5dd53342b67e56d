//! PostgreSQL access-token store: one table keyed by (service, the token's key: its SHA-256, led by
//! its issue time for a token tokenserver generated). Creation is `INSERT … ON CONFLICT DO
//! NOTHING`, then, when the token exists but has expired, an `UPDATE` guarded by that expiry: the
//! primary key makes two concurrent creates of one token end with one winner. Every write runs on a
//! task of its own ([`crate::caller`]).

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row};
use tokenserver_core::access::Grant;

use crate::access::{token_hash, AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::caller::{detached, transaction, Caller};
use crate::{PoolSettings, StoreError};

const SCHEMA: &[&str] = &[
    "SELECT pg_advisory_xact_lock(7380567326917438)",
    "CREATE TABLE IF NOT EXISTS tokenserver_access_tokens (
        service TEXT NOT NULL,
        token_hash BYTEA NOT NULL,
        token TEXT NOT NULL,
        app_id TEXT NOT NULL,
        user_id TEXT,
        expires_at BIGINT,
        created_at BIGINT NOT NULL,
        PRIMARY KEY (service, token_hash)
    )",
    "CREATE INDEX IF NOT EXISTS tokenserver_access_app_idx ON tokenserver_access_tokens (service, app_id, token_hash)",
    "CREATE INDEX IF NOT EXISTS tokenserver_access_user_idx \
     ON tokenserver_access_tokens (service, app_id, user_id, token_hash)",
    "CREATE INDEX IF NOT EXISTS tokenserver_access_expiry_idx ON tokenserver_access_tokens (expires_at) \
     WHERE expires_at IS NOT NULL",
];

const INSERT: &str = "INSERT INTO tokenserver_access_tokens \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7) \
    ON CONFLICT (service, token_hash) DO NOTHING";
const REPLACE_EXPIRED: &str = "UPDATE tokenserver_access_tokens \
    SET token = $3, app_id = $4, user_id = $5, expires_at = $6, created_at = $7 \
    WHERE service = $1 AND token_hash = $2 AND expires_at IS NOT NULL AND expires_at <= $7";
const GET: &str = "SELECT token, app_id, user_id, expires_at, created_at FROM tokenserver_access_tokens \
    WHERE service = $1 AND token_hash = $2";
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = $1 AND token_hash = $2 AND (expires_at IS NULL OR expires_at > $3)";
const LIST_APP: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens \
    WHERE service = $1 AND app_id = $2 AND token_hash > $3 AND (expires_at IS NULL OR expires_at > $4) \
    ORDER BY token_hash LIMIT $5";
const LIST_USER: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens \
    WHERE service = $1 AND app_id = $2 AND user_id = $6 AND token_hash > $3 \
    AND (expires_at IS NULL OR expires_at > $4) ORDER BY app_id, user_id, token_hash LIMIT $5";
const REVOKE_APP: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens \
     WHERE service = $1 AND app_id = $2 AND (expires_at IS NULL OR expires_at > $3) LIMIT $4)";
const REVOKE_SERVICE: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens \
     WHERE service = $1 AND (expires_at IS NULL OR expires_at > $2) LIMIT $3)";
const PURGE: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens \
     WHERE expires_at IS NOT NULL AND expires_at <= $1 LIMIT $2)";

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn token_row(r: &PgRow) -> std::result::Result<AccessToken, sqlx::Error> {
    Ok(AccessToken {
        token: r.try_get(0)?,
        grant: Grant {
            app_id: r.try_get(1)?,
            user_id: r.try_get(2)?,
            expires_at: r.try_get::<Option<i64>, _>(3)?.map(|v| v.max(0) as u64),
        },
        created_at: r.try_get::<i64, _>(4)?.max(0) as u64,
    })
}

/// The PostgreSQL access-token store.
#[derive(Debug, Clone)]
pub struct PgAccess {
    pool: PgPool,
}

impl PgAccess {
    /// Connects and creates the table when missing.
    pub async fn open(url: &str, settings: &PoolSettings) -> Result<Self> {
        let pool = crate::sql::network_pool::<Postgres>(settings).connect(url).await?;
        let mut tx = pool.begin().await?;
        for stmt in SCHEMA {
            sqlx::query(stmt).execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(Self { pool })
    }

    /// One statement on a detached task (a departing caller cannot cut it short).
    async fn execute(
        &self,
        build: impl FnOnce() -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> + Send + 'static,
    ) -> Result<u64> {
        let pool = self.pool.clone();
        detached(move |_| async move { Ok(build().execute(&pool).await?.rows_affected()) }).await
    }
}

#[async_trait]
impl AccessStore for PgAccess {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        let stored = t.stored();
        let (service, hash) = (t.service.to_string(), token_hash(t.token).to_vec());
        transaction(&self.pool, Caller::default(), move |tx, caller| {
            Box::pin(async move {
                let g = &stored.grant;
                for sql in [INSERT, REPLACE_EXPIRED] {
                    caller.check()?;
                    let done = sqlx::query(sql)
                        .bind(&service)
                        .bind(&hash)
                        .bind(&stored.token)
                        .bind(&g.app_id)
                        .bind(&g.user_id)
                        .bind(g.expires_at.map(i64_of))
                        .bind(i64_of(stored.created_at))
                        .execute(&mut **tx)
                        .await?;
                    if done.rows_affected() == 1 {
                        return Ok(());
                    }
                }
                Err(StoreError::AlreadyExists(format!("token {:?}", stored.token)))
            })
        })
        .await
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
        let row = sqlx::query(GET).bind(service).bind(&token_hash(token)[..]).fetch_optional(&self.pool).await?;
        Ok(row.as_ref().map(token_row).transpose()?.filter(|t| t.grant.live(now)))
    }

    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool> {
        let (service, hash) = (service.to_string(), token_hash(token).to_vec());
        Ok(self.execute(move || sqlx::query(DELETE_LIVE).bind(service).bind(hash).bind(i64_of(now))).await? == 1)
    }

    async fn list(&self, l: &Listing<'_>) -> Result<TokenPage> {
        let from = crate::hash_cursor(l.after)?;
        let limit = l.limit.max(1);
        let query = match l.user_id {
            None => sqlx::query(LIST_APP),
            Some(_) => sqlx::query(LIST_USER),
        };
        let mut query = query.bind(l.service).bind(l.app_id).bind(&from[..]).bind(i64_of(l.now)).bind(limit as i64);
        if let Some(user) = l.user_id {
            query = query.bind(user);
        }
        let rows = query.fetch_all(&self.pool).await?;
        let mut tokens = Vec::with_capacity(rows.len());
        let mut last: Option<Vec<u8>> = None;
        for r in &rows {
            tokens.push(token_row(r)?);
            last = Some(r.try_get(5)?);
        }
        let next = last.filter(|_| tokens.len() >= limit).map(hex::encode);
        Ok(TokenPage { tokens, next })
    }

    async fn revoke_app_batch(&self, service: &str, app_id: &str, now: u64, max: u64) -> Result<u64> {
        let (service, app_id) = (service.to_string(), app_id.to_string());
        self.execute(move || sqlx::query(REVOKE_APP).bind(service).bind(app_id).bind(i64_of(now)).bind(i64_of(max)))
            .await
    }

    async fn revoke_service_batch(&self, service: &str, now: u64, max: u64) -> Result<u64> {
        let service = service.to_string();
        self.execute(move || sqlx::query(REVOKE_SERVICE).bind(service).bind(i64_of(now)).bind(i64_of(max))).await
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        self.execute(move || sqlx::query(PURGE).bind(i64_of(now)).bind(i64_of(max))).await
    }

    async fn check(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(StoreError::from)
    }
}
