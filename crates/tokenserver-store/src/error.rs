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
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // PostgreSQL serialization failure / deadlock; MySQL deadlock: retry.
                Some("40001" | "40P01" | "1213") => Self::Conflict,
                // SQLITE_BUSY / SQLITE_LOCKED (another process holds the write lock past
                // busy_timeout); PostgreSQL connection and shutdown classes; MySQL lock wait timeout.
                Some("5" | "6" | "517" | "57P01" | "57P02" | "57P03" | "1205") => {
                    Self::Unavailable(db.message().to_string())
                }
                Some(code) if code.starts_with("08") => Self::Unavailable(db.message().to_string()),
                _ => Self::Backend(e.to_string()),
            },
            _ => Self::Backend(e.to_string()),
        }
    }
}
