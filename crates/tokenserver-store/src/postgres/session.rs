//! PostgreSQL session store: one transaction per call, the presented token's row locked with
//! `SELECT … FOR UPDATE`, so two rotations of one token run one after the other and the second
//! sees the first one's result. Each transaction runs on a task of its own
//! ([`crate::caller::transaction`]): a caller that goes away never cuts a statement short.

use async_trait::async_trait;
use sqlx::postgres::{PgPool, PgRow};
use sqlx::{Postgres, Row, Transaction};
use tokenserver_core::session::{
    ChainId, RotateOutcome, RotateRequest, Rotated, RotationPolicy, SessionRecord, SessionToken, TokenHash,
};

use crate::caller::{transaction, Caller};
use crate::session::{rotate, DumpEntry, DumpPage, Result, RotationSteps, SessionStore};
use crate::{PoolSettings, StoreError};

const SCHEMA: &[&str] = &[
    "SELECT pg_advisory_xact_lock(7380567326917437)",
    "CREATE TABLE IF NOT EXISTS tokenserver_sessions (
        token_hash BYTEA PRIMARY KEY,
        chain BYTEA NOT NULL,
        meta TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        deadline BIGINT NOT NULL,
        ttl_ms BIGINT NOT NULL,
        rotated_at BIGINT,
        successor BYTEA,
        sealed BYTEA
    )",
    "CREATE INDEX IF NOT EXISTS tokenserver_sessions_chain_idx ON tokenserver_sessions (chain)",
    "CREATE INDEX IF NOT EXISTS tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at)",
];

const LOAD: &str = "SELECT meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                    FROM tokenserver_sessions WHERE token_hash = $1";
const LOAD_FOR_UPDATE: &str = "SELECT meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                               FROM tokenserver_sessions WHERE token_hash = $1 FOR UPDATE";

fn record(row: &PgRow) -> Result<SessionRecord> {
    let rotated_at: Option<i64> = row.try_get(4)?;
    let successor: Option<Vec<u8>> = row.try_get(5)?;
    let sealed: Option<Vec<u8>> = row.try_get(6)?;
    let rotated = Rotated::from_columns(rotated_at, successor.as_deref(), sealed.as_deref());
    Ok(SessionRecord {
        meta: row.try_get(0)?,
        expires_at: row.try_get::<i64, _>(1)? as u64,
        deadline: row.try_get::<i64, _>(2)? as u64,
        ttl_ms: row.try_get::<i64, _>(3)? as u64,
        rotated,
    })
}

async fn load(tx: &mut Transaction<'_, Postgres>, hash: &TokenHash, lock: bool) -> Result<Option<SessionRecord>> {
    let row =
        sqlx::query(if lock { LOAD_FOR_UPDATE } else { LOAD }).bind(&hash.0[..]).fetch_optional(&mut **tx).await?;
    row.as_ref().map(record).transpose()
}

async fn remove(tx: &mut Transaction<'_, Postgres>, hash: &TokenHash) -> Result<()> {
    sqlx::query("DELETE FROM tokenserver_sessions WHERE token_hash = $1").bind(&hash.0[..]).execute(&mut **tx).await?;
    Ok(())
}

async fn revoke(tx: &mut Transaction<'_, Postgres>, chain: &ChainId) -> Result<()> {
    sqlx::query("DELETE FROM tokenserver_sessions WHERE chain = $1").bind(&chain.0[..]).execute(&mut **tx).await?;
    Ok(())
}

