//! The configuration as written: TOML file keys and environment variables, before validation.
//!
//! Key names follow Mozilla's syncstorage-rs settings (`master_secret`, `host`, `port`,
//! `[tokenserver] database_url`, …) so an upstream `--config` file works unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use tokenserver_auth::jwks::Jwk;

/// Booleans as deployments write them: `true`/`false`, `1`/`0`, `"yes"`/`"no"`.
pub fn lenient_bool<'de, D: Deserializer<'de>>(d: D) -> Result<bool, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Bool(bool),
        Int(i64),
        Str(String),
    }
    match Raw::deserialize(d)? {
        Raw::Bool(b) => Ok(b),
        Raw::Int(0) => Ok(false),
        Raw::Int(1) => Ok(true),
        Raw::Str(s) => match s.trim().to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(true),
            "false" | "0" | "no" | "off" | "" => Ok(false),
            other => Err(serde::de::Error::custom(format!("expected a boolean, found {other:?}"))),
        },
        Raw::Int(other) => Err(serde::de::Error::custom(format!("expected a boolean, found {other}"))),
    }
}

/// An optional boolean written as [`lenient_bool`] accepts.
pub fn lenient_opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
    lenient_bool(d).map(Some)
}

/// One master secret or a list of them (newest last, like mozsvc secrets files).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Secrets {
    /// A single secret.
    One(String),
    /// Several; the last one signs.
    Many(Vec<String>),
}

/// Top level of the file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct FileConfig {
    /// Public listener address.
    pub host: String,
    /// Public listener port.
    pub port: u16,
    /// Token signing secret(s), shared with the storage nodes.
    pub master_secret: Option<Secrets>,
    /// A file holding master secrets, one per line, newest last.
    pub master_secret_file: Option<String>,
    /// Human-readable logs instead of JSON.
    #[serde(deserialize_with = "lenient_bool")]
    pub human_logs: bool,
    /// On SIGTERM, how long in-flight requests may take to finish before their connections are
    /// dropped.
    pub shutdown_timeout: DurationText,
    /// Threads that serve requests (the async runtime's workers); unset: one per core.
    pub worker_threads: Option<usize>,
    /// The internal (admin) listener.
    pub internal: InternalFile,
    /// Sync token service settings (Mozilla's `[tokenserver]` table).
    pub tokenserver: SyncFile,
    /// Session tokens (`[sessions]`).
    pub sessions: SessionsFile,
    /// Access tokens (`[access]`).
    pub access: AccessFile,
    /// Connection limits of both listeners (`[limits]`).
    pub limits: LimitsFile,
    /// The background purge of old Sync records (`[purge]`).
    pub purge: PurgeFile,
    /// The Sync token family's switch (`[sync]`).
    pub sync: SyncSwitchFile,
    /// How the configuration itself is read (`[config]`).
    pub config: ConfigFile,
    /// Mozilla's storage settings: accepted and ignored (we are not a storage node).
    #[serde(skip_serializing)]
    pub syncstorage: Option<serde::de::IgnoredAny>,
}

impl Default for FileConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 8000,
            master_secret: None,
            master_secret_file: None,
            human_logs: false,
            shutdown_timeout: DurationText::Text("30s".into()),
            worker_threads: None,
            internal: InternalFile::default(),
            tokenserver: SyncFile::default(),
            sessions: SessionsFile::default(),
            access: AccessFile::default(),
            limits: LimitsFile::default(),
            purge: PurgeFile::default(),
            sync: SyncSwitchFile::default(),
            config: ConfigFile::default(),
            syncstorage: None,
        }
    }
}

/// `[internal]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct InternalFile {
    /// Internal listener address (loopback by default).
    pub host: String,
    /// Internal listener port.
    pub port: u16,
    /// Internal APIs require `Authorization: Bearer <admin_key>` (generated and kept in the
    /// database when not set).
    pub admin_key: Option<String>,
}

impl Default for InternalFile {
    fn default() -> Self {
        Self { host: "127.0.0.1".into(), port: 8001, admin_key: None }
    }
}

/// One application served at `/1.0/{name}/{version}`.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct ApplicationFile {
    /// Endpoint pattern: `{node}`, `{uid}` and `{service}` are substituted.
    pub pattern: Option<String>,
    /// Default and maximum token lifetime, seconds.
    pub token_duration: Option<u64>,
    /// `node_type` in responses.
    pub node_type: Option<String>,
}

