//! PostgreSQL session store. A rotation reads the presented token's record and applies the
//! decision by compare-and-set (one statement marks the row rotated only if it still is not, and
//! inserts the successor only then), as the Redis store does: two rotations of one token produce
//! one successor, the loser re-reads and sees the rotated record. Reads and rotations go through
//! [`Batcher`]s, so concurrent rotations share a `SELECT … = ANY` and one `UPDATE … FROM
//! unnest(…)` statement (one commit) instead of a transaction of five round trips each;
//! creations share an `INSERT … SELECT FROM unnest(…)` (bench/results/network-backends.md).
//! The batch statements run on tasks of their own ([`crate::batch`]); ending a session, and the
//! rare revocation or removal inside a rotation, run in a transaction each, also on a task of
//! their own ([`crate::caller::transaction`]): a caller that goes away never cuts a statement
//! short. A revocation follows the successor links from the token it starts at, as the other
//! stores do; no index by session.

use std::collections::{HashMap, HashSet};
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgPool, PgRow};
use sqlx::{PgConnection, Postgres, Row, Transaction};
use tokenserver_core::session::{
    ChainId, RotateOutcome, RotateRequest, Rotated, RotationPolicy, SessionRecord, SessionToken, TokenHash,
};

use crate::batch::{first_of_each, Batcher};
use crate::caller::{transaction, Caller};
use crate::session::{rotate, DumpEntry, DumpPage, Result, RotationSteps, SessionStore};
use crate::sql::read_pool::{read, ReadPool};
use crate::sql::{COMMIT_STALL, READ_STALL};
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
    ) WITH (fillfactor = 70)",
    // Room on each page for the row's rotated version, so that a rotation updates the row in place
    // (a heap-only tuple) instead of adding entries to all three indexes; set on tables made
    // before, once (not a catalog change at every start).
    "DO $$ BEGIN
        IF NOT EXISTS (SELECT 1 FROM pg_class WHERE oid = 'tokenserver_sessions'::regclass
                       AND reloptions @> ARRAY['fillfactor=70']) THEN
            ALTER TABLE tokenserver_sessions SET (fillfactor = 70);
        END IF;
    END $$",
    // Revocation follows the successor links from the token it starts at (as on SQLite and
    // Redis), so nothing looks rows up by session: the index earlier versions kept on `chain` cost
    // every rotation and creation an insert into a random leaf of it, ~10% of PostgreSQL's CPU
    // per rotation (bench/results/sessions-postgres-chain-index-ab.md). The column stays, and is
    // still written: a head of an earlier version on the same database, during a rolling
    // upgrade, revokes by it.
    "DROP INDEX IF EXISTS tokenserver_sessions_chain_idx",
    "CREATE INDEX IF NOT EXISTS tokenserver_sessions_expiry_idx ON tokenserver_sessions (expires_at)",
];

const LOAD_MANY: &str = "SELECT token_hash, meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                         FROM tokenserver_sessions WHERE token_hash = ANY($1)";
const LOAD_FOR_UPDATE: &str = "SELECT token_hash, meta, expires_at, deadline, ttl_ms, rotated_at, successor, sealed \
                               FROM tokenserver_sessions WHERE token_hash = $1 FOR UPDATE";

/// Every rotation of a batch in one statement: each presented row still unrotated is marked
/// rotated and its successor inserted; the presented hashes that were returned. A row rotated
/// by someone else since it was read fails `rotated_at IS NULL` (READ COMMITTED re-checks the
/// condition on the row's newest version), so its successor is not inserted: compare-and-set.
const ROTATE_MANY: &str = "WITH input AS ( \
        SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[], $4::bytea[], $5::bytea[], $6::bytea[], \
                             $7::text[], $8::bigint[], $9::bigint[], $10::bigint[]) \
            AS i(presented, rotated_at, successor, sealed, next_hash, chain, meta, expires_at, deadline, ttl_ms) \
    ), marked AS ( \
        UPDATE tokenserver_sessions s \
        SET meta = '', rotated_at = i.rotated_at, successor = i.successor, sealed = i.sealed \
        FROM input i WHERE s.token_hash = i.presented AND s.rotated_at IS NULL \
        RETURNING s.token_hash \
    ), added AS ( \
        INSERT INTO tokenserver_sessions (token_hash, chain, meta, expires_at, deadline, ttl_ms) \
        SELECT i.next_hash, i.chain, i.meta, i.expires_at, i.deadline, i.ttl_ms \
        FROM input i JOIN marked m ON m.token_hash = i.presented \
    ) \
    SELECT token_hash FROM marked";

