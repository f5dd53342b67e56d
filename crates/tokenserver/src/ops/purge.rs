//! Purging old records (Mozilla's `purge_old_records`): rows replaced longer than a grace period
//! ago belong to users who moved node, changed keys or deleted their account. For each, the
//! user's data is deleted on the storage node the row points to — a Hawk-signed
//! `DELETE {node}/1.5/{uid}` made with a freshly minted token, as if the user deleted it — then
//! the row is deleted and the user's slot on the node freed.
//!
//! Differences from Mozilla's script, on purpose: rows are read oldest first by a keyset cursor
//! (no random offset, so no "loop detected" and no row seen twice in a run); a storage failure
//! re-stamps that row's `replaced_at` and the batch goes on (Mozilla's final version gave up the
//! run); 429, 5xx and transport errors are retried with exponential backoff.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokenserver_core::secret::Secret;
use tokenserver_core::sync::keyid::fxa_kid;
use tokenserver_core::sync::tokenlib::{mint_bytes, random_salt, signing_key};
use tokenserver_store::sync::{OldRecord, OldRecordsQuery};
use tokenserver_store::SyncStore;

use super::OpsError;

/// How long a purge token lives (tokenlib's default).
const TOKEN_LIFETIME_S: u64 = 300;

/// What a purge run does.
#[derive(Debug, Clone)]
pub struct PurgeOptions {
    /// Rows replaced more recently than this are kept (Mozilla's CLI default: one day).
    pub grace_period: Duration,
    /// Rows read per batch.
    pub batch_size: i64,
    /// Stop after deleting this many rows (0: no limit).
    pub max_records: u64,
    /// Report what would be done; call no node and change no row.
    pub dry_run: bool,
    /// Delete the rows of downed nodes without deleting their data (the node is gone for good).
    pub force: bool,
    /// Only uids strictly above this.
    pub uid_above: Option<i64>,
    /// Only uids strictly below this.
    pub uid_below: Option<i64>,
    /// Timeout of one storage request.
    pub request_timeout: Duration,
    /// Retries of a storage request that failed with 429, 5xx or a transport error.
    pub retries: u32,
    /// Wait before the first retry; doubled for each one after.
    pub retry_backoff: Duration,
}

impl Default for PurgeOptions {
    fn default() -> Self {
        Self {
            grace_period: Duration::from_secs(86_400),
            batch_size: 100,
            max_records: 0,
            dry_run: false,
            force: false,
            uid_above: None,
            uid_below: None,
            request_timeout: Duration::from_secs(60),
            retries: 3,
            retry_backoff: Duration::from_secs(1),
        }
    }
}

/// What a run did (or, in a dry run, would have done).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct PurgeReport {
    /// Old rows read.
    pub examined: u64,
    /// Rows deleted.
    pub deleted: u64,
    /// Users' data deleted on their storage node (404 included: nothing was there).
    pub data_deleted: u64,
    /// Rows whose node was removed: deleted without a storage call.
    pub nodeless: u64,
    /// Rows of downed nodes deleted without a storage call (`force`).
    pub forced: u64,
    /// Rows of downed nodes kept for later (no `force`).
    pub skipped_downed: u64,
    /// Rows whose storage delete failed: kept, `replaced_at` re-stamped.
    pub failed: u64,
    /// The run stopped at `max_records`.
    pub stopped_at_max: bool,
    /// Nothing was changed.
    pub dry_run: bool,
}

/// One service to purge: its name and its endpoint pattern (`{node}/1.5/{uid}`).
#[derive(Debug, Clone)]
pub struct PurgeTarget {
    /// Service name.
    pub service: String,
    /// Endpoint pattern of the storage API.
    pub pattern: String,
}

/// Why a storage delete failed.
#[derive(Debug, thiserror::Error)]
enum DeleteError {
    #[error("storage node answered {0}")]
    Status(u16),
    #[error("storage request failed: {0}")]
    Transport(String),
    #[error("{0}")]
    Invalid(String),
}

impl DeleteError {
    fn retryable(&self) -> bool {
        match self {
            Self::Status(code) => *code == 429 || *code >= 500,
            Self::Transport(_) => true,
            Self::Invalid(_) => false,
        }
    }

    /// The metric label.
    fn reason(&self) -> &'static str {
        match self {
            Self::Status(code) if *code >= 500 => "http_5xx",
            Self::Status(_) => "http_4xx",
            Self::Transport(_) => "transport",
            Self::Invalid(_) => "invalid",
        }
    }
}

