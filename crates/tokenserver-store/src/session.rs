//! Session-token storage: the [`SessionStore`] trait, and what its backends (`memory`, `sqlite`,
//! `postgres`, `redis`, each in its backend's folder) share.
//!
//! Every call is atomic. A rotation is written once, here ([`rotate`]): the presented token's
//! record is read, [`tokenserver_core::session::decide`] says what to do, and the backend does it
//! through [`RotationSteps`] inside its shard lock, its writer's transaction or its database
//! transaction, or by compare-and-set (Redis). Rotation semantics (grace window, reuse detection,
//! expiry, metadata limits) are therefore the same everywhere.
//!
//! What a backend keeps differs: the SQL and Redis stores keep one record per token (a rotated
//! token's record names its successor until it expires), the memory store one entry per session
//! with the tokens rotated within the grace window.

use std::future::Future;

use async_trait::async_trait;
use tokenserver_core::session::{
    decide, live_rotation, replay_answer, ChainId, Decision, Invalid, RotateOutcome, RotateRequest, Rotated,
    RotationPolicy, SessionRecord, SessionToken, TokenHash,
};

use crate::StoreError;

/// Result of a session storage call.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Expired records one purge statement removes at most (keeps each database turn short).
pub const PURGE_BATCH: u64 = 10_000;

/// How often a rotation is decided again when the presented record changed under it (it can
/// change only by being rotated or deleted, after which the next decision is final).
const MAX_ATTEMPTS: usize = 4;

/// One live session in a dump (no token: tokens are never readable from a store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DumpEntry {
    /// Idle expiry, ms since the epoch.
    pub expires_at: u64,
    /// Absolute end, ms since the epoch.
    pub deadline: u64,
    /// Canonical JSON metadata.
    pub meta: String,
}

/// One page of a dump.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DumpPage {
    /// Live sessions, at most the limit asked for.
    pub entries: Vec<DumpEntry>,
    /// Where the next page starts; `None` on the last page. Opaque, backend-specific.
    pub next: Option<String>,
    /// Records stored, on the first page, when the backend knows it cheaply.
    pub records: Option<u64>,
}

/// Session storage. Each method is atomic on its own.
#[async_trait]
pub trait SessionStore: Send + Sync + std::fmt::Debug {
    /// Backend name for logs and metrics.
    fn backend(&self) -> &'static str;
    /// Stores a new session's first token.
    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()>;
    /// Exchanges a token for its successor under `policy`.
    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome>;
    /// Ends the session `token` belongs to (its live token and the rotated ones after `token`).
    /// True when `token` was a known, unexpired token of the session.
    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool>;
    /// A page of up to `limit` live sessions, starting where the page before ended (`after`,
    /// its [`DumpPage::next`]); [`StoreError::InvalidInput`] for a cursor this backend did not
    /// make. Memory per call is bounded by `limit`, however many sessions are stored.
    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage>;
    /// Removes up to `max` records expired at `now`; returns how many. Backends with native
    /// expiry return 0.
    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64>;
    /// Reachability (health checks).
    async fn check(&self) -> Result<()>;

    /// Removes every record expired at `now`, [`PURGE_BATCH`] at a time; returns how many.
    async fn purge(&self, now: u64) -> Result<u64> {
        crate::in_batches(PURGE_BATCH, |max| self.purge_batch(now, max)).await
    }
}

