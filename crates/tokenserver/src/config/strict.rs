//! Configuration that fails loudly: every key a file or the environment sets must be one we
//! read, a key in the wrong table or a near-miss spelling is answered with `did you mean …`, and
//! every message names the key as the user wrote it (the environment variable, or the file key).
//!
//! Mozilla's own settings that mean nothing here (statsd, CORS, actix, the storage half) are
//! accepted with a note, so an upstream file still starts; anything else unknown stops startup
//! unless `config.unknown_keys = "warn"` (or `--lenient`) asks for today's warnings instead.

use std::path::Path;

use super::env;

/// What an unknown key does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownKeys {
    /// Stops startup (the default).
    #[default]
    Error,
    /// Logged as a warning and ignored.
    Warn,
}

impl UnknownKeys {
    /// From `config.unknown_keys`.
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "error" | "" => Some(Self::Error),
            "warn" | "warning" => Some(Self::Warn),
            _ => None,
        }
    }
}

/// Mozilla syncstorage-rs settings read upstream that have no effect here (top level, then
/// `[tokenserver]`; the whole `[syncstorage]` table is accepted by the file model itself).
const UPSTREAM_NO_EFFECT: &[&[&str]] = &[
    &["statsd_host"],
    &["statsd_port"],
    &["include_hostname_tag"],
    &["environment"],
    &["cors_allowed_origin"],
    &["cors_allowed_methods"],
    &["cors_allowed_headers"],
    &["cors_max_age"],
    &["worker_max_blocking_threads"],
    &["actix_keep_alive"],
    &["tokenserver", "statsd_label"],
    &["tokenserver", "additional_blocking_threads_for_fxa_requests"],
    &["tokenserver", "fxa_browserid_audience"],
    &["tokenserver", "fxa_browserid_issuer"],
    &["tokenserver", "fxa_browserid_server_url"],
    &["tokenserver", "fxa_browserid_request_timeout"],
    &["tokenserver", "fxa_browserid_connect_timeout"],
];

/// Keys under tables whose names are the operator's (`*`), and the JWK fields, which the
/// defaults do not show.
const PATTERNED: &[&[&str]] = &[
    &["tokenserver", "applications", "*", "pattern"],
    &["tokenserver", "applications", "*", "token_duration"],
    &["tokenserver", "applications", "*", "node_type"],
    &["access", "services", "*", "provider_key"],
    &["access", "services", "*", "service_tokens"],
];

const JWK_FIELDS: &[&str] = &["kty", "alg", "kid", "use", "n", "e", "fxa_created_at"];

/// Every key path the configuration reads, `*` standing for an operator-chosen name.
pub fn known_keys() -> Vec<Vec<String>> {
    let defaults = serde_json::to_value(super::FileConfig::default()).unwrap_or_default();
    let mut out = Vec::new();
    leaves(&defaults, &mut Vec::new(), &mut out);
    out.retain(|p| !matches!(p.get(1).map(String::as_str), Some("applications" | "services")) || p.len() == 2);
    out.retain(|p| !p.last().is_some_and(|l| l.ends_with("_jwk")));
    for which in ["fxa_oauth_primary_jwk", "fxa_oauth_secondary_jwk"] {
        for field in JWK_FIELDS {
            out.push(vec!["tokenserver".into(), which.into(), (*field).into()]);
        }
    }
    out.extend(PATTERNED.iter().map(|p| p.iter().map(|s| s.to_string()).collect()));
    out.push(vec!["tokenserver".into(), "enabled".into()]);
    out.push(vec!["sync".into(), "enabled".into()]);
    // Tables (empty in the defaults) are not keys: what goes in them is.
    let all = out.clone();
    out.retain(|p| !all.iter().any(|o| o.len() > p.len() && o.starts_with(p)));
    out
}

