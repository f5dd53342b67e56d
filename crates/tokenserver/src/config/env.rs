//! Environment variables → configuration keys.
//!
//! `TOKENSERVER_<PATH>` and Mozilla's `SYNC_<PATH>` both map to the key path with `__` between
//! levels: `SYNC_TOKENSERVER__DATABASE_URL` → `tokenserver.database_url`,
//! `TOKENSERVER_INTERNAL__PORT` → `internal.port`. A single-level `TOKENSERVER_` name that is not
//! a top-level key is read as a `[tokenserver]` key (`TOKENSERVER_DATABASE_URL`). Values keep
//! their text for string settings (a secret `0123` stays `0123`); others are read as booleans or
//! numbers when they look like one.

use figment::value::Value;

const TOP_LEVEL: &[&str] = &[
    "host",
    "port",
    "master_secret",
    "master_secret_file",
    "human_logs",
    "shutdown_timeout",
    "worker_threads",
    "internal",
    "tokenserver",
    "sessions",
    "access",
    "limits",
    "purge",
    "sync",
    "config",
    "syncstorage",
    "statsd_host",
    "statsd_port",
    "include_hostname_tag",
    "environment",
    "cors_allowed_origin",
    "cors_allowed_methods",
    "cors_allowed_headers",
    "cors_max_age",
    "worker_max_blocking_threads",
    "actix_keep_alive",
];

/// Settings whose values are always text.
const STRING_KEYS: &[&str] = &[
    "host",
    "master_secret",
    "master_secret_file",
    "admin_key",
    "database_url",
    "fxa_email_domain",
    "fxa_metrics_hash_secret",
    "fxa_oauth_server_url",
    "node_type",
    "init_node_url",
    "fxa_webhook_set_client_id",
    "fxa_webhook_set_issuer",
    "kty",
    "alg",
    "kid",
    "use",
    "n",
    "e",
    "pattern",
    "url",
    "api_key",
    "sqlite_synchronous",
    "provider_key",
    "service_tokens",
    "unknown_keys",
];

/// Environment prefixes in increasing precedence.
pub const PREFIXES: &[&str] = &["SYNC_", "TOKENSERVER_"];

/// Prefixes of variables that are never configuration: test harness settings, and the build
/// script's stamps (Cargo passes them to the tests it runs).
const NOT_CONFIG: &[&str] = &["TOKENSERVER_TEST_", "TOKENSERVER_BENCH_", "TOKENSERVER_COMMIT", "TOKENSERVER_BUILD"];

/// The key path (segments) an environment variable sets, if it is one of ours. Segments may
/// contain dots (`sync-1.5`), so they are kept apart rather than joined.
pub fn key_path(name: &str, prefix: &str) -> Option<Vec<String>> {
    if NOT_CONFIG.iter().any(|p| name.starts_with(p)) {
        return None;
    }
    let rest = name.strip_prefix(prefix)?;
    if rest.is_empty() {
        return None;
    }
    let parts: Vec<String> = rest.split("__").map(str::to_ascii_lowercase).collect();
    if parts.iter().any(String::is_empty) {
        return None;
    }
    let mut parts = parts;
    if prefix == "TOKENSERVER_" && !TOP_LEVEL.contains(&parts[0].as_str()) {
        parts.insert(0, "tokenserver".into());
    }
    Some(parts)
}

/// Nests `value` under `path` as a figment dictionary.
pub fn nested(path: &[String], value: Value) -> figment::value::Dict {
    let mut dict = figment::value::Dict::new();
    match path.split_first() {
        Some((first, [])) => {
            dict.insert(first.clone(), value);
        }
        Some((first, rest)) => {
            dict.insert(first.clone(), Value::from(nested(rest, value)));
        }
        None => {}
    }
    dict
}

/// The configuration value for an environment variable's text.
pub fn value_for(path: &[String], raw: &str) -> Value {
    let leaf = path.last().map_or("", String::as_str);
    if STRING_KEYS.contains(&leaf) {
        return Value::from(raw.to_string());
    }
    let trimmed = raw.trim();
    if let Ok(b) = trimmed.parse::<bool>() {
        return Value::from(b);
    }
    if let Ok(i) = trimmed.parse::<i64>() {
        return Value::from(i);
    }
    if let Ok(f) = trimmed.parse::<f64>() {
        return Value::from(f);
    }
    Value::from(raw.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn path(name: &str, prefix: &str) -> Option<String> {
        key_path(name, prefix).map(|p| p.join("."))
    }

    fn v(path: &str, raw: &str) -> Value {
        value_for(&path.split('.').map(String::from).collect::<Vec<_>>(), raw)
    }

    #[test]
    fn names_map_to_paths() {
        assert_eq!(path("SYNC_TOKENSERVER__DATABASE_URL", "SYNC_").as_deref(), Some("tokenserver.database_url"));
        assert_eq!(path("SYNC_MASTER_SECRET", "SYNC_").as_deref(), Some("master_secret"));
        assert_eq!(
            path("SYNC_TOKENSERVER__FXA_OAUTH_PRIMARY_JWK__N", "SYNC_").as_deref(),
            Some("tokenserver.fxa_oauth_primary_jwk.n")
        );
        assert_eq!(path("TOKENSERVER_DATABASE_URL", "TOKENSERVER_").as_deref(), Some("tokenserver.database_url"));
        assert_eq!(path("TOKENSERVER_PORT", "TOKENSERVER_").as_deref(), Some("port"));
        assert_eq!(path("TOKENSERVER_INTERNAL__ADMIN_KEY", "TOKENSERVER_").as_deref(), Some("internal.admin_key"));
        assert_eq!(path("TOKENSERVER_TEST_POSTGRES_URL", "TOKENSERVER_"), None);
        assert_eq!(path("SYNC_", "SYNC_"), None);
        assert_eq!(path("SYNC_A____B", "SYNC_"), None);
        assert_eq!(
            path("TOKENSERVER_APPLICATIONS__SYNC-1.5__PATTERN", "TOKENSERVER_").as_deref(),
            Some("tokenserver.applications.sync-1.5.pattern")
        );
        assert_eq!(path("HOME", "SYNC_"), None);
    }

    #[test]
    fn values_keep_text_for_string_keys() {
        assert_eq!(v("master_secret", "0123"), Value::from("0123".to_string()));
        assert_eq!(v("tokenserver.fxa_oauth_primary_jwk.kid", "123"), Value::from("123".to_string()));
        assert_eq!(v("port", "8000"), Value::from(8000i64));
        assert_eq!(v("tokenserver.allow_new_users", "false"), Value::from(false));
        assert_eq!(v("tokenserver.node_capacity_release_rate", "0.5"), Value::from(0.5f64));
        assert_eq!(v("tokenserver.run_migrations", "1"), Value::from(1i64));
    }
}
