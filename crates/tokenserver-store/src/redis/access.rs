//! Redis and Redis Cluster access-token store.
//!
//! Every key of a service carries the service id as its hash tag, `<prefix>a:{<service>}:…`, so
//! one service sits on one Cluster slot and each call is one script touching that slot:
//!
//! | key | type | holds |
//! |---|---|---|
//! | `…:t:<token>` | hash | `a` app, `u` user, `e` expiry (ms; absent when permanent), `c` created |
//! | `…:app:<app>` | sorted set, all scores 0 | the application's tokens, in byte order (listing) |
//! | `…:user:<len(app)>:<app>:<user>` | sorted set, all scores 0 | one user's tokens (listing) |
//! | `…:all` | sorted set, all scores 0 | every token of the service (revoking the service) |
//! | `…:exp` | sorted set, score = expiry | the tokens that expire (the sweep) |
//! | `<prefix>a:services` | set | services with tokens (for the sweep; never trimmed) |
//!
//! Listing walks the application's set by byte order (`ZRANGE … BYLEX`) from the last token of
//! the page before: a token present through the whole listing is returned exactly once, and a
//! page costs the same however large the set. A sorted set by expiry could not be paged that way
//! (permanent tokens and tokens created in the same millisecond share a score), so expiry has its
//! own set, which the sweep ([`AccessStore::purge`]) walks from its low end, deleting due tokens
//! and their index entries in bounded batches: no index grows for an application that is never
//! listed. Reads compare the expiry with `now`, so an expired token is invisible at once.

use std::collections::HashMap;

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use redis::{Script, Value};
use tokenserver_core::access::Grant;

use super::{e, Redis};
use crate::access::{AccessStore, AccessToken, Listing, NewToken, Result, TokenPage};
use crate::StoreError;

/// Index entries a listing may pass over (expired, not yet swept) before it ends a short page.
const LIST_SCAN_FACTOR: usize = 4;

