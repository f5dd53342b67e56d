//! Admission on the token path: token buckets on allocating brand-new users (global and per
//! identity issuer: the seeds' capacity-exhaustion attack, where an attacker with many accounts
//! fills every node), and the bound on token requests doing database work at once (load
//! shedding: past it a request is answered 503 at once instead of queueing behind a saturated
//! pool until every client times out).

use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::config::NewUserLimits;

/// Which limit refused a new user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Throttled {
    /// All issuers together.
    Global(Duration),
    /// The caller's issuer.
    Issuer(Duration),
}

impl Throttled {
    /// How long until the bucket has a token again.
    pub fn wait(self) -> Duration {
        match self {
            Self::Global(d) | Self::Issuer(d) => d,
        }
    }

    /// The metric label.
    pub fn scope(self) -> &'static str {
        match self {
            Self::Global(_) => "global",
            Self::Issuer(_) => "issuer",
        }
    }
}

fn quota((rate, burst): (f64, u32)) -> Quota {
    let burst = NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN);
    // Validated: 0.001 ≤ rate, so the period is at most 1000 s and never zero below 1e9/s.
    Quota::with_period(Duration::from_secs_f64(1.0 / rate))
        .unwrap_or_else(|| Quota::per_second(NonZeroU32::MAX))
        .allow_burst(burst)
}

/// The new-user token buckets.
pub struct NewUserLimiter {
    global: Option<DefaultDirectRateLimiter>,
    // Keyed by issuer: only identities a configured verifier accepted get here, so the keys are
    // the few issuers it trusts, not attacker-chosen strings.
    per_issuer: Option<DefaultKeyedRateLimiter<String>>,
    clock: DefaultClock,
}

impl NewUserLimiter {
    /// Buckets for `limits` (each `None` is no limit).
    pub fn new(limits: &NewUserLimits) -> Self {
        Self {
            global: limits.global.map(|l| RateLimiter::direct(quota(l))),
            per_issuer: limits.per_issuer.map(|l| RateLimiter::keyed(quota(l))),
            clock: DefaultClock::default(),
        }
    }

    /// Takes a token for one new user vouched for by `issuer`, or says how long to wait.
    pub fn admit(&self, issuer: &str) -> Result<(), Throttled> {
        if let Some(limiter) = &self.per_issuer {
            limiter
                .check_key(&issuer.to_string())
                .map_err(|not_until| Throttled::Issuer(not_until.wait_time_from(self.clock.now())))?;
        }
        if let Some(limiter) = &self.global {
            limiter.check().map_err(|not_until| Throttled::Global(not_until.wait_time_from(self.clock.now())))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_burst_passes_then_the_rate_applies_per_issuer_and_globally() {
        let limiter = NewUserLimiter::new(&NewUserLimits { global: Some((0.01, 3)), per_issuer: Some((0.01, 2)) });
        assert_eq!(limiter.admit("a"), Ok(()));
        assert_eq!(limiter.admit("a"), Ok(()));
        let refused = limiter.admit("a");
        assert!(matches!(refused, Err(Throttled::Issuer(d)) if d > Duration::from_secs(50)), "{refused:?}");
        assert_eq!(limiter.admit("b"), Ok(()));
        let refused = limiter.admit("c");
        assert!(matches!(refused, Err(Throttled::Global(d)) if d > Duration::from_secs(50)), "{refused:?}");
    }

    #[test]
    fn no_limits_admit_everyone() {
        let limiter = NewUserLimiter::new(&NewUserLimits { global: None, per_issuer: None });
        assert!((0..10_000).all(|_| limiter.admit("a").is_ok()));
    }
}
