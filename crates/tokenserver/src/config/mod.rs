//! Configuration: defaults → TOML file → `SYNC_*` → `TOKENSERVER_*`, then validated into a
//! [`Config`] whose fields cannot be invalid. A bad value stops startup with one line naming the
//! key as the user wrote it; so does an unknown key ([`strict`]), unless the operator asks for a
//! warning instead.

pub mod check;
mod env;
mod file;
pub mod strict;

use std::path::Path;
use std::time::Duration;

use figment::providers::{Format, Serialized, Toml};
use figment::Figment;
use tokenserver_auth::fxa::{oauth_base, FxaSettings};
use tokenserver_core::Secret;
use tokenserver_store::PoolSettings;

pub use file::FileConfig;

/// A configuration problem, naming the key.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    /// The key, as the configuration model names it (dotted), or as the user wrote it once
    /// [`ConfigError::named`] has run.
    pub key: Option<String>,
    /// What is wrong with it.
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.key {
            Some(key) => write!(f, "invalid configuration: {key}: {}", self.message),
            None => write!(f, "invalid configuration: {}", self.message),
        }
    }
}

impl ConfigError {
    /// A problem that is no single key's.
    pub fn plain(message: impl Into<String>) -> Self {
        Self { key: None, message: message.into() }
    }

    /// The key renamed to what the user wrote: the environment variable that set it, if one did.
    fn named(mut self, sources: strict::Sources<'_>) -> Self {
        self.key = self.key.map(|k| sources.name_dotted(&k));
        self
    }
}

fn bad(key: &str, why: impl std::fmt::Display) -> ConfigError {
    ConfigError { key: Some(key.to_string()), message: why.to_string() }
}

/// True for the values example files put where a secret goes (`INSERT_SECRET_KEY_HERE`,
/// `changeme`, `<your secret>`): a server started with one would sign with a public string.
fn is_placeholder(value: &str) -> bool {
    let v = value.trim();
    let upper = v.to_ascii_uppercase();
    (upper.starts_with("INSERT_") && upper.ends_with("_HERE"))
        || ["CHANGEME", "CHANGE_ME", "CHANGE-ME", "REPLACEME", "REPLACE_ME", "REPLACE-ME"].contains(&upper.as_str())
        || (v.starts_with('<') && v.ends_with('>'))
}

/// Refuses a placeholder where a secret goes.
fn check_secret(key: &str, value: &str) -> Result<(), ConfigError> {
    if is_placeholder(value) {
        return Err(bad(key, format!("{value:?} is a placeholder: set a real secret (e.g. `openssl rand -hex 32`)")));
    }
    Ok(())
}

/// One application served at `/1.0/{name}/{version}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Application {
    /// URL `{application}` segment.
    pub name: String,
    /// URL `{version}` segment.
    pub version: String,
    /// `services.service`: `name-version`.
    pub service: String,
    /// Endpoint pattern.
    pub pattern: String,
    /// Default and maximum token lifetime, seconds.
    pub token_duration: u64,
    /// `node_type` in responses.
    pub node_type: String,
}

/// Database settings.
#[derive(Debug, Clone)]
pub struct DatabaseConfig {
    /// URL (may hold a password: never logged).
    pub url: Secret<String>,
    /// Pool.
    pub pool: PoolSettings,
    /// Per-call timeout on the request path.
    pub request_timeout: Option<Duration>,
    /// Migrate at startup.
    pub run_migrations: bool,
}

/// Sync protocol settings.
#[derive(Debug, Clone)]
pub struct SyncConfig {
    /// The family is served (`sync.enabled`, or Mozilla's `tokenserver.enabled`): the public
    /// listener, the Sync tables, the FxA keys. Off: none of them.
    pub enabled: bool,
    /// Applications, `sync-1.5` by default.
    pub applications: Vec<Application>,
    /// `@domain` of emails.
    pub email_domain: String,
    /// HMAC key of the metrics hashes.
    pub metrics_hash_secret: Secret<String>,
    /// Capacity release fraction.
    pub release_rate: f64,
    /// Allow first rows for unknown users.
    pub allow_new_users: bool,
    /// The new-user allocation limits.
    pub new_users: NewUserLimits,
    /// Token requests doing database work at once at most.
    pub max_in_flight: usize,
    /// Bucketed assignment: the number of buckets; `None`: off.
    pub buckets: Option<i64>,
    /// Node added at startup.
    pub init_node: Option<(String, i64)>,
}

impl SyncConfig {
    /// The services of the applications, each once (applications may share one), in order.
    pub fn services(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for app in &self.applications {
            if !out.contains(&app.service.as_str()) {
                out.push(&app.service);
            }
        }
        out
    }
}

/// Webhook settings.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    /// Route mounted.
    pub enabled: bool,
    /// Count only.
    pub metrics_only: bool,
}

/// Session-token settings.
#[derive(Debug, Clone)]
pub struct SessionsConfig {
    /// Store URL (may hold a password: never logged).
    pub url: Secret<String>,
    /// Idle lifetime.
    pub token_lifetime: Duration,
    /// Absolute maximum age.
    pub max_age: Duration,
    /// Purge period.
    pub purge_interval: Duration,
    /// Rotation rule (grace, reuse detection, metadata limits).
    pub policy: tokenserver_core::session::RotationPolicy,
    /// HaKr's `HEAD /dump`.
    pub dump_enabled: bool,
    /// Request body bound on the session routes.
    pub max_body_bytes: usize,
    /// Memory store layout and bound.
    pub memory: tokenserver_store::memory::MemoryOptions,
    /// Bearer key of the session routes.
    pub api_key: Option<Secret<String>>,
    /// Session routes need a key (`false` only on a loopback internal listener).
    pub require_api_key: bool,
}

/// How a listener bounds its connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most connections open at once.
    pub max_connections: usize,
    /// From the first byte of a request to its last header.
    pub header_read_timeout: Duration,
    /// Longest a connection may sit between requests.
    pub idle_timeout: Duration,
    /// From the request's headers to the last byte of its body.
    pub body_timeout: Duration,
}

/// Connection limits of both listeners.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ListenerLimits {
    /// The public listener's.
    pub public: Limits,
    /// The internal listener's.
    pub internal: Limits,
}

/// The keys apisonator's routes accept for one service.
#[derive(Debug, Clone, Default)]
pub struct AccessServiceKeys {
    /// `provider_key`.
    pub provider_key: Option<Secret<String>>,
    /// `service_token`s.
    pub service_tokens: Vec<Secret<String>>,
}

/// Access-token settings.
#[derive(Debug, Clone)]
pub struct AccessConfig {
    /// Store URL (may hold a password: never logged).
    pub url: Secret<String>,
    /// TTL of a token created without one, seconds.
    pub default_ttl_s: u64,
    /// Longest TTL, seconds.
    pub max_ttl_s: u64,
    /// Longest token, bytes.
    pub max_token_bytes: usize,
    /// Connections of the listings (PostgreSQL, MySQL).
    pub listing_connections: u32,
    /// Purge period.
    pub purge_interval: Duration,
    /// Bearer key of the v1 API.
    pub api_key: Option<Secret<String>>,
    /// The v1 API needs a key (`false` only on a loopback internal listener).
    pub require_api_key: bool,
    /// apisonator's per-service keys, by service id.
    pub services: std::collections::BTreeMap<String, AccessServiceKeys>,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Public listener `host:port`.
    pub public_addr: String,
    /// Internal listener `host:port`.
    pub internal_addr: String,
    /// Bearer key for internal APIs.
    pub admin_key: Option<Secret<String>>,
    /// Human-readable logs.
    pub human_logs: bool,
    /// How long in-flight requests get to finish at shutdown.
    pub shutdown_timeout: Duration,
    /// The runtime's worker threads; `None`: one per core.
    pub worker_threads: Option<usize>,
    /// Master secrets, newest last; empty means "generate and keep one in the database".
    pub master_secrets: Vec<Secret<String>>,
    /// Database.
    pub database: DatabaseConfig,
    /// Sync protocol.
    pub sync: SyncConfig,
    /// FxA verifier.
    pub fxa: FxaSettings,
    /// FxA webhook.
    pub webhook: WebhookConfig,
    /// Session tokens; `None` when disabled.
    pub sessions: Option<SessionsConfig>,
    /// Access tokens; `None` when disabled.
    pub access: Option<AccessConfig>,
    /// Connection limits.
    pub limits: ListenerLimits,
    /// The background purge of old Sync records; `None` when off.
    pub purge: Option<PurgeConfig>,
    /// Warnings to log once logging is up (unknown keys, risky defaults).
    pub warnings: Vec<String>,
}