/// Purges old records of the configured services.
pub struct Purger {
    store: Arc<dyn SyncStore>,
    http: reqwest::Client,
    targets: Vec<PurgeTarget>,
    master: Secret<Vec<u8>>,
    sig_key: Secret<[u8; 32]>,
}

impl Purger {
    /// `master_secrets` newest last: tokens are signed with the newest, as the token server does.
    pub fn new(
        store: Arc<dyn SyncStore>,
        targets: Vec<PurgeTarget>,
        master_secrets: &[Secret<String>],
    ) -> Result<Self, OpsError> {
        let newest = master_secrets.last().ok_or_else(|| OpsError::Invalid("no_secret", "no master secret".into()))?;
        let master = newest.expose().as_bytes().to_vec();
        let sig_key = signing_key(&master);
        let http = reqwest::Client::builder()
            .user_agent(concat!("tokenserver-purge/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| OpsError::Invalid("http_client", e.to_string()))?;
        Ok(Self { store, http, targets, master: Secret::new(master), sig_key: Secret::new(sig_key) })
    }

    /// One pass over every service; `progress` is called after each batch with the totals so far.
    pub async fn run(
        &self,
        opts: &PurgeOptions,
        mut progress: impl FnMut(&PurgeReport),
    ) -> Result<PurgeReport, OpsError> {
        let mut report = PurgeReport { dry_run: opts.dry_run, ..PurgeReport::default() };
        let now = super::now_ms();
        let grace = i64::try_from(opts.grace_period.as_millis()).unwrap_or(i64::MAX);
        let batch = opts.batch_size.max(1);
        'services: for target in &self.targets {
            let mut after = None;
            loop {
                let page = self
                    .store
                    .old_records(&OldRecordsQuery {
                        service: &target.service,
                        replaced_before: now.saturating_sub(grace),
                        uid_above: opts.uid_above,
                        uid_below: opts.uid_below,
                        after,
                        limit: batch,
                    })
                    .await?;
                metrics::counter!("tokenserver_purge_examined_total").increment(page.len() as u64);
                for record in &page {
                    if opts.max_records > 0 && report.deleted >= opts.max_records {
                        report.stopped_at_max = true;
                        progress(&report);
                        break 'services;
                    }
                    report.examined += 1;
                    self.purge_one(target, record, opts, &mut report).await?;
                }
                progress(&report);
                match page.last() {
                    Some(last) if page.len() as i64 == batch => after = Some((last.replaced_at, last.uid)),
                    _ => break,
                }
            }
        }
        Ok(report)
    }

    async fn purge_one(
        &self,
        target: &PurgeTarget,
        record: &OldRecord,
        opts: &PurgeOptions,
        report: &mut PurgeReport,
    ) -> Result<(), OpsError> {
        let service = target.service.as_str();
        match (&record.node, record.downed) {
            (None, _) => report.nodeless += 1,
            (Some(_), true) if !opts.force => {
                report.skipped_downed += 1;
                return Ok(());
            }
            (Some(_), true) => report.forced += 1,
            (Some(node), false) => {
                if !opts.dry_run {
                    if let Err(e) = self.delete_data(target, node, record, opts).await {
                        tracing::warn!(service, uid = record.uid, node = %node, error = %e, "purge: storage delete failed");
                        metrics::counter!("tokenserver_purge_failures_total", "reason" => e.reason()).increment(1);
                        report.failed += 1;
                        self.store.bump_replaced_at(service, record.uid, super::now_ms()).await?;
                        return Ok(());
                    }
                }
                report.data_deleted += 1;
            }
        }
        if !opts.dry_run && self.store.delete_user_record(service, record.uid).await? {
            metrics::counter!("tokenserver_purge_deleted_total").increment(1);
        }
        report.deleted += 1;
        Ok(())
    }

    /// `DELETE` of the user's data on `node`, retried as [`DeleteError::retryable`] says.
    async fn delete_data(
        &self,
        target: &PurgeTarget,
        node: &str,
        record: &OldRecord,
        opts: &PurgeOptions,
    ) -> Result<(), DeleteError> {
        let url = target
            .pattern
            .replace("{node}", node)
            .replace("{uid}", &record.uid.to_string())
            .replace("{service}", &target.service);
        let parsed = url::Url::parse(&url).map_err(|e| DeleteError::Invalid(format!("bad storage URL {url}: {e}")))?;
        let mut wait = opts.retry_backoff;
        let mut attempt = 0;
        loop {
            match self.delete_once(&parsed, node, record, opts.request_timeout).await {
                Err(e) if e.retryable() && attempt < opts.retries => {
                    attempt += 1;
                    tokio::time::sleep(wait).await;
                    wait = wait.saturating_mul(2);
                }
                other => return other,
            }
        }
    }

    async fn delete_once(
        &self,
        url: &url::Url,
        node: &str,
        record: &OldRecord,
        timeout: Duration,
    ) -> Result<(), DeleteError> {
        let (id, key) = self.token(node, record);
        let authorization = hawk_header("DELETE", url, &id, key.as_bytes())?;
        let answer = self
            .http
            .delete(url.clone())
            .header(reqwest::header::AUTHORIZATION, authorization)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| DeleteError::Transport(e.without_url().to_string()))?;
        let status = answer.status();
        if status.is_success() || status == reqwest::StatusCode::NOT_FOUND {
            Ok(())
        } else {
            Err(DeleteError::Status(status.as_u16()))
        }
    }

