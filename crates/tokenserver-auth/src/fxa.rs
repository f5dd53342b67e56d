//! Firefox Accounts OAuth verification (spec §2) and security event tokens (§1.8).
//!
//! Local first: an RS256 JWT is checked against the key set, its `typ` must be `at+jwt`, `exp`
//! is enforced when present (60 s leeway; an absent `exp` is accepted, as FxA's own verifier
//! does), and its whitespace-separated `scope` must grant Sync by FxA's rules. A token that is
//! not a JWT, or that no key can judge, goes to `POST {server}/v1/verify`. Verified tokens are
//! cached (keyed by a SHA-256 of the token, never the token itself) until their `exp`, capped at
//! `cache_ttl`.
//!
//! Each remote verification is an outbound call a client triggers at will, so they are bounded:
//! at most `remote_concurrency` at once (beyond: [`AuthError::Busy`], a 503 with `Retry-After`),
//! and a token FxA refused is refused again without asking for `refusal_ttl`.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_trait::async_trait;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokenserver_core::sync::scope::{scopes_grant, split_scope_claim};
use tokenserver_core::sync::SYNC_SCOPE;

use crate::jwks::{KeyStore, VerifyKey};
use crate::{AuthError, Identity, TokenVerifier};

/// Largest response body read from FxA.
const MAX_FXA_BODY: usize = 256 * 1024;
/// Leeway on `exp`, as Mozilla's verifiers use.
const LEEWAY_S: u64 = 60;

/// Settings of the FxA verifier.
#[derive(Debug, Clone)]
pub struct FxaSettings {
    /// OAuth server base, e.g. `https://oauth.accounts.firefox.com` (a trailing `/` or `/v1` is
    /// accepted).
    pub server_url: String,
    /// Timeout of every call to FxA.
    pub request_timeout: Duration,
    /// Configured JWKs (primary, secondary). Empty: fetch `/v1/jwks`.
    pub jwks: Vec<crate::jwks::Jwk>,
    /// Entries in the verified-token cache; 0 disables it.
    pub cache_capacity: usize,
    /// Longest a verified token is cached (also the TTL of tokens without `exp`).
    pub cache_ttl: Duration,
    /// Minimum time between two JWKS fetches.
    pub jwks_min_refresh: Duration,
    /// Remote verifications under way at most.
    pub remote_concurrency: usize,
    /// How long a token FxA refused is refused without asking again.
    pub refusal_ttl: Duration,
    /// Webhook: expected SET `aud` and `iss`; both needed to accept any SET.
    pub set_client_id: Option<String>,
    /// Expected SET issuer.
    pub set_issuer: Option<String>,
}

/// Normalises the OAuth server URL to a base ending in `/v1/`.
pub fn oauth_base(server_url: &str) -> Result<url::Url, String> {
    let trimmed = server_url.trim_end_matches('/');
    let trimmed = trimmed.strip_suffix("/v1").unwrap_or(trimmed);
    let url = url::Url::parse(&format!("{trimmed}/v1/")).map_err(|e| format!("invalid URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err("must be an http or https URL".into());
    }
    Ok(url)
}

#[derive(Debug, Clone)]
struct Cached {
    identity: Identity,
    until: u64,
}

/// The FxA OAuth verifier.
pub struct FxaVerifier {
    client: reqwest::Client,
    verify_url: url::Url,
    keys: KeyStore,
    cache: Option<quick_cache::sync::Cache<[u8; 32], Cached>>,
    cache_ttl: Duration,
    /// Tokens FxA refused → until when (unix seconds) they are refused without asking.
    refused: Option<quick_cache::sync::Cache<[u8; 32], u64>>,
    refusal_ttl: Duration,
    remote_slots: tokio::sync::Semaphore,
    set_client_id: Option<String>,
    set_issuer: Option<String>,
}

impl std::fmt::Debug for FxaVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FxaVerifier").field("verify_url", &self.verify_url.as_str()).finish_non_exhaustive()
    }
}

#[derive(Deserialize)]
struct AccessClaims {
    sub: String,
    scope: String,
    #[serde(rename = "fxa-generation", default)]
    generation: Option<i64>,
    #[serde(default)]
    exp: Option<u64>,
    #[serde(default)]
    iss: Option<String>,
}

#[derive(Deserialize)]
struct RemoteVerify {
    user: String,
    scope: Vec<String>,
    #[serde(default)]
    generation: Option<i64>,
}

