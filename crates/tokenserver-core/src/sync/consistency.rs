//! The Sync consistency rules (spec §1.6, V1–V8) and the write they lead to (§1.7).
//!
//! A client reports its account `generation` (from the OAuth token), `keys_changed_at` and client
//! state (from `X-KeyID`). The server refuses anything that would move a user backwards: an older
//! generation, older keys, a client state it has already retired, or a new client state without a
//! generation or key change to justify it.

/// What the request says about the account (zero values already normalised to `None`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claimed<'a> {
    /// `fxa-generation` from the OAuth token.
    pub generation: Option<i64>,
    /// From `X-KeyID`.
    pub keys_changed_at: Option<i64>,
    /// Lowercase hex, possibly empty.
    pub client_state: &'a str,
}

/// What the current assignment row says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored<'a> {
    /// Always present; may be 0.
    pub generation: i64,
    /// SQL NULL is `None`; a stored 0 stays `Some(0)`.
    pub keys_changed_at: Option<i64>,
    /// Lowercase hex, possibly empty.
    pub client_state: &'a str,
    /// Client states of the user's older rows that differ from the current one.
    pub old_client_states: &'a [String],
}

/// Which rule failed; each maps to one error body of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    /// V1: keys changed, but the reported generation is older than the key change.
    #[error("keys_changed_at newer than generation")]
    KeysChangedAfterGeneration,
    /// V2: the user has a client state and the request sends none.
    #[error("empty client state")]
    EmptyClientState,
    /// V3: the request sends a client state the user already moved away from.
    #[error("stale client state")]
    StaleClientState,
    /// V4: new client state without a generation change.
    #[error("new client state without generation change")]
    ClientStateWithoutGenerationChange,
    /// V5: new client state without a keys_changed_at change.
    #[error("new client state without keys_changed_at change")]
    ClientStateWithoutKeysChange,
    /// V6: the request's generation is older than the stored one.
    #[error("generation went backwards")]
    GenerationBackwards,
    /// V7: the request's keys_changed_at is older than the stored one.
    #[error("keys_changed_at went backwards")]
    KeysChangedAtBackwards,
    /// V8: the user has a keys_changed_at and the request sends none.
    #[error("keys_changed_at missing")]
    KeysChangedAtMissing,
}

/// `a > b`, true only when both are present ("opt_cmp" in Mozilla's code).
fn gt(a: Option<i64>, b: Option<i64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a > b)
}

/// `a <= b`, true only when both are present.
fn le(a: Option<i64>, b: Option<i64>) -> bool {
    matches!((a, b), (Some(a), Some(b)) if a <= b)
}

/// Checks V1–V8 in order; the first failing rule is returned.
pub fn validate(c: &Claimed<'_>, s: &Stored<'_>) -> Result<(), Violation> {
    let user_gen = Some(s.generation);
    let cs_changed = c.client_state != s.client_state;
    if gt(c.keys_changed_at, s.keys_changed_at) && gt(c.keys_changed_at, c.generation) {
        return Err(Violation::KeysChangedAfterGeneration);
    }
    if !s.client_state.is_empty() && c.client_state.is_empty() {
        return Err(Violation::EmptyClientState);
    }
    if s.old_client_states.iter().any(|old| old == c.client_state) {
        return Err(Violation::StaleClientState);
    }
    if cs_changed && le(c.generation, user_gen) {
        return Err(Violation::ClientStateWithoutGenerationChange);
    }
    if cs_changed && le(c.keys_changed_at, s.keys_changed_at) {
        return Err(Violation::ClientStateWithoutKeysChange);
    }
    if gt(user_gen, c.generation) {
        return Err(Violation::GenerationBackwards);
    }
    if gt(s.keys_changed_at, c.keys_changed_at) {
        return Err(Violation::KeysChangedAtBackwards);
    }
    if c.keys_changed_at.is_none() && s.keys_changed_at.is_some_and(|k| k != 0) {
        return Err(Violation::KeysChangedAtMissing);
    }
    Ok(())
}

/// The write a validated request leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing to write.
    None,
    /// Update the current row in place.
    Update {
        /// New generation.
        generation: i64,
        /// New keys_changed_at.
        keys_changed_at: Option<i64>,
    },
    /// Insert a new row (same node) with the new client state and retire the old rows.
    NewClientState {
        /// New generation.
        generation: i64,
        /// New keys_changed_at.
        keys_changed_at: Option<i64>,
        /// The new client state.
        client_state: String,
    },
}

