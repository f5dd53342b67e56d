//! MySQL / MariaDB access-token store: one table, unique by (service, the token's key: its SHA-256,
//! led by its issue time for a token tokenserver generated), ids as `VARBINARY` so that comparisons
//! are byte for byte (a case-insensitive collation would make `App` and `app` one application).
//! InnoDB stores rows in primary-key order, and the primary key is (service, application, key): a
//! page of a listing is one range of the table. Keyed by token alone, with a secondary index for
//! listings, each listed token cost one more primary-key read (the token is a `BLOB`, which no
//! index can cover); a read by token now goes through the unique key first.
//! Creation is an `INSERT` whose duplicate-key error is followed, when the token has expired, by an
//! `UPDATE` guarded by that expiry; the unique key makes two concurrent creates of one token end
//! with one winner, whatever their applications. Creations arriving together are first tried as
//! one multi-row `INSERT`, which InnoDB applies whole or not at all: when any of its tokens exists,
//! each creation of the batch then takes the one-token path. Every write runs on a task of its
//! own. `authorize`'s reads arriving together share one statement ([`crate::batch`]).

use std::str::FromStr;

use async_trait::async_trait;
use sqlx::mysql::{MySqlArguments, MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlRow};
use sqlx::{Executor, MySql, Row};
use tokenserver_core::access::Grant;