/// `[tokenserver]`: Mozilla's names, plus ours.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SyncFile {
    /// `sqlite:…`, `postgres://…`, `mysql://…`.
    pub database_url: String,
    /// Pool size.
    pub database_pool_max_size: u32,
    /// Seconds to wait for a pooled connection.
    pub database_pool_connection_timeout: f64,
    /// Seconds a request's database call may take before a 504.
    pub database_request_timeout: Option<f64>,
    /// Create / upgrade the schema at startup.
    #[serde(deserialize_with = "lenient_bool")]
    pub run_migrations: bool,
    /// SQLite commit durability: `normal` (survives a process crash; a power cut may lose the
    /// last commits) or `full` (an fsync per commit).
    pub sqlite_synchronous: String,
    /// `email = <fxa_uid>@<fxa_email_domain>`.
    pub fxa_email_domain: String,
    /// HMAC key of the metrics hashes.
    pub fxa_metrics_hash_secret: String,
    /// FxA OAuth server.
    pub fxa_oauth_server_url: String,
    /// Seconds for each call to FxA.
    pub fxa_oauth_request_timeout: f64,
    /// Configured FxA signing key.
    pub fxa_oauth_primary_jwk: Option<Jwk>,
    /// Second key, for rotation.
    pub fxa_oauth_secondary_jwk: Option<Jwk>,
    /// Verified-token cache entries (0 disables).
    pub fxa_oauth_cache_size: usize,
    /// Longest a verified token is cached, seconds.
    pub fxa_oauth_cache_ttl: u64,
    /// Minimum seconds between JWKS fetches.
    pub fxa_oauth_jwks_refresh_interval: u64,
    /// Calls to FxA's `/v1/verify` under way at most; more requests needing one get a 503.
    pub fxa_oauth_verify_concurrency: usize,
    /// Seconds a token FxA refused is refused without asking again (0: always ask).
    pub fxa_oauth_refusal_cache_ttl: u64,
    /// Capacity release fraction (default 0.1).
    pub node_capacity_release_rate: Option<f64>,
    /// `node_type` in responses for applications that do not set one.
    pub node_type: String,
    /// Default and maximum token lifetime, seconds.
    pub token_duration: u64,
    /// Node inserted at startup if missing.
    pub init_node_url: Option<String>,
    /// Its capacity (and initial availability).
    pub init_node_capacity: i64,
    /// Allow creating first rows for unknown users.
    #[serde(deserialize_with = "lenient_bool")]
    pub allow_new_users: bool,
    /// Bucketed assignment: users hash into this many buckets, each assigned to one node (0: off).
    pub buckets: u32,
    /// New users allocated per second at most, whoever vouches for them (0: no limit).
    pub new_user_rate: f64,
    /// New users allocated at once before `new_user_rate` applies.
    pub new_user_burst: u32,
    /// New users per second at most per identity issuer (0: only the global limit).
    pub new_user_rate_per_issuer: f64,
    /// Burst of the per-issuer limit.
    pub new_user_burst_per_issuer: u32,
    /// Token requests doing database work at once at most; more get a 503 at once instead of
    /// queueing (0: 32 × the pool size, at least 256).
    pub database_max_in_flight: usize,
    /// Mount `POST /1.0/webhooks/fxa/events`.
    #[serde(deserialize_with = "lenient_bool")]
    pub fxa_webhook_enabled: bool,
    /// Count webhook events without applying them.
    #[serde(deserialize_with = "lenient_bool")]
    pub fxa_webhook_metrics_only: bool,
    /// Expected SET audience.
    pub fxa_webhook_set_client_id: Option<String>,
    /// Expected SET issuer.
    pub fxa_webhook_set_issuer: Option<String>,
    /// Applications by `name-version`; default `sync-1.5`.
    pub applications: BTreeMap<String, ApplicationFile>,
    /// Mozilla's switch of the Sync token service (`sync.enabled` wins when both are set).
    #[serde(skip_serializing, deserialize_with = "lenient_opt_bool")]
    pub enabled: Option<bool>,
    /// Spanner migration mode: not supported; rejected at validation when set.
    pub spanner_node_id: Option<i64>,
}

