//! Session metadata: a JSON object, kept in canonical form (keys sorted at every level, compact),
//! bounded in size, depth and key count, and changed either by HaKr's shallow merge or by JSON
//! Merge Patch (RFC 7396).

use serde_json::{Map, Value};

/// Bounds on one session's metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetaLimits {
    /// Bytes of the canonical JSON.
    pub max_bytes: usize,
    /// Nesting depth: the top-level object is depth 1.
    pub max_depth: usize,
    /// Object keys, counted at every level.
    pub max_keys: usize,
}

impl Default for MetaLimits {
    fn default() -> Self {
        Self { max_bytes: 16 * 1024, max_depth: 8, max_keys: 256 }
    }
}

/// Why metadata was refused. Nothing is changed when it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    /// Larger than `max_bytes` (HTTP 413).
    #[error("metadata is {size} bytes, more than the limit of {limit}")]
    TooLarge {
        /// Canonical size.
        size: usize,
        /// Configured limit.
        limit: usize,
    },
    /// Nested deeper than `max_depth` (HTTP 422).
    #[error("metadata nests deeper than the limit of {limit} levels")]
    TooDeep {
        /// Configured limit.
        limit: usize,
    },
    /// More keys than `max_keys` (HTTP 422).
    #[error("metadata has {count} keys, more than the limit of {limit}")]
    TooManyKeys {
        /// Keys counted.
        count: usize,
        /// Configured limit.
        limit: usize,
    },
}

/// How an update is applied to stored metadata.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaUpdate {
    /// HaKr's `PUT /token`: each top-level key replaced; `null` is stored as `null`.
    Shallow(Map<String, Value>),
    /// RFC 7396 JSON Merge Patch: objects merged recursively, `null` deletes a key.
    MergePatch(Value),
}

fn depth_and_keys(v: &Value, depth: usize, keys: &mut usize, max_depth: &mut usize) {
    match v {
        Value::Object(m) => {
            *max_depth = (*max_depth).max(depth);
            *keys += m.len();
            for child in m.values() {
                depth_and_keys(child, depth + 1, keys, max_depth);
            }
        }
        Value::Array(items) => {
            *max_depth = (*max_depth).max(depth);
            for child in items {
                depth_and_keys(child, depth + 1, keys, max_depth);
            }
        }
        _ => {}
    }
}

/// Checks `meta` against `limits` and returns its canonical JSON text.
pub fn canonical(meta: Map<String, Value>, limits: &MetaLimits) -> Result<String, MetaError> {
    let mut value = Value::Object(meta);
    let (mut keys, mut depth) = (0, 0);
    depth_and_keys(&value, 1, &mut keys, &mut depth);
    if depth > limits.max_depth {
        return Err(MetaError::TooDeep { limit: limits.max_depth });
    }
    if keys > limits.max_keys {
        return Err(MetaError::TooManyKeys { count: keys, limit: limits.max_keys });
    }
    value.sort_all_objects();
    let text = value.to_string();
    if text.len() > limits.max_bytes {
        return Err(MetaError::TooLarge { size: text.len(), limit: limits.max_bytes });
    }
    Ok(text)
}

/// RFC 7396 §2: merges `patch` into `target`.
pub fn merge_patch(target: &mut Value, patch: Value) {
    match patch {
        Value::Object(fields) => {
            if !target.is_object() {
                *target = Value::Object(Map::new());
            }
            if let Value::Object(map) = target {
                for (key, value) in fields {
                    if value.is_null() {
                        map.remove(&key);
                    } else {
                        merge_patch(map.entry(key).or_insert(Value::Null), value);
                    }
                }
            }
        }
        other => *target = other,
    }
}

/// Applies `update` to the stored canonical metadata `current` and returns the new canonical
/// text, checked against `limits`. A patch that is not an object replaces the whole document
/// under RFC 7396; metadata must stay an object, so that is refused as [`MetaError::TooDeep`]'s
/// sibling: the caller validates the patch shape before calling (see [`check_patch_shape`]).
pub fn apply(current: &str, update: MetaUpdate, limits: &MetaLimits) -> Result<String, MetaError> {
    let mut map: Map<String, Value> = serde_json::from_str(current).unwrap_or_default();
    match update {
        MetaUpdate::Shallow(fields) => map.extend(fields),
        MetaUpdate::MergePatch(patch) => {
            let mut doc = Value::Object(map);
            merge_patch(&mut doc, patch);
            map = match doc {
                Value::Object(m) => m,
                _ => Map::new(),
            };
        }
    }
    canonical(map, limits)
}