fn leaves(value: &serde_json::Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaves(v, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

#[cfg(test)]
fn matches(pattern: &[String], path: &[String]) -> bool {
    pattern.len() == path.len() && pattern.iter().zip(path).all(|(p, s)| p == "*" || p == s)
}

/// Where the user wrote the settings: a file and the environment.
#[derive(Debug, Clone, Copy)]
pub struct Sources<'a> {
    /// `--config`.
    pub file: Option<&'a Path>,
    /// The environment.
    pub vars: &'a [(String, String)],
}

impl Sources<'_> {
    /// The environment variable that sets `path`, the one that wins when several do.
    pub fn env_var(&self, path: &[String]) -> Option<&str> {
        let mut found = None;
        for prefix in env::PREFIXES {
            for (name, _) in self.vars {
                if env::key_path(name, prefix).is_some_and(|p| p == path) {
                    found = Some(name.as_str());
                }
            }
        }
        found
    }

    /// The key as the user wrote it: its environment variable, else its file key.
    pub fn name(&self, path: &[String]) -> String {
        match self.env_var(path) {
            Some(var) => var.to_string(),
            None => path.join("."),
        }
    }

    /// `name` for a dotted key (validation names keys so; table names may hold dots).
    pub fn name_dotted(&self, key: &str) -> String {
        let mut found = None;
        for prefix in env::PREFIXES {
            for (name, _) in self.vars {
                let Some(path) = env::key_path(name, prefix) else { continue };
                let dotted = path.join(".");
                if dotted == key {
                    found = Some(name.clone());
                } else if dotted.starts_with(&format!("{key}.")) {
                    // A table set key by key (a JWK): name the variables' common stem.
                    let deeper = dotted[key.len() + 1..].split('.').count();
                    let stem = name.rsplitn(deeper + 1, "__").last().unwrap_or(name);
                    found = Some(format!("{stem}__*"));
                }
            }
        }
        found.unwrap_or_else(|| key.to_string())
    }
}

/// The environment variable spelling of `path`, with the prefix `like` was written with.
fn env_spelling(path: &[String], like: &str) -> String {
    let upper: Vec<String> = path.iter().map(|s| s.to_ascii_uppercase()).collect();
    if like.starts_with("TOKENSERVER_") && upper.first().is_some_and(|s| s == "TOKENSERVER") && upper.len() == 2 {
        return format!("TOKENSERVER_{}", upper[1]);
    }
    let prefix = if like.starts_with("SYNC_") { "SYNC_" } else { "TOKENSERVER_" };
    format!("{prefix}{}", upper.join("__"))
}

fn table_name(path: &[String]) -> String {
    match path.len() {
        0 | 1 => "the top level (before any [table])".into(),
        n => format!("[{}]", path[..n - 1].join(".")),
    }
}

/// The advice for an unknown key: the nearest spelling of a key or table, else the table a
/// known key of that name belongs in.
fn advice(path: &[String], known: &[Vec<String>]) -> Option<Vec<String>> {
    let leaf = path.last()?;
    let concrete = |k: &Vec<String>| -> Vec<String> {
        k.iter()
            .enumerate()
            .map(|(i, s)| if s == "*" { path.get(i).cloned().unwrap_or_default() } else { s.clone() })
            .collect()
    };
    // Tables are candidates too (`[sesions]`).
    let mut candidates: Vec<Vec<String>> = Vec::new();
    for k in known {
        for n in 1..=k.len() {
            let c = concrete(&k[..n].to_vec());
            if !candidates.contains(&c) {
                candidates.push(c);
            }
        }
    }
    // A near-miss spelling: the closest by edit distance, within a third of its length.
    let dotted = path.join(".");
    let near = candidates
        .iter()
        .map(|k| (strsim::damerau_levenshtein(&dotted, &k.join(".")), k))
        .filter(|(d, k)| *d <= (k.join(".").len() / 3).clamp(1, 4))
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k.clone());
    // Else the same name in another table (`[tokenserver] master_secret`).
    near.or_else(|| known.iter().find(|k| k.last() == Some(leaf) && !k.iter().any(|s| s == "*")).cloned())
}

