//! The Sync token protocol (Mozilla Tokenserver), as pure rules.
//!
//! * [`tokenlib`] — the signed token (`id`) and derived Hawk secret (`key`), byte-compatible with
//!   Python `tokenlib` 2.0.0;
//! * [`hashes`] — `hashed_fxa_uid` / `hashed_device_id` metrics hashes;
//! * [`keyid`] — `X-KeyID` / `X-Client-State` parsing and the `fxa_kid` format;
//! * [`consistency`] — validation rules V1–V8 and what to write after them;
//! * [`users`] — which of a user's assignment rows is current, and what it needs;
//! * [`allocation`] — node choice and gradual capacity release;
//! * [`buckets`] — which bucket a user hashes into (bucketed assignment);
//! * [`scope`] — FxA scope matching.

pub mod allocation;
pub mod buckets;
pub mod consistency;
pub mod crypto;
pub mod hashes;
pub mod keyid;
pub mod scope;
pub mod tokenlib;
pub mod users;

/// The generation that marks a retired (deleted) account: `i64::MAX`.
pub const MAX_GENERATION: i64 = i64::MAX;

/// The OAuth scope a Sync client must hold.
pub const SYNC_SCOPE: &str = "https://identity.mozilla.com/apps/oldsync";
