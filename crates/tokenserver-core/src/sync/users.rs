//! Which of a user's assignment rows is current, and what that row needs (spec §4.4, §4.6).
//!
//! A user (email + service) owns many `users` rows over time. The current one has the highest
//! (`generation`, `created_at`), ties to the highest `uid`. Older rows must be marked replaced;
//! if they are not (two writers raced), they are marked now ("race recovery").

use super::MAX_GENERATION;

/// One `users` row joined with its node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserRow {
    /// `users.uid`.
    pub uid: i64,
    /// `nodes.id`, `None` when `users.nodeid` no longer joins to a node.
    pub node_id: Option<i64>,
    /// `nodes.node`, `None` likewise.
    pub node: Option<String>,
    /// ms.
    pub generation: i64,
    /// ms, SQL NULL → `None`.
    pub keys_changed_at: Option<i64>,
    /// Lowercase hex.
    pub client_state: String,
    /// ms.
    pub created_at: i64,
    /// ms, `None` for a live row.
    pub replaced_at: Option<i64>,
}

/// What the current row needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// It has a node and is live (or retired with a node): serve it.
    Assigned,
    /// It was replaced or lost its node: allocate a node, copying its account state.
    NeedsNode,
    /// Retired and nodeless: nothing can be served (U3).
    RetiredWithoutNode,
}

/// A user's rows, resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The current row.
    pub current: UserRow,
    /// What it needs.
    pub status: Status,
    /// Client states of older rows that differ from the current one (duplicates kept).
    pub old_client_states: Vec<String>,
    /// Older rows still live: mark them replaced at `current.created_at`.
    pub unreplaced_uids: Vec<i64>,
    /// `created_at` of the oldest row seen.
    pub first_seen_at: i64,
}

/// Resolves rows as read by `get_users` (newest `created_at` first, then highest `uid`).
/// Returns `None` for a user with no rows.
pub fn resolve(rows: &[UserRow]) -> Option<Resolved> {
    let mut sorted: Vec<&UserRow> = rows.iter().collect();
    // Stable sort: equal (generation, created_at) keep the SQL order, highest uid first.
    sorted.sort_by_key(|r| std::cmp::Reverse((r.generation, r.created_at)));
    let (current, older) = sorted.split_first()?;
    let old_client_states =
        older.iter().filter(|r| r.client_state != current.client_state).map(|r| r.client_state.clone()).collect();
    let unreplaced_uids = older.iter().filter(|r| r.replaced_at.is_none()).map(|r| r.uid).collect();
    // Mozilla takes the last row after sorting; the oldest `created_at` is what the name promises.
    let first_seen_at = rows.iter().map(|r| r.created_at).min().unwrap_or(current.created_at);
    let needs_node = current.replaced_at.is_some() || current.node.is_none();
    let status = if needs_node && current.generation < MAX_GENERATION {
        Status::NeedsNode
    } else if current.node.is_some() {
        Status::Assigned
    } else {
        Status::RetiredWithoutNode
    };
    Some(Resolved { current: (*current).clone(), status, old_client_states, unreplaced_uids, first_seen_at })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(uid: i64, generation: i64, cs: &str, created_at: i64, replaced_at: Option<i64>) -> UserRow {
        UserRow {
            uid,
            node_id: Some(1),
            node: Some("https://n".into()),
            generation,
            keys_changed_at: None,
            client_state: cs.into(),
            created_at,
            replaced_at,
        }
    }

    #[test]
    fn no_rows_is_a_new_user() {
        assert_eq!(resolve(&[]), None);
    }

    #[test]
    fn current_is_highest_generation_then_created_at_then_uid() {
        // SQL order: created_at desc, uid desc.
        let rows = [row(3, 1, "cc", 300, None), row(2, 5, "bb", 200, None), row(1, 5, "aa", 100, Some(150))];
        let r = resolve(&rows).unwrap_or_else(|| unreachable!());
        assert_eq!(r.current.uid, 2);
        // Sorted: uid 2 (5, 200), uid 1 (5, 100), uid 3 (1, 300).
        assert_eq!(r.old_client_states, vec!["aa".to_string(), "cc".to_string()]);
        assert_eq!(r.unreplaced_uids, vec![3]);
        assert_eq!(r.first_seen_at, 100);
        assert_eq!(r.status, Status::Assigned);

        let tie = [row(9, 1, "aa", 100, None), row(8, 1, "aa", 100, None)];
        let r = resolve(&tie).unwrap_or_else(|| unreachable!());
        assert_eq!(r.current.uid, 9);
        assert_eq!(r.unreplaced_uids, vec![8]);
        assert!(r.old_client_states.is_empty());
    }

    #[test]
    fn statuses() {
        let replaced = [row(1, 1, "aa", 100, Some(200))];
        assert_eq!(resolve(&replaced).map(|r| r.status), Some(Status::NeedsNode));
        let mut nodeless = row(1, 1, "aa", 100, None);
        nodeless.node = None;
        nodeless.node_id = None;
        assert_eq!(resolve(std::slice::from_ref(&nodeless)).map(|r| r.status), Some(Status::NeedsNode));
        let mut retired = row(1, MAX_GENERATION, "aa", 100, Some(200));
        assert_eq!(resolve(std::slice::from_ref(&retired)).map(|r| r.status), Some(Status::Assigned));
        retired.node = None;
        assert_eq!(resolve(&[retired]).map(|r| r.status), Some(Status::RetiredWithoutNode));
    }
}
