//! Storage for tokenserver: one trait per token family at the root ([`sync`], [`session`],
//! [`access`]), and
//! the backends that implement them, one folder each with one file per family it holds:
//!
//! | backend | URL | families |
//! |---|---|---|
//! | [`sqlite`] | `sqlite://path`, `sqlite::memory:` | Sync, sessions, access tokens |
//! | [`postgres`] | `postgres://…`, `postgresql://…` | Sync, sessions, access tokens |
//! | [`mysql`] | `mysql://…` (MySQL, MariaDB) | Sync, access tokens |
//! | [`redis`] | `redis://…`, `rediss://…`, `redis+cluster://h:p,h:p/` | sessions, access tokens |
//! | [`memory`] | `memory:` | sessions |
//!
//! What the SQL backends share (the Sync transactions, migrations, the allocation queue, the
//! read pool, the SQL each must provide) is in [`sql`]. Every read-modify-write is one trait
//! method that the backend makes atomic; callers never build one from several calls. A URL is
//! parsed once ([`Backend::from_url`]) and opened once ([`open`]), for every family asked of it.

// The module docs are written for whoever works on the store and link its private parts (the
// batcher, the group writer, the scripts); `cargo doc --document-private-items` renders them.
#![allow(rustdoc::private_intra_doc_links)]

pub mod access;
mod batch;
mod caller;
pub mod error;
pub mod memory;
pub mod mysql;
pub mod postgres;
mod ready;
pub mod redis;
pub mod session;
pub mod sql;
pub mod sqlite;
pub mod sync;
#[cfg(feature = "testing")]
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

pub use access::AccessStore;
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
    /// Connections of an access-token store's listings (PostgreSQL, MySQL): pages read at once.
    pub listing_connections: u32,
}

/// [`PoolSettings::listing_connections`] by default. A page is a whole index range read back to
/// back, so each listing holds a database core while it runs; more at once than the database
/// has cores only moves the queue into the database, where it is not first come first served.
/// On the 2-core benchmark host four against ten cut PostgreSQL's p99 of a page by a tenth or
/// more in most runs, for about 4% fewer pages a second (bench/results/host-2026-12-07-q.md;
/// hosts b and f alike).
pub const LISTING_CONNECTIONS: u32 = 4;

impl Default for PoolSettings {
    fn default() -> Self {
        Self {
            max_size: 10,
            connection_timeout: Duration::from_secs(30),
            sqlite_durability: sqlite::Durability::default(),
            listing_connections: LISTING_CONNECTIONS,
        }
    }
}

impl PoolSettings {
    /// The settings of an access-token store's listing pool.
    pub(crate) fn for_listings(&self) -> PoolSettings {
        PoolSettings { max_size: self.listing_connections, ..self.clone() }
    }
}

/// Everything a store is opened with.
#[derive(Debug, Clone, Default)]
pub struct StoreSettings {
    /// Connections (PostgreSQL, MySQL), read connections and durability (SQLite).
    pub pool: PoolSettings,
    /// The in-process session store's layout and bound.
    pub memory: memory::MemoryOptions,
}

/// A token family, as asked of [`open`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Sync node assignment.
    Sync,
    /// Session tokens.
    Sessions,
    /// Access tokens.
    Access,
}

impl std::fmt::Display for Family {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Family::Sync => "Sync node assignment",
            Family::Sessions => "session tokens",
            Family::Access => "access tokens",
        })
    }
}

/// The backend a store URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// `sqlite:` (the default, embedded).
    Sqlite,
    /// `postgres://` and `postgresql://`.
    Postgres,
    /// `mysql://` (MySQL and MariaDB).
    MySql,
    /// `redis://` / `rediss://`.
    Redis,
    /// `redis+cluster://host:port,host:port/`.
    RedisCluster,
    /// `memory:` (in process, lost on restart).
    Memory,
}

impl Backend {
    /// Recognises the URL scheme.
    pub fn from_url(url: &str) -> Result<Self, StoreError> {
        let scheme = url.split_once(':').map(|(s, _)| s.to_ascii_lowercase()).unwrap_or_default();
        match scheme.as_str() {
            "sqlite" => Ok(Self::Sqlite),
            "postgres" | "postgresql" => Ok(Self::Postgres),
            "mysql" => Ok(Self::MySql),
            "redis" | "rediss" => Ok(Self::Redis),
            "redis+cluster" | "rediss+cluster" => Ok(Self::RedisCluster),
            "memory" => Ok(Self::Memory),
            _ => Err(StoreError::Config(format!(
                "unsupported store URL scheme {scheme:?}: use sqlite:, postgres://, mysql://, redis://, \
                 redis+cluster:// or memory:"
            ))),
        }
    }

