//! A token source's lifecycle as metrics, so an alert can fire before
//! requests fail: fetch outcomes by error kind, the time left on the access
//! token and on the client registration, and whether a person must log in
//! again (`needs_login`).
//!
//! `needs_login` turns 1 when SSO-OIDC answers a fetch with `InvalidGrant`
//! (the refresh token was revoked, expired or already redeemed) or when the
//! registration is known to have expired, and back to 0 after a successful
//! fetch. Every series carries `source` (`default` for `[token]`).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use tokio::time::Instant;

use crate::{
    metric_names,
    oidc::{ErrorClass, ServiceErrorKind},
    token::{Token, TokenError},
};

/// The `kind` label of a successful fetch.
const KIND_NONE: &str = "none";

/// Lifecycle metrics of one token source.
#[derive(Debug)]
pub(crate) struct LifecycleMetrics {
    source: String,
    /// The last fetch was refused with `InvalidGrant`.
    grant_rejected: AtomicBool,
}

impl LifecycleMetrics {
    /// Metrics labelled `source = name`; `needs_login` starts at 0, so the
    /// series exists before the first fetch.
    pub(crate) fn new(name: &str) -> Self {
        let metrics = Self {
            source: name.to_owned(),
            grant_rejected: AtomicBool::new(false),
        };
        metrics.set_needs_login(false);
        metrics
    }

    /// Records one fetch: its outcome (`success`, `throttled`, `transient`,
    /// `fatal`) and error kind, its duration, and what it means for
    /// `needs_login`.
    pub(crate) fn record_fetch(
        &self,
        result: &Result<Token, TokenError>,
        took: Duration,
        registration_expires_at: Option<Instant>,
    ) {
        let (outcome, kind) = match result {
            Ok(_) => ("success", KIND_NONE),
            Err(e) => (outcome(e.class()), e.kind_name()),
        };
        metrics::counter!(
            metric_names::TOKEN_FETCHES_TOTAL.name,
            "source" => self.source.clone(),
            "outcome" => outcome,
            "kind" => kind,
        )
        .increment(1);
        metrics::histogram!(
            metric_names::TOKEN_FETCH_DURATION_SECONDS.name,
            "source" => self.source.clone(),
        )
        .record(took.as_secs_f64());
        match result {
            Ok(_) => self.grant_rejected.store(false, Ordering::Relaxed),
            Err(e) if is_login_needed(e) => self.grant_rejected.store(true, Ordering::Relaxed),
            // Other failures say nothing about the refresh token.
            Err(_) => {}
        }
        self.set_needs_login(self.needs_login(registration_expires_at));
    }

    /// Whether a person must log in before a new token can be had.
    pub(crate) fn needs_login(&self, registration_expires_at: Option<Instant>) -> bool {
        self.grant_rejected.load(Ordering::Relaxed)
            || registration_expires_at.is_some_and(|at| at <= Instant::now())
    }

    /// Sets the gauges that depend on the clock: the current token's time
    /// left (0 without one), whether one is held, the registration's time
    /// left (where known) and `needs_login`. Called before each scrape.
    pub(crate) fn publish(
        &self,
        current: Option<&Token>,
        registration_expires_at: Option<Instant>,
    ) {
        let ttl = current.map_or(Duration::ZERO, Token::ttl);
        metrics::gauge!(metric_names::TOKEN_EXPIRY_SECONDS.name, "source" => self.source.clone())
            .set(ttl.as_secs_f64());
        metrics::gauge!(metric_names::TOKEN_VALID.name, "source" => self.source.clone())
            .set(if ttl.is_zero() { 0.0 } else { 1.0 });
        if let Some(at) = registration_expires_at {
            let left = at.saturating_duration_since(Instant::now());
            metrics::gauge!(
                metric_names::REGISTRATION_EXPIRY_SECONDS.name,
                "source" => self.source.clone(),
            )
            .set(left.as_secs_f64());
        }
        self.set_needs_login(self.needs_login(registration_expires_at));
    }

    fn set_needs_login(&self, on: bool) {
        metrics::gauge!(metric_names::NEEDS_LOGIN.name, "source" => self.source.clone())
            .set(if on { 1.0 } else { 0.0 });
    }
}

