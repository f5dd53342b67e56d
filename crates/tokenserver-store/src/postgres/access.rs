//! PostgreSQL access-token store: one table keyed by (service, the token's key: its SHA-256, led by
//! its issue time for a token tokenserver generated). Creation is one `INSERT … ON CONFLICT DO
//! UPDATE … WHERE` the stored token has expired: the primary key makes two concurrent creates of
//! one token end with one winner, and an expired token is replaced in the same statement. The
//! request path's calls (authorize's read, create) share statements: those waiting at that moment
//! leave in one ([`crate::batch`]). Every write runs on a task of its own ([`crate::caller`]).

use std::collections::HashSet;
use std::str::FromStr;

use async_trait::async_trait;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgRow};
use sqlx::{Postgres, Row};
use tokenserver_core::access::Grant;

use crate::access::{token_hash, AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::batch::{first_of_each, Batcher};
use crate::caller::detached;
use crate::sql::read_pool::{read, ReadPool};
use crate::sql::{COMMIT_STALL, READ_STALL};
use crate::{PoolSettings, StoreError};

/// Tokens of up to 1,024 bytes are listed from the covering index (`tokenserver_access_list_idx`),
/// longer ones from `tokenserver_access_list_long_idx`: SQL text, as the schema's partial indexes
/// and the listing must spell their conditions alike for PostgreSQL to match them.
macro_rules! short_token {
    () => {
        "octet_length(token) <= 1024"
    };
}
macro_rules! long_token {
    () => {
        "octet_length(token) > 1024"
    };
}

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
    // Listings read an application's tokens in key order from an index that holds every listed
    // column, without visiting the table (an index-only scan, once vacuum has marked the table's
    // pages all-visible, as autovacuum does). A B-tree entry must fit in a third of a page
    // (2,704 bytes), so tokens longer than 1,024 bytes, which ids of up to 256 bytes each could
    // push past that, have an index of their own without the columns; `LIST_APP` merges
    // the two. The plain application index they replace goes.
    concat!(
        "CREATE INDEX IF NOT EXISTS tokenserver_access_list_idx ON tokenserver_access_tokens \
         (service, app_id, token_hash) INCLUDE (token, user_id, expires_at, created_at) WHERE ",
        short_token!()
    ),
    concat!(
        "CREATE INDEX IF NOT EXISTS tokenserver_access_list_long_idx ON tokenserver_access_tokens \
         (service, app_id, token_hash) WHERE ",
        long_token!()
    ),
    "DROP INDEX IF EXISTS tokenserver_access_app_idx",
    "CREATE INDEX IF NOT EXISTS tokenserver_access_user_idx \
     ON tokenserver_access_tokens (service, app_id, user_id, token_hash)",
    "CREATE INDEX IF NOT EXISTS tokenserver_access_expiry_idx ON tokenserver_access_tokens (expires_at) \
     WHERE expires_at IS NOT NULL",
];

/// Many creations; a token stored and live at that moment is left as it is (not returned), an
/// expired one is replaced. The tokens of one statement must be distinct. Rows go in in key order,
/// so two statements that share tokens take their row locks in one order and cannot deadlock.
const CREATE_MANY: &str = "INSERT INTO tokenserver_access_tokens AS t \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) \
    SELECT * FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::bigint[], $7::bigint[]) \
        AS u(service, token_hash, token, app_id, user_id, expires_at, created_at) \
    ORDER BY u.service, u.token_hash \
    ON CONFLICT (service, token_hash) DO UPDATE SET token = EXCLUDED.token, app_id = EXCLUDED.app_id, \
        user_id = EXCLUDED.user_id, expires_at = EXCLUDED.expires_at, created_at = EXCLUDED.created_at \
    WHERE t.expires_at IS NOT NULL AND t.expires_at <= EXCLUDED.created_at \
    RETURNING t.service, t.token_hash";
/// Many tokens by key; each row carries its position in the arrays (from 1).
const GET_MANY: &str = "SELECT q.i, t.token, t.app_id, t.user_id, t.expires_at, t.created_at \
    FROM unnest($1::text[], $2::bytea[]) WITH ORDINALITY AS q(service, token_hash, i) \
    JOIN tokenserver_access_tokens t ON t.service = q.service AND t.token_hash = q.token_hash";