    /// A fresh token for the row's user on `node` and its derived Hawk key.
    fn token(&self, node: &str, record: &OldRecord) -> (String, String) {
        let fxa_uid = record.email.split('@').next().unwrap_or_default();
        // Python's `keys_changed_at or generation`: 0 counts as unknown.
        let kca = record.keys_changed_at.filter(|k| *k != 0);
        let salt = random_salt();
        let payload = serde_json::json!({
            "uid": record.uid,
            "node": node,
            "fxa_uid": fxa_uid,
            "fxa_kid": fxa_kid(kca, record.generation, &record.client_state),
            "expires": tokenserver_core::clock::now_s() + TOKEN_LIFETIME_S,
            "salt": salt,
        });
        let bytes = serde_json::to_vec(&payload).unwrap_or_default();
        let minted = mint_bytes(&bytes, &salt, self.sig_key.expose(), self.master.expose());
        (minted.id, minted.key)
    }
}

/// `Hawk id="…", ts="…", nonce="…", mac="…"` for a body-less request.
fn hawk_header(method: &str, url: &url::Url, id: &str, key: &[u8]) -> Result<String, DeleteError> {
    let host = url.host_str().ok_or_else(|| DeleteError::Invalid(format!("no host in {url}")))?;
    let port = url.port_or_known_default().ok_or_else(|| DeleteError::Invalid(format!("no port for {url}")))?;
    let path = match url.query() {
        Some(q) => format!("{}?{q}", url.path()),
        None => url.path().to_string(),
    };
    let credentials = hawk::Credentials {
        id: id.to_string(),
        key: hawk::Key::new(key, hawk::SHA256).map_err(|e| DeleteError::Invalid(e.to_string()))?,
    };
    let header = hawk::RequestBuilder::new(method, host, port, &path)
        .request()
        .make_header(&credentials)
        .map_err(|e| DeleteError::Invalid(e.to_string()))?;
    Ok(format!("Hawk {header}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_only_what_may_pass_later() {
        assert!(DeleteError::Status(503).retryable());
        assert!(DeleteError::Status(429).retryable());
        assert!(DeleteError::Transport("reset".into()).retryable());
        assert!(!DeleteError::Status(401).retryable());
        assert!(!DeleteError::Invalid("x".into()).retryable());
    }

    #[test]
    fn the_hawk_header_verifies_with_the_derived_key() {
        let url = url::Url::parse("https://node.example.com/1.5/42").unwrap_or_else(|e| unreachable!("{e}"));
        let header = hawk_header("DELETE", &url, "token-id", b"derived-key").unwrap_or_else(|e| unreachable!("{e}"));
        let parsed: hawk::Header = header.trim_start_matches("Hawk ").parse().unwrap_or_else(|e| unreachable!("{e:?}"));
        assert_eq!(parsed.id.as_deref(), Some("token-id"));
        let key = hawk::Key::new(b"derived-key", hawk::SHA256).unwrap_or_else(|e| unreachable!("{e}"));
        let request = hawk::RequestBuilder::new("DELETE", "node.example.com", 443, "/1.5/42").request();
        assert!(request.validate_header(&parsed, &key, Duration::from_secs(60)));
        let wrong = hawk::RequestBuilder::new("DELETE", "node.example.com", 443, "/1.5/43").request();
        assert!(!wrong.validate_header(&parsed, &key, Duration::from_secs(60)));
    }
}