use crate::access::{token_hash, AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::batch::{first_of_each, Batcher};
use crate::caller::detached;
use crate::sql::read_pool::{read, ReadPool};
use crate::sql::{COMMIT_STALL, READ_STALL};
use crate::{PoolSettings, StoreError};

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS tokenserver_access_tokens (
    service VARBINARY(256) NOT NULL,
    token_hash BINARY(32) NOT NULL,
    token BLOB NOT NULL,
    app_id VARBINARY(256) NOT NULL,
    user_id VARBINARY(256) NULL,
    expires_at BIGINT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (service, app_id, token_hash),
    UNIQUE KEY tokenserver_access_token_key (service, token_hash),
    KEY tokenserver_access_user_idx (service, app_id, user_id, token_hash),
    KEY tokenserver_access_expiry_idx (expires_at)
) ENGINE=InnoDB";
/// Tables made before the rows were clustered by application: keyed by (service, token_hash),
/// listed through a secondary index that left a primary-key read per listed token.
const OLD_LAYOUT: &str = "SELECT COUNT(*) FROM information_schema.STATISTICS \
    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'tokenserver_access_tokens' \
    AND INDEX_NAME = 'tokenserver_access_app_idx'";
/// One statement, so the table is rebuilt once and is never without its uniqueness.
const CLUSTER_BY_APP: &str = "ALTER TABLE tokenserver_access_tokens DROP PRIMARY KEY, \
    ADD PRIMARY KEY (service, app_id, token_hash), \
    ADD UNIQUE KEY tokenserver_access_token_key (service, token_hash), \
    DROP KEY tokenserver_access_app_idx";

const INSERT: &str = "INSERT INTO tokenserver_access_tokens \
    (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)";
const REPLACE_EXPIRED: &str = "UPDATE tokenserver_access_tokens \
    SET token = ?, app_id = ?, user_id = ?, expires_at = ?, created_at = ? \
    WHERE service = ? AND token_hash = ? AND expires_at IS NOT NULL AND expires_at <= ?";
/// Token reads one statement carries at most, statements out at once, and the sizes a statement
/// is padded to (each one statement text, prepared once per connection): as for the users' rows
/// (`super::sync`), MariaDB plans each `UNION ALL` branch on every execution. Four out at once,
/// not eight: fuller statements, 9-16% more reads a second (bench/results/postgres-in-flight-ab.md);
/// one at a time, another only when those out have stalled ([`crate::sql::READ_STALL`]).
const GETS_BATCH: usize = 16;
const GETS_IN_FLIGHT: usize = 4;
const GET_SIZES: [usize; 5] = [1, 2, 4, 8, GETS_BATCH];
/// Creations one multi-row `INSERT` carries at most, and such statements running at once. Each
/// commits (a redo log flush): one goes out at a time, another beside it only when it stalls
/// ([`crate::sql::COMMIT_STALL`]), so one statement carries every create waiting. Against 16 a
/// statement and four at once: ~28 creates a statement instead of ~8, MariaDB's CPU a create
/// halved, creates +50% (bench/results/host-2026-12-07-p.md).
const CREATES_BATCH: usize = 32;
const CREATES_IN_FLIGHT: usize = 4;
const DELETE_LIVE: &str = "DELETE FROM tokenserver_access_tokens \
    WHERE service = ? AND token_hash = ? AND (expires_at IS NULL OR expires_at > ?)";
const LIST_APP: &str = "SELECT token, user_id, expires_at, created_at, token_hash \
    FROM tokenserver_access_tokens FORCE INDEX (PRIMARY) \
    WHERE service = ? AND app_id = ? AND token_hash > ? AND (expires_at IS NULL OR expires_at > ?) \
    ORDER BY token_hash LIMIT ?";
const LIST_USER: &str = "SELECT token, user_id, expires_at, created_at, token_hash \
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

/// A `VARBINARY` / `BLOB` column as text. This module's columns are decoded without sqlx's
/// per-value type check, as on PostgreSQL (`postgres::access::token_of`): the statements are
/// ours, and a value of another type is still an error, not a panic.
fn text(r: &MySqlRow, i: usize) -> std::result::Result<String, sqlx::Error> {
    let bytes: Vec<u8> = r.try_get_unchecked(i)?;
    String::from_utf8(bytes).map_err(|e| sqlx::Error::Decode(Box::new(e)))
}

/// The token whose columns start at `at`: token, app_id, user_id, expires_at, created_at.
fn token_row(r: &MySqlRow, at: usize) -> std::result::Result<AccessToken, sqlx::Error> {
    token_of(r, at, text(r, at + 1)?, at + 2)
}

/// A listed token ([`LIST_APP`]'s columns: token, user_id, expires_at, created_at) of the
/// application `app_id` (every row of a listing has it, compared byte for byte: not decoded again).
fn listed_row(r: &MySqlRow, app_id: &str) -> std::result::Result<AccessToken, sqlx::Error> {
    token_of(r, 0, app_id.to_owned(), 1)
}

/// The token at column `token`, of application `app_id`, whose user_id, expires_at and
/// created_at start at column `rest`.
fn token_of(r: &MySqlRow, token: usize, app_id: String, rest: usize) -> std::result::Result<AccessToken, sqlx::Error> {
    let user: Option<Vec<u8>> = r.try_get_unchecked(rest)?;
    Ok(AccessToken {
        token: text(r, token)?,
        grant: Grant {
            app_id,
            user_id: user.map(String::from_utf8).transpose().map_err(|e| sqlx::Error::Decode(Box::new(e)))?,
            expires_at: r.try_get_unchecked::<Option<i64>, _>(rest + 1)?.map(|v| v.max(0) as u64),
        },
        created_at: r.try_get_unchecked::<i64, _>(rest + 2)?.max(0) as u64,
    })
}

/// A token's primary key.
type Key = (String, [u8; 32]);

/// `n` primary-key reads in one statement, each branch with its position first.
fn get_many_sql(n: usize) -> String {
    let branch = |i: usize| {
        format!(
            "(SELECT {i}, token, app_id, user_id, expires_at, created_at FROM tokenserver_access_tokens \
             WHERE service = ? AND token_hash = ?)"
        )
    };
    (0..n).map(branch).collect::<Vec<_>>().join(" UNION ALL ")
}

/// Many tokens in one statement, in the order asked (expired ones included: the caller decides);
/// the statement is padded to the next of [`GET_SIZES`] with the last key.
async fn get_many(reads: ReadPool<MySqlConnection>, keys: Vec<Key>) -> Result<Vec<Result<Option<AccessToken>>>> {
    let Some(last) = keys.last() else { return Ok(Vec::new()) };
    let size = GET_SIZES.iter().copied().find(|s| *s >= keys.len()).unwrap_or(keys.len());
    let sql = get_many_sql(size);
    let rows = read!(reads, |c| {
        let mut query = sqlx::query(&sql);
        for (service, hash) in keys.iter().chain(std::iter::repeat(last)).take(size) {
            query = query.bind(service.as_str()).bind(&hash[..]);
        }
        query.fetch_all(c).await
    })?;
    let mut found: Vec<Result<Option<AccessToken>>> = keys.iter().map(|_| Ok(None)).collect();
    for r in &rows {
        // A padding branch's answer falls past the calls and is dropped.
        if let Some(at) = usize::try_from(r.try_get::<i64, _>(0)?).ok().and_then(|i| found.get_mut(i)) {
            *at = Ok(Some(token_row(r, 1)?));
        }
    }
    Ok(found)
}

/// A token to create: its key and its stored form.
struct CreateJob {
    key: Key,
    token: AccessToken,
}

/// `query` with the columns of `j`'s row bound after its other parameters, in the order of
/// [`INSERT`]'s column list.
fn bind_row<'q>(
    query: sqlx::query::Query<'q, MySql, MySqlArguments>,
    j: &'q CreateJob,
) -> sqlx::query::Query<'q, MySql, MySqlArguments> {
    let (t, g) = (&j.token, &j.token.grant);
    query
        .bind(j.key.0.as_str())
        .bind(&j.key.1[..])
        .bind(t.token.as_str())
        .bind(g.app_id.as_str())
        .bind(g.user_id.as_deref())
        .bind(g.expires_at.map(i64_of))
        .bind(i64_of(t.created_at))
}