/// Many live rotations in one statement (`RotationSteps::rotate_live`): each presented row that
/// is unrotated and, at its `now`, neither idle-expired nor past its deadline is marked rotated,
/// and its successor inserted with the presented metadata and the expiry `successor_record`
/// gives; the rows rotated come back with the successor's record. The metadata is read from the
/// row as the statement found it (`old`, a self-join): a row rotated meanwhile fails the
/// re-checked `rotated_at IS NULL` and is left alone.
const ROTATE_LIVE_MANY: &str = "WITH input AS ( \
        SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[], $4::bytea[]) \
            AS i(presented, now, successor, sealed) \
    ), marked AS ( \
        UPDATE tokenserver_sessions s \
        SET meta = '', rotated_at = i.now, successor = i.successor, sealed = i.sealed \
        FROM input i JOIN tokenserver_sessions old ON old.token_hash = i.presented \
        WHERE s.token_hash = i.presented AND s.rotated_at IS NULL \
            AND s.expires_at > i.now AND s.deadline > i.now \
        RETURNING s.token_hash AS presented, i.successor AS next_hash, s.chain, old.meta, \
            LEAST(i.now + s.ttl_ms, s.deadline) AS expires_at, s.deadline, s.ttl_ms \
    ), added AS ( \
        INSERT INTO tokenserver_sessions (token_hash, chain, meta, expires_at, deadline, ttl_ms) \
        SELECT next_hash, chain, meta, expires_at, deadline, ttl_ms FROM marked \
    ) \
    SELECT presented, meta, expires_at, deadline, ttl_ms FROM marked";

/// Deletes the record of `$1` and the records its successor links lead to, at most `$2`.
const REVOKE_FROM: &str = "WITH RECURSIVE walk(token_hash, successor, depth) AS ( \
        SELECT token_hash, successor, 1 FROM tokenserver_sessions WHERE token_hash = $1 \
        UNION ALL \
        SELECT s.token_hash, s.successor, w.depth + 1 FROM walk w \
        JOIN tokenserver_sessions s ON s.token_hash = w.successor WHERE w.depth < $2 \
    ) \
    DELETE FROM tokenserver_sessions s USING walk w WHERE s.token_hash = w.token_hash";

/// Many new sessions in one statement; a token already stored is left as it is and reported.
const CREATE_MANY: &str = "INSERT INTO tokenserver_sessions (token_hash, chain, meta, expires_at, deadline, ttl_ms) \
    SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::text[], $4::bigint[], $5::bigint[], $6::bigint[]) \
    ON CONFLICT (token_hash) DO NOTHING RETURNING token_hash";

/// Calls one statement carries at most.
const MAX_BATCH: usize = 256;
/// Statements of one kind running at once (the others' calls queue for the next one). Two, not
/// four: fewer, fuller statements cost PostgreSQL less CPU a call and leave less waiting on
/// commits (bench/results/postgres-in-flight-ab.md). Those that commit go one at a time, two
/// only when the first stalls ([`crate::sql::COMMIT_STALL`]).
const IN_FLIGHT: usize = 2;

fn record(row: &PgRow, at: usize) -> Result<SessionRecord> {
    let rotated_at: Option<i64> = row.try_get(at + 4)?;
    let successor: Option<Vec<u8>> = row.try_get(at + 5)?;
    let sealed: Option<Vec<u8>> = row.try_get(at + 6)?;
    let rotated = Rotated::from_columns(rotated_at, successor.as_deref(), sealed.as_deref());
    Ok(SessionRecord {
        meta: row.try_get(at)?,
        expires_at: row.try_get::<i64, _>(at + 1)? as u64,
        deadline: row.try_get::<i64, _>(at + 2)? as u64,
        ttl_ms: row.try_get::<i64, _>(at + 3)? as u64,
        rotated,
    })
}

