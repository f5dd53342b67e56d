//! `access import-redis`: 3scale apisonator's tokens, read from its Redis, into the access-token
//! store `access.url` names. Page by page (memory stays flat), several creates in flight per page,
//! idempotent (a token already here is left alone and counted), and a token the rules here refuse
//! (reference §11: padded, control characters, over the size limit, an empty application) is
//! reported and passed over rather than stopping the import.

use futures_util::stream::{self, StreamExt};
use sha2::{Digest, Sha256};
use tokenserver_core::clock::now_ms;
use tokenserver_store::redis::apisonator::{ApisonatorSource, ForeignToken};

use crate::access::{AccessError, AccessTokens};

/// Creates in flight at once (each is one store round trip).
const IN_FLIGHT: usize = 32;

/// What an import did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ImportReport {
    /// Tokens created here.
    pub imported: u64,
    /// Tokens that were here already (an earlier run), left alone.
    pub present: u64,
    /// Tokens the rules here refuse, not imported.
    pub refused: u64,
    /// Keys under apisonator's prefix that are not tokens to import (application sets, other
    /// services, tokens that expired during the run).
    pub passed_over: u64,
}

impl ImportReport {
    /// Tokens read from the source.
    pub fn read(&self) -> u64 {
        self.imported + self.present + self.refused
    }
}

/// A refused token, named without its secret text: its service, the first 12 hex digits of
/// its SHA-256 (enough to find it in the source with a script), and why.
#[derive(Debug)]
pub struct Refusal {
    /// Service id.
    pub service: String,
    /// `sha256:<12 hex>` of the token.
    pub fingerprint: String,
    /// Why.
    pub error: AccessError,
}

/// Runs the import; `progress` is called after each page, `refused` for each refused token.
/// Stops at the first store error (running it again carries on: nothing is imported twice).
pub async fn import_redis(
    access: &AccessTokens,
    source: &mut ApisonatorSource,
    mut progress: impl FnMut(&ImportReport),
    mut refused: impl FnMut(&Refusal),
) -> Result<ImportReport, AccessError> {
    let mut report = ImportReport::default();
    while let Some(page) = source.next_page().await? {
        report.passed_over += page.passed_over;
        let now = now_ms();
        let mut results = stream::iter(page.tokens)
            .map(|t| async move {
                let outcome = access.import(&t, now).await;
                (t, outcome)
            })
            .buffer_unordered(IN_FLIGHT);
        while let Some((t, outcome)) = results.next().await {
            match outcome {
                Ok(true) => report.imported += 1,
                Ok(false) => report.present += 1,
                Err(error @ (AccessError::Format(_) | AccessError::Id { .. })) => {
                    report.refused += 1;
                    refused(&Refusal { service: t.service.clone(), fingerprint: fingerprint(&t), error });
                }
                Err(e) => return Err(e),
            }
        }
        progress(&report);
    }
    Ok(report)
}

fn fingerprint(t: &ForeignToken) -> String {
    let digest = Sha256::digest(t.token.as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..12])
}
