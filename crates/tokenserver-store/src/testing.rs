//! Test support: a fresh, isolated store URL per test on every backend.
//!
//! PostgreSQL tests get their own schema inside `TOKENSERVER_TEST_POSTGRES_URL`'s database,
//! MySQL tests their own database on `TOKENSERVER_TEST_MYSQL_URL`'s server, Redis and Redis
//! Cluster tests their own key prefix, SQLite tests a file in a temporary directory (or an
//! in-memory database, [`sqlite_in_memory`]). When a variable is unset the backend is skipped with
//! a printed notice; when it is set and the server is unreachable, the test fails (CI must never
//! skip silently).

use std::str::FromStr;

use sqlx::Connection;

use crate::Backend;

/// The tokens of the first page (up to 10) of application `app_id` of `service`, sorted: what a
/// layout test checks after a store has reshaped a table of an earlier version.
pub async fn first_page_sorted(
    store: &dyn crate::access::AccessStore,
    service: &str,
    app_id: &str,
    now: u64,
) -> crate::access::Result<Vec<String>> {
    let listing = crate::access::Listing { service, app_id, user_id: None, after: None, limit: 10, now };
    let mut listed: Vec<String> = store.list(&listing).await?.tokens.into_iter().map(|t| t.token).collect();
    listed.sort();
    Ok(listed)
}

/// The plan PostgreSQL gives `sql` prepared on `conn` as `name (types)`, for the call
/// `name (args)`, as `EXPLAIN`'s lines joined: what a plan test checks (with
/// `plan_cache_mode = force_generic_plan` set on `conn`, the plan it would keep).
pub async fn prepared_plan(
    conn: &mut sqlx::PgConnection,
    name: &str,
    types: &str,
    sql: &str,
    args: &str,
) -> Result<String, sqlx::Error> {
    sqlx::raw_sql(&format!("PREPARE {name} ({types}) AS {sql}")).execute(&mut *conn).await?;
    kept_plan(conn, name, args).await
}

/// The plan of the statement prepared on `conn` as `name` (by `PREPARE`, or by the driver), for
/// the call `name (args)`, as `EXPLAIN`'s lines joined.
pub async fn kept_plan(conn: &mut sqlx::PgConnection, name: &str, args: &str) -> Result<String, sqlx::Error> {
    let explain = format!("EXPLAIN EXECUTE {name} ({args})");
    let lines: Vec<String> = sqlx::query_scalar(&explain).fetch_all(conn).await?;
    Ok(lines.join("\n"))
}

/// A database created for one test; dropped (best effort) by [`FreshDb::drop_now`].
#[derive(Debug, Clone)]
pub struct FreshDb {
    /// URL to give the store / server.
    pub url: String,
    /// Which backend.
    pub backend: Backend,
    /// Schema (PostgreSQL) or database (MySQL) name, or the SQLite directory.
    pub name: String,
    admin_url: String,
}

fn unique(prefix: &str) -> String {
    format!("{prefix}{:016x}", rand::random::<u64>())
}

fn env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ => {
            eprintln!("skipped: {name} is not set");
            None
        }
    }
}

/// A SQLite database in memory (`sqlite::memory:`): gone with its store.
pub fn sqlite_in_memory() -> FreshDb {
    FreshDb { url: "sqlite::memory:".into(), backend: Backend::Sqlite, name: String::new(), admin_url: String::new() }
}

