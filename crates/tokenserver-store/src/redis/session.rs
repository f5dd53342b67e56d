//! Redis and Redis Cluster session store.
//!
//! One hash per token under `<prefix>s:{<chain id>}:<token hash hex>`: the chain id is the hash
//! tag, so every token of a session lives in one Cluster slot and, on a cluster, each script call
//! below touches one slot only. Fields: `m` metadata, `e` idle expiry, `d` deadline, `t` idle
//! lifetime (ms), and once rotated `r` (when), `s` (successor hash, hex), `x` (sealed successor),
//! with `m` emptied. Each key expires natively at `e` (`PEXPIREAT`), so there is nothing to purge.
//!
//! A rotation reads the record, decides in Rust (merging metadata there, so JSON is never
//! handled in Lua), then runs a script that applies the decision only if the token is still
//! live and unrotated — the compare-and-set that makes two concurrent rotations of one token
//! produce one successor; the loser re-reads and sees the rotated record. Both go through
//! [`Redis::send`]: on a single server, concurrent rotations share pipelines. A live rotation
//! (the common case) is one script call with no read first; on a single server the live
//! rotations waiting at that moment share one call ([`ROTATE_LIVE`] takes any number), which
//! costs Redis one script run for the lot instead of one each.

use std::collections::HashMap;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use redis::Script;
use tokenserver_core::session::{
    ChainId, RotateOutcome, RotateRequest, Rotated, RotationPolicy, SealedSuccessor, SessionRecord, SessionToken,
    TokenHash,
};

use super::{e, evalsha, send_one, Conn, Redis};
use crate::batch::Batcher;
use crate::session::{rotate, DumpEntry, DumpPage, Result, RotationSteps, SessionStore};
use crate::StoreError;
/// Longest chain walked by a revocation.
const MAX_WALK: usize = 100_000;

const CREATE: &str = r"
redis.call('HSET', KEYS[1], 'm', ARGV[1], 'e', ARGV[2], 'd', ARGV[3], 't', ARGV[4])
redis.call('PEXPIREAT', KEYS[1], ARGV[2])
return 1
";

const ROTATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 or redis.call('HEXISTS', KEYS[1], 'r') == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'r', ARGV[1], 's', ARGV[2], 'x', ARGV[3], 'm', '')
redis.call('HSET', KEYS[2], 'm', ARGV[4], 'e', ARGV[5], 'd', ARGV[6], 't', ARGV[7])
redis.call('PEXPIREAT', KEYS[2], ARGV[5])
return 1
";

/// Live rotations in one step (`RotationSteps::rotate_live`), any number in one call: KEYS two
/// by two (presented, successor), ARGV three by three (now, successor hash, sealed successor).
/// Each presented key that exists, is unrotated and, at its now, neither idle-expired (`e`) nor
/// past its deadline (`d`), is marked rotated and its metadata moves to the successor with `e`
/// renewed from now by `t` but not past `d`, as `successor_record` says. One answer per rotation,
/// in order: the successor as one string `e:d:t:metadata`, or false when nothing changed (one
/// value per rotation: the client's reply parser costs per value, and four cost us as much as
/// all the rotation's key building did). Applied one after the other, so a token presented twice
/// in one call is rotated once.
const ROTATE_LIVE: &str = r"
local out = {}
for i = 1, #KEYS / 2 do
  local old, new = KEYS[2 * i - 1], KEYS[2 * i]
  local r = redis.call('HMGET', old, 'm', 'e', 'd', 't', 'r')
  out[i] = false
  if r[2] and r[3] and r[4] and not r[5] then
    local now, e, d, t = tonumber(ARGV[3 * i - 2]), tonumber(r[2]), tonumber(r[3]), tonumber(r[4])
    -- A field that is not a number leaves this rotation to the general path, not the whole call.
    if now and e and d and t and now < e and now < d then
      local m = r[1] or ''
      -- Numbers go back out as text: the stored text where it is unchanged, an integer format
      -- where not. A Lua number handed to redis.call is printed as a double, which cost Redis a
      -- tenth of its instructions a rotation.
      local ne = r[3]
      if now + t < d then ne = string.format('%d', now + t) end
      redis.call('HSET', old, 'r', ARGV[3 * i - 2], 's', ARGV[3 * i - 1], 'x', ARGV[3 * i], 'm', '')
      redis.call('HSET', new, 'm', m, 'e', ne, 'd', r[3], 't', r[4])
      redis.call('PEXPIREAT', new, ne)
      out[i] = ne .. ':' .. r[3] .. ':' .. r[4] .. ':' .. m
    end
  end