    /// Whether this backend holds `family`.
    pub fn holds(self, family: Family) -> bool {
        match family {
            Family::Sync => matches!(self, Self::Sqlite | Self::Postgres | Self::MySql),
            Family::Sessions => !matches!(self, Self::MySql),
            Family::Access => !matches!(self, Self::Memory),
        }
    }

    /// The backends that hold `family`, for messages.
    pub fn holding(family: Family) -> &'static str {
        match family {
            Family::Sync => "sqlite:, postgres:// or mysql://",
            Family::Sessions => "sqlite:, postgres://, redis://, redis+cluster:// or memory:",
            Family::Access => "sqlite:, postgres://, mysql://, redis:// or redis+cluster://",
        }
    }
}

/// The stores [`open`] made, one per family asked for.
#[derive(Default)]
pub struct Stores {
    /// Sync node assignment.
    pub sync: Option<Arc<dyn SyncStore>>,
    /// Session tokens.
    pub sessions: Option<Arc<dyn SessionStore>>,
    /// Access tokens.
    pub access: Option<Arc<dyn AccessStore>>,
}

/// Opens `url` once for every family in `families`: on SQLite, Sync and sessions in one file
/// share one writer. Fails with [`StoreError::Config`] when the backend does not hold a family.
pub async fn open(url: &str, settings: &StoreSettings, families: &[Family]) -> Result<Stores, StoreError> {
    let backend = Backend::from_url(url)?;
    if let Some(family) = families.iter().find(|f| !backend.holds(**f)) {
        return Err(StoreError::Config(format!(
            "{backend:?} does not hold {family}; use {}",
            Backend::holding(*family)
        )));
    }
    let wants = |family| families.contains(&family);
    let mut stores = Stores::default();
    let pool = &settings.pool;
    match backend {
        Backend::Sqlite => {
            let writer = if wants(Family::Sync) {
                "sync-writer"
            } else if wants(Family::Sessions) {
                "session-writer"
            } else {
                "access-writer"
            };
            let db = sqlite::SqliteStore::open(url, writer, pool.max_size as usize, pool.sqlite_durability).await?;
            if wants(Family::Sessions) {
                stores.sessions = Some(Arc::new(sqlite::session::SqliteSessions::on(&db).await?));
            }
            if wants(Family::Access) {
                stores.access = Some(Arc::new(sqlite::access::SqliteAccess::on(&db).await?));
            }
            if wants(Family::Sync) {
                stores.sync = Some(Arc::new(db));
            }
        }
        Backend::Postgres => {
            if wants(Family::Sync) {
                stores.sync = Some(Arc::new(postgres::PgStore::open(url, pool).await?));
            }
            if wants(Family::Sessions) {
                stores.sessions = Some(Arc::new(postgres::session::PgSessions::open(url, pool).await?));
            }
            if wants(Family::Access) {
                stores.access = Some(Arc::new(postgres::access::PgAccess::open(url, pool).await?));
            }
        }
        Backend::MySql => {
            if wants(Family::Sync) {
                stores.sync = Some(Arc::new(mysql::MySqlStore::open(url, pool).await?));
            }
            if wants(Family::Access) {
                stores.access = Some(Arc::new(mysql::access::MySqlAccess::open(url, pool).await?));
            }
        }
        Backend::Redis | Backend::RedisCluster => {
            if wants(Family::Sessions) {
                stores.sessions = Some(Arc::new(redis::session::RedisSessions::open(url).await?));
            }
            if wants(Family::Access) {
                stores.access = Some(Arc::new(redis::access::RedisAccess::open(url).await?));
            }
        }
        Backend::Memory => {
            if wants(Family::Sessions) {
                stores.sessions = Some(Arc::new(memory::session::MemorySessions::with_options(settings.memory)));
            }
        }
    }
    Ok(stores)
}

