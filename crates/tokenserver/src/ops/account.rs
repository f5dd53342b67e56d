//! Account events — an account deleted, its password changed or reset — applied to the Sync
//! users of every configured service. One implementation for the FxA webhook
//! ([`crate::http::webhook`]) and for `tokenserver events`, which replays the legacy
//! `process_account_events` messages from JSON lines.
//!
//! Both are idempotent: retiring touches live rows only, and a generation is never lowered.

use std::io::BufRead;

use serde::Serialize;
use serde_json::Value;
use tokenserver_store::{StoreError, SyncStore};

/// Retires the account in every service (`generation = MAX_GENERATION`, rows replaced): its
/// devices can no longer get tokens, and purge deletes its data later. Rows changed.
pub async fn retire(store: &dyn SyncStore, services: &[&str], email: &str, now_ms: i64) -> Result<u64, StoreError> {
    let mut changed = 0;
    for service in services {
        changed += store.retire_user(service, email, now_ms).await?;
    }
    Ok(changed)
}

/// Raises the account's generation to `generation` in every service where it has rows (never
/// lowering it): devices still on an older generation are refused. Rows changed.
pub async fn raise_generation(
    store: &dyn SyncStore,
    services: &[&str],
    email: &str,
    generation: i64,
) -> Result<u64, StoreError> {
    let mut changed = 0;
    for service in services {
        changed += store.update_user_generation(service, email, Some(generation), None).await?;
    }
    Ok(changed)
}

/// A legacy account message, as `process_account_events` read them from SQS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LegacyEvent {
    /// `delete`: retire the account.
    Delete {
        /// `<uid>@<iss>`.
        email: String,
    },
    /// `reset` or `passwordChange`: the account's new generation.
    GenerationChange {
        /// `reset` or `passwordChange`.
        kind: &'static str,
        /// `<uid>@<iss>`.
        email: String,
        /// The generation in the message (one more than what is stored).
        generation: i64,
    },
    /// Another event type: dropped.
    Unknown(String),
}

/// Parses one message: an SNS envelope `{"Message": "<event as a JSON string>"}` (what the queue
/// held) or the event object itself. The event has `event`, `uid`, optional `iss` and, for
/// `reset` / `passwordChange`, `generation`. The email is `uid@iss`, or `uid` when it already
/// holds an `@` (the legacy form). Errors say what is wrong, for the operator.
pub fn parse_legacy(line: &str) -> Result<LegacyEvent, String> {
    let outer: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let event = match outer.get("Message") {
        Some(Value::String(inner)) => {
            serde_json::from_str::<Value>(inner).map_err(|e| format!("Message is not JSON: {e}"))?
        }
        Some(_) => return Err("Message is not a string".into()),
        None => outer,
    };
    let Some(obj) = event.as_object() else {
        return Err("the event is not an object".into());
    };
    let kind = obj.get("event").and_then(Value::as_str).ok_or("no event type")?;
    let uid = obj.get("uid").and_then(Value::as_str).ok_or("no uid")?;
    let email = match obj.get("iss").and_then(Value::as_str) {
        Some(iss) => format!("{uid}@{iss}"),
        None if uid.contains('@') => uid.to_string(),
        None => return Err("no issuer, and the uid is not an email".into()),
    };
    let generation = || obj.get("generation").and_then(Value::as_i64).ok_or("no generation");
    match kind {
        "delete" => Ok(LegacyEvent::Delete { email }),
        "reset" => Ok(LegacyEvent::GenerationChange { kind: "reset", email, generation: generation()? }),
        "passwordChange" => {
            Ok(LegacyEvent::GenerationChange { kind: "passwordChange", email, generation: generation()? })
        }
        other => Ok(LegacyEvent::Unknown(other.to_string())),
    }
}

