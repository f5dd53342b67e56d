//! Operations shared by the CLI and the internal API, so both behave identically.

pub mod access_import;
pub mod node;
