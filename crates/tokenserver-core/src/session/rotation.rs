//! The rotation rule: what happens when a token is presented for exchange, as a pure function of
//! the stored record, the request and the clock. Every backend loads the record inside its
//! atomic section (shard lock, transaction, Redis script guard), calls [`decide`] and carries out
//! the decision, so the semantics are identical everywhere.
//!
//! Model: a session is a chain of tokens; only the newest (the head) is live. Rotating the head
//! creates its successor and turns the old record into a *rotated* record that remembers the
//! successor (hash + sealed copy) and when it was rotated. Presenting a rotated token again is
//! token reuse: inside the grace window it is taken for a retry and gets the same successor back;
//! after it, the whole chain is revoked (the head and the rotated records after the presented one).

use super::meta::{self, MetaError, MetaLimits, MetaUpdate};
use super::token::{SealedSuccessor, SessionToken, TokenHash};

/// A stored token record (live or rotated). Times are milliseconds since the UNIX epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionRecord {
    /// Canonical JSON metadata; empty for a rotated record (its metadata moved to the successor).
    pub meta: String,
    /// This token's idle expiry.
    pub expires_at: u64,
    /// The session's absolute end (creation + maximum age).
    pub deadline: u64,
    /// The session's idle lifetime, renewed by each rotation.
    pub ttl_ms: u64,
    /// Set once the token has been exchanged.
    pub rotated: Option<Rotated>,
}

/// What a rotated record remembers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rotated {
    /// When it was exchanged.
    pub at: u64,
    /// Its successor's hash.
    pub successor: TokenHash,
    /// Its successor, sealed under the rotated token.
    pub sealed: SealedSuccessor,
}

impl Rotated {
    /// From a store's three nullable columns (`rotated_at`, `successor`, `sealed`): `None` unless
    /// all are present and well formed.
    pub fn from_columns(at: Option<i64>, successor: Option<&[u8]>, sealed: Option<&[u8]>) -> Option<Self> {
        Some(Self {
            at: u64::try_from(at?).ok()?,
            successor: TokenHash::from_slice(successor?)?,
            sealed: SealedSuccessor::from_slice(sealed?)?,
        })
    }
}

impl SessionRecord {
    /// A new session's first record.
    pub fn new(meta: String, now: u64, ttl_ms: u64, max_age_ms: u64) -> Self {
        let deadline = now.saturating_add(max_age_ms);
        Self { meta, expires_at: now.saturating_add(ttl_ms).min(deadline), deadline, ttl_ms, rotated: None }
    }

    /// Not expired (idle or absolute) at `now`.
    pub fn alive(&self, now: u64) -> bool {
        now < self.expires_at && now < self.deadline
    }

    /// Live: not rotated and not expired.
    pub fn is_live(&self, now: u64) -> bool {
        self.rotated.is_none() && self.alive(now)
    }
}

/// Settings of the rotation rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RotationPolicy {
    /// How long after a rotation a retry with the old token gets the same successor (0: never).
    pub grace_ms: u64,
    /// Revoke the chain when a rotated token is presented after the grace window.
    pub reuse_detection: bool,
    /// Metadata bounds (checked on the merged result).
    pub limits: MetaLimits,
}

/// A rotation request.
#[derive(Debug, Clone)]
pub struct RotateRequest {
    /// The token presented.
    pub presented: SessionToken,
    /// The successor to issue if the token is live (drawn by the caller, same chain).
    pub successor: SessionToken,
    /// Metadata change, if any.
    pub update: Option<MetaUpdate>,
    /// The clock.
    pub now: u64,
}

/// Why a presented token is refused without touching the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// No such token (never issued, deleted, purged, or its chain revoked).
    Unknown,
    /// Idle lifetime or maximum age passed.
    Expired,
    /// A rotated token inside the grace window whose successor is no longer live.
    SuccessorGone,
}

/// What the backend must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Mark the presented record rotated with `rotated` (dropping its metadata, keeping its
    /// expiry) and insert `successor` under `successor_hash`.
    Rotate {
        /// The presented record's new `rotated` field.
        rotated: Rotated,
        /// The successor's hash.
        successor_hash: TokenHash,
        /// The successor's record.
        successor: SessionRecord,
    },
    /// A retry inside the grace window: answer with this successor if its record is still live.
    Replay {
        /// The successor's hash (to load its record).
        successor_hash: TokenHash,
        /// The successor itself, unsealed with the presented token.
        successor: SessionToken,
    },
    /// Reuse after the grace window: delete the presented record's successors up to the head.
    RevokeChain {
        /// The first record to delete (the presented token's successor).
        from: TokenHash,
    },
    /// Refuse; when `remove` is set, delete the presented (expired) record on the way.
    Refuse {
        /// Why.
        why: Invalid,
        /// Delete the presented record (it expired).
        remove: bool,
    },
    /// The merged metadata breaks a limit: refuse, change nothing.
    Reject(MetaError),
}

