//! SQLite access-token store: one table keyed by (service, SHA-256 of the token), writes on the
//! database's group-commit writer (shared with Sync and sessions in one file), reads inline.
//! Creation is one `INSERT … ON CONFLICT DO NOTHING` and, when the token exists but has expired,
//! an `UPDATE` guarded by that expiry: both run in the writer's transaction, so two creates of
//! one token cannot both succeed.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokenserver_core::access::Grant;

use super::{group::GroupWriter, rusqlite_error as e, ReadConns, SqliteStore};
use crate::access::{token_hash, AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::StoreError;

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS tokenserver_access_tokens (
    service TEXT NOT NULL,
    token_hash BLOB NOT NULL,
    token TEXT NOT NULL,
    app_id TEXT NOT NULL,
    user_id TEXT,
    expires_at INTEGER,
    created_at INTEGER NOT NULL,
    PRIMARY KEY (service, token_hash)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokenserver_access_app_idx ON tokenserver_access_tokens (service, app_id, token_hash);
CREATE INDEX IF NOT EXISTS tokenserver_access_user_idx
    ON tokenserver_access_tokens (service, app_id, user_id, token_hash);
CREATE INDEX IF NOT EXISTS tokenserver_access_expiry_idx ON tokenserver_access_tokens (expires_at)
    WHERE expires_at IS NOT NULL;
"#;

const INSERT: &str = "INSERT INTO tokenserver_access_tokens \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
    ON CONFLICT (service, token_hash) DO NOTHING";
const REPLACE_EXPIRED: &str = "UPDATE tokenserver_access_tokens \
    SET token = ?3, app_id = ?4, user_id = ?5, expires_at = ?6, created_at = ?7 \
    WHERE service = ?1 AND token_hash = ?2 AND expires_at IS NOT NULL AND expires_at <= ?7";
const GET: &str = "SELECT token, app_id, user_id, expires_at, created_at FROM tokenserver_access_tokens \
    WHERE service = ?1 AND token_hash = ?2";
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ?1 AND token_hash = ?2 AND (expires_at IS NULL OR expires_at > ?3)";
const LIST_APP: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens INDEXED BY tokenserver_access_app_idx \
    WHERE service = ?1 AND app_id = ?2 AND token_hash > ?3 AND (expires_at IS NULL OR expires_at > ?4) \
    ORDER BY token_hash LIMIT ?5";
const LIST_USER: &str = "SELECT token, app_id, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens INDEXED BY tokenserver_access_user_idx \
    WHERE service = ?1 AND app_id = ?2 AND user_id = ?6 AND token_hash > ?3 \
    AND (expires_at IS NULL OR expires_at > ?4) ORDER BY token_hash LIMIT ?5";
const REVOKE_APP: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens INDEXED BY tokenserver_access_app_idx \
     WHERE service = ?1 AND app_id = ?2 AND (expires_at IS NULL OR expires_at > ?3) LIMIT ?4)";
const REVOKE_SERVICE: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens \
     WHERE service = ?1 AND (expires_at IS NULL OR expires_at > ?2) LIMIT ?3)";
const PURGE: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens INDEXED BY tokenserver_access_expiry_idx \
     WHERE expires_at IS NOT NULL AND expires_at <= ?1 LIMIT ?2)";

fn ms(v: Option<u64>) -> Option<i64> {
    v.map(|v| i64::try_from(v).unwrap_or(i64::MAX))
}

/// A row of `GET` / the listings (first five columns).
fn token_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<AccessToken> {
    Ok(AccessToken {
        token: r.get(0)?,
        grant: Grant {
            app_id: r.get(1)?,
            user_id: r.get(2)?,
            expires_at: r.get::<_, Option<i64>>(3)?.map(|v| v.max(0) as u64),
        },
        created_at: r.get::<_, i64>(4)?.max(0) as u64,
    })
}

fn get(conn: &Connection, service: &str, token: &str, now: u64) -> rusqlite::Result<Option<AccessToken>> {
    let mut stmt = conn.prepare_cached(GET)?;
    let found = stmt.query_row(params![service, &token_hash(token)[..]], token_row).optional()?;
    Ok(found.filter(|t| t.grant.live(now)))
}

