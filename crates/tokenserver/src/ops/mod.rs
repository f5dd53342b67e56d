//! Operations shared by the CLI and the internal API, so both behave identically.

pub mod access_import;
pub mod account;
pub mod bucket;
pub mod node;
pub mod purge;
pub mod user;

use tokenserver_store::StoreError;

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Bad input from the operator: the API's error code and the message.
    #[error("{1}")]
    Invalid(&'static str, String),
    /// No such user.
    #[error("no user {0}")]
    UnknownUser(String),
    /// The store refused.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Now, in ms, as the store's columns keep it.
pub(crate) fn now_ms() -> i64 {
    i64::try_from(tokenserver_core::clock::now_ms()).unwrap_or(i64::MAX)
}