end
return out
";
/// Live rotations one `ROTATE_LIVE` call carries at most (the server runs nothing else meanwhile).
const MAX_LIVE_BATCH: usize = 64;
/// `ROTATE_LIVE` calls out at once.
const LIVE_IN_FLIGHT: usize = 4;

/// Deletes `KEYS[1]` and its successors (`ARGV[1]`: the chain's key prefix, `ARGV[2]`: walk bound).
/// With `ARGV[3]` (now) set, only an unexpired `KEYS[1]` starts a walk. Returns 1 when it did.
const REVOKE: &str = r"
local key = KEYS[1]
if ARGV[3] ~= '' then
  local e = redis.call('HGET', key, 'e')
  local d = redis.call('HGET', key, 'd')
  if not e or not d then return 0 end
  local now = tonumber(ARGV[3])
  if now >= tonumber(e) or now >= tonumber(d) then
    redis.call('DEL', key)
    return 0
  end
end
local limit = tonumber(ARGV[2])
local n = 0
while key and n < limit do
  local s = redis.call('HGET', key, 's')
  redis.call('DEL', key)
  n = n + 1
  if s then key = ARGV[1] .. s else key = nil end
end
return 1
";

/// Keys a dump's `SCAN` asks for; a batch with more sessions than an empty page has room for is
/// asked again with a smaller count.
const DUMP_SCAN_COUNT: u64 = 100;

/// Where a dump's scan stands: a node and that node's `SCAN` cursor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ScanAt {
    node: usize,
    cursor: u64,
}

/// Where a page resumes: the scan, and inside the batch `SCAN` returns there with `COUNT` `count`,
/// the keys already seen (`skip`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DumpAt {
    at: ScanAt,
    skip: usize,
    count: u64,
}

/// `<node>:<SCAN cursor>:<skip>:<count>`. A page ends before a batch it has no room for, so it
/// resumes inside a batch only when a batch of count 1 (one hash bucket) holds more sessions than
/// a page; such a page resumed
/// after the keyspace was resized may repeat or skip a few sessions (SCAN's own guarantee holds
/// for whole batches): dumps are an operator's view, not an export.
fn dump_cursor(d: DumpAt) -> String {
    format!("{}:{}:{}:{}", d.at.node, d.at.cursor, d.skip, d.count)
}

/// One `SCAN` of a dump: the next cursor and the session keys of the batch.
async fn scan(
    node: &mut redis::aio::MultiplexedConnection,
    cursor: u64,
    pattern: &str,
    count: u64,
) -> Result<(u64, Vec<String>)> {
    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(count).query_async(node).await.map_err(e)
}

/// A cursor of [`dump_cursor`], or of the earlier three-part form (its batches asked 100 keys).
fn parse_dump_cursor(cursor: &str) -> Option<DumpAt> {
    let mut parts = cursor.split(':');
    let node = parts.next()?.parse().ok()?;
    let scan = parts.next()?.parse().ok()?;
    let skip = parts.next()?.parse().ok()?;
    let count = match parts.next() {
        Some(c) => c.parse().ok().filter(|c| (1..=DUMP_SCAN_COUNT).contains(c))?,
        None => DUMP_SCAN_COUNT,
    };
    parts.next().is_none().then_some(DumpAt { at: ScanAt { node, cursor: scan }, skip, count })
}

/// One live rotation for [`ROTATE_LIVE`]: its two keys and three arguments.
struct LiveJob {
    presented: String,
    successor: String,
    now: u64,
    successor_hash: String,
    sealed: Vec<u8>,
}