fn list(conn: &Connection, l: &ListingOwned) -> rusqlite::Result<TokenPage> {
    let now = l.now as i64;
    let mut tokens = Vec::new();
    let mut last: Option<Vec<u8>> = None;
    let mut push = |row: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        tokens.push(token_row(row)?);
        last = Some(row.get(5)?);
        Ok(())
    };
    match &l.user_id {
        None => {
            let mut stmt = conn.prepare_cached(LIST_APP)?;
            let mut rows = stmt.query(params![l.service, l.app_id, &l.from[..], now, l.limit as i64])?;
            while let Some(row) = rows.next()? {
                push(row)?;
            }
        }
        Some(user) => {
            let mut stmt = conn.prepare_cached(LIST_USER)?;
            let mut rows = stmt.query(params![l.service, l.app_id, &l.from[..], now, l.limit as i64, user])?;
            while let Some(row) = rows.next()? {
                push(row)?;
            }
        }
    }
    let next = last.filter(|_| tokens.len() >= l.limit).map(hex::encode);
    Ok(TokenPage { tokens, next })
}

/// A [`Listing`] that owns its strings (to cross to the writer thread in memory).
struct ListingOwned {
    service: String,
    app_id: String,
    user_id: Option<String>,
    from: Vec<u8>,
    limit: usize,
    now: u64,
}

/// Creates the table and its indexes (inside the writer's transaction).
fn prepare_schema(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA).map_err(e)
}

/// The SQLite access-token store.
#[derive(Debug, Clone)]
pub struct SqliteAccess {
    writer: GroupWriter,
    reads: Option<Arc<ReadConns>>,
}

impl SqliteAccess {
    /// The access-token store of the database `db` opened, on its writer and readers. Creates the
    /// table when missing.
    pub async fn on(db: &SqliteStore) -> Result<Self> {
        let store = Self { writer: db.writer().clone(), reads: db.readers() };
        store.writer.call(|conn| prepare_schema(conn)).await?;
        Ok(store)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.reads {
            Some(reads) => reads.with(f),
            None => self.writer.call(move |conn| f(conn).map_err(e)).await,
        }
    }
}

#[async_trait]
impl AccessStore for SqliteAccess {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        let stored = t.stored();
        let (service, hash) = (t.service.to_string(), token_hash(t.token));
        self.writer
            .call(move |conn| {
                let g = &stored.grant;
                let values = params![
                    service,
                    &hash[..],
                    stored.token,
                    g.app_id,
                    g.user_id,
                    ms(g.expires_at),
                    stored.created_at as i64
                ];
                let inserted = conn.prepare_cached(INSERT).and_then(|mut s| s.execute(values)).map_err(e)?;
                if inserted == 1 {
                    return Ok(());
                }
                let replaced = conn.prepare_cached(REPLACE_EXPIRED).and_then(|mut s| s.execute(values)).map_err(e)?;
                if replaced == 1 {
                    return Ok(());
                }
                Err(StoreError::AlreadyExists(format!("token {:?}", stored.token)))
            })
            .await
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
        if let Some(reads) = &self.reads {
            return reads.with(|conn| get(conn, service, token, now));
        }
        let (service, token) = (service.to_string(), token.to_string());
        self.read(move |conn| get(conn, &service, &token, now)).await
    }

    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool> {
        let (service, hash) = (service.to_string(), token_hash(token));
        self.writer
            .call(move |conn| {
                let n = conn
                    .prepare_cached(DELETE_LIVE)
                    .and_then(|mut s| s.execute(params![service, &hash[..], now as i64]))
                    .map_err(e)?;
                Ok(n == 1)
            })
            .await
    }

    async fn list(&self, l: &Listing<'_>) -> Result<TokenPage> {
        let owned = ListingOwned {
            service: l.service.to_string(),
            app_id: l.app_id.to_string(),
            user_id: l.user_id.map(str::to_string),
            from: crate::hash_cursor(l.after)?,
            limit: l.limit.max(1),
            now: l.now,
        };
        self.read(move |conn| list(conn, &owned)).await
    }

    async fn revoke_app_batch(&self, service: &str, app_id: &str, now: u64, max: u64) -> Result<u64> {
        let (service, app_id) = (service.to_string(), app_id.to_string());
        self.writer
            .call(move |conn| {
                let n = conn
                    .prepare_cached(REVOKE_APP)
                    .and_then(|mut s| s.execute(params![service, app_id, now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            })
            .await
    }

    async fn revoke_service_batch(&self, service: &str, now: u64, max: u64) -> Result<u64> {
        let service = service.to_string();
        self.writer
            .call(move |conn| {
                let n = conn
                    .prepare_cached(REVOKE_SERVICE)
                    .and_then(|mut s| s.execute(params![service, now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            })
            .await
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        self.writer
            .call(move |conn| {
                let n = conn
                    .prepare_cached(PURGE)
                    .and_then(|mut s| s.execute(params![now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            })
            .await
    }

    async fn check(&self) -> Result<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }
}
