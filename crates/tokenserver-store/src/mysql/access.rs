//! MySQL / MariaDB access-token store: one table keyed by (service, the token's key: its SHA-256,
//! led by its issue time for a token tokenserver generated), ids as `VARBINARY` so that comparisons
//! are byte for byte (a case-insensitive collation would make `App` and `app` one application).
//! Creation is an `INSERT` whose duplicate-key error is followed, when the token has expired, by an
//! `UPDATE` guarded by that expiry; the primary key makes two concurrent creates of one token end
//! with one winner. Every write runs on a task of its own.

use async_trait::async_trait;
use sqlx::mysql::{MySqlArguments, MySqlPool, MySqlRow};
use sqlx::{Executor, MySql, Row};
use tokenserver_core::access::Grant;

use crate::access::{token_hash, AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::caller::detached;
use crate::{PoolSettings, StoreError};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tokenserver_access_tokens (
    service VARBINARY(256) NOT NULL,
    token_hash BINARY(32) NOT NULL,
    token BLOB NOT NULL,
    app_id VARBINARY(256) NOT NULL,
    user_id VARBINARY(256) NULL,
    expires_at BIGINT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (service, token_hash),
    KEY tokenserver_access_app_idx (service, app_id, token_hash),
    KEY tokenserver_access_user_idx (service, app_id, user_id, token_hash),
    KEY tokenserver_access_expiry_idx (expires_at)
) ENGINE=InnoDB";

const INSERT: &str = "INSERT INTO tokenserver_access_tokens \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)";
const REPLACE_EXPIRED: &str = "UPDATE tokenserver_access_tokens \
    SET token = ?, app_id = ?, user_id = ?, expires_at = ?, created_at = ? \
    WHERE service = ? AND token_hash = ? AND expires_at IS NOT NULL AND expires_at <= ?";
const GET: &str = "SELECT token, app_id, user_id, expires_at, created_at FROM tokenserver_access_tokens \
    WHERE service = ? AND token_hash = ?";
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ? AND token_hash = ? AND (expires_at IS NULL OR expires_at > ?)";
const LIST_APP: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens FORCE INDEX (tokenserver_access_app_idx) \
    WHERE service = ? AND app_id = ? AND token_hash > ? AND (expires_at IS NULL OR expires_at > ?) \
    ORDER BY token_hash LIMIT ?";
const LIST_USER: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens FORCE INDEX (tokenserver_access_user_idx) \
    WHERE service = ? AND app_id = ? AND user_id = ? AND token_hash > ? \
    AND (expires_at IS NULL OR expires_at > ?) ORDER BY token_hash LIMIT ?";
const REVOKE_APP: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ? AND app_id = ? AND (expires_at IS NULL OR expires_at > ?) LIMIT ?";
const REVOKE_SERVICE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ? AND (expires_at IS NULL OR expires_at > ?) LIMIT ?";
const PURGE: &str = "DELETE FROM tokenserver_access_tokens WHERE expires_at IS NOT NULL AND expires_at <= ? LIMIT ?";

/// Attempts of a create that a deadlock ended (InnoDB may pick either of two creates).
const MAX_ATTEMPTS: usize = 4;

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A `VARBINARY` / `BLOB` column as text.
fn text(r: &MySqlRow, i: usize) -> std::result::Result<String, sqlx::Error> {
    let bytes: Vec<u8> = r.try_get(i)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

fn token_row(r: &MySqlRow) -> std::result::Result<AccessToken, sqlx::Error> {
    let user: Option<Vec<u8>> = r.try_get(2)?;
    Ok(AccessToken {
        token: text(r, 0)?,
        grant: Grant {
            app_id: text(r, 1)?,
            user_id: user.map(String::from_utf8).transpose().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            expires_at: r.try_get::<Option<i64>, _>(3)?.map(|v| v.max(0) as u64),
        },
        created_at: r.try_get::<i64, _>(4)?.max(0) as u64,
    })
}

/// The MySQL access-token store.
#[derive(Debug, Clone)]
pub struct MySqlAccess {
    pool: MySqlPool,
}

impl MySqlAccess {
    /// Connects and creates the table when missing.
    pub async fn open(url: &str, settings: &PoolSettings) -> Result<Self> {
        let url = super::normalise_url(url);
        let pool = crate::sql::network_pool::<MySql>(settings)
            .after_connect(|conn, _| {
                Box::pin(async move {
                    conn.execute("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED").await?;
                    Ok(())
                })
            })
            .connect(&url)
            .await?;
        sqlx::query(SCHEMA).execute(&pool).await?;
        Ok(Self { pool })
    }

    /// One statement on a detached task (a departing caller cannot cut it short).
    async fn execute(
        &self,
        build: impl FnOnce() -> sqlx::query::Query<'static, MySql, MySqlArguments> + Send + 'static,
    ) -> Result<u64> {
        let pool = self.pool.clone();
        detached(move |_| async move { Ok(build().execute(&pool).await?.rows_affected()) }).await
    }
}

#[async_trait]
impl AccessStore for MySqlAccess {
    fn backend(&self) -> &'static str {
        "mysql"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        let stored = t.stored();
        let (service, hash) = (t.service.to_string(), token_hash(t.token).to_vec());
        let pool = self.pool.clone();
        // Two statements, each committing on its own: inside one transaction the duplicate-key
        // check's shared lock, held by every loser, deadlocks their UPDATEs against each other.
        detached(move |caller| async move {
            let g = &stored.grant;
            for _ in 0..MAX_ATTEMPTS {
                caller.check()?;
                let inserted = sqlx::query(INSERT)
                    .bind(&service)
                    .bind(&hash)
                    .bind(&stored.token)
                    .bind(&g.app_id)
                    .bind(&g.user_id)
                    .bind(g.expires_at.map(i64_of))
                    .bind(i64_of(stored.created_at))
                    .execute(&pool)
                    .await;
                match inserted.map_err(StoreError::from) {
                    Ok(_) => return Ok(()),
                    Err(StoreError::AlreadyExists(_)) => {}
                    Err(StoreError::Conflict) => continue,
                    Err(other) => return Err(other),
                }
                caller.check()?;
                let replaced = sqlx::query(REPLACE_EXPIRED)
                    .bind(&stored.token)
                    .bind(&g.app_id)
                    .bind(&g.user_id)
                    .bind(g.expires_at.map(i64_of))
                    .bind(i64_of(stored.created_at))
                    .bind(&service)
                    .bind(&hash)
                    .bind(i64_of(stored.created_at))
                    .execute(&pool)
                    .await;
                match replaced.map_err(StoreError::from) {
                    Ok(done) if done.rows_affected() == 1 => return Ok(()),
                    Ok(_) => return Err(StoreError::AlreadyExists(format!("token {:?}", stored.token))),
                    Err(StoreError::Conflict) => continue,
                    Err(other) => return Err(other),
                }
            }
            Err(StoreError::Conflict)
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
            None => sqlx::query(LIST_APP).bind(l.service).bind(l.app_id),
            Some(user) => sqlx::query(LIST_USER).bind(l.service).bind(l.app_id).bind(user),
        };
        let rows = query.bind(&from[..]).bind(i64_of(l.now)).bind(limit as i64).fetch_all(&self.pool).await?;
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
