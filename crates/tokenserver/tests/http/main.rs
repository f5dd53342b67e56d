//! Black-box HTTP tests: a real tokenserver on a real socket, a mock FxA, a real SQLite file.
//! One binary for all of them (link time), one module per area.

// Tests may unwrap: a failure is a test failure.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

// First: its `per_backend!` is used by the modules below.
#[macro_use]
mod common;
mod abuse;
mod access;
mod admin;
mod backends;
mod families;
mod hardening;
mod identity;
mod lifecycle;
mod log_secrets;
mod observability;
mod operations;
mod proxy;
mod python_tokenlib;
mod readme;
mod sessions;
mod sync_api;
mod validation;
mod web_heads;
mod webhook;