/// The row's `token_hash` and record, as [`LOAD_MANY`] and [`LOAD_FOR_UPDATE`] select them.
fn keyed_record(row: &PgRow) -> Result<(Vec<u8>, SessionRecord)> {
    Ok((row.try_get(0)?, record(row, 1)?))
}

async fn load_locked(tx: &mut Transaction<'_, Postgres>, hash: &TokenHash) -> Result<Option<SessionRecord>> {
    let row = sqlx::query(LOAD_FOR_UPDATE).bind(&hash.0[..]).fetch_optional(&mut **tx).await?;
    Ok(row.as_ref().map(keyed_record).transpose()?.map(|(_, r)| r))
}

async fn remove(tx: &mut Transaction<'_, Postgres>, hash: &TokenHash) -> Result<()> {
    sqlx::query("DELETE FROM tokenserver_sessions WHERE token_hash = $1").bind(&hash.0[..]).execute(&mut **tx).await?;
    Ok(())
}

async fn revoke(tx: &mut Transaction<'_, Postgres>, from: &TokenHash) -> Result<()> {
    let bound = i64::try_from(crate::session::MAX_CHAIN_WALK).unwrap_or(i64::MAX);
    sqlx::query(REVOKE_FROM).bind(&from.0[..]).bind(bound).execute(&mut **tx).await?;
    Ok(())
}

/// One rotation's write, as [`ROTATE_MANY`] takes it.
struct RotateJob {
    presented: TokenHash,
    rotated: Rotated,
    successor_hash: TokenHash,
    chain: ChainId,
    successor: SessionRecord,
}

/// A live rotation, as [`ROTATE_LIVE_MANY`] takes it.
struct LiveJob {
    presented: TokenHash,
    rotated: Rotated,
}

/// A new session, as [`CREATE_MANY`] takes it.
struct CreateJob {
    hash: TokenHash,
    chain: ChainId,
    record: SessionRecord,
}

/// Many creations in one statement; a token that was already stored is `AlreadyExists`.
async fn create_many(reads: ReadPool<PgConnection>, jobs: Vec<CreateJob>) -> Result<Vec<Result<()>>> {
    let hashes: Vec<&[u8]> = jobs.iter().map(|j| &j.hash.0[..]).collect();
    let chains: Vec<&[u8]> = jobs.iter().map(|j| &j.chain.0[..]).collect();
    let metas: Vec<&str> = jobs.iter().map(|j| j.record.meta.as_str()).collect();
    let expires_at: Vec<i64> = jobs.iter().map(|j| j.record.expires_at as i64).collect();
    let deadlines: Vec<i64> = jobs.iter().map(|j| j.record.deadline as i64).collect();
    let ttls: Vec<i64> = jobs.iter().map(|j| j.record.ttl_ms as i64).collect();
    let mut lease = reads.get().await?;
    let stored: sqlx::Result<Vec<Vec<u8>>> = sqlx::query_scalar(CREATE_MANY)
        .bind(&hashes)
        .bind(&chains)
        .bind(&metas)
        .bind(&expires_at)
        .bind(&deadlines)
        .bind(&ttls)
        .fetch_all(&mut *lease)
        .await;
    let stored = lease.finish(stored)?;
    let mut stored: HashSet<Vec<u8>> = stored.into_iter().collect();
    // Of two creations of one token in a batch, the first is the one stored.
    Ok(jobs
        .iter()
        .map(
            |j| {
                if stored.remove(&j.hash.0[..]) {
                    Ok(())
                } else {
                    Err(StoreError::AlreadyExists("session token".into()))
                }
            },
        )
        .collect())
}

/// The records of many tokens in one `SELECT … = ANY`, in the order asked.
async fn load_many(
    reads: ReadPool<PgConnection>,
    hashes: Vec<TokenHash>,
) -> Result<Vec<Result<Option<SessionRecord>>>> {
    let keys: Vec<&[u8]> = hashes.iter().map(|h| &h.0[..]).collect();
    let rows = read!(reads, |c| sqlx::query(LOAD_MANY).bind(&keys).fetch_all(c).await)?;
    let mut found: HashMap<Vec<u8>, SessionRecord> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let (hash, record) = keyed_record(row)?;
        found.insert(hash, record);
    }
    Ok(hashes.iter().map(|h| Ok(found.get(&h.0[..]).cloned())).collect())
}

