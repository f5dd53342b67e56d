//! The in-process backend (`memory:`): nothing leaves the process, nothing survives it. Fast,
//! bounded by `max_sessions`, and for one process only (several web heads need a shared store).

pub mod session;

/// How the in-process store is laid out and bounded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryOptions {
    /// Shards (rounded up to a power of two).
    pub shards: usize,
    /// Live sessions held at most; creates beyond fail with [`crate::StoreError::Full`].
    pub max_sessions: u64,
}

impl Default for MemoryOptions {
    fn default() -> Self {
        Self { shards: 256, max_sessions: 10_000_000 }
    }
}
