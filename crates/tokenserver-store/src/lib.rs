//! Storage for tokenserver: one trait per token family, and the backends that implement it.
//!
//! The Sync family stores Mozilla's node-assignment schema (`services`, `nodes`, `users`). Every
//! read-modify-write is one trait method that the backend makes atomic; callers never build one
//! from several calls. Backends are chosen by URL ([`open`]).

mod alloc_queue;
mod caller;
pub mod error;
mod migrate;
pub mod mysql;
pub mod postgres;
mod read_pool;
pub mod session;
mod sql_backend;
pub mod sqlite;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;
mod tx;

use std::sync::Arc;
use std::time::Duration;

pub use error::StoreError;
pub use session::SessionStore;
pub use sync::SyncStore;

/// Connection settings shared by every backend.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    /// Maximum connections.
    pub max_size: u32,
    /// How long a request waits for a pooled connection.
    pub connection_timeout: Duration,
    /// How durable a SQLite commit is.
    pub sqlite_durability: sqlite::Durability,
}

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: 10,
            connection_timeout: Duration::from_secs(30),
            sqlite_durability: sqlite::Durability::default(),
        }
    }
}

/// Connections idle longer than this are pinged before use: after an outage they are found dead
/// and replaced, while under load (connections never idle that long) no request pays a ping.
const PING_IF_IDLE_FOR: Duration = Duration::from_secs(1);

/// Pool options for a networked database (PostgreSQL, MySQL): sized and timed by `settings`,
/// pinging only connections that sat idle (sqlx's default pings before every acquire, a round
/// trip per request).
pub(crate) fn network_pool<DB: sqlx::Database>(settings: &PoolSettings) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(settings.max_size)
        .acquire_timeout(settings.connection_timeout)
        .test_before_acquire(false)
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for > PING_IF_IDLE_FOR {
                    sqlx::Connection::ping(conn).await?;
                }
                Ok(true)
            })
        })
}

/// The backend a database URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:` URLs (the default, embedded).
    Sqlite,
    /// `postgres://` and `postgresql://`.
    Postgres,
    /// `mysql://` (MySQL and MariaDB).
    MySql,
}

impl Backend {
    /// Recognises the URL scheme.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" => Ok(Self::MySql),
            _ => Err(StoreError::Config(format!(
                "unsupported database URL scheme {scheme:?}: use sqlite:, postgres:// or mysql://"
            ))),
        }
    }
}

/// Opens the Sync store named by `url`.
pub async fn open_sync(url: &str, pool: &PoolSettings) -> Result<Arc<dyn SyncStore>, StoreError> {
    match Backend::from_url(url)? {
        Backend::Sqlite => {
            Ok(Arc::new(sqlite::SqliteStore::open(url, pool.max_size as usize, pool.sqlite_durability).await?))
        }
        Backend::Postgres => Ok(Arc::new(postgres::PgStore::open(url, pool).await?)),
        Backend::MySql => Ok(Arc::new(mysql::MySqlStore::open(url, pool).await?)),
    }
}

/// A `users` row for unit tests of the code that passes rows around.
#[cfg(test)]
pub(crate) fn test_row(uid: i64) -> tokenserver_core::sync::users::UserRow {
    tokenserver_core::sync::users::UserRow {
        uid,
        node_id: Some(1),
        node: Some("https://n".into()),
        generation: 0,
        keys_changed_at: None,
        client_state: String::new(),
        created_at: 0,
        replaced_at: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_schemes() {
        assert_eq!(Backend::from_url("sqlite://tokenserver.db").ok(), Some(Backend::Sqlite));
        assert_eq!(Backend::from_url("sqlite::memory:").ok(), Some(Backend::Sqlite));
        assert_eq!(Backend::from_url("postgres://u:p@h/db").ok(), Some(Backend::Postgres));
        assert_eq!(Backend::from_url("postgresql:///tokenserver?host=/run/postgresql").ok(), Some(Backend::Postgres));
        assert_eq!(
            Backend::from_url("mysql://u@localhost/db?socket=/run/mysqld/mysqld.sock").ok(),
            Some(Backend::MySql)
        );
        assert!(Backend::from_url("redis://x").is_err());
        assert!(Backend::from_url("nonsense").is_err());
    }
}
