//! tokenserver: issues, checks, rotates and revokes tokens. This crate is the binary's library:
//! configuration, CLI, HTTP routers and the flows that tie `tokenserver-core` rules to
//! `tokenserver-store` backends and `tokenserver-auth` verifiers.

// Module docs link private items (see tokenserver-store's lib.rs).
#![allow(rustdoc::private_intra_doc_links)]

pub mod access;
pub mod admission;
pub mod app;
pub mod cli;
pub mod config;
pub mod http;
pub mod jobs;
pub mod keys;
pub mod ops;
pub mod session;
pub mod state;
pub mod sync;
pub mod telemetry;
