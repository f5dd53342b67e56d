//! Redis and Redis Cluster access-token store.
//!
//! Every key of a service carries the service id as its hash tag, `<prefix>a:{<service>}:…`, so
//! one service sits on one Cluster slot and each call is one script touching that slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:t:<token>` | hash | `a` app, `u` user, `e` expiry (ms; absent when permanent), `c` created |
//! | `…:app:<app>` | sorted set, all scores 0 | the application's tokens as *entries* (below) |
//! | `…:user:<len(app)>:<app>:<user>` | sorted set, all scores 0 | one user's tokens, as entries |
//! | `…:all` | sorted set, all scores 0 | every token of the service (revoking the service) |
//! | `…:exp` | sorted set, score = expiry | the tokens that expire (the sweep) |
//! | `<prefix>a:services` | set | services with tokens (for the sweep; never trimmed) |
//!
//! An entry of a listing set is `<token>\0<user>\0<expiry>\0<created>` (empty for a field that
//! is absent): a page is then one `ZRANGE … BYLEX` and nothing else. Reading each token's hash
//! from a script instead cost Redis ~0.4 ms a page of 100 and put the page's p99 at ~50 ms at 64
//! connections (bench/results/tuning-notes.md). Tokens and ids hold no control characters, so
//! the byte order of entries is the byte order of their tokens, and the entries of a token are
//! rebuilt exactly from its hash when it is deleted. Entries never change while their token
//! lives (re-creating an expired token removes the old ones first).
//!
//! Listing walks the set from just past the last token of the page before: a token present
//! through the whole listing is returned exactly once, and a page costs the same however large
//! the set. A sorted set by expiry could not be paged that way (permanent tokens and tokens
//! created in the same millisecond share a score), so expiry has its own set, which the sweep
//! ([`AccessStore::purge`]) walks from its low end, deleting due tokens and their entries in
//! bounded batches: no index grows for an application that is never listed. Reads compare the
//! expiry with `now`, so an expired token is invisible at once.

use std::collections::HashSet;
use std::sync::Arc;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use parking_lot::Mutex;
use redis::Script;
use tokenserver_core::access::Grant;