/// The outcome of a rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RotateOutcome {
    /// The token was live: here is its successor.
    Rotated {
        /// The new token.
        token: SessionToken,
        /// Its record.
        record: SessionRecord,
    },
    /// A retry inside the grace window: the successor issued the first time.
    Replayed {
        /// The same successor as before.
        token: SessionToken,
        /// Its current record.
        record: SessionRecord,
    },
    /// The token is not usable; nothing was issued.
    Refused(Invalid),
    /// A rotated token was reused after the grace window: the session was revoked.
    Revoked,
    /// The merged metadata breaks a limit; nothing changed.
    Rejected(MetaError),
}

/// Decides what to do with `req` given the presented token's record.
pub fn decide(record: Option<&SessionRecord>, req: &RotateRequest, policy: &RotationPolicy) -> Decision {
    let Some(record) = record else {
        return Decision::Refuse { why: Invalid::Unknown, remove: false };
    };
    let now = req.now;
    if !record.alive(now) {
        return Decision::Refuse { why: Invalid::Expired, remove: true };
    }
    if let Some(rotated) = &record.rotated {
        if now.saturating_sub(rotated.at) < policy.grace_ms {
            return match req.presented.unseal(&rotated.sealed, &rotated.successor) {
                Some(successor) => Decision::Replay { successor_hash: rotated.successor, successor },
                None => Decision::Refuse { why: Invalid::Unknown, remove: false },
            };
        }
        if policy.reuse_detection {
            return Decision::RevokeChain { from: rotated.successor };
        }
        return Decision::Refuse { why: Invalid::Unknown, remove: false };
    }
    let meta = match &req.update {
        None => record.meta.clone(),
        Some(update) => match meta::apply(&record.meta, update.clone(), &policy.limits) {
            Ok(m) => m,
            Err(e) => return Decision::Reject(e),
        },
    };
    Decision::Rotate {
        rotated: live_rotation(req),
        successor_hash: req.successor.hash(),
        successor: successor_record(record, meta, now),
    }
}

/// The presented record's `rotated` field when `req` rotates it.
pub fn live_rotation(req: &RotateRequest) -> Rotated {
    Rotated { at: req.now, successor: req.successor.hash(), sealed: req.presented.seal(&req.successor) }
}

/// The successor's record when `record` is rotated at `now`: `meta`, the idle lifetime renewed
/// from `now` but never past the deadline, the deadline and the idle lifetime kept.
///
/// A store may rotate in one step, without reading the record first, a request that carries no
/// metadata update, when its presented record is live ([`SessionRecord::is_live`]): that is
/// the [`Decision::Rotate`] [`decide`] gives, with `rotated` from [`live_rotation`] and this
/// record with the presented metadata. Otherwise it falls back to reading and deciding.
pub fn successor_record(record: &SessionRecord, meta: String, now: u64) -> SessionRecord {
    SessionRecord {
        meta,
        expires_at: now.saturating_add(record.ttl_ms).min(record.deadline),
        deadline: record.deadline,
        ttl_ms: record.ttl_ms,
        rotated: None,
    }
}

