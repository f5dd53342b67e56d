//! `tokenserver config check`: the effective configuration, each value with where it came from
//! (default, the file, or the environment variable that set it), secrets masked.

use std::path::Path;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde_json::Value;

use super::strict::{self, Sources};

/// Keys whose values are secrets: shown only as set or not.
const SECRET_LEAVES: &[&str] =
    &["master_secret", "admin_key", "api_key", "fxa_metrics_hash_secret", "provider_key", "service_tokens"];
/// Keys whose values are URLs that may carry a password.
const URL_LEAVES: &[&str] = &["database_url", "url"];

/// One effective setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Dotted key.
    pub key: String,
    /// Its value as TOML would write it, secrets masked.
    pub value: String,
    /// `default`, `file <path>` or `env <VARIABLE>`.
    pub source: String,
}

fn leaves(value: &Value, prefix: &mut Vec<String>, out: &mut Vec<(Vec<String>, Value)>) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                prefix.push(k.clone());
                leaves(v, prefix, out);
                prefix.pop();
            }
        }
        Value::Object(_) => {}
        other => out.push((prefix.clone(), other.clone())),
    }
}

fn mask(path: &[String], value: &Value) -> String {
    let leaf = path.last().map_or("", String::as_str);
    if SECRET_LEAVES.contains(&leaf) {
        return match value {
            Value::Null => "(unset)".into(),
            Value::String(s) if s.is_empty() => "(unset)".into(),
            Value::Array(items) => format!("(set: {} secrets)", items.len()),
            _ => "(set)".into(),
        };
    }
    if let (true, Value::String(s)) = (URL_LEAVES.contains(&leaf), value) {
        if let Ok(mut url) = url::Url::parse(s) {
            if url.password().is_some() {
                let _ = url.set_password(Some("****"));
                return format!("{:?}", url.to_string());
            }
        }
    }
    match value {
        Value::Null => "(unset)".into(),
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// Every setting of the configuration `path` and `vars` make, in key order.
pub fn effective(path: Option<&Path>, vars: &[(String, String)]) -> Result<Vec<Entry>, String> {
    let merged: Value = super::figment(path, vars).extract().map_err(|e| e.to_string())?;
    let from_file: Vec<Vec<String>> = match path {
        Some(p) => {
            let file: Value = Figment::from(Toml::file_exact(p)).extract().map_err(|e| e.to_string())?;
            let mut out = Vec::new();
            leaves(&file, &mut Vec::new(), &mut out);
            out.into_iter().map(|(k, _)| k).collect()
        }
        None => Vec::new(),
    };
    let sources = Sources { file: path, vars };
    let mut all = Vec::new();
    leaves(&merged, &mut Vec::new(), &mut all);
    let known_keys = strict::known_keys();
    // A table is not a setting: only what is set inside it is shown.
    all.retain(|(k, _)| !known_keys.iter().any(|known| known.len() > k.len() && known.starts_with(k)));
    // Keys with no value by default (a JWK, an admin key) are shown too, as unset.
    for known in known_keys {
        if known.iter().any(|s| s == "*") {
            continue;
        }
        // An unset JWK is one unset key, not seven.
        let known = if known.get(1).is_some_and(|t| t.ends_with("_jwk")) { known[..2].to_vec() } else { known };
        if !all.iter().any(|(k, _)| k.starts_with(&known) || known.starts_with(k)) {
            all.push((known, Value::Null));
        }
    }
    all.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(all
        .into_iter()
        .map(|(key, value)| {
            let source = match sources.env_var(&key) {
                Some(var) => format!("env {var}"),
                None if from_file.contains(&key) => {
                    format!("file {}", path.map(|p| p.display().to_string()).unwrap_or_default())
                }
                None => "default".into(),
            };
            Entry { value: mask(&key, &value), key: key.join("."), source }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_and_masks() {
        let dir = std::env::temp_dir().join(format!("ts-check-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let file = dir.join("c.toml");
        let _ = std::fs::write(&file, "master_secret = \"s3cret\"\n[tokenserver]\nnode_type = \"mysql\"\n");
        let vars = vec![
            ("TOKENSERVER_DATABASE_URL".to_string(), "postgres://u:pw@db/ts".to_string()),
            ("SYNC_PORT".to_string(), "9000".to_string()),
        ];
        let entries = effective(Some(&file), &vars).unwrap_or_else(|e| unreachable!("{e}"));
        let get = |k: &str| entries.iter().find(|e| e.key == k).cloned().unwrap_or_else(|| unreachable!("{k}"));
        assert_eq!(get("master_secret").value, "(set)");
        assert!(get("master_secret").source.starts_with("file "));
        assert_eq!(get("tokenserver.node_type").value, "\"mysql\"");
        assert_eq!(get("tokenserver.database_url").value, "\"postgres://u:****@db/ts\"");
        assert_eq!(get("tokenserver.database_url").source, "env TOKENSERVER_DATABASE_URL");
        assert_eq!((get("port").value.as_str(), get("port").source.as_str()), ("9000", "env SYNC_PORT"));
        assert_eq!((get("host").value.as_str(), get("host").source.as_str()), ("\"127.0.0.1\"", "default"));
        assert_eq!(get("internal.admin_key").value, "(unset)");
        let text = format!("{entries:?}");
        assert!(!text.contains("s3cret") && !text.contains(":pw@"), "{text}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