/// Many rotations in one statement; for each, whether it was applied. Of two rotations of one
/// token in a batch only the first is sent (the other could only lose to it).
async fn rotate_many(reads: ReadPool<PgConnection>, jobs: Vec<RotateJob>) -> Result<Vec<Result<bool>>> {
    let first = first_of_each(jobs.iter().map(|j| j.presented.0));
    let picked = || jobs.iter().zip(&first).filter(|(_, first)| **first).map(|(j, _)| j);
    let presented: Vec<&[u8]> = picked().map(|j| &j.presented.0[..]).collect();
    let rotated_at: Vec<i64> = picked().map(|j| j.rotated.at as i64).collect();
    let successor: Vec<&[u8]> = picked().map(|j| &j.rotated.successor.0[..]).collect();
    let sealed: Vec<&[u8]> = picked().map(|j| j.rotated.sealed.as_bytes()).collect();
    let next_hash: Vec<&[u8]> = picked().map(|j| &j.successor_hash.0[..]).collect();
    let chain: Vec<&[u8]> = picked().map(|j| &j.chain.0[..]).collect();
    let meta: Vec<&str> = picked().map(|j| j.successor.meta.as_str()).collect();
    let expires_at: Vec<i64> = picked().map(|j| j.successor.expires_at as i64).collect();
    let deadline: Vec<i64> = picked().map(|j| j.successor.deadline as i64).collect();
    let ttl_ms: Vec<i64> = picked().map(|j| j.successor.ttl_ms as i64).collect();
    let mut lease = reads.get().await?;
    let applied: sqlx::Result<Vec<Vec<u8>>> = sqlx::query_scalar(ROTATE_MANY)
        .bind(&presented)
        .bind(&rotated_at)
        .bind(&successor)
        .bind(&sealed)
        .bind(&next_hash)
        .bind(&chain)
        .bind(&meta)
        .bind(&expires_at)
        .bind(&deadline)
        .bind(&ttl_ms)
        .fetch_all(&mut *lease)
        .await;
    let applied = lease.finish(applied)?;
    let applied: HashSet<&[u8]> = applied.iter().map(Vec::as_slice).collect();
    Ok(jobs.iter().zip(first).map(|(j, first)| Ok(first && applied.contains(&j.presented.0[..]))).collect())
}

/// Many live rotations in one statement; for each, the successor's record when it was applied.
/// Of two rotations of one token in a batch only the first is sent (the other falls back to
/// reading the record, and finds it rotated).
async fn rotate_live_many(
    reads: ReadPool<PgConnection>,
    jobs: Vec<LiveJob>,
) -> Result<Vec<Result<Option<SessionRecord>>>> {
    let first = first_of_each(jobs.iter().map(|j| j.presented.0));
    let picked = || jobs.iter().zip(&first).filter(|(_, first)| **first).map(|(j, _)| j);
    let presented: Vec<&[u8]> = picked().map(|j| &j.presented.0[..]).collect();
    let now: Vec<i64> = picked().map(|j| j.rotated.at as i64).collect();
    let successor: Vec<&[u8]> = picked().map(|j| &j.rotated.successor.0[..]).collect();
    let sealed: Vec<&[u8]> = picked().map(|j| j.rotated.sealed.as_bytes()).collect();
    let mut lease = reads.get().await?;
    let rows = sqlx::query(ROTATE_LIVE_MANY)
        .bind(&presented)
        .bind(&now)
        .bind(&successor)
        .bind(&sealed)
        .fetch_all(&mut *lease)
        .await;
    let rows = lease.finish(rows)?;
    let mut applied: HashMap<Vec<u8>, SessionRecord> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let record = SessionRecord {
            meta: row.try_get(1)?,
            expires_at: row.try_get::<i64, _>(2)? as u64,
            deadline: row.try_get::<i64, _>(3)? as u64,
            ttl_ms: row.try_get::<i64, _>(4)? as u64,
            rotated: None,
        };
        applied.insert(row.try_get(0)?, record);
    }
    Ok(jobs
        .iter()
        .zip(first)
        .map(|(j, first)| Ok(first.then(|| applied.remove(&j.presented.0[..])).flatten()))
        .collect())
}