/// The storage steps of one rotation, done inside the backend's atomic section.
pub(crate) trait RotationSteps: Send {
    /// The record of `hash`; `lock`: the presented token's, held until the call ends where the
    /// backend locks rows.
    fn load(&mut self, hash: &TokenHash, lock: bool) -> impl Future<Output = Result<Option<SessionRecord>>> + Send;
    /// Marks `presented` rotated and stores `successor` (of session `chain`) under
    /// `successor_hash`. False when `presented` changed since it was loaded (compare-and-set
    /// backends): the rotation is decided again.
    fn rotate(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        successor_hash: &TokenHash,
        chain: &ChainId,
        successor: &SessionRecord,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Deletes session `chain`'s records from `from` on.
    fn revoke(&mut self, chain: &ChainId, from: &TokenHash) -> impl Future<Output = Result<()>> + Send;
    /// Deletes the presented record, found expired.
    fn remove(&mut self, hash: &TokenHash) -> impl Future<Output = Result<()>> + Send;

    /// Whether [`Self::rotate_live`] can rotate in one step (network stores, where it saves a
    /// round trip).
    fn rotates_live(&self) -> bool {
        false
    }

    /// In one atomic step, without reading it first: if the record of `presented` is live, marks
    /// it rotated with `rotated` and stores its successor under `rotated.successor` with the
    /// record [`tokenserver_core::session::successor_record`] gives for its metadata at `now`;
    /// returns that record. `None` when the record is missing, expired or rotated (nothing
    /// changed; the rotation is then read and decided).
    fn rotate_live(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        now: u64,
    ) -> impl Future<Output = Result<Option<SessionRecord>>> + Send {
        let _ = (presented, rotated, now);
        std::future::ready(Ok(None))
    }
}

/// A rotation: what [`decide`] says, done through `steps`.
pub(crate) async fn rotate(
    steps: &mut impl RotationSteps,
    req: &RotateRequest,
    policy: &RotationPolicy,
) -> Result<RotateOutcome> {
    let hash = req.presented.hash();
    // The common case, a live token and no metadata change, in one step where the backend can.
    if req.update.is_none() && steps.rotates_live() {
        if let Some(record) = steps.rotate_live(&hash, &live_rotation(req), req.now).await? {
            return Ok(RotateOutcome::Rotated { token: req.successor.clone(), record });
        }
    }
    for _ in 0..MAX_ATTEMPTS {
        let record = steps.load(&hash, true).await?;
        match decide(record.as_ref(), req, policy) {
            Decision::Rotate { rotated, successor_hash, successor } => {
                let chain = req.successor.chain();
                if steps.rotate(&hash, &rotated, &successor_hash, &chain, &successor).await? {
                    return Ok(RotateOutcome::Rotated { token: req.successor.clone(), record: successor });
                }
            }
            Decision::Replay { successor_hash, successor } => {
                let current = steps.load(&successor_hash, false).await?;
                return Ok(match replay_answer(current.as_ref(), req.now) {
                    Some(record) => RotateOutcome::Replayed { token: successor, record: record.clone() },
                    None => RotateOutcome::Refused(Invalid::SuccessorGone),
                });
            }
            Decision::RevokeChain { from } => {
                steps.revoke(&req.presented.chain(), &from).await?;
                return Ok(RotateOutcome::Revoked);
            }
            Decision::Refuse { why, remove } => {
                if remove {
                    steps.remove(&hash).await?;
                }
                return Ok(RotateOutcome::Refused(why));
            }
            Decision::Reject(e) => return Ok(RotateOutcome::Rejected(e)),
        }
    }
    Err(StoreError::Conflict)
}

/// The storage steps of a session call for backends that run them synchronously inside their
/// own atomic section (a memory shard's lock, the SQLite writer): every [`RotationSteps`] future
/// of theirs completes on its first poll ([`crate::ready::run_now`]).
pub(crate) trait SessionOps: Send {
    /// The record of `hash`.
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>>;
    /// Inserts a record.
    fn insert(&mut self, hash: &TokenHash, chain: &ChainId, record: &SessionRecord) -> Result<()>;
    /// Marks a record rotated (dropping its metadata).
    fn mark_rotated(&mut self, hash: &TokenHash, rotated: &Rotated) -> Result<()>;
    /// Deletes one record.
    fn remove(&mut self, hash: &TokenHash) -> Result<()>;
    /// Deletes the session's records from `from` on (following successors, or by chain).
    fn revoke(&mut self, chain: &ChainId, from: &TokenHash) -> Result<()>;
}

impl<T: SessionOps> RotationSteps for T {
    async fn load(&mut self, hash: &TokenHash, _lock: bool) -> Result<Option<SessionRecord>> {
        SessionOps::load(self, hash)
    }

    async fn rotate(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        successor_hash: &TokenHash,
        chain: &ChainId,
        successor: &SessionRecord,
    ) -> Result<bool> {
        self.mark_rotated(presented, rotated)?;
        self.insert(successor_hash, chain, successor)?;
        Ok(true)
    }

    async fn revoke(&mut self, chain: &ChainId, from: &TokenHash) -> Result<()> {
        SessionOps::revoke(self, chain, from)
    }

    async fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        SessionOps::remove(self, hash)
    }
}

/// Records a revocation deletes at most, following successor links: a chain is as long as the
/// rotations within one idle lifetime; the walk is bounded regardless.
pub(crate) const MAX_CHAIN_WALK: usize = 1_000_000;

/// Follows successor links from `from`, deleting each record (for a store that keeps no chain
/// index: every rotated record names its successor).
pub(crate) fn revoke_by_walking(ops: &mut impl SessionOps, from: &TokenHash) -> Result<()> {
    let mut next = Some(*from);
    for _ in 0..MAX_CHAIN_WALK {
        let Some(hash) = next else { break };
        next = ops.load(&hash)?.and_then(|r| r.rotated.map(|rot| rot.successor));
        ops.remove(&hash)?;
    }
    Ok(())
}

