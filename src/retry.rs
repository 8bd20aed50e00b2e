//! The retry policy for SSO-OIDC calls.
//!
//! Throttled errors (SlowDown) and transient ones (InternalServer, other 5xx,
//! connect, timeout, I/O) are retried with exponential backoff, throttled
//! ones on a steeper curve; fatal errors never are. Every retry draws on a
//! shared [`TpsBudget`], so an outage seen by many callers does not multiply
//! the load on the service.

use std::{fmt, sync::Arc, time::Duration};

use tower::retry::{
    Policy,
    budget::{Budget, TpsBudget},
};

use crate::metric_names;
use crate::oidc::{ErrorClass, OidcError};

/// How a backoff delay is randomised inside its window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Jitter {
    /// Uniform in `[0, window]`: spreads a fleet best (AWS "full jitter").
    Full,
    /// Uniform in `[window/2, window]`: spread, yet never shorter than half.
    Equal,
    /// Exactly the window; for tests and single clients.
    None,
}

/// One backoff curve: `min(cap, base * factor^retry)`, jittered.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Window of the first retry.
    pub base: Duration,
    /// Growth per retry.
    pub factor: f64,
    /// Largest window.
    pub cap: Duration,
    /// Randomisation inside the window.
    pub jitter: Jitter,
}

impl Backoff {
    /// The window (upper bound) of retry number `retry` (0 = first retry).
    pub fn window(&self, retry: u32) -> Duration {
        let grown = self.base.as_secs_f64() * self.factor.powi(retry.min(64) as i32);
        Duration::from_secs_f64(grown.min(self.cap.as_secs_f64()))
    }

    /// A delay for retry number `retry`.
    pub fn delay(&self, retry: u32) -> Duration {
        let window = self.window(retry);
        match self.jitter {
            Jitter::None => window,
            Jitter::Full => window.mul_f64(rand::random::<f64>()),
            Jitter::Equal => window / 2 + (window / 2).mul_f64(rand::random::<f64>()),
        }
    }
}

/// Settings of the retry policy.
#[derive(Debug, Clone)]
pub struct RetryConfig {
    /// Total attempts per call, the first included (1 = no retry).
    pub max_attempts: u32,
    /// Backoff for transient errors.
    pub transient: Backoff,
    /// Backoff for throttling (SlowDown): starts higher and grows faster.
    pub throttled: Backoff,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            transient: Backoff {
                base: Duration::from_millis(200),
                factor: 2.0,
                cap: Duration::from_secs(5),
                jitter: Jitter::Full,
            },
            throttled: Backoff {
                base: Duration::from_secs(1),
                factor: 3.0,
                cap: Duration::from_secs(20),
                jitter: Jitter::Equal,
            },
        }
    }
}

/// What the policy decided about one failed attempt; handed to observers
/// (metrics, tests).
#[derive(Debug, Clone, PartialEq)]
pub struct RetryEvent {
    /// 1-based number of the attempt that failed.
    pub attempt: u32,
    /// Class of its error.
    pub class: ErrorClass,
    /// The error's kind name (`SlowDown`, `Connect`, ...).
    pub kind: &'static str,
    /// The delay before the next attempt, or `None` when giving up.
    pub delay: Option<Duration>,
    /// Why the policy gave up, if it did.
    pub gave_up: Option<GiveUp>,
}

/// Why no further attempt was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum GiveUp {
    /// The error is fatal (or pending).
    NotRetryable,
    /// `max_attempts` reached.
    AttemptsExhausted,
    /// The shared retry budget is spent.
    BudgetExhausted,
}

type Observer = Arc<dyn Fn(&RetryEvent) + Send + Sync>;

/// A [`tower::retry::Policy`] for `CreateToken`. Clone one per call (tower's
/// `Retry` does); clones share the budget and the observer.
#[derive(Clone)]
pub struct OidcRetryPolicy {
    config: Arc<RetryConfig>,
    budget: Arc<TpsBudget>,
    observer: Option<Observer>,
    attempt: u32,
}

impl fmt::Debug for OidcRetryPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OidcRetryPolicy")
            .field("config", &self.config)
            .field("attempt", &self.attempt)
            .finish_non_exhaustive()
    }
}

impl OidcRetryPolicy {
    /// A policy with a budget that allows retries of 20% of calls on top of
    /// a floor of one retry per second, over a 10 s window.
    pub fn new(config: RetryConfig) -> Self {
        Self::with_budget(
            config,
            Arc::new(TpsBudget::new(Duration::from_secs(10), 1, 0.2)),
        )
    }

    /// A policy drawing on the given (shared) budget.
    pub fn with_budget(config: RetryConfig, budget: Arc<TpsBudget>) -> Self {
        Self {
            config: Arc::new(config),
            budget,
            observer: None,
            attempt: 0,
        }
    }

    /// Calls `observer` for every failed attempt with the decision taken.
    #[must_use]
    pub fn with_observer(mut self, observer: impl Fn(&RetryEvent) + Send + Sync + 'static) -> Self {
        self.observer = Some(Arc::new(observer));
        self
    }

    /// The settings.
    pub fn config(&self) -> &RetryConfig {
        &self.config
    }

