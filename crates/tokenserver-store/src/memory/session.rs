//! In-memory session store: one entry per session, sharded maps, no global lock, an expiry wheel
//! instead of scans.
//!
//! Every token of a session carries the session's id, so the store keys sessions by it and keeps
//! per session only what the rotation rule needs: the live token's hash and record, and, in a
//! side map, the tokens rotated within the grace window (hash, successor, sealed successor). An
//! older rotated token of a known session is recognised by its session id alone and taken for
//! reuse (see [`ChainOps::load`]). Memory therefore grows with live sessions, not with the
//! rotation rate: a store that kept one record per rotated token, for reuse detection until that
//! token's own expiry, would hold every rotation of the last idle lifetime (at 10,000
//! rotations/s and the default 2 h, 72 million records).
//!
//! The shard is picked from the session id's first bytes and the map hashes its last eight (both
//! uniform: CSPRNG output). A map slot is 72 bytes (the session id and [`Entry`]) plus its
//! metadata text. Each shard files its sessions by expiry (64-second slots) when they are
//! created; a rotation does not refile (it only moves the expiry later), the purge re-files a due
//! session that is still alive and drops recent rotations past the grace window. Growth is per
//! shard, so a resize moves 1/N of the store, never all of it at once.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use subtle::ConstantTimeEq;
use tokenserver_core::session::{
    ChainId, RotateOutcome, RotateRequest, Rotated, RotationPolicy, SealedSuccessor, SessionRecord, SessionToken,
    TokenHash,
};

use crate::ready::run_now;
use crate::session::{end_with, rotate, DumpEntry, DumpPage, Result, SessionOps, SessionStore};
use crate::StoreError;

/// Width of an expiry-wheel slot, ms: expired sessions are invisible at once and freed by the
/// first purge after their slot ends.
const SLOT_MS: u64 = 64_000;

/// Most rotated tokens a session remembers individually; within the grace window a client
/// rotating faster than this sees its oldest retries treated as reuse.
const MAX_RECENT: usize = 8;

/// A session id as a map key, hashed by its last eight bytes (the shard index comes from the
/// first two, so within a shard those carry no information).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionKey(ChainId);

impl Hash for SessionKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        let mut tail = [0u8; 8];
        tail.copy_from_slice(&self.0 .0[self.0 .0.len() - 8..]);
        state.write_u64(u64::from_le_bytes(tail));
    }
}

/// Passes [`SessionKey`]'s one `u64` through: it is uniform already.
#[derive(Default)]
struct IdentityHasher(u64);

impl Hasher for IdentityHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // Only reached if a key other than `SessionKey` is hashed: fold the bytes in.
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(*b);
        }
    }

    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

type Map = HashMap<SessionKey, Entry, BuildHasherDefault<IdentityHasher>>;

/// What a store compares tokens by: the SHA-256 part of a [`TokenHash`] (the rest is the issue
/// time, the same for tokens issued in one millisecond).
type Digest = [u8; 16];

fn digest(hash: &TokenHash) -> Digest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&hash.0[16..]);
    d
}

/// A token rotated within the grace window.
#[derive(Debug)]
struct Recent {
    hash: TokenHash,
    /// Its own idle expiry.
    expires_at: u64,
    rotated: Rotated,
}

/// A session's recent rotations, oldest first.
type RecentRotations = Vec<Recent>;

/// One session: 56 bytes, so that a map slot (with the 12-byte session id) is 72. At 10 million
/// sessions every 8 bytes of a slot are ~130 MiB (the maps are between 44% and 87% full).
#[derive(Debug)]
struct Entry {
    /// The live token.
    live: Digest,
    meta: Box<str>,
    expires_at: u64,
    deadline: u64,
    /// The idle lifetime, ms; at most `u32::MAX` (49.7 days), see [`ttl_u32`].
    ttl_ms: u32,
}

/// An idle lifetime as kept in an [`Entry`]: longer ones are cut to 49.7 days (`max_age`, 30
/// days by default, bounds a session's life anyway).
fn ttl_u32(ttl_ms: u64) -> u32 {
    u32::try_from(ttl_ms).unwrap_or(u32::MAX)
}

impl Entry {
    fn is(&self, hash: &TokenHash) -> bool {
        bool::from(self.live.ct_eq(&digest(hash)))
    }