use super::{e, Redis};
use crate::access::{AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::StoreError;

/// Index entries a listing may pass over (expired, not yet swept) before it ends a short page.
const LIST_SCAN_FACTOR: usize = 4;
/// Services this process remembers having registered (the set starts over past this).
const REGISTERED_MAX: usize = 10_000;

/// Prepends the helpers every script shares: the listing entry of a token, and a user's set.
macro_rules! lua {
    ($body:literal) => {
        concat!(
            r"
local function entry(tok, u, e, c)
  return tok .. '\0' .. (u or '') .. '\0' .. (e or '') .. '\0' .. (c or '')
end
local function userset(p, a, u)
  return p .. 'user:' .. #a .. ':' .. a .. ':' .. u
end
-- Removes token tok (hash t, fields v = a, u, e, c) and every entry of it.
local function remove(p, t, tok, v)
  local m = entry(tok, v[2], v[3], v[4])
  redis.call('ZREM', p .. 'app:' .. v[1], m)
  if v[2] then redis.call('ZREM', userset(p, v[1], v[2]), m) end
  redis.call('ZREM', p .. 'exp', tok)
  redis.call('ZREM', p .. 'all', tok)
  redis.call('DEL', t)
end
",
            $body
        )
    };
}

/// Creates a token unless a live one exists: 1 done, 0 exists. An expired token not yet swept
/// is replaced (its entries go first). ARGV: key prefix of the service, token, app, user
/// (`''`: none), expiry (`''`: permanent), created, now.
const CREATE: &str = lua!(
    r"
local p, tok = ARGV[1], ARGV[2]
local t = p .. 't:' .. tok
local old = redis.call('HMGET', t, 'a', 'u', 'e', 'c')
if old[1] then
  if not old[3] or tonumber(old[3]) > tonumber(ARGV[7]) then return 0 end
  remove(p, t, tok, old)
end
local a, u, e, c = ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local m = entry(tok, u, e, c)
redis.call('HSET', t, 'a', a, 'c', c)
-- The scores as text: a Lua number handed to redis.call is printed as a double first.
redis.call('ZADD', p .. 'app:' .. a, '0', m)
redis.call('ZADD', p .. 'all', '0', tok)
if u ~= '' then
  redis.call('HSET', t, 'u', u)
  redis.call('ZADD', userset(p, a, u), '0', m)
end
if e ~= '' then
  redis.call('HSET', t, 'e', e)
  redis.call('ZADD', p .. 'exp', e, tok)
end
return 1
"
);

/// Deletes tokens and their entries. ARGV: key prefix, now, then the tokens. Returns how many
/// of them were live.
const DELETE: &str = lua!(
    r"
local p, now, live = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, #ARGV do
  local tok = ARGV[i]
  local t = p .. 't:' .. tok
  local v = redis.call('HMGET', t, 'a', 'u', 'e', 'c')
  if v[1] then
    if not v[3] or tonumber(v[3]) > now then live = live + 1 end
    remove(p, t, tok, v)
  else
    redis.call('ZREM', p .. 'exp', tok)
    redis.call('ZREM', p .. 'all', tok)
  end
end
return live
"
);

/// Deletes the live token `ARGV[2]` (ARGV: key prefix, token, now): 1 done, 0 none live (an
/// expired one is left to the sweep).
const DELETE_LIVE: &str = lua!(
    r"
local p, tok = ARGV[1], ARGV[2]
local t = p .. 't:' .. tok
local v = redis.call('HMGET', t, 'a', 'u', 'e', 'c')
if not v[1] or (v[3] and tonumber(v[3]) <= tonumber(ARGV[3])) then return 0 end
remove(p, t, tok, v)
return 1
"
);

/// The service's due tokens, up to `ARGV[3]` (ARGV: key prefix, now, max), with their entries.
/// Returns how many.
const SWEEP: &str = lua!(
    r"
local p = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', p .. 'exp', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, tok in ipairs(due) do
  local t = p .. 't:' .. tok
  local v = redis.call('HMGET', t, 'a', 'u', 'e', 'c')
  if v[1] then
    remove(p, t, tok, v)
  else
    redis.call('ZREM', p .. 'exp', tok)
    redis.call('ZREM', p .. 'all', tok)
  end
end
return #due
"
);

/// A listing entry read back: (token, user, expiry, created). Split as bytes, and only the
/// token and user checked as UTF-8: a page reads a hundred of these.
fn parse_entry(entry: &[u8]) -> Option<(String, Option<String>, Option<u64>, u64)> {
    let number = |field: &[u8]| std::str::from_utf8(field).ok()?.parse::<u64>().ok();
    let text = |field: &[u8]| std::str::from_utf8(field).ok().map(str::to_string);
    let mut fields = entry.split(|b| *b == 0);
    let (token, user, expires, created) = (fields.next()?, fields.next()?, fields.next()?, fields.next()?);
    if fields.next().is_some() || token.is_empty() {
        return None;
    }
    let expires = match expires {
        [] => None,
        e => Some(number(e)?),
    };
    let user = match user {
        [] => None,
        u => Some(text(u)?),
    };
    Some((text(token)?, user, expires, number(created).unwrap_or(0)))
}

/// The token of an index member (a listing entry, or a bare token from `all`).
fn member_token(member: &str) -> &str {
    member.split('\0').next().unwrap_or(member)
}

/// The Redis access-token store.
#[derive(Clone)]
pub struct RedisAccess {
    redis: Redis,
    create: Script,
    delete: Script,
    delete_live: Script,
    sweep: Script,
    /// Services registered by this process (the registry is never trimmed, so once is enough).
    registered: Arc<Mutex<HashSet<String>>>,
}

impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess").field("redis", &self.redis).finish_non_exhaustive()
    }
}

impl RedisAccess {
    /// Connects to the server or cluster `url` names (see [`super`]).
    pub async fn open(url: &str) -> Result<Self> {
        Ok(Self {
            redis: Redis::connect(url).await?,
            create: Script::new(CREATE),
            delete: Script::new(DELETE),
            delete_live: Script::new(DELETE_LIVE),
            sweep: Script::new(SWEEP),
            registered: Arc::new(Mutex::new(HashSet::new())),
        })
    }