/// One unknown key as the user wrote it: (name, its key path, other readings of the name).
fn as_written(path: &[String], sources: Sources<'_>) -> Vec<(String, Vec<String>, Vec<Vec<String>>)> {
    let mut out = Vec::new();
    for prefix in env::PREFIXES {
        for (name, _) in sources.vars {
            let Some(full) = env::key_path(name, prefix) else { continue };
            if !full.starts_with(path) {
                continue;
            }
            // `TOKENSERVER_X__Y` read under [tokenserver] may have meant a table `x`.
            let mut readings = Vec::new();
            if *prefix == "TOKENSERVER_" && full.len() > 2 && !name.starts_with("TOKENSERVER_TOKENSERVER__") {
                readings.push(full[1..].to_vec());
            }
            out.push((name.clone(), full, readings));
        }
    }
    if out.is_empty() {
        out.push((path.join("."), path.to_vec(), Vec::new()));
    }
    out
}

/// What the unknown keys amount to: messages that stop startup and notes to log.
#[derive(Debug, Default)]
pub struct Verdict {
    /// Unknown keys (each one line); empty when none or when they only warn.
    pub errors: Vec<String>,
    /// Warnings to log.
    pub warnings: Vec<String>,
}

/// Judges the key paths nothing read.
pub fn judge(unknown: &[Vec<String>], sources: Sources<'_>, mode: UnknownKeys) -> Verdict {
    let known = known_keys();
    let mut verdict = Verdict::default();
    for path in unknown {
        if UPSTREAM_NO_EFFECT.iter().any(|u| u.len() == path.len() && u.iter().zip(path).all(|(a, b)| a == b)) {
            verdict.warnings.push(format!("{}: Mozilla setting with no effect here (ignored)", sources.name(path)));
            continue;
        }
        for (named, full, readings) in as_written(path, sources) {
            let from_env = named != full.join(".");
            let best = std::iter::once(&full)
                .chain(readings.iter())
                .filter_map(|p| {
                    advice(p, &known).map(|k| (strsim::damerau_levenshtein(&p.join("."), &k.join(".")), p, k))
                })
                .min_by_key(|(d, _, _)| *d);
            let hint = match best {
                Some((_, p, k)) if k.last() == p.last() && k.len() != p.len() => {
                    let spelled =
                        if from_env { format!(" (environment: {})", env_spelling(&k, &named)) } else { String::new() };
                    format!(
                        "; did you mean {}? `{}` belongs in {}{spelled}",
                        k.join("."),
                        p.last().map_or("", |s| s),
                        table_name(&k)
                    )
                }
                Some((_, _, k)) if from_env => format!("; did you mean {}?", env_spelling(&k, &named)),
                Some((_, _, k)) => format!("; did you mean {}?", k.join(".")),
                None => String::new(),
            };
            let message = format!("{named}: unknown configuration key{hint}");
            match mode {
                UnknownKeys::Error => verdict.errors.push(message),
                UnknownKeys::Warn => verdict.warnings.push(format!("{message} (ignored)")),
            }
        }
    }
    if !verdict.errors.is_empty() {
        verdict.errors.push(
            "(a deployment carrying keys of another version can set config.unknown_keys = \"warn\" or pass --lenient)"
                .into(),
        );
    }
    verdict
}

/// The key path of a `serde_ignored` path (table names may hold dots, so segments are kept).
pub fn segments(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path as P;
    let mut out = match path {
        P::Root => return Vec::new(),
        P::Seq { parent, .. } | P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
            return segments(parent)
        }
        P::Map { parent, .. } => segments(parent),
    };
    if let P::Map { key, .. } = path {
        out.push(key.clone());
    }
    out
}