impl Default for SyncFile {
    fn default() -> Self {
        Self {
            database_url: "sqlite://tokenserver.db".into(),
            database_pool_max_size: 10,
            database_pool_connection_timeout: 30.0,
            database_request_timeout: None,
            run_migrations: true,
            sqlite_synchronous: "normal".into(),
            fxa_email_domain: "api.accounts.firefox.com".into(),
            fxa_metrics_hash_secret: "secret".into(),
            fxa_oauth_server_url: "https://oauth.accounts.firefox.com".into(),
            fxa_oauth_request_timeout: 10.0,
            fxa_oauth_primary_jwk: None,
            fxa_oauth_secondary_jwk: None,
            fxa_oauth_cache_size: 10_000,
            fxa_oauth_cache_ttl: 300,
            fxa_oauth_jwks_refresh_interval: 30,
            fxa_oauth_verify_concurrency: 32,
            fxa_oauth_refusal_cache_ttl: 30,
            node_capacity_release_rate: None,
            node_type: "spanner".into(),
            token_duration: 3600,
            init_node_url: None,
            init_node_capacity: 100_000,
            allow_new_users: true,
            buckets: 0,
            new_user_rate: 100.0,
            new_user_burst: 1000,
            new_user_rate_per_issuer: 0.0,
            new_user_burst_per_issuer: 1000,
            database_max_in_flight: 0,
            fxa_webhook_enabled: false,
            fxa_webhook_metrics_only: false,
            fxa_webhook_set_client_id: None,
            fxa_webhook_set_issuer: None,
            applications: BTreeMap::new(),
            enabled: None,
            spanner_node_id: None,
        }
    }
}

/// A duration written as text (`"2h"`, `"10min"`, `"1500ms"`, `"60days"`) or as seconds.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum DurationText {
    /// Seconds.
    Seconds(f64),
    /// Human form, parsed by `humantime`.
    Text(String),
}

/// `[sessions]`: session tokens on the internal listener (HaKr option names where they fit).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct SessionsFile {
    /// Serve the session APIs.
    #[serde(deserialize_with = "lenient_bool")]
    pub enabled: bool,
    /// Store: `memory:`, `sqlite:…`, `postgres://…`, `redis://…`, `redis+cluster://h:p,h:p`;
    /// default: the Sync database when it is SQLite or PostgreSQL.
    pub url: Option<String>,
    /// Idle lifetime: each rotation renews it (HaKr `--token-lifetime`).
    pub token_lifetime: DurationText,
    /// Absolute maximum age of a session, whatever its rotations.
    pub max_age: DurationText,
    /// How often expired sessions are removed (HaKr `--purge-interval`).
    pub purge_interval: DurationText,
    /// How long a retried rotation gets the same successor.
    pub grace_period: DurationText,
    /// Revoke a session when a rotated token is reused after the grace period.
    #[serde(deserialize_with = "lenient_bool")]
    pub reuse_detection: bool,
    /// Mount HaKr's `HEAD /dump` (logs all metadata at DEBUG; HaKr `--dump-enabled`).
    #[serde(deserialize_with = "lenient_bool")]
    pub dump_enabled: bool,
    /// Largest metadata, bytes of canonical JSON.
    pub max_meta_bytes: usize,
    /// Deepest metadata nesting.
    pub max_meta_depth: usize,
    /// Most metadata keys (all levels).
    pub max_meta_keys: usize,
    /// Largest request body on the session routes, bytes.
    pub max_body_bytes: usize,
    /// Shards of the memory store.
    pub memory_shards: usize,
    /// Live sessions the memory store holds at most (503 `store_full` beyond).
    pub max_sessions: u64,
    /// Session routes require `Authorization: Bearer <api_key>` (generated and kept in the
    /// database when not set).
    pub api_key: Option<String>,
    /// `false` opens the session routes to anyone who reaches the internal listener; accepted
    /// only when that listener is bound to a loopback address.
    #[serde(deserialize_with = "lenient_bool")]
    pub require_api_key: bool,
}

impl Default for SessionsFile {
    fn default() -> Self {
        Self {
            enabled: true,
            url: None,
            token_lifetime: DurationText::Text("2h".into()),
            max_age: DurationText::Text("30days".into()),
            purge_interval: DurationText::Text("1min".into()),
            grace_period: DurationText::Text("2s".into()),
            reuse_detection: true,
            dump_enabled: false,
            max_meta_bytes: 16 * 1024,
            max_meta_depth: 8,
            max_meta_keys: 256,
            max_body_bytes: 64 * 1024,
            memory_shards: 256,
            max_sessions: 10_000_000,
            api_key: None,
            require_api_key: true,
        }
    }
}

