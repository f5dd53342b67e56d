//! Node choice and gradual capacity release (spec §4.7, §5), deterministic on every backend.
//!
//! A node takes new users while `available > 0`, `current_load < capacity` and it is neither
//! `downed` nor in `backoff`. Among those the least relatively loaded wins: empty nodes first, then
//! the smallest `ln(load) / ln(capacity)`. Ties — which Mozilla's query leaves to the database —
//! go to the node with more `available` slots, then to the lowest node id: the same answer on every
//! backend, and one that does not depend on the ids a database hands out (a large fresh node beats
//! a nearly full one added later or earlier alike). When no node qualifies, capacity is released on every eligible node in
//! `release_rate` steps and the choice is retried.

/// The node columns the policy reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeState {
    /// `nodes.id`.
    pub id: i64,
    /// `nodes.node` (URL).
    pub node: String,
    /// Slots that may be handed out before more must be released.
    pub available: i64,
    /// Assignments made so far.
    pub current_load: i64,
    /// Maximum users.
    pub capacity: i64,
    /// Non-zero: no new users, no released capacity.
    pub downed: i64,
    /// Non-zero: no new users.
    pub backoff: i64,
}

impl NodeState {
    fn takes_new_users(&self) -> bool {
        self.available > 0 && self.capacity > self.current_load && self.downed == 0 && self.backoff == 0
    }

    /// Sort key: empty nodes first (Mozilla: `LOG(0)` is NULL, sorted first), then the load ratio.
    fn load_ratio(&self) -> f64 {
        if self.current_load <= 0 {
            f64::NEG_INFINITY
        } else {
            (self.current_load as f64).ln() / (self.capacity as f64).ln()
        }
    }
}

/// The node a new assignment goes to, if any takes new users.
pub fn choose_node(nodes: &[NodeState]) -> Option<&NodeState> {
    nodes.iter().filter(|n| n.takes_new_users()).min_by(|a, b| {
        a.load_ratio().total_cmp(&b.load_ratio()).then(b.available.cmp(&a.available)).then(a.id.cmp(&b.id))
    })
}

/// The new `available` for a node when capacity is released, or `None` if the node gets none.
///
/// Mozilla computes `LEAST(capacity * rate, capacity - current_load)` in SQL with the rate bound
/// as a 32-bit float and stores it in an integer column, which rounds to nearest. Below 5 slots at
/// the default rate that rounds to 0 and a small server can never take another user (Mozilla
/// issue #1313); we release at least one slot while the node is not full.
pub fn released_available(node: &NodeState, rate: f64) -> Option<i64> {
    let eligible = node.available <= 0 && node.capacity > node.current_load && node.downed == 0;
    if !eligible {
        return None;
    }
    let share = node.capacity as f64 * rate;
    let room = (node.capacity - node.current_load) as f64;
    Some((share.min(room).round() as i64).max(1))
}

/// How many times the choice is retried after releasing capacity, as Mozilla does.
pub const MAX_RELEASE_ROUNDS: usize = 5;

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: i64, available: i64, load: i64, capacity: i64) -> NodeState {
        NodeState { id, node: format!("https://n{id}"), available, current_load: load, capacity, downed: 0, backoff: 0 }
    }

    #[test]
    fn least_loaded_wins_then_more_available_then_the_lowest_id() {
        let nodes = [node(1, 10, 2, 100), node(2, 10, 3, 100), node(3, 10, 1, 100)];
        assert_eq!(choose_node(&nodes).map(|n| n.id), Some(3));
        let empty_first = [node(5, 10, 1, 100), node(4, 10, 0, 100), node(6, 10, 0, 100)];
        assert_eq!(choose_node(&empty_first).map(|n| n.id), Some(4));
        let ties = [node(9, 10, 5, 100), node(7, 10, 5, 100)];
        assert_eq!(choose_node(&ties).map(|n| n.id), Some(7));
        // Same ratio (both empty): more available slots win whatever the ids.
        let fresh_big_later = [node(1, 2, 0, 10), node(8, 500, 0, 5000)];
        assert_eq!(choose_node(&fresh_big_later).map(|n| n.id), Some(8));
        let fresh_big_earlier = [node(8, 2, 0, 10), node(1, 500, 0, 5000)];
        assert_eq!(choose_node(&fresh_big_earlier).map(|n| n.id), Some(1));
        // Same ratio, same available: the lowest id, in any input order.
        let same = [node(12, 10, 5, 100), node(3, 10, 5, 100), node(6, 10, 5, 100)];
        assert_eq!(choose_node(&same).map(|n| n.id), Some(3));
        // Relative load: 10 of 1000 beats 5 of 10.
        let relative = [node(1, 10, 5, 10), node(2, 10, 10, 1000)];
        assert_eq!(choose_node(&relative).map(|n| n.id), Some(2));
    }

    #[test]
    fn excluded_nodes() {
        let mut downed = node(1, 10, 0, 100);
        downed.downed = 1;
        let mut backoff = node(2, 10, 0, 100);
        backoff.backoff = 1;
        let full = node(3, 10, 100, 100);
        let no_slots = node(4, 0, 1, 100);
        assert_eq!(choose_node(&[downed, backoff, full, no_slots]), None);
        let capacity_one = node(5, 1, 0, 1);
        assert_eq!(choose_node(&[capacity_one]).map(|n| n.id), Some(5));
    }

    #[test]
    fn release_rounds_like_mozilla_and_never_to_zero() {
        // LEAST(8 * 0.1, 3) = 0.8 -> 1.
        assert_eq!(released_available(&node(1, 0, 5, 8), 0.1), Some(1));
        assert_eq!(released_available(&node(1, 0, 0, 100), 0.1), Some(10));
        assert_eq!(released_available(&node(1, 0, 99, 100), 0.1), Some(1));
        assert_eq!(released_available(&node(1, 0, 90, 100), 0.1), Some(10));
        assert_eq!(released_available(&node(1, 0, 0, 25), 0.1), Some(3));
        // 4 * 0.1 rounds to 0 in Mozilla; we release one slot.
        assert_eq!(released_available(&node(1, 0, 1, 4), 0.1), Some(1));
        assert_eq!(released_available(&node(1, 0, 0, 10), 1.0), Some(10));
        // Not eligible: slots left, full, downed.
        assert_eq!(released_available(&node(1, 1, 0, 100), 0.1), None);
        assert_eq!(released_available(&node(1, 0, 100, 100), 0.1), None);
        let mut downed = node(1, 0, 0, 100);
        downed.downed = 1;
        assert_eq!(released_available(&downed, 0.1), None);
        // Backoff nodes get capacity released (but are never chosen).
        let mut backoff = node(1, 0, 0, 100);
        backoff.backoff = 1;
        assert_eq!(released_available(&backoff, 0.1), Some(10));
    }
}