/// Figment's description of what a value should have been, in the user's words rather than
/// Rust's (`u16` → a whole number from 0 to 65535).
pub fn expected(rust: &str) -> String {
    match rust {
        "u8" => "a whole number from 0 to 255".into(),
        "u16" => "a whole number from 0 to 65535".into(),
        "u32" => "a whole number from 0 to 4294967295".into(),
        "u64" | "usize" => "a whole number, 0 or more".into(),
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number".into(),
        "f32" | "f64" => "a number".into(),
        "option" => "a value".into(),
        "a sequence" => "a list".into(),
        "a map" => "a table".into(),
        s if s.starts_with("struct ") || s.starts_with("map") => "a table".into(),
        s => s.to_string(),
    }
}

/// A figment error's kind as one user-facing sentence.
pub fn describe(kind: &figment::error::Kind) -> String {
    use figment::error::Kind;
    match kind {
        Kind::InvalidType(actual, want) => format!("expected {}, found {actual}", expected(want)),
        Kind::InvalidValue(actual, want) => format!("{actual} is not {}", expected(want)),
        Kind::InvalidLength(n, want) => format!("{n} items is not {}", expected(want)),
        Kind::Message(m) if m.contains("untagged enum DurationText") => {
            "expected a duration such as 2h, 10min, 1500ms or 60days, or a number of seconds".into()
        }
        Kind::Message(m) if m.contains("untagged enum Secrets") => {
            "expected a secret (a string) or a list of secrets".into()
        }
        Kind::Message(m) if m.contains("untagged enum Raw") => {
            "expected a boolean (true or false, 1 or 0, yes or no)".into()
        }
        Kind::Message(m) if m.contains("untagged enum") => "a value of the wrong kind".into(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Vec<String> {
        s.split('.').map(String::from).collect()
    }

    #[test]
    fn known_keys_cover_the_tables() {
        let known = known_keys();
        for key in ["host", "tokenserver.database_url", "sessions.api_key", "sync.enabled", "config.unknown_keys"] {
            assert!(known.contains(&p(key)), "{key}");
        }
        assert!(known.iter().any(|k| matches(k, &p("tokenserver.applications.notes-2.pattern"))));
        assert!(known.contains(&p("tokenserver.fxa_oauth_primary_jwk.kid")));
    }

    #[test]
    fn advice_finds_the_table_or_the_spelling() {
        let known = known_keys();
        assert_eq!(advice(&p("tokenserver.master_secret"), &known), Some(p("master_secret")));
        assert_eq!(advice(&p("tokenserver.databse_url"), &known), Some(p("tokenserver.database_url")));
        assert_eq!(advice(&p("sessions.tokn_lifetime"), &known), Some(p("sessions.token_lifetime")));
        assert_eq!(advice(&p("completely_unrelated_thing"), &known), None);
    }

    #[test]
    fn messages_name_the_key_as_typed() {
        let vars = vec![("TOKENSERVER_DATABSE_URL".to_string(), "x".to_string())];
        let sources = Sources { file: None, vars: &vars };
        let v = judge(&[p("tokenserver.databse_url")], sources, UnknownKeys::Error);
        assert!(v.errors[0].starts_with("TOKENSERVER_DATABSE_URL: unknown configuration key"), "{:?}", v.errors);
        assert!(v.errors[0].contains("did you mean TOKENSERVER_DATABASE_URL?"), "{:?}", v.errors);
        let v = judge(&[p("tokenserver.databse_url")], sources, UnknownKeys::Warn);
        assert!(v.errors.is_empty() && v.warnings.len() == 1);
        let v = judge(&[p("tokenserver.statsd_label")], sources, UnknownKeys::Error);
        assert!(v.errors.is_empty() && v.warnings[0].contains("no effect"));
    }

    #[test]
    fn expectations_read_as_prose() {
        assert_eq!(expected("u16"), "a whole number from 0 to 65535");
        assert_eq!(expected("struct SyncFile"), "a table");
        assert_eq!(expected("a string"), "a string");
    }
}