    fn live_record(&self) -> SessionRecord {
        SessionRecord {
            meta: self.meta.to_string(),
            expires_at: self.expires_at,
            deadline: self.deadline,
            ttl_ms: u64::from(self.ttl_ms),
            rotated: None,
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: Map,
    /// Sessions rotated within the grace window → those rotations (few sessions at a time: the
    /// purge drops rotations past the window).
    recent: HashMap<SessionKey, RecentRotations, BuildHasherDefault<IdentityHasher>>,
    /// Expiry slot → sessions filed in it (ended ones are skipped at purge, living ones re-filed).
    wheel: BTreeMap<u64, Vec<ChainId>>,
}

impl Shard {
    fn file(&mut self, chain: ChainId, expires_at: u64) {
        self.wheel.entry(expires_at / SLOT_MS).or_default().push(chain);
    }
}

/// One session's storage steps, under its shard's lock.
struct ChainOps<'a> {
    shard: &'a mut Shard,
    /// The session of the token presented (every step of a call concerns it alone).
    chain: SessionKey,
    /// When the presented token was issued, when its format says.
    presented_issued: Option<u64>,
    /// Rotations older than this (ms) are no longer remembered one by one.
    grace_ms: u64,
    added: u64,
    removed: u64,
}

impl ChainOps<'_> {
    fn end_session(&mut self) {
        if self.shard.map.remove(&self.chain).is_some() {
            self.removed += 1;
        }
        self.shard.recent.remove(&self.chain);
    }
}

impl SessionOps for ChainOps<'_> {
    /// The live token's record, a recently rotated token's, or, for any other token of a known
    /// session, a record of a token rotated long ago: its expiry follows from its issue time and
    /// the session's idle lifetime, and its rotation time (0) lies outside every grace window,
    /// so [`tokenserver_core::session::decide`] treats it as reuse. Its successor is unknown
    /// (reuse revokes the whole session here, so the link is not followed).
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>> {
        let Some(e) = self.shard.map.get(&self.chain) else { return Ok(None) };
        if e.is(hash) {
            return Ok(Some(e.live_record()));
        }
        let ttl_ms = u64::from(e.ttl_ms);
        let recent = self.shard.recent.get(&self.chain);
        if let Some(r) = recent.and_then(|list| list.iter().find(|r| bool::from(r.hash.0.ct_eq(&hash.0)))) {
            return Ok(Some(SessionRecord {
                meta: String::new(),
                expires_at: r.expires_at,
                deadline: e.deadline,
                ttl_ms,
                rotated: Some(r.rotated),
            }));
        }
        let expires_at = match self.presented_issued {
            Some(issued) => issued.saturating_add(ttl_ms).min(e.deadline),
            None => e.deadline,
        };
        let unknown = SealedSuccessor::from_slice(&[0u8; 32]);
        Ok(unknown.map(|sealed| SessionRecord {
            meta: String::new(),
            expires_at,
            deadline: e.deadline,
            ttl_ms,
            rotated: Some(Rotated { at: 0, successor: TokenHash([0u8; 32]), sealed }),
        }))
    }

    fn insert(&mut self, hash: &TokenHash, chain: &ChainId, r: &SessionRecord) -> Result<()> {
        let key = SessionKey(*chain);
        if let Some(e) = self.shard.map.get_mut(&key) {
            // A successor: the session's new live token (the wheel keeps the earlier filing).
            e.live = digest(hash);
            e.meta = r.meta.as_str().into();
            e.expires_at = r.expires_at;
            e.deadline = r.deadline;
            e.ttl_ms = ttl_u32(r.ttl_ms);
            return Ok(());
        }
        let entry = Entry {
            live: digest(hash),
            meta: r.meta.as_str().into(),
            expires_at: r.expires_at,
            deadline: r.deadline,
            ttl_ms: ttl_u32(r.ttl_ms),
        };
        self.shard.map.insert(key, entry);
        self.added += 1;
        self.shard.file(*chain, r.expires_at.min(r.deadline));
        Ok(())
    }

    fn mark_rotated(&mut self, hash: &TokenHash, rotated: &Rotated) -> Result<()> {
        let grace_ms = self.grace_ms;
        let Some(e) = self.shard.map.get(&self.chain) else { return Ok(()) };
        if !e.is(hash) {
            return Ok(());
        }
        let expires_at = e.expires_at;
        let list = self.shard.recent.entry(self.chain).or_default();
        // Past the grace window a rotated token needs no record of its own (see `load`).
        list.retain(|r| rotated.at.saturating_sub(r.rotated.at) < grace_ms);
        if list.len() >= MAX_RECENT {
            list.remove(0);
        }
        list.push(Recent { hash: *hash, expires_at, rotated: *rotated });
        Ok(())
    }

    fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        let Some(e) = self.shard.map.get(&self.chain) else { return Ok(()) };
        if e.is(hash) {
            self.end_session();
        } else if let Some(list) = self.shard.recent.get_mut(&self.chain) {
            list.retain(|r| r.hash != *hash);
        }
        Ok(())
    }

    fn revoke(&mut self, _chain: &ChainId, _from: &TokenHash) -> Result<()> {
        // The whole session: only its live token and recent rotations are stored.
        self.end_session();
        Ok(())
    }
}

