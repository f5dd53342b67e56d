//! `StoreError`: what a storage call can fail with, independent of the backend.

/// A storage failure. The HTTP layer maps each to a status; driver text never reaches a client.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or the pool is exhausted: retry later (503).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// No node can take a new user (503, catalogue U2).
    #[error("unable to get a node")]
    NoNodeAvailable,
    /// The service row is missing from `services` (500, catalogue U3).
    #[error("unknown service {0:?}")]
    UnknownService(String),
    /// Another writer changed the rows this call was based on; re-read and retry.
    #[error("concurrent update, retry")]
    Conflict,
    /// The row to change does not exist.
    #[error("not found: {0}")]
    NotFound(String),
    /// The row to create already exists.
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// The call took longer than the caller allowed (the request's database timeout).
    #[error("database call timed out")]
    Timeout,
    /// The caller stopped waiting before the write committed: it was rolled back. Nobody reads
    /// this answer; it ends the write's own task.
    #[error("the caller went away before the write committed; rolled back")]
    Abandoned,
    /// The store holds as much as it is configured to (503).
    #[error("the store is full: {0}")]
    Full(String),
    /// A value the caller passed makes no sense to the store (e.g. a cursor it did not make).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// A bad URL or setting.
    #[error("{0}")]
    Config(String),
    /// Anything else the database said (500).
    #[error("database error: {0}")]
    Backend(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => Self::Unavailable(e.to_string()),
            sqlx::Error::Database(db) if db.is_unique_violation() => Self::AlreadyExists(db.message().to_string()),
            sqlx::Error::Database(db) => match (db.code().as_deref(), mysql_number(db.as_ref())) {
                // PostgreSQL serialization failure / deadlock; MySQL deadlock (SQLSTATE 40001).
                (Some("40001" | "40P01"), _) => Self::Conflict,
                // SQLITE_BUSY / SQLITE_LOCKED (another process holds the write lock past
                // busy_timeout); PostgreSQL's shutdown classes.
                (Some("5" | "6" | "517" | "57P01" | "57P02" | "57P03"), _) => {
                    Self::Unavailable(db.message().to_string())
                }
                // Connection exceptions (PostgreSQL, and MySQL's 08S01 for a server shutting down).
                (Some(code), _) if code.starts_with("08") => Self::Unavailable(db.message().to_string()),
                // MySQL's lock wait timeout, and a session the server ended (killed, or idle past
                // its timeout), under the generic SQLSTATE HY000 or 70100: by number.
                (_, Some(MYSQL_LOCK_WAIT_TIMEOUT | MYSQL_CONNECTION_KILLED | MYSQL_CLIENT_TIMED_OUT)) => {
                    Self::Unavailable(db.message().to_string())
                }
                _ => Self::Backend(e.to_string()),
            },
            _ => Self::Backend(e.to_string()),
        }
    }
}

/// MySQL / MariaDB error numbers the mapping above needs.
pub(crate) const MYSQL_LOCK_WAIT_TIMEOUT: u16 = 1205;
/// MariaDB's `ER_CONNECTION_KILLED`.
pub(crate) const MYSQL_CONNECTION_KILLED: u16 = 1927;
/// MySQL 8's `ER_CLIENT_INTERACTION_TIMEOUT`.
pub(crate) const MYSQL_CLIENT_TIMED_OUT: u16 = 4031;

/// The MySQL / MariaDB error number of a database error, if it is one.
pub(crate) fn mysql_number(db: &dyn sqlx::error::DatabaseError) -> Option<u16> {
    db.try_downcast_ref::<sqlx::mysql::MySqlDatabaseError>().map(|e| e.number())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::{Connection, MySqlConnection};

    use super::*;

    /// A row locked past `innodb_lock_wait_timeout` is the database being busy (503), not a
    /// failure of the statement (500).
    #[tokio::test]
    async fn a_mysql_lock_wait_timeout_is_unavailable() {
        let Ok(url) = std::env::var("TOKENSERVER_TEST_MYSQL_URL") else {
            eprintln!("TOKENSERVER_TEST_MYSQL_URL unset: skipped");
            return;
        };
        let table = format!("lock_wait_{}", std::process::id());
        let mut holder = MySqlConnection::connect(&url).await.expect("connect");
        let mut waiter = MySqlConnection::connect(&url).await.expect("connect");
        sqlx::query(&format!("CREATE TABLE {table} (id INT PRIMARY KEY) ENGINE=InnoDB"))
            .execute(&mut holder)
            .await
            .expect("create");
        sqlx::query(&format!("INSERT INTO {table} VALUES (1)")).execute(&mut holder).await.expect("insert");
        let mut tx = holder.begin().await.expect("begin");
        sqlx::query(&format!("SELECT id FROM {table} WHERE id = 1 FOR UPDATE")).execute(&mut *tx).await.expect("lock");
        sqlx::query("SET SESSION innodb_lock_wait_timeout = 1").execute(&mut waiter).await.expect("set");
        let waited = tokio::time::timeout(
            Duration::from_secs(30),
            sqlx::query(&format!("UPDATE {table} SET id = 2 WHERE id = 1")).execute(&mut waiter),
        )
        .await
        .expect("the wait ends");
        let err = StoreError::from(waited.expect_err("lock wait timeout"));
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        tx.rollback().await.expect("rollback");
        sqlx::query(&format!("DROP TABLE {table}")).execute(&mut waiter).await.expect("drop");
    }
}