/// Calls one statement carries at most.
const MAX_BATCH: usize = 256;
/// Statements of one kind running at once (the others' calls queue for the next one). Two, not
/// four: fewer, fuller statements cost PostgreSQL less CPU a call and leave less waiting on
/// commits (bench/results/postgres-in-flight-ab.md). One statement at a time, two only when the
/// first stalls: creations ([`crate::sql::COMMIT_STALL`]) and reads ([`crate::sql::READ_STALL`]).
const IN_FLIGHT: usize = 2;
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = $1 AND token_hash = $2 AND (expires_at IS NULL OR expires_at > $3)";
/// A page of an application's tokens: the first `$5` of its short tokens (from the covering index)
/// and of its long ones, merged in key order. Each branch is an ordered index scan that stops
/// after `$5` rows, whatever the table's statistics say (without a limit in each, the planner
/// misjudged the long tokens' share and sorted the whole application).
const LIST_APP: &str = concat!(
    "(SELECT token, user_id, expires_at, created_at, token_hash FROM tokenserver_access_tokens \
      WHERE service = $1 AND app_id = $2 AND token_hash > $3 AND (expires_at IS NULL OR expires_at > $4) AND ",
    short_token!(),
    " ORDER BY token_hash LIMIT $5) \
     UNION ALL \
     (SELECT token, user_id, expires_at, created_at, token_hash FROM tokenserver_access_tokens \
      WHERE service = $1 AND app_id = $2 AND token_hash > $3 AND (expires_at IS NULL OR expires_at > $4) AND ",
    long_token!(),
    " ORDER BY token_hash LIMIT $5) \
     ORDER BY token_hash LIMIT $5"
);
const LIST_USER: &str = "SELECT token, user_id, expires_at, created_at, token_hash \
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

/// The token whose columns start at `at`: token, app_id, user_id, expires_at, created_at.
fn token_row(r: &PgRow, at: usize) -> std::result::Result<AccessToken, sqlx::Error> {
    token_of(r, at, r.try_get(at + 1)?, at + 2)
}

/// A listed token ([`LIST_APP`]'s columns: token, user_id, expires_at, created_at) of the
/// application `app_id` (every row of a listing has it, compared byte for byte: not decoded again).
fn listed_row(r: &PgRow, app_id: &str) -> std::result::Result<AccessToken, sqlx::Error> {
    token_of(r, 0, app_id.to_owned(), 1)
}

/// The token at column `token`, of application `app_id`, whose user_id, expires_at and
/// created_at start at column `rest`. The columns are this module's own statements' (TEXT, TEXT,
/// BIGINT, BIGINT), so they are decoded without sqlx's per-value type check, which took 12% of a
/// page of 100's instructions (bench/results/host-2026-12-06-f.md). A value
/// of another type is still an error, not a panic (text must be UTF-8, an integer at most 8
/// bytes); the conformance suite reads every column through here.
fn token_of(r: &PgRow, token: usize, app_id: String, rest: usize) -> std::result::Result<AccessToken, sqlx::Error> {
    Ok(AccessToken {
        token: r.try_get_unchecked(token)?,
        grant: Grant {
            app_id,
            user_id: r.try_get_unchecked(rest)?,
            expires_at: r.try_get_unchecked::<Option<i64>, _>(rest + 1)?.map(|v| v.max(0) as u64),
        },
        created_at: r.try_get_unchecked::<i64, _>(rest + 2)?.max(0) as u64,
    })
}

/// A token's primary key.
type Key = (String, [u8; 32]);

/// A token to create, as [`CREATE_MANY`] takes it.
struct CreateJob {
    key: Key,
    token: AccessToken,
}