/// A rotation's steps: reads and compare-and-set writes through the store's batchers, so that
/// concurrent rotations share their statements; the rare revocations and removals as
/// statements of their own.
struct Steps<'a> {
    store: &'a PgSessions,
}

impl RotationSteps for Steps<'_> {
    async fn load(&mut self, hash: &TokenHash, _lock: bool) -> Result<Option<SessionRecord>> {
        self.store.loads.call(*hash).await
    }

    async fn rotate(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        successor_hash: &TokenHash,
        chain: &ChainId,
        successor: &SessionRecord,
    ) -> Result<bool> {
        let job = RotateJob {
            presented: *presented,
            rotated: *rotated,
            successor_hash: *successor_hash,
            chain: *chain,
            successor: successor.clone(),
        };
        self.store.rotations.call(job).await
    }

    fn rotates_live(&self) -> bool {
        true
    }

    async fn rotate_live(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        _now: u64,
    ) -> Result<Option<SessionRecord>> {
        self.store.live_rotations.call(LiveJob { presented: *presented, rotated: *rotated }).await
    }

    async fn revoke(&mut self, _chain: &ChainId, from: &TokenHash) -> Result<()> {
        let from = *from;
        transaction(&self.store.pool, Caller::default(), move |tx, _| Box::pin(async move { revoke(tx, &from).await }))
            .await
    }

    async fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        let hash = *hash;
        transaction(&self.store.pool, Caller::default(), move |tx, _| Box::pin(async move { remove(tx, &hash).await }))
            .await
    }
}

/// The PostgreSQL session store.
#[derive(Debug, Clone)]
pub struct PgSessions {
    pool: PgPool,
    loads: Batcher<TokenHash, Option<SessionRecord>>,
    rotations: Batcher<RotateJob, bool>,
    live_rotations: Batcher<LiveJob, Option<SessionRecord>>,
    creations: Batcher<CreateJob, ()>,
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
        // Connections for the batch statements, which are key lookups whatever their arrays
        // hold. PostgreSQL plans a prepared statement afresh for each execution while it deems
        // custom plans cheaper, and planning the rotation statement cost ten times the CPU of
        // running it: generic plans only. A generic plan made while the table is small scans
        // it, and is kept as the table grows (seen: 1.1 ms of the database's CPU per rotation,
        // in `token_hash = ANY` over every row): no sequential scans either, so the primary key
        // is used from the first statement on. bench/results/network-backends.md.
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?
            .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]);
        let reads = ReadPool::new(options, settings)?;
        let (for_loads, for_rotations, for_live, for_creations) = (reads.clone(), reads.clone(), reads.clone(), reads);
        let loads = Batcher::start_staggered("session_load", MAX_BATCH, IN_FLIGHT, READ_STALL, move |hashes| {
            load_many(for_loads.clone(), hashes)
        });
        let rotations = Batcher::start_staggered("session_rotate", MAX_BATCH, IN_FLIGHT, COMMIT_STALL, move |jobs| {
            rotate_many(for_rotations.clone(), jobs)
        });
        let live_rotations =
            Batcher::start_staggered("session_rotate_live", MAX_BATCH, IN_FLIGHT, COMMIT_STALL, move |jobs| {
                rotate_live_many(for_live.clone(), jobs)
            });
        let creations = Batcher::start_staggered("session_create", MAX_BATCH, IN_FLIGHT, COMMIT_STALL, move |jobs| {
            create_many(for_creations.clone(), jobs)
        });
        Ok(Self { pool, loads, rotations, live_rotations, creations })
    }
}