/// Builds the layered figment from a file and the process environment.
fn figment(path: Option<&Path>, vars: &[(String, String)]) -> Figment {
    let mut fig = Figment::from(Serialized::defaults(FileConfig::default()));
    if let Some(path) = path {
        fig = fig.merge(Toml::file_exact(path));
    }
    for prefix in env::PREFIXES {
        for (name, value) in vars {
            if let Some(path) = env::key_path(name, prefix) {
                let v = env::value_for(&path, value);
                fig = fig.merge(Serialized::globals(env::nested(&path, v)));
            }
        }
    }
    fig
}

/// Loads and validates the configuration from `path` (optional) and `vars` (the environment);
/// unknown keys are errors unless the configuration says `config.unknown_keys = "warn"`.
pub fn load(path: Option<&Path>, vars: &[(String, String)]) -> Result<Config, ConfigError> {
    load_with(path, vars, false)
}

/// [`load`], with `lenient` (`--lenient`) turning unknown keys into warnings whatever the
/// configuration says.
pub fn load_with(path: Option<&Path>, vars: &[(String, String)], lenient: bool) -> Result<Config, ConfigError> {
    let (raw, warnings) = read(path, vars, lenient)?;
    validate(raw, warnings).map_err(|e| e.named(strict::Sources { file: path, vars }))
}

/// The configuration as written, with the unknown keys judged: the model, and the warnings.
fn read(
    path: Option<&Path>,
    vars: &[(String, String)],
    lenient: bool,
) -> Result<(FileConfig, Vec<String>), ConfigError> {
    if let Some(p) = path {
        if !p.exists() {
            return Err(ConfigError::plain(format!("--config: file {} does not exist", p.display())));
        }
    }
    let sources = strict::Sources { file: path, vars };
    let fig = figment(path, vars);
    let raw: FileConfig = fig.extract().map_err(|e| figment_error(&e, sources))?;
    let mode = if lenient {
        strict::UnknownKeys::Warn
    } else {
        strict::UnknownKeys::parse(&raw.config.unknown_keys)
            .ok_or_else(|| bad("config.unknown_keys", "must be error or warn").named(sources))?
    };
    let mut unknown = Vec::new();
    if let Ok(value) = fig.extract::<figment::value::Value>() {
        let _ = serde_ignored::deserialize(&value, |p| {
            // `?` paths are the insides of keys accepted and ignored on purpose (`syncstorage`).
            if !p.to_string().ends_with('?') {
                unknown.push(strict::segments(&p));
            }
        })
        .map(|_: FileConfig| ());
    }
    let verdict = strict::judge(&unknown, sources, mode);
    if !verdict.errors.is_empty() {
        return Err(ConfigError::plain(verdict.errors.join("; ")));
    }
    Ok((raw, verdict.warnings))
}

/// The first of figment's errors, naming the key as written and the expectation in prose.
fn figment_error(e: &figment::Error, sources: strict::Sources<'_>) -> ConfigError {
    let Some(err) = e.clone().into_iter().next() else {
        return ConfigError::plain(e.to_string());
    };
    let message = strict::describe(&err.kind);
    if err.path.is_empty() {
        let source = err.metadata.as_ref().map(|m| format!("{}: ", m.name)).unwrap_or_default();
        return ConfigError::plain(format!("{source}{message}"));
    }
    ConfigError { key: Some(sources.name(&err.path)), message }
}

fn seconds(key: &str, v: f64) -> Result<Duration, ConfigError> {
    Duration::try_from_secs_f64(v).map_err(|_| bad(key, "must be a non-negative number of seconds"))
}

fn parse_application(key: &str) -> Result<(String, String), ConfigError> {
    let (name, version) = key
        .rsplit_once('-')
        .filter(|(n, v)| !n.is_empty() && !v.is_empty() && !n.contains('/') && !v.contains('/'))
        .ok_or_else(|| bad(&format!("tokenserver.applications.{key}"), "name must be <application>-<version>"))?;
    if key.len() > 30 {
        return Err(bad(&format!("tokenserver.applications.{key}"), "services.service holds at most 30 characters"));
    }
    Ok((name.to_string(), version.to_string()))
}

fn read_secret_file(path: &str) -> Result<Vec<String>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| bad("master_secret_file", format!("{path}: {e}")))?;
    Ok(text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect())
}

/// Checks a node URL: http(s), no path, at most 64 characters (`nodes.node` is VARCHAR(64)).
pub fn check_node_url(url: &str) -> Result<(), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!("{url:?} must be an http or https URL"));
    }
    if url.len() > 64 {
        return Err(format!("{url:?} is longer than 64 characters (nodes.node is VARCHAR(64))"));
    }
    if url.ends_with('/') {
        return Err(format!("{url:?} must not end with '/': the endpoint is <node>/1.5/<uid>"));
    }
    Ok(())
}

/// A warning for a node URL only this machine can reach (`localhost`, `127.0.0.1`, `[::1]`):
/// right for a single-machine trial, wrong as soon as Firefox runs elsewhere, since clients are
/// sent to the URL as it is.
pub fn loopback_node_warning(url: &str) -> Option<String> {
    let host = url::Url::parse(url).ok()?.host_str()?.to_string();
    is_loopback(&host)
        .then(|| format!("node URL {url} is a loopback address: only clients on this machine can reach it"))
}

fn duration(key: &str, v: &file::DurationText) -> Result<Duration, ConfigError> {
    match v {
        file::DurationText::Seconds(s) => seconds(key, *s),
        file::DurationText::Text(t) => humantime::parse_duration(t.trim())
            .map_err(|e| bad(key, format!("{t:?} is not a duration such as 2h, 10min, 1500ms or 60days ({e})"))),
    }
}

/// True when `host` (an address or `localhost`) can only be reached from this machine.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    bare.eq_ignore_ascii_case("localhost") || bare.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