/// Many creations in one statement, each answered `Ok` or `AlreadyExists`. Of two creations of
/// one token in a batch only the first is sent (PostgreSQL refuses to touch a row twice in one
/// statement, and the second could only lose to the first).
async fn create_many(reads: ReadPool<PgConnection>, jobs: Vec<CreateJob>) -> Result<Vec<Result<()>>> {
    let first = first_of_each(jobs.iter().map(|j| &j.key));
    let picked = || jobs.iter().zip(&first).filter(|(_, first)| **first).map(|(j, _)| j);
    let services: Vec<&str> = picked().map(|j| j.key.0.as_str()).collect();
    let hashes: Vec<&[u8]> = picked().map(|j| &j.key.1[..]).collect();
    let tokens: Vec<&str> = picked().map(|j| j.token.token.as_str()).collect();
    let apps: Vec<&str> = picked().map(|j| j.token.grant.app_id.as_str()).collect();
    let users: Vec<Option<&str>> = picked().map(|j| j.token.grant.user_id.as_deref()).collect();
    let expiries: Vec<Option<i64>> = picked().map(|j| j.token.grant.expires_at.map(i64_of)).collect();
    let created: Vec<i64> = picked().map(|j| i64_of(j.token.created_at)).collect();
    let mut lease = reads.get().await?;
    let stored = sqlx::query(CREATE_MANY)
        .bind(&services)
        .bind(&hashes)
        .bind(&tokens)
        .bind(&apps)
        .bind(&users)
        .bind(&expiries)
        .bind(&created)
        .fetch_all(&mut *lease)
        .await;
    let stored = lease.finish(stored)?;
    let stored = stored
        .iter()
        .map(|r| {
            let hash: Vec<u8> = r.try_get(1)?;
            let hash = <[u8; 32]>::try_from(hash.as_slice()).map_err(|e| sqlx::Error::Decode(Box::new(e)))?;
            Ok((r.try_get::<String, _>(0)?, hash))
        })
        .collect::<std::result::Result<HashSet<Key>, sqlx::Error>>()?;
    Ok(jobs
        .iter()
        .zip(first)
        .map(|(j, first)| {
            if first && stored.contains(&j.key) {
                Ok(())
            } else {
                Err(StoreError::AlreadyExists(format!("token {:?}", j.token.token)))
            }
        })
        .collect())
}

/// Many tokens in one statement, in the order asked (expired ones included: the caller decides).
async fn get_many(reads: ReadPool<PgConnection>, keys: Vec<Key>) -> Result<Vec<Result<Option<AccessToken>>>> {
    let services: Vec<&str> = keys.iter().map(|(s, _)| s.as_str()).collect();
    let hashes: Vec<&[u8]> = keys.iter().map(|(_, h)| &h[..]).collect();
    let rows = read!(reads, |c| sqlx::query(GET_MANY).bind(&services).bind(&hashes).fetch_all(c).await)?;
    let mut found: Vec<Result<Option<AccessToken>>> = keys.iter().map(|_| Ok(None)).collect();
    for r in &rows {
        // WITH ORDINALITY counts from 1.
        let at = usize::try_from(r.try_get::<i64, _>(0)? - 1).ok().and_then(|i| found.get_mut(i));
        let at = at.ok_or_else(|| StoreError::Backend("a token row outside the batch".into()))?;
        *at = Ok(Some(token_row(r, 1)?));
    }
    Ok(found)
}

/// The options of the reading connections (batched reads, listings). Their statements are
/// index reads whatever the table holds: generic plans, never a sequential scan (why:
/// crate::postgres::session's store, where a plan made on a small table was kept as it grew).
fn read_options(url: &str) -> Result<PgConnectOptions> {
    Ok(PgConnectOptions::from_str(url)
        .map_err(|e| StoreError::Config(format!("invalid PostgreSQL URL: {e}")))?
        .options([("plan_cache_mode", "force_generic_plan"), ("enable_seqscan", "off")]))
}

/// The PostgreSQL access-token store.
#[derive(Debug, Clone)]
pub struct PgAccess {
    pool: PgPool,
    /// Listings: a pool of their own, so that a burst of them cannot hold up authorizations and
    /// creations; deadpool's rather than sqlx's, which pings each connection taken back. Its
    /// size is [`PoolSettings::listing_connections`], not the store's pool size.
    listings: ReadPool<PgConnection>,
    gets: Batcher<Key, Option<AccessToken>>,
    creations: Batcher<CreateJob, ()>,
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
        let options = read_options(url)?;
        let listings = ReadPool::new(options.clone(), &settings.for_listings())?;
        let reads = ReadPool::new(options, settings)?;
        let for_creations = reads.clone();
        let gets = Batcher::start_staggered("access_get", MAX_BATCH, IN_FLIGHT, READ_STALL, move |keys| {
            get_many(reads.clone(), keys)
        });
        let creations = Batcher::start_staggered("access_create", MAX_BATCH, IN_FLIGHT, COMMIT_STALL, move |jobs| {
            create_many(for_creations.clone(), jobs)
        });
        Ok(Self { pool, listings, gets, creations })
    }

    /// One statement on a detached task (a departing caller cannot cut it short).
    async fn execute(
        &self,
        build: impl FnOnce() -> sqlx::query::Query<'static, Postgres, sqlx::postgres::PgArguments> + Send + 'static,
    ) -> Result<u64> {
        let pool = self.pool.clone();
        detached(move |_| async move { Ok(crate::sql::pool_write(build().execute(&pool)).await?.rows_affected()) })
            .await
    }
}