/// Creates a fresh database (or key prefix) for `backend`, or `None` (skipped) when its URL
/// variable is unset.
#[allow(clippy::panic)]
pub async fn fresh(backend: Backend) -> Option<FreshDb> {
    let nothing = String::new;
    match backend {
        Backend::Memory => Some(FreshDb { url: "memory:".into(), backend, name: nothing(), admin_url: nothing() }),
        Backend::Redis => {
            let url = env("TOKENSERVER_TEST_REDIS_URL")?;
            let sep = if url.contains('?') { '&' } else { '?' };
            let url = format!("{url}{sep}prefix={}:", unique("t"));
            Some(FreshDb { url, backend, name: nothing(), admin_url: nothing() })
        }
        Backend::RedisCluster => {
            let urls = env("TOKENSERVER_TEST_REDIS_CLUSTER_URLS")?;
            let url = format!("{}?prefix={}:", cluster_url(&urls), unique("t"));
            Some(FreshDb { url, backend, name: nothing(), admin_url: nothing() })
        }
        Backend::Sqlite => {
            let dir = std::env::temp_dir().join(unique("ts-sqlite-"));
            if let Err(e) = std::fs::create_dir_all(&dir) {
                panic!("cannot create {}: {e}", dir.display());
            }
            let url = format!("sqlite://{}/tokenserver.db", dir.display());
            Some(FreshDb { url, backend, name: dir.display().to_string(), admin_url: String::new() })
        }
        Backend::Postgres => {
            let admin_url = env("TOKENSERVER_TEST_POSTGRES_URL")?;
            let schema = unique("ts_");
            let mut conn = match sqlx::PgConnection::connect(&admin_url).await {
                Ok(c) => c,
                Err(e) => panic!("TOKENSERVER_TEST_POSTGRES_URL is set but unreachable: {e}"),
            };
            if let Err(e) = sqlx::query(&format!("CREATE SCHEMA {schema}")).execute(&mut conn).await {
                panic!("cannot create schema {schema}: {e}");
            }
            let sep = if admin_url.contains('?') { '&' } else { '?' };
            let url = format!("{admin_url}{sep}options=-c%20search_path%3D{schema}");
            Some(FreshDb { url, backend, name: schema, admin_url })
        }
        Backend::MySql => {
            let admin_url = env("TOKENSERVER_TEST_MYSQL_URL")?;
            let db = unique("tokenserver_t_");
            let mut conn = match sqlx::MySqlConnection::connect(&admin_url).await {
                Ok(c) => c,
                Err(e) => panic!("TOKENSERVER_TEST_MYSQL_URL is set but unreachable: {e}"),
            };
            if let Err(e) = sqlx::query(&format!("CREATE DATABASE {db}")).execute(&mut conn).await {
                panic!("cannot create database {db}: {e}");
            }
            let mut url = match url::Url::from_str(&admin_url) {
                Ok(u) => u,
                Err(e) => panic!("bad TOKENSERVER_TEST_MYSQL_URL: {e}"),
            };
            url.set_path(&format!("/{db}"));
            Some(FreshDb { url: url.to_string(), backend, name: db, admin_url })
        }
    }
}

impl FreshDb {
    /// Drops the schema / database / directory (Redis keys expire on their own).
    pub async fn drop_now(&self) {
        match self.backend {
            Backend::Memory => {}
            Backend::Redis | Backend::RedisCluster => {
                let _ = self.redis_keys(true).await;
            }
            Backend::Sqlite if self.name.is_empty() => {}
            Backend::Sqlite => {
                let _ = std::fs::remove_dir_all(&self.name);
            }
            Backend::Postgres => {
                if let Ok(mut c) = sqlx::PgConnection::connect(&self.admin_url).await {
                    let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {} CASCADE", self.name)).execute(&mut c).await;
                }
            }
            Backend::MySql => {
                if let Ok(mut c) = sqlx::MySqlConnection::connect(&self.admin_url).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {}", self.name)).execute(&mut c).await;
                }
            }
        }
    }
}