/// What to write once [`validate`] has passed (§1.7).
pub fn plan_change(c: &Claimed<'_>, s: &Stored<'_>) -> Change {
    let keys_changed_at = c.keys_changed_at.or(s.keys_changed_at);
    let generation = match (c.generation, c.keys_changed_at) {
        (Some(g), _) => g,
        // A key change without a reported generation bumps the generation to keys_changed_at.
        (None, Some(r)) if s.keys_changed_at.is_none_or(|u| r > u) && r > s.generation => r,
        _ => s.generation,
    };
    if c.client_state != s.client_state {
        Change::NewClientState { generation, keys_changed_at, client_state: c.client_state.to_string() }
    } else if generation != s.generation || keys_changed_at != s.keys_changed_at {
        Change::Update { generation, keys_changed_at }
    } else {
        Change::None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Violation::*;

    fn claimed(g: Option<i64>, k: Option<i64>, cs: &str) -> Claimed<'_> {
        Claimed { generation: g, keys_changed_at: k, client_state: cs }
    }

    fn stored<'a>(g: i64, k: Option<i64>, cs: &'a str, old: &'a [String]) -> Stored<'a> {
        Stored { generation: g, keys_changed_at: k, client_state: cs, old_client_states: old }
    }

    #[test]
    fn validation_table() {
        let none: &[String] = &[];
        let old = ["bbbb".to_string()];
        #[rustfmt::skip]
        let cases: Vec<(Claimed<'_>, Stored<'_>, Result<(), Violation>)> = vec![
            // Identical state is fine.
            (claimed(Some(10), Some(10), "aaaa"), stored(10, Some(10), "aaaa", none), Ok(())),
            // V1: kca moves forward past the reported generation.
            (claimed(Some(5), Some(20), "aaaa"), stored(5, Some(10), "aaaa", none), Err(KeysChangedAfterGeneration)),
            // V1 is skipped when the stored kca is NULL.
            (claimed(Some(5), Some(20), "aaaa"), stored(5, None, "aaaa", none), Ok(())),
            // V1 is skipped without a generation.
            (claimed(None, Some(20), "aaaa"), stored(5, Some(10), "aaaa", none), Ok(())),
            // V2.
            (claimed(Some(10), Some(10), ""), stored(10, Some(10), "aaaa", none), Err(EmptyClientState)),
            // V3.
            (claimed(Some(20), Some(20), "bbbb"), stored(10, Some(10), "aaaa", &old), Err(StaleClientState)),
            // V4.
            (claimed(Some(10), Some(10), "cccc"), stored(10, Some(10), "aaaa", none), Err(ClientStateWithoutGenerationChange)),
            // V1 wins over V4 when both apply.
            (claimed(Some(10), Some(20), "cccc"), stored(10, Some(10), "aaaa", none), Err(KeysChangedAfterGeneration)),
            // V5.
            (claimed(Some(20), Some(10), "cccc"), stored(10, Some(10), "aaaa", none), Err(ClientStateWithoutKeysChange)),
            // New client state with both moving forward.
            (claimed(Some(20), Some(20), "cccc"), stored(10, Some(10), "aaaa", none), Ok(())),
            // New client state without a generation is judged by kca alone.
            (claimed(None, Some(20), "cccc"), stored(10, Some(10), "aaaa", none), Ok(())),
            // V6.
            (claimed(Some(9), Some(10), "aaaa"), stored(10, Some(10), "aaaa", none), Err(GenerationBackwards)),
            // V7.
            (claimed(Some(10), Some(9), "aaaa"), stored(10, Some(10), "aaaa", none), Err(KeysChangedAtBackwards)),
            // V8.
            (claimed(Some(10), None, "aaaa"), stored(10, Some(10), "aaaa", none), Err(KeysChangedAtMissing)),
            // A stored kca of 0 does not demand one.
            (claimed(Some(10), None, "aaaa"), stored(10, Some(0), "aaaa", none), Ok(())),
            // Retired users: any generation is older than MAX_GENERATION.
            (claimed(Some(10), Some(10), "aaaa"), stored(i64::MAX, Some(10), "aaaa", none), Err(GenerationBackwards)),
            (claimed(None, Some(10), "aaaa"), stored(i64::MAX, Some(10), "aaaa", none), Ok(())),
        ];
        for (i, (c, s, want)) in cases.iter().enumerate() {
            assert_eq!(validate(c, s), *want, "case {i}: {c:?} vs {s:?}");
        }
    }

    #[test]
    fn change_table() {
        let none: &[String] = &[];
        #[rustfmt::skip]
        let cases: Vec<(Claimed<'_>, Stored<'_>, Change)> = vec![
            (claimed(Some(10), Some(10), "aaaa"), stored(10, Some(10), "aaaa", none), Change::None),
            (claimed(Some(12), Some(10), "aaaa"), stored(10, Some(10), "aaaa", none),
                Change::Update { generation: 12, keys_changed_at: Some(10) }),
            // kca': request wins, else stored.
            (claimed(Some(10), Some(11), "aaaa"), stored(10, None, "aaaa", none),
                Change::Update { generation: 10, keys_changed_at: Some(11) }),
            (claimed(Some(10), None, "aaaa"), stored(10, Some(0), "aaaa", none), Change::None),
            // A key change without generation bumps the generation to kca.
            (claimed(None, Some(15), "aaaa"), stored(10, Some(10), "aaaa", none),
                Change::Update { generation: 15, keys_changed_at: Some(15) }),
            // ... but never lowers it.
            (claimed(None, Some(15), "aaaa"), stored(20, Some(10), "aaaa", none),
                Change::Update { generation: 20, keys_changed_at: Some(15) }),
            (claimed(None, Some(15), "cccc"), stored(10, None, "", none),
                Change::NewClientState { generation: 15, keys_changed_at: Some(15), client_state: "cccc".into() }),
            (claimed(Some(20), Some(20), "cccc"), stored(10, Some(10), "aaaa", none),
                Change::NewClientState { generation: 20, keys_changed_at: Some(20), client_state: "cccc".into() }),
        ];
        for (i, (c, s, want)) in cases.iter().enumerate() {
            assert_eq!(plan_change(c, s), *want, "case {i}");
        }
    }
}