/// Claims of an FxA security event token.
#[derive(Debug, Clone, Deserialize)]
pub struct SetClaims {
    /// The FxA uid the events are about.
    pub sub: String,
    /// Issuer.
    pub iss: String,
    /// Event URI → event data.
    pub events: serde_json::Value,
}

fn now_s() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn typ_ok(typ: Option<&str>) -> bool {
    let Some(typ) = typ else { return false };
    let full = if typ.contains('/') { typ.to_string() } else { format!("application/{typ}") };
    full.eq_ignore_ascii_case("application/at+jwt")
}

/// Reads a response body of at most [`MAX_FXA_BODY`] bytes.
pub(crate) async fn read_limited(mut resp: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_FXA_BODY {
            return Err("response too large".into());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The keys to try, in order: those whose `kid` matches the token's if any do, else all.
fn candidates<'a>(keys: &'a [VerifyKey], kid: Option<&'a str>) -> impl Iterator<Item = &'a VerifyKey> {
    let matching = kid.filter(|kid| keys.iter().any(|k| k.kid == *kid));
    keys.iter().filter(move |k| matching.is_none_or(|m| k.kid == m))
}

/// A JWT's signed part (`header.payload`) and its decoded signature; `None` when the token does
/// not have that shape.
fn signed_parts(token: &str) -> Option<(&[u8], Vec<u8>)> {
    let (message, signature) = token.rsplit_once('.')?;
    message.split_once('.')?;
    Some((message.as_bytes(), URL_SAFE_NO_PAD.decode(signature).ok()?))
}

/// `exp` passed, with [`LEEWAY_S`] of tolerance (jsonwebtoken's rule: `exp < now - leeway`).
fn expired(exp: u64, now: u64) -> bool {
    exp < now.saturating_sub(LEEWAY_S)
}

enum Local {
    Verified(Identity, Option<u64>),
    /// Not something the key set can judge: ask FxA.
    AskRemote,
}

impl FxaVerifier {
    /// Builds the verifier. Fails on an invalid server URL or a configured JWK that is unusable.
    pub fn new(settings: &FxaSettings) -> Result<Self, String> {
        let base = oauth_base(&settings.server_url)?;
        let client = reqwest::Client::builder()
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout)
            .build()
            .map_err(|e| e.to_string())?;
        let verify_url = base.join("verify").map_err(|e| e.to_string())?;
        let keys = if settings.jwks.is_empty() {
            let jwks_url = base.join("jwks").map_err(|e| e.to_string())?;
            KeyStore::remote(jwks_url, client.clone(), settings.jwks_min_refresh)
        } else {
            let mut keys = Vec::new();
            for jwk in &settings.jwks {
                keys.push(jwk.to_key().ok_or("a configured JWK is not a usable RS256 public key")?);
            }
            KeyStore::fixed(keys)
        };
        let cache = (settings.cache_capacity > 0).then(|| quick_cache::sync::Cache::new(settings.cache_capacity));
        let refused = (settings.cache_capacity > 0 && !settings.refusal_ttl.is_zero())
            .then(|| quick_cache::sync::Cache::new(settings.cache_capacity));
        Ok(Self {
            client,
            verify_url,
            keys,
            cache,
            cache_ttl: settings.cache_ttl,
            refused,
            refusal_ttl: settings.refusal_ttl,
            remote_slots: tokio::sync::Semaphore::new(settings.remote_concurrency.max(1)),
            set_client_id: settings.set_client_id.clone(),
            set_issuer: settings.set_issuer.clone(),
        })
    }

    /// Fetches the JWKS now (at startup) when keys come from FxA.
    /// Logs the key ids in use (never the keys' material).
    pub async fn prefetch_keys(&self) -> usize {
        let (keys, source) = if self.keys.is_remote() {
            (self.keys.refresh().await, "jwks")
        } else {
            (self.keys.current(), "configured")
        };
        let kids: Vec<&str> = keys.iter().map(|k| k.kid.as_str()).collect();
        if kids.is_empty() {
            tracing::warn!(
                source,
                "no FxA signing key yet: tokens are verified by FxA's /v1/verify until one is fetched"
            );
        } else {
            tracing::info!(source, kids = %kids.join(","), "FxA signing keys in use");
        }
        keys.len()
    }

    /// Keys held now (for the heartbeat).
    pub fn key_count(&self) -> usize {
        self.keys.current().len()
    }

    /// The key set to judge a token whose header names `kid`: the held keys, refreshed first
    /// (rate-limited) when they come from FxA and none matches `kid`.
    async fn keys_for(&self, kid: Option<&str>) -> Arc<Vec<VerifyKey>> {
        let keys = self.keys.current();
        let known = match kid {
            Some(kid) => keys.iter().any(|k| k.kid == kid),
            None => !keys.is_empty(),
        };
        if known || !self.keys.is_remote() {
            return keys;
        }
        self.keys.refresh().await
    }

    async fn verify_local(&self, token: &str) -> Result<Local, AuthError> {
        let Ok(header) = jsonwebtoken::decode_header(token) else {
            return Ok(Local::AskRemote);
        };
        if header.alg != Algorithm::RS256 {
            metrics::counter!("tokenserver_jwt_errors_total", "kind" => "decoding_error").increment(1);
            return Ok(Local::AskRemote);
        }
        let keys = self.keys_for(header.kid.as_deref()).await;
        if keys.is_empty() {
            return Ok(Local::AskRemote);
        }
        // The signature is checked with each key's pre-parsed form (see `VerifyKey`), then the
        // claims are read: the steps and outcomes `jsonwebtoken::decode` had here (RS256, no
        // required claims, no audience, `exp` with `LEEWAY_S`), whose own signature check would
        // rebuild the key for every token.
        let Some((message, signature)) = signed_parts(token) else {
            metrics::counter!("tokenserver_jwt_errors_total", "kind" => "decoding_error").increment(1);
            return Ok(Local::AskRemote);
        };
        if !candidates(&keys, header.kid.as_deref()).any(|key| key.verifies_rs256(message, &signature)) {
            return Err(AuthError::Invalid("bad signature"));
        }
        // The header was decoded above; only the claims are read now.
        let Ok(claims) = jsonwebtoken::dangerous::insecure_decode_claims::<AccessClaims>(token) else {
            metrics::counter!("tokenserver_jwt_errors_total", "kind" => "decoding_error").increment(1);
            return Ok(Local::AskRemote);
        };
        if claims.exp.is_some_and(|exp| expired(exp, now_s())) {
            return Err(AuthError::Invalid("token expired"));
        }
        if !typ_ok(header.typ.as_deref()) {
            return Err(AuthError::Invalid("token type is not at+jwt"));
        }
        if !scopes_grant(split_scope_claim(&claims.scope), SYNC_SCOPE) {
            return Err(AuthError::Invalid("token lacks the sync scope"));
        }
        let issuer = claims.iss.unwrap_or_else(|| self.verify_url.origin().ascii_serialization());
        let identity = Identity { fxa_uid: claims.sub, generation: claims.generation.filter(|g| *g != 0), issuer };
        Ok(Local::Verified(identity, claims.exp))
    }

    async fn verify_remote(&self, token: &str) -> Result<Identity, AuthError> {
        let Ok(_slot) = self.remote_slots.try_acquire() else {
            return Err(AuthError::Busy);
        };
        let resp = self
            .client
            .post(self.verify_url.clone())
            .json(&serde_json::json!({ "token": token }))
            .send()
            .await
            .map_err(|e| {
                AuthError::Unavailable(if e.is_timeout() { "timeout".into() } else { "unreachable".into() })
            })?;
        let status = resp.status();
        if status.is_server_error() {
            return Err(AuthError::Unavailable(format!("FxA answered {status}")));
        }
        if !status.is_success() {
            return Err(AuthError::Invalid("rejected by FxA"));
        }
        let body = read_limited(resp).await.map_err(AuthError::Unavailable)?;
        let verified: RemoteVerify =
            serde_json::from_slice(&body).map_err(|_| AuthError::Invalid("unexpected FxA verify response"))?;
        if !scopes_grant(verified.scope.iter().map(String::as_str), SYNC_SCOPE) {
            return Err(AuthError::Invalid("token lacks the sync scope"));
        }
        Ok(Identity {
            fxa_uid: verified.user,
            generation: verified.generation.filter(|g| *g != 0),
            issuer: self.verify_url.origin().ascii_serialization(),
        })
    }

    /// Verifies an FxA security event token (webhook). Every configured or fetched key is tried.
    pub async fn verify_set(&self, token: &str) -> Result<SetClaims, AuthError> {
        let (Some(client_id), Some(issuer)) = (&self.set_client_id, &self.set_issuer) else {
            return Err(AuthError::Invalid("webhook verification is not configured"));
        };
        let header = jsonwebtoken::decode_header(token).map_err(|_| AuthError::Invalid("not a JWT"))?;
        if header.alg != Algorithm::RS256 {
            return Err(AuthError::Invalid("SET must be RS256"));
        }
        let mut validation = Validation::new(Algorithm::RS256);
        validation.required_spec_claims = HashSet::new();
        validation.leeway = LEEWAY_S;
        validation.set_audience(&[client_id]);
        validation.set_issuer(&[issuer]);
        let keys = self.keys_for(header.kid.as_deref()).await;
        for key in candidates(&keys, header.kid.as_deref()) {
            match jsonwebtoken::decode::<SetClaims>(token, &key.key, &validation) {
                Ok(data) => return Ok(data.claims),
                Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::InvalidSignature) => continue,
                Err(_) => return Err(AuthError::Invalid("invalid SET")),
            }
        }
        Err(AuthError::Invalid("bad SET signature"))
    }
}

