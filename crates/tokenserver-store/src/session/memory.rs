//! In-memory session store: sharded maps, no global lock, an expiry wheel instead of scans.
//!
//! A session's tokens share their chain id, and the shard is picked from it, so a rotation
//! (read, mark rotated, insert successor) takes one shard's lock. Keys are the last 16 bytes of
//! the token's hash: SHA-256 output, uniform already, so the map hashes them with an identity
//! hasher (a current token's hash starts with its issue time, which is not uniform). An entry is
//! 48 bytes plus its metadata text. Each shard also files its keys by expiry (64-second slots), so
//! a purge visits only the keys that are due. Growth is per shard, so a resize moves 1/N of the
//! store, never all of it at once.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokenserver_core::session::{
    ChainId, RotateRequest, Rotated, RotationPolicy, SealedSuccessor, SessionRecord, SessionToken, TokenHash,
};

use super::{end_with, revoke_by_walking, rotate_with, DumpEntry, Result, RotateOutcome, SessionOps, SessionStore};

type Key = [u8; 16];

/// Width of an expiry-wheel slot, ms: expired entries are invisible at once and freed by the
/// first purge after their slot ends.
const SLOT_MS: u64 = 64_000;

/// Hashes a key by its first 8 bytes: keys are SHA-256 output, uniform already.
#[derive(Default)]
struct PrefixHasher(u64);

impl Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        // `[u8; 16]` hashes as its bytes; take the first eight.
        for (i, b) in bytes.iter().take(8).enumerate() {
            self.0 |= u64::from(*b) << (8 * i);
        }
    }
}

type Map = HashMap<Key, Entry, BuildHasherDefault<PrefixHasher>>;

/// What a rotated entry remembers (boxed: only rotated entries pay for it).
#[derive(Debug)]
struct RotatedBox {
    at: u64,
    successor: TokenHash,
    sealed: SealedSuccessor,
}

#[derive(Debug)]
struct Entry {
    meta: Box<str>,
    rotated: Option<Box<RotatedBox>>,
    expires_at: u64,
    deadline: u64,
    ttl_ms: u64,
}

impl Entry {
    fn record(&self) -> SessionRecord {
        SessionRecord {
            meta: self.meta.to_string(),
            expires_at: self.expires_at,
            deadline: self.deadline,
            ttl_ms: self.ttl_ms,
            rotated: self.rotated.as_ref().map(|r| Rotated { at: r.at, successor: r.successor, sealed: r.sealed }),
        }
    }
}

#[derive(Debug, Default)]
struct Shard {
    map: Map,
    /// Expiry slot → keys expiring in it (stale keys are skipped at purge).
    wheel: BTreeMap<u64, Vec<Key>>,
}

fn key(hash: &TokenHash) -> Key {
    let mut k = [0u8; 16];
    k.copy_from_slice(&hash.0[16..]);
    k
}

impl Shard {
    fn file(&mut self, k: Key, expires_at: u64) {
        self.wheel.entry(expires_at / SLOT_MS).or_default().push(k);
    }
}

struct ShardOps<'a> {
    shard: &'a mut Shard,
    removed: u64,
    added: u64,
}

impl SessionOps for ShardOps<'_> {
    fn load(&mut self, hash: &TokenHash) -> Result<Option<SessionRecord>> {
        Ok(self.shard.map.get(&key(hash)).map(Entry::record))
    }

    fn insert(&mut self, hash: &TokenHash, _chain: &ChainId, r: &SessionRecord) -> Result<()> {
        let k = key(hash);
        let entry = Entry {
            meta: r.meta.as_str().into(),
            rotated: None,
            expires_at: r.expires_at,
            deadline: r.deadline,
            ttl_ms: r.ttl_ms,
        };
        if self.shard.map.insert(k, entry).is_none() {
            self.added += 1;
        }
        self.shard.file(k, r.expires_at);
        Ok(())
    }

    fn mark_rotated(&mut self, hash: &TokenHash, rotated: &Rotated) -> Result<()> {
        if let Some(e) = self.shard.map.get_mut(&key(hash)) {
            e.meta = "".into();
            e.rotated =
                Some(Box::new(RotatedBox { at: rotated.at, successor: rotated.successor, sealed: rotated.sealed }));
        }
        Ok(())
    }

    fn remove(&mut self, hash: &TokenHash) -> Result<()> {
        if self.shard.map.remove(&key(hash)).is_some() {
            self.removed += 1;
        }
        Ok(())
    }

    fn revoke(&mut self, _chain: &ChainId, from: &TokenHash) -> Result<()> {
        revoke_by_walking(self, from)
    }
}

/// The in-memory store.
pub struct MemorySessions {
    shards: Box<[Mutex<Shard>]>,
    mask: usize,
    records: AtomicU64,
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
        Self { shards: (0..n).map(|_| Mutex::new(Shard::default())).collect(), mask: n - 1, records: AtomicU64::new(0) }
    }

    fn shard(&self, chain: &ChainId) -> &Mutex<Shard> {
        let idx = usize::from(u16::from_le_bytes([chain.0[0], chain.0[1]])) & self.mask;
        &self.shards[idx]
    }

    fn with_shard<T>(&self, chain: &ChainId, f: impl FnOnce(&mut ShardOps<'_>) -> T) -> T {
        let mut guard = self.shard(chain).lock();
        let mut ops = ShardOps { shard: &mut guard, removed: 0, added: 0 };
        let out = f(&mut ops);
        let (added, removed) = (ops.added, ops.removed);
        drop(guard);
        self.records.fetch_add(added, Ordering::Relaxed);
        self.records.fetch_sub(removed, Ordering::Relaxed);
        out
    }

    /// Records held (live and rotated).
    pub fn len(&self) -> u64 {
        self.records.load(Ordering::Relaxed)
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
        self.with_shard(&token.chain(), |ops| ops.insert(&token.hash(), &token.chain(), record))
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        self.with_shard(&req.presented.chain(), |ops| rotate_with(ops, req, policy))
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        self.with_shard(&token.chain(), |ops| end_with(ops, token, now))
    }

    async fn dump(&self, now: u64, limit: usize) -> Result<(Vec<DumpEntry>, Option<u64>)> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            if out.len() >= limit {
                break;
            }
            let guard = shard.lock();
            for e in guard.map.values() {
                if out.len() >= limit {
                    break;
                }
                if e.rotated.is_none() && now < e.expires_at && now < e.deadline {
                    out.push(DumpEntry { expires_at: e.expires_at, deadline: e.deadline, meta: e.meta.to_string() });
                }
            }
        }
        Ok((out, Some(self.len())))
    }

    async fn purge(&self, now: u64) -> Result<u64> {
        let due = now / SLOT_MS;
        let mut removed = 0u64;
        for shard in self.shards.iter() {
            let mut guard = shard.lock();
            let s = &mut *guard;
            // Slots strictly before the current one hold only expired keys.
            while let Some(entry) = s.wheel.first_entry() {
                if *entry.key() >= due {
                    break;
                }
                for k in entry.remove() {
                    if s.map.get(&k).is_some_and(|e| now >= e.expires_at || now >= e.deadline) {
                        s.map.remove(&k);
                        removed += 1;
                    }
                }
            }
        }
        self.records.fetch_sub(removed, Ordering::Relaxed);
        Ok(removed)
    }

    async fn check(&self) -> Result<()> {
        Ok(())
    }
}