    /// Adds `service` to the registry the sweep walks, once per process.
    async fn register(&self, service: &str) -> Result<()> {
        if self.registered.lock().contains(service) {
            return Ok(());
        }
        let mut conn = self.redis.conn();
        let _: i64 = redis::cmd("SADD").arg(self.registry()).arg(service).query_async(&mut conn).await.map_err(e)?;
        let mut known = self.registered.lock();
        if known.len() >= REGISTERED_MAX {
            known.clear();
        }
        known.insert(service.to_string());
        Ok(())
    }

    /// The key prefix of a service's keys (its id is the hash tag).
    fn service_prefix(&self, service: &str) -> String {
        format!("{}a:{{{service}}}:", self.redis.prefix)
    }

    fn registry(&self) -> String {
        format!("{}a:services", self.redis.prefix)
    }

    /// Runs `DELETE` on the first `max` members of the index `index` (relative to the service
    /// prefix) until it is empty; returns how many live tokens went.
    async fn delete_all(&self, service: &str, index: &str, now: u64) -> Result<u64> {
        let prefix = self.service_prefix(service);
        let key = format!("{prefix}{index}");
        let mut live = 0u64;
        loop {
            let mut conn = self.redis.conn();
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(crate::access::REVOKE_BATCH as i64 - 1)
                .query_async(&mut conn)
                .await
                .map_err(e)?;
            if members.is_empty() {
                return Ok(live);
            }
            let batch: Vec<&str> = members.iter().map(|m| member_token(m)).collect();
            let mut call = self.delete.prepare_invoke();
            call.key(&key).arg(&prefix).arg(now);
            for tok in &batch {
                call.arg(tok);
            }
            let n: u64 = call.invoke_async(&mut conn).await.map_err(e)?;
            live += n;
        }
    }
}