fn validate_sessions(
    s: file::SessionsFile,
    database_url: &str,
    internal_host: &str,
    warnings: &mut Vec<String>,
) -> Result<Option<SessionsConfig>, ConfigError> {
    use tokenserver_store::{Backend, Family};
    if !s.enabled {
        return Ok(None);
    }
    let url = match s.url {
        Some(url) => {
            let backend = Backend::from_url(&url).map_err(|e| bad("sessions.url", e))?;
            if !backend.holds(Family::Sessions) {
                return Err(bad(
                    "sessions.url",
                    format!("{backend:?} holds no sessions: use {}", Backend::holding(Family::Sessions)),
                ));
            }
            url
        }
        None => match tokenserver_store::Backend::from_url(database_url) {
            Ok(tokenserver_store::Backend::MySql) => {
                warnings.push(
                    "session APIs disabled: MySQL does not hold sessions; set sessions.url \
                     (sqlite:, postgres://, redis://, redis+cluster://, memory:)"
                        .into(),
                );
                return Ok(None);
            }
            _ => database_url.to_string(),
        },
    };
    let token_lifetime = duration("sessions.token_lifetime", &s.token_lifetime)?;
    let max_age = duration("sessions.max_age", &s.max_age)?;
    let purge_interval = duration("sessions.purge_interval", &s.purge_interval)?;
    let grace = duration("sessions.grace_period", &s.grace_period)?;
    if token_lifetime < Duration::from_secs(1) {
        return Err(bad("sessions.token_lifetime", "must be at least 1s"));
    }
    if max_age < token_lifetime {
        return Err(bad("sessions.max_age", "must be at least sessions.token_lifetime"));
    }
    if purge_interval < Duration::from_millis(100) {
        return Err(bad("sessions.purge_interval", "must be at least 100ms"));
    }
    if grace >= token_lifetime {
        return Err(bad("sessions.grace_period", "must be shorter than sessions.token_lifetime"));
    }
    for (key, v) in [
        ("sessions.max_meta_bytes", s.max_meta_bytes),
        ("sessions.max_meta_depth", s.max_meta_depth),
        ("sessions.max_meta_keys", s.max_meta_keys),
        ("sessions.memory_shards", s.memory_shards),
    ] {
        if v == 0 {
            return Err(bad(key, "must be at least 1"));
        }
    }
    if s.max_sessions == 0 {
        return Err(bad("sessions.max_sessions", "must be at least 1"));
    }
    if s.max_body_bytes < s.max_meta_bytes {
        return Err(bad("sessions.max_body_bytes", "must be at least sessions.max_meta_bytes"));
    }
    if !s.require_api_key && !is_loopback(internal_host) {
        return Err(bad(
            "sessions.require_api_key",
            format!("false is accepted only when internal.host is a loopback address, not {internal_host:?}"),
        ));
    }
    Ok(Some(SessionsConfig {
        url: Secret::new(url),
        token_lifetime,
        max_age,
        purge_interval,
        policy: tokenserver_core::session::RotationPolicy {
            grace_ms: grace.as_millis() as u64,
            reuse_detection: s.reuse_detection,
            limits: tokenserver_core::session::MetaLimits {
                max_bytes: s.max_meta_bytes,
                max_depth: s.max_meta_depth,
                max_keys: s.max_meta_keys,
            },
        },
        dump_enabled: s.dump_enabled,
        max_body_bytes: s.max_body_bytes,
        memory: tokenserver_store::memory::MemoryOptions { shards: s.memory_shards, max_sessions: s.max_sessions },
        api_key: match s.api_key.filter(|k| !k.is_empty()) {
            Some(k) => {
                check_secret("sessions.api_key", &k)?;
                Some(Secret::new(k))
            }
            None => None,
        },
        require_api_key: s.require_api_key,
    }))
}

fn validate_limits(l: &file::LimitsFile) -> Result<ListenerLimits, ConfigError> {
    let timeout = |key: &str, v: &file::DurationText| -> Result<Duration, ConfigError> {
        let d = duration(key, v)?;
        if d < Duration::from_millis(100) {
            return Err(bad(key, "must be at least 100ms"));
        }
        Ok(d)
    };
    let header_read_timeout = timeout("limits.header_read_timeout", &l.header_read_timeout)?;
    let idle_timeout = timeout("limits.idle_timeout", &l.idle_timeout)?;
    let body_timeout = timeout("limits.body_timeout", &l.body_timeout)?;
    let per_listener = |key: &str, max_connections: usize| -> Result<Limits, ConfigError> {
        if max_connections == 0 {
            return Err(bad(key, "must be at least 1"));
        }
        Ok(Limits { max_connections, header_read_timeout, idle_timeout, body_timeout })
    };
    Ok(ListenerLimits {
        public: per_listener("limits.public_max_connections", l.public_max_connections)?,
        internal: per_listener("limits.internal_max_connections", l.internal_max_connections)?,
    })
}

fn validate_master_secrets(
    secret: Option<file::Secrets>,
    secret_file: Option<&str>,
) -> Result<Vec<Secret<String>>, ConfigError> {
    let mut secrets: Vec<String> = match secret {
        Some(file::Secrets::One(s)) => vec![s],
        Some(file::Secrets::Many(v)) => v,
        None => Vec::new(),
    };
    if let Some(path) = secret_file {
        secrets.extend(read_secret_file(path)?);
    }
    if secrets.iter().any(String::is_empty) {
        return Err(bad("master_secret", "must not be empty"));
    }
    for secret in &secrets {
        check_secret("master_secret", secret)?;
    }
    Ok(secrets.into_iter().map(Secret::new).collect())
}

fn validate_database(ts: &file::SyncFile) -> Result<DatabaseConfig, ConfigError> {
    use tokenserver_store::{Backend, Family};
    let backend = Backend::from_url(&ts.database_url).map_err(|e| bad("tokenserver.database_url", e))?;
    if !backend.holds(Family::Sync) {
        return Err(bad(
            "tokenserver.database_url",
            format!("{backend:?} holds no Sync data: use {}", Backend::holding(Family::Sync)),
        ));
    }
    if ts.database_pool_max_size == 0 {
        return Err(bad("tokenserver.database_pool_max_size", "must be at least 1"));
    }
    let sqlite_durability = match ts.sqlite_synchronous.to_ascii_lowercase().as_str() {
        "normal" => tokenserver_store::sqlite::Durability::Normal,
        "full" => tokenserver_store::sqlite::Durability::Full,
        _ => return Err(bad("tokenserver.sqlite_synchronous", "must be normal or full")),
    };
    let pool = PoolSettings {
        listing_connections: tokenserver_store::LISTING_CONNECTIONS,
        sqlite_durability,
        max_size: ts.database_pool_max_size,
        connection_timeout: seconds(
            "tokenserver.database_pool_connection_timeout",
            ts.database_pool_connection_timeout,
        )?,
    };
    let request_timeout =
        ts.database_request_timeout.map(|s| seconds("tokenserver.database_request_timeout", s)).transpose()?;
    Ok(DatabaseConfig {
        url: Secret::new(ts.database_url.clone()),
        pool,
        request_timeout,
        run_migrations: ts.run_migrations,
    })
}

fn check_node_type(key: &str, node_type: &str) -> Result<(), ConfigError> {
    if !matches!(node_type, "mysql" | "postgres" | "spanner") {
        return Err(bad(key, "must be mysql, postgres or spanner"));
    }
    Ok(())
}

fn validate_applications(ts: &file::SyncFile) -> Result<Vec<Application>, ConfigError> {
    let mut apps = ts.applications.clone();
    if apps.is_empty() {
        apps.insert("sync-1.5".into(), file::ApplicationFile::default());
    }
    let mut applications = Vec::new();
    for (service, app) in apps {
        let (name, version) = parse_application(&service)?;
        let token_duration = app.token_duration.unwrap_or(ts.token_duration);
        let node_type = app.node_type.unwrap_or_else(|| ts.node_type.clone());
        check_node_type(&format!("tokenserver.applications.{service}.node_type"), &node_type)?;
        let pattern = app.pattern.unwrap_or_else(|| format!("{{node}}/{version}/{{uid}}"));
        if !pattern.contains("{uid}") {
            return Err(bad(&format!("tokenserver.applications.{service}.pattern"), "must contain {uid}"));
        }
        applications.push(Application { name, version, service, pattern, token_duration, node_type });
    }
    Ok(applications)
}