/// `n` rows of an `INSERT` of every column.
fn insert_many_sql(n: usize) -> String {
    let rows = vec!["(?, ?, ?, ?, ?, ?, ?)"; n].join(", ");
    format!(
        "INSERT INTO tokenserver_access_tokens \
         (service, token_hash, token, app_id, user_id, expires_at, created_at) VALUES {rows}"
    )
}

/// Creations arriving together, each answered as it would be alone. Their distinct tokens go in
/// one multi-row `INSERT` first: one statement and one commit for the batch when none exists yet,
/// the usual case for tokens tokenserver generates. A duplicate key (or any other error) fails the
/// statement as a whole, and then every creation of the batch takes [`create_one`], as does a
/// second creation of a token already in the batch; an unreachable server fails the batch.
async fn create_many(pool: MySqlPool, jobs: Vec<CreateJob>) -> Result<Vec<Result<()>>> {
    let first = first_of_each(jobs.iter().map(|j| &j.key));
    let mut fresh: Vec<&CreateJob> = jobs.iter().zip(&first).filter(|(_, first)| **first).map(|(j, _)| j).collect();
    // In key order: two statements that share tokens take their locks in one order.
    fresh.sort_unstable_by(|a, b| a.key.cmp(&b.key));
    let mut inserted = false;
    if fresh.len() > 1 {
        let sql = insert_many_sql(fresh.len());
        let query = fresh.iter().fold(sqlx::query(&sql), |query, j| bind_row(query, j));
        match crate::sql::pool_write(query.execute(&pool)).await {
            Ok(_) => inserted = true,
            // Each creation alone would meet the same unreachable server.
            Err(err @ StoreError::Unavailable(_)) => return Err(err),
            Err(_) => {}
        }
    }
    let answers = jobs.iter().zip(first).map(|(j, first)| {
        let pool = &pool;
        async move {
            if inserted && first {
                return Ok(());
            }
            create_one(pool, j).await
        }
    });
    Ok(futures_util::future::join_all(answers).await)
}