/// `jobs` in one [`ROTATE_LIVE`] call, one answer each: the successor's record, or `None` when
/// the presented token was not live and unrotated.
async fn rotate_live_many(
    mut conn: Conn,
    script: &Script,
    jobs: Vec<LiveJob>,
) -> Result<Vec<Result<Option<SessionRecord>>>> {
    let mut cmd = evalsha(script, 2 * jobs.len());
    for job in &jobs {
        cmd.arg(&job.presented).arg(&job.successor);
    }
    for job in &jobs {
        cmd.arg(job.now).arg(&job.successor_hash).arg(&job.sealed);
    }
    let answer = send_one(&mut conn, &cmd, Some(ROTATE_LIVE)).await?;
    let answers: Vec<Option<Vec<u8>>> =
        redis::from_redis_value(answer).map_err(|err| StoreError::Backend(format!("live rotation script: {err}")))?;
    if answers.len() != jobs.len() {
        return Err(StoreError::Backend(format!(
            "live rotation script answered {} of {} rotations",
            answers.len(),
            jobs.len()
        )));
    }
    Ok(answers
        .into_iter()
        .map(|a| {
            a.map(|a| {
                live_answer(&a).ok_or_else(|| StoreError::Backend("live rotation script: unreadable answer".into()))
            })
            .transpose()
        })
        .collect())
}

/// A successor's record from [`ROTATE_LIVE`]'s `e:d:t:metadata`.
fn live_answer(answer: &[u8]) -> Option<SessionRecord> {
    let mut parts = answer.splitn(4, |&b| b == b':');
    let mut number = || -> Option<u64> { std::str::from_utf8(parts.next()?).ok()?.parse().ok() };
    let (expires_at, deadline, ttl_ms) = (number()?, number()?, number()?);
    let meta = String::from_utf8(parts.next()?.to_vec()).ok()?;
    Some(SessionRecord { meta, expires_at, deadline, ttl_ms, rotated: None })
}

/// Appends `<prefix>s:{<chain id>}:`, the start of every key of the chain's tokens.
fn push_chain_prefix(out: &mut String, prefix: &str, chain: &ChainId) {
    out.push_str(prefix);
    out.push_str("s:{");
    URL_SAFE_NO_PAD.encode_string(chain.0, out);
    out.push_str("}:");
}

/// The key of a token's record: the chain's prefix and the hash in hex, in one allocation (a
/// rotation writes three keys).
fn session_key(prefix: &str, chain: &ChainId, hash: &TokenHash) -> String {
    let mut key = String::with_capacity(prefix.len() + 22 + 64);
    push_chain_prefix(&mut key, prefix, chain);
    hash.push_hex(&mut key);
    key
}

/// The Redis session store.
#[derive(Clone)]
pub struct RedisSessions {
    redis: Redis,
    create: Script,
    rotate: Script,
    /// Live rotations of a single server, sharing script calls; `None` on a cluster, where the
    /// keys of two sessions sit in different slots and one script cannot touch both.
    live: Option<Batcher<LiveJob, Option<SessionRecord>>>,
    /// [`ROTATE_LIVE`], for a cluster's calls.
    rotate_live: Script,
    revoke: Script,
}

impl std::fmt::Debug for RedisSessions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisSessions").field("redis", &self.redis).finish_non_exhaustive()
    }
}

impl RedisSessions {
    /// Connects to the server or cluster `url` names (`redis://…`, `redis+cluster://h:p,h:p`,
    /// optional `?prefix=`).
    pub async fn open(url: &str) -> Result<Self> {
        let redis = Redis::connect(url).await?;
        let rotate_live = Script::new(ROTATE_LIVE);
        let live = (!redis.is_cluster()).then(|| {
            let (conn, script) = (redis.conn(), rotate_live.clone());
            Batcher::start("redis_rotate_live", MAX_LIVE_BATCH, LIVE_IN_FLIGHT, move |jobs| {
                let (conn, script) = (conn.clone(), script.clone());
                async move { rotate_live_many(conn, &script, jobs).await }
            })
        });
        Ok(Self {
            redis,
            create: Script::new(CREATE),
            rotate: Script::new(ROTATE),
            live,
            rotate_live,
            revoke: Script::new(REVOKE),
        })
    }

    fn chain_prefix(&self, chain: &ChainId) -> String {
        let mut prefix = String::with_capacity(self.redis.prefix.len() + 22);
        push_chain_prefix(&mut prefix, &self.redis.prefix, chain);
        prefix
    }

