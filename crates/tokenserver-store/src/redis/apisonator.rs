//! Reading 3scale apisonator's access tokens out of its Redis, for `tokenserver access
//! import-redis`: the key layout of the reference's §2 (`oauth_access_tokens/service:<id>/<token>`
//! → the value, with the key's TTL as the token's), read page by page with `SCAN` on each primary
//! so that memory stays flat whatever the source holds. Only reads: the source is never written.
//!
//! apisonator did not escape its keys, so a key cannot always be split back into service and
//! token: without named services the service id ends at the first `/` (3scale's ids are numbers);
//! naming the services ([`ApisonatorSource::open`]) splits at the longest named id instead.

use redis::aio::MultiplexedConnection;

use super::{e, Redis};
use crate::StoreError;

/// Every token key starts so.
const KEY_PREFIX: &str = "oauth_access_tokens/service:";
/// Keys asked of `SCAN` per call (a hint to Redis, not a bound).
const SCAN_COUNT: usize = 500;

/// One token as apisonator holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignToken {
    /// Service id.
    pub service: String,
    /// The token.
    pub token: String,
    /// The key's value: an application id, or R1's `user_len:` encoding of a user and one.
    pub value: String,
    /// Milliseconds left, `None` for a permanent token.
    pub ttl_ms: Option<u64>,
}

/// What one page of the source held.
#[derive(Debug, Default)]
pub struct SourcePage {
    /// The tokens read.
    pub tokens: Vec<ForeignToken>,
    /// Keys under the prefix that are not token keys here: the per-application sets, keys of
    /// services not named, keys that are not UTF-8, and tokens that expired while being read.
    pub passed_over: u64,
}

/// A cursor over a source Redis.
pub struct ApisonatorSource {
    redis: Redis,
    services: Vec<String>,
    node: usize,
    conn: Option<MultiplexedConnection>,
    cursor: u64,
}

impl std::fmt::Debug for ApisonatorSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApisonatorSource")
            .field("node", &self.node)
            .field("cursor", &self.cursor)
            .finish_non_exhaustive()
    }
}

impl ApisonatorSource {
    /// Connects to `url` (`redis://…`, or `redis+cluster://…` for a cluster, read node by node);
    /// `services`, when not empty, are the only services read.
    pub async fn open(url: &str, services: Vec<String>) -> Result<Self, StoreError> {
        let redis = Redis::connect(url).await?;
        Ok(Self { redis, services, node: 0, conn: None, cursor: 0 })
    }

    /// The next page, or `None` once every node has been walked.
    pub async fn next_page(&mut self) -> Result<Option<SourcePage>, StoreError> {
        loop {
            if self.node >= self.redis.nodes.len() {
                return Ok(None);
            }
            if self.conn.is_none() {
                let (conn, primary) = self.redis.node(self.node).await?;
                if !primary {
                    self.node += 1;
                    continue;
                }
                self.conn = Some(conn);
                self.cursor = 0;
            }
            let Some(conn) = self.conn.as_mut() else { continue };
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::cmd("SCAN")
                .arg(self.cursor)
                .arg("MATCH")
                .arg(format!("{KEY_PREFIX}*"))
                .arg("COUNT")
                .arg(SCAN_COUNT)
                .query_async(conn)
                .await
                .map_err(e)?;
            let page = read_keys(conn, &self.services, keys).await?;
            if next == 0 {
                self.node += 1;
                self.conn = None;
            } else {
                self.cursor = next;
            }
            return Ok(Some(page));
        }
    }
}

/// The tokens among `keys`, with their values and TTLs.
async fn read_keys(
    conn: &mut MultiplexedConnection,
    services: &[String],
    keys: Vec<Vec<u8>>,
) -> Result<SourcePage, StoreError> {
    let mut page = SourcePage::default();
    if keys.is_empty() {
        return Ok(page);
    }
    let mut types = redis::pipe();
    for key in &keys {
        types.cmd("TYPE").arg(key);
    }
    let types: Vec<String> = types.query_async(conn).await.map_err(e)?;
    let mut strings = Vec::new();
    for (key, kind) in keys.into_iter().zip(types) {
        let split =
            (kind == "string").then(|| String::from_utf8(key).ok()).flatten().and_then(|k| split_key(&k, services));
        match split {
            Some(parts) => strings.push(parts),
            None => page.passed_over += 1,
        }
    }
    if strings.is_empty() {
        return Ok(page);
    }
    let mut reads = redis::pipe();
    for (service, token) in &strings {
        let key = format!("{KEY_PREFIX}{service}/{token}");
        reads.cmd("GET").arg(&key).cmd("PTTL").arg(&key);
    }
    let values: Vec<redis::Value> = reads.query_async(conn).await.map_err(e)?;
    for ((service, token), pair) in strings.into_iter().zip(values.chunks(2)) {
        let [value, ttl] = pair else { break };
        let value = match value {
            redis::Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
            redis::Value::SimpleString(s) => Some(s.clone()),
            _ => None,
        };
        let ttl = match ttl {
            redis::Value::Int(n) => *n,
            _ => -2,
        };
        match (value, ttl) {
            // -2: gone since the scan; a value that is not UTF-8 names no application here.
            (None, _) | (_, -2) => page.passed_over += 1,
            (Some(value), -1) => page.tokens.push(ForeignToken { service, token, value, ttl_ms: None }),
            (Some(value), left) => {
                let ttl_ms = u64::try_from(left).ok().filter(|l| *l > 0);
                match ttl_ms {
                    Some(_) => page.tokens.push(ForeignToken { service, token, value, ttl_ms }),
                    None => page.passed_over += 1,
                }
            }
        }
    }
    Ok(page)
}

/// `oauth_access_tokens/service:<service>/<token>` → (service, token).
fn split_key(key: &str, services: &[String]) -> Option<(String, String)> {
    let rest = key.strip_prefix(KEY_PREFIX)?;
    let (service, token) = if services.is_empty() {
        rest.split_once('/')?
    } else {
        let service = services
            .iter()
            .filter(|s| rest.len() > s.len() && rest.starts_with(s.as_str()) && rest.as_bytes()[s.len()] == b'/')
            .max_by_key(|s| s.len())?;
        (service.as_str(), &rest[service.len() + 1..])
    };
    (!service.is_empty() && !token.is_empty()).then(|| (service.to_string(), token.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_at_the_first_slash_or_at_a_named_service() {
        let k = "oauth_access_tokens/service:2555417777820/tok/with/slashes";
        assert_eq!(split_key(k, &[]), Some(("2555417777820".into(), "tok/with/slashes".into())));
        let named = vec!["a/b".to_string(), "a".to_string()];
        assert_eq!(split_key("oauth_access_tokens/service:a/b/tok", &named), Some(("a/b".into(), "tok".into())));
        assert_eq!(split_key("oauth_access_tokens/service:a/tok", &named), Some(("a".into(), "tok".into())));
        assert_eq!(split_key("oauth_access_tokens/service:other/tok", &named), None);
        assert_eq!(split_key("oauth_access_tokens/service:a/", &named), None);
        assert_eq!(split_key("something/else", &[]), None);
    }
}
