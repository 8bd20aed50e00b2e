//! Failure memory: with no valid token, a failed fetch is remembered with
//! growing backoff, so callers get the error at once instead of each
//! starting a fetch. A thousand requests during an outage cost a handful of
//! `CreateToken` calls.

use std::{sync::Mutex, time::Duration};

use tokio::time::Instant;

use super::{CacheOptions, TokenUnavailable};
use crate::{oidc::ErrorClass, token::TokenError};

/// The last failed fetch, while no token could be had.
#[derive(Debug)]
struct Failure {
    /// Why it failed.
    error: TokenError,
    /// Callers are answered with `error` until then.
    until: Instant,
    /// Failures in a row; the backoff grows with it.
    streak: u32,
}

/// Remembers the last failure until its backoff ends; a token clears it.
#[derive(Debug, Default)]
pub(super) struct FailureMemory {
    /// `None` while fetches succeed (or after `clear`).
    remembered: Mutex<Option<Failure>>,
}

impl FailureMemory {
    /// Remembers `error`; returns the backoff callers are told to wait.
    /// Fatal errors back off on `fatal_backoff`, the others on
    /// `transient_backoff`.
    pub(super) fn record(&self, error: &TokenError, options: &CacheOptions) -> Duration {
        let mut remembered = self.remembered.lock().expect("failure lock");
        let streak = remembered.as_ref().map_or(0, |f| f.streak) + 1;
        let backoff = match error.class() {
            ErrorClass::Fatal | ErrorClass::Pending => &options.fatal_backoff,
            ErrorClass::Transient | ErrorClass::Throttled => &options.transient_backoff,
        };
        let delay = backoff.delay(streak - 1).max(Duration::from_millis(1));
        let now = Instant::now();
        *remembered = Some(Failure {
            error: error.clone(),
            until: now.checked_add(delay).unwrap_or(now),
            streak,
        });
        delay
    }

    /// The remembered failure if its backoff has not ended at `now`.
    pub(super) fn active(&self, now: Instant) -> Option<TokenUnavailable> {
        let remembered = self.remembered.lock().expect("failure lock");
        let f = remembered.as_ref().filter(|f| now < f.until)?;
        Some(TokenUnavailable {
            source: f.error.clone(),
            retry_after: f.until - now,
        })
    }

    /// The remembered failure, also after its backoff ended (for readiness).
    pub(super) fn last(&self, now: Instant) -> Option<TokenUnavailable> {
        let remembered = self.remembered.lock().expect("failure lock");
        remembered.as_ref().map(|f| TokenUnavailable {
            source: f.error.clone(),
            retry_after: f.until.saturating_duration_since(now),
        })
    }

    /// Forgets the failure (a token arrived, or credentials changed).
    pub(super) fn clear(&self) {
        *self.remembered.lock().expect("failure lock") = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        oidc::{OidcError, Operation, ServiceErrorKind},
        retry::{Backoff, Jitter},
    };

    fn error(kind: ServiceErrorKind) -> TokenError {
        TokenError::Oidc(OidcError::Service {
            operation: Operation::CreateToken,
            kind,
            details: Box::default(),
        })
    }

    fn options() -> CacheOptions {
        let backoff = |base| Backoff {
            base: Duration::from_secs(base),
            factor: 2.0,
            cap: Duration::from_secs(100),
            jitter: Jitter::None,
        };
        CacheOptions {
            transient_backoff: backoff(1),
            fatal_backoff: backoff(5),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_by_class_and_ends() {
        let memory = FailureMemory::default();
        let options = options();
        let fatal = error(ServiceErrorKind::InvalidGrant);
        assert_eq!(memory.record(&fatal, &options), Duration::from_secs(5));
        assert_eq!(memory.record(&fatal, &options), Duration::from_secs(10));
        let active = memory.active(Instant::now()).unwrap();
        assert_eq!(active.kind(), "InvalidGrant");
        assert_eq!(active.retry_after, Duration::from_secs(10));
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(memory.active(Instant::now()).is_none());
        assert_eq!(memory.last(Instant::now()).unwrap().kind(), "InvalidGrant");
        // The streak continues across classes; the class picks the curve.
        let transient = error(ServiceErrorKind::InternalServer);
        assert_eq!(memory.record(&transient, &options), Duration::from_secs(4));
        memory.clear();
        assert!(memory.last(Instant::now()).is_none());
        assert_eq!(memory.record(&transient, &options), Duration::from_secs(1));
    }
}