/// One creation: an `INSERT`, and on a duplicate key an `UPDATE` of the stored token if it has
/// expired. Two statements, each committing on its own: inside one transaction the duplicate-key
/// check's shared lock, held by every loser, deadlocks their `UPDATE`s against each other.
async fn create_one(pool: &MySqlPool, j: &CreateJob) -> Result<()> {
    let (service, hash) = (j.key.0.as_str(), &j.key.1[..]);
    let (stored, g) = (&j.token, &j.token.grant);
    for _ in 0..MAX_ATTEMPTS {
        let inserted = crate::sql::pool_write(bind_row(sqlx::query(INSERT), j).execute(pool)).await;
        match inserted {
            Ok(_) => return Ok(()),
            Err(StoreError::AlreadyExists(_)) => {}
            Err(StoreError::Conflict) => continue,
            Err(other) => return Err(other),
        }
        let replaced = crate::sql::pool_write(
            sqlx::query(REPLACE_EXPIRED)
                .bind(stored.token.as_str())
                .bind(g.app_id.as_str())
                .bind(g.user_id.as_deref())
                .bind(g.expires_at.map(i64_of))
                .bind(i64_of(stored.created_at))
                .bind(service)
                .bind(hash)
                .bind(i64_of(stored.created_at))
                .execute(pool),
        )
        .await;
        match replaced {
            Ok(done) if done.rows_affected() == 1 => return Ok(()),
            Ok(_) => return Err(StoreError::AlreadyExists(format!("token {:?}", stored.token))),
            Err(StoreError::Conflict) => continue,
            Err(other) => return Err(other),
        }
    }
    Err(StoreError::Conflict)
}

/// Whether the table still has the layout of [`OLD_LAYOUT`].
async fn has_old_layout(pool: &MySqlPool) -> Result<bool> {
    let indexed: i64 = sqlx::query_scalar(OLD_LAYOUT).fetch_one(pool).await?;
    Ok(indexed > 0)
}