/// The answer to a replay, given the successor's record: the same successor while it is live.
pub fn replay_answer(successor: Option<&SessionRecord>, now: u64) -> Option<&SessionRecord> {
    successor.filter(|r| r.is_live(now))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> RotationPolicy {
        RotationPolicy { grace_ms: 2_000, reuse_detection: true, limits: MetaLimits::default() }
    }

    fn request(presented: &SessionToken, now: u64, update: Option<MetaUpdate>) -> RotateRequest {
        RotateRequest { presented: presented.clone(), successor: presented.successor(), update, now }
    }

    #[test]
    fn unknown_token_is_refused() {
        let t = SessionToken::new_session();
        assert_eq!(
            decide(None, &request(&t, 0, None), &policy()),
            Decision::Refuse { why: Invalid::Unknown, remove: false }
        );
    }

    #[test]
    fn live_token_rotates_with_renewed_idle_expiry_capped_by_the_deadline() {
        let t = SessionToken::new_session();
        let rec = SessionRecord::new(r#"{"a":1}"#.into(), 1_000, 10 * MIN, 25 * MIN);
        assert_eq!((rec.expires_at, rec.deadline), (1_000 + 10 * MIN, 1_000 + 25 * MIN));
        let req = request(&t, 1_000 + 5 * MIN, None);
        let Decision::Rotate { rotated, successor_hash, successor } = decide(Some(&rec), &req, &policy()) else {
            unreachable!("live token must rotate")
        };
        assert_eq!(successor_hash, req.successor.hash());
        assert_eq!(rotated.at, req.now);
        assert_eq!(t.unseal(&rotated.sealed, &successor_hash), Some(req.successor.clone()));
        assert_eq!(successor.meta, r#"{"a":1}"#);
        assert_eq!(successor.expires_at, req.now + 10 * MIN);
        // Near the deadline the idle renewal is cut short.
        let long = SessionRecord::new("{}".into(), 1_000, 20 * MIN, 25 * MIN);
        let late = request(&t, 1_000 + 15 * MIN, None);
        let Decision::Rotate { successor, .. } = decide(Some(&long), &late, &policy()) else { unreachable!() };
        assert_eq!(successor.expires_at, long.deadline);
    }

    #[test]
    fn expiry_is_strict_and_removes_the_record() {
        let t = SessionToken::new_session();
        let rec = SessionRecord::new("{}".into(), 0, 10, 100);
        assert!(matches!(decide(Some(&rec), &request(&t, 9, None), &policy()), Decision::Rotate { .. }));
        assert_eq!(
            decide(Some(&rec), &request(&t, 10, None), &policy()),
            Decision::Refuse { why: Invalid::Expired, remove: true }
        );
        // Maximum age ends the session whatever the idle expiry says.
        let capped = SessionRecord { expires_at: 500, ..SessionRecord::new("{}".into(), 0, 1_000, 100) };
        assert_eq!(
            decide(Some(&capped), &request(&t, 100, None), &policy()),
            Decision::Refuse { why: Invalid::Expired, remove: true }
        );
    }

    #[test]
    fn metadata_updates_are_merged_and_bounded() {
        let t = SessionToken::new_session();
        let rec = SessionRecord::new(r#"{"a":{"x":1},"b":2}"#.into(), 0, MIN, MIN);
        let patch = MetaUpdate::MergePatch(json!({"a": {"y": 2}, "b": null}));
        let Decision::Rotate { successor, .. } = decide(Some(&rec), &request(&t, 1, Some(patch)), &policy()) else {
            unreachable!()
        };
        assert_eq!(successor.meta, r#"{"a":{"x":1,"y":2}}"#);
        let tight = RotationPolicy { limits: MetaLimits { max_keys: 2, ..MetaLimits::default() }, ..policy() };
        let patch = MetaUpdate::MergePatch(json!({"c": 1}));
        assert_eq!(
            decide(Some(&rec), &request(&t, 1, Some(patch)), &tight),
            Decision::Reject(MetaError::TooManyKeys { count: 4, limit: 2 })
        );
    }

    fn rotated_record(t: &SessionToken, at: u64) -> (SessionRecord, SessionToken) {
        let s = t.successor();
        let mut rec = SessionRecord::new("{}".into(), 0, 10 * MIN, 60 * MIN);
        rec.meta.clear();
        rec.rotated = Some(Rotated { at, successor: s.hash(), sealed: t.seal(&s) });
        (rec, s)
    }

    #[test]
    fn reuse_inside_the_grace_window_replays_the_same_successor() {
        let t = SessionToken::new_session();
        let (rec, s) = rotated_record(&t, 1_000);
        for now in [1_000, 2_500, 2_999] {
            assert_eq!(
                decide(Some(&rec), &request(&t, now, None), &policy()),
                Decision::Replay { successor_hash: s.hash(), successor: s.clone() },
                "at {now}"
            );
        }
    }

    #[test]
    fn reuse_after_the_grace_window_revokes_the_chain() {
        let t = SessionToken::new_session();
        let (rec, s) = rotated_record(&t, 1_000);
        assert_eq!(decide(Some(&rec), &request(&t, 3_000, None), &policy()), Decision::RevokeChain { from: s.hash() });
        let lenient = RotationPolicy { reuse_detection: false, ..policy() };
        assert_eq!(
            decide(Some(&rec), &request(&t, 3_001, None), &lenient),
            Decision::Refuse { why: Invalid::Unknown, remove: false }
        );
        let no_grace = RotationPolicy { grace_ms: 0, ..policy() };
        assert_eq!(decide(Some(&rec), &request(&t, 1_000, None), &no_grace), Decision::RevokeChain { from: s.hash() });
    }

    #[test]
    fn rotated_columns_must_all_be_present_and_well_formed() {
        let t = SessionToken::new_session();
        let s = t.successor();
        let sealed = t.seal(&s);
        let want = Rotated { at: 5, successor: s.hash(), sealed };
        let (h, x) = (&s.hash().0[..], sealed.as_bytes());
        assert_eq!(Rotated::from_columns(Some(5), Some(h), Some(x)), Some(want));
        assert_eq!(Rotated::from_columns(None, None, None), None);
        assert_eq!(Rotated::from_columns(Some(5), Some(h), None), None);
        assert_eq!(Rotated::from_columns(Some(-1), Some(h), Some(x)), None);
        assert_eq!(Rotated::from_columns(Some(5), Some(&h[..31]), Some(x)), None);
        assert_eq!(Rotated::from_columns(Some(5), Some(h), Some(&x[..31])), None);
    }

    #[test]
    fn replay_answers_only_a_live_successor() {
        let live = SessionRecord::new("{}".into(), 0, MIN, MIN);
        assert_eq!(replay_answer(Some(&live), 10), Some(&live));
        assert_eq!(replay_answer(Some(&live), MIN), None);
        let t = SessionToken::new_session();
        let (rotated, _) = rotated_record(&t, 5);
        assert_eq!(replay_answer(Some(&rotated), 10), None);
        assert_eq!(replay_answer(None, 10), None);
    }
}
