//! SQLite access-token store: one table keyed by (service, the token's key: its SHA-256, led by its
//! issue time for a token tokenserver generated), writes on the database's group-commit writer
//! (shared with Sync and sessions in one file), reads inline. A token read by its text is answered
//! from the database's token cache while no other connection has committed ([`super::wal_cache`]);
//! the writer keeps the cache current with its own commits. Creation is one `INSERT … ON CONFLICT
//! DO NOTHING` and, when the token exists but has expired, an `UPDATE` guarded by that expiry: both
//! run in the writer's transaction, so two creates of one token cannot both succeed.
//!
//! The listing indexes order an application's (and a user's) tokens by creation time, then key:
//! a create writes at the right edge of its application's range. The table itself is ordered by
//! key, which for a token tokenserver generated leads with its issue time, so a batch of such
//! creates appends to one page of the table; a token given by the caller is keyed by its hash and
//! dirties one random page. Ordered by hash, as the table is, a listing index made every create
//! dirty a second random page: a commit of a batch of creates wrote about twice the WAL pages
//! (bench/results/tuning-notes.md). The cursor is the last token's (created_at, key). They also
//! hold every column a page shows, so a page is one range of one index: looking each token up in
//! the table cost ~1.3 µs a token, most of a page's time. What a create still costs in WAL pages,
//! and why: bench/results/access-sqlite.md.

use std::sync::Arc;

use async_trait::async_trait;
use rusqlite::{params, Connection, OptionalExtension};
use tokenserver_core::access::Grant;

use super::group::{GroupWriter, Span};
use super::wal_cache::TokenCache;
use super::{rusqlite_error as e, ReadConns, SqliteStore};
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
DROP INDEX IF EXISTS tokenserver_access_app_idx;
DROP INDEX IF EXISTS tokenserver_access_user_idx;
CREATE INDEX IF NOT EXISTS tokenserver_access_app_page_idx
    ON tokenserver_access_tokens (service, app_id, created_at, token_hash, token, user_id, expires_at);
CREATE INDEX IF NOT EXISTS tokenserver_access_user_page_idx
    ON tokenserver_access_tokens (service, app_id, user_id, created_at, token_hash, token, expires_at)
    WHERE user_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS tokenserver_access_expiry_idx ON tokenserver_access_tokens (expires_at)
    WHERE expires_at IS NOT NULL;
"#;

const INSERT: &str = "INSERT INTO tokenserver_access_tokens \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) \
    ON CONFLICT (service, token_hash) DO NOTHING";
const REPLACE_EXPIRED: &str = "UPDATE tokenserver_access_tokens \
    SET token = ?3, app_id = ?4, user_id = ?5, expires_at = ?6, created_at = ?7 \
    WHERE service = ?1 AND token_hash = ?2 AND expires_at IS NOT NULL AND expires_at <= ?7";
const GET: &str = "SELECT app_id, user_id, expires_at, created_at FROM tokenserver_access_tokens \
    WHERE service = ?1 AND token_hash = ?2";
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ?1 AND token_hash = ?2 AND (expires_at IS NULL OR expires_at > ?3)";
const LIST_APP: &str = "SELECT token, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens INDEXED BY tokenserver_access_app_page_idx \
    WHERE service = ?1 AND app_id = ?2 AND (created_at, token_hash) > (?3, ?4) \
    AND (expires_at IS NULL OR expires_at > ?5) ORDER BY created_at, token_hash LIMIT ?6";
const LIST_USER: &str = "SELECT token, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens INDEXED BY tokenserver_access_user_page_idx \
    WHERE service = ?1 AND app_id = ?2 AND user_id = ?7 AND user_id IS NOT NULL \
    AND (created_at, token_hash) > (?3, ?4) \
    AND (expires_at IS NULL OR expires_at > ?5) ORDER BY created_at, token_hash LIMIT ?6";
const REVOKE_APP: &str = "DELETE FROM tokenserver_access_tokens WHERE (service, token_hash) IN \
    (SELECT service, token_hash FROM tokenserver_access_tokens INDEXED BY tokenserver_access_app_page_idx \
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

/// What the token whose hash is `hash` grants, and when it was created, live or not.
fn stored_grant(conn: &Connection, service: &str, hash: &[u8; 32]) -> rusqlite::Result<Option<(Grant, u64)>> {
    let mut stmt = conn.prepare_cached(GET)?;
    let row = |r: &rusqlite::Row<'_>| {
        let grant = Grant {
            app_id: r.get(0)?,
            user_id: r.get(1)?,
            expires_at: r.get::<_, Option<i64>>(2)?.map(|v| v.max(0) as u64),
        };
        Ok((grant, r.get::<_, i64>(3)?.max(0) as u64))
    };
    stmt.query_row(params![service, &hash[..]], row).optional()
}