#[async_trait]
impl SessionStore for PgSessions {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()> {
        self.creations.call(CreateJob { hash: token.hash(), chain: token.chain(), record: record.clone() }).await
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        rotate(&mut Steps { store: self }, req, policy).await
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        let token = token.clone();
        transaction(&self.pool, Caller::default(), move |tx, caller| {
            Box::pin(async move {
                let hash = token.hash();
                let found = load_locked(tx, &hash).await?;
                caller.check()?;
                Ok(match found {
                    None => false,
                    Some(r) if !r.alive(now) => {
                        remove(tx, &hash).await?;
                        false
                    }
                    Some(_) => {
                        revoke(tx, &hash).await?;
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
        let rows = crate::sql::pool_read(|| {
            sqlx::query(
                "SELECT expires_at, deadline, meta, token_hash FROM tokenserver_sessions \
                 WHERE token_hash > $2 AND rotated_at IS NULL AND expires_at > $1 AND deadline > $1 \
                 ORDER BY token_hash LIMIT $3",
            )
            .bind(now as i64)
            .bind(&from[..])
            .bind(limit as i64)
            .fetch_all(&self.pool)
        })
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_rotations_take_one_statement() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let store = PgSessions::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        crate::session::live_rotation_case(&store, |_| Steps { store: &store }).await;
        drop(store);
        db.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_session_id_index_of_earlier_versions_is_dropped_and_revocation_walks() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query(SCHEMA[1]).execute(&pool).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query("CREATE INDEX tokenserver_sessions_chain_idx ON tokenserver_sessions (chain)")
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let store = PgSessions::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let indexes: Vec<String> = sqlx::query_scalar(
            "SELECT indexname::text FROM pg_indexes WHERE tablename = 'tokenserver_sessions' \
             AND schemaname = current_schema() ORDER BY indexname",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(indexes, ["tokenserver_sessions_expiry_idx", "tokenserver_sessions_pkey"]);

        // Two sessions of three tokens each. Reusing the first session's second token (rotated,
        // past the grace period) revokes what followed it, the live third token, and nothing of
        // the other session.
        let policy = RotationPolicy { grace_ms: 0, reuse_detection: true, limits: Default::default() };
        let now = 1_700_000_000_000;
        let mut sessions = Vec::new();
        for _ in 0..2 {
            let first = SessionToken::new_session();
            store
                .create(&first, &SessionRecord::new("{}".into(), now, 600_000, 3_600_000))
                .await
                .unwrap_or_else(|e| panic!("{e}"));
            let mut tokens = vec![first];
            for i in 0..2 {
                let req = RotateRequest {
                    presented: tokens[i].clone(),
                    successor: tokens[i].successor(),
                    update: None,
                    now: now + 1 + i as u64,
                };
                match store.rotate(&req, &policy).await.unwrap_or_else(|e| panic!("{e}")) {
                    RotateOutcome::Rotated { token, .. } => tokens.push(token),
                    other => panic!("{other:?}"),
                }
            }
            sessions.push(tokens);
        }
        let reuse = RotateRequest {
            presented: sessions[0][1].clone(),
            successor: sessions[0][1].successor(),
            update: None,
            now: now + 10,
        };
        assert_eq!(store.rotate(&reuse, &policy).await.unwrap_or_else(|e| panic!("{e}")), RotateOutcome::Revoked);
        let stored = |t: &SessionToken| {
            let hash = t.hash();
            let pool = pool.clone();
            async move {
                sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM tokenserver_sessions WHERE token_hash = $1")
                    .bind(&hash.0[..])
                    .fetch_one(&pool)
                    .await
                    .unwrap_or_else(|e| panic!("{e}"))
            }
        };
        let mut left = Vec::new();
        for tokens in &sessions {
            for t in tokens {
                left.push(stored(t).await);
            }
        }
        // The reused token (the session's second) stays, rotated; its successor is gone.
        assert_eq!(left, [1, 1, 0, 1, 1, 1]);
        drop(store);
        pool.close().await;
        db.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_table_leaves_room_for_rotated_versions_also_when_made_before() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        // A table as earlier versions made it, at PostgreSQL's default fill factor.
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        sqlx::query(&SCHEMA[1].replace(" WITH (fillfactor = 70)", ""))
            .execute(&pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let before: Option<Vec<String>> =
            sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'tokenserver_sessions'::regclass")
                .fetch_one(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(before, None);
        pool.close().await;
        let _first = PgSessions::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let store = PgSessions::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let options: Option<Vec<String>> =
            sqlx::query_scalar("SELECT reloptions FROM pg_class WHERE oid = 'tokenserver_sessions'::regclass")
                .fetch_one(&store.pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(options, Some(vec!["fillfactor=70".to_string()]));
        drop((_first, store));
        db.drop_now().await;
    }
}