/// Rebuilds a table of [`OLD_LAYOUT`] clustered by application (a page of a listing is then one
/// range of the table). Two processes starting together may both try: the second's statement
/// fails once the first's has dropped the old index, and that is success.
async fn cluster_by_application(pool: &MySqlPool) -> Result<()> {
    if !has_old_layout(pool).await? {
        return Ok(());
    }
    tracing::info!("access-token table being rebuilt clustered by application (one table copy)");
    match sqlx::query(CLUSTER_BY_APP).execute(pool).await {
        Ok(_) => Ok(()),
        Err(_) if !has_old_layout(pool).await? => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// The MySQL access-token store.
#[derive(Debug, Clone)]
pub struct MySqlAccess {
    pool: MySqlPool,
    /// Listings: a pool of their own, so that a burst of them cannot hold up authorizations;
    /// deadpool's rather than sqlx's, which pings each connection taken back. Its
    /// size is [`PoolSettings::listing_connections`], not the store's pool size.
    listings: ReadPool<MySqlConnection>,
    gets: Batcher<Key, Option<AccessToken>>,
    creates: Batcher<CreateJob, ()>,
}

impl MySqlAccess {
    /// Connects and creates the table when missing.
    pub async fn open(url: &str, settings: &PoolSettings) -> Result<Self> {
        let url = super::normalise_url(url);
        let options =
            MySqlConnectOptions::from_str(&url).map_err(|e| StoreError::Config(format!("invalid MySQL URL: {e}")))?;
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
        cluster_by_application(&pool).await?;
        // Single autocommit reads: the write pool's READ COMMITTED makes no difference to them.
        let listings = ReadPool::new(options.clone(), &settings.for_listings())?;
        let reads = ReadPool::new(options, settings)?;
        let gets = Batcher::start_staggered("access_get", GETS_BATCH, GETS_IN_FLIGHT, READ_STALL, move |keys| {
            get_many(reads.clone(), keys)
        });
        let for_creations = pool.clone();
        let creates =
            Batcher::start_staggered("access_create", CREATES_BATCH, CREATES_IN_FLIGHT, COMMIT_STALL, move |jobs| {
                create_many(for_creations.clone(), jobs)
            });
        Ok(Self { pool, listings, gets, creates })
    }

    /// One statement on a detached task (a departing caller cannot cut it short).
    async fn execute(
        &self,
        build: impl FnOnce() -> sqlx::query::Query<'static, MySql, MySqlArguments> + Send + 'static,
    ) -> Result<u64> {
        let pool = self.pool.clone();
        detached(move |_| async move { Ok(crate::sql::pool_write(build().execute(&pool)).await?.rows_affected()) })
            .await
    }
}

#[async_trait]
impl AccessStore for MySqlAccess {
    fn backend(&self) -> &'static str {
        "mysql"
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        self.creates.call(CreateJob { key: (t.service.to_string(), token_hash(t.token)), token: t.stored() }).await
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
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
                None => sqlx::query(LIST_APP).bind(l.service).bind(l.app_id),
                Some(user) => sqlx::query(LIST_USER).bind(l.service).bind(l.app_id).bind(user),
            };
            query.bind(&from[..]).bind(i64_of(l.now)).bind(limit as i64).fetch_all(c).await
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_reads_answers_each_call_in_its_place() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let store = MySqlAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let options =
            MySqlConnectOptions::from_str(&crate::mysql::normalise_url(&db.url)).unwrap_or_else(|e| panic!("{e}"));
        let reads = ReadPool::new(options, &PoolSettings::default()).unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        for (service, token, app_id) in [("s", "one", "a"), ("s", "two", "b"), ("t", "one", "c")] {
            store
                .create(&NewToken { service, token, app_id, user_id: None, expires_at: None, now })
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        // Five reads, padded to a statement of eight: a missing token, one token twice, the
        // same token text in two services.
        let asked = [("s", "two"), ("s", "missing"), ("t", "one"), ("s", "one"), ("s", "two")];
        let keys = asked.iter().map(|(s, t)| (s.to_string(), token_hash(t))).collect();
        let found = get_many(reads, keys).await.unwrap_or_else(|e| panic!("{e}"));
        let apps: Vec<Option<String>> =
            found.into_iter().map(|f| f.unwrap_or_else(|e| panic!("{e}")).map(|t| t.grant.app_id)).collect();
        let want = [Some("b"), None, Some("c"), Some("a"), Some("b")].map(|a| a.map(str::to_string));
        assert_eq!(apps, want);
        drop(store);
        db.drop_now().await;
    }

    fn job(service: &str, token: &str, app_id: &str, expires_at: Option<u64>, now: u64) -> CreateJob {
        let t = NewToken { service, token, app_id, user_id: None, expires_at, now };
        CreateJob { key: (service.to_string(), token_hash(token)), token: t.stored() }
    }

    async fn apps_of(store: &MySqlAccess, tokens: &[(&str, &str)], now: u64) -> Vec<Option<String>> {
        let mut apps = Vec::new();
        for (service, token) in tokens {
            let found = store.get(service, token, now).await.unwrap_or_else(|e| panic!("{e}"));
            apps.push(found.map(|t| t.grant.app_id));
        }
        apps
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_of_creates_answers_each_call_as_it_would_alone() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let store = MySqlAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        let outcome = |answers: &[Result<()>]| -> Vec<bool> {
            assert!(answers.iter().all(|a| a.is_ok() || matches!(a, Err(StoreError::AlreadyExists(_)))));
            answers.iter().map(|a| a.is_ok()).collect()
        };

        // New tokens only, one of them twice: one statement for the distinct ones, and the second
        // creation of the repeated token loses to the first.
        let batch = vec![
            job("s", "new-a", "a", None, now),
            job("s", "new-b", "b", None, now),
            job("s", "new-a", "x", None, now),
        ];
        let answers = create_many(store.pool.clone(), batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome(&answers), [true, true, false]);

        // One token already live in the batch fails the multi-row statement as a whole; each
        // creation then answers alone: a live token kept, an expired one replaced, new ones stored,
        // the same token in another service another token.
        store
            .create(&NewToken {
                service: "s",
                token: "gone",
                app_id: "old",
                user_id: None,
                expires_at: Some(now - 1),
                now: now - 10,
            })
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let batch = vec![
            job("s", "new-c", "c", None, now),
            job("s", "new-a", "y", None, now),
            job("s", "gone", "d", Some(now + 5), now),
            job("t", "new-a", "e", None, now),
        ];
        let answers = create_many(store.pool.clone(), batch).await.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(outcome(&answers), [true, false, true, true]);

        let asked = [("s", "new-a"), ("s", "new-b"), ("s", "new-c"), ("s", "gone"), ("t", "new-a")];
        let want = [Some("a"), Some("b"), Some("c"), Some("d"), Some("e")].map(|a| a.map(str::to_string));
        assert_eq!(apps_of(&store, &asked, now).await, want);
        let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM tokenserver_access_tokens")
            .fetch_one(&store.pool)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(rows, 5);
        drop(store);
        db.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_table_of_the_old_layout_is_clustered_by_application_and_keeps_its_tokens() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let pool = MySqlPool::connect(&crate::mysql::normalise_url(&db.url)).await.unwrap_or_else(|e| panic!("{e}"));
        let old =
            SCHEMA.replace("PRIMARY KEY (service, app_id, token_hash)", "PRIMARY KEY (service, token_hash)").replace(
                "UNIQUE KEY tokenserver_access_token_key (service, token_hash)",
                "KEY tokenserver_access_app_idx (service, app_id, token_hash)",
            );
        sqlx::query(&old).execute(&pool).await.unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        for (token, app) in [("t1", "a"), ("t2", "b"), ("t3", "a")] {
            bind_row(sqlx::query(INSERT), &job("s", token, app, None, now))
                .execute(&pool)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        }
        assert!(has_old_layout(&pool).await.unwrap_or_else(|e| panic!("{e}")));

        let store = MySqlAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let primary: Vec<String> = sqlx::query_scalar(
            "SELECT CAST(COLUMN_NAME AS CHAR) FROM information_schema.STATISTICS WHERE TABLE_SCHEMA = DATABASE() \
             AND TABLE_NAME = 'tokenserver_access_tokens' AND INDEX_NAME = 'PRIMARY' ORDER BY SEQ_IN_INDEX",
        )
        .fetch_all(&pool)
        .await
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(primary, ["service", "app_id", "token_hash"]);
        assert!(!has_old_layout(&pool).await.unwrap_or_else(|e| panic!("{e}")));
        let want = [Some("a"), Some("b"), Some("a")].map(|a| a.map(str::to_string));
        assert_eq!(apps_of(&store, &[("s", "t1"), ("s", "t2"), ("s", "t3")], now).await, want);
        // Tokens stay unique per service once the application leads the primary key.
        let t2 = NewToken { service: "s", token: "t2", app_id: "c", user_id: None, expires_at: None, now };
        assert!(matches!(store.create(&t2).await, Err(StoreError::AlreadyExists(_))));
        assert_eq!(
            crate::testing::first_page_sorted(&store, "s", "a", now).await.unwrap_or_else(|e| panic!("{e}")),
            ["t1", "t3"]
        );
        // A second start finds the new layout and leaves it as it is.
        drop(MySqlAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}")));
        assert!(!has_old_layout(&pool).await.unwrap_or_else(|e| panic!("{e}")));
        assert_eq!(apps_of(&store, &[("s", "t1"), ("s", "t2"), ("s", "t3")], now).await, want);
        drop(store);
        pool.close().await;
        db.drop_now().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn batches_sharing_tokens_in_opposite_orders_each_end_with_one_winner() {
        let Some(db) = crate::testing::fresh(crate::Backend::MySql).await else { return };
        let store = MySqlAccess::open(&db.url, &PoolSettings::default()).await.unwrap_or_else(|e| panic!("{e}"));
        let now = 1_800_000_000_000;
        for round in 0..40 {
            let (x, y) = (format!("x-{round}"), format!("y-{round}"));
            let one = vec![job("s", &x, "one", None, now), job("s", &y, "one", None, now)];
            let other = vec![job("s", &y, "other", None, now), job("s", &x, "other", None, now)];
            let (one, other) =
                tokio::join!(create_many(store.pool.clone(), one), create_many(store.pool.clone(), other));
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