fn outcome(class: ErrorClass) -> &'static str {
    match class {
        ErrorClass::Throttled => "throttled",
        ErrorClass::Transient => "transient",
        ErrorClass::Fatal | ErrorClass::Pending => "fatal",
    }
}

/// `InvalidGrant`: the refresh token (or device code) will not work again;
/// `LoginRequired`: a device login waits for a person.
fn is_login_needed(e: &TokenError) -> bool {
    matches!(e, TokenError::LoginRequired(_))
        || matches!(e, TokenError::Oidc(oidc) if oidc.service_kind() == Some(ServiceErrorKind::InvalidGrant))
}

#[cfg(test)]
mod tests {
    use std::{
        collections::VecDeque,
        sync::{Arc, Mutex},
    };

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle, PrometheusRecorder};

    use super::*;
    use crate::{
        cache::{CacheOptions, TokenCache},
        oidc::{OidcError, Operation},
        secret::Secret,
        token::{FetchFuture, Reuse, TokenSource},
    };

    /// What the fake source answers next: a token of this lifetime, or an
    /// error of this kind.
    type Answer = Result<Duration, ServiceErrorKind>;

    /// A source that plays a script and knows a registration expiry.
    #[derive(Clone, Default)]
    struct Scripted {
        answers: Arc<Mutex<VecDeque<Answer>>>,
        registration: Arc<Mutex<Option<Instant>>>,
        /// Tokens issued so far (each gets its own value: tokens are known
        /// by their value).
        issued: Arc<Mutex<u32>>,
    }

    impl Scripted {
        fn then(&self, answer: Answer) {
            self.answers.lock().unwrap().push_back(answer);
        }
    }

    impl TokenSource for Scripted {
        fn identity(&self) -> String {
            "scripted".into()
        }
        fn scopes(&self) -> &[String] {
            &[]
        }
        fn fetch(&self, _reuse: Reuse) -> FetchFuture<'_> {
            let answer = self.answers.lock().unwrap().pop_front();
            let n = {
                let mut issued = self.issued.lock().unwrap();
                *issued += 1;
                *issued
            };
            Box::pin(async move {
                match answer.expect("a scripted answer") {
                    Ok(lifetime) => Ok(Token::new(Secret::new(format!("at-{n}")), lifetime)),
                    Err(kind) => Err(TokenError::Oidc(OidcError::Service {
                        operation: Operation::CreateToken,
                        kind,
                        details: Box::default(),
                    })),
                }
            })
        }
        fn registration_expires_at(&self) -> Option<Instant> {
            *self.registration.lock().unwrap()
        }
    }

    /// A recorder of this test's own (this thread only: the paused-clock
    /// runtime is single-threaded).
    fn recorder() -> (PrometheusRecorder, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        (recorder, handle)
    }

    /// The value of `name{source="default"[, more]}` in `handle`'s output.
    fn value(handle: &PrometheusHandle, name: &str, more: &[(&str, &str)]) -> Option<f64> {
        let text = handle.render();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .find_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                let (metric, labels) = series.split_once('{')?;
                let labels: Vec<&str> = labels.trim_end_matches('}').split(',').collect();
                let wanted = std::iter::once(("source", "default")).chain(more.iter().copied());
                let all = wanted
                    .clone()
                    .all(|(k, v)| labels.contains(&format!("{k}=\"{v}\"").as_str()));
                (metric == name && all).then(|| value.parse().unwrap())
            })
    }

    fn options() -> CacheOptions {
        CacheOptions {
            expiry_margin: Duration::from_secs(1),
            ..CacheOptions::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_gauges_follow_the_paused_clock() {
        let (recorder, handle) = recorder();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let source = Scripted::default();
        *source.registration.lock().unwrap() = Some(Instant::now() + Duration::from_secs(7200));
        source.then(Ok(Duration::from_secs(3600)));
        let cache = TokenCache::new(source.clone(), options());

        // Before any token: none held, 0 left, no login needed.
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::TOKEN_VALID.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::TOKEN_EXPIRY_SECONDS.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );

        cache.get().await.unwrap();
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::TOKEN_VALID.name, &[]),
            Some(1.0)
        );
        assert_eq!(
            value(&handle, metric_names::TOKEN_EXPIRY_SECONDS.name, &[]),
            Some(3600.0)
        );
        assert_eq!(
            value(&handle, metric_names::REGISTRATION_EXPIRY_SECONDS.name, &[]),
            Some(7200.0)
        );

        tokio::time::advance(Duration::from_secs(600)).await;
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::TOKEN_EXPIRY_SECONDS.name, &[]),
            Some(3000.0)
        );
        assert_eq!(
            value(&handle, metric_names::REGISTRATION_EXPIRY_SECONDS.name, &[]),
            Some(6600.0)
        );

        // Past the token's end (no request in between, so no refresh): 0
        // left and not valid; the registration still runs.
        tokio::time::advance(Duration::from_secs(3000)).await;
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::TOKEN_VALID.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::TOKEN_EXPIRY_SECONDS.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::REGISTRATION_EXPIRY_SECONDS.name, &[]),
            Some(3600.0)
        );
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );

        // The registration lapses: a login is needed, without any fetch.
        tokio::time::advance(Duration::from_secs(3600)).await;
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::REGISTRATION_EXPIRY_SECONDS.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(1.0)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn needs_login_after_invalid_grant_until_a_fetch_succeeds() {
        let (recorder, handle) = recorder();
        let _guard = metrics::set_default_local_recorder(&recorder);
        let source = Scripted::default();
        source.then(Ok(Duration::from_secs(60)));
        let cache = TokenCache::new(source.clone(), options());
        cache.get().await.unwrap();
        let fetches = |outcome: &str, kind: &str| {
            value(
                &handle,
                metric_names::TOKEN_FETCHES_TOTAL.name,
                &[("outcome", outcome), ("kind", kind)],
            )
        };
        assert_eq!(fetches("success", "none"), Some(1.0));
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );

        // Transient trouble is not a reason to log in.
        tokio::time::advance(Duration::from_secs(60)).await;
        source.then(Err(ServiceErrorKind::SlowDown));
        assert_eq!(cache.get().await.unwrap_err().kind(), "SlowDown");
        assert_eq!(fetches("throttled", "SlowDown"), Some(1.0));
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );

        // The refresh token was revoked: InvalidGrant.
        cache.clear_failure();
        source.then(Err(ServiceErrorKind::InvalidGrant));
        assert_eq!(cache.get().await.unwrap_err().kind(), "InvalidGrant");
        assert_eq!(fetches("fatal", "InvalidGrant"), Some(1.0));
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(1.0)
        );
        // It stays 1 as time passes and while other failures come in.
        tokio::time::advance(Duration::from_secs(600)).await;
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(1.0)
        );
        cache.clear_failure();
        source.then(Err(ServiceErrorKind::InternalServer));
        assert_eq!(cache.get().await.unwrap_err().kind(), "InternalServer");
        assert_eq!(fetches("transient", "InternalServer"), Some(1.0));
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(1.0)
        );

        // A new login (new credentials reloaded): the next fetch succeeds.
        cache.clear_failure();
        source.then(Ok(Duration::from_secs(60)));
        cache.get().await.unwrap();
        assert_eq!(fetches("success", "none"), Some(2.0));
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );
        cache.publish_metrics();
        assert_eq!(
            value(&handle, metric_names::NEEDS_LOGIN.name, &[]),
            Some(0.0)
        );
        assert_eq!(
            value(&handle, metric_names::TOKEN_VALID.name, &[]),
            Some(1.0)
        );
    }

    #[test]
    fn only_invalid_grant_means_a_login() {
        let oidc = |kind| {
            TokenError::Oidc(OidcError::Service {
                operation: Operation::CreateToken,
                kind,
                details: Box::default(),
            })
        };
        assert!(is_login_needed(&oidc(ServiceErrorKind::InvalidGrant)));
        for kind in [
            ServiceErrorKind::SlowDown,
            ServiceErrorKind::InternalServer,
            ServiceErrorKind::InvalidClient,
            ServiceErrorKind::AccessDenied,
            ServiceErrorKind::ExpiredToken,
        ] {
            assert!(!is_login_needed(&oidc(kind)), "{kind}");
        }
    }
}