    fn key(&self, chain: &ChainId, hash: &TokenHash) -> String {
        session_key(&self.redis.prefix, chain, hash)
    }

    async fn load(&self, key: &str) -> Result<Option<SessionRecord>> {
        let mut cmd = redis::cmd("HGETALL");
        cmd.arg(key);
        let fields: HashMap<String, Vec<u8>> = redis::from_redis_value(self.redis.send(cmd, None).await?)
            .map_err(|err| StoreError::Backend(format!("session record: {err}")))?;
        Ok(parse(&fields))
    }

    async fn walk_delete(&self, chain: &ChainId, first: &str, now: Option<u64>) -> Result<bool> {
        let mut conn = self.redis.conn();
        let done: i64 = self
            .revoke
            .key(first)
            .arg(self.chain_prefix(chain))
            .arg(MAX_WALK)
            .arg(now.map(|n| n.to_string()).unwrap_or_default())
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        Ok(done == 1)
    }
}

/// A rotation's steps: plain reads, and a compare-and-set script that applies the decision only
/// if the presented token is still live and unrotated.
struct Steps<'a> {
    store: &'a RedisSessions,
    chain: ChainId,
}

impl RotationSteps for Steps<'_> {
    async fn load(&mut self, hash: &TokenHash, _lock: bool) -> Result<Option<SessionRecord>> {
        self.store.load(&self.store.key(&self.chain, hash)).await
    }

    async fn rotate(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        successor_hash: &TokenHash,
        chain: &ChainId,
        successor: &SessionRecord,
    ) -> Result<bool> {
        let mut cmd = evalsha(&self.store.rotate, 2);
        cmd.arg(self.store.key(&self.chain, presented))
            .arg(self.store.key(chain, successor_hash))
            .arg(rotated.at)
            .arg(rotated.successor.to_hex())
            .arg(rotated.sealed.as_bytes())
            .arg(&successor.meta)
            .arg(successor.expires_at)
            .arg(successor.deadline)
            .arg(successor.ttl_ms);
        let applied: i64 = redis::from_redis_value(self.store.redis.send(cmd, Some(ROTATE)).await?)
            .map_err(|err| StoreError::Backend(format!("rotation script: {err}")))?;
        Ok(applied == 1)
    }

    fn rotates_live(&self) -> bool {
        true
    }

    async fn rotate_live(
        &mut self,
        presented: &TokenHash,
        rotated: &Rotated,
        now: u64,
    ) -> Result<Option<SessionRecord>> {
        let job = LiveJob {
            presented: self.store.key(&self.chain, presented),
            successor: self.store.key(&self.chain, &rotated.successor),
            now,
            successor_hash: rotated.successor.to_hex(),
            sealed: rotated.sealed.as_bytes().to_vec(),
        };
        match &self.store.live {
            Some(live) => live.call(job).await,
            None => {
                let conn = self.store.redis.conn();
                let mut answers = rotate_live_many(conn, &self.store.rotate_live, vec![job]).await?.into_iter();
                answers.next().unwrap_or_else(|| Err(StoreError::Backend("live rotation: no answer".into())))
            }
        }
    }

    async fn revoke(&mut self, chain: &ChainId, from: &TokenHash) -> Result<()> {
        self.store.walk_delete(chain, &self.store.key(chain, from), None).await.map(|_| ())
    }

    async fn remove(&mut self, _hash: &TokenHash) -> Result<()> {
        // Expired keys vanish on their own.
        Ok(())
    }
}

fn number(fields: &HashMap<String, Vec<u8>>, name: &str) -> Option<u64> {
    std::str::from_utf8(fields.get(name)?).ok()?.parse().ok()
}

fn parse(fields: &HashMap<String, Vec<u8>>) -> Option<SessionRecord> {
    let rotated = match (number(fields, "r"), fields.get("s"), fields.get("x")) {
        (Some(at), Some(s), Some(x)) => {
            let successor = TokenHash::from_slice(&hex::decode(s).ok()?)?;
            Some(Rotated { at, successor, sealed: SealedSuccessor::from_slice(x)? })
        }
        _ => None,
    };
    Some(SessionRecord {
        meta: fields.get("m").and_then(|m| String::from_utf8(m.clone()).ok()).unwrap_or_default(),
        expires_at: number(fields, "e")?,
        deadline: number(fields, "d")?,
        ttl_ms: number(fields, "t")?,
        rotated,
    })
}