#[async_trait]
impl AccessStore for RedisAccess {
    fn backend(&self) -> &'static str {
        if self.redis.is_cluster() {
            "redis-cluster"
        } else {
            "redis"
        }
    }

    async fn create(&self, t: &NewToken<'_>) -> Result<()> {
        let prefix = self.service_prefix(t.service);
        self.register(t.service).await?;
        let mut conn = self.redis.conn();
        let done: i64 = self
            .create
            .key(format!("{prefix}t:{}", t.token))
            .arg(&prefix)
            .arg(t.token)
            .arg(t.app_id)
            .arg(t.user_id.unwrap_or(""))
            .arg(t.expires_at.map(|v| v.to_string()).unwrap_or_default())
            .arg(t.now)
            .arg(t.now)
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        if done == 1 {
            Ok(())
        } else {
            Err(StoreError::AlreadyExists(format!("token {:?}", t.token)))
        }
    }

    async fn get(&self, service: &str, token: &str, now: u64) -> Result<Option<AccessToken>> {
        // The four fields by name: four values to parse, where `HGETALL` gave eight (names too)
        // and a map to build.
        let mut cmd = redis::cmd("HMGET");
        cmd.arg(format!("{}t:{token}", self.service_prefix(service))).arg(&["a", "u", "e", "c"]);
        type Fields = (Option<String>, Option<String>, Option<String>, Option<String>);
        let (app_id, user_id, expires_at, created_at): Fields =
            redis::from_redis_value(self.redis.send(cmd, None).await?)
                .map_err(|err| StoreError::Backend(format!("access token record: {err}")))?;
        let Some(app_id) = app_id else { return Ok(None) };
        let found = AccessToken {
            token: token.to_string(),
            grant: Grant { app_id, user_id, expires_at: expires_at.and_then(|v| v.parse().ok()) },
            created_at: created_at.and_then(|v| v.parse().ok()).unwrap_or(0),
        };
        Ok(found.grant.live(now).then_some(found))
    }

    async fn delete(&self, service: &str, token: &str, now: u64) -> Result<bool> {
        let prefix = self.service_prefix(service);
        let mut conn = self.redis.conn();
        let done: i64 = self
            .delete_live
            .key(format!("{prefix}t:{token}"))
            .arg(&prefix)
            .arg(token)
            .arg(now)
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        Ok(done == 1)
    }

    async fn list(&self, l: &Listing<'_>) -> Result<TokenPage> {
        let prefix = self.service_prefix(l.service);
        let key = match l.user_id {
            None => format!("{prefix}app:{}", l.app_id),
            Some(user) => format!("{prefix}user:{}:{}:{user}", l.app_id.len(), l.app_id),
        };
        let refused = || StoreError::InvalidInput("not a cursor of this store".into());
        // Just past every entry of the cursor's token: its entries all start `<token>\0`.
        let mut start = match l.after {
            None => "-".to_string(),
            Some(cursor) => {
                let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| refused())?;
                let last = String::from_utf8(bytes).map_err(|_| refused())?;
                format!("[{last}\u{1}")
            }
        };
        let limit = l.limit.max(1);
        let mut budget = limit * LIST_SCAN_FACTOR;
        let mut tokens = Vec::with_capacity(limit);
        let mut last: Option<String> = None;
        let mut conn = self.redis.conn();
        let more = loop {
            let want = limit - tokens.len();
            let entries: Vec<Vec<u8>> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("BYLEX")
                .arg("LIMIT")
                .arg(0)
                .arg(want)
                .query_async(&mut conn)
                .await
                .map_err(e)?;
            let fetched = entries.len();
            for entry in entries {
                let (token, user_id, expires_at, created_at) = parse_entry(&entry)
                    .ok_or_else(|| StoreError::Backend("an access-token index entry is not ours".into()))?;
                last = Some(token.clone());
                let grant = Grant { app_id: l.app_id.to_string(), user_id, expires_at };
                if grant.live(l.now) {
                    tokens.push(AccessToken { token, grant, created_at });
                }
            }
            budget = budget.saturating_sub(fetched);
            if fetched < want {
                break false;
            }
            if tokens.len() >= limit || budget == 0 {
                break true;
            }
            if let Some(t) = &last {
                start = format!("[{t}\u{1}");
            }
        };
        let next = last.filter(|_| more).map(|t| URL_SAFE_NO_PAD.encode(t.as_bytes()));
        Ok(TokenPage { tokens, next })
    }

    async fn revoke_app_batch(&self, service: &str, app_id: &str, now: u64, _max: u64) -> Result<u64> {
        self.delete_all(service, &format!("app:{app_id}"), now).await
    }

    async fn revoke_service_batch(&self, service: &str, now: u64, _max: u64) -> Result<u64> {
        self.delete_all(service, "all", now).await
    }

    /// [`Self::delete_all`] already walks the whole index in batches.
    async fn revoke_app(&self, service: &str, app_id: &str, now: u64) -> Result<u64> {
        self.delete_all(service, &format!("app:{app_id}"), now).await
    }

    async fn revoke_service(&self, service: &str, now: u64) -> Result<u64> {
        self.delete_all(service, "all", now).await
    }

    async fn purge_batch(&self, now: u64, max: u64) -> Result<u64> {
        let mut conn = self.redis.conn();
        let mut cursor: u64 = 0;
        let mut done = 0u64;
        loop {
            let (next, services): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(self.registry())
                .arg(cursor)
                .arg("COUNT")
                .arg(100)
                .query_async(&mut conn)
                .await
                .map_err(e)?;
            for service in services {
                if done >= max {
                    return Ok(done);
                }
                let prefix = self.service_prefix(&service);
                let n: u64 = self
                    .sweep
                    .key(format!("{prefix}exp"))
                    .arg(&prefix)
                    .arg(now)
                    .arg(max - done)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(e)?;
                done += n;
            }
            if next == 0 {
                return Ok(done);
            }
            cursor = next;
        }
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

    #[test]
    fn listing_entries_read_back_as_written() {
        assert_eq!(
            parse_entry(b"tok en\0alice\x001764000000000\x001763990000000"),
            Some(("tok en".into(), Some("alice".into()), Some(1_764_000_000_000), 1_763_990_000_000))
        );
        assert_eq!(parse_entry(b"t\0\0\x005"), Some(("t".into(), None, None, 5)));
        for bad in [&b"t"[..], b"t\0\0", b"\0\0\0", b"t\0u\0x\x001", b"t\0\0\0\0", b"\xff\0\0\0", b"t\0\xfe\0\0"] {
            assert_eq!(parse_entry(bad), None, "{bad:?}");
        }
        assert_eq!(member_token("abc\0u\0\x001"), "abc");
        assert_eq!(member_token("bare"), "bare");
    }
}