/// The Sync store `url` names (a shorthand of [`open`]).
pub async fn open_sync(url: &str, settings: &StoreSettings) -> Result<Arc<dyn SyncStore>, StoreError> {
    open(url, settings, &[Family::Sync]).await?.sync.ok_or_else(|| StoreError::Config("no Sync store".into()))
}

/// The session store `url` names (a shorthand of [`open`]).
pub async fn open_sessions(url: &str, settings: &StoreSettings) -> Result<Arc<dyn SessionStore>, StoreError> {
    open(url, settings, &[Family::Sessions])
        .await?
        .sessions
        .ok_or_else(|| StoreError::Config("no session store".into()))
}

/// Runs `batch(max)` until it returns fewer than `max`; returns the sum (a purge or revocation
/// in bounded steps).
pub(crate) async fn in_batches<F, Fut>(max: u64, mut batch: F) -> Result<u64, StoreError>
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let n = batch(max).await?;
        total += n;
        if n < max {
            return Ok(total);
        }
    }
}

/// The hash a SQL store's page starts after: the hex cursor of the page before, or the lowest
/// hash (empty) for the first page.
pub(crate) fn hash_cursor(after: Option<&str>) -> Result<Vec<u8>, StoreError> {
    match after {
        None => Ok(Vec::new()),
        Some(cursor) => hex::decode(cursor)
            .ok()
            .filter(|h| h.len() == 32)
            .ok_or_else(|| StoreError::InvalidInput("not a cursor of this store".into())),
    }
}

/// The access-token store `url` names (a shorthand of [`open`]).
pub async fn open_access(url: &str, settings: &StoreSettings) -> Result<Arc<dyn AccessStore>, StoreError> {
    open(url, settings, &[Family::Access])
        .await?
        .access
        .ok_or_else(|| StoreError::Config("no access-token store".into()))
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
    fn the_listing_pool_takes_its_own_size_and_the_rest_of_the_settings() {
        let settings = PoolSettings { max_size: 32, connection_timeout: Duration::from_secs(3), ..Default::default() };
        assert_eq!(settings.listing_connections, LISTING_CONNECTIONS);
        let listings = PoolSettings { listing_connections: 6, ..settings }.for_listings();
        assert_eq!((listings.max_size, listings.connection_timeout), (6, Duration::from_secs(3)));
    }

    #[test]
    fn url_schemes() {
        let cases = [
            ("sqlite://tokenserver.db", Backend::Sqlite),
            ("sqlite::memory:", Backend::Sqlite),
            ("postgres://u:p@h/db", Backend::Postgres),
            ("postgresql:///tokenserver?host=/run/postgresql", Backend::Postgres),
            ("mysql://u@localhost/db?socket=/run/mysqld/mysqld.sock", Backend::MySql),
            ("redis://127.0.0.1/", Backend::Redis),
            ("rediss://h:6380/0", Backend::Redis),
            ("redis+cluster://127.0.0.1:7001,127.0.0.1:7002", Backend::RedisCluster),
            ("memory:", Backend::Memory),
        ];
        for (url, backend) in cases {
            assert_eq!(Backend::from_url(url).ok(), Some(backend), "{url}");
        }
        assert!(Backend::from_url("nonsense").is_err());
        assert!(Backend::from_url("ftp://x").is_err());
    }

    #[test]
    fn families_each_backend_holds() {
        assert!(Backend::Sqlite.holds(Family::Sync) && Backend::Sqlite.holds(Family::Sessions));
        assert!(Backend::MySql.holds(Family::Sync) && !Backend::MySql.holds(Family::Sessions));
        assert!(!Backend::Redis.holds(Family::Sync) && Backend::RedisCluster.holds(Family::Sessions));
        assert!(!Backend::Memory.holds(Family::Sync) && Backend::Memory.holds(Family::Sessions));
    }

    #[tokio::test]
    async fn a_family_the_backend_does_not_hold_is_a_configuration_error() {
        let err = open("mysql://root@127.0.0.1:1/x", &StoreSettings::default(), &[Family::Sessions]).await.err();
        assert!(
            matches!(&err, Some(StoreError::Config(m)) if m.contains("session tokens")),
            "{:?}",
            err.map(|e| e.to_string())
        );
        let err = open("memory:", &StoreSettings::default(), &[Family::Sync]).await.err();
        assert!(matches!(err, Some(StoreError::Config(_))));
    }
}