fn validate_sync(ts: &file::SyncFile, enabled: bool, warnings: &mut Vec<String>) -> Result<SyncConfig, ConfigError> {
    // A family that is off says nothing about its settings.
    let mut quiet = Vec::new();
    let warnings = if enabled { warnings } else { &mut quiet };
    if ts.fxa_email_domain.is_empty() || ts.fxa_email_domain.contains('@') {
        return Err(bad("tokenserver.fxa_email_domain", "must be a domain such as api.accounts.firefox.com"));
    }
    let release_rate = ts.node_capacity_release_rate.unwrap_or(0.1);
    if !(release_rate > 0.0 && release_rate <= 1.0) {
        return Err(bad("tokenserver.node_capacity_release_rate", "must be in (0, 1]"));
    }
    check_node_type("tokenserver.node_type", &ts.node_type)?;
    if ts.spanner_node_id.is_some() {
        return Err(bad("tokenserver.spanner_node_id", "Spanner migration mode is not supported"));
    }
    let init_node = match &ts.init_node_url {
        Some(url) => {
            check_node_url(url).map_err(|e| bad("tokenserver.init_node_url", e))?;
            if let Some(w) = loopback_node_warning(url) {
                warnings.push(format!("tokenserver.init_node_url: {w}"));
            }
            if ts.init_node_capacity < 1 {
                return Err(bad("tokenserver.init_node_capacity", "must be at least 1"));
            }
            Some((url.clone(), ts.init_node_capacity))
        }
        None => None,
    };
    check_secret("tokenserver.fxa_metrics_hash_secret", &ts.fxa_metrics_hash_secret)?;
    if ts.fxa_metrics_hash_secret == "secret" {
        warnings
            .push("tokenserver.fxa_metrics_hash_secret is the default \"secret\": set your own in production".into());
    }
    let new_users = NewUserLimits {
        global: rate_limit(
            "tokenserver.new_user_rate",
            ts.new_user_rate,
            "tokenserver.new_user_burst",
            ts.new_user_burst,
        )?,
        per_issuer: rate_limit(
            "tokenserver.new_user_rate_per_issuer",
            ts.new_user_rate_per_issuer,
            "tokenserver.new_user_burst_per_issuer",
            ts.new_user_burst_per_issuer,
        )?,
    };
    let max_in_flight = match ts.database_max_in_flight {
        0 => (32 * ts.database_pool_max_size as usize).max(256),
        n => n,
    };
    if ts.buckets > 1_000_000 {
        return Err(bad("tokenserver.buckets", "must be at most 1000000 (0 turns buckets off)"));
    }
    Ok(SyncConfig {
        enabled,
        new_users,
        max_in_flight,
        buckets: (ts.buckets > 0).then_some(i64::from(ts.buckets)),
        applications: validate_applications(ts)?,
        email_domain: ts.fxa_email_domain.clone(),
        metrics_hash_secret: Secret::new(ts.fxa_metrics_hash_secret.clone()),
        release_rate,
        allow_new_users: ts.allow_new_users,
        init_node,
    })
}

fn validate_fxa(ts: &file::SyncFile, enabled: bool, warnings: &mut Vec<String>) -> Result<FxaSettings, ConfigError> {
    let mut quiet = Vec::new();
    let warnings = if enabled { warnings } else { &mut quiet };
    oauth_base(&ts.fxa_oauth_server_url).map_err(|e| bad("tokenserver.fxa_oauth_server_url", e))?;
    let jwks: Vec<_> =
        [ts.fxa_oauth_primary_jwk.clone(), ts.fxa_oauth_secondary_jwk.clone()].into_iter().flatten().collect();
    for (i, jwk) in jwks.iter().enumerate() {
        let key = if i == 0 { "tokenserver.fxa_oauth_primary_jwk" } else { "tokenserver.fxa_oauth_secondary_jwk" };
        if jwk.to_key().is_none() {
            return Err(bad(key, "not a usable RSA signature key (needs kty=RSA, n, e)"));
        }
    }
    let fxa = FxaSettings {
        server_url: ts.fxa_oauth_server_url.clone(),
        request_timeout: seconds("tokenserver.fxa_oauth_request_timeout", ts.fxa_oauth_request_timeout)?,
        jwks,
        cache_capacity: ts.fxa_oauth_cache_size,
        cache_ttl: Duration::from_secs(ts.fxa_oauth_cache_ttl),
        jwks_min_refresh: Duration::from_secs(ts.fxa_oauth_jwks_refresh_interval),
        remote_concurrency: ts.fxa_oauth_verify_concurrency,
        refusal_ttl: Duration::from_secs(ts.fxa_oauth_refusal_cache_ttl),
        set_client_id: ts.fxa_webhook_set_client_id.clone(),
        set_issuer: ts.fxa_webhook_set_issuer.clone(),
    };
    if fxa.remote_concurrency == 0 {
        return Err(bad("tokenserver.fxa_oauth_verify_concurrency", "must be at least 1"));
    }
    if fxa.request_timeout.is_zero() {
        return Err(bad("tokenserver.fxa_oauth_request_timeout", "must be positive"));
    }
    if ts.fxa_webhook_enabled && (fxa.set_client_id.is_none() || fxa.set_issuer.is_none()) {
        warnings.push(
            "fxa_webhook_enabled without fxa_webhook_set_client_id and fxa_webhook_set_issuer: every event will be refused".into(),
        );
    }
    if ts.fxa_email_domain.contains("stage") || ts.fxa_oauth_server_url.contains("stage") {
        warnings.push("FxA settings point at Mozilla's *stage* servers: real Firefox accounts will be refused".into());
    }
    Ok(fxa)
}

fn validate_access(
    a: &file::AccessFile,
    database_url: &str,
    internal_host: &str,
) -> Result<Option<AccessConfig>, ConfigError> {
    use tokenserver_store::{Backend, Family};
    if !a.enabled {
        return Ok(None);
    }
    let url = a.url.clone().unwrap_or_else(|| database_url.to_string());
    let backend = Backend::from_url(&url).map_err(|e| bad("access.url", e))?;
    if !backend.holds(Family::Access) {
        return Err(bad(
            "access.url",
            format!("{backend:?} holds no access tokens: use {}", Backend::holding(Family::Access)),
        ));
    }
    let default_ttl = duration("access.default_ttl", &a.default_ttl)?;
    let max_ttl = duration("access.max_ttl", &a.max_ttl)?;
    if max_ttl < Duration::from_secs(1) {
        return Err(bad("access.max_ttl", "must be at least 1s"));
    }
    if default_ttl > max_ttl {
        return Err(bad("access.default_ttl", "must be at most access.max_ttl"));
    }
    if a.max_token_bytes == 0 || a.max_token_bytes > 65_535 {
        return Err(bad("access.max_token_bytes", "must be between 1 and 65535"));
    }
    if a.listing_connections == 0 {
        return Err(bad("access.listing_connections", "must be at least 1"));
    }
    let purge_interval = duration("access.purge_interval", &a.purge_interval)?;
    if purge_interval < Duration::from_millis(100) {
        return Err(bad("access.purge_interval", "must be at least 100ms"));
    }
    if !a.require_api_key && !is_loopback(internal_host) {
        return Err(bad(
            "access.require_api_key",
            format!("false is accepted only when internal.host is a loopback address, not {internal_host:?}"),
        ));
    }
    let mut services = std::collections::BTreeMap::new();
    for (id, keys) in &a.services {
        tokenserver_core::access::check_id(id).map_err(|e| bad(&format!("access.services.{id}"), e))?;
        let nonempty = |k: &String| !k.is_empty();
        services.insert(
            id.clone(),
            AccessServiceKeys {
                provider_key: keys.provider_key.clone().filter(nonempty).map(Secret::new),
                service_tokens: match &keys.service_tokens {
                    Some(file::Secrets::One(t)) => vec![t.clone()],
                    Some(file::Secrets::Many(ts)) => ts.clone(),
                    None => Vec::new(),
                }
                .into_iter()
                .filter(nonempty)
                .map(Secret::new)
                .collect(),
            },
        );
    }
    Ok(Some(AccessConfig {
        url: Secret::new(url),
        default_ttl_s: default_ttl.as_secs(),
        max_ttl_s: max_ttl.as_secs(),
        max_token_bytes: a.max_token_bytes,
        listing_connections: a.listing_connections,
        purge_interval,
        api_key: match a.api_key.clone().filter(|k| !k.is_empty()) {
            Some(k) => {
                check_secret("access.api_key", &k)?;
                Some(Secret::new(k))
            }
            None => None,
        },
        require_api_key: a.require_api_key,
        services,
    }))
}