/// `[limits]`: how each listener bounds its connections.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct LimitsFile {
    /// Connections the public listener holds at once; more wait in the accept queue.
    pub public_max_connections: usize,
    /// Connections the internal listener holds at once.
    pub internal_max_connections: usize,
    /// From a request's first byte to its last header.
    pub header_read_timeout: DurationText,
    /// Longest a keep-alive connection may sit between requests.
    pub idle_timeout: DurationText,
    /// From a request's headers to the last byte of its body (408 after).
    pub body_timeout: DurationText,
}

impl Default for LimitsFile {
    fn default() -> Self {
        Self {
            public_max_connections: 8192,
            internal_max_connections: 1024,
            header_read_timeout: DurationText::Text("10s".into()),
            idle_timeout: DurationText::Text("75s".into()),
            body_timeout: DurationText::Text("30s".into()),
        }
    }
}

/// `[access.services."<id>"]`: how apisonator's routes authenticate calls for one service.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct AccessServiceFile {
    /// The provider key that owns the service (`provider_key=`).
    pub provider_key: Option<String>,
    /// Service tokens accepted for the service (`service_token=`): one, or a list.
    pub service_tokens: Option<Secrets>,
}

/// `[access]`: access tokens on the internal listener.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct AccessFile {
    /// Serve the access-token APIs.
    #[serde(deserialize_with = "lenient_bool")]
    pub enabled: bool,
    /// Store: `sqlite:…`, `postgres://…`, `mysql://…`, `redis://…`, `redis+cluster://h:p,h:p`;
    /// default: the Sync database.
    pub url: Option<String>,
    /// Lifetime of a token created without a TTL.
    pub default_ttl: DurationText,
    /// Longest TTL a token may be given (0, permanent, is always allowed).
    pub max_ttl: DurationText,
    /// Longest token, bytes (apisonator's `CONFIG_OAUTH_MAX_TOKEN_SIZE`).
    pub max_token_bytes: usize,
    /// Pages read at once on PostgreSQL or MySQL (the listings' own connections).
    pub listing_connections: u32,
    /// How often expired tokens are reclaimed.
    pub purge_interval: DurationText,
    /// The v1 API requires `Authorization: Bearer <api_key>` (generated and kept in the database
    /// when not set).
    pub api_key: Option<String>,
    /// `false` opens the v1 API without a key; accepted only on a loopback internal listener.
    #[serde(deserialize_with = "lenient_bool")]
    pub require_api_key: bool,
    /// Per-service keys of apisonator's routes.
    pub services: BTreeMap<String, AccessServiceFile>,
}

impl Default for AccessFile {
    fn default() -> Self {
        Self {
            enabled: true,
            url: None,
            default_ttl: DurationText::Text("1day".into()),
            max_ttl: DurationText::Text("365days".into()),
            max_token_bytes: 3584,
            listing_connections: tokenserver_store::LISTING_CONNECTIONS,
            purge_interval: DurationText::Text("1min".into()),
            api_key: None,
            require_api_key: true,
            services: BTreeMap::new(),
        }
    }
}

/// `[purge]`: `serve` purging old Sync records in the background, as `tokenserver purge` does
/// once (Mozilla's `purge_old_records` without `--oneshot`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct PurgeFile {
    /// Run the purge in `serve`.
    #[serde(deserialize_with = "lenient_bool")]
    pub enabled: bool,
    /// Time between runs (each wait drawn within ±30% of it, so web heads drift apart).
    pub interval: DurationText,
    /// Rows replaced more recently than this are kept.
    pub grace_period: DurationText,
    /// Rows read per batch.
    pub batch_size: u32,
    /// Rows deleted per run at most (0: no limit).
    pub max_records: u64,
    /// Timeout of one storage-node request.
    pub request_timeout: DurationText,
}

impl Default for PurgeFile {
    fn default() -> Self {
        Self {
            enabled: false,
            interval: DurationText::Text("1h".into()),
            grace_period: DurationText::Text("1day".into()),
            batch_size: 100,
            max_records: 0,
            request_timeout: DurationText::Text("60s".into()),
        }
    }
}

/// `[sync]`: the Sync token family on or off.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(default)]
pub struct SyncSwitchFile {
    /// Serve Sync tokens (the public listener); default on, or Mozilla's `tokenserver.enabled`.
    #[serde(deserialize_with = "lenient_opt_bool", skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

/// `[config]`: how strictly the configuration is read.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct ConfigFile {
    /// `error` (the default): an unknown key stops startup; `warn`: it is logged and ignored.
    pub unknown_keys: String,
}

impl Default for ConfigFile {
    fn default() -> Self {
        Self { unknown_keys: "error".into() }
    }
}