async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    hash: &TokenHash,
    chain: &ChainId,
    r: &SessionRecord,
) -> Result<()> {
    sqlx::query(
        "INSERT INTO tokenserver_sessions (token_hash, chain, meta, expires_at, deadline, ttl_ms) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(&hash.0[..])
    .bind(&chain.0[..])
    .bind(&r.meta)
    .bind(r.expires_at as i64)
    .bind(r.deadline as i64)
    .bind(r.ttl_ms as i64)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// A rotation's steps in one transaction, looking at the caller before each statement.
struct Steps<'t> {
    tx: &'t mut Transaction<'static, Postgres>,
    caller: &'t Caller,
}

impl RotationSteps for Steps<'_> {
    async fn load(&mut self, hash: &TokenHash, lock: bool) -> Result<Option<SessionRecord>> {
        self.caller.check()?;
        load(self.tx, hash, lock).await
    }

    async fn rotate(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        successor_hash: &TokenHash,
        chain: &ChainId,
        successor: &SessionRecord,
    ) -> Result<bool> {
        self.caller.check()?;
        sqlx::query(
            "UPDATE tokenserver_sessions SET meta = '', rotated_at = $2, successor = $3, sealed = $4 \
             WHERE token_hash = $1",
        )
        .bind(&presented.0[..])
        .bind(rotated.at as i64)
        .bind(&rotated.successor.0[..])
        .bind(rotated.sealed.as_bytes())
        .execute(&mut **self.tx)
        .await?;
        self.caller.check()?;
        insert(self.tx, successor_hash, chain, successor).await?;
        // The presented row was locked when loaded: nobody changed it meanwhile.
        Ok(true)
    }

    async fn revoke(&mut self, chain: &ChainId, _from: &TokenHash) -> Result<()> {
        self.caller.check()?;
        revoke(self.tx, chain).await
    }

    async fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        self.caller.check()?;
        remove(self.tx, hash).await
    }
}

/// The PostgreSQL session store.
#[derive(Debug, Clone)]
pub struct PgSessions {
    pool: PgPool,
}

impl PgSessions {
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
}

#[async_trait]
impl SessionStore for PgSessions {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()> {
        let (token, record) = (token.clone(), record.clone());
        transaction(&self.pool, Caller::default(), move |tx, _| {
            Box::pin(async move { insert(tx, &token.hash(), &token.chain(), &record).await })
        })
        .await
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        let (req, policy) = (req.clone(), *policy);
        transaction(&self.pool, Caller::default(), move |tx, caller| {
            Box::pin(async move { rotate(&mut Steps { tx, caller }, &req, &policy).await })
        })
        .await
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        let token = token.clone();
        transaction(&self.pool, Caller::default(), move |tx, caller| {
            Box::pin(async move {
                let hash = token.hash();
                let found = load(tx, &hash, true).await?;
                caller.check()?;
                Ok(match found {
                    None => false,
                    Some(r) if !r.alive(now) => {
                        remove(tx, &hash).await?;
                        false
                    }
                    Some(_) => {
                        revoke(tx, &token.chain()).await?;
                        true
                    }
                })
            })
        })
        .await
    }

    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage> {
        let from = crate::hash_cursor(after)?;
        let limit = limit.max(1);
        let rows = sqlx::query(
            "SELECT expires_at, deadline, meta, token_hash FROM tokenserver_sessions \
             WHERE token_hash > $2 AND rotated_at IS NULL AND expires_at > $1 AND deadline > $1 \
             ORDER BY token_hash LIMIT $3",
        )
        .bind(now as i64)
        .bind(&from[..])
        .bind(limit as i64)
        .fetch_all(&self.pool)
        .await?;
        let mut entries = Vec::with_capacity(rows.len());
        let mut last: Option<Vec<u8>> = None;
        for r in &rows {
            entries.push(DumpEntry {
                expires_at: r.try_get::<i64, _>(0)? as u64,
                deadline: r.try_get::<i64, _>(1)? as u64,
                meta: r.try_get(2)?,
            });
            last = Some(r.try_get(3)?);
        }
        let next = last.filter(|_| entries.len() >= limit).map(hex::encode);
        // An estimate is enough here and stays cheap on a large table.
        let records = if after.is_none() {
            let estimate: Option<f32> =
                sqlx::query_scalar("SELECT reltuples FROM pg_class WHERE oid = to_regclass('tokenserver_sessions')")
                    .fetch_optional(&self.pool)
                    .await?;
            estimate.filter(|n| *n >= 0.0).map(|n| n as u64)
        } else {
            None
        };
        Ok(DumpPage { entries, next, records })
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        let done = sqlx::query(
            "DELETE FROM tokenserver_sessions WHERE token_hash IN \
             (SELECT token_hash FROM tokenserver_sessions WHERE expires_at <= $1 LIMIT $2)",
        )
        .bind(now as i64)
        .bind(i64::try_from(max).unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn check(&self) -> Result<()> {
        sqlx::query("SELECT 1").execute(&self.pool).await.map(|_| ()).map_err(StoreError::from)
    }
}