    /// Decides about a failed attempt. Public so that other call sites (the
    /// device flow) can reuse the same decisions.
    pub fn decide(&mut self, error: &OidcError) -> RetryEvent {
        self.attempt += 1;
        let class = error.class();
        let mut event = RetryEvent {
            attempt: self.attempt,
            class,
            kind: error.kind_name(),
            delay: None,
            gave_up: None,
        };
        let backoff = match class {
            ErrorClass::Throttled => &self.config.throttled,
            ErrorClass::Transient => &self.config.transient,
            ErrorClass::Fatal | ErrorClass::Pending => {
                event.gave_up = Some(GiveUp::NotRetryable);
                return event;
            }
        };
        if self.attempt >= self.config.max_attempts {
            event.gave_up = Some(GiveUp::AttemptsExhausted);
        } else if !self.budget.withdraw() {
            event.gave_up = Some(GiveUp::BudgetExhausted);
        } else {
            event.delay = Some(backoff.delay(self.attempt - 1));
        }
        event
    }

    fn observe(&self, event: &RetryEvent) {
        metrics::counter!(
            metric_names::OIDC_RETRY_DECISIONS_TOTAL.name,
            "class" => event.class.as_str(),
            "decision" => match event.gave_up {
                None => "retry",
                Some(GiveUp::NotRetryable) => "not_retryable",
                Some(GiveUp::AttemptsExhausted) => "attempts_exhausted",
                Some(GiveUp::BudgetExhausted) => "budget_exhausted",
            },
        )
        .increment(1);
        if let Some(observer) = &self.observer {
            observer(event);
        }
    }
}

/// One policy for every SSO-OIDC call (`CreateToken`, `CreateTokenWithIAM`):
/// requests are small JSON documents, always replayable.
impl<Req: Clone, Res> Policy<Req, Res, OidcError> for OidcRetryPolicy {
    type Future = tokio::time::Sleep;

    fn retry(
        &mut self,
        _request: &mut Req,
        result: &mut Result<Res, OidcError>,
    ) -> Option<Self::Future> {
        if self.attempt == 0 {
            // One deposit per call (not per attempt) funds the retries.
            self.budget.deposit();
        }
        match result {
            Ok(_) => None,
            Err(error) => {
                let event = self.decide(error);
                self.observe(&event);
                if let Some(delay) = event.delay {
                    tracing::debug!(
                        attempt = event.attempt,
                        kind = event.kind,
                        class = %event.class,
                        delay_ms = delay.as_millis() as u64,
                        "retrying SSO-OIDC call"
                    );
                }
                event.delay.map(tokio::time::sleep)
            }
        }
    }

    fn clone_request(&mut self, request: &Req) -> Option<Req> {
        // Request bodies are a few hundred bytes: always replayable.
        Some(request.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oidc::{Operation, ServiceErrorKind};

    fn service(kind: ServiceErrorKind) -> OidcError {
        OidcError::Service {
            operation: Operation::CreateToken,
            kind,
            details: Box::default(),
        }
    }

    fn exact() -> RetryConfig {
        let mut c = RetryConfig::default();
        c.transient.jitter = Jitter::None;
        c.throttled.jitter = Jitter::None;
        c.max_attempts = 4;
        c
    }

    #[test]
    fn fatal_errors_are_never_retried() {
        for kind in ServiceErrorKind::ALL {
            let mut p = OidcRetryPolicy::new(exact());
            let ev = p.decide(&service(kind));
            match kind.class() {
                ErrorClass::Fatal | ErrorClass::Pending => {
                    assert_eq!(ev.gave_up, Some(GiveUp::NotRetryable), "{kind}")
                }
                _ => assert!(ev.delay.is_some(), "{kind}"),
            }
        }
    }

    #[test]
    fn delays_grow_and_throttling_grows_faster() {
        let mut t = OidcRetryPolicy::new(exact());
        let mut s = OidcRetryPolicy::new(exact());
        let t1 = t
            .decide(&service(ServiceErrorKind::InternalServer))
            .delay
            .unwrap();
        let t2 = t
            .decide(&service(ServiceErrorKind::InternalServer))
            .delay
            .unwrap();
        let s1 = s
            .decide(&service(ServiceErrorKind::SlowDown))
            .delay
            .unwrap();
        let s2 = s
            .decide(&service(ServiceErrorKind::SlowDown))
            .delay
            .unwrap();
        assert!(t2 > t1 && s2 > s1);
        assert!(s2.as_secs_f64() / s1.as_secs_f64() > t2.as_secs_f64() / t1.as_secs_f64());
        assert!(s1 > t1);
    }

    #[test]
    fn attempts_are_bounded() {
        let mut p = OidcRetryPolicy::new(exact());
        for _ in 0..3 {
            assert!(
                p.decide(&service(ServiceErrorKind::InternalServer))
                    .delay
                    .is_some()
            );
        }
        let last = p.decide(&service(ServiceErrorKind::InternalServer));
        assert_eq!(last.gave_up, Some(GiveUp::AttemptsExhausted));
    }

    #[test]
    fn jitter_stays_inside_its_window() {
        let b = Backoff {
            base: Duration::from_millis(100),
            factor: 2.0,
            cap: Duration::from_secs(1),
            jitter: Jitter::Full,
        };
        let e = Backoff {
            jitter: Jitter::Equal,
            ..b
        };
        for retry in 0..8 {
            for _ in 0..100 {
                assert!(b.delay(retry) <= b.window(retry));
                let d = e.delay(retry);
                assert!(d >= e.window(retry) / 2 && d <= e.window(retry));
            }
        }
        assert_eq!(b.window(10), Duration::from_secs(1));
    }

    #[test]
    fn shared_budget_caps_retries_across_calls() {
        // A budget with no floor and no deposits allows nothing.
        let budget = Arc::new(TpsBudget::new(Duration::from_secs(1), 0, 0.0));
        let mut p = OidcRetryPolicy::with_budget(exact(), budget);
        let ev = p.decide(&service(ServiceErrorKind::InternalServer));
        assert_eq!(ev.gave_up, Some(GiveUp::BudgetExhausted));
    }
}