#[async_trait]
impl AccessStore for PgAccess {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        self.creations.call(CreateJob { key: (t.service.to_string(), token_hash(t.token)), token: t.stored() }).await
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
        // PostgreSQL text cannot hold NUL, and one refused parameter would fail every read of its
        // batch: such a service holds no token (ids refuse control characters at creation).
        if service.contains('\0') {
            return Ok(None);
        }
        let found = self.gets.call((service.to_string(), token_hash(token))).await?;
        Ok(found.filter(|t| t.grant.live(now)))
    }

    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool> {
        let (service, hash) = (service.to_string(), token_hash(token).to_vec());
        Ok(self.execute(move || sqlx::query(DELETE_LIVE).bind(service).bind(hash).bind(i64_of(now))).await? == 1)
    }

    async fn list(&self, l: &Listing<'_>) -> Result<TokenPage> {
        let from = crate::hash_cursor(l.after)?;
        let limit = l.limit.max(1);
        let rows = read!(self.listings, |c| {
            let query = match l.user_id {
                None => sqlx::query(LIST_APP),
                Some(_) => sqlx::query(LIST_USER),
            };
            let mut query = query.bind(l.service).bind(l.app_id).bind(&from[..]).bind(i64_of(l.now)).bind(limit as i64);
            if let Some(user) = l.user_id {
                query = query.bind(user);
            }
            query.fetch_all(c).await
        })?;
        let tokens = rows.iter().map(|r| listed_row(r, l.app_id)).collect::<std::result::Result<Vec<_>, _>>()?;
        // Only the last row's key makes the cursor.
        let next = match rows.last().filter(|_| rows.len() >= limit) {
            Some(r) => Some(hex::encode(r.try_get::<&[u8], _>(4)?)),
            None => None,
        };
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

#[cfg(test)]
mod tests {
    use super::*;
    use sqlx::Connection;

    fn job(service: &str, token: &str, app_id: &str, expires_at: Option<u64>, now: u64) -> CreateJob {
        let t = NewToken { service, token, app_id, user_id: None, expires_at, now };
        CreateJob { key: (service.to_string(), token_hash(token)), token: t.stored() }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_creates_and_reads_answers_each_call_as_it_would_alone() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let store = PgAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let options = PgConnectOptions::from_str(&db.url).unwrap_or_else(|e| panic!("{e}"));
        let reads = ReadPool::new(options, &PoolSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        // Stored before the batch: one live token, one expired.
        for (token, expires_at) in [("live-one", Some(now + 60_000)), ("gone-one", Some(now - 1))] {
            store
                .create(&NewToken { service: "s", token, app_id: "old", user_id: None, expires_at, now: now - 10 })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        let answers = create_many(
            reads.clone(),
            vec![
                job("s", "fresh-one", "a", None, now),
                job("s", "fresh-one", "b", None, now),
                job("s", "live-one", "c", None, now),
                job("s", "gone-one", "d", Some(now + 5), now),
                job("t", "live-one", "e", None, now),
            ],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let outcome: Vec<bool> = answers.iter().map(|a| a.is_ok()).collect();
        // One of two creates of one token; a live token kept; an expired one replaced; the same
        // token in another service is another token.
        assert_eq!(outcome, [true, false, false, true, true]);
        assert!(answers.iter().all(|a| a.is_ok() || matches!(a, Err(StoreError::AlreadyExists(_)))));

        let keys = ["fresh-one", "live-one", "gone-one", "missing"]
            .iter()
            .map(|t| ("s".to_string(), token_hash(t)))
            .chain([("t".to_string(), token_hash("live-one"))])
            .collect();
        let found = get_many(reads, keys).await.unwrap_or_else(|e| panic!("{e}"));
        let apps: Vec<Option<String>> =
            found.into_iter().map(|f| f.unwrap_or_else(|e| panic!("{e}")).map(|t| t.grant.app_id)).collect();
        let want = [Some("a"), Some("old"), Some("d"), None, Some("e")].map(|a| a.map(str::to_string));
        assert_eq!(apps, want);
        // A service PostgreSQL's text cannot hold is no token's, and is not sent with the others.
        let (odd, fine) = tokio::join!(store.get("s\0", "fresh-one", now), store.get("s", "fresh-one", now));
        assert!(matches!(odd, Ok(None)));
        assert_eq!(fine.unwrap_or_else(|e| panic!("{e}")).map(|t| t.grant.app_id).as_deref(), Some("a"));
        drop(store);
        db.drop_now().await;
    }

    /// The indexes on the table, by name.
    async fn index_names(pool: &PgPool) -> Vec<String> {
        sqlx::query_scalar(
            "SELECT indexname::TEXT FROM pg_indexes WHERE schemaname = current_schema() AND tablename = 'tokenserver_access_tokens' \
             ORDER BY 1",
        )
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_with_the_application_index_of_before_gets_the_listing_indexes_and_keeps_its_tokens() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let pool = PgPool::connect(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        // The table as earlier versions left it: one plain index for listings.
        for stmt in SCHEMA.iter().filter(|s| !s.contains("tokenserver_access_list")) {
            sqlx::query(stmt).execute(&pool).await.unwrap_or_else(|e| panic!("{e}"));
        }
        sqlx::query(
            "CREATE INDEX tokenserver_access_app_idx ON tokenserver_access_tokens (service, app_id, token_hash)",
        )
        .execute(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        let long = "L".repeat(3000);
        let answers = create_many(
            ReadPool::new(
                PgConnectOptions::from_str(&db.url).unwrap_or_else(|e| panic!("{e}")),
                &PoolSettings::default(),
            )
            .unwrap_or_else(|e| panic!("{e}")),
            vec![job("s", "t1", "a", None, now), job("s", &long, "a", None, now), job("s", "t3", "b", None, now)],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(answers.iter().all(Result::is_ok), "{answers:?}");

        let store = PgAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let want_indexes = [
            "tokenserver_access_expiry_idx",
            "tokenserver_access_list_idx",
            "tokenserver_access_list_long_idx",
            "tokenserver_access_tokens_pkey",
            "tokenserver_access_user_idx",
        ];
        assert_eq!(index_names(&pool).await, want_indexes);
        assert_eq!(
            crate::testing::first_page_sorted(&store, "s", "a", now).await.unwrap_or_else(|e| panic!("{e}")),
            [long.clone(), "t1".to_string()]
        );

        // The listing's plan on a listing connection reads each kind of token from its own index
        // in key order, and the short ones without the table.
        let options = read_options(&db.url).unwrap_or_else(|e| panic!("{e}"));
        let mut c = PgConnection::connect_with(&options).await.unwrap_or_else(|e| panic!("{e}"));
        let plan = crate::testing::prepared_plan(
            &mut c,
            "page",
            "text, text, bytea, bigint, bigint",
            LIST_APP,
            "'s', 'a', '', 0, 100",
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert!(plan.contains("Merge Append"), "{plan}");
        assert!(plan.contains("Index Only Scan using tokenserver_access_list_idx"), "{plan}");
        assert!(plan.contains("Index Scan using tokenserver_access_list_long_idx"), "{plan}");
        let sorts = plan.lines().any(|l| l.trim_start().trim_start_matches("->").trim_start().starts_with("Sort  ("));
        assert!(!sorts, "no sort: {plan}");
        drop(c);

        // A second start finds the indexes and leaves them as they are.
        drop(PgAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(index_names(&pool).await, want_indexes);
        drop(store);
        pool.close().await;
        db.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_sharing_tokens_in_opposite_orders_each_end_with_one_winner() {
        let Some(db) = crate::testing::fresh(crate::Backend::Postgres).await else { return };
        let store = PgAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let options = PgConnectOptions::from_str(&db.url).unwrap_or_else(|e| panic!("{e}"));
        let reads = ReadPool::new(options, &PoolSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        for round in 0..40 {
            let (x, y) = (format!("x-{round}"), format!("y-{round}"));
            let one = vec![job("s", &x, "one", None, now), job("s", &y, "one", None, now)];
            let other = vec![job("s", &y, "other", None, now), job("s", &x, "other", None, now)];
            let (one, other) = tokio::join!(create_many(reads.clone(), one), create_many(reads.clone(), other));
            let (one, other) = (one.unwrap_or_else(|e| panic!("{e}")), other.unwrap_or_else(|e| panic!("{e}")));
            // Each token is created by exactly one of the two; the other is told it exists.
            for (a, b) in [(&one[0], &other[1]), (&one[1], &other[0])] {
                let ok = [a, b].iter().filter(|r| r.is_ok()).count();
                let exists = [a, b].iter().filter(|r| matches!(r, Err(StoreError::AlreadyExists(_)))).count();
                assert_eq!((ok, exists), (1, 1), "round {round}: {a:?} {b:?}");
            }
        }
        drop(store);
        db.drop_now().await;
    }
}
