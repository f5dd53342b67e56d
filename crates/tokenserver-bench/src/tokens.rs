//! JWT pools for the scenarios, signed with the test key that the server is configured to trust.
//! RS256 signing costs ~1.5 ms, so pools are signed once on every core and cached on disk
//! (`target/bench-cache/`); the tokens carry no `exp` (accepted, as FxA's verifier accepts it),
//! so a cached pool never goes stale.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

const KEY_PEM: &[u8] = include_bytes!("../../tokenserver/tests/fixtures/test-rsa.pem");
const OTHER_KEY_PEM: &[u8] = include_bytes!("../../tokenserver/tests/fixtures/other-rsa.pem");
const JWK: &str = include_str!("../../tokenserver/tests/fixtures/test-rsa.jwk.json");
pub const SYNC_SCOPE: &str = "https://identity.mozilla.com/apps/oldsync";

/// What one token says.
#[derive(Debug, Clone)]
pub struct Claims {
    pub sub: String,
    pub generation: Option<i64>,
    pub scope: &'static str,
    pub other_key: bool,
}

fn sign(c: &Claims) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.typ = Some("at+jwt".into());
    header.kid = Some("test-rsa".into());
    let mut claims =
        json!({"sub": c.sub, "scope": c.scope, "client_id": "bench", "iss": "https://accounts.firefox.com"});
    if let Some(g) = c.generation {
        claims["fxa-generation"] = json!(g);
    }
    let key = EncodingKey::from_rsa_pem(if c.other_key { OTHER_KEY_PEM } else { KEY_PEM });
    key.and_then(|k| jsonwebtoken::encode(&header, &claims, &k)).unwrap_or_default()
}

/// Environment that makes the server trust the bench key (no FxA involved).
pub fn jwk_env() -> Vec<(String, String)> {
    let jwk: serde_json::Value = serde_json::from_str(JWK).unwrap_or_default();
    ["kty", "alg", "kid", "use", "n", "e"]
        .iter()
        .map(|k| {
            (
                format!("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__{}", k.to_uppercase()),
                jwk[*k].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

/// A pool named `name` of `count` tokens made by `claims(i)`, from the cache or signed now.
pub fn pool(cache: &Path, name: &str, count: usize, claims: impl Fn(usize) -> Claims + Sync) -> Vec<String> {
    let file: PathBuf = cache.join(format!("{name}-{count}.txt"));
    if let Ok(text) = std::fs::read_to_string(&file) {
        let tokens: Vec<String> = text.lines().map(String::from).collect();
        if tokens.len() == count {
            return tokens;
        }
    }
    eprintln!("signing {count} tokens for {name} (cached in {})", file.display());
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let mut out = vec![String::new(); count];
    let chunk = count.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for (t, slice) in out.chunks_mut(chunk).enumerate() {
            let claims = &claims;
            s.spawn(move || {
                for (j, slot) in slice.iter_mut().enumerate() {
                    *slot = sign(&claims(t * chunk + j));
                }
            });
        }
    });
    let _ = std::fs::create_dir_all(cache);
    let _ = std::fs::write(&file, out.join("\n"));
    out
}