fn list(conn: &Connection, l: &ListingOwned) -> rusqlite::Result<TokenPage> {
    let now = l.now as i64;
    let mut tokens = Vec::with_capacity(l.limit.min(1000));
    // The last row's (created_at, key), copied from each row without an allocation.
    let mut last: Option<(i64, [u8; 32])> = None;
    let (created, hash) = (l.from.0, &l.from.1[..]);
    let mut stmt = conn.prepare_cached(if l.user_id.is_some() { LIST_USER } else { LIST_APP })?;
    let mut rows = match &l.user_id {
        None => stmt.query(params![l.service, l.app_id, created, hash, now, l.limit as i64])?,
        Some(user) => stmt.query(params![l.service, l.app_id, created, hash, now, l.limit as i64, user])?,
    };
    while let Some(row) = rows.next()? {
        let created_at: i64 = row.get(3)?;
        let mut key = [0u8; 32];
        if let rusqlite::types::ValueRef::Blob(stored) = row.get_ref(4)? {
            if stored.len() == key.len() {
                key.copy_from_slice(stored);
            }
        }
        last = Some((created_at, key));
        tokens.push(AccessToken {
            token: row.get(0)?,
            // Every row of the range has the listing's application id (compared byte for byte).
            grant: Grant {
                app_id: l.app_id.clone(),
                user_id: row.get(1)?,
                expires_at: row.get::<_, Option<i64>>(2)?.map(|v| v.max(0) as u64),
            },
            created_at: created_at.max(0) as u64,
        });
    }
    let next = last.filter(|_| tokens.len() >= l.limit).map(|(created, hash)| encode_cursor(created, &hash));
    Ok(TokenPage { tokens, next })
}

/// The cursor after a token: its `created_at` (16 hex digits) and hash (64).
fn encode_cursor(created: i64, hash: &[u8]) -> String {
    format!("{:016x}{}", created.max(0), hex::encode(hash))
}

/// The (created_at, hash) a listing starts after; the first page starts before any token.
fn decode_cursor(after: Option<&str>) -> Result<(i64, Vec<u8>)> {
    let Some(cursor) = after else { return Ok((i64::MIN, Vec::new())) };
    let refused = || StoreError::InvalidInput("not a cursor of this store".into());
    let (created, hash) = (cursor.get(..16).ok_or_else(refused)?, cursor.get(16..).ok_or_else(refused)?);
    let created = i64::from_str_radix(created, 16).map_err(|_| refused())?;
    let hash = hex::decode(hash).ok().filter(|h| h.len() == 32).ok_or_else(refused)?;
    Ok((created, hash))
}

/// A [`Listing`] that owns its strings (to go to the writer in memory).
struct ListingOwned {
    service: String,
    app_id: String,
    user_id: Option<String>,
    from: (i64, Vec<u8>),
    limit: usize,
    now: u64,
}

/// Creates the table and its indexes (inside the writer's transaction).
fn prepare_schema(conn: &Connection) -> Result<()> {
    conn.execute_batch(SCHEMA).map_err(e)
}

/// Which tokens a write changed, for the token cache (which drops them; the next read files
/// them again).
enum Touch {
    /// This token of this service.
    Token(String, [u8; 32]),
    /// Any token.
    All,
}

/// The SQLite access-token store.
#[derive(Debug, Clone)]
pub struct SqliteAccess {
    writer: GroupWriter,
    reads: Option<Arc<ReadConns>>,
    /// Tokens as last read or written, exact across processes (a file database; see
    /// [`super::wal_cache`]).
    cache: Option<Arc<TokenCache>>,
}

impl SqliteAccess {
    /// The access-token store of the database `db` opened, on its writer and readers. Creates the
    /// table when missing.
    pub async fn on(db: &SqliteStore) -> Result<Self> {
        let store = Self { writer: db.writer().clone(), reads: db.readers(), cache: db.token_cache() };
        store.writer.call(Span::Long, |conn| prepare_schema(conn)).await?;
        Ok(store)
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> rusqlite::Result<T> + Send + 'static,
    ) -> Result<T> {
        match &self.reads {
            Some(reads) => reads.with(f),
            // In memory only: one token or one page.
            None => self.writer.call(Span::Short, move |conn| f(conn).map_err(e)).await,
        }
    }

    /// Runs `step` on the writer, in the next batch's transaction, and tells the token cache
    /// what `touched` says a successful step changed. Every step here is one statement (a
    /// create's `UPDATE` runs only when its `INSERT` changed nothing), atomic by itself: no
    /// savepoint ([`GroupWriter::call_atomic`]).
    async fn write<T: Send + 'static>(
        &self,
        span: Span,
        step: impl FnOnce(&Connection) -> Result<T> + Send + 'static,
        touched: impl FnOnce(&T) -> Option<Touch> + Send + 'static,
    ) -> Result<T> {
        let cache = self.cache.clone();
        self.writer
            .call_atomic(span, move |conn| {
                let out = step(conn);
                if let (Some(cache), Ok(done)) = (&cache, &out) {
                    match touched(done) {
                        Some(Touch::Token(service, hash)) => cache.touch(&service, hash, None),
                        Some(Touch::All) => cache.touch_all(),
                        None => {}
                    }
                }
                out
            })
            .await
    }
}

