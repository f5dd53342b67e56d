//! Pure token rules for tokenserver: no I/O, no async, no HTTP types.
//!
//! Everything here is a function of its inputs (plus an explicit `now` where time matters, read
//! from [`clock`] by the callers), so it is tested with tables of cases and shared by the server,
//! the CLI and every storage backend.

pub mod access;
pub mod clock;
pub mod secret;
pub mod session;
pub mod sync;

pub use secret::Secret;
