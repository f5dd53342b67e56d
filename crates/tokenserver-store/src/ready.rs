//! Futures that never suspend: the steps of the SQLite writer and of the memory store are
//! synchronous, and the transactional logic they share with the network backends is async only
//! so that it can be written once.

use std::future::Future;
use std::pin::pin;
use std::task::{Context, Poll, Waker};

use crate::StoreError;

/// Completes `fut` on its first poll (every step it awaits is synchronous); a step that did
/// suspend is a bug in the caller, reported as a backend error rather than a hang.
pub(crate) fn run_now<T>(fut: impl Future<Output = Result<T, StoreError>>) -> Result<T, StoreError> {
    let mut fut = pin!(fut);
    match fut.as_mut().poll(&mut Context::from_waker(Waker::noop())) {
        Poll::Ready(out) => out,
        Poll::Pending => Err(StoreError::Backend("a synchronous store step suspended".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_futures_complete_and_pending_ones_are_an_error() {
        assert_eq!(run_now(async { Ok::<_, StoreError>(7) }).unwrap(), 7);
        let pending = std::future::pending::<Result<(), StoreError>>();
        assert!(matches!(run_now(pending), Err(StoreError::Backend(_))));
    }
}