#[async_trait]
impl SessionStore for RedisSessions {
    fn backend(&self) -> &'static str {
        if self.redis.is_cluster() {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    async fn create(&self, token: &SessionToken, r: &SessionRecord) -> Result<()> {
        let mut cmd = evalsha(&self.create, 1);
        cmd.arg(self.key(&token.chain(), &token.hash())).arg(&r.meta).arg(r.expires_at).arg(r.deadline).arg(r.ttl_ms);
        self.redis.send(cmd, Some(CREATE)).await.map(|_| ())
    }

    async fn rotate(&self, req: &RotateRequest, policy: &RotationPolicy) -> Result<RotateOutcome> {
        rotate(&mut Steps { store: self, chain: req.presented.chain() }, req, policy).await
    }

    async fn end(&self, token: &SessionToken, now: u64) -> Result<bool> {
        let chain = token.chain();
        self.walk_delete(&chain, &self.key(&chain, &token.hash()), Some(now)).await
    }

    async fn dump(&self, now: u64, after: Option<&str>, limit: usize) -> Result<DumpPage> {
        let resume = match after {
            None => DumpAt { at: ScanAt { node: 0, cursor: 0 }, skip: 0, count: DUMP_SCAN_COUNT },
            Some(c) => parse_dump_cursor(c)
                .filter(|d| d.at.node < self.redis.nodes.len())
                .ok_or_else(|| StoreError::InvalidInput("not a dump cursor of this store".into()))?,
        };
        let (mut at, mut skip) = (resume.at, resume.skip);
        let limit = limit.max(1);
        let pattern = format!("{}s:*", self.redis.prefix);
        let mut entries = Vec::new();
        while at.node < self.redis.nodes.len() {
            // Replicas hold copies of their primary's keys: primaries only.
            let (mut node, primary) = self.redis.node(at.node).await?;
            if primary {
                loop {
                    let room = limit - entries.len();
                    if room == 0 {
                        let next = DumpAt { at, skip: 0, count: DUMP_SCAN_COUNT };
                        return Ok(DumpPage { entries, next: Some(dump_cursor(next)), records: None });
                    }
                    // A batch split by the last page is asked again as it was. Any other that has
                    // more sessions than the page has room for waits for the next page, or, on an
                    // empty page, is asked again smaller: a page then ends between batches, where
                    // SCAN's guarantee (every key present throughout is returned) holds whatever
                    // the keyspace did meanwhile.
                    let mut count = if skip > 0 { resume.count } else { DUMP_SCAN_COUNT };
                    let (next, keys) = loop {
                        let (next, keys) = scan(&mut node, at.cursor, &pattern, count).await?;
                        if skip > 0 || count == 1 || keys.len() <= room {
                            break (next, keys);
                        }
                        if !entries.is_empty() {
                            let next = DumpAt { at, skip: 0, count: DUMP_SCAN_COUNT };
                            return Ok(DumpPage { entries, next: Some(dump_cursor(next)), records: None });
                        }
                        count = (room as u64).min(count / 2).max(1);
                    };
                    for (i, key) in keys.iter().enumerate().skip(skip) {
                        if entries.len() >= limit {
                            let next = DumpAt { at, skip: i, count };
                            return Ok(DumpPage { entries, next: Some(dump_cursor(next)), records: None });
                        }
                        let fields: HashMap<String, Vec<u8>> =
                            redis::cmd("HGETALL").arg(key).query_async(&mut node).await.map_err(e)?;
                        if let Some(r) = parse(&fields).filter(|r| r.is_live(now)) {
                            entries.push(DumpEntry { expires_at: r.expires_at, deadline: r.deadline, meta: r.meta });
                        }
                    }
                    skip = 0;
                    if next == 0 {
                        break;
                    }
                    at.cursor = next;
                }
            }
            at = ScanAt { node: at.node + 1, cursor: 0 };
        }
        Ok(DumpPage { entries, next: None, records: None })
    }

    async fn purge_batch(&self, _now: u64, _max: u64) -> Result<u64> {
        Ok(0)
    }

    async fn check(&self) -> Result<()> {
        let mut conn = self.redis.conn();
        let _: String = redis::cmd("PING").query_async(&mut conn).await.map_err(e)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn live_rotations_take_one_script_call() {
        for backend in [crate::Backend::Redis, crate::Backend::RedisCluster] {
            let Some(db) = crate::testing::fresh(backend).await else { continue };
            let store = RedisSessions::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
            crate::session::live_rotation_case(&store, |chain| Steps { store: &store, chain }).await;
            db.drop_now().await;
        }
    }

    /// A single server's live rotations share a script call: each is answered as it would be
    /// alone, a token presented twice in one call is rotated once, and the rows show it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_live_rotation_call_answers_each_rotation_as_it_would_alone() {
        use tokenserver_core::session::{live_rotation, successor_record};
        const MIN: u64 = 60_000;
        let Some(db) = crate::testing::fresh(crate::Backend::Redis).await else { return };
        let store = RedisSessions::open(&db.url).await.unwrap_or_else(|e| panic!("{e}"));
        let now = tokenserver_core::clock::now_ms();
        let at = now + MIN;
        let (live, other, idle, unknown) = (
            SessionToken::new_session(),
            SessionToken::new_session(),
            SessionToken::new_session(),
            SessionToken::new_session(),
        );
        let live_record = SessionRecord::new(r#"{"a":1}"#.into(), now, 10 * MIN, 25 * MIN);
        let other_record = SessionRecord::new(r#"{"b":2}"#.into(), now, 10 * MIN, 25 * MIN);
        let idle_record = SessionRecord::new("{}".into(), now, MIN, 25 * MIN);
        for (token, record) in [(&live, &live_record), (&other, &other_record), (&idle, &idle_record)] {
            store.create(token, record).await.unwrap_or_else(|e| panic!("create: {e}"));
        }
        // A record whose expiry is not a number: not ours to rotate, and no reason to fail the call.
        let bad = SessionToken::new_session();
        store.create(&bad, &other_record).await.unwrap_or_else(|e| panic!("create: {e}"));
        let mut conn = store.redis.conn();
        let _: i64 = redis::cmd("HSET")
            .arg(store.key(&bad.chain(), &bad.hash()))
            .arg("e")
            .arg("soon")
            .query_async(&mut conn)
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        // The live token twice (two successors), an idle-expired one, an unknown one, the bad one,
        // another live one.
        let requests: Vec<RotateRequest> = [&live, &live, &idle, &unknown, &bad, &other]
            .into_iter()
            .map(|t| RotateRequest { presented: t.clone(), successor: t.successor(), update: None, now: at })
            .collect();
        let jobs = requests
            .iter()
            .map(|req| {
                let rotated = live_rotation(req);
                LiveJob {
                    presented: store.key(&req.presented.chain(), &req.presented.hash()),
                    successor: store.key(&req.presented.chain(), &rotated.successor),
                    now: req.now,
                    successor_hash: rotated.successor.to_hex(),
                    sealed: rotated.sealed.as_bytes().to_vec(),
                }
            })
            .collect();
        let answers: Vec<Option<SessionRecord>> = rotate_live_many(store.redis.conn(), &store.rotate_live, jobs)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
            .into_iter()
            .map(|a| a.unwrap_or_else(|e| panic!("{e}")))
            .collect();
        let live_next = successor_record(&live_record, live_record.meta.clone(), at);
        let other_next = successor_record(&other_record, other_record.meta.clone(), at);
        assert_eq!(answers, vec![Some(live_next.clone()), None, None, None, None, Some(other_next.clone())]);

        let stored = |token: &SessionToken| {
            let key = store.key(&token.chain(), &token.hash());
            let store = &store;
            async move { store.load(&key).await.unwrap_or_else(|e| panic!("{e}")) }
        };
        // Rotated once, to the first request's successor, its metadata moved there.
        let rotated = stored(&live).await.unwrap_or_else(|| panic!("the rotated record is kept"));
        assert_eq!(rotated.meta, "");
        assert_eq!(rotated.rotated, Some(live_rotation(&requests[0])));
        assert_eq!(stored(&requests[0].successor).await, Some(live_next));
        assert_eq!(stored(&requests[1].successor).await, None);
        // Left as they were.
        assert_eq!(stored(&idle).await, Some(idle_record));
        assert_eq!(stored(&unknown).await, None);
        assert_eq!(stored(&requests[2].successor).await, None);
        assert_eq!(stored(&requests[4].successor).await, None);
        assert_eq!(stored(&requests[5].successor).await, Some(other_next));
        db.drop_now().await;
    }

    /// Redis at its `maxmemory` (no eviction) refuses a script that may write before it runs: a
    /// rotation is refused whole (nothing half-applied) and reported as a full store.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_full_redis_refuses_rotations_whole() {
        let Some(redis) = crate::testing::CappedRedis::start("4mb").await else { return };
        let store = RedisSessions::open(&redis.url).await.unwrap_or_else(|e| panic!("{e}"));
        let now = tokenserver_core::clock::now_ms();
        let token = SessionToken::new_session();
        let record = SessionRecord::new(r#"{"a":1}"#.into(), now, 600_000, 3_600_000);
        store.create(&token, &record).await.unwrap_or_else(|e| panic!("{e}"));
        redis.fill().await;
        let policy = RotationPolicy { grace_ms: 1_000, reuse_detection: true, limits: Default::default() };
        let req = RotateRequest { presented: token.clone(), successor: token.successor(), update: None, now: now + 1 };
        match store.rotate(&req, &policy).await {
            Err(StoreError::Full(_)) => {}
            other => panic!("expected Full, got {other:?}"),
        }
        let key = store.key(&token.chain(), &token.hash());
        assert_eq!(store.load(&key).await.unwrap_or_else(|e| panic!("{e}")), Some(record.clone()));
        let next = store.key(&token.chain(), &req.successor.hash());
        assert_eq!(store.load(&next).await.unwrap_or_else(|e| panic!("{e}")), None);
        match store.create(&SessionToken::new_session(), &record).await {
            Err(StoreError::Full(_)) => {}
            other => panic!("expected Full, got {other:?}"),
        }
    }

    /// Keys written before `session_key` built them in one allocation must still be found.
    #[test]
    fn keys_keep_their_layout() {
        for prefix in ["tokenserver:", "", "t1:"] {
            let token = SessionToken::new_session();
            let (chain, hash) = (token.chain(), token.hash());
            let expected = format!("{prefix}s:{{{chain}}}:{}", hex::encode(hash.0));
            assert_eq!(session_key(prefix, &chain, &hash), expected);
            let mut chain_prefix = String::new();
            push_chain_prefix(&mut chain_prefix, prefix, &chain);
            assert_eq!(chain_prefix, format!("{prefix}s:{{{chain}}}:"));
            assert_eq!(hash.to_hex(), hex::encode(hash.0));
        }
    }

    #[test]
    fn live_answers_are_read_whole_or_refused() {
        let record = |meta: &str| SessionRecord {
            meta: meta.into(),
            expires_at: 1_733_400_000_000,
            deadline: 1_733_401_000_000,
            ttl_ms: 600_000,
            rotated: None,
        };
        // The metadata is the rest of the answer, colons and all.
        assert_eq!(live_answer(b"1733400000000:1733401000000:600000:"), Some(record("")));
        assert_eq!(live_answer(br#"1733400000000:1733401000000:600000:{"a":"b:c"}"#), Some(record(r#"{"a":"b:c"}"#)));
        for bad in [&b""[..], b"1:2:3", b"x:2:3:", b"1:-2:3:", b"1:2:3.5:", b"1:2:3:\xff"] {
            assert_eq!(live_answer(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn dump_cursors_round_trip() {
        let d = DumpAt { at: ScanAt { node: 2, cursor: 1234 }, skip: 7, count: 5 };
        assert_eq!(parse_dump_cursor(&dump_cursor(d)), Some(d));
        // The earlier three-part form: its batches asked for 100 keys.
        assert_eq!(parse_dump_cursor("2:1234:7"), Some(DumpAt { count: DUMP_SCAN_COUNT, ..d }));
        for bad in ["", "1", "1:2", "1:2:3:4:5", "x:1:2", "1:-2:3", "1:2:3:0", "1:2:3:101", "1:2:3:x"] {
            assert_eq!(parse_dump_cursor(bad), None, "{bad}");
        }
    }
}