impl FreshDb {
    /// Every key under this database's Redis prefix, on every primary; deleted when `delete`.
    async fn redis_keys(&self, delete: bool) -> Result<Vec<String>, crate::StoreError> {
        let redis = crate::redis::Redis::connect(&self.url).await?;
        let mut found = Vec::new();
        for node in 0..redis.nodes.len() {
            let (mut conn, primary) = redis.node(node).await?;
            if !primary {
                continue;
            }
            let mut cursor = 0u64;
            loop {
                let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(format!("{}*", redis.prefix))
                    .arg("COUNT")
                    .arg(1000)
                    .query_async(&mut conn)
                    .await
                    .map_err(crate::redis::e)?;
                if delete && !keys.is_empty() {
                    // One key per DEL: a cluster node refuses keys of several slots in one.
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("DEL").arg(k).ignore();
                    }
                    let () = pipe.query_async(&mut conn).await.map_err(crate::redis::e)?;
                }
                found.extend(keys);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(found)
    }

    /// What the access-token store holds for this database, read from the store itself rather
    /// than through the trait: rows of the SQL table, or Redis keys of any service (every token
    /// hash and index set; the registry of service ids is not counted). `None` where there is
    /// nothing outside the process to read (an in-memory SQLite database).
    pub async fn access_entries(&self) -> Option<u64> {
        let count = "SELECT COUNT(*) FROM tokenserver_access_tokens";
        match self.backend {
            Backend::Memory => None,
            Backend::Sqlite if self.name.is_empty() => None,
            Backend::Sqlite => {
                let mut c = sqlx::SqliteConnection::connect(&self.url).await.ok()?;
                sqlx::query_scalar::<_, i64>(count).fetch_one(&mut c).await.ok().map(|n| n as u64)
            }
            Backend::Postgres => {
                let mut c = sqlx::PgConnection::connect(&self.url).await.ok()?;
                sqlx::query_scalar::<_, i64>(count).fetch_one(&mut c).await.ok().map(|n| n as u64)
            }
            Backend::MySql => {
                let mut c = sqlx::MySqlConnection::connect(&self.url).await.ok()?;
                sqlx::query_scalar::<_, i64>(count).fetch_one(&mut c).await.ok().map(|n| n as u64)
            }
            Backend::Redis | Backend::RedisCluster => {
                let keys = self.redis_keys(false).await.ok()?;
                Some(keys.iter().filter(|k| k.contains(":a:{")).count() as u64)
            }
        }
    }
}

/// `TOKENSERVER_TEST_REDIS_CLUSTER_URLS` (`redis://h:p,redis://h:p,…`) as one
/// `redis+cluster://h:p,h:p` URL.
pub fn cluster_url(urls: &str) -> String {
    let hosts: Vec<&str> = urls
        .split(',')
        .map(|u| u.trim().trim_start_matches("redis://").trim_end_matches('/'))
        .filter(|h| !h.is_empty())
        .collect();
    format!("redis+cluster://{}/", hosts.join(","))
}

/// A Redis server of its own for one test, started with `maxmemory` and the `noeviction` policy
/// (so that a test can fill it); stopped when dropped. `None` (skipped) when
/// `TOKENSERVER_TEST_REDIS_URL` is unset; with it set, `redis-server` must be on the `PATH`.
#[derive(Debug)]
pub struct CappedRedis {
    /// `redis://127.0.0.1:<port>/`.
    pub url: String,
    child: std::process::Child,
}

impl CappedRedis {
    /// Starts the server and waits until it answers.
    #[allow(clippy::panic)]
    pub async fn start(maxmemory: &str) -> Option<Self> {
        env("TOKENSERVER_TEST_REDIS_URL")?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("a free port: {e}"))
            .port();
        let child = std::process::Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &port.to_string(), "--save", "", "--appendonly", "no"])
            .args(["--maxmemory", maxmemory, "--maxmemory-policy", "noeviction"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server: {e}"));
        let capped = Self { url: format!("redis://127.0.0.1:{port}/"), child };
        let client = redis::Client::open(capped.url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..100 {
            if let Ok(mut conn) = client.get_multiplexed_async_connection().await {
                if redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok() {
                    return Some(capped);
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("redis-server on port {port} did not answer");
    }

    /// Writes values until the server is past its `maxmemory` (one script: a script that starts
    /// under the limit runs to its end).
    #[allow(clippy::panic)]
    pub async fn fill(&self) {
        let client = redis::Client::open(self.url.as_str()).unwrap_or_else(|e| panic!("{e}"));
        let mut conn = client.get_multiplexed_async_connection().await.unwrap_or_else(|e| panic!("{e}"));
        let _: i64 = redis::cmd("EVAL")
            .arg(
                "local big = string.rep('x', 1000) \
                 for i = 1, 20000 do redis.call('SET', 'filler:' .. i, big) end return 1",
            )
            .arg(0)
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("fill: {e}"));
    }
}

impl Drop for CappedRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