/// A merge patch for session metadata must be an object (anything else would replace the
/// metadata with a non-object).
pub fn check_patch_shape(patch: &Value) -> bool {
    patch.is_object()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn obj(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => Map::new(),
        }
    }

    #[test]
    fn canonical_sorts_keys_at_every_level() {
        let text = canonical(obj(json!({"z": 1, "a": {"y": 2, "b": [ {"d": 1, "c": 2} ]}})), &MetaLimits::default());
        assert_eq!(text.as_deref(), Ok(r#"{"a":{"b":[{"c":2,"d":1}],"y":2},"z":1}"#));
    }

    #[test]
    fn hakr_shallow_merge_replaces_nested_objects_and_stores_null() {
        // Reference §6: {"a":{"x":1}} updated with {"a":{"y":2}} gives {"a":{"y":2}}; null stays.
        let out = apply(
            r#"{"a":{"x":1},"name":"My user"}"#,
            MetaUpdate::Shallow(obj(json!({"a": {"y": 2}, "z": null, "year": 2023}))),
            &MetaLimits::default(),
        );
        assert_eq!(out.as_deref(), Ok(r#"{"a":{"y":2},"name":"My user","year":2023,"z":null}"#));
    }

    #[test]
    fn merge_patch_follows_rfc7396_appendix_a() {
        // A selection of RFC 7396 Appendix A's examples.
        let cases = [
            (json!({"a": "b"}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "b"}), json!({"b": "c"}), json!({"a": "b", "b": "c"})),
            (json!({"a": "b"}), json!({"a": null}), json!({})),
            (json!({"a": "b", "b": "c"}), json!({"a": null}), json!({"b": "c"})),
            (json!({"a": ["b"]}), json!({"a": "c"}), json!({"a": "c"})),
            (json!({"a": "c"}), json!({"a": ["b"]}), json!({"a": ["b"]})),
            (json!({"a": {"b": "c"}}), json!({"a": {"b": "d", "c": null}}), json!({"a": {"b": "d"}})),
            (json!({"a": [{"b": "c"}]}), json!({"a": [1]}), json!({"a": [1]})),
            (json!({"e": null}), json!({"a": 1}), json!({"e": null, "a": 1})),
            (json!([1, 2]), json!({"a": "b", "c": null}), json!({"a": "b"})),
            (json!({}), json!({"a": {"bb": {"ccc": null}}}), json!({"a": {"bb": {}}})),
            (json!({"a": "b"}), json!(["c"]), json!(["c"])),
            (json!({"a": "foo"}), json!(null), json!(null)),
        ];
        for (target, patch, expected) in cases {
            let mut doc = target.clone();
            merge_patch(&mut doc, patch.clone());
            assert_eq!(doc, expected, "{target} + {patch}");
        }
    }

    #[test]
    fn apply_merge_patch_deletes_with_null() {
        let out = apply(
            r#"{"a":{"x":1,"y":2},"b":true}"#,
            MetaUpdate::MergePatch(json!({"a": {"x": null}, "b": null, "c": [1]})),
            &MetaLimits::default(),
        );
        assert_eq!(out.as_deref(), Ok(r#"{"a":{"y":2},"c":[1]}"#));
    }

    #[test]
    fn limits_on_size_depth_and_keys() {
        let limits = MetaLimits { max_bytes: 20, max_depth: 3, max_keys: 3 };
        assert_eq!(
            canonical(obj(json!({"k": "0123456789abcdef"})), &limits),
            Err(MetaError::TooLarge { size: 24, limit: 20 })
        );
        assert!(canonical(obj(json!({"a": {"b": {}}})), &limits).is_ok());
        assert_eq!(canonical(obj(json!({"a": {"b": {"c": 1}}})), &limits), Ok(r#"{"a":{"b":{"c":1}}}"#.into()));
        assert_eq!(canonical(obj(json!({"a": {"b": {"c": {}}}})), &limits), Err(MetaError::TooDeep { limit: 3 }));
        assert_eq!(canonical(obj(json!({"a": [[[1]]]})), &limits), Err(MetaError::TooDeep { limit: 3 }));
        assert_eq!(
            canonical(obj(json!({"a": 1, "b": {"c": 1, "d": 2}})), &limits),
            Err(MetaError::TooManyKeys { count: 4, limit: 3 })
        );
        // The merged result is what is checked.
        assert_eq!(
            apply(r#"{"a":1,"b":2}"#, MetaUpdate::Shallow(obj(json!({"c": 3, "d": 4}))), &limits),
            Err(MetaError::TooManyKeys { count: 4, limit: 3 })
        );
        assert_eq!(
            apply(r#"{"a":1,"b":2}"#, MetaUpdate::MergePatch(json!({"a": null, "d": 4})), &limits),
            Ok(r#"{"b":2,"d":4}"#.into())
        );
    }

    #[test]
    fn patch_shape() {
        assert!(check_patch_shape(&json!({})));
        assert!(!check_patch_shape(&json!([])));
        assert!(!check_patch_shape(&json!(null)));
    }
}