/// Token buckets on allocating brand-new users (the capacity-exhaustion defence).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NewUserLimits {
    /// Per second, all issuers; `None`: no limit.
    pub global: Option<(f64, u32)>,
    /// Per second, each issuer; `None`: no limit.
    pub per_issuer: Option<(f64, u32)>,
}

fn rate_limit(key: &str, rate: f64, burst_key: &str, burst: u32) -> Result<Option<(f64, u32)>, ConfigError> {
    if !(rate.is_finite() && rate >= 0.0) {
        return Err(bad(key, "must be a number of users per second, 0 for no limit"));
    }
    if rate == 0.0 {
        return Ok(None);
    }
    if rate < 0.001 {
        return Err(bad(key, "must be at least 0.001 (one user per 1000 s), or 0 for no limit"));
    }
    if burst == 0 {
        return Err(bad(burst_key, "must be at least 1"));
    }
    Ok(Some((rate, burst)))
}

/// `[purge]`, when enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct PurgeConfig {
    /// Time between runs (±30%).
    pub interval: Duration,
    /// Rows replaced more recently are kept.
    pub grace_period: Duration,
    /// Rows per batch.
    pub batch_size: u32,
    /// Rows deleted per run at most (0: no limit).
    pub max_records: u64,
    /// Timeout of one storage request.
    pub request_timeout: Duration,
}

/// Most worker threads accepted: far past any core count a token server runs on, low enough that
/// a typo (an extra digit or two) is refused rather than started as thousands of threads.
const MAX_WORKER_THREADS: usize = 1024;

fn validate_worker_threads(n: Option<usize>) -> Result<Option<usize>, ConfigError> {
    match n {
        Some(n) if n == 0 || n > MAX_WORKER_THREADS => {
            Err(bad("worker_threads", format!("must be 1 to {MAX_WORKER_THREADS} (unset: one per core), found {n}")))
        }
        other => Ok(other),
    }
}

fn validate_purge(p: &file::PurgeFile) -> Result<Option<PurgeConfig>, ConfigError> {
    let interval = duration("purge.interval", &p.interval)?;
    let grace_period = duration("purge.grace_period", &p.grace_period)?;
    let request_timeout = duration("purge.request_timeout", &p.request_timeout)?;
    if !p.enabled {
        return Ok(None);
    }
    if interval < Duration::from_secs(1) {
        return Err(bad("purge.interval", "must be at least 1s"));
    }
    if p.batch_size == 0 {
        return Err(bad("purge.batch_size", "must be at least 1"));
    }
    if request_timeout.is_zero() {
        return Err(bad("purge.request_timeout", "must be more than 0"));
    }
    Ok(Some(PurgeConfig {
        interval,
        grace_period,
        batch_size: p.batch_size,
        max_records: p.max_records,
        request_timeout,
    }))
}