/// A dump cursor: `<shard>:<hex session id>`, the last session of the page before.
fn parse_cursor(cursor: &str) -> Option<(usize, [u8; 12])> {
    let (shard, id) = cursor.split_once(':')?;
    Some((shard.parse().ok()?, hex::decode(id).ok()?.try_into().ok()?))
}

/// The in-memory store.
pub struct MemorySessions {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    sessions: AtomicU64,
    /// Creates fail with `Full` once this many sessions are held.
    max_sessions: u64,
    /// The longest grace window a rotation has asked for: how long the purge keeps rotations.
    grace_ms: AtomicU64,
}

impl std::fmt::Debug for MemorySessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemorySessions").field("shards", &self.shards.len()).finish_non_exhaustive()
    }
}

impl MemorySessions {
    /// A store with `shards` shards (rounded up to a power of two, at least 1).
    pub fn new(shards: usize) -> Self {
        let n = shards.max(1).next_power_of_two();
        Self {
            shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(),
            mask: n - 1,
            sessions: AtomicU64::new(0),
            max_sessions: u64::MAX,
            grace_ms: AtomicU64::new(0),
        }
    }

    /// The same store holding at most `max` sessions: creates beyond it fail with
    /// [`StoreError::Full`] (concurrent creates may pass it by one each).
    pub fn with_max_sessions(mut self, max: u64) -> Self {
        self.max_sessions = max;
        self
    }

    /// A store laid out and bounded by `options`.
    pub fn with_options(options: super::MemoryOptions) -> Self {
        Self::new(options.shards).with_max_sessions(options.max_sessions)
    }

