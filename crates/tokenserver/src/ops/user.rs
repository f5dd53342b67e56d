//! User operations: look a user up (by email or uid) with its history, put a user on a named
//! node, and count users (Mozilla's `count_users`). Used by the CLI (`tokenserver user …`) and
//! the internal API (`/v1/services/{service}/users/…`, `/v1/count_users`).

use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use tokenserver_core::sync::users::{resolve, Status, UserRow};
use tokenserver_store::SyncStore;

use super::OpsError;

/// A user as an operator names it: `<fxa_uid>@<domain>`, or a row's uid (all digits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserRef {
    /// By email.
    Email(String),
    /// By the uid of one of its rows.
    Uid(i64),
}

impl UserRef {
    /// All digits is a uid; anything else an email.
    pub fn parse(s: &str) -> Self {
        match s.parse::<i64>() {
            Ok(uid) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => Self::Uid(uid),
            _ => Self::Email(s.to_string()),
        }
    }
}

impl std::fmt::Display for UserRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Email(e) => write!(f, "{e:?}"),
            Self::Uid(uid) => write!(f, "with uid {uid}"),
        }
    }
}

/// One `users` row, as operators see it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RowView {
    /// `users.uid`.
    pub uid: i64,
    /// The node's URL; `None` when the node was removed.
    pub node: Option<String>,
    /// Generation.
    pub generation: i64,
    /// keys_changed_at.
    pub keys_changed_at: Option<i64>,
    /// Client state (hex).
    pub client_state: String,
    /// Created, ms.
    pub created_at: i64,
    /// Replaced, ms; `None` for a live row.
    pub replaced_at: Option<i64>,
}

impl From<&UserRow> for RowView {
    fn from(r: &UserRow) -> Self {
        Self {
            uid: r.uid,
            node: r.node.clone(),
            generation: r.generation,
            keys_changed_at: r.keys_changed_at,
            client_state: r.client_state.clone(),
            created_at: r.created_at,
            replaced_at: r.replaced_at,
        }
    }
}

/// A user's assignment and history.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserView {
    /// Service name.
    pub service: String,
    /// `<fxa_uid>@<domain>`.
    pub email: String,
    /// `assigned` (served from `current.node`), `needs_node` (given one on its next request) or
    /// `retired` (account deleted, nothing to serve).
    pub status: &'static str,
    /// The row the next token request is answered from.
    pub current: RowView,
    /// `created_at` of the oldest row kept.
    pub first_seen_at: i64,
    /// Every row kept (at most the 20 newest), newest first.
    pub history: Vec<RowView>,
}

fn view(service: &str, email: &str, rows: &[UserRow]) -> Option<UserView> {
    let resolved = resolve(rows)?;
    let status = match resolved.status {
        Status::Assigned if resolved.current.generation == tokenserver_core::sync::MAX_GENERATION => "retired",
        Status::Assigned => "assigned",
        Status::NeedsNode => "needs_node",
        Status::RetiredWithoutNode => "retired",
    };
    Some(UserView {
        service: service.to_string(),
        email: email.to_string(),
        status,
        current: RowView::from(&resolved.current),
        first_seen_at: resolved.first_seen_at,
        history: rows.iter().map(RowView::from).collect(),
    })
}

/// The user `who` of `service`, with its history.
pub async fn show(store: &dyn SyncStore, service: &str, who: &UserRef) -> Result<UserView, OpsError> {
    let email = match who {
        UserRef::Email(e) => e.clone(),
        UserRef::Uid(uid) => {
            store.user_email(service, *uid).await?.ok_or_else(|| OpsError::UnknownUser(who.to_string()))?
        }
    };
    let rows = store.user_rows(service, &email).await?;
    view(service, &email, &rows).ok_or_else(|| OpsError::UnknownUser(who.to_string()))
}

/// Puts the user `who` on the node `node` (created there when new: generation 0, no client
/// state); its other rows are replaced. Returns the user as it is afterwards.
pub async fn assign(store: &dyn SyncStore, service: &str, who: &UserRef, node: &str) -> Result<UserView, OpsError> {
    let email = match who {
        UserRef::Email(e) if e.contains('@') && e.len() <= 255 => e.clone(),
        UserRef::Email(e) => {
            return Err(OpsError::Invalid("invalid_user", format!("{e:?} is not <fxa_uid>@<domain>")));
        }
        UserRef::Uid(uid) => {
            store.user_email(service, *uid).await?.ok_or_else(|| OpsError::UnknownUser(who.to_string()))?
        }
    };
    store.assign_user(service, &email, node, super::now_ms()).await?;
    show(store, service, &UserRef::Email(email)).await
}

/// Mozilla's `count_users` answer, one JSON object (a heka-compatible line).
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct UserCount {
    /// This machine's host name.
    pub hostname: String,
    /// This process's id.
    pub pid: u32,
    /// Always `sync_count_users`.
    pub op: &'static str,
    /// Live rows created at or before `time`.
    pub total_users: i64,
    /// The timestamp counted to, RFC 3339 UTC.
    pub time: String,
    /// Always 0.
    pub v: u8,
}

/// The last UTC midnight at or before `now_ms` (Mozilla's default `count_users` timestamp is
/// the previous midnight).
pub fn previous_utc_midnight(now_ms: i64) -> i64 {
    const DAY_MS: i64 = 86_400_000;
    now_ms.div_euclid(DAY_MS) * DAY_MS
}

/// Counts live users created at or before `timestamp_ms` (default: the previous UTC midnight),
/// of one service or of all.
pub async fn count(
    store: &dyn SyncStore,
    service: Option<&str>,
    timestamp_ms: Option<i64>,
) -> Result<UserCount, OpsError> {
    let ts = timestamp_ms.unwrap_or_else(|| previous_utc_midnight(super::now_ms()));
    if ts < 0 {
        return Err(OpsError::Invalid("invalid_timestamp", format!("timestamp {ts} is before 1970")));
    }
    let total_users = store.count_users(service, ts).await?;
    let at = UNIX_EPOCH + Duration::from_millis(u64::try_from(ts).unwrap_or(0));
    Ok(UserCount {
        hostname: hostname(),
        pid: std::process::id(),
        op: "sync_count_users",
        total_users,
        time: humantime::format_rfc3339_seconds(at).to_string(),
        v: 0,
    })
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digits_are_a_uid_anything_else_an_email() {
        assert_eq!(UserRef::parse("123"), UserRef::Uid(123));
        assert_eq!(UserRef::parse("abc@x"), UserRef::Email("abc@x".into()));
        assert_eq!(UserRef::parse("-1"), UserRef::Email("-1".into()));
        assert_eq!(UserRef::parse("+1"), UserRef::Email("+1".into()));
        assert_eq!(UserRef::parse("99999999999999999999"), UserRef::Email("99999999999999999999".into()));
    }

    #[test]
    fn previous_midnight_is_utc_and_inclusive() {
        assert_eq!(previous_utc_midnight(0), 0);
        assert_eq!(previous_utc_midnight(86_399_999), 0);
        assert_eq!(previous_utc_midnight(86_400_000), 86_400_000);
        // 2026-12-03T11:49:20Z
        assert_eq!(previous_utc_midnight(1_796_298_560_000), 1_796_256_000_000);
    }
}