#[async_trait]
impl TokenVerifier for FxaVerifier {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let cache_key: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = now_s();
        if let Some(hit) = self.cache.as_ref().and_then(|c| c.get(&cache_key)) {
            if hit.until > now {
                return Ok(hit.identity);
            }
        }
        let (identity, exp) = match self.verify_local(token).await? {
            Local::Verified(identity, exp) => (identity, exp),
            Local::AskRemote => {
                if self.refused.as_ref().and_then(|c| c.get(&cache_key)).is_some_and(|until| until > now) {
                    return Err(AuthError::Invalid("refused by FxA moments ago"));
                }
                match self.verify_remote(token).await {
                    Ok(identity) => (identity, None),
                    Err(AuthError::Invalid(why)) => {
                        if let Some(refused) = &self.refused {
                            refused.insert(cache_key, now + self.refusal_ttl.as_secs().max(1));
                        }
                        return Err(AuthError::Invalid(why));
                    }
                    Err(other) => return Err(other),
                }
            }
        };
        if let Some(cache) = &self.cache {
            let cap = now + self.cache_ttl.as_secs();
            let until = exp.map_or(cap, |e| e.min(cap));
            if until > now {
                cache.insert(cache_key, Cached { identity: identity.clone(), until });
            }
        }
        Ok(identity)
    }
}