    fn with_chain<T>(&self, token: &SessionToken, grace_ms: u64, f: impl FnOnce(&mut ChainOps<'_>) -> T) -> T {
        let chain = token.chain();
        let idx = usize::from(u16::from_le_bytes([chain.0[0], chain.0[1]])) & self.mask;
        let mut guard = self.shards[idx].lock();
        let mut ops = ChainOps {
            shard: &mut guard,
            chain: SessionKey(chain),
            presented_issued: token.issued_at(),
            grace_ms,
            added: 0,
            removed: 0,
        };
        let out = f(&mut ops);
        let (added, removed) = (ops.added, ops.removed);
        drop(guard);
        self.sessions.fetch_add(added, Ordering::Relaxed);
        self.sessions.fetch_sub(removed, Ordering::Relaxed);
        out
    }

    /// Sessions held (live, or expired and not yet purged).
    pub fn len(&self) -> u64 {
        self.sessions.load(Ordering::Relaxed)
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[async_trait]
impl SessionStore for MemorySessions {
    fn backend(&self) -> &'static str {
        "memory"
    }

    async fn create(&self, token: &SessionToken, record: &SessionRecord) -> Result<()> {
        if self.len() >= self.max_sessions {
            return Err(StoreError::Full(format!("{} sessions (sessions.max_sessions)", self.max_sessions)));
        }
        self.with_chain(token, 0, |ops| ops.insert(&token.hash(), &token.chain(), record))
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        self.grace_ms.fetch_max(policy.grace_ms, Ordering::Relaxed);
        self.with_chain(&req.presented, policy.grace_ms, |ops| run_now(rotate(ops, req, policy)))
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        self.with_chain(token, 0, |ops| end_with(ops, token, now))
    }

    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage> {
        let (first_shard, after_id) = match after {
            None => (0, None),
            Some(cursor) => parse_cursor(cursor)
                .filter(|(shard, _)| *shard < self.shards.len())
                .map(|(shard, id)| (shard, Some(id)))
                .ok_or_else(|| StoreError::InvalidInput("not a dump cursor of this store".into()))?,
        };
        let limit = limit.max(1);
        let mut entries = Vec::new();
        let mut next = None;
        // Shards in order, and within a shard the session ids in byte order: a map has no
        // order of its own, so each shard's next ids are picked with a bounded heap.
        for (idx, shard) in self.shards.iter().enumerate().skip(first_shard) {
            let want = limit - entries.len();
            let guard = shard.lock();
            let mut smallest = std::collections::BinaryHeap::with_capacity(want + 1);
            for (key, e) in &guard.map {
                let id = key.0 .0;
                if (idx == first_shard && after_id.is_some_and(|a| id <= a))
                    || !(now < e.expires_at && now < e.deadline)
                {
                    continue;
                }
                smallest.push(id);
                if smallest.len() > want {
                    smallest.pop();
                }
            }
            let ids = smallest.into_sorted_vec();
            for id in &ids {
                if let Some(e) = guard.map.get(&SessionKey(ChainId(*id))) {
                    entries.push(DumpEntry {
                        expires_at: e.expires_at,
                        deadline: e.deadline,
                        meta: e.meta.to_string(),
                    });
                }
            }
            if entries.len() >= limit {
                next = ids.last().map(|id| format!("{idx}:{}", hex::encode(id)));
                break;
            }
        }
        Ok(DumpPage { entries, next, records: after.is_none().then(|| self.len()) })
    }

    /// The whole wheel at once (`max` does not apply: a purge only walks due slots).
    async fn purge_batch(&self, now: u64, _max: u64) -> Result<u64> {
        let due = now / SLOT_MS;
        let grace_ms = self.grace_ms.load(Ordering::Relaxed);
        let mut removed = 0u64;
        for shard in self.shards.iter() {
            let mut guard = shard.lock();
            let s = &mut *guard;
            s.recent.retain(|_, list| {
                list.retain(|r| now.saturating_sub(r.rotated.at) < grace_ms);
                !list.is_empty()
            });
            // Slots strictly before the current one are due.
            while let Some(slot) = s.wheel.first_entry() {
                if *slot.key() >= due {
                    break;
                }
                for chain in slot.remove() {
                    let key = SessionKey(chain);
                    let Some(end) = s.map.get(&key).map(|e| e.expires_at.min(e.deadline)) else { continue };
                    if now >= end {
                        s.map.remove(&key);
                        removed += 1;
                    } else {
                        // Rotated since it was filed: file it again by its current expiry (a
                        // later slot than `due`, so this loop does not meet it again).
                        s.file(chain, end);
                    }
                }
            }
        }
        self.sessions.fetch_sub(removed, Ordering::Relaxed);
        Ok(removed)
    }

    async fn check(&self) -> Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokenserver_core::session::{Invalid, MetaLimits};

    use super::*;

    const MIN: u64 = 60_000;

    fn policy() -> RotationPolicy {
        RotationPolicy { grace_ms: 2_000, reuse_detection: true, limits: MetaLimits::default() }
    }

    async fn rotate(s: &MemorySessions, t: &SessionToken, now: u64) -> RotateOutcome {
        let req = RotateRequest { presented: t.clone(), successor: t.successor(), update: None, now };
        s.rotate(&req, &policy()).await.unwrap()
    }

    fn next(outcome: RotateOutcome) -> SessionToken {
        match outcome {
            RotateOutcome::Rotated { token, .. } => token,
            other => panic!("expected a rotation, got {other:?}"),
        }
    }

    fn recent_len(s: &MemorySessions, t: &SessionToken) -> usize {
        let key = SessionKey(t.chain());
        s.shards.iter().map(|sh| sh.lock().recent.get(&key).map_or(0, Vec::len)).sum()
    }

    fn recent_sessions(s: &MemorySessions) -> usize {
        s.shards.iter().map(|sh| sh.lock().recent.len()).sum()
    }

    #[test]
    fn a_map_slot_is_72_bytes_and_long_idle_lifetimes_are_capped() {
        assert_eq!(std::mem::size_of::<(SessionKey, Entry)>(), 72);
        assert_eq!(ttl_u32(7_200_000), 7_200_000);
        assert_eq!(ttl_u32(u64::MAX), u32::MAX);
    }

    #[tokio::test]
    async fn creates_past_the_cap_fail_and_rotations_go_on() {
        let s = MemorySessions::new(4).with_max_sessions(2);
        let now = SessionToken::new_session().issued_at().unwrap();
        let record = SessionRecord::new("{}".into(), now, 10 * MIN, 60 * MIN);
        let (a, b) = (SessionToken::new_session(), SessionToken::new_session());
        s.create(&a, &record).await.unwrap();
        s.create(&b, &record).await.unwrap();
        assert!(matches!(s.create(&SessionToken::new_session(), &record).await, Err(StoreError::Full(_))));
        assert_eq!(s.len(), 2);
        next(rotate(&s, &a, now + 1).await);
        s.end(&b, now + 2).await.unwrap();
        s.create(&SessionToken::new_session(), &record).await.unwrap();
    }

    #[tokio::test]
    async fn a_session_is_one_entry_however_often_it_rotates() {
        let s = MemorySessions::new(4);
        let now = SessionToken::new_session().issued_at().unwrap();
        let mut t = SessionToken::new_session();
        s.create(&t, &SessionRecord::new("{}".into(), now, 10 * MIN, 60 * MIN)).await.unwrap();
        for i in 1..=1_000u64 {
            t = next(rotate(&s, &t, now + i * 3_000).await);
        }
        assert_eq!(s.len(), 1);
        // Rotations 3 s apart: only the last is inside the 2 s grace window.
        assert_eq!(recent_len(&s, &t), 1);
    }

    #[tokio::test]
    async fn rapid_rotations_remember_at_most_max_recent_tokens() {
        let s = MemorySessions::new(1);
        let now = SessionToken::new_session().issued_at().unwrap();
        let first = SessionToken::new_session();
        s.create(&first, &SessionRecord::new("{}".into(), now, 10 * MIN, 60 * MIN)).await.unwrap();
        let mut chain = vec![first];
        for i in 0..20u64 {
            let t = next(rotate(&s, chain.last().unwrap(), now + i).await);
            chain.push(t);
        }
        assert_eq!(recent_len(&s, chain.last().unwrap()), MAX_RECENT);
        // The newest rotated tokens still replay within the window...
        assert!(matches!(rotate(&s, &chain[19], now + 30).await, RotateOutcome::Replayed { .. }));
        // ...an older one is reuse, and revokes the session.
        assert_eq!(rotate(&s, &chain[2], now + 31).await, RotateOutcome::Revoked);
        assert_eq!(rotate(&s, &chain[20], now + 32).await, RotateOutcome::Refused(Invalid::Unknown));
        assert!(s.is_empty());
    }

    #[tokio::test]
    async fn an_old_token_past_its_own_expiry_is_refused_without_revoking() {
        let s = MemorySessions::new(1);
        let t1 = SessionToken::new_session();
        let now = t1.issued_at().unwrap();
        s.create(&t1, &SessionRecord::new("{}".into(), now, 10 * MIN, 600 * MIN)).await.unwrap();
        let mut t = t1.clone();
        // Keep the session alive well past t1's own idle expiry.
        for i in 1..=5u64 {
            t = next(rotate(&s, &t, now + i * 4 * MIN).await);
        }
        assert_eq!(rotate(&s, &t1, now + 21 * MIN).await, RotateOutcome::Refused(Invalid::Expired));
        next(rotate(&s, &t, now + 22 * MIN).await);
    }

    #[tokio::test]
    async fn purge_refiles_rotated_sessions_and_frees_expired_ones() {
        let s = MemorySessions::new(2);
        let now = SessionToken::new_session().issued_at().unwrap();
        let kept = SessionToken::new_session();
        let idle = SessionToken::new_session();
        for t in [&kept, &idle] {
            s.create(t, &SessionRecord::new("{}".into(), now, 10 * MIN, 600 * MIN)).await.unwrap();
        }
        let kept = next(rotate(&s, &kept, now + 9 * MIN).await);
        assert_eq!(recent_sessions(&s), 1);
        // Both were filed for now + 10 min; only the idle one has expired by then. The rotation
        // at 9 min is past its grace window: its record goes too.
        assert_eq!(s.purge(now + 12 * MIN).await.unwrap(), 1);
        assert_eq!(s.len(), 1);
        assert_eq!(recent_sessions(&s), 0);
        let previous = kept.clone();
        let kept = next(rotate(&s, &kept, now + 13 * MIN).await);
        // A purge inside the grace window keeps the rotation: a retry still gets its successor.
        s.purge(now + 13 * MIN + 1_000).await.unwrap();
        assert!(matches!(
            rotate(&s, &previous, now + 13 * MIN + 1_500).await,
            RotateOutcome::Replayed { token, .. } if token == kept
        ));
        // Re-filed for now + 19 min at the first purge; the rotation at 13 min moved it to 23.
        assert_eq!(s.purge(now + 21 * MIN).await.unwrap(), 0);
        assert_eq!(s.purge(now + 25 * MIN).await.unwrap(), 1);
        assert_eq!(rotate(&s, &kept, now + 25 * MIN).await, RotateOutcome::Refused(Invalid::Unknown));
        let slots: usize = s.shards.iter().map(|sh| sh.lock().wheel.values().map(Vec::len).sum::<usize>()).sum();
        assert_eq!(slots, 0, "nothing left filed");
    }
}
