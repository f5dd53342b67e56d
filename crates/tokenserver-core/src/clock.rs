//! The wall clock, read in this one place; every rule takes `now` as an argument instead.

use std::time::{SystemTime, UNIX_EPOCH};

fn since_epoch() -> std::time::Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// Milliseconds since the UNIX epoch.
pub fn now_ms() -> u64 {
    u64::try_from(since_epoch().as_millis()).unwrap_or(u64::MAX)
}

/// Whole seconds since the UNIX epoch.
pub fn now_s() -> u64 {
    since_epoch().as_secs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_and_milliseconds_agree() {
        let (s, ms) = (now_s(), now_ms());
        assert!(ms / 1000 >= s && ms / 1000 - s <= 1);
        assert!(s > 1_700_000_000, "after 2023");
    }
}