/// Lets tests and the server share one verifier behind an `Arc`.
#[async_trait]
impl TokenVerifier for Arc<FxaVerifier> {
    async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        self.as_ref().verify(token).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_is_checked_with_the_leeway() {
        let now = 1_000_000;
        assert!(!expired(now, now));
        assert!(!expired(now - LEEWAY_S, now), "at the edge of the leeway");
        assert!(expired(now - LEEWAY_S - 1, now));
        assert!(!expired(0, 10), "no underflow near the epoch");
    }

    #[test]
    fn signed_parts_are_header_payload_and_the_decoded_signature() {
        let (message, signature) = signed_parts("aGVhZA.cGF5bG9hZA.c2ln").unwrap();
        assert_eq!(message, b"aGVhZA.cGF5bG9hZA");
        assert_eq!(signature, b"sig");
        assert!(signed_parts("aGVhZA.c2ln").is_none(), "two segments");
        assert!(signed_parts("aGVhZA.cGF5bG9hZA.c2ln=").is_none(), "padded signature");
        assert!(signed_parts("aGVhZA.cGF5bG9hZA.c2l+").is_none(), "not base64url");
    }

    #[test]
    fn oauth_base_normalisation() {
        for input in [
            "https://oauth.accounts.firefox.com",
            "https://oauth.accounts.firefox.com/",
            "https://oauth.accounts.firefox.com/v1",
            "https://oauth.accounts.firefox.com/v1/",
        ] {
            let base = oauth_base(input).map(|u| u.to_string());
            assert_eq!(base.as_deref(), Ok("https://oauth.accounts.firefox.com/v1/"), "{input}");
        }
        assert!(oauth_base("ftp://x").is_err());
        assert!(oauth_base("not a url").is_err());
    }

    #[test]
    fn typ_rules() {
        assert!(typ_ok(Some("at+jwt")));
        assert!(typ_ok(Some("application/at+JWT")));
        assert!(!typ_ok(Some("JWT")));
        assert!(!typ_ok(None));
    }
}