/// Touches every token when a bulk delete removed any.
fn all_if_any(n: &u64) -> Option<Touch> {
    (*n > 0).then_some(Touch::All)
}

#[async_trait]
impl AccessStore for SqliteAccess {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        let stored = t.stored();
        let (service, hash) = (t.service.to_string(), token_hash(t.token));
        // Dropped from the cache rather than filed: a burst of creates would otherwise fill it
        // with tokens nobody has read yet and push out the ones being authorized.
        let touch = Touch::Token(service.clone(), hash);
        self.write(
            Span::Short,
            move |conn| {
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
            },
            |()| Some(touch),
        )
        .await
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
        let hash = token_hash(token);
        let live = |found: Option<(Grant, u64)>| {
            found.filter(|(grant, _)| grant.live(now)).map(|(grant, created_at)| AccessToken {
                token: token.to_string(),
                grant,
                created_at,
            })
        };
        let Some(reads) = &self.reads else {
            let service = service.to_string();
            return Ok(live(self.read(move |conn| stored_grant(conn, &service, &hash)).await?));
        };
        let cache = self.cache.as_deref();
        let header = cache.and_then(|c| c.header());
        if let (Some(cache), Some(header)) = (cache, &header) {
            if let Some(found) = cache.get(header, service, &hash) {
                return Ok(live(Some((*found).clone())));
            }
        }
        let found = live(reads.with(|conn| stored_grant(conn, service, &hash))?);
        if let (Some(cache), Some(header), Some(t)) = (cache, &header, &found) {
            cache.put(header, service, hash, Arc::new((t.grant.clone(), t.created_at)));
        }
        Ok(found)
    }

    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool> {
        let (service, hash) = (service.to_string(), token_hash(token));
        let touch = Touch::Token(service.clone(), hash);
        self.write(
            Span::Short,
            move |conn| {
                let n = conn
                    .prepare_cached(DELETE_LIVE)
                    .and_then(|mut s| s.execute(params![service, &hash[..], now as i64]))
                    .map_err(e)?;
                Ok(n == 1)
            },
            |gone| gone.then_some(touch),
        )
        .await
    }

    async fn list(&self, l: &Listing<'_>) -> Result<TokenPage> {
        let owned = ListingOwned {
            service: l.service.to_string(),
            app_id: l.app_id.to_string(),
            user_id: l.user_id.map(str::to_string),
            from: decode_cursor(l.after)?,
            limit: l.limit.max(1),
            now: l.now,
        };
        self.read(move |conn| list(conn, &owned)).await
    }

    async fn revoke_app_batch(&self, service: &str, app_id: &str, now: u64, max: u64) -> Result<u64> {
        let (service, app_id) = (service.to_string(), app_id.to_string());
        self.write(
            Span::Long,
            move |conn| {
                let n = conn
                    .prepare_cached(REVOKE_APP)
                    .and_then(|mut s| s.execute(params![service, app_id, now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            },
            all_if_any,
        )
        .await
    }

    async fn revoke_service_batch(&self, service: &str, now: u64, max: u64) -> Result<u64> {
        let service = service.to_string();
        self.write(
            Span::Long,
            move |conn| {
                let n = conn
                    .prepare_cached(REVOKE_SERVICE)
                    .and_then(|mut s| s.execute(params![service, now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            },
            all_if_any,
        )
        .await
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        // Only expired tokens go, which no read answers with: the cache stays as it is.
        self.write(
            Span::Long,
            move |conn| {
                let n = conn
                    .prepare_cached(PURGE)
                    .and_then(|mut s| s.execute(params![now as i64, max as i64]))
                    .map_err(e)?;
                Ok(n as u64)
            },
            |_| None,
        )
        .await
    }

    async fn check(&self) -> Result<()> {
        self.read(|conn| conn.query_row("SELECT 1", [], |_| Ok(()))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_others() {
        let hash = [7u8; 32];
        let c = encode_cursor(1_764_000_000_123, &hash);
        assert_eq!(c.len(), 80);
        assert_eq!(decode_cursor(Some(&c)).ok(), Some((1_764_000_000_123, hash.to_vec())));
        assert_eq!(decode_cursor(None).ok(), Some((i64::MIN, Vec::new())));
        for bad in ["", "zz", &c[..79], &format!("{c}00"), &hex::encode([1u8; 32])] {
            assert!(matches!(decode_cursor(Some(bad)), Err(StoreError::InvalidInput(_))), "{bad}");
        }
    }
}