/// What a replay did.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct EventSummary {
    /// Non-blank lines read.
    pub messages: u64,
    /// `delete` events applied.
    pub delete: u64,
    /// `reset` events applied.
    pub reset: u64,
    /// `passwordChange` events applied.
    pub password_change: u64,
    /// Events of another type, dropped.
    pub unknown: u64,
    /// Lines that are not a valid message, skipped.
    pub invalid: u64,
    /// User rows changed (0 on a replay of events already applied).
    pub rows_changed: u64,
}

/// Applies every message of `input` (JSON lines) to `services`. Invalid and unknown messages
/// are reported through `warn` (line number and reason) and skipped, as the legacy consumer did;
/// a store failure stops the run (what was applied stays applied, and a rerun is harmless).
pub async fn replay(
    store: &dyn SyncStore,
    services: &[&str],
    input: impl BufRead,
    mut warn: impl FnMut(usize, &str),
) -> Result<EventSummary, String> {
    let mut summary = EventSummary::default();
    for (i, line) in input.lines().enumerate() {
        let line = line.map_err(|e| format!("cannot read line {}: {e}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        summary.messages += 1;
        let event = match parse_legacy(&line) {
            Ok(event) => event,
            Err(why) => {
                summary.invalid += 1;
                warn(i + 1, &format!("invalid account message: {why}"));
                continue;
            }
        };
        let failed = |e: StoreError| format!("line {}: {e}", i + 1);
        match event {
            LegacyEvent::Delete { email } => {
                summary.rows_changed += retire(store, services, &email, super::now_ms()).await.map_err(failed)?;
                summary.delete += 1;
            }
            LegacyEvent::GenerationChange { kind, email, generation } => {
                // One less than the new generation: the first device to present the new one
                // still passes the rule that a client-state change needs a generation increase.
                let stored = generation.saturating_sub(1);
                summary.rows_changed += raise_generation(store, services, &email, stored).await.map_err(failed)?;
                if kind == "reset" {
                    summary.reset += 1;
                } else {
                    summary.password_change += 1;
                }
            }
            LegacyEvent::Unknown(kind) => {
                summary.unknown += 1;
                warn(i + 1, &format!("dropping unknown event type {kind:?}"));
            }
        }
    }
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_bare_events_and_legacy_uids_parse() {
        let inner = r#"{"event":"delete","uid":"test","iss":"example.com"}"#;
        let envelope = serde_json::json!({ "Message": inner }).to_string();
        let delete = LegacyEvent::Delete { email: "test@example.com".into() };
        assert_eq!(parse_legacy(&envelope), Ok(delete.clone()));
        assert_eq!(parse_legacy(inner), Ok(delete.clone()));
        assert_eq!(parse_legacy(r#"{"event":"delete","uid":"test@example.com"}"#), Ok(delete));
        assert_eq!(
            parse_legacy(r#"{"event":"passwordChange","uid":"test","iss":"example.com","generation":43}"#),
            Ok(LegacyEvent::GenerationChange {
                kind: "passwordChange",
                email: "test@example.com".into(),
                generation: 43
            })
        );
        assert_eq!(
            parse_legacy(r#"{"event":"reset","uid":"test@example.com","generation":43}"#),
            Ok(LegacyEvent::GenerationChange { kind: "reset", email: "test@example.com".into(), generation: 43 })
        );
        assert_eq!(
            parse_legacy(r#"{"event":"frobnicate","uid":"test@example.com"}"#),
            Ok(LegacyEvent::Unknown("frobnicate".into()))
        );
    }

    #[test]
    fn malformed_messages_are_invalid() {
        for bad in [
            r#"{"uid":"test","iss":"example.com"}"#,
            r#"{"event":"delete","iss":"example.com"}"#,
            r#"{"event":"reset","uid":"test","iss":"example.com"}"#,
            r#"{"event":"passwordChange","uid":"test@example.com"}"#,
            r#"{"event":"delete","uid":"test"}"#,
            r#""wat""#,
            r#"{"Message":"wat"}"#,
            r#"{"Message":7}"#,
            "{not json",
        ] {
            assert!(parse_legacy(bad).is_err(), "{bad}");
        }
    }
}