/// Creates a token unless a live one exists: 1 done, 0 exists. An expired token not yet swept
/// is replaced (its index entries go first). ARGV: key prefix of the service, token, app, user
/// (`''`: none), expiry (`''`: permanent), created, now.
const CREATE: &str = r"
local p, tok = ARGV[1], ARGV[2]
local t = p .. 't:' .. tok
local old = redis.call('HMGET', t, 'a', 'u', 'e')
if old[1] then
  if not old[3] or tonumber(old[3]) > tonumber(ARGV[7]) then return 0 end
  redis.call('ZREM', p .. 'app:' .. old[1], tok)
  if old[2] then redis.call('ZREM', p .. 'user:' .. #old[1] .. ':' .. old[1] .. ':' .. old[2], tok) end
  redis.call('ZREM', p .. 'exp', tok)
  redis.call('DEL', t)
end
redis.call('HSET', t, 'a', ARGV[3], 'c', ARGV[6])
redis.call('ZADD', p .. 'app:' .. ARGV[3], 0, tok)
redis.call('ZADD', p .. 'all', 0, tok)
if ARGV[4] ~= '' then
  redis.call('HSET', t, 'u', ARGV[4])
  redis.call('ZADD', p .. 'user:' .. #ARGV[3] .. ':' .. ARGV[3] .. ':' .. ARGV[4], 0, tok)
end
if ARGV[5] ~= '' then
  redis.call('HSET', t, 'e', ARGV[5])
  redis.call('ZADD', p .. 'exp', ARGV[5], tok)
end
return 1
";

/// Deletes tokens and their index entries. ARGV: key prefix, now, then the tokens. Returns how
/// many of them were live.
const DELETE: &str = r"
local p, now, live = ARGV[1], tonumber(ARGV[2]), 0
for i = 3, #ARGV do
  local tok = ARGV[i]
  local t = p .. 't:' .. tok
  local v = redis.call('HMGET', t, 'a', 'u', 'e')
  if v[1] then
    if not v[3] or tonumber(v[3]) > now then live = live + 1 end
    redis.call('ZREM', p .. 'app:' .. v[1], tok)
    if v[2] then redis.call('ZREM', p .. 'user:' .. #v[1] .. ':' .. v[1] .. ':' .. v[2], tok) end
    redis.call('DEL', t)
  end
  redis.call('ZREM', p .. 'exp', tok)
  redis.call('ZREM', p .. 'all', tok)
end
return live
";

/// Deletes the live token ARGV[2] (ARGV: key prefix, token, now): 1 done, 0 none live (an
/// expired one is left to the sweep).
const DELETE_LIVE: &str = r"
local p, tok = ARGV[1], ARGV[2]
local t = p .. 't:' .. tok
local v = redis.call('HMGET', t, 'a', 'u', 'e')
if not v[1] or (v[3] and tonumber(v[3]) <= tonumber(ARGV[3])) then return 0 end
redis.call('ZREM', p .. 'app:' .. v[1], tok)
if v[2] then redis.call('ZREM', p .. 'user:' .. #v[1] .. ':' .. v[1] .. ':' .. v[2], tok) end
redis.call('ZREM', p .. 'exp', tok)
redis.call('ZREM', p .. 'all', tok)
redis.call('DEL', t)
return 1
";

/// A page of a listing. ARGV: key prefix, index key (relative to the prefix), start (`-` or
/// `(<token>`), limit, now, most index entries to pass over. Returns `{last seen or '', more (0/1),
/// token, app, user, expiry, created, …}` with `''` for absent fields.
const LIST: &str = r"
local p, idx, start = ARGV[1], ARGV[1] .. ARGV[2], ARGV[3]
local limit, now, budget = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local out, last, more = {}, '', 1
local n = 0
while n < limit and budget > 0 do
  local want = math.min(limit - n, budget)
  local members = redis.call('ZRANGE', idx, start, '+', 'BYLEX', 'LIMIT', 0, want)
  for _, tok in ipairs(members) do
    budget = budget - 1
    last = tok
    local v = redis.call('HMGET', p .. 't:' .. tok, 'a', 'u', 'e', 'c')
    if v[1] and (not v[3] or tonumber(v[3]) > now) then
      n = n + 1
      table.insert(out, tok)
      table.insert(out, v[1])
      table.insert(out, v[2] or '')
      table.insert(out, v[3] or '')
      table.insert(out, v[4] or '0')
    end
  end
  if #members < want then more = 0 break end
  start = '(' .. last
end
table.insert(out, 1, more)
table.insert(out, 1, last)
return out
";

/// The service's due tokens, up to ARGV[3] (ARGV: key prefix, now, max), with their entries.
/// Returns how many.
const SWEEP: &str = r"
local p = ARGV[1]
local due = redis.call('ZRANGEBYSCORE', p .. 'exp', '-inf', ARGV[2], 'LIMIT', 0, tonumber(ARGV[3]))
for _, tok in ipairs(due) do
  local t = p .. 't:' .. tok
  local v = redis.call('HMGET', t, 'a', 'u')
  if v[1] then
    redis.call('ZREM', p .. 'app:' .. v[1], tok)
    if v[2] then redis.call('ZREM', p .. 'user:' .. #v[1] .. ':' .. v[1] .. ':' .. v[2], tok) end
    redis.call('DEL', t)
  end
  redis.call('ZREM', p .. 'all', tok)
  redis.call('ZREM', p .. 'exp', tok)
end
return #due
";

/// The Redis access-token store.
#[derive(Clone)]
pub struct RedisAccess {
    redis: Redis,
    create: Script,
    delete: Script,
    delete_live: Script,
    list: Script,
    sweep: Script,
}

impl std::fmt::Debug for RedisAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisAccess").field("redis", &self.redis).finish_non_exhaustive()
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        Value::Int(i) => Some(i.to_string()),
        _ => None,
    }
}

fn number(v: &Value) -> Option<u64> {
    match v {
        Value::Int(i) => u64::try_from(*i).ok(),
        other => text(other)?.parse().ok(),
    }
}

fn nonempty(s: String) -> Option<String> {
    (!s.is_empty()).then_some(s)
}

impl RedisAccess {
    /// Connects to the server or cluster `url` names (see [`super`]).
    pub async fn open(url: &str) -> Result<Self> {
        Ok(Self {
            redis: Redis::connect(url).await?,
            create: Script::new(CREATE),
            delete: Script::new(DELETE),
            delete_live: Script::new(DELETE_LIVE),
            list: Script::new(LIST),
            sweep: Script::new(SWEEP),
        })
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
            let batch: Vec<String> = redis::cmd("ZRANGE")
                .arg(&key)
                .arg(0)
                .arg(crate::access::REVOKE_BATCH as i64 - 1)
                .query_async(&mut conn)
                .await
                .map_err(e)?;
            if batch.is_empty() {
                return Ok(live);
            }
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
        let mut conn = self.redis.conn();
        let _: i64 = redis::cmd("SADD").arg(self.registry()).arg(t.service).query_async(&mut conn).await.map_err(e)?;
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
        let key = format!("{}t:{token}", self.service_prefix(service));
        let mut conn = self.redis.conn();
        let fields: HashMap<String, String> =
            redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.map_err(e)?;
        let Some(app_id) = fields.get("a").cloned() else { return Ok(None) };
        let found = AccessToken {
            token: token.to_string(),
            grant: Grant {
                app_id,
                user_id: fields.get("u").cloned(),
                expires_at: fields.get("e").and_then(|v| v.parse().ok()),
            },
            created_at: fields.get("c").and_then(|v| v.parse().ok()).unwrap_or(0),
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
        let index = match l.user_id {
            None => format!("app:{}", l.app_id),
            Some(user) => format!("user:{}:{}:{user}", l.app_id.len(), l.app_id),
        };
        let start = match l.after {
            None => "-".to_string(),
            Some(cursor) => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(cursor)
                    .map_err(|_| StoreError::InvalidInput("not a cursor of this store".into()))?;
                let last = String::from_utf8(bytes)
                    .map_err(|_| StoreError::InvalidInput("not a cursor of this store".into()))?;
                format!("({last}")
            }
        };
        let limit = l.limit.max(1);
        let mut conn = self.redis.conn();
        let reply: Vec<Value> = self
            .list
            .key(format!("{prefix}{index}"))
            .arg(&prefix)
            .arg(&index)
            .arg(start)
            .arg(limit)
            .arg(l.now)
            .arg(limit * LIST_SCAN_FACTOR)
            .invoke_async(&mut conn)
            .await
            .map_err(e)?;
        let bad = || StoreError::Backend("unexpected listing reply".into());
        let (head, rest) = reply.split_at_checked(2).ok_or_else(bad)?;
        let last = text(&head[0]).ok_or_else(bad)?;
        let more = number(&head[1]).ok_or_else(bad)? == 1;
        let mut tokens = Vec::with_capacity(rest.len() / 5);
        for row in rest.chunks(5) {
            let [token, app, user, expires, created] = row else { return Err(bad()) };
            tokens.push(AccessToken {
                token: text(token).ok_or_else(bad)?,
                grant: Grant {
                    app_id: text(app).ok_or_else(bad)?,
                    user_id: text(user).and_then(nonempty),
                    expires_at: text(expires).and_then(nonempty).and_then(|v| v.parse().ok()),
                },
                created_at: number(created).unwrap_or(0),
            });
        }
        let next = (more && !last.is_empty()).then(|| URL_SAFE_NO_PAD.encode(last.as_bytes()));
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
