//! RSA verification keys: configured JWKs, or a JWKS fetched from FxA and cached.
//!
//! The fetched set is refreshed only when a token names a `kid` we do not hold (or the set is
//! empty), and at most once per `min_refresh_interval`, so a flood of tokens with made-up key ids
//! cannot turn into a flood of requests to FxA.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use aws_lc_rs::signature::{ParsedPublicKey, RsaPublicKeyComponents, RSA_PKCS1_2048_8192_SHA256};
use jsonwebtoken::{DecodingKey, DecodingKeyKind};
use serde::Deserialize;
use tokio::sync::Mutex;

/// A JWK as FxA publishes it (and as Mozilla's settings spell it).
#[derive(Debug, Clone, Default, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct Jwk {
    /// Must be `RSA`.
    #[serde(default)]
    pub kty: String,
    /// `RS256` (or absent).
    #[serde(default)]
    pub alg: Option<String>,
    /// Key id; may be empty.
    #[serde(default)]
    pub kid: Option<String>,
    /// `sig` (or absent).
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    /// Modulus, base64url.
    #[serde(default)]
    pub n: String,
    /// Exponent, base64url.
    #[serde(default)]
    pub e: String,
    /// FxA's creation timestamp; informational.
    #[serde(default)]
    pub fxa_created_at: Option<i64>,
}

/// A usable verification key.
#[derive(Clone)]
pub struct VerifyKey {
    /// Key id, empty if none.
    pub kid: String,
    /// The RSA public key.
    pub key: DecodingKey,
    /// The same key parsed once for RS256: jsonwebtoken rebuilds an RSA key from its components
    /// for every token, and with it the modulus' Montgomery constants (a modular reduction as
    /// costly as a good part of the verification itself); this one keeps them.
    rs256: Arc<ParsedPublicKey>,
}

impl VerifyKey {
    /// Whether `signature` is this key's RS256 (PKCS#1 v1.5, SHA-256) signature of `message`.
    pub fn verifies_rs256(&self, message: &[u8], signature: &[u8]) -> bool {
        self.rs256.verify_sig(message, signature).is_ok()
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl Jwk {
    /// Converts to a verification key; `None` for keys that are not RSA signature keys.
    pub fn to_key(&self) -> Option<VerifyKey> {
        let rsa = self.kty.eq_ignore_ascii_case("RSA");
        let alg_ok = self.alg.as_deref().is_none_or(|a| a == "RS256");
        let use_ok = self.use_.as_deref().is_none_or(|u| u == "sig");
        if !(rsa && alg_ok && use_ok) {
            return None;
        }
        let key = DecodingKey::from_rsa_components(&self.n, &self.e).ok()?;
        let DecodingKeyKind::RsaModulusExponent { n, e } = key.kind() else { return None };
        let rs256 = RsaPublicKeyComponents { n, e }.to_parsed_public_key(&RSA_PKCS1_2048_8192_SHA256).ok()?;
        Some(VerifyKey { kid: self.kid.clone().unwrap_or_default(), key, rs256: Arc::new(rs256) })
    }
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

/// Where keys come from.
#[derive(Debug)]
enum Source {
    /// Operator-configured keys: never fetched, never refreshed.
    Static,
    /// FxA's `/v1/jwks`.
    Remote { url: url::Url, client: reqwest::Client, min_refresh_interval: Duration },
}

#[derive(Debug)]
struct Fetched {
    keys: Arc<Vec<VerifyKey>>,
    last_attempt: Option<Instant>,
}

/// The current key set.
#[derive(Debug)]
pub struct KeyStore {
    source: Source,
    state: RwLock<Fetched>,
    refresh: Mutex<()>,
}

impl KeyStore {
    /// Keys fixed by configuration.
    pub fn fixed(keys: Vec<VerifyKey>) -> Self {
        Self {
            source: Source::Static,
            state: RwLock::new(Fetched { keys: Arc::new(keys), last_attempt: None }),
            refresh: Mutex::new(()),
        }
    }

    /// Keys fetched from `url` on demand.
    pub fn remote(url: url::Url, client: reqwest::Client, min_refresh_interval: Duration) -> Self {
        Self {
            source: Source::Remote { url, client, min_refresh_interval },
            state: RwLock::new(Fetched { keys: Arc::new(Vec::new()), last_attempt: None }),
            refresh: Mutex::new(()),
        }
    }

    /// The keys held now.
    pub fn current(&self) -> Arc<Vec<VerifyKey>> {
        match self.state.read() {
            Ok(s) => s.keys.clone(),
            Err(poisoned) => poisoned.into_inner().keys.clone(),
        }
    }

    fn last_attempt(&self) -> Option<Instant> {
        match self.state.read() {
            Ok(s) => s.last_attempt,
            Err(poisoned) => poisoned.into_inner().last_attempt,
        }
    }

    /// Fetches the JWKS again unless that was tried less than the minimum interval ago.
    /// Returns the keys held afterwards.
    pub async fn refresh(&self) -> Arc<Vec<VerifyKey>> {
        let Source::Remote { url, client, min_refresh_interval } = &self.source else {
            return self.current();
        };
        let _one_at_a_time = self.refresh.lock().await;
        if self.last_attempt().is_some_and(|t| t.elapsed() < *min_refresh_interval) {
            return self.current();
        }
        let fetched = fetch(client, url).await;
        let mut state = match self.state.write() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        state.last_attempt = Some(Instant::now());
        match fetched {
            Ok(keys) => {
                tracing::info!(keys = keys.len(), "fetched FxA JWKS");
                state.keys = Arc::new(keys);
            }
            // Keep the keys we had: a failed refresh must not disable local verification.
            Err(e) => tracing::warn!(error = %e, "could not fetch FxA JWKS"),
        }
        state.keys.clone()
    }

    /// True when keys come from FxA (and so may be refreshed).
    pub fn is_remote(&self) -> bool {
        matches!(self.source, Source::Remote { .. })
    }
}

async fn fetch(client: &reqwest::Client, url: &url::Url) -> Result<Vec<VerifyKey>, String> {
    let resp = client.get(url.clone()).send().await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let body = crate::fxa::read_limited(resp).await?;
    let set: JwkSet = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    Ok(set.keys.into_iter().filter_map(|v| serde_json::from_value::<Jwk>(v).ok()).filter_map(|j| j.to_key()).collect())
}