/// Ending a session over [`SessionOps`].
pub(crate) fn end_with(ops: &mut impl SessionOps, token: &SessionToken, now: u64) -> Result<bool> {
    let hash = token.hash();
    let Some(record) = ops.load(&hash)? else { return Ok(false) };
    if !record.alive(now) {
        ops.remove(&hash)?;
        return Ok(false);
    }
    ops.revoke(&token.chain(), &hash)?;
    Ok(true)
}

/// What every store that rotates live tokens in one step must do ([`RotationSteps::rotate_live`]):
/// rotate a live token exactly as [`decide`] would, and change nothing for one it cannot decide
/// alone (rotated, idle-expired, past its deadline, unknown). `steps_for` makes a rotation's
/// steps for a session.
#[cfg(test)]
pub(crate) async fn live_rotation_case<S: RotationSteps>(
    store: &dyn SessionStore,
    mut steps_for: impl FnMut(ChainId) -> S,
) {
    use tokenserver_core::session::successor_record;
    const MIN: u64 = 60_000;
    let now = tokenserver_core::clock::now_ms();
    let at = |token: &SessionToken, when: u64| RotateRequest {
        presented: token.clone(),
        successor: token.successor(),
        update: None,
        now: when,
    };
    async fn live<S: RotationSteps>(steps: &mut S, req: &RotateRequest) -> Option<SessionRecord> {
        let (hash, rotated) = (req.presented.hash(), live_rotation(req));
        steps.rotate_live(&hash, &rotated, req.now).await.unwrap_or_else(|e| panic!("{e}"))
    }
    let token = SessionToken::new_session();
    let record = SessionRecord::new(r#"{"u":1}"#.into(), now, 10 * MIN, 25 * MIN);
    store.create(&token, &record).await.unwrap_or_else(|e| panic!("create: {e}"));
    let mut steps = steps_for(token.chain());
    assert!(steps.rotates_live());

    // A live token: what `decide` gives, the idle expiry renewed from `now`.
    let req = at(&token, now + MIN);
    let want = successor_record(&record, record.meta.clone(), req.now);
    assert_eq!(want.expires_at, now + 11 * MIN);
    assert_eq!(live(&mut steps, &req).await, Some(want));
    // Rotated now: a second try changes nothing, and the general path sees the rotation.
    assert_eq!(live(&mut steps, &req).await, None);
    let policy = RotationPolicy { grace_ms: 2_000, reuse_detection: false, limits: Default::default() };
    let retry = store.rotate(&req, &policy).await.unwrap_or_else(|e| panic!("{e}"));
    assert!(matches!(&retry, RotateOutcome::Replayed { token: t, .. } if *t == req.successor), "{retry:?}");
    // The successors rotate in turn, until the deadline caps the renewed expiry.
    let next = at(&req.successor, now + 10 * MIN);
    let got = live(&mut steps, &next).await.map(|r| (r.meta, r.expires_at, r.deadline));
    assert_eq!(got, Some((record.meta.clone(), now + 20 * MIN, now + 25 * MIN)));
    let last = at(&next.successor, now + 19 * MIN);
    let got = live(&mut steps, &last).await.map(|r| (r.expires_at, r.deadline));
    assert_eq!(got, Some((now + 25 * MIN, now + 25 * MIN)));

    // Idle-expired at its expiry to the millisecond, past its deadline, unknown: unchanged.
    let idle = SessionToken::new_session();
    store.create(&idle, &SessionRecord::new("{}".into(), now, MIN, 25 * MIN)).await.unwrap_or_else(|e| panic!("{e}"));
    let mut steps = steps_for(idle.chain());
    assert_eq!(live(&mut steps, &at(&idle, now + MIN)).await, None);
    assert!(live(&mut steps, &at(&idle, now + MIN - 1)).await.is_some(), "live a millisecond before");
    let old = SessionToken::new_session();
    store
        .create(&old, &SessionRecord::new("{}".into(), now, 30 * MIN, 5 * MIN))
        .await
        .unwrap_or_else(|e| panic!("{e}"));
    let mut steps = steps_for(old.chain());
    assert_eq!(live(&mut steps, &at(&old, now + 5 * MIN)).await, None);
    let gone = SessionToken::new_session();
    let mut steps = steps_for(gone.chain());
    assert_eq!(live(&mut steps, &at(&gone, now)).await, None);
}