/// The whole configuration, section by section; the first bad key stops it.
fn validate(raw: FileConfig, mut warnings: Vec<String>) -> Result<Config, ConfigError> {
    let limits = validate_limits(&raw.limits)?;
    let ts = &raw.tokenserver;
    let sessions = validate_sessions(raw.sessions, &ts.database_url, &raw.internal.host, &mut warnings)?;
    let access = validate_access(&raw.access, &ts.database_url, &raw.internal.host)?;
    let master_secrets = validate_master_secrets(raw.master_secret, raw.master_secret_file.as_deref())?;
    let database = validate_database(ts)?;
    let sync_enabled = raw.sync.enabled.or(ts.enabled).unwrap_or(true);
    let sync = validate_sync(ts, sync_enabled, &mut warnings)?;
    let fxa = validate_fxa(ts, sync_enabled, &mut warnings)?;
    if !sync_enabled && sessions.is_none() && access.is_none() {
        return Err(bad("sync.enabled", "false with sessions and access tokens off too: nothing would be served"));
    }
    let purge = validate_purge(&raw.purge)?;
    Ok(Config {
        public_addr: format!("{}:{}", raw.host, raw.port),
        internal_addr: format!("{}:{}", raw.internal.host, raw.internal.port),
        admin_key: match raw.internal.admin_key.filter(|k| !k.is_empty()) {
            Some(k) => {
                check_secret("internal.admin_key", &k)?;
                Some(Secret::new(k))
            }
            None => None,
        },
        human_logs: raw.human_logs,
        shutdown_timeout: duration("shutdown_timeout", &raw.shutdown_timeout)?,
        worker_threads: validate_worker_threads(raw.worker_threads)?,
        master_secrets,
        database,
        sync,
        fxa,
        webhook: WebhookConfig { enabled: ts.fxa_webhook_enabled, metrics_only: ts.fxa_webhook_metrics_only },
        sessions,
        access,
        limits,
        purge,
        warnings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    fn with_file(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("ts-config-{}-{}", std::process::id(), rand::random::<u64>()));
        std::fs::create_dir_all(&dir).map_err(|e| ConfigError::plain(e.to_string()))?;
        let path = dir.join("local.toml");
        std::fs::write(&path, toml).map_err(|e| ConfigError::plain(e.to_string()))?;
        let out = load(Some(&path), &vars(env));
        let _ = std::fs::remove_dir_all(&dir);
        out
    }

    #[test]
    fn defaults_need_nothing() {
        let c = load(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.public_addr, "127.0.0.1:8000");
        assert_eq!(c.internal_addr, "127.0.0.1:8001");
        assert_eq!(c.database.url.expose(), "sqlite://tokenserver.db");
        assert!(c.master_secrets.is_empty());
        assert_eq!(c.sync.email_domain, "api.accounts.firefox.com");
        assert_eq!(c.fxa.server_url, "https://oauth.accounts.firefox.com");
        assert_eq!(c.sync.applications.len(), 1);
        let app = &c.sync.applications[0];
        assert_eq!((app.name.as_str(), app.version.as_str()), ("sync", "1.5"));
        assert_eq!(app.pattern, "{node}/1.5/{uid}");
        assert_eq!(app.token_duration, 3600);
        assert_eq!(app.node_type, "spanner");
        assert!((c.sync.release_rate - 0.1).abs() < f64::EPSILON);
    }

    #[test]
    fn mozilla_env_names_and_upstream_toml_work() {
        let toml = r#"
master_secret = "from-file"
human_logs = 1
host = "0.0.0.0"
syncstorage.enabled = true
syncstorage.database_url = "mysql://x"
tokenserver.enabled = true
tokenserver.database_url = "sqlite://file.db"
tokenserver.node_type = "mysql"
tokenserver.fxa_browserid_audience = "https://token.services.mozilla.com"
"#;
        let env = [
            ("SYNC_MASTER_SECRET", "0123"),
            ("SYNC_TOKENSERVER__FXA_EMAIL_DOMAIN", "example.org"),
            ("SYNC_TOKENSERVER__TOKEN_DURATION", "600"),
            ("SYNC_TOKENSERVER__ALLOW_NEW_USERS", "0"),
            ("SYNC_TOKENSERVER__NODE_CAPACITY_RELEASE_RATE", "1"),
            ("SYNC_TOKENSERVER__INIT_NODE_URL", "https://sync.example.org"),
            ("SYNC_TOKENSERVER__INIT_NODE_CAPACITY", "5"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__KTY", "RSA"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__KID", "20190730-15e473fd"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__N", "15OpVGC7ws_SlU0gRbRh1Iwo8_gR8ElX2CDnbN5blKyXLg-ll0ogktoDXc-tDvTabRTxi7AXU0wWQ247odhHT47y5uz0GASYXdfPponynQ_xR9CpNn1eEL1gvDhQN9rfPIzfncl8FUi9V4WMd5f600QC81yDw9dX-Z8gdkru0aDaoEKF9-wU2TqrCNcQdiJCX9BISotjz_9cmGwKXFEekQNJWBeRQxH2bUmgwUK0HaqwW9WbYOs-zstNXXWFsgK9fbDQqQeGehXLZM4Cy5Mgl_iuSvnT3rLzPo2BmlxMLUvRqBx3_v8BTtwmNGA0v9O0FJS_mnDq0Iue0Dz8BssQCQ"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__E", "AQAB"),
            ("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__FXA_CREATED_AT", "1564502400"),
            ("SYNC_TOKENSERVER__ADDITIONAL_BLOCKING_THREADS_FOR_FXA_REQUESTS", "10"),
            ("TOKENSERVER_PORT", "9000"),
            ("TOKENSERVER_TEST_POSTGRES_URL", "postgres://ignored"),
        ];
        let c = with_file(toml, &env).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.master_secrets.iter().map(|s| s.expose().as_str()).collect::<Vec<_>>(), ["0123"]);
        assert!(c.human_logs);
        assert_eq!(c.public_addr, "0.0.0.0:9000");
        assert_eq!(c.database.url.expose(), "sqlite://file.db");
        assert_eq!(c.sync.email_domain, "example.org");
        assert_eq!(c.sync.applications[0].token_duration, 600);
        assert_eq!(c.sync.applications[0].node_type, "mysql");
        assert!(!c.sync.allow_new_users);
        assert!((c.sync.release_rate - 1.0).abs() < f64::EPSILON);
        assert_eq!(c.sync.init_node, Some(("https://sync.example.org".to_string(), 5)));
        assert_eq!(c.fxa.jwks.len(), 1);
        assert!(c.warnings.iter().any(|w| w.contains("fxa_browserid_audience")), "{:?}", c.warnings);
        assert!(!c.warnings.iter().any(|w| w.contains("syncstorage") || w.contains("blocking")), "{:?}", c.warnings);
    }

    #[test]
    fn tokenserver_env_beats_sync_env_and_master_secret_lists() {
        let env = [("SYNC_TOKENSERVER__DATABASE_URL", "sqlite://a.db"), ("TOKENSERVER_DATABASE_URL", "sqlite://b.db")];
        let c = with_file("master_secret = [\"old\", \"new\"]\n[tokenserver.applications.\"sync-1.5\"]\n[tokenserver.applications.notes-2]\ntoken_duration = 60\n", &env)
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.database.url.expose(), "sqlite://b.db");
        assert_eq!(c.master_secrets.iter().map(|s| s.expose().as_str()).collect::<Vec<_>>(), ["old", "new"]);
        let notes = c.sync.applications.iter().find(|a| a.name == "notes").unwrap_or_else(|| unreachable!());
        assert_eq!((notes.version.as_str(), notes.pattern.as_str(), notes.token_duration), ("2", "{node}/2/{uid}", 60));
    }

    #[test]
    fn errors_name_the_key() {
        let cases: &[(&[(&str, &str)], &str)] = &[
            (&[("SYNC_PORT", "http")], "port"),
            (&[("SYNC_TOKENSERVER__DATABASE_URL", "redis://x")], "tokenserver.database_url"),
            (&[("SYNC_TOKENSERVER__NODE_TYPE", "oracle")], "tokenserver.node_type"),
            (&[("SYNC_TOKENSERVER__INIT_NODE_URL", "ftp://x")], "tokenserver.init_node_url"),
            (&[("SYNC_TOKENSERVER__ALLOW_NEW_USERS", "maybe")], "tokenserver.allow_new_users"),
            (&[("SYNC_TOKENSERVER__NODE_CAPACITY_RELEASE_RATE", "2")], "tokenserver.node_capacity_release_rate"),
            (&[("SYNC_TOKENSERVER__FXA_OAUTH_SERVER_URL", "nope")], "tokenserver.fxa_oauth_server_url"),
            (&[("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__KTY", "EC")], "tokenserver.fxa_oauth_primary_jwk"),
            (&[("SYNC_TOKENSERVER__SPANNER_NODE_ID", "800")], "tokenserver.spanner_node_id"),
            (&[("SYNC_MASTER_SECRET", "")], "master_secret"),
        ];
        for (env, key) in cases {
            let err = load(None, &vars(env)).map(|_| ()).err().map(|e| e.to_string()).unwrap_or_default();
            // Named as the user wrote it: the environment variable.
            let typed = err.contains(&format!("{}: ", env[0].0)) || err.contains("__*: ");
            assert!(typed, "{env:?} ({key}): {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        assert!(load(Some(Path::new("/nonexistent/x.toml")), &[]).is_err());
    }

    #[test]
    fn limits_have_defaults_and_bounds() {
        let c = load(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.limits.public.max_connections, 8192);
        assert_eq!(c.limits.internal.max_connections, 1024);
        assert_eq!(c.limits.public.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.limits.public.idle_timeout, Duration::from_secs(75));
        assert_eq!(c.limits.internal.body_timeout, Duration::from_secs(30));
        let c =
            load(None, &vars(&[("TOKENSERVER_LIMITS__IDLE_TIMEOUT", "5min")])).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.limits.internal.idle_timeout, Duration::from_secs(300));
        for (key, value, named) in [
            ("TOKENSERVER_LIMITS__PUBLIC_MAX_CONNECTIONS", "0", "limits.public_max_connections"),
            ("TOKENSERVER_LIMITS__HEADER_READ_TIMEOUT", "1ms", "limits.header_read_timeout"),
            ("TOKENSERVER_LIMITS__BODY_TIMEOUT", "soon", "limits.body_timeout"),
            ("TOKENSERVER_SQLITE_SYNCHRONOUS", "sometimes", "tokenserver.sqlite_synchronous"),
        ] {
            let err = load(None, &vars(&[(key, value)])).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("{key}: ")), "{key}={value} ({named}): {err}");
        }
    }

    #[test]
    fn worker_threads_default_to_the_cores_and_are_bounded() {
        assert_eq!(load(None, &[]).ok().and_then(|c| c.worker_threads), None);
        let c = load(None, &vars(&[("TOKENSERVER_WORKER_THREADS", "3")])).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.worker_threads, Some(3));
        let c = with_file("worker_threads = 1\n", &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert_eq!(c.worker_threads, Some(1));
        for value in ["0", "1025", "-1", "two"] {
            let err = load(None, &vars(&[("TOKENSERVER_WORKER_THREADS", value)])).err().map(|e| e.to_string());
            let err = err.unwrap_or_default();
            assert!(err.contains("TOKENSERVER_WORKER_THREADS: "), "{value}: {err}");
            assert!(!err.contains('\n'), "{err}");
        }
        let err = with_file("worker_threads = 0\n", &[]).err().map(|e| e.to_string()).unwrap_or_default();
        assert_eq!(err, "invalid configuration: worker_threads: must be 1 to 1024 (unset: one per core), found 0");
    }

    #[test]
    fn node_urls() {
        assert!(check_node_url("https://sync.example.com").is_ok());
        assert!(check_node_url("http://localhost:8000").is_ok());
        assert!(check_node_url("https://sync.example.com/").is_err());
        assert!(check_node_url(&format!("https://{}.com", "a".repeat(60))).is_err());
        assert!(check_node_url("sync.example.com").is_err());
    }

    #[test]
    fn debug_never_prints_secrets() {
        let c = load(
            None,
            &vars(&[("SYNC_MASTER_SECRET", "topsecret"), ("SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET", "alsosecret")]),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let dbg = format!("{c:?}");
        assert!(!dbg.contains("topsecret") && !dbg.contains("alsosecret"));
    }

    #[test]
    fn access_settings() {
        let c = load(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        let a = c.access.unwrap_or_else(|| unreachable!("enabled by default"));
        assert_eq!(a.url.expose(), "sqlite://tokenserver.db");
        assert_eq!((a.default_ttl_s, a.max_ttl_s, a.max_token_bytes), (86_400, 365 * 86_400, 3584));
        assert_eq!(a.purge_interval, Duration::from_secs(60));
        assert_eq!(a.listing_connections, 4);
        assert!(a.require_api_key && a.api_key.is_none() && a.services.is_empty());

        let toml = r#"
[access]
url = "redis://127.0.0.1:6379/?prefix=acc:"
default_ttl = "1h"
max_ttl = "30days"
listing_connections = 12

[access.services."2555417777820"]
provider_key = "pk-secret"
service_tokens = ["st-1", "st-2"]

[access.services.other]
service_tokens = "st-3"
"#;
        let c = with_file(toml, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        let a = c.access.clone().unwrap_or_else(|| unreachable!());
        assert_eq!((a.default_ttl_s, a.max_ttl_s, a.listing_connections), (3600, 30 * 86_400, 12));
        let svc = &a.services["2555417777820"];
        assert_eq!(svc.provider_key.as_ref().map(|k| k.expose().as_str()), Some("pk-secret"));
        assert_eq!(svc.service_tokens.len(), 2);
        assert_eq!(a.services["other"].service_tokens.len(), 1);
        assert!(!format!("{c:?}").contains("pk-secret"), "keys are secrets");
        // From the environment too.
        let c = load(None, &vars(&[("TOKENSERVER_ACCESS__SERVICES__S1__PROVIDER_KEY", "pk")]))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.access.unwrap_or_else(|| unreachable!()).services["s1"].provider_key.is_some());
        let c = load(None, &vars(&[("TOKENSERVER_ACCESS__ENABLED", "false")])).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.access.is_none());

        for (key, value, named) in [
            ("TOKENSERVER_ACCESS__URL", "memory:", "access.url"),
            ("TOKENSERVER_ACCESS__DEFAULT_TTL", "400days", "access.default_ttl"),
            ("TOKENSERVER_ACCESS__MAX_TTL", "0", "access.max_ttl"),
            ("TOKENSERVER_ACCESS__MAX_TOKEN_BYTES", "0", "access.max_token_bytes"),
            ("TOKENSERVER_ACCESS__LISTING_CONNECTIONS", "0", "access.listing_connections"),
            ("TOKENSERVER_ACCESS__PURGE_INTERVAL", "1ms", "access.purge_interval"),
        ] {
            let err = load(None, &vars(&[(key, value)])).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("{key}: ")), "{key}={value} ({named}): {err}");
        }
        let err = load(
            None,
            &vars(&[("TOKENSERVER_ACCESS__REQUIRE_API_KEY", "false"), ("TOKENSERVER_INTERNAL__HOST", "0.0.0.0")]),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("TOKENSERVER_ACCESS__REQUIRE_API_KEY: "), "{err}");
    }

    #[test]
    fn session_settings() {
        let c = load(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        let s = c.sessions.unwrap_or_else(|| unreachable!("enabled by default"));
        assert_eq!(s.url.expose(), "sqlite://tokenserver.db");
        assert_eq!(s.token_lifetime, Duration::from_secs(7200));
        assert_eq!(s.max_age, Duration::from_secs(30 * 86400));
        assert_eq!(s.purge_interval, Duration::from_secs(60));
        assert_eq!(s.policy.grace_ms, 2000);
        assert!(s.policy.reuse_detection && !s.dump_enabled);

        let c = load(
            None,
            &vars(&[
                ("TOKENSERVER_SESSIONS__URL", "redis://127.0.0.1/"),
                ("TOKENSERVER_SESSIONS__TOKEN_LIFETIME", "10min"),
                ("TOKENSERVER_SESSIONS__PURGE_INTERVAL", "1500ms"),
                ("TOKENSERVER_SESSIONS__MAX_AGE", "86400"),
                ("TOKENSERVER_SESSIONS__REUSE_DETECTION", "0"),
            ]),
        )
        .unwrap_or_else(|e| unreachable!("{e}"));
        let s = c.sessions.unwrap_or_else(|| unreachable!());
        assert_eq!(s.url.expose(), "redis://127.0.0.1/");
        assert_eq!((s.token_lifetime, s.purge_interval), (Duration::from_secs(600), Duration::from_millis(1500)));
        assert_eq!(s.max_age, Duration::from_secs(86400));
        assert!(!s.policy.reuse_detection);

        // MySQL holds no sessions: disabled with a warning unless a store is named.
        let c = load(None, &vars(&[("TOKENSERVER_DATABASE_URL", "mysql://root@localhost/ts")]))
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.sessions.is_none());
        assert!(c.warnings.iter().any(|w| w.contains("sessions.url")));
        let c =
            load(None, &vars(&[("TOKENSERVER_SESSIONS__ENABLED", "false")])).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.sessions.is_none());

        // Opening the session routes to anyone is allowed on a loopback listener only.
        for host in ["127.0.0.1", "::1", "localhost"] {
            let c = load(
                None,
                &vars(&[("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "false"), ("TOKENSERVER_INTERNAL__HOST", host)]),
            )
            .unwrap_or_else(|e| unreachable!("{host}: {e}"));
            assert!(!c.sessions.unwrap_or_else(|| unreachable!()).require_api_key);
        }
        let err = load(
            None,
            &vars(&[("TOKENSERVER_SESSIONS__REQUIRE_API_KEY", "false"), ("TOKENSERVER_INTERNAL__HOST", "0.0.0.0")]),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(err.contains("TOKENSERVER_SESSIONS__REQUIRE_API_KEY: ") && err.contains("0.0.0.0"), "{err}");

        for (key, value, named) in [
            ("TOKENSERVER_SESSIONS__MAX_SESSIONS", "0", "sessions.max_sessions"),
            ("TOKENSERVER_SESSIONS__TOKEN_LIFETIME", "2 hours please", "sessions.token_lifetime"),
            ("TOKENSERVER_SESSIONS__URL", "mysql://x", "sessions.url"),
            ("TOKENSERVER_SESSIONS__GRACE_PERIOD", "3h", "sessions.grace_period"),
            ("TOKENSERVER_SESSIONS__MAX_AGE", "1min", "sessions.max_age"),
            ("TOKENSERVER_SESSIONS__MAX_META_KEYS", "0", "sessions.max_meta_keys"),
        ] {
            let err = load(None, &vars(&[(key, value)])).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("{key}: ")), "{key}={value} ({named}): {err}");
        }
    }

    #[test]
    fn placeholder_secrets_are_refused_naming_the_key() {
        for (key, value, named) in [
            ("SYNC_MASTER_SECRET", "INSERT_SECRET_KEY_HERE", "master_secret"),
            ("SYNC_MASTER_SECRET", "changeme", "master_secret"),
            ("TOKENSERVER_INTERNAL__ADMIN_KEY", "<your admin key>", "internal.admin_key"),
            ("TOKENSERVER_SESSIONS__API_KEY", "CHANGE_ME", "sessions.api_key"),
            ("TOKENSERVER_ACCESS__API_KEY", "replace-me", "access.api_key"),
            (
                "SYNC_TOKENSERVER__FXA_METRICS_HASH_SECRET",
                "INSERT_SECRET_KEY_HERE",
                "tokenserver.fxa_metrics_hash_secret",
            ),
        ] {
            let err = load(None, &vars(&[(key, value)])).err().map(|e| e.to_string()).unwrap_or_default();
            assert!(err.contains(&format!("{key}: ")) && err.contains("placeholder"), "{key}={value} ({named}): {err}");
        }
        for fine in ["secret0", "INSERT_SECRET", "a<b>", "changeme2"] {
            assert!(load(None, &vars(&[("SYNC_MASTER_SECRET", fine)])).is_ok(), "{fine}");
        }
    }

    fn error_of(result: Result<Config, ConfigError>) -> String {
        result.err().map(|e| e.to_string()).unwrap_or_default()
    }

    #[test]
    fn unknown_keys_stop_startup_with_advice() {
        // A known key in the wrong table: the issue's `[tokenserver] master_secret`.
        let err = error_of(with_file("[tokenserver]\nmaster_secret = \"s\"\n", &[]));
        assert!(err.contains("tokenserver.master_secret: unknown configuration key"), "{err}");
        assert!(err.contains("did you mean master_secret?") && err.contains("top level"), "{err}");
        // A near miss, named as typed, in the environment's spelling.
        let err = error_of(load(None, &vars(&[("TOKENSERVER_DATABSE_URL", "sqlite://x.db")])));
        assert!(err.contains("TOKENSERVER_DATABSE_URL: unknown configuration key"), "{err}");
        assert!(err.contains("did you mean TOKENSERVER_DATABASE_URL?"), "{err}");
        let err = error_of(load(None, &vars(&[("SYNC_TOKENSERVER__DATABSE_URL", "sqlite://x.db")])));
        assert!(err.contains("did you mean SYNC_TOKENSERVER__DATABASE_URL?"), "{err}");
        let err = error_of(with_file("[sessions]\ntoken_lifetme = \"1h\"\n", &[]));
        assert!(err.contains("did you mean sessions.token_lifetime?"), "{err}");
        assert!(err.contains("--lenient"), "the way out is named: {err}");
        assert!(!err.contains('\n'), "{err}");
        // Kept as warnings when asked.
        let c = with_file("[config]\nunknown_keys = \"warn\"\n[tokenserver]\nmaster_secret = \"s\"\n", &[])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.warnings.iter().any(|w| w.contains("tokenserver.master_secret") && w.contains("ignored")));
        let c =
            load_with(None, &vars(&[("TOKENSERVER_DATABSE_URL", "x")]), true).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.warnings.iter().any(|w| w.contains("TOKENSERVER_DATABSE_URL")));
        let err = error_of(load(None, &vars(&[("TOKENSERVER_CONFIG__UNKNOWN_KEYS", "sometimes")])));
        assert!(err.contains("TOKENSERVER_CONFIG__UNKNOWN_KEYS: must be error or warn"), "{err}");
        // Mozilla's settings with no effect here start, with a note.
        let c =
            with_file("statsd_host = \"localhost\"\n[syncstorage]\nenabled = false\n", &[("SYNC_CORS_MAX_AGE", "10")])
                .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.warnings.iter().any(|w| w.contains("statsd_host") && w.contains("no effect")), "{:?}", c.warnings);
        assert!(c.warnings.iter().any(|w| w.contains("SYNC_CORS_MAX_AGE")), "{:?}", c.warnings);
    }

    #[test]
    fn type_errors_read_as_prose_naming_the_key() {
        for (key, value, says) in [
            ("SYNC_PORT", "http", "expected a whole number from 0 to 65535, found string \"http\""),
            ("TOKENSERVER_SESSIONS__ENABLED", "maybe", "expected a boolean"),
            ("TOKENSERVER_LIMITS__PUBLIC_MAX_CONNECTIONS", "many", "expected a whole number, 0 or more"),
        ] {
            let err = error_of(load(None, &vars(&[(key, value)])));
            assert!(err.contains(&format!("{key}: ")) && err.contains(says), "{key}={value}: {err}");
            for rust in ["u16", "usize", "u32", "bool", "struct", "enum", "Raw"] {
                assert!(!err.split(|c: char| !c.is_alphanumeric()).any(|w| w == rust), "{rust} in {err}");
            }
        }
        let err = error_of(with_file("port = \"x\"\n", &[]));
        assert!(err.contains("port: expected a whole number"), "{err}");
        let err = error_of(with_file("[sessions]\ntoken_lifetime = [1]\n", &[]));
        assert!(err.contains("sessions.token_lifetime: expected a duration"), "{err}");
    }

    #[test]
    fn the_sync_family_switches_off() {
        let c = load(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.sync.enabled);
        let c = with_file("[tokenserver]\nenabled = false\n", &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!c.sync.enabled, "Mozilla's tokenserver.enabled is honoured");
        let c = with_file("[tokenserver]\nenabled = false\n[sync]\nenabled = true\n", &[])
            .unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.sync.enabled, "sync.enabled wins");
        let c = load(None, &vars(&[("TOKENSERVER_SYNC__ENABLED", "false")])).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(!c.sync.enabled && c.sessions.is_some());
        assert!(
            !c.warnings.iter().any(|w| w.contains("fxa_metrics_hash_secret")),
            "no Sync warnings: {:?}",
            c.warnings
        );
        let err = error_of(load(
            None,
            &vars(&[
                ("TOKENSERVER_SYNC__ENABLED", "0"),
                ("TOKENSERVER_SESSIONS__ENABLED", "0"),
                ("TOKENSERVER_ACCESS__ENABLED", "0"),
            ]),
        ));
        assert!(err.contains("TOKENSERVER_SYNC__ENABLED: ") && err.contains("nothing would be served"), "{err}");
    }

    const EXAMPLE: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../../tokenserver.example.toml"));

    /// The keys the example file writes, commented out or not, as dotted paths.
    fn example_keys() -> Vec<String> {
        let mut table = String::new();
        let mut keys = Vec::new();
        for line in EXAMPLE.lines() {
            let line = line.trim_start_matches('#').trim();
            if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                table = t.replace('"', "");
                continue;
            }
            if let Some((key, _)) = line.split_once(" = ") {
                if !key.is_empty() && key.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_') {
                    keys.push(if table.is_empty() { key.to_string() } else { format!("{table}.{key}") });
                }
            }
        }
        keys
    }

    #[test]
    fn the_example_file_holds_every_key_at_its_default() {
        let dir = std::env::temp_dir().join(format!("ts-example-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| unreachable!("{e}"));
        let path = dir.join("tokenserver.toml");
        std::fs::write(&path, EXAMPLE).unwrap_or_else(|e| unreachable!("{e}"));
        // Strict reading: no unknown key, no warning beyond the default metrics secret.
        let c = load(Some(&path), &[]).unwrap_or_else(|e| unreachable!("{e}"));
        assert!(c.warnings.iter().all(|w| w.contains("fxa_metrics_hash_secret")), "{:?}", c.warnings);
        // Every value as the defaults have it.
        let from_file = check::effective(Some(&path), &[]).unwrap_or_else(|e| unreachable!("{e}"));
        let defaults = check::effective(None, &[]).unwrap_or_else(|e| unreachable!("{e}"));
        let values = |e: &[check::Entry]| e.iter().map(|e| (e.key.clone(), e.value.clone())).collect::<Vec<_>>();
        assert_eq!(values(&from_file), values(&defaults));
        // Every key the configuration reads is written down (the operator-named tables by example).
        let written = example_keys();
        for key in strict::known_keys() {
            let key = key
                .join(".")
                .replace("applications.*", "applications.sync-1.5")
                .replace("services.*", "services.2555417777820")
                // The secondary key has the primary's fields, written once.
                .replace("fxa_oauth_secondary_jwk.", "fxa_oauth_primary_jwk.");
            assert!(written.contains(&key), "{key} missing from tokenserver.example.toml");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
