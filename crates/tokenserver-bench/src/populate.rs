//! Fresh benchmark databases and bulk-loaded users (`bench<i>@bench.example`, generation 0,
//! empty client state, like Mozilla's `populate_db.py`).

use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, Executor, Row};

pub const DOMAIN: &str = "bench.example";
pub const NODE: &str = "https://node.bench.example";

/// A database the harness owns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
    MySql,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Sqlite => "SQLite",
            Backend::Postgres => "PostgreSQL",
            Backend::MySql => "MariaDB",
        }
    }
}

/// Creates an empty database and returns its URL. `admin` is the server URL for PostgreSQL /
/// MySQL (a database `tokenserver_bench` is dropped and re-created there), a directory for SQLite.
pub async fn fresh_database(backend: Backend, admin: &str) -> Result<String, String> {
    let e = |e: sqlx::Error| e.to_string();
    match backend {
        Backend::Sqlite => {
            let path = std::path::Path::new(admin).join("bench.db");
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
            }
            Ok(format!("sqlite://{}", path.display()))
        }
        Backend::Postgres => {
            let mut c = sqlx::PgConnection::connect(admin).await.map_err(e)?;
            c.execute("DROP DATABASE IF EXISTS tokenserver_bench WITH (FORCE)").await.map_err(e)?;
            c.execute("CREATE DATABASE tokenserver_bench").await.map_err(e)?;
            let mut url = url::Url::parse(admin).map_err(|e| e.to_string())?;
            url.set_path("/tokenserver_bench");
            Ok(url.to_string())
        }
        Backend::MySql => {
            let mut c = sqlx::MySqlConnection::connect(admin).await.map_err(e)?;
            c.execute("DROP DATABASE IF EXISTS tokenserver_bench").await.map_err(e)?;
            c.execute("CREATE DATABASE tokenserver_bench").await.map_err(e)?;
            let mut url = url::Url::parse(admin).map_err(|e| e.to_string())?;
            url.set_path("/tokenserver_bench");
            Ok(url.to_string())
        }
    }
}

const BATCH: u64 = 5_000;

/// Inserts users `bench<from>` .. `bench<to - 1>` on the bench node, in batches.
pub async fn users(backend: Backend, url: &str, from: u64, to: u64) -> Result<(), String> {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as i64);
    let ids = "SELECT CAST(s.id AS CHAR(20)), CAST(n.id AS CHAR(20)) FROM services s, nodes n \
               WHERE s.service = 'sync-1.5' AND n.node = 'https://node.bench.example'";
    let ids_pg = ids.replace("CHAR(20)", "TEXT");
    let batches = |svc: &str, node: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut i = from;
        while i < to {
            let end = (i + BATCH).min(to);
            let values: Vec<String> =
                (i..end).map(|k| format!("({svc},'bench{k}@{DOMAIN}',0,'',{now},{node})")).collect();
            out.push(format!(
                "INSERT INTO users (service, email, generation, client_state, created_at, nodeid) VALUES {}",
                values.join(",")
            ));
            i = end;
        }
        out
    };
    let e = |e: sqlx::Error| e.to_string();
    macro_rules! load {
        ($conn:ty, $ids:expr, $begin:expr) => {{
            let mut c = <$conn>::connect(url).await.map_err(e)?;
            let row = sqlx::query($ids).fetch_one(&mut c).await.map_err(e)?;
            let (svc, node): (String, String) = (row.try_get(0).map_err(e)?, row.try_get(1).map_err(e)?);
            c.execute($begin).await.map_err(e)?;
            for stmt in batches(&svc, &node) {
                c.execute(stmt.as_str()).await.map_err(e)?;
            }
            c.execute("COMMIT").await.map_err(e)?;
        }};
    }
    match backend {
        Backend::Sqlite => load!(sqlx::SqliteConnection, ids.replace("CHAR(20)", "TEXT").as_str(), "BEGIN"),
        Backend::Postgres => load!(sqlx::PgConnection, ids_pg.as_str(), "BEGIN"),
        Backend::MySql => load!(sqlx::MySqlConnection, ids, "START TRANSACTION"),
    }
    analyze(backend, url).await
}

/// Refreshes planner statistics on PostgreSQL and MariaDB, as a live database has them. Without
/// them PostgreSQL plans a user lookup through `replaced_at_idx` (every user of the service)
/// instead of `lookup_idx`.
async fn analyze(backend: Backend, url: &str) -> Result<(), String> {
    let e = |e: sqlx::Error| e.to_string();
    match backend {
        // Not SQLite: its bundled build has STAT4, and with `sqlite_stat4` present every statement
        // whose parameters change is re-prepared (43% of a request's CPU, profiled). Its
        // statements are pinned to the right indexes without statistics.
        Backend::Sqlite => {}
        Backend::Postgres => {
            sqlx::PgConnection::connect(url).await.map_err(e)?.execute("ANALYZE").await.map_err(e)?;
        }
        Backend::MySql => {
            let mut c = sqlx::MySqlConnection::connect(url).await.map_err(e)?;
            c.execute("ANALYZE TABLE users, nodes, services").await.map_err(e)?;
        }
    }
    Ok(())
}
